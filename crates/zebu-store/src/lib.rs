//! Zebu metadata store: a small key-value trait the manager keeps its desired and observed
//! state in, and the embedded backend (redb, one file, ACID, fsync on commit).
//!
//! Values are JSON documents grouped by kind (`volumes`, `replicas`, `nodes`, ...). The trait is
//! deliberately small so an etcd backend (several managers, leader election) fits beside it.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("metadata store {path}: {op} failed: {reason}")]
    Backend {
        path: PathBuf,
        op: &'static str,
        reason: String,
    },
    #[error("metadata store: record {kind}/{key} is not valid: {reason}")]
    Decode {
        kind: String,
        key: String,
        reason: String,
    },
}

/// A transactional key-value store of JSON documents, grouped by kind.
pub trait MetaStore: Send + Sync {
    fn get_raw(&self, kind: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn list_raw(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Apply puts (`Some`) and deletes (`None`) atomically.
    fn apply(&self, changes: &[(&str, &str, Option<Vec<u8>>)]) -> Result<(), StoreError>;
}

/// The envelope every record is stored in: [`RECORD_MAGIC`], the CRC32C of kind, key and body
/// (each followed by a zero byte), then the JSON body. The store file may be damaged in ways
/// its own library does not see (redb checks its pages only when it recovers from a crash), so
/// each record carries its own check: a record that does not match is refused, never used.
/// Records written before the envelope (bare JSON) are still read.
pub const RECORD_MAGIC: &[u8; 4] = b"ZR1\0";

pub fn encode_record(kind: &str, key: &str, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&record_crc(kind, key, json).to_le_bytes());
    out.extend_from_slice(json);
    out
}

/// The JSON body of a stored record, checked.
pub fn decode_record<'a>(kind: &str, key: &str, stored: &'a [u8]) -> Result<&'a [u8], StoreError> {
    let bad = |reason: String| StoreError::Decode {
        kind: kind.into(),
        key: key.into(),
        reason,
    };
    match stored.strip_prefix(RECORD_MAGIC.as_slice()) {
        Some(rest) if rest.len() >= 4 => {
            let (crc, json) = rest.split_at(4);
            let want = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
            if record_crc(kind, key, json) != want {
                return Err(bad(
                    "its checksum does not match: the store file is damaged".into(),
                ));
            }
            Ok(json)
        }
        Some(_) => Err(bad("it is cut short: the store file is damaged".into())),
        // Written before records had an envelope: bare JSON (an object or a value).
        None => Ok(stored),
    }
}

fn record_crc(kind: &str, key: &str, json: &[u8]) -> u32 {
    let mut c = crc32c::crc32c(kind.as_bytes());
    c = crc32c::crc32c_append(c, &[0]);
    c = crc32c::crc32c_append(c, key.as_bytes());
    c = crc32c::crc32c_append(c, &[0]);
    crc32c::crc32c_append(c, json)
}

/// Typed helpers over any [`MetaStore`].
pub trait MetaStoreExt: MetaStore {
    fn get<T: DeserializeOwned>(&self, kind: &str, key: &str) -> Result<Option<T>, StoreError> {
        match self.get_raw(kind, key)? {
            None => Ok(None),
            Some(b) => decode_json(kind, key, &b).map(Some),
        }
    }
    fn list<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>, StoreError> {
        self.list_raw(kind)?
            .into_iter()
            .map(|(k, b)| decode_json(kind, &k, &b))
            .collect()
    }
    fn put<T: Serialize>(&self, kind: &str, key: &str, value: &T) -> Result<(), StoreError> {
        self.apply(&[(kind, key, Some(encode_json(kind, key, value)))])
    }
    fn delete(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        self.apply(&[(kind, key, None)])
    }
}

/// A record as stored: JSON in its envelope.
pub fn encode_json<T: Serialize>(kind: &str, key: &str, value: &T) -> Vec<u8> {
    let b = serde_json::to_vec(value).expect("invariant: our records always serialize");
    encode_record(kind, key, &b)
}

