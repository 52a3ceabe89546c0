//! How an engine reaches one replica: over the data protocol (a replica on another node, or in
//! another process), or directly in its own process (the replica on the engine's own node,
//! served by the same agent). The direct path skips TCP, framing and checksumming in transit,
//! and runs the same operations (`zebu_replica::ops`): quick ones right on the caller's thread
//! when that thread serves a single client (an NBD connection's), the rest on the replica
//! server's I/O threads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use zebu_proto::data::{Op, WelcomeStatus};
use zebu_replica::{io_pool, ops, IoPool, Replica, ReplicaError, Session};

use crate::client::{Call, ClientError, ReplicaClient};

/// A replica in the engine's own process and the I/O threads to use for it.
#[derive(Clone)]
pub struct LocalReplica {
    replica: Arc<Replica>,
    pool: Arc<IoPool>,
}

/// An engine's open handle on an in-process replica: its own session, so fencing works the same
/// as over the network.
pub struct OpenLocal {
    local: LocalReplica,
    session: Arc<Session>,
}

impl std::fmt::Debug for LocalReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalReplica({})", self.replica.name())
    }
}

/// How long opening an in-process session may take (a remote handshake has the same bound on
/// the server).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl LocalReplica {
    /// `replica`, whose blocking I/O runs on `pool`.
    pub fn new(replica: Arc<Replica>, pool: Arc<IoPool>) -> LocalReplica {
        LocalReplica { replica, pool }
    }

    /// Open a new session (one per engine) of an engine of `epoch`: the replica records the
    /// epoch first, as a remote one does in its handshake, and refuses an older one.
    pub async fn open(&self, epoch: u64) -> Result<OpenLocal, ClientError> {
        let r = self.replica.clone();
        // As a remote handshake is bounded: the fence waits for operations in flight, and one
        // stuck on a dead disk must not hold the engine's start for ever.
        let admitted = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio::task::spawn_blocking(move || r.accept_epoch(epoch)),
        )
        .await
        .map_err(|_| {
            format!(
                "recording the engine's epoch took over {} s (a replica operation is stuck)",
                HANDSHAKE_TIMEOUT.as_secs()
            )
        })
        .and_then(|j| j.map_err(|e| format!("recording the engine's epoch failed: {e}")))
        .and_then(|r| r.map_err(|e| e.full_message()));
        if let Err(message) = admitted {
            let status = if self.replica.epoch() > epoch {
                WelcomeStatus::Fenced
            } else {
                WelcomeStatus::Unavailable
            };
            return Err(ClientError::Refused {
                replica: self.replica.name().to_owned(),
                status,
                message,
            });
        }
        Ok(OpenLocal {
            local: self.clone(),
            session: Arc::new(Session::new(&self.replica, epoch)),
        })
    }
}

impl OpenLocal {
    async fn call(&self, call: Call, timeout: Duration) -> Result<Bytes, ClientError> {
        let replica = &self.local.replica;
        let failed = |e: ReplicaError| call.failed(replica.name(), e.status(), e.full_message());
        if call.op == Op::Read && call.length <= ops::QUICK_MAX_BYTES {
            // Data in the page cache is copied right here, without a hop to an I/O thread.
            match ops::read_cached(replica, &self.session, call.offset, call.length) {
                Ok(Some(buf)) => return Ok(Bytes::from(buf)),
                Ok(None) => {}
                Err(e) => return Err(failed(e)),
            }
        }
        if io_pool::may_run_inline() && ops::is_quick(call.op, call.flags, call.length) {
            // This thread serves one client only (an NBD connection's): run it right here.
            return execute(replica, &self.session, &call)
                .map(Bytes::from)
                .map_err(failed);
        }
        // The job runs on an I/O thread: this thread sleeps without polling meanwhile.
        let _blind = crate::busy_poll::blind();
        let (tx, rx) = oneshot::channel();
        let (r, session, c) = (replica.clone(), self.session.clone(), call.clone());
        self.local.pool.submit(move || {
            let _ = tx.send(execute(&r, &session, &c));
        });
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(Bytes::from(v)),
            Ok(Ok(Err(e))) => Err(failed(e)),
            Ok(Err(_)) => Err(ClientError::Disconnected {
                replica: replica.name().to_owned(),
                reason: "the I/O thread went away".into(),
            }),
            Err(_) => Err(ClientError::Timeout {
                replica: replica.name().to_owned(),
                op: call.op,
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }
}

/// Run `call` against an in-process replica (blocking).
fn execute(replica: &Replica, session: &Session, call: &Call) -> Result<Vec<u8>, ReplicaError> {
    let payload = call.payload.as_deref().unwrap_or(&[]);
    ops::execute(
        replica,
        session,
        call.op,
        call.flags,
        call.offset,
        call.length,
        payload,
        None,
    )
}

/// The engine's handle on one replica.
pub enum Backend {
    Remote(ReplicaClient),
    Local(OpenLocal),
}

/// What the engine learns about a replica when it opens it.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub size_bytes: u64,
    pub block_size: u32,
    pub generation: u64,
}

impl Backend {
    pub fn opened(&self) -> Opened {
        match self {
            Backend::Remote(c) => {
                let w = c.welcome();
                Opened {
                    size_bytes: w.size_bytes,
                    block_size: w.block_size,
                    generation: w.generation,
                }
            }
            Backend::Local(l) => Opened {
                size_bytes: l.local.replica.size_bytes(),
                block_size: l.local.replica.block_size(),
                generation: l.session.generation(),
            },
        }
    }

    pub async fn call(&self, call: Call, timeout: Duration) -> Result<Bytes, ClientError> {
        match self {
            Backend::Remote(c) => c.call(call, timeout).await,
            Backend::Local(l) => l.call(call, timeout).await,
        }
    }
}
