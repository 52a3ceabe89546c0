//! The FUSE frontend (`zebu agent --fuse-dir DIR`): every volume attached to this node appears
//! as a file `DIR/VOLUME` of the volume's size, served by its engine in this process, so the
//! kernel sees the volume without kernel NBD: `losetup --direct-io=on -f --show DIR/VOLUME`
//! gives a block device to format and mount (`docs/frontends.md`).
//!
//! * Reads and writes go to the engine as they come: the session's thread only parses
//!   requests and hands each to the data runtime, which replies when the engine answers, so many
//!   requests are in flight at once (no lock is held across a request).
//! * Files are opened with `direct_io`: the kernel keeps no page cache of its own for them (the
//!   loop device or the filesystem above has one), so a write reaches the engine before it is
//!   acknowledged, and `fsync` is the engine's FLUSH (durable on every member).
//! * A file's size is read from the engine at every `getattr` (attributes are not cached), so
//!   a volume that grows shows its new size at once (`losetup -c` then tells the loop device).
//! * Discard (`fallocate` punching a hole) is a trim, zeroing a range is WRITE_ZEROES; every
//!   other change of a file's shape (truncate, other fallocate modes) is refused: a volume's size
//!   changes only through `zebu volume expand`.
//! * The mount goes with the agent: unmounted at a clean stop, by `fusermount3`'s auto-unmount
//!   after a kill, and a stale one left anyway is cleared at the next start. A detached
//!   volume's file disappears, and I/O on a descriptor still open to it fails with EIO.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use zebu_engine::Engine;

/// Largest read or write the kernel sends in one request.
const MAX_IO: u32 = 1 << 20;

#[derive(Default)]
struct Files {
    /// Volume name -> (inode, engine) of the volumes served now.
    by_name: BTreeMap<String, (u64, Arc<Engine>)>,
    /// Every volume's inode, kept while the agent runs: an engine started again for a volume
    /// (after a failure) serves the same file, so a loop device open on it goes on working.
    inos: std::collections::HashMap<String, u64>,
    next_ino: u64,
}

impl Files {
    fn by_ino(&self, ino: u64) -> Option<(&str, &Arc<Engine>)> {
        self.by_name
            .iter()
            .find(|(_, (i, _))| *i == ino)
            .map(|(n, (_, e))| (n.as_str(), e))
    }
}

/// The mounted frontend. Dropping it unmounts the directory.
pub struct FuseFrontend {
    dir: PathBuf,
    files: Arc<RwLock<Files>>,
    _session: fuser::BackgroundSession,
}

impl FuseFrontend {
    /// Mount the frontend on `dir` (created if missing; a stale mount left by an agent that was
    /// killed is unmounted first). Requests run on `rt`.
    pub fn mount(dir: &Path, rt: tokio::runtime::Handle) -> std::io::Result<FuseFrontend> {
        if is_mount_point(dir) {
            // A mount whose process died ("transport endpoint is not connected").
            let _ = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(dir)
                .status();
        }
        std::fs::create_dir_all(dir)?;
        let files = Arc::new(RwLock::new(Files {
            next_ino: 2,
            ..Default::default()
        }));
        let fs = Fs {
            files: files.clone(),
            rt,
            started: SystemTime::now(),
        };
        let mut cfg = fuser::Config::default();
        cfg.mount_options.extend([
            MountOption::FSName("zebu".into()),
            MountOption::Subtype("zebu".into()),
            MountOption::AutoUnmount,
            MountOption::DefaultPermissions,
        ]);
        cfg.acl = fuser::SessionACL::All;
        // Two threads read requests, each on its own cloned /dev/fuse descriptor.
        cfg.n_threads = Some(2);
        cfg.clone_fd = true;
        let session = fuser::spawn_mount2(fs, dir, &cfg)?;
        Ok(FuseFrontend {
            dir: absolute(dir),
            files,
            _session: session,
        })
    }

    /// The mount point (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Serve `engine`'s volume as a file.
    pub fn add(&self, engine: Arc<Engine>) {
        let mut f = self.files.write().unwrap_or_else(|p| p.into_inner());
        let name = engine.volume().to_owned();
        let ino = match f.inos.get(&name) {
            Some(i) => *i,
            None => {
                let i = f.next_ino;
                f.next_ino += 1;
                f.inos.insert(name.clone(), i);
                i
            }
        };
        f.by_name.insert(name, (ino, engine));
    }

    /// Stop serving `volume`'s file.
    pub fn remove(&self, volume: &str) {
        let mut f = self.files.write().unwrap_or_else(|p| p.into_inner());
        f.by_name.remove(volume);
    }

    /// Unmount now (lazily: a loop device may still hold a file), at a clean stop. (After a
    /// kill, `fusermount3`'s auto-unmount does it; on a clean exit it was seen not to, and a
    /// stale mount left anyway is cleared at the next start.)
    pub fn unmount(&self) {
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .by_name
            .clear();
        match std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.dir)
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                tracing::warn!(dir = %self.dir.display(), "unmounting the FUSE frontend: {}", String::from_utf8_lossy(&o.stderr).trim())
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "unmounting the FUSE frontend: fusermount3: {e}")
            }
        }
    }
}

