//! NBD frontend: an NBD server (fixed newstyle) exporting the engines attached on this node.
//!
//! Negotiation supports EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
//! LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`); anything else gets
//! `NBD_REP_ERR_UNSUP`. Transmission supports READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES
//! (+NO_HOLE, FAST_ZERO), BLOCK_STATUS and DISC. Negotiation runs on the agent's data runtime;
//! transmission then runs on a thread of the connection's own (see [`serve_on_thread`]).
//! Requests are pipelined: each runs as its own task (bounded per connection) and writes its
//! reply itself, in completion order (see [`crate::sender`]).
//! Multi-conn is advertised: FLUSH goes to every replica of the volume and so covers writes
//! completed on any connection. Malformed input closes that one connection and nothing else.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use zebu_proto::data::{EXTENT_HOLE, EXTENT_ZERO};
use zebu_proto::nbd::*;

use crate::engine::{Engine, EngineError, Lanes};
use crate::sender::{Sender, TrySend};
use crate::tls::NbdTls;

/// Memory one connection may hold in request and reply buffers, in 64 KiB units (64 MiB).
/// Every request costs at least one unit, which also bounds the requests in flight.
const BUDGET_UNITS: u32 = 1024;
const UNIT_BYTES: u32 = 64 * 1024;
/// Largest READ/WRITE we accept (advertised as the maximum block size).
pub const MAX_IO_BYTES: u32 = 32 << 20;
/// Largest range one BLOCK_STATUS reply describes.
const MAX_STATUS_BYTES: u64 = 1 << 30;
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies may wait for a client that reads slowly up to this many bytes; past it no new
/// request is read until the client has taken some (with the budget of the requests in flight,
/// this bounds a connection's memory whatever the client does).
const UNSENT_LIMIT: usize = 32 << 20;
/// Once a request's first byte has come, the rest of its header and its payload must follow
/// within this long (a connection may be idle between requests for as long as it likes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing connection waits for its requests in flight to be answered.
const CLOSE_PATIENCE: Duration = Duration::from_secs(60);

/// How many NBD connections a node takes: past them a client is refused (with a log line
/// naming it), never served by running out of file descriptors.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open on the node, negotiating or not.
    pub per_node: usize,
    /// Connections to one export (volume).
    pub per_export: usize,
    /// Connections still negotiating: past it the one negotiating longest is closed, so
    /// clients that connect and never negotiate cannot keep a real client out.
    pub negotiating: usize,
    /// Memory all connections of the node together may hold in requests in flight and in
    /// replies not yet on their sockets: past it, requests wait to be read.
    pub memory_bytes: u64,
    /// A client whose socket takes none of its replies for this long is disconnected, and
    /// what its replies held is let go.
    pub send_stall: Duration,
    /// A connection with no request for this long gives its thread (and its own connections
    /// to other nodes' replicas) back, and waits without them for its next request. None:
    /// it keeps them while it is open.
    pub idle_release: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            per_node: 1024,
            per_export: 256,
            negotiating: 64,
            memory_bytes: 1 << 30,
            send_stall: Duration::from_secs(60),
            idle_release: Some(Duration::from_secs(30)),
        }
    }
}

/// The exports of one node: volume name → engine.
pub struct NbdServer {
    exports: RwLock<HashMap<String, Arc<Engine>>>,
    /// How long a connection's thread may poll before it sleeps (see [`crate::busy_poll`]).
    busy_poll: Duration,
    limits: Limits,
    /// Connections open now, and per export.
    open: AtomicUsize,
    per_export: std::sync::Mutex<HashMap<String, usize>>,
    /// The last client refused for a reason of the whole node, and when (for the node's
    /// report: every volume served here shows it).
    last_refusal: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// The last client refused by each export's own limit, and when (shown on that volume).
    export_refusals: std::sync::Mutex<HashMap<String, (std::time::Instant, String)>>,
    /// Connections negotiating, oldest first: an id, the peer's address (without the port),
    /// the peer as logged, and what closes it.
    #[allow(clippy::type_complexity)]
    negotiating: std::sync::Mutex<
        std::collections::VecDeque<(u64, String, String, Arc<tokio::sync::Notify>)>,
    >,
    next_id: std::sync::atomic::AtomicU64,
    /// TLS on TCP connections (never on the unix socket, whose clients are on this node).
    tls: Option<Arc<NbdTls>>,
    /// TCP clients may skip TLS (always so when there is no TLS).
    plain_tcp: bool,
    /// The node's memory budget ([`Limits::memory_bytes`]) in [`UNIT_BYTES`] units.
    memory: Arc<Semaphore>,
}

/// Whether a connection may, must or did start TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsState {
    /// Not offered (no credentials, or the unix socket).
    Unavailable,
    /// Offered; `required`: nothing but STARTTLS (and ABORT) is answered before it.
    Offered { required: bool },
    /// The connection runs over TLS.
    Done,
}

/// What negotiation ended with.
enum Step {
    Serve(Negotiated),
    /// The client asked for TLS and was told yes: the handshake comes next. `no_zeroes`: the
    /// client's flag from before, which holds after it.
    StartTls {
        no_zeroes: bool,
    },
}

/// Keeps a connection counted as negotiating while it lives.
struct Negotiating {
    server: Arc<NbdServer>,
    id: u64,
    evicted: Arc<tokio::sync::Notify>,
    deadline: tokio::time::Instant,
}

impl Drop for Negotiating {
    fn drop(&mut self) {
        self.server.done_negotiating(self.id);
    }
}

impl Negotiating {
    /// Run `f` unless the negotiation's time runs out or the connection is evicted first.
    async fn bounded<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::select! {
            // A step that has finished wins over a late eviction.
            biased;
            r = tokio::time::timeout_at(self.deadline, f) => match r {
                Ok(r) => r,
                Err(_) => Err(ConnError::Protocol("negotiation timed out".into())),
            },
            _ = self.evicted.notified() => Err(ConnError::Protocol(
                "closed while negotiating: too many connections were negotiating".into(),
            )),
        }
    }
}

/// A connection counted against the limits while it lives.
struct Counted {
    server: Arc<NbdServer>,
    export: Option<String>,
}

