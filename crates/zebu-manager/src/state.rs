//! The manager's state and the rules that move it: records persisted in the metadata store,
//! what agents last reported, and the level-triggered reconciliation that turns both into the
//! assignment each node gets back on its heartbeat.
//!
//! Desired state (persisted): volumes (size, replica count, desired node, deleting), replicas
//! (node, mode, generation), nodes (addresses). Observed state (memory only, rebuilt from the
//! next heartbeats after a restart): each node's last report. Volume `state` and `robustness`
//! are derived from both on every read, never stored, so they cannot go stale.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zebu_api::{
    Assignment, EngineReplica, EngineSpec, Heartbeat, Node, Replica, ReplicaMode, ReplicaSpec,
    Robustness, Volume, VolumeState,
};
use zebu_store::{MetaStore, MetaStoreExt, StoreError};

use crate::error::ApiError;

pub mod clone;
mod expand;
mod node_removal;
mod node_tokens;
pub use node_tokens::Speaker;
pub mod recovery;
mod replenish;
mod salvage;
mod schedule;
pub mod snapshots;

/// A node whose last heartbeat is older than this is not ready.
pub const NODE_DOWN_AFTER: Duration = Duration::from_secs(10);
/// An engine starts without an in-sync member once that member's node has had no heartbeat for
/// this long (counted from the manager's own start at most): sooner, the node may just be
/// restarting, and waiting for it saves a rebuild. The engine records the member retired
/// before it serves (see `zebu-engine/src/engine/record.rs`), so this is safe at any time.
pub const START_WITHOUT_AFTER: Duration = Duration::from_secs(20);
pub const BLOCK_SIZE: u32 = 4096;
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;

const VOLUMES: &str = "volumes";
const REPLICAS: &str = "replicas";
const NODES: &str = "nodes";
const SETTINGS: &str = "settings";

/// A setting a person set (see [`crate::settings`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingRecord {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub size_bytes: u64,
    pub replica_count: u32,
    pub block_size: u32,
    pub desired_node: Option<String>,
    pub deleting: bool,
    /// Every replica has been reported by its node at least once.
    pub created: bool,
    /// The fence of the current (or last) attachment: raised and persisted with every attach,
    /// before any engine is told about it. Never lowered.
    #[serde(default)]
    pub epoch: u64,
    /// Set when no replica may be brought back by auto-salvage, with why (a recovery could not
    /// tell which copy is freshest); cleared by a salvage a person asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salvage_hold: Option<String>,
    /// A clone: its source snapshot, and whether the copy is done (`state/clone.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<clone::CloneRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub name: String,
    pub volume: String,
    pub node: String,
    pub mode: ReplicaMode,
    /// The highest generation its node has reported (never lowered).
    pub generation: u64,
    pub error: Option<String>,
    /// Its node has reported it on disk at least once. Until then the node is told to create
    /// it; after, never again (a replica gone from disk is missing, not new). Absent (`None`)
    /// only in records written before the field existed: see [`State::load`].
    #[serde(default)]
    pub seen: Option<bool>,
    /// When it last went ERR (Unix seconds): replaced once that is longer ago than
    /// `replica-replenishment-wait-interval`.
    #[serde(default)]
    pub failed_at_unix: Option<u64>,
    #[serde(default)]
    pub last_rebuild: Option<zebu_api::LastRebuild>,
    /// When it went WO (Unix seconds): one that no node serves for long is given up.
    #[serde(default)]
    pub wo_since_unix: Option<u64>,
    /// ERR because its disk is full: replaced at once, rejoins only after a longer back-off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_space: bool,
    /// Failed longer than `stale-replica-timeout` and replaced: its node is told to delete it,
    /// and the record goes once the node no longer has it on disk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
}

impl ReplicaRecord {
    /// A replica to be created on `node` (never reported yet).
    fn new(volume: &str, node: &str, mode: ReplicaMode) -> ReplicaRecord {
        ReplicaRecord {
            name: format!("{volume}-r-{}", random_suffix()),
            volume: volume.to_owned(),
            node: node.to_owned(),
            mode,
            generation: 0,
            error: None,
            seen: Some(false),
            failed_at_unix: None,
            last_rebuild: None,
            wo_since_unix: (mode == ReplicaMode::WO).then(now_unix),
            no_space: false,
            removing: false,
        }
    }

    fn seen(&self) -> bool {
        self.seen == Some(true)
    }

    /// Seconds since it failed (ERR), when known.
    fn failed_for_s(&self) -> Option<u64> {
        self.failed_at_unix.map(|t| now_unix().saturating_sub(t))
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub address: String,
    pub data_port: u16,
    pub nbd_port: u16,
    pub disk_path: String,
    /// SHA-256 (hex) of the node's own token (`state/node_tokens.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// The node has used its token: the shared agent token no longer speaks for it.
    #[serde(default)]
    pub token_confirmed: bool,
}

struct Live {
    seen: Instant,
    /// When the report came, Unix seconds (compared with a replica's `failed_at_unix`).
    seen_unix: u64,
    report: Heartbeat,
}

pub struct State {
    store: Arc<dyn MetaStore>,
    secret: String,
    volumes: BTreeMap<String, VolumeRecord>,
    replicas: BTreeMap<String, ReplicaRecord>,
    nodes: BTreeMap<String, NodeRecord>,
    /// Values people set, by name (validated); the rest take their defaults.
    settings: BTreeMap<String, String>,
    live: HashMap<String, Live>,
    /// Readiness of each node when [`State::tick`] last looked, to log each change once.
    was_ready: HashMap<String, bool>,
    /// Faulted volumes that salvage may not bring back by itself, with why.
    salvage_blocked: HashMap<String, String>,
    /// When this manager started: a node not heard from since is down at most this long.
    started: Instant,
    /// The cluster these records belong to.
    cluster_id: String,
    /// Replicas reported on disk that no record names, logged once each.
    unknown_logged: std::collections::HashSet<String>,
    /// Set while records are being recovered from the agents.
    recovery: Option<recovery::Recovery>,
    /// Acknowledged snapshots, by `volume/name` (see `state/snapshots.rs`).
    snapshots: BTreeMap<String, snapshots::SnapshotRecord>,
}

fn store_err(e: StoreError) -> ApiError {
    ApiError::internal(format!("{e}; nothing was changed"))
}

/// Volume names: DNS labels, so they work as Kubernetes names and in NBD URIs.
pub fn validate_volume_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "volume name {name:?} is not valid: use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        )))
    }
}

