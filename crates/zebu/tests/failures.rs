//! Replica failures while a workload runs: the workload sees no error, the failed replica goes
//! ERR for good, the volume degrades and keeps serving down to its last replica.

mod common;
use common::*;
use std::process::{Command, Stdio};
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
    let fio_log = c.dir.path().join("fio.out");
    let fio = Command::new("fio")
        // fio leaves its verify state file in its working directory.
        .current_dir(c.dir.path())
        .args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=16k",
            "--size=96m",
            "--iodepth=16",
            "--rate=16m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ])
        .stdout(Stdio::from(std::fs::File::create(&fio_log).unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fio");
    std::thread::sleep(Duration::from_secs(2));
    c.kill_agent(1); // node-2 holds a replica; the engine runs on node-1.
    let out = fio.wait_with_output().unwrap();
    let log = std::fs::read_to_string(&fio_log).unwrap_or_default();
    assert!(
        out.status.success(),
        "fio saw an error:\n{log}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("err= 0"), "fio reported errors:\n{log}");

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

    // Restarting the killed agent does not put its stale replica back in RW.
    c.start_agent(1);
    c.wait_nodes_ready(2);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(replica_on(&c, "busy", "node-2")["mode"], "ERR");
    qemu_io(&uri, &["read -P 0x33 220M 1M".into()]);
    let listed = c.cli_ok(&["volume", "list"]);
    assert!(listed.contains("1/3"), "{listed}");
}
