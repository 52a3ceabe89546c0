use std::path::{Path, PathBuf};

use thiserror::Error;
use zebu_proto::data::Status;

/// Errors of the replica storage layer. Each names the replica or file and the offset.
#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error("{op} on {path} at offset {offset} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("replica {replica}: checksum mismatch in the block at offset {offset} (layer {layer:016x}); the stored data is corrupt")]
    Checksum {
        replica: String,
        offset: u64,
        layer: u64,
    },
    #[error(
        "replica {replica}: range {offset}+{length} is outside the volume of {size_bytes} bytes"
    )]
    OutOfRange {
        replica: String,
        offset: u64,
        length: u64,
        size_bytes: u64,
    },
    #[error("replica {replica}: {reason}")]
    Invalid { replica: String, reason: String },
    #[error("replica {replica}: write payload at offset {offset} failed its checksum in transit")]
    TransitChecksum { replica: String, offset: u64 },
    #[error(
        "replica {replica} refuses I/O after an earlier failure ({reason}); it must be rebuilt"
    )]
    Poisoned { replica: String, reason: String },
    #[error("replica {replica} is at generation {generation}, past this engine's {session}: another engine has taken the volume over")]
    Stale {
        replica: String,
        session: u64,
        generation: u64,
    },
    #[error("replica {replica} has accepted engine epoch {epoch}, newer than this engine's {session_epoch}: a newer engine owns the volume")]
    Fenced {
        replica: String,
        session_epoch: u64,
        epoch: u64,
    },
    #[error("replica metadata {path} is unusable: {reason}")]
    BadMeta { path: PathBuf, reason: String },
    #[error("replica index {path} is damaged at block {block}: {reason}")]
    BadIndex {
        path: PathBuf,
        block: u64,
        reason: String,
    },
    #[error("replica {replica}: no space left on the disk of {path} for {length} bytes at offset {offset}; nothing was written (free space on that disk)")]
    NoSpace {
        replica: String,
        path: PathBuf,
        offset: u64,
        length: u64,
    },
    #[error("replica directory {path} already holds a replica")]
    AlreadyExists { path: PathBuf },
    #[error("replica {replica} already has a snapshot named {name:?}; choose another name")]
    SnapshotExists { replica: String, name: String },
    #[error("replica {replica} has no snapshot named {name:?}")]
    NoSnapshot { replica: String, name: String },
}

impl ReplicaError {
    pub fn io(op: &'static str, path: &Path, offset: u64, source: std::io::Error) -> ReplicaError {
        ReplicaError::Io {
            op,
            path: path.to_owned(),
            offset,
            source,
        }
    }

    /// The data-protocol status this error is reported with.
    pub fn status(&self) -> Status {
        match self {
            // Refused before anything changed; an ENOSPC anywhere else is an I/O error (it
            // poisoned the replica: what it left on disk is unknown).
            ReplicaError::NoSpace { .. } => Status::NoSpace,
            ReplicaError::Io { .. }
            | ReplicaError::BadMeta { .. }
            | ReplicaError::BadIndex { .. } => Status::IoError,
            ReplicaError::Checksum { .. } => Status::Checksum,
            ReplicaError::OutOfRange { .. }
            | ReplicaError::Invalid { .. }
            | ReplicaError::AlreadyExists { .. }
            | ReplicaError::SnapshotExists { .. }
            | ReplicaError::NoSnapshot { .. } => Status::Invalid,
            ReplicaError::Poisoned { .. } => Status::Poisoned,
            ReplicaError::TransitChecksum { .. } => Status::PayloadChecksum,
            ReplicaError::Stale { .. } | ReplicaError::Fenced { .. } => Status::Stale,
        }
    }

    /// The full message including the source chain, for the wire and the logs.
    pub fn full_message(&self) -> String {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    }
}
