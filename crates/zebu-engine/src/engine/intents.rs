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
//! - **Resync at start.** Before an engine serves, the extents any RW member has dirty are
//!   copied from one member to the others (the local one if RW: every RW member has the same
//!   generation, so any is a valid choice). A block that fails its checksum there was torn by
//!   the crash (it is in a dirty extent): the source takes its data file content and rewrites
//!   its checksum (`FLAG_ADOPT_TORN`), so it reads its old or new content, never EIO.
//! - **Delta rejoin.** A returning member copies only the non-clean extents of a member whose
//!   log covers it (`covers_from <= its generation`); see `rebuild.rs`.

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

use super::{copy_calls, flush_timeout, Engine, EngineError, Member, Mode, Via};
use crate::client::Call;

/// Hot extents kept at most (4 GiB of volume): what a crash can leave to resync.
pub(super) const HOT_LIMIT: usize = 1024;
/// A hot extent idle this long is settled at the next tick.
pub(super) const SETTLE_IDLE: Duration = Duration::from_secs(2);
/// Extents asked for in one WIL_READ.
const READ_CHUNK: u64 = 1 << 20;
/// Bytes resynced in one step.
const RESYNC_PIECE: u64 = 1 << 20;

enum Hot {
    /// Marked on every member; `inflight` writes are in it now.
    Ready { inflight: u32, idle_since: Instant },
    /// Being marked or settled: wait for the value to turn true, then look again.
    Busy(watch::Receiver<bool>),
}

/// The hot extents of an engine.
#[derive(Default)]
pub(super) struct Intents {
    hot: Mutex<HashMap<u64, Hot>>,
}

impl Intents {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Hot>> {
        self.hot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Extents hot or being marked now (a member joining gets them marked too).
    pub(super) fn snapshot(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.lock().keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Held by a request while it writes into its extents.
pub(super) struct InFlight<'a> {
    intents: &'a Intents,
    extents: Vec<u64>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut hot = self.intents.lock();
        let now = Instant::now();
        for e in &self.extents {
            if let Some(Hot::Ready {
                inflight,
                idle_since,
            }) = hot.get_mut(e)
            {
                *inflight = inflight.saturating_sub(1);
                *idle_since = now;
            }
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
        let mut hot = self.intents.lock();
        for e in std::mem::take(&mut self.extents) {
            if ready {
                hot.insert(
                    e,
                    Hot::Ready {
                        inflight: 1,
                        idle_since: Instant::now(),
                    },
                );
            } else {
                hot.remove(&e);
            }
        }
        drop(hot);
        let _ = self.done.send(true);
    }
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        if !self.extents.is_empty() {
            let mut hot = self.intents.lock();
            for e in &self.extents {
                hot.remove(e);
            }
        }
        let _ = self.done.send(true);
    }
}

fn extent_call(op: Op, flags: u8, offset: u64, extents: &[u64]) -> Call {
    let payload = Bytes::from(data::encode_extents(extents));
    Call {
        op,
        flags,
        offset,
        length: payload.len() as u32,
        payload: Some(payload),
        payload_crc: None,
    }
}

/// A member's log: `covers_from` and one state per extent.
pub(super) struct Log {
    pub covers_from: u64,
    pub states: Vec<u8>,
}

impl Engine {
    fn extents(&self) -> u64 {
        self.size_bytes.div_ceil(WIL_EXTENT_BYTES)
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
        let first = offset / WIL_EXTENT_BYTES;
        let last = (offset + length.max(1) - 1) / WIL_EXTENT_BYTES;
        loop {
            let (tx, rx) = watch::channel(false);
            let mut wait = None;
            let mut mine = Vec::new();
            let mut others = Vec::new();
            {
                let mut hot = self.intents.lock();
                for e in first..=last {
                    if let Some(Hot::Busy(r)) = hot.get(&e) {
                        wait = Some(r.clone());
                        break;
                    }
                }
                if wait.is_none() {
                    for e in first..=last {
                        match hot.get_mut(&e) {
                            Some(Hot::Ready { inflight, .. }) => {
                                *inflight += 1;
                                others.push(e);
                            }
                            _ => {
                                hot.insert(e, Hot::Busy(rx.clone()));
                                mine.push(e);
                            }
                        }
                    }
                }
            }
            if let Some(mut r) = wait {
                let _ = r.wait_for(|done| *done).await;
                continue;
            }
            let mut guard = InFlight {
                intents: &self.intents,
                extents: others,
            };
            if mine.is_empty() {
                return Ok(guard);
            }
            let owned = Owned {
                intents: &self.intents,
                extents: mine.clone(),
                done: tx,
            };
            let call = extent_call(Op::WilMark, 0, 0, &mine);
            let res = self
                .replicate(via, call, flush_timeout(self.io_timeout))
                .await;
            owned.finish(res.is_ok());
            res?;
            guard.extents.extend(mine);
            return Ok(guard);
        }
    }

