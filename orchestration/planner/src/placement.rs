//! Expert placement for a running cluster: which worker holds which (layer, expert), within
//! each worker's memory and balanced by measured routing load. The coordinator places real
//! shards with this; the capacity planner (`plan`) sizes clusters with the same byte counts.

use crate::counts::ModelCounts;
use ringbolt_model::ModelConfig;
use std::collections::{BTreeMap, HashMap};

/// (layer, expert).
pub type Slot = (u32, u32);

/// Bytes one expert's weights take in memory at `bytes_per_param` (the same count the capacity
/// planner uses for GPUs).
pub fn expert_bytes(cfg: &ModelConfig, bytes_per_param: u64) -> u64 {
    ModelCounts::new(cfg).expert_unit_params * bytes_per_param
}

/// Bytes one expert takes quantized to int8 (`--weights int8`): a byte per weight and an f32
/// scale per output channel of w1, w3 (I each) and w2 (H).
pub fn int8_expert_bytes(cfg: &ModelConfig) -> u64 {
    use ringbolt_kernels::format::{INT8_WEIGHT_BYTES, SCALE_BYTES};
    let channels = (2 * cfg.intermediate_size + cfg.hidden_size) as u64;
    ModelCounts::new(cfg).expert_unit_params * INT8_WEIGHT_BYTES + channels * SCALE_BYTES
}

/// An expert worker the planner may give experts to.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    /// Memory for experts (0: unlimited).
    pub capacity_bytes: u64,
    /// Bytes one expert takes in this worker's memory (0: the plan's default). A GPU holds
    /// every expert in bf16 whatever the checkpoint's type; the CPU widens f32/f16 ones.
    pub expert_bytes: u64,
}