/// Node names: DNS subdomains (lowercase letters, digits, '-' and '.', labels of 1 to 63),
/// as Kubernetes node names are; never a path.
pub fn validate_node_name(name: &str) -> Result<(), ApiError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "node name {name:?} is not valid: use lowercase letters, digits, '-' and '.' (a DNS name, at most 253 characters, each part 1 to 63, starting and ending with a letter or digit)"
        )))
    }
}

/// Names of replicas (and other objects that become folder names): lowercase letters, digits
/// and '-', 1 to 200.
pub fn validate_object_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{kind} name {name:?} is not valid: use 1 to 200 lowercase letters, digits and '-'"
        )))
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    let n: u32 = rand::thread_rng().gen();
    format!("{n:08x}")
}

impl State {
    pub fn load(
        store: Arc<dyn MetaStore>,
        secret: String,
        cluster_id: String,
        recover_window: Option<Duration>,
    ) -> Result<State, StoreError> {
        let volumes: BTreeMap<String, VolumeRecord> = store
            .list::<VolumeRecord>(VOLUMES)?
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect();
        let mut replicas: BTreeMap<String, ReplicaRecord> = store
            .list::<ReplicaRecord>(REPLICAS)?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        // Records from before `seen` existed: every replica of a created volume was reported
        // (replicas were made only with their volume then). A stored `false` stays false.
        for r in replicas.values_mut() {
            if r.seen.is_none() {
                let created = volumes
                    .get(&r.volume)
                    .is_some_and(|v: &VolumeRecord| v.created);
                r.seen = Some(created);
            }
        }
        let nodes = store
            .list::<NodeRecord>(NODES)?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        let mut settings = BTreeMap::new();
        for r in store.list::<SettingRecord>(SETTINGS)? {
            match crate::settings::def(&r.name).and_then(|d| d.parse(&r.value)) {
                Ok(v) => {
                    settings.insert(r.name, v);
                }
                Err(e) => tracing::warn!(
                    "stored setting {} = {:?} is ignored, its default applies: {}",
                    r.name,
                    r.value,
                    e.message
                ),
            }
        }
        let snapshots = State::load_snapshots(&*store)?;
        Ok(State {
            snapshots,
            store,
            secret,
            replicas,
            nodes,
            settings,
            live: HashMap::new(),
            was_ready: HashMap::new(),
            salvage_blocked: HashMap::new(),
            started: Instant::now(),
            recovery: recover_window.map(|w| recovery::Recovery::new(w, volumes.keys().cloned())),
            volumes,
            cluster_id,
            unknown_logged: std::collections::HashSet::new(),
        })
    }

    /// The reconcilers that run on a timer of their own (every second), not on heartbeats:
    /// replica health and rebuild ([`State::replenish`]), then node health.
    pub fn tick(&mut self) {
        if self.recovering() {
            self.recovery_tick();
            return;
        }
        self.auto_salvage();
        self.replenish();
        self.remove_stale();
        self.log_node_changes();
    }

    /// Log each node that went not-ready (and back) once, with the reason.
    fn log_node_changes(&mut self) {
        for n in self.nodes.keys() {
            let ready = self.node_ready(n);
            let before = self.was_ready.insert(n.clone(), ready);
            match (before, ready) {
                (Some(true), false) => {
                    let age = self.live.get(n).map_or(0, |l| l.seen.elapsed().as_secs());
                    let replicas = self.replicas.values().filter(|r| r.node == *n).count();
                    let engines: Vec<&str> = self
                        .volumes
                        .values()
                        .filter(|v| v.desired_node.as_deref() == Some(n.as_str()))
                        .map(|v| v.name.as_str())
                        .collect();
                    tracing::warn!(
                        node = %n,
                        "node is not ready: no heartbeat for {age} s; it holds {replicas} replica(s) and the engines of volumes [{}]",
                        engines.join(", ")
                    );
                }
                (Some(false), true) => tracing::info!(node = %n, "node is ready again"),
                _ => {}
            }
        }
    }

    pub fn settings(&self) -> Vec<zebu_api::Setting> {
        crate::settings::DEFS
            .iter()
            .map(|d| d.view(self.settings.get(d.name).map(String::as_str)))
            .collect()
    }

    pub fn setting(&self, name: &str) -> Result<zebu_api::Setting, ApiError> {
        let d = crate::settings::def(name)?;
        Ok(d.view(self.settings.get(d.name).map(String::as_str)))
    }

    /// Validate and store a setting; a refused value changes nothing.
    pub fn set_setting(&mut self, name: &str, value: &str) -> Result<zebu_api::Setting, ApiError> {
        let d = crate::settings::def(name)?;
        let v = d.parse(value)?;
        let rec = SettingRecord {
            name: d.name.into(),
            value: v.clone(),
        };
        self.store.put(SETTINGS, d.name, &rec).map_err(store_err)?;
        let old = self.settings.insert(d.name.into(), v.clone());
        if old.as_deref() != Some(v.as_str()) {
            tracing::info!(setting = d.name, value = %v, "setting changed");
        }
        self.setting(name)
    }

    /// A whole-number setting's value in force.
    pub fn setting_u64(&self, name: &str) -> u64 {
        let d = crate::settings::def(name).expect("invariant: settings are read by known names");
        self.settings
            .get(name)
            .map(String::as_str)
            .unwrap_or(d.default_value())
            .parse()
            .expect("invariant: whole-number settings hold validated numbers")
    }

