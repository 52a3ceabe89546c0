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
use crate::cluster::{CLUSTER, RECOVERING_KEY};
use crate::error::ApiError;

/// How long a recovery gathers reports when no window is given (a resumed one).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

pub struct Recovery {
    pub until: Instant,
    /// Volumes whose records are rebuilt in this recovery: every volume in the store, which was
    /// empty when the recovery began (a resumed one holds what the stopped one had adopted).
    pub volumes: BTreeSet<String>,
}

impl Recovery {
    pub fn new(window: Duration, volumes: impl Iterator<Item = String>) -> Recovery {
        Recovery {
            until: Instant::now() + window,
            volumes: volumes.collect(),
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
            cluster_id: self.cluster_id.clone(),
            hold: Some("the manager is recovering its records from the agents".into()),
            secret: self.secret.clone(),
            replicas: Vec::new(),
            engines: Vec::new(),
            delete_replicas: Vec::new(),
            node_token: None,
        }
    }

    /// Adopt the replicas a node reports that no record names.
    pub(super) fn adopt_reported(&mut self, node: &str, hb: &Heartbeat) -> Result<(), ApiError> {
        for r in &hb.replicas {
            if r.missing
                || self.replicas.contains_key(&r.name)
                || super::validate_object_name("replica", &r.name).is_err()
            {
                continue;
            }
            // One that could not be opened does not know its volume: its name tells it.
            let volume = if r.volume.is_empty() {
                volume_of(&r.name).unwrap_or_default()
            } else {
                r.volume.clone()
            };
            if validate_volume_name(&volume).is_err() {
                continue;
            }
            let recovered = |v: &str| {
                self.recovery
                    .as_ref()
                    .is_some_and(|x| x.volumes.contains(v))
            };
            let mut v = match self.volumes.get(&volume).cloned() {
                Some(v) if !recovered(&v.name) => continue, // not ours to touch
                Some(v) => v,
                // Its size comes from a replica that opened.
                None if r.error.is_some() => continue,
                None => VolumeRecord {
                    name: volume.clone(),
                    size_bytes: r.size_bytes,
                    replica_count: 1,
                    block_size: if r.block_size == 0 {
                        BLOCK_SIZE
                    } else {
                        r.block_size
                    },
                    desired_node: None,
                    deleting: false,
                    created: true,
                    epoch: 0,
                    salvage_hold: None,
                    clone: None,
                },
            };
            // A replica marked as a clone's not yet copied: the volume reads the rest from
            // the source, never zeroes in its place.
            if let (Some(src), None) = (&r.clone_of, &v.clone) {
                tracing::warn!(volume = %v.name, source = %src.volume, snapshot = %src.snapshot, "recovered: the volume is a clone whose copy is not done");
                v.clone = Some(super::clone::CloneRecord {
                    volume: src.volume.clone(),
                    snapshot: src.snapshot.clone(),
                    uid: String::new(),
                    done: false,
                });
            }
            let error = r.error.clone().unwrap_or_else(|| WAITING.into());
            // The volume's size is its largest replica's: a growth is recorded before any
            // replica grows, and a replica that missed one is grown by its engine.
            if r.error.is_none() && r.size_bytes > v.size_bytes {
                v.size_bytes = r.size_bytes;
            }
            v.epoch = v.epoch.max(r.epoch);
            let rec = ReplicaRecord {
                name: r.name.clone(),
                volume: volume.clone(),
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
        if let Err(e) = self.store.delete(CLUSTER, RECOVERING_KEY) {
            tracing::error!("recovery: its end is not recorded, tried again: {e}");
            return;
        }
        tracing::warn!(
            "recovery from the agents is done: {} volume(s) recovered ({}); check each with `zebu volume get`, and set replica counts that were higher",
            volumes.len(),
            volumes.join(", ")
        );
        self.recovery = None;
    }

    /// What this process's reports say of a recovered replica.
    fn evidence(&self, r: &ReplicaRecord) -> Evidence {
        let report = self
            .live
            .get(&r.node)
            .and_then(|l| l.report.replicas.iter().find(|x| x.name == r.name));
        match report {
            None => Evidence::Unconfirmed,
            Some(x) if x.missing => Evidence::Unconfirmed,
            Some(x) if x.error.is_some() && x.generation == 0 && x.size_bytes == 0 => {
                Evidence::Unreadable(x.error.clone().unwrap_or_default())
            }
            Some(x) => Evidence::Read {
                generation: r.generation.max(x.generation),
                fence: x.epoch,
                error: x.error.clone(),
            },
        }
    }

    fn settle_recovered(&mut self, name: &str) -> Result<(), ApiError> {
        let Some(mut v) = self.volumes.get(name).cloned() else {
            return Ok(());
        };
        let reps: Vec<ReplicaRecord> = self.volume_replicas(name).into_iter().cloned().collect();
        let evidence: Vec<(ReplicaRecord, Evidence)> =
            reps.iter().map(|r| (r.clone(), self.evidence(r))).collect();
        // A copy whose generation is not known may be the freshest: nothing is chosen for the
        // volume then, not even by auto-salvage; a person decides.
        let unknown: Vec<String> = evidence
            .iter()
            .filter_map(|(r, e)| match e {
                Evidence::Unconfirmed => Some(format!(
                    "{} on node {} (its node did not report it after the manager started)",
                    r.name, r.node
                )),
                Evidence::Unreadable(why) => Some(format!("{} on node {} ({why})", r.name, r.node)),
                Evidence::Read { .. } => None,
            })
            .collect();
        // The highest generation (evidence) and fence (epoch) among the copies that were read.
        let (top, fence) = evidence
            .iter()
            .filter_map(|(_, e)| match e {
                Evidence::Read {
                    generation, fence, ..
                } => Some((*generation, *fence)),
                _ => None,
            })
            .fold((0, 0), |(g, f), (g2, f2)| (g.max(g2), f.max(f2)));
        v.epoch = v.epoch.max(fence);
        let in_sync: Vec<String> = if unknown.is_empty() {
            evidence
                .iter()
                .filter(|(_, e)| {
                    matches!(e, Evidence::Read { generation, error: None, .. } if *generation == top)
                })
                .map(|(r, _)| r.name.clone())
                .collect()
        } else {
            Vec::new()
        };
        // The freshest copies are equally fresh (they were in the set together when it last
        // moved); if none of them can be read, an older one must not stand in for them.
        let fresh_failed = unknown.is_empty()
            && in_sync.is_empty()
            && evidence
                .iter()
                .any(|(_, e)| matches!(e, Evidence::Read { generation, .. } if *generation == top));
        v.salvage_hold = if !unknown.is_empty() {
            Some(format!(
                "recovered from the agents, but the generation of {} is not known, so it may hold writes the others lack: no replica was brought back in sync. Bring it back and run zebu volume salvage {name} --replica NAME with the one to keep",
                unknown.join("; ")
            ))
        } else if fresh_failed {
            Some(format!(
                "recovered from the agents, but every freshest copy (generation {top}) failed; choose one with zebu volume salvage {name} --replica NAME, accepting what it lacks"
            ))
        } else {
            None
        };
        // A running engine keeps its node when it is the current attachment: its epoch is the
        // highest fence any replica reports (a lower one was fenced off by a newer engine).
        let engine = self
            .live
            .iter()
            .filter_map(|(node, l)| {
                l.report
                    .engines
                    .iter()
                    .find(|e| e.volume == name && e.running)
                    .map(|e| (node.clone(), e.epoch))
            })
            .max_by_key(|(_, epoch)| *epoch)
            .filter(|(_, epoch)| *epoch >= fence && !in_sync.is_empty());
        if let Some((node, epoch)) = &engine {
            v.desired_node = Some(node.clone());
            v.epoch = v.epoch.max(*epoch);
        }
        for (mut r, e) in evidence {
            if let Evidence::Read { generation, .. } = e {
                r.generation = r.generation.max(generation);
            }
            if in_sync.contains(&r.name) {
                r.mode = ReplicaMode::RW;
                r.error = None;
                r.failed_at_unix = None;
            } else {
                r.error = Some(match e {
                    Evidence::Read {
                        error: Some(err), ..
                    } => err,
                    Evidence::Read { generation, .. } if generation < top => format!(
                        "recovered at generation {generation} while the freshest copy is at {top}"
                    ),
                    _ => v
                        .salvage_hold
                        .clone()
                        .unwrap_or_else(|| "recovered; not in sync".into()),
                });
                // Decided from the reports in hand: a report that came this second already
                // counts as after the failure (salvage may choose it at once).
                r.failed_at_unix = Some(now_unix().saturating_sub(1));
            }
            self.store.put(REPLICAS, &r.name, &r).map_err(store_err)?;
            self.replicas.insert(r.name.clone(), r);
        }
        v.replica_count = (reps.len() as u32).max(1);
        tracing::warn!(
            volume = %name,
            size_bytes = v.size_bytes,
            "recovered volume: {} replica(s), in sync: [{}]; attached to {}{}",
            reps.len(),
            in_sync.join(", "),
            v.desired_node.as_deref().unwrap_or("no node"),
            v.salvage_hold.as_deref().map(|h| format!("; {h}")).unwrap_or_default()
        );
        self.save_volume(v)
    }
}

enum Evidence {
    /// No report of it since this manager started.
    Unconfirmed,
    /// Its node could not open it: its generation is not known.
    Unreadable(String),
    Read {
        generation: u64,
        fence: u64,
        error: Option<String>,
    },
}

/// The volume a replica belongs to, from its name (`VOLUME-r-XXXXXXXX`).
fn volume_of(replica: &str) -> Option<String> {
    let (volume, suffix) = replica.rsplit_once("-r-")?;
    (suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit())).then(|| volume.to_owned())
}
