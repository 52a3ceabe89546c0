//! Online expansion (`docs/snapshots.md`, "Online expansion"): the engine grows every member in
//! sync, then itself.
//!
//! * A request checks its range against the engine's size, which is raised only once every
//!   member that stays in the set has grown: no request reaches a member past its end.
//! * A member that fails to grow leaves the set, as for a failed write (it may have grown or
//!   not; a later rebuild grows it first). A refusal by every member (a smaller size, an
//!   unaligned one) changes nothing.
//! * Not while a rebuild runs (busy): its target was sized when it began. The caller tries
//!   again (the agent does at every assignment while the manager's size is larger).
//! * An NBD connection opened afterwards sees the new size; one open already keeps the size it
//!   negotiated (NBD has no way to tell a client that the size changed).

use std::sync::atomic::Ordering;

use futures::future::join_all;
use zebu_proto::data::Op;

use super::snapshots::outcome;
use super::{flush_timeout, Engine, EngineError, SnapshotRefusal};
use crate::client::Call;

impl Engine {
    /// Grow the volume to `size_bytes` (see the module docs). The same size again succeeds
    /// and changes nothing.
    pub async fn resize(&self, size_bytes: u64) -> Result<(), EngineError> {
        let now = self.size_bytes();
        if size_bytes == now {
            return Ok(());
        }
        let refuse = |kind, message: String| EngineError::Snapshot {
            volume: self.volume.clone(),
            kind,
            message,
        };
        if size_bytes < now {
            return Err(refuse(
                SnapshotRefusal::Failed,
                format!("it has {now} bytes and a volume never shrinks (asked for {size_bytes})"),
            ));
        }
        if !size_bytes.is_multiple_of(self.block_size) {
            return Err(refuse(
                SnapshotRefusal::Failed,
                format!(
                    "size {size_bytes} is not a multiple of the block size {}",
                    self.block_size
                ),
            ));
        }
        let _in = self.enter().await?;
        let membership = self.membership.lock().await;
        self.refuse_while_rebuilding("grow the volume")?;
        if let Some(name) = self.rebuilding_now() {
            return Err(refuse(
                SnapshotRefusal::Busy,
                format!("a rebuild of replica {name} is starting; grow the volume once it is done"),
            ));
        }
        let set = self.in_sync();
        if set.is_empty() {
            return Err(self.no_replicas());
        }
        let call = Call::new(Op::Resize, size_bytes, 0);
        let timeout = flush_timeout(self.io_timeout);
        let results = join_all(set.iter().map(|m| m.client().call(call.clone(), timeout))).await;
        let (took, failed, refusal) = outcome(&set, &results, |e| {
            format!("growing it to {size_bytes} bytes failed: {e}")
        });
        if let Some(message) = refusal.filter(|_| failed.is_empty()) {
            return Err(refuse(SnapshotRefusal::Failed, message));
        }
        if took == 0 {
            let detail: Vec<String> = failed.iter().map(|(_, why)| why.clone()).collect();
            return Err(refuse(SnapshotRefusal::Failed, detail.join("; ")));
        }
        // The size is raised once every member left in the set has grown: one that failed
        // leaves it first, so no request for the new range ever reaches it.
        let membership = if failed.is_empty() {
            membership
        } else {
            drop(membership);
            for (m, why) in &failed {
                tracing::warn!(volume = %self.volume, replica = %m.name, "{why}: it leaves the set");
            }
            self.retire(&failed).await;
            let membership = self.membership.lock().await;
            // A rebuild that began meanwhile sized its target at the old size; one that joined
            // and finished meanwhile is in the set now, at the old size.
            self.refuse_while_rebuilding("grow the volume")?;
            let grown: Vec<usize> = set
                .iter()
                .filter(|m| !failed.iter().any(|(f, _)| f.index == m.index))
                .map(|m| m.index)
                .collect();
            if let Some(m) = self.in_sync().iter().find(|m| !grown.contains(&m.index)) {
                return Err(refuse(
                    SnapshotRefusal::Busy,
                    format!(
                        "replica {} joined the set while the others grew; grow the volume again",
                        m.name
                    ),
                ));
            }
            if let Some(name) = self.rebuilding_now() {
                return Err(refuse(
                    SnapshotRefusal::Busy,
                    format!(
                        "a rebuild of replica {name} is starting; grow the volume once it is done"
                    ),
                ));
            }
            membership
        };
        self.size_bytes.store(size_bytes, Ordering::Release);
        drop(membership);
        tracing::info!(volume = %self.volume, members = took, "grown from {now} to {size_bytes} bytes");
        Ok(())
    }
}
