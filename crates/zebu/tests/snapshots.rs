//! Snapshots through the CLI on a real cluster (`docs/snapshots.md`): taken across every
//! replica of an attached volume, listed as a tree, exported from each replica's directory
//! byte for byte, deleted (merged in the background) while detached and while attached, and bad
//! input refused with nothing changed.

mod common;
#[path = "../src/nbd_client.rs"]
#[allow(dead_code)]
mod nbd_client;
use common::*;
use serde_json::Value;
use std::time::Duration;

/// Snapshot `snap` (or the head) of every RW replica of `volume`, exported from its directory;
/// all must be identical. Returns the content.
fn every_replica_holds(c: &Cluster, volume: &str, snap: Option<&str>) -> Vec<u8> {
    let v = c.volume(volume);
    let mut images: Vec<(String, Vec<u8>)> = Vec::new();
    for r in v["replicas"].as_array().unwrap() {
        assert_eq!(r["mode"], "RW", "{v}");
        let name = r["name"].as_str().unwrap();
        let dir = c.replica_dir(node_index(r), name);
        let out = c.dir.path().join("snap-export.img");
        let mut cmd = std::process::Command::new(ZEBU);
        cmd.args(["replica", "export", "--dir"]).arg(&dir).arg(&out);
        if let Some(s) = snap {
            cmd.args(["--snapshot", s]);
        }
        let o = run(&mut cmd);
        assert!(
            o.status.success(),
            "export of {snap:?} from {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        images.push((name.to_owned(), std::fs::read(&out).unwrap()));
        std::fs::remove_file(&out).unwrap();
    }
    assert_eq!(images.len(), 3, "{v}");
    for (name, img) in &images[1..] {
        assert!(
            img == &images[0].1,
            "{snap:?} on replica {name} differs from {}",
            images[0].0
        );
    }
    images.remove(0).1
}

fn filled(size: usize, runs: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut v = vec![0u8; size];
    for &(at, len, byte) in runs {
        v[at..at + len].fill(byte);
    }
    v
}

fn snapshots(c: &Cluster, volume: &str) -> Vec<Value> {
    c.cli_json(&["snapshot", "list", volume])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn refused(c: &Cluster, args: &[&str], says: &str) {
    let o = c.cli(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "zebu {args:?} was accepted");
    assert!(err.contains(says), "zebu {args:?}: {err}");
}

/// The layer files (data and index of each layer) in a replica's directory.
fn layer_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("layer-")
        })
        .count()
}

/// Every replica has merged its deleted snapshots: `layers` layer files pairs in each directory.
fn merged_to(c: &Cluster, volume: &str, layers: usize) {
    wait_until("the merges", Duration::from_secs(60), || {
        let v = c.volume(volume);
        let done = v["replicas"].as_array().unwrap().iter().all(|r| {
            let dir = c.replica_dir(node_index(r), r["name"].as_str().unwrap());
            layer_files(&dir) == 2 * layers && r["merge"].is_null()
        });
        done.then_some(())
    });
}

