//! The placement plan: which expert workers hold which (layer, expert), stamped with an epoch
//! that grows by one with every change. Kept in etcd at `/{cluster}/plan`.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPlace {
    /// Control (gRPC) address.
    pub address: String,
    /// Data-plane address the experts are served on.
    pub data_address: String,
    /// Experts this worker holds in this epoch.
    pub experts: Vec<Slot>,
    /// The device it computes on (`cpu`, `cuda:N`; empty: cpu): requests to a GPU worker
    /// carry bf16 rows.
    #[serde(default)]
    pub device: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub epoch: u64,
    /// Expert workers by member id.
    pub workers: BTreeMap<String, WorkerPlace>,
    /// The GPU workers' NCCL group of this epoch (absent when fewer than two workers are on
    /// GPUs, or the coordinator cannot make NCCL ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_group: Option<DataGroup>,
}

/// One plan epoch's NCCL data group: every attention and expert worker on a GPU, in rank order,
/// and the unique id the coordinator made for this epoch. Each member builds a communicator
/// from it when it sees the epoch, and drops the previous epoch's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataGroup {
    /// `ncclUniqueId`, 128 bytes as hex.
    pub nccl_id: String,
    /// Member ids; a member's rank is its index.
    pub ranks: Vec<String>,
}

impl DataGroup {
    pub fn rank_of(&self, member: &str) -> Option<usize> {
        self.ranks.iter().position(|m| m == member)
    }
}

impl Plan {
    /// Holders of each slot (replicas in worker-id order).
    pub fn holders(&self) -> HashMap<Slot, Vec<&str>> {
        let mut m: HashMap<Slot, Vec<&str>> = HashMap::new();
        for (id, w) in &self.workers {
            for &s in &w.experts {
                m.entry(s).or_default().push(id.as_str());
            }
        }
        m
    }

    /// Whether every one of `layers × experts` slots has a holder.
    pub fn complete(&self, layers: u32, experts: u32) -> bool {
        let h = self.holders();
        (0..layers).all(|l| (0..experts).all(|e| h.contains_key(&(l, e))))
    }

    pub fn assignment(&self) -> BTreeMap<String, Vec<Slot>> {
        self.workers
            .iter()
            .map(|(id, w)| (id.clone(), w.experts.clone()))
            .collect()
    }
}

pub use ringbolt_planner::placement::{Candidate, Shortfall, Slot, assign};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_knows_holders_and_completeness() {
        let mut p = Plan {
            epoch: 3,
            ..Default::default()
        };
        p.workers.insert(
            "a".into(),
            WorkerPlace {
                address: "x".into(),
                data_address: "y".into(),
                experts: vec![(0, 0), (0, 1)],
                device: String::new(),
            },
        );
        assert!(p.complete(1, 2));
        assert!(!p.complete(2, 2));
        assert_eq!(p.holders()[&(0, 1)], vec!["a"]);
    }
}
