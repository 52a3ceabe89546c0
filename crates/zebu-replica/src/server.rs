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
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use zebu_proto::data::{
    self, Hello, Op, ReplyHeader, RequestHeader, Status, Welcome, WelcomeStatus, HELLO_FIXED_BYTES,
    PROTOCOL_VERSION, REQUEST_HEADER_BYTES,
};

use crate::io_pool::IoPool;
use crate::ops;
use crate::store::{Replica, Session};

/// Memory one connection may hold in request and reply buffers, in units of [`UNIT_BYTES`]
/// (64 MiB). Every request costs at least one unit, so this also bounds the requests in flight.
const BUDGET_UNITS: u32 = 1024;
const UNIT_BYTES: u32 = 64 * 1024;

/// Budget units a request holds while in flight: one, plus its data buffer.
fn cost(h: &RequestHeader) -> u32 {
    match h.op {
        Op::Read | Op::Write | Op::WilMark | Op::WilSettle | Op::WilRead | Op::WilRebuild => {
            1 + h.length / UNIT_BYTES
        }
        // An allocation map can be up to MAX_MAP_EXTENTS × 8 bytes (512 KiB).
        Op::Map => 8,
        _ => 1,
    }
}
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
type Hailed = (Arc<Replica>, watch::Receiver<bool>, u64);

/// Serves all replicas of one node.
pub struct ReplicaServer {
    /// Served replicas, each with a signal that closes its connections when it is removed.
    replicas: RwLock<HashMap<String, Served>>,
    secret: RwLock<Option<String>>,
    pool: Arc<IoPool>,
}

