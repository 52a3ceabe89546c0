//! The write-intent log of a replica (`wil` in its directory): which extents of the volume
//! (4 MiB each, [`WIL_EXTENT_BYTES`]) may differ between the members of the volume.
//!
//! An engine marks an extent [`WIL_DIRTY`] on every member, durably, before its first write
//! there; it settles the extent once a flush on every member followed the last write — to
//! [`WIL_CLEAN`] when every member of the volume was in the set, to [`WIL_CHANGED`] when one was
//! away (the extents it must catch up on). After a crash the dirty extents are the only places
//! where members can differ, or a block can be torn; a member that left catches up on the
//! non-clean extents of a survivor whose log covers it (see `covers_from` below).
//!
//! File: a 4096-byte header (magic `ZEBUWIL\0`, version u32, extent bytes u64, extents u64,
//! covers_from u64, boot id of the last mark (16 bytes), rejoin_from u64, a CRC32C at byte 60;
//! version 2 adds rebuild_base u64 and copied_to u64 at byte 64, under the same CRC, which then
//! covers bytes 0..60 and 64..80; a version-1 header reads as "no rebuild in progress"), then
//! pages of 4096 bytes:
//! CRC32C (u32, of the rest of the page) and page number (u32), then one state byte for each of
//! [`PAGE_STATES`] extents. A page that is all zeroes (never written, sparse) is all clean. A
//! page is replaced in place with one positioned write and `fdatasync`ed before a mark is
//! answered; a page torn by a crash fails its CRC and reads as all dirty, a damaged header as
//! every extent dirty and covering nothing: wrong only towards more copying, never less.
//!
//! `covers_from`: every member that left the set at a generation `>= covers_from` differs
//! from this replica only in its non-clean extents. Settling to clean at generation `g`
//! (every member present) sets it to `g`; a new log covers nothing (`u64::MAX`) until then.
//!
//! The boot id (the kernel's `boot_id`) of the last mark tells whether the page cache still
//! holds every write made since: if the machine rebooted, unflushed writes may be lost here,
//! and a crash resync takes its source elsewhere. `rejoin_from` is the generation this replica
//! had when it first rejoined as a rebuild target (a rebuild raises its generation to fence
//! older sessions; that raise is not evidence), reset once it is in sync again.
//!
//! `rebuild_base` and `copied_to` say how far a rebuild into this replica got: every byte
//! below `copied_to` was copied from a member in sync while this replica took every live
//! write, and is durable here; the set's generation was `rebuild_base` when the copy began.
//! Both are reset once the replica is in sync (`u64::MAX`, 0). See `docs/healing.md`.
//!
//! A replica that has no log (written by an older version, or the file was lost) gets one with
//! every extent dirty and covering nothing: nothing is known, so everything is resynced once.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use zebu_proto::data::{WIL_CLEAN, WIL_DIRTY, WIL_EXTENT_BYTES};

use crate::error::ReplicaError;
use crate::file::{DiskFile, FileLayer};

pub const WIL_FILE: &str = "wil";
pub const WIL_MAGIC: [u8; 8] = *b"ZEBUWIL\0";
pub const WIL_FORMAT_VERSION: u32 = 2;
const PAGE_BYTES: usize = 4096;
const PAGE_HEADER_BYTES: usize = 8;
/// Extents whose state one page holds.
pub const PAGE_STATES: usize = PAGE_BYTES - PAGE_HEADER_BYTES;
/// `covers_from` of a log that covers nothing yet.
pub const COVERS_NOTHING: u64 = u64::MAX;
/// `rebuild_base` of a replica no rebuild is filling.
pub const NO_REBUILD: u64 = u64::MAX;

pub struct IntentLog {
    file: Box<dyn DiskFile>,
    path: PathBuf,
    /// Extents the log covers: the volume's size; raised (under `inner`) when it grows.
    extents: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Clone, Copy)]
struct Head {
    covers_from: u64,
    boot: [u8; 16],
    rejoin_from: u64,
    rebuild: Rebuild,
}

/// How far a rebuild into this replica got (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuild {
    pub base: u64,
    pub copied_to: u64,
}

impl Rebuild {
    pub const NONE: Rebuild = Rebuild {
        base: NO_REBUILD,
        copied_to: 0,
    };
}

struct Inner {
    states: Vec<u8>,
    head: Head,
}

const HEADER_CRC_AT: usize = 60;