impl Candidate {
    /// Bytes one expert takes here, `default` when the worker did not say.
    pub fn bytes_per_expert(&self, default: u64) -> u64 {
        if self.expert_bytes == 0 {
            default
        } else {
            self.expert_bytes
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the experts need {need} bytes but the expert workers offer {have} bytes \
     ({workers} workers); add expert workers or give them more --memory-bytes"
)]
pub struct Shortfall {
    pub need: u128,
    pub have: u128,
    pub workers: usize,
}

/// Places every (layer, expert) on the candidates: balanced by routing load (rows routed to
/// each expert so far; experts never measured count as one unit), within each worker's memory,
/// keeping an expert where it is while that stays near balance (fewer reloads), and replicating
/// experts that carry over twice the mean load onto another worker when memory allows. An expert
/// takes `expert_bytes` on a worker unless the worker says otherwise ([`Candidate::expert_bytes`]).
pub fn assign(
    layers: u32,
    experts: u32,
    expert_bytes: u64,
    candidates: &[Candidate],
    load: &HashMap<Slot, u64>,
    previous: &BTreeMap<String, Vec<Slot>>,
) -> Result<BTreeMap<String, Vec<Slot>>, Shortfall> {
    let slots: Vec<Slot> = (0..layers)
        .flat_map(|l| (0..experts).map(move |e| (l, e)))
        .collect();
    let cap = |c: &Candidate| {
        if c.capacity_bytes == 0 {
            u64::MAX
        } else {
            c.capacity_bytes
        }
    };
    let bytes: Vec<u64> = candidates
        .iter()
        .map(|c| c.bytes_per_expert(expert_bytes).max(1))
        .collect();
    let need = slots.len() as u128 * expert_bytes as u128;
    let have: u128 = candidates.iter().map(|c| cap(c) as u128).sum();
    // Whole experts each worker can hold, at its own bytes per expert.
    let room: u128 = candidates
        .iter()
        .zip(&bytes)
        .map(|(c, &b)| cap(c) as u128 / b as u128)
        .sum();
    if candidates.is_empty() || (slots.len() as u128) > room {
        return Err(Shortfall {
            need,
            have: if candidates.is_empty() { 0 } else { have },
            workers: candidates.len(),
        });
    }
    // Load in units where an unmeasured expert weighs one unit next to the measured ones.
    let total: u64 = load.values().sum();
    let unit = (total / slots.len().max(1) as u64).max(1);
    let weight = |s: &Slot| unit + load.get(s).copied().unwrap_or(0);
    let mut order = slots.clone();
    order.sort_by(|a, b| weight(b).cmp(&weight(a)).then(a.cmp(b)));
    let sum_w: u64 = order.iter().map(weight).sum();
    let target = sum_w as f64 / candidates.len() as f64;
    let max_w = order.first().map(weight).unwrap_or(0) as f64;

    let prev_owner: HashMap<Slot, &str> = previous
        .iter()
        .flat_map(|(id, v)| v.iter().map(move |s| (*s, id.as_str())))
        .collect();
    let mut used = vec![0u64; candidates.len()];
    let mut wsum = vec![0u64; candidates.len()];
    let mut out: BTreeMap<String, Vec<Slot>> = candidates
        .iter()
        .map(|c| (c.id.clone(), Vec::new()))
        .collect();
    for s in &order {
        let w = weight(s);
        let fits = |i: usize| used[i].saturating_add(bytes[i]) <= cap(&candidates[i]);
        let sticky = prev_owner.get(s).and_then(|o| {
            candidates
                .iter()
                .position(|c| c.id == *o)
                .filter(|&i| fits(i) && (wsum[i] + w) as f64 <= target + max_w)
        });
        let pick = sticky.or_else(|| {
            (0..candidates.len()).filter(|&i| fits(i)).min_by(|&a, &b| {
                wsum[a]
                    .cmp(&wsum[b])
                    .then(used[a].cmp(&used[b]))
                    .then(candidates[a].id.cmp(&candidates[b].id))
            })
        });
        let Some(i) = pick else {
            return Err(Shortfall {
                need,
                have,
                workers: candidates.len(),
            });
        };
        used[i] += bytes[i];
        wsum[i] += w;
        out.get_mut(&candidates[i].id)
            .map(|v| v.push(*s))
            .unwrap_or_default();
    }
    // Replicate hot experts (measured load only).
    if total > 0 && candidates.len() > 1 {
        let mean = total as f64 / slots.len() as f64;
        for s in &order {
            let l = load.get(s).copied().unwrap_or(0) as f64;
            if l <= 2.0 * mean {
                break;
            }
            let holder = candidates
                .iter()
                .position(|c| out[&c.id].contains(s))
                .unwrap_or(usize::MAX);
            let other = (0..candidates.len())
                .filter(|&i| i != holder && used[i].saturating_add(bytes[i]) <= cap(&candidates[i]))
                .min_by_key(|&i| wsum[i]);
            if let Some(i) = other {
                used[i] += bytes[i];
                wsum[i] += weight(s) / 2;
                out.get_mut(&candidates[i].id)
                    .map(|v| v.push(*s))
                    .unwrap_or_default();
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, cap: u64) -> Candidate {
        Candidate {
            id: id.into(),
            capacity_bytes: cap,
            expert_bytes: 0,
        }
    }

    #[test]
    fn each_worker_is_filled_at_its_own_bytes_per_expert() {
        // 8 experts of 4 bytes by default (an f32 checkpoint on CPUs); the GPU worker holds
        // them in bf16 (2 bytes). 20 bytes of CPU room hold 5, 6 bytes of GPU room hold 3:
        // exactly enough, although 26 bytes < 8 × 4.
        let cands = vec![
            cand("cpu", 20),
            Candidate {
                expert_bytes: 2,
                ..cand("gpu", 6)
            },
        ];
        let a = assign(1, 8, 4, &cands, &HashMap::new(), &BTreeMap::new()).unwrap();
        assert!(a["cpu"].len() <= 5 && a["gpu"].len() <= 3, "{a:?}");
        assert_eq!(a["cpu"].len() + a["gpu"].len(), 8);
        // One byte less on the GPU: 7 fit, a clear shortfall.
        let short = vec![
            cand("cpu", 20),
            Candidate {
                expert_bytes: 2,
                ..cand("gpu", 5)
            },
        ];
        let e = assign(1, 8, 4, &short, &HashMap::new(), &BTreeMap::new()).unwrap_err();
        assert_eq!(e.workers, 2);
    }

    fn count(a: &BTreeMap<String, Vec<Slot>>, id: &str) -> usize {
        a[id].len()
    }

    #[test]
    fn every_expert_is_placed_and_balanced() {
        let a = assign(
            2,
            8,
            10,
            &[cand("a", 0), cand("b", 0)],
            &HashMap::new(),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(count(&a, "a"), 8);
        assert_eq!(count(&a, "b"), 8);
        let mut all: Vec<Slot> = a.values().flatten().copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 16);
    }

    #[test]
    fn memory_limits_are_respected_and_shortfall_is_explained() {
        // a holds at most 4 experts of 10 bytes.
        let a = assign(
            1,
            8,
            10,
            &[cand("a", 40), cand("b", 0)],
            &HashMap::new(),
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(count(&a, "a") <= 4);
        assert_eq!(count(&a, "a") + count(&a, "b"), 8);
        let e = assign(
            1,
            8,
            10,
            &[cand("a", 40), cand("b", 30)],
            &HashMap::new(),
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(e.need, 80);
        assert_eq!(e.have, 70);
        assert!(e.to_string().contains("--memory-bytes"));
        assert!(assign(1, 8, 10, &[], &HashMap::new(), &BTreeMap::new()).is_err());
    }

    #[test]
    fn scale_out_moves_only_part_and_drain_moves_everything() {
        let one = assign(1, 8, 10, &[cand("a", 0)], &HashMap::new(), &BTreeMap::new()).unwrap();
        assert_eq!(count(&one, "a"), 8);
        let two = assign(
            1,
            8,
            10,
            &[cand("a", 0), cand("b", 0)],
            &HashMap::new(),
            &one,
        )
        .unwrap();
        assert!(count(&two, "b") >= 3, "{two:?}");
        assert!(count(&two, "a") >= 3, "{two:?}");
        // Whatever a keeps, it held before.
        assert!(two["a"].iter().all(|s| one["a"].contains(s)));
        let drained = assign(1, 8, 10, &[cand("b", 0)], &HashMap::new(), &two).unwrap();
        assert_eq!(count(&drained, "b"), 8);
    }

    #[test]
    fn measured_load_balances_and_hot_experts_are_replicated() {
        let mut load = HashMap::new();
        load.insert((0, 0), 1000);
        for e in 1..8 {
            load.insert((0, e), 10);
        }
        let a = assign(
            1,
            8,
            10,
            &[cand("a", 0), cand("b", 0)],
            &load,
            &BTreeMap::new(),
        )
        .unwrap();
        // The hot expert is on both workers.
        assert!(
            a["a"].contains(&(0, 0)) && a["b"].contains(&(0, 0)),
            "{a:?}"
        );
        // The cold ones go mostly to the worker without the hot one's first copy.
        assert_eq!(count(&a, "a") + count(&a, "b"), 9);
    }
}
