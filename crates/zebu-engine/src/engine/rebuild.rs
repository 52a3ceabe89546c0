//! Rebuild: a replica joins a running engine and is filled from the members in sync.
//!
//! 1. The target is connected (with the engine's epoch, so it is fenced like any member). Its
//!    generation must be below the set's. It is raised by one through the new session (first
//!    raising the set's if there is no room below it), which fences every older session on the
//!    target — a returning member's old connection or lanes may still carry a write that timed
//!    out, and must not land after its piece is copied. Then it joins as `WO`: from that moment
//!    every write, zeroing and flush reaches it too. A write is acknowledged only when an RW
//!    member kept it: a WO member alone never counts, and one that holds a write the set lost
//!    leaves the set.
//! 2. Piece by piece (1 MiB; unpaced, up to [`PIPELINE`] at once, finishing in order), under the
//!    piece's range lock — so no live write to that piece
//!    runs meanwhile, and none can be overtaken by the copy — the piece's allocation map is read
//!    from an RW member, its data runs are read there and written to the target (zero blocks as
//!    WRITE_ZEROES, so holes stay holes). On a target that was empty at the start, holes are
//!    skipped; on one that held data, they are zeroed.
//! 3. The target is flushed, turns `RW`, and the generation of every RW member, the target
//!    included, is raised. Until then the target keeps its lower generation (generation bumps
//!    skip WO members), so a crash mid-rebuild leaves it stale, never passing for a full copy.
//!
//! A live write that fails on the target retires it (`ERR`) as for any member, and the rebuild
//! stops. The copy is paced to `rate` bytes per second (0: unpaced).
//!
//! **Resuming.** A full rebuild records on the target, as it goes, how far it got
//! ([`Op::WilRebuild`]: the set's generation when the copy began, and the offset below which
//! every byte was copied; the target syncs its data before it records it). The next attempt
//! copies again, below that offset, the extents the target has dirty and those that may have
//! changed while it was away, then goes on from the offset. What may have changed: if this
//! engine wrote that record and saw the target leave, every extent that was hot when it left
//! or became hot since ([`Resumes`]); otherwise (the engine restarted), the extents a member
//! in sync has not clean, while its write-intent log still covers the record's generation (it
//! has not settled clean since: that needs every member, the target included, in sync). See
//! `docs/healing.md`, "Resuming an interrupted rebuild".

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zebu_proto::data::{
    self, Op, EXTENT_HOLE, FLAG_WIL_REJOIN, WIL_CLEAN, WIL_DIRTY, WIL_EXTENT_BYTES,
};
use zebu_replica::wil::{LogFacts, Rebuild, NO_REBUILD};

use super::intents::extent_calls;

use super::{copy_calls, flush_timeout, Engine, EngineError, Member, Mode, ReplicaTarget};
use crate::backend::Backend;
use crate::client::{Call, ClientError, ReplicaClient};

/// Bytes copied under one range lock.
const PIECE_BYTES: u64 = 1 << 20;
/// Pieces a rebuild copies at once.
const PIPELINE: usize = 4;
/// A full rebuild records how far it got at least this often (in bytes walked, or time).
const RECORD_BYTES: u64 = 64 << 20;
const RECORD_EVERY: Duration = Duration::from_secs(2);

/// How far a rebuild is (reported while the member is WO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildProgress {
    /// `"full"` (the whole volume) or `"delta"` (only the extents the write-intent log of a
    /// member in sync has marked since the target left).
    pub kind: &'static str,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes already in place when this attempt began (a resumed rebuild; 0 otherwise).
    pub resumed_from: u64,
}

/// The ranges a rebuild copies.
struct Plan {
    kind: &'static str,
    ranges: Vec<(u64, u64)>,
    /// Bytes in place before the copy (a resumed rebuild's prefix, less what is copied again).
    already: u64,
    /// Recorded on the target as the copy goes (a full rebuild; a delta one is planned again
    /// from the logs).
    record: Option<Rebuild>,
    /// A copy from the beginning: its record is written before the first piece.
    new_record: bool,
    /// Set when the target's head was empty as this copy began, over this snapshot (the set's
    /// last on the live path): only what the source's head holds over it is copied, the rest
    /// reads the same there already (`engine/tree_copy.rs`).
    over: Option<String>,
}

impl Plan {
    fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}

