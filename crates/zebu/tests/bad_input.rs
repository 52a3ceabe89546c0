//! Bad input gets a clear error and changes nothing.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use zebu_proto::data::{Hello, Welcome, WelcomeStatus, PROTOCOL_VERSION, WELCOME_FIXED_BYTES};

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn volume_names(c: &Cluster) -> Vec<String> {
    let v = c.cli_json(&["volume", "list"]).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_owned())
        .collect()
}

fn read_welcome(s: &mut TcpStream, magic: [u8; 8]) -> Welcome {
    let mut fixed = [0u8; WELCOME_FIXED_BYTES];
    fixed[..8].copy_from_slice(&magic);
    s.read_exact(&mut fixed[8..]).unwrap();
    let mut b = fixed.to_vec();
    b.resize(WELCOME_FIXED_BYTES + Welcome::rest_len(&fixed).unwrap(), 0);
    s.read_exact(&mut b[WELCOME_FIXED_BYTES..]).unwrap();
    Welcome::decode(&b).unwrap()
}

/// The data protocol's handshake as an engine does it, proving `secret`; returns the Welcome
/// and every byte this side sent.
fn handshake(addr: &str, hello: &Hello, secret: &str) -> (Welcome, Vec<u8>) {
    use zebu_proto::auth::*;
    let mut s = TcpStream::connect(addr).unwrap();
    let hello_bytes = hello.encode();
    s.write_all(&hello_bytes).unwrap();
    let mut sent = hello_bytes.clone();
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).unwrap();
    if magic == CHALLENGE_MAGIC {
        let mut b = [0u8; CHALLENGE_FRAME_BYTES];
        b[..8].copy_from_slice(&magic);
        s.read_exact(&mut b[8..]).unwrap();
        let c = Challenge::decode(&b).unwrap();
        let p = Proof {
            proof: client_proof(secret, &hello_bytes, &c.nonce, &c.proof, &[]),
        }
        .encode();
        s.write_all(&p).unwrap();
        sent.extend_from_slice(&p);
        s.read_exact(&mut magic).unwrap();
    }
    (read_welcome(&mut s, magic), sent)
}

