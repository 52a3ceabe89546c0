//! NBD over TLS (`docs/hardening.md`, 2): real clients (qemu-img, qemu-io, nbdcopy, nbdinfo)
//! speak STARTTLS with a pre-shared key or X.509 certificates; a node with TLS refuses plain
//! TCP clients and wrong keys, and changes nothing for them; its unix socket stays plain.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// Run a client; its success and its output (stdout and stderr).
fn client(cmd: &mut Command) -> (bool, String) {
    let o = run(cmd);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), out)
}

/// qemu-io with a PSK (qemu reads DIR/keys.psk), against `export` on `host`.
fn qemu_io_psk(dir: &Path, user: &str, host: &str, export: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.arg("--object").arg(format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username={user}",
        dir.display()
    ));
    c.args([
        "--image-opts",
        &format!("driver=nbd,host={host},port=10809,export={export},tls-creds=tls0"),
    ]);
    for x in cmds {
        c.args(["-c", x]);
    }
    client(&mut c)
}

#[test]
fn nbd_over_tls_with_a_psk_round_trips_and_refuses_plain_clients_and_wrong_keys() {
    for t in ["qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "psktool"] {
        require(t);
    }
    let keys = tempfile::tempdir().unwrap();
    let good = keys.path().join("good");
    let bad = keys.path().join("bad");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::create_dir_all(&bad).unwrap();
    // The same user with another key, as an attacker who guessed the name would have.
    sh(&format!("psktool -u alice -p {}/keys.psk", good.display()));
    sh(&format!("psktool -u alice -p {}/keys.psk", bad.display()));
    let psk = good.join("keys.psk");
    let c = Cluster::separate_with(51, 2, &["--nbd-tls-psk-file", psk.to_str().unwrap()]);
    let uri = c.create_attached("secret", "64MiB", 2, "node-1");
    let host = c.node_ip(0);
    assert_eq!(
        uri,
        format!("nbds://{host}:10809/secret"),
        "the URI says TLS"
    );
    let tls_uri = |dir: &Path| {
        format!(
            "nbds://alice@{host}:10809/secret?tls-psk-file={}",
            dir.join("keys.psk").display()
        )
    };

    // qemu-img info and qemu-io with qemu's PSK credentials.
    let (ok, out) = client(Command::new("qemu-img").args([
        "info",
        "--object",
        &format!(
            "tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice",
            good.display()
        ),
        "--image-opts",
        &format!("driver=nbd,host={host},port=10809,export=secret,tls-creds=tls0"),
    ]));
    assert!(
        ok && out.contains("64 MiB"),
        "qemu-img info over TLS: {out}"
    );
    let (ok, out) = qemu_io_psk(
        &good,
        "alice",
        &host,
        "secret",
        &["write -P 0xcd 0 4M", "read -P 0xcd 0 4M"],
    );
    assert!(
        ok && !out.contains("Pattern verification failed") && !out.contains("error"),
        "qemu-io over TLS: {out}"
    );

    // nbdcopy in and out over nbds://: byte-identical.
    let src = keys.path().join("src.img");
    let back = keys.path().join("back.img");
    sh(&format!(
        "head -c 16M /dev/urandom > {0} && truncate -s 64M {0}",
        src.display()
    ));
    let (ok, out) = client(Command::new("nbdcopy").arg(&src).arg(tls_uri(&good)));
    assert!(ok, "nbdcopy into the volume over TLS: {out}");
    let (ok, out) = client(Command::new("nbdcopy").arg(tls_uri(&good)).arg(&back));
    assert!(ok, "nbdcopy out of the volume over TLS: {out}");
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "the data read back over TLS differs from what was written"
    );

    // A plain TCP client is refused, and changes nothing.
    let plain = format!("nbd://{host}:10809/secret");
    let (ok, out) =
        client(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x66 0 1M", &plain]));
    assert!(!ok, "a plain TCP client was served: {out}");
    let (ok, out) = client(Command::new("nbdinfo").arg(&plain));
    assert!(!ok, "nbdinfo without TLS was served: {out}");
    assert!(
        out.contains("TLS"),
        "the refusal should say TLS is required: {out}"
    );
    // A wrong key is refused, and changes nothing.
    let (ok, out) = qemu_io_psk(&bad, "alice", &host, "secret", &["write -P 0x77 0 1M"]);
    assert!(!ok, "a client with the wrong PSK was served: {out}");
    let (ok, out) = client(Command::new("nbdcopy").arg(&src).arg(tls_uri(&bad)));
    assert!(!ok, "nbdcopy with the wrong PSK was served: {out}");
    let log = c.log("node-1");
    assert!(
        log.contains("TLS is required"),
        "the node logs the plain client it refused"
    );
    assert!(
        log.contains("TLS handshake failed"),
        "the node logs the handshake it refused"
    );
    let (ok, out) = client(Command::new("nbdcopy").arg(tls_uri(&good)).arg(&back));
    assert!(ok, "{out}");
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "a refused client changed the volume"
    );

    // The node-local unix socket stays plain.
    let v = c.volume("secret");
    let local = v["nbd_unix_uri"]
        .as_str()
        .expect("the volume's unix socket URI")
        .to_owned();
    let (ok, out) = client(Command::new("nbdinfo").arg(&local));
    assert!(
        ok && out.contains("without TLS"),
        "plain NBD on the unix socket: {out}"
    );
}

