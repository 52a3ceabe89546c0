//! Cluster-wide settings, with Longhorn's names and units. Each has a default; only values a
//! person set are stored (table `settings`, key = name, value = `{name, value}`), so a default
//! changed in a later release reaches every cluster that never overrode it.
//!
//! Values are validated on `set` (and again when the manager loads them: a stored value this
//! build refuses falls back to the default, with a warning, rather than stopping the manager).

use zebu_api::Setting;

use crate::error::ApiError;

/// What kind of value a setting takes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A whole number in `min..=max`.
    Int {
        min: u64,
        max: u64,
    },
    Bool,
}

pub struct Def {
    pub name: &'static str,
    default: &'static str,
    kind: Kind,
    description: &'static str,
}

pub const REPLICA_REPLENISHMENT_WAIT_INTERVAL: &str = "replica-replenishment-wait-interval";
pub const STALE_REPLICA_TIMEOUT: &str = "stale-replica-timeout";
pub const CONCURRENT_REPLICA_REBUILD_PER_NODE_LIMIT: &str =
    "concurrent-replica-rebuild-per-node-limit";
pub const REPLICA_REBUILD_BANDWIDTH_LIMIT: &str = "replica-rebuild-bandwidth-limit";
pub const AUTO_SALVAGE: &str = "auto-salvage";
pub const DEFAULT_REPLICA_COUNT: &str = "default-replica-count";

pub const DEFS: &[Def] = &[
    Def {
        name: REPLICA_REPLENISHMENT_WAIT_INTERVAL,
        default: "600",
        kind: Kind::Int { min: 0, max: 86_400 },
        description: "Seconds to wait for a failed replica's node to come back (so the replica rejoins by copying only what changed) before a new replica is built on another node.",
    },
    Def {
        name: STALE_REPLICA_TIMEOUT,
        default: "2880",
        kind: Kind::Int { min: 1, max: 525_600 },
        description: "Minutes after which a failed replica is no longer a candidate to rejoin and is replaced and cleaned up.",
    },
    Def {
        name: CONCURRENT_REPLICA_REBUILD_PER_NODE_LIMIT,
        default: "5",
        kind: Kind::Int { min: 0, max: 100 },
        description: "How many replicas one node rebuilds at once (as source or target); 0 stops new rebuilds.",
    },
    Def {
        name: REPLICA_REBUILD_BANDWIDTH_LIMIT,
        default: "0",
        kind: Kind::Int { min: 0, max: 100_000 },
        description: "MiB/s one rebuild may copy; 0 is unlimited.",
    },
    Def {
        name: AUTO_SALVAGE,
        default: "true",
        kind: Kind::Bool,
        description: "When every replica of a volume has failed, bring it back from the freshest replica (chosen by recorded evidence) without a person.",
    },
    Def {
        name: DEFAULT_REPLICA_COUNT,
        default: "3",
        kind: Kind::Int { min: 1, max: 20 },
        description: "Replicas of a new volume when the request names no count.",
    },
];

pub fn def(name: &str) -> Result<&'static Def, ApiError> {
    DEFS.iter().find(|d| d.name == name).ok_or_else(|| {
        let names: Vec<&str> = DEFS.iter().map(|d| d.name).collect();
        ApiError::not_found(format!(
            "setting {name:?} does not exist; the settings are: {} (see zebu setting list)",
            names.join(", ")
        ))
    })
}

impl Def {
    /// The canonical form of `value`, or why it is refused.
    pub fn parse(&self, value: &str) -> Result<String, ApiError> {
        let v = value.trim();
        match self.kind {
            Kind::Int { min, max } => match v.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n.to_string()),
                _ => Err(ApiError::bad_request(format!(
                    "setting {}: {value:?} is not valid: give a whole number from {min} to {max}; nothing was changed",
                    self.name
                ))),
            },
            Kind::Bool => match v {
                "true" => Ok("true".into()),
                "false" => Ok("false".into()),
                _ => Err(ApiError::bad_request(format!(
                    "setting {}: {value:?} is not valid: give true or false; nothing was changed",
                    self.name
                ))),
            },
        }
    }

    pub fn view(&self, stored: Option<&str>) -> Setting {
        Setting {
            name: self.name.into(),
            value: stored.unwrap_or(self.default).into(),
            default: self.default.into(),
            description: self.description.into(),
        }
    }

    pub fn default_value(&self) -> &'static str {
        self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_is_valid_and_canonical() {
        for d in DEFS {
            assert_eq!(d.parse(d.default).unwrap(), d.default, "{}", d.name);
        }
    }

    #[test]
    fn bad_values_are_refused_with_the_range() {
        let d = def(REPLICA_REPLENISHMENT_WAIT_INTERVAL).unwrap();
        for bad in ["", "-1", "86401", "1.5", "ten", "0x10"] {
            let e = d.parse(bad).unwrap_err();
            assert!(
                e.message.contains("from 0 to 86400"),
                "{bad}: {}",
                e.message
            );
        }
        assert_eq!(d.parse(" 30 ").unwrap(), "30");
        let b = def(AUTO_SALVAGE).unwrap();
        assert!(b.parse("yes").is_err());
        assert_eq!(b.parse("false").unwrap(), "false");
        assert!(def("no-such-setting")
            .err()
            .unwrap()
            .message
            .contains("auto-salvage"));
    }
}