    /// Settle hot extents (see the module docs): those idle long enough and the oldest beyond
    /// the limit, or with `all` every idle one (a clean stop). The caller has entered the
    /// engine (or holds it exclusively). A failure leaves them marked on the members: more to
    /// resync later, never less.
    pub(super) async fn settle_intents(&self, all: bool) {
        let (tx, rx) = watch::channel(false);
        let picked: Vec<u64> = {
            let mut hot = self.intents.lock();
            let mut idle: Vec<(Instant, u64)> = hot
                .iter()
                .filter_map(|(e, h)| match h {
                    Hot::Ready {
                        inflight: 0,
                        idle_since,
                    } => Some((*idle_since, *e)),
                    _ => None,
                })
                .collect();
            idle.sort_unstable();
            let over = hot.len().saturating_sub(HOT_LIMIT);
            let picked: Vec<u64> = idle
                .iter()
                .enumerate()
                .filter(|(i, (t, _))| all || *i < over || t.elapsed() >= SETTLE_IDLE)
                .map(|(_, (_, e))| *e)
                .collect();
            for e in &picked {
                hot.insert(*e, Hot::Busy(rx.clone()));
            }
            picked
        };
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
        let call = extent_call(Op::WilSettle, flags, generation, &picked);
        let _ = self.replicate(&[], call, t).await;
        drop(owned);
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
        let mut covers_from = 0;
        let mut at = 0;
        while at < n {
            let count = (n - at).min(READ_CHUNK);
            let b = m
                .client()
                .call(Call::new(Op::WilRead, at, count as u32), self.io_timeout)
                .await
                .map_err(|e| e.to_string())?;
            if b.len() as u64 != 8 + count {
                return Err(format!(
                    "replica {}: a write-intent log read of {count} extents returned {} bytes",
                    m.name,
                    b.len()
                ));
            }
            covers_from = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
            states.extend_from_slice(&b[8..]);
            at += count;
        }
        Ok(Log {
            covers_from,
            states,
        })
    }

    /// Step "resync at start" of the module docs. Returns how many extents were resynced.
    pub(super) async fn resync(&self) -> Result<u64, EngineError> {
        let rw: Vec<Arc<Member>> = self
            .all()
            .iter()
            .filter(|m| m.mode() == Mode::Rw)
            .cloned()
            .collect();
        let logs = join_all(rw.iter().map(|m| self.read_log(m))).await;
        let mut dirty = vec![false; self.extents() as usize];
        let mut failed = Vec::new();
        for (m, log) in rw.iter().zip(logs) {
            match log {
                Ok(log) => {
                    for (d, s) in dirty.iter_mut().zip(&log.states) {
                        *d |= *s == WIL_DIRTY;
                    }
                }
                Err(e) => failed.push((m.clone(), format!("reading its write-intent log: {e}"))),
            }
        }
        if !failed.is_empty() {
            self.retire(&failed).await;
        }
        let dirty: Vec<u64> = (0..self.extents()).filter(|e| dirty[*e as usize]).collect();
        let t = flush_timeout(self.io_timeout);
        if !dirty.is_empty() {
            tracing::info!(volume = %self.volume, extents = dirty.len(), "an unclean stop left extents that may differ between replicas: resyncing them before serving");
            'sources: loop {
                let mut order = self.read_order();
                if let Some(i) = order.iter().position(|m| m.local) {
                    let l = order.remove(i);
                    order.insert(0, l);
                }
                let Some(source) = order.first().cloned() else {
                    return Err(self.no_replicas());
                };
                for e in &dirty {
                    let start = e * WIL_EXTENT_BYTES;
                    let end = (start + WIL_EXTENT_BYTES).min(self.size_bytes);
                    let mut at = start;
                    while at < end {
                        let n = (end - at).min(RESYNC_PIECE);
                        if let Err(why) = self.resync_piece(&source, at, n as u32).await {
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
            let call = extent_call(Op::WilSettle, FLAG_WIL_ALL, self.generation(), &[]);
            self.replicate(&[], call, t).await?;
        } else if !dirty.is_empty() {
            let call = extent_call(Op::WilSettle, FLAG_WIL_CHANGED, 0, &dirty);
            self.replicate(&[], call, t).await?;
        }
        Ok(dirty.len() as u64)
    }

    /// Make `[at, +len)` of every other RW member what it is on `source`. A target that fails
    /// is retired; a source that fails is reported (the caller picks another).
    async fn resync_piece(&self, source: &Member, at: u64, len: u32) -> Result<(), String> {
        let t = self.io_timeout;
        let src = source.client();
        let map = src
            .call(Call::new(Op::Map, at, len), t)
            .await
            .map_err(|e| e.to_string())?;
        let extents = data::decode_map(&map).map_err(|e| e.to_string())?;
        let targets: Vec<Arc<Member>> = self
            .all()
            .iter()
            .filter(|m| m.mode() == Mode::Rw && m.index != source.index)
            .cloned()
            .collect();
        let mut off = at;
        for x in extents {
            let calls = if x.flags & EXTENT_HOLE != 0 {
                vec![Call::new(Op::WriteZeroes, off, x.length)]
            } else {
                let mut read = Call::new(Op::Read, off, x.length);
                read.flags = FLAG_ADOPT_TORN;
                let good = src.call(read, t).await.map_err(|e| e.to_string())?;
                copy_calls(&good, off, self.block_size as usize)
            };
            let results = join_all(targets.iter().map(|m| {
                let calls = calls.clone();
                async move {
                    for c in calls {
                        m.client().call(c, t).await?;
                    }
                    Ok::<(), crate::client::ClientError>(())
                }
            }))
            .await;
            let failed: Vec<(Arc<Member>, String)> = targets
                .iter()
                .zip(results)
                .filter_map(|(m, r)| {
                    r.err()
                        .map(|e| (m.clone(), format!("resyncing it after a crash: {e}")))
                })
                .collect();
            if !failed.is_empty() {
                self.retire(&failed).await;
            }
            off += u64::from(x.length);
        }
        Ok(())
    }
}
