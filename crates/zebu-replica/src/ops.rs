//! The operations of the data protocol, run against a replica. Shared by the network server and
//! by engines that reach a replica in their own process.

use zebu_proto::data::{self, Op, ReplicaInfo, Status, FLAG_FUA};

use crate::{Replica, ReplicaError};

/// Run one operation; returns the reply payload. Blocking: call it on an I/O thread.
pub fn execute(
    replica: &Replica,
    op: Op,
    flags: u8,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> Result<Vec<u8>, ReplicaError> {
    let fua = flags & FLAG_FUA != 0;
    let res = match op {
        Op::Read => {
            let mut buf = vec![0u8; length as usize];
            replica.read(offset, &mut buf).map(|()| buf)
        }
        Op::Write => replica.write(offset, payload, fua).map(|()| Vec::new()),
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
        Op::SetGeneration => replica.set_generation(offset).map(|()| Vec::new()),
        Op::Map => replica
            .map(offset, length as u64)
            .map(|m| data::encode_map(&m)),
    };
    if let Err(e) = &res {
        if e.status() != Status::Invalid {
            tracing::warn!("{}", e.full_message());
        }
    }
    res
}
