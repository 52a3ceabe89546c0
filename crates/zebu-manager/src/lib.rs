//! Zebu manager: the REST API (behind a bearer token), the desired/observed state of the
//! cluster in the metadata store, and the reconciliation that tells each node's agent what to
//! run. Agents pull: every heartbeat carries the node's full report and gets back the node's
//! full assignment (level-triggered, idempotent), so a lost message is repaired by the next one.

pub mod cluster;
pub mod error;
pub mod settings;
pub mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State as AxState};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use zebu_api::{
    Assignment, AttachVolume, CreateVolume, Heartbeat, Node, RetireMembers, SalvageVolume,
    SetSetting, Setting, Volume,
};

use crate::error::ApiError;
use crate::state::State;

pub const TOKEN_FILE: &str = "admin.token";
pub const SECRET_FILE: &str = "cluster.secret";
pub const STORE_FILE: &str = "meta.redb";

pub struct ManagerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
}

pub struct Manager {
    state: Mutex<State>,
    token: String,
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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(s) = std::fs::read_to_string(path) {
        let s = s.trim().to_owned();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let value = random_hex(32);
    let mut tmp_name = path
        .file_name()
        .expect("secret paths have a file name")
        .to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(format!("{value}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("creating {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(value)
}

impl Manager {
    /// Open the manager's data directory. `recover`: the store was lost or damaged; rebuild
    /// its records from what the agents report during this window (`docs/hardening.md`).
    pub fn open(
        data_dir: &Path,
        recover: Option<std::time::Duration>,
    ) -> anyhow::Result<Arc<Manager>> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        let opened = cluster::open(data_dir, recover.is_some())?;
        let token = secret_file(&data_dir.join(TOKEN_FILE))?;
        let secret = secret_file(&data_dir.join(SECRET_FILE))?;
        let state = State::load(
            Arc::new(opened.store),
            secret,
            opened.cluster_id,
            data_dir,
            recover,
        )?;
        Ok(Arc::new(Manager {
            state: Mutex::new(state),
            token,
        }))
    }

    pub fn token(&self) -> &str {
        &self.token
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
            .route("/volumes/{name}/retire", post(retire_members))
            .route("/nodes", get(list_nodes))
            .route("/settings", get(list_settings))
            .route("/settings/{name}", get(get_setting).post(set_setting))
            .route("/agent/heartbeat", post(heartbeat))
            .layer(middleware::from_fn_with_state(self.clone(), require_token));
        Router::new()
            .nest("/v1", v1)
            .route("/healthz", get(|| async { "ok\n" }))
            .layer(DefaultBodyLimit::max(4 << 20))
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
    let served = axum::serve(listener, manager.router())
        .with_graceful_shutdown(shutdown)
        .await;
    ticker.abort();
    served?;
    Ok(())
}

async fn require_token(
    AxState(m): AxState<Shared>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let ok = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            let (a, b) = (t.trim().as_bytes(), m.token.as_bytes());
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        });
    if !ok {
        return Err(ApiError::unauthorized());
    }
    Ok(next.run(req).await)
}

async fn list_volumes(AxState(m): AxState<Shared>) -> ApiResult<Vec<Volume>> {
    Ok(Json(m.state().volumes()))
}

async fn get_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Volume> {
    m.state().volume(&name).map(Json)
}

async fn create_volume(
    AxState(m): AxState<Shared>,
    body: Result<Json<CreateVolume>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Volume> {
    let Json(req) = body
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {}", e.body_text())))?;
    let mut st = m.state();
    st.not_recovering()?;
    st.create_volume(&req.name, req.size_bytes, req.replica_count)
        .map(Json)
}

async fn delete_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Volume> {
    let mut st = m.state();
    st.not_recovering()?;
    st.delete_volume(&name).map(Json)
}

async fn attach_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<AttachVolume>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Volume> {
    use axum::extract::rejection::JsonRejection;
    let req = match body {
        Ok(Json(b)) => b,
        // No body at all: attach to the default node.
        Err(JsonRejection::MissingJsonContentType(_)) => AttachVolume::default(),
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "invalid request body: {}",
                e.body_text()
            )))
        }
    };
    let mut st = m.state();
    st.not_recovering()?;
    st.attach(&name, req.node).map(Json)
}

async fn detach_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Volume> {
    let mut st = m.state();
    st.not_recovering()?;
    st.detach(&name).map(Json)
}

async fn salvage_volume(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<SalvageVolume>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Volume> {
    use axum::extract::rejection::JsonRejection;
    let req = match body {
        Ok(Json(b)) => b,
        Err(JsonRejection::MissingJsonContentType(_)) => SalvageVolume::default(),
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "invalid request body: {}; send {{\"replica\": \"NAME\"}} or nothing",
                e.body_text()
            )))
        }
    };
    let mut st = m.state();
    st.not_recovering()?;
    st.salvage(&name, req.replica).map(Json)
}

async fn list_nodes(AxState(m): AxState<Shared>) -> ApiResult<Vec<Node>> {
    Ok(Json(m.state().nodes()))
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
    body: Result<Json<SetSetting>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Setting> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(format!(
            "invalid request body: {}; send {{\"value\": \"...\"}}",
            e.body_text()
        ))
    })?;
    let mut st = m.state();
    st.not_recovering()?;
    st.set_setting(&name, &req.value).map(Json)
}

async fn retire_members(
    AxState(m): AxState<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<RetireMembers>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Volume> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(format!("invalid retirement record: {}", e.body_text()))
    })?;
    let mut st = m.state();
    st.not_recovering()?;
    st.record_retired(&name, &req).map(Json)
}

async fn heartbeat(
    AxState(m): AxState<Shared>,
    body: Result<Json<Heartbeat>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Assignment> {
    let Json(hb) =
        body.map_err(|e| ApiError::bad_request(format!("invalid heartbeat: {}", e.body_text())))?;
    m.state().heartbeat(hb).map(Json)
}
