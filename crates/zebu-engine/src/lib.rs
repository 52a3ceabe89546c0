//! Zebu engine: the replication controller of one attached volume ([`engine`]), its pipelined
//! data-protocol client ([`client`]), and the NBD frontend that exposes engines to users
//! ([`nbd`]).

pub mod backend;
pub mod busy_poll;
pub mod client;
pub mod engine;
pub mod nbd;
pub mod payload;
pub mod pipe;
pub mod range_lock;
pub mod sender;
pub mod tls;

pub use backend::LocalReplica;
pub use engine::snapshots as engine_snapshots;
pub use engine::{
    CloneProgress, CloneSource, Engine, EngineConfig, EngineError, Lanes, MemberStatus,
    MembershipRecord, Mode, RebuildDone, RebuildProgress, RecordError, ReplicaTarget, Retired,
    ScrubReport, SnapshotRefusal, Survivors,
};
pub use nbd::NbdServer;
