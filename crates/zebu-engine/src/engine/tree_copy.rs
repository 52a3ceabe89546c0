//! A rebuild copies the snapshots (`docs/snapshots.md`, "Rebuild copies the tree").
//!
//! Before the target joins the set (so no live write reaches it yet, and after it was fenced,
//! so no old session's write lands either), its snapshots are made those of the live path of a
//! member in sync, root first:
//! 1. Its snapshots that the source's live path does not hold, or holds only past the first
//!    one it lacks, are deleted on it (a deletion keeps every block's content: the data is
//!    merged into the child). The longest common prefix of the two paths stays.
//! 2. If that is the whole path, nothing else changes: the head phase (a delta, or the rest of
//!    an interrupted rebuild, or a whole copy) goes on as for a volume without snapshots.
//! 3. Otherwise the target is rewound to an empty head over the last snapshot it keeps (none:
//!    an empty replica; its own write-intent log then has every extent dirty, so only a whole
//!    copy of the head makes it a member), and each missing snapshot `Sk` is made, oldest
//!    first: the blocks the source's layers between `Sk-1` and `Sk` hold (SNAPSHOT_DELTA) are
//!    written into the target's empty head, data read through READ_SNAPSHOT, zeroes as zeroes;
//!    then the target takes `Sk` (same name, labels, uid, time). Its content is then `Sk`'s:
//!    `Sk-1`'s (already there) with those blocks laid over it.
//!
//! A snapshot exists on the target only once its whole content was copied (the snapshot is
//! taken after, and syncs first), so a copy cut short at any point resumes at the snapshot it
//! was filling: that one is in no target's list, and the rewind drops what was written of it.
//! Snapshots are neither taken nor deleted while a copy runs (refused: the rebuild says so),
//! and the target's list is checked against the source's once more as it joins.
//! Snapshots off the live path (left on another branch by a revert) are not copied yet.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::StreamExt;
use zebu_proto::data::{self, Op, EXTENT_HOLE, EXTENT_ZERO, MAX_SNAPSHOT_READ_BYTES};
use zebu_proto::snapshot::{
    encode_snapshot_delta, LayersReply, SnapshotRequest, LAYER_HEAD, LAYER_REMOVED, LAYER_SYSTEM,
};

use super::snapshots::{key_of, message_of, named_call};
use super::{copy_calls, flush_timeout, Engine, EngineError};
use crate::backend::Backend;
use crate::client::Call;

/// Bytes of a snapshot copied per step (one delta map, then its data).
const PIECE_BYTES: u64 = MAX_SNAPSHOT_READ_BYTES as u64;
/// Steps of one snapshot's copy under way at once.
const PIPELINE: usize = 2;

/// A live snapshot on a layer path.
#[derive(Debug, Clone)]
pub(super) struct Snap {
    pub key: String,
    pub name: String,
    pub req: SnapshotRequest,
}

/// The live (not removed) snapshots on the head's path of a LAYERS reply, root first.
pub(super) fn live_path(reply: &LayersReply) -> Vec<Snap> {
    let by_id = |id: u64| reply.layers.iter().find(|l| l.id == id);
    let mut out = Vec::new();
    let mut at = reply.layers.iter().find(|l| l.flags & LAYER_HEAD != 0);
    let mut steps = 0;
    while let Some(l) = at {
        if l.flags & (LAYER_HEAD | LAYER_REMOVED) == 0 {
            out.push(Snap {
                key: key_of(l),
                name: l.name.clone(),
                req: SnapshotRequest {
                    name: l.name.clone(),
                    system: l.flags & LAYER_SYSTEM != 0,
                    created_unix: l.created_unix,
                    labels: l.labels.clone(),
                },
            });
        }
        steps += 1;
        // A reply is a tree (the replica checks it); a bound anyway.
        if l.parent == 0 || steps > reply.layers.len() {
            break;
        }
        at = by_id(l.parent);
    }
    out.reverse();
    out
}

/// What copying the tree did to a rebuild target.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct TreeCopy {
    /// Its head was dropped: only a whole copy of the head makes it a member.
    pub rewound: bool,
    /// Snapshots made on it, and the data bytes written into them.
    pub snapshots: usize,
    pub bytes: u64,
    /// The live path's keys it holds now (checked again as it joins).
    pub keys: Vec<String>,
    /// The name of the last of them, the one its head lies over.
    pub last: Option<String>,
}

/// While alive, a rebuild is copying snapshots: none is taken or deleted meanwhile.
pub(super) struct CopyingTree<'a>(&'a Engine);

