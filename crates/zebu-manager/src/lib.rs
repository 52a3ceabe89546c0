//! Zebu manager: the REST API (behind a bearer token), the desired/observed state of the
//! cluster in the metadata store, and the reconciliation that tells each node's agent what to
//! run. Agents pull: every heartbeat carries the node's full report and gets back the node's
//! full assignment (level-triggered, idempotent), so a lost message is repaired by the next one.

pub mod cluster;
pub mod commands;
pub mod error;
pub mod settings;
pub mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State as AxState};
use axum::http::header::AUTHORIZATION;
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use zebu_api::{
    AgentCommand, Assignment, AttachVolume, CommandAction, CommandResult, CreateSnapshot,
    CreateVolume, Heartbeat, Node, PollCommands, ReplicaLayers, RetireMembers, SalvageVolume,
    SetSetting, Setting, Snapshot, Volume,
};

use crate::error::ApiError;
use crate::state::State;

pub const TOKEN_FILE: &str = "admin.token";
pub const SECRET_FILE: &str = "cluster.secret";
pub const STORE_FILE: &str = "meta.redb";
pub const AGENT_TOKEN_FILE: &str = "agent.token";
pub const READONLY_TOKEN_FILE: &str = "readonly.token";
/// The largest request body taken.
const MAX_BODY: usize = 4 << 20;

pub struct ManagerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
}

pub struct Manager {
    state: Mutex<State>,
    commands: commands::Commands,
    token: String,
    agent_token: String,
    readonly_token: String,
}

type Shared = Arc<Manager>;
type ApiResult<T> = Result<Json<T>, ApiError>;

pub(crate) fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Read a secret file, or create it (mode 0600) with a new random value.
fn secret_file(path: &Path) -> anyhow::Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        let s = s.trim().to_owned();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let value = random_hex(32);
    zebu_api::durable::write_file(path, &format!("{value}\n"), 0o600)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(value)
}

impl Manager {
    /// Open the manager's data directory. `recover`: the store was lost or damaged; rebuild
    /// its records from what the agents report during this window (`docs/hardening.md`). A
    /// recovery that did not finish is resumed with `resume_window`.
    pub fn open(
        data_dir: &Path,
        recover: Option<std::time::Duration>,
        resume_window: std::time::Duration,
        cluster_id: Option<&str>,
    ) -> anyhow::Result<Arc<Manager>> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        let opened = cluster::open(data_dir, recover.is_some(), cluster_id)?;
        // A recovery that did not finish goes on, with the window asked for or the default.
        let recover = opened.recovering.then(|| recover.unwrap_or(resume_window));
        let token = secret_file(&data_dir.join(TOKEN_FILE))?;
        let agent_token = secret_file(&data_dir.join(AGENT_TOKEN_FILE))?;
        let readonly_token = secret_file(&data_dir.join(READONLY_TOKEN_FILE))?;
        let secret = secret_file(&data_dir.join(SECRET_FILE))?;
        let store_path = data_dir.join(STORE_FILE);
        let state = State::load(Arc::new(opened.store), secret, opened.cluster_id, recover)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{e} (in {}): the store is damaged. Put the cluster's {STORE_FILE} back from a backup, or rebuild its records from the nodes with `zebu manager --recover-from-agents` (the damaged file is kept beside it; the replicas on the nodes are untouched)",
                    store_path.display()
                )
            })?;
        Ok(Arc::new(Manager {
            state: Mutex::new(state),
            commands: commands::Commands::default(),
            token,
            agent_token,
            readonly_token,
        }))
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The token agents use: heartbeats and retirement records only.
    pub fn agent_token(&self) -> &str {
        &self.agent_token
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn router(self: &Arc<Self>) -> Router {
        let v1 = Router::new()
            .route("/volumes", get(list_volumes).post(create_volume))
            .route("/volumes/{name}", get(get_volume).delete(delete_volume))
            .route("/volumes/{name}/attach", post(attach_volume))
            .route("/volumes/{name}/detach", post(detach_volume))
            .route("/volumes/{name}/salvage", post(salvage_volume))
            .route("/volumes/{name}/expand", post(expand_volume))
            .route("/volumes/{name}/retire", post(retire_members))
            .route(
                "/volumes/{name}/snapshots",
                get(list_snapshots).post(create_snapshot),
            )
            .route(
                "/volumes/{name}/snapshots/{snap}",
                get(get_snapshot).delete(delete_snapshot),
            )
            .route("/volumes/{name}/snapshot-purge", post(purge_snapshots))
            .route(
                "/volumes/{name}/snapshots/{snap}/revert",
                post(revert_snapshot),
            )
            .route("/agent/commands", post(poll_commands))
            .route("/agent/results", post(command_result))
            .route("/nodes", get(list_nodes))
            .route("/nodes/{name}", axum::routing::delete(delete_node))
            .route("/settings", get(list_settings))
            .route("/settings/{name}", get(get_setting).post(set_setting))
            .route("/agent/heartbeat", post(heartbeat))
            .layer(middleware::from_fn_with_state(self.clone(), require_token));
        Router::new()
            .nest("/v1", v1)
            .route("/healthz", get(|| async { "ok\n" }))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .layer(middleware::from_fn(request_deadline))
            .with_state(self.clone())
    }
}

