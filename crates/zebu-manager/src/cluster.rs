//! Opening the manager's store so that it never starts a new cluster over one it held
//! (`docs/hardening.md`, "A manager that cannot forget").

use std::path::Path;

use zebu_api::cluster_id;
use zebu_store::{MetaStore, MetaStoreExt, RedbStore};

use crate::STORE_FILE;

/// Where the store keeps the cluster id.
pub const CLUSTER: &str = "cluster";
pub const ID_KEY: &str = "id";

/// An opened store and the cluster it belongs to.
pub struct Opened {
    pub store: RedbStore,
    /// `None` only when recovering with the whole data directory lost: the id is learned
    /// from the first agent that reports one.
    pub cluster_id: Option<String>,
}

fn new_id() -> String {
    crate::random_hex(16)
}

/// Open (or, in a directory that never held one, create) the store in `dir`.
///
/// `recover`: the store is lost or damaged and is to be rebuilt from the agents; a damaged file
/// is moved aside (never deleted) and an empty store is started with the cluster's id.
pub fn open(dir: &Path, recover: bool) -> anyhow::Result<Opened> {
    let path = dir.join(STORE_FILE);
    let file_id = cluster_id::read(dir).map_err(anyhow::Error::msg)?;
    let id_path = cluster_id::path(dir);
    let exists = path.exists();
    let opened = if exists || file_id.is_some() {
        Some(RedbStore::open_existing(&path))
    } else {
        None
    };
    let stored_id =
        |s: &RedbStore| -> anyhow::Result<Option<String>> { Ok(s.get::<String>(CLUSTER, ID_KEY)?) };
    match (opened, recover) {
        // A directory that never held a cluster.
        (None, false) => {
            let store = RedbStore::open(&path)?;
            let id = new_id();
            // The store first: a crash before the file leaves a store with an id (adopted below).
            store.put(CLUSTER, ID_KEY, &id)?;
            cluster_id::write(dir, &id).map_err(anyhow::Error::msg)?;
            tracing::info!(cluster = %id, "new cluster: its id is in {}", id_path.display());
            Ok(Opened {
                store,
                cluster_id: Some(id),
            })
        }
        (Some(Ok(store)), false) => {
            let id = match (stored_id(&store)?, file_id) {
                (Some(s), Some(f)) if s == f => s,
                (Some(s), Some(f)) => anyhow::bail!(
                    "{} belongs to cluster {s}, but {} says this directory held cluster {f}: the store was replaced by another cluster's. Put this cluster's {STORE_FILE} back, or rebuild its records with `zebu manager --recover-from-agents`",
                    path.display(),
                    id_path.display()
                ),
                (None, Some(f)) => anyhow::bail!(
                    "{} holds no cluster, but {} says this directory held cluster {f}: the store was emptied or replaced. Put the cluster's {STORE_FILE} back from a backup, or rebuild its records from the nodes with `zebu manager --recover-from-agents` (the replicas on the nodes are untouched)",
                    path.display(),
                    id_path.display()
                ),
                // A store from before cluster ids, or a new one whose id file was not written.
                (stored, None) => {
                    let id = match stored {
                        Some(s) => s,
                        None => {
                            let id = new_id();
                            store.put(CLUSTER, ID_KEY, &id)?;
                            id
                        }
                    };
                    cluster_id::write(dir, &id).map_err(anyhow::Error::msg)?;
                    tracing::info!(cluster = %id, "cluster id written to {}", id_path.display());
                    id
                }
            };
            Ok(Opened {
                store,
                cluster_id: Some(id),
            })
        }
        (Some(Err(e)), false) => match file_id {
            Some(f) => anyhow::bail!(
                "{e}. {} says this directory holds cluster {f}, so the manager does not start on an empty store in its place. Put the cluster's {STORE_FILE} back from a backup, or rebuild its records from the nodes with `zebu manager --recover-from-agents` (the damaged file is kept beside it; the replicas on the nodes are untouched)",
                id_path.display()
            ),
            None => anyhow::bail!(
                "{e}. Put the cluster's {STORE_FILE} back from a backup, or rebuild its records from the nodes with `zebu manager --recover-from-agents` (the damaged file is kept beside it)"
            ),
        },
        (Some(Ok(store)), true) => {
            let held = stored_id(&store)?;
            let volumes = store.list_raw("volumes")?.len();
            if held.is_some() && volumes > 0 {
                anyhow::bail!(
                    "--recover-from-agents is for a lost or damaged store, but {} opens and holds {volumes} volume(s): start the manager without it",
                    path.display()
                );
            }
            drop(store);
            recover_into(dir, file_id.or(held), true)
        }
        (Some(Err(e)), true) => {
            tracing::warn!("{e}");
            recover_into(dir, file_id, exists)
        }
        (None, true) => recover_into(dir, None, false),
    }
}

/// Move a store file aside and start an empty one for `id` (learned from the agents if `None`).
fn recover_into(dir: &Path, id: Option<String>, move_aside: bool) -> anyhow::Result<Opened> {
    let path = dir.join(STORE_FILE);
    if move_aside && path.exists() {
        let aside = dir.join(format!(
            "{STORE_FILE}.damaged-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ));
        std::fs::rename(&path, &aside)?;
        std::fs::File::open(dir)?.sync_all()?;
        tracing::warn!(
            "the store {} was moved to {}",
            path.display(),
            aside.display()
        );
    }
    let store = RedbStore::open(&path)?;
    if let Some(id) = &id {
        store.put(CLUSTER, ID_KEY, id)?;
        cluster_id::write(dir, id).map_err(anyhow::Error::msg)?;
    }
    match &id {
        Some(id) => tracing::warn!(cluster = %id, "recovering cluster {id} from its agents"),
        None => tracing::warn!(
            "recovering from the agents: {} is lost too, so the cluster id is taken from the first agent that reports one",
            cluster_id::path(dir).display()
        ),
    }
    Ok(Opened {
        store,
        cluster_id: id,
    })
}

/// Record the id learned from an agent while recovering (store first, then the file).
pub fn adopt(dir: &Path, store: &dyn zebu_store::MetaStore, id: &str) -> anyhow::Result<()> {
    store.put(CLUSTER, ID_KEY, &id.to_owned())?;
    cluster_id::write(dir, id).map_err(anyhow::Error::msg)
}
