//! Bounded resources (`docs/hardening.md`): what one NBD client can make a node spend is
//! bounded, whatever it does, and other clients are served meanwhile.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A number field of `/proc/PID/status` (`VmRSS` in KiB, `Threads`, ...).
fn status_field(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn rss_bytes(pid: u32) -> u64 {
    status_field(pid, "VmRSS") * 1024
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A raw NBD client past the handshake (fixed newstyle, EXPORT_NAME): the stream.
fn nbd_connect(addr: &str, export: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    s
}

fn read_request(handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(28);
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes()); // READ
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&length.to_be_bytes());
    r
}

/// A fresh client of the volume writes and reads, and finds the 8 MiB of 0x3c written first.
fn another_client_is_served(uri: &str) {
    qemu_io(
        uri,
        &[
            "write -P 0x5d 16M 4M".into(),
            "read -P 0x5d 16M 4M".into(),
            "read -P 0x3c 0 8M".into(),
        ],
    );
}

#[test]
fn a_client_that_never_reads_its_replies_holds_bounded_memory() {
    require("qemu-io");
    let c = Cluster::separate(48, 1);
    let uri = c.create_attached("slow", "256MiB", 1, "node-1");
    qemu_io(&uri, &["write -P 0x3c 0 8M".into()]);
    let pid = c.agents[0].as_ref().unwrap().id();
    let before = rss_bytes(pid);
    // 64 reads of 32 MiB (2 GiB of replies) that are never read: the socket fills, and the
    // server stops taking requests once 32 MiB wait for it (plus the 64 MiB budget of the
    // requests in flight).
    let addr = format!("{}:10809", c.node_ip(0));
    let mut greedy = nbd_connect(&addr, "slow");
    greedy
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for i in 0..64u64 {
        if greedy.write_all(&read_request(i, 0, 32 << 20)).is_err() {
            break; // the server stopped reading: that is the bound at work
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let grown = rss_bytes(pid).saturating_sub(before);
    // Budget (64 MiB) + replies waiting (32 MiB, + one reply of 32 MiB being written) + a
    // constant for the runtime and buffers.
    let bound: u64 = (64 + 32 + 32 + 64) << 20;
    assert!(
        grown < bound,
        "the agent grew by {} MiB for one client that does not read (bound {} MiB)",
        grown >> 20,
        bound >> 20
    );
    // Another client of the same volume is served meanwhile.
    another_client_is_served(&uri);
    drop(greedy);
}

#[test]
fn idle_connections_past_the_limits_are_refused_and_a_fresh_client_still_works() {
    require("qemu-io");
    let c = Cluster::separate_with(49, 1, &["--max-nbd-connections", "300"]);
    let uri = c.create_attached("busy", "64MiB", 1, "node-1");
    let pid = c.agents[0].as_ref().unwrap().id();
    let fds_before = open_fds(pid);
    let addr = format!("{}:10809", c.node_ip(0));
    // 5,000 connections that never negotiate.
    let mut idle = Vec::new();
    for _ in 0..5000 {
        if let Ok(s) = TcpStream::connect(&addr) {
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    // A fresh client is served all the same (the idlest negotiators make room for it).
    qemu_io(
        &uri,
        &["write -P 0x11 0 1M".into(), "read -P 0x11 0 1M".into()],
    );
    // The node's descriptors stay bounded (the limit, plus the node's own).
    let fds = open_fds(pid);
    assert!(
        fds < fds_before + 300 + 16,
        "{fds} descriptors open (before: {fds_before})"
    );
    // Most of the idle connections were closed by the server: a read sees the end.
    let mut closed = 0;
    for s in idle.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut b = [0u8; 64];
        let mut got = 0;
        loop {
            match s.read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(n) => got += n,
                Err(_) => break,
            }
            if got > 18 {
                break;
            }
        }
    }
    assert!(
        closed >= 4900,
        "only {closed} of 5000 idle connections were closed"
    );
    // The refusals show in the node's status and on the volume.
    let nodes = c.cli_json(&["node", "list"]).unwrap();
    let refusing = nodes[0]["nbd_refusing"].as_str().unwrap_or("").to_owned();
    assert!(refusing.contains("negotiating"), "{nodes}");
    let v = c.volume("busy");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("refusing NBD clients"),
        "{v}"
    );
}

#[test]
fn half_open_rest_connections_are_bounded_and_closed_after_their_timeout() {
    let c = Cluster::separate(50, 1);
    let api = c.api.trim_start_matches("http://").to_owned();
    // 1,000 connections that start a request and never finish its headers.
    let mut held = Vec::new();
    for _ in 0..1000 {
        if let Ok(mut s) = TcpStream::connect(&api) {
            let _ = s.write_all(b"GET /v1/volumes HTTP/1.1\r\nHost: zebu\r\n");
            held.push(s);
        }
    }
    // Within the header timeout (5 s) and some slack, every one of them is closed.
    std::thread::sleep(Duration::from_secs(8));
    let mut open = 0;
    for s in held.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut b = [0u8; 256];
        match s.read(&mut b) {
            Ok(_) => {} // the end, or an answer (408) and then the end
            // Still open: nothing to read yet. (A reset is a close: the server closed a
            // socket whose request it had not read.)
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                open += 1
            }
            Err(_) => {}
        }
    }
    assert_eq!(
        open, 0,
        "{open} half-open connections are still open after 8 s"
    );
    // The node never went unready, and the API answers.
    let nodes = c.cli_json(&["node", "list"]).unwrap();
    assert_eq!(nodes[0]["ready"], true, "{nodes}");
    assert!(
        c.log("manager").contains("REST client refused"),
        "past the limit, refused"
    );
}

