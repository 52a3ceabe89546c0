//! `zebu volume create NAME --from FILE|NBD-URI`: a new volume with another image's content.
//!
//! The source is opened and sized before anything is created, so a source that cannot be read
//! changes nothing. The new volume is attached (to `--node`, or where the manager places it),
//! written over NBD, flushed, read back and compared (sha256 of the whole content) and
//! detached. Holes stay holes: ranges a file does not hold (SEEK_DATA/SEEK_HOLE) and blocks
//! that read as zeroes are not written, so the volume holds them as never-written blocks
//! (zeroes, reported as holes by BLOCK_STATUS). If the copy or the check fails, the volume
//! made for it is deleted again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use zebu_api::{ApiClient, CreateVolume, Volume, VolumeState};

use crate::nbd_client::{self, Client};
use crate::size::human;

/// Bytes per request.
const CHUNK: usize = 1 << 20;
/// Requests in flight to the volume.
const WINDOW: usize = 32;
/// The volume's block: writes are whole blocks, and its size a whole number of them.
const BLOCK: u64 = 4096;

/// What an import reads from.
pub enum Source {
    File { file: File, size: u64, name: String },
    Nbd { client: Client, name: String },
}

impl Source {
    /// Open `from` (a path, or an NBD URI) and learn its size; nothing else is done.
    pub fn open(from: &str) -> anyhow::Result<Source> {
        if nbd_client::is_uri(from) {
            let uri = nbd_client::parse_uri(from).map_err(anyhow::Error::msg)?;
            let client = Client::connect(&uri)
                .with_context(|| format!("cannot read the import source {from}"))?;
            return Ok(Source::Nbd {
                client,
                name: from.to_owned(),
            });
        }
        let path = Path::new(from);
        let file =
            File::open(path).with_context(|| format!("cannot read the import source {from}"))?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            bail!("the import source {from} is a directory, not an image");
        }
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            // A block device: its size is where its end is.
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0))?
        };
        Ok(Source::File {
            file,
            size,
            name: from.to_owned(),
        })
    }

    pub fn size(&self) -> u64 {
        match self {
            Source::File { size, .. } => *size,
            Source::Nbd { client, .. } => client.size(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Source::File { name, .. } | Source::Nbd { name, .. } => name,
        }
    }

    /// The next range at or after `from` that may hold data, or None: a file's data ranges
    /// (SEEK_DATA / SEEK_HOLE), an NBD export's whole rest.
    fn next_data(&self, from: u64) -> Option<(u64, u64)> {
        let size = self.size();
        if from >= size {
            return None;
        }
        match self {
            Source::Nbd { .. } => Some((from, size)),
            Source::File { file, .. } => {
                let fd = file.as_raw_fd();
                // SAFETY: lseek on a descriptor this File owns.
                let start = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
                if start < 0 {
                    let e = std::io::Error::last_os_error();
                    return match e.raw_os_error() {
                        Some(libc::ENXIO) => None,
                        // No hole support here: all of it is data.
                        _ => Some((from, size)),
                    };
                }
                let start = start as u64;
                // SAFETY: as above.
                let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
                let end = if end < 0 {
                    size
                } else {
                    (end as u64).min(size)
                };
                Some((start, end))
            }
        }
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        match self {
            Source::File { file, name, .. } => file
                .read_exact_at(buf, offset)
                .with_context(|| format!("reading {name} at {offset}")),
            Source::Nbd { client, name } => {
                client.submit_read(offset, buf.len() as u32)?;
                let (_, data) = client
                    .complete()
                    .with_context(|| format!("reading {name} at {offset}"))?;
                buf.copy_from_slice(&data);
                Ok(())
            }
        }
    }
}

pub(crate) fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// What the copy did.
pub struct Copied {
    pub data_bytes: u64,
    pub hole_bytes: u64,
    pub sha256: String,
}

fn hash_zeroes(h: &mut Sha256, mut n: u64) {
    static ZERO: [u8; 65536] = [0; 65536];
    while n > 0 {
        let k = n.min(ZERO.len() as u64) as usize;
        h.update(&ZERO[..k]);
        n -= k as u64;
    }
}

/// Where a copy writes.
pub trait Sink {
    /// Write `data` at `at` (it may be left in flight until [`Sink::finish`]).
    fn write_at(&mut self, at: u64, data: &[u8]) -> anyhow::Result<()>;
    /// Make `len` bytes at `at` read as zeroes (a hole where the sink can).
    fn zero_at(&mut self, at: u64, len: u64) -> anyhow::Result<()>;
    /// Everything written is durable.
    fn finish(&mut self) -> anyhow::Result<()>;
    /// The sha256 of the sink's first `len` bytes, read back.
    fn checksum(&mut self, len: u64) -> anyhow::Result<String>;
}

