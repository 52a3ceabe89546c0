//! Data-protocol client: one TCP connection from an engine to one replica, pipelined.
//!
//! Callers get a future per request; a writer task sends frames in submission order (batching
//! them into few syscalls) and a reader task matches replies to requests by id. When the
//! connection breaks, every request in flight fails at once with `Disconnected`, and so does
//! every later one: a client is never reconnected (a replica that went away must be rebuilt).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zebu_proto::data::{
    self, Hello, Op, ReplyHeader, RequestHeader, Status, Welcome, WelcomeStatus, PROTOCOL_VERSION,
    REPLY_HEADER_BYTES, WELCOME_FIXED_BYTES,
};

#[derive(Debug, Error, Clone)]
pub enum ClientError {
    #[error("cannot connect to replica {replica} at {address}: {reason}")]
    Connect {
        replica: String,
        address: String,
        reason: String,
    },
    #[error("replica {replica} refused the handshake ({status:?}): {message}")]
    Refused {
        replica: String,
        status: WelcomeStatus,
        message: String,
    },
    #[error("connection to replica {replica} is closed: {reason}")]
    Disconnected { replica: String, reason: String },
    #[error("replica {replica} did not answer {op:?} within {timeout_ms} ms")]
    Timeout {
        replica: String,
        op: Op,
        timeout_ms: u64,
    },
    #[error("replica {replica} answered {op:?} with {status:?}: {message}")]
    Failed {
        replica: String,
        op: Op,
        status: Status,
        message: String,
    },
}

impl ClientError {
    /// True when the replica itself reported that the request was invalid (a caller bug or bad
    /// input), as opposed to the replica or its connection failing.
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            ClientError::Failed {
                status: Status::Invalid,
                ..
            }
        )
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, ClientError>>>>>;

struct Frame {
    header: [u8; data::REQUEST_HEADER_BYTES],
    payload: Option<Bytes>,
}

/// Frames queued for the writer, at most (bounds memory when a replica is slow).
const SEND_QUEUE: usize = 512;

