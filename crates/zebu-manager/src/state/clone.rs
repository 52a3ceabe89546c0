//! Clones: a new volume with a snapshot's content, usable as soon as it is attached, copied in
//! the background by its engine (`docs/snapshots.md`, "Clone"; the engine's side is
//! `zebu-engine/src/engine/clone_fill.rs`).
//!
//! The record (`clone` on the new volume's record) is written with the volume, before any copy,
//! and says done once the engine reported the copy complete (flushed on every member). While it
//! is not done the source snapshot is still read by the clone: it cannot be deleted (nor
//! purged), nor can the source volume; the clone cannot be expanded (nor snapshotted: its engine
//! refuses while it copies).

use serde::{Deserialize, Serialize};
use zebu_api::{CloneSpec, CloneStatus, EngineReport, ReplicaMode, SnapshotRef, Volume};

use super::{State, VolumeRecord};
use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRecord {
    pub volume: String,
    pub snapshot: String,
    /// The snapshot's unique id when the clone was made.
    #[serde(default)]
    pub uid: String,
    /// The copy is complete and durable on the clone's replicas: an ordinary volume.
    #[serde(default)]
    pub done: bool,
}

impl State {
    /// `POST /v1/volumes` with `clone_from`: a new volume of the source's size, recorded as a
    /// clone of the snapshot. Nothing is copied yet: the copy runs in the clone's engine.
    pub fn create_clone(
        &mut self,
        name: &str,
        size_bytes: u64,
        replica_count: Option<u32>,
        from: &SnapshotRef,
    ) -> Result<Volume, ApiError> {
        let src = self.live_volume(&from.volume)?;
        let snap = self.snapshot_record(&from.volume, &from.snapshot)?;
        if size_bytes != 0 && size_bytes != src.size_bytes {
            return Err(ApiError::bad_request(format!(
                "a clone of {}/{} has the source's size, {} bytes, not {size_bytes}; leave the size out (expand the clone once it is done)",
                from.volume, from.snapshot, src.size_bytes
            )));
        }
        if src.clone.as_ref().is_some_and(|c| !c.done) {
            return Err(ApiError::conflict(format!(
                "volume {} is itself a clone still being copied; clone it once `zebu volume get {}` shows the copy done",
                from.volume, from.volume
            )));
        }
        if self.start_members(&from.volume).is_empty() {
            return Err(ApiError::unavailable(format!(
                "volume {} has no replica in sync to copy snapshot {} from; salvage it first",
                from.volume, from.snapshot
            )));
        }
        let rec = CloneRecord {
            volume: from.volume.clone(),
            snapshot: from.snapshot.clone(),
            uid: snap.uid,
            done: false,
        };
        let v = self.create_volume_as(name, src.size_bytes, replica_count, Some(rec))?;
        tracing::info!(volume = name, source = %from.volume, snapshot = %from.snapshot, "clone created; its engine copies the snapshot while it is attached");
        Ok(v)
    }

    /// What the clone's engine reads through to, while the clone is not done.
    pub(super) fn clone_spec(&self, v: &VolumeRecord) -> Option<CloneSpec> {
        let c = v.clone.as_ref().filter(|c| !c.done)?;
        Some(CloneSpec {
            volume: c.volume.clone(),
            snapshot: c.snapshot.clone(),
            replicas: self
                .start_members(&c.volume)
                .into_iter()
                .filter(|r| r.mode == ReplicaMode::RW)
                .filter_map(|r| self.engine_replica(r))
                .collect(),
        })
    }

    /// The clone's status for `volume get`: the record, with the engine's last progress.
    pub(super) fn clone_view(
        &self,
        v: &VolumeRecord,
        engine: Option<&EngineReport>,
    ) -> Option<CloneStatus> {
        let c = v.clone.as_ref()?;
        let live = engine.and_then(|e| e.clone.as_ref()).filter(|_| !c.done);
        Some(CloneStatus {
            volume: c.volume.clone(),
            snapshot: c.snapshot.clone(),
            bytes_done: if c.done {
                v.size_bytes
            } else {
                live.map_or(0, |l| l.bytes_done)
            },
            bytes_total: v.size_bytes,
            copied: c.done || live.is_some_and(|l| l.copied),
            done: c.done,
            error: live.and_then(|l| l.error.clone()),
        })
    }

    /// The current engine of a clone reported its copy complete: record the clone done.
    pub(super) fn note_clone_copied(&mut self, e: &EngineReport) -> Result<(), ApiError> {
        let Some(mut v) = self.volumes.get(&e.volume).cloned() else {
            return Ok(());
        };
        let copied = e.clone.as_ref().is_some_and(|c| c.copied);
        match v.clone.as_mut() {
            Some(c) if !c.done && copied => c.done = true,
            _ => return Ok(()),
        }
        tracing::info!(volume = %v.name, "clone done: its copy is complete, it no longer reads its source");
        self.save_volume(v)
    }

    /// Clones that still read `volume`'s snapshot `snapshot` (any snapshot: `None`), with their
    /// progress, for a refusal.
    fn clones_reading(&self, volume: &str, snapshot: Option<&str>) -> Vec<String> {
        self.volumes
            .values()
            .filter(|v| {
                v.clone.as_ref().is_some_and(|c| {
                    !c.done && c.volume == volume && snapshot.is_none_or(|s| s == c.snapshot)
                })
            })
            .map(|v| {
                let engine = v
                    .desired_node
                    .as_deref()
                    .and_then(|n| self.engine_report(n, &v.name));
                let p = self.clone_view(v, engine);
                let pct = p.map_or(0, |p| p.bytes_done * 100 / p.bytes_total.max(1));
                format!("{} ({pct}% copied)", v.name)
            })
            .collect()
    }

    /// Refuse to delete snapshot `snapshot` of `volume` (or, with `None`, the volume) while a
    /// clone still reads it.
    pub fn refuse_if_clone_source(
        &self,
        volume: &str,
        snapshot: Option<&str>,
    ) -> Result<(), ApiError> {
        let clones = self.clones_reading(volume, snapshot);
        if clones.is_empty() {
            return Ok(());
        }
        let what = match snapshot {
            Some(s) => format!("snapshot {s} of volume {volume}"),
            None => format!("volume {volume}"),
        };
        Err(ApiError::conflict(format!(
            "{what} is the source of clone {} still being copied (a clone reads from its source what it has not copied yet); wait until `zebu volume get` shows the clone done, or delete the clone first",
            clones.join(", ")
        )))
    }

    /// Refuse what a clone cannot do while it copies.
    pub(super) fn refuse_while_cloning(
        &self,
        v: &VolumeRecord,
        what: &str,
    ) -> Result<(), ApiError> {
        match v.clone.as_ref().filter(|c| !c.done) {
            Some(c) => Err(ApiError::conflict(format!(
                "volume {} is a clone of {}/{} still being copied; {what} once `zebu volume get {}` shows the clone done (the copy runs while the clone is attached)",
                v.name, c.volume, c.snapshot, v.name
            ))),
            None => Ok(()),
        }
    }
}
