//! Layered, checksummed replica storage.
//!
//! A replica directory holds `replica.meta` and, for every layer of the chain, a sparse data file
//! (`layer-<id>.data`, block `b` at byte `b * block_size`) and an index file (`layer-<id>.idx`:
//! a 4096-byte header, then one 8-byte entry per block). An entry says whether the layer holds
//! the block's data (with its CRC32C) or holds it as zeroes (masking older layers), or does not
//! hold it at all (fall through to the layer below). Reads resolve a block with one lookup in
//! an in-memory merged map of the live path (block -> the entry and the layer deciding it),
//! whatever the chain's length; only blocks ever written cost memory.
//!
//! Concurrency: all methods take `&self` and are called from many I/O threads at once. Writers
//! take a striped lock over the blocks they touch (so partial-block read-modify-writes and index
//! updates of one block never interleave); readers take no lock and verify every block's
//! checksum, re-reading under the lock only when a check fails (a write may have been between
//! its data and its index update) before declaring corruption.
//!
//! Durability: data and index are written with positioned I/O; FLUSH (or a FUA write) runs
//! `fdatasync` on both files of the head. A failed fsync poisons the replica: every later request
//! fails, because the kernel may have dropped the dirty pages and a retry could pretend success.
//!
//! Snapshots, merges, reverts and growth are in `store/snapshot.rs` and `store/grow.rs`. Memory:
//! the merged map costs 32 KiB per 16 MiB of volume holding a written block (a chunk of 4096
//! entries), plus a fixed 96 KiB table and 96 KiB per 64 GiB group holding a chunk (it covers
//! 2^36 blocks from the start, so a volume grows with no copy of it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, Weak};

use zebu_proto::data::{MapExtent, EXTENT_HOLE, EXTENT_ZERO};

use crate::error::ReplicaError;
use crate::file::FileLayer;
use crate::meta::{LayerMeta, ReplicaMeta};
use crate::wil::IntentLog;

mod grow;
mod layer;
mod snapshot;

use layer::{
    entry_of, layer_file_id, layer_paths, pack, slot_of, write_in_pieces, BlockIndex, Layer,
    CHUNK_ENTRIES,
};
pub use layer::{ENTRY_PRESENT, ENTRY_ZERO, INDEX_FORMAT_VERSION, INDEX_HEADER_BYTES, INDEX_MAGIC};
pub use snapshot::{LayerInfo, MergeProgress, SnapshotSpec, SnapshotView};

/// The default block size of new replicas.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

const LOCK_STRIPES: usize = 512;
/// Blocks covered by one lock stripe.
const STRIPE_BLOCKS: u64 = 64;

/// The open layers of the live path (the head and its ancestors), by slot. Immutable: replaced
/// whole when a snapshot is taken, a merge ends or a revert is done (see `docs/snapshots.md`).
struct Chain {
    slots: Vec<Option<Arc<Layer>>>,
    /// Slot of the head.
    head: usize,
    /// Layers on the live path.
    depth: usize,
}

impl Chain {
    #[inline]
    fn layer(&self, slot: usize) -> Option<&Arc<Layer>> {
        self.slots.get(slot).and_then(|l| l.as_ref())
    }

    fn head(&self) -> &Arc<Layer> {
        self.slots[self.head]
            .as_ref()
            .expect("invariant: the head's slot holds it")
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReadMode {
    /// No lock held; a checksum mismatch is re-checked under the block's stripe lock.
    Unlocked,
    /// The caller holds the stripes; a mismatch is corruption.
    Locked,
    /// Never wait for the disk (page cache only); give up on anything unusual.
    NoWait,
}

/// Syncs started and completed (numbered from 1), for [`Replica::flush`].
#[derive(Default)]
struct SyncState {
    started: u64,
    completed: u64,
    running: bool,
}

/// The sync [`Replica::flush`] is running. Dropping it ends the sync and wakes the waiters; if
/// it ends without [`SyncRunning::finish`] (a panic), the replica is poisoned first, so no waiter
/// takes an unfinished sync for a durable one.
struct SyncRunning<'a> {
    replica: &'a Replica,
    number: u64,
    finished: bool,
}

impl SyncRunning<'_> {
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for SyncRunning<'_> {
    fn drop(&mut self) {
        let r = self.replica;
        if !self.finished {
            r.poison(&ReplicaError::Invalid {
                replica: r.name.clone(),
                reason: "a data sync was interrupted".into(),
            });
        }
        let mut st = r.syncs.lock().unwrap_or_else(|p| p.into_inner());
        st.running = false;
        st.completed = self.number;
        drop(st);
        r.sync_done.notify_all();
    }
}

/// Where a block's current contents live.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    /// In the layer of this slot, with this CRC32C.
    Data { slot: usize, crc: u32 },
    /// Zeroes (never written, trimmed or zeroed).
    Zero,
}

/// Remove the layer files of `dir` that `meta` does not name: a snapshot's new head whose
/// metadata replacement never happened, or a merged layer whose files outlived the replacement
/// that took it out (see `docs/snapshots.md`). Neither holds data anything reads.
fn remove_unnamed_layer_files(dir: &Path, meta: &ReplicaMeta) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = layer_file_id(&name) {
            if meta.layer(id).is_none() {
                tracing::info!(path = %e.path().display(), "removing a layer file no record names (left by an interrupted snapshot or merge)");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

const COUNT_SHARDS: usize = 16;

/// A counter on a cache line of its own.
#[derive(Default)]
#[repr(align(64))]
struct PaddedCount(std::sync::atomic::AtomicI64);

/// This thread's counter shard.
fn shard() -> usize {
    use std::cell::Cell;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local!(static SHARD: Cell<usize> = const { Cell::new(usize::MAX) });
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) as usize % COUNT_SHARDS);
        }
        s.get()
    })
}

/// One replica: the tree of layers in a directory.
pub struct Replica {
    dir: PathBuf,
    volume: String,
    name: String,
    /// The volume's size: raised by [`Replica::resize`] once every file has grown and
    /// `replica.meta` records it; never lowered.
    size_bytes: AtomicU64,
    block_size: u32,
    files: Arc<dyn FileLayer>,
    /// The open layers of the live path (see [`Chain`]).
    chain: arc_swap::ArcSwap<Chain>,
    /// For every block, the entry of the live-path layer that decides it, tagged with that
    /// layer's slot: one lookup per block, whatever the chain's length.
    merged: BlockIndex,
    /// Layers that left the chain, kept until no reader holds a chain naming them, so their
    /// slots are not given to another layer before then.
    freed: Mutex<Vec<Arc<Layer>>>,
    /// Per-thread shards of the change in the head's block count since its `held` was set.
    head_counts: Box<[PaddedCount]>,
    /// Blocks each frozen layer holds (by id); the head's count is in its `held`.
    sizes: Mutex<HashMap<u64, u64>>,
    /// Held for a whole merge, a revert and a rebuild of the chain: one tree change at a time
    /// (a snapshot only takes `meta`, so it never waits for a merge).
    tree: Mutex<()>,
    /// The merge running now, for progress reports.
    merging: Mutex<Option<MergeProgress>>,
    /// Held by a whole run of merges, and by a revert: one at a time.
    merge_lock: Mutex<()>,
    /// Held by a whole growth (see `store/grow.rs`): one at a time, so only one sets lengths.
    growth: Mutex<()>,
    /// Set when the replica is no longer served: a merge stops.
    closing: AtomicBool,
    /// Set while a revert waits for a running merge: it stops at its next batch.
    merge_yield: AtomicBool,
    /// Test hook: the number of merge steps to do before failing as a crash would (-1: never).
    #[cfg(test)]
    crash_after: std::sync::atomic::AtomicI64,
    meta: Mutex<ReplicaMeta>,
    generation: AtomicU64,
    /// The highest engine epoch accepted (the fence; durable in `replica.meta`).
    epoch: AtomicU64,
    stripes: Box<[Mutex<()>]>,
    poisoned: AtomicBool,
    poison_reason: Mutex<String>,
    /// Joins per-block CRC32Cs into the CRC32C of a whole write (transit check).
    crc_shift: zebu_proto::CrcShift,
    /// Group commit of flushes: see [`Replica::flush`].
    syncs: Mutex<SyncState>,
    sync_done: Condvar,
    /// Held shared by every operation of a [`Session`], exclusively while a session raises the
    /// generation: an operation checks its session and completes entirely before or after a
    /// take-over.
    fence: RwLock<()>,
    /// Sessions that other connections may join, by token (see [`Replica::share_session`]).
    shared: Mutex<HashMap<u64, Weak<Session>>>,
    /// Which extents may differ between members (see [`crate::wil`]).
    wil: IntentLog,
    /// The snapshot views built last, kept for the reads that follow (an export or a rebuild
    /// reads a snapshot piece by piece); emptied at every change of the tree but a snapshot.
    views: Mutex<snapshot::ViewCache>,
}