fn header(extents: u64, h: Head) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_BYTES];
    b[0..8].copy_from_slice(&WIL_MAGIC);
    b[8..12].copy_from_slice(&WIL_FORMAT_VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&WIL_EXTENT_BYTES.to_le_bytes());
    b[20..28].copy_from_slice(&extents.to_le_bytes());
    b[28..36].copy_from_slice(&h.covers_from.to_le_bytes());
    b[36..52].copy_from_slice(&h.boot);
    b[52..60].copy_from_slice(&h.rejoin_from.to_le_bytes());
    b[64..72].copy_from_slice(&h.rebuild.base.to_le_bytes());
    b[72..80].copy_from_slice(&h.rebuild.copied_to.to_le_bytes());
    let crc = header_crc(&b, WIL_FORMAT_VERSION);
    b[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The header's CRC: of bytes 0..60, and in version 2 of bytes 64..80 too.
fn header_crc(b: &[u8], version: u32) -> u32 {
    let crc = crc32c::crc32c(&b[0..HEADER_CRC_AT]);
    if version >= 2 {
        crc32c::crc32c_append(crc, &b[64..80])
    } else {
        crc
    }
}

/// This boot of the machine (all zeroes if the kernel does not say).
fn boot_id() -> [u8; 16] {
    static ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let hex: Vec<u8> = text
            .trim()
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .map(|c| c.to_digit(16).unwrap_or(0) as u8)
            .collect();
        let mut id = [0u8; 16];
        for (i, pair) in hex.chunks(2).take(16).enumerate() {
            id[i] = pair[0] << 4 | pair.get(1).copied().unwrap_or(0);
        }
        id
    })
}

/// What WIL_READ tells about a log besides the states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFacts {
    pub covers_from: u64,
    /// The machine has not rebooted since the last mark: the page cache holds every write.
    pub cache_intact: bool,
    pub rejoin_from: u64,
    pub rebuild: Rebuild,
}

/// Bytes before the states in a WIL_READ reply.
pub const READ_HEADER_BYTES: usize = 40;