pub struct ReplicaClient {
    replica: String,
    address: String,
    welcome: Welcome,
    tx: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    close_reason: Arc<Mutex<String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn fail_all(
    pending: &Pending,
    closed: &AtomicBool,
    reason_slot: &Mutex<String>,
    replica: &str,
    reason: String,
) {
    {
        let mut r = reason_slot.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_empty() {
            *r = reason.clone();
        }
    }
    closed.store(true, Ordering::Release);
    let drained: Vec<_> = pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    for (_, tx) in drained {
        let _ = tx.send(Err(ClientError::Disconnected {
            replica: replica.to_owned(),
            reason: reason.clone(),
        }));
    }
}

impl ReplicaClient {
    /// Connect and handshake. `generation` is what the engine expects; the replica's own is in
    /// [`ReplicaClient::welcome`].
    pub async fn connect(
        address: &str,
        volume: &str,
        replica: &str,
        generation: u64,
        secret: &str,
        timeout: Duration,
    ) -> Result<ReplicaClient, ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            replica: replica.to_owned(),
            address: address.to_owned(),
            reason,
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            volume: volume.to_owned(),
            replica: replica.to_owned(),
            generation,
            secret: secret.to_owned(),
        };
        let fut = async {
            let mut s = TcpStream::connect(address)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            s.set_nodelay(true)
                .map_err(|e| connect_err(e.to_string()))?;
            s.write_all(&hello.encode())
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let mut fixed = [0u8; WELCOME_FIXED_BYTES];
            s.read_exact(&mut fixed)
                .await
                .map_err(|e| connect_err(format!("reading welcome: {e}")))?;
            let rest = Welcome::rest_len(&fixed).map_err(|e| connect_err(e.to_string()))?;
            let mut bytes = fixed.to_vec();
            bytes.resize(WELCOME_FIXED_BYTES + rest, 0);
            s.read_exact(&mut bytes[WELCOME_FIXED_BYTES..])
                .await
                .map_err(|e| connect_err(format!("reading welcome: {e}")))?;
            let w = Welcome::decode(&bytes).map_err(|e| connect_err(e.to_string()))?;
            Ok::<_, ClientError>((s, w))
        };
        let (stream, welcome) = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| connect_err(format!("no answer within {} ms", timeout.as_millis())))??;
        if welcome.status != WelcomeStatus::Ok {
            return Err(ClientError::Refused {
                replica: replica.to_owned(),
                status: welcome.status,
                message: welcome.message,
            });
        }
        Ok(Self::start(stream, replica, address, welcome))
    }

    fn start(stream: TcpStream, replica: &str, address: &str, welcome: Welcome) -> ReplicaClient {
        let (rd, wr) = stream.into_split();
        // Buffered: one recv usually brings many replies (header and payload together).
        let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
        let (tx, mut rx) = mpsc::channel::<Frame>(SEND_QUEUE);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let close_reason = Arc::new(Mutex::new(String::new()));

        let writer = {
            let (pending, closed, reason, name) = (
                pending.clone(),
                closed.clone(),
                close_reason.clone(),
                replica.to_owned(),
            );
            tokio::spawn(async move {
                let mut w = BufWriter::with_capacity(256 * 1024, wr);
                let res: std::io::Result<()> = async {
                    while let Some(f) = rx.recv().await {
                        let mut next = Some(f);
                        while let Some(f) = next {
                            w.write_all(&f.header).await?;
                            if let Some(p) = &f.payload {
                                w.write_all(p).await?;
                            }
                            next = rx.try_recv().ok();
                        }
                        w.flush().await?;
                    }
                    w.shutdown().await
                }
                .await;
                let why = match res {
                    Ok(()) => "closed by the engine".to_string(),
                    Err(e) => format!("send failed: {e}"),
                };
                fail_all(&pending, &closed, &reason, &name, why);
            })
        };
        let reader = {
            let (pending, closed, reason, name) = (
                pending.clone(),
                closed.clone(),
                close_reason.clone(),
                replica.to_owned(),
            );
            tokio::spawn(async move {
                let why: String = async {
                    loop {
                        let mut hb = [0u8; REPLY_HEADER_BYTES];
                        if let Err(e) = rd.read_exact(&mut hb).await {
                            return format!("receive failed: {e}");
                        }
                        let h = match ReplyHeader::decode(&hb) {
                            Ok(h) => h,
                            Err(e) => return format!("bad reply: {e}"),
                        };
                        let mut payload = vec![0u8; h.length as usize];
                        if let Err(e) = rd.read_exact(&mut payload).await {
                            return format!("receive failed: {e}");
                        }
                        if !payload.is_empty() && crc32c::crc32c(&payload) != h.payload_crc {
                            return "reply payload failed its checksum in transit".to_string();
                        }
                        let waiter = pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&h.id);
                        let Some(waiter) = waiter else {
                            continue; // The request timed out and was abandoned.
                        };
                        let status = Status::from_u32(h.status);
                        let result = if status == Status::Ok {
                            Ok(Bytes::from(payload))
                        } else {
                            Err((status, String::from_utf8_lossy(&payload).into_owned()))
                        };
                        let _ =
                            waiter.send(result.map_err(|(status, message)| ClientError::Failed {
                                replica: name.clone(),
                                op: Op::Ping, // replaced by the caller, which knows the op
                                status,
                                message,
                            }));
                    }
                }
                .await;
                fail_all(&pending, &closed, &reason, &name, why);
            })
        };
        ReplicaClient {
            replica: replica.to_owned(),
            address: address.to_owned(),
            welcome,
            tx,
            pending,
            next_id: AtomicU64::new(1),
            closed,
            close_reason,
            tasks: vec![writer, reader],
        }
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }
    pub fn replica(&self) -> &str {
        &self.replica
    }
    pub fn address(&self) -> &str {
        &self.address
    }
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn disconnected(&self) -> ClientError {
        ClientError::Disconnected {
            replica: self.replica.clone(),
            reason: self
                .close_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Send one request and wait for its reply payload.
    pub async fn call(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        if self.is_closed() {
            return Err(self.disconnected());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let payload_crc = payload.as_ref().map(|p| crc32c::crc32c(p)).unwrap_or(0);
        let header = RequestHeader {
            op,
            flags,
            id,
            offset,
            length,
            payload_crc,
        }
        .encode();
        let (otx, orx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, otx);
        // Checked again under the map: a connection that died between the two checks has
        // already drained the map, and this request would wait forever.
        if self.is_closed() {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(self.disconnected());
        }
        let result = tokio::time::timeout(timeout, async {
            self.tx
                .send(Frame { header, payload })
                .await
                .map_err(|_| self.disconnected())?;
            orx.await.map_err(|_| self.disconnected())?
        })
        .await;
        match result {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(ClientError::Failed {
                replica,
                status,
                message,
                ..
            })) => Err(ClientError::Failed {
                replica,
                op,
                status,
                message,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(ClientError::Timeout {
                    replica: self.replica.clone(),
                    op,
                    timeout_ms: timeout.as_millis() as u64,
                })
            }
        }
    }
}
