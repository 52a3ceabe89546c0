//! The replica data server: speaks the data protocol (`zebu_proto::data`) to engines.
//!
//! One TCP listener per node serves every replica on it; the handshake (async, on the agent's
//! data runtime) names the replica. After it, each connection gets a thread of its own that
//! reads requests with blocking calls and runs the quick ones itself: a write goes into the page
//! cache in a few microseconds, and doing it right there saves two thread wake-ups per request
//! (the largest cost of a replicated write at queue depth 1). Requests that wait on the disk
//! (FLUSH, FUA writes, uncached reads) go to the shared [`IoPool`], so a slow fsync never holds
//! up the writes behind it; replies go out in completion order. Memory per connection is
//! bounded: one quick request at a time, plus a budget for the requests handed to the pool.
//! Ordering between overlapping writes is the engine's job: it never has two overlapping writes
//! in flight.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use zebu_proto::data::{
    self, Hello, Op, ReplyHeader, RequestHeader, Status, Welcome, WelcomeStatus, HELLO_FIXED_BYTES,
    HELLO_READER, PROTOCOL_VERSION, REQUEST_HEADER_BYTES,
};

use crate::io_pool::IoPool;
use crate::ops;
use crate::store::{Replica, Session};
use crate::tls::{Duplex, TlsWriter, TLS_HANDSHAKE_RECORD};

/// Memory one connection may hold in request and reply buffers, in units of [`UNIT_BYTES`]
/// (64 MiB). Every request costs at least one unit, so this also bounds the requests in flight.
const BUDGET_UNITS: u32 = 1024;
const UNIT_BYTES: u32 = 64 * 1024;

/// Budget units a request holds while in flight: one, plus its data buffer.
fn cost(h: &RequestHeader) -> u32 {
    match h.op {
        // Its payload is a name; its reply up to the largest snapshot read.
        Op::ReadSnapshot => 1 + data::MAX_SNAPSHOT_READ_BYTES / UNIT_BYTES,
        // Its reply is an allocation map.
        Op::SnapshotDelta => 8,
        op if op.length_is_bytes() => 1 + h.length / UNIT_BYTES,
        // A layer list can be long (a record per snapshot).
        Op::Layers => 8,
        // An allocation map can be up to MAX_MAP_EXTENTS × 8 bytes (512 KiB).
        Op::Map => 8,
        _ => 1,
    }
}
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Once a request's first byte has come, the rest of its header and its payload must come
/// within this (between requests a connection may be idle as long as it likes). An engine
/// retires a replica that does not answer in 8 s, so a peer that stalls longer is gone anyway.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Handshakes in progress at once (each may cost a TLS key exchange and signature): past them,
/// new connections are closed at once, with a log line, until one ends. Engines retry.
pub const MAX_HANDSHAKES: usize = 64;

struct Reply {
    header: [u8; data::REPLY_HEADER_BYTES],
    payload: Vec<u8>,
}

fn reply(id: u64, status: Status, payload: Vec<u8>) -> Reply {
    let header = ReplyHeader {
        status: status as u32,
        id,
        length: payload.len() as u32,
        payload_crc: if payload.is_empty() {
            0
        } else {
            crc32c::crc32c(&payload)
        },
    }
    .encode();
    Reply { header, payload }
}

/// A served replica and the signal that closes its connections when it is removed.
type Served = (Arc<Replica>, watch::Sender<bool>);

/// A replica connection after a successful handshake: the replica, the signal that closes the
/// connection when the replica is removed, and the engine's session on the replica.
type Accepted = (Arc<Replica>, watch::Receiver<bool>, Arc<Session>);
/// A Hello that passed its checks: the replica, its stop signal and the engine's epoch.
/// The replica, its stop signal, the engine's epoch and the Hello's flags.
type Hailed = (Arc<Replica>, watch::Receiver<bool>, u64, u16);