fn threads(pid: u32) -> usize {
    status_field(pid, "Threads") as usize
}

/// Connections past negotiation that send no request cost their node a socket, and no thread;
/// the replicas' nodes nothing at all. The first request of one gets it served.
#[test]
fn idle_negotiated_connections_cost_no_thread_and_nothing_on_the_replicas_nodes() {
    require("qemu-io");
    let c = Cluster::separate(56, 3);
    let uri = c.create_attached("quiet", "64MiB", 3, "node-1");
    qemu_io(&uri, &["write -P 0x3c 0 1M".into()]);
    let pids: Vec<u32> = (0..3).map(|i| c.agents[i].as_ref().unwrap().id()).collect();
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<(usize, usize)> = pids.iter().map(|&p| (threads(p), open_fds(p))).collect();
    let addr = format!("{}:10809", c.node_ip(0));
    let mut idle: Vec<TcpStream> = (0..200).map(|_| nbd_connect(&addr, "quiet")).collect();
    std::thread::sleep(Duration::from_secs(1));
    let after: Vec<(usize, usize)> = pids.iter().map(|&p| (threads(p), open_fds(p))).collect();
    // The attached node: a socket each (and a few of its own), no thread each.
    assert!(
        after[0].0 < before[0].0 + 10,
        "node-1 threads: {} before, {} with 200 idle connections",
        before[0].0,
        after[0].0
    );
    assert!(
        after[0].1 < before[0].1 + 200 + 16,
        "node-1 fds: {} before, {} with 200 idle connections",
        before[0].1,
        after[0].1
    );
    // The replicas' nodes: no connection (lanes open with the first request).
    for i in 1..3 {
        assert!(
            after[i].0 < before[i].0 + 10 && after[i].1 < before[i].1 + 10,
            "node-{}: threads {} -> {}, fds {} -> {}",
            i + 1,
            before[i].0,
            after[i].0,
            before[i].1,
            after[i].1
        );
    }
    // An idle connection's first request is served, and a fresh client's too.
    let s = &mut idle[17];
    s.write_all(&read_request(7, 0, 4096)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = [0u8; 16 + 4096];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes(), "a simple reply");
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "no error");
    assert_eq!(&reply[8..16], &7u64.to_be_bytes());
    assert!(reply[16..].iter().all(|&b| b == 0x3c), "the data written");
    qemu_io(&uri, &["read -P 0x3c 0 1M".into()]);
}