impl Counted {
    /// Count the connection against `export`'s limit; false if that is full.
    fn claim(&mut self, export: &str, peer: &str) -> bool {
        let mut m = self
            .server
            .per_export
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = m.entry(export.to_owned()).or_insert(0);
        if *n >= self.server.limits.per_export {
            drop(m);
            self.server.refuse_export(
                export,
                peer,
                &format!(
                    "export {export} has its limit of {} connections",
                    self.server.limits.per_export
                ),
            );
            return false;
        }
        *n += 1;
        self.export = Some(export.to_owned());
        true
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.server.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(e) = self.export.take() {
            let mut m = self
                .server
                .per_export
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&e);
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("client aborted")]
    Done,
}

type Result<T> = std::result::Result<T, ConnError>;

struct Negotiated {
    engine: Arc<Engine>,
    /// The client, as logged.
    peer: String,
    structured: bool,
    base_allocation: bool,
    /// `VOLUME@SNAPSHOT`: the export is that snapshot's content, read-only.
    snapshot: Option<String>,
}

/// Whether `engine`'s volume has a live snapshot `snap` on a member in sync; why not.
async fn snapshot_known(engine: &Engine, snap: &str) -> std::result::Result<(), String> {
    let layers = engine.layers().await.map_err(|e| e.to_string())?;
    if layers
        .iter()
        .any(|(_, l)| crate::engine_snapshots::live_snapshots(l).contains(snap))
    {
        Ok(())
    } else {
        Err(format!(
            "volume {:?} has no snapshot named {snap:?} (see `zebu snapshot list {}`)",
            engine.volume(),
            engine.volume()
        ))
    }
}

/// One line per reason a second at most: a flood of clients does not flood the log.
fn log_refusal(last: Option<&(std::time::Instant, String)>, why: &str) -> bool {
    last.is_none_or(|(at, w)| w != why || at.elapsed() >= Duration::from_secs(1))
}

fn errno(e: &EngineError) -> u32 {
    match e {
        EngineError::OutOfRange { .. } | EngineError::Invalid { .. } => EINVAL,
        EngineError::NoReplicas { .. }
        | EngineError::Damaged { .. }
        | EngineError::Start { .. }
        | EngineError::Rebuild { .. }
        | EngineError::Snapshot { .. } => EIO,
        EngineError::Closed { .. } => ESHUTDOWN,
        EngineError::NoSpace { .. } => ENOSPC,
    }
}

impl NbdServer {
    /// `busy_poll`: how long a connection's thread may poll its sockets before it sleeps
    /// (zero: never; see [`crate::busy_poll`]).
    pub fn new(busy_poll: Duration) -> Arc<NbdServer> {
        Self::with_limits(busy_poll, Limits::default())
    }

    pub fn with_limits(busy_poll: Duration, limits: Limits) -> Arc<NbdServer> {
        Self::with_tls(busy_poll, limits, None, true)
    }

    /// `tls`: offered to TCP clients; `plain_tcp`: TCP clients may also go without it.
    pub fn with_tls(
        busy_poll: Duration,
        limits: Limits,
        tls: Option<Arc<NbdTls>>,
        plain_tcp: bool,
    ) -> Arc<NbdServer> {
        let plain_tcp = plain_tcp || tls.is_none();
        // At least one largest request fits, whatever the limit says.
        let units = (limits.memory_bytes / u64::from(UNIT_BYTES)).clamp(
            u64::from(1 + MAX_IO_BYTES / UNIT_BYTES),
            u64::from(u32::MAX >> 4),
        );
        Arc::new(NbdServer {
            memory: Arc::new(Semaphore::new(units as usize)),
            tls,
            plain_tcp,
            exports: RwLock::default(),
            busy_poll,
            limits,
            open: AtomicUsize::new(0),
            per_export: Default::default(),
            last_refusal: Default::default(),
            export_refusals: Default::default(),
            negotiating: Default::default(),
            next_id: Default::default(),
        })
    }