/// How fast a merge of a deleted snapshot copies by default (bytes a second), so it never
/// crowds out the volume's own I/O ([`ReplicaServer::set_merge_rate`]).
pub const MERGE_RATE: u64 = 128 << 20;
/// A snapshot view unread this long is dropped (see [`Replica::snapshot_view_cached`]).
const VIEW_IDLE: Duration = Duration::from_secs(30);
/// How often the merge thread looks for deleted snapshots to merge.
const MERGE_POLL: Duration = Duration::from_millis(250);

/// The server's merge thread: merges the deleted snapshots of every served replica, one
/// replica at a time, paced (its merge rate). A replica removed from the server stops its merge;
/// a failed merge is logged and tried again later (a full disk, mostly).
fn merge_loop(server: std::sync::Weak<ReplicaServer>) {
    let mut failing: HashMap<String, String> = HashMap::new();
    loop {
        std::thread::sleep(MERGE_POLL);
        let Some(s) = server.upgrade() else {
            return;
        };
        let replicas = s.list();
        drop(s);
        for r in replicas {
            // Views of snapshots nobody read for a while give their memory back, and layers
            // no reader holds any more are closed (freeing a merged layer's space) here, not
            // in a snapshot's pause.
            r.drop_idle_views(VIEW_IDLE);
            r.release_freed();
            if !r.has_pending_merges() || r.is_poisoned() {
                continue;
            }
            let rate = s_rate(&server);
            match r.merge_pending(rate, r.closing()) {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(replica = %r.name(), "merged {n} deleted snapshot(s)");
                    }
                    failing.remove(r.name());
                }
                Err(e) => {
                    let why = e.full_message();
                    if failing.get(r.name()) != Some(&why) {
                        tracing::warn!(replica = %r.name(), "merging a deleted snapshot failed, tried again later: {why}");
                        failing.insert(r.name().to_owned(), why);
                    }
                }
            }
        }
    }
}

fn s_rate(server: &std::sync::Weak<ReplicaServer>) -> u64 {
    server
        .upgrade()
        .map_or(MERGE_RATE, |s| s.merge_rate.load(Ordering::Relaxed))
}

/// Serves all replicas of one node.
pub struct ReplicaServer {
    /// Bytes a second a merge copies.
    merge_rate: std::sync::atomic::AtomicU64,
    /// Served replicas, each with a signal that closes its connections when it is removed.
    replicas: RwLock<HashMap<String, Served>>,
    secret: RwLock<Option<String>>,
    pool: Arc<IoPool>,
    /// TLS for engines that ask for it (None: its certificate could not be made).
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Refuse engines that do not use TLS.
    require_tls: AtomicBool,
    /// Permits for handshakes in progress ([`MAX_HANDSHAKES`]).
    handshakes: Arc<tokio::sync::Semaphore>,
}

impl ReplicaServer {
    pub fn new(name: &str, io_threads: usize) -> Arc<ReplicaServer> {
        let tls = match crate::tls::server_config() {
            Ok(c) => Some(tokio_rustls::TlsAcceptor::from(c)),
            Err(e) => {
                tracing::warn!("the data server cannot offer TLS: {e}");
                None
            }
        };
        let server = Arc::new(ReplicaServer {
            merge_rate: std::sync::atomic::AtomicU64::new(MERGE_RATE),
            replicas: RwLock::new(HashMap::new()),
            secret: RwLock::new(None),
            pool: Arc::new(IoPool::new(name, io_threads)),
            tls,
            require_tls: AtomicBool::new(false),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
        });
        let weak = Arc::downgrade(&server);
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-merge"))
            .spawn(move || merge_loop(weak));
        if let Err(e) = spawned {
            tracing::error!("no thread for snapshot merges ({e}): deleted snapshots keep their space until a restart");
        }
        server
    }

