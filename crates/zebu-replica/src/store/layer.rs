//! One layer's files (`layer-<id>.data`, `layer-<id>.idx`) and the in-memory block map.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::ReplicaError;
use crate::file::{DiskFile, FileLayer};

/// Bytes before the first index entry.
pub const INDEX_HEADER_BYTES: u64 = 4096;
pub const INDEX_MAGIC: [u8; 8] = *b"ZEBUIDX\0";
pub const INDEX_FORMAT_VERSION: u32 = 1;
/// Entry bit: this layer holds the block's data; the low 32 bits are its CRC32C.
pub const ENTRY_PRESENT: u64 = 1 << 32;
/// Entry bit: the block reads as zeroes in this layer (masks older layers).
pub const ENTRY_ZERO: u64 = 1 << 33;
pub(super) const ENTRY_KNOWN_BITS: u64 = ENTRY_PRESENT | ENTRY_ZERO | 0xffff_ffff;

pub(super) const CHUNK_ENTRIES: usize = 4096;

/// In the merged map, an entry carries the slot of the layer that holds it from this bit up.
pub(super) const SLOT_SHIFT: u32 = 40;
/// Slots fit in the 24 bits above [`SLOT_SHIFT`].
pub(super) const MAX_SLOTS: usize = 1 << 24;

/// A merged-map entry: `entry` (an index entry, non-zero) held by the layer in `slot`.
#[inline]
pub(super) fn pack(slot: usize, entry: u64) -> u64 {
    debug_assert!(entry != 0 && entry & !ENTRY_KNOWN_BITS == 0);
    ((slot as u64) << SLOT_SHIFT) | entry
}

#[inline]
pub(super) fn slot_of(merged: u64) -> usize {
    (merged >> SLOT_SHIFT) as usize
}

/// The index entry of a merged-map entry.
#[inline]
pub(super) fn entry_of(merged: u64) -> u64 {
    merged & ENTRY_KNOWN_BITS
}

/// Chunks in one group of [`BlockIndex`].
const GROUP_CHUNKS: usize = 4096;
/// Groups of a [`BlockIndex`]: it holds up to [`MAX_BLOCKS`] entries, whatever size the
/// volume has now, so a volume grows with no copy of its map.
const GROUPS: usize = 4096;
/// The most blocks a replica may have (2^36: 256 TiB of 4 KiB blocks).
pub const MAX_BLOCKS: u64 = (GROUPS * GROUP_CHUNKS * CHUNK_ENTRIES) as u64;

type Chunk = Box<[AtomicU64]>;
type Group = Box<[OnceLock<Chunk>]>;

/// Lazily allocated chunks of atomic entries, one per block, in lazily allocated groups of
/// chunks: only chunks with a written block cost memory, and the map covers every block a
/// volume may grow to (no lock, no copy when it grows).
pub(super) struct BlockIndex {
    groups: Box<[OnceLock<Group>]>,
}

impl BlockIndex {
    /// A map for up to [`MAX_BLOCKS`] blocks (`blocks` is the size now, not a limit).
    pub(super) fn new(blocks: u64) -> BlockIndex {
        debug_assert!(blocks <= MAX_BLOCKS);
        BlockIndex {
            groups: (0..GROUPS).map(|_| OnceLock::new()).collect(),
        }
    }

    #[inline]
    fn chunk(&self, c: usize) -> Option<&Chunk> {
        self.groups[c / GROUP_CHUNKS].get()?[c % GROUP_CHUNKS].get()
    }

    #[inline]
    pub(super) fn get(&self, block: u64) -> u64 {
        let (c, i) = (
            (block / CHUNK_ENTRIES as u64) as usize,
            (block % CHUNK_ENTRIES as u64) as usize,
        );
        match self.chunk(c) {
            Some(chunk) => chunk[i].load(Ordering::Acquire),
            None => 0,
        }
    }

    #[inline]
    pub(super) fn set(&self, block: u64, entry: u64) {
        let (c, i) = (
            (block / CHUNK_ENTRIES as u64) as usize,
            (block % CHUNK_ENTRIES as u64) as usize,
        );
        if entry == 0 && self.chunk(c).is_none() {
            return;
        }
        let group = self.groups[c / GROUP_CHUNKS]
            .get_or_init(|| (0..GROUP_CHUNKS).map(|_| OnceLock::new()).collect());
        let chunk = group[c % GROUP_CHUNKS]
            .get_or_init(|| (0..CHUNK_ENTRIES).map(|_| AtomicU64::new(0)).collect());
        chunk[i].store(entry, Ordering::Release);
    }