/// An NBD export as a sink. `fresh`: it reads as zeroes already (a new volume), so zero ranges
/// need no request at all.
pub struct NbdSink {
    pub client: Client,
    pub fresh: bool,
}

impl Sink for NbdSink {
    fn write_at(&mut self, at: u64, data: &[u8]) -> anyhow::Result<()> {
        self.client.submit_write(at, data)?;
        while self.client.in_flight() >= WINDOW {
            self.client.complete().context("writing")?;
        }
        Ok(())
    }
    fn zero_at(&mut self, at: u64, len: u64) -> anyhow::Result<()> {
        if self.fresh || len == 0 {
            return Ok(());
        }
        self.client.submit_zero(at, len)?;
        while self.client.in_flight() >= WINDOW {
            self.client.complete().context("writing zeroes")?;
        }
        Ok(())
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        self.client.flush().context("flushing")
    }
    fn checksum(&mut self, len: u64) -> anyhow::Result<String> {
        checksum(&mut self.client, len)
    }
}

/// A new file as a sink: zero ranges stay holes.
pub struct FileSink {
    pub file: File,
}

impl Sink for FileSink {
    fn write_at(&mut self, at: u64, data: &[u8]) -> anyhow::Result<()> {
        Ok(self.file.write_all_at(data, at)?)
    }
    fn zero_at(&mut self, _at: u64, _len: u64) -> anyhow::Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(self.file.sync_all()?)
    }
    fn checksum(&mut self, len: u64) -> anyhow::Result<String> {
        let bar = progress(len, "verifying");
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHUNK as u64) as usize;
            self.file.read_exact_at(&mut buf[..n], at)?;
            hash.update(&buf[..n]);
            at += n as u64;
            bar.set_position(at);
        }
        bar.finish_and_clear();
        Ok(hex(&hash.finalize()))
    }
}