    /// Refuse engines that connect without TLS (`zebu agent --data-tls`). Engines that start
    /// TLS are served either way.
    /// How fast merges of deleted snapshots copy, in bytes a second (0: as fast as the disk
    /// goes).
    pub fn set_merge_rate(&self, bytes_per_sec: u64) {
        self.merge_rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn require_tls(&self, on: bool) -> Result<(), String> {
        if on && self.tls.is_none() {
            return Err("TLS on the data protocol is required, but this server could not set it up (see the warning above)".into());
        }
        self.require_tls.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Set the cluster secret engines must present. Until it is set, every handshake is refused.
    pub fn set_secret(&self, secret: String) {
        *self.secret.write().unwrap_or_else(|p| p.into_inner()) = Some(secret);
    }

    pub fn add(&self, replica: Arc<Replica>) {
        let (stop, _) = watch::channel(false);
        let old = self
            .replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(replica.name().to_owned(), (replica, stop));
        if let Some((_, stop)) = old {
            let _ = stop.send(true);
        }
    }

    /// Stop serving a replica; its open connections are closed, and a merge of its snapshots
    /// stops (it goes on when the replica is opened again).
    pub fn remove(&self, name: &str) -> Option<Arc<Replica>> {
        let (replica, stop) = self
            .replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)?;
        let _ = stop.send(true);
        replica.close();
        Some(replica)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Replica>> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|(r, _)| r.clone())
    }

