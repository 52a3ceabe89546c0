//! Snapshots, merges and reverts of a replica's layer tree. Design and invariants:
//! `docs/snapshots.md`; formats: `docs/formats.md`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::layer::{entry_of, pack, slot_of, write_in_pieces, BlockIndex, Layer, MAX_SLOTS};
use super::{Chain, Replica, Session, ENTRY_PRESENT, ENTRY_ZERO};
use crate::error::ReplicaError;
use crate::meta::{
    LayerMeta, ReplicaMeta, LAYER_HEAD, LAYER_REMOVED, LAYER_SYSTEM, MAX_LABELS, MAX_LAYERS,
};

/// Blocks a merge copies between two syncs (2 MiB of 4 KiB blocks). Writes to these blocks
/// wait while a batch of a merge into the head is copied.
const MERGE_BATCH: u64 = 512;

/// What a new snapshot is called and carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpec {
    pub name: String,
    /// Made by Zebu for its own work (`purge` removes these), not by a user.
    pub system: bool,
    pub labels: Vec<(String, String)>,
    pub created_unix: u64,
}

/// One layer of the tree, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub id: u64,
    /// Empty for the head.
    pub name: String,
    /// The parent layer's id (0: the root).
    pub parent: u64,
    pub created_unix: u64,
    pub head: bool,
    pub system: bool,
    /// Deleted, its data kept until it is merged (it has more than one child, or the merge has
    /// not finished yet).
    pub removed: bool,
    pub labels: Vec<(String, String)>,
    /// Bytes this layer's own blocks hold.
    pub size_bytes: u64,
}

/// The merge running now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeProgress {
    /// The removed snapshot being merged, and the layer it goes into.
    pub snapshot: String,
    pub into: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A snapshot's content, readable while the replica goes on (see [`Replica::snapshot_view`]).
pub struct SnapshotView {
    name: String,
    replica: String,
    block_size: u64,
    size_bytes: u64,
    layers: Vec<Arc<Layer>>,
    map: BlockIndex,
}

/// One block of `bs` bytes with `flags`, added to a map's extents.
fn push_block(out: &mut Vec<zebu_proto::data::MapExtent>, flags: u32, bs: u64) {
    match out.last_mut() {
        Some(last) if last.flags == flags && u64::from(last.length) + bs <= u64::from(u32::MAX) => {
            last.length += bs as u32
        }
        _ => out.push(zebu_proto::data::MapExtent {
            length: bs as u32,
            flags,
        }),
    }
}

/// Views a replica keeps built (each holds its layers open and a map of the blocks they hold).
const CACHED_VIEWS: usize = 2;

/// The snapshot views a replica keeps built, newest last, with the tree's change count they
/// were built at.
#[derive(Default)]
pub(crate) struct ViewCache {
    changes: u64,
    /// Name, layer id, view, last read.
    views: Vec<(String, u64, Arc<SnapshotView>, Instant)>,
}

/// The runs `[i, j)` of indexes below `n` for which `keep` holds.
fn runs(n: usize, keep: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        if !keep(i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < n && keep(j) {
            j += 1;
        }
        out.push((i, j));
        i = j;
    }
    out
}

fn check_spec(replica: &str, spec: &SnapshotSpec) -> Result<(), ReplicaError> {
    let invalid = |reason: String| ReplicaError::Invalid {
        replica: replica.to_owned(),
        reason,
    };
    if spec.name.is_empty() || spec.name.len() > 255 {
        return Err(invalid(format!(
            "a snapshot name must be 1 to 255 bytes, not {}",
            spec.name.len()
        )));
    }
    if spec.labels.len() > MAX_LABELS {
        return Err(invalid(format!(
            "a snapshot takes at most {MAX_LABELS} labels, not {}",
            spec.labels.len()
        )));
    }
    for (k, v) in &spec.labels {
        if k.is_empty() || k.len() > 255 || v.len() > 255 {
            return Err(invalid(format!(
                "label {k:?}: keys are 1 to 255 bytes and values at most 255"
            )));
        }
    }
    Ok(())
}

impl Replica {
    /// Take a snapshot for `session` (refused once it is stale): the head becomes snapshot
    /// `spec.name`, and a new, empty head takes the writes from now on. No operation of any
    /// session runs meanwhile.
    pub fn snapshot_for(&self, session: &Session, spec: &SnapshotSpec) -> Result<(), ReplicaError> {
        self.alone(Some(session), || self.snapshot_locked(spec))
    }

    /// [`Replica::snapshot_for`] without a session.
    pub fn snapshot(&self, spec: &SnapshotSpec) -> Result<(), ReplicaError> {
        self.alone(None, || self.snapshot_locked(spec))
    }

    /// Run `f` with no operation of any session under way (the fence's write lock), for
    /// `session` unless it is stale.
    pub(super) fn alone<T>(
        &self,
        session: Option<&Session>,
        f: impl FnOnce() -> Result<T, ReplicaError>,
    ) -> Result<T, ReplicaError> {
        let _exclusive = self.fence.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = session {
            self.check_session(s)?;
        }
        f()
    }

    fn snapshot_locked(&self, spec: &SnapshotSpec) -> Result<(), ReplicaError> {
        self.check_usable()?;
        check_spec(&self.name, spec)?;
        // No write, zero or locked read is under way, and none starts, until the new head is
        // published.
        let _all = self.lock_all();
        let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        if meta.snapshot(&spec.name).is_some() {
            return Err(ReplicaError::SnapshotExists {
                replica: self.name.clone(),
                name: spec.name.clone(),
            });
        }
        if meta.layers.len() as u32 >= MAX_LAYERS {
            return Err(ReplicaError::Invalid {
                replica: self.name.clone(),
                reason: format!(
                    "it has {} layers, the most one replica may have; delete snapshots first",
                    meta.layers.len()
                ),
            });
        }
        let chain = self.chain();
        // Every write completed before the snapshot is durable in it.
        self.flush()?;
        let (id, mut layer) = self.new_layer(&meta)?;
        let old_head = chain.head().id;
        let mut next = meta.clone();
        for l in next.layers.iter_mut().filter(|l| l.id == old_head) {
            l.flags = if spec.system { LAYER_SYSTEM } else { 0 };
            l.name = spec.name.clone();
            l.labels = spec.labels.clone();
            l.created_unix = spec.created_unix;
        }
        next.layers.push(LayerMeta {
            id,
            parent: old_head,
            created_unix: spec.created_unix,
            flags: LAYER_HEAD,
            ..Default::default()
        });
        self.check_tree(&next)?;
        let slot = self.alloc_slot(&chain, &[])?;
        layer.slot = slot;
        if let Err(e) = next.store(&self.dir) {
            // Either file may be on disk now: refuse I/O rather than guess which head is live.
            self.poison(&e);
            return Err(e);
        }
        *meta = next;
        let old_held = self.take_head_blocks(&chain);
        self.sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(old_head, old_held);
        let mut slots = chain.slots.clone();
        if slots.len() <= slot {
            slots.resize(slot + 1, None);
        }
        slots[slot] = Some(Arc::new(layer));
        self.publish(Chain {
            slots,
            head: slot,
            depth: chain.depth + 1,
        });
        Ok(())
    }

    /// The files of a new, empty layer with the next id (any left by an attempt that failed
    /// before its metadata named it are replaced).
    fn new_layer(&self, meta: &ReplicaMeta) -> Result<(u64, Layer), ReplicaError> {
        let id = meta.layers.last().map_or(1, |l| l.id + 1);
        Layer::remove_files(&self.dir, id);
        let layer = Layer::create(
            &*self.files,
            &self.dir,
            id,
            self.size_bytes(),
            self.block_size,
        )?;
        Ok((id, layer))
    }

    /// A changed layer list, checked against the rules every `replica.meta` obeys.
    fn check_tree(&self, next: &ReplicaMeta) -> Result<(), ReplicaError> {
        next.check().map_err(|reason| ReplicaError::Invalid {
            replica: self.name.clone(),
            reason,
        })
    }

