//! Zebu agent: one per node (Longhorn's instance manager). It registers the node and its disk
//! with the manager, heartbeats, and runs in-process the replicas and engines the manager
//! assigns, together with the node's replica data server and NBD server.
//!
//! Control and data are kept apart: the heartbeat loop runs on the caller's runtime, while the
//! data servers and engines run on a dedicated data-path runtime ([`data_runtime`]) whose
//! threads never wait on the manager. Blocking file I/O runs on the replica server's own
//! I/O threads.

mod clone_mark;
pub mod fuse;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use zebu_api::{
    ApiClient, Assignment, EngineReplica, EngineReport, EngineSpec, Heartbeat, LastRebuild,
    MemberReport, RebuildStatus, ReplicaMode, ReplicaReport,
};
pub use zebu_engine::nbd::Limits as NbdLimits;
pub use zebu_engine::tls::TlsFiles as NbdTlsFiles;
use zebu_engine::{
    Engine, EngineConfig, LocalReplica, MembershipRecord, Mode, NbdServer, RecordError,
    ReplicaTarget,
};
use zebu_replica::file::FileLayer;
use zebu_replica::{Replica, ReplicaServer};

pub const DEFAULT_DATA_PORT: u16 = 10700;
pub const DEFAULT_NBD_PORT: u16 = 10809;
/// How long an NBD connection's thread polls before it sleeps, by default (see
/// `zebu_engine::busy_poll`).
pub const DEFAULT_BUSY_POLL_US: u64 = zebu_engine::busy_poll::DEFAULT_WINDOW.as_micros() as u64;
/// Seconds between scrubs of an attached volume, by default (a week).
pub const DEFAULT_SCRUB_INTERVAL_S: u64 = 7 * 24 * 3600;
/// Scrub speed limit by default, in MiB of volume data per second.
pub const DEFAULT_SCRUB_MIBS: u64 = 32;
/// A failed engine start is retried after 1 s, then 2 s, 4 s, and this long at most: a power
/// cut's restarts in any order (an engine's node up before its replicas' nodes) serve again
/// within a second or two of the last node's return.
const ENGINE_RETRY: Duration = Duration::from_secs(5);

/// How long after its `failures`-th failed start in a row an engine is started again.
fn engine_retry(failures: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(failures.saturating_sub(1).min(8)))
        .min(ENGINE_RETRY)
}
/// A failed rebuild is tried again after this long (if the manager still asks for it).
const REBUILD_RETRY: Duration = Duration::from_secs(5);
/// A replica that does not answer a request within this time leaves the set.
const IO_TIMEOUT: Duration = Duration::from_secs(8);

/// The process-wide runtime for the data path (replica servers, engines, NBD).
pub fn data_runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("zebu-data")
            .enable_all()
            .build()
            .expect("the data-path runtime must start")
    })
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub data_dir: PathBuf,
    /// The node's own address: replica traffic and NBD are served there.
    pub listen_ip: IpAddr,
    pub data_port: u16,
    /// The port other nodes reach the data server on, when not `data_port` (a port forward
    /// or a proxy in between).
    pub advertise_data_port: Option<u16>,
    pub nbd_port: u16,
    pub manager_url: String,
    pub token: String,
    pub heartbeat_interval: Duration,
    /// I/O threads of the replica server.
    pub io_threads: usize,
    /// How long an NBD connection's thread may poll before it sleeps (zero: never).
    pub busy_poll: Duration,
    /// How many NBD connections the node takes.
    pub nbd_limits: zebu_engine::nbd::Limits,
    /// TLS credentials for NBD over TCP: with them, TCP clients must use TLS.
    pub nbd_tls: zebu_engine::tls::TlsFiles,
    /// TCP clients may use NBD without TLS: with TLS credentials, TLS becomes optional; without
    /// them, NBD may be served plain on an address other than loopback.
    pub nbd_plain_tcp: bool,
    /// The data protocol over TLS: engines start it, the replica server requires it.
    pub data_tls: bool,
    /// Background scrubs of attached volumes.
    pub scrub: Scrub,
    /// Bytes a second a merge of a deleted snapshot copies.
    pub merge_rate: u64,
    /// The file layer under every replica ([`zebu_replica::file::direct`] but in tests).
    pub files: Arc<dyn FileLayer>,
    /// Where the FUSE frontend serves every volume attached here as a file (none: no FUSE).
    pub fuse_dir: Option<PathBuf>,
}

/// Background scrubs of attached volumes (see [`Engine::scrub`]).
#[derive(Debug, Clone, Copy)]
pub struct Scrub {
    /// Time between scrubs of a volume, the first one after attach; zero: never.
    pub interval: Duration,
    /// Speed limit in bytes of volume data per second; zero: none.
    pub rate: u64,
}

/// This agent's rebuilds, by replica.
enum RebuildState {
    Running,
    Failed { at: Instant },
    Done(LastRebuild),
}

enum EngineSlot {
    /// `failures`: failed starts in a row before this one.
    Starting {
        failures: u32,
    },
    Running(Arc<Engine>),
    Failed {
        error: String,
        at: Instant,
        failures: u32,
    },
}

pub struct Agent {
    cfg: AgentConfig,
    api: ApiClient,
    replicas_dir: PathBuf,
    server: Arc<ReplicaServer>,
    nbd: Arc<NbdServer>,
    engines: Mutex<HashMap<String, EngineSlot>>,
    /// Replicas on disk that could not be opened or created, with why.
    replica_errors: Mutex<HashMap<String, (String, String)>>,
    /// Clone marks of served replicas (`clone_mark.rs`): the source, or why the mark is bad.
    clone_marks: Mutex<HashMap<String, Result<zebu_api::SnapshotRef, String>>>,
    /// Assigned replicas that are not on disk and were not to be created: volume and where the
    /// agent looked. Looked for again on every reconcile, so a folder put back is opened.
    missing: Mutex<HashMap<String, (String, String)>>,
    secret: Mutex<Option<String>>,
    rebuilds: Mutex<HashMap<String, RebuildState>>,
    /// Engines growing to the manager's size now, and why the last attempt failed (by volume).
    growths: Mutex<HashMap<String, Growth>>,
    /// Where NBD is also served over a unix socket (None if it could not be bound).
    nbd_socket: Option<PathBuf>,
    /// The FUSE frontend, when `--fuse-dir` is set and the mount worked.
    fuse: Option<fuse::FuseFrontend>,
    /// The cluster this node belongs to (`DATA_DIR/cluster.id`), once a manager answered.
    cluster_id: Mutex<Option<String>>,
    /// The last refusal or hold logged, so each is logged once.
    last_refusal: Mutex<Option<String>>,
    /// The largest file this node's disk holds (0: not known).
    max_file_bytes: u64,
}

