//! Clones (`zebu volume clone NEW --from VOLUME/SNAP`, `docs/snapshots.md`, "Clone"): usable as
//! soon as attached, reading what is not copied yet from the source snapshot; written while the
//! background copy runs (partial blocks, zeroes, trims); the copy survives a kill -9 of the
//! clone's agent and resumes; in the end an independent volume, identical on every replica, that
//! outlives its source. What a clone still reads from cannot be deleted, and bad input changes
//! nothing.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const M: usize = 1 << 20;
const SIZE: usize = 64 * M;

fn filled(runs: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    for &(at, len, byte) in runs {
        v[at..at + len].fill(byte);
    }
    v
}

/// The volume's content, read over NBD by nbdcopy.
fn read_all(c: &Cluster, uri: &str) -> Vec<u8> {
    let out = c.dir.path().join("read.img");
    let _ = std::fs::remove_file(&out);
    let o = run(Command::new("nbdcopy").arg(uri).arg(&out));
    assert!(
        o.status.success(),
        "nbdcopy {uri}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// The first offset where two images differ, for a readable failure.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: the size");
    if let Some(at) = first_difference(got, want) {
        panic!(
            "{what}: differs at byte {at} (block {}): {:#x} where {:#x} was expected",
            at / 4096,
            got[at],
            want[at]
        );
    }
}

fn refused(c: &Cluster, args: &[&str], says: &str) {
    let o = c.cli(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "zebu {args:?} was accepted");
    assert!(err.contains(says), "zebu {args:?}: {err}");
}

fn clone_status(c: &Cluster, name: &str) -> serde_json::Value {
    c.volume(name)["clone"].clone()
}

