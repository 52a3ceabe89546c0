//! Zebu metadata store: a small key-value trait the manager keeps its desired and observed
//! state in, and the embedded backend (redb, one file, ACID, fsync on commit).
//!
//! Values are JSON documents grouped by kind (`volumes`, `replicas`, `nodes`, ...). The trait is
//! deliberately small so an etcd backend (several managers, leader election) fits beside it.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
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

/// Typed helpers over any [`MetaStore`].
pub trait MetaStoreExt: MetaStore {
    fn get<T: DeserializeOwned>(&self, kind: &str, key: &str) -> Result<Option<T>, StoreError> {
        match self.get_raw(kind, key)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError::Decode {
                    kind: kind.into(),
                    key: key.into(),
                    reason: e.to_string(),
                }),
        }
    }
    fn list<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>, StoreError> {
        self.list_raw(kind)?
            .into_iter()
            .map(|(k, b)| {
                serde_json::from_slice(&b).map_err(|e| StoreError::Decode {
                    kind: kind.into(),
                    key: k,
                    reason: e.to_string(),
                })
            })
            .collect()
    }
    fn put<T: Serialize>(&self, kind: &str, key: &str, value: &T) -> Result<(), StoreError> {
        let b = serde_json::to_vec(value).expect("invariant: our records always serialize");
        self.apply(&[(kind, key, Some(b))])
    }
    fn delete(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        self.apply(&[(kind, key, None)])
    }
}

impl<S: MetaStore + ?Sized> MetaStoreExt for S {}

/// The embedded backend: one redb file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Backend {
            path: path.to_owned(),
            op: "open",
            reason: format!("{e} (is another manager using this data directory?)"),
        })?;
        Ok(RedbStore {
            db,
            path: path.to_owned(),
        })
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

    fn list_raw(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
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

    fn apply(&self, changes: &[(&str, &str, Option<Vec<u8>>)]) -> Result<(), StoreError> {
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
