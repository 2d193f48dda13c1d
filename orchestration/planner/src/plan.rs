//! The planner: placement, memory per GPU, traffic per layer, and a roofline estimate of
//! prefill time and decode speed.
//!
//! Layout it plans (design.md §4): every node is one attention worker (tensor-parallel over the
//! node's GPUs); a job's context is split among the fewest of them whose per-rank share fits
//! (the context-parallel degree P, at most the number of nodes); the (layer, expert) units are
//! spread over every GPU (an expert worker per GPU), with replicas of units where memory is
//! spare.

use crate::counts::{ModelCounts, kv_bytes_per_token, lightning_state_bytes, prefill_flops};
use crate::profiles::GpuProfile;
use ringbolt_model::ModelConfig;
use serde::Serialize;

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Everything in bf16.
    Bf16,
    /// Experts in int8 (per-channel scales), everything else bf16; computed as W8A16.
    Int8,
}

#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub model: ModelConfig,
    pub gpu: GpuProfile,
    pub nodes: u64,
    pub gpus_per_node: u64,
    pub weights: WeightFormat,
    pub context: u64,
    /// Prompt tokens per attention worker per prefill step (bounds activations).
    pub prefill_chunk: u64,
}

/// Fractions of peak a well-tuned kernel reaches (the roofline's derating). Assumptions,
/// stated so they can be measured and replaced: large bf16 GEMMs on Hopper reach ~65–75% of
/// dense peak; FlashAttention-style causal attention at long context ~45–55%; lightning
/// attention's block algorithm (many 256×128 GEMMs) ~40%. Links reach ~80% of their rate.
pub const GEMM_EFFICIENCY: f64 = 0.65;
pub const ATTENTION_EFFICIENCY: f64 = 0.45;
pub const LIGHTNING_EFFICIENCY: f64 = 0.40;
pub const LINK_EFFICIENCY: f64 = 0.80;
/// Memory a GPU keeps for the CUDA context, NCCL, allocator fragmentation.
pub const RESERVED_FRACTION: f64 = 0.08;
/// Micro-batches per layer in the expert all-to-all pipeline (design.md §4.3), as a deployment
/// would tune it; the engine's pipelined forward runs `ringbolt_model::PIPELINE_PARTS` (2) today.
pub const MICRO_BATCHES: f64 = 4.0;
/// Per-message latency of a cross-GPU hop in decode (NCCL send/recv, small messages).
pub const HOP_LATENCY_S: f64 = 20e-6;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerGpuMemory {
    pub attention_weights: u64,
    pub expert_weights: u64,
    pub kv_cache: u64,
    pub lightning_states: u64,
    pub activations: u64,
    pub transfer_buffers: u64,
    pub total: u64,
    pub capacity: u64,
    pub usable: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerLayerTraffic {
    /// Expert dispatch + combine of a full prefill, one MoE layer, whole cluster.
    pub expert_all_to_all_bytes: u64,
    /// Lightning state handed along the ring of attention workers, one lightning layer.
    pub lightning_state_exchange_bytes: u64,
    /// K/V blocks moved by ring attention, one softmax layer, whole cluster.
    pub ring_kv_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefillBreakdown {
    pub matmul_seconds: f64,
    pub lightning_seconds: f64,
    pub softmax_attention_seconds: f64,
    pub tensor_parallel_allreduce_seconds: f64,
    /// Expert all-to-all time not hidden behind compute.
    pub exposed_all_to_all_seconds: f64,
    pub exposed_ring_kv_seconds: f64,
    pub lightning_exchange_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub fits: bool,
    /// What is short, and by how much, when it does not fit.
    pub shortfall: Vec<String>,
    pub gpu: String,
    pub nodes: u64,
    pub gpus: u64,
    pub weights: WeightFormat,
    pub context: u64,
    pub attention_workers: u64,
    pub context_parallel: u64,
    pub attention_tensor_parallel: u64,
    pub expert_units: u64,
    pub expert_units_per_gpu: u64,
    pub expert_replicas: u64,
    pub per_gpu: PerGpuMemory,
    pub per_layer: PerLayerTraffic,
    pub prefill_seconds: f64,
    pub prefill: PrefillBreakdown,
    pub decode_tokens_per_second: f64,
    pub total_params: u64,
    pub active_params: u64,
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

/// The context-parallel degree for a `tokens`-token context: the smallest P in 1..=`max` for
/// which `fits(tokens per rank, P)`; `max` when none does. The one rule for `ringbolt plan`
/// and for the coordinator's choice.
pub fn smallest_degree(tokens: u64, max: u64, fits: impl Fn(u64, u64) -> bool) -> u64 {
    let max = max.max(1);
    (1..=max)
        .find(|&p| fits(ceil_div(tokens, p), p))
        .unwrap_or(max)
}

/// What one job's context costs an attention worker: softmax keys and values per token, and
/// the lightning states (one per lightning layer, whatever the length).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextCost {
    pub kv_bytes_per_token: u64,
    pub state_bytes: u64,
}

impl ContextCost {
    /// For a cache kept in `bytes_per_value`-byte values (4 on the CPU, 2 in bf16).
    pub fn of(c: &ModelConfig, bytes_per_value: u64) -> Self {
        ContextCost {
            kv_bytes_per_token: kv_bytes_per_token(c, bytes_per_value),
            state_bytes: lightning_state_bytes(c),
        }
    }

    /// Bytes one rank holds of a `tokens`-token context split `p` ways.
    pub fn per_rank(&self, tokens: u64, p: u64) -> u64 {
        ceil_div(tokens, p) * self.kv_bytes_per_token + self.state_bytes
    }
}

/// The degree for a `tokens`-token job on `workers` attention workers each offering
/// `capacity` bytes for a context.
pub fn context_degree(cost: &ContextCost, tokens: u64, capacity: u64, workers: usize) -> usize {
    smallest_degree(tokens, workers as u64, |_, p| {
        cost.per_rank(tokens, p) <= capacity
    }) as usize
}

/// The plan with the smallest context-parallel degree that fits (see [`smallest_degree`]).
pub fn plan(r: &PlanRequest) -> Plan {
    let nodes = r.nodes.max(1);
    let p = smallest_degree(r.context, nodes, |_, p| plan_with_degree(r, p).fits);
    plan_with_degree(r, p)
}

/// The plan with the context split among `p` of the nodes' attention workers.
pub fn plan_with_degree(r: &PlanRequest, p: u64) -> Plan {
    let c = &r.model;
    let counts = ModelCounts::new(c);
    let g = &r.gpu;
    let nodes = r.nodes.max(1);
    let tp = r.gpus_per_node.max(1);
    let gpus = nodes * tp;
    let h = c.hidden_size as u64;
    let k = c.experts_per_tok as u64;
    let n = r.context;

    // Weights.
    let bf16 = 2u64;
    let expert_unit_bytes = match r.weights {
        WeightFormat::Bf16 => counts.expert_unit_params * bf16,
        // What an expert worker with `--weights int8` holds.
        WeightFormat::Int8 => crate::placement::int8_expert_bytes(c),
    };
    let attention_bytes = (counts.attention_params
        + counts.embedding_params
        + counts.router_params
        + counts.norm_params)
        * bf16;
    let attention_weights = ceil_div(attention_bytes, tp);
    let base_units = ceil_div(counts.expert_units, gpus);

    // Context state.
    let segment = ceil_div(n, p);
    let kv_cache = ceil_div(segment * kv_bytes_per_token(c, bf16), tp);
    // The worker's own state plus the one in flight on the ring.
    let lightning_states = ceil_div(2 * lightning_state_bytes(c), tp);
    let chunk = r.prefill_chunk.min(segment.max(1));
    let qkv_width = 3 * (c.num_heads * c.head_dim) as u64;
    // hidden, normed, residual, MoE output (H each) + qkv/gate (sharded by TP) + expert
    // intermediate for the tokens this GPU's experts receive (2·I per routed token).
    let activations = chunk * (4 * h + ceil_div(qkv_width + qkv_width / 3, tp)) * bf16
        + ceil_div(chunk * k, tp) * 2 * c.intermediate_size as u64 * bf16;
    // All-to-all: dispatch and combine, double-buffered; ring attention: a K/V block in
    // flight, double-buffered.
    let a2a = 2 * 2 * ceil_div(chunk * k, tp) * h * bf16;
    let ring = if p > 1 {
        2 * ceil_div(
            segment * 2 * (c.num_kv_heads * c.head_dim) as u64 * bf16,
            tp,
        )
    } else {
        0
    };
    let transfer_buffers = a2a + ring;

    let capacity = g.memory_bytes;
    let usable = (capacity as f64 * (1.0 - RESERVED_FRACTION)) as u64;
    let fixed = attention_weights + kv_cache + lightning_states + activations + transfer_buffers;
    let expert_weights = base_units * expert_unit_bytes;
    let mut total = fixed + expert_weights;
    // Replicas of hot units in half of what is left.
    let spare = usable.saturating_sub(total);
    let replicas_per_gpu = (spare / 2) / expert_unit_bytes.max(1);
    let expert_replicas = (replicas_per_gpu * gpus).min(counts.expert_units * 3);
    let replica_bytes = ceil_div(expert_replicas, gpus) * expert_unit_bytes;
    total += replica_bytes;

    let mut shortfall = Vec::new();
    if total > usable {
        let short = total - usable;
        shortfall.push(format!(
            "each GPU needs {:.1} GB but has {:.1} GB usable ({:.1} GB short): weights {:.1} GB \
             (attention {:.1}, experts {:.1}), KV cache {:.1} GB, lightning states {:.2} GB, \
             activations and buffers {:.1} GB",
            total as f64 / 1e9,
            usable as f64 / 1e9,
            short as f64 / 1e9,
            (attention_weights + expert_weights) as f64 / 1e9,
            attention_weights as f64 / 1e9,
            expert_weights as f64 / 1e9,
            kv_cache as f64 / 1e9,
            lightning_states as f64 / 1e9,
            (activations + transfer_buffers) as f64 / 1e9
        ));
    }
    if n as usize > c.max_position_embeddings {
        shortfall.push(format!(
            "the context of {n} tokens exceeds the model's {} positions",
            c.max_position_embeddings
        ));
    }
    let fits = shortfall.is_empty();

    // Traffic per layer.
    let expert_all_to_all_bytes = n * k * h * bf16 * 2;
    let state_layer = (c.num_heads * c.head_dim * c.head_dim) as u64 * 4;
    let lightning_state_exchange_bytes = (p - 1) * state_layer;
    let kv_layer_per_token = 2 * (c.num_kv_heads * c.head_dim) as u64 * bf16;
    let ring_kv_bytes = n * kv_layer_per_token * (p - 1);

    // Prefill roofline.
    let (mm, lin, sm) = prefill_flops(c, n);
    let peak = g.bf16_flops * gpus as f64;
    // Attention runs on the P ranks' GPUs only; the experts' GEMMs on every GPU.
    let rank_gpus = p * tp;
    let attention_peak = g.bf16_flops * rank_gpus as f64;
    let matmul_seconds = mm / (peak * GEMM_EFFICIENCY);
    let lightning_seconds = lin / (attention_peak * LIGHTNING_EFFICIENCY);
    let softmax_attention_seconds = sm / (attention_peak * ATTENTION_EFFICIENCY);
    let nvl = g.nvlink_bytes_per_s * LINK_EFFICIENCY;
    let net = g.network_bytes_per_s * LINK_EFFICIENCY;
    let layers = c.layers.len() as f64;
    // Two all-reduces of the segment's hidden states per layer (attention out, MoE combine),
    // ring all-reduce within the node.
    let tensor_parallel_allreduce_seconds = if tp > 1 {
        let bytes = segment as f64 * h as f64 * bf16 as f64 * 2.0 * (tp as f64 - 1.0) / tp as f64;
        layers * 2.0 * bytes / nvl
    } else {
        0.0
    };
    // All-to-all per GPU per layer: uniform routing sends (nodes−1)/nodes over the network.
    let a2a_per_gpu = expert_all_to_all_bytes as f64 / gpus as f64;
    let remote = (nodes as f64 - 1.0) / nodes as f64;
    let a2a_layer = (a2a_per_gpu * remote / net).max(a2a_per_gpu * (1.0 - remote) / nvl);
    let compute_layer = (matmul_seconds + lightning_seconds + softmax_attention_seconds) / layers;
    // The micro-batch pipeline hides the all-to-all behind compute; one micro-batch's worth
    // is exposed when filling the pipeline, plus whatever compute cannot cover.
    let exposed_layer = (a2a_layer - compute_layer).max(0.0) + a2a_layer / MICRO_BATCHES;
    let exposed_all_to_all_seconds = layers * exposed_layer;
    let softmax_layers = counts.softmax_layers as f64;
    let ring_layer = ring_kv_bytes as f64 / rank_gpus as f64 / net;
    let attn_layer = softmax_attention_seconds / softmax_layers.max(1.0);
    let exposed_ring_kv_seconds = softmax_layers * (ring_layer - attn_layer).max(0.0);
    let lightning_exchange_seconds = counts.lightning_layers as f64
        * (p as f64 - 1.0)
        * (state_layer as f64 / tp as f64 / net + HOP_LATENCY_S);
    let prefill_seconds = matmul_seconds
        + lightning_seconds
        + softmax_attention_seconds
        + tensor_parallel_allreduce_seconds
        + exposed_all_to_all_seconds
        + exposed_ring_kv_seconds
        + lightning_exchange_seconds;

    // Decode (one sequence at `n` tokens): every step reads the attention weights on the last
    // worker, the KV cache of every worker (in parallel), two expert units per layer, and the
    // lightning states; plus a hop to the experts and back per layer and a log-sum-exp merge
    // across workers per softmax layer.
    let hbm = g.hbm_bytes_per_s;
    let attn_read = attention_weights as f64 / hbm;
    let kv_read = kv_cache as f64 / hbm;
    let state_read = 2.0 * lightning_state_bytes(c) as f64 / tp as f64 / hbm;
    // The k units a token uses in a layer sit on different GPUs and are read in parallel.
    let experts_read = expert_unit_bytes as f64 / hbm;
    let per_layer_latency = 2.0 * HOP_LATENCY_S;
    let step = attn_read
        + kv_read
        + state_read
        + layers * (experts_read + per_layer_latency)
        + softmax_layers * (p as f64 - 1.0).min(1.0) * 2.0 * HOP_LATENCY_S;
    let decode_tokens_per_second = 1.0 / step;

    Plan {
        fits,
        shortfall,
        gpu: g.name.to_string(),
        nodes,
        gpus,
        weights: r.weights,
        context: n,
        attention_workers: nodes,
        context_parallel: p,
        attention_tensor_parallel: tp,
        expert_units: counts.expert_units,
        expert_units_per_gpu: base_units,
        expert_replicas,
        per_gpu: PerGpuMemory {
            attention_weights,
            expert_weights: expert_weights + replica_bytes,
            kv_cache,
            lightning_states,
            activations,
            transfer_buffers,
            total,
            capacity,
            usable,
        },
        per_layer: PerLayerTraffic {
            expert_all_to_all_bytes,
            lightning_state_exchange_bytes,
            ring_kv_bytes,
        },
        prefill_seconds,
        prefill: PrefillBreakdown {
            matmul_seconds,
            lightning_seconds,
            softmax_attention_seconds,
            tensor_parallel_allreduce_seconds,
            exposed_all_to_all_seconds,
            exposed_ring_kv_seconds,
            lightning_exchange_seconds,
        },
        decode_tokens_per_second,
        total_params: counts.total_params,
        active_params: counts.active_params,
    }
}