    /// Count a connection as negotiating. If that makes too many, one is closed: the oldest
    /// of the peer address holding the most of them, so a flood from one address cannot push
    /// out clients from others. Returns its id and what closes it.
    fn start_negotiating(&self, peer: &str) -> (u64, Arc<tokio::sync::Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(tokio::sync::Notify::new());
        let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h).to_owned();
        let mut q = self.negotiating.lock().unwrap_or_else(|p| p.into_inner());
        let mut evicted = None;
        if q.len() >= self.limits.negotiating.max(1) {
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for (_, h, _, _) in q.iter() {
                *counts.entry(h.as_str()).or_default() += 1;
            }
            let busiest = counts
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .map(|(h, _)| h.to_owned());
            if let Some(at) = busiest.and_then(|b| q.iter().position(|(_, h, _, _)| *h == b)) {
                if let Some((_, _, who, oldest)) = q.remove(at) {
                    oldest.notify_one();
                    evicted = Some(who);
                }
            }
        }
        q.push_back((id, host, peer.to_owned(), close.clone()));
        drop(q);
        if let Some(who) = evicted {
            self.refuse(
                &who,
                &format!(
                    "more than {} connections were negotiating at once: the oldest from the busiest address was closed",
                    self.limits.negotiating
                ),
            );
        }
        (id, close)
    }

    fn done_negotiating(&self, id: u64) {
        let mut q = self.negotiating.lock().unwrap_or_else(|p| p.into_inner());
        q.retain(|(i, _, _, _)| *i != id);
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Why the last client was refused for a reason of the whole node (its connection limit,
    /// too many negotiating, a failed TLS handshake), if one was within `within`.
    pub fn refusing(&self, within: Duration) -> Option<String> {
        let last = self.last_refusal.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < within)
            .map(|(_, why)| why.clone())
    }

    /// The exports that refused a client by their own limit within `within`, with why.
    pub fn refusing_exports(&self, within: Duration) -> std::collections::BTreeMap<String, String> {
        let mut m = self
            .export_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (at, _)| at.elapsed() < within.max(Duration::from_secs(3600)));
        m.iter()
            .filter(|(_, (at, _))| at.elapsed() < within)
            .map(|(e, (_, why))| (e.clone(), why.clone()))
            .collect()
    }

    fn refuse(&self, peer: &str, why: &str) {
        let mut last = self.last_refusal.lock().unwrap_or_else(|p| p.into_inner());
        if log_refusal(last.as_ref(), why) {
            tracing::warn!(client = %peer, "NBD client refused: {why}");
        }
        *last = Some((std::time::Instant::now(), why.to_owned()));
    }

    fn refuse_export(&self, export: &str, peer: &str, why: &str) {
        let mut m = self
            .export_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if log_refusal(m.get(export), why) {
            tracing::warn!(client = %peer, "NBD client refused: {why}");
        }
        m.insert(
            export.to_owned(),
            (std::time::Instant::now(), why.to_owned()),
        );
    }

    pub fn add(&self, engine: Arc<Engine>) {
        self.exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(engine.volume().to_owned(), engine);
    }

    pub fn remove(&self, volume: &str) -> Option<Arc<Engine>> {
        self.exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume)
    }

    pub fn get(&self, volume: &str) -> Option<Arc<Engine>> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .cloned()
    }

    /// The engine an export name reaches, and the snapshot it names: `VOLUME@SNAPSHOT` is that
    /// snapshot's content, read-only.
    fn lookup(&self, name: &str) -> Option<(Arc<Engine>, Option<String>)> {
        match name.rsplit_once('@') {
            Some((volume, snap)) if !snap.is_empty() => {
                self.get(volume).map(|e| (e, Some(snap.to_owned())))
            }
            _ => self.get(name).map(|e| (e, None)),
        }
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Accept TCP connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.accept_loop::<tokio::net::TcpStream>(listener).await
    }

    /// Accept connections on a unix socket (clients on the same node) until it fails.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        self.accept_loop::<tokio::net::UnixStream>(listener).await
    }

    async fn accept_loop<S: Socket>(self: Arc<Self>, listener: S::Listener) {
        loop {
            match S::accept(&listener).await {
                Ok((stream, peer)) => {
                    if self.open.fetch_add(1, Ordering::AcqRel) >= self.limits.per_node {
                        self.open.fetch_sub(1, Ordering::AcqRel);
                        self.refuse(
                            &peer,
                            &format!(
                                "the node has its limit of {} NBD connections",
                                self.limits.per_node
                            ),
                        );
                        drop(stream);
                        continue;
                    }
                    let counted = Counted {
                        server: self.clone(),
                        export: None,
                    };
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.connection(stream, counted, &peer).await {
                            tracing::debug!(%peer, "nbd connection closed: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("nbd accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Negotiate here, then serve the connection on a thread of its own (see [`serve_on_thread`]).
    /// A client that starts TLS goes to its thread at once: the handshake and the rest of the
    /// negotiation run there.
    async fn connection<S: Socket>(
        self: Arc<Self>,
        stream: S,
        mut counted: Counted,
        peer: &str,
    ) -> Result<()> {
        let (rd, mut wr) = stream.split();
        // Buffered: one recv usually brings several requests.
        let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
        let (id, evicted) = self.start_negotiating(peer);
        let negotiating = Negotiating {
            server: self.clone(),
            id,
            evicted,
            deadline: tokio::time::Instant::now() + NEGOTIATION_TIMEOUT,
        };
        let tls = match &self.tls {
            Some(_) if S::TLS => TlsState::Offered {
                required: !self.plain_tcp,
            },
            _ => TlsState::Unavailable,
        };
        let step = negotiating
            .bounded(self.negotiate(&mut rd, &mut wr, &mut counted, peer, tls, false))
            .await;
        let neg = match step {
            Ok(Step::Serve(neg)) => neg,
            Ok(Step::StartTls { no_zeroes }) => {
                if !rd.buffer().is_empty() {
                    return Err(ConnError::Protocol(
                        "the client sent data before the STARTTLS reply".into(),
                    ));
                }
                let raw = S::unsplit(rd.into_inner(), wr)?;
                let tls = self.tls.clone().expect("TLS was offered");
                return serve_tls_on_thread::<S>(
                    tls,
                    raw,
                    self.busy_poll,
                    counted,
                    peer.to_owned(),
                    negotiating,
                    no_zeroes,
                );
            }
            Err(ConnError::Done) => return Ok(()),
            Err(e) => return Err(e),
        };
        drop(negotiating);
        park::<S>(neg, rd, wr, self.busy_poll, counted).await
    }

    async fn negotiate<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
        counted: &mut Counted,
        peer: &str,
        tls: TlsState,
        self_no_zeroes: bool,
    ) -> Result<Step>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // After STARTTLS the options go on over TLS, with the flags the client gave before.
        let no_zeroes = match tls {
            TlsState::Done => self_no_zeroes,
            _ => {
                let mut hello = Vec::with_capacity(18);
                hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
                hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
                hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
                wr.write_all(&hello).await?;
                wr.flush().await?;
                let client_flags = rd.read_u32().await?;
                if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
                    return Err(ConnError::Protocol(format!(
                        "unknown client flags {client_flags:#x}"
                    )));
                }
                client_flags & CLIENT_NO_ZEROES != 0
            }
        };
        let mut structured = false;
        // The meta context chosen by SET_META_CONTEXT, and for which export.
        let mut meta_for: Option<String> = None;
        loop {
            let magic = rd.read_u64().await?;
            if magic != IHAVEOPT {
                return Err(ConnError::Protocol(format!("bad option magic {magic:#x}")));
            }
            let opt = rd.read_u32().await?;
            let len = rd.read_u32().await?;
            if len > MAX_OPTION_BYTES {
                return Err(ConnError::Protocol(format!(
                    "option {opt} of {len} bytes is too long"
                )));
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            if tls == (TlsState::Offered { required: true })
                && opt != OPT_STARTTLS
                && opt != OPT_ABORT
            {
                self.refuse(
                    peer,
                    "TLS is required on this node's NBD port (connect with nbds:// and a PSK or certificate)",
                );
                if opt == OPT_EXPORT_NAME {
                    // The protocol has no way to refuse EXPORT_NAME but to hang up.
                    return Err(ConnError::Protocol("EXPORT_NAME before STARTTLS".into()));
                }
                let msg = "this server requires TLS: use STARTTLS (an nbds:// URI with tls-psk-file, or certificates)";
                reply_err(wr, opt, REP_ERR_TLS_REQD, msg).await?;
                continue;
            }
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some((engine, snapshot)) = self.lookup(&name) else {
                        // The protocol has no way to refuse EXPORT_NAME but to hang up.
                        return Err(ConnError::Protocol(format!("unknown export {name:?}")));
                    };
                    if let Some(s) = &snapshot {
                        if let Err(why) = snapshot_known(&engine, s).await {
                            return Err(ConnError::Protocol(why));
                        }
                    }
                    if !counted.claim(engine.volume(), peer) {
                        return Err(ConnError::Protocol(format!(
                            "export {name:?} has too many connections"
                        )));
                    }
                    let mut out = Vec::with_capacity(134);
                    out.extend_from_slice(&engine.size_bytes().to_be_bytes());
                    out.extend_from_slice(
                        &transmission_flags(structured, snapshot.is_some()).to_be_bytes(),
                    );
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    wr.write_all(&out).await?;
                    wr.flush().await?;
                    let base_allocation = structured
                        && snapshot.is_none()
                        && meta_for.as_deref() == Some(name.as_str());
                    return Ok(Step::Serve(Negotiated {
                        engine,
                        peer: peer.to_owned(),
                        structured,
                        base_allocation,
                        snapshot,
                    }));
                }
                OPT_ABORT => {
                    let _ = reply(wr, opt, REP_ACK, &[]).await;
                    return Err(ConnError::Done);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        reply_err(wr, opt, REP_ERR_INVALID, "LIST takes no data").await?;
                        continue;
                    }
                    for name in self.names() {
                        let mut d = Vec::with_capacity(4 + name.len());
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        reply(wr, opt, REP_SERVER, &d).await?;
                    }
                    reply(wr, opt, REP_ACK, &[]).await?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        reply_err(wr, opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                            .await?;
                    } else {
                        structured = true;
                        reply(wr, opt, REP_ACK, &[]).await?;
                    }
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, requests)) = parse_info(&data) else {
                        reply_err(wr, opt, REP_ERR_INVALID, "malformed INFO/GO request").await?;
                        continue;
                    };
                    let Some((engine, snapshot)) = self.lookup(&name) else {
                        let msg = format!(
                            "volume {name:?} is not attached on this node (attach it here first)"
                        );
                        reply_err(wr, opt, REP_ERR_UNKNOWN, &msg).await?;
                        continue;
                    };
                    if let Some(s) = &snapshot {
                        if let Err(why) = snapshot_known(&engine, s).await {
                            reply_err(wr, opt, REP_ERR_UNKNOWN, &why).await?;
                            continue;
                        }
                    }
                    if opt == OPT_GO
                        && counted.export.is_none()
                        && !counted.claim(engine.volume(), peer)
                    {
                        let msg = format!(
                            "volume {name:?} has its limit of {} NBD connections on this node; close some and try again",
                            self.limits.per_export
                        );
                        reply_err(wr, opt, REP_ERR_POLICY, &msg).await?;
                        continue;
                    }
                    let mut info = Vec::with_capacity(12);
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&engine.size_bytes().to_be_bytes());
                    info.extend_from_slice(
                        &transmission_flags(structured, snapshot.is_some()).to_be_bytes(),
                    );
                    reply(wr, opt, REP_INFO, &info).await?;
                    for r in requests {
                        match r {
                            INFO_NAME => {
                                let mut d = INFO_NAME.to_be_bytes().to_vec();
                                d.extend_from_slice(name.as_bytes());
                                reply(wr, opt, REP_INFO, &d).await?;
                            }
                            INFO_DESCRIPTION => {
                                let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                                d.extend_from_slice(format!("Zebu volume {name}").as_bytes());
                                reply(wr, opt, REP_INFO, &d).await?;
                            }
                            INFO_BLOCK_SIZE => {
                                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                                d.extend_from_slice(&1u32.to_be_bytes());
                                d.extend_from_slice(&(engine.block_size() as u32).to_be_bytes());
                                d.extend_from_slice(&MAX_IO_BYTES.to_be_bytes());
                                reply(wr, opt, REP_INFO, &d).await?;
                            }
                            _ => {}
                        }
                    }
                    reply(wr, opt, REP_ACK, &[]).await?;
                    if opt == OPT_GO {
                        let base_allocation = structured
                            && snapshot.is_none()
                            && meta_for.as_deref() == Some(name.as_str());
                        return Ok(Step::Serve(Negotiated {
                            engine,
                            peer: peer.to_owned(),
                            structured,
                            base_allocation,
                            snapshot,
                        }));
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if !structured {
                        reply_err(wr, opt, REP_ERR_INVALID, "negotiate STRUCTURED_REPLY first")
                            .await?;
                        continue;
                    }
                    let Some((name, queries)) = parse_meta(&data) else {
                        reply_err(wr, opt, REP_ERR_INVALID, "malformed meta context request")
                            .await?;
                        continue;
                    };
                    let Some((_, snapshot)) = self.lookup(&name) else {
                        let msg = format!("volume {name:?} is not attached on this node");
                        reply_err(wr, opt, REP_ERR_UNKNOWN, &msg).await?;
                        continue;
                    };
                    let set = opt == OPT_SET_META_CONTEXT;
                    // A snapshot's export has no allocation map to offer.
                    let wanted = if snapshot.is_some() {
                        false
                    } else if set {
                        queries.iter().any(|q| q == META_BASE_ALLOCATION)
                    } else {
                        queries.is_empty()
                            || queries
                                .iter()
                                .any(|q| q == META_BASE_ALLOCATION || q == "base:")
                    };
                    if set {
                        meta_for = None;
                    }
                    if wanted {
                        let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                        let mut d = id.to_be_bytes().to_vec();
                        d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                        reply(wr, opt, REP_META_CONTEXT, &d).await?;
                        if set {
                            meta_for = Some(name);
                        }
                    }
                    reply(wr, opt, REP_ACK, &[]).await?;
                }
                OPT_STARTTLS => match tls {
                    _ if !data.is_empty() => {
                        reply_err(wr, opt, REP_ERR_INVALID, "STARTTLS takes no data").await?
                    }
                    TlsState::Unavailable => {
                        let msg = "TLS is not offered here (the node was started without TLS credentials, or this is its unix socket)";
                        reply_err(wr, opt, REP_ERR_POLICY, msg).await?
                    }
                    TlsState::Done => {
                        reply_err(wr, opt, REP_ERR_INVALID, "TLS is already on").await?
                    }
                    TlsState::Offered { .. } => {
                        reply(wr, opt, REP_ACK, &[]).await?;
                        return Ok(Step::StartTls { no_zeroes });
                    }
                },
                _ => reply_err(wr, opt, REP_ERR_UNSUP, "option not supported").await?,
            }
        }
    }
}

