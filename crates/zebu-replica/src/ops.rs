//! The operations of the data protocol, run against a replica. Shared by the network server and
//! by engines that reach a replica in their own process.

use zebu_proto::data::{
    self, Op, ReplicaInfo, Status, FLAG_ADOPT_TORN, FLAG_FUA, FLAG_WIL_ALL, FLAG_WIL_CHANGED,
    FLAG_WIL_REJOIN, WIL_CHANGED, WIL_CLEAN,
};

use zebu_proto::snapshot::{
    LayerRecord, LayersReply, MergeRecord, SnapshotRequest, LAYER_HEAD, LAYER_REMOVED, LAYER_SYSTEM,
};

use crate::store::{Session, SnapshotSpec};
use crate::{Replica, ReplicaError};

/// Largest request a connection's own thread runs itself. Larger transfers go to the I/O pool,
/// where several overlap (a 1 MiB copy takes long enough to be worth a second core).
pub const QUICK_MAX_BYTES: u32 = 64 * 1024;

/// Requests quick enough for a connection's own thread: they touch only the page cache (and
/// the in-memory index) and never wait for the disk, as long as the kernel is not throttling
/// dirty pages. Reads are quick only when cached: see [`read_cached`].
pub fn is_quick(op: Op, flags: u8, length: u32) -> bool {
    match op {
        Op::Write | Op::Trim | Op::WriteZeroes => {
            flags & FLAG_FUA == 0 && length <= QUICK_MAX_BYTES
        }
        Op::Ping | Op::Info => true,
        _ => false,
    }
}

/// Read from the page cache only, right on the caller's thread: `Ok(None)` when the data is not
/// all cached (then run [`execute`] on an I/O thread).
pub fn read_cached(
    replica: &Replica,
    session: &Session,
    offset: u64,
    length: u32,
) -> Result<Option<Vec<u8>>, ReplicaError> {
    replica.fenced(session, || {
        let mut buf = vec![0u8; length as usize];
        Ok(replica.read_cached(offset, &mut buf)?.then_some(buf))
    })
}

/// Run one operation for `session`; returns the reply payload. Blocking: call it on an I/O
/// thread. Everything but PING and INFO is refused once the session is stale (fencing).
/// `payload_crc` is the CRC32C a WRITE's payload carried over the network, checked before
/// anything is written (None when the payload never left this process).
#[allow(clippy::too_many_arguments)]
pub fn execute(
    replica: &Replica,
    session: &Session,
    op: Op,
    flags: u8,
    offset: u64,
    length: u32,
    payload: &[u8],
    payload_crc: Option<u32>,
) -> Result<Vec<u8>, ReplicaError> {
    let run = |op| run(replica, op, flags, offset, length, payload, payload_crc);
    if session.is_reader() {
        // Frozen content only: what it reads never changes, so it needs no fence.
        let head_delta = op == Op::SnapshotDelta
            && zebu_proto::snapshot::decode_snapshot_delta(payload)
                .is_ok_and(|(_, name, _)| name.is_empty());
        return match op {
            Op::Ping | Op::Info | Op::Layers | Op::ReadSnapshot | Op::SnapshotDelta
                if !head_delta =>
            {
                run(op)
            }
            _ => Err(ReplicaError::Invalid {
                replica: replica.name().to_owned(),
                reason: format!(
                    "{op:?} is refused on a reader session: it reads frozen snapshots only"
                ),
            }),
        };
    }
    let res = match op {
        Op::Ping | Op::Info => run(op),
        Op::SetGeneration => replica
            .set_generation_for(session, offset)
            .map(|()| Vec::new()),
        // They run alone on the replica: they take the fence themselves.
        Op::Snapshot => checked_payload(replica, offset, payload, payload_crc)
            .and_then(|p| {
                let r = SnapshotRequest::decode(p).map_err(|e| ReplicaError::Invalid {
                    replica: replica.name().to_owned(),
                    reason: format!("bad snapshot request: {e}"),
                })?;
                replica.snapshot_for(
                    session,
                    &SnapshotSpec {
                        name: r.name,
                        system: r.system,
                        labels: r.labels,
                        created_unix: r.created_unix,
                    },
                )
            })
            .map(|()| Vec::new()),
        Op::Revert => checked_payload(replica, offset, payload, payload_crc)
            .and_then(|p| name_payload(replica, p))
            .and_then(|name| replica.revert_for(session, &name))
            .map(|()| Vec::new()),
        Op::Rewind => checked_payload(replica, offset, payload, payload_crc)
            .and_then(|p| {
                let base = std::str::from_utf8(p).map_err(|_| ReplicaError::Invalid {
                    replica: replica.name().to_owned(),
                    reason: "the snapshot name is not UTF-8".into(),
                })?;
                replica.rewind_for(session, (!base.is_empty()).then_some(base), offset)
            })
            .map(|()| Vec::new()),
        Op::Resize => replica.resize_for(session, offset).map(|()| Vec::new()),
        _ => replica.fenced(session, || run(op)),
    };
    if let Err(e) = &res {
        if !matches!(e.status(), Status::Invalid | Status::Stale) {
            tracing::warn!("{}", e.full_message());
        }
    }
    res
}