impl Drop for CopyingTree<'_> {
    fn drop(&mut self) {
        self.0.tree_copies.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Engine {
    /// Why snapshots are neither taken nor deleted now, if a rebuild is copying them.
    pub(super) fn tree_copy_running(&self) -> Option<String> {
        (self.tree_copies.load(Ordering::Acquire) > 0)
            .then(|| "a replica is being rebuilt and its snapshots are being copied".to_owned())
    }

    /// Call with `membership` held (so no snapshot is being taken or deleted now).
    pub(super) fn copying_tree(&self) -> CopyingTree<'_> {
        self.tree_copies.fetch_add(1, Ordering::AcqRel);
        CopyingTree(self)
    }

    fn tree_err(&self, target: &str, why: impl std::fmt::Display) -> EngineError {
        EngineError::Rebuild {
            volume: self.volume.clone(),
            reason: format!("copying the snapshots to replica {target}: {why}"),
        }
    }

    /// The LAYERS reply of the first member in sync that answers.
    pub(super) async fn source_layers(&self, target: &str) -> Result<LayersReply, EngineError> {
        let mut why = Vec::new();
        for m in self.read_order() {
            match m
                .client()
                .call(Call::new(Op::Layers, 0, 0), self.io_timeout)
                .await
            {
                Ok(b) => match LayersReply::decode(&b) {
                    Ok(r) => return Ok(r),
                    Err(e) => why.push(format!("{}: a bad layer list: {e}", m.name)),
                },
                Err(e) => why.push(format!("{}: {e}", m.name)),
            }
        }
        Err(self.tree_err(
            target,
            format!("no member in sync listed its layers: {}", why.join("; ")),
        ))
    }

    async fn target_layers(
        &self,
        target: &Backend,
        name: &str,
    ) -> Result<LayersReply, EngineError> {
        let b = target
            .call(Call::new(Op::Layers, 0, 0), self.io_timeout)
            .await
            .map_err(|e| self.tree_err(name, format!("its layer list: {e}")))?;
        LayersReply::decode(&b).map_err(|e| self.tree_err(name, format!("its layer list: {e}")))
    }

    /// Make the snapshots of `target` (fenced, not a member yet) those of the set's live path;
    /// see the module docs.
    pub(super) async fn copy_tree(
        &self,
        target: &Backend,
        name: &str,
        rate: u64,
    ) -> Result<TreeCopy, EngineError> {
        let src = live_path(&self.source_layers(name).await?);
        let tgt_reply = self.target_layers(target, name).await?;
        let tgt = live_path(&tgt_reply);
        let src_keys: HashSet<&str> = src.iter().map(|s| s.key.as_str()).collect();
        let kept = tgt
            .iter()
            .filter(|t| src_keys.contains(t.key.as_str()))
            .zip(&src)
            .take_while(|(t, s)| t.key == s.key)
            .count();
        let keep: HashSet<&str> = src[..kept].iter().map(|s| s.key.as_str()).collect();
        // Everything else it holds goes (content kept: a deletion merges into the child).
        for l in tgt_reply
            .layers
            .iter()
            .filter(|l| l.flags & (LAYER_HEAD | LAYER_REMOVED) == 0)
            .filter(|l| !keep.contains(key_of(l).as_str()))
        {
            tracing::info!(volume = %self.volume, replica = name, snapshot = %l.name, "rebuild: deleting a snapshot the set does not hold on that path");
            target
                .call(
                    named_call(Op::SnapshotRemove, l.name.as_bytes().to_vec()),
                    self.io_timeout,
                )
                .await
                .map_err(|e| {
                    self.tree_err(name, format!("deleting its snapshot {}: {e}", l.name))
                })?;
        }
        let mut done = TreeCopy {
            keys: src[..kept].iter().map(|s| s.key.clone()).collect(),
            last: src.last().map(|s| s.name.clone()),
            ..TreeCopy::default()
        };
        if kept == src.len() {
            return Ok(done);
        }
        let base = kept.checked_sub(1).map(|i| src[i].name.as_str());
        tracing::info!(volume = %self.volume, replica = name, keeps = kept, copies = src.len() - kept, "rebuild: copying snapshots");
        let mut rewind = named_call(Op::Rewind, base.unwrap_or("").as_bytes().to_vec());
        rewind.offset = self.generation();
        target
            .call(rewind, flush_timeout(self.io_timeout))
            .await
            .map_err(|e| self.tree_err(name, format!("rewinding it: {e}")))?;
        done.rewound = true;
        let started = Instant::now();
        for k in kept..src.len() {
            let s = &src[k];
            let below = k.checked_sub(1).map(|i| src[i].name.as_str());
            let bytes = self
                .copy_layer(target, name, s, below, rate, started, done.bytes)
                .await?;
            target
                .call(
                    named_call(Op::Snapshot, s.req.encode()),
                    flush_timeout(self.io_timeout),
                )
                .await
                .map_err(|e| self.tree_err(name, format!("taking snapshot {}: {e}", s.name)))?;
            done.bytes += bytes;
            done.snapshots += 1;
            done.keys.push(s.key.clone());
            tracing::info!(volume = %self.volume, replica = name, snapshot = %s.name, bytes, "rebuild: snapshot copied");
        }
        Ok(done)
    }

    /// Write into `target`'s empty head what snapshot `s` holds above `base`; returns the data
    /// bytes written. `paced`: bytes already copied since `started` (for the rate).
    #[allow(clippy::too_many_arguments)]
    async fn copy_layer(
        &self,
        target: &Backend,
        name: &str,
        s: &Snap,
        base: Option<&str>,
        rate: u64,
        started: Instant,
        paced: u64,
    ) -> Result<u64, EngineError> {
        let size = self.size_bytes();
        let pieces = (0..size)
            .step_by(PIECE_BYTES as usize)
            .map(|at| (at, (at + PIECE_BYTES).min(size)));
        let copy = |(at, end): (u64, u64)| async move {
            let extents = self
                .snapshot_delta(name, &s.name, base, at, (end - at) as u32)
                .await?;
            let mut written = 0u64;
            let mut off = at;
            for x in extents {
                let n = x.length;
                if x.flags & EXTENT_HOLE != 0 {
                    // The base's content, already on the target.
                } else if x.flags & EXTENT_ZERO != 0 {
                    self.send_to(target, name, Call::new(Op::WriteZeroes, off, n))
                        .await?;
                } else {
                    let good: bytes::Bytes = self
                        .read_snapshot(&s.name, off, n)
                        .await
                        .map_err(|e| self.tree_err(name, e))?
                        .into();
                    for c in copy_calls(&good, off, self.block_size as usize) {
                        if c.op == Op::Write {
                            written += u64::from(c.length);
                        }
                        self.send_to(target, name, c).await?;
                    }
                }
                off += u64::from(n);
            }
            Ok::<_, EngineError>((end - at, written))
        };
        let depth = if rate > 0 { 1 } else { PIPELINE };
        let mut steps = futures::stream::iter(pieces).map(copy).buffered(depth);
        let (mut walked, mut written) = (0u64, 0u64);
        while let Some(step) = steps.next().await {
            let (w, n) = step?;
            walked += w;
            written += n;
            if rate > 0 {
                let due = std::time::Duration::from_secs_f64((paced + walked) as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok(written)
    }

    async fn send_to(&self, target: &Backend, name: &str, c: Call) -> Result<(), EngineError> {
        let (op, at) = (c.op, c.offset);
        target
            .call(c, self.io_timeout)
            .await
            .map(|_| ())
            .map_err(|e| self.tree_err(name, format!("{op:?} at {at} failed on it: {e}")))
    }

    /// SNAPSHOT_DELTA of `snapshot` above `base` at `offset`, from the first member in sync
    /// that answers (their layers may differ, never the content this describes).
    async fn snapshot_delta(
        &self,
        target: &str,
        snapshot: &str,
        base: Option<&str>,
        offset: u64,
        length: u32,
    ) -> Result<Vec<data::MapExtent>, EngineError> {
        let mut call = named_call(
            Op::SnapshotDelta,
            encode_snapshot_delta(snapshot, base, length),
        );
        call.offset = offset;
        let mut why = Vec::new();
        for m in self.read_order() {
            match m.client().call(call.clone(), self.io_timeout).await {
                Ok(b) => match data::decode_map(&b) {
                    Ok(x)
                        if x.iter().map(|e| u64::from(e.length)).sum::<u64>()
                            == u64::from(length) =>
                    {
                        return Ok(x)
                    }
                    Ok(_) => why.push(format!("{}: a short map", m.name)),
                    Err(e) => why.push(format!("{}: a bad map: {e}", m.name)),
                },
                Err(e) => why.push(format!("{}: {}", m.name, message_of(&e))),
            }
        }
        Err(self.tree_err(
            target,
            format!(
                "no member in sync told what snapshot {snapshot} holds at {offset}: {}",
                why.join("; ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zebu_proto::snapshot::LayerRecord;

    fn layer(id: u64, parent: u64, flags: u16, name: &str, uid: &str) -> LayerRecord {
        LayerRecord {
            id,
            parent,
            flags,
            name: name.into(),
            labels: vec![(super::super::snapshots::UID_LABEL.into(), uid.into())],
            ..Default::default()
        }
    }

    #[test]
    fn the_live_path_skips_removed_layers_and_other_branches() {
        // 1 <- 2 (removed) <- 3 <- 5 (head); 3 <- 4 (a branch a revert left).
        let reply = LayersReply {
            layers: vec![
                layer(1, 0, 0, "a", "u1"),
                layer(2, 1, LAYER_REMOVED, "b", "u2"),
                layer(3, 2, 0, "c", "u3"),
                layer(4, 3, 0, "d", "u4"),
                layer(5, 3, LAYER_HEAD, "", ""),
            ],
            merge: None,
        };
        let keys: Vec<String> = live_path(&reply).into_iter().map(|s| s.key).collect();
        assert_eq!(keys, vec!["a#u1".to_owned(), "c#u3".to_owned()]);
        assert!(live_path(&LayersReply::default()).is_empty());
    }
}
