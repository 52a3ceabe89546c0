//! Hardening (`docs/hardening.md`): tokens with roles, names checked where they enter, the
//! REST protocol's edges, and `zebu node delete` of a node that never returns.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One raw HTTP request; returns the status code and the body.
fn http(c: &Cluster, method: &str, path: &str, auth: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(c.api.trim_start_matches("http://")).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: zebu\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(a) = auth {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer (and close) before it has read a large body.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {resp:?}"));
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn token(c: &Cluster, file: &str) -> String {
    std::fs::read_to_string(c.dir.path().join("manager").join(file))
        .unwrap()
        .trim()
        .to_owned()
}

fn names(c: &Cluster) -> Vec<String> {
    let v = c.cli_json(&["volume", "list"]).unwrap();
    let mut n: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    n.sort();
    n
}

#[test]
fn tokens_have_roles_and_names_and_bodies_are_checked() {
    let c = Cluster::separate(43, 1);
    c.cli_ok(&[
        "volume",
        "create",
        "victim",
        "--size",
        "16MiB",
        "--replicas",
        "1",
    ]);
    let agent = format!("Bearer {}", token(&c, "agent.token"));
    let ro = format!("Bearer {}", token(&c, "readonly.token"));
    let create = br#"{"name":"x","size_bytes":16777216}"#;

    // The agent token: heartbeats yes, managing volumes no, and 403 names both roles.
    for (method, path, body) in [
        ("POST", "/v1/volumes", &create[..]),
        ("POST", "/v1/volumes/victim/attach", b"{}"),
        ("DELETE", "/v1/volumes/victim", b""),
        ("GET", "/v1/volumes", b""),
    ] {
        let (status, said) = http(&c, method, path, Some(&agent), body);
        assert_eq!(status, 403, "{method} {path} with the agent token: {said}");
        assert!(said.contains("agent role"), "{said}");
    }
    // The read-only token lists but does not change.
    let (status, said) = http(&c, "GET", "/v1/volumes", Some(&ro), b"");
    assert_eq!(status, 200, "{said}");
    assert!(said.contains("victim"), "{said}");
    for (method, path, body) in [
        ("POST", "/v1/volumes", &create[..]),
        ("DELETE", "/v1/volumes/victim", b""),
        (
            "POST",
            "/v1/settings/default-replica-count",
            br#"{"value":"2"}"#,
        ),
        ("POST", "/v1/agent/heartbeat", b"{}"),
    ] {
        let (status, said) = http(&c, method, path, Some(&ro), body);
        assert_eq!(
            status, 403,
            "{method} {path} with the read-only token: {said}"
        );
        assert!(
            said.contains("read-only role") && said.contains("needs the"),
            "{said}"
        );
    }
    // The bearer scheme in any case (RFC 7235); other schemes are not a token.
    let admin = token(&c, "admin.token");
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let (status, said) = http(
            &c,
            "GET",
            "/v1/volumes",
            Some(&format!("{scheme} {admin}")),
            b"",
        );
        assert_eq!(status, 200, "{scheme}: {said}");
    }
    let (status, _) = http(
        &c,
        "GET",
        "/v1/volumes",
        Some(&format!("Basic {admin}")),
        b"",
    );
    assert_eq!(status, 401);

    // An oversized body: 413, and nothing created.
    let mut big = br#"{"name":"huge","size_bytes":16777216,"pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 5 << 20));
    big.extend(br#""}"#);
    let (status, said) = http(
        &c,
        "POST",
        "/v1/volumes",
        Some(&format!("Bearer {admin}")),
        &big,
    );
    assert_eq!(status, 413, "{said}");
    assert!(said.contains("larger"), "{said}");

    // Names are escaped by the CLI and checked by the manager: nothing but the named volume
    // is ever touched.
    for (args, expect) in [
        (vec!["volume", "delete", "nope/../victim"], "not valid"),
        (vec!["volume", "get", "victim?x=1"], "not valid"),
        (vec!["volume", "detach", "victim#x"], "not valid"),
        (vec!["volume", "attach", "../victim"], "not valid"),
    ] {
        let o = c.cli(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    // Straight at the API, a path that decodes to another path is one invalid name.
    let (status, said) = http(
        &c,
        "DELETE",
        "/v1/volumes/nope%2F..%2Fvictim",
        Some(&format!("Bearer {admin}")),
        b"",
    );
    assert_eq!(status, 400, "{said}");
    assert_eq!(names(&c), vec!["victim".to_owned()]);
    assert_eq!(c.volume("victim")["desired_node"], serde_json::Value::Null);

    // A size no node's filesystem can hold in one file is refused at create, naming the limit
    // (the nodes' disks here are ext4, whose files stop at 16 TiB), and nothing is created.
    let nodes = c.cli_json(&["node", "list"]).unwrap();
    let max = nodes[0]["max_file_bytes"].as_u64().unwrap();
    assert!(max > 0, "the agent measured its disk: {nodes}");
    if max < 64 << 40 {
        let o = c.cli(&[
            "volume",
            "create",
            "huge",
            "--size",
            "64TiB",
            "--replicas",
            "1",
        ]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "a 64 TiB volume was created");
        assert!(
            err.contains("node-1 holds files up to") && err.contains("TiB"),
            "{err}"
        );
        assert_eq!(names(&c), vec!["victim".to_owned()]);
    }

    // A heartbeat may not register a node whose name is a path.
    let hb = br#"{"node":"../../x","address":"127.0.0.9","data_port":1,"nbd_port":2,"disk_path":"/tmp","disk_total_bytes":0,"disk_free_bytes":0,"replicas":[],"engines":[]}"#;
    let (status, said) = http(&c, "POST", "/v1/agent/heartbeat", Some(&agent), hb);
    assert_eq!(status, 400, "{said}");
    assert!(said.contains("node name"), "{said}");
    let nodes = c.cli_json(&["node", "list"]).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
}

#[test]
fn deleting_a_dead_node_lets_its_volumes_heal_or_be_deleted() {
    require("qemu-io");
    let idx = |n: &str| n.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
    let not_ready = |c: &Cluster, node: &str| {
        wait_until("the node not ready", Duration::from_secs(30), || {
            let n = c.cli_json(&["node", "list"]).ok()?;
            n.as_array()?
                .iter()
                .any(|x| x["name"] == node && x["ready"] == false)
                .then_some(())
        })
    };
    {
        // `pair` has replicas on node-1 (its engine) and one other node.
        let mut c = Cluster::separate(44, 3);
        let uri = c.create_attached("pair", "32MiB", 2, "node-1");
        qemu_io(&uri, &["write -P 0x61 0 2M".into()]);
        let v = c.volume("pair");
        let other = ["node-2", "node-3"]
            .into_iter()
            .find(|n| replica_on(&v, n).is_some())
            .expect("a second replica")
            .to_owned();
        let spare = if other == "node-2" {
            "node-3"
        } else {
            "node-2"
        };
        // A node that is up is not removed.
        let o = c.cli(&["node", "delete", &other]);
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("is up"));
        // It dies for good: removing it lets `pair` heal on the spare node at once.
        c.kill_agent(idx(&other));
        not_ready(&c, &other);
        c.cli_ok(&["node", "delete", &other]);
        let v = wait_until("pair healed", Duration::from_secs(90), || {
            let v = c.volume("pair");
            (v["robustness"] == "healthy" && replica_on(&v, spare).is_some()).then_some(v)
        });
        assert!(replica_on(&v, &other).is_none(), "{v}");
        qemu_io(&uri, &["read -P 0x61 0 2M".into()]);
        let nodes = c.cli_json(&["node", "list"]).unwrap();
        assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    }
    {
        // `lonely` has one replica; its node dies.
        let mut c = Cluster::separate(45, 2);
        c.cli_ok(&[
            "volume",
            "create",
            "lonely",
            "--size",
            "16MiB",
            "--replicas",
            "1",
        ]);
        let node = wait_until("lonely placed", Duration::from_secs(20), || {
            let v = c.volume("lonely");
            (v["state"] == "detached").then_some(())?;
            v["replicas"].as_array()?.first()?["node"]
                .as_str()
                .map(str::to_owned)
        });
        c.kill_agent(idx(&node));
        not_ready(&c, &node);
        // Removing the node is refused while it holds the only in-sync copy of a volume...
        let o = c.cli(&["node", "delete", &node]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "removed without --force");
        assert!(
            err.contains("only in-sync") && err.contains("lonely"),
            "{err}"
        );
        let o = c.cli(&["node", "delete", &node, "--force", "node-9"]);
        assert!(!o.status.success(), "--force must name the node");
        assert!(c
            .cli_json(&["node", "list"])
            .unwrap()
            .to_string()
            .contains(&node));
        // ...but not once that volume is being deleted, which otherwise waits for ever for
        // the dead node to report its replica gone.
        c.cli_ok(&["volume", "delete", "lonely", "--no-wait"]);
        c.cli_ok(&["node", "delete", &node]);
        wait_until("lonely deleted", Duration::from_secs(30), || {
            (!names(&c).contains(&"lonely".to_owned())).then_some(())
        });
    }
}

#[test]
fn nbd_refuses_unknown_flags_and_df_without_structured_replies() {
    require("nbdsh"); // python3-libnbd
    let c = Cluster::separate(47, 1);
    let uri = c.create_attached("flags", "16MiB", 1, "node-1");
    let script = r#"
import nbd
def attempt(h, what, **kw):
    try:
        h.pread(4096, 0, **kw)
        print(what, "accepted")
    except nbd.Error as e:
        print(what, "errno", e.errno)
for structured in (True, False):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.set_strict_mode(0)  # let the client send what the protocol forbids
    h.connect_uri(URI)
    s = "structured" if structured else "simple"
    attempt(h, s + " unknown-flag", flags=1 << 9)
    attempt(h, s + " df", flags=nbd.CMD_FLAG_DF)
    attempt(h, s + " plain")
    h.pwrite(b"z" * 4096, 8192, flags=nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 8192) == b"z" * 4096
    print(s, "still usable")
    h.shutdown()
"#;
    // nbdsh: the system's Python with the nbd module (apt's python3-libnbd), not another
    // python3 that may come first on PATH.
    let script = script.replace("URI", &format!("{uri:?}"));
    let out = sh(&format!("PATH=/usr/bin:/bin nbdsh -c '{script}'"));
    for want in [
        "structured unknown-flag errno EINVAL",
        "structured df accepted",
        "structured plain accepted",
        "structured still usable",
        "simple unknown-flag errno EINVAL",
        "simple df errno EINVAL",
        "simple plain accepted",
        "simple still usable",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
}

/// A heartbeat body for `node` (nothing on it).
fn heartbeat(node: &str) -> Vec<u8> {
    format!(r#"{{"node":"{node}","address":"127.0.0.99","data_port":1,"nbd_port":2,"disk_path":"/tmp","disk_total_bytes":0,"disk_free_bytes":0,"replicas":[],"engines":[]}}"#).into_bytes()
}

#[test]
fn each_node_gets_a_token_of_its_own_that_speaks_for_it_alone() {
    let mut c = Cluster::separate(55, 2);
    let root = c.dir.path().to_owned();
    let own = |i: usize| {
        let p = root.join(format!("node-{}", i + 1)).join("node.token");
        std::fs::read_to_string(&p)
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|t| t.len() == 64)
    };
    // Each node registered with the shared token and was given its own, kept on its disk.
    let t1 = wait_until("node-1's own token", Duration::from_secs(15), || own(0));
    let t2 = wait_until("node-2's own token", Duration::from_secs(15), || own(1));
    let shared = token(&c, "agent.token");
    assert_ne!(t1, t2);
    assert!(t1 != shared && t2 != shared);
    // Both nodes go on working with them (they are ready, and a volume attaches).
    c.wait_nodes_ready(2);
    wait_until(
        "the manager to log that both nodes use their own tokens",
        Duration::from_secs(15),
        || (c.log("manager").matches("uses its own token").count() >= 2).then_some(()),
    );
    let uri = c.create_attached("mine", "16MiB", 2, "node-1");
    qemu_io(
        &uri,
        &["write -P 0x5a 0 1M".into(), "read -P 0x5a 0 1M".into()],
    );

    let (b1, bs) = (format!("Bearer {t1}"), format!("Bearer {shared}"));
    // A node's token speaks for its node only: not as another node, in a heartbeat or a
    // retirement record.
    let (status, said) = http(
        &c,
        "POST",
        "/v1/agent/heartbeat",
        Some(&b1),
        &heartbeat("node-2"),
    );
    assert_eq!(status, 403, "{said}");
    assert!(said.contains("node node-1's token"), "{said}");
    let retire = br#"{"node":"node-2","epoch":1,"retired":[]}"#;
    let (status, said) = http(&c, "POST", "/v1/volumes/mine/retire", Some(&b1), retire);
    assert_eq!(status, 403, "{said}");
    assert!(said.contains("node node-1's token"), "{said}");
    // It is an agent's token: it manages no volume.
    let (status, said) = http(&c, "DELETE", "/v1/volumes/mine", Some(&b1), b"");
    assert_eq!(status, 403, "{said}");
    assert!(said.contains("agent role"), "{said}");
    // The shared token no longer speaks for a node that has its own, and says what to do.
    let (status, said) = http(
        &c,
        "POST",
        "/v1/agent/heartbeat",
        Some(&bs),
        &heartbeat("node-1"),
    );
    assert_eq!(status, 403, "{said}");
    assert!(
        said.contains("token of its own") && said.contains("zebu node delete node-1"),
        "{said}"
    );
    // But it still registers a new node, whose answer carries that node's own token.
    let (status, said) = http(
        &c,
        "POST",
        "/v1/agent/heartbeat",
        Some(&bs),
        &heartbeat("node-9"),
    );
    assert_eq!(status, 200, "{said}");
    let a: serde_json::Value = serde_json::from_str(&said).unwrap();
    let t9 = a["node_token"].as_str().unwrap_or_default().to_owned();
    assert_eq!(t9.len(), 64, "{said}");
    let (status, said) = http(
        &c,
        "POST",
        "/v1/agent/heartbeat",
        Some(&format!("Bearer {t9}")),
        &heartbeat("node-9"),
    );
    assert_eq!(status, 200, "{said}");
    assert!(a.get("node_token").is_some());
    let again: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert!(again.get("node_token").is_none(), "{said}");

    // Nothing was changed by the refusals, and an agent restarted keeps its token.
    c.kill_agent(0);
    c.start_agent(0);
    c.wait_nodes_ready(2);
    assert_eq!(own(0).as_deref(), Some(t1.as_str()));
    let out = wait_until(
        "the volume served again after the restart",
        Duration::from_secs(60),
        || {
            let out = qemu_io_any(&uri, &["read -P 0x5a 0 1M".into()]);
            (!out.contains("can't open")).then_some(out)
        },
    );
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("error"),
        "{out}"
    );
    // And its heartbeats, with its own token, report the engine again.
    wait_until(
        "the volume shown attached again",
        Duration::from_secs(30),
        || (c.volume("mine")["state"] == "attached").then_some(()),
    );
}