/// The payload, once it matches the checksum it crossed the network with.
fn checked_payload<'a>(
    replica: &Replica,
    offset: u64,
    payload: &'a [u8],
    payload_crc: Option<u32>,
) -> Result<&'a [u8], ReplicaError> {
    if payload_crc.is_some_and(|c| c != crc32c::crc32c(payload)) {
        return Err(ReplicaError::TransitChecksum {
            replica: replica.name().to_owned(),
            offset,
        });
    }
    Ok(payload)
}

fn name_payload(replica: &Replica, payload: &[u8]) -> Result<String, ReplicaError> {
    std::str::from_utf8(payload)
        .map(str::to_owned)
        .map_err(|_| ReplicaError::Invalid {
            replica: replica.name().to_owned(),
            reason: "the snapshot name is not UTF-8".into(),
        })
}

/// The LAYERS reply of a replica.
pub fn layers_reply(replica: &Replica) -> LayersReply {
    LayersReply {
        layers: replica
            .layers()
            .into_iter()
            .map(|l| LayerRecord {
                id: l.id,
                parent: l.parent,
                created_unix: l.created_unix,
                size_bytes: l.size_bytes,
                flags: [
                    (l.head, LAYER_HEAD),
                    (l.system, LAYER_SYSTEM),
                    (l.removed, LAYER_REMOVED),
                ]
                .iter()
                .filter(|(on, _)| *on)
                .fold(0, |f, (_, bit)| f | bit),
                name: l.name,
                labels: l.labels,
            })
            .collect(),
        merge: replica.merge_progress().map(|m| MergeRecord {
            snapshot: m.snapshot,
            into: m.into,
            bytes_done: m.bytes_done,
            bytes_total: m.bytes_total,
        }),
    }
}