fn transmission_flags(structured: bool, read_only: bool) -> u16 {
    if read_only {
        // A snapshot: reads only (FLUSH is allowed and does nothing).
        let mut f = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        if structured {
            f |= TFLAG_SEND_DF;
        }
        return f;
    }
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_FAST_ZERO
        | TFLAG_CAN_MULTI_CONN;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

async fn reply<W: AsyncWrite + Unpin>(wr: &mut W, opt: u32, kind: u32, data: &[u8]) -> Result<()> {
    wr.write_all(&option_reply_header(opt, kind, data.len() as u32))
        .await?;
    wr.write_all(data).await?;
    wr.flush().await?;
    Ok(())
}

async fn reply_err<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    kind: u32,
    msg: &str,
) -> Result<()> {
    reply(wr, opt, kind, msg.as_bytes()).await
}

/// A stream NBD is served on (TCP, or a unix socket for clients on this node): how to split it
/// for negotiation, and how to move it to another runtime afterwards.
trait Socket: AsyncRead + AsyncWrite + Unpin + Sized + Send + 'static {
    type Listener: Send + Sync + 'static;
    type Rd: AsyncRead + Unpin + Send + 'static;
    type Wr: AsyncWrite + TrySend + Unpin;
    type Std: Send + AsRawFd + 'static;
    /// Whether TLS may be offered on it (not on the unix socket: its clients are on this node).
    const TLS: bool;
    /// The next connection and a description of its peer, for logs.
    fn accept(l: &Self::Listener) -> impl Future<Output = std::io::Result<(Self, String)>> + Send;
    fn split(self) -> (Self::Rd, Self::Wr);
    fn unsplit(rd: Self::Rd, wr: Self::Wr) -> std::io::Result<Self::Std>;
    /// Register with the current runtime.
    fn from_std(s: Self::Std) -> std::io::Result<Self>;
    /// A second descriptor of the same socket.
    fn dup(s: &Self::Std) -> std::io::Result<Self::Std>;
    /// Let go of a write half without shutting the socket's sending side (as dropping it
    /// would, which its other descriptor would feel too).
    fn forget(wr: Self::Wr);
}