    fn get_with_stop(&self, name: &str) -> Option<(Arc<Replica>, watch::Receiver<bool>)> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|(r, s)| (r.clone(), s.subscribe()))
    }

    /// The I/O threads of this server, for in-process users of its replicas.
    pub fn pool(&self) -> Arc<IoPool> {
        self.pool.clone()
    }

    pub fn list(&self) -> Vec<Arc<Replica>> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Accept connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "refused a data connection: {MAX_HANDSHAKES} handshakes are in progress already");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.connection(stream, permit).await {
                            tracing::debug!(%peer, "data connection closed: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("data listener accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The data protocol's handshake, on a plain socket or inside a TLS session whose channel
    /// binding is `binding` (empty on plain TCP).
    async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        binding: &[u8],
    ) -> Result<Accepted, String> {
        let mut fixed = [0u8; HELLO_FIXED_BYTES];
        stream
            .read_exact(&mut fixed)
            .await
            .map_err(|e| format!("reading hello: {e}"))?;
        let rest = match Hello::rest_len(&fixed) {
            Ok(r) => r,
            Err(e) => {
                let msg = e.to_string();
                let _ = send(
                    stream,
                    &Welcome::refused(WelcomeStatus::Malformed, msg.clone()).encode(),
                )
                .await;
                return Err(msg);
            }
        };
        let mut bytes = fixed.to_vec();
        bytes.resize(HELLO_FIXED_BYTES + rest, 0);
        stream
            .read_exact(&mut bytes[HELLO_FIXED_BYTES..])
            .await
            .map_err(|e| format!("reading hello: {e}"))?;
        if binding.is_empty() && self.require_tls.load(Ordering::Relaxed) {
            let msg = "this node serves the data protocol over TLS only (its agent runs with --data-tls): start the engine's agent with --data-tls as well".to_string();
            tracing::warn!("refused a plain data connection: {msg}");
            let _ = send(
                stream,
                &Welcome::refused(WelcomeStatus::AuthFailed, msg.clone()).encode(),
            )
            .await;
            return Err(msg);
        }
        // Both ends prove they know the cluster secret before the Hello asks anything.
        if let Err((status, msg)) = self.authenticate(stream, &bytes, binding).await {
            tracing::warn!("refused data connection: {msg}");
            let _ = send(stream, &Welcome::refused(status, msg.clone()).encode()).await;
            return Err(msg);
        }
        let mut checked = self.check_hello(&bytes);
        // The fence first: a durable metadata replace when the epoch is new (a reader session
        // takes no part in it).
        let fence = match &checked {
            Ok((replica, _, epoch, flags)) if flags & HELLO_READER == 0 => {
                Some((replica.clone(), *epoch))
            }
            _ => None,
        };
        if let Some((replica, epoch)) = fence {
            let r = replica.clone();
            let admitted = tokio::task::spawn_blocking(move || r.accept_epoch(epoch))
                .await
                .unwrap_or_else(|e| {
                    Err(crate::ReplicaError::Invalid {
                        replica: replica.name().to_owned(),
                        reason: format!("recording the engine's epoch failed: {e}"),
                    })
                });
            if let Err(e) = admitted {
                let status = match e {
                    crate::ReplicaError::Fenced { .. } => WelcomeStatus::Fenced,
                    _ => WelcomeStatus::Unavailable,
                };
                checked = Err((status, e.full_message()));
            }
        }
        match checked {
            Ok((replica, stop, epoch, flags)) => {
                // The session starts at the replica's generation, in the engine's epoch.
                let session = if flags & HELLO_READER != 0 {
                    Session::reader(&replica)
                } else {
                    Session::new(&replica, epoch)
                };
                let w = Welcome {
                    version: PROTOCOL_VERSION,
                    status: WelcomeStatus::Ok,
                    size_bytes: replica.size_bytes(),
                    block_size: replica.block_size(),
                    generation: session.generation(),
                    message: String::new(),
                };
                send(stream, &w.encode())
                    .await
                    .map_err(|e| format!("writing welcome: {e}"))?;
                Ok((replica, stop, Arc::new(session)))
            }
            Err((status, msg)) => {
                tracing::warn!("refused data connection: {msg}");
                let _ = send(stream, &Welcome::refused(status, msg.clone()).encode()).await;
                Err(msg)
            }
        }
    }

    /// The challenge–response of `zebu_proto::auth`: a challenge proving this server knows the
    /// secret, then the engine's proof, checked.
    async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        hello_bytes: &[u8],
        binding: &[u8],
    ) -> Result<(), (WelcomeStatus, String)> {
        use zebu_proto::auth::*;
        let hello =
            Hello::decode(hello_bytes).map_err(|e| (WelcomeStatus::Malformed, e.to_string()))?;
        if hello.version != PROTOCOL_VERSION {
            return Err((
                WelcomeStatus::BadVersion,
                format!("protocol version {} is not supported; this replica server speaks {PROTOCOL_VERSION}", hello.version),
            ));
        }
        if hello.nonce.len() != NONCE_BYTES {
            return Err((
                WelcomeStatus::Malformed,
                format!(
                    "the Hello's nonce has {} bytes, not {NONCE_BYTES}",
                    hello.nonce.len()
                ),
            ));
        }
        let secret = self
            .secret
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                (
                    WelcomeStatus::AuthFailed,
                    "this node has no cluster secret yet (its manager has not answered it)".into(),
                )
            })?;
        let mut nonce = [0u8; NONCE_BYTES];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        let proof = server_proof(&secret, hello_bytes, &nonce, binding);
        let challenge = Challenge { nonce, proof };
        send(stream, &challenge.encode())
            .await
            .map_err(|e| (WelcomeStatus::Malformed, format!("writing challenge: {e}")))?;
        let mut b = [0u8; PROOF_FRAME_BYTES];
        stream
            .read_exact(&mut b)
            .await
            .map_err(|e| (WelcomeStatus::Malformed, format!("reading proof: {e}")))?;
        let theirs = Proof::decode(&b).map_err(|e| (WelcomeStatus::Malformed, e.to_string()))?;
        let want = client_proof(&secret, hello_bytes, &nonce, &proof, binding);
        if !proofs_equal(&theirs.proof, &want) {
            return Err((
                WelcomeStatus::AuthFailed,
                "the engine's proof does not match: it does not hold this cluster's secret".into(),
            ));
        }
        Ok(())
    }

    fn check_hello(&self, bytes: &[u8]) -> Result<Hailed, (WelcomeStatus, String)> {
        let hello = Hello::decode(bytes).map_err(|e| (WelcomeStatus::Malformed, e.to_string()))?;
        if hello.version != PROTOCOL_VERSION {
            return Err((
                WelcomeStatus::BadVersion,
                format!("protocol version {} is not supported; this replica server speaks {PROTOCOL_VERSION}", hello.version),
            ));
        }
        let (replica, stop) = self.get_with_stop(&hello.replica).ok_or_else(|| {
            (
                WelcomeStatus::UnknownReplica,
                format!("replica {} is not served here", hello.replica),
            )
        })?;
        if replica.volume() != hello.volume {
            return Err((
                WelcomeStatus::VolumeMismatch,
                format!(
                    "replica {} belongs to volume {}, not {}",
                    hello.replica,
                    replica.volume(),
                    hello.volume
                ),
            ));
        }
        Ok((replica, stop, hello.epoch, hello.flags))
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), String> {
        let setup = |e: std::io::Error| format!("setting up the connection: {e}");
        let blocking = |s: TcpStream| {
            s.into_std()
                .and_then(|s| s.set_nonblocking(false).map(|()| s))
                .map_err(setup)
        };
        let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let mut first = [0u8; 1];
            let tls = stream
                .peek(&mut first)
                .await
                .map_err(|e| format!("reading hello: {e}"))?
                == 1
                && first[0] == TLS_HANDSHAKE_RECORD;
            if !tls {
                let mut stream = stream;
                let a = self.handshake(&mut stream, &[]).await?;
                return Ok::<_, String>((a, Transport::Plain(blocking(stream)?)));
            }
            let Some(acceptor) = &self.tls else {
                return Err("an engine started TLS, which this server cannot offer".to_string());
            };
            let mut tls = acceptor
                .accept(stream)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let mut binding = [0u8; zebu_proto::auth::BINDING_BYTES];
            tls.get_ref()
                .1
                .export_keying_material(&mut binding, zebu_proto::auth::EXPORTER_LABEL, None)
                .map_err(|e| format!("TLS channel binding: {e}"))?;
            let a = self.handshake(&mut tls, &binding).await?;
            let (socket, session) = tls.into_inner();
            let (rd, wr) = Duplex::split(blocking(socket)?, session).map_err(setup)?;
            Ok((a, Transport::Tls(rd, wr)))
        })
        .await
        .map_err(|_| "handshake timed out".to_string())??;
        drop(permit);
        let ((replica, mut stop, session), transport) = accepted;
        // From here on the connection has a thread of its own (see the module docs).
        let (reader, sink, closer) = match transport {
            Transport::Plain(s) => {
                let closer = s.try_clone().map_err(setup)?;
                let sink = s.try_clone().map_err(setup)?;
                (Source::Plain(s), Sink::Plain(sink), closer)
            }
            Transport::Tls(rd, wr) => {
                let closer = rd.socket().try_clone().map_err(setup)?;
                (Source::Tls(rd), Sink::Tls(wr), closer)
            }
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let conn = Connection {
            replies: Arc::new(Replies::new(sink)),
            budget: Arc::new(Budget::new(BUDGET_UNITS)),
            replica,
            session,
            pool: self.pool.clone(),
        };
        let name = conn.replica.name().to_owned();
        std::thread::Builder::new()
            .name("zebu-replica-conn".into())
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || {
                if let Err(e) = conn.serve(reader) {
                    tracing::debug!("data connection closed: {e}");
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| format!("starting a connection thread: {e}"))?;
        // A replica that is no longer served here drops its connections.
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                tracing::debug!("closing a connection: replica {name} is no longer served here");
                let _ = closer.shutdown(Shutdown::Both);
            }
            _ = done_rx => {}
        }
        Ok(())
    }
}