/// A request whose body stops coming is answered 408 within the request deadline (10 s), its
/// connection is freed, and nothing is changed.
#[test]
fn a_request_whose_body_never_comes_gets_408_and_changes_nothing() {
    let c = Cluster::separate(57, 1);
    let api = c.api.trim_start_matches("http://").to_owned();
    let admin = std::fs::read_to_string(c.dir.path().join("manager").join("admin.token")).unwrap();
    let body = br#"{"name":"late","size_bytes":16777216}"#;
    let mut s = TcpStream::connect(&api).unwrap();
    let head = format!(
        "POST /v1/volumes HTTP/1.1\r\nHost: zebu\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        admin.trim(),
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body[..10]).unwrap();
    let started = std::time::Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("nothing was changed"), "{resp}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered after {:?}",
        started.elapsed()
    );
    // The rest of the body, sent late, creates nothing.
    let _ = s.write_all(&body[10..]);
    let v = c.cli_json(&["volume", "list"]).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 0, "{v}");
}

/// A client that sends requests and never reads the answers is cut off once a response has
/// made no progress for the write timeout (10 s): it cannot hold a connection, its buffers
/// and its task for ever. Other clients are served meanwhile.
#[test]
fn a_rest_client_that_never_reads_its_responses_is_cut_off() {
    let c = Cluster::separate(59, 1);
    let api = c.api.trim_start_matches("http://").to_owned();
    let admin = std::fs::read_to_string(c.dir.path().join("manager").join("admin.token")).unwrap();
    let request = format!(
        "GET /v1/nodes HTTP/1.1\r\nHost: zebu\r\nAuthorization: Bearer {}\r\n\r\n",
        admin.trim()
    );
    // Many requests in a row (pipelined), answers never read: the answers fill both
    // sockets' buffers, then the server's write waits on a client that will not read.
    let batch = request.repeat(200);
    let mut s = TcpStream::connect(&api).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut cut_off = None;
    while started.elapsed() < Duration::from_secs(40) {
        match s.write_all(batch.as_bytes()) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // The server stopped reading (it is stuck writing to us): a fresh client
                // is still served.
                let nodes = c.cli_json(&["node", "list"]).unwrap();
                assert_eq!(nodes[0]["ready"], true, "{nodes}");
            }
            Err(e) => {
                cut_off = Some((started.elapsed(), e));
                break;
            }
        }
    }
    let (after, how) = cut_off.expect("the server still held the connection after 40 s");
    assert!(
        after < Duration::from_secs(30),
        "cut off only after {after:?} ({how})"
    );
    let nodes = c.cli_json(&["node", "list"]).unwrap();
    assert_eq!(nodes[0]["ready"], true, "{nodes}");
}

/// A volume's own connection limit turning a client away shows on that volume, not on the
/// other volumes of its node (a limit of the whole node shows on all of them: see
/// `idle_connections_past_the_limits_are_refused_and_a_fresh_client_still_works`).
#[test]
fn a_volumes_connection_limit_shows_on_that_volume_only() {
    require("qemu-io");
    let c = Cluster::separate_with(60, 1, &["--max-nbd-connections-per-volume", "2"]);
    let full_uri = c.create_attached("full", "16MiB", 1, "node-1");
    let other_uri = c.create_attached("other", "16MiB", 1, "node-1");
    let addr = format!("{}:10809", c.node_ip(0));
    let _held: Vec<TcpStream> = (0..2).map(|_| nbd_connect(&addr, "full")).collect();
    // A third client of `full` is refused (qemu-io cannot open it); `other` is served.
    let refused = run(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read 0 4k",
        &full_uri,
    ]));
    assert!(
        !refused.status.success(),
        "a third client of full was served"
    );
    qemu_io(&other_uri, &["write -P 0x21 0 4k".into()]);
    let msg = |name: &str| c.volume(name)["message"].as_str().unwrap_or("").to_owned();
    let shown = wait_until(
        "full's refusal in its message",
        Duration::from_secs(20),
        || {
            let m = msg("full");
            m.contains("refusing NBD clients").then_some(m)
        },
    );
    assert!(shown.contains("limit of 2 connections"), "{shown}");
    assert!(
        !msg("other").contains("refusing"),
        "other shows full's refusal: {}",
        msg("other")
    );
    let nodes = c.cli_json(&["node", "list"]).unwrap();
    assert!(nodes[0]["nbd_refusing"].is_null(), "{nodes}");
    assert!(
        nodes[0]["nbd_refusing_volumes"]["full"].is_string(),
        "{nodes}"
    );
}

