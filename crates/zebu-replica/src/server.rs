//! The replica data server: speaks the data protocol (`zebu_proto::data`) to engines.
//!
//! One TCP listener per node serves every replica on it; the handshake names the replica. Each
//! connection has a reader (decodes requests, checks payload checksums, hands the I/O to the
//! [`IoPool`]) and a writer task (batches replies into few `write` calls). Requests run
//! concurrently and replies go out in completion order; a per-connection semaphore bounds the
//! requests in flight. Ordering between overlapping writes is the engine's job: it never has two
//! overlapping writes in flight.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use zebu_proto::data::{
    self, Hello, Op, ReplyHeader, RequestHeader, Status, Welcome, WelcomeStatus, HELLO_FIXED_BYTES,
    PROTOCOL_VERSION, REQUEST_HEADER_BYTES,
};

use crate::io_pool::IoPool;
use crate::store::{Replica, Session};

/// Memory one connection may hold in request and reply buffers, in units of [`UNIT_BYTES`]
/// (64 MiB). Every request costs at least one unit, so this also bounds the requests in flight.
const BUDGET_UNITS: u32 = 1024;
const UNIT_BYTES: u32 = 64 * 1024;

/// Budget units a request holds while in flight: one, plus its data buffer.
fn cost(h: &RequestHeader) -> u32 {
    match h.op {
        Op::Read | Op::Write => 1 + h.length / UNIT_BYTES,
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
        let checked = self.check_hello(&bytes);
        match checked {
            Ok((replica, stop)) => {
                // The session starts at the generation the engine is told about.
                let session = Session::new(&replica);
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

    fn check_hello(
        &self,
        bytes: &[u8],
    ) -> Result<(Arc<Replica>, watch::Receiver<bool>), (WelcomeStatus, String)> {
        let hello = Hello::decode(bytes).map_err(|e| (WelcomeStatus::Malformed, e.to_string()))?;
        if hello.version != PROTOCOL_VERSION {
            return Err((
                WelcomeStatus::BadVersion,
                format!("protocol version {} is not supported; this replica server speaks {PROTOCOL_VERSION}", hello.version),
            ));
        }
        let secret = self
            .secret
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let ok = match &secret {
            Some(s) => constant_time_eq(s.as_bytes(), hello.secret.as_bytes()),
            None => false,
        };
        if !ok {
            return Err((
                WelcomeStatus::AuthFailed,
                "cluster secret does not match".into(),
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
        Ok((replica, stop))
    }

    async fn connection(self: Arc<Self>, mut stream: TcpStream) -> Result<(), String> {
        let (replica, mut stop, session) =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut stream))
                .await
                .map_err(|_| "handshake timed out".to_string())??;
        let (rd, wr) = stream.into_split();
        // Buffered: one recv usually brings many requests (header and payload together).
        let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
        // Room for a reply of every request the budget lets in, so an I/O thread's
        // `blocking_send` never waits on a slow peer (the I/O threads serve every replica).
        let (tx, mut rx) = mpsc::channel::<Reply>(BUDGET_UNITS as usize);
        let writer = tokio::spawn(async move {
            let mut w = BufWriter::with_capacity(256 * 1024, wr);
            while let Some(r) = rx.recv().await {
                let mut next = Some(r);
                while let Some(r) = next {
                    w.write_all(&r.header).await?;
                    w.write_all(&r.payload).await?;
                    next = rx.try_recv().ok();
                }
                w.flush().await?;
            }
            w.shutdown().await
        });
        let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
        let result = async {
            loop {
                let mut hb = [0u8; REQUEST_HEADER_BYTES];
                let read = tokio::select! {
                    r = rd.read_exact(&mut hb) => r,
                    _ = stop.wait_for(|s| *s) => return Err(format!("replica {} is no longer served here", replica.name())),
                };
                match read {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(format!("reading request: {e}")),
                }
                let h = RequestHeader::decode(&hb).map_err(|e| format!("bad request: {e}"))?;
                // Reserve the buffers before allocating them (bounded memory per connection).
                let permit = budget.clone().acquire_many_owned(cost(&h)).await.expect("semaphore is never closed");
                let mut payload = vec![0u8; h.payload_len()];
                rd.read_exact(&mut payload).await.map_err(|e| format!("reading payload: {e}"))?;
                if h.op == Op::Write && crc32c::crc32c(&payload) != h.payload_crc {
                    let msg = format!("replica {}: write payload at offset {} failed its checksum in transit", replica.name(), h.offset);
                    let _ = tx.send(reply(h.id, Status::PayloadChecksum, msg.into_bytes())).await;
                    continue;
                }
                if h.op == Op::Read {
                    // Data in the page cache is copied right here, without a hop to an I/O thread.
                    let done = match crate::ops::read_cached(&replica, &session, h.offset, h.length) {
                        Ok(Some(buf)) => Some(reply(h.id, Status::Ok, buf)),
                        Ok(None) => None,
                        Err(e) => Some(reply(h.id, e.status(), e.full_message().into_bytes())),
                    };
                    if let Some(r) = done {
                        let _ = tx.send(r).await;
                        drop(permit);
                        continue;
                    }
                }
                let tx = tx.clone();
                let replica = replica.clone();
                let session = session.clone();
                self.pool.submit(move || {
                    let r = execute(&replica, &session, &h, payload);
                    let _ = tx.blocking_send(r);
                    drop(permit);
                });
            }
        }
        .await;
        drop(tx);
        let _ = writer.await;
        result
    }
}

/// Run one request against the replica (on an I/O thread) and encode its reply.
fn execute(replica: &Replica, session: &Session, h: &RequestHeader, payload: Vec<u8>) -> Reply {
    match crate::ops::execute(
        replica, session, h.op, h.flags, h.offset, h.length, &payload,
    ) {
        Ok(payload) => reply(h.id, Status::Ok, payload),
        Err(e) => reply(h.id, e.status(), e.full_message().into_bytes()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