/// A write half that never shuts the socket down when dropped (see [`Socket::forget`]): the
/// socket may live on through another descriptor, and closes when its last one does.
struct Quiet<S: Socket>(Option<S::Wr>);

impl<S: Socket> Drop for Quiet<S> {
    fn drop(&mut self) {
        if let Some(wr) = self.0.take() {
            S::forget(wr);
        }
    }
}

impl<S: Socket> TrySend for Quiet<S> {
    fn try_send(&self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.as_ref().expect("set until dropped").try_send(bufs)
    }
    fn writable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        self.0.as_ref().expect("set until dropped").writable()
    }
}

impl Socket for tokio::net::TcpStream {
    type Listener = TcpListener;
    const TLS: bool = true;
    async fn accept(l: &TcpListener) -> std::io::Result<(Self, String)> {
        let (s, peer) = l.accept().await?;
        let _ = s.set_nodelay(true);
        Ok((s, peer.to_string()))
    }
    type Rd = tokio::net::tcp::OwnedReadHalf;
    type Wr = tokio::net::tcp::OwnedWriteHalf;
    type Std = std::net::TcpStream;
    fn split(self) -> (Self::Rd, Self::Wr) {
        self.into_split()
    }
    fn unsplit(rd: Self::Rd, wr: Self::Wr) -> std::io::Result<Self::Std> {
        rd.reunite(wr)
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .into_std()
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(s)
    }
    fn dup(s: &Self::Std) -> std::io::Result<Self::Std> {
        s.try_clone()
    }
    fn forget(wr: Self::Wr) {
        wr.forget()
    }
}

impl Socket for tokio::net::UnixStream {
    type Listener = UnixListener;
    const TLS: bool = false;
    async fn accept(l: &UnixListener) -> std::io::Result<(Self, String)> {
        let (s, _) = l.accept().await?;
        Ok((s, "a client on the unix socket".to_string()))
    }
    type Rd = tokio::net::unix::OwnedReadHalf;
    type Wr = tokio::net::unix::OwnedWriteHalf;
    type Std = std::os::unix::net::UnixStream;
    fn split(self) -> (Self::Rd, Self::Wr) {
        self.into_split()
    }
    fn unsplit(rd: Self::Rd, wr: Self::Wr) -> std::io::Result<Self::Std> {
        let s = rd
            .reunite(wr)
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .into_std()?;
        widen_send_buffer(&s);
        Ok(s)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::UnixStream::from_std(s)
    }
    fn dup(s: &Self::Std) -> std::io::Result<Self::Std> {
        s.try_clone()
    }
    fn forget(wr: Self::Wr) {
        wr.forget()
    }
}

/// A unix stream socket's default send buffer (about 208 KiB) takes a 1 MiB read reply in
/// several pieces, each waiting for the client to read; TCP loopback grows its buffers by
/// itself. Ask for 4 MiB (the kernel caps it at `net.core.wmem_max`); failure only costs speed.
fn widen_send_buffer(s: &std::os::unix::net::UnixStream) {
    let size: libc::c_int = 4 << 20;
    // SAFETY: a valid socket fd, and a pointer to a c_int with its correct length.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "could not widen an NBD unix socket's send buffer: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Serve one negotiated connection on a thread of its own, which runs the connection's request
/// tasks on a single-threaded runtime. The thread belongs to this one client, so it may run
/// quick page-cache I/O on the local replica itself (`zebu_replica::io_pool::dedicated`): a
/// request from receipt to reply then needs no hop to another thread when the volume's data is
/// local, which on a small VM is most of the cost of a request. Waits on the disk (FLUSH, FUA,
/// uncached reads) and large transfers still go to the I/O pool, so requests keep overlapping.
fn serve_on_thread<S: Socket>(
    neg: Negotiated,
    raw: S::Std,
    early: Vec<u8>,
    busy_poll: Duration,
    counted: Counted,
) -> Result<()> {
    let volume = neg.engine.volume().to_owned();
    let server = counted.server.clone();
    let (memory, stall) = (server.memory.clone(), server.limits.send_stall);
    let idle = server.limits.idle_release;
    // Where the connection waits again once it has gone idle: the shared runtime.
    let shared = tokio::runtime::Handle::current();
    let fd = raw.as_raw_fd();
    on_thread(volume, fd, busy_poll, (), move || async move {
        // A second descriptor of the socket, kept while the thread serves it, so that the
        // socket outlives this runtime's halves when the connection goes back to wait.
        let spare = match idle {
            Some(_) => Some(S::dup(&raw)?),
            None => None,
        };
        let (rd, wr) = S::from_std(raw)?.split();
        let wr = Quiet::<S>(Some(wr));
        let rd =
            std::io::Cursor::new(early).chain(tokio::io::BufReader::with_capacity(256 * 1024, rd));
        let Some(neg) = transmission(neg, rd, wr, memory, stall, idle).await? else {
            return Ok(());
        };
        let Some(spare) = spare else {
            return Ok(());
        };
        // Idle: nothing in flight, nothing unsent, nothing buffered (the request reader stops
        // only between requests, having read no byte of the next). The thread ends; the
        // connection waits on the shared runtime for its next request.
        shared.spawn(async move {
            let stream = match S::from_std(spare) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot move an idle NBD connection back: {e}");
                    return;
                }
            };
            let (rd, wr) = stream.split();
            let rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
            if let Err(e) = park::<S>(neg, rd, wr, busy_poll, counted).await {
                tracing::debug!("nbd connection closed: {e}");
            }
        });
        Ok(())
    })
}

