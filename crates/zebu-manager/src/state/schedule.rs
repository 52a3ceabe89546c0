//! Placement: which nodes may take a new replica of a volume.
//!
//! Hard anti-affinity: one replica per node, so a node holding any replica of the volume (even
//! a failed one, whose data may still be needed to salvage) is not a candidate. Among the ready
//! nodes left, those holding the fewest replicas come first (ties by name, for stable choices).

use super::State;

impl State {
    /// Ready nodes that hold no replica of `volume`, fewest replicas first.
    pub(super) fn candidate_nodes(&self, volume: &str) -> Vec<String> {
        let mut nodes: Vec<(usize, String)> = self
            .ready_nodes()
            .iter()
            .filter(|n| {
                !self
                    .replicas
                    .values()
                    .any(|r| r.volume == volume && r.node == n.name)
            })
            .map(|n| {
                let held = self.replicas.values().filter(|r| r.node == n.name).count();
                (held, n.name.clone())
            })
            .collect();
        nodes.sort();
        nodes.into_iter().map(|(_, n)| n).collect()
    }
}
