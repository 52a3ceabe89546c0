//! Growing a replica (online expansion): every layer's files, then the write-intent log, then
//! `replica.meta`, whose new size is the commit point (see `docs/snapshots.md`, "Online
//! expansion").
//!
//! Why a cut at any step loses nothing: before the metadata is replaced, the replica's size is
//! the old one, and only files grew; the grown part of each file holds nothing (a sparse data
//! range, index entries of zero: absent). At open, files longer than the recorded size are set
//! back to it ([`Layer::trim_cut_growth`]) and a log with more extents than the volume opens as
//! it is (its extra extents clean, never marked). After the replace, every file already has the
//! new length. No block below the old size is touched at any step.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::layer::{Layer, MAX_BLOCKS};
use super::{Replica, Session};
use crate::error::ReplicaError;
use crate::wil::IntentLog;

/// A size a replica may have: a non-zero multiple of its block size, at most [`MAX_BLOCKS`]
/// blocks.
pub(super) fn check_size(
    replica: &str,
    size_bytes: u64,
    block_size: u32,
) -> Result<(), ReplicaError> {
    let invalid = |reason: String| ReplicaError::Invalid {
        replica: replica.to_owned(),
        reason,
    };
    if size_bytes == 0 || !size_bytes.is_multiple_of(block_size as u64) {
        return Err(invalid(format!(
            "size {size_bytes} must be a non-zero multiple of the block size {block_size}"
        )));
    }
    if size_bytes / block_size as u64 > MAX_BLOCKS {
        return Err(invalid(format!(
            "size {size_bytes} is more than {MAX_BLOCKS} blocks of {block_size} bytes, the most one replica holds"
        )));
    }
    Ok(())
}

impl Replica {
    /// Grow the replica to `size_bytes` for `session` (refused once it is stale). The new range
    /// reads as zeroes; nothing below the old size changes. The same size again is a success
    /// that changes nothing; a smaller one is refused, and so is one the disk cannot hold (with
    /// nothing changed). The files grow and sync first, while I/O goes on; then the replica
    /// runs alone (like a snapshot: no operation of any session meanwhile, and no merge) only
    /// for what is left and the commit.
    pub fn resize_for(&self, session: &Session, size_bytes: u64) -> Result<(), ReplicaError> {
        let _one = self.growth.lock().unwrap_or_else(|p| p.into_inner());
        self.pre_grow(size_bytes);
        self.alone(Some(session), || self.grow_locked(size_bytes))
    }

    /// [`Replica::resize_for`] without a session.
    pub fn resize(&self, size_bytes: u64) -> Result<(), ReplicaError> {
        let _one = self.growth.lock().unwrap_or_else(|p| p.into_inner());
        self.pre_grow(size_bytes);
        self.alone(None, || self.grow_locked(size_bytes))
    }

    /// The slow part of a growth before the pause: every layer's files grown and synced, with
    /// I/O going on. Best effort (the locked part does it all again, quickly, and reports what
    /// fails); only ever lengthens files (a growth holds `growth`, so no other sets them).
    fn pre_grow(&self, size_bytes: u64) {
        if size_bytes <= self.size_bytes()
            || check_size(&self.name, size_bytes, self.block_size).is_err()
        {
            return;
        }
        if let Ok(layers) = self.layers_for_growth() {
            if let Err(e) = self.grow_layers(&layers, size_bytes) {
                tracing::debug!(replica = %self.name, "growing the files before the pause: {e}");
            }
        }
    }

    /// Every layer of the tree: the chain's open ones, the others opened now.
    fn layers_for_growth(&self) -> Result<Vec<Arc<Layer>>, ReplicaError> {
        let ids: Vec<u64> = {
            let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            meta.layers.iter().map(|l| l.id).collect()
        };
        let chain = self.chain();
        ids.iter()
            .map(
                |id| match chain.slots.iter().flatten().find(|l| l.id == *id) {
                    Some(l) => Ok(l.clone()),
                    None => Layer::open_files(&*self.files, &self.dir, *id).map(Arc::new),
                },
            )
            .collect()
    }

    /// Set every layer's files to the new lengths, then sync them. A length the disk refuses
    /// is a refusal: every file is set back to the replica's size, and nothing is poisoned (no
    /// data was touched). A failed sync poisons the replica (see `exclusive_sync`).
    fn grow_layers(&self, layers: &[Arc<Layer>], size_bytes: u64) -> Result<(), ReplicaError> {
        if let Some(e) = layers
            .iter()
            .find_map(|l| l.set_lens(size_bytes, self.block_size).err())
        {
            let now = self.size_bytes();
            for l in layers {
                let _ = l.set_lens(now, self.block_size);
            }
            return Err(e);
        }
        self.exclusive_sync(|| layers.iter().try_for_each(|l| l.sync_all()))
    }