impl LogFacts {
    pub fn encode(&self) -> [u8; READ_HEADER_BYTES] {
        let mut b = [0u8; READ_HEADER_BYTES];
        b[0..8].copy_from_slice(&self.covers_from.to_le_bytes());
        b[8..16].copy_from_slice(&u64::from(self.cache_intact).to_le_bytes());
        b[16..24].copy_from_slice(&self.rejoin_from.to_le_bytes());
        b[24..32].copy_from_slice(&self.rebuild.base.to_le_bytes());
        b[32..40].copy_from_slice(&self.rebuild.copied_to.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<LogFacts> {
        (b.len() >= READ_HEADER_BYTES).then(|| LogFacts {
            covers_from: u64_at(b, 0),
            cache_intact: u64_at(b, 8) == 1,
            rejoin_from: u64_at(b, 16),
            rebuild: Rebuild {
                base: u64_at(b, 24),
                copied_to: u64_at(b, 32),
            },
        })
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl IntentLog {
    /// Extents of a volume of `size_bytes`.
    pub fn extents_of(size_bytes: u64) -> u64 {
        size_bytes.div_ceil(WIL_EXTENT_BYTES)
    }

    /// Open the log in `dir`. A new replica (`new`) gets one all clean; an existing replica
    /// without one gets one all dirty (see the module docs). Both cover nothing yet.
    pub fn open(
        files: &dyn FileLayer,
        dir: &Path,
        size_bytes: u64,
        replica: &str,
        new: bool,
    ) -> Result<IntentLog, ReplicaError> {
        let path = dir.join(WIL_FILE);
        let extents = Self::extents_of(size_bytes);
        let existed = path.exists();
        let file = files
            .open_or_create(&path)
            .map_err(|e| ReplicaError::io("open write-intent log", &path, 0, e))?;
        let log = IntentLog {
            file,
            path,
            extents: AtomicU64::new(extents),
            inner: Mutex::new(Inner {
                states: vec![WIL_CLEAN; extents as usize],
                head: Head {
                    covers_from: COVERS_NOTHING,
                    boot: [0; 16],
                    rejoin_from: COVERS_NOTHING,
                    rebuild: Rebuild::NONE,
                },
            }),
        };
        // Its whole space, once: marks and settles never meet a full disk. A log written by
        // an older version on a disk full now opens anyway (its pages allocate as they go).
        let len = (PAGE_BYTES * (1 + (extents as usize).div_ceil(PAGE_STATES))) as u64;
        if let Err(e) = log.file.allocate(0, len) {
            tracing::warn!(replica, path = %log.path.display(), "cannot reserve the write-intent log's space ({e}): a mark may meet a full disk");
        }
        if !existed {
            if !new {
                tracing::warn!(
                    replica,
                    path = %log.path.display(),
                    "the replica has no write-intent log (written by an older version, or the file was lost): every extent is treated as dirty, so the next start resyncs the whole volume"
                );
                log.reset_all_dirty()?;
            }
            let inner = log.inner.lock().unwrap_or_else(|p| p.into_inner());
            log.write_header(&inner.head)?;
            drop(inner);
            if !new {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| ReplicaError::io("fsync directory", dir, 0, e))?;
            }
            return Ok(log);
        }
        log.load(replica)?;
        Ok(log)
    }

    /// Every extent dirty, durably (nothing is known about this replica's log).
    pub(crate) fn reset_all_dirty(&self) -> Result<(), ReplicaError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.states.fill(WIL_DIRTY);
        inner.head.covers_from = COVERS_NOTHING;
        let all: Vec<u64> = (0..self.extents()).step_by(PAGE_STATES).collect();
        self.write_header(&inner.head)?;
        self.store_pages(&inner, &all)
    }

    /// Cover a volume grown to `extents` (more than now): the new extents are clean (nothing
    /// was ever written there; a page's bytes past its last extent are zeroes, which read as
    /// clean, so no page changes). Only the header changes, durably. A crash before the
    /// replica's metadata records the new size leaves a header with more extents than the
    /// volume: it opens as it is (see [`IntentLog::open`]), its extra extents clean.
    pub(crate) fn grow(&self, extents: u64) -> Result<(), ReplicaError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if extents <= self.extents() {
            return Ok(());
        }
        let len = (PAGE_BYTES * (1 + (extents as usize).div_ceil(PAGE_STATES))) as u64;
        if let Err(e) = self.file.allocate(0, len) {
            tracing::warn!(path = %self.path.display(), "cannot reserve the write-intent log's space ({e}): a mark may meet a full disk");
        }
        self.file
            .write_all_at(&header(extents, inner.head), 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| ReplicaError::io("write write-intent log header", &self.path, 0, e))?;
        inner.states.resize(extents as usize, WIL_CLEAN);
        self.extents.store(extents, Ordering::Release);
        Ok(())
    }

    fn write_header(&self, head: &Head) -> Result<(), ReplicaError> {
        self.file
            .write_all_at(&header(self.extents(), *head), 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| ReplicaError::io("write write-intent log header", &self.path, 0, e))
    }

    fn load(&self, replica: &str) -> Result<(), ReplicaError> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = vec![0u8; PAGE_BYTES];
        let read = |buf: &mut [u8], at: u64| -> Result<usize, ReplicaError> {
            self.file
                .read_at(buf, at)
                .map_err(|e| ReplicaError::io("read write-intent log", &self.path, at, e))
        };
        let n = read(&mut h, 0)?;
        let version = u32_at(&h, 8);
        let header_ok = n == PAGE_BYTES
            && h[0..8] == WIL_MAGIC
            && (1..=WIL_FORMAT_VERSION).contains(&version)
            && u64_at(&h, 12) == WIL_EXTENT_BYTES
            && u64_at(&h, 20) >= self.extents()
            && header_crc(&h, version) == u32_at(&h, HEADER_CRC_AT);
        if !header_ok {
            tracing::warn!(
                replica,
                path = %self.path.display(),
                "the write-intent log's header is damaged: every extent is treated as dirty (resynced at the next start) and the log covers no member that left"
            );
            drop(inner);
            // Rewritten at once, so the damage costs one resync, not one per start.
            return self.reset_all_dirty();
        }
        let mut inner = inner;
        inner.head = Head {
            covers_from: u64_at(&h, 28),
            boot: h[36..52].try_into().expect("16 bytes"),
            rejoin_from: u64_at(&h, 52),
            rebuild: if version >= 2 {
                Rebuild {
                    base: u64_at(&h, 64),
                    copied_to: u64_at(&h, 72),
                }
            } else {
                Rebuild::NONE
            },
        };
        let pages = (self.extents() as usize).div_ceil(PAGE_STATES);
        let mut page = vec![0u8; PAGE_BYTES];
        for p in 0..pages {
            let at = (PAGE_BYTES * (1 + p)) as u64;
            let n = read(&mut page, at)?;
            page[n..].fill(0);
            let first = p * PAGE_STATES;
            let count = PAGE_STATES.min(self.extents() as usize - first);
            let slot = &mut inner.states[first..first + count];
            if page.iter().all(|b| *b == 0) {
                continue;
            }
            let sound = crc32c::crc32c(&page[4..]) == u32_at(&page, 0)
                && u32_at(&page, 4) == p as u32
                && page[PAGE_HEADER_BYTES..PAGE_HEADER_BYTES + count]
                    .iter()
                    .all(|s| *s <= WIL_DIRTY);
            if sound {
                slot.copy_from_slice(&page[PAGE_HEADER_BYTES..PAGE_HEADER_BYTES + count]);
            } else {
                tracing::warn!(
                    replica,
                    path = %self.path.display(),
                    page = p,
                    "a page of the write-intent log is damaged (a write torn by a crash?): its extents are treated as dirty"
                );
                slot.fill(WIL_DIRTY);
            }
        }
        Ok(())
    }