/// Many clients that never read their replies hold no more than the node's memory budget
/// together (`--max-nbd-memory`), and each is disconnected once its socket has taken none of
/// its replies for the send timeout: then a fresh client is served again.
#[test]
fn clients_that_never_read_hold_at_most_the_nodes_memory_budget_and_are_let_go() {
    require("qemu-io");
    let c = Cluster::separate_with(
        61,
        1,
        &["--max-nbd-memory", "160MiB", "--nbd-send-timeout", "5"],
    );
    let uri = c.create_attached("greedy", "256MiB", 1, "node-1");
    qemu_io(&uri, &["write -P 0x3c 0 8M".into()]);
    let pid = c.agents[0].as_ref().unwrap().id();
    let before = rss_bytes(pid);
    let addr = format!("{}:10809", c.node_ip(0));
    // Six clients, each with 64 reads of 32 MiB it never reads: alone, each could hold
    // ~96 MiB (its own bounds); together they may hold the node's 160 MiB.
    let mut greedy = Vec::new();
    for _ in 0..6 {
        let mut s = nbd_connect(&addr, "greedy");
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        for i in 0..64u64 {
            if s.write_all(&read_request(i, 0, 32 << 20)).is_err() {
                break;
            }
        }
        greedy.push(s);
    }
    std::thread::sleep(Duration::from_secs(3));
    let grown = rss_bytes(pid).saturating_sub(before);
    // The budget, one reply being copied into its queue, and a constant.
    let bound: u64 = (160 + 32 + 64) << 20;
    assert!(
        grown < bound,
        "the agent grew by {} MiB for six clients that do not read (bound {} MiB)",
        grown >> 20,
        bound >> 20
    );
    // Past the send timeout they are let go, and a fresh client is served.
    wait_until(
        "the clients that do not read to be disconnected",
        Duration::from_secs(30),
        || {
            c.log("node-1")
                .contains("has taken none of its replies for 5 s")
                .then_some(())
        },
    );
    another_client_is_served(&uri);
    drop(greedy);
}

/// A connection that has been busy and then goes idle gives its thread back, and its node's
/// replicas elsewhere their connections; its next request is served as before.
#[test]
fn busy_connections_gone_idle_give_their_threads_back() {
    require("qemu-io");
    let c = Cluster::separate_with(62, 3, &["--nbd-idle-release", "2"]);
    let uri = c.create_attached("naps", "64MiB", 3, "node-1");
    qemu_io(&uri, &["write -P 0x3c 0 1M".into()]);
    let pids: Vec<u32> = (0..3).map(|i| c.agents[i].as_ref().unwrap().id()).collect();
    std::thread::sleep(Duration::from_secs(3));
    let counts =
        || -> Vec<(usize, usize)> { pids.iter().map(|&p| (threads(p), open_fds(p))).collect() };
    let before = counts();
    let addr = format!("{}:10809", c.node_ip(0));
    let mut conns: Vec<TcpStream> = (0..20).map(|_| nbd_connect(&addr, "naps")).collect();
    let ask = |s: &mut TcpStream, handle: u64| {
        s.write_all(&read_request(handle, 0, 4096)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reply = [0u8; 16 + 4096];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "no error");
        assert_eq!(&reply[8..16], &handle.to_be_bytes());
        assert!(reply[16..].iter().all(|&b| b == 0x3c), "the data written");
    };
    for (i, s) in conns.iter_mut().enumerate() {
        ask(s, i as u64);
    }
    let busy = counts();
    assert!(
        busy[0].0 >= before[0].0 + 20,
        "node-1 threads: {} before, {} with 20 busy connections",
        before[0].0,
        busy[0].0
    );
    // Past the idle time, the threads are back, and the replicas' nodes hold no lane.
    let settled = wait_until(
        "the idle connections' threads to end",
        Duration::from_secs(30),
        || {
            let now = counts();
            (now[0].0 < before[0].0 + 5).then_some(now)
        },
    );
    for i in 1..3 {
        assert!(
            settled[i].1 < before[i].1 + 5,
            "node-{}: fds {} before, {} busy, {} idle",
            i + 1,
            before[i].1,
            busy[i].1,
            settled[i].1
        );
    }
    // Their next requests are served as before, twice (the second on the new thread).
    for (i, s) in conns.iter_mut().enumerate() {
        ask(s, 100 + i as u64);
        ask(s, 200 + i as u64);
    }
    qemu_io(
        &uri,
        &["write -P 0x3c 1M 1M".into(), "read -P 0x3c 0 2M".into()],
    );
}