/// Serve the API until `shutdown` resolves.
pub async fn serve(
    manager: Arc<Manager>,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (is another manager running? choose another with --listen/--api)"))?;
    tracing::info!("manager API on http://{listen}");
    // Reconcilers with timers of their own (not driven by heartbeats).
    let ticker = {
        let m = manager.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                every.tick().await;
                m.state().tick();
            }
        })
    };
    let served = serve_bounded(listener, manager.router(), shutdown).await;
    ticker.abort();
    served
}

/// REST connections open at once: past it a new one is closed at once, with a log line.
const MAX_REST_CONNECTIONS: usize = 512;
/// A request's headers must arrive whole within this long (from the connection's start, or
/// the end of the last reply), else the connection is closed.
const REST_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a request may take from its headers to its answer: its body must have come by then
/// (handlers wait on nothing else, so only a body that has not come yet is cut short, before
/// anything was changed). 408 past it.
const REST_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A response (or any write to a client) that makes no progress for this long closes the
/// connection: a client that stops reading cannot hold its slot, its buffers or its task.
const REST_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The [`REST_REQUEST_TIMEOUT`] on every request.
async fn request_deadline(req: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    let what = format!("{} {}", req.method(), req.uri().path());
    match tokio::time::timeout(REST_REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(
                "REST request {what} cut short: its body did not arrive within {} s",
                REST_REQUEST_TIMEOUT.as_secs()
            );
            ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                message: format!(
                    "{what}: the request did not arrive whole within {} s; nothing was changed",
                    REST_REQUEST_TIMEOUT.as_secs()
                ),
            }
            .into_response()
        }
    }
}

/// Serve `app` on `listener` with bounds: a connection limit, a header timeout and a write
/// timeout (HTTP/1.1).
async fn serve_bounded(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_REST_CONNECTIONS));
    let mut last_refusal: Option<std::time::Instant> = None;
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Reap finished connections as we go.
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("REST accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => {
                // Requests in progress finish (idle connections close by the header timeout).
                let _ = tokio::time::timeout(REST_HEADER_TIMEOUT + std::time::Duration::from_secs(1), async {
                    while conns.join_next().await.is_some() {}
                })
                .await;
                return Ok(());
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if last_refusal.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
                tracing::warn!(client = %peer, "REST client refused: {MAX_REST_CONNECTIONS} connections are open");
                last_refusal = Some(std::time::Instant::now());
            }
            drop(stream);
            continue;
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        conns.spawn(async move {
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(REST_WRITE_TIMEOUT));
            let io = hyper_util::rt::TokioIo::new(Box::pin(stream));
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REST_HEADER_TIMEOUT);
            if let Err(e) = b.serve_connection(io, svc).await {
                tracing::debug!(client = %peer, "REST connection closed: {e}");
            }
            drop(slot);
        });
    }
}

/// What a token may do. `Admin` may do everything; `ReadOnly` every `GET`; `Agent` only what
/// agents do (heartbeats and retirement records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    ReadOnly,
    Agent,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
            Role::Agent => "agent",
        }
    }

    /// The role a request needs.
    fn needed(method: &Method, path: &str) -> Role {
        let agent_route = path.starts_with("/v1/agent/")
            || (method == Method::POST
                && path.starts_with("/v1/volumes/")
                && path.ends_with("/retire"));
        if agent_route {
            Role::Agent
        } else if method == Method::GET {
            Role::ReadOnly
        } else {
            Role::Admin
        }
    }

    fn allows(self, needed: Role) -> bool {
        self == Role::Admin || self == needed
    }
}

