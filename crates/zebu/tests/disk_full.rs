//! Must-hold 9 of the healing issue: a node's disk is a small loop-mounted ext4 that fills up.
//! On every member, the client gets ENOSPC, nobody is retired, and the volume takes writes
//! again once space is freed; on one member, that replica leaves the set and is replaced on
//! another node at once (not after the replenishment wait), with no client error.

mod common;
use common::*;
use std::time::Duration;

/// A cluster of `nodes` agents whose first node's data directory is a `mib` MiB disk.
fn cluster_with_small_disk(net: u8, nodes: usize, mib: u64) -> (Cluster, SmallDisk) {
    for t in ["mkfs.ext4", "fallocate", "qemu-io"] {
        require(t);
    }
    let mut c = Cluster::separate(net, 0);
    let disk = SmallDisk::mount(&c.dir.path().join("node-1"), mib);
    for i in 0..nodes {
        c.agents.push(None);
        c.start_agent(i);
    }
    c.wait_nodes_ready(nodes);
    (c, disk)
}

const MIB: u64 = 1 << 20;

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn a_full_disk_under_every_member_gives_enospc_and_the_volume_recovers_when_space_is_freed() {
    let (mut c, disk) = cluster_with_small_disk(35, 1, 64);
    let uri = c.create_attached("full", "64MiB", 1, "node-1");
    qemu_io(&uri, &["write -P 0x11 0 4M".into(), "flush".into()]);
    assert!(disk.fill(6 * MIB), "cannot fill the small disk");
    // 1 MiB writes into new space until the disk is full.
    let writes: Vec<String> = (4..40)
        .map(|i| format!("write -P 0x22 {}M 1M", i))
        .collect();
    let out = qemu_io_any(&uri, &writes);
    assert!(
        out.contains("No space left on device"),
        "no write was refused for lack of space:\n{out}"
    );
    assert!(
        !out.contains("Input/output error"),
        "a full disk must give ENOSPC, not EIO:\n{out}"
    );
    let ok = out.matches("wrote 1048576/1048576").count() as u64;
    assert!(ok < 36, "every write succeeded on a full disk:\n{out}");
    // Nobody was retired: the volume stays healthy, its replica RW and unpoisoned; what was
    // acknowledged reads back, and what needs no space (an overwrite) still works.
    let v = c.volume("full");
    assert_eq!(v["robustness"], "healthy", "{v}");
    assert_eq!(only_rw(&v), 1, "{v}");
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 4M".into(),
            "write -P 0x33 0 1M".into(),
            "flush".into(),
        ],
    );
    // A restart while the disk is still full (the engine raises the generation on start: the
    // metadata's space was reserved) brings the volume back by itself, data intact.
    c.kill_agent(0);
    c.start_agent(0);
    wait_until(
        "the volume served after a restart",
        Duration::from_secs(60),
        || {
            let out = qemu_io_any(&uri, &["read -P 0x33 0 1M".into()]);
            (!out.contains("can't open")).then_some(out)
        },
    );
    qemu_io(&uri, &["read -P 0x11 1M 3M".into()]);
    let out = qemu_io_any(&uri, &["write -P 0x22 39M 1M".into()]);
    assert!(out.contains("No space left on device"), "{out}");
    assert_eq!(c.volume("full")["robustness"], "healthy");
    // Space freed: every write that was refused now succeeds; all of it reads back.
    disk.free();
    let again: Vec<String> = writes.iter().cloned().chain(["flush".into()]).collect();
    qemu_io(&uri, &again);
    qemu_io(
        &uri,
        &[
            "read -P 0x33 0 1M".into(),
            "read -P 0x11 1M 3M".into(),
            "read -P 0x22 4M 36M".into(),
        ],
    );
    let v = c.volume("full");
    assert_eq!(v["robustness"], "healthy", "{v}");
    assert_eq!(only_rw(&v), 1, "{v}");
}

fn only_rw(v: &serde_json::Value) -> usize {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["mode"] == "RW")
        .count()
}

#[test]
fn a_member_whose_disk_fills_is_replaced_on_another_node_at_once() {
    require("fio");
    let (c, disk) = cluster_with_small_disk(36, 3, 64);
    // The default replenishment wait (600 s) stays: a full disk is not waited for. A failed
    // replica that was replaced is removed after a minute.
    c.cli_ok(&["setting", "set", "stale-replica-timeout", "1"]);
    let uri = c.create_attached("spill", "96MiB", 2, "node-2");
    let v = c.volume("spill");
    assert!(replica_on(&v, "node-1").is_some(), "{v}");
    assert!(replica_on(&v, "node-3").is_none(), "{v}");
    assert!(disk.fill(8 * MIB), "cannot fill the small disk");
    let fio = fio_verify(&c, &uri, "80m", "8m");
    let v = wait_until(
        "node-1's replica out for lack of space",
        Duration::from_secs(60),
        || {
            let v = c.volume("spill");
            (replica_on(&v, "node-1")?["mode"] == "ERR").then_some(v)
        },
    );
    let r = replica_on(&v, "node-1").unwrap();
    assert!(
        r["error"]
            .as_str()
            .unwrap_or_default()
            .contains("disk is full"),
        "{r}"
    );
    let mut last = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let v = loop {
        let v = c.volume("spill");
        if replica_on(&v, "node-3").is_some_and(|r| r["mode"] == "RW")
            && v["robustness"] == "healthy"
        {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no replacement on node-3 rebuilt within 120 s: {last}\nmanager:\n{}\nnode-2:\n{}",
            tail(&c.log("manager"), 30),
            tail(&c.log("node-2"), 30)
        );
        last = v;
        std::thread::sleep(Duration::from_millis(500));
    };
    fio_ok(&c, fio);
    assert_eq!(replica_on(&v, "node-1").unwrap()["mode"], "ERR", "{v}");
    assert_eq!(
        replica_on(&v, "node-3").unwrap()["last_rebuild"]["kind"],
        "full",
        "{v}"
    );
    c.cli_ok(&["volume", "detach", "spill"]);
    assert_rw_replicas_identical(&c, "spill");
    // Stale (failed over a minute ago) and replaced: removed from node-1's disk and the records.
    let old = c.replica_dir(0, r["name"].as_str().unwrap());
    assert!(old.exists(), "{}", old.display());
    wait_until(
        "the stale replica removed",
        Duration::from_secs(120),
        || {
            let v = c.volume("spill");
            (replica_on(&v, "node-1").is_none() && !old.exists()).then_some(())
        },
    );
    let v = c.volume("spill");
    assert_eq!(v["replicas"].as_array().unwrap().len(), 2, "{v}");
    drop(disk);
}