/// Copy `src` to the start of `dst`, skipping holes and zero blocks (made zero in `dst`, which
/// costs nothing where it is new); returns what it did and the sha256 of the source's whole
/// content.
pub fn copy(src: &mut Source, dst: &mut dyn Sink, what: &str) -> anyhow::Result<Copied> {
    let size = src.size();
    let bar = progress(size, what);
    let mut hash = Sha256::new();
    let (mut data_bytes, mut hole_bytes) = (0u64, 0u64);
    let mut pos = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while pos < size {
        let (start, end) = match src.next_data(pos) {
            // Whole blocks: a data range is widened to the blocks it touches.
            Some((s, e)) => ((s / BLOCK * BLOCK).max(pos), e.div_ceil(BLOCK) * BLOCK),
            None => (size, size),
        };
        let end = end.min(size);
        if start > pos {
            dst.zero_at(pos, start - pos)?;
            hash_zeroes(&mut hash, start - pos);
            hole_bytes += start - pos;
            pos = start;
            bar.set_position(pos);
        }
        while pos < end {
            let n = ((end - pos) as usize).min(CHUNK);
            src.read_at(&mut buf[..n], pos)?;
            hash.update(&buf[..n]);
            // Runs of blocks that hold something are written; zero blocks are holes.
            let mut at = 0usize;
            while at < n {
                let block_end = |i: usize| (i + BLOCK as usize).min(n);
                let zeroes = at;
                while at < n && buf[at..block_end(at)].iter().all(|&b| b == 0) {
                    hole_bytes += (block_end(at) - at) as u64;
                    at = block_end(at);
                }
                dst.zero_at(pos + zeroes as u64, (at - zeroes) as u64)?;
                let run = at;
                while at < n && !buf[at..block_end(at)].iter().all(|&b| b == 0) {
                    at = block_end(at);
                }
                if at == run {
                    continue;
                }
                // The last piece of a source that ends inside a block is padded with zeroes
                // (the volume's size is whole blocks, and its rest reads as zeroes).
                let len = at - run;
                let padded = (len as u64).div_ceil(BLOCK) * BLOCK;
                if padded as usize == len {
                    dst.write_at(pos + run as u64, &buf[run..at])?;
                } else {
                    let mut piece = buf[run..at].to_vec();
                    piece.resize(padded as usize, 0);
                    dst.write_at(pos + run as u64, &piece)?;
                }
                data_bytes += len as u64;
            }
            pos += n as u64;
            bar.set_position(pos);
        }
    }
    dst.finish()?;
    bar.finish_and_clear();
    Ok(Copied {
        data_bytes,
        hole_bytes,
        sha256: hex(&hash.finalize()),
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The sha256 of the first `len` bytes of `dst`, read back with many reads in flight.
pub fn checksum(dst: &mut Client, len: u64) -> anyhow::Result<String> {
    let bar = progress(len, "verifying");
    let mut hash = Sha256::new();
    let mut next_send = 0u64;
    let mut next_hash = 0u64;
    let mut by_handle = std::collections::HashMap::new();
    let mut done = std::collections::BTreeMap::new();
    while next_hash < len {
        while next_send < len && dst.in_flight() < WINDOW {
            let n = (len - next_send).min(CHUNK as u64);
            let h = dst.submit_read(next_send, n.div_ceil(BLOCK) as u32 * BLOCK as u32)?;
            by_handle.insert(h, (next_send, n));
            next_send += n;
        }
        let (h, data) = dst.complete().context("reading the volume back")?;
        let (at, n) = by_handle.remove(&h).expect("a handle we sent");
        done.insert(at, (n, data));
        while let Some((n, data)) = done.remove(&next_hash) {
            hash.update(&data[..n as usize]);
            next_hash += n;
            bar.set_position(next_hash);
        }
    }
    bar.finish_and_clear();
    Ok(hex(&hash.finalize()))
}

/// The NBD URI to reach `v` by from here: its unix socket when that is on this machine.
fn reach(v: &Volume) -> anyhow::Result<nbd_client::NbdUri> {
    if let Some(u) = &v.nbd_unix_uri {
        if let Ok(uri) = nbd_client::parse_uri(u) {
            if let nbd_client::Endpoint::Unix(p) = &uri.at {
                if Path::new(p).exists() {
                    return Ok(uri);
                }
            }
        }
    }
    let u = v
        .nbd_uri
        .as_deref()
        .with_context(|| format!("volume {} is attached but shows no NBD URI", v.name))?;
    nbd_client::parse_uri(u).map_err(anyhow::Error::msg)
}

/// Detach and delete a volume made for a copy that failed; says whether it is gone.
pub(crate) async fn take_back(c: &ApiClient, name: &str) -> String {
    let _ = c.detach_volume(name).await;
    let _ = crate::cli::wait_for(c, name, Duration::from_secs(60), |v| {
        v.state == VolumeState::Detached
    })
    .await;
    if c.delete_volume(name).await.is_ok() {
        "the volume made for it was deleted".into()
    } else {
        format!("the volume made for it could not be deleted: delete it with `zebu volume delete {name}`")
    }
}

/// Create `name` from `from`; see the module docs.
pub async fn create_from(
    c: &ApiClient,
    name: &str,
    size: Option<u64>,
    replicas: Option<u32>,
    from: &str,
    node: Option<String>,
) -> anyhow::Result<(Volume, Copied)> {
    let from_owned = from.to_owned();
    let src = tokio::task::spawn_blocking(move || Source::open(&from_owned)).await??;
    let need = src.size().div_ceil(BLOCK) * BLOCK;
    let size_bytes = match size {
        Some(s) if s < src.size() => bail!(
            "--size {} is smaller than the import source {from} ({}): nothing was created",
            human(s),
            human(src.size())
        ),
        Some(s) => s,
        None if need == 0 => bail!("the import source {from} is empty: nothing was created"),
        None => need,
    };
    c.create_volume(&CreateVolume {
        name: name.to_owned(),
        size_bytes,
        replica_count: replicas,
        clone_from: None,
    })
    .await?;
    match fill(c, name, src, node).await {
        Ok(done) => Ok(done),
        Err(e) => {
            // Take back the volume made for this import (nothing else was touched).
            let back = take_back(c, name).await;
            bail!("importing {from} into volume {name} failed: {e:#}; {back}")
        }
    }
}

async fn fill(
    c: &ApiClient,
    name: &str,
    mut src: Source,
    node: Option<String>,
) -> anyhow::Result<(Volume, Copied)> {
    c.attach_volume(name, node).await?;
    let v = crate::cli::wait_for(c, name, Duration::from_secs(90), |v| {
        v.state == VolumeState::Attached
    })
    .await?;
    let uri = reach(&v)?;
    let len = src.size();
    let copied = tokio::task::spawn_blocking(move || -> anyhow::Result<Copied> {
        let dst = Client::connect(&uri)?;
        if dst.read_only() {
            bail!("the volume's export is read-only");
        }
        if dst.size() < len {
            bail!(
                "the volume's export is {} bytes, smaller than the source",
                dst.size()
            );
        }
        let mut sink = NbdSink {
            client: dst,
            fresh: true,
        };
        let copied = copy(&mut src, &mut sink, "importing")?;
        let back = sink.checksum(len)?;
        if back != copied.sha256 {
            bail!(
                "the volume reads back differently from {} (sha256 {back}, source {})",
                src.name(),
                copied.sha256
            );
        }
        sink.client.disconnect();
        Ok(copied)
    })
    .await??;
    c.detach_volume(name).await?;
    let v = crate::cli::wait_for(c, name, Duration::from_secs(60), |v| {
        v.state == VolumeState::Detached
    })
    .await?;
    Ok((v, copied))
}

/// `zebu snapshot export VOLUME SNAP DEST`: write snapshot `snap`'s content to a new file or to
/// an NBD export, holes kept (a file's stay unwritten, an export's get WRITE_ZEROES), then read
/// it back and compare by sha256. The snapshot is read through the volume's engine (its
/// read-only export `VOLUME@SNAP`); a detached volume is attached for it (to `node`, or where
/// the manager places it) and detached again. A destination that cannot be written, a file that
/// exists, or an unknown snapshot changes nothing.
pub async fn export_snapshot(
    c: &ApiClient,
    volume: &str,
    snap: &str,
    dest: &str,
    node: Option<String>,
) -> anyhow::Result<Copied> {
    export_snapshot_to(c, volume, snap, dest, false, node).await
}

/// [`export_snapshot`]; `fresh`: the NBD destination reads as zeroes already (a new volume),
/// so its holes need no request.
async fn export_snapshot_to(
    c: &ApiClient,
    volume: &str,
    snap: &str,
    dest: &str,
    fresh: bool,
    node: Option<String>,
) -> anyhow::Result<Copied> {
    c.get_snapshot(volume, snap).await?;
    let v = c.get_volume(volume).await?;
    let size = v.size_bytes;
    // The destination first: nothing is attached for one that cannot take the data.
    let dest_owned = dest.to_owned();
    let sink: Box<dyn Sink + Send> =
        tokio::task::spawn_blocking(move || -> anyhow::Result<Box<dyn Sink + Send>> {
            let dest = dest_owned;
            if nbd_client::is_uri(&dest) {
                let uri = nbd_client::parse_uri(&dest).map_err(anyhow::Error::msg)?;
                let client = Client::connect(&uri)
                    .with_context(|| format!("cannot write to the export destination {dest}"))?;
                if client.read_only() {
                    bail!("the export destination {dest} is read-only");
                }
                if client.size() < size {
                    bail!(
                        "the export destination {dest} holds {}, less than the volume's {}",
                        human(client.size()),
                        human(size)
                    );
                }
                return Ok(Box::new(NbdSink { client, fresh }));
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&dest)
                .with_context(|| {
                    format!("cannot create the export destination {dest} (it must not exist yet)")
                })?;
            file.set_len(size)?;
            Ok(Box::new(FileSink { file }))
        })
        .await??;
    let file_dest = (!nbd_client::is_uri(dest)).then(|| dest.to_owned());
    let attached_here = v.state != VolumeState::Attached;
    let result = async {
        let v = if attached_here {
            if v.state != VolumeState::Detached {
                bail!(
                    "volume {volume} is {}: try again when it is attached or detached",
                    v.state.as_str()
                );
            }
            c.attach_volume(volume, node).await?;
            crate::cli::wait_for(c, volume, Duration::from_secs(90), |v| {
                v.state == VolumeState::Attached
            })
            .await?
        } else {
            v
        };
        let mut uri = reach(&v)?;
        uri.export = format!("{volume}@{snap}");
        let (what, snap_owned) = (uri.to_string(), snap.to_owned());
        let mut sink = sink;
        tokio::task::spawn_blocking(move || -> anyhow::Result<Copied> {
            let client = Client::connect(&uri)
                .with_context(|| format!("cannot read snapshot {snap_owned} ({what})"))?;
            let mut src = Source::Nbd { client, name: what };
            let copied = copy(&mut src, sink.as_mut(), "exporting")?;
            let back = sink.checksum(size)?;
            if back != copied.sha256 {
                bail!(
                    "the destination reads back differently (sha256 {back}, snapshot {})",
                    copied.sha256
                );
            }
            Ok(copied)
        })
        .await?
    }
    .await;
    if attached_here {
        let _ = c.detach_volume(volume).await;
        let _ = crate::cli::wait_for(c, volume, Duration::from_secs(60), |v| {
            v.state == VolumeState::Detached
        })
        .await;
    }
    match result {
        Ok(copied) => Ok(copied),
        Err(e) => {
            if let Some(f) = file_dest {
                let _ = std::fs::remove_file(&f);
            }
            bail!("exporting snapshot {snap} of volume {volume} to {dest} failed: {e:#}")
        }
    }
}
