//! `replica.meta`: the replica's identity, size, generation and layer chain.
//!
//! Binary, little-endian, versioned and checksummed (`docs/formats.md`). It is only ever replaced
//! whole and crash-safely: write `replica.meta.tmp`, fsync it, rename it over `replica.meta`,
//! fsync the directory. A reader therefore sees either the old or the new file, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::ReplicaError;

pub const META_FILE: &str = "replica.meta";
const META_TMP_FILE: &str = "replica.meta.tmp";
/// The file being replaced, kept for a moment as the next `replica.meta.tmp`.
const META_OLD_FILE: &str = "replica.meta.old";
pub const META_MAGIC: [u8; 8] = *b"ZEBUMETA";
/// Written by this build; version 1 (no epoch) is still read, as epoch 0.
pub const META_FORMAT_VERSION: u32 = 2;
/// Fixed part before the names: version 1 has no epoch field.
const FIXED_BYTES_V1: usize = 40;
const FIXED_BYTES: usize = 48;
const MAX_LAYERS: u32 = 1024;
const MAX_NAME: usize = 255;

/// One layer of the chain. Layer files are `layer-<id as 16 hex digits>.{data,idx}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMeta {
    pub id: u64,
    /// Unix seconds when the layer was created.
    pub created_unix: u64,
    /// Snapshot name for frozen layers; empty for the live head.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMeta {
    pub volume: String,
    pub replica: String,
    pub size_bytes: u64,
    pub block_size: u32,
    /// Raised by the engine whenever the replica set changes; the freshest replica has the
    /// highest generation.
    pub generation: u64,
    /// The highest engine epoch this replica has accepted (the fence): sessions of a lower
    /// epoch are refused. Never lowered.
    pub epoch: u64,
    /// Bottom (oldest) first; the last layer is the live head that takes writes.
    pub layers: Vec<LayerMeta>,
}

