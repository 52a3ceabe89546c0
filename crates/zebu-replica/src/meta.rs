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
/// Written by this build; versions 1 (no epoch) and 2 (a chain, no tree) are still read.
pub const META_FORMAT_VERSION: u32 = 3;
/// Fixed part before the names: version 1 has no epoch field.
const FIXED_BYTES_V1: usize = 40;
const FIXED_BYTES: usize = 48;
/// Layers a replica may have (the merged map tags blocks with 24-bit slots: far above this).
pub const MAX_LAYERS: u32 = 65_536;
const MAX_NAME: usize = 255;
/// Labels one snapshot may carry.
pub const MAX_LABELS: usize = 64;

/// Layer flag: the live head, the one layer that takes writes (exactly one has it).
pub const LAYER_HEAD: u16 = 1;
/// Layer flag: a system snapshot (made by Zebu for its own work; `purge` removes them).
pub const LAYER_SYSTEM: u16 = 2;
/// Layer flag: the snapshot was deleted; its data serves its descendants until it is merged.
pub const LAYER_REMOVED: u16 = 4;
const LAYER_KNOWN_FLAGS: u16 = LAYER_HEAD | LAYER_SYSTEM | LAYER_REMOVED;

/// One layer of the tree. Layer files are `layer-<id as 16 hex digits>.{data,idx}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayerMeta {
    pub id: u64,
    /// The layer below (0: none, the root).
    pub parent: u64,
    /// Unix seconds when the layer was created (for a snapshot: when it was taken).
    pub created_unix: u64,
    /// `LAYER_*` bits.
    pub flags: u16,
    /// Snapshot name for frozen layers; empty for the live head.
    pub name: String,
    /// Snapshot labels, `key=value`, in the order given.
    pub labels: Vec<(String, String)>,
}