    /// Whether chunk `c` was ever written (all its entries are 0 otherwise).
    pub(super) fn has_chunk(&self, c: usize) -> bool {
        self.chunk(c).is_some()
    }

    fn chunks(&self) -> impl Iterator<Item = &Chunk> {
        self.groups
            .iter()
            .filter_map(|g| g.get())
            .flat_map(|g| g.iter().filter_map(|c| c.get()))
    }

    /// Every entry back to 0 (allocated chunks stay allocated).
    pub(super) fn clear(&self) {
        for c in self.chunks() {
            for e in c.iter() {
                e.store(0, Ordering::Release);
            }
        }
    }

    pub(super) fn memory_bytes(&self) -> u64 {
        let groups = self.groups.iter().filter(|g| g.get().is_some()).count();
        let slot = std::mem::size_of::<OnceLock<Chunk>>();
        (self.chunks().count() * CHUNK_ENTRIES * 8 + groups * GROUP_CHUNKS * slot + GROUPS * slot)
            as u64
    }
}

/// One layer's open files. Which layer of the tree it is, and where it sits, is in
/// `replica.meta`; `slot` names it in the merged map while it is open.
pub(super) struct Layer {
    pub(super) id: u64,
    pub(super) slot: usize,
    pub(super) data: Box<dyn DiskFile>,
    pub(super) data_path: PathBuf,
    pub(super) index: Box<dyn DiskFile>,
    pub(super) index_path: PathBuf,
    /// A mutation completed since the last successful sync started. Set when a write or zero
    /// finishes (after all its syscalls), cleared by a flush just before it syncs: a FLUSH with
    /// nothing completed since the last one costs no fsync.
    pub(super) dirty: AtomicBool,
    /// Blocks this layer holds data for (its size); kept up to date for the head only.
    pub(super) held: AtomicU64,
}

pub(super) fn layer_paths(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("layer-{id:016x}.data")),
        dir.join(format!("layer-{id:016x}.idx")),
    )
}