impl ReplicaMeta {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&META_MAGIC);
        out.extend_from_slice(&META_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.size_bytes.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&(self.volume.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.replica.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.layers.len() as u32).to_le_bytes());
        out.extend_from_slice(self.volume.as_bytes());
        out.extend_from_slice(self.replica.as_bytes());
        for l in &self.layers {
            out.extend_from_slice(&l.id.to_le_bytes());
            out.extend_from_slice(&l.created_unix.to_le_bytes());
            out.extend_from_slice(&(l.name.len() as u16).to_le_bytes());
            out.extend_from_slice(l.name.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode and validate; `Err(reason)` says what is wrong with the bytes.
    pub fn decode(b: &[u8]) -> Result<ReplicaMeta, String> {
        if b.len() < FIXED_BYTES_V1 + 4 {
            return Err(format!(
                "file is {} bytes, shorter than the {} byte minimum",
                b.len(),
                FIXED_BYTES_V1 + 4
            ));
        }
        if b[0..8] != META_MAGIC {
            return Err("bad magic: not a Zebu replica metadata file".into());
        }
        let body = &b[..b.len() - 4];
        let crc = u32::from_le_bytes(b[b.len() - 4..].try_into().expect("4 bytes"));
        if crc32c::crc32c(body) != crc {
            return Err("checksum mismatch: the file is damaged".into());
        }
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        let fixed = match version {
            1 => FIXED_BYTES_V1,
            META_FORMAT_VERSION => FIXED_BYTES,
            _ => return Err(format!("format version {version} is not supported (this build reads 1 and {META_FORMAT_VERSION})")),
        };
        if body.len() < fixed {
            return Err(format!(
                "file is {} bytes, too short for format version {version}",
                b.len()
            ));
        }
        let block_size = u32_at(12);
        let size_bytes = u64_at(16);
        let generation = u64_at(24);
        let epoch = if version == 1 { 0 } else { u64_at(32) };
        let names_at = fixed - 8;
        let vlen = u16_at(names_at) as usize;
        let rlen = u16_at(names_at + 2) as usize;
        let nlayers = u32_at(names_at + 4);
        if nlayers == 0 || nlayers > MAX_LAYERS {
            return Err(format!(
                "layer count {nlayers} is out of range 1..={MAX_LAYERS}"
            ));
        }
        if block_size < 512
            || !block_size.is_power_of_two()
            || size_bytes == 0
            || size_bytes % block_size as u64 != 0
        {
            return Err(format!(
                "block size {block_size} / size {size_bytes} are inconsistent"
            ));
        }
        let mut at = fixed;
        let take_str = |n: usize, at: &mut usize| -> Result<String, String> {
            if n > MAX_NAME || *at + n > body.len() {
                return Err("truncated or oversized name".into());
            }
            let s = std::str::from_utf8(&body[*at..*at + n])
                .map_err(|_| "name is not UTF-8".to_string())?;
            *at += n;
            Ok(s.to_owned())
        };
        let volume = take_str(vlen, &mut at)?;
        let replica = take_str(rlen, &mut at)?;
        let mut layers = Vec::with_capacity(nlayers as usize);
        for _ in 0..nlayers {
            if at + 18 > body.len() {
                return Err("truncated layer list".into());
            }
            let id = u64_at(at);
            let created_unix = u64_at(at + 8);
            let nlen = u16_at(at + 16) as usize;
            at += 18;
            let name = take_str(nlen, &mut at)?;
            layers.push(LayerMeta {
                id,
                created_unix,
                name,
            });
        }
        if at != body.len() {
            return Err(format!("{} unexpected trailing bytes", body.len() - at));
        }
        Ok(ReplicaMeta {
            volume,
            replica,
            size_bytes,
            block_size,
            generation,
            epoch,
            layers,
        })
    }

    pub fn load(dir: &Path) -> Result<ReplicaMeta, ReplicaError> {
        let path = dir.join(META_FILE);
        let bytes = fs::read(&path).map_err(|e| ReplicaError::io("read metadata", &path, 0, e))?;
        ReplicaMeta::decode(&bytes).map_err(|reason| ReplicaError::BadMeta { path, reason })
    }

    /// Replace `replica.meta` crash-safely.
    ///
    /// The new file is written into `replica.meta.tmp`, which is normally the file the last
    /// replacement replaced: the current file is kept by a second link (`replica.meta.old`)
    /// across the rename and then becomes the next `replica.meta.tmp`, so its blocks are never
    /// freed, and raising the generation needs no new disk space (a replica whose disk is
    /// full still raises it). Without one (the first replacement), the file is created.
    pub fn store(&self, dir: &Path) -> Result<(), ReplicaError> {
        let tmp = dir.join(META_TMP_FILE);
        let old = dir.join(META_OLD_FILE);
        let path = dir.join(META_FILE);
        let bytes = self.encode();
        // A crash before the last rename may have left the spare as `.old` only (the live file
        // has another inode): it becomes the spare again, rather than a new file that needs
        // space while `.old` still holds some.
        if !tmp.exists() {
            use std::os::unix::fs::MetadataExt;
            let ino = |p: &Path| fs::metadata(p).map(|m| m.ino()).ok();
            if ino(&old).is_some() && ino(&old) != ino(&path) {
                let _ = fs::rename(&old, &tmp);
            }
        }
        let write = || -> std::io::Result<bool> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            // Cut what an older, longer content left; frees space, never needs any.
            f.set_len(bytes.len() as u64)?;
            f.sync_all()?;
            let _ = fs::remove_file(&old);
            let kept = path.exists() && fs::hard_link(&path, &old).is_ok();
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()?;
            Ok(kept)
        };
        let kept = write().map_err(|e| ReplicaError::io("replace metadata", &path, 0, e))?;
        // The new file is durable: keeping the old one's space is best effort. Never read; a
        // crash may leave it under either name (see above).
        if kept {
            if let Err(e) = fs::rename(&old, &tmp) {
                tracing::warn!(path = %old.display(), "keeping the replaced metadata file's space for the next replacement: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReplicaMeta {
        ReplicaMeta {
            volume: "vol".into(),
            replica: "vol-r-1".into(),
            size_bytes: 1 << 30,
            block_size: 4096,
            generation: 9,
            epoch: 5,
            layers: vec![
                LayerMeta {
                    id: 1,
                    created_unix: 10,
                    name: "snap-a".into(),
                },
                LayerMeta {
                    id: 2,
                    created_unix: 20,
                    name: String::new(),
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_damage_is_detected() {
        let m = sample();
        let b = m.encode();
        assert_eq!(ReplicaMeta::decode(&b).unwrap(), m);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(
                ReplicaMeta::decode(&bad).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
        assert!(ReplicaMeta::decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn version_1_reads_as_epoch_0() {
        let m = sample();
        let v2 = m.encode();
        // Version 1: the same without the epoch field at bytes 32..40.
        let mut v1 = v2[..v2.len() - 4].to_vec();
        v1.drain(32..40);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let old = ReplicaMeta::decode(&v1).unwrap();
        assert_eq!(old.epoch, 0);
        assert_eq!(old.generation, m.generation);
        assert_eq!(old.layers, m.layers);
        // Unknown versions are refused.
        let mut v9 = v2[..v2.len() - 4].to_vec();
        v9[8..12].copy_from_slice(&9u32.to_le_bytes());
        let crc = crc32c::crc32c(&v9);
        v9.extend_from_slice(&crc.to_le_bytes());
        assert!(ReplicaMeta::decode(&v9)
            .unwrap_err()
            .contains("not supported"));
    }

    #[test]
    fn store_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample();
        m.store(dir.path()).unwrap();
        m.generation = 10;
        m.store(dir.path()).unwrap();
        assert_eq!(ReplicaMeta::load(dir.path()).unwrap().generation, 10);
        // The replaced file is kept as the next one's space: the same inode comes back.
        use std::os::unix::fs::MetadataExt;
        let before = std::fs::metadata(dir.path().join(META_FILE)).unwrap().ino();
        m.generation = 11;
        m.store(dir.path()).unwrap();
        let spare = std::fs::metadata(dir.path().join(META_TMP_FILE))
            .unwrap()
            .ino();
        assert_eq!(spare, before);
        assert!(!dir.path().join(META_OLD_FILE).exists());
        // A crash before the last rename left the spare as `.old`: it is used again.
        std::fs::rename(
            dir.path().join(META_TMP_FILE),
            dir.path().join(META_OLD_FILE),
        )
        .unwrap();
        m.generation = 12;
        m.store(dir.path()).unwrap();
        let live = std::fs::metadata(dir.path().join(META_FILE)).unwrap().ino();
        assert_eq!(
            live, spare,
            "the spare left as .old must be written, not a new file"
        );
        assert_eq!(ReplicaMeta::load(dir.path()).unwrap().generation, 12);
        // A shorter file after a longer one: nothing of the longer one is left.
        m.layers.truncate(1);
        m.store(dir.path()).unwrap();
        assert_eq!(ReplicaMeta::load(dir.path()).unwrap(), m);
    }
}