/// Certificates for a test CA, a server at `ip` and a client, in qemu's and nbdkit's layout.
fn make_certs(dir: &Path, ip: &str) {
    std::fs::create_dir_all(dir.join("server")).unwrap();
    std::fs::create_dir_all(dir.join("client")).unwrap();
    std::fs::create_dir_all(dir.join("anonymous")).unwrap();
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(&format!(
        "set -e; cd {d}
         openssl req -x509 {key} -keyout ca-key.pem -out ca-cert.pem -days 30 -subj /CN=zebu-test-ca 2>/dev/null
         openssl req {key} -keyout server/server-key.pem -out server.csr -subj /CN={ip} 2>/dev/null
         printf 'subjectAltName=IP:{ip}\\nextendedKeyUsage=serverAuth\\n' > server.ext
         openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 -extfile server.ext -out server/server-cert.pem 2>/dev/null
         openssl req {key} -keyout client/client-key.pem -out client.csr -subj /CN=client 2>/dev/null
         printf 'extendedKeyUsage=clientAuth\\n' > client.ext
         openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 -extfile client.ext -out client/client-cert.pem 2>/dev/null
         cp ca-cert.pem server/ && cp ca-cert.pem client/ && cp ca-cert.pem anonymous/",
        d = dir.display()
    ));
}

#[test]
fn nbd_over_tls_with_certificates_requires_a_client_certificate_signed_by_the_ca() {
    for t in ["nbdcopy", "nbdinfo", "openssl"] {
        require(t);
    }
    let certs = tempfile::tempdir().unwrap();
    let ip = "127.0.52.2";
    make_certs(certs.path(), ip);
    let server = certs.path().join("server");
    let c = Cluster::separate_with(52, 1, &["--nbd-tls-x509-dir", server.to_str().unwrap()]);
    let uri = c.create_attached("certs", "32MiB", 1, "node-1");
    assert_eq!(uri, format!("nbds://{ip}:10809/certs"));
    let with = |dir: &str| {
        format!(
            "{uri}?tls-certificates={}",
            certs.path().join(dir).display()
        )
    };
    let src = certs.path().join("src.img");
    let back = certs.path().join("back.img");
    sh(&format!("head -c 32M /dev/urandom > {}", src.display()));
    let (ok, out) = client(Command::new("nbdcopy").arg(&src).arg(with("client")));
    assert!(ok, "nbdcopy with a client certificate: {out}");
    let (ok, out) = client(Command::new("nbdcopy").arg(with("client")).arg(&back));
    assert!(ok, "{out}");
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap());
    // Without a client certificate: refused (the server has a CA, so it asks for one).
    let (ok, out) = client(Command::new("nbdinfo").arg(with("anonymous")));
    assert!(!ok, "a client without a certificate was served: {out}");
}