/// A negotiated connection with no request yet costs no thread: it waits here, on the shared
/// runtime, for its next request (or its end, or the engine's), then goes to a thread of its
/// own ([`serve_on_thread`]).
async fn park<S: Socket>(
    neg: Negotiated,
    mut rd: tokio::io::BufReader<S::Rd>,
    wr: S::Wr,
    busy_poll: Duration,
    counted: Counted,
) -> Result<()> {
    if rd.buffer().is_empty() {
        use tokio::io::AsyncBufReadExt;
        tokio::select! {
            r = rd.fill_buf() => match r {
                Ok([]) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            },
            _ = neg.engine.wait_closed() => return Ok(()),
        }
    }
    // Bytes the client has sent must not be lost on the way.
    let early = rd.buffer().to_vec();
    let raw = S::unsplit(rd.into_inner(), wr)?;
    serve_on_thread::<S>(neg, raw, early, busy_poll, counted)
}

/// Serve a connection that asked for TLS on a thread of its own: the handshake, the rest of
/// the negotiation (still counted and timed as negotiating), then transmission. Replies go
/// through a [`crate::pipe`], as a TLS stream cannot be written from many tasks at once.
fn serve_tls_on_thread<S: Socket>(
    tls: Arc<NbdTls>,
    raw: S::Std,
    busy_poll: Duration,
    mut counted: Counted,
    peer: String,
    negotiating: Negotiating,
    no_zeroes: bool,
) -> Result<()> {
    let fd = raw.as_raw_fd();
    let server = counted.server.clone();
    on_thread(peer.clone(), fd, busy_poll, (), move || async move {
        // Buffered under TLS: records are read many at a time and written out together (a
        // 1 MiB reply is 64 records; one syscall each would cost more than encrypting them).
        let stream = tokio::io::BufStream::with_capacity(256 * 1024, 256 * 1024, S::from_std(raw)?);
        let ssl = tls.session().map_err(ConnError::Protocol)?;
        let mut stream = tokio_openssl::SslStream::new(ssl, stream)
            .map_err(|e| ConnError::Protocol(format!("TLS session: {e}")))?;
        let handshake = negotiating
            .bounded(async {
                std::pin::Pin::new(&mut stream)
                    .accept()
                    .await
                    .map_err(|e| ConnError::Protocol(format!("TLS handshake failed: {e}")))
            })
            .await;
        if let Err(e) = handshake {
            server.refuse(&peer, &format!("{e} (wrong key or certificate?)"));
            return Err(e);
        }
        let (rd, mut wr) = tokio::io::split(stream);
        let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
        let step = negotiating
            .bounded(server.negotiate(
                &mut rd,
                &mut wr,
                &mut counted,
                &peer,
                TlsState::Done,
                no_zeroes,
            ))
            .await;
        drop(negotiating);
        let neg = match step {
            Ok(Step::Serve(neg)) => neg,
            Ok(Step::StartTls { .. }) => unreachable!("STARTTLS is refused once TLS is on"),
            Err(ConnError::Done) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _counted = counted;
        let (pipe, writer) = crate::pipe::pipe(wr);
        let memory = server.memory.clone();
        // A TLS session lives in this thread's runtime: it keeps its thread while it lasts.
        let result = transmission(neg, rd, pipe, memory, server.limits.send_stall, None)
            .await
            .map(|_| ());
        writer.finish(CLOSE_PATIENCE).await;
        result
    })
}

/// Run a connection on a thread of its own, with a single-threaded runtime; `what` names it
/// in logs, and `keep` lives as long as the thread.
fn on_thread<K, F, Fut>(
    what: String,
    fd: std::os::fd::RawFd,
    busy_poll: Duration,
    keep: K,
    serve: F,
) -> Result<()>
where
    K: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>>,
{
    std::thread::Builder::new()
        .name("zebu-nbd-conn".into())
        .spawn(move || {
            let _keep = keep;
            zebu_replica::io_pool::dedicated();
            // Between a reply and the client's next request, poll instead of sleeping (a
            // wake-up costs more than the request on a VM).
            crate::busy_poll::enable(busy_poll);
            let _watch = crate::busy_poll::watch(fd);
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(crate::busy_poll::before_park)
                .on_thread_unpark(crate::busy_poll::after_unpark)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(%what, "cannot start an NBD connection's runtime: {e}");
                    return;
                }
            };
            match rt.block_on(serve()) {
                Ok(()) | Err(ConnError::Done) => {}
                Err(e) => tracing::debug!(%what, "nbd connection closed: {e}"),
            }
        })
        .map_err(|e| {
            ConnError::Io(std::io::Error::other(format!(
                "starting a connection thread: {e}"
            )))
        })?;
    Ok(())
}

/// One reply ready to be written: a header and optional payload pieces.
struct Out {
    parts: Vec<Bytes>,
}