    /// A slot no open layer uses and no reader's chain may still name (`taken`: slots already
    /// chosen for the chain being built).
    fn alloc_slot(&self, chain: &Chain, taken: &[usize]) -> Result<usize, ReplicaError> {
        let freed = self.freed.lock().unwrap_or_else(|p| p.into_inner());
        // One held only here is named by no chain any more: its slot is free. It is not
        // dropped here: the last close of a layer whose files were removed frees their space,
        // which takes long for a large one, and a snapshot runs with I/O paused
        // ([`Replica::release_freed`] drops it, on the merge thread).
        let busy: HashSet<usize> = freed
            .iter()
            .filter(|l| Arc::strong_count(l) > 1)
            .map(|l| l.slot)
            .chain(taken.iter().copied())
            .collect();
        (0..MAX_SLOTS)
            .find(|i| chain.layer(*i).is_none() && !busy.contains(i))
            .ok_or_else(|| ReplicaError::Invalid {
                replica: self.name.clone(),
                reason: "no layer slot is free".into(),
            })
    }

    /// Delete snapshot `name`: it is recorded removed at once (durably), and its data is merged
    /// into its child in the background ([`Replica::merge_pending`]).
    pub fn remove_snapshot(&self, name: &str) -> Result<(), ReplicaError> {
        self.check_usable()?;
        let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let Some(id) = meta.snapshot(name).map(|l| l.id) else {
            return Err(ReplicaError::NoSnapshot {
                replica: self.name.clone(),
                name: name.to_owned(),
            });
        };
        let mut next = meta.clone();
        for l in next.layers.iter_mut().filter(|l| l.id == id) {
            l.flags |= LAYER_REMOVED;
        }
        next.store(&self.dir)?;
        *meta = next;
        self.tree_changed();
        Ok(())
    }

    /// The tree changed (not by a new snapshot): built views are dropped, so they keep no
    /// layer open that a merge or a revert removed.
    pub(super) fn tree_changed(&self) {
        let mut c = self.views.lock().unwrap_or_else(|p| p.into_inner());
        c.changes += 1;
        c.views.clear();
    }

