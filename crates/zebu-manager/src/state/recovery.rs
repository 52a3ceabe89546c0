//! Rebuilding the manager's records from what the agents hold on disk
//! (`zebu manager --recover-from-agents`; `docs/hardening.md`, "Recovery from the agents").
//!
//! During the window every heartbeat is answered with a hold (agents keep what they run and
//! change nothing), every replica reported on disk that no record names is adopted as ERR, and
//! no reconciler runs. When the window ends, the evidence decides which replicas are in sync.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use zebu_api::{Assignment, Heartbeat, ReplicaMode};
use zebu_store::MetaStoreExt;

use super::{
    now_unix, store_err, validate_volume_name, ReplicaRecord, State, VolumeRecord, BLOCK_SIZE,
    REPLICAS,
};
use crate::error::ApiError;

pub struct Recovery {
    pub until: Instant,
    /// Volumes whose records were rebuilt in this recovery.
    pub volumes: BTreeSet<String>,
}

impl Recovery {
    pub fn new(window: Duration) -> Recovery {
        Recovery {
            until: Instant::now() + window,
            volumes: BTreeSet::new(),
        }
    }
}

const WAITING: &str =
    "recovered from its node's disk; whether it is in sync is decided when the recovery window ends";

impl State {
    pub fn recovering(&self) -> bool {
        self.recovery.is_some()
    }

    /// Refuse a change while records are being recovered.
    pub fn not_recovering(&self) -> Result<(), ApiError> {
        match &self.recovery {
            Some(r) => Err(ApiError::unavailable(format!(
                "the manager is recovering its records from the agents for {} s more; try again then",
                r.until.saturating_duration_since(Instant::now()).as_secs() + 1
            ))),
            None => Ok(()),
        }
    }

    /// The answer to every heartbeat during recovery.
    pub(super) fn hold(&self) -> Assignment {
        Assignment {
            cluster_id: self.cluster_id.clone().unwrap_or_default(),
            hold: Some("the manager is recovering its records from the agents".into()),
            secret: self.secret.clone(),
            replicas: Vec::new(),
            engines: Vec::new(),
            delete_replicas: Vec::new(),
        }
    }

    /// Adopt the replicas a node reports that no record names.
    pub(super) fn adopt_reported(&mut self, node: &str, hb: &Heartbeat) -> Result<(), ApiError> {
        for r in &hb.replicas {
            if r.missing
                || self.replicas.contains_key(&r.name)
                || validate_volume_name(&r.volume).is_err()
                || super::validate_object_name("replica", &r.name).is_err()
            {
                continue;
            }
            let known = self.volumes.get(&r.volume).cloned();
            let mut v = match known {
                Some(v)
                    if !self
                        .recovery
                        .as_ref()
                        .is_some_and(|x| x.volumes.contains(&v.name)) =>
                {
                    continue; // A volume this store already held: not ours to touch.
                }
                Some(v) => v,
                // Its size comes from a replica that opened.
                None if r.error.is_some() => continue,
                None => VolumeRecord {
                    name: r.volume.clone(),
                    size_bytes: r.size_bytes,
                    replica_count: 1,
                    block_size: BLOCK_SIZE,
                    desired_node: None,
                    deleting: false,
                    created: true,
                    epoch: 0,
                },
            };
            let mut error = r.error.clone().unwrap_or_else(|| WAITING.into());
            if r.error.is_none() && r.size_bytes != v.size_bytes {
                error = format!(
                    "it holds {} bytes but the volume's other replicas {}",
                    r.size_bytes, v.size_bytes
                );
            }
            v.epoch = v.epoch.max(r.epoch);
            let rec = ReplicaRecord {
                name: r.name.clone(),
                volume: r.volume.clone(),
                node: node.to_owned(),
                mode: ReplicaMode::ERR,
                generation: r.generation,
                error: Some(error),
                seen: Some(true),
                failed_at_unix: None,
                last_rebuild: None,
                wo_since_unix: None,
                no_space: false,
                removing: false,
            };
            tracing::info!(volume = %v.name, replica = %rec.name, node, generation = rec.generation, "recovered a replica record from the node's disk");
            if let Some(x) = self.recovery.as_mut() {
                x.volumes.insert(v.name.clone());
            }
            self.save_volume(v)?;
            self.store
                .put(REPLICAS, &rec.name, &rec)
                .map_err(store_err)?;
            self.replicas.insert(rec.name.clone(), rec);
        }
        Ok(())
    }

