//! The Zebu REST API: the types the manager serves (`/v1/...`) and the HTTP client the CLI and
//! the agents use. JSON on the wire; every request carries `Authorization: Bearer <token>`.

pub mod cluster_id;
pub mod durable;
pub mod node_token;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Creating,
    Detached,
    Attaching,
    Attached,
    Detaching,
    Deleting,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Detached => "detached",
            VolumeState::Attaching => "attaching",
            VolumeState::Attached => "attached",
            VolumeState::Detaching => "detaching",
            VolumeState::Deleting => "deleting",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Robustness {
    Healthy,
    Degraded,
    Faulted,
    Unknown,
}

impl Robustness {
    pub fn as_str(self) -> &'static str {
        match self {
            Robustness::Healthy => "healthy",
            Robustness::Degraded => "degraded",
            Robustness::Faulted => "faulted",
            Robustness::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaMode {
    RW,
    WO,
    ERR,
}

impl ReplicaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaMode::RW => "RW",
            ReplicaMode::WO => "WO",
            ReplicaMode::ERR => "ERR",
        }
    }
}

/// A rebuild in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildStatus {
    /// `full` (the replica was empty) or `delta` (it held data from before it left).
    pub kind: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes already in place when this attempt began: a rebuild resumed after an
    /// interruption (0 for one that started from the beginning).
    #[serde(default)]
    pub resumed_from: u64,
}

/// The last rebuild that completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRebuild {
    pub kind: String,
    /// Bytes of data written to the replica (holes are not counted).
    pub bytes_copied: u64,
    pub duration_ms: u64,
    /// Bytes already in place when its last attempt began (0: it ran from the beginning).
    #[serde(default)]
    pub resumed_from: u64,
    /// Snapshots its last attempt copied to it, and those it already held and kept.
    #[serde(default)]
    pub snapshots_copied: u64,
    #[serde(default)]
    pub snapshots_kept: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub name: String,
    pub volume: String,
    pub node: String,
    pub mode: ReplicaMode,
    /// Generation last reported from the replica's metadata.
    pub generation: u64,
    /// Why the replica left the set, when it is ERR.
    pub error: Option<String>,
    /// While WO: the rebuild's progress, as the engine reports it.
    #[serde(default)]
    pub rebuild: Option<RebuildStatus>,
    #[serde(default)]
    pub last_rebuild: Option<LastRebuild>,
    /// A deleted snapshot's data being merged on this replica, as its node reports it.
    #[serde(default)]
    pub merge: Option<MergeStatus>,
    /// Deleted snapshots whose data this replica has still to merge (the running merge
    /// included), as its node reports it; null while its node does not report.
    #[serde(default)]
    pub pending_merges: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub size_bytes: u64,
    pub replica_count: u32,
    pub block_size: u32,
    pub state: VolumeState,
    pub robustness: Robustness,
    /// The node the volume is attached to (null when detached).
    pub node: Option<String>,
    /// The node it should be attached to (null when it should be detached).
    pub desired_node: Option<String>,
    pub nbd_uri: Option<String>,
    /// The same export over a unix socket, for clients on the attached node (lower latency).
    #[serde(default)]
    pub nbd_unix_uri: Option<String>,
    pub replicas: Vec<Replica>,
    /// What the manager is waiting for or what went wrong, if anything.
    pub message: Option<String>,
    /// The size the attached engine serves now (null while detached): below `size_bytes`
    /// while an expansion is under way. An NBD connection opened afterwards sees this size.
    #[serde(default)]
    pub engine_size_bytes: Option<u64>,
    /// On the attached node, the volume as a file of its size (the FUSE frontend, when the
    /// agent runs with `--fuse-dir`): `losetup --direct-io=on -f --show` makes it a block device.
    #[serde(default)]
    pub block_file: Option<String>,
    /// A clone: its source and its copy's progress (null for a volume that is not a clone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub address: String,
    pub data_port: u16,
    pub nbd_port: u16,
    pub disk_path: String,
    pub ready: bool,
    /// Milliseconds since the last heartbeat (null: none since the manager started).
    pub heartbeat_age_ms: Option<u64>,
    pub replicas: u32,
    /// What the node last reported of its disk and its NBD frontend (zeros and none until it
    /// has reported since the manager started).
    #[serde(flatten)]
    pub status: NodeStatus,
}

