//! Online expansion: the manager's record of a volume's size is the size it should have
//! (`docs/snapshots.md`, "Online expansion"). It is raised here, durably, before any replica
//! grows, so a replica is never larger than the record: an agent opens a replica smaller than
//! the record (one that missed the growth) and its engine grows it, but refuses a larger one.

use zebu_api::Volume;

use super::{State, MAX_VOLUME_BYTES};
use crate::error::ApiError;

impl State {
    /// Record `size_bytes` as volume `name`'s size (see the module docs). The same size again
    /// changes nothing; a smaller one, an unaligned one, one past the limit or one a replica's
    /// disk cannot hold in one file is refused, and nothing changes.
    pub fn expand_volume(&mut self, name: &str, size_bytes: u64) -> Result<Volume, ApiError> {
        let mut v = self.live_volume(name)?;
        if size_bytes == v.size_bytes {
            return self.volume(name);
        }
        self.refuse_while_cloning(&v, "expand it")?;
        if size_bytes < v.size_bytes {
            return Err(ApiError::bad_request(format!(
                "volume {name} has {} bytes; shrinking it to {size_bytes} is refused (it would drop the data past the new end, and a filesystem on it would break). Give a size above {}",
                v.size_bytes, v.size_bytes
            )));
        }
        if !size_bytes.is_multiple_of(u64::from(v.block_size.max(1))) {
            return Err(ApiError::bad_request(format!(
                "size {size_bytes} bytes is not a multiple of volume {name}'s {}-byte block size",
                v.block_size
            )));
        }
        if size_bytes > MAX_VOLUME_BYTES {
            return Err(ApiError::bad_request(format!(
                "size {size_bytes} bytes is over the 64 TiB limit"
            )));
        }
        // Every replica's disk must be known to hold the new size: a growth a disk refuses
        // leaves the volume waiting at its old size, as the record cannot go down again.
        let small: Vec<String> = self
            .volume_replicas(name)
            .iter()
            .filter_map(|r| match self.max_file_bytes(&r.node) {
                Some(max) if size_bytes <= max => None,
                Some(max) => Some(format!(
                    "replica {} is on node {}, whose disk holds files up to {max} bytes",
                    r.name, r.node
                )),
                None => Some(format!(
                    "replica {} is on node {}, which has not reported how large a file its disk holds (is it up?); try again once it is, or remove the replica",
                    r.name, r.node
                )),
            })
            .collect();
        if !small.is_empty() {
            return Err(ApiError::bad_request(format!(
                "volume {name} cannot grow to {size_bytes} bytes: {}; choose a smaller size",
                small.join("; ")
            )));
        }
        let from = v.size_bytes;
        v.size_bytes = size_bytes;
        self.save_volume(v)?;
        tracing::info!(
            volume = name,
            "volume expanding from {from} to {size_bytes} bytes"
        );
        self.volume(name)
    }
}