/// The token in an `Authorization: Bearer ...` header (the scheme in any case, RFC 7235).
fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(char::is_whitespace)?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(
    AxState(m): AxState<Shared>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let found = bearer(&req).and_then(|t| {
        [
            (&m.token, Role::Admin, state::Speaker::Admin),
            (&m.agent_token, Role::Agent, state::Speaker::Join),
            (&m.readonly_token, Role::ReadOnly, state::Speaker::Join),
        ]
        .into_iter()
        .find(|(k, _, _)| same(t, k))
        .map(|(_, r, s)| (r, s))
        // A node's own token (only its SHA-256 is kept, so no timing tells it apart).
        .or_else(|| {
            m.state()
                .node_for_token(t)
                .map(|n| (Role::Agent, state::Speaker::Node(n)))
        })
    });
    let Some((role, speaker)) = found else {
        return Err(ApiError::unauthorized());
    };
    req.extensions_mut().insert(speaker);
    let path = format!("/v1{}", req.uri().path());
    let needed = Role::needed(req.method(), &path);
    if !role.allows(needed) {
        return Err(ApiError::forbidden(format!(
            "this token has the {} role; {} {} needs the {} role (the tokens are in the manager's data directory: admin.token, readonly.token, agent.token)",
            role.name(),
            req.method(),
            path,
            needed.name()
        )));
    }
    Ok(next.run(req).await)
}

type JsonBody<T> = Result<Json<T>, JsonRejection>;

/// The request's JSON body (`what` names it in errors, `hint` says what to send). `default`,
/// if given, stands for a request sent with no body at all.
fn body<T>(b: JsonBody<T>, what: &str, hint: &str, default: Option<T>) -> Result<T, ApiError> {
    match b {
        Ok(Json(v)) => Ok(v),
        Err(JsonRejection::MissingJsonContentType(_)) if default.is_some() => {
            Ok(default.expect("checked"))
        }
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "{what} is larger than the manager takes ({} MiB); nothing was changed",
                MAX_BODY >> 20
            ),
        }),
        Err(e) => Err(ApiError::bad_request(format!(
            "invalid {what}: {}{hint}",
            e.body_text()
        ))),
    }
}

async fn list_volumes(AxState(m): AxState<Shared>) -> ApiResult<Vec<Volume>> {
    Ok(Json(m.state().volumes()))
}

async fn get_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Volume> {
    state::validate_volume_name(&name)?;
    m.state().volume(&name).map(Json)
}

async fn create_volume(
    AxState(m): AxState<Shared>,
    b: JsonBody<CreateVolume>,
) -> ApiResult<Volume> {
    let req = body(b, "request body", "", None)?;
    let mut st = m.state();
    st.not_recovering()?;
    match &req.clone_from {
        Some(from) => st.create_clone(&req.name, req.size_bytes, req.replica_count, from),
        None => st.create_volume(&req.name, req.size_bytes, req.replica_count),
    }
    .map(Json)
}

async fn delete_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Volume> {
    state::validate_volume_name(&name)?;
    let mut st = m.state();
    st.not_recovering()?;
    st.delete_volume(&name).map(Json)
}

async fn attach_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
    b: JsonBody<AttachVolume>,
) -> ApiResult<Volume> {
    state::validate_volume_name(&name)?;
    // No body at all: attach to the default node.
    let req = body(b, "request body", "", Some(AttachVolume::default()))?;
    let mut st = m.state();
    st.not_recovering()?;
    st.attach(&name, req.node).map(Json)
}

async fn detach_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Volume> {
    state::validate_volume_name(&name)?;
    let mut st = m.state();
    st.not_recovering()?;
    st.detach(&name).map(Json)
}

async fn salvage_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
    b: JsonBody<SalvageVolume>,
) -> ApiResult<Volume> {
    state::validate_volume_name(&name)?;
    let req = body(
        b,
        "request body",
        "; send {\"replica\": \"NAME\"} or nothing",
        Some(SalvageVolume::default()),
    )?;
    let mut st = m.state();
    st.not_recovering()?;
    st.salvage(&name, req.replica).map(Json)
}

