//! Helpers for end-to-end tests: real `zebu` processes on loopback addresses, real clients.
//!
//! Each test picks its own `net` number; its processes listen on 127.0.<net>.x so tests can
//! run in parallel. Every process is killed when the test's `Cluster` is dropped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ZEBU: &str = env!("CARGO_BIN_EXE_zebu");

/// Fail with a clear message when a tool the test needs is missing.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success());
    assert!(
        matches!(found, Ok(true)),
        "{tool} is not installed: run ./scripts/test, which installs the test tools"
    );
}

/// Run a command, returning its output; panics if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Run a shell command line and require success; returns stdout.
pub fn sh(line: &str) -> String {
    let o = run(Command::new("bash").arg("-c").arg(line));
    assert!(
        o.status.success(),
        "command failed: {line}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub net: u8,
    pub api: String,
    pub manager: Option<Child>,
    pub agents: Vec<Option<Child>>,
    pub up: Option<Child>,
    pub token: String,
    /// Extra arguments for every `zebu agent`.
    pub agent_args: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test shows what its processes said last: CI keeps nothing else.
        if std::thread::panicking() {
            self.print_log_tails(60);
        }
        let all = self
            .agents
            .iter_mut()
            .flatten()
            .chain(self.manager.iter_mut())
            .chain(self.up.iter_mut());
        for c in all {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(
        std::fs::File::create(dir.join(format!("{name}.log"))).expect("creating a log file"),
    )
}

impl Cluster {
    /// The last `lines` lines of every process's log, to stderr (shown with a failing test).
    pub fn print_log_tails(&self, lines: usize) {
        let Ok(dir) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        let mut logs: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            eprintln!("----- last {} lines of {} -----", tail.len(), p.display());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }

    pub fn node_ip(&self, i: usize) -> String {
        format!("127.0.{}.{}", self.net, i + 2)
    }

    /// A manager and `nodes` agents, each its own process.
    pub fn separate(net: u8, nodes: usize) -> Cluster {
        Cluster::separate_with(net, nodes, &[])
    }

    /// [`Cluster::separate`], with extra arguments for every agent.
    pub fn separate_with(net: u8, nodes: usize, agent_args: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("zebu-test-")
            .tempdir()
            .expect("tempdir");
        let api = format!("http://127.0.{net}.1:9500");
        let mut c = Cluster {
            dir,
            net,
            api,
            manager: None,
            agents: Vec::new(),
            up: None,
            token: String::new(),
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
        };
        c.start_manager();
        for i in 0..nodes {
            c.agents.push(None);
            c.start_agent(i);
        }
        c.wait_nodes_ready(nodes);
        c
    }

    pub fn start_manager(&mut self) {
        self.start_manager_with(&[]);
    }

    /// The manager's command line, with extra arguments.
    pub fn manager_command(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(ZEBU);
        c.args(["manager", "--data-dir"])
            .arg(self.dir.path().join("manager"))
            .args(["--listen", &format!("127.0.{}.1:9500", self.net)])
            .args(extra);
        c
    }

    pub fn start_manager_with(&mut self, extra: &[&str]) {
        let mdir = self.dir.path().join("manager");
        let child = self
            .manager_command(extra)
            .stdout(log_file(self.dir.path(), "manager.out"))
            .stderr(log_file(self.dir.path(), "manager"))
            .spawn()
            .expect("starting zebu manager");
        self.manager = Some(child);
        let token_path = mdir.join("admin.token");
        self.token = wait_until("the admin token", Duration::from_secs(20), || {
            std::fs::read_to_string(&token_path)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        });
    }

    pub fn start_agent(&mut self, i: usize) {
        let name = format!("node-{}", i + 1);
        let child =
            Command::new(ZEBU)
                .args([
                    "agent",
                    "--manager",
                    &self.api,
                    "--node",
                    &name,
                    "--data-dir",
                ])
                .arg(self.dir.path().join(&name))
                .args(["--listen", &self.node_ip(i), "--token", &self.agent_token()])
                // `{data}` in an extra argument: this agent's data directory.
                .args(self.agent_args.iter().map(|a| {
                    a.replace("{data}", &self.dir.path().join(&name).display().to_string())
                }))
                .stdout(log_file(self.dir.path(), &format!("{name}.out")))
                .stderr(log_file(self.dir.path(), &name))
                .spawn()
                .expect("starting zebu agent");
        self.agents[i] = Some(child);
    }

    /// The manager's token for agents.
    pub fn agent_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("manager/agent.token"))
            .expect("the agent token")
            .trim()
            .to_owned()
    }

    /// SIGKILL one agent.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            c.kill().expect("kill -9 agent");
            c.wait().expect("reaping agent");
        }
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.agents.len() {
            self.kill_agent(i);
        }
        if let Some(mut m) = self.manager.take() {
            m.kill().expect("kill -9 manager");
            m.wait().expect("reaping manager");
        }
    }

    pub fn wait_nodes_ready(&self, n: usize) {
        wait_until(&format!("{n} ready nodes"), Duration::from_secs(30), || {
            let v = self.cli_json(&["node", "list"]).ok()?;
            let ready = v
                .as_array()?
                .iter()
                .filter(|n| n["ready"] == Value::Bool(true))
                .count();
            (ready >= n).then_some(())
        });
    }

    /// One REST request (HTTP/1.1 over a new TCP connection, as a script would send it):
    /// the status code and the body. For loops too long for a process per call.
    pub fn rest(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let host = self.api.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(host).expect("connecting to the manager");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.token,
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        (code, body)
    }

    /// Resident memory of agent `i`, in KiB.
    pub fn agent_rss_kib(&self, i: usize) -> u64 {
        let pid = self.agents[i].as_ref().expect("the agent runs").id();
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Run the CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(Command::new(ZEBU)
            .args(args)
            .env("ZEBU_API", &self.api)
            .env("ZEBU_TOKEN", &self.token))
    }

    /// Run the CLI and require success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "zebu {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn cli_json(&self, args: &[&str]) -> Result<Value, String> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let o = self.cli(&a);
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
    }

    pub fn volume(&self, name: &str) -> Value {
        self.cli_json(&["volume", "get", name]).expect("volume get")
    }

    /// Create and attach a volume; returns its NBD URI.
    pub fn create_attached(&self, name: &str, size: &str, replicas: u32, node: &str) -> String {
        self.cli_ok(&[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--replicas",
            &replicas.to_string(),
        ]);
        let uri = self
            .cli_ok(&["volume", "attach", name, "--node", node])
            .trim()
            .to_owned();
        assert!(
            uri.starts_with("nbd://") || uri.starts_with("nbds://"),
            "attach printed {uri:?}"
        );
        uri
    }

    /// Directory of a replica on its node.
    pub fn replica_dir(&self, node_index: usize, replica: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("node-{}", node_index + 1))
            .join("replicas")
            .join(replica)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

