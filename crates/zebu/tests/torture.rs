//! Must-hold 10 of the healing issue: randomized faults with a checker of every acknowledged
//! write. A 4-node cluster (real processes) serves a 3-replica volume while a writer writes
//! 64 KiB slots and records what each write's answer says, and a fault thread, at random, for
//! random lengths: kills -9 an agent or the manager (restarted later), cuts a node's replica
//! traffic off (a partition, through a proxy of our own in front of every node's data port) or
//! delays it, and fills node-1's disk (a small loop-mounted ext4). Then every fault is undone;
//! the volume must come back healthy with no CLI action; a few bits are flipped in the engine's
//! local replica (bit rot, found and mended by the reads); and the whole volume is read back:
//! every 4 KiB block holds the content of a write acknowledged last there (or of one whose
//! answer was an error, as it may or may not have landed), nothing reads EIO, and every replica
//! exported offline is identical.
//!
//! `ZEBU_TORTURE_TRIALS` (default 3) trials run on the same cluster, `ZEBU_TORTURE_SEED` picks
//! the randomness (printed, so a failure can be replayed); `scripts/torture` runs hundreds.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: usize = 4;
const SLOT: u64 = 64 * 1024;
const SLOTS: u64 = 512; // 32 MiB written, in a 64 MiB volume
const BLOCK: u64 = 4096;
const PROXY_PORT: u16 = 10701;

