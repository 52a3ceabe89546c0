//! The file layer under a replica: every byte a replica reads or writes, and every sync, goes
//! through [`DiskFile`], opened by a [`FileLayer`].
//!
//! The layers:
//! - [`Direct`]: the real files, with positioned I/O (what every user runs);
//! - [`CrashSim`]: the real files behind a volatile cache of their own, written to the files only
//!   by a sync (or by a simulated kernel writeback, at random, whole pages or torn ones). When
//!   the process ends, whatever was not written is gone, as dirty pages are at a power cut.
//!   `kill -9` keeps the kernel's page cache and so proves nothing about power loss; with this
//!   layer a `kill -9` drops what was not flushed, and tests of the durability promises mean
//!   what they say;
//! - [`Faulty`]: another layer whose space reservations fail with ENOSPC while switched on.
//!
//! What the simulation does not cover: directory entries and file sizes (`set_len`) are passed
//! through at once (they are synced where the replica needs them: new files are `fsync`ed with
//! their directory before use), and a hole punch is passed through at once for whole pages (a
//! punch that reaches the disk early is one a power cut could also have left).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};

/// One open file of a replica. Positioned I/O only; every method may be called from many
/// threads at once.
pub trait DiskFile: Send + Sync {
    /// Read into all of `buf` from `at`; an error if the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()>;
    /// Read what there is from `at` (fewer bytes only at the end of the file).
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize>;
    /// Read all of `buf` only if it can be done without waiting for the disk.
    fn read_cached(&self, buf: &mut [u8], at: u64) -> bool;
    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()>;
    /// Make every completed write durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Make every completed write and the file's size durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn size(&self) -> io::Result<u64>;
    /// Let `len` bytes from `at` read as zeroes and free their space where the filesystem can.
    fn punch_hole(&self, at: u64, len: u64) -> io::Result<()>;
    /// The first offset at or after `from` that may hold data; `None` when none does.
    fn next_data(&self, from: u64) -> io::Result<Option<u64>>;
    /// Reserve the disk space of `len` bytes from `at` (holes become allocated and read as
    /// zeroes; data is left alone; the size is kept), so writes there cannot meet ENOSPC.
    fn allocate(&self, at: u64, len: u64) -> io::Result<()>;
}

/// Opens a replica's files.
pub trait FileLayer: Send + Sync {
    /// Open `path` for reading and writing; `create`: create it (an error if it exists).
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>>;
    /// Open `path` for reading and writing, creating it when missing.
    fn open_or_create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// A short name for logs (`direct`, `crash-sim`).
    fn name(&self) -> &'static str;
}

impl std::fmt::Debug for dyn FileLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The layer a replica uses unless told otherwise.
pub fn direct() -> Arc<dyn FileLayer> {
    Arc::new(Direct)
}

fn open_file(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
}

fn open_or_create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// The real files.
pub struct Direct;

impl FileLayer for Direct {
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(DirectFile(open_file(path, create)?)))
    }
    fn open_or_create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(DirectFile(open_or_create_file(path)?)))
    }
    fn name(&self) -> &'static str {
        "direct"
    }
}

struct DirectFile(File);

fn pread_nowait(file: &File, buf: &mut [u8], at: u64) -> bool {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which is valid for writes of its length for the duration of
    // the call; the descriptor is open for reading.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            at as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    n >= 0 && n as usize == buf.len()
}

/// `fallocate(2)` with `mode`; a filesystem without it (EOPNOTSUPP) is not an error: for a
/// punch the caller reads the range as zero anyway, and without a reservation writes allocate
/// as they go (an ENOSPC then is an I/O error, as before).
fn fallocate(file: &File, mode: libc::c_int, at: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid, open file descriptor; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
    }
    Ok(())
}

fn punch(file: &File, at: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        at,
        len,
    )
}

fn allocate(file: &File, at: u64, len: u64) -> io::Result<()> {
    fallocate(file, libc::FALLOC_FL_KEEP_SIZE, at, len)
}

fn seek_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid, open file descriptor; no memory is passed.
    let next = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if next >= 0 {
        return Ok(Some(next as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        // No SEEK_DATA on this filesystem: everything may hold data.
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(from)),
        _ => Err(e),
    }
}

impl DiskFile for DirectFile {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, at)
    }
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.0.read_at(&mut buf[n..], at + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
    fn read_cached(&self, buf: &mut [u8], at: u64) -> bool {
        pread_nowait(&self.0, buf, at)
    }
    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        self.0.write_all_at(buf, at)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn punch_hole(&self, at: u64, len: u64) -> io::Result<()> {
        punch(&self.0, at, len)
    }
    fn next_data(&self, from: u64) -> io::Result<Option<u64>> {
        seek_data(&self.0, from)
    }
    fn allocate(&self, at: u64, len: u64) -> io::Result<()> {
        allocate(&self.0, at, len)
    }
}