async fn expand_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
    b: JsonBody<zebu_api::ExpandVolume>,
) -> ApiResult<Volume> {
    state::validate_volume_name(&name)?;
    let req = body(b, "request body", "; send {\"size_bytes\": N}", None)?;
    let mut st = m.state();
    st.not_recovering()?;
    st.expand_volume(&name, req.size_bytes).map(Json)
}

async fn list_nodes(AxState(m): AxState<Shared>) -> ApiResult<Vec<Node>> {
    Ok(Json(m.state().nodes()))
}

#[derive(serde::Deserialize)]
struct DeleteNodeQuery {
    force: Option<String>,
}

async fn delete_node(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
    q: Result<Query<DeleteNodeQuery>, QueryRejection>,
) -> ApiResult<Node> {
    state::validate_node_name(&name)?;
    let Query(q) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let mut st = m.state();
    st.not_recovering()?;
    st.delete_node(&name, q.force.as_deref()).map(Json)
}

async fn list_settings(AxState(m): AxState<Shared>) -> ApiResult<Vec<Setting>> {
    Ok(Json(m.state().settings()))
}

async fn get_setting(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Setting> {
    m.state().setting(&name).map(Json)
}

async fn set_setting(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
    b: JsonBody<SetSetting>,
) -> ApiResult<Setting> {
    let req = body(b, "request body", "; send {\"value\": \"...\"}", None)?;
    let mut st = m.state();
    st.not_recovering()?;
    st.set_setting(&name, &req.value).map(Json)
}

async fn retire_members(
    AxState(m): AxState<Shared>,
    axum::Extension(by): axum::Extension<state::Speaker>,
    UrlPath(name): UrlPath<String>,
    b: JsonBody<RetireMembers>,
) -> ApiResult<Volume> {
    state::validate_volume_name(&name)?;
    let req = body(b, "retirement record", "", None)?;
    let mut st = m.state();
    st.not_recovering()?;
    st.record_retired(&name, &req, &by).map(Json)
}

async fn heartbeat(
    AxState(m): AxState<Shared>,
    axum::Extension(by): axum::Extension<state::Speaker>,
    b: JsonBody<Heartbeat>,
) -> ApiResult<Assignment> {
    let hb = body(b, "heartbeat", "", None)?;
    m.state().heartbeat(hb, &by).map(Json)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A command's result as the REST answer: a refusal keeps its meaning.
fn command_ok(r: &CommandResult) -> Result<(), ApiError> {
    let Some(e) = &r.error else {
        return Ok(());
    };
    Err(match r.refusal.as_deref() {
        Some("exists") | Some("busy") => ApiError::conflict(e.clone()),
        Some("not_found") => ApiError::not_found(e.clone()),
        _ => ApiError::unavailable(format!("node {}: {e}", r.node)),
    })
}

/// Every member's tree (the engine's node), or one replica's (detached).
async fn layers_of(
    m: &Manager,
    volume: &str,
    target: state::snapshots::SnapshotTarget,
) -> Result<Vec<ReplicaLayers>, ApiError> {
    use state::snapshots::SnapshotTarget;
    let (node, replica) = match target {
        SnapshotTarget::Engine(n) => (n, None),
        SnapshotTarget::Replicas(list) => {
            let (n, r) = list.into_iter().next().expect("a target has a replica");
            (n, Some(r))
        }
    };
    let r = m
        .commands
        .run(&node, volume, replica, CommandAction::Layers)
        .await?;
    command_ok(&r)?;
    Ok(r.layers)
}

async fn snapshot_list(m: &Manager, volume: &str) -> Result<Vec<Snapshot>, ApiError> {
    state::validate_volume_name(volume)?;
    let (records, target) = {
        let st = m.state();
        let target = st.snapshot_target(volume, false)?;
        (st.snapshot_records(volume), target)
    };
    let trees = layers_of(m, volume, target).await?;
    Ok(state::snapshots::snapshot_views(&records, &trees))
}

async fn list_snapshots(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Vec<Snapshot>> {
    snapshot_list(&m, &name).await.map(Json)
}

async fn get_snapshot(
    AxState(m): AxState<Shared>,
    UrlPath((name, snap)): UrlPath<(String, String)>,
) -> ApiResult<Snapshot> {
    state::validate_volume_name(&name)?;
    m.state().snapshot_record(&name, &snap)?;
    snapshot_list(&m, &name)
        .await?
        .into_iter()
        .find(|s| s.name == snap)
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "volume {name} has no snapshot named {snap} (zebu snapshot list {name})"
            ))
        })
}

