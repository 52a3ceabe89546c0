//! The replica-health reconciler: brings each attached volume back to its replica count.
//!
//! Runs every second (its own timer) for each attached volume whose engine runs and has fewer
//! members in sync or rebuilding (RW + WO) than it wants, one step per volume per pass:
//! 1. **Rejoin.** A failed (ERR) replica whose node is ready and serves it again (on disk, no
//!    error), failed at least [`REJOIN_BACKOFF_S`] ago ([`NO_SPACE_REJOIN_S`] when its disk was
//!    full): it goes WO, and the engine rebuilds it in place (it keeps its data; the copy
//!    overwrites what differs).
//! 2. **Replace.** Otherwise, once the gap is older than `replica-replenishment-wait-interval`
//!    (a gap of k members dates from the k-th newest failure; no failed replica explains it, or
//!    the failure was a full disk: at once), a new
//!    replica is placed on a candidate node (see `schedule.rs`) as WO and filled by a full
//!    rebuild. The failed record stays (ERR) and is no longer counted.
//!
//! A node takes part in at most `concurrent-replica-rebuild-per-node-limit` rebuilds, as target
//! or as source (the engine's node, whose RW replica the engine reads first).
//! Records are written before the engine hears of them (the next assignment), so a manager
//! restart resumes from the records.

use zebu_api::ReplicaMode;

use zebu_store::MetaStoreExt;

use super::{ReplicaRecord, State, REPLICAS};
use crate::settings;

/// A replica whose rebuild failed is tried again after this long.
pub const REJOIN_BACKOFF_S: u64 = 5;
/// ... and one that failed because its disk is full, after this long (space has to be freed
/// first; its gap is filled elsewhere meanwhile).
pub const NO_SPACE_REJOIN_S: u64 = 60;
/// A WO replica that no node serves (its node went down, or it was never created) is given up
/// (ERR) after the replenishment wait, but never sooner than this.
pub const UNSERVED_WO_MIN_S: u64 = 30;

impl State {
    /// Failed replicas older than `stale-replica-timeout` whose volume has its full count of
    /// replicas in sync without them are removed: marked `removing` (their node deletes them,
    /// then the record goes). Every RW record holds every acknowledged write, so nothing is
    /// lost with them.
    pub(super) fn remove_stale(&mut self) {
        let stale_s = self.setting_u64(settings::STALE_REPLICA_TIMEOUT) * 60;
        let mut steps = Vec::new();
        for r in self.replicas.values() {
            if r.mode != ReplicaMode::ERR || r.removing {
                continue;
            }
            if r.failed_for_s().is_none_or(|s| s < stale_s) {
                continue;
            }
            let Some(v) = self.volumes.get(&r.volume).filter(|v| !v.deleting) else {
                continue;
            };
            let in_sync = self
                .volume_replicas(&v.name)
                .iter()
                .filter(|x| x.mode == ReplicaMode::RW)
                .count() as u32;
            if in_sync < v.replica_count {
                continue;
            }
            let mut next = r.clone();
            next.removing = true;
            next.error = Some(format!(
                "stale: failed more than {} minutes ago and replaced; being removed from node {} ({})",
                stale_s / 60,
                r.node,
                r.error.clone().unwrap_or_default()
            ));
            steps.push(next);
        }
        for r in steps {
            if let Err(e) = self.store.put(REPLICAS, &r.name, &r) {
                tracing::error!(
                    "removing stale replica {}: not recorded, tried again: {e}",
                    r.name
                );
                continue;
            }
            tracing::info!(volume = %r.volume, replica = %r.name, node = %r.node, "stale replica removed: it failed longer ago than stale-replica-timeout and the volume has its replicas without it");
            self.replicas.insert(r.name.clone(), r);
        }
    }

    /// Rebuilds node `n` takes part in, counting those `planned` in this pass: as target (a WO
    /// replica there), or as source (the engine reads its own node's RW replica first, so a
    /// rebuild of a volume attached on `n` with an RW replica on `n` reads `n`'s disk).
    fn rebuilds_on(&self, n: &str, planned: &[(ReplicaRecord, String)]) -> usize {
        let recorded = self
            .replicas
            .values()
            .filter(|r| !planned.iter().any(|(p, _)| p.name == r.name));
        recorded
            .chain(planned.iter().map(|(p, _)| p))
            .filter(|r| r.mode == ReplicaMode::WO)
            .filter(|r| {
                r.node == n
                    || self.volumes.get(&r.volume).is_some_and(|v| {
                        v.desired_node.as_deref() == Some(n)
                            && self.replicas.values().any(|x| {
                                x.volume == v.name && x.node == n && x.mode == ReplicaMode::RW
                            })
                    })
            })
            .count()
    }

