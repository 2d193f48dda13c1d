//! `ringbolt bench kernels --device cuda:N`: the CUDA kernels' speed on shapes of the real
//! model (64 heads × 128), for `scripts/gpu-check.sh`, which sets the results beside PyTorch's
//! bf16 matmul, device copy and scaled_dot_product_attention measured in the same run.

use crate::model_cli::Device;
use anyhow::{Result, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct KernelBenchArgs {
    /// The GPU to measure (cuda:N).
    #[arg(long)]
    pub device: Device,
    /// Prompt lengths of the lightning prefill measurement.
    #[arg(long, default_value = "8192,65536", value_delimiter = ',')]
    pub tokens: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Sequences in the lightning decode-step measurement.
    #[arg(long, default_value_t = 64)]
    pub decode_batch: usize,
    /// Tokens of the causal softmax-attention measurement.
    #[arg(long, default_value_t = 8192)]
    pub attention_tokens: usize,
    /// Size of the square GEMM measurement (m = n = k).
    #[arg(long, default_value_t = 8192)]
    pub gemm: usize,
}

/// Useful FLOPs per token and head of lightning prefill in blocks of `block` tokens:
/// intra-block QKᵀ and PV (causal: half of 2·B·d each), inter-block q·S and the state update
/// (2·d² each).
pub fn lightning_flops_per_token_head(block: usize, d: usize) -> f64 {
    let (b, d) = (block as f64, d as f64);
    2.0 * b * d + 4.0 * d * d
}

#[cfg(not(feature = "cuda"))]
pub fn run(a: KernelBenchArgs) -> Result<()> {
    let _ = a;
    bail!(
        "bench kernels measures the CUDA kernels, but this ringbolt was built without the `cuda` \
         feature (cargo build --release --features cuda)"
    )
}

#[cfg(feature = "cuda")]
pub fn run(a: KernelBenchArgs) -> Result<()> {
    use rayon::prelude::*;
    use ringbolt_kernels::cuda_backend::{CudaBackend, LightningKernel};
    use ringbolt_kernels::{AttentionShape, Backend, LightningShape};
    use serde_json::json;
    use std::hint::black_box;
    use std::time::Instant;

    let Device::Cuda(ordinal) = a.device else {
        bail!("bench kernels measures CUDA kernels: pass --device cuda:N");
    };
    let (h, kvh, d) = (a.heads, a.kv_heads, a.head_dim);
    if h == 0 || kvh == 0 || d == 0 || h % kvh != 0 || a.tokens.contains(&0) {
        bail!(
            "--heads, --kv-heads, --head-dim and --tokens must be positive, heads a multiple of kv-heads"
        );
    }
    let b = CudaBackend::new(ordinal, None)?;
    // Deterministic values in [-0.5, 0.5) (the kernels' speed does not depend on them).
    let fill = |n: usize, seed: u64| -> Vec<f32> {
        let mut v = vec![0f32; n];
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
            let mut x = seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for o in ch {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                *o = ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            }
        });
        v
    };
    // Seconds per call, (median, min) over `reps` timings of `iters` calls each between stream
    // synchronisations, after two warm-up calls (module loads, the memory pool's first growth).
    let time = |iters: usize, reps: usize, f: &mut dyn FnMut()| -> (f64, f64) {
        f();
        f();
        b.synchronize();
        let mut v: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                b.synchronize();
                t.elapsed().as_secs_f64() / iters as f64
            })
            .collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0])
    };
    // Each measurement as it is made (stderr), so a crash later keeps the earlier ones.
    let said = |what: &str, v: &serde_json::Value| eprintln!("bench kernels: {what} {v}");

    let g = a.gemm;
    let x = b.upload(&fill(g * g, 1));
    let wv: Vec<f32> = fill(g * g, 2)
        .into_iter()
        .map(|v| f32::from_bits(v.to_bits() & 0xffff_0000))
        .collect();
    let w = b.upload_weight(&wv, g, g);
    drop(wv);
    let (gemm_s, gemm_min) = time(5, 5, &mut || {
        black_box(b.linear(&x, &w, g, g, g));
    });
    let gemm_tflops = 2.0 * (g as f64).powi(3) / gemm_s / 1e12;
    drop((x, w));
    let gemm = json!({"m": g, "n": g, "k": g, "seconds": gemm_s, "min_seconds": gemm_min,
        "tflops": gemm_tflops,
        "what": "backend linear: cuBLAS bf16 GEMM, f32 out, with the f32->bf16 activation conversion"});
    said("gemm", &gemm);

    let decay: Vec<f32> = (0..h)
        .map(|i| 2f32.powf(-8.0 * (i + 1) as f32 / h as f32))
        .collect();
    // The tensor-core kernels work in blocks of LIGHTNING_TC_BLOCK tokens whatever the
    // config's block size; FLOPs are counted for the blocks they compute.
    let block = ringbolt_kernels::cuda_backend::LIGHTNING_TC_BLOCK;
    let shape = LightningShape {
        heads: h,
        head_dim: d,
        block,
    };
    // Both prefill implementations: the engine's (RINGBOLT_LIGHTNING, default blocks) is the
    // one `lightning_prefill` reports; the other is beside it to choose by.
    let mut prefill = Vec::new();
    let mut prefill_other = Vec::new();
    let engine = b.lightning_kernel();
    let other = match engine {
        LightningKernel::Blocks => LightningKernel::Fused,
        LightningKernel::Fused => LightningKernel::Blocks,
    };
    for (kernel, into) in [(engine, &mut prefill), (other, &mut prefill_other)] {
        b.set_lightning(kernel);
        for &t in &a.tokens {
            let qkv = b.upload(&fill(t * h * 3 * d, 3));
            let (s, min) = time(1, 7, &mut || {
                let mut st = b.zeros(h * d * d);
                black_box(b.lightning(&qkv, t, shape, &decay, &mut st));
            });
            let flops = t as f64 * h as f64 * lightning_flops_per_token_head(block, d);
            let r = json!({
                "kernel": format!("{kernel:?}").to_lowercase(),
                "tokens": t,
                "block": block,
                "seconds": s,
                "min_seconds": min,
                "tflops": flops / s / 1e12,
                "fraction_of_gemm": flops / s / 1e12 / gemm_tflops,
            });
            said("lightning prefill", &r);
            into.push(r);
        }
    }
    b.set_lightning(engine);

    let batch = a.decode_batch;
    let qkv = b.upload(&fill(batch * h * 3 * d, 4));
    let mut states: Vec<_> = (0..batch).map(|_| b.zeros(h * d * d)).collect();
    let (decode_s, decode_min) = time(20, 5, &mut || {
        let mut refs: Vec<&mut _> = states.iter_mut().collect();
        black_box(b.lightning_decode(&qkv, shape, &decay, &mut refs));
    });
    // Each state is read and written once; q, k, v in and the output out.
    let bytes = (batch * h * d * d * 4 * 2 + batch * h * 4 * d * 4) as f64;
    drop((qkv, states));
    let decode = json!({"batch": batch, "seconds": decode_s, "min_seconds": decode_min,
        "bytes": bytes, "gb_per_s": bytes / decode_s / 1e9});
    said("lightning decode", &decode);

    let t = a.attention_tokens;
    let q = b.upload(&fill(t * h * d, 5));
    let (mut k, mut v) = (b.new_cache(), b.new_cache());
    b.cache_append(&mut k, &b.upload(&fill(t * kvh * d, 6)));
    b.cache_append(&mut v, &b.upload(&fill(t * kvh * d, 7)));
    let ashape = AttentionShape {
        heads: h,
        kv_heads: kvh,
        head_dim: d,
    };
    let (sa, sa_min) = time(1, 7, &mut || {
        black_box(b.attention(&q, t, &k, &v, 0, ashape));
    });
    // Causal: query i sees i + 1 keys; QKᵀ and PV, 2 FLOPs per multiply-add.
    let attn_flops = 4.0 * d as f64 * h as f64 * t as f64 * (t as f64 + 1.0) / 2.0;
    let attention = json!({"tokens": t, "seconds": sa, "min_seconds": sa_min,
        "tflops": attn_flops / sa / 1e12, "causal": true});
    said("attention", &attention);

    println!(
        "{}",
        json!({
            "bench": "kernels",
            "device": b.name(),
            "heads": h,
            "kv_heads": kvh,
            "head_dim": d,
            "timing": "median (and min) over repeated timings between stream synchronisations, after two warm-up calls",
            "gemm": gemm,
            "lightning_prefill": prefill,
            "lightning_prefill_other_kernel": prefill_other,
            "lightning_decode": decode,
            "attention": attention,
        })
    );
    Ok(())
}
