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
//! 2. Piece by piece (1 MiB), under the piece's range lock — so no live write to that piece
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use zebu_proto::data::{
    self, Op, EXTENT_HOLE, FLAG_WIL_REJOIN, WIL_CLEAN, WIL_DIRTY, WIL_EXTENT_BYTES,
};
use zebu_replica::wil::LogFacts;

use super::intents::extent_calls;

use super::{copy_calls, flush_timeout, Engine, EngineError, Member, Mode, ReplicaTarget};
use crate::backend::Backend;
use crate::client::{Call, ClientError, ReplicaClient};

/// Bytes copied under one range lock.
const PIECE_BYTES: u64 = 1 << 20;

/// How far a rebuild is (reported while the member is WO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildProgress {
    /// `"full"` (the whole volume) or `"delta"` (only the extents the write-intent log of a
    /// member in sync has marked since the target left).
    pub kind: &'static str,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// The ranges a rebuild copies.
struct Plan {
    kind: &'static str,
    ranges: Vec<(u64, u64)>,
}

impl Plan {
    fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}

/// What a finished rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildDone {
    pub kind: &'static str,
    /// Bytes of data written to the target (holes skipped are not counted).
    pub bytes_copied: u64,
    pub duration: Duration,
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
        let backend = match &target.in_process {
            Some(l) => l.open(self.epoch).await.map(Backend::Local),
            None => ReplicaClient::connect(
                &target.address,
                &self.volume,
                &target.name,
                self.epoch,
                &self.secret,
                self.io_timeout,
            )
            .await
            .map(Backend::Remote),
        }
        .map_err(|e| self.rebuild_err(format!("cannot reach the new replica: {e}")))?;
        let opened = backend.opened();
        if opened.size_bytes != self.size_bytes {
            return Err(self.rebuild_err(format!(
                "replica {} has size {} but the volume has {}",
                target.name, opened.size_bytes, self.size_bytes
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
        let member = {
            let _m = self.membership.lock().await;
            // Again under the lock: two rebuilds of one replica never both join.
            self.not_a_member(&target.name)?;
            // Its failed entry is replaced below: a retirement of it not recorded yet (a
            // cancelled request's) is finished first, or it would be forgotten.
            if self.all().iter().any(|m| {
                m.name == target.name && m.unrecorded.load(std::sync::atomic::Ordering::Acquire)
            }) {
                self.bump_generation().await;
                self.record_retirements(None).await?;
            }
            // Joining under `membership`: no retirement's generation bump is half done, and the
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
                    bytes_total: self.size_bytes,
                })),
                unrecorded: std::sync::atomic::AtomicBool::new(false),
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
            member
        };
        let plan = match self.plan(&member, fresh, left_at).await {
            Ok(p) => p,
            Err(e) => {
                self.mark_err(&member, &format!("its rebuild failed: {e}"));
                return Err(e);
            }
        };
        let kind = plan.kind;
        tracing::info!(volume = %self.volume, replica = %target.name, kind, bytes = plan.bytes(), "rebuild started");
        match self.copy_into(&member, &plan, fresh, rate, started).await {
            Ok(copied) => {
                let done = RebuildDone {
                    kind,
                    bytes_copied: copied,
                    duration: started.elapsed(),
                };
                tracing::info!(volume = %self.volume, replica = %target.name, kind, bytes_copied = copied, ms = done.duration.as_millis() as u64, "rebuild done: the replica is RW");
                Ok(done)
            }
            Err(e) => {
                self.mark_err(&member, &format!("its rebuild failed: {e}"));
                Err(e)
            }
        }
    }

    /// What to copy to `target` (joined as WO): the hot extents are marked on it first, so its
    /// own log holds every extent a crash could leave different once it is RW. A target that
    /// held data copies only the non-clean extents of a member whose write-intent log covers
    /// it (its generation is at least that log's `covers_from`); otherwise the whole volume.
    async fn plan(
        &self,
        target: &Arc<Member>,
        fresh: bool,
        target_generation: u64,
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
        let whole = Plan {
            kind: "full",
            ranges: vec![(0, self.size_bytes)],
        };
        let Some(own) = own else {
            return Ok(whole);
        };
        for m in self.read_order() {
            match self.read_log(&m).await {
                Ok(log) if log.facts.covers_from <= target_generation => {
                    let ranges = log
                        .states
                        .iter()
                        .zip(&own.states)
                        .enumerate()
                        .filter(|(_, (s, own))| **s != WIL_CLEAN || **own == WIL_DIRTY)
                        .map(|(e, _)| {
                            let start = e as u64 * WIL_EXTENT_BYTES;
                            (start, (start + WIL_EXTENT_BYTES).min(self.size_bytes))
                        })
                        .collect();
                    return Ok(Plan {
                        kind: "delta",
                        ranges,
                    });
                }
                Ok(log) => {
                    tracing::info!(volume = %self.volume, replica = %target.name, source = %m.name, covers_from = log.facts.covers_from, target_generation, "the source's write-intent log does not cover the returning replica (it was cleared since it left): copying the whole volume")
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume, source = %m.name, "reading the write-intent log: {e}")
                }
            }
        }
        Ok(whole)
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
        if let Some(p) = target
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            p.kind = plan.kind;
            p.bytes_total = plan.bytes();
        }
        let pieces = plan.ranges.iter().flat_map(|&(s, e)| {
            (s..e)
                .step_by(PIECE_BYTES as usize)
                .map(move |at| (at, (at + PIECE_BYTES).min(e)))
        });
        for (at, end) in pieces {
            {
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
                copied += self.copy_piece(target, at, end, fresh).await?;
            }
            walked += end - at;
            if let Some(p) = target
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                p.bytes_done = walked;
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
        let _m = self.membership.lock().await;
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
            self.retire(&[(target.clone(), why.clone())]).await;
            return Err(self.rebuild_err(why));
        }
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
    ) -> Result<u64, EngineError> {
        let len = (end - at) as u32;
        let mut last = String::from("no member is in sync");
        for source in self.read_order() {
            match self.copy_from(&source, target, at, len, fresh).await {
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
    ) -> Result<u64, (bool, String)> {
        let t = self.io_timeout;
        let src = source.client();
        let map = src
            .call(Call::new(Op::Map, at, len), t)
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
            target
                .client()
                .call(c, t)
                .await
                .map_err(|e: ClientError| (true, e.to_string()))
        };
        for x in extents {
            let n = x.length;
            if x.flags & EXTENT_HOLE != 0 {
                if !fresh {
                    send(Call::new(Op::WriteZeroes, off, n)).await?;
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
