//! The engine: one per attached volume. It replicates every write synchronously to all replicas
//! in the set and reads from one.
//!
//! Membership rules (the heart of promise 1 in PRODUCT.md):
//! * At start the engine connects to every replica it was given. Replicas it cannot reach, or
//!   whose generation is below the highest one seen, are stale: they start in `ERR`. The rest
//!   become `RW`, and their generation is raised to `max + 1` before any I/O is served, so that
//!   every replica left out now carries a lower generation than every replica that goes on.
//! * A replica that fails a request (error, timeout, broken connection) is retired to `ERR`.
//!   Before the request that saw the failure is acknowledged, the surviving replicas' generation
//!   is raised and made durable. A stale replica can therefore never later pass for the freshest.
//! * Overlapping writes are serialized by a block-range lock, so all replicas apply them in the
//!   same order; disjoint ones run concurrently.
//! * Reads go to one RW replica, the local one first, else round-robin. A replica whose stored
//!   data fails its checksum does not fail the read: the next replica is asked.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use thiserror::Error;
use tokio::sync::watch;
use zebu_proto::data::{self, MapExtent, Op, Status, FLAG_FUA};

use crate::backend::{Backend, LocalReplica};
use crate::client::{Call, ClientError, ReplicaClient};
use crate::range_lock::RangeLock;

mod clone_fill;
mod grow;
mod intents;
mod rebuild;
mod record;
pub mod snapshots;
mod tree_copy;
pub use clone_fill::{CloneProgress, CloneSource};
pub use rebuild::{RebuildDone, RebuildProgress};
pub use record::{MembershipRecord, RecordError, Retired, Survivors};

/// Replica modes, as Longhorn names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// In sync: takes writes and serves reads.
    Rw = 0,
    /// Rebuilding: takes writes, serves no reads.
    Wo = 1,
    /// Failed: out of the set.
    Err = 2,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::Rw,
            1 => Mode::Wo,
            _ => Mode::Err,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Rw => "RW",
            Mode::Wo => "WO",
            Mode::Err => "ERR",
        }
    }
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(
        "volume {volume}: range {offset}+{length} is outside the volume of {size_bytes} bytes"
    )]
    OutOfRange {
        volume: String,
        offset: u64,
        length: u64,
        size_bytes: u64,
    },
    #[error("volume {volume} has no healthy replica left ({detail})")]
    NoReplicas { volume: String, detail: String },
    #[error("volume {volume}: request rejected: {source}")]
    Invalid {
        volume: String,
        #[source]
        source: ClientError,
    },
    #[error("volume {volume}: the data at {offset}+{length} is damaged on every replica that holds it ({detail}); write those blocks anew to use them again")]
    Damaged {
        volume: String,
        offset: u64,
        length: u64,
        detail: String,
    },
    #[error("volume {volume} cannot start: {reason}")]
    Start { volume: String, reason: String },
    #[error("volume {volume} is no longer served by this engine: {reason}")]
    Closed { volume: String, reason: String },
    #[error("volume {volume}: rebuild stopped: {reason}")]
    Rebuild { volume: String, reason: String },
    #[error("volume {volume}: no space left for the write at {offset}+{length} on any replica in sync ({detail}); nothing was written: free space on their disks")]
    NoSpace {
        volume: String,
        offset: u64,
        length: u64,
        detail: String,
    },
    #[error("volume {volume}: {message}")]
    Snapshot {
        volume: String,
        kind: SnapshotRefusal,
        message: String,
    },
}

/// Why a snapshot operation was refused (see `engine/snapshots.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotRefusal {
    /// The name is taken.
    Exists,
    /// No snapshot has that name.
    NotFound,
    /// Not now (a rebuild runs); try again later.
    Busy,
    /// No member in sync took it.
    Failed,
}

/// Where to find one replica of the volume.
#[derive(Debug, Clone)]
pub struct ReplicaTarget {
    pub name: String,
    /// `ip:port` of the replica's data server.
    pub address: String,
    /// The replica lives on the engine's own node (preferred for reads).
    pub local: bool,
    /// The replica itself, when it is served by this process: reached without the network.
    pub in_process: Option<LocalReplica>,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub volume: String,
    pub size_bytes: u64,
    pub replicas: Vec<ReplicaTarget>,
    pub secret: String,
    /// Speak the data protocol over TLS (`zebu agent --data-tls`).
    pub data_tls: bool,
    /// A replica that does not answer within this time is retired.
    pub io_timeout: Duration,
    /// How long start-up keeps retrying replicas that do not answer yet.
    pub connect_patience: Duration,
    /// Refuse to start unless every replica given is reachable, but those in `may_leave_out`
    /// (an agent's engine: the manager says which, and the engine records them retired before
    /// it serves).
    pub require_all: bool,
    pub may_leave_out: Vec<String>,
    /// Refuse to start if the freshest reachable replica's generation is below this.
    pub min_generation: u64,
    /// The set starts above this generation even if every member is lower: the highest any
    /// replica of the volume was seen at, so that a replica left out (after a salvage chose
    /// another) is always older than the set and can be rebuilt from it.
    pub generation_floor: u64,
    /// The fence: issued by the manager for this attachment (persisted there first). Every
    /// replica records it before it answers, and refuses every engine of a lower epoch from then
    /// on; an engine whose epoch is below a replica's is refused at once.
    pub epoch: u64,
    /// How many replicas the volume should have (0: as many as `replicas`). With fewer in the
    /// set, the write-intent log keeps what changed for the ones away (see `engine/intents.rs`).
    pub replica_count: usize,
    /// Where members that leave the set are recorded before it counts (see `engine/record.rs`);
    /// none: a standalone engine.
    pub recorder: Option<Arc<dyn MembershipRecord>>,
    /// The volume's acknowledged snapshots (the manager's records): at start, a member's
    /// snapshot not among them is deleted (one a crash cut short). `None`: those not every
    /// member holds are deleted.
    pub snapshots: Option<Vec<String>>,
    /// The volume is a clone whose copy is not recorded done: reads of what is not copied yet
    /// go to this snapshot of another volume, and a background copy fills it
    /// (`engine/clone_fill.rs`).
    pub clone: Option<CloneSource>,
}

/// Status of one replica as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub name: String,
    pub mode: Mode,
    /// Why the replica left the set (empty while RW).
    pub error: String,
    /// While WO: how far its rebuild is.
    pub rebuild: Option<RebuildProgress>,
    /// ERR because its disk is full.
    pub no_space: bool,
}

struct Member {
    /// Unique in the engine, never reused: the member's slot in a [`Lanes`].
    index: usize,
    name: String,
    address: String,
    local: bool,
    client: Option<Backend>,
    mode: AtomicU8,
    error: Mutex<String>,
    /// While WO: how far its rebuild is.
    progress: Mutex<Option<RebuildProgress>>,
    /// It left the set from RW (or was given as a member and left out at start) and that is not
    /// recorded yet (see `engine/record.rs`).
    unrecorded: std::sync::atomic::AtomicBool,
    /// It left the set because its disk is full (it refused a write the others took).
    no_space: std::sync::atomic::AtomicBool,
}

impl Member {
    fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }
    fn client(&self) -> &Backend {
        self.client
            .as_ref()
            .expect("invariant: only members with a connection are ever RW or WO")
    }
}

