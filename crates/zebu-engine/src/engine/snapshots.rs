//! Snapshots across the members (`docs/snapshots.md`, "Across the replicas").
//!
//! * A snapshot drains the engine: no request runs while every member in sync freezes its head,
//!   so all of them freeze it at the same point of the write stream (crash-consistent), and I/O
//!   waits only for that switch. A member that fails it leaves the set, as for a failed write;
//!   one that answers that it has the name already while others took it left the set too (its
//!   snapshot holds other data).
//! * Deletion records the snapshot removed on every member in sync; each merges it on its own.
//! * At start, a snapshot the manager does not record (one a crash cut short before it was
//!   acknowledged) is deleted on the members that hold it; its data stays in the head's path,
//!   so no block changes. Without records (no manager), nothing is deleted.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::future::join_all;
use zebu_proto::data::Op;
use zebu_proto::snapshot::{LayersReply, SnapshotRequest, LAYER_HEAD, LAYER_REMOVED};

use super::{flush_timeout, Engine, EngineError, Member, Mode, SnapshotRefusal};
use crate::client::{Call, ClientError};

pub(super) fn named_call(op: Op, payload: Vec<u8>) -> Call {
    let mut c = Call::new(op, 0, payload.len() as u32);
    c.payload = Some(payload.into());
    c.with_payload_crc()
}

/// The names of the live (not removed) snapshots in a LAYERS reply.
pub fn live_snapshots(reply: &LayersReply) -> BTreeSet<String> {
    live_keys(reply).into_values().collect()
}

/// The label holding a snapshot's unique id (the manager's `zebu.io/uid`).
pub const UID_LABEL: &str = "zebu.io/uid";

/// A snapshot's key: its name, and `#uid` when it has one (two snapshots of one name taken at
/// different times have different keys).
pub(super) fn key_of(l: &zebu_proto::snapshot::LayerRecord) -> String {
    match l.labels.iter().find(|(k, _)| k == UID_LABEL) {
        Some((_, uid)) if !uid.is_empty() => format!("{}#{uid}", l.name),
        _ => l.name.clone(),
    }
}

/// The live snapshots of a LAYERS reply by key → name.
fn live_keys(reply: &LayersReply) -> std::collections::BTreeMap<String, String> {
    reply
        .layers
        .iter()
        .filter(|l| l.flags & (LAYER_HEAD | LAYER_REMOVED) == 0)
        .map(|l| (key_of(l), l.name.clone()))
        .collect()
}

/// Members that failed a request, each with why.
pub(super) type Failed = Vec<(Arc<Member>, String)>;

/// What the members of `set` answered to one call sent to each: how many took it, those that
/// failed it (with `why`), and the refusal they gave when none took it (an invalid request:
/// nothing changed anywhere, nobody leaves the set for it).
pub(super) fn outcome<T>(
    set: &[Arc<Member>],
    results: &[Result<T, ClientError>],
    why: impl Fn(&ClientError) -> String,
) -> (usize, Failed, Option<String>) {
    let took = results.iter().filter(|r| r.is_ok()).count();
    let mut failed = Vec::new();
    let mut refusal = None;
    for (m, r) in set.iter().zip(results) {
        match r {
            Ok(_) => {}
            Err(e) if e.is_invalid_request() && took == 0 => {
                refusal.get_or_insert_with(|| message_of(e));
            }
            Err(e) => failed.push((m.clone(), why(e))),
        }
    }
    (took, failed, refusal)
}