    fn invalid(&self, replica: &str, reason: String) -> ReplicaError {
        ReplicaError::Invalid {
            replica: replica.to_owned(),
            reason,
        }
    }

    fn check(&self, replica: &str, extents: &[u64]) -> Result<(), ReplicaError> {
        if let Some(e) = extents.iter().find(|e| **e >= self.extents()) {
            return Err(self.invalid(
                replica,
                format!(
                    "write-intent log extent {e} is past the volume's last ({})",
                    self.extents().saturating_sub(1)
                ),
            ));
        }
        Ok(())
    }

    /// Write the pages holding `changed` extents and sync them.
    fn store_pages(&self, inner: &Inner, changed: &[u64]) -> Result<(), ReplicaError> {
        let mut pages: Vec<usize> = changed.iter().map(|e| *e as usize / PAGE_STATES).collect();
        pages.sort_unstable();
        pages.dedup();
        for p in &pages {
            let first = p * PAGE_STATES;
            let count = PAGE_STATES.min(self.extents() as usize - first);
            let mut page = vec![0u8; PAGE_BYTES];
            page[4..8].copy_from_slice(&(*p as u32).to_le_bytes());
            page[PAGE_HEADER_BYTES..PAGE_HEADER_BYTES + count]
                .copy_from_slice(&inner.states[first..first + count]);
            let crc = crc32c::crc32c(&page[4..]);
            page[0..4].copy_from_slice(&crc.to_le_bytes());
            let at = (PAGE_BYTES * (1 + p)) as u64;
            self.file
                .write_all_at(&page, at)
                .map_err(|e| ReplicaError::io("write write-intent log", &self.path, at, e))?;
        }
        if !pages.is_empty() {
            self.file
                .sync_data()
                .map_err(|e| ReplicaError::io("fdatasync", &self.path, 0, e))?;
        }
        Ok(())
    }

    /// Durably mark `extents` dirty (before the writes they are for are sent anywhere).
    pub fn mark(&self, replica: &str, extents: &[u64]) -> Result<(), ReplicaError> {
        self.check(replica, extents)?;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.head.boot != boot_id() {
            let mut head = inner.head;
            head.boot = boot_id();
            self.write_header(&head)?;
            inner.head = head;
        }
        let changed: Vec<u64> = extents
            .iter()
            .copied()
            .filter(|e| inner.states[*e as usize] != WIL_DIRTY)
            .collect();
        for e in &changed {
            inner.states[*e as usize] = WIL_DIRTY;
        }
        self.store_pages(&inner, &changed)
    }