#[test]
fn snapshots_hold_their_moment_on_every_replica_and_deletes_merge() {
    require("qemu-io");
    let c = Cluster::separate(58, 3);
    let uri = c.create_attached("vol", "16MiB", 3, "node-1");
    const M: usize = 1 << 20;
    let size = 16 * M;
    qemu_io(&uri, &["write -P 0x11 0 4M".into(), "flush".into()]);
    let out = c.cli_ok(&["snapshot", "create", "vol", "first", "--label", "app=db"]);
    assert!(out.contains("first"), "{out}");
    qemu_io(&uri, &["write -P 0x22 1M 1M".into()]);
    c.cli_ok(&["snapshot", "create", "vol", "second"]);
    qemu_io(&uri, &["write -P 0x33 2M 1M".into(), "flush".into()]);

    // The table is a tree; -o json a list with parents.
    let table = c.cli_ok(&["snapshot", "list", "vol"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[1].starts_with("first ")
            && lines[2].starts_with("  second ")
            && lines[3].trim_start().starts_with("volume-head"),
        "{table}"
    );
    let list = snapshots(&c, "vol");
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["name"], "first");
    assert_eq!(list[0]["parent"], Value::Null);
    assert_eq!(list[0]["labels"]["app"], "db");
    assert_eq!(list[0]["size_bytes"], 4 * M as u64, "{list:?}");
    assert_eq!(list[1]["parent"], "first");
    assert_eq!(list[1]["children"], serde_json::json!(["volume-head"]));
    let one = c.cli_json(&["snapshot", "get", "vol", "second"]).unwrap();
    assert_eq!(one["size_bytes"], M as u64, "{one}");

    // Bad input says why and changes nothing.
    refused(
        &c,
        &["snapshot", "create", "vol", "first"],
        "already has a snapshot named first",
    );
    refused(
        &c,
        &["snapshot", "create", "vol", "Bad_Name"],
        "is not valid",
    );
    refused(
        &c,
        &["snapshot", "create", "vol", "x", "--label", "novalue"],
        "KEY=VALUE",
    );
    refused(&c, &["snapshot", "create", "nope"], "nope");
    refused(
        &c,
        &["snapshot", "get", "vol", "nope"],
        "no snapshot named nope",
    );
    refused(
        &c,
        &["snapshot", "delete", "vol", "nope"],
        "no snapshot named nope",
    );
    assert_eq!(snapshots(&c, "vol").len(), 2);

    // Each replica's copy of each moment, byte for byte.
    c.cli_ok(&["volume", "detach", "vol"]);
    let first = filled(size, &[(0, 4 * M, 0x11)]);
    let second = filled(size, &[(0, 4 * M, 0x11), (M, M, 0x22)]);
    let head = filled(size, &[(0, 4 * M, 0x11), (M, M, 0x22), (2 * M, M, 0x33)]);
    assert!(every_replica_holds(&c, "vol", Some("first")) == first);
    assert!(every_replica_holds(&c, "vol", Some("second")) == second);
    assert!(every_replica_holds(&c, "vol", None) == head);
    refused(&c, &["snapshot", "create", "vol", "third"], "detached");

    // Deleted while detached: gone from the list at once, merged in the background.
    c.cli_ok(&["snapshot", "delete", "vol", "first"]);
    let list = snapshots(&c, "vol");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["parent"], Value::Null);
    merged_to(&c, "vol", 2);
    assert!(every_replica_holds(&c, "vol", Some("second")) == second);
    assert!(every_replica_holds(&c, "vol", None) == head);

    // Revert (detached): the head becomes exactly the snapshot, on every replica.
    c.cli_ok(&["snapshot", "revert", "vol", "second"]);
    assert!(every_replica_holds(&c, "vol", None) == second);
    assert!(every_replica_holds(&c, "vol", Some("second")) == second);
    let list = snapshots(&c, "vol");
    assert_eq!(
        list[0]["children"],
        serde_json::json!(["volume-head"]),
        "{list:?}"
    );
    refused(
        &c,
        &["snapshot", "revert", "vol", "nope"],
        "no snapshot named nope",
    );

    // Deleted while attached, the one under the live head: merged into it under I/O.
    let uri = c
        .cli_ok(&["volume", "attach", "vol", "--node", "node-2"])
        .trim()
        .to_owned();
    // What was written after `second` (0x33 at 2M) is gone.
    qemu_io(
        &uri,
        &["read -P 0x22 1M 1M".into(), "read -P 0x11 2M 1M".into()],
    );
    refused(
        &c,
        &["snapshot", "revert", "vol", "second"],
        "detach it first",
    );
    c.cli_ok(&["snapshot", "delete", "vol", "second"]);
    qemu_io(&uri, &["write -P 0x44 3M 1M".into(), "flush".into()]);
    merged_to(&c, "vol", 1);
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 1M".into(),
            "read -P 0x22 1M 1M".into(),
            "read -P 0x11 2M 1M".into(),
            "read -P 0x44 3M 1M".into(),
        ],
    );
    assert!(snapshots(&c, "vol").is_empty());

    // Purge deletes the system snapshots and nothing else.
    let out = c.cli_ok(&["snapshot", "purge", "vol"]);
    assert!(out.contains("has no system snapshots"), "{out}");
    c.cli_ok(&["snapshot", "create", "vol", "sys-a", "--system"]);
    c.cli_ok(&["snapshot", "create", "vol", "mine"]);
    qemu_io(&uri, &["write -P 0x55 0 1M".into(), "flush".into()]);
    c.cli_ok(&["snapshot", "create", "vol", "sys-b", "--system"]);
    let mut kinds: Vec<(String, String)> = snapshots(&c, "vol")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [("mine", "user"), ("sys-a", "system"), ("sys-b", "system")]
            .map(|(n, k)| (n.to_owned(), k.to_owned()))
            .to_vec()
    );
    // --wait returns once every replica has merged them (checked at once, not waited for).
    let gone = c.cli_json(&["snapshot", "purge", "vol", "--wait"]).unwrap();
    let v = c.volume("vol");
    for r in v["replicas"].as_array().unwrap() {
        let dir = c.replica_dir(node_index(r), r["name"].as_str().unwrap());
        assert_eq!(layer_files(&dir), 4, "{}: {v}", dir.display());
        assert_eq!(r["pending_merges"], 0, "{v}");
    }
    let mut gone: Vec<&str> = gone
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    gone.sort();
    assert_eq!(gone, ["sys-a", "sys-b"]);
    let left = snapshots(&c, "vol");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["name"], "mine");
    refused(&c, &["snapshot", "purge", "nope"], "nope");
    c.cli_ok(&["volume", "detach", "vol"]);
    let mine = filled(size, &[(0, 4 * M, 0x11), (M, M, 0x22), (3 * M, M, 0x44)]);
    assert!(every_replica_holds(&c, "vol", Some("mine")) == mine);
    let head = filled(
        size,
        &[
            (0, M, 0x55),
            (M, M, 0x22),
            (2 * M, M, 0x11),
            (3 * M, M, 0x44),
        ],
    );
    assert!(every_replica_holds(&c, "vol", None) == head);
}