/// Write a handshake frame and push it out (under TLS, `write_all` may leave records in the
/// session).
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Stack of a connection thread: it only decodes requests and calls into the store.
const CONNECTION_STACK_BYTES: usize = 256 * 1024;

/// Budget units available to requests handed to the I/O pool (blocking semaphore).
struct Budget {
    free: Mutex<u32>,
    returned: Condvar,
}

impl Budget {
    fn new(units: u32) -> Budget {
        Budget {
            free: Mutex::new(units),
            returned: Condvar::new(),
        }
    }

    fn acquire(&self, n: u32) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free < n {
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= n;
    }

    fn release(&self, n: u32) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) += n;
        self.returned.notify_all();
    }
}

/// A connection after its handshake: a plain socket, or the two sides of a TLS session.
enum Transport {
    Plain(std::net::TcpStream),
    Tls(crate::tls::TlsReader, TlsWriter),
}

/// Where a connection's requests come from.
enum Source {
    Plain(std::net::TcpStream),
    Tls(crate::tls::TlsReader),
}

impl Source {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Source::Plain(s) => s.set_read_timeout(t),
            Source::Tls(s) => s.socket().set_read_timeout(t),
        }
    }
}

/// What a read that ran out of [`REQUEST_TIMEOUT`] says.
fn stalled(what: &str, e: std::io::Error) -> String {
    if matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        format!(
            "{what} did not arrive within {} s of the request's first byte",
            REQUEST_TIMEOUT.as_secs()
        )
    } else {
        format!("reading {what}: {e}")
    }
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Plain(s) => s.read(buf),
            Source::Tls(s) => s.read(buf),
        }
    }
}