/// What this engine knows of its rebuild targets, to resume one that left mid-copy.
#[derive(Default)]
pub(super) struct Resumes {
    /// Some target's changes are being noted (read on the marking path).
    tracking: AtomicBool,
    targets: Mutex<HashMap<String, Resume>>,
}

struct Resume {
    /// The last record this engine wrote on the target.
    record: Rebuild,
    /// Once it left after that record: every extent hot then, or marked since.
    changed: Option<HashSet<u64>>,
    /// Times it left: a record whose reply comes after a departure speaks for no notes.
    departures: u64,
}

impl Resumes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Resume>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How often `target` left so far (read before a record is sent).
    fn departures(&self, target: &str) -> u64 {
        self.lock().get(target).map_or(0, |r| r.departures)
    }

    /// This engine wrote `record` on `target`, which took every write from before the record
    /// was sent (`departures` then) until its reply: its notes start afresh. If it left
    /// meanwhile, nothing is known: the entry goes (the next attempt plans from the logs).
    fn recorded(&self, target: &str, record: Rebuild, departures: u64) {
        let mut all = self.lock();
        if all.get(target).is_some_and(|r| r.departures != departures) {
            all.remove(target);
            return;
        }
        all.insert(
            target.to_owned(),
            Resume {
                record,
                changed: None,
                departures,
            },
        );
    }

    /// `target` leaves the set: from now on every extent that becomes hot is noted, and
    /// `hot()` (the extents hot now, taken after noting starts) are noted at once.
    pub(super) fn left(&self, target: &str, hot: impl FnOnce() -> Vec<u64>) {
        let mut all = self.lock();
        let Some(r) = all.get_mut(target) else {
            return;
        };
        r.departures += 1;
        // Before the hot extents are read: an extent that turns hot after it is read sees
        // `tracking` set and is noted by `marked`.
        self.tracking.store(true, Ordering::SeqCst);
        r.changed.get_or_insert_with(HashSet::new).extend(hot());
    }

    /// `extents` just turned hot (inserted in the hot set, before any write to them is sent).
    pub(super) fn marked(&self, extents: &[u64]) {
        if !self.tracking.load(Ordering::SeqCst) {
            return;
        }
        for r in self.lock().values_mut() {
            if let Some(c) = r.changed.as_mut() {
                c.extend(extents);
            }
        }
    }

    /// What may have changed on `target` below `record` since this engine last saw it take
    /// writes, if this engine wrote `record` there and saw it leave; called as an attempt
    /// plans. Otherwise the entry goes: notes started later (at a departure of this attempt)
    /// would miss what changed before it, while the target's copy below `record` is stale.
    fn changed_since(&self, target: &str, record: Rebuild) -> Option<HashSet<u64>> {
        let mut all = self.lock();
        let known = all
            .get(target)
            .filter(|r| r.record == record)
            .and_then(|r| r.changed.clone());
        if known.is_none() {
            all.remove(target);
        }
        known
    }

    /// `target` is in sync.
    fn forget(&self, target: &str) {
        let mut all = self.lock();
        all.remove(target);
        if all.values().all(|r| r.changed.is_none()) {
            self.tracking.store(false, Ordering::SeqCst);
        }
    }
}

/// A rebuild's claim on its target (see [`Engine::rebuilding_one`]).
struct OneRebuild<'a>(&'a Engine, String);

impl Drop for OneRebuild<'_> {
    fn drop(&mut self) {
        self.0
            .rebuilding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// What a finished rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildDone {
    pub kind: &'static str,
    /// Bytes of data written to the target (holes skipped are not counted).
    pub bytes_copied: u64,
    pub duration: Duration,
    /// Bytes already in place when this attempt began (a resumed rebuild; 0 otherwise).
    pub resumed_from: u64,
    /// Snapshots copied to the target, and those it held already and kept.
    pub snapshots_copied: u64,
    pub snapshots_kept: u64,
}

impl Engine {
    fn rebuild_err(&self, reason: String) -> EngineError {
        EngineError::Rebuild {
            volume: self.volume.clone(),
            reason,
        }
    }

    /// A member that failed (ERR) may come back by rebuild; one in the set may not.
    fn not_a_member(&self, name: &str) -> Result<(), EngineError> {
        if self
            .all()
            .iter()
            .any(|m| m.name == name && m.mode() != Mode::Err)
        {
            return Err(self.rebuild_err(format!("replica {name} is already a member of the set")));
        }
        Ok(())
    }

