//! `DATA_DIR/node.token`: the token the manager gave this node when it joined (see the manager's
//! `state/node_tokens.rs`). Written crash-safely (temporary file, fsync, rename, fsync of the
//! directory), readable by its owner only.

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
    let p = path(data_dir);
    crate::durable::write_file(&p, &format!("{token}\n"), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", p.display()))
}