/// Where a connection's replies go.
enum Sink {
    Plain(std::net::TcpStream),
    Tls(TlsWriter),
}

impl Sink {
    fn shutdown(&self) {
        match self {
            Sink::Plain(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Sink::Tls(s) => s.shutdown(),
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Plain(s) => s.write(buf),
            Sink::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Plain(s) => s.flush(),
            Sink::Tls(s) => s.flush(),
        }
    }
}

/// The sending side of a connection, shared by its thread and the I/O threads. Replies are
/// written in completion order; a failed send shuts the socket so the connection thread ends.
struct Replies {
    out: Mutex<BufWriter<Sink>>,
}

impl Replies {
    fn new(sink: Sink) -> Replies {
        Replies {
            out: Mutex::new(BufWriter::with_capacity(256 * 1024, sink)),
        }
    }

    /// Queue one reply; with `flush`, send everything queued now.
    fn send(&self, r: &Reply, flush: bool) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let res = out
            .write_all(&r.header)
            .and_then(|()| out.write_all(&r.payload))
            .and_then(|()| if flush { out.flush() } else { Ok(()) });
        if res.is_err() {
            out.get_ref().shutdown();
        }
    }

    fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if !out.buffer().is_empty() && out.flush().is_err() {
            out.get_ref().shutdown();
        }
    }
}

/// One engine's connection to one replica, served by a thread of its own.
///
/// The thread reads requests and runs the quick ones itself ([`ops::is_quick`]: writes into the
/// page cache, trims, small reads of cached data, PING and INFO). Requests that wait on the disk
/// (FLUSH, FUA writes, uncached reads, generation changes, allocation maps) and large transfers
/// go to the shared I/O pool, so a slow fsync never holds up the writes behind it. Replies to the quick requests are batched:
/// they are sent when no further request is already buffered.
struct Connection {
    replica: Arc<Replica>,
    session: Arc<Session>,
    pool: Arc<IoPool>,
    replies: Arc<Replies>,
    budget: Arc<Budget>,
}