fn decode_json<T: DeserializeOwned>(kind: &str, key: &str, stored: &[u8]) -> Result<T, StoreError> {
    let json = decode_record(kind, key, stored)?;
    serde_json::from_slice(json).map_err(|e| StoreError::Decode {
        kind: kind.into(),
        key: key.into(),
        reason: e.to_string(),
    })
}

impl<S: MetaStore + ?Sized> MetaStoreExt for S {}

/// The embedded backend: one redb file.
///
/// A damaged file never panics the caller: redb may panic on bytes it does not expect, so every
/// call into it runs under `catch_unwind`, and a panic comes back as [`StoreError::Backend`]
/// naming the file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

thread_local! {
    /// Set while this thread runs inside [`guarded`].
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, turning a panic inside it into a message. Such a panic is not printed (the error
/// that comes back says it); every other panic still goes to the hook that was there before.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                before(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    out.map_err(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        format!("the file is damaged (the store library failed: {what})")
    })
}

impl RedbStore {
    /// Open the store at `path`, creating an empty one if there is no file.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with(path, true)
    }

    /// Open the store at `path`, which must exist and hold a store.
    pub fn open_existing(path: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, create: bool) -> Result<RedbStore, StoreError> {
        let fail = |reason: String| StoreError::Backend {
            path: path.to_owned(),
            op: "open",
            reason,
        };
        if !create {
            match std::fs::metadata(path) {
                Err(e) => return Err(fail(format!("{e}"))),
                Ok(m) if m.len() == 0 => return Err(fail("the file is empty".into())),
                Ok(_) => {}
            }
        }
        let opened = guarded(|| {
            if create {
                Database::create(path)
            } else {
                Database::open(path)
            }
        })
        .map_err(fail)?;
        let db = opened.map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => fail(format!(
                "{e} (is another manager using this data directory?)"
            )),
            e => fail(format!("{e} (the file is damaged or not a Zebu store)")),
        })?;
        let store = RedbStore {
            db,
            path: path.to_owned(),
        };
        // redb checks a page when it reads it: read every table once now, so a damaged store
        // is refused at open rather than at some later request.
        store.check()?;
        Ok(store)
    }

    /// Read every record of every table, and check each one's envelope.
    fn check(&self) -> Result<(), StoreError> {
        let tx = self.begin_read("check")?;
        let tables = guarded(|| tx.list_tables())
            .map_err(|e| self.err("check", e))?
            .map_err(|e| self.err("check", e))?;
        for t in tables {
            let name = t.name().to_owned();
            for (key, stored) in self.list_raw(&name)? {
                let json = decode_record(&name, &key, &stored).map_err(|e| self.err("check", e))?;
                // A record from before the envelope has no check of its own: it must at least
                // be JSON (a damaged envelope reads as such a record, and is not JSON).
                if !stored.starts_with(RECORD_MAGIC) {
                    serde_json::from_slice::<serde_json::Value>(json).map_err(|e| {
                        self.err(
                            "check",
                            format!(
                                "record {name}/{key} is not valid: {e}: the store file is damaged"
                            ),
                        )
                    })?;
                }
            }
        }
        Ok(())
    }

    fn begin_read(&self, op: &'static str) -> Result<redb::ReadTransaction, StoreError> {
        guarded(|| self.db.begin_read().map_err(|e| self.err(op, e)))
            .map_err(|e| self.err(op, e))?
    }

    fn err(&self, op: &'static str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend {
            path: self.path.clone(),
            op,
            reason: e.to_string(),
        }
    }
}

fn table(kind: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(kind)
}

impl MetaStore for RedbStore {
    fn get_raw(&self, kind: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        guarded(|| self.get_raw_unguarded(kind, key)).map_err(|e| self.err("read", e))?
    }

    fn list_raw(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        guarded(|| self.list_raw_unguarded(kind)).map_err(|e| self.err("list", e))?
    }

    fn apply(&self, changes: &[(&str, &str, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        guarded(|| self.apply_unguarded(changes)).map_err(|e| self.err("write", e))?
    }
}

impl RedbStore {
    fn get_raw_unguarded(&self, kind: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err("read", e))?;
        let t = match tx.open_table(table(kind)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err("read", e)),
        };
        Ok(t.get(key)
            .map_err(|e| self.err("read", e))?
            .map(|v| v.value().to_vec()))
    }