/// A node's disk and NBD frontend, as its agent reports them in every heartbeat (and as the
/// node's view shows them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    /// The largest file the node's disk holds (its filesystem's limit; 0: not known): a volume
    /// larger than this cannot have a replica there.
    #[serde(default)]
    pub max_file_bytes: u64,
    /// Set while the node's NBD frontend has turned a client away in the last minute for a
    /// reason of the whole node (its connection limit, ...), with why.
    #[serde(default)]
    pub nbd_refusing: Option<String>,
    /// Volumes whose own connection limit turned a client away in the last minute, with why.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub nbd_refusing_volumes: std::collections::BTreeMap<String, String>,
    /// NBD connections open on the node.
    #[serde(default)]
    pub nbd_connections: u64,
}

/// A cluster-wide setting (Longhorn's names and units).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    pub name: String,
    /// The value in force (the default unless a person set one).
    pub value: String,
    pub default: String,
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetSetting {
    pub value: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateVolume {
    pub name: String,
    pub size_bytes: u64,
    pub replica_count: Option<u32>,
    /// A clone: the new volume has this snapshot's content (and its size: `size_bytes` must be
    /// 0 or the source's). Usable as soon as it is attached; its engine copies the snapshot in
    /// the background while attached (`Volume::clone` shows how far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_from: Option<SnapshotRef>,
}

/// A snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub volume: String,
    pub snapshot: String,
}

/// A clone's copy from its source snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneStatus {
    /// The source volume and snapshot.
    pub volume: String,
    pub snapshot: String,
    /// Bytes walked by the copy, of `bytes_total` (as the engine last reported; 0 while the
    /// clone is detached: the copy runs in its engine, and resumes where it was when attached).
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// The engine has copied everything (every block is the clone's own).
    #[serde(default)]
    pub copied: bool,
    /// The manager has recorded the clone done: an ordinary volume, independent of its source.
    #[serde(default)]
    pub done: bool,
    /// Why the copy waits, if it does (tried again).
    #[serde(default)]
    pub error: Option<String>,
}

/// `POST /v1/volumes/{name}/expand`: grow the volume to `size_bytes` (a multiple of the block
/// size; the same size again changes nothing; a smaller one is refused). Answered once the new
/// size is recorded; an attached volume's engine grows its replicas and then itself within a
/// heartbeat or two (`engine_size_bytes` shows it), a detached one's replicas grow at its next
/// attach.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpandVolume {
    pub size_bytes: u64,
}

/// `POST /v1/volumes/{name}/retire` (agents): the volume's engine retired these replicas from
/// its set. Answered once the record is durable; refused (409) unless `epoch` and `node` are the
/// volume's current attachment, and then that engine must stop serving.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetireMembers {
    /// The cluster of the agent that sends it: another cluster's manager refuses it (409).
    #[serde(default)]
    pub cluster_id: Option<String>,
    pub node: String,
    pub epoch: u64,
    pub retired: Vec<RetiredMember>,
    /// The members still in sync, durably at `generation` (raised past the retired ones'):
    /// evidence the manager keeps (it never lowers a recorded generation).
    #[serde(default)]
    pub survivors: Vec<String>,
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetiredMember {
    pub name: String,
    /// Why it left the set.
    pub reason: String,
    /// It left because its disk is full (replaced at once, not waited for).
    #[serde(default)]
    pub no_space: bool,
}

/// `POST /v1/volumes/{name}/salvage`: bring a volume whose replicas all failed back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SalvageVolume {
    /// The replica to bring back; none: the freshest by recorded evidence.
    #[serde(default)]
    pub replica: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttachVolume {
    pub node: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: String,
}