    /// [`Replica::snapshot_view`], kept for the next reads of the same snapshot (a view reads
    /// the same whatever merges run meanwhile: frozen content never changes).
    pub fn snapshot_view_cached(&self, name: &str) -> Result<Arc<SnapshotView>, ReplicaError> {
        let id = {
            let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            meta.snapshot(name).map(|l| l.id)
        };
        let changes = {
            let mut c = self.views.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, _, v, used)) = c
                .views
                .iter_mut()
                .find(|(n, i, _, _)| n == name && Some(*i) == id)
            {
                *used = Instant::now();
                return Ok(v.clone());
            }
            c.changes
        };
        let view = Arc::new(self.snapshot_view(name)?);
        if let Some(id) = id {
            let mut c = self.views.lock().unwrap_or_else(|p| p.into_inner());
            // Not if the tree changed while it was built: the next read builds it again.
            if c.changes == changes {
                c.views.retain(|(n, _, _, _)| n != name);
                if c.views.len() >= CACHED_VIEWS {
                    c.views.remove(0);
                }
                c.views
                    .push((name.to_owned(), id, view.clone(), Instant::now()));
            }
        }
        Ok(view)
    }

    /// Close the layers that left the chain and that no reader holds any more (for a merged
    /// one, the last close frees its removed files' space). Called off the I/O path.
    pub fn release_freed(&self) {
        let dead: Vec<Arc<Layer>> = {
            let mut freed = self.freed.lock().unwrap_or_else(|p| p.into_inner());
            let (dead, live) = std::mem::take(&mut *freed)
                .into_iter()
                .partition(|l| Arc::strong_count(l) == 1);
            *freed = live;
            dead
        };
        drop(dead);
    }

    /// Drop the views unread for `idle`.
    pub fn drop_idle_views(&self, idle: Duration) {
        let mut c = self.views.lock().unwrap_or_else(|p| p.into_inner());
        c.views.retain(|(_, _, _, used)| used.elapsed() < idle);
    }

    /// Every layer of the tree, oldest first.
    pub fn layers(&self) -> Vec<LayerInfo> {
        let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        let head_held = self.head_blocks(&self.chain());
        let bs = self.block_size as u64;
        meta.layers
            .iter()
            .map(|l| LayerInfo {
                id: l.id,
                name: l.name.clone(),
                parent: l.parent,
                created_unix: l.created_unix,
                head: l.is_head(),
                system: l.is_system(),
                removed: l.is_removed(),
                labels: l.labels.clone(),
                size_bytes: if l.is_head() {
                    head_held
                } else {
                    sizes.get(&l.id).copied().unwrap_or(0)
                } * bs,
            })
            .collect()
    }

    /// The merge running now, if any.
    pub fn merge_progress(&self) -> Option<MergeProgress> {
        self.merging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The next removed layer a merge can take: one with at most one child.
    fn next_merge(&self) -> Option<u64> {
        let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        meta.layers
            .iter()
            .find(|l| l.is_removed() && meta.children(l.id).len() <= 1)
            .map(|l| l.id)
    }

    /// Removed snapshots still in the tree (their merges to come, or running).
    pub fn pending_merges(&self) -> usize {
        let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        meta.layers.iter().filter(|l| l.is_removed()).count()
    }

    /// Whether a removed snapshot waits for its merge.
    pub fn has_pending_merges(&self) -> bool {
        self.next_merge().is_some()
    }

    /// Merge every removed snapshot that can be (see `docs/snapshots.md`), copying at most
    /// `rate` bytes a second (0: no limit), until none is left or `stop` is set. Returns how
    /// many left the tree. Crash-safe at every step; an interrupted merge is resumed by the next
    /// call. A full disk stops it with [`ReplicaError::NoSpace`] and changes nothing else.
    pub fn merge_pending(&self, rate: u64, stop: &AtomicBool) -> Result<usize, ReplicaError> {
        let _one = self.merge_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = 0;
        while let Some(id) = self.next_merge() {
            self.check_usable()?;
            let finished = self.merge_one(id, rate, stop);
            *self.merging.lock().unwrap_or_else(|p| p.into_inner()) = None;
            if !finished? {
                break;
            }
            done += 1;
        }
        Ok(done)
    }

    /// Hold off merges: a running one stops at its next batch (it goes on later, from where it
    /// was), and none starts until the guard is dropped.
    pub(super) fn stop_merges(&self) -> std::sync::MutexGuard<'_, ()> {
        self.merge_yield.store(true, Ordering::Relaxed);
        let one = self.merge_lock.lock();
        self.merge_yield.store(false, Ordering::Relaxed);
        one.unwrap_or_else(|p| p.into_inner())
    }

    /// Test hook: fail as a crash would after `n` more merge steps.
    #[cfg(test)]
    pub(super) fn crash_after(&self, n: i64) {
        self.crash_after.store(n, Ordering::SeqCst);
    }

    pub(super) fn crash_point(&self) -> Result<(), ReplicaError> {
        #[cfg(test)]
        {
            let left = self.crash_after.load(Ordering::SeqCst);
            if left == 0 {
                return Err(ReplicaError::Invalid {
                    replica: self.name.clone(),
                    reason: "stopped at a test crash point".into(),
                });
            }
            if left > 0 {
                self.crash_after.store(left - 1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// The open layer of `id`: the chain's, or opened now (off the live path).
    fn layer_handle(&self, chain: &Chain, id: u64) -> Result<Arc<Layer>, ReplicaError> {
        if let Some(l) = chain.slots.iter().flatten().find(|l| l.id == id) {
            return Ok(l.clone());
        }
        let mut l = Layer::open(
            &*self.files,
            &self.dir,
            id,
            self.size_bytes(),
            self.block_size,
        )?;
        l.slot = usize::MAX;
        Ok(Arc::new(l))
    }

    /// Merge removed layer `s_id` into its only child, or drop it if it has none. `Ok(false)`:
    /// stopped before the end (nothing is lost; the next call goes on).
    fn merge_one(&self, s_id: u64, rate: u64, stop: &AtomicBool) -> Result<bool, ReplicaError> {
        let (s_meta, child) = {
            let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            let Some(s) = meta.layer(s_id).cloned() else {
                return Ok(true);
            };
            let children = meta.children(s_id);
            if children.len() > 1 {
                return Ok(true);
            }
            (s, children.first().map(|c| c.id))
        };
        let Some(c_id) = child else {
            return self.commit_merge(&s_meta, None);
        };
        let chain = self.chain();
        let s = self.layer_handle(&chain, s_id)?;
        let c = self.layer_handle(&chain, c_id)?;
        // On the live path both are in the chain, and the merged map names them.
        let on_path = s.slot != usize::MAX;
        drop(chain);
        let bs = self.block_size as u64;
        let blocks = self.size_bytes() / bs;
        let root = s_meta.parent == 0;
        let total = self
            .sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&s_id)
            .copied()
            .unwrap_or(0)
            * bs;
        let progress = |done: u64| {
            *self.merging.lock().unwrap_or_else(|p| p.into_inner()) = Some(MergeProgress {
                snapshot: s_meta.name.clone(),
                into: c_id,
                bytes_done: done,
                bytes_total: total,
            });
        };
        progress(0);
        let started = Instant::now();
        let mut done = 0u64;
        let mut b = 0u64;
        let poison = |e: ReplicaError| {
            if !matches!(
                e,
                ReplicaError::NoSpace { .. } | ReplicaError::Invalid { .. }
            ) {
                self.poison(&e);
            }
            e
        };
        while b < blocks {
            if stop.load(Ordering::Relaxed) || self.merge_yield.load(Ordering::Relaxed) {
                return Ok(false);
            }
            // Skip what the layer's sparse index does not hold.
            let at = super::INDEX_HEADER_BYTES + b * 8;
            match s.index.next_data(at) {
                Ok(Some(next)) if next > at => {
                    b = ((next - super::INDEX_HEADER_BYTES) / 8).clamp(b + 1, blocks);
                    continue;
                }
                Ok(None) => break,
                Ok(Some(_)) => {}
                Err(e) => return Err(ReplicaError::io("seek index data", &s.index_path, at, e)),
            }
            let end = (b + MERGE_BATCH).min(blocks);
            let n = (end - b) as usize;
            let s_entries = s.read_entries(b, n)?;
            let wanted =
                |s_e: u64, c_e: u64| s_e != 0 && c_e == 0 && !(root && s_e & ENTRY_ZERO != 0);
            // 1. Under the stripes, the data of the blocks the child lacks into its data file.
            let mut copied = Vec::new();
            {
                let _g = self.lock_blocks(b, end);
                let c_entries = c.read_entries(b, n)?;
                let data_runs = runs(n, |k| {
                    wanted(s_entries[k], c_entries[k]) && s_entries[k] & ENTRY_PRESENT != 0
                });
                for (i, j) in data_runs {
                    let (first, last) = (b + i as u64, b + j as u64);
                    let mut buf = vec![0u8; (j - i) * bs as usize];
                    s.data
                        .read_exact_at(&mut buf, first * bs)
                        .map_err(|e| ReplicaError::io("read", &s.data_path, first * bs, e))?;
                    c.reserve(&self.name, first, last, bs, true)?;
                    write_in_pieces(&*c.data, &buf, first * bs).map_err(|e| {
                        poison(ReplicaError::io("write", &c.data_path, first * bs, e))
                    })?;
                    copied.push((first, last));
                }
            }
            self.crash_point()?;
            // 2. The data is durable before any entry names it.
            if !copied.is_empty() {
                self.exclusive_sync(|| {
                    c.data
                        .sync_data()
                        .map_err(|e| ReplicaError::io("fdatasync", &c.data_path, 0, e))
                })?;
            }
            self.crash_point()?;
            // The child's files failed a sync (this merge's or a flush's): its pages may be
            // lost, so nothing may name them.
            self.check_usable()?;
            // 3. Under the stripes again, the entries the child still lacks (a write to the
            // head in between won), and the merged map moved from the snapshot to the child.
            {
                let _g = self.lock_blocks(b, end);
                let c_entries = c.read_entries(b, n)?;
                let chain = self.chain();
                let mut present = 0u64;
                // Index space first (zero entries need it too): a full disk stops the merge
                // with nothing changed.
                let entry_runs = runs(n, |k| wanted(s_entries[k], c_entries[k]));
                for &(i, j) in &entry_runs {
                    c.reserve(&self.name, b + i as u64, b + j as u64, bs, false)?;
                }
                for (i, j) in entry_runs {
                    c.write_entries(b + i as u64, &s_entries[i..j])
                        .map_err(poison)?;
                    for (k, s_e) in s_entries.iter().enumerate().take(j).skip(i) {
                        let block = b + k as u64;
                        present += u64::from(s_e & ENTRY_PRESENT != 0);
                        let m = self.merged.get(block);
                        if on_path && m != 0 && slot_of(m) == s.slot {
                            self.merged.set(block, pack(c.slot, entry_of(m)));
                        }
                    }
                }
                // A zero entry of a root the child does not need: the merged map forgets it.
                if on_path && root {
                    for k in 0..n {
                        let block = b + k as u64;
                        let m = self.merged.get(block);
                        if m != 0 && slot_of(m) == s.slot {
                            self.merged.set(block, 0);
                        }
                    }
                }
                if chain.layer(c.slot).is_some_and(|l| l.id == c.id) && chain.head == c.slot {
                    c.held.fetch_add(present, Ordering::Relaxed);
                } else {
                    *self
                        .sizes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(c.id)
                        .or_insert(0) += present;
                }
                c.dirty.store(true, Ordering::Release);
                // Blocks of S the child held already count as done too.
                let held = s_entries.iter().filter(|e| *e & ENTRY_PRESENT != 0).count() as u64;
                done += held * bs;
            }
            self.crash_point()?;
            progress(done);
            if rate > 0 {
                let due = Duration::from_secs_f64(done as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait.min(Duration::from_secs(1)));
                }
            }
            b = end;
        }
        // 4. Everything the child now holds is durable (both files, whatever a flush did).
        self.exclusive_sync(|| {
            c.data
                .sync_data()
                .map_err(|e| ReplicaError::io("fdatasync", &c.data_path, 0, e))?;
            c.index
                .sync_data()
                .map_err(|e| ReplicaError::io("fdatasync", &c.index_path, 0, e))
        })?;
        self.crash_point()?;
        self.check_usable()?;
        self.commit_merge(&s_meta, Some(&c))
    }

    /// The tree without `s` (its child, if any, takes its parent), then its files go.
    fn commit_merge(
        &self,
        s: &LayerMeta,
        child: Option<&Arc<Layer>>,
    ) -> Result<bool, ReplicaError> {
        let _tree = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            let mut next = meta.clone();
            next.layers.retain(|l| l.id != s.id);
            if let Some(c) = child {
                for l in next.layers.iter_mut().filter(|l| l.id == c.id) {
                    l.parent = s.parent;
                }
            }
            self.check_tree(&next)?;
            next.store(&self.dir)?;
            *meta = next;
            let chain = self.chain();
            if let Some(pos) = chain
                .slots
                .iter()
                .position(|l| l.as_ref().is_some_and(|l| l.id == s.id))
            {
                let mut slots = chain.slots.clone();
                if let Some(gone) = slots[pos].take() {
                    self.freed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(gone);
                }
                self.publish(Chain {
                    slots,
                    head: chain.head,
                    depth: chain.depth - 1,
                });
            }
            self.sizes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&s.id);
        }
        self.crash_point()?;
        self.tree_changed();
        Layer::remove_files(&self.dir, s.id);
        Ok(true)
    }

    /// Make the volume's content exactly snapshot `name`'s (for a detached volume: readers
    /// without a session are not kept out): a new, empty head over it; the old head's data is
    /// dropped. Snapshots newer than it stay, on another branch.
    pub fn revert_for(&self, session: &Session, name: &str) -> Result<(), ReplicaError> {
        self.alone(Some(session), || self.revert_locked(name))
    }

    /// [`Replica::revert_for`] without a session.
    pub fn revert(&self, name: &str) -> Result<(), ReplicaError> {
        self.alone(None, || self.revert_locked(name))
    }

    fn revert_locked(&self, name: &str) -> Result<(), ReplicaError> {
        self.new_head_over(Some(name), None)
    }

    /// For a rebuild target only (`docs/snapshots.md`, "Rebuild copies the tree"): a new, empty
    /// head over snapshot `base` (none: every layer is dropped), for `session` of a set at
    /// `set_generation`; refused unless this replica's generation is below it.
    pub fn rewind_for(
        &self,
        session: &Session,
        base: Option<&str>,
        set_generation: u64,
    ) -> Result<(), ReplicaError> {
        self.alone(Some(session), || {
            self.new_head_over(base, Some(set_generation))
        })
    }

    /// [`Replica::rewind_for`] without a session.
    pub fn rewind(&self, base: Option<&str>, set_generation: u64) -> Result<(), ReplicaError> {
        self.alone(None, || self.new_head_over(base, Some(set_generation)))
    }

    /// A new, empty head over snapshot `base`, the old head's data dropped. A revert
    /// (`rewind: None`) raises the generation and makes the log cover nothing. A rewind
    /// (`Some(set generation)`) keeps the generation, marks every extent of the log dirty, and
    /// with no `base` drops every layer.
    fn new_head_over(&self, base: Option<&str>, rewind: Option<u64>) -> Result<(), ReplicaError> {
        self.check_usable()?;
        if let Some(set) = rewind {
            let mine = self.generation();
            if mine >= set {
                return Err(ReplicaError::Invalid {
                    replica: self.name.clone(),
                    reason: format!(
                        "it is at generation {mine}, not below the set's {set}: a replica in sync is never rewound"
                    ),
                });
            }
        }
        let _one = self.stop_merges();
        let _tree = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        let _all = self.lock_all();
        let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let target = match base {
            Some(name) => match meta.snapshot(name) {
                Some(l) => Some(l.id),
                None => {
                    return Err(ReplicaError::NoSnapshot {
                        replica: self.name.clone(),
                        name: name.to_owned(),
                    })
                }
            },
            None if rewind.is_some() => None,
            None => {
                return Err(ReplicaError::Invalid {
                    replica: self.name.clone(),
                    reason: "a revert names the snapshot to revert to".into(),
                })
            }
        };
        let chain = self.chain();
        let old_head = chain.head().id;
        let (id, head) = self.new_layer(&meta)?;
        let mut next = meta.clone();
        let dropped: Vec<u64> = next
            .layers
            .iter()
            .map(|l| l.id)
            .filter(|l| *l == old_head || target.is_none())
            .collect();
        next.layers.retain(|l| !dropped.contains(&l.id));
        next.layers.push(LayerMeta {
            id,
            parent: target.unwrap_or(0),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            flags: LAYER_HEAD,
            ..Default::default()
        });
        self.check_tree(&next)?;
        // The layers of the new live path, root first, opened (or kept, with their slots).
        let mut path = target.map(|t| next.path(t)).unwrap_or_default();
        path.reverse();
        let mut layers: Vec<Arc<Layer>> = Vec::with_capacity(path.len() + 1);
        let mut taken = Vec::new();
        for pid in &path {
            let l = match chain.slots.iter().flatten().find(|l| l.id == *pid) {
                Some(l) => l.clone(),
                None => {
                    let mut l = Layer::open(
                        &*self.files,
                        &self.dir,
                        *pid,
                        self.size_bytes(),
                        self.block_size,
                    )?;
                    l.slot = self.alloc_slot(&chain, &taken)?;
                    Arc::new(l)
                }
            };
            taken.push(l.slot);
            layers.push(l);
        }
        let mut head = head;
        head.slot = self.alloc_slot(&chain, &taken)?;
        if rewind.is_some() {
            // Only a whole copy makes it a member again (the rebuild's plan copies every
            // extent its own log has dirty), whatever an interrupted rebuild recorded.
            let r = self.wil.reset_all_dirty();
            self.poison_on_io(r)?;
            // Test hook: a power cut between the log and the tree.
            self.crash_point()?;
        } else {
            // The content changes outside any write the logs see: first (durably) the log
            // covers nothing, so a member that left before rejoins by a full copy; then the new
            // tree and a generation one higher in one replacement, so a replica of the volume
            // the revert missed is older by evidence (`docs/snapshots.md`). A crash between them
            // leaves the old content with a log that covers less: only more copying.
            let r = self.wil.settle(
                &self.name,
                &[],
                false,
                zebu_proto::data::WIL_CLEAN,
                crate::wil::COVERS_NOTHING,
            );
            self.poison_on_io(r)?;
            next.generation = meta.generation + 1;
        }
        if let Err(e) = next.store(&self.dir) {
            self.poison(&e);
            return Err(e);
        }
        self.generation.store(next.generation, Ordering::Release);
        *meta = next;
        // The merged map of the new live path.
        self.merged.clear();
        let blocks = self.size_bytes() / self.block_size as u64;
        for l in &layers {
            let slot = l.slot;
            let merged = &self.merged;
            if let Err(e) = l.scan(0, blocks, |b, e| {
                merged.set(b, pack(slot, e));
                Ok(())
            }) {
                self.poison(&e);
                return Err(e);
            }
        }
        let keep: HashSet<u64> = path.iter().copied().collect();
        {
            let mut freed = self.freed.lock().unwrap_or_else(|p| p.into_inner());
            for l in chain.slots.iter().flatten() {
                if !keep.contains(&l.id) {
                    freed.push(l.clone());
                }
            }
        }
        {
            let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
            for d in &dropped {
                sizes.remove(d);
            }
        }
        // The new head holds nothing: the old head's count goes with it.
        let _ = self.take_head_blocks(&chain);
        let head_slot = head.slot;
        let depth = layers.len() + 1;
        let max = layers
            .iter()
            .map(|l| l.slot)
            .max()
            .unwrap_or(0)
            .max(head_slot);
        let mut slots = vec![None; max + 1];
        for l in layers {
            let s = l.slot;
            slots[s] = Some(l);
        }
        slots[head_slot] = Some(Arc::new(head));
        self.publish(Chain {
            slots,
            head: head_slot,
            depth,
        });
        for d in dropped {
            Layer::remove_files(&self.dir, d);
        }
        self.tree_changed();
        Ok(())
    }

    /// A delta's range: inside the volume, block-aligned, one extent a block at most; returns
    /// the block size.
    fn check_delta_range(&self, offset: u64, length: u64) -> Result<u64, ReplicaError> {
        self.check_usable()?;
        self.check_range(offset, length)?;
        let bs = self.block_size as u64;
        if !offset.is_multiple_of(bs)
            || !length.is_multiple_of(bs)
            || length / bs > zebu_proto::data::MAX_MAP_EXTENTS as u64
        {
            return Err(ReplicaError::Invalid {
                replica: self.name.clone(),
                reason: format!(
                    "a delta of {offset}+{length} is not block-aligned or spans more than {} blocks",
                    zebu_proto::data::MAX_MAP_EXTENTS
                ),
            });
        }
        Ok(bs)
    }

    /// What the live head's path above snapshot `base` holds in `length` bytes at `offset`, as
    /// [`Replica::snapshot_delta`] tells it of a snapshot: read from the merged map (each
    /// block's deciding layer, whether it lies above `base`). Writes to the range must not run
    /// meanwhile (a rebuild holds its range lock); a merge may: it moves blocks between layers
    /// above `base`, or into `base` from below, never across it.
    pub fn head_delta(
        &self,
        base: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<zebu_proto::data::MapExtent>, ReplicaError> {
        use zebu_proto::data::{MapExtent, EXTENT_HOLE, EXTENT_ZERO};
        let bs = self.check_delta_range(offset, length)?;
        let segment: HashSet<u64> = {
            let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            let Some(b_id) = meta.snapshot(base).map(|l| l.id) else {
                return Err(ReplicaError::NoSnapshot {
                    replica: self.name.clone(),
                    name: base.to_owned(),
                });
            };
            let path = meta.path(meta.head().id);
            let Some(at) = path.iter().position(|id| *id == b_id) else {
                return Err(ReplicaError::Invalid {
                    replica: self.name.clone(),
                    reason: format!("snapshot {base} is not on the live head's path"),
                });
            };
            path[..at].iter().copied().collect()
        };
        let mut chain = self.chain();
        let mut out: Vec<MapExtent> = Vec::new();
        for b in offset / bs..(offset + length) / bs {
            let m = self.merged.get(b);
            let e = entry_of(m);
            let flags = if e & (ENTRY_PRESENT | ENTRY_ZERO) == 0 {
                EXTENT_HOLE
            } else {
                let id = match chain.layer(slot_of(m)) {
                    Some(l) => l.id,
                    None => {
                        chain = self.chain();
                        chain.layer(slot_of(m)).map(|l| l.id).ok_or_else(|| {
                            ReplicaError::Invalid {
                                replica: self.name.clone(),
                                reason: format!("block {b} names a layer slot no chain has"),
                            }
                        })?
                    }
                };
                if !segment.contains(&id) {
                    EXTENT_HOLE
                } else if e & ENTRY_PRESENT != 0 {
                    0
                } else {
                    EXTENT_ZERO
                }
            };
            push_block(&mut out, flags, bs);
        }
        Ok(out)
    }

    /// What the layers of snapshot `name`'s path above snapshot `base` (none: down to the root)
    /// hold in `length` bytes at `offset`: each block's extent is [`EXTENT_HOLE`] (none of them
    /// holds it), [`EXTENT_ZERO`] (the topmost that holds it holds zeroes) or data (0). Removed
    /// layers being merged count, so a merge running meanwhile changes nothing in the answer's
    /// effect: the content of `name` is `base`'s with these blocks laid over it.
    pub fn snapshot_delta(
        &self,
        name: &str,
        base: Option<&str>,
        offset: u64,
        length: u64,
    ) -> Result<Vec<zebu_proto::data::MapExtent>, ReplicaError> {
        use zebu_proto::data::{MapExtent, EXTENT_HOLE, EXTENT_ZERO};
        let bs = self.check_delta_range(offset, length)?;
        let _tree = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        let segment: Vec<u64> = {
            let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            let missing = |n: &str| ReplicaError::NoSnapshot {
                replica: self.name.clone(),
                name: n.to_owned(),
            };
            let s = meta.snapshot(name).ok_or_else(|| missing(name))?;
            let path = meta.path(s.id);
            match base {
                None => path,
                Some(b) => {
                    let b_id = meta.snapshot(b).ok_or_else(|| missing(b))?.id;
                    let Some(at) = path.iter().position(|id| *id == b_id) else {
                        return Err(ReplicaError::Invalid {
                            replica: self.name.clone(),
                            reason: format!("snapshot {b} is not below snapshot {name}"),
                        });
                    };
                    path[..at].to_vec()
                }
            }
        };
        let chain = self.chain();
        let (first, count) = (offset / bs, (length / bs) as usize);
        let mut decided = vec![0u64; count];
        for id in &segment {
            let l = self.layer_handle(&chain, *id)?;
            for (d, e) in decided.iter_mut().zip(l.read_entries(first, count)?) {
                if *d == 0 {
                    *d = e;
                }
            }
        }
        let mut out: Vec<MapExtent> = Vec::new();
        for e in decided {
            let flags = if e & ENTRY_PRESENT != 0 {
                0
            } else if e & ENTRY_ZERO != 0 {
                EXTENT_ZERO
            } else {
                EXTENT_HOLE
            };
            push_block(&mut out, flags, bs);
        }
        Ok(out)
    }

    /// Snapshot `name`'s content, to read while the replica goes on: its layers stay open for
    /// as long as the view lives (a merge of one of them changes nothing the view reads).
    pub fn snapshot_view(&self, name: &str) -> Result<SnapshotView, ReplicaError> {
        self.check_usable()?;
        let _tree = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        let path = {
            let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            let Some(s) = meta.snapshot(name) else {
                return Err(ReplicaError::NoSnapshot {
                    replica: self.name.clone(),
                    name: name.to_owned(),
                });
            };
            let mut path = meta.path(s.id);
            path.reverse();
            path
        };
        let chain = self.chain();
        let blocks = self.size_bytes() / self.block_size as u64;
        let map = BlockIndex::new(blocks);
        let mut layers = Vec::with_capacity(path.len());
        for (i, id) in path.iter().enumerate() {
            let l = self.layer_handle(&chain, *id)?;
            l.scan(0, blocks, |b, e| {
                map.set(b, pack(i, e));
                Ok(())
            })?;
            layers.push(l);
        }
        Ok(SnapshotView {
            name: name.to_owned(),
            replica: self.name.clone(),
            block_size: self.block_size as u64,
            size_bytes: self.size_bytes(),
            layers,
            map,
        })
    }
}

