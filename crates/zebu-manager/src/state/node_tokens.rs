//! One token per node (`docs/hardening.md`, 2): the shared agent token (`agent.token`) only
//! registers a node; the manager then gives the node a token of its own, in the answer to its
//! heartbeat, and from the first request made with it the node's records are bound to it: the
//! shared token can no longer speak for that node, and a node token speaks for its node only.
//!
//! The manager keeps only the token's SHA-256, in the node's record. A token handed out is
//! pending until it is used: an answer lost on the way (or an agent that stopped before it
//! wrote `DATA_DIR/node.token`) costs nothing, as the next heartbeat with the shared token gets
//! a new one. `zebu node delete NAME` forgets the binding with the node.

use sha2::{Digest, Sha256};
use zebu_store::MetaStoreExt;

use super::{store_err, State, NODES};
use crate::error::ApiError;

/// Who sent an agent's request, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Speaker {
    /// The admin token: may speak for any node.
    Admin,
    /// The shared agent token: registers nodes that have no token of their own yet.
    Join,
    /// A node's own token.
    Node(String),
}

pub(crate) fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl State {
    /// The node whose own token this is.
    pub fn node_for_token(&self, token: &str) -> Option<String> {
        let d = digest(token);
        self.nodes
            .values()
            .find(|n| n.token_sha256.as_deref() == Some(d.as_str()))
            .map(|n| n.name.clone())
    }

    /// May `by` speak for `node`? A node token used for the first time binds its node (durably).
    pub(super) fn admit(&mut self, node: &str, by: &Speaker) -> Result<(), ApiError> {
        match by {
            Speaker::Admin => Ok(()),
            Speaker::Node(own) if own != node => Err(ApiError::forbidden(format!(
                "this is node {own}'s token: it cannot speak for node {node}"
            ))),
            Speaker::Node(_) => {
                let Some(rec) = self.nodes.get(node).filter(|r| !r.token_confirmed) else {
                    return Ok(());
                };
                let mut rec = rec.clone();
                rec.token_confirmed = true;
                self.store.put(NODES, node, &rec).map_err(store_err)?;
                tracing::info!(node = %node, "node uses its own token from now on; the shared agent token no longer speaks for it");
                self.nodes.insert(node.to_owned(), rec);
                Ok(())
            }
            Speaker::Join => match self.nodes.get(node) {
                Some(r) if r.token_confirmed => Err(ApiError::forbidden(format!(
                    "node {node} has a token of its own (DATA_DIR/node.token on that node, given when it joined): the shared agent token only registers nodes that have none. If that node's data directory was lost, remove the node first (zebu node delete {node}) and start it again"
                ))),
                _ => Ok(()),
            },
        }
    }

    /// A new token for `node`, pending until it is used (see the module docs), when the shared
    /// token registers it; its SHA-256 goes into the record the heartbeat stores.
    pub(super) fn mint(&self, node: &str, by: &Speaker) -> Option<(String, String)> {
        if *by != Speaker::Join || self.nodes.get(node).is_some_and(|r| r.token_confirmed) {
            return None;
        }
        let t = new_token();
        let d = digest(&t);
        Some((t, d))
    }
}