async fn create_snapshot(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
    b: JsonBody<CreateSnapshot>,
) -> ApiResult<Snapshot> {
    use state::snapshots::{SnapshotRecord, SnapshotTarget};
    state::validate_volume_name(&name)?;
    let req = body(
        b,
        "request body",
        "; send {\"name\": \"NAME\", \"labels\": {\"k\": \"v\"}} or nothing",
        Some(CreateSnapshot::default()),
    )?;
    let snap = req
        .name
        .clone()
        .unwrap_or_else(|| format!("snap-{}", random_hex(4)));
    let node = {
        let st = m.state();
        st.not_recovering()?;
        st.check_new_snapshot(&name, &snap, &req.labels)?;
        match st.snapshot_target(&name, true)? {
            SnapshotTarget::Engine(n) => n,
            SnapshotTarget::Replicas(_) => {
                return Err(ApiError::conflict(format!(
                    "volume {name} is detached: a snapshot is taken by its engine, so attach it first (zebu volume attach {name})"
                )))
            }
        }
    };
    let rec = SnapshotRecord {
        volume: name.clone(),
        name: snap.clone(),
        created_unix: now_unix(),
        uid: random_hex(8),
        system: req.system,
        labels: req.labels.clone(),
    };
    let action = CommandAction::SnapshotCreate {
        name: snap.clone(),
        uid: rec.uid.clone(),
        system: req.system,
        created_unix: rec.created_unix,
        labels: req.labels.into_iter().collect(),
    };
    let r = m.commands.run(&node, &name, None, action).await?;
    command_ok(&r)?;
    m.state().record_snapshot(rec.clone())?;
    tracing::info!(volume = %name, snapshot = %snap, "snapshot taken");
    let listed = snapshot_list(&m, &name).await.ok();
    Ok(Json(
        listed
            .and_then(|l| l.into_iter().find(|s| s.name == snap))
            .unwrap_or_else(|| state::snapshots::snapshot_views(&[rec], &[]).remove(0)),
    ))
}

async fn delete_snapshot(
    AxState(m): AxState<Shared>,
    UrlPath((name, snap)): UrlPath<(String, String)>,
) -> ApiResult<Snapshot> {
    state::validate_volume_name(&name)?;
    let rec = delete_one_snapshot(&m, &name, &snap).await?;
    Ok(Json(
        state::snapshots::snapshot_views(&[rec], &[]).remove(0),
    ))
}