fn run(
    replica: &Replica,
    op: Op,
    flags: u8,
    offset: u64,
    length: u32,
    payload: &[u8],
    payload_crc: Option<u32>,
) -> Result<Vec<u8>, ReplicaError> {
    let fua = flags & FLAG_FUA != 0;
    match op {
        Op::Read if flags & FLAG_ADOPT_TORN != 0 => {
            let mut buf = vec![0u8; length as usize];
            replica.read_adopting(offset, &mut buf).map(|_| buf)
        }
        Op::Read => {
            let mut buf = vec![0u8; length as usize];
            replica.read(offset, &mut buf).map(|()| buf)
        }
        Op::WilMark | Op::WilSettle => {
            if payload_crc.is_some_and(|c| c != crc32c::crc32c(payload)) {
                return Err(ReplicaError::TransitChecksum {
                    replica: replica.name().to_owned(),
                    offset,
                });
            }
            let extents = data::decode_extents(payload).map_err(|e| ReplicaError::Invalid {
                replica: replica.name().to_owned(),
                reason: format!("bad write-intent log extent list: {e}"),
            })?;
            if op == Op::WilMark {
                replica.wil_mark(&extents)
            } else if flags & FLAG_WIL_REJOIN != 0 {
                replica.wil_rejoin(offset)
            } else {
                let state = if flags & FLAG_WIL_CHANGED != 0 {
                    WIL_CHANGED
                } else {
                    WIL_CLEAN
                };
                replica.wil_settle(&extents, flags & FLAG_WIL_ALL != 0, state, offset)
            }
            .map(|()| Vec::new())
        }
        Op::WilRead => replica.wil_read(offset, length as u64),
        Op::WilRebuild => {
            if payload_crc.is_some_and(|c| c != crc32c::crc32c(payload)) {
                return Err(ReplicaError::TransitChecksum {
                    replica: replica.name().to_owned(),
                    offset,
                });
            }
            let copied_to: [u8; 8] = payload.try_into().map_err(|_| ReplicaError::Invalid {
                replica: replica.name().to_owned(),
                reason: format!(
                    "a rebuild record takes 8 bytes of payload, not {}",
                    payload.len()
                ),
            })?;
            replica
                .wil_record_rebuild(crate::wil::Rebuild {
                    base: offset,
                    copied_to: u64::from_le_bytes(copied_to),
                })
                .map(|()| Vec::new())
        }
        Op::Write => replica
            .write_checked(offset, payload, fua, payload_crc)
            .map(|()| Vec::new()),
        Op::Flush => replica.flush().map(|()| Vec::new()),
        Op::Trim | Op::WriteZeroes => replica
            .zero(offset, length as u64, fua)
            .map(|()| Vec::new()),
        Op::Ping => Ok(Vec::new()),
        Op::Info => {
            let f = replica.facts();
            Ok(ReplicaInfo {
                size_bytes: f.size_bytes,
                block_size: f.block_size,
                generation: f.generation,
                allocated_bytes: f.allocated_bytes,
            }
            .encode()
            .to_vec())
        }
        // Reached only without a session (never): sessions go through `set_generation_for`.
        Op::SetGeneration => replica.set_generation(offset).map(|()| Vec::new()),
        Op::Map => replica
            .map(offset, length as u64)
            .map(|m| data::encode_map(&m)),
        Op::SnapshotRemove => checked_payload(replica, offset, payload, payload_crc)
            .and_then(|p| name_payload(replica, p))
            .and_then(|name| replica.remove_snapshot(&name))
            .map(|()| Vec::new()),
        Op::Layers => Ok(layers_reply(replica).encode()),
        Op::ReadSnapshot => {
            let p = checked_payload(replica, offset, payload, payload_crc)?;
            let (length, name) = zebu_proto::snapshot::decode_read_snapshot(p).map_err(|e| {
                ReplicaError::Invalid {
                    replica: replica.name().to_owned(),
                    reason: format!("bad snapshot read: {e}"),
                }
            })?;
            let mut buf = vec![0u8; length as usize];
            replica
                .snapshot_view_cached(&name)?
                .read(offset, &mut buf)?;
            Ok(buf)
        }
        Op::SnapshotDelta => {
            let p = checked_payload(replica, offset, payload, payload_crc)?;
            let (length, name, base) =
                zebu_proto::snapshot::decode_snapshot_delta(p).map_err(|e| {
                    ReplicaError::Invalid {
                        replica: replica.name().to_owned(),
                        reason: format!("bad snapshot delta request: {e}"),
                    }
                })?;
            match (name.is_empty(), base) {
                (true, Some(base)) => replica.head_delta(&base, offset, u64::from(length)),
                (true, None) => Err(ReplicaError::Invalid {
                    replica: replica.name().to_owned(),
                    reason: "a delta of the head names its base snapshot".into(),
                }),
                (false, base) => {
                    replica.snapshot_delta(&name, base.as_deref(), offset, u64::from(length))
                }
            }
            .map(|m| data::encode_map(&m))
        }
        // Reached only without a session (never): sessions go through `execute`'s own arms.
        Op::Snapshot | Op::Revert | Op::Rewind | Op::Resize => Err(ReplicaError::Invalid {
            replica: replica.name().to_owned(),
            reason: format!("{op:?} needs a session"),
        }),
        // They change which session a connection belongs to: the data server answers them.
        Op::ShareSession | Op::JoinSession => Err(ReplicaError::Invalid {
            replica: replica.name().to_owned(),
            reason: format!("{op:?} is only answered over a data connection"),
        }),
    }
}
