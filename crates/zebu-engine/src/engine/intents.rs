//! The write-intent log, engine side (the replica side and the states: `zebu_replica::wil`).
//!
//! - **Mark before the first write.** A write, zeroing or trim first makes sure every extent it
//!   touches is *hot*: one that is not gets a WIL_MARK on every member that takes writes (RW
//!   and WO), durable before the write is sent anywhere. Writers of an extent being marked wait
//!   for that mark; a hot extent costs nothing more.
//! - **Settle after a flush.** Each keepalive tick, hot extents idle for [`SETTLE_IDLE`] (and
//!   the least recently used beyond [`HOT_LIMIT`]) are settled: they are closed to new writes,
//!   every member is flushed, and they become clean (every member of the volume RW) or changed
//!   (one is away: the extents it must catch up on). Settling to clean records the generation
//!   from which the log covers every member (`covers_from`).
//!   Settles go to RW members only: a rebuilding member's log must not claim to cover anyone.
//! - **A request that did not complete** (an error, or its future dropped when a client went
//!   away) may have reached some members and not others. Its extents become *suspect*: never
//!   settled until the next tick has resynced them online (piece by piece, under the range lock)
//!   from one RW member to the others.
//! - **Resync at start.** Before an engine serves, the extents any RW member has dirty are made
//!   identical on every RW member from one source: one whose machine did not reboot since its
//!   last mark (its page cache still holds every write it took), the local one first. A block
//!   that fails its checksum on the source is taken from another member with a valid copy (the
//!   others get it too); only when no member has one is it a write torn everywhere, and the
//!   member that has the extent dirty in its own log takes its data file content and rewrites
//!   its checksum (`FLAG_ADOPT_TORN`): it reads its old or new content, never EIO.
//! - **Delta rejoin.** A returning member copies only the non-clean extents of a member whose
//!   log covers it (`covers_from <= ` the generation it had when it first rejoined); see
//!   `rebuild.rs`. When the engine starts above the freshest member it reached (a salvage chose
//!   an older replica), no log covers the replicas left out: they are marked covering nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::watch;
use zebu_proto::data::{
    self, Op, EXTENT_HOLE, FLAG_ADOPT_TORN, FLAG_WIL_ALL, FLAG_WIL_CHANGED, WIL_DIRTY,
    WIL_EXTENT_BYTES,
};

use zebu_replica::wil::{LogFacts, COVERS_NOTHING, READ_HEADER_BYTES};

use super::{
    copy_calls, flush_timeout, is_damage, is_stale, Engine, EngineError, Member, Mode, Via,
};
use crate::client::{Call, ClientError};

/// Hot extents kept at most (4 GiB of volume): what a crash can leave to resync.
pub(super) const HOT_LIMIT: usize = 1024;
/// A hot extent idle this long is settled at the next tick.
pub(super) const SETTLE_IDLE: Duration = Duration::from_secs(2);
/// Extents asked for in one WIL_READ.
const READ_CHUNK: u64 = 1 << 20;
/// Bytes resynced in one step.
const RESYNC_PIECE: u64 = 1 << 20;

enum Hot {
    /// Marked on every member; `inflight` writes are in it now; `suspect`: a request in it did
    /// not complete, so the members may differ there.
    Ready {
        inflight: u32,
        idle_since: Instant,
        suspect: bool,
    },
    /// Being marked or settled: wait for the value to turn true, then look again.
    Busy(watch::Receiver<bool>),
}

/// The hot extents of an engine.
/// The hot set is split by extent number, so writers of different extents never share a lock.
const SHARDS: usize = 64;

/// The hot extents of an engine.
pub(super) struct Intents {
    shards: Box<[Mutex<HashMap<u64, Hot>>]>,
}

