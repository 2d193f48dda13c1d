//! `ringbolt plan`: what MiniMax-01 needs on a GPU cluster, without running it.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use ringbolt_model::ModelConfig;
use ringbolt_planner::{
    PlanRequest, WeightFormat, gpu, plan, plan_with_degree, profiles::GPU_NAMES, text01,
};
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum ModelArg {
    #[value(name = "text-01")]
    Text01,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum WeightsArg {
    Bf16,
    Int8,
}

#[derive(Args)]
pub struct PlanArgs {
    /// A built-in model profile.
    #[arg(long, env = "RINGBOLT_MODEL", conflicts_with = "config")]
    model: Option<ModelArg>,
    /// A config.json (either dialect) instead of a profile.
    #[arg(long, env = "RINGBOLT_CONFIG")]
    config: Option<PathBuf>,
    /// GPU profile: h800, h100, h200 or h20.
    #[arg(long, env = "RINGBOLT_GPU")]
    gpu: String,
    #[arg(long, env = "RINGBOLT_NODES")]
    nodes: u64,
    #[arg(long, env = "RINGBOLT_GPUS_PER_NODE", default_value_t = 8)]
    gpus_per_node: u64,
    /// Context length in tokens.
    #[arg(long, env = "RINGBOLT_CONTEXT")]
    context: u64,
    /// bf16 everywhere, or int8 experts (W8A16).
    #[arg(long, env = "RINGBOLT_WEIGHTS", value_enum, default_value = "bf16")]
    weights: WeightsArg,
    /// Prompt tokens per attention worker per prefill step.
    #[arg(long, env = "RINGBOLT_PREFILL_CHUNK", default_value_t = 16_384)]
    prefill_chunk: u64,
    /// Attention workers the context is split among (0: the fewest whose share fits, as the
    /// coordinator chooses for a job that does not say; at most --nodes).
    #[arg(long, env = "RINGBOLT_CONTEXT_PARALLEL", default_value_t = 0)]
    context_parallel: u64,
    #[arg(long, env = "RINGBOLT_JSON")]
    json: bool,
}

fn gb(b: u64) -> String {
    format!("{:.1} GB", b as f64 / 1e9)
}

pub fn run(a: PlanArgs) -> Result<()> {
    let model = match (&a.model, &a.config) {
        (_, Some(path)) => ModelConfig::from_file(path)?,
        (Some(ModelArg::Text01), None) => text01(),
        (None, None) => bail!("give --model text-01 or --config FILE"),
    };
    let Some(g) = gpu(&a.gpu) else {
        bail!("unknown GPU `{}`; known: {}", a.gpu, GPU_NAMES.join(", "));
    };
    if a.nodes == 0 || a.gpus_per_node == 0 || a.context == 0 || a.prefill_chunk == 0 {
        bail!("--nodes, --gpus-per-node, --context and --prefill-chunk must be positive");
    }
    let req = PlanRequest {
        model,
        gpu: g,
        nodes: a.nodes,
        gpus_per_node: a.gpus_per_node,
        weights: match a.weights {
            WeightsArg::Bf16 => WeightFormat::Bf16,
            WeightsArg::Int8 => WeightFormat::Int8,
        },
        context: a.context,
        prefill_chunk: a.prefill_chunk,
    };
    let p = match a.context_parallel {
        0 => plan(&req),
        n => plan_with_degree(&req, n.min(a.nodes)),
    };
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
        return Ok(());
    }
    println!(
        "{} x {} {} ({} GPUs), {:?} weights, context {} tokens: {}",
        p.nodes,
        a.gpus_per_node,
        p.gpu,
        p.gpus,
        p.weights,
        p.context,
        if p.fits { "FITS" } else { "DOES NOT FIT" }
    );
    for s in &p.shortfall {
        println!("  short: {s}");
    }
    println!(
        "placement: {} attention workers (context-parallel {}), tensor-parallel {} within a node; \
         {} expert units, {} per GPU, {} replicas",
        p.attention_workers,
        p.context_parallel,
        p.attention_tensor_parallel,
        p.expert_units,
        p.expert_units_per_gpu,
        p.expert_replicas
    );
    let m = &p.per_gpu;
    println!("per GPU memory:");
    for (k, v) in [
        ("attention weights", m.attention_weights),
        ("expert weights", m.expert_weights),
        ("KV cache", m.kv_cache),
        ("lightning states", m.lightning_states),
        ("activations", m.activations),
        ("transfer buffers", m.transfer_buffers),
        ("total", m.total),
        ("usable", m.usable),
        ("capacity", m.capacity),
    ] {
        println!("  {k:<18} {:>10}", gb(v));
    }
    println!("per layer traffic (whole cluster, full prefill):");
    println!(
        "  expert all-to-all      {:>10}",
        gb(p.per_layer.expert_all_to_all_bytes)
    );
    println!(
        "  lightning state ring   {:>10}",
        gb(p.per_layer.lightning_state_exchange_bytes)
    );
    println!(
        "  ring attention K/V     {:>10}",
        gb(p.per_layer.ring_kv_bytes)
    );
    let b = &p.prefill;
    println!(
        "prefill: {:.1} s (matmuls {:.1}, lightning {:.1}, softmax attention {:.1}, TP all-reduce {:.1}, \
         exposed all-to-all {:.1}, exposed ring K/V {:.1}, state ring {:.2})",
        p.prefill_seconds,
        b.matmul_seconds,
        b.lightning_seconds,
        b.softmax_attention_seconds,
        b.tensor_parallel_allreduce_seconds,
        b.exposed_all_to_all_seconds,
        b.exposed_ring_kv_seconds,
        b.lightning_exchange_seconds
    );
    println!(
        "decode: {:.1} tokens/s for one sequence at this context",
        p.decode_tokens_per_second
    );
    Ok(())
}