    /// A replica some rebuild is filling now, if any.
    pub(super) fn rebuilding_now(&self) -> Option<String> {
        let all = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().next().cloned()
    }

    /// Refused while another rebuild fills `name`; the guard ends this one's claim.
    fn rebuilding_one(&self, name: &str) -> Result<OneRebuild<'_>, EngineError> {
        let mut all = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        if !all.insert(name.to_owned()) {
            return Err(self.rebuild_err(format!("a rebuild of replica {name} is running already")));
        }
        Ok(OneRebuild(self, name.to_owned()))
    }

    /// Add `target` to the set and fill it from the members in sync (see the module docs);
    /// returns once it is RW. Fails, leaving the target out of the set (ERR), if the target
    /// fails, the engine stops serving, or no RW member can be read.
    pub async fn rebuild(
        self: &Arc<Self>,
        target: ReplicaTarget,
        rate: u64,
    ) -> Result<RebuildDone, EngineError> {
        let started = Instant::now();
        self.not_a_member(&target.name)?;
        let _one = self.rebuilding_one(&target.name)?;
        let backend = match &target.in_process {
            Some(l) => l.open(self.epoch).await.map(Backend::Local),
            None => ReplicaClient::connect(
                &target.address,
                &self.volume,
                &target.name,
                self.epoch,
                &self.secret,
                self.data_tls,
                self.io_timeout,
            )
            .await
            .map(Backend::Remote),
        }
        .map_err(|e| self.rebuild_err(format!("cannot reach the new replica: {e}")))?;
        let opened = backend.opened();
        // A replica that missed an expansion (away, or created before it) grows first.
        let target_size = self.size_bytes();
        if opened.size_bytes < target_size {
            backend
                .call(
                    Call::new(Op::Resize, target_size, 0),
                    flush_timeout(self.io_timeout),
                )
                .await
                .map_err(|e| {
                    self.rebuild_err(format!(
                        "growing replica {} from {} to the volume's {target_size} bytes: {e}",
                        target.name, opened.size_bytes
                    ))
                })?;
        } else if opened.size_bytes != target_size {
            return Err(self.rebuild_err(format!(
                "replica {} has {} bytes but the volume has {target_size}: it is not a copy of this volume",
                target.name, opened.size_bytes
            )));
        }
        let info = backend
            .call(Call::new(Op::Info, 0, 0), self.io_timeout)
            .await
            .map_err(|e| self.rebuild_err(e.to_string()))?;
        let info = data::ReplicaInfo::decode(&info)
            .map_err(|e| self.rebuild_err(format!("bad INFO reply: {e}")))?;
        let fresh = info.allocated_bytes == 0;
        // Its log covers nothing while it is rebuilt, and keeps the generation it had when it
        // first rejoined: the fence below raises its generation, which says nothing of its data.
        let mut rejoin = Call::new(Op::WilSettle, opened.generation, 0);
        rejoin.flags = FLAG_WIL_REJOIN;
        rejoin.payload = Some(bytes::Bytes::new());
        let facts = async {
            backend.call(rejoin, flush_timeout(self.io_timeout)).await?;
            backend
                .call(Call::new(Op::WilRead, 0, 0), self.io_timeout)
                .await
        }
        .await
        .map_err(|e| {
            self.rebuild_err(format!("recording the rejoin in its write-intent log: {e}"))
        })?;
        let left_at = LogFacts::decode(&facts)
            .map(|f| f.rejoin_from)
            .ok_or_else(|| self.rebuild_err("a short write-intent log reply".into()))?;
        let copying = {
            let _m = self.membership.lock().await;
            self.not_a_member(&target.name)?;
            // Fencing under `membership`: no retirement's generation bump is half done, and the
            // target's generation must be below the set's, or it would be the fresher copy.
            if opened.generation >= self.generation() {
                return Err(self.rebuild_err(format!(
                    "replica {} is at generation {}, not below the set's {}: it may hold writes the set lacks, refusing to overwrite it",
                    target.name,
                    opened.generation,
                    self.generation()
                )));
            }
            // Fence every older session on the target (a returning member's old connection
            // and its lanes may still carry a write that timed out here, and could land after
            // its piece was copied): raise the target's generation past theirs through the new
            // session, staying below the set's, so a crash mid-rebuild still leaves it stale.
            let fence_to = opened.generation + 1;
            if fence_to >= self.generation() {
                self.bump_generation().await;
                if self.fenced_off.load(std::sync::atomic::Ordering::Acquire) {
                    return Err(EngineError::Closed {
                        volume: self.volume.clone(),
                        reason: self.closed_reason().unwrap_or_default(),
                    });
                }
            }
            backend
                .call(
                    Call::new(Op::SetGeneration, fence_to, 0),
                    flush_timeout(self.io_timeout),
                )
                .await
                .map_err(|e| {
                    self.rebuild_err(format!("fencing older sessions on the new replica: {e}"))
                })?;
            // Under `membership`: no snapshot is being taken or deleted.
            self.copying_tree()
        };
        // Its snapshots first, while no live write reaches it (`engine/tree_copy.rs`).
        let tree = self.copy_tree(&backend, &target.name, rate).await?;
        let fresh = if tree.rewound {
            let info = backend
                .call(Call::new(Op::Info, 0, 0), self.io_timeout)
                .await
                .map_err(|e| self.rebuild_err(e.to_string()))?;
            data::ReplicaInfo::decode(&info)
                .map_err(|e| self.rebuild_err(format!("bad INFO reply: {e}")))?
                .allocated_bytes
                == 0
        } else {
            fresh
        };
        let (member, base) = {
            let _m = self.membership.lock().await;
            // Again under the lock: two rebuilds of one replica never both join.
            self.not_a_member(&target.name)?;
            if let Some(reason) = self.closed_reason() {
                return Err(EngineError::Closed {
                    volume: self.volume.clone(),
                    reason,
                });
            }
            if self.fenced_off.load(std::sync::atomic::Ordering::Acquire) {
                return Err(EngineError::Closed {
                    volume: self.volume.clone(),
                    reason: self.closed_reason().unwrap_or_default(),
                });
            }
            // The snapshots it holds are still the set's (none was taken or deleted since).
            let now: Vec<String> =
                super::tree_copy::live_path(&self.source_layers(&target.name).await?)
                    .into_iter()
                    .map(|s| s.key)
                    .collect();
            if now != tree.keys {
                return Err(self.rebuild_err(format!(
                    "the set's snapshots changed while they were copied to replica {} (it holds {:?}, the set {:?}); the next attempt copies the rest",
                    target.name, tree.keys, now
                )));
            }
            if self.size_bytes() != target_size {
                return Err(self.rebuild_err(format!(
                    "the volume grew to {} bytes while replica {} was prepared at {target_size}; the next attempt grows it first",
                    self.size_bytes(),
                    target.name
                )));
            }
            drop(copying);
            // Its failed entry is replaced below: a retirement of it not recorded yet (a
            // cancelled request's) is finished first, or it would be forgotten.
            if self.all().iter().any(|m| {
                m.name == target.name && m.unrecorded.load(std::sync::atomic::Ordering::Acquire)
            }) {
                self.bump_generation().await;
                self.record_retirements(None).await?;
            }
            let mut all = self.members.write().unwrap_or_else(|p| p.into_inner());
            let member = Arc::new(Member {
                index: self
                    .next_index
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                name: target.name.clone(),
                address: target.address.clone(),
                local: target.local,
                client: Some(backend),
                mode: std::sync::atomic::AtomicU8::new(Mode::Wo as u8),
                error: std::sync::Mutex::new(String::new()),
                progress: std::sync::Mutex::new(Some(RebuildProgress {
                    kind: "full",
                    bytes_done: 0,
                    bytes_total: self.size_bytes(),
                    resumed_from: 0,
                })),
                unrecorded: std::sync::atomic::AtomicBool::new(false),
                no_space: std::sync::atomic::AtomicBool::new(false),
            });
            // The failed entry of a returning member is replaced by the new one.
            let mut next: Vec<Arc<Member>> = all
                .iter()
                .filter(|m| m.name != target.name)
                .cloned()
                .collect();
            next.push(member.clone());
            *all = Arc::new(next);
            drop(all);
            self.changes.send_modify(|v| *v += 1);
            // The set's generation as the target joins: every clean settle from now on is at
            // a higher one (none while it is WO; its leaving or an engine start raises it).
            (member, self.generation())
        };
        let plan = match self.plan(&member, fresh, left_at, base).await {
            Ok(mut p) => {
                if tree.rewound && p.new_record {
                    p.over = tree.last.clone();
                }
                p
            }
            Err(e) => {
                self.retire(&[(member, format!("its rebuild failed: {e}"))])
                    .await;
                return Err(e);
            }
        };
        let kind = plan.kind;
        tracing::info!(volume = %self.volume, replica = %target.name, kind, bytes = plan.bytes(), resumed_from = plan.already, "rebuild started");
        match self.copy_into(&member, &plan, fresh, rate, started).await {
            Ok(copied) => {
                let done = RebuildDone {
                    kind,
                    bytes_copied: copied,
                    duration: started.elapsed(),
                    resumed_from: plan.already,
                    snapshots_copied: tree.snapshots as u64,
                    snapshots_kept: (tree.keys.len() - tree.snapshots) as u64,
                };
                tracing::info!(volume = %self.volume, replica = %target.name, kind, bytes_copied = copied, ms = done.duration.as_millis() as u64, "rebuild done: the replica is RW");
                Ok(done)
            }
            Err(e) => {
                // Retired, so the generation goes past `base`: a clean settle after it left is
                // at a higher one, and no log that was cleared since passes for covering it.
                self.retire(&[(member, format!("its rebuild failed: {e}"))])
                    .await;
                Err(e)
            }
        }
    }

    /// What to copy to `target` (joined as WO): the hot extents are marked on it first, so its
    /// own log holds every extent a crash could leave different once it is RW. The smallest
    /// of: a delta (the non-clean extents of a member whose write-intent log covers the
    /// target: its `covers_from` is at most the generation the target had when it left), the
    /// rest of an interrupted full rebuild (see the module docs), and the whole volume.
    /// `base`: the set's generation as the target joined.
    async fn plan(
        &self,
        target: &Arc<Member>,
        fresh: bool,
        target_generation: u64,
        base: u64,
    ) -> Result<Plan, EngineError> {
        // The target's own dirty extents are copied too (read before the hot ones are marked
        // there): an engine it was in may have written them without the set (one fenced off,
        // or cut off before it could record a retirement).
        let own = if fresh {
            None
        } else {
            Some(
                self.read_log(target)
                    .await
                    .map_err(|e| self.rebuild_err(format!("reading its write-intent log: {e}")))?,
            )
        };
        let hot = self.intents.snapshot();
        if !hot.is_empty() {
            for call in extent_calls(Op::WilMark, 0, 0, &hot) {
                target
                    .client()
                    .call(call, flush_timeout(self.io_timeout))
                    .await
                    .map_err(|e| self.rebuild_err(format!("marking the hot extents on it: {e}")))?;
            }
        }
        let mut best = Plan {
            kind: "full",
            ranges: vec![(0, self.size_bytes())],
            already: 0,
            record: Some(Rebuild { base, copied_to: 0 }),
            new_record: true,
            over: None,
        };
        if let Some(own) = &own {
            let before = own.facts.rebuild;
            let to = before.copied_to.min(self.size_bytes());
            let extent = |e: usize| {
                let start = e as u64 * WIL_EXTENT_BYTES;
                (start, (start + WIL_EXTENT_BYTES).min(self.size_bytes()))
            };
            // The rest of an interrupted full rebuild: below `to`, the extents `differ` says
            // may differ; then everything from `to`.
            let resumed = |differ: &dyn Fn(usize) -> bool| {
                let mut ranges: Vec<(u64, u64)> = (0..own.states.len())
                    .filter(|e| differ(*e))
                    .map(extent)
                    .filter(|(s, _)| *s < to)
                    .map(|(s, e)| (s, e.min(to)))
                    .collect();
                let again: u64 = ranges.iter().map(|(s, e)| e - s).sum();
                if to < self.size_bytes() {
                    ranges.push((to, self.size_bytes()));
                }
                Plan {
                    kind: "full",
                    ranges,
                    already: to - again,
                    record: Some(before),
                    new_record: false,
                    over: None,
                }
            };
            if let Some(changed) = self.resumes.changed_since(&target.name, before) {
                let c = resumed(&|e| changed.contains(&(e as u64)) || own.states[e] == WIL_DIRTY);
                if c.bytes() < best.bytes() {
                    best = c;
                }
            }
            for m in self.read_order() {
                let log = match self.read_log(&m).await {
                    Ok(log) => log,
                    Err(e) => {
                        tracing::warn!(volume = %self.volume, source = %m.name, "reading the write-intent log: {e}");
                        continue;
                    }
                };
                // Extents that may differ between the target and this member.
                let differ = |e: usize| log.states[e] != WIL_CLEAN || own.states[e] == WIL_DIRTY;
                let mut candidates = Vec::new();
                if log.facts.covers_from <= target_generation {
                    candidates.push(Plan {
                        kind: "delta",
                        ranges: (0..log.states.len())
                            .filter(|e| differ(*e))
                            .map(extent)
                            .collect(),
                        already: 0,
                        record: None,
                        new_record: false,
                        over: None,
                    });
                }
                if before.base != NO_REBUILD && log.facts.covers_from <= before.base {
                    candidates.push(resumed(&differ));
                }
                if candidates.is_empty() {
                    tracing::info!(volume = %self.volume, replica = %target.name, source = %m.name, covers_from = log.facts.covers_from, target_generation, rebuild_base = before.base, "the source's write-intent log does not cover the returning replica (it was cleared since it left)");
                }
                for c in candidates {
                    if c.bytes() < best.bytes() {
                        best = c;
                    }
                }
            }
        }
        if let Some(r) = best.record.filter(|_| best.new_record) {
            // A new full copy: recorded before its first piece, so a record of an earlier one
            // never speaks for it.
            self.record_rebuild(target, r).await?;
        }
        Ok(best)
    }

    /// Record on `target` how far its rebuild got (it syncs its data first).
    async fn record_rebuild(&self, target: &Member, r: Rebuild) -> Result<(), EngineError> {
        let departures = self.resumes.departures(&target.name);
        let mut call = Call::new(Op::WilRebuild, r.base, 8);
        call.payload = Some(bytes::Bytes::copy_from_slice(&r.copied_to.to_le_bytes()));
        target
            .client()
            .call(call, flush_timeout(self.io_timeout))
            .await
            .map_err(|e| self.rebuild_err(format!("recording how far its rebuild got: {e}")))?;
        // Every extent the plan copies again below it was copied by now (they come first):
        // what changed while it was away is in place.
        self.resumes.recorded(&target.name, r, departures);
        Ok(())
    }

    /// Steps 2 and 3 of the module docs; returns the data bytes written.
    async fn copy_into(
        &self,
        target: &Arc<Member>,
        plan: &Plan,
        fresh: bool,
        rate: u64,
        started: Instant,
    ) -> Result<u64, EngineError> {
        let mut copied = 0u64;
        let mut walked = 0u64;
        let mut record = plan.record;
        let (mut unrecorded, mut recorded_at) = (0u64, Instant::now());
        if let Some(p) = target
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            p.kind = plan.kind;
            p.bytes_done = plan.already;
            p.bytes_total = plan.already + plan.bytes();
            p.resumed_from = plan.already;
        }
        let pieces = plan.ranges.clone().into_iter().flat_map(|(s, e)| {
            (s..e)
                .step_by(PIECE_BYTES as usize)
                .map(move |at| (at, (at + PIECE_BYTES).min(e)))
        });
        // Up to PIPELINE pieces are copied at once (each under its own range lock), so one's
        // read overlaps another's write; they complete in order (`buffered`), so when a piece
        // is seen done, every piece before it is too (what a record claims).
        let copy = |(at, end): (u64, u64)| async move {
            let _serving = self.enter().await?;
            if target.mode() != Mode::Wo {
                let why = target
                    .error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                return Err(self.rebuild_err(format!("the new replica left the set: {why}")));
            }
            let _piece = self.ranges.lock(at, end).await;
            let n = self
                .copy_piece(target, at, end, fresh, plan.over.as_deref())
                .await?;
            Ok::<_, EngineError>((at, end, n))
        };
        // A paced copy takes one piece at a time: the pieces ahead must not sit on their range
        // locks while it sleeps. (A record's target sync, every 2 s or 64 MiB, does keep up to
        // PIPELINE - 1 pieces ahead locked for its length.)
        let depth = if rate > 0 { 1 } else { PIPELINE };
        let mut done = futures::stream::iter(pieces).map(copy).buffered(depth);
        while let Some(piece) = done.next().await {
            let (at, end, n) = piece?;
            copied += n;
            walked += end - at;
            unrecorded += end - at;
            if let Some(p) = target
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                p.bytes_done = plan.already + walked;
            }
            // Past the recorded offset the pieces run on from it without a gap (those copied
            // again below it come first), so everything below `end` is copied now.
            if let Some(r) = record.as_mut().filter(|r| at >= r.copied_to) {
                if unrecorded >= RECORD_BYTES || recorded_at.elapsed() >= RECORD_EVERY {
                    r.copied_to = end;
                    self.record_rebuild(target, *r).await?;
                    (unrecorded, recorded_at) = (0, Instant::now());
                }
            }
            if rate > 0 {
                let due = Duration::from_secs_f64(walked as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let t = flush_timeout(self.io_timeout);
        target
            .client()
            .call(Call::new(Op::Flush, 0, 0), t)
            .await
            .map_err(|e| self.rebuild_err(format!("flushing the new replica: {e}")))?;
        let membership = self.membership.lock().await;
        if target.mode() != Mode::Wo {
            return Err(self.rebuild_err("the new replica left the set".into()));
        }
        target
            .mode
            .store(Mode::Rw as u8, std::sync::atomic::Ordering::Release);
        self.bump_generation().await;
        if self.fenced_off.load(std::sync::atomic::Ordering::Acquire) {
            return Err(EngineError::Closed {
                volume: self.volume.clone(),
                reason: self.closed_reason().unwrap_or_default(),
            });
        }
        if target.mode() != Mode::Rw {
            return Err(
                self.rebuild_err("the new replica failed while its generation was raised".into())
            );
        }
        // Its log covers every change from now on (it had them all marked since it joined).
        let mut settle = Call::new(Op::WilSettle, self.generation(), 0);
        settle.payload = Some(bytes::Bytes::new());
        if let Err(e) = target
            .client()
            .call(settle, flush_timeout(self.io_timeout))
            .await
        {
            let why = format!("recording where its write-intent log starts: {e}");
            // `retire` takes `membership` itself.
            drop(membership);
            self.retire(&[(target.clone(), why.clone())]).await;
            return Err(self.rebuild_err(why));
        }
        self.resumes.forget(&target.name);
        self.changes.send_modify(|v| *v += 1);
        Ok(copied)
    }

    /// Copy `[at, end)` from an RW member to `target`; the caller holds the range lock.
    async fn copy_piece(
        &self,
        target: &Member,
        at: u64,
        end: u64,
        fresh: bool,
        over: Option<&str>,
    ) -> Result<u64, EngineError> {
        let len = (end - at) as u32;
        let mut last = String::from("no member is in sync");
        for source in self.read_order() {
            match self.copy_from(&source, target, at, len, fresh, over).await {
                Ok(n) => return Ok(n),
                // The target failed: the rebuild is over.
                Err((true, e)) => return Err(self.rebuild_err(e)),
                // The source could not be read: try the next one.
                Err((false, e)) => last = e,
            }
        }
        Err(self.rebuild_err(format!(
            "no member in sync could be read at {at}+{len}: {last}"
        )))
    }

    /// Errors say whether the target (true) or the source (false) failed.
    async fn copy_from(
        &self,
        source: &Member,
        target: &Member,
        at: u64,
        len: u32,
        fresh: bool,
        over: Option<&str>,
    ) -> Result<u64, (bool, String)> {
        let t = self.io_timeout;
        let src = source.client();
        // Over the last snapshot, on a target whose head was empty: a hole of this map is a
        // block the head does not hold (the snapshot's content, on the target already).
        let map_call = match over {
            Some(base) => {
                let p = zebu_proto::snapshot::encode_snapshot_delta("", Some(base), len);
                let mut c = Call::new(Op::SnapshotDelta, at, p.len() as u32);
                c.payload = Some(p.into());
                c.with_payload_crc()
            }
            None => Call::new(Op::Map, at, len),
        };
        let map = src
            .call(map_call, t)
            .await
            .map_err(|e| (false, e.to_string()))?;
        let extents = data::decode_map(&map).map_err(|e| (false, e.to_string()))?;
        let covered: u64 = extents.iter().map(|x| u64::from(x.length)).sum();
        if covered != u64::from(len) {
            // A map stops early only past 65536 extents, far more than one piece holds.
            return Err((
                false,
                format!("allocation map of {at}+{len} covers {covered} bytes"),
            ));
        }
        let mut copied = 0u64;
        let mut off = at;
        let send = |c: Call| async move {
            target.client().call(c, t).await.map_err(|e: ClientError| {
                if super::is_no_space(&e) {
                    target.no_space.store(true, Ordering::Release);
                }
                (true, e.to_string())
            })
        };
        // Where the target holds data now (a target that held nothing needs no zeroes): a
        // hole of the source is zeroed only there. Under the piece's range lock, so no live
        // write changes it meanwhile.
        let target_data: Vec<(u64, u64)> = if fresh || over.is_some() {
            Vec::new()
        } else {
            let map = target
                .client()
                .call(Call::new(Op::Map, at, len), t)
                .await
                .map_err(|e| (true, e.to_string()))?;
            let mut ranges = Vec::new();
            let mut o = at;
            for x in data::decode_map(&map).map_err(|e| (true, e.to_string()))? {
                if x.flags & EXTENT_HOLE == 0 {
                    ranges.push((o, o + u64::from(x.length)));
                }
                o += u64::from(x.length);
            }
            if o != at + u64::from(len) {
                // A short map: zero every hole of the source, as if the target held data.
                ranges = vec![(at, at + u64::from(len))];
            }
            ranges
        };
        for x in extents {
            let n = x.length;
            if over.is_some() && x.flags & EXTENT_HOLE == 0 && x.flags & data::EXTENT_ZERO != 0 {
                // Zeroes the head holds over the snapshot's data.
                send(Call::new(Op::WriteZeroes, off, n)).await?;
            } else if x.flags & EXTENT_HOLE != 0 {
                let end = off + u64::from(n);
                for &(s, e) in &target_data {
                    let (s, e) = (s.max(off), e.min(end));
                    if s < e {
                        send(Call::new(Op::WriteZeroes, s, (e - s) as u32)).await?;
                    }
                }
            } else {
                let good = src
                    .call(Call::new(Op::Read, off, n), t)
                    .await
                    .map_err(|e| (false, e.to_string()))?;
                for c in copy_calls(&good, off, self.block_size as usize) {
                    if c.op == Op::Write {
                        copied += u64::from(c.length);
                    }
                    send(c).await?;
                }
            }
            off += u64::from(n);
        }
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(copied_to: u64) -> Rebuild {
        Rebuild { base: 7, copied_to }
    }

    fn noted(r: &Resumes, target: &str, record: Rebuild) -> Option<Vec<u64>> {
        let mut v: Vec<u64> = r.changed_since(target, record)?.into_iter().collect();
        v.sort_unstable();
        Some(v)
    }

    #[test]
    fn notes_start_at_a_departure_and_take_every_extent_marked_after_it() {
        let r = Resumes::default();
        let d = r.departures("t");
        r.recorded("t", rec(64), d);
        r.marked(&[9]); // before it left: it took that write
        r.left("t", || vec![1, 2]);
        r.marked(&[3]);
        assert_eq!(noted(&r, "t", rec(64)), Some(vec![1, 2, 3]));
        r.forget("t");
        assert!(!r.tracking.load(Ordering::SeqCst));
        assert_eq!(noted(&r, "t", rec(64)), None);
    }

    #[test]
    fn a_record_answered_after_a_departure_drops_the_notes() {
        let r = Resumes::default();
        r.recorded("t", rec(64), r.departures("t"));
        // A record is sent; the target leaves before its reply comes.
        let d = r.departures("t");
        r.left("t", Vec::new);
        r.marked(&[5]);
        r.recorded("t", rec(128), d);
        // The record may or may not be on the target; either way no notes speak for it, not
        // even ones started at a later departure (they would miss the writes made before).
        assert!(r.lock().get("t").is_none());
        r.left("t", || vec![6]);
        assert_eq!(noted(&r, "t", rec(128)), None);
        assert_eq!(noted(&r, "t", rec(64)), None);
    }

    #[test]
    fn an_attempt_without_notes_drops_the_entry_so_later_notes_never_stand_in() {
        let r = Resumes::default();
        r.recorded("t", rec(64), r.departures("t"));
        // It failed without a departure being noted (RW then ERR at completion): the next
        // attempt finds no notes and must plan from the logs ...
        assert_eq!(noted(&r, "t", rec(64)), None);
        // ... and a departure of that attempt must not start notes that pass for the record.
        r.left("t", || vec![4]);
        assert_eq!(noted(&r, "t", rec(64)), None);
    }

    #[test]
    fn notes_of_another_record_are_not_used() {
        let r = Resumes::default();
        r.recorded("t", rec(64), r.departures("t"));
        r.left("t", || vec![1]);
        // The target's record was written by another engine since.
        assert_eq!(noted(&r, "t", rec(999)), None);
        assert_eq!(noted(&r, "t", rec(64)), None);
    }
}