    /// This replica rejoins by rebuild: its log covers nothing from now on (until it is in sync
    /// again), and the first rejoin since it was last in sync records `generation` (its
    /// generation before the rebuild fenced older sessions on it).
    pub fn rejoin(&self, generation: u64) -> Result<(), ReplicaError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut head = inner.head;
        head.covers_from = COVERS_NOTHING;
        if head.rejoin_from == COVERS_NOTHING {
            head.rejoin_from = generation;
        }
        self.write_header(&head)?;
        inner.head = head;
        Ok(())
    }

    /// Durably record how far a rebuild into this replica got (its data below `copied_to` must
    /// be durable already: the rebuild flushes it first).
    pub fn record_rebuild(&self, rebuild: Rebuild) -> Result<(), ReplicaError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut head = inner.head;
        head.rebuild = rebuild;
        self.write_header(&head)?;
        inner.head = head;
        Ok(())
    }

    /// Settle `extents` (every non-clean one with `all`) to `state`. Settling to clean at
    /// `generation` first records that the log covers every member from that generation on
    /// (durable before any bit is cleared); the replica is in sync, so a rejoin and a rebuild
    /// are over.
    pub fn settle(
        &self,
        replica: &str,
        extents: &[u64],
        all: bool,
        state: u8,
        generation: u64,
    ) -> Result<(), ReplicaError> {
        self.check(replica, extents)?;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if state == WIL_CLEAN
            && (inner.head.covers_from != generation
                || inner.head.rejoin_from != COVERS_NOTHING
                || inner.head.rebuild != Rebuild::NONE)
        {
            let mut head = inner.head;
            head.covers_from = generation;
            head.rejoin_from = COVERS_NOTHING;
            head.rebuild = Rebuild::NONE;
            self.write_header(&head)?;
            inner.head = head;
        }
        let listed: Vec<u64> = if all {
            (0..self.extents())
                .filter(|e| inner.states[*e as usize] != WIL_CLEAN)
                .collect()
        } else {
            extents.to_vec()
        };
        let changed: Vec<u64> = listed
            .into_iter()
            .filter(|e| inner.states[*e as usize] != state)
            .collect();
        for e in &changed {
            inner.states[*e as usize] = state;
        }
        self.store_pages(&inner, &changed)
    }

    /// [`LogFacts`], then the states of `count` extents from `first`.
    pub fn read(&self, replica: &str, first: u64, count: u64) -> Result<Vec<u8>, ReplicaError> {
        if first
            .checked_add(count)
            .is_none_or(|end| end > self.extents())
        {
            return Err(self.invalid(
                replica,
                format!(
                    "write-intent log range {first}+{count} is past its {} extents",
                    self.extents()
                ),
            ));
        }
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let facts = LogFacts {
            covers_from: inner.head.covers_from,
            cache_intact: inner.head.boot == boot_id(),
            rejoin_from: inner.head.rejoin_from,
            rebuild: inner.head.rebuild,
        };
        let mut out = facts.encode().to_vec();
        out.extend_from_slice(&inner.states[first as usize..(first + count) as usize]);
        Ok(out)
    }

    pub fn extents(&self) -> u64 {
        self.extents.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;
    use zebu_proto::data::WIL_CHANGED;

    const SIZE: u64 = 3 * PAGE_STATES as u64 * WIL_EXTENT_BYTES;

    fn states(log: &IntentLog) -> (u64, Vec<u8>) {
        let b = log.read("r", 0, log.extents()).unwrap();
        (u64_at(&b, 0), b[READ_HEADER_BYTES..].to_vec())
    }

    #[test]
    fn marks_and_settles_survive_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        assert_eq!(states(&log).0, COVERS_NOTHING);
        log.mark("r", &[0, 5, PAGE_STATES as u64 + 1]).unwrap();
        log.settle("r", &[5], false, WIL_CHANGED, 7).unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        let (covers, s) = states(&log);
        assert_eq!(covers, COVERS_NOTHING, "settling to changed covers nothing");
        assert_eq!(s[0], WIL_DIRTY);
        assert_eq!(s[5], WIL_CHANGED);
        assert_eq!(s[PAGE_STATES + 1], WIL_DIRTY);
        assert_eq!(s.iter().filter(|x| **x != WIL_CLEAN).count(), 3);
        log.settle("r", &[], true, WIL_CLEAN, 9).unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        let (covers, s) = states(&log);
        assert_eq!(covers, 9);
        assert!(s.iter().all(|x| *x == WIL_CLEAN));
    }

    #[test]
    fn a_damaged_page_or_header_reads_as_dirty_never_clean() {
        let d = tempfile::tempdir().unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        log.mark("r", &[1, PAGE_STATES as u64 + 2]).unwrap();
        log.settle("r", &[1], false, WIL_CLEAN, 4).unwrap();
        drop(log);
        // A torn write of page 1: half new, half old.
        let f = OpenOptions::new()
            .write(true)
            .open(d.path().join(WIL_FILE))
            .unwrap();
        f.write_all_at(&[0xff; 100], (PAGE_BYTES * 2 + 2000) as u64)
            .unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        let (covers, s) = states(&log);
        assert_eq!(covers, 4);
        assert_eq!(s[1], WIL_CLEAN, "page 0 is sound");
        assert!(s[PAGE_STATES..2 * PAGE_STATES]
            .iter()
            .all(|x| *x == WIL_DIRTY));
        assert!(s[2 * PAGE_STATES..].iter().all(|x| *x == WIL_CLEAN));
        drop(log);
        f.write_all_at(&[0x55; 4], 30).unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        let (covers, s) = states(&log);
        assert_eq!(covers, COVERS_NOTHING);
        assert!(s.iter().all(|x| *x == WIL_DIRTY));
        // Rewritten at once: the next open finds it sound, still all dirty.
        drop(log);
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        assert!(states(&log).1.iter().all(|x| *x == WIL_DIRTY));
    }

    #[test]
    fn an_existing_replica_without_a_log_is_all_dirty_and_a_rejoin_keeps_its_first_generation() {
        let d = tempfile::tempdir().unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", false).unwrap();
        let (covers, s) = states(&log);
        assert_eq!(covers, COVERS_NOTHING);
        assert!(s.iter().all(|x| *x == WIL_DIRTY));
        let facts = |log: &IntentLog| LogFacts::decode(&log.read("r", 0, 0).unwrap()).unwrap();
        log.mark("r", &[0]).unwrap();
        assert!(facts(&log).cache_intact, "marked in this boot");
        log.rejoin(5).unwrap();
        log.rejoin(6).unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        assert_eq!(
            facts(&log).rejoin_from,
            5,
            "the first rejoin's generation is kept"
        );
        log.settle("r", &[], false, WIL_CLEAN, 8).unwrap();
        assert_eq!(facts(&log).rejoin_from, COVERS_NOTHING);
        assert_eq!(facts(&log).covers_from, 8);
    }

    #[test]
    fn a_rebuild_record_survives_a_reopen_and_is_cleared_once_in_sync() {
        let d = tempfile::tempdir().unwrap();
        let facts = |log: &IntentLog| LogFacts::decode(&log.read("r", 0, 0).unwrap()).unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        assert_eq!(facts(&log).rebuild, Rebuild::NONE);
        let r = Rebuild {
            base: 7,
            copied_to: 96 << 20,
        };
        log.rejoin(3).unwrap();
        log.record_rebuild(r).unwrap();
        log.mark("r", &[2]).unwrap();
        log.rejoin(4).unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        assert_eq!(facts(&log).rebuild, r, "kept across a reopen and a rejoin");
        assert_eq!(facts(&log).rejoin_from, 3);
        // Settling to changed says nothing of being in sync; settling to clean does.
        log.settle("r", &[2], false, WIL_CHANGED, 0).unwrap();
        assert_eq!(facts(&log).rebuild, r);
        log.settle("r", &[], true, WIL_CLEAN, 9).unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        assert_eq!(facts(&log).rebuild, Rebuild::NONE);
    }

    #[test]
    fn a_version_1_log_opens_with_no_rebuild_in_progress() {
        let d = tempfile::tempdir().unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        log.mark("r", &[1]).unwrap();
        log.settle("r", &[1], false, WIL_CLEAN, 5).unwrap();
        log.mark("r", &[4]).unwrap();
        drop(log);
        // The header as version 1 wrote it: no fields after rejoin_from, CRC of bytes 0..60.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.path().join(WIL_FILE))
            .unwrap();
        let mut h = vec![0u8; PAGE_BYTES];
        f.read_exact_at(&mut h, 0).unwrap();
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[64..80].fill(0);
        let crc = crc32c::crc32c(&h[0..HEADER_CRC_AT]);
        h[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&h, 0).unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        let facts = LogFacts::decode(&log.read("r", 0, 0).unwrap()).unwrap();
        assert_eq!(facts.rebuild, Rebuild::NONE);
        let (covers, s) = states(&log);
        assert_eq!(covers, 5, "the version-1 fields are read");
        assert_eq!((s[1], s[4]), (WIL_CLEAN, WIL_DIRTY));
    }

    #[test]
    fn extents_past_the_volume_are_refused_and_change_nothing() {
        let d = tempfile::tempdir().unwrap();
        let log = IntentLog::open(&crate::file::Direct, d.path(), SIZE, "r", true).unwrap();
        let n = log.extents();
        let err = log.mark("r", &[0, n]).unwrap_err();
        assert!(err.to_string().contains("past the volume"), "{err}");
        assert!(states(&log).1.iter().all(|x| *x == WIL_CLEAN));
        assert!(log.read("r", n - 1, 2).is_err());
    }
}
