//! Opening the manager's store so that it never starts a new cluster over one it held
//! (`docs/hardening.md`, "A manager that cannot forget").

use std::path::Path;

use zebu_api::cluster_id;
use zebu_store::{MetaStore, MetaStoreExt, RedbStore};

use crate::STORE_FILE;

/// Where the store keeps the cluster id.
pub const CLUSTER: &str = "cluster";
pub const ID_KEY: &str = "id";
/// Present while a recovery from the agents is not finished: a manager that stops during one
/// resumes it at its next start, whatever its flags, so a half-rebuilt store is never trusted.
pub const RECOVERING_KEY: &str = "recovering";

/// An opened store and the cluster it belongs to.
pub struct Opened {
    pub store: RedbStore,
    pub cluster_id: String,
    /// A recovery from the agents is to run (asked for, or one that did not finish).
    pub recovering: bool,
}

fn new_id() -> String {
    crate::random_hex(16)
}

/// Open (or, in a directory that never held one, create) the store in `dir`.
///
/// `recover`: the store is lost or damaged and is to be rebuilt from the agents; a damaged file
/// is moved aside (never deleted) and an empty store is started with the cluster's id.
pub fn open(dir: &Path, recover: bool, given_id: Option<&str>) -> anyhow::Result<Opened> {
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
                cluster_id: id,
                recovering: false,
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
            let recovering = store.get::<u64>(CLUSTER, RECOVERING_KEY)?.is_some();
            if recovering {
                tracing::warn!("a recovery from the agents did not finish: it is resumed");
            }
            Ok(Opened {
                store,
                cluster_id: id,
                recovering,
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
            if store.get::<u64>(CLUSTER, RECOVERING_KEY)?.is_some() {
                // A recovery that did not finish: go on with it in the same store.
                let id = match (held, file_id) {
                    (Some(h), _) => h,
                    (None, Some(f)) => f,
                    (None, None) => anyhow::bail!("{} is recovering but holds no cluster id", path.display()),
                };
                tracing::warn!("a recovery from the agents did not finish: it is resumed");
                return Ok(Opened {
                    store,
                    cluster_id: id,
                    recovering: true,
                });
            }
            let volumes = store.list_raw("volumes")?.len();
            if volumes > 0 {
                anyhow::bail!(
                    "--recover-from-agents is for a lost or damaged store, but {} opens and holds {volumes} volume(s): start the manager without it",
                    path.display()
                );
            }
            drop(store);
            let id = pick_id(dir, file_id.or(held), given_id)?;
            recover_into(dir, id, true)
        }
        (Some(Err(e)), true) => {
            tracing::warn!("{e}");
            let id = pick_id(dir, file_id, given_id)?;
            recover_into(dir, id, exists)
        }
        (None, true) => {
            let id = pick_id(dir, None, given_id)?;
            recover_into(dir, id, false)
        }
    }
}

/// The cluster id to recover: the manager's own, else the one given (`--cluster-id`, from any
/// node's `cluster.id`). Never guessed from whichever agent reports first.
fn pick_id(dir: &Path, known: Option<String>, given: Option<&str>) -> anyhow::Result<String> {
    match (known, given) {
        (Some(k), Some(g)) if k != g => anyhow::bail!(
            "--cluster-id {g} differs from the id this directory holds ({k}, in {}); nothing was changed",
            cluster_id::path(dir).display()
        ),
        (Some(k), _) => Ok(k),
        (None, Some(g)) if cluster_id::is_valid(g) => Ok(g.to_owned()),
        (None, Some(g)) => anyhow::bail!("--cluster-id {g:?} is not a cluster id (32 hex digits)"),
        (None, None) => anyhow::bail!(
            "{} is lost too, so the manager does not know which cluster to recover: give --cluster-id with the id in DATA_DIR/{} on any of the cluster's nodes",
            cluster_id::path(dir).display(),
            cluster_id::FILE
        ),
    }
}

/// Move a store file aside and start an empty one for `id`, marked as recovering.
fn recover_into(dir: &Path, id: String, move_aside: bool) -> anyhow::Result<Opened> {
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
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let id_rec = zebu_store::encode_json(CLUSTER, ID_KEY, &id);
    let mark = zebu_store::encode_json(CLUSTER, RECOVERING_KEY, &now);
    store.apply(&[
        (CLUSTER, ID_KEY, Some(id_rec)),
        (CLUSTER, RECOVERING_KEY, Some(mark)),
    ])?;
    cluster_id::write(dir, &id).map_err(anyhow::Error::msg)?;
    tracing::warn!(cluster = %id, "recovering cluster {id} from its agents");
    Ok(Opened {
        store,
        cluster_id: id,
        recovering: true,
    })
}