#[test]
fn a_clone_is_usable_at_once_survives_a_crash_of_its_engine_and_ends_independent() {
    require("qemu-io");
    require("nbdcopy");
    require("nbdinfo");
    let mut c = Cluster::separate(73, 3);
    // The source: data at both ends and in the middle, a snapshot, then changes after it.
    let uri = c.create_attached("src", "64MiB", 2, "node-1");
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 4M".into(),
            "write -P 0x22 8M 16M".into(),
            "write -P 0x33 40M 4k".into(),
            "write -P 0x44 60M 4M".into(),
            "flush".into(),
        ],
    );
    c.cli_ok(&["snapshot", "create", "src", "s1"]);
    qemu_io(&uri, &["write -P 0x99 0 1M".into(), "flush".into()]);
    let snapshot = filled(&[
        (0, 4 * M, 0x11),
        (8 * M, 16 * M, 0x22),
        (40 * M, 4096, 0x33),
        (60 * M, 4 * M, 0x44),
    ]);
    // The source need not be attached for a clone: its replicas serve the snapshot.
    c.cli_ok(&["volume", "detach", "src"]);
    // A slow copy (1 MiB/s, about 24 s of data), so the clone is used while it runs.
    c.cli_ok(&["setting", "set", "replica-rebuild-bandwidth-limit", "1"]);

    let o = c.cli(&[
        "volume",
        "clone",
        "c1",
        "--from",
        "src/s1",
        "--replicas",
        "2",
        "--node",
        "node-2",
    ]);
    assert!(
        o.status.success(),
        "clone: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let clone_uri = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert!(clone_uri.starts_with("nbd://"), "{clone_uri}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("background"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let st = clone_status(&c, "c1");
    assert_eq!(st["volume"], "src", "{st}");
    assert_eq!(st["snapshot"], "s1", "{st}");
    assert_eq!(st["done"], false, "the copy cannot be done yet: {st}");
    let v = c.volume("c1");
    assert_eq!(v["size_bytes"].as_u64().unwrap(), SIZE as u64, "{v}");
    let table = c.cli_ok(&["volume", "get", "c1"]);
    assert!(table.contains("Clone of:    src/s1: copying"), "{table}");

    // At once: every byte reads the snapshot's content (not the source's head), copied or not.
    assert_same(
        &read_all(&c, &clone_uri),
        &snapshot,
        "the clone read before its copy is done",
    );

    // Writes while the copy runs: part of a block not copied yet (read-modify-write of the
    // source's block), whole blocks, zeroes, a trim, both edges of a run partial.
    qemu_io(
        &clone_uri,
        &[
            "write -P 0xab 2097664 1024".into(), // 2M + 512
            "write -P 0xcd 9M 1M".into(),
            "write -z 12M 1M".into(),
            "discard 14M 1M".into(),
            "write -P 0xef 62914660 8000".into(), // 60M + 100
            "flush".into(),
        ],
    );
    let mut want = snapshot.clone();
    want[2 * M + 512..2 * M + 1536].fill(0xab);
    want[9 * M..10 * M].fill(0xcd);
    want[12 * M..13 * M].fill(0);
    want[14 * M..15 * M].fill(0);
    want[60 * M + 100..60 * M + 8100].fill(0xef);
    qemu_io(
        &clone_uri,
        &[
            "read -P 0x11 2M 512".into(),
            "read -P 0xab 2097664 1024".into(),
            "read -P 0x11 2098688 2560".into(),
            "read -P 0x44 60M 100".into(),
            "read -P 0xef 62914660 8000".into(),
            "read -P 0x44 62922660 4000".into(),
        ],
    );
    assert_same(
        &read_all(&c, &clone_uri),
        &want,
        "the clone read after writes during its copy",
    );

    // What the clone still reads from cannot go, and the clone waits for what needs it whole.
    refused(&c, &["snapshot", "delete", "src", "s1"], "c1");
    refused(&c, &["volume", "delete", "src"], "c1");
    refused(
        &c,
        &["volume", "expand", "c1", "--size", "128MiB"],
        "still being copied",
    );
    refused(
        &c,
        &["snapshot", "create", "c1", "early"],
        "still being copied",
    );
    // Bad input: a taken name, an unknown source volume or snapshot, not VOLUME/SNAP.
    refused(&c, &["volume", "clone", "src", "--from", "src/s1"], "src");
    refused(&c, &["volume", "clone", "c2", "--from", "nope/s1"], "nope");
    refused(&c, &["volume", "clone", "c2", "--from", "src/gone"], "gone");
    refused(
        &c,
        &["volume", "clone", "c2", "--from", "src"],
        "VOLUME/SNAPSHOT",
    );
    refused(
        &c,
        &[
            "volume", "clone", "c2", "--from", "src/s1", "--node", "node-9",
        ],
        "node-9",
    );
    let names: Vec<String> = c
        .cli_json(&["volume", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 2, "nothing was created: {names:?}");

    // kill -9 of the clone's agent in the middle of the copy: it resumes where the replicas
    // are, and nothing written is lost or overwritten by the source.
    let st = clone_status(&c, "c1");
    assert_eq!(st["done"], false, "the copy is still running: {st}");
    c.kill_agent(1);
    c.start_agent(1);
    let clone_uri = wait_until("the clone serving again", Duration::from_secs(90), || {
        let v = c.volume("c1");
        let uri = v["nbd_uri"].as_str()?.to_owned();
        // The view may still show the engine of before the kill until the agent reports.
        let serves = run(Command::new("nbdinfo").args(["--size", &uri]))
            .status
            .success();
        (v["state"] == "attached" && v["robustness"] == "healthy" && serves).then_some(uri)
    });
    assert_same(
        &read_all(&c, &clone_uri),
        &want,
        "the clone read after its engine was killed",
    );
    wait_until("the clone's copy done", Duration::from_secs(180), || {
        let st = clone_status(&c, "c1");
        (st["done"] == true).then_some(())
    });
    let st = clone_status(&c, "c1");
    assert_eq!(st["bytes_done"], st["bytes_total"], "{st}");
    assert_same(
        &read_all(&c, &clone_uri),
        &want,
        "the clone read after its copy",
    );

    // Independent now: the source snapshot and volume go; the clone keeps its content, the same
    // on every replica.
    c.cli_ok(&["snapshot", "delete", "src", "s1"]);
    c.cli_ok(&["volume", "delete", "src"]);
    c.cli_ok(&["volume", "expand", "c1", "--size", "128MiB"]);
    c.cli_ok(&["volume", "detach", "c1"]);
    assert_rw_replicas_identical(&c, "c1");
    let uri = c
        .cli_ok(&["volume", "attach", "c1", "--node", "node-3"])
        .trim()
        .to_owned();
    let got = read_all(&c, &uri);
    assert_eq!(got.len(), 2 * SIZE);
    assert_same(&got[..SIZE], &want, "the clone, its source gone");
    assert!(
        got[SIZE..].iter().all(|&b| b == 0),
        "the grown part reads zeroes"
    );
}

/// `--wait` draws the copy and returns once it is done; a clone made detached copies nothing
/// until attached, and a clone of a finished clone works.
#[test]
fn clone_wait_and_no_attach() {
    require("nbdcopy");
    require("qemu-io");
    let c = Cluster::separate(74, 2);
    let uri = c.create_attached("a", "8MiB", 2, "node-1");
    qemu_io(&uri, &["write -P 0x5a 1M 3M".into(), "flush".into()]);
    c.cli_ok(&["snapshot", "create", "a", "s"]);
    let want = {
        let mut v = vec![0u8; 8 * M];
        v[M..4 * M].fill(0x5a);
        v
    };

    let v = c
        .cli_json(&[
            "volume",
            "clone",
            "b",
            "--from",
            "a/s",
            "--wait",
            "--node",
            "node-2",
            "--replicas",
            "2",
        ])
        .unwrap();
    assert_eq!(v["clone"]["done"], true, "{v}");
    assert_eq!(v["state"], "attached", "{v}");
    let b = read_all(&c, v["nbd_uri"].as_str().unwrap());
    assert_same(&b[..8 * M], &want, "clone b");
    let table = c.cli_ok(&["volume", "get", "b"]);
    assert!(table.contains("Clone of:    a/s: done"), "{table}");

    // Made detached: nothing copies until attached (then the copy resumes at once).
    c.cli_ok(&["snapshot", "create", "b", "t"]);
    let out = c.cli_ok(&[
        "volume",
        "clone",
        "d",
        "--from",
        "b/t",
        "--no-attach",
        "--replicas",
        "2",
    ]);
    assert!(out.contains("when it is attached"), "{out}");
    let v = wait_until("d created", Duration::from_secs(30), || {
        let v = c.volume("d");
        (v["state"] != "creating").then_some(v)
    });
    assert_eq!(v["state"], "detached", "{v}");
    assert_eq!(v["clone"]["done"], false, "{v}");
    let table = c.cli_ok(&["volume", "get", "d"]);
    assert!(table.contains("paused while detached"), "{table}");
    let uri = c
        .cli_ok(&["volume", "attach", "d", "--node", "node-1"])
        .trim()
        .to_owned();
    assert_same(&read_all(&c, &uri)[..8 * M], &want, "clone d of clone b");
    wait_until("clone d done", Duration::from_secs(60), || {
        (c.volume("d")["clone"]["done"] == true).then_some(())
    });
    assert_same(&read_all(&c, &uri)[..8 * M], &want, "clone d, copied");
}

/// The manager's records are lost while a clone is not copied: rebuilt from the agents' disks
/// (`--recover-from-agents`), the clone is known as one from its replicas' clone marks, so once
/// attached it reads its source's snapshot, not zeroes, and completes its copy.
#[test]
fn a_clone_recovered_from_the_agents_still_reads_its_source() {
    require("nbdcopy");
    require("qemu-io");
    let mut c = Cluster::separate(75, 3);
    let d = c.dir.path().to_owned();
    let uri = c.create_attached("src", "64MiB", 2, "node-1");
    qemu_io(&uri, &["write -P 0x3c 0 6M".into(), "flush".into()]);
    c.cli_ok(&["snapshot", "create", "src", "s1"]);
    c.cli_ok(&["volume", "detach", "src"]);
    c.cli_ok(&[
        "volume",
        "clone",
        "c1",
        "--from",
        "src/s1",
        "--replicas",
        "2",
        "--no-attach",
    ]);
    wait_until("c1 created", Duration::from_secs(30), || {
        (c.volume("c1")["state"] == "detached").then_some(())
    });
    let marked = c.volume("c1")["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            c.replica_dir(node_index(r), r["name"].as_str().unwrap())
                .join("clone-source.json")
                .exists()
        })
        .count();
    assert_eq!(marked, 2, "each replica of the clone holds its mark");
    let id = std::fs::read_to_string(d.join("node-1/cluster.id"))
        .unwrap()
        .trim()
        .to_owned();

    // The manager's whole directory is lost; its records come back from the agents.
    if let Some(mut m) = c.manager.take() {
        m.kill().unwrap();
        m.wait().unwrap();
    }
    std::fs::remove_dir_all(d.join("manager")).unwrap();
    for i in 0..3 {
        c.kill_agent(i);
    }
    c.start_manager_with(&[
        "--recover-from-agents",
        "--cluster-id",
        &id,
        "--recover-window",
        "5",
    ]);
    for i in 0..3 {
        c.start_agent(i);
    }
    let v = wait_until("c1 recovered", Duration::from_secs(90), || {
        let v = c.cli_json(&["volume", "get", "c1"]).ok()?;
        let rw = v["replicas"]
            .as_array()?
            .iter()
            .filter(|r| r["mode"] == "RW")
            .count();
        (rw == 2
            && c.cli_json(&["volume", "create", "probe", "--size", "1MiB"])
                .is_ok())
        .then_some(v)
    });
    assert_eq!(v["clone"]["volume"], "src", "{v}");
    assert_eq!(v["clone"]["snapshot"], "s1", "{v}");
    assert_eq!(v["clone"]["done"], false, "{v}");
    wait_until("src recovered", Duration::from_secs(60), || {
        let v = c.cli_json(&["volume", "get", "src"]).ok()?;
        (v["replicas"]
            .as_array()?
            .iter()
            .filter(|r| r["mode"] == "RW")
            .count()
            == 2)
            .then_some(())
    });
    let uri = c
        .cli_ok(&["volume", "attach", "c1", "--node", "node-3"])
        .trim()
        .to_owned();
    let mut want = vec![0u8; SIZE];
    want[..6 * M].fill(0x3c);
    assert_same(&read_all(&c, &uri), &want, "the recovered clone");
    wait_until("the copy done", Duration::from_secs(60), || {
        (c.volume("c1")["clone"]["done"] == true).then_some(())
    });
    assert_same(&read_all(&c, &uri), &want, "the recovered clone, copied");
    wait_until("the marks removed", Duration::from_secs(30), || {
        c.volume("c1")["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| {
                !c.replica_dir(node_index(r), r["name"].as_str().unwrap())
                    .join("clone-source.json")
                    .exists()
            })
            .then_some(())
    });
}