    pub(super) fn replenish(&mut self) {
        let wait_s = self.setting_u64(settings::REPLICA_REPLENISHMENT_WAIT_INTERVAL);
        let stale_s = self.setting_u64(settings::STALE_REPLICA_TIMEOUT) * 60;
        let limit = self.setting_u64(settings::CONCURRENT_REPLICA_REBUILD_PER_NODE_LIMIT) as usize;
        let mut steps: Vec<(ReplicaRecord, String)> = Vec::new();
        // Rebuild targets nobody serves are given up, so they neither block a replacement nor
        // stay WO for ever.
        let give_up_s = wait_s.max(UNSERVED_WO_MIN_S);
        for r in self.replicas.values() {
            if r.mode != ReplicaMode::WO || self.served(r) {
                continue;
            }
            let since = r.wo_since_unix.map(|t| super::now_unix().saturating_sub(t));
            if since.is_some_and(|s| s < give_up_s) {
                continue;
            }
            let mut next = r.clone();
            next.mode = ReplicaMode::ERR;
            next.failed_at_unix = Some(super::now_unix());
            next.error = Some(format!(
                "its rebuild could not start: node {} did not serve it for {give_up_s} s",
                r.node
            ));
            if since.is_none() {
                // A record from before the field: start its clock instead.
                next.mode = ReplicaMode::WO;
                next.error = None;
                next.failed_at_unix = None;
                next.wo_since_unix = Some(super::now_unix());
            }
            let why = format!(
                "replica {} of volume {}: {}",
                r.name,
                r.volume,
                next.error
                    .clone()
                    .unwrap_or_else(|| "waiting for its node".into())
            );
            steps.push((next, why));
        }
        for v in self.volumes.values() {
            if !v.created || v.deleting {
                continue;
            }
            let Some(node) = v.desired_node.as_deref() else {
                continue;
            };
            let running = self
                .engine_report(node, &v.name)
                .is_some_and(|e| e.running && e.epoch == v.epoch);
            if !running {
                continue;
            }
            let reps = self.volume_replicas(&v.name);
            let active = reps
                .iter()
                .filter(|r| matches!(r.mode, ReplicaMode::RW | ReplicaMode::WO))
                .count() as u32;
            if active >= v.replica_count {
                continue;
            }
            let rebuilding_on = |n: &str| self.rebuilds_on(n, &steps);
            // The engine's node is the source when it holds an RW replica: within its limit too.
            let reads_local = reps
                .iter()
                .any(|r| r.node == node && r.mode == ReplicaMode::RW);
            if reads_local && rebuilding_on(node) >= limit {
                continue;
            }
            // Newest failure first: the replica that left last has the least to catch up on
            // (an older one was replaced already, and may be far behind).
            let mut failed: Vec<&&ReplicaRecord> = reps
                .iter()
                .filter(|r| r.mode == ReplicaMode::ERR && !r.removing)
                .collect();
            failed.sort_by_key(|r| std::cmp::Reverse(r.failed_at_unix.unwrap_or(0)));
            // (One in its back-off does not hold the others back: its rebuild may keep failing.)
            let rejoin = failed.iter().find(|r| {
                let backoff = if r.no_space {
                    NO_SPACE_REJOIN_S
                } else {
                    REJOIN_BACKOFF_S
                };
                self.served(r)
                    && r.failed_for_s().is_none_or(|s| s >= backoff && s < stale_s)
                    && rebuilding_on(&r.node) < limit
            });
            if let Some(r) = rejoin {
                let mut next = (**r).clone();
                next.mode = ReplicaMode::WO;
                next.wo_since_unix = Some(super::now_unix());
                let why = format!(
                    "replica {} rejoins volume {} on node {}: rebuilding it in place",
                    r.name, v.name, r.node
                );
                steps.push((next, why));
                continue;
            }
            // The gap of `missing` members is as old as the `missing`-th newest failure: the
            // older failures' gaps were filled already (a replacement that failed in turn
            // waits out the interval afresh, and may rejoin meanwhile). A failure from before
            // failure times were kept counts as old; fewer failures than the gap (fewer
            // replicas than wanted): due now.
            let missing = (v.replica_count - active) as usize;
            // A full disk is not waited for: its gap is due at once.
            let mut ages: Vec<u64> = failed
                .iter()
                .map(|r| {
                    r.failed_for_s()
                        .filter(|s| !r.no_space && *s < stale_s)
                        .unwrap_or(u64::MAX)
                })
                .collect();
            ages.sort_unstable();
            let due = ages.get(missing - 1).is_none_or(|s| *s >= wait_s);
            if !due {
                continue;
            }
            let Some(target) = self
                .candidate_nodes(&v.name, v.size_bytes)
                .into_iter()
                .find(|n| rebuilding_on(n) < limit)
            else {
                continue;
            };
            let next = ReplicaRecord::new(&v.name, &target, ReplicaMode::WO);
            let why = format!(
                "replica {} on node {} replaces the failed replica(s) of volume {}: full rebuild",
                next.name, target, v.name
            );
            steps.push((next, why));
        }
        for (r, why) in steps {
            if let Err(e) = self.store.put(REPLICAS, &r.name, &r) {
                tracing::error!("{why}: not recorded, tried again: {e}");
                continue;
            }
            tracing::info!("{why}");
            self.replicas.insert(r.name.clone(), r);
        }
    }
}