/// Bytes the simulated cache tracks as one page (a sector is [`SECTOR`]).
const PAGE: u64 = 4096;
/// What a torn page write keeps: whole sectors only, as disks write them.
const SECTOR: u64 = 512;

/// The crash-simulating layer (see the module docs).
pub struct CrashSim {
    /// Dirty bytes per file beyond which a simulated writeback writes some pages out early.
    writeback_bytes: u64,
    seed: u64,
    files: AtomicU64,
}

impl CrashSim {
    /// `writeback_bytes`: dirty bytes per file at which the simulated kernel writes pages out
    /// early, some of them torn (0: never, everything waits for a sync). `seed` chooses which.
    pub fn new(writeback_bytes: u64, seed: u64) -> CrashSim {
        CrashSim {
            writeback_bytes,
            seed,
            files: AtomicU64::new(0),
        }
    }

    fn wrap(&self, file: File) -> Box<dyn DiskFile> {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        Box::new(SimFile {
            file,
            writeback_bytes: self.writeback_bytes,
            state: Mutex::new(SimState {
                pages: HashMap::new(),
                len: None,
                rng: rand::rngs::StdRng::seed_from_u64(self.seed ^ n.wrapping_mul(0x9e37_79b9)),
            }),
        })
    }
}

impl FileLayer for CrashSim {
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        Ok(self.wrap(open_file(path, create)?))
    }
    fn open_or_create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(self.wrap(open_or_create_file(path)?))
    }
    fn name(&self) -> &'static str {
        "crash-sim"
    }
}

struct SimFile {
    file: File,
    writeback_bytes: u64,
    state: Mutex<SimState>,
}

struct SimState {
    /// Pages written since they were last written to the file: their whole new content.
    pages: HashMap<u64, Box<[u8]>>,
    /// The file's length as writes see it, once a write went past the real file's end.
    len: Option<u64>,
    rng: rand::rngs::StdRng,
}