    fn list_raw_unguarded(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err("list", e))?;
        let t = match tx.open_table(table(kind)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err("list", e)),
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err("list", e))? {
            let (k, v) = item.map_err(|e| self.err("list", e))?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn apply_unguarded(&self, changes: &[(&str, &str, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err("write", e))?;
        for (kind, key, value) in changes {
            let mut t = tx
                .open_table(table(kind))
                .map_err(|e| self.err("write", e))?;
            match value {
                Some(v) => {
                    t.insert(*key, v.as_slice())
                        .map_err(|e| self.err("write", e))?;
                }
                None => {
                    t.remove(*key).map_err(|e| self.err("write", e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.err("commit", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            assert_eq!(s.get::<u32>("volumes", "a").unwrap(), None);
            s.put("volumes", "a", &1u32).unwrap();
            s.put("volumes", "b", &2u32).unwrap();
            s.delete("volumes", "b").unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.get::<u32>("volumes", "a").unwrap(), Some(1));
        assert_eq!(s.list::<u32>("volumes").unwrap(), vec![1]);
        assert!(s.list::<u32>("nodes").unwrap().is_empty());
    }
}

#[cfg(test)]
mod damage {
    use super::*;

    fn value(i: usize) -> String {
        format!("value {i} {}", "x".repeat(100))
    }

    /// A store of 40 records, and its bytes.
    fn good_store(path: &Path) -> Vec<u8> {
        let s = RedbStore::open(path).unwrap();
        for i in 0..40 {
            s.put("volumes", &format!("v{i:02}"), &value(i)).unwrap();
        }
        drop(s);
        std::fs::read(path).unwrap()
    }

    /// Open the store and read it all: either an error, or exactly the records written.
    fn open_is_refused_or_intact(path: &Path, at: usize) -> bool {
        match RedbStore::open_existing(path) {
            Err(e) => {
                assert!(
                    e.to_string().contains(&path.display().to_string())
                        || matches!(e, StoreError::Decode { .. }),
                    "the error names the file: {e}"
                );
                false
            }
            Ok(s) => match s.list::<String>("volumes") {
                Err(_) => false,
                Ok(mut got) => {
                    got.sort();
                    let mut want: Vec<String> = (0..40).map(value).collect();
                    want.sort();
                    assert_eq!(
                        got, want,
                        "a flipped bit at {at} changed what the store reads"
                    );
                    true
                }
            },
        }
    }

    #[test]
    fn an_empty_truncated_or_missing_store_is_refused_by_open_existing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let good = good_store(&path);
        assert!(open_is_refused_or_intact(&path, 0));
        for len in [0, 1, 4096, good.len() / 2] {
            std::fs::write(&path, &good[..len]).unwrap();
            let e = RedbStore::open_existing(&path).err().expect("refused");
            assert!(e.to_string().contains("meta.redb"), "{e}");
        }
        std::fs::remove_file(&path).unwrap();
        assert!(RedbStore::open_existing(&path).is_err());
        assert!(!path.exists(), "open_existing never creates a store");
    }

    #[test]
    fn a_flipped_bit_is_refused_or_harmless_never_a_different_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let good = good_store(&path);
        // Every byte of the stored records (keys, envelopes, bodies) and around them...
        let mut offsets: Vec<usize> = Vec::new();
        let needle = b"value 7 ";
        let hit = good
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("records are in the file");
        offsets.extend(hit.saturating_sub(600)..(hit + 600).min(good.len()));
        // ...and a spread over the whole file (headers, branch pages, free space).
        offsets.extend((0..good.len()).step_by(4093));
        offsets.extend(0..512);
        let mut refused = 0;
        for at in offsets {
            let mut b = good.clone();
            b[at] ^= 0x10;
            std::fs::write(&path, &b).unwrap();
            if !open_is_refused_or_intact(&path, at) {
                refused += 1;
            }
        }
        assert!(refused > 100, "flips in the records are seen ({refused})");
    }
}