// ---- snapshots ----

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSnapshot {
    /// Chosen by the manager when absent (`snap-` and 8 hex digits).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A system snapshot: one Zebu takes for its own work (`snapshot purge` removes these).
    #[serde(default)]
    pub system: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub volume: String,
    /// The snapshot below it (null: the oldest).
    pub parent: Option<String>,
    /// Snapshots taken on top of it (and `volume-head` for the live head).
    #[serde(default)]
    pub children: Vec<String>,
    /// Unix seconds when it was taken.
    pub created_unix: u64,
    /// Bytes its own layer holds (on the first replica that answered).
    pub size_bytes: u64,
    /// `user`, or `system` (made by Zebu for its own work).
    pub kind: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The label every replica's layer of a snapshot carries: the snapshot's unique id.
pub const SNAPSHOT_UID_LABEL: &str = "zebu.io/uid";

/// How an engine tells an acknowledged snapshot (in [`EngineSpec::snapshots`]) from another of
/// the same name (one deleted while a member was away, then taken again): name and unique id.
pub fn snapshot_key(name: &str, uid: &str) -> String {
    if uid.is_empty() {
        name.to_owned()
    } else {
        format!("{name}#{uid}")
    }
}

/// A merge of a deleted snapshot running on a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeStatus {
    pub replica: String,
    pub snapshot: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// One layer of a replica's tree, as an agent reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerView {
    pub id: u64,
    pub parent: u64,
    pub created_unix: u64,
    pub size_bytes: u64,
    pub head: bool,
    pub system: bool,
    pub removed: bool,
    pub name: String,
    #[serde(default)]
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaLayers {
    pub replica: String,
    pub layers: Vec<LayerView>,
    #[serde(default)]
    pub merge: Option<MergeStatus>,
}

/// Work the manager hands an agent right away (not at the next heartbeat): see
/// `POST /v1/agent/commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCommand {
    pub id: u64,
    pub volume: String,
    /// For work on one replica (the volume detached); `None`: the node's engine of the volume.
    #[serde(default)]
    pub replica: Option<String>,
    pub action: CommandAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandAction {
    SnapshotCreate {
        name: String,
        /// Tells this snapshot from an older one of the same name (see [`snapshot_key`]).
        uid: String,
        system: bool,
        created_unix: u64,
        labels: Vec<(String, String)>,
    },
    SnapshotDelete {
        name: String,
    },
    /// Make the replica's content exactly the snapshot's (the volume detached).
    SnapshotRevert {
        name: String,
    },
    Layers,
}

/// An agent asks for its commands (long poll: answered when one comes, or after a few seconds
/// with none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollCommands {
    pub node: String,
}

/// What became of a command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: u64,
    pub node: String,
    /// Why it failed (None: done).
    #[serde(default)]
    pub error: Option<String>,
    /// For a refusal: `exists`, `not_found` or `busy`.
    #[serde(default)]
    pub refusal: Option<String>,
    /// For `layers`: each member's (or the one replica's) tree.
    #[serde(default)]
    pub layers: Vec<ReplicaLayers>,
}

// ---- agent ↔ manager ----

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub name: String,
    pub volume: String,
    pub generation: u64,
    pub size_bytes: u64,
    /// Set when the replica could not be opened or created, or refuses I/O.
    pub error: Option<String>,
    /// The replica is not on this node's disk at all (its directory or `replica.meta` is
    /// missing), and the agent was not told to create it: `error` says where it looked. Not a
    /// durable failure: the replica comes back when its directory does.
    #[serde(default)]
    pub missing: bool,
    /// The highest engine epoch the replica has accepted (its fence), from its `replica.meta`.
    #[serde(default)]
    pub epoch: u64,
    /// Its block size (0 when it could not be opened).
    #[serde(default)]
    pub block_size: u32,
    /// A merge of a deleted snapshot running on it.
    #[serde(default)]
    pub merge: Option<MergeStatus>,
    /// Deleted snapshots it has still to merge (the running one included).
    #[serde(default)]
    pub pending_merges: u32,
    /// Its directory holds a clone mark: it belongs to a clone of this snapshot whose copy is
    /// not done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<SnapshotRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberReport {
    pub name: String,
    pub mode: ReplicaMode,
    pub error: Option<String>,
    #[serde(default)]
    pub rebuild: Option<RebuildStatus>,
    /// Set once a rebuild of this member completed on this engine.
    #[serde(default)]
    pub last_rebuild: Option<LastRebuild>,
    /// ERR because its last rebuild failed (not the older failure that made it leave the set).
    #[serde(default)]
    pub rebuild_failed: bool,
    /// ERR because its disk is full (it refused a write the others took).
    #[serde(default)]
    pub no_space: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineReport {
    pub volume: String,
    /// True once the engine serves I/O; false while starting or after a failed start.
    pub running: bool,
    pub generation: u64,
    /// The epoch the engine was started with (see [`EngineSpec::epoch`]).
    #[serde(default)]
    pub epoch: u64,
    pub nbd_uri: Option<String>,
    #[serde(default)]
    pub nbd_unix_uri: Option<String>,
    pub replicas: Vec<MemberReport>,
    pub error: Option<String>,
    /// The size the engine serves (0 while it does not run); below the volume's size while
    /// it grows.
    #[serde(default)]
    pub size_bytes: u64,
    /// Why the last attempt to grow the engine to the volume's size failed (it is tried again).
    #[serde(default)]
    pub resize_error: Option<String>,
    /// The volume's file in the node's FUSE frontend (`--fuse-dir`), when it is served there.
    #[serde(default)]
    pub block_file: Option<String>,
    /// A clone's copy, while the engine has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The cluster this node's replicas belong to (`DATA_DIR/cluster.id`); `None` until a
    /// manager first answered it.
    #[serde(default)]
    pub cluster_id: Option<String>,
    pub node: String,
    pub address: String,
    pub data_port: u16,
    pub nbd_port: u16,
    pub disk_path: String,
    #[serde(flatten)]
    pub status: NodeStatus,
    pub replicas: Vec<ReplicaReport>,
    pub engines: Vec<EngineReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    pub name: String,
    pub volume: String,
    pub size_bytes: u64,
    pub block_size: u32,
    /// Create the replica, empty, if it is not on disk. Only for a replica no node has ever
    /// reported: one that was there once and is gone is reported missing, never recreated.
    #[serde(default)]
    pub create: bool,
    /// The replica belongs to a clone: while not done, its agent keeps a mark of the source in
    /// the replica's directory (so the fact survives the manager's records); done, it removes
    /// the mark. `None`: leave any mark as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<ReplicaClone>,
}