/// The fault proxies in front of every node's data port.
struct Proxies {
    children: Vec<Child>,
    controls: Vec<PathBuf>,
}
impl Proxies {
    fn start(c: &Cluster) -> Proxies {
        let mut p = Proxies {
            children: Vec::new(),
            controls: Vec::new(),
        };
        for i in 0..NODES {
            let ip = c.node_ip(i);
            let control = c.dir.path().join(format!("proxy-{}.mode", i + 1));
            std::fs::write(&control, "pass").unwrap();
            let child = Command::new(ZEBU)
                .args(["fault-proxy", "--listen"])
                .arg(format!("{ip}:{PROXY_PORT}"))
                .arg("--to")
                .arg(format!("{ip}:10700"))
                .arg("--control")
                .arg(&control)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting zebu fault-proxy");
            p.children.push(child);
            p.controls.push(control);
        }
        p
    }
    fn set(&self, node: usize, mode: &str) {
        std::fs::write(&self.controls[node], mode).unwrap();
    }
}
impl Drop for Proxies {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What each 4 KiB block of the written area may hold: the pattern of the last write
/// acknowledged there, and those of writes since whose answer was an error (0: never written).
type Possible = Vec<BTreeSet<u8>>;

/// One qemu-io run of `writes` (slot, pattern) and a flush; records the answers in `possible`.
/// With `power_cuts`, an acknowledged write is held only once the flush after it is
/// acknowledged too (until then a power cut may drop it).
fn write_batch(
    uri: &str,
    writes: &[(u64, u8)],
    possible: &Mutex<Possible>,
    counts: &Mutex<(u64, u64)>,
    power_cuts: bool,
) {
    // A batch stuck behind a fault ends after a minute; its unanswered writes count as errors.
    let mut cmd = Command::new("timeout");
    cmd.args(["60", "qemu-io", "-f", "raw"]);
    for (slot, p) in writes {
        cmd.args(["-c", &format!("write -P {p} {} {SLOT}", slot * SLOT)]);
    }
    cmd.args(["-c", "flush"]).arg(uri);
    let o = run(&mut cmd);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    if out.contains("can't open device") {
        counts.lock().unwrap().1 += writes.len() as u64;
        return; // nothing was sent
    }
    let answers: Vec<bool> = out
        .lines()
        .filter_map(|l| {
            if l.starts_with("wrote ") {
                Some(true)
            } else if l.starts_with("write failed") {
                Some(false)
            } else {
                None
            }
        })
        .collect();
    // qemu-io prints nothing for a flush that succeeds: it ran to its end, every command
    // answered and succeeded (its exit status), and no flush failure was printed.
    let flushed = o.status.success()
        && answers.len() == writes.len()
        && answers.iter().all(|a| *a)
        && !out.contains("flush failed");
    let mut answers = answers.into_iter();
    let mut pos = possible.lock().unwrap();
    // What each block holds after the batch if it all stays (and nothing is lost).
    let mut after: std::collections::HashMap<usize, BTreeSet<u8>> = Default::default();
    for (slot, p) in writes {
        let acknowledged = answers.next().unwrap_or(false);
        let mut n = counts.lock().unwrap();
        if acknowledged {
            n.0 += 1;
        } else {
            n.1 += 1;
        }
        drop(n);
        for b in blocks_of(*slot) {
            let now = after.entry(b).or_insert_with(|| pos[b].clone());
            if acknowledged {
                // From now on the block holds this, or what a later write put there.
                *now = BTreeSet::from([*p]);
            } else {
                // An error: it may or may not have landed (on some blocks of it or all).
                now.insert(*p);
            }
        }
    }
    for (b, now) in after {
        if !power_cuts || flushed {
            pos[b] = now;
        } else {
            // Not flushed: a power cut may leave the block as it was, or as any write here.
            pos[b].extend(now);
        }
    }
}

fn blocks_of(slot: u64) -> std::ops::Range<usize> {
    let per = (SLOT / BLOCK) as usize;
    slot as usize * per..(slot as usize + 1) * per
}

#[derive(Debug)]
enum Fault {
    KillAgent(usize),
    KillManager,
    Cut(usize),
    Delay(usize, u64),
    DiskFull,
}

#[test]
fn randomized_faults_lose_no_acknowledged_write() {
    torture(37, &[], false);
}

/// The same trials as power cuts: every agent's replica files go through the crash-simulating
/// file layer, so a kill -9 drops what was not flushed (some of it written out early, whole or
/// torn). The checker then holds a write only once a flush after it was acknowledged.
#[test]
fn randomized_faults_with_power_cuts_lose_no_flushed_write() {
    torture(40, &["--file-layer", "crash-sim"], true);
}

fn torture(net: u8, agent_args: &[&str], power_cuts: bool) {
    for t in ["qemu-io", "nbdcopy", "nbdinfo", "mkfs.ext4", "fallocate"] {
        require(t);
    }
    let trials: u64 = std::env::var("ZEBU_TORTURE_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("ZEBU_TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("torture (power cuts: {power_cuts}): {trials} trials, ZEBU_TORTURE_SEED={seed}");
    let port = PROXY_PORT.to_string();
    let mut args = vec!["--advertise-data-port", port.as_str()];
    args.extend_from_slice(agent_args);
    let mut c = Cluster::separate_with(net, 0, &args);
    let disk = SmallDisk::mount(&c.dir.path().join("node-1"), 256);
    let proxies = Proxies::start(&c);
    for i in 0..NODES {
        c.agents.push(None);
        c.start_agent(i);
    }
    c.wait_nodes_ready(NODES);
    c.cli_ok(&[
        "setting",
        "set",
        "replica-replenishment-wait-interval",
        "10",
    ]);
    let uri = c.create_attached("t", "64MiB", 3, "node-1");
    let possible: Arc<Mutex<Possible>> = Arc::new(Mutex::new(vec![
        BTreeSet::from([0u8]);
        (SLOTS * SLOT / BLOCK) as usize
    ]));
    let mut rng = Lcg(seed);
    let mut pattern = 0u8;
    for trial in 0..trials {
        let faults_on = Arc::new(AtomicBool::new(true));
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let answers: Arc<Mutex<(u64, u64)>> = Arc::default();
        // The writer: batches of 8 slot writes and a flush, for 8 s.
        let writer = {
            let (uri, possible, on) = (uri.clone(), possible.clone(), faults_on.clone());
            let counts = answers.clone();
            let mut wr = Lcg(rng.next(u64::MAX));
            let first = pattern;
            std::thread::spawn(move || {
                let mut p = first;
                while on.load(Ordering::SeqCst) {
                    let writes: Vec<(u64, u8)> = (0..8)
                        .map(|_| {
                            p = p % 250 + 1;
                            (wr.next(SLOTS), p)
                        })
                        .collect();
                    write_batch(&uri, &writes, &possible, &counts, power_cuts);
                }
                p
            })
        };
        // The faults, one after another, for 8 s; each undone after a random time.
        let started = Instant::now();
        let mut down: Vec<(Instant, Fault)> = Vec::new();
        while started.elapsed() < Duration::from_secs(8) {
            std::thread::sleep(Duration::from_millis(300 + rng.next(700)));
            let fault = match rng.next(6) {
                0 | 1 => Fault::KillAgent(rng.next(NODES as u64) as usize),
                2 => Fault::KillManager,
                3 => Fault::Cut(rng.next(NODES as u64) as usize),
                4 => Fault::Delay(rng.next(NODES as u64) as usize, 20 + rng.next(200)),
                _ => Fault::DiskFull,
            };
            match &fault {
                Fault::KillAgent(i) => c.kill_agent(*i),
                Fault::KillManager => {
                    if let Some(mut m) = c.manager.take() {
                        let _ = m.kill();
                        let _ = m.wait();
                    }
                }
                Fault::Cut(i) => proxies.set(*i, "cut"),
                Fault::Delay(i, ms) => proxies.set(*i, &format!("delay {ms}")),
                Fault::DiskFull => {
                    disk.fill(1 << 20);
                }
            }
            log.lock()
                .unwrap()
                .push(format!("{:?} at {:?}", fault, started.elapsed()));
            down.push((
                Instant::now() + Duration::from_millis(500 + rng.next(3000)),
                fault,
            ));
            // Undo the faults that are due.
            let now = Instant::now();
            let (due, rest): (Vec<_>, Vec<_>) = down.into_iter().partition(|(t, _)| *t <= now);
            down = rest;
            for (_, f) in due {
                undo(&mut c, &proxies, &disk, &f);
            }
        }
        faults_on.store(false, Ordering::SeqCst);
        pattern = writer.join().unwrap();
        for (_, f) in down {
            undo(&mut c, &proxies, &disk, &f);
        }
        // Everything is back: the volume heals with no CLI action.
        let deadline = Instant::now() + Duration::from_secs(120);
        let v = loop {
            let v = c.cli_json(&["volume", "get", "t"]).unwrap_or_default();
            // The manager's view of a node restarted a moment ago may be from before the restart
            // (it learns of the restart by the next heartbeat): the export must answer too.
            let serving = || {
                v["nbd_uri"].as_str().is_some_and(|u| {
                    std::process::Command::new("nbdinfo")
                        .arg(u)
                        .output()
                        .is_ok_and(|o| o.status.success())
                })
            };
            if v["robustness"] == "healthy" && v["state"] == "attached" && serving() {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "trial {trial} (ZEBU_TORTURE_SEED={seed}): not healthy by itself after 120 s: {v}\nfaults: {:?}\n--- manager\n{}\n--- node-1\n{}",
                log.lock().unwrap(),
                tail(&c.log("manager"), 20),
                tail(&c.log("node-1"), 20)
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        assert_eq!(
            v["nbd_uri"].as_str(),
            Some(uri.as_str()),
            "the volume moved: {v}"
        );
        // Bit rot in the engine's local replica: the reads below meet it and mend it.
        let local = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node"] == "node-1" && r["mode"] == "RW")
            .cloned();
        if let Some(r) = local {
            let dir = c.replica_dir(0, r["name"].as_str().unwrap());
            for _ in 0..3 {
                flip_a_written_byte(&dir, &mut rng);
            }
        }
        // Every block holds what the writer's answers allow; nothing reads EIO.
        let img = c.dir.path().join("check.img");
        let _ = std::fs::remove_file(&img);
        sh(&format!("nbdcopy {uri} {}", img.display()));
        let data = std::fs::read(&img).unwrap();
        let mut pos = possible.lock().unwrap();
        for (b, allowed) in pos.iter_mut().enumerate() {
            let block = &data[b * BLOCK as usize..(b + 1) * BLOCK as usize];
            let found = block[0];
            assert!(
                block.iter().all(|x| *x == found) && allowed.contains(&found),
                "trial {trial} (ZEBU_TORTURE_SEED={seed}): block {b} (offset {}) holds {:?}..., allowed {allowed:?}; faults: {:?}",
                b as u64 * BLOCK,
                &block[..8],
                log.lock().unwrap()
            );
            *allowed = BTreeSet::from([found]);
        }
        drop(pos);
        // The mends of the flipped bits (and any resync) made durable, so the replicas' files
        // read offline hold them (with power cuts simulated, unflushed writes live only in the
        // agents' memory).
        qemu_io(&uri, &["flush".into()]);
        assert_rw_replicas_identical(&c, "t");
        let (acked, failed) = *answers.lock().unwrap();
        eprintln!(
            "torture trial {trial}: ok; {acked} writes acknowledged, {failed} failed or unanswered; faults: {:?}",
            log.lock().unwrap()
        );
    }
}

fn undo(c: &mut Cluster, proxies: &Proxies, disk: &SmallDisk, f: &Fault) {
    match f {
        Fault::KillAgent(i) => {
            if c.agents[*i].is_none() {
                c.start_agent(*i);
            }
        }
        Fault::KillManager => {
            if c.manager.is_none() {
                c.start_manager();
            }
        }
        Fault::Cut(i) | Fault::Delay(i, _) => proxies.set(*i, "pass"),
        Fault::DiskFull => disk.free(),
    }
}

/// Flip one bit of a block the writer wrote, in a replica's head data file.
fn flip_a_written_byte(dir: &Path, rng: &mut Lcg) {
    use std::os::unix::fs::FileExt;
    let Some(data) = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "data"))
    else {
        return;
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data)
        .unwrap();
    let at = rng.next(SLOTS * SLOT);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 1 << rng.next(8);
    f.write_all_at(&b, at).unwrap();
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
