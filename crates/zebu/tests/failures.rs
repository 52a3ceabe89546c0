//! Replica failures while a workload runs: the workload sees no error, the failed replica goes
//! ERR for good, the volume degrades and keeps serving down to its last replica. A block damaged
//! on one replica's disk reads correctly and is mended from a good copy; damage no read meets is
//! found and mended by the background scrub.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn replica_on(c: &Cluster, vol: &str, node: &str) -> serde_json::Value {
    c.volume(vol)["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == node)
        .cloned()
        .unwrap()
}

#[test]
fn killing_replica_agents_degrades_without_errors_and_loses_nothing() {
    require("fio");
    require("qemu-io");
    let mut c = Cluster::separate(14, 3);
    let uri = c.create_attached("busy", "256MiB", 3, "node-1");
    qemu_io(&uri, &["write -P 0x11 200M 1M".into()]);

    // A verifying write workload, throttled so it is still running when the agent dies.
    let fio = fio_verify(&c, &uri, "96m", "16m");
    std::thread::sleep(Duration::from_secs(2));
    c.kill_agent(1); // node-2 holds a replica; the engine runs on node-1.
    fio_ok(&c, fio);

    let v = wait_until("degraded volume", Duration::from_secs(20), || {
        let v = c.volume("busy");
        (v["robustness"] == "degraded").then_some(v)
    });
    assert_eq!(v["state"], "attached");
    let r2 = replica_on(&c, "busy", "node-2");
    assert_eq!(r2["mode"], "ERR", "{v}");
    // Survivors were moved to a higher generation than the failed replica holds.
    let r1 = replica_on(&c, "busy", "node-1");
    assert!(r1["generation"].as_u64() > r2["generation"].as_u64(), "{v}");

    // Data from before the failure reads back; write and verify after it.
    qemu_io(
        &uri,
        &[
            "read -P 0x11 200M 1M".into(),
            "write -P 0x22 210M 1M".into(),
        ],
    );

    // Lose a second replica: the volume still serves from the last one.
    c.kill_agent(2);
    qemu_io(
        &uri,
        &[
            "write -P 0x33 220M 1M".into(),
            "read -P 0x11 200M 1M".into(),
            "read -P 0x22 210M 1M".into(),
            "read -P 0x33 220M 1M".into(),
        ],
    );
    let v = wait_until("second replica ERR", Duration::from_secs(20), || {
        let v = c.volume("busy");
        (replica_on(&c, "busy", "node-3")["mode"] == "ERR").then_some(v)
    });
    assert_eq!(v["robustness"], "degraded", "{v}");
    assert_eq!(v["state"], "attached");

    // Restarting a killed agent: its stale replica never serves as it is; it rejoins by a
    // rebuild (WO, then RW), and then holds what was written while it was away.
    let g_stale = replica_on(&c, "busy", "node-2")["generation"]
        .as_u64()
        .unwrap();
    c.start_agent(1);
    c.wait_nodes_ready(2);
    // RW comes with the engine's report, the generation with node-2's own heartbeat: the
    // manager's view has both once both have come.
    let r2 = wait_until(
        "node-2's replica rebuilt, at a generation above its stale one",
        Duration::from_secs(60),
        || {
            let r = replica_on(&c, "busy", "node-2");
            (r["mode"] == "RW" && r["generation"].as_u64().unwrap_or(0) > g_stale).then_some(r)
        },
    );
    assert_eq!(r2["last_rebuild"]["kind"], "delta", "{r2}");
    qemu_io(&uri, &["read -P 0x33 220M 1M".into()]);
    let listed = c.cli_ok(&["volume", "list"]);
    assert!(listed.contains("2/3"), "{listed}");
}

/// Change 100 bytes inside the block at `offset` of a replica's data file behind its back, as a
/// bad sector or a write torn by a power loss would.
fn damage_on_disk(dir: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let data = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "data"))
        .expect("a layer data file in the replica directory");
    let f = std::fs::OpenOptions::new().write(true).open(data).unwrap();
    f.write_all_at(&[0x5a; 100], offset + 1000).unwrap();
}

