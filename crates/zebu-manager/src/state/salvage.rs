//! Salvage: a volume none of whose replicas is in sync (every record failed) is brought back
//! from the freshest replica by recorded evidence — the generation, which only the set's
//! members ever raise, and which every retirement raises above the member that left — never by
//! file times or sizes.
//!
//! The replicas holding the highest recorded generation are equally fresh: they were in the set
//! together when it last moved, so every acknowledged write reached each of them. They are
//! brought back if every one of them can be read now (node ready, on disk, no error); the engine
//! then starts from them, and the others rejoin by rebuild. If one of the freshest is out of
//! reach, the choice is refused, with the reason on the volume: another replica may lack writes
//! only it holds. A person may then choose a replica (`zebu volume salvage NAME --replica R`),
//! accepting that loss. With `auto-salvage` (default true) the manager does it every second on
//! its own timer; it never overrides the refusal.

use zebu_api::{ReplicaMode, Volume};
use zebu_store::MetaStoreExt;

use super::{store_err, ReplicaRecord, State, VolumeRecord, REPLICAS};
use crate::error::ApiError;
use crate::settings;

impl State {
    /// The replicas to bring back, or why none may be chosen.
    pub(super) fn salvage_choice(&self, v: &VolumeRecord) -> Result<Vec<String>, String> {
        if let Some(hold) = &v.salvage_hold {
            return Err(hold.clone());
        }
        let in_sync = self.start_members(&v.name);
        if let Some(r) = in_sync.first() {
            return Err(format!(
                "volume {} has a replica in sync ({} on node {}): salvage is only for a volume none of whose replicas is",
                v.name, r.name, r.node
            ));
        }
        let reps = self.volume_replicas(&v.name);
        let Some(max) = reps.iter().map(|r| r.generation).max() else {
            return Err(format!("volume {} has no replicas", v.name));
        };
        let freshest: Vec<&&ReplicaRecord> = reps.iter().filter(|r| r.generation == max).collect();
        let away: Vec<String> = freshest
            .iter()
            .filter(|r| !self.served(r))
            .map(|r| format!("{} on node {} ({})", r.name, r.node, self.why_unserved(r)))
            .collect();
        if !away.is_empty() {
            return Err(format!(
                "every replica has failed, and the freshest (generation {max}) cannot be read now: {}. Waiting for it, since the others may lack writes only it holds; to bring the volume back without it, accepting that loss: zebu volume salvage {} --replica NAME",
                away.join("; "),
                v.name
            ));
        }
        Ok(freshest.iter().map(|r| r.name.clone()).collect())
    }

    fn why_unserved(&self, r: &ReplicaRecord) -> String {
        if !self.node_ready(&r.node) {
            return "its node is not ready".into();
        }
        if let Some(why) = self.missing_on_disk(r) {
            return why;
        }
        let report = self
            .live
            .get(&r.node)
            .and_then(|l| l.report.replicas.iter().find(|x| x.name == r.name));
        match report.and_then(|x| x.error.clone()) {
            Some(e) => e,
            None if report.is_none() => "its node does not serve it".into(),
            None => "its node has not reported it since it failed; try again in a second".into(),
        }
    }

    /// Bring `names` back in sync (RW), durably, then the engine can start from them.
    fn bring_back(&mut self, names: &[String], why: &str) -> Result<(), ApiError> {
        for n in names {
            let Some(mut r) = self.replicas.get(n).cloned() else {
                continue;
            };
            r.mode = ReplicaMode::RW;
            r.error = None;
            r.failed_at_unix = None;
            r.wo_since_unix = None;
            self.store.put(REPLICAS, &r.name, &r).map_err(store_err)?;
            tracing::warn!(volume = %r.volume, replica = %r.name, node = %r.node, generation = r.generation, "{why}");
            // The engine that served the volume holds no member in sync, whatever the last
            // report of it says (a heartbeat taken before its last member left may be the
            // latest): it is not serving until its agent reports it started afresh.
            for l in self.live.values_mut() {
                for e in l.report.engines.iter_mut().filter(|e| e.volume == r.volume) {
                    for m in &mut e.replicas {
                        m.mode = ReplicaMode::ERR;
                    }
                }
            }
            self.replicas.insert(r.name.clone(), r);
        }
        Ok(())
    }