/// The layer id a file of a replica directory belongs to, if it is a layer file.
pub(super) fn layer_file_id(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("layer-")?;
    let hex = rest
        .strip_suffix(".data")
        .or_else(|| rest.strip_suffix(".idx"))?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Set a layer's files to the lengths of a volume of `size_bytes` and sync them: the data file
/// (sparse) to `size_bytes`, the index to its header and one entry per block. Entries past the
/// old end read as zero (absent), so a grown range reads as zeroes until written.
pub(super) fn grow_files(
    (data, data_path): (&dyn DiskFile, &Path),
    (index, index_path): (&dyn DiskFile, &Path),
    size_bytes: u64,
    block_size: u32,
) -> Result<(), ReplicaError> {
    set_lens(
        (data, data_path),
        (index, index_path),
        size_bytes,
        block_size,
    )?;
    for (f, p) in [(data, data_path), (index, index_path)] {
        f.sync_all()
            .map_err(|e| ReplicaError::io("fsync grown layer", p, 0, e))?;
    }
    Ok(())
}

/// Open (or, with `create`, create: an error if it exists) one of a layer's files.
fn open_layer_file(
    files: &dyn FileLayer,
    p: &Path,
    create: bool,
) -> Result<Box<dyn DiskFile>, ReplicaError> {
    files.open(p, create).map_err(|e| {
        let what = if create {
            "create layer file"
        } else {
            "open layer file"
        };
        ReplicaError::io(what, p, 0, e)
    })
}

/// The lengths of [`grow_files`], not synced. A failure is the file system refusing the length
/// (a file larger than it holds): reported as a refusal ([`ReplicaError::Invalid`]), since no
/// data was touched; the caller sets the lengths back.
pub(super) fn set_lens(
    (data, data_path): (&dyn DiskFile, &Path),
    (index, index_path): (&dyn DiskFile, &Path),
    size_bytes: u64,
    block_size: u32,
) -> Result<(), ReplicaError> {
    let blocks = size_bytes / block_size as u64;
    let refused = |what: &str, p: &Path, e: std::io::Error| ReplicaError::Invalid {
        replica: p
            .parent()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        reason: format!(
            "its disk refuses to make {} {size_bytes} bytes long ({what}: {e})",
            p.display()
        ),
    };
    data.set_len(size_bytes)
        .map_err(|e| refused("layer data", data_path, e))?;
    index
        .set_len(INDEX_HEADER_BYTES + blocks * 8)
        .map_err(|e| refused("layer index", index_path, e))?;
    Ok(())
}

pub(super) fn index_header(id: u64, block_size: u32) -> Vec<u8> {
    let mut h = vec![0u8; INDEX_HEADER_BYTES as usize];
    h[0..8].copy_from_slice(&INDEX_MAGIC);
    h[8..12].copy_from_slice(&INDEX_FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&block_size.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

impl Layer {
    /// Create the files of a new, empty layer (an error if they exist) and sync them.
    pub(super) fn create(
        files: &dyn FileLayer,
        dir: &Path,
        id: u64,
        size_bytes: u64,
        block_size: u32,
    ) -> Result<Layer, ReplicaError> {
        let (data_path, index_path) = layer_paths(dir, id);
        let open_new = |p: &Path| open_layer_file(files, p, true);
        let data = open_new(&data_path)?;
        data.set_len(size_bytes)
            .map_err(|e| ReplicaError::io("size layer data", &data_path, 0, e))?;
        let index = open_new(&index_path)?;
        index
            .write_all_at(&index_header(id, block_size), 0)
            .map_err(|e| ReplicaError::io("write index header", &index_path, 0, e))?;
        let blocks = size_bytes / block_size as u64;
        index
            .set_len(INDEX_HEADER_BYTES + blocks * 8)
            .map_err(|e| ReplicaError::io("size layer index", &index_path, 0, e))?;
        for (f, p) in [(&*data, &data_path), (&*index, &index_path)] {
            f.sync_all()
                .map_err(|e| ReplicaError::io("fsync new layer", p, 0, e))?;
        }
        Ok(Layer {
            id,
            slot: 0,
            data,
            data_path,
            index,
            index_path,
            dirty: AtomicBool::new(false),
            held: AtomicU64::new(0),
        })
    }

    /// Open an existing layer's files, checking the index header and length (not the entries:
    /// see [`Layer::scan`]).
    pub(super) fn open(
        files: &dyn FileLayer,
        dir: &Path,
        id: u64,
        size_bytes: u64,
        block_size: u32,
    ) -> Result<Layer, ReplicaError> {
        let (data_path, index_path) = layer_paths(dir, id);
        let open = |p: &Path| open_layer_file(files, p, false);
        let data = open(&data_path)?;
        let index = open(&index_path)?;
        let bad = |block: u64, reason: String| ReplicaError::BadIndex {
            path: index_path.clone(),
            block,
            reason,
        };
        let mut header = vec![0u8; INDEX_HEADER_BYTES as usize];
        index
            .read_exact_at(&mut header, 0)
            .map_err(|e| ReplicaError::io("read index header", &index_path, 0, e))?;
        if header[..28] != index_header(id, block_size)[..28] {
            return Err(bad(
                0,
                "header does not match this layer (magic, version, block size, id or checksum)"
                    .into(),
            ));
        }
        let blocks = size_bytes / block_size as u64;
        let len = index
            .size()
            .map_err(|e| ReplicaError::io("stat index", &index_path, 0, e))?;
        let want = INDEX_HEADER_BYTES + blocks * 8;
        // Longer: a growth under way or cut short before `replica.meta` recorded it (set back
        // at the next start by `trim_cut_growth`); the entries past the size are never read.
        if len < want || !(len - INDEX_HEADER_BYTES).is_multiple_of(8) {
            return Err(bad(
                0,
                format!(
                    "file is {len} bytes, expected {}",
                    INDEX_HEADER_BYTES + blocks * 8
                ),
            ));
        }
        Ok(Layer {
            id,
            slot: 0,
            data,
            data_path,
            index,
            index_path,
            // Unknown history (a crash may have left unsynced pages): sync at the first flush.
            dirty: AtomicBool::new(true),
            held: AtomicU64::new(0),
        })
    }

    /// Set this layer's files to the lengths of a volume of `size_bytes` (see [`set_lens`]).
    pub(super) fn set_lens(&self, size_bytes: u64, block_size: u32) -> Result<(), ReplicaError> {
        set_lens(
            (&*self.data, &self.data_path),
            (&*self.index, &self.index_path),
            size_bytes,
            block_size,
        )
    }

    /// Sync this layer's files (their lengths after [`Layer::set_lens`]).
    pub(super) fn sync_all(&self) -> Result<(), ReplicaError> {
        for (f, p) in [
            (&*self.data, &self.data_path),
            (&*self.index, &self.index_path),
        ] {
            f.sync_all()
                .map_err(|e| ReplicaError::io("fsync grown layer", p, 0, e))?;
        }
        Ok(())
    }

    /// At open, before [`Layer::open`]: files longer than `size_bytes` (the size in
    /// `replica.meta`) are a growth cut short before the metadata recorded the new size. The
    /// blocks past the recorded size were never served (so never written): they go, and the
    /// files are set back to the recorded size.
    pub(super) fn trim_cut_growth(
        files: &dyn FileLayer,
        dir: &Path,
        id: u64,
        size_bytes: u64,
        block_size: u32,
    ) -> Result<(), ReplicaError> {
        let (data_path, index_path) = layer_paths(dir, id);
        let open = |p: &Path| open_layer_file(files, p, false);
        let (data, index) = (open(&data_path)?, open(&index_path)?);
        let len = index
            .size()
            .map_err(|e| ReplicaError::io("stat index", &index_path, 0, e))?;
        let want = INDEX_HEADER_BYTES + size_bytes / block_size as u64 * 8;
        if len > want && (len - INDEX_HEADER_BYTES).is_multiple_of(8) {
            tracing::warn!(path = %index_path.display(), "layer files longer than the replica's size (a growth cut short): set back to {size_bytes} bytes");
            grow_files(
                (&*data, &data_path),
                (&*index, &index_path),
                size_bytes,
                block_size,
            )?;
        }
        Ok(())
    }

    /// The files of a layer that is not open (off the live path), opened for a growth.
    pub(super) fn open_files(
        files: &dyn FileLayer,
        dir: &Path,
        id: u64,
    ) -> Result<Layer, ReplicaError> {
        let (data_path, index_path) = layer_paths(dir, id);
        let open = |p: &Path| open_layer_file(files, p, false);
        Ok(Layer {
            id,
            slot: usize::MAX,
            data: open(&data_path)?,
            data_path,
            index: open(&index_path)?,
            index_path,
            dirty: AtomicBool::new(false),
            held: AtomicU64::new(0),
        })
    }

    /// Call `f(block, entry)` for every non-zero entry of blocks `[from, to)`, in block order,
    /// checking each (a bad one fails with the index path and block). Reads only the parts of
    /// the sparse index file that hold data (`SEEK_DATA`), a chunk at a time.
    pub(super) fn scan(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), ReplicaError>,
    ) -> Result<(), ReplicaError> {
        let chunk_bytes = CHUNK_ENTRIES as u64 * 8;
        let mut buf = vec![0u8; chunk_bytes as usize];
        let mut pos = INDEX_HEADER_BYTES + from * 8;
        let end = INDEX_HEADER_BYTES + to * 8;
        while pos < end {
            let next = match self.index.next_data(pos) {
                Ok(Some(next)) => next.max(pos),
                Ok(None) => break,
                Err(e) => {
                    return Err(ReplicaError::io(
                        "seek index data",
                        &self.index_path,
                        pos,
                        e,
                    ))
                }
            };
            if next >= end {
                break;
            }
            let first_block = (next - INDEX_HEADER_BYTES) / 8;
            let n = chunk_bytes.min(end - (INDEX_HEADER_BYTES + first_block * 8)) as usize;
            let start = INDEX_HEADER_BYTES + first_block * 8;
            self.index
                .read_exact_at(&mut buf[..n], start)
                .map_err(|e| ReplicaError::io("read index", &self.index_path, start, e))?;
            for (i, e) in buf[..n].chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                if entry == 0 {
                    continue;
                }
                let block = first_block + i as u64;
                self.check_entry(block, entry)?;
                f(block, entry)?;
            }
            pos = start + n as u64;
        }
        Ok(())
    }

    pub(super) fn check_entry(&self, block: u64, entry: u64) -> Result<(), ReplicaError> {
        let bad = |reason: String| ReplicaError::BadIndex {
            path: self.index_path.clone(),
            block,
            reason,
        };
        if entry & !ENTRY_KNOWN_BITS != 0 || (entry & ENTRY_PRESENT != 0 && entry & ENTRY_ZERO != 0)
        {
            return Err(bad(format!(
                "entry {entry:#x} has unknown or conflicting bits"
            )));
        }
        if entry != 0 && entry & (ENTRY_PRESENT | ENTRY_ZERO) == 0 {
            return Err(bad(format!("entry {entry:#x} has a checksum but no state")));
        }
        Ok(())
    }

    /// The entries of `count` blocks from `first`, from the index file.
    pub(super) fn read_entries(&self, first: u64, count: usize) -> Result<Vec<u64>, ReplicaError> {
        let mut buf = vec![0u8; count * 8];
        let at = INDEX_HEADER_BYTES + first * 8;
        self.index
            .read_exact_at(&mut buf, at)
            .map_err(|e| ReplicaError::io("read index", &self.index_path, at, e))?;
        let mut out = Vec::with_capacity(count);
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            self.check_entry(first + i as u64, entry)?;
            out.push(entry);
        }
        Ok(out)
    }

    pub(super) fn sync(&self) -> Result<(), ReplicaError> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // Both files at once: the filesystem can commit them in one journal transaction.
        let (data, index) = std::thread::scope(|s| {
            let index = s.spawn(|| self.index.sync_data());
            (self.data.sync_data(), index.join())
        });
        data.map_err(|e| ReplicaError::io("fdatasync", &self.data_path, 0, e))?;
        index
            .unwrap_or_else(|_| Err(std::io::Error::other("the fsync thread panicked")))
            .map_err(|e| ReplicaError::io("fdatasync", &self.index_path, 0, e))
    }

    /// Write entries for consecutive blocks from `first` to the index file (not published).
    pub(super) fn write_entries(
        &self,
        first: u64,
        new_entries: &[u64],
    ) -> Result<(), ReplicaError> {
        let mut buf = Vec::with_capacity(new_entries.len() * 8);
        for e in new_entries {
            buf.extend_from_slice(&e.to_le_bytes());
        }
        let at = INDEX_HEADER_BYTES + first * 8;
        self.index
            .write_all_at(&buf, at)
            .map_err(|e| ReplicaError::io("write index", &self.index_path, at, e))
    }

    /// Reserve the space of blocks `[first, end)` in the data file (with `data`) and of their
    /// entries in the index file, before any of them is written (see "A full disk" in
    /// `docs/healing.md`): an ENOSPC here leaves everything as it was.
    pub(super) fn reserve(
        &self,
        replica: &str,
        first: u64,
        end: u64,
        block_size: u64,
        data: bool,
    ) -> Result<(), ReplicaError> {
        let ranges = [
            (
                &*self.data,
                &self.data_path,
                first * block_size,
                (end - first) * block_size,
            ),
            (
                &*self.index,
                &self.index_path,
                INDEX_HEADER_BYTES + first * 8,
                (end - first) * 8,
            ),
        ];
        for (file, path, at, len) in ranges.into_iter().skip(usize::from(!data)) {
            file.allocate(at, len).map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    ReplicaError::NoSpace {
                        replica: replica.to_owned(),
                        path: path.clone(),
                        offset: first * block_size,
                        length: (end - first) * block_size,
                    }
                } else {
                    ReplicaError::io("reserve space", path, at, e)
                }
            })?;
        }
        Ok(())
    }

    pub(super) fn punch_hole(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        // Filesystems without hole punching still read the entry as zero: not an error.
        self.data
            .punch_hole(offset, len)
            .map_err(|e| ReplicaError::io("punch hole", &self.data_path, offset, e))
    }

    /// Remove both files (the layer is gone from `replica.meta` already).
    pub(super) fn remove_files(dir: &Path, id: u64) {
        let (d, i) = layer_paths(dir, id);
        for p in [d, i] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), "removing a layer file no record names: {e}")
                }
            }
        }
    }
}

/// Largest piece of a data file written by one `pwrite` (aligned to file offsets).
///
/// On ext4 since Linux 6.16 the page cache allocates a folio as large as the write that creates
/// it (up to 2 MiB), and every later write into a folio walks all of its buffer heads. A volume
/// filled by large writes (a copy, a restore, a rebuild) then pays 20–80 µs of CPU for each 4 KiB
/// overwrite, where it pays 2–5 µs in folios of 64 KiB or less. Writing in aligned pieces of
/// 64 KiB keeps the folios that small, for 15–30% more CPU per MiB on large writes.
const WRITE_PIECE_BYTES: u64 = 64 * 1024;

/// `pwrite` all of `buf` at `at`, in pieces that end on multiples of [`WRITE_PIECE_BYTES`].
pub(super) fn write_in_pieces(file: &dyn DiskFile, buf: &[u8], at: u64) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = at + done as u64;
        let room = (WRITE_PIECE_BYTES - pos % WRITE_PIECE_BYTES) as usize;
        let n = room.min(buf.len() - done);
        file.write_all_at(&buf[done..done + n], pos)?;
        done += n;
    }
    Ok(())
}
