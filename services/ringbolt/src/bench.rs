//! `ringbolt bench`: engine benchmarks that print ratios against baselines measured in the
//! same run (never wall-clock assertions).

use crate::model_cli::load_model;
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng, rngs::StdRng};
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::cpu::{Mat, gemm};
use ringbolt_model::{LayerKind, Logits, Model, ModelConfig};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(Subcommand)]
enum BenchKind {
    /// Prefill and decode speed of a checkpoint against the f32 GEMM throughput of this machine.
    Engine {
        #[arg(long, env = "RINGBOLT_CHECKPOINT")]
        checkpoint: PathBuf,
        /// Prompt tokens of the prefill measurement.
        #[arg(long, default_value_t = 4096)]
        prefill: usize,
        /// Context length before the decode measurement.
        #[arg(long, default_value_t = 512)]
        decode_context: usize,
        /// Decode steps measured.
        #[arg(long, default_value_t = 32)]
        decode_steps: usize,
        /// Repetitions (the best is reported).
        #[arg(long, default_value_t = 2)]
        repeat: usize,
    },
    /// Prefill time at several lengths (for lightning-only configs: linear scaling).
    Scaling {
        #[arg(long, env = "RINGBOLT_CHECKPOINT")]
        checkpoint: PathBuf,
        /// Comma-separated prompt lengths; ratios are against the first.
        #[arg(long, default_value = "4096,32768", value_delimiter = ',')]
        lengths: Vec<usize>,
        /// Prefill chunk (tokens per forward call); 0 = whole prompt in one call.
        #[arg(long, default_value_t = 0)]
        chunk: usize,
    },
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchKind::Engine {
            checkpoint,
            prefill,
            decode_context,
            decode_steps,
            repeat,
        } => engine(
            checkpoint,
            prefill,
            decode_context,
            decode_steps,
            repeat.max(1),
        ),
        BenchKind::Scaling {
            checkpoint,
            lengths,
            chunk,
        } => scaling(checkpoint, &lengths, chunk),
    }
}

fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// f32 GEMM throughput (GFLOP/s) on shapes like the engine's: best of a few runs.
fn gemm_gflops(m: usize, n: usize, k: usize) -> f64 {
    let mut rng = StdRng::seed_from_u64(1);
    let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let b: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut c = vec![0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        gemm(
            m,
            n,
            k,
            &mut c,
            n,
            Mat::rows(&a, k),
            Mat::transposed(&b, k),
            None,
            true,
        );
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// Useful (model) FLOPs of a prefill of `t` tokens from an empty context, logits for the
/// last position only.
pub fn prefill_flops(c: &ModelConfig, t: usize) -> f64 {
    let (h, nh, nkv, d) = (
        c.hidden_size as f64,
        c.num_heads as f64,
        c.num_kv_heads as f64,
        c.head_dim as f64,
    );
    let tf = t as f64;
    let moe = 2.0 * h * c.num_experts as f64
        + c.experts_per_tok as f64 * 2.0 * 3.0 * h * c.intermediate_size as f64;
    let mut per_token = 0.0;
    let mut attn_total = 0.0;
    for k in &c.layers {
        per_token += moe;
        match k {
            LayerKind::Lightning => {
                per_token += 2.0 * h * (3.0 * nh * d) + 2.0 * 2.0 * h * nh * d;
                // Block algorithm: intra (QKᵀ and PV over the block), inter (qS), state update.
                let b = (c.block_size.min(t)) as f64;
                per_token += nh * (2.0 * 2.0 * b * d / 2.0 + 2.0 * 2.0 * d * d);
            }
            LayerKind::Softmax => {
                per_token += 2.0 * h * (nh * d + 2.0 * nkv * d) + 2.0 * h * nh * d;
                // Causal: token i attends to i+1 keys; QKᵀ and PV.
                attn_total += nh * 4.0 * d * tf * (tf + 1.0) / 2.0;
            }
        }
    }
    per_token * tf + attn_total + 2.0 * h * c.vocab_size as f64
}

fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn engine(dir: PathBuf, prefill: usize, ctx: usize, steps: usize, repeat: usize) -> Result<()> {
    let model = load_model(&dir)?;
    let c = model.config().clone();
    if prefill == 0 || steps == 0 || ctx == 0 {
        bail!("--prefill, --decode-context and --decode-steps must be positive");
    }
    let gf = gemm_gflops(
        prefill.min(4096),
        c.intermediate_size.max(c.hidden_size),
        c.hidden_size,
    );
    let gf_sq = gemm_gflops(1024, 1024, 1024);
    let toks = random_tokens(prefill, c.vocab_size, 7);
    let mut best = f64::MAX;
    for _ in 0..repeat {
        let mut st = model.new_state();
        let t = Instant::now();
        model.forward(&mut st, &toks, Logits::Last)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let flops = prefill_flops(&c, prefill);
    let prefill_gflops = flops / best / 1e9;

    let (decode_s, cache_bytes) = decode_time(&model, ctx, steps, repeat)?;
    let line = json!({
        "bench": "engine",
        "checkpoint": dir,
        "threads": rayon::current_num_threads(),
        "gemm_gflops_engine_shape": gf,
        "gemm_gflops_1024": gf_sq,
        "prefill_tokens": prefill,
        "prefill_seconds": best,
        "prefill_tokens_per_second": prefill as f64 / best,
        "prefill_gflops": prefill_gflops,
        "prefill_fraction_of_gemm": prefill_gflops / gf,
        "decode_context": ctx,
        "decode_ms_per_token": decode_s * 1e3,
        "decode_tokens_per_second": 1.0 / decode_s,
        "decode_cache_bytes": cache_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{line}");
    Ok(())
}

/// Seconds per decode step after a prefill of `ctx` tokens, and the sequence's cache bytes.
fn decode_time(
    model: &Model<Cpu>,
    ctx: usize,
    steps: usize,
    repeat: usize,
) -> Result<(f64, usize)> {
    let c = model.config();
    let toks = random_tokens(ctx + steps, c.vocab_size, 9);
    let mut best = f64::MAX;
    let mut bytes = 0;
    for _ in 0..repeat {
        let mut st = model.new_state();
        model.forward(&mut st, &toks[..ctx], Logits::None)?;
        let t = Instant::now();
        for &id in &toks[ctx..] {
            model.forward(&mut st, &[id], Logits::Last)?;
        }
        best = best.min(t.elapsed().as_secs_f64() / steps as f64);
        bytes = st.cache_bytes(model.backend());
    }
    Ok((best, bytes))
}

fn scaling(dir: PathBuf, lengths: &[usize], chunk: usize) -> Result<()> {
    let model = load_model(&dir)?;
    let c = model.config().clone();
    if lengths.is_empty() || lengths.contains(&0) {
        bail!("--lengths needs positive lengths");
    }
    let softmax_layers = c
        .layers
        .iter()
        .filter(|k| **k == LayerKind::Softmax)
        .count();
    let mut base: Option<(usize, f64)> = None;
    for &n in lengths {
        let toks = random_tokens(n, c.vocab_size, 3);
        let mut st = model.new_state();
        let step = if chunk == 0 { n } else { chunk };
        let t = Instant::now();
        for (i, part) in toks.chunks(step).enumerate() {
            let last = (i + 1) * step >= n;
            model.forward(
                &mut st,
                part,
                if last { Logits::Last } else { Logits::None },
            )?;
        }
        let secs = t.elapsed().as_secs_f64();
        let (n0, s0) = *base.get_or_insert((n, secs));
        let ctx_bytes = st.cache_bytes(model.backend());
        let line = json!({
            "bench": "scaling",
            "softmax_layers": softmax_layers,
            "tokens": n,
            "seconds": secs,
            "length_ratio": n as f64 / n0 as f64,
            "time_ratio": secs / s0,
            "cache_bytes": ctx_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
        });
        println!("{line}");
    }
    Ok(())
}