#[test]
fn a_block_damaged_on_disk_reads_correctly_and_is_mended() {
    require("qemu-io");
    let c = Cluster::separate(19, 3);
    let uri = c.create_attached("heal", "64MiB", 3, "node-1");
    qemu_io(&uri, &["write -P 0x44 0 1M".into()]);
    // The copy on node-1 is the one the engine reads first.
    let local = replica_on(&c, "heal", "node-1");
    let dir = c.replica_dir(0, local["name"].as_str().unwrap());
    damage_on_disk(&dir, 64 * 1024);

    qemu_io(&uri, &["read -P 0x44 0 1M".into()]);
    let log = c.log("node-1");
    assert!(log.contains("repair: rewrote"), "node-1 log:\n{log}");
    let v = c.volume("heal");
    assert_eq!(v["robustness"], "healthy", "{v}");

    // A block damaged on every copy: reads fail with EIO (and the log says why), no replica
    // leaves the set, and writing the block whole makes it readable again.
    for node in 0..3 {
        let r = replica_on(&c, "heal", &format!("node-{}", node + 1));
        damage_on_disk(
            &c.replica_dir(node, r["name"].as_str().unwrap()),
            512 * 1024,
        );
    }
    let o = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 512K 4K"])
        .arg(&uri));
    let said = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("Input/output error"), "qemu-io: {said}");
    let log = c.log("node-1");
    assert!(
        log.contains("damaged on every replica"),
        "node-1 log:\n{log}"
    );
    qemu_io(
        &uri,
        &[
            "write -P 0x45 512K 4K".into(),
            "read -P 0x45 512K 4K".into(),
        ],
    );
    let v = c.volume("heal");
    assert_eq!(v["robustness"], "healthy", "{v}");

    // Offline, with every block's checksum verified, the mended copy holds the data.
    c.cli_ok(&["volume", "detach", "heal"]);
    let img = export_verified(&c, &dir);
    let mut want = vec![0x44u8; 1 << 20];
    want[512 << 10..516 << 10].fill(0x45);
    assert!(img[..1 << 20] == want[..], "mended data");
}

#[test]
fn the_background_scrub_mends_damage_no_read_meets() {
    require("qemu-io");
    let mut c = Cluster::separate_with(20, 3, &["--scrub-interval", "2", "--scrub-rate", "0"]);
    let uri = c.create_attached("scrubbed", "64MiB", 3, "node-1");
    qemu_io(&uri, &["write -P 0x66 8M 2M".into()]);
    // Reads go to node-1's copy: the damage on node-2's is never met by a read.
    let r2 = replica_on(&c, "scrubbed", "node-2");
    let dir = c.replica_dir(1, r2["name"].as_str().unwrap());
    damage_on_disk(&dir, 9 << 20);
    let log = wait_until("a scrub that mends", Duration::from_secs(30), || {
        let log = c.log("node-1");
        log.contains("with damage mended: 1,").then_some(log)
    });
    assert!(log.contains("repair: rewrote"), "node-1 log:\n{log}");
    assert!(
        log.contains("scrub done") && log.contains("checked"),
        "node-1 log:\n{log}"
    );
    let record = c.dir.path().join("node-1/scrubs/scrubbed");
    let at: u64 = std::fs::read_to_string(&record)
        .unwrap_or_default()
        .trim()
        .parse()
        .expect("the time of the last scrub, kept for restarts");
    assert!(at > 1_700_000_000, "{at}");

    // Offline, with every block's checksum verified: node-2's copy holds the data again.
    c.cli_ok(&["volume", "detach", "scrubbed"]);
    c.kill_all();
    let img = export_verified(&c, &dir);
    assert!(
        img[8 << 20..10 << 20].iter().all(|&b| b == 0x66),
        "mended data"
    );
}
