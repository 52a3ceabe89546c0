//! The manager's snapshot records: which snapshots of each volume were acknowledged (their
//! name, kind, labels and time). The data and the tree live in the replicas; these records say
//! which snapshots exist, so an engine deletes at its start one a crash cut short
//! (`docs/snapshots.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zebu_api::{LayerView, ReplicaLayers, ReplicaMode, Snapshot};
use zebu_store::MetaStoreExt;

use super::{store_err, State};
use crate::error::ApiError;

pub(super) const SNAPSHOTS: &str = "snapshots";

/// The name the live head goes by in a snapshot's `children` (Longhorn's).
pub const HEAD_NAME: &str = "volume-head";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub volume: String,
    pub name: String,
    pub created_unix: u64,
    /// Unique per snapshot taken (a name may be taken again after a delete).
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub system: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn key(volume: &str, name: &str) -> String {
    format!("{volume}/{name}")
}

/// Snapshot names: as volume names (DNS labels), so they can name Kubernetes objects.
pub fn validate_snapshot_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && name != HEAD_NAME;
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "snapshot name {name:?} is not valid: use 1 to 63 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit (and not {HEAD_NAME})"
        )))
    }
}

pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > 64 {
        return Err(ApiError::bad_request(format!(
            "a snapshot takes at most 64 labels, not {}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !key_ok || v.len() > 255 || v.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "label {k}={v:?} is not valid: keys are 1 to 63 letters, digits, '-', '_', '.' and '/'; values at most 255 characters, without control characters"
            )));
        }
    }
    Ok(())
}

/// Where snapshot work on a volume goes.
pub enum SnapshotTarget {
    /// Its engine, on this node.
    Engine(String),
    /// Detached: each replica in sync, on its node (node, replica).
    Replicas(Vec<(String, String)>),
}

impl State {
    pub(super) fn load_snapshots(
        store: &dyn zebu_store::MetaStore,
    ) -> Result<BTreeMap<String, SnapshotRecord>, zebu_store::StoreError> {
        Ok(store
            .list::<SnapshotRecord>(SNAPSHOTS)?
            .into_iter()
            .map(|s| (key(&s.volume, &s.name), s))
            .collect())
    }

    /// The recorded snapshots of `volume`, oldest first.
    pub fn snapshot_records(&self, volume: &str) -> Vec<SnapshotRecord> {
        let mut v: Vec<SnapshotRecord> = self
            .snapshots
            .range(format!("{volume}/")..format!("{volume}0"))
            .map(|(_, s)| s.clone())
            .collect();
        v.sort_by_key(|s| s.created_unix);
        v
    }

    /// The keys (name and unique id) of the volume's acknowledged snapshots, for its engine.
    pub(super) fn snapshot_keys(&self, volume: &str) -> Vec<String> {
        self.snapshot_records(volume)
            .into_iter()
            .map(|s| zebu_api::snapshot_key(&s.name, &s.uid))
            .collect()
    }

    /// Where to send snapshot work on `volume`. `all`: every replica in sync must be reachable
    /// (a deletion), else one is enough (a listing).
    pub fn snapshot_target(&self, volume: &str, all: bool) -> Result<SnapshotTarget, ApiError> {
        let v = self.live_volume(volume)?;
        if let Some(n) = v.desired_node.as_deref() {
            let running = self
                .engine_report(n, volume)
                .is_some_and(|e| e.running && e.replicas.iter().any(|m| m.mode == ReplicaMode::RW));
            if !running {
                return Err(ApiError::conflict(format!(
                    "volume {volume} is attaching to node {n} and its engine is not serving yet; try again when `zebu volume get {volume}` shows it attached"
                )));
            }
            return Ok(SnapshotTarget::Engine(n.to_owned()));
        }
        let in_sync = self.start_members(volume);
        let (ready, away): (Vec<&super::ReplicaRecord>, Vec<&super::ReplicaRecord>) =
            in_sync.into_iter().partition(|r| self.served(r));
        if ready.is_empty() || (all && !away.is_empty()) {
            let names: Vec<String> = away
                .iter()
                .map(|r| format!("{} on node {}", r.name, r.node))
                .collect();
            return Err(ApiError::unavailable(format!(
                "volume {volume} is detached and its replicas in sync cannot all be reached now ({}); bring their nodes back, or attach the volume",
                names.join(", ")
            )));
        }
        Ok(SnapshotTarget::Replicas(
            ready
                .iter()
                .map(|r| (r.node.clone(), r.name.clone()))
                .collect(),
        ))
    }

