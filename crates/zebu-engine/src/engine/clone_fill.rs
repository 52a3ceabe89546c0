//! A clone's engine: the volume is usable at once, while its content is copied in the
//! background from a snapshot of another volume (`docs/snapshots.md`, "Clone").
//!
//! Invariants, and why they hold:
//! 1. *A block is local or it is the source's.* The engine keeps a bit per block: set when the
//!    clone's replicas hold it (copied, or written by a client). A read of local blocks is a read
//!    of the members; of any other, a read of the source snapshot (READ_SNAPSHOT over a reader
//!    session, which fences nobody: a frozen layer never changes). So every block reads the
//!    snapshot's content until it is written, and what was written after.
//! 2. *Nothing written is lost, nothing is made from nothing.* A client's write, the copy's write
//!    of a piece and a read repair run under the engine's range lock, and the bit is set inside
//!    it once the members took the write, so the copy never overwrites a client's write (it
//!    re-reads the bits under the lock) and a client's write is never shadowed by the source. A
//!    write of part of a block that is not local first fetches the block from the source
//!    (read-modify-write). A trim or zeroing is written as zero *data*, never as a hole: a hole
//!    is what a block never written looks like, so after a restart it would read the source
//!    again.
//! 3. *A restart resumes.* The bits are rebuilt at start from the allocation maps of the members
//!    (the union: a block with data on any member in sync is local), so what was copied is not
//!    copied again and no client write is overwritten. Blocks the source holds as holes are
//!    never copied: they read as zeroes on both sides.
//! 4. *Done.* When every piece is walked, the members are flushed and the engine reports the
//!    copy complete: reads no longer go to the source. Zeroings go on writing zero data until
//!    the manager has recorded the clone done (it says so in the next assignment,
//!    [`Engine::clone_settled`]); an engine started after that has no clone at all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use zebu_proto::data::{self, MapExtent, Op, EXTENT_HOLE, EXTENT_ZERO};

use super::{settle_intent, Engine, EngineError, Mode, Via};
use crate::client::{Call, ReplicaClient};

/// Where a clone's content comes from.
#[derive(Debug, Clone)]
pub struct CloneSource {
    pub volume: String,
    pub snapshot: String,
    /// Replicas of the source volume that hold the snapshot: (name, `ip:port`).
    pub replicas: Vec<(String, String)>,
    /// Speed limit of the background copy, bytes per second of the source's data (0: none).
    pub rate: u64,
}

/// How far a clone's copy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneProgress {
    pub volume: String,
    pub snapshot: String,
    /// Bytes of the volume walked so far (copied, or found local or a hole on the source).
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Every block is local or a hole on the source: the clone no longer reads the source.
    pub copied: bool,
    /// Why the copy is waiting, if it is (the source out of reach): it is tried again.
    pub error: Option<String>,
}

/// A piece of the background copy.
const PIECE: u64 = 1 << 20;
/// What a MAP asks of a member at a time while the bits are built.
const MAP_SPAN: u64 = 1 << 30;

static ZEROS: [u8; PIECE as usize] = [0; PIECE as usize];

pub(super) struct Fill {
    src: CloneSource,
    block_size: u64,
    /// The volume's blocks at start; later ones (none: an expansion waits for the copy) count
    /// as local.
    blocks: u64,
    local: Vec<AtomicU64>,
    conn: tokio::sync::Mutex<Option<Arc<ReplicaClient>>>,
    /// The next source replica to try first.
    next: AtomicU64,
    copied: AtomicBool,
    settled: AtomicBool,
    done_bytes: AtomicU64,
    error: Mutex<Option<String>>,
}