    fn node_ready(&self, node: &str) -> bool {
        self.live
            .get(node)
            .is_some_and(|l| l.seen.elapsed() < NODE_DOWN_AFTER)
    }

    fn ready_nodes(&self) -> Vec<&NodeRecord> {
        self.nodes
            .values()
            .filter(|n| self.node_ready(&n.name))
            .collect()
    }

    fn volume_replicas(&self, volume: &str) -> Vec<&ReplicaRecord> {
        self.replicas
            .values()
            .filter(|r| r.volume == volume)
            .collect()
    }

    fn engine_report(&self, node: &str, volume: &str) -> Option<&zebu_api::EngineReport> {
        let l = self.live.get(node)?;
        if l.seen.elapsed() >= NODE_DOWN_AFTER {
            return None;
        }
        l.report.engines.iter().find(|e| e.volume == volume)
    }

    /// The API view of a volume, with state and robustness derived from what nodes report.
    pub fn view(&self, v: &VolumeRecord) -> Volume {
        let replicas: Vec<Replica> = self
            .volume_replicas(&v.name)
            .into_iter()
            .map(|r| Replica {
                name: r.name.clone(),
                volume: r.volume.clone(),
                node: r.node.clone(),
                mode: r.mode,
                generation: r.generation,
                error: r.error.clone().or_else(|| self.missing_on_disk(r)),
                rebuild: (r.mode == ReplicaMode::WO)
                    .then(|| self.member_report(v, &r.name))
                    .flatten()
                    .and_then(|m| m.rebuild.clone()),
                last_rebuild: r.last_rebuild.clone(),
                merge: self
                    .live
                    .get(&r.node)
                    .and_then(|l| l.report.replicas.iter().find(|x| x.name == r.name))
                    .and_then(|x| x.merge.clone()),
                pending_merges: self
                    .live
                    .get(&r.node)
                    .filter(|_| self.node_ready(&r.node))
                    .and_then(|l| l.report.replicas.iter().find(|x| x.name == r.name))
                    .filter(|x| x.error.is_none())
                    .map(|x| x.pending_merges),
            })
            .collect();
        // Replicas that could serve now: in sync, on a ready node, on its disk.
        let usable = self
            .volume_replicas(&v.name)
            .into_iter()
            .filter(|r| {
                r.mode == ReplicaMode::RW
                    && self.node_ready(&r.node)
                    && self.missing_on_disk(r).is_none()
            })
            .count() as u32;
        // Serving: the engine runs with a member in sync (one whose members all failed serves
        // nothing, and is restarted by its agent).
        let running = v
            .desired_node
            .as_deref()
            .and_then(|n| self.engine_report(n, &v.name))
            .filter(|e| e.running && e.replicas.iter().any(|m| m.mode == ReplicaMode::RW));
        let any_engine = self
            .live
            .keys()
            .any(|n| self.engine_report(n, &v.name).is_some());
        let state = if v.deleting {
            VolumeState::Deleting
        } else if !v.created {
            VolumeState::Creating
        } else if v.desired_node.is_some() {
            if running.is_some() {
                VolumeState::Attached
            } else {
                VolumeState::Attaching
            }
        } else if any_engine {
            VolumeState::Detaching
        } else {
            VolumeState::Detached
        };
        let rw = replicas
            .iter()
            .filter(|r| r.mode == ReplicaMode::RW)
            .count() as u32;
        // Attached, but the engine's node is down: nobody can reach the volume, and what its
        // replicas hold now is not known here.
        let engine_node_down = v
            .desired_node
            .as_deref()
            .is_some_and(|n| !self.node_ready(n));
        let robustness = if !v.created || engine_node_down {
            Robustness::Unknown
        } else if rw == 0 || usable == 0 {
            Robustness::Faulted
        } else if usable < v.replica_count {
            Robustness::Degraded
        } else {
            Robustness::Healthy
        };
        let faulted = v.created && !v.deleting && self.start_members(&v.name).is_empty();
        let message = if faulted {
            Some(
                self.salvage_blocked
                    .get(&v.name)
                    .cloned()
                    .unwrap_or_else(|| {
                        "every replica has failed; the volume cannot serve I/O until it is salvaged"
                            .into()
                    }),
            )
        } else if let (Some(n), None) = (&v.desired_node, running) {
            match v
                .desired_node
                .as_deref()
                .and_then(|n| self.engine_report(n, &v.name))
            {
                Some(e) if e.error.is_some() => e.error.clone(),
                _ if !self.node_ready(n) => Some(format!(
                    "node {n}, where the engine runs, is not ready (no heartbeat): the volume cannot be reached until it is back"
                )),
                _ if self.missing_member(&v.name).is_some() => self.missing_member(&v.name),
                _ => Some(format!("waiting for the engine on node {n} to start")),
            }
        } else if v.created && usable < rw {
            // Detached (or serving) with an in-sync replica out of reach: say which.
            self.missing_member(&v.name)
        } else {
            None
        };
        // Attached and growing: how far, and why it waits if it does.
        let message = message.or_else(|| {
            let e = running?;
            (e.size_bytes > 0 && e.size_bytes < v.size_bytes).then(|| {
                let why = e
                    .resize_error
                    .as_deref()
                    .map(|w| format!(" (the last attempt: {w}; it is tried again)"))
                    .unwrap_or_default();
                format!(
                    "expanding from {} to {} bytes: the engine serves {} bytes until every replica in sync has grown{why}",
                    e.size_bytes, v.size_bytes, e.size_bytes
                )
            })
        });
        // Serving, but its node's NBD frontend is turning clients away: for the whole node
        // (every volume there says so), or by this volume's own connection limit.
        let message = message.or_else(|| {
            let n = v.desired_node.as_deref()?;
            let status = &self.live.get(n)?.report.status;
            let why = status
                .nbd_refusing
                .clone()
                .or_else(|| status.nbd_refusing_volumes.get(&v.name).cloned())?;
            Some(format!("node {n} is refusing NBD clients: {why}"))
        });
        Volume {
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            replica_count: v.replica_count,
            block_size: v.block_size,
            state,
            robustness,
            node: if state == VolumeState::Attached {
                v.desired_node.clone()
            } else {
                None
            },
            desired_node: v.desired_node.clone(),
            nbd_uri: running.and_then(|e| e.nbd_uri.clone()),
            nbd_unix_uri: running.and_then(|e| e.nbd_unix_uri.clone()),
            replicas,
            message,
            engine_size_bytes: running.map(|e| e.size_bytes).filter(|s| *s > 0),
            block_file: running.and_then(|e| e.block_file.clone()),
            clone: self.clone_view(
                v,
                v.desired_node
                    .as_deref()
                    .and_then(|n| self.engine_report(n, &v.name))
                    .filter(|e| e.epoch == v.epoch),
            ),
        }
    }