    fn grow_locked(&self, size_bytes: u64) -> Result<(), ReplicaError> {
        self.check_usable()?;
        let now = self.size_bytes();
        if size_bytes == now {
            return Ok(());
        }
        if size_bytes < now {
            return Err(ReplicaError::Invalid {
                replica: self.name.clone(),
                reason: format!(
                    "it has {now} bytes and never shrinks (asked for {size_bytes}): shrinking a volume would drop its data past the new end"
                ),
            });
        }
        check_size(&self.name, size_bytes, self.block_size)?;
        // No merge runs meanwhile: a merge opens layers at the size it read, and commits the
        // tree.
        let _merges = self.stop_merges();
        let _tree = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        let _all = self.lock_all();
        // The layer list cannot change now: a snapshot needs the fence (held), a merge, a
        // revert or a rewind the tree lock (held); a delete only flags a layer.
        let layers = self.layers_for_growth()?;
        // 1. Every layer's files (done before the pause, mostly: then this only checks).
        self.grow_layers(&layers, size_bytes)?;
        self.crash_point()?;
        // 2. The write-intent log's header.
        self.poison_on_io(self.wil.grow(IntentLog::extents_of(size_bytes)))?;
        self.crash_point()?;
        // 3. The commit: `replica.meta` with the new size.
        let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = meta.clone();
        next.size_bytes = size_bytes;
        if let Err(e) = next.store(&self.dir) {
            // Either file may be on disk now: refuse I/O rather than guess the size.
            self.poison(&e);
            return Err(e);
        }
        *meta = next;
        self.size_bytes.store(size_bytes, Ordering::Release);
        drop(meta);
        self.tree_changed();
        tracing::info!(replica = %self.name, "grown from {now} to {size_bytes} bytes");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use crate::file::FileLayer;
    use crate::store::SnapshotSpec;
    use crate::{Replica, ReplicaError};

    const BS: u64 = 4096;
    const SMALL: u64 = 64 * BS;
    /// Past a whole chunk of the merged map and a whole page of the write-intent log's extents.
    const BIG: u64 = 40 << 30;

    fn spec(name: &str) -> SnapshotSpec {
        SnapshotSpec {
            name: name.into(),
            system: false,
            labels: Vec::new(),
            created_unix: 1,
        }
    }

    fn pattern(len: u64, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn read(r: &Replica, offset: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        r.read(offset, &mut v).unwrap();
        v
    }

    fn view(r: &Replica, name: &str, offset: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        r.snapshot_view(name).unwrap().read(offset, &mut v).unwrap();
        v
    }

    /// A replica with a snapshot, a deleted snapshot waiting for its merge, and data in the
    /// head: what a grown replica must keep.
    fn populated(files: &Arc<dyn FileLayer>, dir: &std::path::Path) -> Replica {
        let r = Replica::create_in(files, dir, "v", "v-r", SMALL, BS as u32).unwrap();
        r.write(0, &pattern(20 * BS, 1), false).unwrap();
        r.snapshot(&spec("a")).unwrap();
        r.write(10 * BS, &pattern(20 * BS, 2), false).unwrap();
        r.snapshot(&spec("b")).unwrap();
        r.zero(0, 2 * BS, false).unwrap();
        r.write(SMALL - BS, &pattern(BS, 3), false).unwrap();
        r.remove_snapshot("b").unwrap();
        r.flush().unwrap();
        r
    }

    #[test]
    fn a_grown_replica_keeps_its_data_reads_zeroes_past_the_old_end_and_reopens_grown() {
        let dir = tempfile::tempdir().unwrap();
        let files = crate::file::direct();
        let r = populated(&files, dir.path());
        let (head, a) = (read(&r, 0, SMALL), view(&r, "a", 0, SMALL));
        r.resize(BIG).unwrap();
        r.resize(BIG).unwrap(); // the same size again: nothing to do
        assert_eq!(r.size_bytes(), BIG);
        assert!(read(&r, 0, SMALL) == head);
        assert!(read(&r, SMALL, 1 << 20).iter().all(|b| *b == 0));
        assert!(read(&r, BIG - (1 << 20), 1 << 20).iter().all(|b| *b == 0));
        // The new range takes writes anywhere, the last block included; snapshots see it.
        r.write(BIG - BS, &pattern(BS, 4), false).unwrap();
        r.write(SMALL, &pattern(3 * BS, 5), false).unwrap();
        r.snapshot(&spec("c")).unwrap();
        r.write(SMALL, &pattern(BS, 6), false).unwrap();
        assert!(view(&r, "c", SMALL, 3 * BS) == pattern(3 * BS, 5));
        assert!(view(&r, "a", 0, SMALL) == a);
        assert!(view(&r, "a", SMALL, 4 * BS).iter().all(|b| *b == 0));
        // The deleted snapshot merges after the growth.
        r.merge_pending(0, &AtomicBool::new(false)).unwrap();
        r.flush().unwrap();
        let log = r
            .wil_read(0, crate::wil::IntentLog::extents_of(BIG))
            .unwrap();
        assert_eq!(
            log.len() as u64,
            crate::wil::READ_HEADER_BYTES as u64 + (BIG >> 22)
        );
        drop(r);
        let r = Replica::open(dir.path()).unwrap();
        assert_eq!(r.size_bytes(), BIG);
        assert!(read(&r, 0, SMALL) == head);
        assert!(read(&r, BIG - BS, BS) == pattern(BS, 4));
        assert!(read(&r, SMALL, BS) == pattern(BS, 6));
        assert!(view(&r, "c", SMALL, 3 * BS) == pattern(3 * BS, 5));
        assert!(view(&r, "a", 0, SMALL) == a);
        assert_eq!(r.facts().size_bytes, BIG);
    }

    #[test]
    fn shrinking_an_unaligned_or_a_too_large_size_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = populated(&crate::file::direct(), dir.path());
        let head = read(&r, 0, SMALL);
        for (size, says) in [
            (SMALL - BS, "never shrinks"),
            (SMALL + 100, "multiple of the block size"),
            (u64::MAX - BS + 1, "the most one replica holds"),
        ] {
            match r.resize(size) {
                Err(ReplicaError::Invalid { reason, .. }) => {
                    assert!(reason.contains(says), "{size}: {reason}")
                }
                other => panic!("{size}: {other:?}"),
            }
            assert_eq!(r.size_bytes(), SMALL);
        }
        assert!(read(&r, 0, SMALL) == head);
        drop(r);
        let r = Replica::open(dir.path()).unwrap();
        assert_eq!(r.size_bytes(), SMALL);
        assert!(read(&r, 0, SMALL) == head);
    }

    #[test]
    fn a_size_the_disk_cannot_hold_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = populated(&crate::file::direct(), dir.path());
        let head = read(&r, 0, SMALL);
        let idx = |d: &std::path::Path| {
            let mut lens: Vec<u64> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_name().to_string_lossy().starts_with("layer-"))
                .map(|e| e.metadata().unwrap().len())
                .collect();
            lens.sort();
            lens
        };
        let before = idx(dir.path());
        // 20 TiB: more than ext4 (these machines' file system) holds in one file.
        match r.resize(20 << 40) {
            Err(ReplicaError::Invalid { reason, .. }) => {
                assert!(reason.contains("refuses"), "{reason}")
            }
            Ok(()) => {
                eprintln!("this file system holds a 20 TiB file: nothing to refuse here");
                return;
            }
            Err(e) => panic!("{e:?}"),
        }
        assert!(!r.is_poisoned());
        assert_eq!(r.size_bytes(), SMALL);
        assert_eq!(idx(dir.path()), before);
        r.write(0, &pattern(BS, 8), false).unwrap();
        r.flush().unwrap();
        drop(r);
        let r = Replica::open(dir.path()).unwrap();
        assert_eq!(r.size_bytes(), SMALL);
        assert!(read(&r, BS, SMALL - BS) == head[BS as usize..]);
    }

    #[test]
    fn a_power_cut_at_any_step_of_a_growth_leaves_the_old_or_the_new_size_and_every_block() {
        for cut in 0..3i64 {
            for seed in 0..2u64 {
                let dir = tempfile::tempdir().unwrap();
                let files: Arc<dyn FileLayer> = Arc::new(crate::file::CrashSim::new(4096, seed));
                let r = populated(&files, dir.path());
                let (head, a) = (read(&r, 0, SMALL), view(&r, "a", 0, SMALL));
                // Unflushed writes, lost or not by the cut: never read back past the old end.
                r.write(5 * BS, &pattern(BS, 9), false).unwrap();
                r.crash_after(cut);
                let grown = r.resize(BIG).is_ok();
                assert_eq!(grown, cut == 2, "cut {cut}");
                drop(r);
                let r = Replica::open_in(&files, dir.path()).unwrap();
                let size = if grown { BIG } else { SMALL };
                assert_eq!(r.size_bytes(), size, "cut {cut}, seed {seed}");
                let now = read(&r, 0, SMALL);
                // Block 5 is the one write not flushed before the growth began; the growth
                // flushes nothing itself, so it may be either.
                for b in (0..SMALL / BS).filter(|b| *b != 5) {
                    let at = (b * BS) as usize..((b + 1) * BS) as usize;
                    assert!(
                        now[at.clone()] == head[at],
                        "cut {cut}, seed {seed}, block {b}"
                    );
                }
                assert!(view(&r, "a", 0, SMALL) == a, "cut {cut}, seed {seed}");
                // The growth, tried again, completes.
                r.resize(BIG).unwrap();
                r.write(BIG - BS, &pattern(BS, 4), false).unwrap();
                r.flush().unwrap();
                drop(r);
                let r = Replica::open_in(&files, dir.path()).unwrap();
                assert_eq!(r.size_bytes(), BIG);
                assert!(read(&r, BIG - BS, BS) == pattern(BS, 4));
                assert!(read(&r, SMALL, 1 << 20).iter().all(|b| *b == 0));
                assert!(view(&r, "a", 0, SMALL) == a);
            }
        }
    }
}