/// An engine's growth to the volume's size (see [`Agent::start_growths`]).
#[derive(Debug, Clone, Default)]
struct Growth {
    running: bool,
    /// Why the last attempt failed, and when: tried again after [`GROW_RETRY`].
    failed: Option<(String, Instant)>,
}

/// How long after a failed growth (a rebuild running, mostly) it is tried again.
const GROW_RETRY: Duration = Duration::from_secs(2);

/// Bind the node's NBD unix socket. A socket file left by an earlier run is replaced; any other
/// file in the way is an error (nothing is deleted that is not a socket).
fn bind_unix(
    path: &Path,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str().len() >= 108 {
        anyhow::bail!(
            "the socket path {} is too long for a unix socket (use a shorter --data-dir)",
            path.display()
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing the old socket {}", path.display()))?,
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; move it away to serve NBD on a unix socket",
            path.display()
        ),
        Err(_) => {}
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    l.set_nonblocking(true)?;
    let _g = rt.enter();
    Ok(tokio::net::UnixListener::from_std(l)?)
}

fn valid_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The largest file the filesystem under `dir` holds (ext4 with 4 KiB blocks: 16 TiB), found by
/// growing a sparse probe file with `ftruncate` (bisection: no data block is written) until the
/// filesystem refuses. 0 if it cannot be measured.
pub fn max_file_bytes(dir: &Path) -> u64 {
    let probe = dir.join(".zebu-size-probe");
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&probe)
    else {
        return 0;
    };
    const ALIGN: u64 = 4096;
    let top = i64::MAX as u64 & !(ALIGN - 1);
    let (mut lo, mut hi) = (0u64, top);
    if f.set_len(top).is_ok() {
        lo = top;
    } else {
        while hi - lo > ALIGN {
            let mid = (lo + (hi - lo) / 2) & !(ALIGN - 1);
            if f.set_len(mid).is_ok() {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    drop(f);
    let _ = std::fs::remove_file(&probe);
    lo
}

fn disk_stats(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` is a properly sized out-parameter.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return (0, 0);
        }
        (
            st.f_blocks as u64 * st.f_frsize as u64,
            st.f_bavail as u64 * st.f_frsize as u64,
        )
    }
}

impl Agent {
    /// Open the node's disk, bind its servers and open the replicas already on disk.
    pub fn start(cfg: AgentConfig) -> anyhow::Result<Arc<Agent>> {
        if !valid_object_name(&cfg.node) {
            anyhow::bail!(
                "node name {:?} is not valid: use lowercase letters, digits and '-'",
                cfg.node
            );
        }
        let replicas_dir = cfg.data_dir.join("replicas");
        std::fs::create_dir_all(&replicas_dir).with_context(|| {
            format!(
                "creating the node's disk directory {}",
                replicas_dir.display()
            )
        })?;
        if cfg.files.name() != "direct" {
            tracing::warn!(node = %cfg.node, layer = cfg.files.name(), "replica files go through a test file layer: writes not flushed are lost when this process ends, as at a power cut");
        }
        let server = ReplicaServer::new(&cfg.node, cfg.io_threads);
        server.set_merge_rate(cfg.merge_rate);
        server
            .require_tls(cfg.data_tls)
            .map_err(|e| anyhow::anyhow!("node {}: {e}", cfg.node))?;
        if cfg.data_tls {
            tracing::info!(node = %cfg.node, "data protocol: TLS (engines here start it; the replica server refuses engines that do not)");
        }
        let tls = if cfg.nbd_tls.any() {
            let tls = zebu_engine::tls::NbdTls::load(&cfg.nbd_tls)
                .map_err(|e| anyhow::anyhow!("node {}: NBD TLS: {e}", cfg.node))?;
            tracing::info!(node = %cfg.node, "NBD over TCP uses TLS: {}{}", tls.describe,
                if cfg.nbd_plain_tcp { "; plain TCP clients are served too (--nbd-allow-plain-tcp)" } else { "; plain TCP clients are refused" });
            if !tls.authenticates_clients && !cfg.listen_ip.is_loopback() && !cfg.nbd_plain_tcp {
                anyhow::bail!(
                    "node {}: NBD on {} would take clients that prove nothing: {} has no \
                     ca-cert.pem to check client certificates against. Add one, or give \
                     --nbd-tls-psk-file alone, or --nbd-allow-plain-tcp to serve \
                     unauthenticated clients anyway",
                    cfg.node,
                    cfg.listen_ip,
                    cfg.nbd_tls
                        .x509_dir
                        .as_deref()
                        .unwrap_or(std::path::Path::new("?"))
                        .display()
                );
            }
            Some(tls)
        } else {
            if !cfg.listen_ip.is_loopback() && !cfg.nbd_plain_tcp {
                anyhow::bail!(
                    "node {}: NBD on {} would be open to the network without TLS: give \
                     --nbd-tls-psk-file or --nbd-tls-x509-dir, or --nbd-allow-plain-tcp to \
                     serve it plain anyway",
                    cfg.node,
                    cfg.listen_ip
                );
            }
            None
        };
        let nbd = NbdServer::with_tls(cfg.busy_poll, cfg.nbd_limits, tls, cfg.nbd_plain_tcp);
        let rt = data_runtime();
        let bind = |port: u16, what: &str| -> anyhow::Result<tokio::net::TcpListener> {
            let addr = std::net::SocketAddr::new(cfg.listen_ip, port);
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("node {}: cannot listen for {what} on {addr} (in use? pick another --listen address)", cfg.node))?;
            l.set_nonblocking(true)?;
            let _g = rt.enter();
            Ok(tokio::net::TcpListener::from_std(l)?)
        };
        let data_listener = bind(cfg.data_port, "replica traffic")?;
        let nbd_listener = bind(cfg.nbd_port, "NBD")?;
        rt.spawn(server.clone().serve(data_listener));
        rt.spawn(nbd.clone().serve(nbd_listener));
        // The same exports on a unix socket, for clients on this node.
        // Absolute, so the URI works from any directory.
        let socket_path = std::fs::canonicalize(&cfg.data_dir)
            .unwrap_or_else(|_| cfg.data_dir.clone())
            .join("nbd.sock");
        let nbd_socket = match bind_unix(&socket_path, rt) {
            Ok(l) => {
                rt.spawn(nbd.clone().serve_unix(l));
                Some(socket_path)
            }
            Err(e) => {
                tracing::warn!(node = %cfg.node, "NBD is served over TCP only: {e:#}");
                None
            }
        };
        let fuse = cfg.fuse_dir.as_ref().and_then(|dir| {
            match fuse::FuseFrontend::mount(dir, rt.handle().clone()) {
                Ok(f) => {
                    tracing::info!(node = %cfg.node, dir = %dir.display(), "FUSE frontend mounted: every volume attached here is a file there");
                    Some(f)
                }
                Err(e) => {
                    tracing::error!(node = %cfg.node, dir = %dir.display(), "the FUSE frontend could not be mounted ({e}); volumes are served over NBD only. Is /dev/fuse there, and fusermount3 installed?");
                    None
                }
            }
        });
        let cluster_id = zebu_api::cluster_id::read(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("node {}: {e}", cfg.node))?;
        // The node's own token once it has one; the shared agent token until then.
        let node_token = zebu_api::node_token::read(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("node {}: {e}", cfg.node))?;
        let max_file_bytes = max_file_bytes(&replicas_dir);
        let agent = Arc::new(Agent {
            max_file_bytes,
            cluster_id: Mutex::new(cluster_id),
            last_refusal: Mutex::new(None),
            api: ApiClient::new(
                &cfg.manager_url,
                node_token.as_deref().unwrap_or(&cfg.token),
            ),
            replicas_dir,
            server,
            nbd,
            engines: Mutex::new(HashMap::new()),
            replica_errors: Mutex::new(HashMap::new()),
            clone_marks: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            rebuilds: Mutex::new(HashMap::new()),
            growths: Mutex::new(HashMap::new()),
            secret: Mutex::new(None),
            nbd_socket,
            fuse,
            cfg,
        });
        agent.open_existing();
        tracing::info!(
            node = %agent.cfg.node,
            "agent up: replica data on {}:{}, NBD on {}:{}",
            agent.cfg.listen_ip, agent.cfg.data_port, agent.cfg.listen_ip, agent.cfg.nbd_port
        );
        Ok(agent)
    }

    fn open_existing(&self) {
        let Ok(entries) = std::fs::read_dir(&self.replicas_dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !valid_object_name(&name) {
                continue;
            }
            match Replica::open_in(&self.cfg.files, &e.path()) {
                Ok(r) => {
                    if let Some(m) = clone_mark::read(&e.path()).transpose() {
                        self.clone_marks.lock().unwrap().insert(name.clone(), m);
                    }
                    self.server.add(Arc::new(r))
                }
                Err(err) => {
                    tracing::error!(node = %self.cfg.node, "cannot open replica {name}: {}", err.full_message());
                    self.replica_errors
                        .lock()
                        .unwrap()
                        .insert(name, (String::new(), err.full_message()));
                }
            }
        }
    }

    /// The export over TCP: `nbds://` when TCP clients must use TLS.
    pub fn nbd_uri(&self, volume: &str) -> String {
        let scheme = if self.cfg.nbd_tls.any() && !self.cfg.nbd_plain_tcp {
            "nbds"
        } else {
            "nbd"
        };
        format!(
            "{scheme}://{}:{}/{volume}",
            self.cfg.listen_ip, self.cfg.nbd_port
        )
    }

    /// The export over the node's unix socket, when it is served.
    pub fn nbd_unix_uri(&self, volume: &str) -> Option<String> {
        self.nbd_socket
            .as_ref()
            .map(|p| format!("nbd+unix:///{volume}?socket={}", p.display()))
    }

    /// Heartbeat until `shutdown` turns true, then stop engines cleanly.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let commands = tokio::spawn(self.clone().command_loop());
        self.clone().heartbeat_loop(&mut shutdown).await;
        commands.abort();
        self.stop().await;
    }

    /// Take the commands the manager hands this node at once (snapshot work a person waits
    /// for; see `zebu-manager/src/commands.rs`), each run on its own task.
    async fn command_loop(self: Arc<Self>) {
        loop {
            match self.api.poll_commands(&self.cfg.node).await {
                Ok(cmds) => {
                    for c in cmds {
                        let this = self.clone();
                        tokio::spawn(async move {
                            let r = this.command(c).await;
                            if let Err(e) = this.api.command_result(&r).await {
                                tracing::warn!(node = %this.cfg.node, "sending a command's result failed: {e}");
                            }
                        });
                    }
                }
                // The heartbeat says why the manager cannot be reached.
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    async fn command(&self, c: zebu_api::AgentCommand) -> zebu_api::CommandResult {
        let mut r = zebu_api::CommandResult {
            id: c.id,
            node: self.cfg.node.clone(),
            ..Default::default()
        };
        let outcome = match &c.replica {
            None => self.engine_command(&c).await,
            Some(name) => self.replica_command(&c, name).await,
        };
        match outcome {
            Ok(layers) => r.layers = layers,
            Err((refusal, why)) => {
                r.refusal = refusal.map(str::to_owned);
                r.error = Some(why);
            }
        }
        r
    }

    async fn engine_command(
        &self,
        c: &zebu_api::AgentCommand,
    ) -> Result<Vec<zebu_api::ReplicaLayers>, (Option<&'static str>, String)> {
        use zebu_api::CommandAction;
        let engine = match self.engines.lock().unwrap().get(&c.volume) {
            Some(EngineSlot::Running(e)) => e.clone(),
            _ => {
                return Err((
                    None,
                    format!(
                        "volume {} has no engine serving on node {}",
                        c.volume, self.cfg.node
                    ),
                ))
            }
        };
        let refusal = |e: zebu_engine::EngineError| {
            let kind = match &e {
                zebu_engine::EngineError::Snapshot { kind, .. } => match kind {
                    zebu_engine::SnapshotRefusal::Exists => Some("exists"),
                    zebu_engine::SnapshotRefusal::NotFound => Some("not_found"),
                    zebu_engine::SnapshotRefusal::Busy => Some("busy"),
                    zebu_engine::SnapshotRefusal::Failed => None,
                },
                _ => None,
            };
            (kind, e.to_string())
        };
        match &c.action {
            CommandAction::SnapshotCreate {
                name,
                uid,
                system,
                created_unix,
                labels,
            } => {
                let mut labels = labels.clone();
                labels.retain(|(k, _)| k != zebu_api::SNAPSHOT_UID_LABEL);
                labels.push((zebu_api::SNAPSHOT_UID_LABEL.to_owned(), uid.clone()));
                let req = zebu_proto::snapshot::SnapshotRequest {
                    name: name.clone(),
                    system: *system,
                    created_unix: *created_unix,
                    labels,
                };
                engine.snapshot(&req).await.map_err(refusal)?;
                Ok(vec![])
            }
            CommandAction::SnapshotDelete { name } => {
                engine.remove_snapshot(name).await.map_err(refusal)?;
                Ok(vec![])
            }
            CommandAction::SnapshotRevert { .. } => Err((
                None,
                format!("volume {} is attached: detach it to revert it", c.volume),
            )),
            CommandAction::Layers => Ok(engine
                .layers()
                .await
                .map_err(refusal)?
                .into_iter()
                .map(|(replica, l)| layers_view(replica, l))
                .collect()),
        }
    }

    async fn replica_command(
        &self,
        c: &zebu_api::AgentCommand,
        name: &str,
    ) -> Result<Vec<zebu_api::ReplicaLayers>, (Option<&'static str>, String)> {
        use zebu_api::CommandAction;
        let Some(replica) = self.server.get(name).filter(|r| r.volume() == c.volume) else {
            return Err((
                None,
                format!(
                    "replica {name} of volume {} is not served on node {}",
                    c.volume, self.cfg.node
                ),
            ));
        };
        let action = c.action.clone();
        let volume = c.volume.clone();
        let done = tokio::task::spawn_blocking(move || match action {
            CommandAction::Layers => Ok(vec![layers_view(
                replica.name().to_owned(),
                zebu_replica::ops::layers_reply(&replica),
            )]),
            CommandAction::SnapshotDelete { name } => match replica.remove_snapshot(&name) {
                Ok(()) => Ok(vec![]),
                Err(e @ zebu_replica::ReplicaError::NoSnapshot { .. }) => {
                    Err((Some("not_found"), e.to_string()))
                }
                Err(e) => Err((None, e.full_message())),
            },
            CommandAction::SnapshotRevert { name } => match replica.revert(&name) {
                Ok(()) => {
                    tracing::info!(replica = %replica.name(), snapshot = %name, "reverted to the snapshot");
                    Ok(vec![])
                }
                Err(e @ zebu_replica::ReplicaError::NoSnapshot { .. }) => {
                    Err((Some("not_found"), e.to_string()))
                }
                Err(e) => Err((None, e.full_message())),
            },
            CommandAction::SnapshotCreate { .. } => Err((
                None,
                format!("a snapshot of volume {volume} is taken by its engine: attach it"),
            )),
        })
        .await;
        done.unwrap_or_else(|e| Err((None, format!("the command's task failed: {e}"))))
    }

    async fn heartbeat_loop(self: Arc<Self>, shutdown: &mut watch::Receiver<bool>) {
        let mut failing_since: Option<Instant> = None;
        let mut last_failure: Option<String> = None;
        loop {
            let hb = self.report();
            match self.api.heartbeat(&hb).await {
                Ok(a) => {
                    if failing_since.take().is_some() {
                        tracing::info!(node = %self.cfg.node, "manager reachable again");
                    }
                    last_failure = None;
                    if self.accept(&a) {
                        self.reconcile(a);
                    }
                }
                Err(e) => {
                    // Logged when it starts failing and whenever the reason changes.
                    let why = e.to_string();
                    if failing_since.is_none() || last_failure.as_deref() != Some(why.as_str()) {
                        tracing::warn!(node = %self.cfg.node, "heartbeat failed: {why}");
                        failing_since.get_or_insert_with(Instant::now);
                        last_failure = Some(why);
                    }
                    // A manager that does not know the node's own token (the node was deleted,
                    // or the manager's records were recovered): register again with the shared
                    // token, which gets a new one.
                    if e.status() == Some(401) && self.api.token() != self.cfg.token {
                        tracing::warn!(node = %self.cfg.node, "the manager does not know this node's own token ({}); registering again with the shared agent token", zebu_api::node_token::path(&self.cfg.data_dir).display());
                        self.api.set_token(&self.cfg.token);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.heartbeat_interval) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
    }

    /// Flush and close every engine (clean shutdown; volumes stay attached in desired state).
    pub async fn stop(&self) {
        // The FUSE mount first (lazily), so no stale mount outlives the agent; I/O on its
        // files fails from now on, as it would once the engines below have stopped.
        if let Some(f) = &self.fuse {
            f.unmount();
        }
        let engines: Vec<Arc<Engine>> = {
            let mut map = self.engines.lock().unwrap();
            map.drain()
                .filter_map(|(_, s)| match s {
                    EngineSlot::Running(e) => Some(e),
                    _ => None,
                })
                .collect()
        };
        for e in engines {
            self.unserve(e.volume());
            let e2 = e.clone();
            let _ = data_runtime()
                .spawn(async move { e2.shutdown("the agent is shutting down").await })
                .await;
        }
    }

    /// The engine's members as the manager should see them: a failed member says whether its
    /// last rebuild here failed (else its failure is the one that made it leave the set, which
    /// the manager knew before it asked for the rebuild).
    fn member_reports(&self, e: &Engine) -> Vec<MemberReport> {
        let rebuilds = self.rebuilds.lock().unwrap();
        e.members()
            .into_iter()
            .map(|m| {
                let last_rebuild = match rebuilds.get(&m.name) {
                    Some(RebuildState::Done(d)) if m.mode == Mode::Rw => Some(d.clone()),
                    _ => None,
                };
                // Turned RW, but its rebuild's figures are not in yet: still WO for a moment,
                // so the manager gets RW and last_rebuild together.
                let finishing = m.mode == Mode::Rw
                    && matches!(rebuilds.get(&m.name), Some(RebuildState::Running));
                MemberReport {
                    mode: match m.mode {
                        Mode::Rw if finishing => ReplicaMode::WO,
                        Mode::Rw => ReplicaMode::RW,
                        Mode::Wo => ReplicaMode::WO,
                        Mode::Err => ReplicaMode::ERR,
                    },
                    error: (!m.error.is_empty()).then_some(m.error),
                    rebuild: m.rebuild.map(|p| RebuildStatus {
                        kind: p.kind.into(),
                        bytes_done: p.bytes_done,
                        bytes_total: p.bytes_total,
                        resumed_from: p.resumed_from,
                    }),
                    last_rebuild,
                    rebuild_failed: m.mode == Mode::Err
                        && matches!(rebuilds.get(&m.name), Some(RebuildState::Failed { .. })),
                    no_space: m.mode == Mode::Err && m.no_space,
                    name: m.name,
                }
            })
            .collect()
    }

    fn report(&self) -> Heartbeat {
        let (total, free) = disk_stats(&self.cfg.data_dir);
        let marks = self.clone_marks.lock().unwrap().clone();
        let mut replicas: Vec<ReplicaReport> = self
            .server
            .list()
            .into_iter()
            .map(|r| ReplicaReport {
                name: r.name().to_owned(),
                volume: r.volume().to_owned(),
                generation: r.generation(),
                size_bytes: r.size_bytes(),
                error: r
                    .is_poisoned()
                    .then(|| format!("replica {} refuses I/O after a disk error", r.name()))
                    .or_else(|| match marks.get(r.name()) {
                        Some(Err(why)) => Some(format!("replica {}'s clone mark: {why}", r.name())),
                        _ => None,
                    }),
                clone_of: marks.get(r.name()).and_then(|m| m.clone().ok()),
                missing: false,
                epoch: r.epoch(),
                block_size: r.block_size(),
                merge: r.merge_progress().map(|m| zebu_api::MergeStatus {
                    replica: r.name().to_owned(),
                    snapshot: m.snapshot,
                    bytes_done: m.bytes_done,
                    bytes_total: m.bytes_total,
                }),
                pending_merges: r.pending_merges() as u32,
            })
            .collect();
        // Replicas that are not served: unreadable on disk, or not on disk at all.
        let unserved = [(&self.replica_errors, false), (&self.missing, true)];
        for (list, missing) in unserved {
            for (name, (volume, err)) in list.lock().unwrap().iter() {
                replicas.push(ReplicaReport {
                    name: name.clone(),
                    volume: volume.clone(),
                    generation: 0,
                    size_bytes: 0,
                    error: Some(err.clone()),
                    missing,
                    epoch: 0,
                    block_size: 0,
                    merge: None,
                    pending_merges: 0,
                    clone_of: None,
                });
            }
        }
        let growths = self.growths.lock().unwrap().clone();
        let engines = self
            .engines
            .lock()
            .unwrap()
            .iter()
            .map(|(volume, slot)| match slot {
                EngineSlot::Running(e) => EngineReport {
                    volume: volume.clone(),
                    running: true,
                    generation: e.generation(),
                    epoch: e.epoch(),
                    nbd_uri: Some(self.nbd_uri(volume)),
                    nbd_unix_uri: self.nbd_unix_uri(volume),
                    replicas: self.member_reports(e),
                    error: None,
                    size_bytes: e.size_bytes(),
                    resize_error: growths
                        .get(volume)
                        .and_then(|g| g.failed.as_ref())
                        .map(|(why, _)| why.clone()),
                    block_file: self
                        .fuse
                        .as_ref()
                        .map(|f| f.dir().join(volume).display().to_string()),
                    clone: e.clone_progress().map(|p| zebu_api::CloneStatus {
                        volume: p.volume,
                        snapshot: p.snapshot,
                        bytes_done: p.bytes_done,
                        bytes_total: p.bytes_total,
                        copied: p.copied,
                        done: false,
                        error: p.error,
                    }),
                },
                EngineSlot::Starting { .. } => EngineReport {
                    volume: volume.clone(),
                    running: false,
                    generation: 0,
                    epoch: 0,
                    nbd_uri: None,
                    nbd_unix_uri: None,
                    replicas: vec![],
                    error: None,
                    size_bytes: 0,
                    resize_error: None,
                    block_file: None,
                    clone: None,
                },
                EngineSlot::Failed { error, .. } => EngineReport {
                    volume: volume.clone(),
                    running: false,
                    generation: 0,
                    epoch: 0,
                    nbd_uri: None,
                    nbd_unix_uri: None,
                    replicas: vec![],
                    error: Some(error.clone()),
                    size_bytes: 0,
                    resize_error: None,
                    block_file: None,
                    clone: None,
                },
            })
            .collect();
        Heartbeat {
            cluster_id: self.cluster_id.lock().unwrap().clone(),
            node: self.cfg.node.clone(),
            address: self.cfg.listen_ip.to_string(),
            data_port: self.cfg.advertise_data_port.unwrap_or(self.cfg.data_port),
            nbd_port: self.cfg.nbd_port,
            disk_path: self.cfg.data_dir.display().to_string(),
            status: zebu_api::NodeStatus {
                disk_total_bytes: total,
                disk_free_bytes: free,
                max_file_bytes: self.max_file_bytes,
                nbd_refusing: self.nbd.refusing(Duration::from_secs(60)),
                nbd_refusing_volumes: self.nbd.refusing_exports(Duration::from_secs(60)),
                nbd_connections: self.nbd.connections() as u64,
            },
            replicas,
            engines,
        }
    }

    /// Whether to act on an answer: it comes from this node's cluster (the first answer names
    /// the cluster, recorded durably before anything else is done), and the manager is not
    /// holding. A refused answer changes nothing.
    fn accept(&self, a: &Assignment) -> bool {
        let refusal = {
            let mut mine = self.cluster_id.lock().unwrap();
            match mine.as_deref() {
                _ if !zebu_api::cluster_id::is_valid(&a.cluster_id) => Some(format!(
                    "the manager at {} sent no valid cluster id ({:?}); nothing it asks is done (is it an older build?)",
                    self.api.base(),
                    a.cluster_id
                )),
                Some(id) if id != a.cluster_id => Some(format!(
                    "the manager at {} runs cluster {}, but this node's replicas belong to cluster {id} ({}); nothing it asks is done. Point --manager at this cluster's manager; if the node should really join the other cluster, stop the agent and move its data directory away first",
                    self.api.base(),
                    a.cluster_id,
                    zebu_api::cluster_id::path(&self.cfg.data_dir).display()
                )),
                Some(_) => None,
                None => match zebu_api::cluster_id::write(&self.cfg.data_dir, &a.cluster_id) {
                    Ok(()) => {
                        tracing::info!(node = %self.cfg.node, cluster = %a.cluster_id, "node joined cluster");
                        *mine = Some(a.cluster_id.clone());
                        None
                    }
                    Err(e) => Some(format!("{e}; nothing the manager asks is done until it is written")),
                },
            }
        };
        // The node's own token, from a manager of this node's cluster: kept before it is used.
        if let (None, Some(t)) = (&refusal, &a.node_token) {
            if !zebu_api::node_token::is_valid(t) {
                tracing::warn!(node = %self.cfg.node, "the manager sent a node token that is not one (64 hexadecimal digits); kept the token in use");
            } else {
                match zebu_api::node_token::write(&self.cfg.data_dir, t) {
                    Ok(()) => {
                        tracing::info!(node = %self.cfg.node, "node has its own token now ({})", zebu_api::node_token::path(&self.cfg.data_dir).display());
                        self.api.set_token(t);
                    }
                    // The shared token stays in use; the next heartbeat gets another token.
                    Err(e) => {
                        tracing::warn!(node = %self.cfg.node, "{e}; the shared agent token stays in use")
                    }
                }
            }
        }
        let refusal = refusal.or_else(|| {
            a.hold.as_ref().map(|why| {
                format!(
                    "the manager holds: {why}; this node keeps what it runs and changes nothing"
                )
            })
        });
        let mut last = self.last_refusal.lock().unwrap();
        match refusal {
            Some(why) => {
                if last.as_deref() != Some(why.as_str()) {
                    tracing::error!(node = %self.cfg.node, "{why}");
                    *last = Some(why);
                }
                false
            }
            None => {
                *last = None;
                true
            }
        }
    }

    fn reconcile(self: &Arc<Self>, a: Assignment) {
        {
            let mut s = self.secret.lock().unwrap();
            if s.as_deref() != Some(a.secret.as_str()) {
                self.server.set_secret(a.secret.clone());
                *s = Some(a.secret.clone());
            }
        }
        for name in &a.delete_replicas {
            self.delete_replica(name);
        }
        for spec in &a.replicas {
            if !valid_object_name(&spec.name) || self.server.get(&spec.name).is_some() {
                continue;
            }
            if self.replica_errors.lock().unwrap().contains_key(&spec.name) {
                continue; // Reported; a person or a later rebuild decides.
            }
            let dir = self.replicas_dir.join(&spec.name);
            let on_disk = dir.join(zebu_replica::meta::META_FILE).exists();
            if !on_disk && !spec.create {
                // Never recreate a replica that existed: an empty copy would stand in for its
                // data (a disk that did not mount, a mistyped --data-dir, a deleted folder).
                let why = format!(
                    "replica {} is missing from node {}'s disk: {} does not exist; it was not recreated empty. If the disk is not mounted or --data-dir is wrong, fix that: the replica is opened again as soon as it is back",
                    spec.name,
                    self.cfg.node,
                    dir.join(zebu_replica::meta::META_FILE).display()
                );
                let mut missing = self.missing.lock().unwrap();
                if !missing.contains_key(&spec.name) {
                    tracing::error!(node = %self.cfg.node, "{why}");
                }
                missing.insert(spec.name.clone(), (spec.volume.clone(), why));
                continue;
            }
            if self.missing.lock().unwrap().remove(&spec.name).is_some() {
                tracing::info!(node = %self.cfg.node, replica = %spec.name, "replica {} is on disk again", dir.display());
            }
            let result = if on_disk {
                // A replica smaller than the manager's size missed an expansion: its engine
                // grows it. A larger one is not this volume's (the manager's size is raised
                // before any replica grows).
                Replica::open_in(&self.cfg.files, &dir).and_then(|r| {
                    if r.volume() != spec.volume || r.size_bytes() > spec.size_bytes {
                        Err(zebu_replica::ReplicaError::Invalid {
                            replica: spec.name.clone(),
                            reason: format!(
                                "on disk it belongs to volume {} with {} bytes, the manager expects volume {} with {} bytes",
                                r.volume(),
                                r.size_bytes(),
                                spec.volume,
                                spec.size_bytes
                            ),
                        })
                    } else {
                        Ok(r)
                    }
                })
            } else {
                Replica::create_in(
                    &self.cfg.files,
                    &dir,
                    &spec.volume,
                    &spec.name,
                    spec.size_bytes,
                    spec.block_size,
                )
            };
            match result {
                Ok(r) => {
                    tracing::info!(node = %self.cfg.node, replica = %spec.name, "replica ready");
                    self.server.add(Arc::new(r));
                }
                Err(e) => {
                    tracing::error!(node = %self.cfg.node, "replica {}: {}", spec.name, e.full_message());
                    self.replica_errors
                        .lock()
                        .unwrap()
                        .insert(spec.name.clone(), (spec.volume.clone(), e.full_message()));
                }
            }
        }
        for spec in &a.replicas {
            if let Some(c) = &spec.clone {
                self.sync_clone_mark(&spec.name, c);
            }
        }
        // Engines.
        let wanted: HashMap<&str, &EngineSpec> =
            a.engines.iter().map(|e| (e.volume.as_str(), e)).collect();
        let mut to_stop = Vec::new();
        {
            let mut map = self.engines.lock().unwrap();
            // An engine that stopped by itself (fenced off by a newer one) is done here. So is
            // one all of whose members failed: it serves nothing, and the manager's next set
            // (after a salvage) needs an engine started afresh.
            for (vol, slot) in map.iter_mut() {
                if let EngineSlot::Running(e) = slot {
                    let reason = e.closed_reason().or_else(|| {
                        let members = e.members();
                        members.iter().all(|m| m.mode == Mode::Err).then(|| {
                            "every replica of the volume failed; the engine is started again once the manager has a replica in sync (salvage)".to_owned()
                        })
                    });
                    if let Some(reason) = reason {
                        self.unserve(vol);
                        let e = e.clone();
                        let why = reason.clone();
                        data_runtime().spawn(async move {
                            let _ = e.shutdown(&why).await;
                        });
                        *slot = EngineSlot::Failed {
                            error: reason,
                            at: Instant::now(),
                            failures: 1,
                        };
                    }
                }
            }
            map.retain(|vol, slot| {
                if wanted.contains_key(vol.as_str()) {
                    return true;
                }
                if let EngineSlot::Running(e) = slot {
                    to_stop.push(e.clone());
                }
                false // a start in progress sees its slot gone and drops the engine
            });
            for (vol, spec) in &wanted {
                if let (Some(EngineSlot::Running(e)), None) = (map.get(*vol), &spec.clone) {
                    // A clone the manager has recorded done (a no-op for any other volume).
                    e.clone_settled();
                }
                let start = match map.get(*vol) {
                    None => Some(0),
                    Some(EngineSlot::Failed { at, failures, .. }) => {
                        (at.elapsed() >= engine_retry(*failures)).then_some(*failures)
                    }
                    _ => None,
                };
                if let Some(failures) = start {
                    map.insert(vol.to_string(), EngineSlot::Starting { failures });
                    self.spawn_engine((*spec).clone());
                }
            }
        }
        self.start_rebuilds(&a);
        self.start_growths(&a);
        for e in to_stop {
            self.unserve(e.volume());
            tracing::info!(node = %self.cfg.node, volume = %e.volume(), "engine stopping (detached)");
            data_runtime().spawn(async move {
                if let Err(err) = e.shutdown("the volume was detached from this node").await {
                    tracing::warn!("final flush of {} failed: {err}", e.volume());
                }
            });
        }
    }

    /// Stop serving `volume` to clients (NBD and FUSE).
    fn unserve(&self, volume: &str) {
        self.nbd.remove(volume);
        if let Some(f) = &self.fuse {
            f.remove(volume);
        }
    }

    /// How the engine reaches a replica: in-process when it lives on this node.
    fn target(&self, r: &EngineReplica) -> ReplicaTarget {
        let local = r.node == self.cfg.node;
        let in_process = self
            .server
            .get(&r.name)
            .filter(|_| local)
            .map(|replica| LocalReplica::new(replica, self.server.pool()));
        ReplicaTarget {
            name: r.name.clone(),
            address: r.address.clone(),
            local,
            in_process,
        }
    }

    /// Start the rebuilds the manager asks of running engines (one at a time per replica; a
    /// failed one is tried again after [`REBUILD_RETRY`]).
    fn start_rebuilds(self: &Arc<Self>, a: &Assignment) {
        let engines = self.engines.lock().unwrap();
        let mut rebuilds = self.rebuilds.lock().unwrap();
        // A failure the manager has taken in (it no longer asks for the rebuild) is forgotten,
        // so the next request starts afresh and an old failure is never reported again.
        rebuilds.retain(|name, state| {
            !matches!(state, RebuildState::Failed { .. })
                || a.engines
                    .iter()
                    .any(|e| e.rebuild.iter().any(|r| &r.name == name))
        });
        for spec in &a.engines {
            let Some(EngineSlot::Running(engine)) = engines.get(&spec.volume) else {
                continue;
            };
            for r in &spec.rebuild {
                let start = match rebuilds.get(&r.name) {
                    None | Some(RebuildState::Done(_)) => !engine
                        .members()
                        .iter()
                        .any(|m| m.name == r.name && m.mode != Mode::Err),
                    Some(RebuildState::Failed { at }) => at.elapsed() >= REBUILD_RETRY,
                    Some(RebuildState::Running) => false,
                };
                if !start {
                    continue;
                }
                rebuilds.insert(r.name.clone(), RebuildState::Running);
                let (this, engine, target, rate) = (
                    self.clone(),
                    engine.clone(),
                    self.target(r),
                    spec.rebuild_rate,
                );
                let name = r.name.clone();
                data_runtime().spawn(async move {
                    let result = engine.rebuild(target, rate).await;
                    let state = match result {
                        Ok(done) => RebuildState::Done(LastRebuild {
                            kind: done.kind.into(),
                            bytes_copied: done.bytes_copied,
                            duration_ms: done.duration.as_millis() as u64,
                            resumed_from: done.resumed_from,
                            snapshots_copied: done.snapshots_copied,
                            snapshots_kept: done.snapshots_kept,
                        }),
                        Err(e) => {
                            tracing::warn!(node = %this.cfg.node, replica = %name, "rebuild failed, tried again later: {e}");
                            RebuildState::Failed { at: Instant::now() }
                        }
                    };
                    this.rebuilds.lock().unwrap().insert(name, state);
                });
            }
        }
    }

    /// Grow running engines to the manager's size for their volume (an expansion): one growth
    /// per engine at a time; a failed one (refused while a rebuild runs) is tried again after
    /// [`GROW_RETRY`].
    fn start_growths(self: &Arc<Self>, a: &Assignment) {
        let engines = self.engines.lock().unwrap();
        let mut growths = self.growths.lock().unwrap();
        growths.retain(|vol, _| a.engines.iter().any(|e| &e.volume == vol));
        for spec in &a.engines {
            let Some(EngineSlot::Running(engine)) = engines.get(&spec.volume) else {
                continue;
            };
            if engine.size_bytes() >= spec.size_bytes {
                growths.remove(&spec.volume);
                continue;
            }
            let g = growths.entry(spec.volume.clone()).or_default();
            if g.running
                || g.failed
                    .as_ref()
                    .is_some_and(|(_, at)| at.elapsed() < GROW_RETRY)
            {
                continue;
            }
            g.running = true;
            let (this, engine, size) = (self.clone(), engine.clone(), spec.size_bytes);
            data_runtime().spawn(async move {
                let result = engine.resize(size).await;
                let mut growths = this.growths.lock().unwrap();
                let Some(g) = growths.get_mut(engine.volume()) else {
                    return;
                };
                g.running = false;
                match result {
                    Ok(()) => {
                        tracing::info!(node = %this.cfg.node, volume = %engine.volume(), "volume grown to {size} bytes");
                        g.failed = None;
                    }
                    Err(e) => {
                        let why = e.to_string();
                        if g.failed.as_ref().is_none_or(|(w, _)| *w != why) {
                            tracing::warn!(node = %this.cfg.node, "growing to {size} bytes: {why}; tried again");
                        }
                        g.failed = Some((why, Instant::now()));
                    }
                }
            });
        }
    }

    fn spawn_engine(self: &Arc<Self>, spec: EngineSpec) {
        let secret = self.secret.lock().unwrap().clone().unwrap_or_default();
        let cfg = EngineConfig {
            volume: spec.volume.clone(),
            size_bytes: spec.size_bytes,
            replicas: spec.replicas.iter().map(|r| self.target(r)).collect(),
            secret,
            data_tls: self.cfg.data_tls,
            io_timeout: IO_TIMEOUT,
            connect_patience: Duration::from_secs(3),
            // Every member must be reached (a refusal may be a node that is still starting),
            // but those the manager says may be left out (their node has been down long): they
            // are recorded retired before the engine serves (`zebu-engine/src/engine/record.rs`).
            require_all: true,
            may_leave_out: spec.may_leave_out.clone(),
            min_generation: spec.min_generation,
            generation_floor: spec.generation_floor,
            epoch: spec.epoch,
            replica_count: spec.replica_count,
            snapshots: spec.snapshots.clone(),
            clone: spec.clone.as_ref().map(|c| zebu_engine::CloneSource {
                volume: c.volume.clone(),
                snapshot: c.snapshot.clone(),
                replicas: c
                    .replicas
                    .iter()
                    .map(|r| (r.name.clone(), r.address.clone()))
                    .collect(),
                rate: spec.rebuild_rate,
            }),
            recorder: Some(Arc::new(ManagerRecord {
                api: self.api.clone(),
                node: self.cfg.node.clone(),
                cluster_id: self.cluster_id.lock().unwrap().clone(),
            })),
        };
        let this = self.clone();
        let unmarked = spec
            .clone
            .is_none()
            .then(|| self.unmarked_clone(&spec.volume))
            .flatten();
        data_runtime().spawn(async move {
            let result = match unmarked {
                Some(why) => Err(why),
                None => Engine::start(cfg).await.map_err(|e| e.to_string()),
            };
            let mut map = this.engines.lock().unwrap();
            // Detached while starting: the slot is gone or no longer Starting.
            let Some(&EngineSlot::Starting { failures }) = map.get(&spec.volume) else {
                return;
            };
            match result {
                Ok(engine) => {
                    this.nbd.add(engine.clone());
                    if let Some(f) = &this.fuse {
                        f.add(engine.clone());
                    }
                    if !this.cfg.scrub.interval.is_zero() {
                        let record = this.cfg.data_dir.join("scrubs").join(&spec.volume);
                        data_runtime().spawn(scrub_loop(engine.clone(), this.cfg.scrub, record));
                    }
                    tracing::info!(node = %this.cfg.node, volume = %spec.volume, uri = %this.nbd_uri(&spec.volume), "volume attached");
                    map.insert(spec.volume.clone(), EngineSlot::Running(engine));
                }
                Err(e) => {
                    tracing::error!(node = %this.cfg.node, "{e}");
                    map.insert(
                        spec.volume.clone(),
                        EngineSlot::Failed {
                            error: e,
                            at: Instant::now(),
                            failures: failures + 1,
                        },
                    );
                }
            }
        });
    }

    /// Keep a served replica's clone mark as the manager says: written while the clone is not
    /// done, removed once it is. A failure is logged and tried again on the next reconcile.
    fn sync_clone_mark(&self, name: &str, c: &zebu_api::ReplicaClone) {
        if !valid_object_name(name) || self.server.get(name).is_none() {
            return;
        }
        let dir = self.replicas_dir.join(name);
        let mut marks = self.clone_marks.lock().unwrap();
        let have = marks.get(name);
        let r = match (c.done, have) {
            (false, Some(Ok(src))) if *src == c.source => return,
            (false, _) => clone_mark::write(&dir, &c.source).map(|()| {
                marks.insert(name.to_owned(), Ok(c.source.clone()));
            }),
            (true, None) => return,
            (true, Some(_)) => clone_mark::remove(&dir).map(|()| {
                marks.remove(name);
            }),
        };
        if let Err(e) = r {
            tracing::error!(node = %self.cfg.node, replica = name, "updating the clone mark in {}: {e}; tried again", dir.display());
        }
    }

    /// Why an engine without a clone source must not start here: a replica of the volume on
    /// this node is marked as a clone's not yet copied (its unread blocks are the source's).
    fn unmarked_clone(&self, volume: &str) -> Option<String> {
        let marks = self.clone_marks.lock().unwrap();
        self.server
            .list()
            .into_iter()
            .filter(|r| r.volume() == volume)
            .find_map(|r| {
                let m = marks.get(r.name())?;
                Some(format!(
                    "replica {} of volume {volume} is marked as a clone not yet copied ({}), but the manager gave no source to read the rest from; the engine was not started, so nothing reads as zeroes that is not. Check `zebu volume get {volume}`",
                    r.name(),
                    match m {
                        Ok(s) => format!("from {}/{}", s.volume, s.snapshot),
                        Err(why) => why.clone(),
                    }
                ))
            })
    }

    fn delete_replica(&self, name: &str) {
        if !valid_object_name(name) {
            return;
        }
        self.server.remove(name);
        self.clone_marks.lock().unwrap().remove(name);
        self.replica_errors.lock().unwrap().remove(name);
        self.missing.lock().unwrap().remove(name);
        let dir = self.replicas_dir.join(name);
        if dir.exists() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(node = %self.cfg.node, replica = name, "replica deleted"),
                Err(e) => {
                    tracing::error!(node = %self.cfg.node, "deleting replica {}: {e}", dir.display())
                }
            }
        }
    }
}

/// Scrub an attached volume every `scrub.interval` until its engine stops serving. When the
/// last scrub ended (at first, when the volume was first attached here) is kept in `record`
/// (seconds since the epoch), so restarts do not put the next scrub off again.
async fn scrub_loop(engine: Arc<Engine>, scrub: Scrub, record: PathBuf) {
    let volume = engine.volume().to_owned();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let remember = |at: u64| {
        let tmp = record.with_extension("tmp");
        let res = std::fs::create_dir_all(record.parent().unwrap_or(Path::new(".")))
            .and_then(|()| std::fs::write(&tmp, format!("{at}\n")))
            .and_then(|()| std::fs::rename(&tmp, &record));
        if let Err(e) = res {
            tracing::warn!(%volume, "cannot record the scrub time in {}: {e}", record.display());
        }
    };
    let last = match std::fs::read_to_string(&record) {
        Ok(t) => t.trim().parse().ok(),
        Err(_) => None,
    };
    let mut last = last.unwrap_or_else(|| {
        let t = now();
        remember(t);
        t
    });
    loop {
        let wait = Duration::from_secs(
            last.saturating_add(scrub.interval.as_secs())
                .saturating_sub(now()),
        );
        tokio::select! {
            _ = engine.wait_closed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let started = Instant::now();
        tracing::info!(%volume, "scrub started");
        match engine.scrub(scrub.rate).await {
            Ok(r) => {
                let took = started.elapsed().as_secs_f64();
                let summary = format!(
                    "scrub done in {took:.1} s: {} MiB of replica data checked; 1 MiB pieces with damage mended: {}, with damage left: {}, with copies that differ: {}",
                    r.read_bytes >> 20,
                    r.mended,
                    r.unmended,
                    r.differing
                );
                if r.unmended > 0 || r.differing > 0 {
                    tracing::error!(%volume, "{summary}");
                } else if r.mended > 0 {
                    tracing::warn!(%volume, "{summary}");
                } else {
                    tracing::info!(%volume, "{summary}");
                }
            }
            Err(e @ zebu_engine::EngineError::Closed { .. }) => {
                tracing::info!(%volume, "scrub stopped: {e}");
                return;
            }
            Err(e) => tracing::error!(%volume, "scrub failed, tried again in one interval: {e}"),
        }
        last = now();
        remember(last);
    }
}

/// Retirements recorded at the manager (see `zebu-engine/src/engine/record.rs`).
struct ManagerRecord {
    api: ApiClient,
    node: String,
    cluster_id: Option<String>,
}

impl MembershipRecord for ManagerRecord {
    fn retired<'a>(
        &'a self,
        volume: &'a str,
        epoch: u64,
        retired: &'a [zebu_engine::Retired],
        survivors: &'a zebu_engine::Survivors,
    ) -> futures::future::BoxFuture<'a, Result<(), RecordError>> {
        Box::pin(async move {
            let req = zebu_api::RetireMembers {
                cluster_id: self.cluster_id.clone(),
                node: self.node.clone(),
                epoch,
                retired: retired
                    .iter()
                    .map(|r| zebu_api::RetiredMember {
                        name: r.name.clone(),
                        reason: r.reason.clone(),
                        no_space: r.no_space,
                    })
                    .collect(),
                survivors: survivors.members.clone(),
                generation: survivors.generation,
            };
            match self.api.retire_members(volume, &req).await {
                Ok(_) => Ok(()),
                // Refused (not the current attachment), or not known there (the volume or the
                // replica is gone): either way this engine must not go on.
                Err(zebu_api::ClientError::Api { status, message })
                    if (400..500).contains(&status) && ![401, 408, 429].contains(&status) =>
                {
                    Err(RecordError::Fenced(message))
                }
                Err(e) => Err(RecordError::Unavailable(e.to_string())),
            }
        })
    }
}

/// A replica's LAYERS reply in the API's terms.
fn layers_view(replica: String, l: zebu_proto::snapshot::LayersReply) -> zebu_api::ReplicaLayers {
    use zebu_proto::snapshot::{LAYER_HEAD, LAYER_REMOVED, LAYER_SYSTEM};
    zebu_api::ReplicaLayers {
        merge: l.merge.map(|m| zebu_api::MergeStatus {
            replica: replica.clone(),
            snapshot: m.snapshot,
            bytes_done: m.bytes_done,
            bytes_total: m.bytes_total,
        }),
        replica,
        layers: l
            .layers
            .into_iter()
            .map(|x| zebu_api::LayerView {
                id: x.id,
                parent: x.parent,
                created_unix: x.created_unix,
                size_bytes: x.size_bytes,
                head: x.flags & LAYER_HEAD != 0,
                system: x.flags & LAYER_SYSTEM != 0,
                removed: x.flags & LAYER_REMOVED != 0,
                name: x.name,
                labels: x.labels,
            })
            .collect(),
    }
}