impl Default for Intents {
    fn default() -> Intents {
        Intents {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

type Shard<'a> = std::sync::MutexGuard<'a, HashMap<u64, Hot>>;

impl Intents {
    fn shard(&self, e: u64) -> Shard<'_> {
        self.shards[(e % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn shards(&self) -> impl Iterator<Item = Shard<'_>> {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Extents hot or being marked now (a member joining gets them marked too).
    pub(super) fn snapshot(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .shards()
            .flat_map(|s| s.keys().copied().collect::<Vec<_>>())
            .collect();
        v.sort_unstable();
        v
    }

    fn len(&self) -> usize {
        self.shards().map(|s| s.len()).sum()
    }
}

/// Held by a request while it writes into its extents; [`InFlight::complete`] once every
/// member in the set took it.
pub(super) struct InFlight<'a> {
    intents: &'a Intents,
    /// The extents it counts in: `first..=last` (fast path), plus `extents` (slow path).
    first: u64,
    last: u64,
    extents: Vec<u64>,
    completed: bool,
}

impl InFlight<'_> {
    pub(super) fn complete(mut self) {
        self.completed = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        let leave = |e: u64| {
            if let Some(Hot::Ready {
                inflight,
                idle_since,
                suspect,
            }) = self.intents.shard(e).get_mut(&e)
            {
                *inflight = inflight.saturating_sub(1);
                *idle_since = now;
                *suspect |= !self.completed;
            }
        };
        // An empty range when first > last.
        for e in self.first..=self.last {
            leave(e);
        }
        for e in &self.extents {
            leave(*e);
        }
    }
}

/// Extents this task made busy (marking or settling): if it ends without finishing (an error,
/// or a cancelled request), they are dropped from the hot set and their waiters woken, so they
/// are marked again by the next writer.
struct Owned<'a> {
    intents: &'a Intents,
    extents: Vec<u64>,
    done: watch::Sender<bool>,
}

impl Owned<'_> {
    fn finish(mut self, ready: bool) {
        for e in std::mem::take(&mut self.extents) {
            let mut hot = self.intents.shard(e);
            if ready {
                hot.insert(
                    e,
                    Hot::Ready {
                        inflight: 1,
                        idle_since: Instant::now(),
                        suspect: false,
                    },
                );
            } else {
                hot.remove(&e);
            }
        }
        let _ = self.done.send(true);
    }
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        for e in &self.extents {
            self.intents.shard(*e).remove(e);
        }
        let _ = self.done.send(true);
    }
}

/// Extents sent in one WIL_MARK or WIL_SETTLE (8 MiB of payload).
const EXTENTS_PER_CALL: usize = 1 << 20;

/// WIL_MARK or WIL_SETTLE calls for `extents`, in pieces the protocol takes (one, empty, for
/// an empty list).
pub(super) fn extent_calls(op: Op, flags: u8, offset: u64, extents: &[u64]) -> Vec<Call> {
    let call = |list: &[u64]| {
        let payload = Bytes::from(data::encode_extents(list));
        Call {
            op,
            flags,
            offset,
            length: payload.len() as u32,
            payload: Some(payload),
            payload_crc: None,
        }
    };
    if extents.is_empty() {
        return vec![call(&[])];
    }
    extents.chunks(EXTENTS_PER_CALL).map(call).collect()
}

/// A member's log.
pub(super) struct Log {
    pub facts: LogFacts,
    pub states: Vec<u8>,
}

impl Engine {
    fn extents(&self) -> u64 {
        self.size_bytes().div_ceil(WIL_EXTENT_BYTES)
    }

    /// Every member of the volume is in the set: settled extents become clean.
    pub(super) fn all_present(&self) -> bool {
        let all = self.all();
        let rw = all.iter().filter(|m| m.mode() == Mode::Rw).count();
        rw >= self.replica_count && !all.iter().any(|m| m.mode() == Mode::Wo)
    }