impl LayerMeta {
    pub fn is_head(&self) -> bool {
        self.flags & LAYER_HEAD != 0
    }
    pub fn is_removed(&self) -> bool {
        self.flags & LAYER_REMOVED != 0
    }
    pub fn is_system(&self) -> bool {
        self.flags & LAYER_SYSTEM != 0
    }
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
    /// Every layer, in increasing id order (older first); one of them is the head.
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
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        for l in &self.layers {
            out.extend_from_slice(&l.id.to_le_bytes());
            out.extend_from_slice(&l.parent.to_le_bytes());
            out.extend_from_slice(&l.created_unix.to_le_bytes());
            out.extend_from_slice(&l.flags.to_le_bytes());
            put_str(&mut out, &l.name);
            out.extend_from_slice(&(l.labels.len() as u16).to_le_bytes());
            for (k, v) in &l.labels {
                put_str(&mut out, k);
                put_str(&mut out, v);
            }
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
            2 | META_FORMAT_VERSION => FIXED_BYTES,
            _ => return Err(format!("format version {version} is not supported (this build reads 1 to {META_FORMAT_VERSION})")),
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
        let mut layers: Vec<LayerMeta> = Vec::with_capacity(nlayers.min(1024) as usize);
        for i in 0..nlayers {
            let mut l = LayerMeta::default();
            if version < 3 {
                // A chain: each layer's parent is the one before it, the last is the head.
                if at + 18 > body.len() {
                    return Err("truncated layer list".into());
                }
                l.id = u64_at(at);
                l.created_unix = u64_at(at + 8);
                let nlen = u16_at(at + 16) as usize;
                at += 18;
                l.name = take_str(nlen, &mut at)?;
                l.parent = layers.last().map_or(0, |p| p.id);
                if i + 1 == nlayers {
                    l.flags = LAYER_HEAD;
                }
            } else {
                if at + 28 > body.len() {
                    return Err("truncated layer list".into());
                }
                l.id = u64_at(at);
                l.parent = u64_at(at + 8);
                l.created_unix = u64_at(at + 16);
                l.flags = u16_at(at + 24);
                let nlen = u16_at(at + 26) as usize;
                at += 28;
                l.name = take_str(nlen, &mut at)?;
                if at + 2 > body.len() {
                    return Err("truncated layer list".into());
                }
                let nlabels = u16_at(at) as usize;
                at += 2;
                if nlabels > MAX_LABELS {
                    return Err(format!(
                        "layer {} has {nlabels} labels, more than {MAX_LABELS}",
                        l.id
                    ));
                }
                for _ in 0..nlabels {
                    let mut pair = [String::new(), String::new()];
                    for part in &mut pair {
                        if at + 2 > body.len() {
                            return Err("truncated label".into());
                        }
                        let n = u16_at(at) as usize;
                        at += 2;
                        *part = take_str(n, &mut at)?;
                    }
                    let [k, v] = pair;
                    l.labels.push((k, v));
                }
            }
            layers.push(l);
        }
        if at != body.len() {
            return Err(format!("{} unexpected trailing bytes", body.len() - at));
        }
        check_tree(&layers)?;
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

/// The rules every layer list obeys (`docs/formats.md`, "Validation").
fn check_tree(layers: &[LayerMeta]) -> Result<(), String> {
    let mut heads = 0;
    let mut names = std::collections::HashSet::new();
    for (i, l) in layers.iter().enumerate() {
        if l.id == 0 || (i > 0 && l.id <= layers[i - 1].id) {
            return Err(format!(
                "layer ids must be non-zero and increasing: {} after {}",
                l.id,
                if i > 0 { layers[i - 1].id } else { 0 }
            ));
        }
        if l.flags & !LAYER_KNOWN_FLAGS != 0 {
            return Err(format!("layer {} has unknown flags {:#x}", l.id, l.flags));
        }
        // Parents are older (smaller ids): the layers form a tree, never a cycle.
        if l.parent >= l.id || (l.parent != 0 && !layers[..i].iter().any(|p| p.id == l.parent)) {
            return Err(format!(
                "layer {} names parent {}, which is not an older layer",
                l.id, l.parent
            ));
        }
        if l.is_head() {
            heads += 1;
            if !l.name.is_empty() || !l.labels.is_empty() || l.flags != LAYER_HEAD {
                return Err(format!(
                    "the head (layer {}) has a name, labels or other flags",
                    l.id
                ));
            }
        } else if !l.is_removed() {
            if l.name.is_empty() {
                return Err(format!("snapshot layer {} has no name", l.id));
            }
            if !names.insert(l.name.as_str()) {
                return Err(format!("two snapshots are named {:?}", l.name));
            }
        }
    }
    if heads != 1 {
        return Err(format!("{heads} layers are marked head, not one"));
    }
    Ok(())
}

impl ReplicaMeta {
    pub fn head(&self) -> &LayerMeta {
        self.layers
            .iter()
            .find(|l| l.is_head())
            .expect("invariant: one layer is the head (checked when decoded or changed)")
    }

    pub fn layer(&self, id: u64) -> Option<&LayerMeta> {
        self.layers.iter().find(|l| l.id == id)
    }

    /// The layers whose parent is `id`.
    pub fn children(&self, id: u64) -> Vec<&LayerMeta> {
        self.layers.iter().filter(|l| l.parent == id).collect()
    }

    /// The ids from `id` down to the root (`id` first).
    pub fn path(&self, id: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut at = self.layer(id);
        while let Some(l) = at {
            out.push(l.id);
            at = (l.parent != 0).then(|| self.layer(l.parent)).flatten();
        }
        out
    }

    /// The snapshot (a frozen layer not removed) of this name.
    pub fn snapshot(&self, name: &str) -> Option<&LayerMeta> {
        self.layers
            .iter()
            .find(|l| !l.is_head() && !l.is_removed() && l.name == name)
    }

    /// Check the layer list after a change (the same rules as on decode).
    pub fn check(&self) -> Result<(), String> {
        check_tree(&self.layers)
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
                    labels: vec![("k".into(), "v".into())],
                    flags: LAYER_SYSTEM,
                    ..Default::default()
                },
                LayerMeta {
                    id: 2,
                    parent: 1,
                    created_unix: 20,
                    flags: LAYER_HEAD,
                    ..Default::default()
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

    /// The bytes today's main (format 2) wrote for a chain: `(id, created, name)`, the last the
    /// head. Written out by hand here, so the reader is checked against the old layout itself.
    fn encode_v2(epoch: u64, layers: &[(u64, u64, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&META_MAGIC);
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&4096u32.to_le_bytes());
        out.extend_from_slice(&(1u64 << 30).to_le_bytes());
        out.extend_from_slice(&9u64.to_le_bytes());
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(&3u16.to_le_bytes());
        out.extend_from_slice(&7u16.to_le_bytes());
        out.extend_from_slice(&(layers.len() as u32).to_le_bytes());
        out.extend_from_slice(b"vol");
        out.extend_from_slice(b"vol-r-1");
        for (id, created, name) in layers {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&created.to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn versions_1_and_2_read_as_a_chain() {
        let v2 = encode_v2(5, &[(1, 10, "snap-a"), (2, 20, "")]);
        let m = ReplicaMeta::decode(&v2).unwrap();
        assert_eq!(m.epoch, 5);
        assert_eq!(m.generation, 9);
        assert_eq!(
            m.layers,
            vec![
                LayerMeta {
                    id: 1,
                    created_unix: 10,
                    name: "snap-a".into(),
                    ..Default::default()
                },
                LayerMeta {
                    id: 2,
                    parent: 1,
                    created_unix: 20,
                    flags: LAYER_HEAD,
                    ..Default::default()
                },
            ]
        );
        // What every replica of today's main holds: one layer, the head.
        let one = ReplicaMeta::decode(&encode_v2(0, &[(1, 10, "")])).unwrap();
        assert_eq!(one.head().id, 1);
        assert_eq!(one.path(1), vec![1]);
        // Version 1: the same without the epoch field at bytes 32..40; it reads as epoch 0.
        let mut v1 = v2[..v2.len() - 4].to_vec();
        v1.drain(32..40);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let old = ReplicaMeta::decode(&v1).unwrap();
        assert_eq!(old.epoch, 0);
        assert_eq!(old.layers, m.layers);
        // Written again, it is version 3 and reads back the same.
        let v3 = m.encode();
        assert_eq!(u32::from_le_bytes(v3[8..12].try_into().unwrap()), 3);
        assert_eq!(ReplicaMeta::decode(&v3).unwrap(), m);
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
    fn a_layer_list_that_is_not_a_tree_is_refused() {
        let base = sample();
        type Change = Box<dyn Fn(&mut ReplicaMeta)>;
        let cases: Vec<(&str, Change)> = vec![
            ("no head", Box::new(|m| m.layers[1].flags = 0)),
            (
                "two heads",
                Box::new(|m| {
                    m.layers[0] = LayerMeta {
                        flags: LAYER_HEAD,
                        ..m.layers[1].clone()
                    }
                }),
            ),
            (
                "a parent that is newer",
                Box::new(|m| m.layers[0].parent = 2),
            ),
            (
                "a parent that is missing",
                Box::new(|m| m.layers[1].parent = 7),
            ),
            ("ids out of order", Box::new(|m| m.layers.swap(0, 1))),
            (
                "a snapshot without a name",
                Box::new(|m| m.layers[0].name.clear()),
            ),
            (
                "a head with a name",
                Box::new(|m| m.layers[1].name = "x".into()),
            ),
            ("unknown flags", Box::new(|m| m.layers[0].flags |= 0x80)),
            (
                "a taken name",
                Box::new(|m| {
                    let mut l = m.layers[0].clone();
                    l.id = 3;
                    l.parent = 1;
                    m.layers.push(l);
                }),
            ),
        ];
        for (what, change) in cases {
            let mut m = base.clone();
            change(&mut m);
            assert!(m.check().is_err(), "{what} was accepted");
            assert!(
                ReplicaMeta::decode(&m.encode()).is_err(),
                "{what} was decoded"
            );
        }
        // A removed snapshot's name may be taken again.
        let mut m = base.clone();
        m.layers[0].flags |= LAYER_REMOVED;
        let mut l = m.layers[0].clone();
        l.id = 3;
        l.parent = 1;
        l.flags = 0;
        m.layers.push(l);
        m.check().unwrap();
        assert_eq!(ReplicaMeta::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.snapshot("snap-a").unwrap().id, 3);
        assert_eq!(m.children(1).len(), 2);
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
        m.layers[0] = LayerMeta {
            id: 1,
            flags: LAYER_HEAD,
            ..Default::default()
        };
        m.store(dir.path()).unwrap();
        assert_eq!(ReplicaMeta::load(dir.path()).unwrap(), m);
    }
}