/// Send recorded bytes as they were; the Welcome that comes after the server's challenge.
fn replay(addr: &str, sent: &[u8]) -> Welcome {
    use zebu_proto::auth::*;
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(sent).unwrap();
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).unwrap();
    if magic == CHALLENGE_MAGIC {
        let mut b = [0u8; CHALLENGE_FRAME_BYTES - 8];
        s.read_exact(&mut b).unwrap();
        s.read_exact(&mut magic).unwrap();
    }
    read_welcome(&mut s, magic)
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    require("qemu-io");
    let c = Cluster::separate(15, 2);
    c.cli_ok(&[
        "volume",
        "create",
        "keep",
        "--size",
        "16MiB",
        "--replicas",
        "2",
    ]);

    // The admin token and the cluster secret are readable by their owner only.
    use std::os::unix::fs::PermissionsExt;
    for f in ["admin.token", "cluster.secret"] {
        let mode = std::fs::metadata(c.dir.path().join("manager").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f} has mode {:o}", mode & 0o777);
    }

    // Wrong token: 401 with a hint.
    let o = run(std::process::Command::new(ZEBU)
        .args(["volume", "list"])
        .env("ZEBU_API", &c.api)
        .env("ZEBU_TOKEN", "nope"));
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("token"), "{}", stderr_of(&o));
    // The raw HTTP status, without any token at all.
    let mut s = TcpStream::connect(c.api.trim_start_matches("http://")).unwrap();
    s.write_all(b"GET /v1/volumes HTTP/1.1\r\nHost: zebu\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");

    for (args, expect) in [
        (
            vec![
                "volume",
                "create",
                "keep",
                "--size",
                "16MiB",
                "--replicas",
                "1",
            ],
            "already exists",
        ),
        (
            vec!["volume", "create", "zero", "--size", "0"],
            "greater than zero",
        ),
        (
            vec!["volume", "create", "junk", "--size", "lots"],
            "not valid",
        ),
        (
            vec!["volume", "create", "odd", "--size", "1000"],
            "multiple",
        ),
        (
            vec![
                "volume",
                "create",
                "many",
                "--size",
                "16MiB",
                "--replicas",
                "3",
            ],
            "only 2 node",
        ),
        (
            vec![
                "volume",
                "create",
                "Bad_Name",
                "--size",
                "16MiB",
                "--replicas",
                "1",
            ],
            "not valid",
        ),
        (vec!["volume", "attach", "missing"], "does not exist"),
        (
            vec!["volume", "attach", "keep", "--node", "node-9"],
            "does not exist",
        ),
    ] {
        let o = c.cli(&args);
        assert!(!o.status.success(), "{args:?} must fail");
        assert!(
            stderr_of(&o).contains(expect),
            "{args:?}: expected {expect:?} in: {}",
            stderr_of(&o)
        );
    }
    assert_eq!(
        volume_names(&c),
        vec!["keep".to_string()],
        "a refused request created something"
    );

    // Delete is refused while attached, and says what to do.
    c.cli_ok(&["volume", "attach", "keep", "--node", "node-1"]);
    let o = c.cli(&["volume", "delete", "keep"]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("detach it first"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(c.volume("keep")["state"], "attached");

    // The data protocol refuses a wrong secret and a wrong version.
    let first = c.volume("keep")["replicas"][0].clone();
    let replica = first["name"].as_str().unwrap().to_owned();
    let node: usize = first["node"]
        .as_str()
        .unwrap()
        .trim_start_matches("node-")
        .parse()
        .unwrap();
    let addr = format!("{}:10700", c.node_ip(node - 1));
    let mut hello = Hello {
        version: PROTOCOL_VERSION,
        volume: "keep".into(),
        replica: replica.clone(),
        epoch: 0,
        flags: 0,
        nonce: vec![0x5a; zebu_proto::auth::NONCE_BYTES],
    };
    let (w, _) = handshake(&addr, &hello, "wrong");
    assert_eq!(w.status, WelcomeStatus::AuthFailed, "{w:?}");
    let secret = std::fs::read_to_string(c.dir.path().join("manager/cluster.secret"))
        .unwrap()
        .trim()
        .to_owned();
    // The secret never crosses the wire: the Hello carries a nonce.
    assert!(!hello
        .encode()
        .windows(secret.len())
        .any(|w| w == secret.as_bytes()));
    hello.version = PROTOCOL_VERSION + 1;
    let (w, _) = handshake(&addr, &hello, &secret);
    assert_eq!(w.status, WelcomeStatus::BadVersion, "{w:?}");
    hello.version = PROTOCOL_VERSION;
    hello.volume = "other".into();
    assert_eq!(
        handshake(&addr, &hello, &secret).0.status,
        WelcomeStatus::VolumeMismatch
    );
    hello.volume = "keep".into();
    // The volume was attached once: its replicas have accepted epoch 1, and refuse an engine
    // of an older attachment.
    let (w, _) = handshake(&addr, &hello, &secret);
    assert_eq!(w.status, WelcomeStatus::Fenced, "{w:?}");
    assert!(w.message.contains("newer engine"), "{w:?}");
    hello.epoch = 1;
    let (w, recorded) = handshake(&addr, &hello, &secret);
    assert_eq!(w.status, WelcomeStatus::Ok);
    // A recorded handshake, replayed byte for byte, is refused: the server's challenge is new.
    let w = replay(&addr, &recorded);
    assert_eq!(w.status, WelcomeStatus::AuthFailed, "{w:?}");
    // A higher epoch from a peer without the secret is refused before it is recorded.
    hello.epoch = 99;
    let (w, _) = handshake(&addr, &hello, "wrong");
    assert_eq!(w.status, WelcomeStatus::AuthFailed, "{w:?}");
    hello.epoch = 1;
    assert_eq!(
        handshake(&addr, &hello, &secret).0.status,
        WelcomeStatus::Ok
    );
    // Garbage on the data port closes that connection only.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[0xffu8; 64]).unwrap();
    let mut buf = [0u8; 256];
    let _ = s.read(&mut buf);

    // Garbage on the NBD port: that connection closes; the export keeps serving.
    let nbd = format!("{}:10809", c.node_ip(0));
    let mut s = TcpStream::connect(&nbd).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&[0u8, 0, 0, 3]).unwrap();
    s.write_all(&[0x42u8; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(c.volume("keep")["state"], "attached");

    // An unknown option gets NBD_REP_ERR_UNSUP; an unknown command gets EINVAL; the
    // connection goes on working after both.
    let mut s = TcpStream::connect(&nbd).unwrap();
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let option = |s: &mut TcpStream, opt: u32, data: &[u8]| {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    };
    let reply = |s: &mut TcpStream| -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).unwrap();
        (kind, d)
    };
    option(&mut s, 99, b"junk");
    let (kind, _) = reply(&mut s);
    assert_eq!(
        kind,
        (1 << 31) + 1,
        "unknown option must get NBD_REP_ERR_UNSUP"
    );
    // GO for an unknown export: NBD_REP_ERR_UNKNOWN, and the negotiation goes on.
    let go = |name: &str| {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    };
    option(&mut s, 7, &go("nope"));
    let (kind, msg) = reply(&mut s);
    assert_eq!(
        kind,
        (1 << 31) + 6,
        "unknown export must get NBD_REP_ERR_UNKNOWN"
    );
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    option(&mut s, 7, &go("keep"));
    loop {
        let (kind, _) = reply(&mut s);
        if kind == 1 {
            break; // ACK: transmission starts
        }
        assert_eq!(kind, 3, "GO answers with INFO replies, then ACK");
    }
    let request = |s: &mut TcpStream, kind: u16, handle: u64, offset: u64, len: u32| {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        s.write_all(&r).unwrap();
    };
    let simple = |s: &mut TcpStream| -> (u32, u64) {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    };
    request(&mut s, 99, 7, 0, 0);
    assert_eq!(simple(&mut s), (22, 7), "unknown command must get EINVAL");
    request(&mut s, 0, 8, 16 << 20, 4096); // read past the end
    assert_eq!(
        simple(&mut s),
        (22, 8),
        "a read past the end must get EINVAL"
    );
    request(&mut s, 3, 9, 0, 0); // flush still works
    assert_eq!(simple(&mut s), (0, 9));
    request(&mut s, 2, 10, 0, 0); // DISC
    let mut tail = Vec::new();
    let _ = s.read_to_end(&mut tail);
    assert!(tail.is_empty(), "nothing may follow DISC");
    let uri = c.volume("keep")["nbd_uri"].as_str().unwrap().to_owned();
    qemu_io(
        &uri,
        &["write -P 7 0 4096".into(), "read -P 7 0 4096".into()],
    );

    // Detach, then delete works and removes the replicas from disk.
    c.cli_ok(&["volume", "detach", "keep"]);
    c.cli_ok(&["volume", "delete", "keep"]);
    assert!(volume_names(&c).is_empty());
    let left = sh(&format!(
        "find {} -name 'keep-r-*' | wc -l",
        c.dir.path().display()
    ));
    assert_eq!(left.trim(), "0", "replica directories were left behind");
}