/// The replica's content exported from its directory (the agent stopped): a snapshot's, or
/// the head's.
fn exported(c: &Cluster, dir: &std::path::Path, snap: Option<&str>) -> Vec<u8> {
    let out = c.dir.path().join("kill-export.img");
    let _ = std::fs::remove_file(&out);
    let mut cmd = std::process::Command::new(ZEBU);
    cmd.args(["replica", "export", "--dir"]).arg(dir).arg(&out);
    if let Some(s) = snap {
        cmd.args(["--snapshot", s]);
    }
    let o = run(&mut cmd);
    assert!(
        o.status.success(),
        "export of {snap:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// Deletes of a middle snapshot and of the one under the head, each cut by kill -9 of the agent
/// at a random point of its merge (merges paced slow so the cut lands inside them), 20 times:
/// after each cut every snapshot and the head read exactly as before, and after the restart
/// the merge completes.
#[test]
fn merges_cut_by_kill_9_lose_nothing_and_complete_after_restart() {
    require("qemu-io");
    const SIZE: usize = 8 << 20;
    let mut c = Cluster::separate_with(65, 1, &["--snapshot-merge-rate", "2"]);
    let uri = c.create_attached("cut", "8MiB", 1, "node-1");
    let v = c.volume("cut");
    let dir = c.replica_dir(0, v["replicas"][0]["name"].as_str().unwrap());
    let mut rng = Lcg(0x9e37_79b9_7f4a_7c15);
    // The model: the snapshots oldest first with their content, and the head's.
    let mut head = vec![0u8; SIZE];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut cut_inside = 0;
    let write = |head: &mut Vec<u8>, rng: &mut Lcg| {
        let at = rng.next(6) as usize; // MiB
        let byte = (rng.next(250) + 1) as u8;
        qemu_io(&uri, &[format!("write -P {byte} {at}M 2M")]);
        head[at << 20..(at + 2) << 20].fill(byte);
    };
    for i in 0..3 {
        write(&mut head, &mut rng);
        let name = format!("s{i}");
        c.cli_ok(&["snapshot", "create", "cut", &name]);
        snaps.push((name, head.clone()));
    }
    write(&mut head, &mut rng);
    for round in 0..20 {
        // Alternately the middle snapshot and the one under the head.
        let victim = if round % 2 == 0 {
            snaps.len() / 2
        } else {
            snaps.len() - 1
        };
        let (name, _) = snaps.remove(victim);
        c.cli_ok(&["snapshot", "delete", "cut", &name]);
        std::thread::sleep(Duration::from_millis(rng.next(1500)));
        c.kill_agent(0);
        // Cut inside the merge: the deleted snapshot's files are still there.
        if layer_files(&dir) > 2 * (snaps.len() + 1) {
            cut_inside += 1;
        }
        for (s, content) in &snaps {
            assert!(
                exported(&c, &dir, Some(s)) == *content,
                "round {round}: snapshot {s} changed after the merge of {name} was cut"
            );
        }
        assert!(
            exported(&c, &dir, None) == head,
            "round {round}: the head changed"
        );
        c.start_agent(0);
        merged_to(&c, "cut", snaps.len() + 1);
        wait_until("the volume served again", Duration::from_secs(60), || {
            let out = qemu_io_any(&uri, &["read 0 4k".into()]);
            (!out.contains("can't open")).then_some(())
        });
        // Keep the tree's shape: more data, and a new snapshot on top.
        write(&mut head, &mut rng);
        let name = format!("t{round}");
        // The manager may not have heard yet that the restarted engine serves: it says so.
        wait_until("the snapshot to be taken", Duration::from_secs(30), || {
            let o = c.cli(&["snapshot", "create", "cut", &name]);
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            assert!(o.status.success() || err.contains("try again"), "{err}");
            o.status.success().then_some(())
        });
        snaps.push((name, head.clone()));
        write(&mut head, &mut rng);
    }
    assert!(
        cut_inside >= 8,
        "only {cut_inside} of 20 kills landed inside a merge"
    );
    c.kill_agent(0);
    for (s, content) in &snaps {
        assert!(
            exported(&c, &dir, Some(s)) == *content,
            "at the end: snapshot {s}"
        );
    }
    assert!(exported(&c, &dir, None) == head, "at the end: the head");
}

/// Every live snapshot in `expected`, and the head, exported offline from each RW replica of
/// `volume` (detached), equals the model; at least `rw` replicas are RW.
fn every_rw_replica_holds(
    c: &Cluster,
    volume: &str,
    expected: &std::collections::BTreeMap<String, Vec<u8>>,
    head: &[u8],
    rw: usize,
) {
    let v = c.volume(volume);
    let replicas: Vec<&Value> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["mode"] == "RW")
        .collect();
    assert_eq!(replicas.len(), rw, "{v}");
    for r in replicas {
        let name = r["name"].as_str().unwrap();
        let dir = c.replica_dir(node_index(r), name);
        for (snap, content) in expected {
            assert!(
                exported(c, &dir, Some(snap)) == *content,
                "snapshot {snap} on replica {name} differs from what it held when taken"
            );
        }
        assert!(
            exported(c, &dir, None) == head,
            "the head of {name} differs"
        );
    }
}

/// Must-hold 6: a volume with 10 snapshots (two of them deleted, their merges under way) loses
/// a replica twice: one returns after the set took and deleted snapshots without it (it keeps
/// the snapshots it shares, drops the one deleted meanwhile, and is given the new one), and one
/// never returns (a new replica on a free node is given every snapshot). Afterwards every
/// snapshot reads the same on every replica, equal to the volume at the moment it was taken.
#[test]
fn rebuilds_copy_every_snapshot_to_returning_and_new_replicas() {
    require("qemu-io");
    let mut c = Cluster::separate(68, 4);
    // The returning replica comes back before a replacement is considered.
    c.cli_ok(&[
        "setting",
        "set",
        "replica-replenishment-wait-interval",
        "600",
    ]);
    let uri = c.create_attached("tree", "24MiB", 3, "node-1");
    const M: usize = 1 << 20;
    let mut head = vec![0u8; 24 * M];
    let mut snaps = std::collections::BTreeMap::new();
    let write = |head: &mut Vec<u8>, cmds: &[(usize, usize, Option<u8>)]| {
        let mut line = Vec::new();
        for &(at, len, byte) in cmds {
            match byte {
                Some(b) => {
                    line.push(format!("write -P {b:#x} {at} {len}"));
                    head[at..at + len].fill(b);
                }
                None => {
                    line.push(format!("write -z {at} {len}"));
                    head[at..at + len].fill(0);
                }
            }
        }
        line.push("flush".into());
        qemu_io(&uri, &line);
    };
    for i in 1..=10usize {
        let mut cmds = vec![
            (i * M, M, Some(0x10 + i as u8)),
            (0, 64 << 10, Some(i as u8)),
        ];
        if i % 3 == 0 {
            // Zeroes over what older snapshots hold: the copy must keep them zero.
            cmds.push(((i - 2) * M, M / 2, None));
        }
        write(&mut head, &cmds);
        c.cli_ok(&["snapshot", "create", "tree", &format!("s{i}")]);
        snaps.insert(format!("s{i}"), head.clone());
    }
    for gone in ["s3", "s6"] {
        c.cli_ok(&["snapshot", "delete", "tree", gone]);
        snaps.remove(gone);
    }

    // A replica leaves; the set takes a snapshot and deletes one without it.
    let v = c.volume("tree");
    let away = replica_node_but(&v, &["node-1"]);
    let i_away: usize = away.trim_start_matches("node-").parse().unwrap();
    c.kill_agent(i_away - 1);
    write(&mut head, &[(20 * M, 2 * M, Some(0x77)), (2 * M, M, None)]);
    wait_until("the replica away ERR", Duration::from_secs(30), || {
        (replica_on(&c.volume("tree"), &away).unwrap()["mode"] == "ERR").then_some(())
    });
    c.cli_ok(&["snapshot", "create", "tree", "s11"]);
    snaps.insert("s11".into(), head.clone());
    c.cli_ok(&["snapshot", "delete", "tree", "s1"]);
    snaps.remove("s1");
    // Zeroes in the head over what the snapshots hold: the head's copy must keep them zero.
    write(&mut head, &[(21 * M, M, Some(0x78)), (M, M / 2, None)]);
    c.start_agent(i_away - 1);
    let r = wait_until("the returning replica RW", Duration::from_secs(90), || {
        replica_on(&c.volume("tree"), &away).filter(|r| r["mode"] == "RW")
    });
    // It kept the 7 it shares (s2 s4 s5 s7 s8 s9 s10; s1, deleted meanwhile, was dropped)
    // and was given s11 only.
    assert_eq!(r["last_rebuild"]["snapshots_kept"], 7, "{r}");
    assert_eq!(r["last_rebuild"]["snapshots_copied"], 1, "{r}");
    // Its head is copied over s11 only: the 1 MiB written since (the volume holds 20 MiB).
    assert!(
        r["last_rebuild"]["bytes_copied"].as_u64().unwrap() <= 2 * M as u64,
        "{r}"
    );

    // Another one never returns: a new replica on the free node gets every snapshot.
    let v = c.volume("tree");
    let lost = replica_node_but(&v, &["node-1", &away]);
    let free = (1..=4)
        .map(|i| format!("node-{i}"))
        .find(|n| replica_on(&v, n).is_none())
        .unwrap();
    c.cli_ok(&["setting", "set", "replica-replenishment-wait-interval", "3"]);
    let i_lost: usize = lost.trim_start_matches("node-").parse().unwrap();
    c.kill_agent(i_lost - 1);
    write(
        &mut head,
        &[(22 * M, M, Some(0x79)), (4 * M + M / 2, M / 2, None)],
    );
    let v = wait_until(
        "a new replica RW on the free node",
        Duration::from_secs(120),
        || {
            let v = c.volume("tree");
            (replica_on(&v, &free).is_some_and(|r| r["mode"] == "RW")
                && v["robustness"] == "healthy")
                .then_some(v)
        },
    );
    let r = replica_on(&v, &free).unwrap();
    assert_eq!(r["last_rebuild"]["kind"], "full", "{r}");
    assert_eq!(r["last_rebuild"]["snapshots_copied"], 8, "{r}");
    assert!(
        r["last_rebuild"]["bytes_copied"].as_u64().unwrap() <= 3 * M as u64,
        "{r}"
    );
    // Snapshots are taken again once no rebuild runs.
    c.cli_ok(&["snapshot", "create", "tree", "s12"]);
    snaps.insert("s12".into(), head.clone());
    let names: Vec<String> = snapshots(&c, "tree")
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    let mut want: Vec<String> = snaps.keys().cloned().collect();
    want.sort();
    let mut got = names.clone();
    got.sort();
    assert_eq!(got, want, "{names:?}");
    c.cli_ok(&["volume", "detach", "tree"]);
    every_rw_replica_holds(&c, "tree", &snaps, &head, 3);
}

/// One write of the stamping writer: its sequence number, block, and when it was sent and
/// acknowledged.
struct Stamp {
    seq: u64,
    block: usize,
    sent: std::time::Instant,
    acked: std::time::Instant,
}

/// Must-hold 1: with fio verify writing one half of the volume and a QD1 writer stamping
/// blocks of the other half with sequence numbers, a snapshot every 100 ms. Afterwards each
/// snapshot, exported from every replica's directory, is identical on all of them, and holds
/// exactly the writes of one prefix of the writer's sequence (one instant), which contains every
/// write acknowledged before the snapshot call began and none sent after it returned.
#[test]
fn snapshots_every_100_ms_under_writers_each_hold_one_instant() {
    require("fio");
    let c = Cluster::separate(69, 3);
    const M: usize = 1 << 20;
    const BS: usize = 4096;
    let uri = c.create_attached("inst", "16MiB", 3, "node-1");
    let fio = fio_verify(&c, &uri, "8m", "2m");
    let (region, blocks) = (8 * M, 8 * M / BS);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (uri, stop) = (uri.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut nbd = nbd_client::Client::connect(&nbd_client::parse_uri(&uri).unwrap())
                .expect("the stamping writer connects");
            let mut rng = Lcg(0x5eed);
            let mut done = Vec::new();
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                let block = rng.next(blocks as u64) as usize;
                let data: Vec<u8> = seq.to_le_bytes().repeat(BS / 8);
                let sent = std::time::Instant::now();
                nbd.submit_write((region + block * BS) as u64, &data)
                    .unwrap();
                nbd.complete().expect("a stamped write failed");
                done.push(Stamp {
                    seq,
                    block,
                    sent,
                    acked: std::time::Instant::now(),
                });
            }
            nbd.disconnect();
            done
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut calls = Vec::new();
    for j in 0..30 {
        let began = std::time::Instant::now();
        c.cli_ok(&["snapshot", "create", "inst", &format!("p{j}")]);
        calls.push((format!("p{j}"), began, std::time::Instant::now()));
        if let Some(rest) = Duration::from_millis(100).checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let stamps = writer.join().unwrap();
    fio_ok(&c, fio);
    assert!(stamps.len() > 100, "only {} stamped writes", stamps.len());
    // For each block, the sequence numbers written to it, in order.
    let mut by_block: Vec<Vec<u64>> = vec![Vec::new(); blocks];
    for w in &stamps {
        by_block[w.block].push(w.seq);
    }
    c.cli_ok(&["volume", "detach", "inst"]);
    let v = c.volume("inst");
    let dirs: Vec<std::path::PathBuf> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| c.replica_dir(node_index(r), r["name"].as_str().unwrap()))
        .collect();
    assert_eq!(dirs.len(), 3);
    for (name, began, returned) in &calls {
        let img = exported(&c, &dirs[0], Some(name));
        for d in &dirs[1..] {
            assert!(
                exported(&c, d, Some(name)) == img,
                "snapshot {name} differs between replicas"
            );
        }
        // The prefix [1, k] of the writer's sequence the snapshot holds: k at least the
        // highest stamp seen, and below the next write to any block after the one it shows.
        let (mut lo, mut hi) = (0u64, u64::MAX);
        for (b, seqs) in by_block.iter().enumerate() {
            let at = region + b * BS;
            let seen = u64::from_le_bytes(img[at..at + 8].try_into().unwrap());
            assert!(
                img[at..at + BS] == seen.to_le_bytes().repeat(BS / 8)[..],
                "snapshot {name}: block {b} is torn"
            );
            if seen != 0 {
                assert!(
                    seqs.contains(&seen),
                    "snapshot {name}: block {b} shows {seen}, never written there"
                );
            }
            lo = lo.max(seen);
            if let Some(next) = seqs.iter().find(|s| **s > seen) {
                hi = hi.min(next - 1);
            }
        }
        assert!(
            lo <= hi,
            "snapshot {name} holds no single instant: writes up to {lo} but not {}",
            hi + 1
        );
        let acked_before = stamps
            .iter()
            .filter(|w| w.acked < *began)
            .map(|w| w.seq)
            .max()
            .unwrap_or(0);
        let sent_after = stamps
            .iter()
            .filter(|w| w.sent > *returned)
            .map(|w| w.seq)
            .min()
            .unwrap_or(u64::MAX);
        assert!(
            hi >= acked_before,
            "snapshot {name} lacks write {acked_before}, acknowledged before the snapshot was asked for (it holds at most {hi})"
        );
        assert!(
            lo < sent_after,
            "snapshot {name} holds write {lo}, sent after the snapshot call returned (first such: {sent_after})"
        );
    }
}

/// Must-hold 2: 1000 snapshot create/delete cycles on a volume under fio verify, over REST:
/// the data stays right, every replica's tree merges back to its one layer, and the engine's
/// agent holds no more memory than after the first 100 cycles (plus a little).
#[test]
fn a_thousand_snapshot_cycles_under_io_leave_the_tree_and_memory_as_they_were() {
    require("fio");
    let c = Cluster::separate(70, 3);
    let uri = c.create_attached("cyc", "16MiB", 3, "node-1");
    // Each run writes 4 MiB over 8 s, then reads it all back, checked; another follows while
    // the cycles go on.
    let mut fio = fio_verify(&c, &uri, "4m", "512k");
    let started = std::time::Instant::now();
    let mut rss_at_100 = 0;
    for i in 0..1000 {
        let (code, body) = c.rest(
            "POST",
            "/v1/volumes/cyc/snapshots",
            &format!("{{\"name\": \"c{i}\"}}"),
        );
        assert_eq!(code, 200, "snapshot c{i}: {body}");
        // Keep one or two, so deletions merge into a snapshot and into the head alike.
        if i > 0 {
            let (code, body) = c.rest(
                "DELETE",
                &format!("/v1/volumes/cyc/snapshots/c{}", i - 1),
                "",
            );
            assert_eq!(code, 200, "deleting c{}: {body}", i - 1);
        }
        if i == 100 {
            rss_at_100 = c.agent_rss_kib(0);
        }
        if fio.try_wait().unwrap().is_some() {
            fio_ok(&c, fio);
            fio = fio_verify(&c, &uri, "4m", "512k");
        }
    }
    let (code, body) = c.rest("DELETE", "/v1/volumes/cyc/snapshots/c999", "");
    assert_eq!(code, 200, "{body}");
    eprintln!("1000 cycles in {:?}", started.elapsed());
    merged_to(&c, "cyc", 1);
    assert!(snapshots(&c, "cyc").is_empty());
    let rss = c.agent_rss_kib(0);
    assert!(
        rss <= rss_at_100 + 16 * 1024,
        "the engine's agent grew from {rss_at_100} KiB after 100 cycles to {rss} KiB after 1000"
    );
    fio_ok(&c, fio);
    c.cli_ok(&["volume", "detach", "cyc"]);
    assert_rw_replicas_identical(&c, "cyc");
}

/// The size a new NBD connection to `uri` sees.
fn nbd_size(uri: &str) -> u64 {
    let o = run(std::process::Command::new("nbdinfo").args(["--size", uri]));
    assert!(
        o.status.success(),
        "nbdinfo --size {uri}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

/// Must-hold 7 (the NBD half; `resize2fs` on a mounted ext4 needs a kernel device that grows,
/// the FUSE frontend of the Kubernetes issue): a volume grows while fio verifies it. No error;
/// a new connection sees the new size; the old data stays, the new range reads as zeroes and
/// takes writes. A replica whose node was down during a growth is grown by its rebuild and
/// ends identical. A detached volume grows at its next attach. Must-hold 9's shrinking, an
/// unaligned size and an unknown volume are refused with nothing changed.
#[test]
fn a_volume_grows_online_under_fio_verify_and_detached_and_shrinking_is_refused() {
    require("fio");
    require("nbdinfo");
    require("qemu-io");
    let mut c = Cluster::separate(71, 3);
    let uri = c.create_attached("ex", "64MiB", 3, "node-1");
    qemu_io(&uri, &["write -P 7 60M 4M".into()]);
    let fio = fio_verify(&c, &uri, "32m", "4m");
    std::thread::sleep(Duration::from_secs(2));
    let out = c.cli_ok(&["volume", "expand", "ex", "--size", "128MiB"]);
    assert!(
        out.contains("new NBD connections see the new size"),
        "{out}"
    );
    let v = c.volume("ex");
    assert_eq!(v["size_bytes"], 128u64 << 20, "{v}");
    assert_eq!(v["engine_size_bytes"], 128u64 << 20, "{v}");
    assert_eq!(nbd_size(&uri), 128 << 20);
    let check = |uri: &str, cmds: &[&str]| {
        qemu_io(uri, &cmds.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    };
    check(
        &uri,
        &[
            "read -P 7 60M 4M",
            "read -P 0 64M 63M",
            "write -P 9 127M 1M",
            "read -P 9 127M 1M",
        ],
    );
    fio_ok(&c, fio);
    // Bad input changes nothing and says why.
    refused(
        &c,
        &["volume", "expand", "ex", "--size", "64MiB"],
        "shrinking",
    );
    refused(
        &c,
        &["volume", "expand", "ex", "--size", "134217729"],
        "multiple",
    );
    refused(
        &c,
        &["volume", "expand", "nosuch", "--size", "1GiB"],
        "nosuch",
    );
    let (code, body) = c.rest("POST", "/v1/volumes/ex/expand", "{}");
    assert_eq!(code, 400, "{body}");
    assert_eq!(c.volume("ex")["size_bytes"], 128u64 << 20);
    assert_eq!(nbd_size(&uri), 128 << 20);
    // Growing again to the same size changes nothing (idempotent, as CSI needs).
    c.cli_ok(&["volume", "expand", "ex", "--size", "128MiB"]);
    // A replica whose node is down while the volume grows: its rebuild grows it first.
    let away = replica_node_but(&v, &["node-1"]);
    let away_i: usize = away.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
    c.kill_agent(away_i);
    c.cli_ok(&["volume", "expand", "ex", "--size", "192MiB"]);
    check(&uri, &["write -P 5 190M 1M"]);
    c.start_agent(away_i);
    wait_until("every replica RW again", Duration::from_secs(90), || {
        let v = c.volume("ex");
        (v["robustness"] == "healthy").then_some(())
    });
    assert_rw_replicas_identical(&c, "ex");
    // Detached: recorded now, the replicas grow at the next attach.
    c.cli_ok(&["volume", "detach", "ex"]);
    let out = c.cli_ok(&["volume", "expand", "ex", "--size", "256MiB"]);
    assert!(out.contains("when it is next attached"), "{out}");
    let uri = c.cli_ok(&["volume", "attach", "ex", "--node", "node-2"]);
    let uri = uri.trim();
    assert_eq!(nbd_size(uri), 256 << 20);
    check(
        uri,
        &[
            "read -P 7 60M 4M",
            "read -P 9 127M 1M",
            "read -P 5 190M 1M",
            "read -P 0 192M 64M",
        ],
    );
    assert_rw_replicas_identical(&c, "ex");
}