    /// Check a new snapshot's name and labels against the records (nothing is changed).
    pub fn check_new_snapshot(
        &self,
        volume: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        self.live_volume(volume)?;
        validate_snapshot_name(name)?;
        validate_labels(labels)?;
        if self.snapshots.contains_key(&key(volume, name)) {
            return Err(ApiError::conflict(format!(
                "volume {volume} already has a snapshot named {name}; choose another name (zebu snapshot list {volume})"
            )));
        }
        Ok(())
    }

    pub fn record_snapshot(&mut self, rec: SnapshotRecord) -> Result<(), ApiError> {
        let k = key(&rec.volume, &rec.name);
        self.store.put(SNAPSHOTS, &k, &rec).map_err(store_err)?;
        self.snapshots.insert(k, rec);
        Ok(())
    }

    pub fn snapshot_record(&self, volume: &str, name: &str) -> Result<SnapshotRecord, ApiError> {
        self.live_volume(volume)?;
        self.snapshots
            .get(&key(volume, name))
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "volume {volume} has no snapshot named {name} (zebu snapshot list {volume})"
                ))
            })
    }

    pub fn forget_snapshot(&mut self, volume: &str, name: &str) -> Result<(), ApiError> {
        let k = key(volume, name);
        if self.snapshots.contains_key(&k) {
            self.store.delete(SNAPSHOTS, &k).map_err(store_err)?;
            self.snapshots.remove(&k);
        }
        Ok(())
    }

    /// The records of a volume that is gone.
    pub(super) fn forget_volume_snapshots(&mut self, volume: &str) -> Result<(), ApiError> {
        for s in self.snapshot_records(volume) {
            self.forget_snapshot(volume, &s.name)?;
        }
        Ok(())
    }
}

/// The volume's snapshots: the records, with parents, children and sizes from a replica's tree.
pub fn snapshot_views(records: &[SnapshotRecord], trees: &[ReplicaLayers]) -> Vec<Snapshot> {
    let tree: &[LayerView] = trees.first().map_or(&[], |t| &t.layers);
    let by_id: BTreeMap<u64, &LayerView> = tree.iter().map(|l| (l.id, l)).collect();
    // The nearest ancestor that is a listed snapshot (removed ones are skipped over).
    let shown = |id: u64| -> Option<String> {
        let mut at = by_id.get(&id).copied();
        while let Some(l) = at {
            if !l.removed && !l.head && records.iter().any(|r| r.name == l.name) {
                return Some(l.name.clone());
            }
            at = by_id.get(&l.parent).copied();
        }
        None
    };
    records
        .iter()
        .map(|r| {
            let layer = tree
                .iter()
                .find(|l| !l.head && !l.removed && l.name == r.name);
            let parent = layer.and_then(|l| shown(l.parent));
            let children = layer
                .map(|me| {
                    tree.iter()
                        .filter(|l| !l.removed || l.head)
                        .filter(|l| l.id != me.id && shown(l.parent).as_deref() == Some(&r.name))
                        .map(|l| {
                            if l.head {
                                HEAD_NAME.to_owned()
                            } else {
                                l.name.clone()
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            Snapshot {
                name: r.name.clone(),
                volume: r.volume.clone(),
                parent,
                children,
                created_unix: r.created_unix,
                size_bytes: layer.map_or(0, |l| l.size_bytes),
                kind: if r.system { "system" } else { "user" }.into(),
                labels: r.labels.clone(),
            }
        })
        .collect()
}

impl State {
    /// May `by` take or answer commands for `node` (a known node)?
    pub fn admit_agent(&mut self, node: &str, by: &super::Speaker) -> Result<(), ApiError> {
        if !self.nodes.contains_key(node) {
            return Err(ApiError::not_found(format!(
                "node {node} is not registered: its agent must send a heartbeat first"
            )));
        }
        self.admit(node, by)
    }
}