/// Start `zebu agent` (node n1 on `data_dir`, a manager that is not there) with `args`; it must refuse to start: its stderr. An agent that starts
/// instead is killed after 15 s and the test fails (it does not hang).
fn agent_refuses(data_dir: &Path, args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zebu"))
        .args([
            "agent",
            "--manager",
            "http://127.0.53.1:9500",
            "--node",
            "n1",
            "--token",
            "x",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting zebu agent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(!status.success(), "the agent exited 0: {err}");
            return err;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent started with {args:?} instead of refusing");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn nbd_without_tls_is_served_on_loopback_only_unless_turned_on_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let err = agent_refuses(dir.path(), &["--listen", "0.0.0.0"]);
    assert!(
        err.contains("without TLS") && err.contains("--nbd-allow-plain-tcp"),
        "the refusal names the options: {err}"
    );
    // A PSK file that is not one stops the start, naming the file.
    let psk = dir.path().join("keys.psk");
    std::fs::write(&psk, "alice\n").unwrap();
    let err = agent_refuses(
        dir.path(),
        &[
            "--listen",
            "127.0.53.2",
            "--nbd-tls-psk-file",
            psk.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("keys.psk line 1") && err.contains("psktool"),
        "the error names the file and what to do: {err}"
    );
    // X.509 without a CA to check clients against authenticates nobody: not on the network.
    let certs = dir.path().join("certs");
    make_certs(&certs, "127.0.53.2");
    std::fs::remove_file(certs.join("server/ca-cert.pem")).unwrap();
    let err = agent_refuses(
        dir.path(),
        &[
            "--listen",
            "0.0.0.0",
            "--nbd-tls-x509-dir",
            certs.join("server").to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("ca-cert.pem") && err.contains("--nbd-allow-plain-tcp"),
        "the refusal says what to add: {err}"
    );
}

/// The data protocol over TLS between separate agents (`--data-tls` on every one): a volume
/// with a replica on each of three nodes takes data from one node's engine and, moved to
/// another node, gives it back byte for byte; every replica holds the same image. (That a
/// plain engine is refused, and that no data crosses the wire in clear, is in
/// `zebu-engine/tests/engine_model.rs`.)
#[test]
fn the_data_protocol_over_tls_between_nodes_round_trips() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::separate_with(54, 3, &["--data-tls", "--nbd-allow-plain-tcp"]);
    let uri = c.create_attached("sealed", "64MiB", 3, "node-1");
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    sh(&format!(
        "head -c 24M /dev/urandom > {0} && truncate -s 64M {0}",
        src.display()
    ));
    let (ok, out) = client(Command::new("nbdcopy").arg(&src).arg(&uri));
    assert!(ok, "nbdcopy into the volume: {out}");
    let v = c.volume("sealed");
    let rw = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["mode"] == "RW")
        .count();
    assert_eq!(rw, 3, "every replica took the writes over TLS: {v}");
    c.cli_ok(&["volume", "detach", "sealed"]);
    let uri = c
        .cli_ok(&["volume", "attach", "sealed", "--node", "node-2"])
        .trim()
        .to_owned();
    let (ok, out) = client(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert!(ok, "nbdcopy out of the volume on another node: {out}");
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "the data read back differs from what was written"
    );
    c.cli_ok(&["volume", "detach", "sealed"]);
    assert_rw_replicas_identical(&c, "sealed");
    assert!(
        c.log("node-1").contains("data protocol: TLS"),
        "the agent's log should say the data protocol requires TLS"
    );
}
