//! The clone mark: a small file in a replica's directory, `clone-source.json`, saying the
//! replica belongs to a clone whose copy from a snapshot of another volume is not done
//! (`docs/formats.md`, "Clone mark"). It is written when the manager first hands the replica
//! out as a clone's and removed only when the manager says the clone is done, so a manager
//! rebuilt from the agents' disks (`--recover-from-agents`) learns the clone is not finished
//! (its unread blocks are the source's, not zeroes), and an engine started without the source
//! on this node is refused.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use zebu_api::SnapshotRef;

pub const FILE: &str = "clone-source.json";
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Mark {
    format: u32,
    volume: String,
    snapshot: String,
    /// crc32c of `volume/snapshot`.
    crc32c: u32,
}

fn crc(volume: &str, snapshot: &str) -> u32 {
    crc32c::crc32c(format!("{volume}/{snapshot}").as_bytes())
}

/// The mark in `dir`, if any. A file that does not parse, of another format or whose checksum
/// fails is an error naming it (never taken as "no mark").
pub fn read(dir: &Path) -> Result<Option<SnapshotRef>, String> {
    let path = dir.join(FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let m: Mark = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not a clone mark: {e}", path.display()))?;
    if m.format != FORMAT {
        return Err(format!(
            "{} has format {}, this agent knows {FORMAT}; run a newer zebu",
            path.display(),
            m.format
        ));
    }
    if m.crc32c != crc(&m.volume, &m.snapshot) {
        return Err(format!(
            "{} fails its checksum; it says the replica is a clone of {}/{} not yet copied",
            path.display(),
            m.volume,
            m.snapshot
        ));
    }
    Ok(Some(SnapshotRef {
        volume: m.volume,
        snapshot: m.snapshot,
    }))
}

/// Write the mark durably (a temporary file, synced, renamed, the directory synced).
pub fn write(dir: &Path, src: &SnapshotRef) -> std::io::Result<()> {
    let m = Mark {
        format: FORMAT,
        volume: src.volume.clone(),
        snapshot: src.snapshot.clone(),
        crc32c: crc(&src.volume, &src.snapshot),
    };
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(&m).expect("a mark serializes"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Remove the mark durably (nothing to do if there is none).
pub fn remove(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(FILE)) {
        Ok(()) => std::fs::File::open(dir)?.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_reads_back_and_a_damaged_one_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), None);
        let src = SnapshotRef {
            volume: "src".into(),
            snapshot: "s1".into(),
        };
        write(d.path(), &src).unwrap();
        assert_eq!(read(d.path()).unwrap(), Some(src));
        let p = d.path().join(FILE);
        let t = std::fs::read_to_string(&p).unwrap().replace("s1", "s2");
        std::fs::write(&p, t).unwrap();
        assert!(read(d.path()).unwrap_err().contains("checksum"));
        std::fs::write(&p, "{").unwrap();
        assert!(read(d.path()).unwrap_err().contains("not a clone mark"));
        remove(d.path()).unwrap();
        assert_eq!(read(d.path()).unwrap(), None);
        remove(d.path()).unwrap();
    }
}