impl SnapshotView {
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Read `out.len()` bytes at `offset` (block-aligned) of the snapshot, checking every
    /// block's checksum.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), ReplicaError> {
        let bs = self.block_size;
        if !offset.is_multiple_of(bs)
            || !(out.len() as u64).is_multiple_of(bs)
            || offset + out.len() as u64 > self.size_bytes
        {
            return Err(ReplicaError::Invalid {
                replica: self.replica.clone(),
                reason: format!(
                    "a read of snapshot {} at {offset}+{} is not block-aligned inside the volume",
                    self.name,
                    out.len()
                ),
            });
        }
        for (i, buf) in out.chunks_exact_mut(bs as usize).enumerate() {
            let block = offset / bs + i as u64;
            let m = self.map.get(block);
            if m & ENTRY_PRESENT == 0 {
                buf.fill(0);
                continue;
            }
            let l = &self.layers[slot_of(m)];
            l.data
                .read_exact_at(buf, block * bs)
                .map_err(|e| ReplicaError::io("read", &l.data_path, block * bs, e))?;
            if crc32c::crc32c(buf) != m as u32 {
                return Err(ReplicaError::Checksum {
                    replica: self.replica.clone(),
                    offset: block * bs,
                    layer: l.id,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::FileLayer;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const BS: u64 = 4096;
    const SIZE: u64 = 96 * BS;

    fn spec(name: &str) -> SnapshotSpec {
        SnapshotSpec {
            name: name.into(),
            system: false,
            labels: vec![("by".into(), "test".into())],
            created_unix: 1,
        }
    }

    fn pattern(len: u64, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
            .collect()
    }

    fn read_all(r: &Replica) -> Vec<u8> {
        let mut v = vec![0u8; SIZE as usize];
        r.read(0, &mut v).unwrap();
        v
    }

    fn view_all(r: &Replica, name: &str) -> Vec<u8> {
        let view = r.snapshot_view(name).unwrap();
        let mut v = vec![0u8; SIZE as usize];
        view.read(0, &mut v).unwrap();
        v
    }

    fn names(r: &Replica) -> Vec<String> {
        r.layers()
            .into_iter()
            .filter(|l| !l.head && !l.removed)
            .map(|l| l.name)
            .collect()
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write {
            offset: u64,
            len: u64,
            seed: u8,
        },
        Zero {
            offset: u64,
            len: u64,
        },
        Snapshot,
        Remove(usize),
        Merge,
        /// A merge stopped after this many steps, as a crash would stop it.
        MergeCut(i64),
        Revert(usize),
        Reopen,
    }

    fn step() -> impl Strategy<Value = Step> {
        let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(20 * BS)));
        prop_oneof![
            5 => (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Step::Write { offset, len, seed }),
            2 => range.prop_map(|(offset, len)| Step::Zero { offset, len }),
            3 => Just(Step::Snapshot),
            3 => any::<usize>().prop_map(Step::Remove),
            1 => Just(Step::Merge),
            2 => (0i64..12).prop_map(Step::MergeCut),
            1 => any::<usize>().prop_map(Step::Revert),
            1 => Just(Step::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any mix of writes, zeroes, snapshots, deletions, merges (whole or cut short),
        /// reverts and reopens: the head and every snapshot read what a model of plain byte
        /// arrays says, and once the merges finish only the live snapshots are left.
        #[test]
        fn snapshots_agree_with_a_model(steps in proptest::collection::vec(step(), 1..50)) {
            let dir = tempfile::tempdir().unwrap();
            let mut r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
            let mut head = vec![0u8; SIZE as usize];
            let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut n = 0;
            let stop = AtomicBool::new(false);
            for s in steps {
                match s {
                    Step::Write { offset, len, seed } => {
                        let d = pattern(len, seed);
                        r.write(offset, &d, false).unwrap();
                        head[offset as usize..(offset + len) as usize].copy_from_slice(&d);
                    }
                    Step::Zero { offset, len } => {
                        r.zero(offset, len, false).unwrap();
                        head[offset as usize..(offset + len) as usize].fill(0);
                    }
                    Step::Snapshot => {
                        n += 1;
                        let name = format!("s{n}");
                        r.snapshot(&spec(&name)).unwrap();
                        snaps.insert(name, head.clone());
                    }
                    Step::Remove(i) if !snaps.is_empty() => {
                        let name = snaps.keys().nth(i % snaps.len()).unwrap().clone();
                        r.remove_snapshot(&name).unwrap();
                        snaps.remove(&name);
                    }
                    Step::Revert(i) if !snaps.is_empty() => {
                        let name = snaps.keys().nth(i % snaps.len()).unwrap().clone();
                        r.revert(&name).unwrap();
                        head = snaps[&name].clone();
                    }
                    Step::Remove(_) | Step::Revert(_) => {}
                    Step::Merge => {
                        r.merge_pending(0, &stop).unwrap();
                    }
                    Step::MergeCut(k) => {
                        r.crash_after(k);
                        if r.merge_pending(0, &stop).is_err() {
                            // The process ends where it stopped; it starts again.
                            drop(r);
                            r = Replica::open(dir.path()).unwrap();
                        }
                        r.crash_after(-1);
                    }
                    Step::Reopen => {
                        drop(r);
                        r = Replica::open(dir.path()).unwrap();
                    }
                }
                prop_assert!(read_all(&r) == head, "the head differs from the model");
                for (name, content) in &snaps {
                    prop_assert!(&view_all(&r, name) == content, "snapshot {} differs", name);
                }
            }
            r.merge_pending(0, &stop).unwrap();
            prop_assert!(!r.has_pending_merges());
            let mut live = names(&r);
            live.sort();
            prop_assert_eq!(live, snaps.keys().cloned().collect::<Vec<_>>());
            // Merged layers leave no files behind: one data and one index file per layer.
            let files = std::fs::read_dir(dir.path()).unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("layer-"))
                .count();
            prop_assert_eq!(files, 2 * r.layers().len());
            drop(r);
            let r = Replica::open(dir.path()).unwrap();
            prop_assert!(read_all(&r) == head);
            for (name, content) in &snaps {
                prop_assert!(&view_all(&r, name) == content, "snapshot {} differs after reopen", name);
            }
        }
    }

    /// Through the crash-simulating file layer, a merge of the snapshot under the head and of
    /// one in the middle, cut by a power loss at every step in turn: after each cut, the head
    /// and every snapshot read exactly what they held (no block fails its checksum), and the
    /// merge then completes.
    #[test]
    fn a_merge_cut_by_a_power_loss_at_any_step_loses_nothing() {
        // Writeback after one dirty page: index pages too reach the disk before any sync.
        for (victim, seed) in [("b", 1u64), ("a", 2), ("b", 3), ("a", 4)] {
            let mut cut = 0i64;
            loop {
                let dir = tempfile::tempdir().unwrap();
                let files: Arc<dyn FileLayer> =
                    Arc::new(crate::file::CrashSim::new(4096, seed ^ cut as u64));
                let r =
                    Replica::create_in(&files, dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
                r.write(0, &pattern(40 * BS, 1), false).unwrap();
                r.zero(10 * BS, 3 * BS, false).unwrap();
                r.snapshot(&spec("a")).unwrap();
                r.write(20 * BS, &pattern(30 * BS, 2), false).unwrap();
                r.zero(0, 2 * BS, false).unwrap();
                r.snapshot(&spec("b")).unwrap();
                r.write(45 * BS, &pattern(20 * BS, 3), false).unwrap();
                r.zero(30 * BS, BS, false).unwrap();
                r.flush().unwrap();
                let head = read_all(&r);
                let other = if victim == "a" { "b" } else { "a" };
                let keep = view_all(&r, other);
                r.remove_snapshot(victim).unwrap();
                r.crash_after(cut);
                let stop = AtomicBool::new(false);
                let finished = r.merge_pending(0, &stop).is_ok();
                drop(r);
                // Power loss: what was not synced is gone.
                let r = Replica::open_in(&files, dir.path()).unwrap();
                assert_eq!(
                    read_all(&r),
                    head,
                    "the head after a cut at step {cut} ({victim})"
                );
                assert_eq!(
                    view_all(&r, other),
                    keep,
                    "snapshot {other} after a cut at step {cut}"
                );
                assert!(r.snapshot_view(victim).is_err());
                r.merge_pending(0, &stop).unwrap();
                assert!(!r.has_pending_merges());
                assert_eq!(read_all(&r), head);
                assert_eq!(view_all(&r, other), keep);
                assert_eq!(r.layers().len(), 2, "{:?}", r.layers());
                drop(r);
                let r = Replica::open_in(&files, dir.path()).unwrap();
                assert_eq!(read_all(&r), head);
                assert_eq!(view_all(&r, other), keep);
                if finished {
                    break;
                }
                cut += 1;
            }
            assert!(
                cut > 3,
                "the merge of {victim} had too few steps to cut: {cut}"
            );
        }
    }

    /// Through the crash-simulating file layer: writes not flushed by anyone are in a snapshot
    /// once it is taken (it syncs the head first), so a power cut right after it loses none of
    /// them; and a cut between a snapshot's new files and its metadata (files no record names)
    /// leaves the replica as it was.
    #[test]
    fn a_power_cut_after_or_during_a_snapshot_loses_nothing_it_holds() {
        for seed in 0..8u64 {
            let dir = tempfile::tempdir().unwrap();
            let files: Arc<dyn FileLayer> = Arc::new(crate::file::CrashSim::new(4096, seed));
            let r = Replica::create_in(&files, dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
            r.write(0, &pattern(30 * BS, seed as u8), false).unwrap();
            r.zero(5 * BS, 2 * BS, false).unwrap();
            let before = read_all(&r);
            r.snapshot(&spec("s")).unwrap();
            drop(r);
            let r = Replica::open_in(&files, dir.path()).unwrap();
            assert_eq!(
                view_all(&r, "s"),
                before,
                "seed {seed}: the snapshot after a cut"
            );
            assert_eq!(read_all(&r), before, "seed {seed}: the head after a cut");
            // A second snapshot cut before its metadata was replaced: its files are there, no
            // record names them.
            let (d, i) = super::super::layer_paths(dir.path(), 3);
            std::fs::write(&d, b"left by a cut").unwrap();
            std::fs::write(&i, b"left by a cut").unwrap();
            drop(r);
            let r = Replica::open_in(&files, dir.path()).unwrap();
            assert!(
                !d.exists() && !i.exists(),
                "files no record names are removed"
            );
            assert_eq!(read_all(&r), before);
            r.snapshot(&spec("t")).unwrap();
            assert_eq!(view_all(&r, "t"), before);
        }
    }

    /// Writers on the head and readers of a snapshot run while the snapshot under the head
    /// merges into it (a slow disk widens every window between the merge's steps): every read
    /// is right, and no write is lost, in memory or on disk (checked by opening it again after
    /// each round).
    #[test]
    fn a_merge_into_the_live_head_under_io_loses_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let files: Arc<dyn FileLayer> = Arc::new(
            crate::file::Faulty::new(crate::file::direct())
                .slow_syncs(std::time::Duration::from_millis(2)),
        );
        let mut r =
            Arc::new(Replica::create_in(&files, dir.path(), "v", "v-r", SIZE, BS as u32).unwrap());
        r.write(0, &pattern(SIZE, 7), false).unwrap();
        r.snapshot(&spec("base")).unwrap();
        let base = view_all(&r, "base");
        for round in 0..6u8 {
            r.write(0, &pattern(SIZE, 8 + round), false).unwrap();
            r.snapshot(&spec("under")).unwrap();
            r.remove_snapshot("under").unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let writers: Vec<_> = (0..2u64)
                .map(|t| {
                    let (r, stop) = (r.clone(), stop.clone());
                    std::thread::spawn(move || {
                        // Thread t owns the blocks b with b % 2 == t, and writes each once a
                        // round, spread over the merge: a write the merge clobbered is not
                        // written again before the check.
                        for i in 0..SIZE / BS / 2 {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let b = i * 2 + t;
                            if i % 5 == 0 {
                                r.zero(b * BS + 100, 200, false).unwrap();
                            } else {
                                r.write(b * BS, &pattern(BS, (i % 200) as u8 ^ round), false)
                                    .unwrap();
                            }
                            std::thread::sleep(std::time::Duration::from_micros(100));
                        }
                    })
                })
                .collect();
            let reader = {
                let (r, stop, base) = (r.clone(), stop.clone(), base.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        assert_eq!(view_all(&r, "base"), base);
                    }
                })
            };
            r.merge_pending(0, &AtomicBool::new(false)).unwrap();
            stop.store(true, Ordering::Relaxed);
            for w in writers {
                w.join().unwrap();
            }
            reader.join().unwrap();
            let expected = read_all(&r);
            r.flush().unwrap();
            drop(Arc::try_unwrap(r).ok().expect("the threads are done"));
            r = Arc::new(Replica::open_in(&files, dir.path()).unwrap());
            assert_eq!(read_all(&r), expected, "round {round}, opened again");
            assert_eq!(view_all(&r, "base"), base);
            assert_eq!(names(&r), vec!["base".to_string()]);
        }
    }

    /// Many snapshot create/delete cycles: the tree comes back to its short length, and the
    /// in-memory map stays the size of one layer's.
    #[test]
    fn create_delete_cycles_leave_the_tree_and_memory_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.write(0, &pattern(SIZE, 3), false).unwrap();
        let memory = r.facts().index_memory_bytes;
        let stop = AtomicBool::new(false);
        for i in 0..300u64 {
            r.write((i % 90) * BS, &pattern(2 * BS, i as u8), false)
                .unwrap();
            r.snapshot(&spec(&format!("c{i}"))).unwrap();
            if i >= 5 {
                r.remove_snapshot(&format!("c{}", i - 5)).unwrap();
            }
            if i % 10 == 0 {
                r.merge_pending(0, &stop).unwrap();
            }
        }
        r.merge_pending(0, &stop).unwrap();
        assert_eq!(r.layers().len(), 6, "five snapshots and the head");
        assert_eq!(r.facts().index_memory_bytes, memory);
        let sizes: u64 = r.layers().iter().map(|l| l.size_bytes).sum();
        assert!(sizes >= SIZE, "the layers hold every block: {sizes}");
    }

    /// The live snapshots on the head's path, root first.
    fn live_path(r: &Replica) -> Vec<String> {
        let layers = r.layers();
        let mut out = Vec::new();
        let mut at = layers.iter().find(|l| l.head);
        while let Some(l) = at {
            if !l.head && !l.removed {
                out.push(l.name.clone());
            }
            at = layers.iter().find(|p| p.id == l.parent && l.parent != 0);
        }
        out.reverse();
        out
    }

    /// What a rebuild does (`zebu-engine/src/engine/tree_copy.rs`): snapshot `name`'s blocks
    /// above `base`, read from `src`, written into `dst`'s head; then `dst` takes the snapshot.
    fn copy_snapshot(src: &Replica, dst: &Replica, name: &str, base: Option<&str>) {
        let view = src.snapshot_view(name).unwrap();
        let delta = src.snapshot_delta(name, base, 0, SIZE).unwrap();
        lay_over(dst, &delta, |off, buf| view.read(off, buf).unwrap());
        dst.snapshot(&spec(name)).unwrap();
    }

    /// Write into `dst`'s head the blocks a delta names: zeroes as zeroes, data read by `read`.
    fn lay_over(
        dst: &Replica,
        delta: &[zebu_proto::data::MapExtent],
        read: impl Fn(u64, &mut [u8]),
    ) {
        use zebu_proto::data::{EXTENT_HOLE, EXTENT_ZERO};
        let mut off = 0;
        for x in delta {
            let n = u64::from(x.length);
            if x.flags & EXTENT_HOLE != 0 {
            } else if x.flags & EXTENT_ZERO != 0 {
                dst.zero(off, n, false).unwrap();
            } else {
                let mut buf = vec![0u8; n as usize];
                read(off, &mut buf);
                dst.write(off, &buf, false).unwrap();
            }
            off += n;
        }
        assert_eq!(off, SIZE);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// A tree built by any steps (writes, zeroes, snapshots, deletes, merges cut short,
        /// reverts) is copied snapshot by snapshot into an empty replica, with a copy cut short
        /// and rewound on the way: every snapshot of the live path then reads the same there.
        #[test]
        fn a_tree_copied_by_deltas_reads_the_same(
            steps in proptest::collection::vec(step(), 1..40),
            cut in any::<usize>(),
            garbage in any::<u8>(),
        ) {
            let sdir = tempfile::tempdir().unwrap();
            let ddir = tempfile::tempdir().unwrap();
            let src = Replica::create(sdir.path(), "v", "v-r1", SIZE, BS as u32).unwrap();
            let dst = Replica::create(ddir.path(), "v", "v-r2", SIZE, BS as u32).unwrap();
            let stop = AtomicBool::new(false);
            let mut n = 0;
            let mut live: Vec<String> = Vec::new();
            for s in steps {
                match s {
                    Step::Write { offset, len, seed } => {
                        src.write(offset, &pattern(len, seed), false).unwrap();
                    }
                    Step::Zero { offset, len } => src.zero(offset, len, false).unwrap(),
                    Step::Snapshot => {
                        n += 1;
                        let name = format!("s{n}");
                        src.snapshot(&spec(&name)).unwrap();
                        live.push(name);
                    }
                    Step::Remove(i) if !live.is_empty() => {
                        let name = live.remove(i % live.len());
                        src.remove_snapshot(&name).unwrap();
                    }
                    Step::Revert(i) if !live.is_empty() => {
                        src.revert(&live[i % live.len()]).unwrap();
                    }
                    Step::MergeCut(k) => {
                        // Merges left half done make removed layers sit in the deltas.
                        src.crash_after(k);
                        let _ = src.merge_pending(0, &stop);
                        src.crash_after(-1);
                    }
                    Step::Merge => {
                        src.merge_pending(0, &stop).unwrap();
                    }
                    _ => {}
                }
            }
            let path = live_path(&src);
            let cut = if path.is_empty() { 0 } else { cut % path.len() };
            for (k, name) in path.iter().enumerate() {
                let base = k.checked_sub(1).map(|i| path[i].as_str());
                if k == cut {
                    // A copy cut short: half of it, and some garbage, in the head; the next
                    // attempt rewinds to what it keeps and copies the snapshot again.
                    dst.write(0, &pattern(8 * BS, garbage), false).unwrap();
                    dst.rewind(base, 1).unwrap();
                    prop_assert_eq!(live_path(&dst), path[..k].to_vec());
                }
                copy_snapshot(&src, &dst, name, base);
            }
            prop_assert_eq!(live_path(&dst), path.clone());
            for name in &path {
                prop_assert!(view_all(&dst, name) == view_all(&src, name), "snapshot {} differs", name);
            }
            // The head: what the source's head holds over its last snapshot.
            if let Some(last) = path.last() {
                let delta = src.head_delta(last, 0, SIZE).unwrap();
                lay_over(&dst, &delta, |off, buf| src.read(off, buf).unwrap());
                prop_assert!(read_all(&dst) == read_all(&src), "the head differs");
            }
            drop(dst);
            let dst = Replica::open(ddir.path()).unwrap();
            for name in &path {
                prop_assert!(view_all(&dst, name) == view_all(&src, name), "snapshot {} differs after reopen", name);
            }
        }
    }

    #[test]
    fn a_rewind_drops_the_head_or_everything_and_never_runs_on_a_replica_in_sync() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.write(0, &pattern(4 * BS, 3), false).unwrap();
        r.snapshot(&spec("a")).unwrap();
        r.write(BS, &pattern(BS, 9), false).unwrap();
        r.set_generation(5).unwrap();
        let before = std::fs::read(dir.path().join(crate::meta::META_FILE)).unwrap();
        // Not below the set's generation: a member in sync; nothing changes.
        assert!(matches!(
            r.rewind(Some("a"), 5),
            Err(ReplicaError::Invalid { .. })
        ));
        assert!(matches!(
            r.rewind(Some("nope"), 6),
            Err(ReplicaError::NoSnapshot { .. })
        ));
        assert_eq!(
            std::fs::read(dir.path().join(crate::meta::META_FILE)).unwrap(),
            before
        );
        r.rewind(Some("a"), 6).unwrap();
        assert_eq!(read_all(&r), view_all(&r, "a"));
        assert_eq!(r.generation(), 5, "a rewind is no evidence");
        let log = crate::wil::LogFacts::decode(&r.wil_read(0, 1).unwrap()).unwrap();
        assert_eq!(log.covers_from, crate::wil::COVERS_NOTHING);
        r.rewind(None, 6).unwrap();
        assert_eq!(read_all(&r), vec![0u8; SIZE as usize]);
        assert_eq!(r.layers().len(), 1);
        assert_eq!(layer_files(dir.path()), 2);
        drop(r);
        let r = Replica::open(dir.path()).unwrap();
        assert_eq!(read_all(&r), vec![0u8; SIZE as usize]);
        assert_eq!(r.generation(), 5);
        // Every extent is dirty: only a whole copy makes it a member again.
        let states = r.wil_read(0, 1).unwrap();
        assert_eq!(
            states[crate::wil::READ_HEADER_BYTES],
            zebu_proto::data::WIL_DIRTY
        );
    }

