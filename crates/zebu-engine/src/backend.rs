//! How an engine reaches one replica: over the data protocol (a replica on another node, or in
//! another process), or directly in its own process (the replica on the engine's own node,
//! served by the same agent). The direct path skips TCP, framing and checksumming in transit,
//! and runs the same operations (`zebu_replica::ops`) on the replica server's I/O threads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use zebu_proto::data::Op;
use zebu_replica::{IoPool, Replica};

use crate::client::{ClientError, ReplicaClient};

/// A replica in the engine's own process.
#[derive(Clone)]
pub struct LocalReplica {
    pub replica: Arc<Replica>,
    pub pool: Arc<IoPool>,
}

impl std::fmt::Debug for LocalReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalReplica({})", self.replica.name())
    }
}

impl LocalReplica {
    async fn call(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        let name = || self.replica.name().to_owned();
        if op == Op::Read {
            // Data in the page cache is copied right here, without a hop to an I/O thread.
            let mut buf = vec![0u8; length as usize];
            match self.replica.read_cached(offset, &mut buf) {
                Ok(true) => return Ok(Bytes::from(buf)),
                Ok(false) => {}
                Err(e) => {
                    return Err(ClientError::Failed {
                        replica: name(),
                        op,
                        status: e.status(),
                        message: e.full_message(),
                    })
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let replica = self.replica.clone();
        self.pool.submit(move || {
            let p = payload.as_deref().unwrap_or(&[]);
            let _ = tx.send(zebu_replica::ops::execute(
                &replica, op, flags, offset, length, p,
            ));
        });
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(Bytes::from(v)),
            Ok(Ok(Err(e))) => Err(ClientError::Failed {
                replica: name(),
                op,
                status: e.status(),
                message: e.full_message(),
            }),
            Ok(Err(_)) => Err(ClientError::Disconnected {
                replica: name(),
                reason: "the I/O thread went away".into(),
            }),
            Err(_) => Err(ClientError::Timeout {
                replica: name(),
                op,
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }
}

/// The engine's handle on one replica.
pub enum Backend {
    Remote(ReplicaClient),
    Local(LocalReplica),
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
                size_bytes: l.replica.size_bytes(),
                block_size: l.replica.block_size(),
                generation: l.replica.generation(),
            },
        }
    }

    pub async fn call(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        match self {
            Backend::Remote(c) => c.call(op, flags, offset, length, payload, timeout).await,
            Backend::Local(l) => l.call(op, flags, offset, length, payload, timeout).await,
        }
    }
}