impl SimFile {
    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn real_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The file's current content of page `p` (zeroes past its end).
    fn load_page(&self, p: u64) -> io::Result<Box<[u8]>> {
        let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
        let mut n = 0;
        while n < page.len() {
            match self.file.read_at(&mut page[n..], p * PAGE + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(page)
    }

    /// Write these pages to the file (never past the length writes have seen).
    fn write_out(&self, st: &SimState, pages: &[u64], torn: Option<u64>) -> io::Result<()> {
        let len = match st.len {
            Some(l) => l,
            None => self.real_len()?,
        };
        for p in pages {
            let page = &st.pages[p];
            let start = p * PAGE;
            let mut end = (start + PAGE).min(len.max(start));
            if let Some(sectors) = torn {
                end = end.min(start + sectors * SECTOR);
            }
            if end > start {
                self.file
                    .write_all_at(&page[..(end - start) as usize], start)?;
            }
        }
        Ok(())
    }

    /// Everything in the cache to the file, then the real sync.
    fn flush_cache(&self, all: bool) -> io::Result<()> {
        {
            let mut st = self.lock();
            let pages: Vec<u64> = st.pages.keys().copied().collect();
            // The lock stays held while the pages are written: no read may find a page gone
            // from the cache and not yet in the file.
            self.write_out(&st, &pages, None)?;
            st.pages.clear();
            st.len = None;
        }
        if all {
            self.file.sync_all()
        } else {
            self.file.sync_data()
        }
    }

    /// The simulated kernel writes some dirty pages out early, some of them torn.
    fn writeback(&self, st: &mut SimState) -> io::Result<()> {
        if self.writeback_bytes == 0 || (st.pages.len() as u64) * PAGE < self.writeback_bytes {
            return Ok(());
        }
        let mut whole = Vec::new();
        let mut torn = Vec::new();
        let keys: Vec<u64> = st.pages.keys().copied().collect();
        for p in keys {
            match st.rng.gen_range(0..8u32) {
                0..=3 => whole.push(p),
                4 => torn.push(p),
                _ => {}
            }
        }
        self.write_out(st, &whole, None)?;
        for p in &whole {
            st.pages.remove(p);
        }
        for p in torn {
            let sectors = st.rng.gen_range(1..PAGE / SECTOR);
            // Written in part; the page stays dirty, so reads and the next sync see all of it.
            self.write_out(st, &[p], Some(sectors))?;
        }
        Ok(())
    }
}

impl DiskFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        let n = self.read_at(buf, at)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "failed to fill whole buffer",
            ));
        }
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        let st = self.lock();
        let len = match st.len {
            Some(l) => l,
            None => self.real_len()?,
        };
        let want = (buf.len() as u64).min(len.saturating_sub(at)) as usize;
        let mut done = 0usize;
        while done < want {
            let pos = at + done as u64;
            let p = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(want - done);
            match st.pages.get(&p) {
                Some(page) => buf[done..done + n].copy_from_slice(&page[in_page..in_page + n]),
                None => {
                    let mut k = 0;
                    while k < n {
                        match self
                            .file
                            .read_at(&mut buf[done + k..done + n], pos + k as u64)
                        {
                            Ok(0) => {
                                // Past the real end, inside the length writes have seen.
                                buf[done + k..done + n].fill(0);
                                k = n;
                            }
                            Ok(r) => k += r,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            done += n;
        }
        Ok(want)
    }

    fn read_cached(&self, buf: &mut [u8], at: u64) -> bool {
        self.read_exact_at(buf, at).is_ok()
    }

    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        let mut st = self.lock();
        let end = at + buf.len() as u64;
        let len = match st.len {
            Some(l) => l,
            None => self.real_len()?,
        };
        if end > len {
            st.len = Some(end);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = at + done as u64;
            let p = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let page = match st.pages.entry(p) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(if n == PAGE as usize {
                    vec![0u8; PAGE as usize].into_boxed_slice()
                } else {
                    self.load_page(p)?
                }),
            };
            page[in_page..in_page + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        self.writeback(&mut st)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.flush_cache(false)
    }

    fn sync_all(&self) -> io::Result<()> {
        self.flush_cache(true)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        let pages: Vec<u64> = st.pages.keys().copied().collect();
        for p in pages {
            if p * PAGE >= len {
                st.pages.remove(&p);
            }
        }
        st.len = None;
        self.file.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        let st = self.lock();
        match st.len {
            Some(l) => Ok(l),
            None => self.real_len(),
        }
    }

    fn punch_hole(&self, at: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        let end = at + len;
        // Whole pages: punched in the file at once (see the module docs), dropped from the cache.
        let first_whole = at.div_ceil(PAGE);
        let end_whole = end / PAGE;
        if end_whole > first_whole {
            let cached: Vec<u64> = st.pages.keys().copied().collect();
            for p in cached {
                if p >= first_whole && p < end_whole {
                    st.pages.remove(&p);
                }
            }
            punch(
                &self.file,
                first_whole * PAGE,
                (end_whole - first_whole) * PAGE,
            )?;
        }
        // The edges: zeroes written to the cache like any write.
        drop(st);
        let edges = if end_whole > first_whole {
            vec![(at, first_whole * PAGE), (end_whole * PAGE, end)]
        } else {
            vec![(at, end)]
        };
        for (s, e) in edges {
            if e > s {
                self.write_all_at(&vec![0u8; (e - s) as usize], s)?;
            }
        }
        Ok(())
    }

    fn next_data(&self, from: u64) -> io::Result<Option<u64>> {
        let st = self.lock();
        let cached = st
            .pages
            .keys()
            .filter(|p| (*p + 1) * PAGE > from)
            .map(|p| (p * PAGE).max(from))
            .min();
        let real = seek_data(&self.file, from)?;
        Ok(match (cached, real) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn allocate(&self, at: u64, len: u64) -> io::Result<()> {
        // Space, not content: passed through at once (the pages read as before).
        allocate(&self.file, at, len)
    }
}

/// A layer over another that refuses to reserve space while [`Faulty::fill`] holds: every
/// `allocate` fails with ENOSPC, as on a full filesystem (tests of the disk-full rules).
pub struct Faulty {
    inner: Arc<dyn FileLayer>,
    full: Arc<std::sync::atomic::AtomicBool>,
    sync_delay_us: Arc<AtomicU64>,
}

impl Faulty {
    pub fn new(inner: Arc<dyn FileLayer>) -> Faulty {
        Faulty {
            inner,
            full: Arc::default(),
            sync_delay_us: Arc::default(),
        }
    }

    /// Every data sync takes this much longer (a slow disk): widens the windows races need.
    pub fn slow_syncs(self, delay: std::time::Duration) -> Faulty {
        self.sync_delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
        self
    }

    /// A switch: `true` makes the disk full, `false` frees it.
    pub fn switch(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.full.clone()
    }
}

impl FileLayer for Faulty {
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(FaultyFile {
            inner: self.inner.open(path, create)?,
            full: self.full.clone(),
            sync_delay_us: self.sync_delay_us.clone(),
        }))
    }
    fn open_or_create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(FaultyFile {
            inner: self.inner.open_or_create(path)?,
            full: self.full.clone(),
            sync_delay_us: self.sync_delay_us.clone(),
        }))
    }
    fn name(&self) -> &'static str {
        "faulty"
    }
}

struct FaultyFile {
    inner: Box<dyn DiskFile>,
    full: Arc<std::sync::atomic::AtomicBool>,
    sync_delay_us: Arc<AtomicU64>,
}