/// Serve requests until the client leaves. `memory`: the node's budget, shared by all its
/// connections; `stall`: how long the client may take none of its replies; `idle`: after this
/// long with no request and nothing in flight or unsent, stop before reading another byte and
/// give the connection back (`Some`), for it to wait without a thread.
async fn transmission<R, W>(
    neg: Negotiated,
    mut rd: R,
    wr: W,
    memory: Arc<Semaphore>,
    stall: Duration,
    idle: Option<Duration>,
) -> Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: TrySend,
{
    // Replies are written by the request tasks themselves (see `crate::sender`).
    let sender = Arc::new(Sender::with_stall(wr, Some(stall)));
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    // Requests being handled: a reply written while others are pending waits to be batched.
    let in_flight = Arc::new(AtomicUsize::new(0));
    // This connection's own sockets to the remote replicas: their replies are read on this
    // thread, so a replicated write completes here without a hop to another thread.
    let lanes = Arc::new(neg.engine.lanes());
    let neg = Arc::new(neg);
    // Ok(true): gone idle, see `idle`.
    let result: Result<bool> = async {
        // One future for the whole connection: registering anew for every request would cost.
        let broke = sender.wait_failed();
        tokio::pin!(broke);
        let closed = neg.engine.wait_closed();
        tokio::pin!(closed);
        // Idleness is checked on a tick, not by a timer per request: a connection is idle
        // when a whole tick has passed with no request (so after `idle` to twice that).
        let mut ticks = idle.map(|d| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let (mut requests, mut at_last_tick) = (0u64, 0u64);
        loop {
            let mut hb = [0u8; REQUEST_BYTES];
            // A detached or fenced-off engine drops its clients: they must not keep writing.
            // A client that does not read its replies is not read from either.
            // In this order: the end of the engine or of sending wins over a client that keeps
            // sending; a request that has begun wins over the idle tick.
            let read = tokio::select! {
                biased;
                _ = &mut closed => return Ok(false),
                // A client that takes none of its replies is let go, reading or not.
                why = &mut broke => {
                    tracing::warn!(client = %neg.peer, volume = %neg.engine.volume(), "NBD client disconnected: {why}");
                    return Err(ConnError::Protocol(why));
                }
                r = async {
                    sender.wait_below(UNSENT_LIMIT).await;
                    rd.read_exact(&mut hb[..1]).await
                } => r,
                _ = tick(&mut ticks) => {
                    // Only when nothing at all is in flight or unsent (request tasks have
                    // let go of everything they held once their permits are back).
                    let quiet = requests == at_last_tick
                        && in_flight.load(Ordering::Acquire) == 0
                        && budget.available_permits() == BUDGET_UNITS as usize
                        && sender.unsent() == 0
                        && Arc::strong_count(&neg) == 1
                        && Arc::strong_count(&sender) == 1;
                    if quiet {
                        return Ok(true);
                    }
                    at_last_tick = requests;
                    continue;
                }
            };
            match read {
                Ok(_) => requests += 1,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e.into()),
            }
            match tokio::time::timeout(REQUEST_TIMEOUT, rd.read_exact(&mut hb[1..])).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(ConnError::Protocol(format!(
                        "a request header did not arrive whole within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    )))
                }
            }
            let Some(req) = Request::decode(&hb) else {
                return Err(ConnError::Protocol("bad request magic".into()));
            };
            let units = match req.kind {
                CMD_READ | CMD_WRITE => 1 + req.length.min(MAX_IO_BYTES) / UNIT_BYTES,
                // The replica's map, its decoded form and the reply: up to ~1.5 MiB.
                CMD_BLOCK_STATUS => 24,
                _ => 1,
            };
            // Reserve the buffers before allocating them (bounded memory per connection).
            let permit = budget
                .clone()
                .acquire_many_owned(units)
                .await
                .expect("semaphore is never closed");
            // And from the node's budget, held until the reply is on the socket (a wait that
            // the end of the engine or of sending cuts short).
            let held = tokio::select! {
                biased;
                _ = &mut closed => return Ok(false),
                why = &mut broke => return Err(ConnError::Protocol(why)),
                p = memory.clone().acquire_many_owned(units) => {
                    p.expect("semaphore is never closed")
                }
            };
            let mut payload = Bytes::new();
            if req.kind == CMD_WRITE {
                if req.length > MAX_IO_BYTES {
                    return Err(ConnError::Protocol(format!(
                        "write of {} bytes exceeds the maximum",
                        req.length
                    )));
                }
                // 30 s, and a second more per MiB (a slow link still gets a large write in).
                let patience = REQUEST_TIMEOUT + Duration::from_secs(u64::from(req.length >> 20));
                payload = match tokio::time::timeout(
                    patience,
                    crate::payload::read_payload(&mut rd, req.length as usize),
                )
                .await
                {
                    Ok(p) => p?,
                    Err(_) => {
                        return Err(ConnError::Protocol(format!(
                            "the {} bytes of a write did not arrive within {} s",
                            req.length,
                            patience.as_secs()
                        )))
                    }
                };
            }
            if req.kind == CMD_DISC {
                // Requests in flight finish and are answered below, then the connection closes.
                return Ok(false);
            }
            let (neg, lanes) = (neg.clone(), lanes.clone());
            let (sender, in_flight) = (sender.clone(), in_flight.clone());
            in_flight.fetch_add(1, Ordering::AcqRel);
            let counted = crate::busy_poll::request();
            tokio::spawn(async move {
                let out = handle(&neg, &lanes, req, payload).await;
                let parts: Vec<&[u8]> = out.parts.iter().map(|p| &p[..]).collect();
                // A failed send means the connection is broken; the reader sees that too.
                let before = in_flight.fetch_sub(1, Ordering::AcqRel);
                let alone = before == 1;
                let _ = sender.send_holding(&parts, alone, Some(held));
                drop(permit);
                drop(counted);
            });
        }
    }
    .await;
    if let Ok(true) = result {
        drop((sender, lanes, rd));
        return Ok(Arc::into_inner(neg));
    }
    // Every request in flight answers before the connection closes (unless the client has
    // stopped reading its replies for a long time).
    let _ = tokio::time::timeout(CLOSE_PATIENCE, async {
        let _all = budget.acquire_many(BUDGET_UNITS).await;
        sender.drain().await;
    })
    .await;
    result.map(|_| None)
}

/// The next tick; never without ticks.
async fn tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A request to a snapshot's read-only export.
async fn handle_snapshot(neg: &Negotiated, snap: &str, req: Request) -> Out {
    match req.kind {
        CMD_READ => {
            if req.length > MAX_IO_BYTES {
                return error_out(neg, &req, EINVAL, "read too large");
            }
            match neg.engine.read_snapshot(snap, req.offset, req.length).await {
                Ok(data) => read_out(neg, &req, Bytes::from(data)),
                Err(e) => {
                    tracing::warn!("nbd snapshot read failed: {e}");
                    error_out(neg, &req, errno(&e), &e.to_string())
                }
            }
        }
        CMD_FLUSH => simple(0, req.handle),
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
            error_out(neg, &req, EPERM, "a snapshot is read-only")
        }
        CMD_BLOCK_STATUS => error_out(neg, &req, EINVAL, "no metadata context was negotiated"),
        _ => error_out(neg, &req, EINVAL, "not a command a snapshot's export takes"),
    }
}

