//! Data into Zebu (`zebu volume create NAME --from FILE|NBD-URI`): byte-identical, holes kept,
//! verified; a source that cannot be read, or a taken name, changes nothing.

mod common;
use common::*;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// A sparse image: data at a few places, holes between, and a size that ends inside a block.
fn sparse_image(path: &Path) -> u64 {
    let size = 40 * MIB + 1000;
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (at, len, byte) in [
        (0, MIB, 0x11u8),
        (10 * MIB, 2 * MIB + 4096, 0x22),
        (39 * MIB, 4096, 0x33),
    ] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&vec![byte; len as usize]).unwrap();
    }
    // Data in the last, partial block.
    f.seek(SeekFrom::Start(size - 10)).unwrap();
    f.write_all(b"0123456789").unwrap();
    f.sync_all().unwrap();
    size
}

/// nbdkit serving `file` on the unix socket `sock`, once the socket is there.
fn nbdkit_file(sock: &Path, file: &Path) -> std::process::Child {
    let child = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(sock)
        .arg("file")
        .arg(file)
        .spawn()
        .unwrap();
    wait_until(
        "nbdkit's socket",
        std::time::Duration::from_secs(10),
        || sock.exists().then_some(()),
    );
    child
}

/// The volume's content, read over NBD by nbdcopy.
fn volume_bytes(c: &Cluster, uri: &str) -> Vec<u8> {
    let out = c.dir.path().join("out.img");
    let _ = std::fs::remove_file(&out);
    let o = run(Command::new("nbdcopy").arg(uri).arg(&out));
    assert!(
        o.status.success(),
        "nbdcopy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// nbdinfo --map's ranges that are holes, as (offset, length).
fn holes(uri: &str) -> Vec<(u64, u64)> {
    let o = run(Command::new("nbdinfo").args(["--map", "--json", uri]));
    assert!(
        o.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64().unwrap() & 1 == 1)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn covered(holes: &[(u64, u64)], at: u64, len: u64) -> bool {
    holes.iter().any(|&(o, l)| o <= at && at + len <= o + l)
}

fn check_imported(c: &Cluster, name: &str, src: &[u8]) {
    let uri = c
        .cli_ok(&["volume", "attach", name, "--node", "node-1"])
        .trim()
        .to_owned();
    let got = volume_bytes(c, &uri);
    let size = (src.len() as u64).div_ceil(4096) * 4096;
    assert_eq!(
        got.len() as u64,
        size,
        "the volume's size: the source's, in whole blocks"
    );
    assert!(
        got[..src.len()] == *src,
        "the volume differs from its source"
    );
    assert!(
        got[src.len()..].iter().all(|&b| b == 0),
        "the rest of the last block is zeroes"
    );
    // The source's holes are holes in the volume, its data is not.
    let h = holes(&uri);
    assert!(covered(&h, MIB, 9 * MIB), "1M..10M is a hole: {h:?}");
    assert!(covered(&h, 13 * MIB, 26 * MIB), "13M..39M is a hole: {h:?}");
    assert!(
        !covered(&h, 0, 4096) && !covered(&h, 10 * MIB, 4096),
        "data is not a hole: {h:?}"
    );
    c.cli_ok(&["volume", "detach", name]);
}

#[test]
fn import_from_a_sparse_file_and_from_an_nbd_server_is_identical_and_keeps_holes() {
    require("nbdcopy");
    require("nbdinfo");
    require("nbdkit");
    let c = Cluster::separate(63, 2);
    let img = c.dir.path().join("source.img");
    sparse_image(&img);
    let src = std::fs::read(&img).unwrap();

    // From a file.
    let out = c.cli_ok(&[
        "volume",
        "create",
        "fromfile",
        "--from",
        img.to_str().unwrap(),
        "--replicas",
        "2",
    ]);
    assert!(out.contains("verified"), "{out}");
    assert!(out.contains("holes kept"), "{out}");
    let v = c.volume("fromfile");
    assert_eq!(v["state"], "detached", "{v}");
    assert_eq!(
        v["size_bytes"].as_u64().unwrap(),
        (src.len() as u64).div_ceil(4096) * 4096
    );
    check_imported(&c, "fromfile", &src);

    // From an nbdkit export of the same image, over a unix socket.
    let sock = c.dir.path().join("nbdkit.sock");
    let mut nbdkit = nbdkit_file(&sock, &img);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = c.cli_ok(&[
        "volume",
        "create",
        "fromnbd",
        "--from",
        &uri,
        "--replicas",
        "1",
        "-o",
        "json",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        j["imported"]["hole_bytes"].as_u64().unwrap() >= 30 * MIB,
        "{j}"
    );
    // Zero blocks are found by reading: only the blocks that hold something are written.
    assert_eq!(
        j["imported"]["data_bytes"].as_u64().unwrap(),
        3 * MIB + 2 * 4096 + 1000,
        "{j}"
    );
    check_imported(&c, "fromnbd", &src);
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
}

#[test]
fn an_import_that_cannot_be_done_changes_nothing_and_says_why() {
    let c = Cluster::separate(64, 1);
    let img = c.dir.path().join("small.img");
    std::fs::write(&img, vec![7u8; 64 * 1024]).unwrap();
    let fail = |args: &[&str]| -> String {
        let o = c.cli(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // A source that cannot be read.
    let e = fail(&["volume", "create", "a", "--from", "/nonexistent/disk.img"]);
    assert!(
        e.contains("/nonexistent/disk.img") && e.contains("cannot read"),
        "{e}"
    );
    let e = fail(&["volume", "create", "a", "--from", "nbd://127.0.64.1:1/x"]);
    assert!(e.contains("cannot read the import source"), "{e}");
    let e = fail(&["volume", "create", "a", "--from", "nbds://127.0.0.1/x"]);
    assert!(e.contains("TLS"), "{e}");
    // A size smaller than the source.
    let e = fail(&[
        "volume",
        "create",
        "a",
        "--from",
        img.to_str().unwrap(),
        "--size",
        "4KiB",
    ]);
    assert!(e.contains("smaller than the import source"), "{e}");
    let v = c.cli_json(&["volume", "list"]).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 0, "nothing was created: {v}");
    // A taken name: refused, and the volume that has it is untouched.
    c.cli_ok(&[
        "volume",
        "create",
        "taken",
        "--size",
        "1MiB",
        "--replicas",
        "1",
    ]);
    let e = fail(&["volume", "create", "taken", "--from", img.to_str().unwrap()]);
    assert!(e.contains("taken") && e.contains("exists"), "{e}");
    let v = wait_until(
        "taken to be created",
        std::time::Duration::from_secs(20),
        || {
            let v = c.volume("taken");
            (v["state"] != "creating").then_some(v)
        },
    );
    assert_eq!(v["size_bytes"].as_u64().unwrap(), MIB, "{v}");
    assert_eq!(v["state"], "detached", "{v}");
    assert_eq!(
        c.cli_json(&["volume", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A clone from something that is not a snapshot.
    let e = fail(&["volume", "clone", "c1", "--from", "taken"]);
    assert!(e.contains("VOLUME/SNAPSHOT"), "{e}");
    let e = fail(&["volume", "clone", "c1", "--from", "taken/never"]);
    assert!(e.contains("never"), "{e}");
    let e = fail(&["volume", "clone", "c1", "--from", "gone/never"]);
    assert!(e.contains("gone"), "{e}");
    let n = c
        .cli_json(&["volume", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    assert_eq!(n, 1, "nothing was created");
}

/// `zebu snapshot export`: a snapshot's content, not the head's, to a new file (holes left
/// unwritten) and to an NBD server's export that held other data (zeroed where the snapshot
/// has holes, which the server keeps as holes); read back and verified. Bad destinations and
/// unknown snapshots change nothing.
#[test]
fn snapshot_export_to_a_file_and_to_an_nbd_server_is_identical_and_keeps_holes() {
    require("qemu-io");
    require("nbdkit");
    require("nbdinfo");
    let c = Cluster::separate(66, 2);
    let uri = c.create_attached("src", "16MiB", 2, "node-1");
    qemu_io(
        &uri,
        &["write -P 0x41 0 1M".into(), "write -P 0x42 5M 1M".into()],
    );
    c.cli_ok(&["snapshot", "create", "src", "s1"]);
    qemu_io(&uri, &["write -P 0x43 0 2M".into()]);
    let mut want = vec![0u8; 16 << 20];
    want[..1 << 20].fill(0x41);
    want[5 << 20..6 << 20].fill(0x42);

    // To a new file, the volume attached.
    let file = c.dir.path().join("s1.img");
    let out = c.cli_ok(&["snapshot", "export", "src", "s1", file.to_str().unwrap()]);
    assert!(out.contains("verified"), "{out}");
    let got = std::fs::read(&file).unwrap();
    assert!(got == want, "the exported file differs from the snapshot");
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(
        allocated <= 3 << 20,
        "{allocated} bytes allocated: holes were written"
    );

    // To an NBD server's export that holds other data, the volume detached.
    c.cli_ok(&["volume", "detach", "src"]);
    let target = c.dir.path().join("target.img");
    std::fs::write(&target, vec![0xffu8; 16 << 20]).unwrap();
    let sock = c.dir.path().join("target.sock");
    let mut nbdkit = nbdkit_file(&sock, &target);
    let dest = format!("nbd+unix:///?socket={}", sock.display());
    let out = c.cli_ok(&["snapshot", "export", "src", "s1", &dest]);
    assert!(out.contains("verified"), "{out}");
    assert!(
        std::fs::read(&target).unwrap() == want,
        "the NBD target differs from the snapshot"
    );
    let h = holes(&dest);
    assert!(
        covered(&h, MIB, 4 * MIB),
        "1M..5M is a hole on the target: {h:?}"
    );
    assert_eq!(
        c.volume("src")["state"],
        "detached",
        "attached only for the export"
    );

    // Bad input changes nothing.
    let fail = |args: &[&str]| -> String {
        let o = c.cli(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = fail(&[
        "snapshot",
        "export",
        "src",
        "nope",
        c.dir.path().join("n.img").to_str().unwrap(),
    ]);
    assert!(e.contains("nope"), "{e}");
    assert!(!c.dir.path().join("n.img").exists());
    let e = fail(&["snapshot", "export", "src", "s1", file.to_str().unwrap()]);
    assert!(e.contains("must not exist"), "{e}");
    assert!(
        std::fs::read(&file).unwrap() == want,
        "the existing file was changed"
    );
    let small = c.dir.path().join("small.img");
    std::fs::write(&small, vec![0x5au8; 1 << 20]).unwrap();
    let sock2 = c.dir.path().join("small.sock");
    let mut small_kit = nbdkit_file(&sock2, &small);
    let e = fail(&[
        "snapshot",
        "export",
        "src",
        "s1",
        &format!("nbd+unix:///?socket={}", sock2.display()),
    ]);
    assert!(e.contains("less than the volume"), "{e}");
    assert!(std::fs::read(&small).unwrap().iter().all(|&b| b == 0x5a));
    assert_eq!(c.volume("src")["state"], "detached");
    let _ = small_kit.kill();
    let _ = nbdkit.kill();
    let _ = small_kit.wait();
    let _ = nbdkit.wait();
}