/// `POST /v1/volumes/V/snapshot-purge`: delete every system snapshot of the volume (each merged
/// in the background, as a deletion is); the answer lists them (none: an empty list).
async fn purge_snapshots(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Vec<Snapshot>> {
    state::validate_volume_name(&name)?;
    let system: Vec<String> = {
        let st = m.state();
        st.not_recovering()?;
        st.volume(&name)?;
        st.snapshot_records(&name)
            .into_iter()
            .filter(|r| r.system)
            .map(|r| r.name)
            .collect()
    };
    let mut gone = Vec::new();
    for snap in system {
        gone.push(delete_one_snapshot(&m, &name, &snap).await?);
    }
    tracing::info!(volume = %name, purged = gone.len(), "system snapshots purged");
    Ok(Json(state::snapshots::snapshot_views(&gone, &[])))
}

/// Delete snapshot `snap` of `name` where its data lives (the engine, or each replica in sync
/// when detached), then forget its record.
async fn delete_one_snapshot(
    m: &Shared,
    name: &str,
    snap: &str,
) -> Result<state::snapshots::SnapshotRecord, ApiError> {
    use state::snapshots::SnapshotTarget;
    let (name, snap) = (name.to_owned(), snap.to_owned());
    let (rec, target) = {
        let st = m.state();
        st.not_recovering()?;
        let rec = st.snapshot_record(&name, &snap)?;
        st.refuse_if_clone_source(&name, Some(&snap))?;
        (rec, st.snapshot_target(&name, true)?)
    };
    let targets: Vec<(String, Option<String>)> = match target {
        SnapshotTarget::Engine(n) => vec![(n, None)],
        SnapshotTarget::Replicas(list) => list.into_iter().map(|(n, r)| (n, Some(r))).collect(),
    };
    for (node, replica) in targets {
        let action = CommandAction::SnapshotDelete { name: snap.clone() };
        let r = m.commands.run(&node, &name, replica, action).await?;
        // Gone there already: a repeated request.
        if r.refusal.as_deref() != Some("not_found") {
            command_ok(&r)?;
        }
    }
    m.state().forget_snapshot(&name, &snap)?;
    tracing::info!(volume = %name, snapshot = %snap, "snapshot deleted; its data is merged in the background");
    Ok(rec)
}

async fn poll_commands(
    AxState(m): AxState<Shared>,
    axum::Extension(by): axum::Extension<state::Speaker>,
    b: JsonBody<PollCommands>,
) -> ApiResult<Vec<AgentCommand>> {
    let req = body(b, "command poll", "", None)?;
    state::validate_node_name(&req.node)?;
    m.state().admit_agent(&req.node, &by)?;
    Ok(Json(m.commands.poll(&req.node).await))
}

async fn command_result(
    AxState(m): AxState<Shared>,
    axum::Extension(by): axum::Extension<state::Speaker>,
    b: JsonBody<CommandResult>,
) -> ApiResult<serde_json::Value> {
    let r = body(b, "command result", "", None)?;
    state::validate_node_name(&r.node)?;
    m.state().admit_agent(&r.node, &by)?;
    m.commands.finish(r)?;
    Ok(Json(serde_json::json!({})))
}

async fn revert_snapshot(
    AxState(m): AxState<Shared>,
    UrlPath((name, snap)): UrlPath<(String, String)>,
) -> ApiResult<Snapshot> {
    use state::snapshots::SnapshotTarget;
    state::validate_volume_name(&name)?;
    let (rec, replicas) = {
        let st = m.state();
        st.not_recovering()?;
        let rec = st.snapshot_record(&name, &snap)?;
        let v = st.volume(&name)?;
        if v.desired_node.is_some() || v.state != zebu_api::VolumeState::Detached {
            return Err(ApiError::conflict(format!(
                "volume {name} is {}: a revert replaces its content, so detach it first (zebu volume detach {name}); nothing was changed",
                v.state.as_str()
            )));
        }
        match st.snapshot_target(&name, true)? {
            SnapshotTarget::Replicas(list) => (rec, list),
            SnapshotTarget::Engine(n) => {
                return Err(ApiError::conflict(format!(
                    "volume {name} is attached to node {n}: detach it first; nothing was changed"
                )))
            }
        }
    };
    let mut failed = Vec::new();
    let total = replicas.len();
    for (node, replica) in replicas {
        let action = zebu_api::CommandAction::SnapshotRevert { name: snap.clone() };
        match m
            .commands
            .run(&node, &name, Some(replica.clone()), action)
            .await
        {
            Ok(r) if r.error.is_none() => {}
            Ok(r) => failed.push(format!(
                "{replica} on node {node}: {}",
                r.error.unwrap_or_default()
            )),
            Err(e) => failed.push(format!("{replica} on node {node}: {}", e.message)),
        }
    }
    if !failed.is_empty() {
        // The reverted ones carry a higher generation: the others are stale by evidence, and
        // are rebuilt from them (whole) at the next attach.
        return Err(ApiError::unavailable(format!(
            "volume {name}: the revert to {snap} failed on {} of {total} replicas ({}); those that were reverted are newer, and the others are rebuilt from them when the volume is attached (or run the revert again)",
            failed.len(),
            failed.join("; ")
        )));
    }
    tracing::info!(volume = %name, snapshot = %snap, "volume reverted to the snapshot");
    let listed = snapshot_list(&m, &name).await.ok();
    Ok(Json(
        listed
            .and_then(|l| l.into_iter().find(|s| s.name == snap))
            .unwrap_or_else(|| state::snapshots::snapshot_views(&[rec], &[]).remove(0)),
    ))
}
