//! Placement: which nodes may take a new replica of a volume.
//!
//! Hard anti-affinity: one replica per node, so a node holding any replica of the volume (even
//! a failed one, whose data may still be needed to salvage) is not a candidate. A node whose
//! disk cannot hold a file of the volume's size (its filesystem's limit, as its agent measured
//! it) is not a candidate either. Among the ready nodes left, those holding the fewest replicas
//! come first (ties by name, for stable choices).

use super::State;

impl State {
    /// Ready nodes that hold no replica of `volume` and can hold `size_bytes` in one file,
    /// fewest replicas first.
    pub(super) fn candidate_nodes(&self, volume: &str, size_bytes: u64) -> Vec<String> {
        let mut nodes: Vec<(usize, String)> = self
            .ready_nodes()
            .iter()
            .filter(|n| {
                !self
                    .replicas
                    .values()
                    .any(|r| r.volume == volume && r.node == n.name)
            })
            .filter(|n| {
                self.max_file_bytes(&n.name)
                    .is_none_or(|max| size_bytes <= max)
            })
            .map(|n| {
                let held = self.replicas.values().filter(|r| r.node == n.name).count();
                (held, n.name.clone())
            })
            .collect();
        nodes.sort();
        nodes.into_iter().map(|(_, n)| n).collect()
    }

    /// The largest file node `node`'s disk holds, when its agent measured it.
    pub(super) fn max_file_bytes(&self, node: &str) -> Option<u64> {
        self.live
            .get(node)
            .map(|l| l.report.status.max_file_bytes)
            .filter(|m| *m > 0)
    }

    /// Why ready nodes were left out for a volume of `size_bytes`: those whose disks cannot hold
    /// it, with their limits.
    pub(super) fn too_small_for(&self, size_bytes: u64) -> Vec<String> {
        self.ready_nodes()
            .iter()
            .filter_map(|n| {
                let max = self.max_file_bytes(&n.name)?;
                (size_bytes > max).then(|| {
                    format!(
                        "{} holds files up to {max} bytes ({:.2} TiB)",
                        n.name,
                        max as f64 / (1u64 << 40) as f64
                    )
                })
            })
            .collect()
    }
}