    /// End the window once it is over: decide each recovered volume's members from the
    /// evidence, and hand the cluster back to the reconcilers.
    pub(super) fn recovery_tick(&mut self) {
        let Some(r) = &self.recovery else { return };
        if Instant::now() < r.until {
            return;
        }
        let volumes: Vec<String> = r.volumes.iter().cloned().collect();
        for name in &volumes {
            if let Err(e) = self.settle_recovered(name) {
                // Tried again on the next tick: the window stays open until every volume is done.
                tracing::error!(volume = %name, "recovery: {}", e.message);
                return;
            }
        }
        tracing::warn!(
            "recovery from the agents is done: {} volume(s) recovered ({}); check each with `zebu volume get`, set replica counts you had raised, and attach them where they ran",
            volumes.len(),
            volumes.join(", ")
        );
        self.recovery = None;
    }

    fn settle_recovered(&mut self, name: &str) -> Result<(), ApiError> {
        let Some(mut v) = self.volumes.get(name).cloned() else {
            return Ok(());
        };
        // A running engine is the best witness: its members in sync are exactly the replicas
        // that hold every acknowledged write. The freshest epoch wins among several.
        let engine = self
            .live
            .iter()
            .filter_map(|(node, l)| {
                l.report
                    .engines
                    .iter()
                    .find(|e| e.volume == name && e.running)
                    .map(|e| (node.clone(), e.clone()))
            })
            .max_by_key(|(_, e)| e.epoch);
        let reps: Vec<ReplicaRecord> = self.volume_replicas(name).into_iter().cloned().collect();
        let healthy = |r: &ReplicaRecord| r.error.as_deref() == Some(WAITING);
        let in_sync: Vec<String> = match &engine {
            Some((node, e)) => {
                v.desired_node = Some(node.clone());
                v.epoch = v.epoch.max(e.epoch);
                e.replicas
                    .iter()
                    .filter(|m| m.mode == ReplicaMode::RW)
                    .map(|m| m.name.clone())
                    .filter(|m| reps.iter().any(|r| &r.name == m && healthy(r)))
                    .collect()
            }
            None => {
                let top = reps
                    .iter()
                    .filter(|r| healthy(r))
                    .map(|r| r.generation)
                    .max();
                reps.iter()
                    .filter(|r| healthy(r) && Some(r.generation) == top)
                    .map(|r| r.name.clone())
                    .collect()
            }
        };
        let top = reps.iter().map(|r| r.generation).max().unwrap_or(0);
        for mut r in reps.iter().cloned() {
            if in_sync.contains(&r.name) {
                r.mode = ReplicaMode::RW;
                r.error = None;
            } else {
                if healthy(&r) {
                    r.error = Some(match &engine {
                        Some((node, _)) => {
                            format!("recovered; not in sync in the engine running on {node}")
                        }
                        None => format!(
                            "recovered at generation {} while the freshest copy is at {top}",
                            r.generation
                        ),
                    });
                }
                r.failed_at_unix = Some(now_unix());
            }
            self.store.put(REPLICAS, &r.name, &r).map_err(store_err)?;
            self.replicas.insert(r.name.clone(), r);
        }
        v.replica_count = (reps.len() as u32).max(1);
        tracing::warn!(
            volume = %name,
            size_bytes = v.size_bytes,
            "recovered volume: {} replica(s), in sync: [{}]; attached to {}",
            reps.len(),
            in_sync.join(", "),
            v.desired_node.as_deref().unwrap_or("no node")
        );
        self.save_volume(v)
    }
}