pub struct Engine {
    volume: String,
    /// The size served: raised by [`Engine::resize`] once every member has grown; never lowered.
    size_bytes: AtomicU64,
    block_size: u64,
    io_timeout: Duration,
    /// Cluster secret, for the extra connections of [`Lanes`].
    secret: String,
    /// Connect over TLS (see [`EngineConfig::data_tls`]).
    data_tls: bool,
    /// The fence this engine holds on every replica (see [`EngineConfig::epoch`]).
    epoch: u64,
    /// Replaced whole (copy on write, under `membership`) when a member joins; read without
    /// waiting on anything but a short lock.
    members: std::sync::RwLock<Arc<Vec<Arc<Member>>>>,
    generation: AtomicU64,
    /// Serializes retirements (and the generation bumps that make them durable).
    membership: tokio::sync::Mutex<()>,
    ranges: RangeLock,
    next_read: AtomicUsize,
    changes: watch::Sender<u64>,
    /// Retirements whose generation bump is not durable yet. While non-zero, a request that
    /// succeeded waits for `membership` before it is acknowledged: it may have skipped a member
    /// that was just retired, and must not be acknowledged before the survivors are marked newer.
    retiring: AtomicUsize,
    /// Why the engine stopped serving (detached, or fenced off by a newer engine); None while it
    /// serves.
    closed: watch::Sender<Option<String>>,
    /// Every request holds it shared; `shutdown` takes it exclusively to drain them.
    inflight: tokio::sync::RwLock<()>,
    /// A replica answered `Stale`: a newer engine owns the volume (see `settled`).
    fenced_off: std::sync::atomic::AtomicBool,
    /// The next member's `index`: never reused, so a [`Lanes`]' slot names one member only.
    next_index: AtomicUsize,
    /// Hot extents of the write-intent log (see `engine/intents.rs`).
    intents: intents::Intents,
    /// What changed while a rebuild target was away (see `engine/rebuild.rs`).
    resumes: rebuild::Resumes,
    /// Rebuilds copying snapshots now (`engine/tree_copy.rs`): none is taken or deleted.
    tree_copies: AtomicUsize,
    /// Replicas a rebuild is filling now: one rebuild per target at a time.
    rebuilding: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Members the volume should have (see [`EngineConfig::replica_count`]).
    replica_count: usize,
    recorder: Option<Arc<dyn MembershipRecord>>,
    /// Some member's retirement is not recorded yet: mutations wait in `settled`.
    unrecorded: std::sync::atomic::AtomicBool,
    /// A clone's copy from its source snapshot (see `engine/clone_fill.rs`).
    fill: Option<clone_fill::Fill>,
}

/// The connections a request uses, by member index: a [`Lanes`]' own, or none (empty); a
/// member without one is reached over the engine's shared connection.
type Via<'a> = &'a [OnceLock<Backend>];

fn backend<'a>(m: &'a Member, via: Via<'a>) -> &'a Backend {
    match via.get(m.index).and_then(OnceLock::get) {
        Some(b) => b,
        None => m.client(),
    }
}

/// The requests that write `good` (whole blocks from `offset`) over a damaged copy: runs of
/// zero blocks as WRITE_ZEROES, so blocks that are holes on the source (the neighbours of a
/// damaged block, mostly) do not become allocated data on the copy; the rest as writes.
fn copy_calls(good: &Bytes, offset: u64, block_size: usize) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut run: Option<(usize, bool)> = None;
    let blocks = good.len() / block_size;
    for i in 0..=blocks {
        let zero = (i < blocks).then(|| {
            good[i * block_size..(i + 1) * block_size]
                .iter()
                .all(|&b| b == 0)
        });
        match (run, zero) {
            (Some((_, z)), Some(zero)) if z == zero => continue,
            (Some((start, z)), _) => {
                let (from, to) = (start * block_size, i * block_size);
                let at = offset + from as u64;
                let len = (to - from) as u32;
                calls.push(if z {
                    Call::new(Op::WriteZeroes, at, len)
                } else {
                    Call {
                        op: Op::Write,
                        flags: 0,
                        offset: at,
                        length: len,
                        payload: Some(good.slice(from..to)),
                        payload_crc: None,
                    }
                });
            }
            (None, _) => {}
        }
        run = zero.map(|z| (i, z));
    }
    calls
}

/// What one [`Engine::scrub`] pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    /// Bytes of the volume covered so far.
    pub scanned_bytes: u64,
    /// Bytes read from all replicas together (holes are skipped).
    pub read_bytes: u64,
    /// Pieces (1 MiB) in which damaged copies were rewritten from a clean one.
    pub mended: u64,
    /// Pieces with a damaged copy that could not be mended (no clean copy, or a failed write).
    pub unmended: u64,
    /// Pieces where two copies with valid checksums differ (reported, left as they are).
    pub differing: u64,
}

/// Why [`Engine::mend`] did not mend a member.
enum NotMended {
    /// The member missed the write: retire it.
    Failed(String),
    /// A newer engine owns the volume.
    Fenced(EngineError),
}

/// The replica found a stored block that fails its checksum.
pub(super) fn is_damage(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Failed {
            status: Status::Checksum,
            ..
        }
    )
}

/// A mutation's extents stay suspect (resynced before they settle) unless it completed, or no
/// member in sync changed anything: refused everywhere for lack of space.
fn settle_intent(
    r: Result<(), EngineError>,
    intent: intents::InFlight<'_>,
) -> Result<(), EngineError> {
    if matches!(r, Ok(()) | Err(EngineError::NoSpace { .. })) {
        intent.complete();
    }
    r
}

/// The member refused the request for lack of disk space, with nothing changed.
fn is_no_space(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Failed {
            status: Status::NoSpace,
            ..
        }
    )
}

fn is_stale(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Failed {
            status: Status::Stale,
            ..
        }
    )
}

/// Decrements the pending-retirement count when a retirement ends (however it ends).
struct RetiringGuard<'a>(&'a AtomicUsize);

impl Drop for RetiringGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How often the engine checks that every member on another node answers, with or without
/// client I/O, so a dead replica of an idle volume leaves the set (and shows) within seconds.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// Flush (or a FUA write) may wait on a slow disk far longer than a normal request.
fn flush_timeout(io: Duration) -> Duration {
    io.max(Duration::from_secs(60))
}