    /// `zebu volume salvage NAME [--replica R]`.
    pub fn salvage(&mut self, name: &str, replica: Option<String>) -> Result<Volume, ApiError> {
        let v = self.live_volume(name)?;
        let chosen = match replica {
            None => self.salvage_choice(&v).map_err(ApiError::conflict)?,
            Some(r) => {
                let rec = self.replicas.get(&r).filter(|x| x.volume == name);
                let Some(rec) = rec else {
                    let names: Vec<String> = self
                        .volume_replicas(name)
                        .iter()
                        .map(|x| x.name.clone())
                        .collect();
                    return Err(ApiError::bad_request(format!(
                        "replica {r:?} is not a replica of volume {name}; its replicas are: {} (see zebu volume get {name})",
                        names.join(", ")
                    )));
                };
                // Replicas recorded in sync that can be read now make salvage needless; ones out
                // of reach (their node died before their failure was recorded) are left out
                // by the person's choice, like any fresher replica.
                if let Some(x) = self
                    .start_members(name)
                    .into_iter()
                    .find(|x| self.served(x))
                {
                    return Err(ApiError::conflict(format!(
                        "volume {name} has a replica in sync ({} on node {}): salvage is only for a volume none of whose replicas is",
                        x.name, x.node
                    )));
                }
                if !self.served(rec) {
                    return Err(ApiError::conflict(format!(
                        "replica {r} cannot be read now ({}); bring its node or disk back, or choose another",
                        self.why_unserved(rec)
                    )));
                }
                let left_out: Vec<String> = self
                    .start_members(name)
                    .iter()
                    .filter(|x| x.name != r)
                    .map(|x| x.name.clone())
                    .collect();
                for n in left_out {
                    if let Some(mut x) = self.replicas.get(&n).cloned() {
                        x.mode = ReplicaMode::ERR;
                        x.error = Some(format!("left out by a salvage that chose replica {r}"));
                        x.failed_at_unix = Some(super::now_unix());
                        self.store.put(REPLICAS, &x.name, &x).map_err(store_err)?;
                        self.replicas.insert(x.name.clone(), x);
                    }
                }
                vec![r]
            }
        };
        self.bring_back(&chosen, "salvaged by request: brought back in sync; the other replicas rejoin by rebuild from it")?;
        if let Some(mut v) = self
            .volumes
            .get(name)
            .cloned()
            .filter(|v| v.salvage_hold.is_some())
        {
            v.salvage_hold = None;
            self.save_volume(v)?;
        }
        self.salvage_blocked.remove(name);
        self.volume(name)
    }

    /// The auto-salvage step of the replica-health reconciler (see the module docs).
    pub(super) fn auto_salvage(&mut self) {
        let auto = self
            .settings
            .get(settings::AUTO_SALVAGE)
            .is_none_or(|v| v == "true");
        let faulted: Vec<VolumeRecord> = self
            .volumes
            .values()
            .filter(|v| v.created && !v.deleting)
            .filter(|v| self.start_members(&v.name).is_empty())
            .filter(|v| !self.volume_replicas(&v.name).is_empty())
            .cloned()
            .collect();
        self.salvage_blocked
            .retain(|name, _| faulted.iter().any(|v| &v.name == name));
        for v in faulted {
            if !auto {
                let msg = format!(
                    "every replica has failed and auto-salvage is off: zebu volume salvage {} brings it back from the freshest replica",
                    v.name
                );
                self.salvage_blocked.insert(v.name.clone(), msg);
                continue;
            }
            match self.salvage_choice(&v) {
                Ok(names) => {
                    if let Err(e) = self.bring_back(&names, "auto-salvage: brought back in sync as the freshest replica (by generation); the others rejoin by rebuild from it") {
                        tracing::error!(volume = %v.name, "auto-salvage not recorded, tried again: {}", e.message);
                    } else {
                        self.salvage_blocked.remove(&v.name);
                    }
                }
                Err(why) => {
                    if self.salvage_blocked.get(&v.name) != Some(&why) {
                        tracing::warn!(volume = %v.name, "auto-salvage refused: {why}");
                    }
                    self.salvage_blocked.insert(v.name.clone(), why);
                }
            }
        }
    }
}