/// qemu-io's output, whatever it says (for callers that look at failures themselves).
pub fn qemu_io_any(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = run(c.arg(uri));
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// qemu-io command output; panics unless every read matched and nothing failed.
pub fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let o = run(&mut c);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "qemu-io failed: {out}");
    assert!(
        !out.contains("Pattern verification failed"),
        "qemu-io pattern mismatch:\n{out}"
    );
    assert!(
        !out.to_lowercase().contains("error"),
        "qemu-io reported an error:\n{out}"
    );
    out
}

/// The replica in `dir` as a raw image, read offline by `zebu replica export`, which verifies
/// every block's checksum.
pub fn export_verified(c: &Cluster, dir: &Path) -> Vec<u8> {
    let out = c.dir.path().join("export.img");
    let o = run(Command::new(ZEBU)
        .args(["replica", "export", "--dir"])
        .arg(dir)
        .arg(&out));
    assert!(
        o.status.success(),
        "export of {}: {}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let img = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    img
}

/// Index (0-based) of the node a replica in a volume's JSON lives on (`node-N`).
pub fn node_index(replica: &Value) -> usize {
    let n: usize = replica["node"]
        .as_str()
        .unwrap()
        .trim_start_matches("node-")
        .parse()
        .unwrap();
    n - 1
}

/// fio's random writes to `uri`, run in the cluster's directory; the caller adds the rest.
fn fio_randwrite(c: &Cluster, uri: &str) -> Command {
    let mut cmd = Command::new("fio");
    cmd.current_dir(c.dir.path()).args([
        "--name=w".to_owned(),
        "--ioengine=nbd".to_owned(),
        format!("--uri={uri}"),
        "--rw=randwrite".to_owned(),
    ]);
    cmd
}

/// A 4 KiB random writer on `uri` for up to 60 s that never flushes (writes in flight when
/// something is killed), with `extra` fio options; its output is discarded.
pub fn fio_writer(c: &Cluster, uri: &str, extra: &[&str]) -> std::process::Child {
    fio_randwrite(c, uri)
        .args(["--bs=4k", "--time_based", "--runtime=60"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A verifying fio write workload on `uri` (its output goes to DIR/fio.out; fio keeps its verify
/// state in its working directory, the cluster's).
pub fn fio_verify(c: &Cluster, uri: &str, size: &str, rate: &str) -> std::process::Child {
    fio_randwrite(c, uri)
        .args([
            "--bs=16k",
            &format!("--size={size}"),
            "--iodepth=16",
            &format!("--rate={rate}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ])
        .stdout(std::process::Stdio::from(
            std::fs::File::create(c.dir.path().join("fio.out")).unwrap(),
        ))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting fio")
}

pub fn fio_ok(c: &Cluster, fio: std::process::Child) {
    let out = fio.wait_with_output().unwrap();
    let log = std::fs::read_to_string(c.dir.path().join("fio.out")).unwrap_or_default();
    assert!(
        out.status.success(),
        "fio saw an error:\n{log}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("err= 0"), "fio reported errors:\n{log}");
}

/// A node holding a replica of the volume (its JSON), other than those in `not`.
pub fn replica_node_but(v: &Value, not: &[&str]) -> String {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_owned())
        .find(|n| !not.contains(&n.as_str()))
        .expect("a replica on another node")
}

/// The replica of a volume's JSON on `node`.
pub fn replica_on(v: &Value, node: &str) -> Option<Value> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == node)
        .cloned()
}

/// Every RW replica of `volume`, exported offline (checksums verified), is the same image.
pub fn assert_rw_replicas_identical(c: &Cluster, volume: &str) {
    let v = c.volume(volume);
    let mut images: Vec<(String, Vec<u8>)> = Vec::new();
    for r in v["replicas"].as_array().unwrap() {
        if r["mode"] != "RW" {
            continue;
        }
        let dir = c.replica_dir(node_index(r), r["name"].as_str().unwrap());
        images.push((
            r["name"].as_str().unwrap().to_owned(),
            export_verified(c, &dir),
        ));
    }
    assert!(images.len() >= 2, "{v}");
    for (name, img) in &images[1..] {
        assert!(
            img == &images[0].1,
            "replica {name} differs from {}",
            images[0].0
        );
    }
}

/// A small deterministic random source (no dependency), seeded per run and printed.
pub struct Lcg(pub u64);
impl Lcg {
    /// A number below `n` (0 when `n` is 0).
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// A small ext4 (through a loop device) mounted at a node's data directory before its agent
/// starts; lazily unmounted when dropped (after the test's processes are gone or going).
pub struct SmallDisk {
    pub dir: PathBuf,
}

impl SmallDisk {
    pub fn mount(dir: &Path, mib: u64) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let img = dir.with_extension("img");
        sh(&format!(
            "truncate -s {mib}M {i} && mkfs.ext4 -F -q {i} && mount -o loop {i} {d}",
            i = img.display(),
            d = dir.display()
        ));
        SmallDisk {
            dir: dir.to_owned(),
        }
    }

    pub fn avail(&self) -> u64 {
        sh(&format!(
            "df -B1 --output=avail {} | tail -1",
            self.dir.display()
        ))
        .trim()
        .parse()
        .unwrap()
    }

    /// Fill the disk but `leave` bytes with a file that [`SmallDisk::free`] removes; false if
    /// it could not (it is that full already, or space went meanwhile).
    pub fn fill(&self, leave: u64) -> bool {
        let n = self.avail().saturating_sub(leave);
        n > 0
            && run(Command::new("fallocate")
                .args(["-l", &n.to_string()])
                .arg(self.dir.join("filler")))
            .status
            .success()
    }

    pub fn free(&self) {
        sh(&format!("rm -f {}/filler && sync", self.dir.display()));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
