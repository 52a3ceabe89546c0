//! `DATA_DIR/node.token`: the token the manager gave this node when it joined (see the manager's
//! `state/node_tokens.rs`). Written crash-safely (temporary file, fsync, rename, fsync of the
//! directory), readable by its owner only.

use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "node.token";

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// A token as the manager makes them: 64 hexadecimal digits.
pub fn is_valid(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The node's token, if it has one. A file that is there but unreadable or not a token is an
/// error naming it.
pub fn read(data_dir: &Path) -> Result<Option<String>, String> {
    let p = path(data_dir);
    match std::fs::read_to_string(&p) {
        Ok(s) if is_valid(s.trim()) => Ok(Some(s.trim().to_owned())),
        Ok(_) => Err(format!(
            "{} does not hold a node token (64 hexadecimal digits); delete it to register the node again with the shared agent token (after `zebu node delete` of this node if the manager knows it)",
            p.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

pub fn write(data_dir: &Path, token: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = path(data_dir);
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", p.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(format!("{token}\n").as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, &p).map_err(fail)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}