    /// Make the extents of `[offset, +length)` hot before a mutation of them (see the module
    /// docs); the returned guard marks them in flight until dropped.
    pub(super) async fn intend(
        &self,
        via: Via<'_>,
        offset: u64,
        length: u64,
    ) -> Result<InFlight<'_>, EngineError> {
        match self.intend_hot(offset, length) {
            Some(g) => Ok(g),
            // Boxed: the marking path is rare, and the request's future stays small without it.
            None => Box::pin(self.intend_slow(via, offset, length)).await,
        }
    }

    /// The fast path: every extent is hot already. Counts the request in all of them, or in none
    /// (and returns None) if one is not.
    fn intend_hot(&self, offset: u64, length: u64) -> Option<InFlight<'_>> {
        let first = offset / WIL_EXTENT_BYTES;
        let last = (offset + length.max(1) - 1) / WIL_EXTENT_BYTES;
        for e in first..=last {
            let mut hot = self.intents.shard(e);
            match hot.get_mut(&e) {
                Some(Hot::Ready { inflight, .. }) => *inflight += 1,
                _ => {
                    drop(hot);
                    // Undo the counts taken so far (nothing was written: not suspect).
                    if e > first {
                        drop(InFlight {
                            intents: &self.intents,
                            first,
                            last: e - 1,
                            extents: Vec::new(),
                            completed: true,
                        });
                    }
                    return None;
                }
            }
        }
        Some(InFlight {
            intents: &self.intents,
            first,
            last,
            extents: Vec::new(),
            completed: false,
        })
    }

    async fn intend_slow(
        &self,
        via: Via<'_>,
        offset: u64,
        length: u64,
    ) -> Result<InFlight<'_>, EngineError> {
        let first = offset / WIL_EXTENT_BYTES;
        let last = (offset + length.max(1) - 1) / WIL_EXTENT_BYTES;
        let (tx, rx) = watch::channel(false);
        let mut guard = InFlight {
            intents: &self.intents,
            first: 1,
            last: 0,
            extents: Vec::new(),
            completed: false,
        };
        let mut owned = Owned {
            intents: &self.intents,
            extents: Vec::new(),
            done: tx,
        };
        // In ascending order, one extent at a time: a request waits only for extents above
        // those it holds, so two requests never wait for each other.
        for e in first..=last {
            loop {
                let wait = {
                    let mut hot = self.intents.shard(e);
                    match hot.get_mut(&e) {
                        Some(Hot::Ready { inflight, .. }) => {
                            *inflight += 1;
                            guard.extents.push(e);
                            None
                        }
                        Some(Hot::Busy(r)) => Some(r.clone()),
                        None => {
                            hot.insert(e, Hot::Busy(rx.clone()));
                            owned.extents.push(e);
                            None
                        }
                    }
                };
                match wait {
                    Some(mut r) => {
                        let _ = r.wait_for(|done| *done).await;
                    }
                    None => break,
                }
            }
        }
        if owned.extents.is_empty() {
            return Ok(guard);
        }
        // After they are in the hot set (see `Resumes::left`), before any write is sent.
        self.resumes.marked(&owned.extents);
        let mine = owned.extents.clone();
        let mut res = Ok(());
        for call in extent_calls(Op::WilMark, 0, 0, &mine) {
            res = self
                .replicate(via, call, flush_timeout(self.io_timeout))
                .await;
            if res.is_err() {
                break;
            }
        }
        owned.finish(res.is_ok());
        if let Err(e) = res {
            // Nothing was written: the extents it held are no more suspect than before.
            guard.completed = true;
            return Err(e);
        }
        guard.extents.extend(mine);
        Ok(guard)
    }

    /// Send `calls` to every RW member (only those: see the module docs), retiring members
    /// that fail. Fails if none took them.
    async fn call_rw(&self, calls: Vec<Call>) -> Result<(), EngineError> {
        let t = flush_timeout(self.io_timeout);
        for call in calls {
            let set: Vec<Arc<Member>> = self
                .all()
                .iter()
                .filter(|m| m.mode() == Mode::Rw)
                .cloned()
                .collect();
            let results = join_all(set.iter().map(|m| m.client().call(call.clone(), t))).await;
            let mut failed = Vec::new();
            for (m, r) in set.iter().zip(results) {
                match r {
                    Ok(_) => {}
                    Err(e) if is_stale(&e) => return Err(self.fenced(&e)),
                    Err(e) => failed.push((m.clone(), format!("its write-intent log: {e}"))),
                }
            }
            if !failed.is_empty() {
                self.retire(&failed).await;
            }
            if failed.len() == set.len() {
                return Err(self.no_replicas());
            }
        }
        Ok(())
    }

    /// Settle hot extents (see the module docs): those idle long enough and the oldest beyond
    /// the limit, or with `all` every idle one (a clean stop). Suspect ones are resynced first.
    /// The caller has entered the engine (or holds it exclusively). A failure leaves them
    /// marked on the members: more to resync later, never less.
    pub(super) async fn settle_intents(&self, all: bool) {
        let suspects: Vec<u64> = self
            .intents
            .shards()
            .flat_map(|hot| {
                hot.iter()
                    .filter(|(_, h)| {
                        matches!(
                            h,
                            Hot::Ready {
                                inflight: 0,
                                suspect: true,
                                ..
                            }
                        )
                    })
                    .map(|(e, _)| *e)
                    .collect::<Vec<_>>()
            })
            .collect();
        let set_suspect = |e: u64, to: bool| {
            if let Some(Hot::Ready { suspect, .. }) = self.intents.shard(e).get_mut(&e) {
                *suspect = to;
            }
        };
        for e in suspects {
            // Cleared first: a request that fails during the resync marks it again.
            set_suspect(e, false);
            if let Err(why) = self.resync_online(e).await {
                set_suspect(e, true);
                tracing::warn!(volume = %self.volume, extent = e, "resyncing an extent a failed request left: {why}");
                return;
            }
        }
        let (tx, rx) = watch::channel(false);
        let mut idle: Vec<(Instant, u64)> = self
            .intents
            .shards()
            .flat_map(|hot| {
                hot.iter()
                    .filter_map(|(e, h)| match h {
                        Hot::Ready {
                            inflight: 0,
                            idle_since,
                            suspect: false,
                        } => Some((*idle_since, *e)),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        idle.sort_unstable();
        let over = self.intents.len().saturating_sub(HOT_LIMIT);
        let mut picked = Vec::new();
        for (i, (t, e)) in idle.into_iter().enumerate() {
            if !(all || i < over || t.elapsed() >= SETTLE_IDLE) {
                continue;
            }
            // Again under the shard's lock: a request may have entered it since.
            let mut hot = self.intents.shard(e);
            if matches!(
                hot.get(&e),
                Some(Hot::Ready {
                    inflight: 0,
                    suspect: false,
                    ..
                })
            ) {
                hot.insert(e, Hot::Busy(rx.clone()));
                picked.push(e);
            }
        }
        if picked.is_empty() {
            return;
        }
        let owned = Owned {
            intents: &self.intents,
            extents: picked.clone(),
            done: tx,
        };
        let t = flush_timeout(self.io_timeout);
        // Every write into them completed on every member that took it: make them durable.
        if self
            .replicate(&[], Call::new(Op::Flush, 0, 0), t)
            .await
            .is_err()
        {
            return;
        }
        // Judged after the flush: a member that failed it has left by now.
        let (flags, generation) = if self.all_present() {
            (0, self.generation())
        } else {
            (FLAG_WIL_CHANGED, 0)
        };
        let _ = self
            .call_rw(extent_calls(Op::WilSettle, flags, generation, &picked))
            .await;
        drop(owned);
    }

    /// Make extent `e` identical on every RW member while the engine serves, piece by piece
    /// under the range lock (no write to a piece runs meanwhile).
    async fn resync_online(&self, e: u64) -> Result<(), String> {
        let start = e * WIL_EXTENT_BYTES;
        let end = (start + WIL_EXTENT_BYTES).min(self.size_bytes());
        let mut at = start;
        while at < end {
            let n = (end - at).min(RESYNC_PIECE);
            let _piece = self.ranges.lock(at, at + n).await;
            let Some(source) = self.read_order().into_iter().next() else {
                return Err("no member is in sync".into());
            };
            if let Err(why) = self.resync_piece(&source, at, n as u32, &[]).await {
                self.retire(&[(source.clone(), why.clone())]).await;
                return Err(why);
            }
            at += n;
        }
        Ok(())
    }

    /// The keepalive's turn at settling (while the engine serves).
    pub(super) async fn settle_tick(&self) {
        if let Ok(_serving) = self.enter().await {
            self.settle_intents(false).await;
        }
    }

    /// Read `m`'s whole log.
    pub(super) async fn read_log(&self, m: &Member) -> Result<Log, String> {
        let n = self.extents();
        let mut states = Vec::with_capacity(n as usize);
        let mut facts = None;
        let mut at = 0;
        while at < n {
            let count = (n - at).min(READ_CHUNK);
            let b = m
                .client()
                .call(Call::new(Op::WilRead, at, count as u32), self.io_timeout)
                .await
                .map_err(|e| e.to_string())?;
            if b.len() as u64 != READ_HEADER_BYTES as u64 + count {
                return Err(format!(
                    "replica {}: a write-intent log read of {count} extents returned {} bytes",
                    m.name,
                    b.len()
                ));
            }
            facts = LogFacts::decode(&b);
            states.extend_from_slice(&b[READ_HEADER_BYTES..]);
            at += count;
        }
        // Every volume has at least one extent, so at least one read was made.
        let facts =
            facts.ok_or_else(|| format!("replica {}: an empty write-intent log", m.name))?;
        Ok(Log { facts, states })
    }

    /// Step "resync at start" of the module docs. `floor_above`: the engine started above the
    /// freshest member it reached. Returns how many extents were resynced.
    pub(super) async fn resync(&self, floor_above: bool) -> Result<u64, EngineError> {
        let rw: Vec<Arc<Member>> = self
            .all()
            .iter()
            .filter(|m| m.mode() == Mode::Rw)
            .cloned()
            .collect();
        let logs = join_all(rw.iter().map(|m| self.read_log(m))).await;
        let mut dirty = vec![false; self.extents() as usize];
        let mut failed = Vec::new();
        let mut logs_ok: Vec<(Arc<Member>, Log)> = Vec::new();
        for (m, log) in rw.iter().zip(logs) {
            match log {
                Ok(log) => {
                    for (d, s) in dirty.iter_mut().zip(&log.states) {
                        *d |= *s == WIL_DIRTY;
                    }
                    logs_ok.push((m.clone(), log));
                }
                Err(e) => failed.push((m.clone(), format!("reading its write-intent log: {e}"))),
            }
        }
        if !failed.is_empty() {
            self.retire(&failed).await;
        }
        let t = flush_timeout(self.io_timeout);
        if floor_above {
            // A fresher replica than any here exists: no log here covers it (nor any replica
            // left out), whatever they said before.
            self.call_rw(extent_calls(Op::WilSettle, 0, COVERS_NOTHING, &[]))
                .await?;
        }
        let dirty: Vec<u64> = (0..self.extents()).filter(|e| dirty[*e as usize]).collect();
        if !dirty.is_empty() {
            tracing::info!(volume = %self.volume, extents = dirty.len(), "an unclean stop left extents that may differ between replicas: resyncing them before serving");
            'sources: loop {
                // Sources whose page cache is intact first (their machine did not reboot), the
                // local one first among equals.
                let mut order: Vec<(Arc<Member>, bool)> = self
                    .read_order()
                    .into_iter()
                    .map(|m| {
                        let intact = logs_ok
                            .iter()
                            .any(|(l, log)| l.index == m.index && log.facts.cache_intact);
                        (m, intact)
                    })
                    .collect();
                order.sort_by_key(|(m, intact)| (!intact, !m.local));
                let Some((source, _)) = order.first().cloned() else {
                    return Err(self.no_replicas());
                };
                for e in &dirty {
                    // Members that have this extent dirty in their own log: only they may hold
                    // a torn write there.
                    let torn_ok: Vec<usize> = logs_ok
                        .iter()
                        .filter(|(_, log)| log.states[*e as usize] == WIL_DIRTY)
                        .map(|(m, _)| m.index)
                        .collect();
                    let start = e * WIL_EXTENT_BYTES;
                    let end = (start + WIL_EXTENT_BYTES).min(self.size_bytes());
                    let mut at = start;
                    while at < end {
                        let n = (end - at).min(RESYNC_PIECE);
                        if let Err(why) = self.resync_piece(&source, at, n as u32, &torn_ok).await {
                            self.retire(&[(source.clone(), why)]).await;
                            continue 'sources;
                        }
                        at += n;
                    }
                }
                break;
            }
        }
        self.replicate(&[], Call::new(Op::Flush, 0, 0), t).await?;
        if self.all_present() {
            // Every member is here and identical: the log starts clean, covering from now.
            self.call_rw(extent_calls(
                Op::WilSettle,
                FLAG_WIL_ALL,
                self.generation(),
                &[],
            ))
            .await?;
        } else if !dirty.is_empty() {
            self.call_rw(extent_calls(Op::WilSettle, FLAG_WIL_CHANGED, 0, &dirty))
                .await?;
        }
        Ok(dirty.len() as u64)
    }

    /// Make `[at, +len)` of every other RW member what it is on `source` (see the module
    /// docs; `torn_ok`: the members that may take a torn block's data file content). A target
    /// that fails is retired; a source that fails is reported (the caller picks another).
    async fn resync_piece(
        &self,
        source: &Member,
        at: u64,
        len: u32,
        torn_ok: &[usize],
    ) -> Result<(), String> {
        let t = self.io_timeout;
        let src = source.client();
        let map = src
            .call(Call::new(Op::Map, at, len), t)
            .await
            .map_err(|e| e.to_string())?;
        let extents = data::decode_map(&map).map_err(|e| e.to_string())?;
        let mut off = at;
        for x in extents {
            if x.flags & EXTENT_HOLE != 0 {
                self.put_others(source.index, &[Call::new(Op::WriteZeroes, off, x.length)])
                    .await;
            } else {
                match src.call(Call::new(Op::Read, off, x.length), t).await {
                    Ok(good) => {
                        let calls = copy_calls(&good, off, self.block_size as usize);
                        self.put_others(source.index, &calls).await;
                    }
                    Err(e) if is_damage(&e) => {
                        self.resync_blocks(source, off, x.length, torn_ok).await?;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            off += u64::from(x.length);
        }
        Ok(())
    }

    /// Block by block, for a range the source failed to read cleanly: each block from the
    /// first member with a valid copy (the source first), sent to every other RW member; a
    /// block no member holds validly is adopted (data file content) by the first member in
    /// `torn_ok` and sent from there.
    async fn resync_blocks(
        &self,
        source: &Member,
        at: u64,
        len: u32,
        torn_ok: &[usize],
    ) -> Result<(), String> {
        let t = self.io_timeout;
        let bs = self.block_size;
        let end = at + u64::from(len);
        let mut b = at;
        while b < end {
            let mut order: Vec<Arc<Member>> = self.read_order();
            if let Some(i) = order.iter().position(|m| m.index == source.index) {
                let s = order.remove(i);
                order.insert(0, s);
            }
            let mut found = None;
            for m in &order {
                match m.client().call(Call::new(Op::Read, b, bs as u32), t).await {
                    Ok(d) => {
                        found = Some((m.index, d));
                        break;
                    }
                    Err(e) if is_damage(&e) => continue,
                    Err(e) if m.index == source.index => return Err(e.to_string()),
                    Err(e) => {
                        self.retire(&[(m.clone(), format!("resyncing it after a crash: {e}"))])
                            .await
                    }
                }
            }
            if found.is_none() {
                for m in order.iter().filter(|m| torn_ok.contains(&m.index)) {
                    let mut read = Call::new(Op::Read, b, bs as u32);
                    read.flags = FLAG_ADOPT_TORN;
                    if let Ok(d) = m.client().call(read, t).await {
                        tracing::warn!(volume = %self.volume, replica = %m.name, offset = b, "a block torn on every replica takes the data file content of one that had its extent marked");
                        found = Some((m.index, d));
                        break;
                    }
                }
            }
            match found {
                Some((from, d)) => {
                    let calls = copy_calls(&d, b, bs as usize);
                    self.put_others(from, &calls).await;
                }
                None => {
                    tracing::error!(volume = %self.volume, offset = b, "a block fails its checksum on every replica and none had its extent marked: it is damaged, not torn, and stays an error");
                }
            }
            b += bs;
        }
        Ok(())
    }

    /// Send `calls` to every RW member but `except` (an index), retiring those that fail.
    async fn put_others(&self, except: usize, calls: &[Call]) {
        let t = self.io_timeout;
        let targets: Vec<Arc<Member>> = self
            .all()
            .iter()
            .filter(|m| m.mode() == Mode::Rw && m.index != except)
            .cloned()
            .collect();
        let results = join_all(targets.iter().map(|m| async move {
            for c in calls {
                m.client().call(c.clone(), t).await?;
            }
            Ok::<(), ClientError>(())
        }))
        .await;
        let failed: Vec<(Arc<Member>, String)> = targets
            .iter()
            .zip(results)
            .filter_map(|(m, r)| r.err().map(|e| (m.clone(), format!("resyncing it: {e}"))))
            .collect();
        if !failed.is_empty() {
            self.retire(&failed).await;
        }
    }
}
