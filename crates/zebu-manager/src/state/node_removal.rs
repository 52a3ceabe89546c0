//! `zebu node delete NAME`: forget a node that is gone for good, so the volumes it held heal
//! elsewhere or can be deleted (`docs/hardening.md`, "Names and sizes").

use zebu_api::{Node, ReplicaMode};

use super::{store_err, State, NODES, REPLICAS};
use crate::error::ApiError;

impl State {
    /// Remove node `name` and the records of the replicas on it. Refused while the node is up,
    /// or while it holds the only in-sync copy of a volume unless `force` repeats its name.
    pub fn delete_node(&mut self, name: &str, force: Option<&str>) -> Result<Node, ApiError> {
        let Some(rec) = self.nodes.get(name).cloned() else {
            return Err(ApiError::not_found(format!(
                "node {name} does not exist (see zebu node list)"
            )));
        };
        if let Some(f) = force {
            if f != name {
                return Err(ApiError::bad_request(format!(
                    "--force must repeat the node's name ({name}), not {f:?}; nothing was changed"
                )));
            }
        }
        if self.node_ready(name) {
            return Err(ApiError::conflict(format!(
                "node {name} is up (it sent a heartbeat in the last {} s): stop its agent first, or it is added again by its next heartbeat; nothing was changed",
                super::NODE_DOWN_AFTER.as_secs()
            )));
        }
        // Volumes whose only in-sync copies are on this node.
        let only_copy: Vec<String> = self
            .volumes
            .values()
            .filter(|v| !v.deleting)
            .filter(|v| {
                let rw: Vec<_> = self
                    .volume_replicas(&v.name)
                    .into_iter()
                    .filter(|r| r.mode == ReplicaMode::RW)
                    .collect();
                !rw.is_empty() && rw.iter().all(|r| r.node == name)
            })
            .map(|v| v.name.clone())
            .collect();
        if !only_copy.is_empty() && force != Some(name) {
            return Err(ApiError::conflict(format!(
                "node {name} holds the only in-sync replica of volume(s) {}: removing it leaves them faulted, and their data can then come only from an older copy (salvage). If the node's disk is lost for good, repeat its name: zebu node delete {name} --force {name}; nothing was changed",
                only_copy.join(", ")
            )));
        }
        let view = self.node_view(&rec);
        let gone: Vec<String> = self
            .replicas
            .values()
            .filter(|r| r.node == name)
            .map(|r| r.name.clone())
            .collect();
        let detach: Vec<String> = self
            .volumes
            .values()
            .filter(|v| v.desired_node.as_deref() == Some(name))
            .map(|v| v.name.clone())
            .collect();
        let mut changes: Vec<(&str, &str, Option<Vec<u8>>)> = vec![(NODES, name, None)];
        for r in &gone {
            changes.push((REPLICAS, r.as_str(), None));
        }
        let mut detached = Vec::new();
        for v in &detach {
            let mut rec = self.volumes[v].clone();
            rec.desired_node = None;
            detached.push(rec);
        }
        let encoded: Vec<(String, Vec<u8>)> = detached
            .iter()
            .map(|v| {
                (
                    v.name.clone(),
                    zebu_store::encode_json(super::VOLUMES, &v.name, v),
                )
            })
            .collect();
        for (k, b) in &encoded {
            changes.push((super::VOLUMES, k.as_str(), Some(b.clone())));
        }
        self.store.apply(&changes).map_err(store_err)?;
        for r in &gone {
            if let Some(rec) = self.replicas.remove(r) {
                tracing::warn!(node = name, replica = %r, volume = %rec.volume, mode = ?rec.mode, "replica forgotten with its node");
            }
        }
        for v in detached {
            tracing::warn!(node = name, volume = %v.name, "volume detached: its node was removed");
            self.volumes.insert(v.name.clone(), v);
        }
        self.nodes.remove(name);
        self.live.remove(name);
        self.was_ready.remove(name);
        tracing::warn!(
            node = name,
            "node removed with {} replica record(s){}",
            gone.len(),
            if only_copy.is_empty() {
                String::new()
            } else {
                format!(
                    " (forced: it held the only in-sync copy of {})",
                    only_copy.join(", ")
                )
            }
        );
        Ok(view)
    }
}