/// One engine's use of a replica (a data connection, or an in-process handle). It remembers the
/// generation the engine last saw or set; once another engine raises the replica's generation,
/// every further operation of this session is refused with [`ReplicaError::Stale`]. This fences
/// off an old engine (a detached one, or one cut off from the manager) for good.
///
/// One engine may use a session over several connections (one per NBD connection, so each reads
/// its replies on its own thread): they share the `Session`, so a generation raised over one
/// moves them all along, and a take-over fences them all.
#[derive(Debug)]
pub struct Session {
    /// The engine's epoch: once the replica accepts a higher one, this session is fenced.
    epoch: u64,
    generation: AtomicU64,
    /// Set once the session is shared: the token other connections join it with.
    token: OnceLock<u64>,
    /// A reader session (`zebu_proto::data::HELLO_READER`): frozen snapshots only, no fence.
    reader: bool,
}

impl Session {
    /// A session of an engine of `epoch` (see [`Replica::accept_epoch`]), starting at the
    /// replica's current generation.
    pub fn new(replica: &Replica, epoch: u64) -> Session {
        Session {
            epoch,
            generation: AtomicU64::new(replica.generation()),
            token: OnceLock::new(),
            reader: false,
        }
    }

    /// A reader session: it reads frozen snapshots and nothing else, and takes no part in the
    /// fence (no epoch is recorded or checked: a frozen layer never changes).
    pub fn reader(replica: &Replica) -> Session {
        Session {
            reader: true,
            ..Session::new(replica, 0)
        }
    }

    pub fn is_reader(&self) -> bool {
        self.reader
    }

    /// The generation this session last saw or set.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Facts about a replica, for INFO and status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFacts {
    pub volume: String,
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub generation: u64,
    pub allocated_bytes: u64,
    pub index_memory_bytes: u64,
}

impl Replica {
    /// Create a new, empty replica in `dir` (created if missing; must not hold a replica).
    pub fn create(
        dir: &Path,
        volume: &str,
        name: &str,
        size_bytes: u64,
        block_size: u32,
    ) -> Result<Replica, ReplicaError> {
        Replica::create_in(
            &crate::file::direct(),
            dir,
            volume,
            name,
            size_bytes,
            block_size,
        )
    }

    /// [`Replica::create`] with its files opened through `files`.
    pub fn create_in(
        files: &Arc<dyn FileLayer>,
        dir: &Path,
        volume: &str,
        name: &str,
        size_bytes: u64,
        block_size: u32,
    ) -> Result<Replica, ReplicaError> {
        let invalid = |reason: String| ReplicaError::Invalid {
            replica: name.to_owned(),
            reason,
        };
        if block_size < 512 || !block_size.is_power_of_two() {
            return Err(invalid(format!(
                "block size {block_size} must be a power of two of at least 512"
            )));
        }
        grow::check_size(name, size_bytes, block_size)?;
        if volume.is_empty() || volume.len() > 255 || name.is_empty() || name.len() > 255 {
            return Err(invalid(
                "volume and replica names must be 1 to 255 bytes".into(),
            ));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| ReplicaError::io("create replica directory", dir, 0, e))?;
        if dir.join(crate::meta::META_FILE).exists() {
            return Err(ReplicaError::AlreadyExists {
                path: dir.to_owned(),
            });
        }
        let head_id = 1;
        // Clean up layer files of an earlier create that crashed before writing the metadata.
        let (d, i) = layer_paths(dir, head_id);
        let _ = std::fs::remove_file(d);
        let _ = std::fs::remove_file(i);
        let _ = std::fs::remove_file(dir.join(crate::wil::WIL_FILE));
        let layer = Layer::create(&**files, dir, head_id, size_bytes, block_size)?;
        let wil = IntentLog::open(&**files, dir, size_bytes, name, true)?;
        let created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let meta = ReplicaMeta {
            volume: volume.to_owned(),
            replica: name.to_owned(),
            size_bytes,
            block_size,
            generation: 0,
            epoch: 0,
            layers: vec![LayerMeta {
                id: head_id,
                created_unix,
                flags: crate::meta::LAYER_HEAD,
                ..Default::default()
            }],
        };
        // The metadata file is written last: a replica exists once it is there.
        meta.store(dir)?;
        let blocks = size_bytes / block_size as u64;
        Ok(Replica::assemble(
            files,
            dir,
            meta,
            vec![layer],
            BlockIndex::new(blocks),
            HashMap::new(),
            wil,
        ))
    }

    /// Open an existing replica, validating its metadata and indexes.
    pub fn open(dir: &Path) -> Result<Replica, ReplicaError> {
        Replica::open_in(&crate::file::direct(), dir)
    }

    /// [`Replica::open`] with its files opened through `files`.
    pub fn open_in(files: &Arc<dyn FileLayer>, dir: &Path) -> Result<Replica, ReplicaError> {
        Replica::open_with(files, dir, true)
    }

    /// Open a replica another process may be serving (`zebu replica export`): layer files no
    /// record names are left alone (that process may be about to name them).
    pub fn open_beside(dir: &Path) -> Result<Replica, ReplicaError> {
        Replica::open_with(&crate::file::direct(), dir, false)
    }

    fn open_with(
        files: &Arc<dyn FileLayer>,
        dir: &Path,
        cleanup: bool,
    ) -> Result<Replica, ReplicaError> {
        let meta = ReplicaMeta::load(dir)?;
        grow::check_size(&meta.replica, meta.size_bytes, meta.block_size)?;
        if cleanup {
            remove_unnamed_layer_files(dir, &meta);
        }
        let blocks = meta.size_bytes / meta.block_size as u64;
        if cleanup {
            for l in &meta.layers {
                Layer::trim_cut_growth(&**files, dir, l.id, meta.size_bytes, meta.block_size)?;
            }
        }
        let merged = BlockIndex::new(blocks);
        let mut sizes = HashMap::new();
        // The live path, root first: each layer's entries over those below it.
        let mut path = meta.path(meta.head().id);
        path.reverse();
        let mut layers = Vec::with_capacity(path.len());
        for (slot, id) in path.iter().enumerate() {
            let mut layer = Layer::open(&**files, dir, *id, meta.size_bytes, meta.block_size)?;
            layer.slot = slot;
            let mut held = 0u64;
            layer.scan(0, blocks, |b, e| {
                held += u64::from(e & ENTRY_PRESENT != 0);
                merged.set(b, pack(slot, e));
                Ok(())
            })?;
            if slot + 1 == path.len() {
                layer.held.store(held, Ordering::Relaxed);
            } else {
                sizes.insert(*id, held);
            }
            layers.push(layer);
        }
        // Layers off the live path (a branch a revert left): checked and counted, not kept open.
        for l in meta.layers.iter().filter(|l| !path.contains(&l.id)) {
            let layer = Layer::open(&**files, dir, l.id, meta.size_bytes, meta.block_size)?;
            let mut held = 0u64;
            layer.scan(0, blocks, |_, e| {
                held += u64::from(e & ENTRY_PRESENT != 0);
                Ok(())
            })?;
            sizes.insert(l.id, held);
        }
        let wil = IntentLog::open(&**files, dir, meta.size_bytes, &meta.replica, false)?;
        Ok(Replica::assemble(
            files, dir, meta, layers, merged, sizes, wil,
        ))
    }