impl ReplicaServer {
    pub fn new(name: &str, io_threads: usize) -> Arc<ReplicaServer> {
        Arc::new(ReplicaServer {
            replicas: RwLock::new(HashMap::new()),
            secret: RwLock::new(None),
            pool: Arc::new(IoPool::new(name, io_threads)),
        })
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

    /// Stop serving a replica; its open connections are closed.
    pub fn remove(&self, name: &str) -> Option<Arc<Replica>> {
        let (replica, stop) = self
            .replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)?;
        let _ = stop.send(true);
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
                    let _ = stream.set_nodelay(true);
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.connection(stream).await {
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

    async fn handshake(&self, stream: &mut TcpStream) -> Result<Accepted, String> {
        let mut fixed = [0u8; HELLO_FIXED_BYTES];
        stream
            .read_exact(&mut fixed)
            .await
            .map_err(|e| format!("reading hello: {e}"))?;
        let rest = match Hello::rest_len(&fixed) {
            Ok(r) => r,
            Err(e) => {
                let msg = e.to_string();
                let _ = stream
                    .write_all(&Welcome::refused(WelcomeStatus::Malformed, msg.clone()).encode())
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
        // Both ends prove they know the cluster secret before the Hello asks anything.
        if let Err((status, msg)) = self.authenticate(stream, &bytes).await {
            tracing::warn!("refused data connection: {msg}");
            let _ = stream
                .write_all(&Welcome::refused(status, msg.clone()).encode())
                .await;
            return Err(msg);
        }
        let mut checked = self.check_hello(&bytes);
        if let Ok((replica, _, epoch)) = &checked {
            // The fence first: a durable metadata replace when the epoch is new.
            let (r, epoch) = (replica.clone(), *epoch);
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
            Ok((replica, stop, epoch)) => {
                // The session starts at the replica's generation, in the engine's epoch.
                let session = Session::new(&replica, epoch);
                let w = Welcome {
                    version: PROTOCOL_VERSION,
                    status: WelcomeStatus::Ok,
                    size_bytes: replica.size_bytes(),
                    block_size: replica.block_size(),
                    generation: session.generation(),
                    message: String::new(),
                };
                stream
                    .write_all(&w.encode())
                    .await
                    .map_err(|e| format!("writing welcome: {e}"))?;
                Ok((replica, stop, Arc::new(session)))
            }
            Err((status, msg)) => {
                tracing::warn!("refused data connection: {msg}");
                let _ = stream
                    .write_all(&Welcome::refused(status, msg.clone()).encode())
                    .await;
                Err(msg)
            }
        }
    }

    /// The challenge–response of `zebu_proto::auth`: a challenge proving this server knows the
    /// secret, then the engine's proof, checked.
    async fn authenticate(
        &self,
        stream: &mut TcpStream,
        hello_bytes: &[u8],
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
        let proof = server_proof(&secret, hello_bytes, &nonce);
        let challenge = Challenge { nonce, proof };
        stream
            .write_all(&challenge.encode())
            .await
            .map_err(|e| (WelcomeStatus::Malformed, format!("writing challenge: {e}")))?;
        let mut b = [0u8; PROOF_FRAME_BYTES];
        stream
            .read_exact(&mut b)
            .await
            .map_err(|e| (WelcomeStatus::Malformed, format!("reading proof: {e}")))?;
        let theirs = Proof::decode(&b).map_err(|e| (WelcomeStatus::Malformed, e.to_string()))?;
        let want = client_proof(&secret, hello_bytes, &nonce, &proof);
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
        Ok((replica, stop, hello.epoch))
    }

    async fn connection(self: Arc<Self>, mut stream: TcpStream) -> Result<(), String> {
        let (replica, mut stop, session) =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut stream))
                .await
                .map_err(|_| "handshake timed out".to_string())??;
        // From here on the connection has a thread of its own (see the module docs).
        let stream = stream
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
            .map_err(|e| format!("setting up the connection: {e}"))?;
        let closer = stream
            .try_clone()
            .map_err(|e| format!("setting up the connection: {e}"))?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let conn = Connection {
            replies: Arc::new(Replies::new(&stream)?),
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
                if let Err(e) = conn.serve(stream) {
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

/// The sending side of a connection, shared by its thread and the I/O threads. Replies are
/// written in completion order; a failed send shuts the socket so the connection thread ends.
struct Replies {
    out: Mutex<BufWriter<std::net::TcpStream>>,
}

impl Replies {
    fn new(stream: &std::net::TcpStream) -> Result<Replies, String> {
        let s = stream
            .try_clone()
            .map_err(|e| format!("setting up the connection: {e}"))?;
        Ok(Replies {
            out: Mutex::new(BufWriter::with_capacity(256 * 1024, s)),
        })
    }

    /// Queue one reply; with `flush`, send everything queued now.
    fn send(&self, r: &Reply, flush: bool) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let res = out
            .write_all(&r.header)
            .and_then(|()| out.write_all(&r.payload))
            .and_then(|()| if flush { out.flush() } else { Ok(()) });
        if res.is_err() {
            let _ = out.get_ref().shutdown(Shutdown::Both);
        }
    }

    fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if !out.buffer().is_empty() && out.flush().is_err() {
            let _ = out.get_ref().shutdown(Shutdown::Both);
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
    fn serve(&self, stream: std::net::TcpStream) -> Result<(), String> {
        let mut rd = std::io::BufReader::with_capacity(256 * 1024, stream);
        // JOIN_SESSION replaces it with a session shared with other connections.
        let mut session = self.session.clone();
        loop {
            let mut hb = [0u8; REQUEST_HEADER_BYTES];
            self.fill_or_flush(&rd, REQUEST_HEADER_BYTES);
            match rd.read_exact(&mut hb) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("reading request: {e}")),
            }
            let h = RequestHeader::decode(&hb).map_err(|e| format!("bad request: {e}"))?;
            match h.op {
                Op::ShareSession => {
                    let token = self.replica.share_session(&session);
                    let r = reply(h.id, Status::Ok, token.to_le_bytes().to_vec());
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
            let payload = read_payload(&mut rd, h.payload_len())
                .map_err(|e| format!("reading payload: {e}"))?;
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
    fn fill_or_flush(&self, rd: &std::io::BufReader<std::net::TcpStream>, need: usize) {
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
