//! The cluster id: which cluster a manager's records and an agent's replicas belong to. Kept in
//! `DATA_DIR/cluster.id` on the manager and on every agent (32 lowercase hex digits and a
//! newline), written once, crash-safely, and never changed.

use std::path::{Path, PathBuf};

pub const FILE: &str = "cluster.id";

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

pub fn is_valid(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The id in `data_dir`, `None` when there is no file. A file that does not hold an id is an
/// error naming it.
pub fn read(data_dir: &Path) -> Result<Option<String>, String> {
    let p = path(data_dir);
    match std::fs::read_to_string(&p) {
        Ok(s) if is_valid(s.trim()) => Ok(Some(s.trim().to_owned())),
        Ok(s) => Err(format!(
            "{} does not hold a cluster id (32 hex digits) but {:?}: it is damaged; write the cluster's id into it (the manager's {} has it)",
            p.display(),
            s.chars().take(64).collect::<String>(),
            FILE
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

/// Write `id` into `data_dir` durably: a temporary file, fsync, rename, fsync of the directory.
pub fn write(data_dir: &Path, id: &str) -> Result<(), String> {
    let p = path(data_dir);
    crate::durable::write_file(&p, &format!("{id}\n"), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", p.display()))
}