    fn assemble(
        files: &Arc<dyn FileLayer>,
        dir: &Path,
        meta: ReplicaMeta,
        layers: Vec<Layer>,
        merged: BlockIndex,
        sizes: HashMap<u64, u64>,
        wil: IntentLog,
    ) -> Replica {
        let block_size = meta.block_size;
        let depth = layers.len();
        let chain = Chain {
            slots: layers.into_iter().map(|l| Some(Arc::new(l))).collect(),
            head: depth - 1,
            depth,
        };
        Replica {
            dir: dir.to_owned(),
            volume: meta.volume.clone(),
            name: meta.replica.clone(),
            size_bytes: AtomicU64::new(meta.size_bytes),
            block_size,
            files: files.clone(),
            chain: arc_swap::ArcSwap::from_pointee(chain),
            merged,
            freed: Mutex::new(Vec::new()),
            sizes: Mutex::new(sizes),
            head_counts: (0..COUNT_SHARDS).map(|_| PaddedCount::default()).collect(),
            tree: Mutex::new(()),
            merging: Mutex::new(None),
            merge_lock: Mutex::new(()),
            growth: Mutex::new(()),
            closing: AtomicBool::new(false),
            merge_yield: AtomicBool::new(false),
            #[cfg(test)]
            crash_after: std::sync::atomic::AtomicI64::new(-1),
            generation: AtomicU64::new(meta.generation),
            epoch: AtomicU64::new(meta.epoch),
            meta: Mutex::new(meta),
            crc_shift: zebu_proto::CrcShift::new(block_size as usize),
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(String::new()),
            syncs: Mutex::new(SyncState::default()),
            sync_done: Condvar::new(),
            fence: RwLock::new(()),
            shared: Mutex::new(HashMap::new()),
            wil,
            views: Mutex::new(snapshot::ViewCache::default()),
        }
    }

    /// Let other connections join `session`: returns its token (the same one every time). The
    /// replica keeps only a weak reference: the session ends with its last connection.
    pub fn share_session(&self, session: &Arc<Session>) -> u64 {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        *session.token.get_or_init(|| {
            shared.retain(|_, s| s.strong_count() > 0);
            loop {
                // Zero is never a token, and a token names one session only.
                let t: u64 = rand::random();
                if t != 0 && !shared.contains_key(&t) {
                    shared.insert(t, Arc::downgrade(session));
                    return t;
                }
            }
        })
    }

