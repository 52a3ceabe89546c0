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
//! covers_from u64, then a CRC32C of those 36 bytes at byte 36), then pages of 4096 bytes:
//! CRC32C (u32, of the rest of the page) and page number (u32), then one state byte for each of
//! [`PAGE_STATES`] extents. A page that is all zeroes (never written, sparse) is all clean. A
//! page is replaced in place with one positioned write and `fdatasync`ed before a mark is
//! answered; a page torn by a crash fails its CRC and reads as all dirty, a damaged header as
//! every extent dirty and covering nothing: wrong only towards more copying, never less.
//!
//! `covers_from`: every member that left the set at a generation `>= covers_from` differs
//! from this replica only in its non-clean extents. Settling to clean at generation `g`
//! (every member present) sets it to `g`; a new log covers nothing (`u64::MAX`) until then.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use zebu_proto::data::{WIL_CLEAN, WIL_DIRTY, WIL_EXTENT_BYTES};

use crate::error::ReplicaError;

pub const WIL_FILE: &str = "wil";
pub const WIL_MAGIC: [u8; 8] = *b"ZEBUWIL\0";
pub const WIL_FORMAT_VERSION: u32 = 1;
const PAGE_BYTES: usize = 4096;
const PAGE_HEADER_BYTES: usize = 8;
/// Extents whose state one page holds.
pub const PAGE_STATES: usize = PAGE_BYTES - PAGE_HEADER_BYTES;
/// `covers_from` of a log that covers nothing yet.
pub const COVERS_NOTHING: u64 = u64::MAX;

pub struct IntentLog {
    file: File,
    path: PathBuf,
    extents: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    states: Vec<u8>,
    covers_from: u64,
}