/// What a clone's replica is marked with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaClone {
    pub source: SnapshotRef,
    pub done: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineReplica {
    pub name: String,
    pub node: String,
    /// `ip:port` of the replica's data server.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSpec {
    pub volume: String,
    pub size_bytes: u64,
    /// The highest generation the manager has seen on any of these replicas: the engine refuses
    /// to start if the freshest replica it reaches is older (a fresher one is missing).
    pub min_generation: u64,
    /// The fence for this attachment: issued (and persisted) by the manager each time the
    /// volume is attached, sent to every replica in the handshake; replicas refuse engines of a
    /// lower epoch from then on.
    #[serde(default)]
    pub epoch: u64,
    /// The members in sync (RW): every one must answer before the engine serves.
    pub replicas: Vec<EngineReplica>,
    /// The highest generation any replica of the volume was seen at: the set starts above it.
    #[serde(default)]
    pub generation_floor: u64,
    /// Replicas to add to the running engine by rebuild (WO until they are complete).
    #[serde(default)]
    pub rebuild: Vec<EngineReplica>,
    /// Speed limit of each rebuild, bytes per second (0: none).
    #[serde(default)]
    pub rebuild_rate: u64,
    /// Replicas the volume should have: with fewer in the set, the write-intent log keeps
    /// what changed for the ones away (0: as many as `replicas`).
    #[serde(default)]
    pub replica_count: usize,
    /// Members the engine may start without when it cannot reach them (their node has been
    /// down long enough); every other member given must be reached, or the start waits.
    #[serde(default)]
    pub may_leave_out: Vec<String>,
    /// The volume's snapshots the manager has recorded: at start, a member's snapshot not among
    /// them (one a crash cut short before it was acknowledged) is deleted. `None`: keep those
    /// every member holds.
    #[serde(default)]
    pub snapshots: Option<Vec<String>>,
    /// The volume is a clone not recorded done: what it reads through to and copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneSpec>,
}

/// The source of a clone, for its engine: the snapshot, and the source's replicas in sync
/// (each holds it), read over reader sessions that fence nobody.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSpec {
    pub volume: String,
    pub snapshot: String,
    pub replicas: Vec<EngineReplica>,
}

/// What the manager wants a node to run (the answer to a heartbeat). Level-triggered: the full
/// desired set every time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    /// The manager's cluster: an agent of another cluster acts on nothing in this answer.
    #[serde(default)]
    pub cluster_id: String,
    /// Set while the manager cannot say what the node should run (it is recovering its records
    /// from the agents): the node keeps what it runs, creates, starts, stops and deletes
    /// nothing. Says why.
    #[serde(default)]
    pub hold: Option<String>,
    /// The secret replica data connections must present.
    pub secret: String,
    pub replicas: Vec<ReplicaSpec>,
    pub engines: Vec<EngineSpec>,
    /// Replicas whose data must be deleted (their volume was deleted).
    pub delete_replicas: Vec<String>,
    /// The node's own token, given once when the shared agent token registers it: the agent
    /// keeps it in `DATA_DIR/node.token` and uses it from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_token: Option<String>,
}

// ---- client ----