/// `dir` made absolute without looking inside it (a stale mount answers nothing there).
fn absolute(dir: &Path) -> PathBuf {
    match (dir.parent(), dir.file_name()) {
        (Some(p), Some(n)) => std::fs::canonicalize(if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        })
        .map(|p| p.join(n))
        .unwrap_or_else(|_| dir.to_owned()),
        _ => dir.to_owned(),
    }
}

fn is_mount_point(dir: &Path) -> bool {
    let want = absolute(dir);
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .any(|m| Path::new(m) == want)
}

struct Fs {
    files: Arc<RwLock<Files>>,
    rt: tokio::runtime::Handle,
    started: SystemTime,
}

impl Fs {
    fn engine(&self, ino: INodeNo) -> Option<Arc<Engine>> {
        let f = self.files.read().unwrap_or_else(|p| p.into_inner());
        f.by_ino(u64::from(ino)).map(|(_, e)| e.clone())
    }

    fn attr(&self, ino: u64, size: u64, dir: bool) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o600 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

/// How an engine's error reaches the kernel.
fn errno(e: &zebu_engine::EngineError) -> Errno {
    match e {
        // Past the end of a block device: what the kernel says for one.
        zebu_engine::EngineError::OutOfRange { .. } => Errno::ENOSPC,
        zebu_engine::EngineError::NoSpace { .. } => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(128);
        // Asynchronous direct I/O: the loop device's many requests in flight reach us as many
        // requests, not one at a time.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let f = self.files.read().unwrap_or_else(|p| p.into_inner());
        match name.to_str().and_then(|n| f.by_name.get(n)) {
            Some((ino, e)) => reply.entry(
                &Duration::ZERO,
                &self.attr(*ino, e.size_bytes(), false),
                fuser::Generation(0),
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&Duration::ZERO, &self.attr(1, 0, true));
        }
        match self.engine(ino) {
            Some(e) => reply.attr(
                &Duration::ZERO,
                &self.attr(u64::from(ino), e.size_bytes(), false),
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(e) = self.engine(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // A volume's size changes only through `zebu volume expand` (an open with O_TRUNC, or
        // a truncate to its own size, changes nothing and is allowed).
        if size.is_some_and(|s| s != e.size_bytes()) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(
            &Duration::ZERO,
            &self.attr(u64::from(ino), e.size_bytes(), false),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.engine(ino).is_none() {
            return reply.error(Errno::ENOENT);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(e) = self.engine(ino) else {
            return reply.error(Errno::EIO);
        };
        let end = e.size_bytes();
        let len = (u64::from(size)).min(end.saturating_sub(offset)) as u32;
        if len == 0 {
            return reply.data(&[]);
        }
        self.rt.spawn(async move {
            match e.read(offset, len).await {
                Ok(data) => reply.data(&data),
                Err(err) => {
                    tracing::warn!(volume = %e.volume(), "FUSE read at {offset}+{len}: {err}");
                    reply.error(errno(&err))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(e) = self.engine(ino) else {
            return reply.error(Errno::EIO);
        };
        let len = data.len() as u32;
        let data = Bytes::copy_from_slice(data);
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        self.rt.spawn(async move {
            match e.write(offset, data, fua).await {
                Ok(()) => reply.written(len),
                Err(err) => {
                    tracing::warn!(volume = %e.volume(), "FUSE write at {offset}+{len}: {err}");
                    reply.error(errno(&err))
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): nothing is cached here; durability is fsync's.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(e) = self.engine(ino) else {
            return reply.error(Errno::EIO);
        };
        self.rt.spawn(async move {
            match e.flush().await {
                Ok(()) => reply.ok(),
                Err(err) => {
                    tracing::warn!(volume = %e.volume(), "FUSE fsync: {err}");
                    reply.error(errno(&err))
                }
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(e) = self.engine(ino) else {
            return reply.error(Errno::EIO);
        };
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let trim = if mode == punch {
            true
        } else if mode == libc::FALLOC_FL_ZERO_RANGE
            || mode == libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        {
            false
        } else if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
            // Allocation: every block of a volume can be written already.
            return if offset.saturating_add(length) <= e.size_bytes() {
                reply.ok()
            } else {
                reply.error(Errno::EPERM)
            };
        } else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        self.rt.spawn(async move {
            match e.zero(offset, length, trim, false).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let f = self.files.read().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (1, FileType::Directory, ".".into()),
            (1, FileType::Directory, "..".into()),
        ];
        entries.extend(
            f.by_name
                .iter()
                .map(|(n, (i, _))| (*i, FileType::RegularFile, n.clone())),
        );
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let f = self.files.read().unwrap_or_else(|p| p.into_inner());
        let bytes: u64 = f.by_name.values().map(|(_, e)| e.size_bytes()).sum();
        reply.statfs(
            bytes / 4096,
            0,
            0,
            f.by_name.len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }
}