fn header(extents: u64, covers_from: u64) -> Vec<u8> {
    let mut h = vec![0u8; PAGE_BYTES];
    h[0..8].copy_from_slice(&WIL_MAGIC);
    h[8..12].copy_from_slice(&WIL_FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&WIL_EXTENT_BYTES.to_le_bytes());
    h[20..28].copy_from_slice(&extents.to_le_bytes());
    h[28..36].copy_from_slice(&covers_from.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
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

    /// Open the log in `dir`, creating it (all clean, covering nothing) if the replica has none
    /// yet (a new replica, or one written before the log existed).
    pub fn open(dir: &Path, size_bytes: u64, replica: &str) -> Result<IntentLog, ReplicaError> {
        let path = dir.join(WIL_FILE);
        let extents = Self::extents_of(size_bytes);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| ReplicaError::io("open write-intent log", &path, 0, e))?;
        let log = IntentLog {
            file,
            path,
            extents,
            inner: Mutex::new(Inner {
                states: vec![WIL_CLEAN; extents as usize],
                covers_from: COVERS_NOTHING,
            }),
        };
        if !existed {
            log.write_header(COVERS_NOTHING)?;
            return Ok(log);
        }
        log.load(replica)?;
        Ok(log)
    }

    fn write_header(&self, covers_from: u64) -> Result<(), ReplicaError> {
        self.file
            .write_all_at(&header(self.extents, covers_from), 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| ReplicaError::io("write write-intent log header", &self.path, 0, e))
    }

    fn load(&self, replica: &str) -> Result<(), ReplicaError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = vec![0u8; PAGE_BYTES];
        let read = |buf: &mut [u8], at: u64| -> Result<usize, ReplicaError> {
            let mut n = 0;
            while n < buf.len() {
                match self.file.read_at(&mut buf[n..], at + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => {
                        return Err(ReplicaError::io("read write-intent log", &self.path, at, e))
                    }
                }
            }
            Ok(n)
        };
        let n = read(&mut h, 0)?;
        let header_ok = n == PAGE_BYTES
            && h[0..8] == WIL_MAGIC
            && u32_at(&h, 8) == WIL_FORMAT_VERSION
            && u64_at(&h, 12) == WIL_EXTENT_BYTES
            && u64_at(&h, 20) == self.extents
            && crc32c::crc32c(&h[0..36]) == u32_at(&h, 36);
        if !header_ok {
            tracing::warn!(
                replica,
                path = %self.path.display(),
                "the write-intent log's header is damaged: every extent is treated as dirty (resynced at the next start) and the log covers no member that left"
            );
            inner.states.fill(WIL_DIRTY);
            inner.covers_from = COVERS_NOTHING;
            return Ok(());
        }
        inner.covers_from = u64_at(&h, 28);
        let pages = (self.extents as usize).div_ceil(PAGE_STATES);
        let mut page = vec![0u8; PAGE_BYTES];
        for p in 0..pages {
            let at = (PAGE_BYTES * (1 + p)) as u64;
            let n = read(&mut page, at)?;
            page[n..].fill(0);
            let first = p * PAGE_STATES;
            let count = PAGE_STATES.min(self.extents as usize - first);
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
        if let Some(e) = extents.iter().find(|e| **e >= self.extents) {
            return Err(self.invalid(
                replica,
                format!(
                    "write-intent log extent {e} is past the volume's last ({})",
                    self.extents.saturating_sub(1)
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
            let count = PAGE_STATES.min(self.extents as usize - first);
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

    /// Settle `extents` (every non-clean one with `all`) to `state`. Settling to clean at
    /// `generation` first records that the log covers every member from that generation on
    /// (durable before any bit is cleared).
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
        if state == WIL_CLEAN && inner.covers_from != generation {
            self.write_header(generation)?;
            inner.covers_from = generation;
        }
        let listed: Vec<u64> = if all {
            (0..self.extents)
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

    /// `covers_from`, then the states of `count` extents from `first`.
    pub fn read(&self, replica: &str, first: u64, count: u64) -> Result<Vec<u8>, ReplicaError> {
        if first
            .checked_add(count)
            .is_none_or(|end| end > self.extents)
        {
            return Err(self.invalid(
                replica,
                format!(
                    "write-intent log range {first}+{count} is past its {} extents",
                    self.extents
                ),
            ));
        }
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = inner.covers_from.to_le_bytes().to_vec();
        out.extend_from_slice(&inner.states[first as usize..(first + count) as usize]);
        Ok(out)
    }

    pub fn extents(&self) -> u64 {
        self.extents
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zebu_proto::data::WIL_CHANGED;

    const SIZE: u64 = 3 * PAGE_STATES as u64 * WIL_EXTENT_BYTES;

    fn states(log: &IntentLog) -> (u64, Vec<u8>) {
        let b = log.read("r", 0, log.extents()).unwrap();
        (u64_at(&b, 0), b[8..].to_vec())
    }

    #[test]
    fn marks_and_settles_survive_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let log = IntentLog::open(d.path(), SIZE, "r").unwrap();
        assert_eq!(states(&log).0, COVERS_NOTHING);
        log.mark("r", &[0, 5, PAGE_STATES as u64 + 1]).unwrap();
        log.settle("r", &[5], false, WIL_CHANGED, 7).unwrap();
        let log = IntentLog::open(d.path(), SIZE, "r").unwrap();
        let (covers, s) = states(&log);
        assert_eq!(covers, COVERS_NOTHING, "settling to changed covers nothing");
        assert_eq!(s[0], WIL_DIRTY);
        assert_eq!(s[5], WIL_CHANGED);
        assert_eq!(s[PAGE_STATES + 1], WIL_DIRTY);
        assert_eq!(s.iter().filter(|x| **x != WIL_CLEAN).count(), 3);
        log.settle("r", &[], true, WIL_CLEAN, 9).unwrap();
        let log = IntentLog::open(d.path(), SIZE, "r").unwrap();
        let (covers, s) = states(&log);
        assert_eq!(covers, 9);
        assert!(s.iter().all(|x| *x == WIL_CLEAN));
    }

    #[test]
    fn a_damaged_page_or_header_reads_as_dirty_never_clean() {
        let d = tempfile::tempdir().unwrap();
        let log = IntentLog::open(d.path(), SIZE, "r").unwrap();
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
        let log = IntentLog::open(d.path(), SIZE, "r").unwrap();
        let (covers, s) = states(&log);
        assert_eq!(covers, 4);
        assert_eq!(s[1], WIL_CLEAN, "page 0 is sound");
        assert!(s[PAGE_STATES..2 * PAGE_STATES]
            .iter()
            .all(|x| *x == WIL_DIRTY));
        assert!(s[2 * PAGE_STATES..].iter().all(|x| *x == WIL_CLEAN));
        drop(log);
        f.write_all_at(&[0x55; 4], 30).unwrap();
        let log = IntentLog::open(d.path(), SIZE, "r").unwrap();
        let (covers, s) = states(&log);
        assert_eq!(covers, COVERS_NOTHING);
        assert!(s.iter().all(|x| *x == WIL_DIRTY));
    }

    #[test]
    fn extents_past_the_volume_are_refused_and_change_nothing() {
        let d = tempfile::tempdir().unwrap();
        let log = IntentLog::open(d.path(), SIZE, "r").unwrap();
        let n = log.extents();
        let err = log.mark("r", &[0, n]).unwrap_err();
        assert!(err.to_string().contains("past the volume"), "{err}");
        assert!(states(&log).1.iter().all(|x| *x == WIL_CLEAN));
        assert!(log.read("r", n - 1, 2).is_err());
    }
}