    /// The shared session with this token, for a connection that joins it.
    pub fn join_session(&self, token: u64) -> Result<Arc<Session>, ReplicaError> {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&token)
            .and_then(Weak::upgrade)
            .ok_or_else(|| ReplicaError::Invalid {
                replica: self.name.clone(),
                reason: format!(
                    "no session {token:#x} to join: it was never shared on this replica, or every connection of it has closed; open a new session instead"
                ),
            })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn volume(&self) -> &str {
        &self.volume
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
    /// The highest engine epoch accepted (see [`Replica::accept_epoch`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
    /// No longer served (removed from its server): background work on it stops.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn closing(&self) -> &AtomicBool {
        &self.closing
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn facts(&self) -> ReplicaFacts {
        let blocks = self.size_bytes() / self.block_size as u64;
        let mut allocated = 0u64;
        for c in 0..blocks.div_ceil(CHUNK_ENTRIES as u64) {
            // Chunks no layer has touched hold no data: skip them without looking at each block.
            if !self.merged.has_chunk(c as usize) {
                continue;
            }
            let lo = c * CHUNK_ENTRIES as u64;
            for b in lo..(lo + CHUNK_ENTRIES as u64).min(blocks) {
                allocated += u64::from(self.merged.get(b) & ENTRY_PRESENT != 0);
            }
        }
        ReplicaFacts {
            volume: self.volume.clone(),
            name: self.name.clone(),
            size_bytes: self.size_bytes(),
            block_size: self.block_size,
            generation: self.generation(),
            allocated_bytes: allocated * self.block_size as u64,
            index_memory_bytes: self.merged.memory_bytes(),
        }
    }

    /// The current chain, to keep.
    fn chain(&self) -> Arc<Chain> {
        self.chain.load_full()
    }

    /// The current chain, for one request: no shared counter is touched (`arc_swap`), and a
    /// chain replaced meanwhile stays alive, with its layers, while the guard lives.
    #[inline]
    fn chain_now(&self) -> arc_swap::Guard<Arc<Chain>> {
        self.chain.load()
    }

    fn publish(&self, chain: Chain) {
        self.chain.store(Arc::new(chain));
    }

    /// The head's own entry for `block` (0: the head does not hold it).
    #[inline]
    fn head_entry(&self, chain: &Chain, block: u64) -> u64 {
        let m = self.merged.get(block);
        if m != 0 && slot_of(m) == chain.head {
            entry_of(m)
        } else {
            0
        }
    }

    /// Write the head's entries for blocks from `first` and publish them in the merged map.
    /// The caller holds their stripes.
    fn put_head_entries(
        &self,
        chain: &Chain,
        first: u64,
        entries: &[u64],
    ) -> Result<(), ReplicaError> {
        let head = chain.head();
        let before = (0..entries.len() as u64)
            .filter(|i| self.head_entry(chain, first + i) & ENTRY_PRESENT != 0)
            .count() as u64;
        head.write_entries(first, entries)?;
        let mut after = 0u64;
        for (i, e) in entries.iter().enumerate() {
            after += u64::from(e & ENTRY_PRESENT != 0);
            let m = if *e == 0 { 0 } else { pack(chain.head, *e) };
            self.merged.set(first + i as u64, m);
        }
        self.count_head_blocks(after as i64 - before as i64);
        Ok(())
    }

    /// Add to the count of blocks the head holds, on this thread's shard of the counter (no
    /// shared cache line per write).
    #[inline]
    fn count_head_blocks(&self, delta: i64) {
        if delta != 0 {
            self.head_counts[shard()]
                .0
                .fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Blocks the head holds: its count at open or creation plus every write's change since.
    fn head_blocks(&self, chain: &Chain) -> u64 {
        let delta: i64 = self
            .head_counts
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum();
        (chain.head().held.load(Ordering::Relaxed) as i64 + delta).max(0) as u64
    }

    /// The head's count, moved out of the shards (no write runs: the caller holds every stripe).
    fn take_head_blocks(&self, chain: &Chain) -> u64 {
        let n = self.head_blocks(chain);
        for c in self.head_counts.iter() {
            c.0.store(0, Ordering::Relaxed);
        }
        n
    }

    fn poison(&self, err: &ReplicaError) {
        let mut reason = self.poison_reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_empty() {
            *reason = err.full_message();
        }
        self.poisoned.store(true, Ordering::Release);
    }

    fn check_usable(&self) -> Result<(), ReplicaError> {
        if self.is_poisoned() {
            let reason = self
                .poison_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(ReplicaError::Poisoned {
                replica: self.name.clone(),
                reason,
            });
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), ReplicaError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size_bytes() => Ok(()),
            _ => Err(ReplicaError::OutOfRange {
                replica: self.name.clone(),
                offset,
                length,
                size_bytes: self.size_bytes(),
            }),
        }
    }

    /// First and last+1 block of a byte range (length > 0).
    fn block_span(&self, offset: u64, length: u64) -> (u64, u64) {
        let bs = self.block_size as u64;
        (offset / bs, (offset + length).div_ceil(bs))
    }

    /// Every stripe, in order: no write, zero or locked read runs while they are held.
    fn lock_all(&self) -> Vec<MutexGuard<'_, ()>> {
        self.stripes
            .iter()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    fn lock_blocks(&self, first: u64, end: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = (first / STRIPE_BLOCKS..=(end - 1) / STRIPE_BLOCKS)
            .map(|s| (s % LOCK_STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    #[inline]
    fn resolve(&self, block: u64) -> Source {
        let m = self.merged.get(block);
        if m & ENTRY_PRESENT != 0 {
            Source::Data {
                slot: slot_of(m),
                crc: m as u32,
            }
        } else {
            Source::Zero
        }
    }

    /// Read whole blocks `[first, end)` into `out` (exactly `(end-first)*bs` bytes) through
    /// `chain`, verifying checksums. Returns `Ok(false)` only in [`ReadMode::NoWait`], when the
    /// data is not all in the page cache (or a check needs the lock): the caller then reads on
    /// an I/O thread.
    fn read_blocks(
        &self,
        chain: &Chain,
        first: u64,
        end: u64,
        out: &mut [u8],
        mode: ReadMode,
    ) -> Result<bool, ReplicaError> {
        let bs = self.block_size as usize;
        let mut b = first;
        while b < end {
            let src = self.resolve(b);
            // Extend the run while blocks come from the same place.
            let mut run_end = b + 1;
            while run_end < end {
                let next = self.resolve(run_end);
                let same = match (src, next) {
                    (Source::Zero, Source::Zero) => true,
                    (Source::Data { slot: a, .. }, Source::Data { slot: c, .. }) => a == c,
                    _ => false,
                };
                if !same {
                    break;
                }
                run_end += 1;
            }
            let buf = &mut out[((b - first) as usize) * bs..((run_end - first) as usize) * bs];
            match src {
                Source::Zero => buf.fill(0),
                Source::Data { slot, .. } => {
                    let Some(l) = chain.layer(slot) else {
                        // A layer newer than the reader's chain (a snapshot was taken since).
                        match mode {
                            ReadMode::NoWait => return Ok(false),
                            ReadMode::Unlocked => {
                                for (i, block_buf) in buf.chunks_exact_mut(bs).enumerate() {
                                    self.reread_locked(b + i as u64, block_buf)?;
                                }
                                b = run_end;
                                continue;
                            }
                            ReadMode::Locked => {
                                return Err(ReplicaError::Invalid {
                                    replica: self.name.clone(),
                                    reason: format!(
                                        "block {b} names layer slot {slot}, which is not open"
                                    ),
                                })
                            }
                        }
                    };
                    let at = b * bs as u64;
                    if mode == ReadMode::NoWait {
                        if !l.data.read_cached(buf, at) {
                            return Ok(false);
                        }
                    } else {
                        l.data
                            .read_exact_at(buf, at)
                            .map_err(|e| ReplicaError::io("read", &l.data_path, at, e))?;
                    }
                    for (i, block_buf) in buf.chunks_exact_mut(bs).enumerate() {
                        let block = b + i as u64;
                        let expected = match self.resolve(block) {
                            Source::Data { crc, slot: s } if s == slot => Some(crc),
                            _ => None,
                        };
                        match (expected, mode) {
                            (Some(crc), _) if crc32c::crc32c(block_buf) == crc => {}
                            (_, ReadMode::NoWait) => return Ok(false),
                            // A writer may be between its data and its index update: look again
                            // while holding the block's stripe.
                            (_, ReadMode::Unlocked) => self.reread_locked(block, block_buf)?,
                            (Some(_), ReadMode::Locked) => {
                                return Err(ReplicaError::Checksum {
                                    replica: self.name.clone(),
                                    offset: block * bs as u64,
                                    layer: l.id,
                                })
                            }
                            // Changed under a lock the caller holds: cannot be.
                            (None, ReadMode::Locked) => {
                                return Err(ReplicaError::Invalid {
                                    replica: self.name.clone(),
                                    reason: format!("block {block} changed under its lock"),
                                })
                            }
                        }
                    }
                }
            }
            b = run_end;
        }
        Ok(true)
    }

    /// Re-read one block while holding its stripe, so no writer is half-way through it, through
    /// the chain current then.
    fn reread_locked(&self, block: u64, out: &mut [u8]) -> Result<(), ReplicaError> {
        let _g = self.lock_blocks(block, block + 1);
        let chain = self.chain();
        self.read_blocks(&chain, block, block + 1, out, ReadMode::Locked)
            .map(|_| ())
    }

    fn read_mode(&self, offset: u64, out: &mut [u8], mode: ReadMode) -> Result<bool, ReplicaError> {
        self.check_usable()?;
        self.check_range(offset, out.len() as u64)?;
        if out.is_empty() {
            return Ok(true);
        }
        let bs = self.block_size as u64;
        let (first, end) = self.block_span(offset, out.len() as u64);
        let chain = self.chain_now();
        if offset.is_multiple_of(bs) && (out.len() as u64).is_multiple_of(bs) {
            return self.read_blocks(&chain, first, end, out, mode);
        }
        let mut tmp = vec![0u8; ((end - first) * bs) as usize];
        if !self.read_blocks(&chain, first, end, &mut tmp, mode)? {
            return Ok(false);
        }
        let skip = (offset - first * bs) as usize;
        out.copy_from_slice(&tmp[skip..skip + out.len()]);
        Ok(true)
    }

    /// Read `out.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), ReplicaError> {
        self.read_mode(offset, out, ReadMode::Unlocked).map(|_| ())
    }

    /// Read without ever waiting for the disk: `Ok(false)` when the data is not all in the page
    /// cache (then nothing is known about `out`, and the caller must use [`Replica::read`] on an
    /// I/O thread). Safe to call on an async runtime thread: it only copies from memory.
    pub fn read_cached(&self, offset: u64, out: &mut [u8]) -> Result<bool, ReplicaError> {
        self.read_mode(offset, out, ReadMode::NoWait)
    }

    /// Write `data` at `offset`; with `fua`, it is durable before this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ReplicaError> {
        self.write_checked(offset, data, fua, None)
    }

    /// [`Replica::write`] of a payload that crossed the network with CRC32C `transit`: nothing is
    /// written unless the payload still matches it. For a block-aligned write the check joins
    /// the per-block checksums the index needs anyway ([`zebu_proto::CrcShift`]), so the payload
    /// is read once, not twice.
    pub fn write_checked(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
        transit: Option<u32>,
    ) -> Result<(), ReplicaError> {
        self.check_usable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return if fua { self.flush() } else { Ok(()) };
        }
        let bs = self.block_size as u64;
        let (first, end) = self.block_span(offset, data.len() as u64);
        let _guards = self.lock_blocks(first, end);
        // Taken under the stripes: a snapshot takes every stripe to change the head.
        let chain = self.chain_now();
        let aligned = offset.is_multiple_of(bs) && (data.len() as u64).is_multiple_of(bs);
        let corrupt_in_transit = || ReplicaError::TransitChecksum {
            replica: self.name.clone(),
            offset,
        };
        if let Some(expected) = transit.filter(|_| !aligned) {
            if crc32c::crc32c(data) != expected {
                return Err(corrupt_in_transit());
            }
        }
        let merged;
        let blocks: &[u8] = if aligned {
            data
        } else {
            // Read-modify-write of the partial first/last blocks, under the stripe lock.
            let mut buf = vec![0u8; ((end - first) * bs) as usize];
            if !offset.is_multiple_of(bs) {
                self.read_blocks(
                    &chain,
                    first,
                    first + 1,
                    &mut buf[..bs as usize],
                    ReadMode::Locked,
                )?;
            }
            if !(offset + data.len() as u64).is_multiple_of(bs)
                && (end - 1 > first || offset.is_multiple_of(bs))
            {
                let last = ((end - 1 - first) * bs) as usize;
                self.read_blocks(&chain, end - 1, end, &mut buf[last..], ReadMode::Locked)?;
            }
            let skip = (offset - first * bs) as usize;
            buf[skip..skip + data.len()].copy_from_slice(data);
            merged = buf;
            &merged
        };
        let crcs: Vec<u32> = blocks
            .chunks_exact(bs as usize)
            .map(crc32c::crc32c)
            .collect();
        if let Some(expected) = transit.filter(|_| aligned) {
            let whole = crcs[1..]
                .iter()
                .fold(crcs[0], |acc, &c| self.crc_shift.combine(acc, c));
            if whole != expected {
                return Err(corrupt_in_transit());
            }
        }
        let head = chain.head();
        // A block the head does not hold yet needs space: reserved before anything is written,
        // so a full disk refuses the write with nothing changed (not poisoned).
        if (first..end).any(|b| self.head_entry(&chain, b) & ENTRY_PRESENT == 0) {
            head.reserve(&self.name, first, end, bs, true)?;
        }
        let at = first * bs;
        let res = write_in_pieces(&*head.data, blocks, at)
            .map_err(|e| ReplicaError::io("write", &head.data_path, at, e))
            .and_then(|()| {
                let entries: Vec<u64> = crcs.iter().map(|&c| ENTRY_PRESENT | c as u64).collect();
                self.put_head_entries(&chain, first, &entries)
            });
        if let Err(e) = res {
            // A failed write leaves the block in an unknown state: refuse further I/O.
            self.poison(&e);
            return Err(e);
        }
        head.dirty.store(true, Ordering::Release);
        drop(_guards);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Make the range read as zeroes, releasing its space. Used for TRIM and WRITE_ZEROES.
    pub fn zero(&self, offset: u64, length: u64, fua: bool) -> Result<(), ReplicaError> {
        self.check_usable()?;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let bs = self.block_size as u64;
        // Partial blocks at the edges are written as zero bytes.
        let head_partial = offset % bs;
        let mut start = offset;
        let end_off = offset + length;
        // Both edges are merged (read, checked, rewritten): check the last one before the first
        // is changed, so a damaged block there refuses the request with nothing changed.
        if head_partial != 0 && !end_off.is_multiple_of(bs) && offset / bs != end_off / bs {
            let last = end_off / bs;
            self.read_blocks(
                &self.chain(),
                last,
                last + 1,
                &mut vec![0u8; bs as usize],
                ReadMode::Unlocked,
            )?;
        }
        let head_bytes = if head_partial != 0 {
            (bs - head_partial).min(length)
        } else {
            0
        };
        start += head_bytes;
        let tail_partial = end_off % bs;
        let tail_bytes = if start < end_off { tail_partial } else { 0 };
        let stop = end_off - tail_bytes;
        // Space is reserved in the head of now; the entries are written in the head of the
        // moment the stripes are held (a snapshot in between reserves in the new head below).
        let chain = self.chain();
        let head = chain.head();
        // With older layers below, the head must mask them with explicit zero entries.
        let entry = if chain.depth > 1 { ENTRY_ZERO } else { 0 };
        // Every byte of space the request needs is reserved before any of it changes, so a
        // full disk refuses it with nothing changed: the edge blocks the head does not hold,
        // and entries turning from absent to ZERO (an index page that may hold no space).
        // Only entries that change are written, and a written block's entry sits in a page
        // that holds space already: zeroing written data needs none (a full disk is trimmed).
        let edges = [
            (head_bytes > 0).then_some(offset / bs),
            (tail_bytes > 0).then_some(stop / bs),
        ];
        for b in edges.into_iter().flatten() {
            if self.head_entry(&chain, b) & ENTRY_PRESENT == 0 {
                head.reserve(&self.name, b, b + 1, bs, true)?;
            }
        }
        let (first, end) = (start / bs, stop / bs);
        if start < stop && entry != 0 && (first..end).any(|b| self.head_entry(&chain, b) == 0) {
            head.reserve(&self.name, first, end, bs, false)?;
        }
        if head_bytes > 0 {
            self.write(offset, &vec![0u8; head_bytes as usize], false)?;
        }
        if tail_bytes > 0 {
            self.write(stop, &vec![0u8; tail_bytes as usize], false)?;
        }
        if start < stop {
            let _guards = self.lock_blocks(first, end);
            let now = self.chain();
            if now.head != chain.head {
                // A snapshot came between: the new head masks its layers below.
                let h = now.head();
                if (first..end).any(|b| self.head_entry(&now, b) == 0) {
                    h.reserve(&self.name, first, end, bs, false)?;
                }
            }
            let chain = now;
            let head = chain.head();
            let entry = if chain.depth > 1 { ENTRY_ZERO } else { 0 };
            let res = (|| {
                const BATCH: u64 = 1 << 16;
                let mut b = first;
                while b < end {
                    if self.head_entry(&chain, b) == entry {
                        b += 1;
                        continue;
                    }
                    let mut n = 1;
                    while b + n < end && n < BATCH && self.head_entry(&chain, b + n) != entry {
                        n += 1;
                    }
                    self.put_head_entries(&chain, b, &vec![entry; n as usize])?;
                    b += n;
                }
                match head.punch_hole(start, stop - start) {
                    // The punch may need a block to split an extent: the bytes stay where
                    // they are, no entry points at them.
                    Err(ReplicaError::Io { source, .. })
                        if source.raw_os_error() == Some(libc::ENOSPC) =>
                    {
                        tracing::warn!(replica = %self.name, offset = start, length = stop - start, "the disk is full: the zeroed range keeps its space until it is written again");
                        Ok(())
                    }
                    r => r,
                }
            })();
            if let Err(e) = res {
                self.poison(&e);
                return Err(e);
            }
            head.dirty.store(true, Ordering::Release);
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Make every completed write durable.
    ///
    /// Group commit: a sync that *starts* after this call began covers every write completed
    /// before it, so concurrent flushes share one: a flush that arrives while a sync runs waits
    /// for it to end, and then either runs the next sync itself or waits for the one another
    /// waiter started. Only one sync runs at a time, because the kernel reports a writeback
    /// error to one fsync caller only: a concurrent caller could otherwise see success for lost
    /// data. A failed sync poisons the replica, and every flush that waited on it fails too.
    pub fn flush(&self) -> Result<(), ReplicaError> {
        let mut st = self.syncs.lock().unwrap_or_else(|p| p.into_inner());
        let need = st.started + 1;
        loop {
            if st.completed >= need {
                drop(st);
                return self.check_usable();
            }
            if !st.running {
                break;
            }
            st = self.sync_done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.running = true;
        st.started += 1;
        let running = SyncRunning {
            replica: self,
            number: st.started,
            finished: false,
        };
        drop(st);
        let res = self.check_usable().and_then(|()| {
            self.chain_now()
                .head()
                .sync()
                .inspect_err(|e| self.poison(e))
        });
        running.finish();
        res
    }

    /// Run syncs of this replica's files outside [`Replica::flush`] (a merge's) while no flush
    /// syncs: the kernel reports a writeback error to one fsync caller only, so two syncs of one
    /// file must never race, or one could see success for pages the other's error lost. An
    /// error poisons the replica before any flush runs again (and every later flush fails).
    pub(crate) fn exclusive_sync(
        &self,
        f: impl FnOnce() -> Result<(), ReplicaError>,
    ) -> Result<(), ReplicaError> {
        struct Release<'a>(&'a Replica);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                let r = self.0;
                r.syncs.lock().unwrap_or_else(|p| p.into_inner()).running = false;
                r.sync_done.notify_all();
            }
        }
        let mut st = self.syncs.lock().unwrap_or_else(|p| p.into_inner());
        while st.running {
            st = self.sync_done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.running = true;
        drop(st);
        let _release = Release(self);
        self.check_usable()
            .and_then(|()| f().inspect_err(|e| self.poison(e)))
    }

    /// Run `op` for `session`, unless another session has raised the generation past it.
    pub fn fenced<T>(
        &self,
        session: &Session,
        op: impl FnOnce() -> Result<T, ReplicaError>,
    ) -> Result<T, ReplicaError> {
        let _shared = self.fence.read().unwrap_or_else(|p| p.into_inner());
        self.check_session(session)?;
        op()
    }

    /// Admit an engine of `epoch` (its handshake): refused if a higher epoch was accepted
    /// before; a higher one than recorded is made durable first (crash-safe metadata replace),
    /// and from then on every session of a lower epoch is refused (`Fenced`). Taken under the
    /// fence's write lock, so an operation of an older session lands entirely before it or
    /// not at all. A poisoned replica records it too (its data path failed, its metadata may
    /// not have). If the metadata cannot be replaced, the handshake fails, and the epoch is
    /// still raised in memory (the old file is intact, or the new one already in place): the
    /// replica is not poisoned for it, as its data is untouched.
    pub fn accept_epoch(&self, epoch: u64) -> Result<(), ReplicaError> {
        // Epochs only go up: an equal one needs no lock (lanes handshake often).
        if epoch == self.epoch() {
            return Ok(());
        }
        let _exclusive = self.fence.write().unwrap_or_else(|p| p.into_inner());
        let current = self.epoch();
        if epoch < current {
            return Err(ReplicaError::Fenced {
                replica: self.name.clone(),
                session_epoch: epoch,
                epoch: current,
            });
        }
        if epoch == current {
            return Ok(());
        }
        let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = meta.clone();
        next.epoch = epoch;
        let stored = next.store(&self.dir);
        // Kept either way, so a later replace (a generation bump) carries it.
        *meta = next;
        self.epoch.store(epoch, Ordering::Release);
        stored
    }

    fn check_session(&self, session: &Session) -> Result<(), ReplicaError> {
        if session.reader {
            return Err(ReplicaError::Invalid {
                replica: self.name.clone(),
                reason: "a reader session only reads snapshots (INFO, PING, LAYERS, READ_SNAPSHOT, SNAPSHOT_DELTA of a snapshot)".into(),
            });
        }
        let epoch = self.epoch();
        if epoch > session.epoch {
            return Err(ReplicaError::Fenced {
                replica: self.name.clone(),
                session_epoch: session.epoch,
                epoch,
            });
        }
        let (mine, current) = (
            session.generation.load(Ordering::Acquire),
            self.generation(),
        );
        if current > mine {
            return Err(ReplicaError::Stale {
                replica: self.name.clone(),
                session: mine,
                generation: current,
            });
        }
        Ok(())
    }

    /// Raise the generation on behalf of `session` (refused if that session is already stale),
    /// and move the session along with it.
    pub fn set_generation_for(
        &self,
        session: &Session,
        generation: u64,
    ) -> Result<(), ReplicaError> {
        let _exclusive = self.fence.write().unwrap_or_else(|p| p.into_inner());
        self.check_session(session)?;
        self.set_generation(generation)?;
        session.generation.store(generation, Ordering::Release);
        Ok(())
    }

    /// Durably raise the generation. Lowering it is refused.
    pub fn set_generation(&self, generation: u64) -> Result<(), ReplicaError> {
        self.check_usable()?;
        let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        if generation < meta.generation {
            return Err(ReplicaError::Invalid {
                replica: self.name.clone(),
                reason: format!(
                    "generation may not go down from {} to {generation}",
                    meta.generation
                ),
            });
        }
        if generation == meta.generation {
            return Ok(());
        }
        // Data written before the new generation must be durable before the generation is.
        self.flush()?;
        let mut next = meta.clone();
        next.generation = generation;
        if let Err(e) = next.store(&self.dir) {
            self.poison(&e);
            return Err(e);
        }
        *meta = next;
        self.generation.store(generation, Ordering::Release);
        Ok(())
    }

    /// Durably mark write-intent-log extents dirty (see [`crate::wil`]).
    pub fn wil_mark(&self, extents: &[u64]) -> Result<(), ReplicaError> {
        self.check_usable()?;
        let r = self.wil.mark(&self.name, extents);
        self.poison_on_io(r)
    }

    /// A failed write or sync of the log leaves it unknown on disk (the kernel may have dropped
    /// the page): refuse further I/O, as for the data files.
    pub(crate) fn poison_on_io(&self, r: Result<(), ReplicaError>) -> Result<(), ReplicaError> {
        if let Err(e @ ReplicaError::Io { .. }) = &r {
            self.poison(e);
        }
        r
    }

    /// This replica rejoins by rebuild from `generation` (see [`IntentLog::rejoin`]).
    pub fn wil_rejoin(&self, generation: u64) -> Result<(), ReplicaError> {
        self.check_usable()?;
        let r = self.wil.rejoin(generation);
        self.poison_on_io(r)
    }

    /// Record how far a rebuild into this replica got (see [`IntentLog::record_rebuild`]):
    /// its data is synced first, so what the record claims is durable.
    pub fn wil_record_rebuild(&self, rebuild: crate::wil::Rebuild) -> Result<(), ReplicaError> {
        self.check_usable()?;
        self.flush()?;
        let r = self.wil.record_rebuild(rebuild);
        self.poison_on_io(r)
    }

    /// Settle write-intent-log extents (see [`IntentLog::settle`]).
    pub fn wil_settle(
        &self,
        extents: &[u64],
        all: bool,
        state: u8,
        generation: u64,
    ) -> Result<(), ReplicaError> {
        self.check_usable()?;
        let r = self.wil.settle(&self.name, extents, all, state, generation);
        self.poison_on_io(r)
    }

    /// The write-intent log's `covers_from` and the states of `count` extents from `first`.
    pub fn wil_read(&self, first: u64, count: u64) -> Result<Vec<u8>, ReplicaError> {
        self.check_usable()?;
        self.wil.read(&self.name, first, count)
    }

    /// Read whole blocks at `offset` for a crash resync: a block whose data fails its checksum
    /// is a write a crash tore between its data and its index (the caller reads only extents
    /// the write-intent log marked), so its data file content is taken as the block's content
    /// — old or new, both valid — and its checksum rewritten. Returns the blocks adopted so.
    pub fn read_adopting(&self, offset: u64, out: &mut [u8]) -> Result<u64, ReplicaError> {
        self.check_usable()?;
        self.check_range(offset, out.len() as u64)?;
        let bs = self.block_size as u64;
        if !offset.is_multiple_of(bs) || !(out.len() as u64).is_multiple_of(bs) {
            return Err(ReplicaError::Invalid {
                replica: self.name.clone(),
                reason: format!(
                    "a resync read at {offset}+{} is not block-aligned",
                    out.len()
                ),
            });
        }
        let (first, end) = self.block_span(offset, out.len() as u64);
        let _guards = self.lock_blocks(first, end);
        let chain = self.chain();
        let mut adopted = 0;
        for (i, buf) in out.chunks_exact_mut(bs as usize).enumerate() {
            let block = first + i as u64;
            let Source::Data { slot, crc } = self.resolve(block) else {
                buf.fill(0);
                continue;
            };
            // Only the head takes writes, so only it can hold a torn one: elsewhere a checksum
            // failure is rot, and is reported (a merge syncs data before its entries).
            let adoptable = slot == chain.head;
            let Some(l) = chain.layer(slot) else {
                return Err(ReplicaError::Invalid {
                    replica: self.name.clone(),
                    reason: format!("block {block} names layer slot {slot}, which is not open"),
                });
            };
            let at = block * bs;
            l.data
                .read_exact_at(buf, at)
                .map_err(|e| ReplicaError::io("read", &l.data_path, at, e))?;
            let actual = crc32c::crc32c(buf);
            if actual == crc {
                continue;
            }
            if !adoptable {
                return Err(ReplicaError::Checksum {
                    replica: self.name.clone(),
                    offset: at,
                    layer: l.id,
                });
            }
            // Rewritten in the layer that holds it: snapshots below the head are never torn
            // (they are frozen), so this is the head in practice.
            if let Err(e) = self.put_head_entries(&chain, block, &[ENTRY_PRESENT | actual as u64]) {
                self.poison(&e);
                return Err(e);
            }
            l.dirty.store(true, Ordering::Release);
            tracing::warn!(replica = %self.name, offset = at, "a block torn by a crash takes its data file content (its checksum is rewritten)");
            adopted += 1;
        }
        Ok(adopted)
    }

    /// Allocation map of a range, as extents covering it exactly.
    pub fn map(&self, offset: u64, length: u64) -> Result<Vec<MapExtent>, ReplicaError> {
        self.check_usable()?;
        self.check_range(offset, length)?;
        let mut out: Vec<MapExtent> = Vec::new();
        if length == 0 {
            return Ok(out);
        }
        let bs = self.block_size as u64;
        let (first, end) = self.block_span(offset, length);
        for b in first..end {
            let lo = (b * bs).max(offset);
            let hi = ((b + 1) * bs).min(offset + length);
            let flags = match self.resolve(b) {
                Source::Data { .. } => 0,
                Source::Zero => EXTENT_HOLE | EXTENT_ZERO,
            };
            match out.last_mut() {
                Some(last)
                    if last.flags == flags
                        && (last.length as u64 + (hi - lo)) <= u32::MAX as u64 - bs =>
                {
                    last.length += (hi - lo) as u32
                }
                _ => {
                    if out.len() >= zebu_proto::data::MAX_MAP_EXTENTS {
                        break; // The caller sees a shorter map and asks again from its end.
                    }
                    out.push(MapExtent {
                        length: (hi - lo) as u32,
                        flags,
                    })
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    const BS: u64 = 4096;

    #[derive(Debug, Clone)]
    enum Step {
        Write { offset: u64, len: u64, seed: u8 },
        Zero { offset: u64, len: u64 },
        Read { offset: u64, len: u64 },
        Flush,
        Reopen,
    }

    const SIZE: u64 = 64 * BS;

    fn step() -> impl Strategy<Value = Step> {
        let range = (0..SIZE).prop_flat_map(|o| (Just(o), 0..=(SIZE - o).min(9 * BS)));
        prop_oneof![
            4 => (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Step::Write { offset, len, seed }),
            2 => range.clone().prop_map(|(offset, len)| Step::Zero { offset, len }),
            3 => range.prop_map(|(offset, len)| Step::Read { offset, len }),
            1 => Just(Step::Flush),
            1 => Just(Step::Reopen),
        ]
    }

    fn pattern(len: u64, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn replica_agrees_with_model(steps in proptest::collection::vec(step(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
            let mut model = vec![0u8; SIZE as usize];
            for s in steps {
                match s {
                    Step::Write { offset, len, seed } => {
                        let d = pattern(len, seed);
                        r.write(offset, &d, seed % 7 == 0).unwrap();
                        model[offset as usize..(offset + len) as usize].copy_from_slice(&d);
                    }
                    Step::Zero { offset, len } => {
                        r.zero(offset, len, false).unwrap();
                        model[offset as usize..(offset + len) as usize].fill(0);
                    }
                    Step::Read { offset, len } => {
                        let mut buf = vec![0xeeu8; len as usize];
                        r.read(offset, &mut buf).unwrap();
                        prop_assert_eq!(&buf[..], &model[offset as usize..(offset + len) as usize]);
                        // The page-cache-only read agrees whenever it answers.
                        let mut cached = vec![0xddu8; len as usize];
                        if r.read_cached(offset, &mut cached).unwrap() {
                            prop_assert_eq!(&cached[..], &model[offset as usize..(offset + len) as usize]);
                        }
                    }
                    Step::Flush => r.flush().unwrap(),
                    Step::Reopen => {
                        drop(r);
                        r = Replica::open(dir.path()).unwrap();
                    }
                }
            }
            let mut all = vec![0u8; SIZE as usize];
            r.read(0, &mut all).unwrap();
            prop_assert_eq!(all, model);
        }
    }

    #[derive(Debug, Clone)]
    enum CutStep {
        Write { offset: u64, len: u64, seed: u8 },
        Zero { offset: u64, len: u64 },
        Flush,
        PowerCut,
    }

    fn cut_step() -> impl Strategy<Value = CutStep> {
        let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(9 * BS)));
        prop_oneof![
            6 => (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| CutStep::Write { offset, len, seed }),
            1 => range.prop_map(|(offset, len)| CutStep::Zero { offset, len }),
            2 => Just(CutStep::Flush),
            1 => Just(CutStep::PowerCut),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Through the crash-simulating file layer (pages written out early, some torn, the
        /// rest lost at the cut): after a power cut every block reads what it held at the last
        /// flush when nothing was written to it since; a block written since reads its flushed
        /// content, one written since, or fails its checksum (torn: the write-intent log's job).
        #[test]
        fn a_power_cut_keeps_every_flushed_block(
            steps in proptest::collection::vec(cut_step(), 1..60),
            seed in any::<u64>(),
            writeback_pages in 1u64..32,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let files: Arc<dyn FileLayer> =
                Arc::new(crate::file::CrashSim::new(writeback_pages * 4096, seed));
            let mut r = Replica::create_in(&files, dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
            let blocks = (SIZE / BS) as usize;
            let mut current = vec![vec![0u8; BS as usize]; blocks];
            let mut durable = current.clone();
            let mut since: Vec<Vec<Vec<u8>>> = vec![Vec::new(); blocks];
            let mut cuts = 0;
            for s in steps.into_iter().chain([CutStep::PowerCut]) {
                match s {
                    CutStep::Write { offset, len, seed } => {
                        r.write(offset, &pattern(len, seed), false).unwrap();
                        let d = pattern(len, seed);
                        for b in offset / BS..(offset + len).div_ceil(BS) {
                            let (bs, be) = (b * BS, (b + 1) * BS);
                            let (s0, s1) = (offset.max(bs), (offset + len).min(be));
                            current[b as usize][(s0 - bs) as usize..(s1 - bs) as usize]
                                .copy_from_slice(&d[(s0 - offset) as usize..(s1 - offset) as usize]);
                            since[b as usize].push(current[b as usize].clone());
                        }
                    }
                    CutStep::Zero { offset, len } => {
                        r.zero(offset, len, false).unwrap();
                        for b in offset / BS..(offset + len).div_ceil(BS) {
                            let (bs, be) = (b * BS, (b + 1) * BS);
                            let (s0, s1) = (offset.max(bs), (offset + len).min(be));
                            current[b as usize][(s0 - bs) as usize..(s1 - bs) as usize].fill(0);
                            since[b as usize].push(current[b as usize].clone());
                        }
                    }
                    CutStep::Flush => {
                        r.flush().unwrap();
                        durable = current.clone();
                        since.iter_mut().for_each(Vec::clear);
                    }
                    CutStep::PowerCut => {
                        cuts += 1;
                        drop(r);
                        r = Replica::open_in(&files, dir.path()).unwrap();
                        let mut torn = Vec::new();
                        for b in 0..blocks {
                            let mut buf = vec![0u8; BS as usize];
                            match r.read(b as u64 * BS, &mut buf) {
                                Ok(()) => {
                                    prop_assert!(
                                        buf == durable[b] || since[b].contains(&buf),
                                        "block {} after cut {}: neither its flushed content nor one written since",
                                        b, cuts
                                    );
                                    current[b] = buf;
                                }
                                Err(e) => {
                                    prop_assert!(!since[b].is_empty(), "block {} not written since the last flush fails: {}", b, e);
                                    prop_assert!(matches!(e, ReplicaError::Checksum { .. }), "block {}: {}", b, e);
                                    torn.push(b);
                                }
                            }
                        }
                        // Torn blocks are rewritten whole (as a resync would), then all is flushed.
                        for b in torn {
                            r.write(b as u64 * BS, &durable[b], false).unwrap();
                            current[b] = durable[b].clone();
                        }
                        r.flush().unwrap();
                        durable = current.clone();
                        since.iter_mut().for_each(Vec::clear);
                    }
                }
            }
        }
    }

    #[test]
    fn concurrent_writes_and_flushes_complete_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        let blocks = SIZE / BS;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let r = &r;
                s.spawn(move || {
                    for i in (t..blocks).step_by(4) {
                        r.write(i * BS, &vec![(i % 251) as u8 + 1; BS as usize], false)
                            .unwrap();
                        r.flush().unwrap();
                    }
                });
            }
        });
        let st = r.syncs.lock().unwrap();
        assert!(!st.running);
        assert_eq!(st.started, st.completed);
        assert!(
            st.started <= blocks,
            "{} syncs for {blocks} flushes",
            st.started
        );
        drop(st);
        drop(r);
        let r = Replica::open(dir.path()).unwrap();
        for i in 0..blocks {
            let mut b = vec![0u8; BS as usize];
            r.read(i * BS, &mut b).unwrap();
            assert_eq!(b, vec![(i % 251) as u8 + 1; BS as usize], "block {i}");
        }
    }

    #[test]
    fn a_write_that_fails_its_transit_checksum_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.write(0, &vec![7u8; 4 * BS as usize], false).unwrap();
        // Aligned (checked by joining per-block checksums) and unaligned (checked directly).
        for (offset, len) in [(0u64, 3 * BS as usize), (100, 2 * BS as usize + 5)] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let good = crc32c::crc32c(&data);
            let err = r
                .write_checked(offset, &data, false, Some(good ^ 1))
                .expect_err("a payload that does not match its checksum must be refused");
            assert!(matches!(err, ReplicaError::TransitChecksum { .. }), "{err}");
            assert_eq!(err.status(), zebu_proto::data::Status::PayloadChecksum);
            let mut b = vec![0u8; 4 * BS as usize];
            r.read(0, &mut b).unwrap();
            assert_eq!(
                b,
                vec![7u8; 4 * BS as usize],
                "a refused write changed data"
            );
            r.write_checked(offset, &data, false, Some(good)).unwrap();
            let mut b = vec![0u8; len];
            r.read(offset, &mut b).unwrap();
            assert_eq!(b, data);
            r.write(0, &vec![7u8; 4 * BS as usize], false).unwrap();
        }
    }

    #[test]
    fn a_full_disk_refuses_new_blocks_with_nothing_changed_and_no_poison() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = crate::file::Faulty::new(crate::file::direct());
        let full = faulty.switch();
        let files: Arc<dyn FileLayer> = Arc::new(faulty);
        let r = Replica::create_in(&files, dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.write(0, &vec![7u8; 2 * BS as usize], false).unwrap();
        r.flush().unwrap();
        full.store(true, Ordering::SeqCst);
        // Blocks 0 and 1 are held, block 2 is new: the whole write is refused, before any byte
        // of it reaches the held blocks.
        let err = r
            .write(BS, &vec![9u8; 2 * BS as usize], false)
            .expect_err("a write needing space on a full disk must be refused");
        assert!(matches!(err, ReplicaError::NoSpace { .. }), "{err}");
        assert_eq!(err.status(), zebu_proto::data::Status::NoSpace);
        assert!(
            !r.is_poisoned(),
            "a refusal for lack of space must not poison"
        );
        let mut b = vec![0u8; 3 * BS as usize];
        r.read(0, &mut b).unwrap();
        let mut want = vec![7u8; 2 * BS as usize];
        want.extend(vec![0u8; BS as usize]);
        assert_eq!(b, want, "a refused write changed data");
        // A zeroing whose tail edge is a new block is refused before its head edge (a held
        // block) changes.
        let err = r
            .zero(BS / 2, 3 * BS, false)
            .expect_err("its tail edge needs space");
        assert!(matches!(err, ReplicaError::NoSpace { .. }), "{err}");
        r.read(0, &mut b).unwrap();
        assert_eq!(b, want, "a refused zeroing changed data");
        // Held blocks are overwritten and zeroed without any new space; a full disk can be
        // trimmed.
        r.write(BS / 2, &vec![5u8; BS as usize], false).unwrap();
        r.zero(0, 4 * BS, false).unwrap();
        r.flush().unwrap();
        r.read(0, &mut b).unwrap();
        assert_eq!(b, vec![0u8; 3 * BS as usize]);
        full.store(false, Ordering::SeqCst);
        r.write(2 * BS, &vec![3u8; BS as usize], true).unwrap();
        r.read(2 * BS, &mut b[..BS as usize]).unwrap();
        assert_eq!(&b[..BS as usize], &vec![3u8; BS as usize][..]);
    }

    #[test]
    fn corruption_is_reported_with_replica_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r-x", SIZE, BS as u32).unwrap();
        r.write(3 * BS, &vec![7u8; BS as usize], true).unwrap();
        // Flip a byte of the stored block behind the replica's back.
        let (data_path, _) = layer_paths(dir.path(), 1);
        let f = OpenOptions::new().write(true).open(data_path).unwrap();
        f.write_all_at(&[8u8], 3 * BS + 100).unwrap();
        let mut buf = vec![0u8; BS as usize];
        let err = r.read(3 * BS, &mut buf).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ReplicaError::Checksum { offset, .. } if offset == 3 * BS),
            "{msg}"
        );
        assert!(msg.contains("v-r-x") && msg.contains("12288"), "{msg}");
        // Other blocks still read.
        r.read(0, &mut buf).unwrap();
    }

    #[test]
    fn a_resync_read_adopts_a_torn_block_and_leaves_sound_ones_alone() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r-t", SIZE, BS as u32).unwrap();
        r.write(0, &vec![1u8; 3 * BS as usize], true).unwrap();
        // A write torn by a crash: block 1's new data reached the data file, its index did not.
        let (data_path, _) = layer_paths(dir.path(), 1);
        let f = OpenOptions::new().write(true).open(data_path).unwrap();
        f.write_all_at(&vec![2u8; BS as usize], BS).unwrap();
        let mut buf = vec![0u8; BS as usize];
        assert!(matches!(
            r.read(BS, &mut buf),
            Err(ReplicaError::Checksum { .. })
        ));
        let mut all = vec![0u8; 4 * BS as usize];
        assert_eq!(r.read_adopting(0, &mut all).unwrap(), 1);
        assert_eq!(&all[..BS as usize], &vec![1u8; BS as usize][..]);
        assert_eq!(
            &all[BS as usize..2 * BS as usize],
            &vec![2u8; BS as usize][..]
        );
        assert_eq!(
            &all[3 * BS as usize..],
            &vec![0u8; BS as usize][..],
            "a hole stays zero"
        );
        r.flush().unwrap();
        drop(r);
        let r = Replica::open(dir.path()).unwrap();
        r.read(BS, &mut buf).unwrap();
        assert_eq!(buf, vec![2u8; BS as usize]);
        assert!(r.read_adopting(1, &mut buf).is_err(), "unaligned");
    }

    #[test]
    fn a_partial_write_or_zeroing_over_a_damaged_edge_block_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r-x", SIZE, BS as u32).unwrap();
        r.write(0, &vec![7u8; 8 * BS as usize], false).unwrap();
        let (data_path, _) = layer_paths(dir.path(), 1);
        let f = OpenOptions::new().write(true).open(data_path).unwrap();
        f.write_all_at(&[8u8], 5 * BS + 100).unwrap();
        let damaged = |err: ReplicaError| {
            assert!(
                matches!(err, ReplicaError::Checksum { offset, .. } if offset == 5 * BS),
                "{err}"
            )
        };
        // Writes and zeroings that start in block 1 and end inside block 5.
        let (offset, len) = (BS + 10, 4 * BS);
        damaged(
            r.write(offset, &vec![1u8; len as usize], false)
                .unwrap_err(),
        );
        damaged(r.zero(offset, len, false).unwrap_err());
        let mut b = vec![0u8; 5 * BS as usize];
        r.read(0, &mut b).unwrap();
        assert_eq!(
            b,
            vec![7u8; 5 * BS as usize],
            "a refused request changed data"
        );
        // Once block 5 is written whole again, both go through.
        r.write(5 * BS, &vec![7u8; BS as usize], false).unwrap();
        r.zero(offset, len, false).unwrap();
        r.read(0, &mut b).unwrap();
        assert!(b[..(BS + 10) as usize].iter().all(|&x| x == 7));
        assert!(b[(BS + 10) as usize..].iter().all(|&x| x == 0));
    }