pub(super) fn message_of(e: &ClientError) -> String {
    match e {
        ClientError::Failed { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

impl Engine {
    fn refused(&self, kind: SnapshotRefusal, message: String) -> EngineError {
        EngineError::Snapshot {
            volume: self.volume.clone(),
            kind,
            message,
        }
    }

    /// Take snapshot `req.name` on every member in sync, with I/O paused only for the switch.
    pub async fn snapshot(&self, req: &SnapshotRequest) -> Result<(), EngineError> {
        // Refused before any I/O waits for it (and again below, under the lock).
        self.refuse_while_rebuilding("take the snapshot")?;
        // Most of the head's unsynced writes are made durable first, while I/O goes on: the
        // sync each member does inside the pause then has little left to write. (A flush that
        // fails retires a member, as a client's would; the snapshot then goes on without it.)
        if let Err(e) = self.flush().await {
            tracing::warn!(volume = %self.volume, snapshot = %req.name, "the flush before a snapshot failed: {e}");
        }
        let asked = std::time::Instant::now();
        let _all = self.inflight.write().await;
        let paused = std::time::Instant::now();
        if let Some(reason) = self.closed_reason() {
            return Err(EngineError::Closed {
                volume: self.volume.clone(),
                reason,
            });
        }
        // Held across the switch: no member joins (a rebuild target) or leaves meanwhile.
        let membership = self.membership.lock().await;
        self.refuse_while_rebuilding("take the snapshot")?;
        let set = self.in_sync();
        if set.is_empty() {
            return Err(self.no_replicas());
        }
        let call = named_call(Op::Snapshot, req.encode());
        let timeout = flush_timeout(self.io_timeout);
        let results = join_all(set.iter().map(|m| m.client().call(call.clone(), timeout))).await;
        drop(membership);
        let (took, failed, refusal) = outcome(&set, &results, |e| {
            format!("snapshot {} failed on it: {e}", req.name)
        });
        if let Some(message) = refusal.filter(|_| failed.is_empty()) {
            let kind = if message.contains("already has a snapshot") {
                SnapshotRefusal::Exists
            } else {
                SnapshotRefusal::Failed
            };
            return Err(self.refused(kind, message));
        }
        if took == 0 {
            let detail: Vec<String> = failed.iter().map(|(_, why)| why.clone()).collect();
            return Err(self.refused(SnapshotRefusal::Failed, detail.join("; ")));
        }
        if !failed.is_empty() {
            for (m, why) in &failed {
                tracing::warn!(volume = %self.volume, replica = %m.name, "{why}: it leaves the set");
            }
            self.retire(&failed).await;
        }
        tracing::info!(volume = %self.volume, snapshot = %req.name, members = took, drain_us = (paused - asked).as_micros() as u64, switch_us = paused.elapsed().as_micros() as u64, "snapshot taken");
        Ok(())
    }

    /// Busy while a rebuild runs (a member is WO, or a target's snapshots are being copied).
    pub(super) fn refuse_while_rebuilding(&self, what: &str) -> Result<(), EngineError> {
        if let Some(why) = self.fill_busy() {
            return Err(self.refused(
                SnapshotRefusal::Busy,
                format!("{why}; {what} once the copy is done"),
            ));
        }
        if let Some(m) = self.all().iter().find(|m| m.mode() == Mode::Wo) {
            return Err(self.refused(
                SnapshotRefusal::Busy,
                format!(
                    "replica {} is being rebuilt; {what} once the rebuild is done",
                    m.name
                ),
            ));
        }
        if let Some(why) = self.tree_copy_running() {
            return Err(self.refused(
                SnapshotRefusal::Busy,
                format!("{why}; {what} once the rebuild is done"),
            ));
        }
        Ok(())
    }

    /// Delete snapshot `name` on every member in sync (each merges it in the background).
    pub async fn remove_snapshot(&self, name: &str) -> Result<(), EngineError> {
        let _in = self.enter().await?;
        // Held across the sends: a rebuild copying the snapshots, and a member joining, see
        // the tree either before or after the deletion, never during it.
        let membership = self.membership.lock().await;
        // A rebuild copies the snapshots, then the head over the last of them: none goes
        // meanwhile.
        self.refuse_while_rebuilding("delete the snapshot")?;
        let set = self.in_sync();
        if set.is_empty() {
            return Err(self.no_replicas());
        }
        let call = named_call(Op::SnapshotRemove, name.as_bytes().to_vec());
        let results = join_all(
            set.iter()
                .map(|m| m.client().call(call.clone(), self.io_timeout)),
        )
        .await;
        drop(membership);
        let mut missing = 0;
        let mut failed = Vec::new();
        for (m, r) in set.iter().zip(&results) {
            match r {
                Ok(_) => {}
                // Not there: deleted already on that member (a retried request).
                Err(e) if e.is_invalid_request() && message_of(e).contains("has no snapshot") => {
                    missing += 1
                }
                Err(e) => failed.push((
                    m.clone(),
                    format!("deleting snapshot {name} failed on it: {e}"),
                )),
            }
        }
        if missing == set.len() {
            return Err(self.refused(
                SnapshotRefusal::NotFound,
                format!("volume {} has no snapshot named {name:?}", self.volume),
            ));
        }
        if failed.len() == set.len() {
            let detail: Vec<String> = failed.iter().map(|(_, why)| why.clone()).collect();
            return Err(self.refused(SnapshotRefusal::Failed, detail.join("; ")));
        }
        if !failed.is_empty() {
            self.retire(&failed).await;
        }
        Ok(())
    }

    /// The layer tree of every member in sync (name, reply), the local member first.
    /// `length` bytes at `offset` of snapshot `name`'s content, read from a member in sync that
    /// holds it (the local one first). A member that cannot answer is passed over (a read of a
    /// snapshot retires no one); none holding it is `NotFound`.
    pub async fn read_snapshot(
        &self,
        name: &str,
        offset: u64,
        length: u32,
    ) -> Result<Vec<u8>, EngineError> {
        let _in = self.enter().await?;
        let end = offset.checked_add(u64::from(length));
        if end.is_none_or(|e| e > self.size_bytes()) {
            return Err(EngineError::OutOfRange {
                volume: self.volume.clone(),
                offset,
                length: u64::from(length),
                size_bytes: self.size_bytes(),
            });
        }
        let mut set: Vec<Arc<Member>> = self
            .in_sync()
            .into_iter()
            .filter(|m| m.mode() == Mode::Rw)
            .collect();
        set.sort_by_key(|m| !m.local);
        let mut out = Vec::with_capacity(length as usize);
        let mut at = offset;
        while out.len() < length as usize {
            let n = (length as usize - out.len())
                .min(zebu_proto::data::MAX_SNAPSHOT_READ_BYTES as usize);
            let payload = zebu_proto::snapshot::encode_read_snapshot(name, n as u32);
            let mut call = Call::new(Op::ReadSnapshot, at, payload.len() as u32);
            call.payload = Some(payload.into());
            let call = call.with_payload_crc();
            let mut why = Vec::new();
            let mut got = None;
            for m in &set {
                match m.client().call(call.clone(), self.io_timeout).await {
                    Ok(b) if b.len() == n => {
                        got = Some(b);
                        break;
                    }
                    Ok(b) => why.push(format!("{}: {} bytes instead of {n}", m.name, b.len())),
                    Err(e) => why.push(format!("{}: {}", m.name, message_of(&e))),
                }
            }
            let Some(b) = got else {
                let missing = why.iter().all(|w| w.contains("no snapshot named"));
                return Err(EngineError::Snapshot {
                    volume: self.volume.clone(),
                    kind: if missing && !why.is_empty() {
                        SnapshotRefusal::NotFound
                    } else {
                        SnapshotRefusal::Failed
                    },
                    message: format!(
                        "cannot read snapshot {name} at {at}: {}",
                        if why.is_empty() {
                            "no replica in sync".to_owned()
                        } else {
                            why.join("; ")
                        }
                    ),
                });
            };
            out.extend_from_slice(&b);
            at += n as u64;
        }
        Ok(out)
    }

    pub async fn layers(&self) -> Result<Vec<(String, LayersReply)>, EngineError> {
        let _in = self.enter().await?;
        let mut set = self.in_sync();
        set.sort_by_key(|m| !m.local);
        let call = Call::new(Op::Layers, 0, 0);
        let results = join_all(
            set.iter()
                .map(|m| m.client().call(call.clone(), self.io_timeout)),
        )
        .await;
        let mut out = Vec::new();
        for (m, r) in set.iter().zip(results) {
            match r.map(|b| LayersReply::decode(&b)) {
                Ok(Ok(reply)) => out.push((m.name.clone(), reply)),
                Ok(Err(e)) => {
                    tracing::warn!(volume = %self.volume, replica = %m.name, "bad layer list: {e}")
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume, replica = %m.name, "layer list failed: {e}")
                }
            }
        }
        if out.is_empty() {
            return Err(self.no_replicas());
        }
        Ok(out)
    }

    /// Delete, on the members that hold it, every snapshot that is not acknowledged: not in
    /// `committed` (the manager's records). Without records, keep every one.
    pub(super) async fn reconcile_snapshots(
        &self,
        committed: Option<&[String]>,
    ) -> Result<(), EngineError> {
        let set: Vec<Arc<Member>> = self
            .in_sync()
            .into_iter()
            .filter(|m| m.mode() == Mode::Rw)
            .collect();
        if committed.is_none() {
            return Ok(());
        }
        let call = Call::new(Op::Layers, 0, 0);
        let results = join_all(
            set.iter()
                .map(|m| m.client().call(call.clone(), self.io_timeout)),
        )
        .await;
        let mut lists = Vec::new();
        let mut failed = Vec::new();
        for (m, r) in set.iter().zip(results) {
            match r.map(|b| LayersReply::decode(&b)) {
                Ok(Ok(reply)) => lists.push((m.clone(), live_keys(&reply))),
                Ok(Err(e)) => failed.push((m.clone(), format!("its layer list is damaged: {e}"))),
                Err(e) => failed.push((m.clone(), format!("its layer list failed: {e}"))),
            }
        }
        if !failed.is_empty() {
            self.retire(&failed).await;
        }
        let common: BTreeSet<String> = committed.unwrap_or(&[]).iter().cloned().collect();
        for (m, keys) in &lists {
            let names: BTreeSet<String> = keys.keys().cloned().collect();
            for lacking in common.difference(&names) {
                // A rebuild copies the live path's snapshots, not yet those a revert left on
                // another branch (docs/snapshots.md, "Rebuild copies the tree").
                tracing::warn!(volume = %self.volume, replica = %m.name, snapshot = %lacking, "member lacks an acknowledged snapshot");
            }
        }
        for (m, keys) in &lists {
            // Not acknowledged, or an older snapshot of an acknowledged one's name.
            for (_, extra) in keys.iter().filter(|(k, _)| !common.contains(*k)) {
                tracing::warn!(volume = %self.volume, replica = %m.name, snapshot = %extra, "snapshot held by only some members (a crash cut it short): deleted there, its data stays in the head's path");
                let call = named_call(Op::SnapshotRemove, extra.as_bytes().to_vec());
                if let Err(e) = m.client().call(call, self.io_timeout).await {
                    self.retire(&[(
                        m.clone(),
                        format!("deleting a partial snapshot failed: {e}"),
                    )])
                    .await;
                }
            }
        }
        Ok(())
    }
}