    /// A power cut (the crash-simulating file layer) during a rewind, between its log reset
    /// and its new tree, or right after it: the replica opens with either its old content or
    /// the base snapshot's, every snapshot intact, its generation unchanged, and every extent
    /// of its log dirty, so a rebuild can only copy more.
    #[test]
    fn a_power_cut_during_or_after_a_rewind_leaves_old_or_new_and_a_log_that_copies_all() {
        for seed in 0..4u64 {
            for cut in [true, false] {
                let dir = tempfile::tempdir().unwrap();
                let files: Arc<dyn FileLayer> = Arc::new(crate::file::CrashSim::new(4096, seed));
                let r =
                    Replica::create_in(&files, dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
                r.write(0, &pattern(20 * BS, seed as u8), false).unwrap();
                r.snapshot(&spec("a")).unwrap();
                r.write(5 * BS, &pattern(10 * BS, 7), false).unwrap();
                r.zero(0, 2 * BS, false).unwrap();
                r.flush().unwrap();
                r.set_generation(5).unwrap();
                let (a, head) = (view_all(&r, "a"), read_all(&r));
                if cut {
                    r.crash_after(0);
                    assert!(r.rewind(Some("a"), 6).is_err());
                } else {
                    r.rewind(Some("a"), 6).unwrap();
                }
                drop(r);
                let r = Replica::open_in(&files, dir.path()).unwrap();
                let want = if cut { &head } else { &a };
                assert!(read_all(&r) == *want, "seed {seed}, cut {cut}: the head");
                assert!(view_all(&r, "a") == a, "seed {seed}, cut {cut}: snapshot a");
                assert_eq!(r.generation(), 5);
                let log = r.wil_read(0, 1).unwrap();
                assert_eq!(
                    log[crate::wil::READ_HEADER_BYTES],
                    zebu_proto::data::WIL_DIRTY,
                    "seed {seed}, cut {cut}: the log"
                );
                assert_eq!(layer_files(dir.path()), 4, "seed {seed}, cut {cut}");
            }
        }
    }

    fn layer_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("layer-")
            })
            .count()
    }

    #[test]
    fn cached_views_are_reused_and_dropped_when_the_tree_changes() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.write(0, &pattern(4 * BS, 1), false).unwrap();
        r.snapshot(&spec("a")).unwrap();
        r.write(BS, &pattern(BS, 2), false).unwrap();
        r.snapshot(&spec("b")).unwrap();
        let b = view_all(&r, "b");
        let v1 = r.snapshot_view_cached("b").unwrap();
        assert!(Arc::ptr_eq(&v1, &r.snapshot_view_cached("b").unwrap()));
        // a merges into b: b reads the same, from a view built again.
        r.remove_snapshot("a").unwrap();
        assert!(matches!(
            r.snapshot_view_cached("a"),
            Err(ReplicaError::NoSnapshot { .. })
        ));
        r.merge_pending(0, &AtomicBool::new(false)).unwrap();
        let v2 = r.snapshot_view_cached("b").unwrap();
        assert!(!Arc::ptr_eq(&v1, &v2));
        let mut got = vec![0u8; SIZE as usize];
        v2.read(0, &mut got).unwrap();
        assert!(got == b);
        r.drop_idle_views(Duration::ZERO);
        assert!(!Arc::ptr_eq(&v2, &r.snapshot_view_cached("b").unwrap()));
    }

    #[test]
    fn a_delta_names_only_snapshots_on_one_path() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.snapshot(&spec("a")).unwrap();
        r.snapshot(&spec("b")).unwrap();
        r.revert("a").unwrap();
        r.snapshot(&spec("c")).unwrap();
        assert!(matches!(
            r.snapshot_delta("c", Some("b"), 0, SIZE),
            Err(ReplicaError::Invalid { .. })
        ));
        assert!(matches!(
            r.snapshot_delta("x", None, 0, SIZE),
            Err(ReplicaError::NoSnapshot { .. })
        ));
        assert!(
            r.snapshot_delta("c", Some("a"), 1, BS).is_err(),
            "not aligned"
        );
        assert!(
            r.snapshot_delta("c", Some("a"), 0, SIZE + BS).is_err(),
            "past the end"
        );
        assert_eq!(r.snapshot_delta("c", Some("a"), 0, SIZE).unwrap().len(), 1);
    }

    #[test]
    fn bad_requests_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "v", "v-r", SIZE, BS as u32).unwrap();
        r.snapshot(&spec("a")).unwrap();
        let before = std::fs::read(dir.path().join(crate::meta::META_FILE)).unwrap();
        assert!(matches!(
            r.snapshot(&spec("a")),
            Err(ReplicaError::SnapshotExists { .. })
        ));
        assert!(matches!(
            r.remove_snapshot("nope"),
            Err(ReplicaError::NoSnapshot { .. })
        ));
        assert!(matches!(
            r.revert("nope"),
            Err(ReplicaError::NoSnapshot { .. })
        ));
        assert!(r.snapshot(&spec("")).is_err());
        let mut many = spec("b");
        many.labels = (0..100).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(r.snapshot(&many).is_err());
        assert_eq!(
            std::fs::read(dir.path().join(crate::meta::META_FILE)).unwrap(),
            before
        );
        assert_eq!(r.layers().len(), 2);
    }

    /// A replica of today's main (format 2, one layer) opens unchanged and takes snapshots.
    #[test]
    fn a_replica_of_format_2_opens_and_takes_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), "vol", "vol-r-1", SIZE, BS as u32).unwrap();
        r.write(BS, &pattern(3 * BS, 5), true).unwrap();
        let content = read_all(&r);
        drop(r);
        // The metadata as format 2 wrote it.
        let mut m = Vec::new();
        m.extend_from_slice(b"ZEBUMETA");
        m.extend_from_slice(&2u32.to_le_bytes());
        m.extend_from_slice(&(BS as u32).to_le_bytes());
        m.extend_from_slice(&SIZE.to_le_bytes());
        m.extend_from_slice(&4u64.to_le_bytes());
        m.extend_from_slice(&3u64.to_le_bytes());
        m.extend_from_slice(&3u16.to_le_bytes());
        m.extend_from_slice(&7u16.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(b"volvol-r-1");
        m.extend_from_slice(&1u64.to_le_bytes());
        m.extend_from_slice(&77u64.to_le_bytes());
        m.extend_from_slice(&0u16.to_le_bytes());
        let crc = crc32c::crc32c(&m);
        m.extend_from_slice(&crc.to_le_bytes());
        std::fs::write(dir.path().join(crate::meta::META_FILE), &m).unwrap();
        let r = Replica::open(dir.path()).unwrap();
        assert_eq!(r.generation(), 4);
        assert_eq!(r.epoch(), 3);
        assert_eq!(read_all(&r), content);
        r.snapshot(&spec("first")).unwrap();
        r.write(0, &pattern(BS, 9), false).unwrap();
        assert_eq!(view_all(&r, "first"), content);
        drop(r);
        let r = Replica::open(dir.path()).unwrap();
        assert_eq!(view_all(&r, "first"), content);
        assert_eq!(r.layers()[0].created_unix, 1);
    }
}