impl Fill {
    pub(super) fn new(src: CloneSource, size_bytes: u64, block_size: u64) -> Fill {
        let blocks = size_bytes / block_size;
        Fill {
            src,
            block_size,
            blocks,
            local: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            conn: tokio::sync::Mutex::new(None),
            next: AtomicU64::new(0),
            copied: AtomicBool::new(false),
            settled: AtomicBool::new(false),
            done_bytes: AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }

    fn is_local(&self, block: u64) -> bool {
        block >= self.blocks
            || self.local[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    pub(super) fn all_local(&self, first: u64, end: u64) -> bool {
        (first..end).all(|b| self.is_local(b))
    }

    fn mark(&self, first: u64, end: u64) {
        for b in first..end.min(self.blocks) {
            self.local[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::AcqRel);
        }
    }

    fn set_error(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub(super) fn progress(&self) -> CloneProgress {
        CloneProgress {
            volume: self.src.volume.clone(),
            snapshot: self.src.snapshot.clone(),
            bytes_done: self.done_bytes.load(Ordering::Acquire),
            bytes_total: self.blocks * self.block_size,
            copied: self.copied.load(Ordering::Acquire),
            error: self.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

impl Engine {
    /// While the clone's copy runs: reads of blocks that are not local go to the source.
    pub(super) fn fill_reading(&self) -> Option<&Fill> {
        self.fill
            .as_ref()
            .filter(|f| !f.copied.load(Ordering::Acquire))
    }

    /// Until the manager recorded the clone done: writes set bits, zeroings write zero data.
    pub(super) fn fill_writing(&self) -> Option<&Fill> {
        self.fill
            .as_ref()
            .filter(|f| !f.settled.load(Ordering::Acquire))
    }

    /// The clone's copy, while this engine has one (`None`: an ordinary volume).
    pub fn clone_progress(&self) -> Option<CloneProgress> {
        self.fill.as_ref().map(Fill::progress)
    }

    /// The manager has recorded the clone done: from now on this is an ordinary volume. Only
    /// once the copy is complete (a record of done for an engine still copying is ignored).
    pub fn clone_settled(&self) {
        if let Some(f) = &self.fill {
            if f.copied.load(Ordering::Acquire) && !f.settled.swap(true, Ordering::AcqRel) {
                tracing::info!(volume = %self.volume, "the clone is recorded done: an ordinary volume from now on");
            }
        }
    }

    /// Why a snapshot, a deletion or a growth must wait: the clone's copy runs.
    pub(super) fn fill_busy(&self) -> Option<String> {
        let f = self.fill_reading()?;
        let p = f.progress();
        Some(format!(
            "volume {} is a clone of snapshot {} of volume {} still being copied ({}%)",
            self.volume,
            p.snapshot,
            p.volume,
            p.bytes_done * 100 / p.bytes_total.max(1)
        ))
    }

    /// At start: the bits from the members' allocation maps (a block with data on any member in
    /// sync is local).
    pub(super) async fn load_fill_map(&self) -> Result<(), EngineError> {
        let Some(f) = self.fill.as_ref() else {
            return Ok(());
        };
        let size = f.blocks * f.block_size;
        for m in self.all().iter().filter(|m| m.mode() == Mode::Rw) {
            let mut at = 0;
            while at < size {
                let n = (size - at).min(MAP_SPAN);
                let b = m
                    .client()
                    .call(Call::new(Op::Map, at, n as u32), self.io_timeout)
                    .await
                    .map_err(|e| EngineError::Start {
                        volume: self.volume.clone(),
                        reason: format!(
                            "reading replica {}'s allocation map for the clone's copy: {e}",
                            m.name
                        ),
                    })?;
                let map = data::decode_map(&b).map_err(|e| EngineError::Start {
                    volume: self.volume.clone(),
                    reason: format!("replica {} sent a bad allocation map: {e}", m.name),
                })?;
                let mut x = at;
                for e in map {
                    if e.flags & EXTENT_HOLE == 0 {
                        f.mark(x / f.block_size, (x + e.length as u64) / f.block_size);
                    }
                    x += e.length as u64;
                }
                at += n;
            }
        }
        Ok(())
    }

    /// One call to a replica of the source, over a reader session (opened on first need, and
    /// again on another replica when one fails).
    async fn source_call(&self, f: &Fill, call: Call) -> Result<Bytes, String> {
        let mut why = Vec::new();
        let count = f.src.replicas.len().max(1) as u64;
        for _ in 0..count {
            let client = {
                let mut conn = f.conn.lock().await;
                match conn.as_ref().filter(|c| !c.is_closed()) {
                    Some(c) => c.clone(),
                    None => {
                        *conn = None;
                        let i = f.next.fetch_add(1, Ordering::Relaxed) % count;
                        let Some((name, address)) = f.src.replicas.get(i as usize) else {
                            return Err("no replica of the source holds the snapshot".into());
                        };
                        match ReplicaClient::connect_reader(
                            address,
                            &f.src.volume,
                            name,
                            &self.secret,
                            self.data_tls,
                            self.io_timeout,
                        )
                        .await
                        {
                            Ok(c) => conn.insert(Arc::new(c)).clone(),
                            Err(e) => {
                                why.push(e.to_string());
                                continue;
                            }
                        }
                    }
                }
            };
            match client.call(call.clone(), self.io_timeout).await {
                Ok(b) => return Ok(b),
                Err(e) => {
                    why.push(e.to_string());
                    let mut conn = f.conn.lock().await;
                    if conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &client)) {
                        *conn = None;
                        f.next.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Err(why.join("; "))
    }

    fn source_error(&self, f: &Fill, why: String) -> EngineError {
        EngineError::NoReplicas {
            volume: self.volume.clone(),
            detail: format!(
                "this clone reads what it has not copied yet from snapshot {} of volume {}, and no replica of it answers: {why}",
                f.src.snapshot, f.src.volume
            ),
        }
    }

    /// `[offset, +length)` of the source snapshot.
    async fn read_source(
        &self,
        f: &Fill,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, EngineError> {
        let mut out = Vec::with_capacity(length as usize);
        while (out.len() as u64) < length {
            let at = offset + out.len() as u64;
            let n = (length - out.len() as u64).min(data::MAX_SNAPSHOT_READ_BYTES as u64) as u32;
            let payload = zebu_proto::snapshot::encode_read_snapshot(&f.src.snapshot, n);
            let mut call = Call::new(Op::ReadSnapshot, at, payload.len() as u32);
            call.payload = Some(payload.into());
            let b = self
                .source_call(f, call.with_payload_crc())
                .await
                .map_err(|w| self.source_error(f, w))?;
            if b.len() != n as usize {
                return Err(self.source_error(f, format!("{} bytes for a read of {n}", b.len())));
            }
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    /// A read while the copy runs: local runs from the members, the rest from the source.
    pub(super) async fn read_through(
        &self,
        via: Via<'_>,
        f: &Fill,
        offset: u64,
        length: u32,
    ) -> Result<Bytes, EngineError> {
        let bs = f.block_size;
        let end = offset + length as u64;
        let mut out = Vec::with_capacity(length as usize);
        let mut b = offset / bs;
        while b * bs < end {
            let local = f.is_local(b);
            let mut e = b + 1;
            while e * bs < end && f.is_local(e) == local {
                e += 1;
            }
            let (from, to) = ((b * bs).max(offset), (e * bs).min(end));
            if local {
                let n = (to - from) as u32;
                let (got, damaged) = self.read_like(via, Op::Read, from, n).await?;
                if !damaged.is_empty() {
                    self.repair(via, from, n, damaged).await?;
                }
                out.extend_from_slice(&got);
            } else {
                // The source reads whole blocks.
                let whole = self.read_source(f, b * bs, (e - b) * bs).await?;
                let skip = (from - b * bs) as usize;
                out.extend_from_slice(&whole[skip..skip + (to - from) as usize]);
            }
            b = e;
        }
        Ok(out.into())
    }

    /// A write while the clone is not done; the caller holds the intent and the range lock of
    /// `[s, e)`, the write's blocks. Partial edge blocks not local are filled from the source.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write_filling(
        &self,
        via: Via<'_>,
        f: &Fill,
        offset: u64,
        data: Bytes,
        flags: u8,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        let bs = f.block_size;
        let (s, e) = (
            offset / bs * bs,
            (offset + data.len() as u64).div_ceil(bs) * bs,
        );
        let (first, last) = (s / bs, e / bs - 1);
        let head_partial = offset != s && !f.is_local(first);
        let tail_partial = offset + data.len() as u64 != e && !f.is_local(last);
        let calls = if !head_partial && !tail_partial {
            vec![Call {
                op: Op::Write,
                flags,
                offset,
                length: data.len() as u32,
                payload: Some(data),
                payload_crc: None,
            }]
        } else {
            // Read-modify-write: the edge blocks as they read now, the data laid over them.
            let mut buf = vec![0u8; (e - s) as usize];
            for (block, partial) in [
                (first, offset != s),
                (last, offset + data.len() as u64 != e),
            ] {
                if !partial {
                    continue;
                }
                let at = block * bs;
                let old = if f.is_local(block) {
                    self.read_like(via, Op::Read, at, bs as u32)
                        .await?
                        .0
                        .to_vec()
                } else {
                    self.read_source(f, at, bs).await?
                };
                let i = (at - s) as usize;
                buf[i..i + bs as usize].copy_from_slice(&old);
            }
            let skip = (offset - s) as usize;
            buf[skip..skip + data.len()].copy_from_slice(&data);
            let buf = Bytes::from(buf);
            let piece = (data::MAX_PAYLOAD_BYTES as u64 / bs * bs) as usize;
            (0..buf.len())
                .step_by(piece)
                .map(|i| {
                    let j = (i + piece).min(buf.len());
                    Call {
                        op: Op::Write,
                        flags,
                        offset: s + i as u64,
                        length: (j - i) as u32,
                        payload: Some(buf.slice(i..j)),
                        payload_crc: None,
                    }
                })
                .collect()
        };
        for call in calls {
            self.replicate(via, call, timeout).await?;
        }
        f.mark(first, last + 1);
        Ok(())
    }

    /// A trim or zeroing while the clone is not done: zero data, piece by piece (see the module
    /// docs, invariant 2).
    pub(super) async fn zero_filling(
        &self,
        via: Via<'_>,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> Result<(), EngineError> {
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = (end - at).min(PIECE - at % PIECE);
            self.write_entered(via, at, Bytes::from_static(&ZEROS[..n as usize]), fua)
                .await?;
            at += n;
        }
        Ok(())
    }

    /// The background copy: piece by piece from the start, the source's data into blocks that
    /// are not local, paced to the source's `rate`. Ends when the copy is complete (the members
    /// flushed) or the engine stops serving; a source out of reach is tried again.
    pub(super) async fn run_fill(self: Arc<Self>) {
        let Some(f) = self.fill.as_ref() else {
            return;
        };
        let started = Instant::now();
        let size = f.blocks * f.block_size;
        let mut copied_bytes = 0u64;
        let mut at = f.done_bytes.load(Ordering::Acquire);
        let mut failures = 0u32;
        while at < size {
            if self.closed_reason().is_some() {
                return;
            }
            let n = (size - at).min(PIECE);
            match self.fill_piece(f, at, n).await {
                Ok(c) => {
                    failures = 0;
                    f.set_error(None);
                    copied_bytes += c;
                    at += n;
                    f.done_bytes.store(at, Ordering::Release);
                    if f.src.rate > 0 && c > 0 {
                        let due = Duration::from_secs_f64(copied_bytes as f64 / f.src.rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
                Err(EngineError::Closed { .. }) => return,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(volume = %self.volume, offset = at, "the clone's copy waits: {e}; tried again");
                    }
                    f.set_error(Some(e.to_string()));
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(failures.min(4))))
                        .await;
                }
            }
        }
        // Complete: durable on every member before it is reported.
        loop {
            if self.closed_reason().is_some() {
                return;
            }
            match self.flush().await {
                Ok(()) => break,
                Err(EngineError::Closed { .. }) => return,
                Err(e) => {
                    f.set_error(Some(format!("flushing after the copy: {e}")));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        f.copied.store(true, Ordering::Release);
        tracing::info!(volume = %self.volume, source = %f.src.volume, snapshot = %f.src.snapshot, bytes = copied_bytes, secs = started.elapsed().as_secs_f64(), "the clone's copy is complete");
    }

    /// Copy what the source holds of `[at, +n)` into the blocks that are not local; returns the
    /// bytes copied.
    async fn fill_piece(&self, f: &Fill, at: u64, n: u64) -> Result<u64, EngineError> {
        let _in = self.enter().await?;
        let bs = f.block_size;
        if f.all_local(at / bs, (at + n) / bs) {
            return Ok(0);
        }
        let payload = zebu_proto::snapshot::encode_snapshot_delta(&f.src.snapshot, None, n as u32);
        let mut call = Call::new(Op::SnapshotDelta, at, payload.len() as u32);
        call.payload = Some(payload.into());
        let b = self
            .source_call(f, call.with_payload_crc())
            .await
            .map_err(|w| self.source_error(f, w))?;
        let map: Vec<MapExtent> = data::decode_map(&b)
            .map_err(|e| self.source_error(f, format!("a bad allocation map: {e}")))?;
        let mut copied = 0;
        let mut x = at;
        for e in map {
            let (from, to) = (x, x + e.length as u64);
            x = to;
            // Holes and zero entries read as zeroes on the clone already.
            if e.flags & (EXTENT_HOLE | EXTENT_ZERO) != 0 {
                continue;
            }
            let intent = self.intend(&[], from, to - from).await?;
            let _g = self.ranges.lock(from, to).await;
            let r = self.fill_run(f, from, to).await;
            copied += settle_intent(r.map(|_| ()), intent).map(|()| to - from)?;
        }
        Ok(copied)
    }

    /// Under the range lock of `[from, to)`: the source's blocks into those not local.
    async fn fill_run(&self, f: &Fill, from: u64, to: u64) -> Result<(), EngineError> {
        let bs = f.block_size;
        let mut b = from / bs;
        let end = to / bs;
        while b < end {
            if f.is_local(b) {
                b += 1;
                continue;
            }
            let mut e = b + 1;
            while e < end && !f.is_local(e) {
                e += 1;
            }
            let bytes = self.read_source(f, b * bs, (e - b) * bs).await?;
            let call = Call {
                op: Op::Write,
                flags: 0,
                offset: b * bs,
                length: bytes.len() as u32,
                payload: Some(bytes.into()),
                payload_crc: None,
            };
            self.replicate(&[], call, self.io_timeout).await?;
            f.mark(b, e);
            b = e;
        }
        Ok(())
    }
}