/// A READ's successful reply.
fn read_out(neg: &Negotiated, req: &Request, data: Bytes) -> Out {
    if neg.structured {
        let h = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.handle,
            8 + req.length,
        );
        Out {
            parts: vec![
                Bytes::copy_from_slice(&h),
                Bytes::copy_from_slice(&req.offset.to_be_bytes()),
                data,
            ],
        }
    } else {
        Out {
            parts: vec![Bytes::copy_from_slice(&simple_reply(0, req.handle)), data],
        }
    }
}

fn simple(error: u32, handle: u64) -> Out {
    Out {
        parts: vec![Bytes::copy_from_slice(&simple_reply(error, handle))],
    }
}

fn structured_error(error: u32, handle: u64, msg: &str) -> Out {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let mut d = Vec::with_capacity(6 + msg.len());
    d.extend_from_slice(&error.to_be_bytes());
    d.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    d.extend_from_slice(msg);
    let h = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, d.len() as u32);
    Out {
        parts: vec![Bytes::copy_from_slice(&h), Bytes::from(d)],
    }
}

/// An error reply in the form the client expects for this command.
fn error_out(neg: &Negotiated, req: &Request, error: u32, msg: &str) -> Out {
    if neg.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
        structured_error(error, req.handle, msg)
    } else {
        simple(error, req.handle)
    }
}

/// Command flags this server knows.
const KNOWN_CMD_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

async fn handle(neg: &Negotiated, engine: &Lanes, req: Request, payload: Bytes) -> Out {
    // Flags the protocol does not define, or DF where it was not negotiated (it needs
    // structured replies): refused, nothing done, the connection stays usable.
    if req.flags & !KNOWN_CMD_FLAGS != 0 {
        return error_out(neg, &req, EINVAL, "unknown command flags");
    }
    if req.flags & CMD_FLAG_DF != 0 && !neg.structured {
        return error_out(
            neg,
            &req,
            EINVAL,
            "DF needs structured replies, which were not negotiated",
        );
    }
    if let Some(snap) = &neg.snapshot {
        return handle_snapshot(neg, snap, req).await;
    }
    let size = neg.engine.size_bytes();
    let in_range = req
        .offset
        .checked_add(req.length as u64)
        .is_some_and(|end| end <= size);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let done = |r: std::result::Result<(), EngineError>| match r {
        Ok(()) => simple(0, req.handle),
        Err(e) => {
            tracing::warn!("nbd request failed: {e}");
            error_out(neg, &req, errno(&e), &e.to_string())
        }
    };
    match req.kind {
        CMD_READ => {
            if !in_range || req.length > MAX_IO_BYTES {
                return error_out(neg, &req, EINVAL, "read outside the volume or too large");
            }
            match engine.read(req.offset, req.length).await {
                Ok(data) => read_out(neg, &req, data),
                Err(e) => {
                    tracing::warn!("nbd read failed: {e}");
                    error_out(neg, &req, errno(&e), &e.to_string())
                }
            }
        }
        CMD_WRITE => {
            if !in_range {
                return error_out(neg, &req, ENOSPC, "write past the end of the volume");
            }
            done(engine.write(req.offset, payload, fua).await)
        }
        CMD_FLUSH => done(engine.flush().await),
        CMD_TRIM | CMD_WRITE_ZEROES => {
            if !in_range {
                return error_out(neg, &req, EINVAL, "range outside the volume");
            }
            done(
                engine
                    .zero(req.offset, req.length as u64, req.kind == CMD_TRIM, fua)
                    .await,
            )
        }
        CMD_BLOCK_STATUS => {
            if !neg.base_allocation {
                return error_out(neg, &req, EINVAL, "no metadata context was negotiated");
            }
            if !in_range || req.length == 0 {
                return error_out(neg, &req, EINVAL, "range outside the volume");
            }
            let len = (req.length as u64).min(MAX_STATUS_BYTES) as u32;
            match engine.map(req.offset, len).await {
                Ok(extents) => {
                    let take = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        1
                    } else {
                        extents.len()
                    };
                    let mut d = Vec::with_capacity(4 + 8 * take);
                    d.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
                    for e in extents.iter().take(take) {
                        let mut st = 0;
                        if e.flags & EXTENT_HOLE != 0 {
                            st |= STATE_HOLE;
                        }
                        if e.flags & EXTENT_ZERO != 0 {
                            st |= STATE_ZERO;
                        }
                        d.extend_from_slice(&e.length.to_be_bytes());
                        d.extend_from_slice(&st.to_be_bytes());
                    }
                    if take == 0 {
                        return error_out(neg, &req, EIO, "empty allocation map");
                    }
                    let h = structured_header(
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_BLOCK_STATUS,
                        req.handle,
                        d.len() as u32,
                    );
                    Out {
                        parts: vec![Bytes::copy_from_slice(&h), Bytes::from(d)],
                    }
                }
                Err(e) => error_out(neg, &req, errno(&e), &e.to_string()),
            }
        }
        _ => error_out(neg, &req, EINVAL, "command not supported"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn option_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_info(&bytes);
            let _ = parse_meta(&bytes);
        }
    }

    #[test]
    fn info_and_meta_parsers_reject_garbage() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info(&d), Some(("vol".into(), vec![INFO_BLOCK_SIZE])));
        assert_eq!(parse_info(&d[..d.len() - 1]), None);
        assert_eq!(parse_info(&u32::MAX.to_be_bytes()), None);

        let mut m = 3u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"vol");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
        m.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_meta(&m),
            Some(("vol".into(), vec![META_BASE_ALLOCATION.into()]))
        );
        let mut bad = m.clone();
        bad[7 + 4 + 3] = 0xff; // query length far too large
        assert_eq!(parse_meta(&bad), None);
    }
}
