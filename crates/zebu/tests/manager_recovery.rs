//! A manager that cannot forget (`docs/hardening.md`): a store that is emptied, cut short or
//! bit-flipped is refused at start with the file named and what to do, and
//! `zebu manager --recover-from-agents` brings every volume back from what the agents hold,
//! with its data intact and the engine that was running never stopped.

mod common;
use common::*;
use std::time::Duration;

fn sha(uri: &str, out: &std::path::Path) -> String {
    sh(&format!("rm -f {0} && nbdcopy '{uri}' {0}", out.display()));
    sh(&format!("sha256sum {} | cut -d' ' -f1", out.display()))
        .trim()
        .to_owned()
}

/// Start the manager in the foreground and expect it to refuse; returns what it said.
fn refused_start(c: &Cluster) -> String {
    let o = run(&mut c.manager_command(&[]));
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "the manager started on a damaged store:\n{said}"
    );
    assert!(
        said.contains("meta.redb"),
        "the error names the file:\n{said}"
    );
    assert!(
        said.contains("--recover-from-agents"),
        "the error says what to do:\n{said}"
    );
    assert!(!said.contains("panicked"), "no panic:\n{said}");
    said
}

#[test]
fn a_damaged_store_is_refused_and_every_volume_comes_back_from_the_agents() {
    require("nbdcopy");
    require("qemu-io");
    let mut c = Cluster::separate(41, 3);
    let d = c.dir.path().to_owned();
    let alpha = c.create_attached("alpha", "64MiB", 3, "node-1");
    qemu_io(
        &alpha,
        &["write -P 0x5a 0 4M".into(), "write -P 0x17 40M 1M".into()],
    );
    let beta = c.create_attached("beta", "32MiB", 2, "node-2");
    qemu_io(&beta, &["write -P 0x33 1M 3M".into()]);
    let beta_sum = sha(&beta, &d.join("beta.img"));
    c.cli_ok(&["volume", "detach", "beta"]);
    let alpha_sum = sha(&alpha, &d.join("alpha.img"));
    let before = c.volume("alpha");

    // The manager dies, and its store is damaged in three ways in turn.
    let m = c.manager.take().unwrap();
    drop_child(m);
    let store = d.join("manager/meta.redb");
    let good = std::fs::read(&store).unwrap();
    std::fs::write(&store, b"").unwrap();
    let said = refused_start(&c);
    assert!(said.contains("cluster"), "{said}");
    std::fs::write(&store, &good[..good.len() / 2]).unwrap();
    refused_start(&c);
    // Flip a bit in every copy of the volumes' records (redb keeps old pages too).
    let mut flipped = good.clone();
    let needle = b"\"size_bytes\":";
    let mut hits = 0;
    for i in 0..flipped.len().saturating_sub(needle.len() + 1) {
        if &flipped[i..i + needle.len()] == needle {
            flipped[i + needle.len()] ^= 0x01;
            hits += 1;
        }
    }
    assert!(hits >= 2, "the records are in the store file");
    std::fs::write(&store, &flipped).unwrap();
    refused_start(&c);
    // Nothing was changed by the refusals: the damaged file is still there as it was.
    assert_eq!(std::fs::read(&store).unwrap(), flipped);
    // The engine kept serving all along.
    qemu_io(&alpha, &["read -P 0x17 40M 1M".into()]);

    // Recover: agents hold while the window is open, then every volume is back.
    c.start_manager_with(&["--recover-from-agents", "--recover-window", "6"]);
    wait_until("the manager's API", Duration::from_secs(20), || {
        c.cli_json(&["node", "list"]).ok()
    });
    let o = c.cli(&["volume", "create", "gamma", "--size", "16MiB"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("recovering"),
        "changes wait for the recovery: {err}"
    );
    let kept: Vec<String> = std::fs::read_dir(d.join("manager"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("meta.redb.damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged store is kept aside");
    let v = wait_until(
        "alpha recovered and healthy",
        Duration::from_secs(60),
        || {
            let v = c.cli_json(&["volume", "get", "alpha"]).ok()?;
            (v["robustness"] == "healthy").then_some(v)
        },
    );
    assert_eq!(v["size_bytes"], before["size_bytes"], "{v}");
    assert_eq!(v["replica_count"], 3, "{v}");
    assert_eq!(
        v["node"], "node-1",
        "the running engine keeps its node: {v}"
    );
    // The engine was never stopped: the same URI still serves, with the same data.
    assert!(
        !c.log("node-1").contains("engine stopping"),
        "{}",
        c.log("node-1")
    );
    assert_eq!(sha(&alpha, &d.join("alpha2.img")), alpha_sum);
    qemu_io(
        &alpha,
        &["write -P 0x44 8M 1M".into(), "read -P 0x44 8M 1M".into()],
    );

    let b = wait_until("beta recovered", Duration::from_secs(30), || {
        let v = c.cli_json(&["volume", "get", "beta"]).ok()?;
        (v["replicas"].as_array()?.len() == 2).then_some(v)
    });
    assert_eq!(b["replica_count"], 2, "{b}");
    let beta = c
        .cli_ok(&["volume", "attach", "beta", "--node", "node-3"])
        .trim()
        .to_owned();
    assert_eq!(sha(&beta, &d.join("beta2.img")), beta_sum);

    // Every node and the manager agree on the cluster's id.
    let id = std::fs::read_to_string(d.join("manager/cluster.id")).unwrap();
    for n in 1..=3 {
        assert_eq!(
            std::fs::read_to_string(d.join(format!("node-{n}/cluster.id"))).unwrap(),
            id
        );
    }
    // And changes are taken again.
    c.cli_ok(&["volume", "create", "gamma", "--size", "16MiB"]);
}

#[test]
fn an_agent_refuses_a_manager_of_another_cluster() {
    let mut c = Cluster::separate(42, 1);
    let d = c.dir.path().to_owned();
    let id = wait_until("the node's cluster id", Duration::from_secs(10), || {
        std::fs::read_to_string(d.join("node-1/cluster.id")).ok()
    });
    // The manager's directory is lost and a new one started there: a new cluster.
    let m = c.manager.take().unwrap();
    drop_child(m);
    std::fs::remove_dir_all(d.join("manager")).unwrap();
    c.start_manager();
    // (The agent still has the old token: give it the new one, as an operator would.)
    c.kill_agent(0);
    c.start_agent(0);
    let log = wait_until("the refusal", Duration::from_secs(20), || {
        let l = c.log("node-1");
        l.contains("belongs to cluster").then_some(l)
    });
    assert!(log.contains(id.trim()), "{log}");
    assert_eq!(
        std::fs::read_to_string(d.join("node-1/cluster.id")).unwrap(),
        id,
        "the node's id is never changed"
    );
    let nodes = c.cli_json(&["node", "list"]).unwrap();
    assert_eq!(
        nodes.as_array().unwrap().len(),
        0,
        "not registered: {nodes}"
    );
}

fn drop_child(mut m: std::process::Child) {
    m.kill().unwrap();
    m.wait().unwrap();
}

#[test]
fn a_lost_directory_is_recovered_by_id_resumes_after_a_crash_and_never_guesses() {
    require("nbdcopy");
    require("qemu-io");
    let mut c = Cluster::separate(46, 3);
    let d = c.dir.path().to_owned();
    let uri = c.create_attached("gamma", "32MiB", 2, "node-1");
    qemu_io(&uri, &["write -P 0x7e 0 3M".into()]);
    let sum = sha(&uri, &d.join("gamma.img"));
    c.cli_ok(&["volume", "detach", "gamma"]);
    let v = c.volume("gamma");
    let reps: Vec<(String, usize)> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_owned(), node_index(r)))
        .collect();
    let id = std::fs::read_to_string(d.join("node-1/cluster.id"))
        .unwrap()
        .trim()
        .to_owned();

    // The manager's whole directory is lost.
    drop_child(c.manager.take().unwrap());
    std::fs::remove_dir_all(d.join("manager")).unwrap();
    // Without its id the manager does not guess one from whichever agent speaks first.
    let o = run(&mut c.manager_command(&["--recover-from-agents"]));
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{said}");
    assert!(said.contains("--cluster-id"), "{said}");

    // One copy of gamma becomes unreadable: its generation can no longer be known.
    let (bad, bad_node) = reps[1].clone();
    let (good, _) = reps[0].clone();
    for i in 0..3 {
        c.kill_agent(i);
    }
    std::fs::write(
        c.replica_dir(bad_node, &bad).join("replica.meta"),
        b"garbage",
    )
    .unwrap();

    // Recover; the manager dies inside the window, and its next start (without the flag)
    // resumes the recovery rather than trusting the half-rebuilt store.
    c.start_manager_with(&[
        "--recover-from-agents",
        "--cluster-id",
        &id,
        "--recover-window",
        "30",
    ]);
    for i in 0..3 {
        c.start_agent(i); // with the new agent token, as an operator would
    }
    wait_until("gamma adopted", Duration::from_secs(30), || {
        let v = c.cli_json(&["volume", "get", "gamma"]).ok()?;
        (v["replicas"].as_array()?.len() == 2).then_some(())
    });
    drop_child(c.manager.take().unwrap());
    c.start_manager_with(&["--recover-window", "1"]);
    wait_until("the resumed recovery", Duration::from_secs(20), || {
        c.log("manager").contains("did not finish").then_some(())
    });
    let v = wait_until("gamma settled", Duration::from_secs(120), || {
        let v = c.cli_json(&["volume", "get", "gamma"]).ok()?;
        let msg = v["message"].as_str().unwrap_or("").to_owned();
        msg.contains("not known").then_some(v)
    });
    // Nothing was chosen: both copies are out of sync until a person decides.
    for r in v["replicas"].as_array().unwrap() {
        assert_eq!(r["mode"], "ERR", "{v}");
    }
    let o = c.cli(&["volume", "salvage", "gamma"]);
    assert!(!o.status.success(), "salvage without a choice is refused");
    assert!(String::from_utf8_lossy(&o.stderr).contains("not known"));
    c.cli_ok(&["volume", "salvage", "gamma", "--replica", &good]);
    let uri = c
        .cli_ok(&["volume", "attach", "gamma", "--node", "node-1"])
        .trim()
        .to_owned();
    assert_eq!(sha(&uri, &d.join("gamma2.img")), sum);
}
