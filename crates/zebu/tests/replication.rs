//! Every replica holds every byte; what FLUSH acknowledged survives kill -9 of everything.

mod common;
use common::*;
use std::time::Duration;

fn replicas_of(c: &Cluster, vol: &str) -> Vec<(usize, String)> {
    let v = c.volume(vol);
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (node_index(r), r["name"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn nbdcopy_round_trip_is_byte_identical_on_every_replica() {
    require("nbdcopy");
    let c = Cluster::separate(12, 3);
    let uri = c.create_attached("copy", "256MiB", 3, "node-1");
    let d = c.dir.path().display().to_string();
    sh(&format!("head -c 268435456 /dev/urandom > {d}/in.img"));
    sh(&format!("nbdcopy --flush {d}/in.img {uri}"));
    sh(&format!("nbdcopy {uri} {d}/out.img"));
    let sums = sh(&format!("sha256sum {d}/in.img {d}/out.img | cut -d' ' -f1"));
    let sums: Vec<&str> = sums.lines().collect();
    assert_eq!(sums.len(), 2);
    assert_eq!(
        sums[0], sums[1],
        "data read back over NBD differs from what was written"
    );
    sh(&format!("rm {d}/out.img"));

    // Each replica on its own, read offline with every block's checksum verified.
    c.cli_ok(&["volume", "detach", "copy"]);
    let reps = replicas_of(&c, "copy");
    assert_eq!(reps.len(), 3);
    let mut nodes: Vec<usize> = reps.iter().map(|r| r.0).collect();
    nodes.sort();
    assert_eq!(
        nodes,
        vec![0, 1, 2],
        "replicas must be on three different nodes"
    );
    for (node, name) in reps {
        let out = format!("{d}/{name}.img");
        let dir = c.replica_dir(node, &name);
        let o = run(std::process::Command::new(ZEBU)
            .args(["replica", "export", "--dir"])
            .arg(&dir)
            .arg(&out));
        assert!(
            o.status.success(),
            "export of {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let sum = sh(&format!("sha256sum {out} | cut -d' ' -f1"));
        assert_eq!(
            sum.trim(),
            sums[0],
            "replica {name} on node-{} differs",
            node + 1
        );
        sh(&format!("rm {out}"));
    }
}

#[test]
fn flushed_writes_survive_kill_9_of_every_process() {
    require("qemu-io");
    let mut c = Cluster::separate(13, 3);
    let uri = c.create_attached("durable", "64MiB", 3, "node-1");
    // qemu-io flushes before it exits; add an explicit flush too.
    let writes: Vec<String> = (0..16u64)
        .map(|i| format!("write -P {} {} 65536", i + 1, i * (3 << 20) + 4096 * i))
        .collect();
    let mut cmds = writes.clone();
    cmds.push("flush".into());
    qemu_io(&uri, &cmds);
    c.kill_all();
    c.start_manager();
    for i in 0..3 {
        c.start_agent(i);
    }
    c.wait_nodes_ready(3);
    // The volume re-attaches by itself (its desired node is persisted).
    let v = wait_until("re-attach after restart", Duration::from_secs(60), || {
        let v = c.cli_json(&["volume", "get", "durable"]).ok()?;
        (v["state"] == "attached").then_some(v)
    });
    assert_eq!(v["robustness"], "healthy", "{v}");
    let uri2 = v["nbd_uri"].as_str().unwrap().to_owned();
    assert_eq!(uri, uri2);
    let reads: Vec<String> = (0..16u64)
        .map(|i| format!("read -P {} {} 65536", i + 1, i * (3 << 20) + 4096 * i))
        .collect();
    qemu_io(&uri, &reads);
}