    pub fn volumes(&self) -> Vec<Volume> {
        self.volumes.values().map(|v| self.view(v)).collect()
    }

    pub fn volume(&self, name: &str) -> Result<Volume, ApiError> {
        self.volumes
            .get(name)
            .map(|v| self.view(v))
            .ok_or_else(|| not_found(name))
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.values().map(|n| self.node_view(n)).collect()
    }

    fn node_view(&self, n: &NodeRecord) -> Node {
        let live = self.live.get(&n.name);
        Node {
            name: n.name.clone(),
            address: n.address.clone(),
            data_port: n.data_port,
            nbd_port: n.nbd_port,
            disk_path: n.disk_path.clone(),
            ready: self.node_ready(&n.name),
            heartbeat_age_ms: live.map(|l| l.seen.elapsed().as_millis() as u64),
            replicas: self.replicas.values().filter(|r| r.node == n.name).count() as u32,
            status: live.map(|l| l.report.status.clone()).unwrap_or_default(),
        }
    }

    pub fn create_volume(
        &mut self,
        name: &str,
        size_bytes: u64,
        replica_count: Option<u32>,
    ) -> Result<Volume, ApiError> {
        self.create_volume_as(name, size_bytes, replica_count, None)
    }

    /// A new volume, recorded with its clone record (if a clone) in the same write.
    fn create_volume_as(
        &mut self,
        name: &str,
        size_bytes: u64,
        replica_count: Option<u32>,
        clone: Option<clone::CloneRecord>,
    ) -> Result<Volume, ApiError> {
        validate_volume_name(name)?;
        if self.volumes.contains_key(name) {
            return Err(ApiError::conflict(format!(
                "volume {name} already exists; choose another name or delete it first"
            )));
        }
        if size_bytes == 0 {
            return Err(ApiError::bad_request(
                "volume size must be greater than zero".into(),
            ));
        }
        if !size_bytes.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(ApiError::bad_request(format!(
                "volume size {size_bytes} bytes is not a multiple of the {BLOCK_SIZE}-byte block size"
            )));
        }
        if size_bytes > MAX_VOLUME_BYTES {
            return Err(ApiError::bad_request(format!(
                "volume size {size_bytes} bytes is over the 64 TiB limit"
            )));
        }
        let count = replica_count
            .unwrap_or_else(|| self.setting_u64(crate::settings::DEFAULT_REPLICA_COUNT) as u32);
        if count == 0 {
            return Err(ApiError::bad_request(
                "a volume needs at least one replica".into(),
            ));
        }
        // Hard anti-affinity: one replica per node, on nodes that are up.
        let ready = self.candidate_nodes(name, size_bytes);
        if (ready.len() as u32) < count {
            let small = self.too_small_for(size_bytes);
            if !small.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "volume {name} of {size_bytes} bytes wants {count} replicas, but only {} ready node(s) can hold a file that large: {} (the largest file their filesystems allow; ext4 with 4 KiB blocks stops at 16 TiB); choose a smaller --size, lower --replicas, or add nodes whose disks hold larger files (e.g. XFS)",
                    ready.len(),
                    small.join(", ")
                )));
            }
            return Err(ApiError::bad_request(format!(
                "volume {name} wants {count} replicas but only {} node(s) are ready, and replicas of one volume never share a node; lower --replicas or add nodes",
                ready.len()
            )));
        }
        let record = VolumeRecord {
            name: name.to_owned(),
            size_bytes,
            replica_count: count,
            block_size: BLOCK_SIZE,
            desired_node: None,
            deleting: false,
            created: false,
            epoch: 0,
            salvage_hold: None,
            clone,
        };
        let replicas: Vec<ReplicaRecord> = ready
            .iter()
            .take(count as usize)
            .map(|node| ReplicaRecord::new(name, node, ReplicaMode::RW))
            .collect();
        let vbytes = zebu_store::encode_json(VOLUMES, name, &record);
        let rbytes: Vec<(String, Vec<u8>)> = replicas
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    zebu_store::encode_json(REPLICAS, &r.name, r),
                )
            })
            .collect();
        let mut changes: Vec<(&str, &str, Option<Vec<u8>>)> = vec![(VOLUMES, name, Some(vbytes))];
        for (k, b) in &rbytes {
            changes.push((REPLICAS, k, Some(b.clone())));
        }
        self.store.apply(&changes).map_err(store_err)?;
        self.volumes.insert(name.to_owned(), record);
        for r in replicas {
            self.replicas.insert(r.name.clone(), r);
        }
        tracing::info!(
            volume = name,
            size_bytes,
            replicas = count,
            "volume created"
        );
        self.volume(name)
    }

    fn save_volume(&mut self, v: VolumeRecord) -> Result<(), ApiError> {
        self.store.put(VOLUMES, &v.name, &v).map_err(store_err)?;
        self.volumes.insert(v.name.clone(), v);
        Ok(())
    }

    pub fn delete_volume(&mut self, name: &str) -> Result<Volume, ApiError> {
        let v = self
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))?;
        let view = self.view(&v);
        if let Some(node) = &v.desired_node {
            return Err(ApiError::conflict(format!(
                "volume {name} is attached to node {node}; detach it first (zebu volume detach {name})"
            )));
        }
        if !v.deleting {
            self.refuse_if_clone_source(name, None)?;
        }
        if view.state == VolumeState::Detaching {
            return Err(ApiError::conflict(format!(
                "volume {name} is still detaching; wait until it is detached, then delete it"
            )));
        }
        if !v.deleting {
            let mut v = v;
            v.deleting = true;
            self.save_volume(v)?;
            tracing::info!(volume = name, "volume deleting");
        }
        self.volume(name)
    }

    /// The record of a volume that exists and is not being deleted.
    pub(super) fn live_volume(&self, name: &str) -> Result<VolumeRecord, ApiError> {
        let v = self
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))?;
        if v.deleting {
            return Err(ApiError::conflict(format!(
                "volume {name} is being deleted"
            )));
        }
        Ok(v)
    }

    pub fn attach(&mut self, name: &str, node: Option<String>) -> Result<Volume, ApiError> {
        let v = self.live_volume(name)?;
        let node = match node {
            Some(n) => {
                if !self.nodes.contains_key(&n) {
                    return Err(ApiError::not_found(format!(
                        "node {n} does not exist (see zebu node list)"
                    )));
                }
                if !self.node_ready(&n) {
                    return Err(ApiError::conflict(format!(
                        "node {n} is not ready (no recent heartbeat)"
                    )));
                }
                n
            }
            None => {
                // Prefer a node holding a healthy replica (reads stay local), then any ready node.
                let reps = self.volume_replicas(name);
                reps.iter()
                    .filter(|r| r.mode == ReplicaMode::RW && self.node_ready(&r.node))
                    .map(|r| r.node.clone())
                    .next()
                    .or_else(|| self.ready_nodes().first().map(|n| n.name.clone()))
                    .ok_or_else(|| ApiError::conflict("no node is ready to attach to".into()))?
            }
        };
        if let Some(cur) = &v.desired_node {
            if *cur == node {
                return self.volume(name);
            }
            return Err(ApiError::conflict(format!(
                "volume {name} is attached to node {cur}; detach it first to attach it to {node}"
            )));
        }
        if self.view(&v).state == VolumeState::Detaching {
            return Err(ApiError::conflict(format!(
                "volume {name} is still detaching; try again in a moment"
            )));
        }
        if v.created
            && !self
                .volume_replicas(name)
                .iter()
                .any(|r| r.mode == ReplicaMode::RW)
        {
            return Err(ApiError::conflict(format!(
                "volume {name} is faulted: every replica has failed, so it cannot be attached; see its message (zebu volume get {name}), or bring it back with zebu volume salvage {name}"
            )));
        }
        let mut v = v;
        v.desired_node = Some(node.clone());
        // A new fence for the new attachment, persisted before any engine hears of it: every
        // engine of an earlier attachment is refused by each replica this one reaches.
        v.epoch += 1;
        let epoch = v.epoch;
        self.save_volume(v)?;
        tracing::info!(volume = name, node = %node, epoch, "volume attaching");
        self.volume(name)
    }

    pub fn detach(&mut self, name: &str) -> Result<Volume, ApiError> {
        let v = self
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))?;
        if v.desired_node.is_some() {
            let mut v = v;
            v.desired_node = None;
            self.save_volume(v)?;
            tracing::info!(volume = name, "volume detaching");
        }
        self.volume(name)
    }

    /// The volume's current engine retired these replicas (see `zebu-engine/src/engine/record.rs`):
    /// recorded durably before the answer, so a later start never takes them for in sync.
    /// Refused, changing nothing, for an engine that is not the current attachment's.
    pub fn record_retired(
        &mut self,
        name: &str,
        req: &zebu_api::RetireMembers,
        by: &Speaker,
    ) -> Result<Volume, ApiError> {
        validate_node_name(&req.node)?;
        self.admit(&req.node, by)?;
        if let Some(theirs) = req.cluster_id.as_ref().filter(|t| **t != self.cluster_id) {
            return Err(ApiError::conflict(format!(
                "node {} belongs to cluster {theirs}, but this manager's cluster is {}: its record of volume {name} is refused",
                req.node, self.cluster_id
            )));
        }
        let v = self
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))?;
        if v.epoch != req.epoch || v.desired_node.as_deref() != Some(req.node.as_str()) {
            return Err(ApiError::conflict(format!(
                "volume {name}: the engine of epoch {} on node {} is not the current attachment (epoch {}, node {}): it is fenced and must stop serving",
                req.epoch,
                req.node,
                v.epoch,
                v.desired_node.as_deref().unwrap_or("none")
            )));
        }
        let mut changed = Vec::new();
        for m in &req.retired {
            let Some(rec) = self.replicas.get(&m.name).filter(|r| r.volume == name) else {
                return Err(ApiError::bad_request(format!(
                    "volume {name} has no replica {} (see zebu volume get {name})",
                    m.name
                )));
            };
            if rec.mode == ReplicaMode::ERR {
                continue;
            }
            let mut next = rec.clone();
            next.mode = ReplicaMode::ERR;
            next.error = Some(m.reason.clone());
            next.failed_at_unix = Some(now_unix());
            next.no_space = m.no_space;
            changed.push(next);
        }
        // The survivors' raised generation: the evidence salvage reads if they fail before
        // their node reports it (never lowered).
        for survivor in &req.survivors {
            let Some(rec) = self.replicas.get(survivor).filter(|r| r.volume == name) else {
                continue;
            };
            if rec.generation < req.generation {
                let mut next = rec.clone();
                next.generation = req.generation;
                changed.push(next);
            }
        }
        for r in changed {
            self.store.put(REPLICAS, &r.name, &r).map_err(store_err)?;
            if r.mode == ReplicaMode::ERR {
                tracing::warn!(volume = name, replica = %r.name, node = %r.node, epoch = req.epoch, "replica left the set: {}", r.error.clone().unwrap_or_default());
            }
            self.replicas.insert(r.name.clone(), r);
        }
        self.volume(name)
    }

    /// Take a node's report, update observed state, and answer with what it should run.
    /// A node's heartbeat, sent with `by`'s token. The answer carries the node's own token when
    /// the shared agent token registers it (`state/node_tokens.rs`).
    pub fn heartbeat(&mut self, hb: Heartbeat, by: &Speaker) -> Result<Assignment, ApiError> {
        validate_node_name(&hb.node)?;
        for r in &hb.replicas {
            validate_object_name("replica", &r.name)?;
        }
        self.check_cluster(&hb)?;
        self.admit(&hb.node, by)?;
        let minted = self.mint(&hb.node, by);
        let mut a = self.heartbeat_admitted(hb, minted.as_ref().map(|(_, d)| d.clone()))?;
        a.node_token = minted.map(|(t, _)| t);
        Ok(a)
    }

    /// The heartbeat of a node whose token may speak for it; `new_token_sha256`: a token just
    /// made for it, recorded with the node.
    fn heartbeat_admitted(
        &mut self,
        hb: Heartbeat,
        new_token_sha256: Option<String>,
    ) -> Result<Assignment, ApiError> {
        let node = hb.node.clone();
        let known = self.nodes.get(&node);
        let rec = NodeRecord {
            name: node.clone(),
            address: hb.address.clone(),
            data_port: hb.data_port,
            nbd_port: hb.nbd_port,
            disk_path: hb.disk_path.clone(),
            token_confirmed: new_token_sha256.is_none() && known.is_some_and(|n| n.token_confirmed),
            token_sha256: new_token_sha256.or_else(|| known.and_then(|n| n.token_sha256.clone())),
        };
        if self.nodes.get(&node) != Some(&rec) {
            self.store.put(NODES, &node, &rec).map_err(store_err)?;
            if !self.nodes.contains_key(&node) {
                tracing::info!(node = %node, address = %rec.address, "node registered");
            }
            self.nodes.insert(node.clone(), rec);
        }
        if self.recovering() {
            self.adopt_reported(&node, &hb)?;
            self.record_live(hb);
            return Ok(self.hold());
        }
        self.log_unknown(&node, &hb);
        let mut changed: Vec<ReplicaRecord> = Vec::new();
        // Replica generations and failures reported by this node.
        for r in &hb.replicas {
            if let Some(rec) = self.replicas.get(&r.name) {
                if rec.node != node {
                    continue; // Not ours to report on.
                }
                if r.missing {
                    // Observed, not recorded: the replica is back when its folder is.
                    continue;
                }
                let mut next = rec.clone();
                // Evidence never goes backwards: an older copy put back does not lower it.
                next.generation = rec.generation.max(r.generation);
                next.seen = Some(true);
                if let Some(err) = &r.error {
                    if next.mode != ReplicaMode::ERR {
                        next.failed_at_unix = Some(now_unix());
                    }
                    next.mode = ReplicaMode::ERR;
                    next.error = Some(err.clone());
                }
                if next != *rec {
                    changed.push(next);
                }
            }
        }
        // Replica modes seen by engines on this node: failures, and rebuilds that completed.
        for e in &hb.engines {
            // Only the current attachment's engine speaks for the members: an engine of an
            // earlier epoch (a node that was cut off and came back) is fenced, not a witness.
            let current = self.volumes.get(&e.volume).is_some_and(|v| {
                v.desired_node.as_deref() == Some(node.as_str()) && v.epoch == e.epoch
            });
            if !current {
                continue;
            }
            self.note_clone_copied(e)?;
            for m in &e.replicas {
                let Some(rec) = self.replicas.get(&m.name) else {
                    continue;
                };
                if rec.volume != e.volume {
                    continue;
                }
                let mut next = changed
                    .iter()
                    .find(|c| c.name == m.name)
                    .cloned()
                    .unwrap_or_else(|| rec.clone());
                match (m.mode, next.mode) {
                    // A WO record fails only by its rebuild: the engine's older entry of a
                    // returning member (ERR from before) is what made it be rebuilt.
                    (ReplicaMode::ERR, ReplicaMode::RW) | (ReplicaMode::ERR, ReplicaMode::WO)
                        if next.mode == ReplicaMode::RW || m.rebuild_failed =>
                    {
                        next.mode = ReplicaMode::ERR;
                        next.error = m.error.clone();
                        next.failed_at_unix = Some(now_unix());
                        next.no_space = m.no_space;
                        tracing::warn!(volume = %e.volume, replica = %m.name, "replica failed: {}", m.error.clone().unwrap_or_default());
                    }
                    (ReplicaMode::RW, ReplicaMode::WO) => {
                        next.mode = ReplicaMode::RW;
                        next.error = None;
                        next.failed_at_unix = None;
                        next.no_space = false;
                        if m.last_rebuild.is_some() {
                            next.last_rebuild = m.last_rebuild.clone();
                        }
                        tracing::info!(volume = %e.volume, replica = %m.name, node = %next.node, "replica rebuilt: it is RW again");
                    }
                    // The rebuild's figures may come a report after the member turned RW.
                    (ReplicaMode::RW, ReplicaMode::RW)
                        if m.last_rebuild.is_some() && m.last_rebuild != next.last_rebuild =>
                    {
                        next.last_rebuild = m.last_rebuild.clone();
                    }
                    _ => continue,
                }
                changed.retain(|c| c.name != m.name);
                changed.push(next);
            }
        }
        for r in changed {
            self.store.put(REPLICAS, &r.name, &r).map_err(store_err)?;
            self.replicas.insert(r.name.clone(), r);
        }
        // Deleted volumes: a replica this node no longer has on disk is gone.
        let on_disk: std::collections::HashSet<&str> = hb
            .replicas
            .iter()
            .filter(|r| !r.missing)
            .map(|r| r.name.as_str())
            .collect();
        let gone: Vec<String> = self
            .replicas
            .values()
            .filter(|r| r.node == node && !on_disk.contains(r.name.as_str()))
            .filter(|r| r.removing || self.volumes.get(&r.volume).is_none_or(|v| v.deleting))
            .map(|r| r.name.clone())
            .collect();
        for name in gone {
            self.store.delete(REPLICAS, &name).map_err(store_err)?;
            self.replicas.remove(&name);
        }
        let finished: Vec<String> = self
            .volumes
            .values()
            .filter(|v| v.deleting && !self.replicas.values().any(|r| r.volume == v.name))
            .map(|v| v.name.clone())
            .collect();
        for name in finished {
            self.forget_volume_snapshots(&name)?;
            self.store.delete(VOLUMES, &name).map_err(store_err)?;
            self.volumes.remove(&name);
            tracing::info!(volume = %name, "volume deleted");
        }
        // Volumes whose replicas have all been seen are created.
        let newly_created: Vec<VolumeRecord> = self
            .volumes
            .values()
            .filter(|v| !v.created && !v.deleting)
            .filter(|v| {
                let reps = self.volume_replicas(&v.name);
                !reps.is_empty()
                    && reps.iter().all(|r| {
                        r.node == node && on_disk.contains(r.name.as_str())
                            || self.live.get(&r.node).is_some_and(|l| {
                                l.report
                                    .replicas
                                    .iter()
                                    .any(|x| x.name == r.name && !x.missing)
                            })
                    })
            })
            .cloned()
            .collect();
        for mut v in newly_created {
            v.created = true;
            self.save_volume(v)?;
        }
        self.record_live(hb);
        Ok(self.assignment(&node))
    }

    /// Keep a node's report as what it last said, and when.
    fn record_live(&mut self, hb: Heartbeat) {
        self.live.insert(
            hb.node.clone(),
            Live {
                seen: Instant::now(),
                seen_unix: now_unix(),
                report: hb,
            },
        );
    }

    /// A node of another cluster is refused before anything it says is taken in.
    fn check_cluster(&self, hb: &Heartbeat) -> Result<(), ApiError> {
        match &hb.cluster_id {
            Some(theirs) if *theirs != self.cluster_id => Err(ApiError::conflict(format!(
                "node {} belongs to cluster {theirs}, but this manager's cluster is {}: nothing it reports is taken in. Point the agent at its own cluster's manager. If this manager lost its data directory, stop it and start it again with --recover-from-agents --cluster-id {theirs}",
                hb.node, self.cluster_id
            ))),
            _ => Ok(()),
        }
    }

    /// Log, once each, the replicas a node holds that no record names (left from before a
    /// node removal or a recovery): they are never deleted or used by themselves.
    fn log_unknown(&mut self, node: &str, hb: &Heartbeat) {
        for r in &hb.replicas {
            if r.missing || self.replicas.contains_key(&r.name) {
                continue;
            }
            if self.unknown_logged.insert(r.name.clone()) {
                tracing::warn!(
                    node,
                    replica = %r.name,
                    volume = %r.volume,
                    generation = r.generation,
                    "node {node} holds replica {} that no record names; it is left as it is. To look at its data: zebu replica export DIR OUTPUT on that node ({}/replicas/{})",
                    r.name,
                    hb.disk_path,
                    r.name
                );
            }
        }
    }

    fn assignment(&self, node: &str) -> Assignment {
        let mut replicas = Vec::new();
        let mut delete_replicas = Vec::new();
        for r in self.replicas.values().filter(|r| r.node == node) {
            let Some(v) = self.volumes.get(&r.volume) else {
                delete_replicas.push(r.name.clone());
                continue;
            };
            if v.deleting || r.removing {
                delete_replicas.push(r.name.clone());
            } else {
                replicas.push(ReplicaSpec {
                    name: r.name.clone(),
                    volume: v.name.clone(),
                    size_bytes: v.size_bytes,
                    block_size: v.block_size,
                    create: !r.seen(),
                    clone: v.clone.as_ref().map(|c| zebu_api::ReplicaClone {
                        source: zebu_api::SnapshotRef {
                            volume: c.volume.clone(),
                            snapshot: c.snapshot.clone(),
                        },
                        done: c.done,
                    }),
                });
            }
        }
        let mut engines = Vec::new();
        for v in self.volumes.values() {
            if v.deleting || !v.created || v.desired_node.as_deref() != Some(node) {
                continue;
            }
            let members = self.start_members(&v.name);
            if members.is_empty() {
                continue;
            }
            // Replicas to rebuild: on a ready node that serves them (created, on disk).
            let rebuild: Vec<EngineReplica> = self
                .volume_replicas(&v.name)
                .into_iter()
                .filter(|r| r.mode == ReplicaMode::WO && self.served(r))
                .filter(|r| !members.iter().any(|m| m.name == r.name))
                .filter_map(|r| self.engine_replica(r))
                .collect();
            // Every member the manager records in sync holds every acknowledged write (an
            // engine records a retirement before it acknowledges a write that skipped the
            // member), so an engine may start without some of them: it records those it
            // cannot reach before it serves. It waits for a member whose node may be
            // restarting (down less than START_WITHOUT_AFTER), or that is up but not serving
            // the replica yet, and needs one member it can reach.
            let already = self.engine_report(node, &v.name).is_some();
            if !already && self.member_to_wait_for(&v.name).is_some() {
                continue;
            }
            engines.push(EngineSpec {
                volume: v.name.clone(),
                size_bytes: v.size_bytes,
                // Every replica that is not failed counts: a rebuilt one may have gone on alone
                // before its RW reached us.
                min_generation: self
                    .volume_replicas(&v.name)
                    .iter()
                    .filter(|r| r.mode != ReplicaMode::ERR)
                    .map(|r| r.generation)
                    .max()
                    .unwrap_or(0),
                epoch: v.epoch,
                generation_floor: self
                    .volume_replicas(&v.name)
                    .iter()
                    .map(|r| r.generation)
                    .max()
                    .unwrap_or(0),
                replicas: members
                    .iter()
                    .filter_map(|r| self.engine_replica(r))
                    .collect(),
                rebuild,
                replica_count: v.replica_count as usize,
                may_leave_out: members
                    .iter()
                    .filter(|r| self.may_leave_out(r))
                    .map(|r| r.name.clone())
                    .collect(),
                rebuild_rate: self
                    .setting_u64(crate::settings::REPLICA_REBUILD_BANDWIDTH_LIMIT)
                    .saturating_mul(1 << 20),
                snapshots: Some(self.snapshot_keys(&v.name)),
                clone: self.clone_spec(v),
            });
        }
        Assignment {
            cluster_id: self.cluster_id.clone(),
            hold: None,
            secret: self.secret.clone(),
            replicas,
            engines,
            delete_replicas,
            node_token: None,
        }
    }

    fn engine_replica(&self, r: &ReplicaRecord) -> Option<EngineReplica> {
        let n = self.nodes.get(&r.node)?;
        Some(EngineReplica {
            name: r.name.clone(),
            node: r.node.clone(),
            address: format!("{}:{}", n.address, n.data_port),
        })
    }

    /// `r`'s node is ready and serves it (on disk, opened, no error) — for a failed replica, in
    /// a report that came after it failed (a report from before says nothing of it now: its
    /// node may have died right after).
    fn served(&self, r: &ReplicaRecord) -> bool {
        self.node_ready(&r.node)
            && self.live.get(&r.node).is_some_and(|l| {
                let since_failure = match (r.mode, r.failed_at_unix) {
                    (ReplicaMode::ERR, Some(f)) => l.seen_unix > f,
                    _ => true,
                };
                since_failure
                    && l.report
                        .replicas
                        .iter()
                        .any(|x| x.name == r.name && !x.missing && x.error.is_none())
            })
    }

    /// What the volume's current engine (its node's, of its epoch) reports of a member.
    fn member_report(&self, v: &VolumeRecord, replica: &str) -> Option<&zebu_api::MemberReport> {
        let e = self.engine_report(v.desired_node.as_deref()?, &v.name)?;
        if e.epoch != v.epoch {
            return None;
        }
        e.replicas.iter().find(|m| m.name == replica)
    }

    /// Why `r` is not on its node's disk, when its node (ready) says so.
    fn missing_on_disk(&self, r: &ReplicaRecord) -> Option<String> {
        let l = self.live.get(&r.node)?;
        if l.seen.elapsed() >= NODE_DOWN_AFTER {
            return None;
        }
        l.report
            .replicas
            .iter()
            .find(|x| x.name == r.name && x.missing)
            .map(|x| {
                x.error
                    .clone()
                    .unwrap_or_else(|| "missing from disk".into())
            })
    }

    /// Why an engine for `volume` cannot start yet: an in-sync member whose node is down or does
    /// not serve it.
    /// The replicas an engine starts with: RW ones, and WO ones that may have completed their
    /// rebuild and gone on before their RW reached the manager (their generation reached the
    /// rest's: a rebuild's target stays below the set until it turns RW, so one that has not
    /// is never taken).
    fn start_members(&self, volume: &str) -> Vec<&ReplicaRecord> {
        let reps = self.volume_replicas(volume);
        // The freshest evidence among the others: a rebuild target stays below the set it
        // joined until it is complete, and every member that left the set is below the set.
        let others_max = reps
            .iter()
            .filter(|r| r.mode != ReplicaMode::WO)
            .map(|r| r.generation)
            .max();
        reps.into_iter()
            .filter(|r| match r.mode {
                ReplicaMode::RW => true,
                ReplicaMode::WO => r.seen() && others_max.is_some_and(|g| r.generation >= g),
                ReplicaMode::ERR => false,
            })
            .collect()
    }

    /// How long `node` has been without a heartbeat (zero while ready), counting from this
    /// manager's start at most.
    fn down_for(&self, node: &str) -> Duration {
        if self.node_ready(node) {
            return Duration::ZERO;
        }
        let since = self
            .live
            .get(node)
            .map(|l| l.seen.max(self.started))
            .unwrap_or(self.started);
        since.elapsed()
    }

    /// Why an engine for `volume` should not start yet: a member it should wait for (see
    /// `assignment`), or no member that could serve.
    fn member_to_wait_for(&self, volume: &str) -> Option<String> {
        let members = self.start_members(volume);
        // Skipping a member needs an RW record among the rest: a WO one that reached the
        // set's recorded generation may be a rebuild still copying, whose set raised its
        // generation past it without the manager hearing yet.
        let skipping = members.iter().any(|r| self.may_leave_out(r));
        let reachable_rw = members
            .iter()
            .any(|r| !self.may_leave_out(r) && r.mode == ReplicaMode::RW);
        if skipping && !reachable_rw {
            return self.missing_member(volume);
        }
        members
            .into_iter()
            .filter(|r| !self.may_leave_out(r))
            .find_map(|r| self.why_missing(r))
    }

    /// An engine may start without `r`: its node has been down for [`START_WITHOUT_AFTER`].
    fn may_leave_out(&self, r: &ReplicaRecord) -> bool {
        self.down_for(&r.node) >= START_WITHOUT_AFTER
    }

    fn missing_member(&self, volume: &str) -> Option<String> {
        self.start_members(volume)
            .into_iter()
            .find_map(|r| self.why_missing(r))
    }

    fn why_missing(&self, r: &ReplicaRecord) -> Option<String> {
        if !self.node_ready(&r.node) {
            Some(format!(
                "waiting for node {} (holds replica {}) to come back; an engine starts without it once the node has been down {} s, if another replica in sync is up",
                r.node,
                r.name,
                START_WITHOUT_AFTER.as_secs()
            ))
        } else if let Some(why) = self.missing_on_disk(r) {
            Some(format!("waiting for replica {}: {why}", r.name))
        } else if !self
            .live
            .get(&r.node)
            .is_some_and(|l| l.report.replicas.iter().any(|x| x.name == r.name))
        {
            Some(format!(
                "waiting for node {} to serve replica {}",
                r.node, r.name
            ))
        } else {
            None
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!(
        "volume {name} does not exist (see zebu volume list)"
    ))
}