impl Engine {
    /// Connect to the replicas and decide the set. Fails when no replica is usable.
    pub async fn start(cfg: EngineConfig) -> Result<Arc<Engine>, EngineError> {
        let start_err = |reason: String| EngineError::Start {
            volume: cfg.volume.clone(),
            reason,
        };
        if cfg.replicas.is_empty() {
            return Err(start_err("no replicas were given".into()));
        }
        let connects = cfg.replicas.iter().map(|t| async {
            if let Some(l) = &t.in_process {
                return l.open(cfg.epoch).await.map(Backend::Local);
            }
            let deadline = tokio::time::Instant::now() + cfg.connect_patience;
            loop {
                let r = ReplicaClient::connect(
                    &t.address,
                    &cfg.volume,
                    &t.name,
                    cfg.epoch,
                    &cfg.secret,
                    cfg.data_tls,
                    cfg.io_timeout,
                )
                .await;
                match r {
                    Ok(c) => return Ok(Backend::Remote(c)),
                    // Refusals are final (wrong secret, unknown replica); unreachable may pass.
                    Err(e @ ClientError::Refused { .. }) => return Err(e),
                    Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        // Fence first, evidence after: a replica sends its Welcome (with its generation) only
        // once it has durably accepted this engine's epoch, so no older engine can move that
        // generation any more.
        let results: Vec<Result<Backend, ClientError>> = join_all(connects).await;
        // A replica smaller than the volume missed an expansion (the volume was detached, or
        // the engine stopped while it grew): it grows now, under this engine's fence, before
        // any evidence is weighed (a growth changes no block and no generation).
        let grows = results.iter().zip(&cfg.replicas).map(|(r, t)| async {
            let c = r.as_ref().ok()?;
            let (name, size) = (&t.name, c.opened().size_bytes);
            if size >= cfg.size_bytes {
                return Some(size);
            }
            let call = Call::new(Op::Resize, cfg.size_bytes, 0);
            match c.call(call, flush_timeout(cfg.io_timeout)).await {
                Ok(_) => {
                    tracing::info!(volume = %cfg.volume, replica = %name, "grown from {size} to the volume's {} bytes", cfg.size_bytes);
                    Some(cfg.size_bytes)
                }
                Err(e) => {
                    tracing::warn!(volume = %cfg.volume, replica = %name, "growing it from {size} to the volume's {} bytes failed: {e}", cfg.size_bytes);
                    Some(size)
                }
            }
        });
        let sizes: Vec<Option<u64>> = join_all(grows).await;
        let results: Vec<Result<(Backend, u64, u64), ClientError>> = results
            .into_iter()
            .zip(sizes)
            .map(|(r, size)| {
                r.map(|c| {
                    let g = c.opened().generation;
                    (c, g, size.unwrap_or(0))
                })
            })
            .collect();
        let mut block_size = 0u64;
        let max_gen = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter(|(_, _, size)| *size == cfg.size_bytes)
            .map(|(_, g, _)| *g)
            .max();
        let mut members = Vec::new();
        let mut unreachable = Vec::new();
        for (index, (t, r)) in cfg.replicas.iter().zip(results).enumerate() {
            let (client, mode, error) = match r {
                // It did not grow (its disk refused, or it failed meanwhile): as one out of
                // reach, it may hold writes the others lack, so the start waits for it.
                Ok((_, _, size)) if size < cfg.size_bytes => {
                    let e = format!(
                        "replica {} has {size} bytes and could not grow to the volume's {} (see the agent's log)",
                        t.name, cfg.size_bytes
                    );
                    if !cfg.may_leave_out.contains(&t.name) {
                        unreachable.push(e.clone());
                    }
                    (None, Mode::Err, e)
                }
                Ok((_, _, size)) if size != cfg.size_bytes => {
                    let e = format!(
                        "replica {} has size {size} but the volume has size {}: it is not a copy of this volume",
                        t.name, cfg.size_bytes
                    );
                    (None, Mode::Err, e)
                }
                Ok((_, g, _)) if Some(g) != max_gen => {
                    let e = format!(
                        "replica {} is stale: generation {} is below the freshest replica's {}",
                        t.name,
                        g,
                        max_gen.unwrap_or(0)
                    );
                    (None, Mode::Err, e)
                }
                Ok((c, _, _)) => {
                    block_size = block_size.max(c.opened().block_size as u64);
                    (Some(c), Mode::Rw, String::new())
                }
                Err(e) => {
                    if !cfg.may_leave_out.contains(&t.name) {
                        unreachable.push(e.to_string());
                    }
                    (None, Mode::Err, e.to_string())
                }
            };
            if mode == Mode::Err {
                tracing::warn!(volume = %cfg.volume, "{error}");
            }
            members.push(Arc::new(Member {
                index,
                name: t.name.clone(),
                address: t.address.clone(),
                local: t.local,
                client,
                mode: AtomicU8::new(mode as u8),
                error: Mutex::new(error),
                progress: Mutex::new(None),
                // Given as a member and left out: the manager must know before this serves.
                unrecorded: std::sync::atomic::AtomicBool::new(mode == Mode::Err),
                no_space: std::sync::atomic::AtomicBool::new(false),
            }));
        }
        if cfg.require_all && !unreachable.is_empty() {
            return Err(start_err(format!(
                "{}; a replica out of reach may hold writes the others lack, so the volume waits for it",
                unreachable.join("; ")
            )));
        }
        if let Some(g) = max_gen.filter(|g| *g < cfg.min_generation) {
            return Err(start_err(format!(
                "the freshest reachable replica has generation {g}, but generation {} was seen before: a fresher replica is missing, refusing to serve older data",
                cfg.min_generation
            )));
        }
        let Some(max_gen) = max_gen else {
            let detail: Vec<String> = members
                .iter()
                .map(|m| m.error.lock().unwrap_or_else(|p| p.into_inner()).clone())
                .collect();
            return Err(start_err(format!(
                "no replica is reachable: {}",
                detail.join("; ")
            )));
        };
        let (changes, _) = watch::channel(0);
        let engine = Arc::new(Engine {
            volume: cfg.volume.clone(),
            size_bytes: AtomicU64::new(cfg.size_bytes),
            block_size: block_size.max(512),
            io_timeout: cfg.io_timeout,
            secret: cfg.secret.clone(),
            data_tls: cfg.data_tls,
            epoch: cfg.epoch,
            members: std::sync::RwLock::new(Arc::new(members)),
            generation: AtomicU64::new(max_gen.max(cfg.generation_floor)),
            membership: tokio::sync::Mutex::new(()),
            ranges: RangeLock::default(),
            next_read: AtomicUsize::new(0),
            changes,
            retiring: AtomicUsize::new(0),
            closed: watch::channel(None).0,
            inflight: tokio::sync::RwLock::new(()),
            fenced_off: std::sync::atomic::AtomicBool::new(false),
            next_index: AtomicUsize::new(cfg.replicas.len()),
            intents: intents::Intents::default(),
            resumes: rebuild::Resumes::default(),
            tree_copies: AtomicUsize::new(0),
            rebuilding: Default::default(),
            replica_count: if cfg.replica_count == 0 {
                cfg.replicas.len()
            } else {
                cfg.replica_count
            },
            recorder: cfg.recorder.clone(),
            unrecorded: std::sync::atomic::AtomicBool::new(true),
            fill: cfg
                .clone
                .clone()
                .map(|c| clone_fill::Fill::new(c, cfg.size_bytes, block_size.max(512))),
        });
        let committed = cfg.snapshots.clone();
        // Every replica left out now must be older than every replica in the set.
        {
            let _m = engine.membership.lock().await;
            engine.bump_generation().await;
        }
        if engine.in_sync().is_empty() {
            return Err(start_err(
                "every reachable replica failed while raising its generation".into(),
            ));
        }
        // Members left out (unreachable, stale, failed while raising the generation) are
        // recorded before the first request: the manager must not start from them later.
        {
            let _m = engine.membership.lock().await;
            engine
                .record_retirements(Some(cfg.connect_patience.max(Duration::from_secs(5))))
                .await?;
        }
        // Whatever a crash left in flight is made identical before the first request.
        let resynced = engine
            .resync(cfg.generation_floor > max_gen)
            .await
            .map_err(|e| start_err(format!("resyncing after an unclean stop: {e}")))?;
        if resynced > 0 {
            tracing::info!(volume = %engine.volume, extents = resynced, "resync done: the replicas are identical");
        }
        // Every member holds the same snapshots before the first request.
        engine
            .reconcile_snapshots(committed.as_deref())
            .await
            .map_err(|e| start_err(format!("making the members' snapshots agree: {e}")))?;
        // A clone: what its replicas hold already, before the first read decides by it.
        engine.load_fill_map().await?;
        if engine.fill.is_some() {
            tokio::spawn(engine.clone().run_fill());
        }

        tracing::info!(volume = %engine.volume, generation = engine.generation(), "engine started");
        tokio::spawn(keepalive(Arc::downgrade(&engine)));
        Ok(engine)
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// PING every member on another node; retire those whose connection broke or that do not
    /// answer within the I/O timeout (see [`KEEPALIVE_INTERVAL`]), exactly as a failed write
    /// would — but never the last member in sync: with no client request failing, keeping it
    /// costs nothing, and a write that meets a dead member retires it anyway.
    async fn ping_members(&self) {
        let Ok(_serving) = self.enter().await else {
            return;
        };
        let set: Vec<Arc<Member>> = self
            .in_sync()
            .into_iter()
            .filter(|m| matches!(m.client, Some(Backend::Remote(_))))
            .collect();
        let results = join_all(
            set.iter()
                .map(|m| m.client().call(Call::new(Op::Ping, 0, 0), self.io_timeout)),
        )
        .await;
        let failed: Vec<(Arc<Member>, String)> = set
            .iter()
            .zip(results)
            .filter_map(|(m, r)| {
                r.err()
                    .map(|e| (m.clone(), format!("it stopped answering keepalives: {e}")))
            })
            .collect();
        if failed.is_empty() {
            return;
        }
        let left = self
            .in_sync()
            .iter()
            .filter(|m| m.mode() == Mode::Rw && !failed.iter().any(|(f, _)| Arc::ptr_eq(f, m)))
            .count();
        if left == 0 {
            let why: Vec<&str> = failed.iter().map(|(_, w)| w.as_str()).collect();
            tracing::warn!(volume = %self.volume, "no member answers keepalives ({}); none is retired, as none would be left", why.join("; "));
            return;
        }
        self.retire(&failed).await;
    }
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }
    pub fn block_size(&self) -> u64 {
        self.block_size
    }
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A receiver that changes whenever a replica changes mode.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn members(&self) -> Vec<MemberStatus> {
        self.all()
            .iter()
            .map(|m| MemberStatus {
                name: m.name.clone(),
                mode: m.mode(),
                error: m.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                rebuild: m
                    .progress
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .filter(|_| m.mode() == Mode::Wo),
                no_space: m.no_space.load(Ordering::Acquire),
            })
            .collect()
    }

    /// Every member, in order (their `index`).
    fn all(&self) -> Arc<Vec<Arc<Member>>> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Members that take writes (RW and WO).
    fn in_sync(&self) -> Vec<Arc<Member>> {
        self.all()
            .iter()
            .filter(|m| matches!(m.mode(), Mode::Rw | Mode::Wo))
            .cloned()
            .collect()
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), EngineError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size_bytes() => Ok(()),
            _ => Err(EngineError::OutOfRange {
                volume: self.volume.clone(),
                offset,
                length,
                size_bytes: self.size_bytes(),
            }),
        }
    }

    fn no_replicas(&self) -> EngineError {
        let detail: Vec<String> = self
            .all()
            .iter()
            .map(|m| {
                format!(
                    "{}: {}",
                    m.name,
                    m.error.lock().unwrap_or_else(|p| p.into_inner())
                )
            })
            .collect();
        EngineError::NoReplicas {
            volume: self.volume.clone(),
            detail: detail.join("; "),
        }
    }

    /// Raise the generation of every RW member to `generation + 1`, retiring members that
    /// fail, until a round succeeds on all remaining ones. Caller holds `membership`. A
    /// rebuilding (WO) member is left at its lower generation until it is complete, so that a
    /// crash mid-rebuild leaves it stale, never passing for a full copy.
    async fn bump_generation(&self) {
        loop {
            let set: Vec<Arc<Member>> = self
                .in_sync()
                .into_iter()
                .filter(|m| m.mode() == Mode::Rw)
                .collect();
            if set.is_empty() {
                return;
            }
            let next = self.generation() + 1;
            let t = flush_timeout(self.io_timeout);
            let results = join_all(
                set.iter()
                    .map(|m| m.client().call(Call::new(Op::SetGeneration, next, 0), t)),
            )
            .await;
            let mut failed = false;
            for (m, r) in set.iter().zip(results) {
                match r {
                    Ok(_) => {}
                    Err(e) if is_stale(&e) => {
                        self.fenced(&e);
                        return;
                    }
                    Err(e) => {
                        self.mark_err(m, &e.to_string());
                        failed = true;
                    }
                }
            }
            self.generation.store(next, Ordering::Release);
            if !failed {
                return;
            }
            // A member that failed may still have stored `next`; go one higher without it.
        }
    }

    fn mark_err(&self, m: &Member, reason: &str) {
        let was = m.mode();
        if was != Mode::Err {
            tracing::warn!(volume = %self.volume, replica = %m.name, "replica leaves the set: {reason}");
            *m.error.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_owned();
            if was == Mode::Wo {
                // Before the mode: every write it misses is in an extent hot now or marked
                // from now on.
                self.resumes.left(&m.name, || self.intents.snapshot());
            }
            if was == Mode::Rw {
                // Before the mode: a request that sees it ERR also sees a record pending.
                m.unrecorded.store(true, Ordering::Release);
                self.unrecorded.store(true, Ordering::Release);
            }
            m.mode.store(Mode::Err as u8, Ordering::Release);
            self.changes.send_modify(|v| *v += 1);
        }
    }

    /// Retire the failed members durably (see module docs), then return.
    async fn retire(&self, failed: &[(Arc<Member>, String)]) {
        // Counted before any member is marked ERR, so a request that already skips the member
        // also sees that a retirement is pending (see `settled`).
        self.retiring.fetch_add(1, Ordering::SeqCst);
        let _done = RetiringGuard(&self.retiring);
        let _m = self.membership.lock().await;
        let mut any = false;
        for (m, reason) in failed {
            if m.mode() != Mode::Err {
                self.mark_err(m, reason);
                any = true;
            }
        }
        // If another request retired them already, it also bumped the generation while holding
        // `membership`, which this request has now waited for.
        if any {
            self.bump_generation().await;
        }
        // Before any write that skipped them is acknowledged (`settled` waits for this).
        let _ = self.record_retirements(None).await;
    }

    /// Send one mutating request to every in-sync member and settle failures.
    async fn replicate(
        &self,
        via: Via<'_>,
        call: Call,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        let mut set = self.in_sync();
        // Remote members first: their requests are on the wire before an in-process member
        // runs its own on this thread (see `backend`), so the copies proceed in parallel.
        set.sort_by_key(|m| matches!(m.client, Some(Backend::Local(_))));
        if set.is_empty() {
            return Err(self.no_replicas());
        }
        let remotes = set
            .iter()
            .filter(|m| matches!(backend(m, via), Backend::Remote(_)))
            .count();
        let call = if remotes > 1 {
            call.with_payload_crc()
        } else {
            call
        };
        let results = join_all(
            set.iter()
                .map(|m| backend(m, via).call(call.clone(), timeout)),
        )
        .await;
        let mut failed = Vec::new();
        let mut invalid = None;
        let mut damaged = Vec::new();
        let mut full = Vec::new();
        let (mut took, mut took_rw) = (false, false);
        for (m, r) in set.iter().zip(&results) {
            match r {
                Ok(_) => {
                    took = true;
                    took_rw |= m.mode() == Mode::Rw;
                }
                Err(e) if is_stale(e) => return Err(self.fenced(e)),
                Err(e) if e.is_invalid_request() => invalid = Some(e.clone()),
                // Its disk is full: it refused with nothing changed (see "A full disk" in
                // docs/healing.md). Retired below only if another member took the request.
                Err(e) if is_no_space(e) => full.push((m.clone(), e.to_string())),
                // The member met a damaged block it had to merge a partial write into, and
                // applied nothing: mended below, not retired.
                Err(e) if is_damage(e) => damaged.push((m.clone(), e.to_string())),
                Err(e) => failed.push((m.clone(), e.to_string())),
            }
        }
        // Edge blocks are mended from RW members only: those are the copies that are read.
        if took_rw {
            for (m, _) in std::mem::take(&mut damaged) {
                match self.mend(via, &m, &call, timeout).await {
                    Ok(()) => {}
                    Err(NotMended::Failed(why)) => failed.push((m, why)),
                    Err(NotMended::Fenced(e)) => return Err(e),
                }
            }
        } else if !damaged.is_empty() {
            // The request fails, so a rebuilding member that applied it is now ahead of the rest.
            for (m, _) in set.iter().zip(&results).filter(|(_, r)| r.is_ok()) {
                let why = "it applied a write that every in-sync replica refused".to_owned();
                failed.push((m.clone(), why));
            }
        }
        // A rebuilding member that is full leaves the set whatever the others did: only
        // members in sync speak for the volume's answer.
        let (full_wo, full): (Vec<_>, Vec<_>) =
            full.into_iter().partition(|(m, _)| m.mode() == Mode::Wo);
        for (m, why) in full_wo {
            m.no_space.store(true, Ordering::Release);
            failed.push((m, format!("its disk is full: {why}")));
        }
        let mut no_space = None;
        if took_rw {
            // The others took it: a full member missed a write and leaves the set.
            for (m, why) in full {
                if m.mode() != Mode::Err {
                    m.no_space.store(true, Ordering::Release);
                }
                failed.push((m, format!("its disk is full: {why}")));
            }
        } else if !full.is_empty() {
            // No copy in sync took it: the write fails with ENOSPC and nobody is retired for
            // it, but a rebuilding member that applied it is now ahead of the rest.
            for (m, _) in set.iter().zip(&results).filter(|(_, r)| r.is_ok()) {
                let why = "it applied a write that every in-sync replica refused".to_owned();
                failed.push((m.clone(), why));
            }
            no_space = Some(
                full.iter()
                    .map(|(_, why)| why.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        // Retire failed members first, even when another member called the request invalid:
        // a member that failed may have missed a write the others applied.
        if !failed.is_empty() {
            self.retire(&failed).await;
        }
        if let Some(source) = invalid {
            return Err(EngineError::Invalid {
                volume: self.volume.clone(),
                source,
            });
        }
        // No member took it, and some found the blocks damaged: the request fails (nothing was
        // written anywhere), and they stay in the set, as their other blocks are sound.
        if let Some((_, e)) = damaged.into_iter().next() {
            return Err(self.damaged(call.offset, call.length.into(), e));
        }
        if let Some(detail) = no_space {
            return Err(EngineError::NoSpace {
                volume: self.volume.clone(),
                offset: call.offset,
                length: call.length.into(),
                detail,
            });
        }
        // Success needs an RW member that took the request and is still RW (every RW member
        // left in `set` now holds it: those that missed it were retired above). A rebuilding
        // (WO) member alone never makes a write acknowledged: it is no copy to read or start
        // from, and holding a write the set lost it leaves the set too.
        if !took || !set.iter().any(|m| m.mode() == Mode::Rw) {
            for m in set.iter().filter(|m| m.mode() == Mode::Wo) {
                self.mark_err(m, "it took a write that no replica in sync kept");
            }
            return Err(self.no_replicas());
        }
        self.settled().await
    }

    /// `m` refused a mutation (holding the range lock) because a partial block at its edge
    /// failed its checksum, while other members applied it: copy those edge blocks over from a
    /// clean copy, then send `m` the request again. Taking an edge block from before or after
    /// the request makes no difference: merging the request into either gives the same block.
    async fn mend(
        &self,
        via: Via<'_>,
        m: &Arc<Member>,
        call: &Call,
        timeout: Duration,
    ) -> Result<(), NotMended> {
        let bs = self.block_size;
        let (s, e) = self.block_range(call.offset, call.length.into());
        let mut edges = Vec::new();
        if !call.offset.is_multiple_of(bs) {
            edges.push(s);
        }
        if !(call.offset + u64::from(call.length)).is_multiple_of(bs) && !edges.contains(&(e - bs))
        {
            edges.push(e - bs);
        }
        for b in edges {
            if !self
                .copy_over(via, b, b + bs, vec![m.clone()])
                .await
                .map_err(NotMended::Fenced)?
            {
                return Err(NotMended::Failed(format!(
                    "a damaged block at offset {b} could not be mended, so it missed a write"
                )));
            }
        }
        match backend(m, via).call(call.clone(), timeout).await {
            Ok(_) => Ok(()),
            Err(e) if is_stale(&e) => Err(NotMended::Fenced(self.fenced(&e))),
            Err(e) => Err(NotMended::Failed(format!(
                "a write after mending a damaged block: {e}"
            ))),
        }
    }

    fn damaged(&self, offset: u64, length: u64, detail: String) -> EngineError {
        EngineError::Damaged {
            volume: self.volume.clone(),
            offset,
            length,
            detail,
        }
    }

    /// Wait until no retirement is pending (see `retiring`). Fails if the engine was fenced
    /// meanwhile: a retirement whose generation bump a newer engine refused is not durable, so
    /// a request that skipped the retired member must not be acknowledged.
    async fn settled(&self) -> Result<(), EngineError> {
        if self.retiring.load(Ordering::SeqCst) > 0 {
            drop(self.membership.lock().await);
        }
        self.await_records().await?;
        if !self.fenced_off.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(EngineError::Closed {
            volume: self.volume.clone(),
            reason: self.closed_reason().unwrap_or_default(),
        })
    }

    /// A retirement whose handling was cut short (its request was cancelled, perhaps before the
    /// survivors' generation was raised) is finished here: the generation raised again (one
    /// more step costs nothing) and the record made, before a request is answered.
    async fn await_records(&self) -> Result<(), EngineError> {
        if !self.unrecorded.load(Ordering::Acquire) {
            return Ok(());
        }
        let _m = self.membership.lock().await;
        if !self.unrecorded.load(Ordering::Acquire) {
            return Ok(());
        }
        if self
            .all()
            .iter()
            .any(|m| m.unrecorded.load(Ordering::Acquire))
        {
            self.bump_generation().await;
        }
        self.record_retirements(None).await
    }

    /// A replica answered `Stale`: a newer engine owns the volume. Stop serving it.
    fn fenced(&self, e: &ClientError) -> EngineError {
        let reason = format!("fenced off: {e}");
        self.fenced_off.store(true, Ordering::Release);
        self.close(reason.clone());
        EngineError::Closed {
            volume: self.volume.clone(),
            reason,
        }
    }

    fn close(&self, reason: String) {
        let mut first = false;
        self.closed.send_if_modified(|c| {
            first = c.is_none();
            if first {
                *c = Some(reason.clone());
            }
            first
        });
        if first {
            tracing::warn!(volume = %self.volume, "engine stops serving: {reason}");
            self.changes.send_modify(|v| *v += 1);
        }
    }

    /// Why the engine no longer serves, if it does not.
    pub fn closed_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    /// Resolves once the engine no longer serves (for frontends to drop their connections).
    pub async fn wait_closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| c.is_some()).await;
    }

    /// Enter a request: fails once the engine is closed.
    async fn enter(&self) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, EngineError> {
        let g = self.inflight.read().await;
        if let Some(reason) = self.closed_reason() {
            return Err(EngineError::Closed {
                volume: self.volume.clone(),
                reason,
            });
        }
        Ok(g)
    }

    /// Stop serving (detach): new requests fail, requests in flight finish, then every replica
    /// is flushed once more.
    pub async fn shutdown(&self, reason: &str) -> Result<(), EngineError> {
        let _all = self.inflight.write().await;
        if self.closed_reason().is_some() {
            return Ok(());
        }
        self.close(reason.to_owned());
        self.flush_entered(&[]).await?;
        // A clean stop leaves nothing to resync.
        self.settle_intents(true).await;
        Ok(())
    }

    fn block_range(&self, offset: u64, length: u64) -> (u64, u64) {
        let bs = self.block_size;
        (offset / bs * bs, (offset + length).div_ceil(bs) * bs)
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        self.write_via(&[], offset, data, fua).await
    }

    async fn write_via(
        &self,
        via: Via<'_>,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), EngineError> {
        let _in = self.enter().await?;
        self.write_entered(via, offset, data, fua).await
    }

    async fn write_entered(
        &self,
        via: Via<'_>,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), EngineError> {
        self.check_range(offset, data.len() as u64)?;
        if data.len() > data::MAX_PAYLOAD_BYTES as usize {
            return Err(EngineError::OutOfRange {
                volume: self.volume.clone(),
                offset,
                length: data.len() as u64,
                size_bytes: self.size_bytes(),
            });
        }
        if data.is_empty() {
            return if fua {
                self.flush_entered(via).await
            } else {
                Ok(())
            };
        }
        let (s, e) = self.block_range(offset, data.len() as u64);
        let intent = self.intend(via, s, e - s).await?;
        let _g = self.ranges.lock(s, e).await;
        let (flags, t) = if fua {
            (FLAG_FUA, flush_timeout(self.io_timeout))
        } else {
            (0, self.io_timeout)
        };
        if let Some(f) = self.fill_writing() {
            let r = self.write_filling(via, f, offset, data, flags, t).await;
            return settle_intent(r, intent);
        }
        let len = data.len() as u32;
        let call = Call {
            op: Op::Write,
            flags,
            offset,
            length: len,
            payload: Some(data),
            payload_crc: None,
        };
        settle_intent(self.replicate(via, call, t).await, intent)
    }

    /// TRIM and WRITE_ZEROES: the range reads back as zeroes afterwards.
    pub async fn zero(
        &self,
        offset: u64,
        length: u64,
        trim: bool,
        fua: bool,
    ) -> Result<(), EngineError> {
        self.zero_via(&[], offset, length, trim, fua).await
    }

    async fn zero_via(
        &self,
        via: Via<'_>,
        offset: u64,
        length: u64,
        trim: bool,
        fua: bool,
    ) -> Result<(), EngineError> {
        let _in = self.enter().await?;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        if self.fill_writing().is_some() {
            return self.zero_filling(via, offset, length, fua).await;
        }
        let (s, e) = self.block_range(offset, length);
        let _g = self.ranges.lock(s, e).await;
        let (flags, t) = if fua {
            (FLAG_FUA, flush_timeout(self.io_timeout))
        } else {
            (0, self.io_timeout)
        };
        let op = if trim { Op::Trim } else { Op::WriteZeroes };
        // The protocol's length field is 32 bits: split huge ranges.
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = (end - at).min(1 << 30) as u32;
            let call = Call {
                op,
                flags,
                offset: at,
                length: n,
                payload: None,
                payload_crc: None,
            };
            let (bs, be) = self.block_range(at, n as u64);
            let intent = self.intend(via, bs, be - bs).await?;
            settle_intent(self.replicate(via, call, t).await, intent)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Make every acknowledged write durable on every in-sync replica.
    pub async fn flush(&self) -> Result<(), EngineError> {
        self.flush_via(&[]).await
    }

    async fn flush_via(&self, via: Via<'_>) -> Result<(), EngineError> {
        let _in = self.enter().await?;
        self.flush_entered(via).await
    }

    async fn flush_entered(&self, via: Via<'_>) -> Result<(), EngineError> {
        self.replicate(
            via,
            Call::new(Op::Flush, 0, 0),
            flush_timeout(self.io_timeout),
        )
        .await
    }

    /// Members to read from, in order of preference.
    fn read_order(&self) -> Vec<Arc<Member>> {
        let mut rw: Vec<Arc<Member>> = self
            .all()
            .iter()
            .filter(|m| m.mode() == Mode::Rw)
            .cloned()
            .collect();
        if rw.len() > 1 {
            let start = self.next_read.fetch_add(1, Ordering::Relaxed) % rw.len();
            rw.rotate_left(start);
            if let Some(i) = rw.iter().position(|m| m.local) {
                let local = rw.remove(i);
                rw.insert(0, local);
            }
        }
        rw
    }

    /// Ask members in turn; transport failures retire the member, checksum failures skip it.
    /// Returns the answer and the members that failed their checksum before it (read repair
    /// mends them: see [`Engine::repair`]).
    async fn read_like(
        &self,
        via: Via<'_>,
        op: Op,
        offset: u64,
        length: u32,
    ) -> Result<(Bytes, Vec<Arc<Member>>), EngineError> {
        let mut last_err = String::new();
        let mut damaged = Vec::new();
        let mut first_damage = None;
        let mut unreachable = false;
        for m in self.read_order() {
            if m.mode() != Mode::Rw {
                continue;
            }
            match backend(&m, via)
                .call(Call::new(op, offset, length), self.io_timeout)
                .await
            {
                Ok(b) => return Ok((b, damaged)),
                Err(e) if is_stale(&e) => return Err(self.fenced(&e)),
                Err(e) if e.is_invalid_request() => {
                    return Err(EngineError::Invalid {
                        volume: self.volume.clone(),
                        source: e,
                    })
                }
                Err(e) if is_damage(&e) => {
                    tracing::error!(volume = %self.volume, "{e}; reading from another replica");
                    first_damage.get_or_insert_with(|| e.to_string());
                    damaged.push(m.clone());
                }
                Err(e) => {
                    last_err = e.to_string();
                    unreachable = true;
                    self.retire(&[(m.clone(), last_err.clone())]).await;
                }
            }
        }
        if self.in_sync().is_empty() {
            return Err(self.no_replicas());
        }
        // Damaged only when every copy asked said so: one that failed otherwise may be sound.
        if let (Some(detail), false) = (first_damage, unreachable) {
            return Err(self.damaged(offset, length.into(), detail));
        }
        Err(EngineError::NoReplicas {
            volume: self.volume.clone(),
            detail: last_err,
        })
    }

    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, EngineError> {
        self.read_via(&[], offset, length).await
    }

    async fn read_via(&self, via: Via<'_>, offset: u64, length: u32) -> Result<Bytes, EngineError> {
        let _in = self.enter().await?;
        // Reads wait for a pending retirement record too: an engine cut off from the manager
        // and from the rest of its set may have been replaced elsewhere, and its replicas no
        // longer hold what the new engine acknowledges.
        self.await_records().await?;
        self.check_range(offset, length as u64)?;
        if length == 0 {
            return Ok(Bytes::new());
        }
        if let Some(f) = self.fill_reading() {
            let (s, e) = self.block_range(offset, length as u64);
            if !f.all_local(s / self.block_size, e / self.block_size) {
                return self.read_through(via, f, offset, length).await;
            }
        }
        let (b, damaged) = self.read_like(via, Op::Read, offset, length).await?;
        if !damaged.is_empty() {
            self.repair(via, offset, length, damaged).await?;
        }
        if b.len() != length as usize {
            return Err(EngineError::NoReplicas {
                volume: self.volume.clone(),
                detail: format!(
                    "a replica returned {} bytes for a read of {length}",
                    b.len()
                ),
            });
        }
        Ok(b)
    }

    /// Read repair: `damaged` members failed their checksum on a read of `[offset, +length)`
    /// that another member answered. Under the write lock of those blocks (so no write to them
    /// can fall between the good read and the copy), copy them over the damaged copies, so the
    /// volume has all its copies again: a write torn by a crash, or a bad disk sector, heals on
    /// its first read.
    /// Fails only if the engine turns out to be fenced off.
    async fn repair(
        &self,
        via: Via<'_>,
        offset: u64,
        length: u32,
        damaged: Vec<Arc<Member>>,
    ) -> Result<(), EngineError> {
        let (s, e) = self.block_range(offset, length as u64);
        let _g = self.ranges.lock(s, e).await;
        self.copy_over(via, s, e, damaged).await.map(|_| ())
    }

    /// Copy the whole blocks `[s, e)` from a member that reads them cleanly over the `damaged`
    /// members' copies; the caller holds the range lock. Every other RW member is read too, so
    /// all damaged copies are found, not only those a first read happened to meet. Returns
    /// whether every damaged member got a clean copy, or the error of an engine fenced off
    /// meanwhile.
    async fn copy_over(
        &self,
        via: Via<'_>,
        s: u64,
        e: u64,
        mut damaged: Vec<Arc<Member>>,
    ) -> Result<bool, EngineError> {
        const PIECE: u64 = 1 << 20;
        let mut mended = true;
        let mut at = s;
        while at < e {
            let n = (e - at).min(PIECE) as u32;
            let mut good = None;
            for m in self.read_order() {
                if damaged.iter().any(|d| d.index == m.index) {
                    continue;
                }
                match backend(&m, via)
                    .call(Call::new(Op::Read, at, n), self.io_timeout)
                    .await
                {
                    Ok(b) if b.len() == n as usize => {
                        good.get_or_insert(b);
                    }
                    Err(e) if is_damage(&e) => damaged.push(m),
                    Err(e) if is_stale(&e) => return Err(self.fenced(&e)),
                    // Not a copy to take or to mend; a transport failure retires the member on
                    // its next write, as always.
                    Ok(_) | Err(_) => {}
                }
            }
            let Some(good) = good else {
                tracing::error!(volume = %self.volume, offset = at, length = n, "repair: no replica reads these blocks cleanly; they stay as they are");
                return Ok(false);
            };
            mended &= self.write_over(via, at, &good, &damaged).await?;
            at += n as u64;
        }
        Ok(mended)
    }

    /// Write `good` (whole blocks at `at`) over the `damaged` members' copies; the caller holds
    /// the range lock. A member the copy fails on is retired, as on any failed write. Returns
    /// whether every one got it, or the error of an engine fenced off meanwhile.
    async fn write_over(
        &self,
        via: Via<'_>,
        at: u64,
        good: &Bytes,
        damaged: &[Arc<Member>],
    ) -> Result<bool, EngineError> {
        let calls = if self.fill_writing().is_some() {
            // A clone still copying keeps zeroes as data (a hole would read its source).
            vec![Call {
                op: Op::Write,
                flags: 0,
                offset: at,
                length: good.len() as u32,
                payload: Some(good.clone()),
                payload_crc: None,
            }]
        } else {
            copy_calls(good, at, self.block_size as usize)
        };
        let mut failed = Vec::new();
        'members: for m in damaged.iter().filter(|m| m.mode() != Mode::Err) {
            for call in &calls {
                match backend(m, via).call(call.clone(), self.io_timeout).await {
                    Ok(_) => {}
                    Err(e) if is_stale(&e) => return Err(self.fenced(&e)),
                    Err(e) => {
                        tracing::error!(volume = %self.volume, replica = %m.name, "repair failed: {e}");
                        if !e.is_invalid_request() {
                            failed.push((m.clone(), format!("repairing a damaged block: {e}")));
                        }
                        continue 'members;
                    }
                }
            }
            tracing::warn!(volume = %self.volume, replica = %m.name, offset = at, length = good.len(), "repair: rewrote blocks that failed their checksum with a clean copy");
        }
        let all = failed.is_empty();
        if !all {
            self.retire(&failed).await;
        }
        Ok(all)
    }

    /// Scrub: read every stored block of every RW replica and mend the copies that fail their
    /// checksum from a clean one, so damage in data that is never read is found and repaired
    /// too, while other copies still hold the data. Piece by piece (1 MiB), each under its
    /// write lock (writes to that piece wait for one read per replica); pieces that every
    /// replica's allocation map shows as zeroes are skipped. Paced to at most `rate` bytes per
    /// second of pieces that hold data (0: unpaced), piece by piece, so a stall is never made
    /// up for by a burst. A replica that fails a read otherwise than by damage is retired, as
    /// on any read. Ends early with the engine's error when it stops serving.
    pub async fn scrub(&self, rate: u64) -> Result<ScrubReport, EngineError> {
        const PIECE: u64 = 1 << 20;
        let mut report = ScrubReport::default();
        let mut due = tokio::time::Instant::now();
        let mut at = 0;
        while at < self.size_bytes() {
            let n = (self.size_bytes() - at).min(PIECE) as u32;
            let holds_data = {
                let _in = self.enter().await?;
                let data = !self.all_zero(at, n).await?;
                if data {
                    self.scrub_piece(at, n, &mut report).await?;
                }
                data
            };
            at += u64::from(n);
            report.scanned_bytes = at;
            if holds_data && rate > 0 {
                due = due.max(tokio::time::Instant::now())
                    + Duration::from_secs_f64(f64::from(n) / rate as f64);
                tokio::time::sleep_until(due).await;
            }
        }
        Ok(report)
    }

    /// Whether every RW member's allocation map shows the range as zeroes (nothing stored to
    /// check). Any doubt (an error, a map that covers less) says no.
    async fn all_zero(&self, offset: u64, length: u32) -> Result<bool, EngineError> {
        for m in self.read_order() {
            let b = match m
                .client()
                .call(Call::new(Op::Map, offset, length), self.io_timeout)
                .await
            {
                Ok(b) => b,
                Err(e) if is_stale(&e) => return Err(self.fenced(&e)),
                Err(_) => return Ok(false),
            };
            let Ok(extents) = data::decode_map(&b) else {
                return Ok(false);
            };
            let zero: u64 = extents
                .iter()
                .take_while(|x| x.flags & data::EXTENT_ZERO != 0)
                .map(|x| u64::from(x.length))
                .sum();
            if zero < u64::from(length) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn scrub_piece(
        &self,
        at: u64,
        n: u32,
        report: &mut ScrubReport,
    ) -> Result<(), EngineError> {
        let _g = self.ranges.lock(at, at + u64::from(n)).await;
        let mut damaged = Vec::new();
        let mut failed = Vec::new();
        let mut clean: Option<(Arc<Member>, Bytes)> = None;
        let mut differ = false;
        for m in self.read_order() {
            match m
                .client()
                .call(Call::new(Op::Read, at, n), self.io_timeout)
                .await
            {
                Ok(b) if b.len() == n as usize => {
                    report.read_bytes += b.len() as u64;
                    match &clean {
                        None => clean = Some((m.clone(), b)),
                        Some((first, c)) if *c != b => {
                            differ = true;
                            tracing::error!(volume = %self.volume, offset = at, length = n, "scrub: replicas {} and {} hold different data here, both with valid checksums", first.name, m.name);
                        }
                        Some(_) => {}
                    }
                }
                Err(e) if is_damage(&e) => {
                    tracing::error!(volume = %self.volume, "scrub: {e}");
                    damaged.push(m);
                }
                Err(e) if is_stale(&e) => return Err(self.fenced(&e)),
                Ok(b) => failed.push((m, format!("a read of {n} bytes returned {}", b.len()))),
                Err(e) => failed.push((m, e.to_string())),
            }
        }
        report.differing += u64::from(differ);
        if !failed.is_empty() {
            self.retire(&failed).await;
        }
        if damaged.is_empty() {
            return Ok(());
        }
        match clean {
            Some((_, good)) if self.write_over(&[], at, &good, &damaged).await? => {
                report.mended += 1
            }
            _ => {
                tracing::error!(volume = %self.volume, offset = at, length = n, "scrub: damaged blocks left as they are: no replica reads them cleanly, or a copy failed");
                report.unmended += 1
            }
        }
        Ok(())
    }

    /// Allocation map of a range (for NBD BLOCK_STATUS). May cover less than asked.
    pub async fn map(&self, offset: u64, length: u32) -> Result<Vec<MapExtent>, EngineError> {
        self.map_via(&[], offset, length).await
    }

    async fn map_via(
        &self,
        via: Via<'_>,
        offset: u64,
        length: u32,
    ) -> Result<Vec<MapExtent>, EngineError> {
        let _in = self.enter().await?;
        self.check_range(offset, length as u64)?;
        if self.fill_reading().is_some() {
            // What the source holds is not known here: all of it counts as data.
            return Ok(vec![MapExtent { length, flags: 0 }]);
        }
        let (b, _) = self.read_like(via, Op::Map, offset, length).await?;
        data::decode_map(&b).map_err(|e| EngineError::NoReplicas {
            volume: self.volume.clone(),
            detail: format!("a replica sent a bad allocation map: {e}"),
        })
    }

    /// Addresses of members, for status output.
    pub fn member_addresses(&self) -> Vec<(String, String)> {
        self.all()
            .iter()
            .map(|m| (m.name.clone(), m.address.clone()))
            .collect()
    }
}

/// One frontend connection's own connections to the volume's remote replicas.
///
/// Requests made through it are the engine's requests (same membership, same range lock, same
/// retirement rules); only the sockets differ. Each lane joins the engine's session on its
/// replica (`SHARE_SESSION` / `JOIN_SESSION`), so fencing and generation bumps hold for it
/// exactly as for the engine's own connection. Open it on the thread that serves the frontend
/// connection: the lanes' replies are then read there, and a request completes without a hop
/// to another thread. Lanes open in the background, when the connection's first request comes
/// (an idle frontend connection costs no socket, and no thread, on the replicas' nodes): until
/// a member's lane is open (or if it cannot be opened), that member is reached over the
/// engine's own connection, so a slow or unreachable replica never holds up a request.
/// Ping the members every [`KEEPALIVE_INTERVAL`] until the engine stops serving or is dropped.
async fn keepalive(engine: std::sync::Weak<Engine>) {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        let Some(e) = engine.upgrade() else {
            return;
        };
        if e.closed_reason().is_some() {
            return;
        }
        e.ping_members().await;
        e.settle_tick().await;
    }
}

pub struct Lanes {
    engine: Arc<Engine>,
    via: Arc<[OnceLock<Backend>]>,
    /// The members to open lanes to, taken by the first request.
    to_open: std::sync::Mutex<Option<Arc<Vec<Arc<Member>>>>>,
    opening: OnceLock<tokio::task::JoinHandle<()>>,
    done: watch::Sender<bool>,
    settled: watch::Receiver<bool>,
}

impl Drop for Lanes {
    fn drop(&mut self) {
        if let Some(t) = self.opening.get() {
            t.abort();
        }
    }
}

impl Engine {
    /// Lanes to every remote replica in the set (see [`Lanes`]), opened when the first request
    /// is made through them, inside the runtime that makes it.
    pub fn lanes(self: &Arc<Self>) -> Lanes {
        // One snapshot of the members for both the slots and the opening: a member that joins
        // later (a rebuild) has a higher index and is reached over the engine's connection.
        let all = self.all();
        let slots = all.iter().map(|m| m.index + 1).max().unwrap_or(0);
        let via: Arc<[OnceLock<Backend>]> = (0..slots).map(|_| OnceLock::new()).collect();
        let (done, settled) = watch::channel(false);
        Lanes {
            engine: self.clone(),
            via,
            to_open: std::sync::Mutex::new(Some(all)),
            opening: OnceLock::new(),
            done,
            settled,
        }
    }

    async fn open_lane(
        &self,
        m: &Member,
        shared: &ReplicaClient,
    ) -> Result<ReplicaClient, ClientError> {
        let t = self.io_timeout;
        let share = Call::new(Op::ShareSession, 0, 0);
        let token = shared.call(share.clone(), t).await?;
        let token = <[u8; 8]>::try_from(&token[..]).map_err(|_| {
            share.failed(
                &m.name,
                Status::Invalid,
                format!("session token of {} bytes, expected 8", token.len()),
            )
        })?;
        let lane = ReplicaClient::connect(
            &m.address,
            &self.volume,
            &m.name,
            self.epoch,
            &self.secret,
            self.data_tls,
            t,
        )
        .await?;
        lane.call(Call::new(Op::JoinSession, u64::from_le_bytes(token), 0), t)
            .await?;
        Ok(lane)
    }
}

impl Lanes {
    /// Start opening the lanes, once (the first request does).
    fn start(&self) {
        let Some(all) = self
            .to_open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let (engine, via, done) = (self.engine.clone(), self.via.clone(), self.done.clone());
        let task = tokio::spawn(async move {
            let opens = all.iter().map(|m| {
                let (engine, via) = (&engine, &via);
                async move {
                    let Some(Backend::Remote(shared)) = &m.client else {
                        return;
                    };
                    if m.mode() == Mode::Err {
                        return;
                    }
                    match engine.open_lane(m, shared).await {
                        Ok(lane) => {
                            let _ = via[m.index].set(Backend::Remote(lane));
                        }
                        Err(e) => {
                            tracing::info!(volume = %engine.volume, replica = %m.name, "no connection of its own, using the engine's: {e}");
                        }
                    }
                }
            });
            join_all(opens).await;
            let _ = done.send(true);
        });
        let _ = self.opening.set(task);
    }

    /// Open the lanes (if no request has yet), wait until every one is open or has failed to
    /// open; then how many members are reached over a lane of their own.
    pub async fn opened(&self) -> usize {
        self.start();
        let mut settled = self.settled.clone();
        let _ = settled.wait_for(|done| *done).await;
        self.via.iter().filter(|b| b.get().is_some()).count()
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        self.start();
        self.engine.write_via(&self.via, offset, data, fua).await
    }

    pub async fn zero(
        &self,
        offset: u64,
        length: u64,
        trim: bool,
        fua: bool,
    ) -> Result<(), EngineError> {
        self.start();
        self.engine
            .zero_via(&self.via, offset, length, trim, fua)
            .await
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        self.start();
        self.engine.flush_via(&self.via).await
    }

    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, EngineError> {
        self.start();
        self.engine.read_via(&self.via, offset, length).await
    }

    pub async fn map(&self, offset: u64, length: u32) -> Result<Vec<MapExtent>, EngineError> {
        self.start();
        self.engine.map_via(&self.via, offset, length).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_writes_data_runs_and_zeroes_zero_runs() {
        let bs = 8;
        // Blocks: zero, data, data, zero, zero, data.
        let mut good = vec![0u8; 6 * bs];
        for b in [1, 2, 5] {
            good[b * bs + 3] = b as u8;
        }
        let good = Bytes::from(good);
        let calls = copy_calls(&good, 1000, bs);
        let got: Vec<(Op, u64, u32, Option<Bytes>)> = calls
            .into_iter()
            .map(|c| (c.op, c.offset, c.length, c.payload))
            .collect();
        let (b, len) = (bs as u64, bs as u32);
        assert_eq!(
            got,
            vec![
                (Op::WriteZeroes, 1000, len, None),
                (Op::Write, 1000 + b, 2 * len, Some(good.slice(bs..3 * bs))),
                (Op::WriteZeroes, 1000 + 3 * b, 2 * len, None),
                (Op::Write, 1000 + 5 * b, len, Some(good.slice(5 * bs..))),
            ]
        );
        assert!(copy_calls(&Bytes::new(), 0, bs).is_empty());
    }
}