    #[test]
    fn map_shows_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.write(2 * BS, &vec![1u8; 2 * BS as usize], false).unwrap();
        let m = r.map(0, SIZE).unwrap();
        assert_eq!(
            m,
            vec![
                MapExtent {
                    length: 2 * BS as u32,
                    flags: EXTENT_HOLE | EXTENT_ZERO
                },
                MapExtent {
                    length: 2 * BS as u32,
                    flags: 0
                },
                MapExtent {
                    length: (SIZE - 4 * BS) as u32,
                    flags: EXTENT_HOLE | EXTENT_ZERO
                },
            ]
        );
        assert_eq!(r.facts().allocated_bytes, 2 * BS);
    }

    #[test]
    fn generation_is_durable_and_never_goes_down() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.set_generation(5).unwrap();
        assert!(r.set_generation(4).is_err());
        drop(r);
        assert_eq!(Replica::open(dir.path()).unwrap().generation(), 5);
    }

    #[test]
    fn damaged_index_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.write(0, &vec![1u8; BS as usize], true).unwrap();
        drop(r);
        let (_, idx) = layer_paths(dir.path(), 1);
        let f = OpenOptions::new().write(true).open(&idx).unwrap();
        f.write_all_at(
            &(ENTRY_PRESENT | ENTRY_ZERO).to_le_bytes(),
            INDEX_HEADER_BYTES + 8,
        )
        .unwrap();
        let err = Replica::open(dir.path()).err().expect("open must fail");
        assert!(err.to_string().contains("block 1"), "{err}");
    }
}