impl Connection {
    fn serve(&self, stream: Source) -> Result<(), String> {
        let mut rd = std::io::BufReader::with_capacity(256 * 1024, stream);
        // JOIN_SESSION replaces it with a session shared with other connections.
        let mut session = self.session.clone();
        // The socket's read timeout is on (the rest of a request is being read).
        let mut timed = false;
        loop {
            if timed {
                rd.get_ref()
                    .set_timeout(None)
                    .map_err(|e| format!("clearing a read timeout: {e}"))?;
                timed = false;
            }
            let mut hb = [0u8; REQUEST_HEADER_BYTES];
            self.fill_or_flush(&rd, REQUEST_HEADER_BYTES);
            // The first byte may take as long as the engine likes; the rest of the request is
            // timed (a socket timeout, set only when a read would wait).
            loop {
                match rd.read(&mut hb[..1]) {
                    Ok(0) => return Ok(()),
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(format!("reading request: {e}")),
                }
            }
            if rd.buffer().len() < REQUEST_HEADER_BYTES - 1 {
                rd.get_ref()
                    .set_timeout(Some(REQUEST_TIMEOUT))
                    .map_err(|e| format!("setting a read timeout: {e}"))?;
                timed = true;
            }
            rd.read_exact(&mut hb[1..])
                .map_err(|e| stalled("a request header", e))?;
            let h = RequestHeader::decode(&hb).map_err(|e| format!("bad request: {e}"))?;
            match h.op {
                Op::ShareSession => {
                    let token = self.replica.share_session(&session);
                    let r = reply(h.id, Status::Ok, token.to_le_bytes().to_vec());
                    self.replies.send(&r, false);
                    continue;
                }
                Op::JoinSession if session.is_reader() => {
                    let r = reply(
                        h.id,
                        Status::Invalid,
                        b"a reader session cannot join another session".to_vec(),
                    );
                    self.replies.send(&r, false);
                    continue;
                }
                Op::JoinSession => {
                    let r = match self.replica.join_session(h.offset) {
                        Ok(shared) => {
                            session = shared;
                            reply(h.id, Status::Ok, Vec::new())
                        }
                        Err(e) => reply(h.id, e.status(), e.full_message().into_bytes()),
                    };
                    self.replies.send(&r, false);
                    continue;
                }
                _ => {}
            }
            let quick = ops::is_quick(h.op, h.flags, h.length);
            // Requests handed to the pool reserve their buffers before allocating them
            // (bounded memory per connection); a quick one holds only its own.
            let units = if quick { 0 } else { cost(&h) };
            self.budget.acquire(units);
            self.fill_or_flush(&rd, h.payload_len());
            if !timed && rd.buffer().len() < h.payload_len() {
                rd.get_ref()
                    .set_timeout(Some(REQUEST_TIMEOUT))
                    .map_err(|e| format!("setting a read timeout: {e}"))?;
                timed = true;
            }
            let payload = read_payload(&mut rd, h.payload_len())
                .map_err(|e| stalled("a request's payload", e))?;
            if h.op == Op::Read && h.length <= ops::QUICK_MAX_BYTES {
                // Data in the page cache is copied right here, without a hop to an I/O thread.
                let cached = match ops::read_cached(&self.replica, &session, h.offset, h.length) {
                    Ok(Some(buf)) => Some(reply(h.id, Status::Ok, buf)),
                    Ok(None) => None,
                    Err(e) => Some(reply(h.id, e.status(), e.full_message().into_bytes())),
                };
                if let Some(r) = cached {
                    self.replies.send(&r, false);
                    self.budget.release(units);
                    continue;
                }
            }
            if quick {
                let r = execute(&self.replica, &session, &h, payload);
                self.replies.send(&r, false);
                continue;
            }
            let (replica, session) = (self.replica.clone(), session.clone());
            let (replies, budget) = (self.replies.clone(), self.budget.clone());
            self.pool.submit(move || {
                let r = execute(&replica, &session, &h, payload);
                replies.send(&r, true);
                budget.release(units);
            });
        }
    }

    /// Before a read that would wait for the peer, send the replies queued so far: the peer
    /// may be waiting for them before it sends more.
    fn fill_or_flush(&self, rd: &std::io::BufReader<Source>, need: usize) {
        if rd.buffer().len() < need {
            self.replies.flush();
        }
    }
}

/// Read exactly `n` bytes into a fresh buffer, without zeroing it first (on a 1 MiB write that
/// costs as much as a checksum pass).
fn read_payload(rd: &mut impl Read, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    rd.by_ref().take(n as u64).read_to_end(&mut buf)?;
    if buf.len() != n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

/// Run one request against the replica (on an I/O thread) and encode its reply.
fn execute(replica: &Replica, session: &Session, h: &RequestHeader, payload: Vec<u8>) -> Reply {
    // A WRITE's transit checksum is checked inside the write, from the per-block checksums it
    // computes for the index anyway (one pass over the payload instead of two).
    let transit = (h.payload_len() > 0).then_some(h.payload_crc);
    match ops::execute(
        replica, session, h.op, h.flags, h.offset, h.length, &payload, transit,
    ) {
        Ok(payload) => reply(h.id, Status::Ok, payload),
        Err(e) => reply(h.id, e.status(), e.full_message().into_bytes()),
    }
}
