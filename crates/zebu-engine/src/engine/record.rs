//! Recording retirements where the next engine will look, before they count.
//!
//! An engine that retires a member and goes on without it acknowledges writes the member lacks.
//! If the manager did not know, it could later start the volume (on this node or another) from
//! that member and serve data older than what was acknowledged. So, when the engine was given a
//! [`MembershipRecord`] (the agent's: the manager's API), every member that leaves the set from
//! `RW` is recorded there, with this engine's epoch, before any write that skipped it is
//! acknowledged and before the engine serves at all: `retire` records before it returns, and
//! every mutation waits for pending records in `settled`. The manager refuses a record from an
//! epoch that is not the volume's current one: the engine is then fenced and serves nothing.
//! While the manager cannot be reached, requests wait (a write is never acknowledged without
//! the record; a read waits too, as this engine may have been replaced by one elsewhere).
//!
//! So every replica the manager records `RW` holds every acknowledged write, and an engine may
//! start from any of those it can reach (see `docs/healing.md`, rule 9).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::{Engine, EngineError, Mode};

/// Why a record was not taken.
#[derive(Debug, Clone)]
pub enum RecordError {
    /// The volume has a newer attachment: this engine must stop.
    Fenced(String),
    /// The record could not be made now (the manager is unreachable); try again.
    Unavailable(String),
}

/// The members in sync when a retirement is recorded, and their (durable) generation.
#[derive(Debug, Clone, Default)]
pub struct Survivors {
    pub members: Vec<String>,
    pub generation: u64,
}

/// One member that left the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    pub name: String,
    /// Why it left the set.
    pub reason: String,
    /// It left because its disk is full.
    pub no_space: bool,
}

/// Where an engine records the members that left its set.
pub trait MembershipRecord: Send + Sync {
    /// Record that `retired` left the set of the engine of `epoch` for `volume`,
    /// and that `survivors.members` are in sync at `survivors.generation`. Returns once the
    /// record is durable.
    fn retired<'a>(
        &'a self,
        volume: &'a str,
        epoch: u64,
        retired: &'a [Retired],
        survivors: &'a Survivors,
    ) -> BoxFuture<'a, Result<(), RecordError>>;
}

impl std::fmt::Debug for dyn MembershipRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MembershipRecord")
    }
}

/// Time between attempts while the record cannot be made.
const RETRY: Duration = Duration::from_millis(500);

impl Engine {
    /// Record every member that left the set from `RW` and is not recorded yet. With
    /// `patience`, give up after it (at start: the agent starts the engine again later);
    /// without, try until the record is made or the engine stops. Caller holds `membership`.
    pub(super) async fn record_retirements(
        &self,
        patience: Option<Duration>,
    ) -> Result<(), EngineError> {
        let Some(recorder) = self.recorder.clone() else {
            self.unrecorded.store(false, Ordering::Release);
            return Ok(());
        };
        let started = Instant::now();
        let mut last_log: Option<Instant> = None;
        loop {
            let pending: Vec<_> = self
                .all()
                .iter()
                .filter(|m| m.unrecorded.load(Ordering::Acquire) && m.mode() == Mode::Err)
                .cloned()
                .collect();
            if pending.is_empty() {
                self.unrecorded.store(false, Ordering::Release);
                return Ok(());
            }
            let list: Vec<Retired> = pending
                .iter()
                .map(|m| Retired {
                    name: m.name.clone(),
                    reason: m.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    no_space: m.no_space.load(Ordering::Acquire),
                })
                .collect();
            // The generation was raised on these before this runs (`retire`, start), under
            // `membership`, so it is durable on each of them.
            let survivors = Survivors {
                members: self
                    .all()
                    .iter()
                    .filter(|m| m.mode() == Mode::Rw)
                    .map(|m| m.name.clone())
                    .collect(),
                generation: self.generation(),
            };
            match recorder
                .retired(&self.volume, self.epoch, &list, &survivors)
                .await
            {
                Ok(()) => {
                    for m in &pending {
                        m.unrecorded.store(false, Ordering::Release);
                    }
                    let names: Vec<&str> = list.iter().map(|r| r.name.as_str()).collect();
                    tracing::info!(volume = %self.volume, epoch = self.epoch, "recorded at the manager: [{}] left the set", names.join(", "));
                }
                Err(RecordError::Fenced(why)) => {
                    let reason = format!("fenced off: the manager refused this engine's record of a retirement: {why}");
                    self.fenced_off.store(true, Ordering::Release);
                    self.close(reason.clone());
                    return Err(EngineError::Closed {
                        volume: self.volume.clone(),
                        reason,
                    });
                }
                Err(RecordError::Unavailable(why)) => {
                    if let Some(reason) = self.closed_reason() {
                        return Err(EngineError::Closed {
                            volume: self.volume.clone(),
                            reason,
                        });
                    }
                    if patience.is_some_and(|p| started.elapsed() >= p) {
                        return Err(EngineError::Start {
                            volume: self.volume.clone(),
                            reason: format!("cannot record at the manager that replicas left the set ({why}); starting without them needs that record"),
                        });
                    }
                    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(volume = %self.volume, "writes wait: the retirement of a replica cannot be recorded at the manager yet ({why}); a write that skipped it is acknowledged only once it is");
                        last_log = Some(Instant::now());
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
}