/// A name as one URL path segment: every byte but letters, digits, '-', '.', '_' and '~'
/// percent-encoded, so `a/../b` or `a?x=1` stays one (invalid) name and never becomes a path.
pub fn seg(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the Zebu manager at {url}: {reason} (is `zebu up` or `zebu manager` running? set --api or ZEBU_API)")]
    Unreachable { url: String, reason: String },
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from the manager at {url}: {reason}")]
    BadAnswer { url: String, reason: String },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    /// Shared by clones: an agent switches to its node's own token once it has one.
    token: std::sync::Arc<std::sync::RwLock<String>>,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: &str, token: &str) -> ApiClient {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            // The manager closes a connection idle for 5 s: never reuse one that old.
            .pool_idle_timeout(std::time::Duration::from_secs(4))
            .build()
            .expect("invariant: a plain HTTP client always builds");
        ApiClient {
            base: base.trim_end_matches('/').to_owned(),
            token: std::sync::Arc::new(std::sync::RwLock::new(token.to_owned())),
            http,
        }
    }

    /// Use `token` from now on (in this client and every clone of it).
    pub fn set_token(&self, token: &str) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = token.to_owned();
    }

    pub fn token(&self) -> String {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, ClientError> {
        let resp =
            req.bearer_auth(self.token())
                .send()
                .await
                .map_err(|e| ClientError::Unreachable {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            url: url.to_owned(),
            reason: e.to_string(),
        })
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(&url), &url).await
    }

    pub async fn post<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(&url).json(body), &url).await
    }

    pub async fn delete<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.delete(&url), &url).await
    }

    pub async fn list_volumes(&self) -> Result<Vec<Volume>, ClientError> {
        self.get("/v1/volumes").await
    }
    pub async fn get_volume(&self, name: &str) -> Result<Volume, ClientError> {
        self.get(&format!("/v1/volumes/{}", seg(name))).await
    }
    pub async fn get_snapshot(&self, volume: &str, name: &str) -> Result<Snapshot, ClientError> {
        self.get(&format!(
            "/v1/volumes/{}/snapshots/{}",
            seg(volume),
            seg(name)
        ))
        .await
    }
    pub async fn create_volume(&self, req: &CreateVolume) -> Result<Volume, ClientError> {
        self.post("/v1/volumes", req).await
    }
    pub async fn expand_volume(&self, name: &str, size_bytes: u64) -> Result<Volume, ClientError> {
        self.post(
            &format!("/v1/volumes/{}/expand", seg(name)),
            &ExpandVolume { size_bytes },
        )
        .await
    }
    pub async fn delete_volume(&self, name: &str) -> Result<Volume, ClientError> {
        self.delete(&format!("/v1/volumes/{}", seg(name))).await
    }
    pub async fn attach_volume(
        &self,
        name: &str,
        node: Option<String>,
    ) -> Result<Volume, ClientError> {
        self.post(
            &format!("/v1/volumes/{}/attach", seg(name)),
            &AttachVolume { node },
        )
        .await
    }
    pub async fn salvage_volume(
        &self,
        name: &str,
        replica: Option<String>,
    ) -> Result<Volume, ClientError> {
        self.post(
            &format!("/v1/volumes/{}/salvage", seg(name)),
            &SalvageVolume { replica },
        )
        .await
    }
    pub async fn detach_volume(&self, name: &str) -> Result<Volume, ClientError> {
        self.post(
            &format!("/v1/volumes/{}/detach", seg(name)),
            &serde_json::json!({}),
        )
        .await
    }
    pub async fn list_nodes(&self) -> Result<Vec<Node>, ClientError> {
        self.get("/v1/nodes").await
    }
    pub async fn list_settings(&self) -> Result<Vec<Setting>, ClientError> {
        self.get("/v1/settings").await
    }
    pub async fn get_setting(&self, name: &str) -> Result<Setting, ClientError> {
        self.get(&format!("/v1/settings/{}", seg(name))).await
    }
    pub async fn set_setting(&self, name: &str, value: &str) -> Result<Setting, ClientError> {
        self.post(
            &format!("/v1/settings/{}", seg(name)),
            &SetSetting {
                value: value.to_owned(),
            },
        )
        .await
    }
    pub async fn retire_members(
        &self,
        volume: &str,
        req: &RetireMembers,
    ) -> Result<Volume, ClientError> {
        self.post(&format!("/v1/volumes/{}/retire", seg(volume)), req)
            .await
    }
    /// `DELETE /v1/nodes/{name}`: forget a node; `force` names it again to remove the only
    /// in-sync copies it holds.
    pub async fn delete_node(&self, name: &str, force: Option<&str>) -> Result<Node, ClientError> {
        let mut path = format!("/v1/nodes/{}", seg(name));
        if let Some(f) = force {
            path.push_str(&format!("?force={}", seg(f)));
        }
        self.delete(&path).await
    }
    pub async fn poll_commands(&self, node: &str) -> Result<Vec<AgentCommand>, ClientError> {
        self.post(
            "/v1/agent/commands",
            &PollCommands {
                node: node.to_owned(),
            },
        )
        .await
    }

    pub async fn command_result(&self, r: &CommandResult) -> Result<(), ClientError> {
        let _: serde_json::Value = self.post("/v1/agent/results", r).await?;
        Ok(())
    }

    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<Assignment, ClientError> {
        self.post("/v1/agent/heartbeat", hb).await
    }
}