impl DiskFile for FaultyFile {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, at)
    }
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        self.inner.read_at(buf, at)
    }
    fn read_cached(&self, buf: &mut [u8], at: u64) -> bool {
        self.inner.read_cached(buf, at)
    }
    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, at)
    }
    fn sync_data(&self) -> io::Result<()> {
        let delay = self.sync_delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay));
        }
        self.inner.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.inner.sync_all()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn punch_hole(&self, at: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(at, len)
    }
    fn next_data(&self, from: u64) -> io::Result<Option<u64>> {
        self.inner.next_data(from)
    }
    fn allocate(&self, at: u64, len: u64) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.allocate(at, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(dir: &Path, writeback: u64) -> (Box<dyn DiskFile>, std::path::PathBuf) {
        let p = dir.join("f");
        (CrashSim::new(writeback, 7).open(&p, true).unwrap(), p)
    }

    #[test]
    fn unsynced_writes_are_read_back_but_lost_at_a_power_cut() {
        let d = tempfile::tempdir().unwrap();
        let (f, p) = sim(d.path(), 0);
        f.set_len(3 * PAGE).unwrap();
        f.write_all_at(&[1u8; 100], 10).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(&[2u8; 5000], 50).unwrap();
        let mut b = vec![0u8; 6000];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..10].iter().all(|x| *x == 0));
        assert!(b[10..50].iter().all(|x| *x == 1));
        assert!(b[50..5050].iter().all(|x| *x == 2));
        assert!(b[5050..].iter().all(|x| *x == 0));
        drop(f); // the power cut
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(on_disk.len() as u64, 3 * PAGE);
        assert!(on_disk[10..110].iter().all(|x| *x == 1), "synced data kept");
        assert!(on_disk[110..].iter().all(|x| *x == 0), "unsynced data lost");
    }

    #[test]
    fn a_growing_file_keeps_only_its_synced_length() {
        let d = tempfile::tempdir().unwrap();
        let (f, p) = sim(d.path(), 0);
        f.write_all_at(&[3u8; 4096], 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(&[4u8; 10], 8192).unwrap();
        assert_eq!(f.size().unwrap(), 8202);
        let mut b = [9u8; 4096];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|x| *x == 0), "the gap reads as zeroes");
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap().len(), 4096);
    }

    #[test]
    fn writeback_writes_some_pages_early_some_torn_and_reads_stay_right() {
        let d = tempfile::tempdir().unwrap();
        let (f, p) = sim(d.path(), 64 * PAGE);
        let pages = 256u64;
        f.set_len(pages * PAGE).unwrap();
        for i in 0..pages {
            f.write_all_at(&vec![(i % 250 + 1) as u8; PAGE as usize], i * PAGE)
                .unwrap();
        }
        let mut b = vec![0u8; (pages * PAGE) as usize];
        f.read_exact_at(&mut b, 0).unwrap();
        for i in 0..pages as usize {
            assert!(b[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|x| *x == (i % 250 + 1) as u8));
        }
        drop(f);
        let on_disk = std::fs::read(&p).unwrap();
        let (mut whole, mut torn, mut none) = (0, 0, 0);
        for i in 0..pages as usize {
            let page = &on_disk[i * 4096..(i + 1) * 4096];
            let v = (i % 250 + 1) as u8;
            let written = page.iter().take_while(|x| **x == v).count();
            assert!(page[written..].iter().all(|x| *x == 0));
            assert_eq!(written % SECTOR as usize, 0, "torn on a sector boundary");
            match written {
                4096 => whole += 1,
                0 => none += 1,
                _ => torn += 1,
            }
        }
        assert!(whole > 0 && torn > 0 && none > 0, "{whole} {torn} {none}");
    }

    #[test]
    fn a_punched_range_reads_zero_and_next_data_sees_cached_pages() {
        let d = tempfile::tempdir().unwrap();
        let (f, _p) = sim(d.path(), 0);
        f.set_len(16 * PAGE).unwrap();
        f.write_all_at(&vec![5u8; (4 * PAGE) as usize], 2 * PAGE)
            .unwrap();
        f.punch_hole(2 * PAGE + 100, 2 * PAGE).unwrap();
        let mut b = vec![0u8; (4 * PAGE) as usize];
        f.read_exact_at(&mut b, 2 * PAGE).unwrap();
        assert!(b[..100].iter().all(|x| *x == 5));
        assert!(b[100..100 + 2 * PAGE as usize].iter().all(|x| *x == 0));
        assert!(b[100 + 2 * PAGE as usize..].iter().all(|x| *x == 5));
        assert_eq!(f.next_data(0).unwrap(), Some(2 * PAGE));
        assert_eq!(f.next_data(9 * PAGE).unwrap(), None);
    }
}
