//! Work the manager hands an agent at once, rather than at its next heartbeat: snapshot
//! operations, which a person (or CSI) waits for. The agent keeps one long poll open
//! (`POST /v1/agent/commands`), answered as soon as a command is queued for its node; it sends
//! each result to `POST /v1/agent/results`, and the REST request that queued the command
//! answers with it. Nothing here is durable: a command whose node does not answer in time fails
//! the request (the person may try again; every command is safe to repeat).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use zebu_api::{AgentCommand, CommandAction, CommandResult};

use crate::error::ApiError;

/// How long a REST request waits for the agent's answer (under the 10 s request deadline).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a poll with nothing to hand out stays open.
pub const POLL_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Commands {
    next: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    queues: HashMap<String, Vec<AgentCommand>>,
    wake: HashMap<String, Arc<Notify>>,
    waiting: HashMap<u64, (String, oneshot::Sender<CommandResult>)>,
}

impl Inner {
    fn wake(&mut self, node: &str) -> Arc<Notify> {
        self.wake.entry(node.to_owned()).or_default().clone()
    }
}

impl Commands {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand `action` to `node`'s agent and wait for its result.
    pub async fn run(
        &self,
        node: &str,
        volume: &str,
        replica: Option<String>,
        action: CommandAction,
    ) -> Result<CommandResult, ApiError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = self.lock();
            inner
                .queues
                .entry(node.to_owned())
                .or_default()
                .push(AgentCommand {
                    id,
                    volume: volume.to_owned(),
                    replica,
                    action,
                });
            inner.waiting.insert(id, (node.to_owned(), tx));
            inner.wake(node).notify_one();
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r),
            _ => {
                let mut inner = self.lock();
                inner.waiting.remove(&id);
                if let Some(q) = inner.queues.get_mut(node) {
                    q.retain(|c| c.id != id);
                }
                Err(ApiError::unavailable(format!(
                    "node {node} did not answer within {} s (is its agent running, and can it reach the manager?); it may or may not have done it: look with zebu snapshot list {volume}, and try again",
                    COMMAND_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// The commands queued for `node`, waiting up to [`POLL_WAIT`] for one.
    pub async fn poll(&self, node: &str) -> Vec<AgentCommand> {
        let wake = {
            let mut inner = self.lock();
            let q = inner.queues.remove(node).unwrap_or_default();
            if !q.is_empty() {
                return q;
            }
            inner.wake(node)
        };
        let _ = tokio::time::timeout(POLL_WAIT, wake.notified()).await;
        self.lock().queues.remove(node).unwrap_or_default()
    }

    /// An agent's result: to the request waiting for it (if it still waits).
    pub fn finish(&self, r: CommandResult) -> Result<(), ApiError> {
        let mut inner = self.lock();
        match inner.waiting.get(&r.id) {
            Some((node, _)) if *node != r.node => Err(ApiError::forbidden(format!(
                "command {} was given to node {node}, not {}",
                r.id, r.node
            ))),
            Some(_) => {
                let (_, tx) = inner.waiting.remove(&r.id).expect("checked");
                let _ = tx.send(r);
                Ok(())
            }
            // Late: its request gave up already.
            None => Ok(()),
        }
    }
}
