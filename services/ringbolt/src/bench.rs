//! `ringbolt bench`: engine benchmarks that print ratios against baselines measured in the
//! same run (never wall-clock assertions).

use crate::model_cli::{load_model, load_model_as};
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng, rngs::StdRng};
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::cpu::{Mat, gemm};
use ringbolt_kernels::{Activations, WeightFormat};
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
        /// Sequences decoded together in the decode measurement.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// How the weights are held (`bf16`, `int8`, `int8-all`); other than bf16, bf16 f32
        /// is measured in the same run as the baseline.
        #[arg(long, default_value = "bf16")]
        weights: WeightFormat,
        /// What GEMMs multiply (`f32`, `bf16`); bf16 is compared with f32 in the same run.
        #[arg(long, default_value = "f32")]
        activations: Activations,
    },
    /// Concurrent jobs through the server: batched decode vs one job at a time.
    Batching {
        #[arg(long, env = "RINGBOLT_CHECKPOINT")]
        checkpoint: PathBuf,
        #[arg(long, default_value_t = 8)]
        jobs: usize,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: u32,
    },
    /// The same prompts on a local cluster (1 coordinator, M attention workers, N expert
    /// workers, child processes, real etcd) and on standalone: tokens/s and ratios.
    Cluster {
        #[arg(long, env = "RINGBOLT_CHECKPOINT")]
        checkpoint: PathBuf,
        /// Comma-separated prompt lengths.
        #[arg(long, default_value = "8192,32768", value_delimiter = ',')]
        prompt_tokens: Vec<usize>,
        #[arg(long, default_value_t = 16)]
        new_tokens: u32,
        #[arg(long, default_value_t = 2)]
        expert_workers: usize,
        /// Attention workers (concurrent jobs spread over them).
        #[arg(long, default_value_t = 1)]
        attention_workers: usize,
        /// etcd to use (default: start `etcd` from the PATH).
        #[arg(long, env = "RINGBOLT_ETCD")]
        etcd: Option<String>,
        /// Also run this many jobs (the shortest prompt length each) on the cluster all at once
        /// and one at a time, and compare their total decode throughput (0: skip).
        #[arg(long, default_value_t = 0)]
        concurrent_jobs: usize,
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
        /// Rounds over all lengths; each length reports its best.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Context-parallel prefill: P ranks as threads of this process (the in-process transport)
    /// against one rank, each rank on one compute thread (run as `ringbolt --threads P bench
    /// context --ranks P`): speed-up, time waiting for lightning states and for ring hops, and
    /// the balance of softmax work and memory.
    Context {
        #[arg(long, env = "RINGBOLT_CHECKPOINT")]
        checkpoint: PathBuf,
        #[arg(long, default_value_t = 65_536)]
        tokens: usize,
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Rounds (each side reports its best).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Exchange over TCP on 127.0.0.1 through an emulated link of this many GB/s
        /// (default: the in-process transport, no link).
        #[arg(long)]
        link_gbps: Option<f64>,
        /// The emulated link's latency.
        #[arg(long, default_value_t = 0.0)]
        link_latency_us: f64,
        /// How lightning states travel: `all-gather` (LASP-2) or `ring` (LASP-1).
        #[arg(long, default_value = "all-gather")]
        state_exchange: ringbolt_context::StateExchange,
    },
    /// CUDA kernel speed on the real model's shapes (lightning prefill and decode, softmax
    /// attention, the bf16 GEMM); needs a build with `--features cuda` and a GPU.
    Kernels(crate::bench_kernels::KernelBenchArgs),
    /// What TLS costs: a prompt's upload through the public API, plain and TLS, and the data
    /// plane's message sizes over plain and TLS streams; the data-plane secret's handshake.
    Tls(crate::bench_tls::TlsBenchArgs),
    /// A long prompt's upload through the HTTP API (JSON ids) against the gRPC API.
    Http(crate::bench_http::HttpBenchArgs),
    /// Questions about one long document: time to first token with the context cache warm
    /// against the cold first question.
    Cache(crate::bench_cache::CacheBenchArgs),
    /// MiniMax-VL-01's vision path for one image (crops, vision tower, projector, packing) at
    /// the released shapes.
    Vision(crate::bench_vision::VisionBenchArgs),
}

/// Throughput of concurrent jobs through an in-process standalone server, with decode steps
/// batched across jobs (continuous batching) against one job at a time (`max_batch` 1).
async fn batching(dir: PathBuf, jobs: usize, prompt_tokens: usize, new_tokens: u32) -> Result<()> {
    use crate::client::{connect, submit_tokens, watch};
    use crate::server::{StandaloneArgs, start_manager};
    use ringbolt_proto::v1 as pb;
    let vocab = ringbolt_model::ModelConfig::from_file(&dir.join("config.json"))?.vocab_size;
    let mut results = Vec::new();
    for max_batch in [jobs, 1] {
        let data = tempfile::tempdir()?;
        let mut args = StandaloneArgs {
            max_batch,
            ..StandaloneArgs::in_process(dir.clone(), data.path().to_path_buf())
        };
        args.limits.max_jobs = jobs;
        args.limits.max_new_tokens_limit = new_tokens;
        let token = tokio_util::sync::CancellationToken::new();
        let (a2, t2) = (args.clone(), token.clone());
        let mgr = tokio::task::spawn_blocking(move || start_manager(&a2, t2)).await??;
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let stop = token.clone();
        let server = tokio::spawn(ringbolt_jobs::grpc::serve(
            mgr,
            ringbolt_shell::Shell::plain(Default::default()),
            listener,
            None,
            async move { stop.cancelled().await },
        ));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for j in 0..jobs {
            let endpoint = endpoint.clone();
            let ids = random_tokens(prompt_tokens, vocab, 100 + j as u64);
            tasks.push(tokio::spawn(async move {
                let mut c = connect(&endpoint).await?;
                let h = pb::JobHeader {
                    max_new_tokens: new_tokens,
                    ..Default::default()
                };
                let r = submit_tokens(&mut c, h, ids, None, |_| {}).await?;
                let out = watch(&mut c, &r.job_id, false).await?;
                anyhow::Ok(out.tokens.len())
            }));
        }
        let mut generated = 0;
        for task in tasks {
            generated += task.await??;
        }
        let secs = t.elapsed().as_secs_f64();
        token.cancel();
        let _ = server.await;
        results.push((max_batch, generated, secs));
    }
    let (b, g, s) = results[0];
    let (_, g1, s1) = results[1];
    println!(
        "{}",
        json!({
            "bench": "batching",
            "jobs": jobs,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "batched": {"max_batch": b, "generated": g, "seconds": s, "tokens_per_second": g as f64 / s},
            "one_at_a_time": {"max_batch": 1, "generated": g1, "seconds": s1, "tokens_per_second": g1 as f64 / s1},
            "speedup": (g as f64 / s) / (g1 as f64 / s1),
        })
    );
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchKind::Engine {
            checkpoint,
            prefill,
            decode_context,
            decode_steps,
            repeat,
            batch,
            weights,
            activations,
        } => engine(
            checkpoint,
            EngineRun {
                prefill,
                ctx: decode_context,
                steps: decode_steps,
                repeat: repeat.max(1),
                batch: batch.max(1),
            },
            weights,
            activations,
        ),
        BenchKind::Scaling {
            checkpoint,
            lengths,
            chunk,
            rounds,
        } => scaling(checkpoint, &lengths, chunk, rounds),
        BenchKind::Kernels(args) => crate::bench_kernels::run(args),
        BenchKind::Tls(args) => crate::bench_tls::run(args),
        BenchKind::Http(args) => crate::bench_http::run(args),
        BenchKind::Cache(args) => crate::bench_cache::run(args),
        BenchKind::Vision(args) => crate::bench_vision::run(args),
        BenchKind::Context {
            checkpoint,
            tokens,
            ranks,
            rounds,
            link_gbps,
            link_latency_us,
            state_exchange,
        } => {
            let link = link_gbps.map(|g| ringbolt_transport::Link {
                bytes_per_second: Some(g * 1e9),
                latency: std::time::Duration::from_secs_f64(link_latency_us.max(0.0) / 1e6),
            });
            context(
                checkpoint,
                tokens.max(1),
                ranks.max(1),
                rounds.max(1),
                link,
                state_exchange,
            )
        }
        BenchKind::Cluster {
            checkpoint,
            prompt_tokens,
            new_tokens,
            expert_workers,
            attention_workers,
            etcd,
            concurrent_jobs,
        } => crate::run_async(cluster(
            checkpoint,
            prompt_tokens,
            new_tokens.max(1),
            (attention_workers.max(1), expert_workers.max(1)),
            etcd,
            concurrent_jobs,
        )),
        BenchKind::Batching {
            checkpoint,
            jobs,
            prompt_tokens,
            new_tokens,
        } => crate::run_async(batching(
            checkpoint,
            jobs.max(1),
            prompt_tokens.max(1),
            new_tokens.max(1),
        )),
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
    let best = best_secs(5, || {
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
        )
    });
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// The shortest of `runs` timings of `f`, in seconds.
fn best_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// Throughput (GFLOP/s) of the CPU backend's `linear` with a bf16 weight (a bf16 checkpoint's
/// layers) on the same shape: AMX with three-term activations where the CPU has it.
fn bf16_linear_gflops(m: usize, n: usize, k: usize) -> f64 {
    let mut rng = StdRng::seed_from_u64(2);
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let w: Vec<f32> = (0..n * k)
        .map(|_| f32::from_bits(rng.random_range(-1.0f32..1.0).to_bits() & 0xffff_0000))
        .collect();
    use ringbolt_kernels::Backend;
    let cpu = Cpu::default();
    let w = cpu.upload_weight(&w, n, k);
    let best = best_secs(5, || {
        std::hint::black_box(cpu.linear(&x, &w, m, k, n));
    });
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
                per_token += nh
                    * crate::bench_kernels::lightning_flops_per_token_head(
                        c.block_size.min(t),
                        c.head_dim,
                    );
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

/// What `bench engine` measures.
#[derive(Clone, Copy)]
struct EngineRun {
    prefill: usize,
    ctx: usize,
    steps: usize,
    repeat: usize,
    batch: usize,
}

/// One model's measurement: best prefill seconds, best decode seconds per step, one
/// sequence's cache bytes, and the prefill's last logits.
struct Measured {
    prefill_s: f64,
    decode_s: f64,
    cache_bytes: usize,
    logits: Vec<f32>,
}

fn measure(model: &Model<Cpu>, toks: &[u32], r: EngineRun) -> Result<Measured> {
    let mut best = f64::MAX;
    let mut logits = Vec::new();
    for _ in 0..r.repeat {
        let mut st = model.new_state();
        let t = Instant::now();
        logits = model.forward(&mut st, toks, Logits::Last)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let (decode_s, cache_bytes) = decode_time(model, r.ctx, r.steps, r.repeat, r.batch)?;
    Ok(Measured {
        prefill_s: best,
        decode_s,
        cache_bytes,
        logits,
    })
}

/// Loads `dir` as `weights` with `activations`: the model and the seconds it took.
fn timed_load(
    dir: &std::path::Path,
    weights: WeightFormat,
    activations: Activations,
) -> Result<(Model<Cpu>, f64)> {
    let t = Instant::now();
    let m = load_model_as(dir, weights, activations)?;
    Ok((m, t.elapsed().as_secs_f64()))
}

fn engine(
    dir: PathBuf,
    r: EngineRun,
    weights: WeightFormat,
    activations: Activations,
) -> Result<()> {
    if r.prefill == 0 || r.steps == 0 || r.ctx == 0 {
        bail!("--prefill, --decode-context and --decode-steps must be positive");
    }
    let (model, load_s) = timed_load(&dir, weights, activations)?;
    let c = model.config().clone();
    let gf = gemm_gflops(
        r.prefill.min(4096),
        c.intermediate_size.max(c.hidden_size),
        c.hidden_size,
    );
    let gf_sq = gemm_gflops(1024, 1024, 1024);
    let lf = bf16_linear_gflops(
        r.prefill.min(4096),
        c.intermediate_size.max(c.hidden_size),
        c.hidden_size,
    );
    let toks = random_tokens(r.prefill, c.vocab_size, 7);
    // Another format is compared with the checkpoint's weights and f32 activations, measured
    // in alternate rounds of this run (the machine's speed drifts).
    let baseline = (weights, activations) != (WeightFormat::Bf16, Activations::F32);
    let base_model = if baseline {
        Some(timed_load(&dir, WeightFormat::Bf16, Activations::F32)?)
    } else {
        None
    };
    let one = EngineRun { repeat: 1, ..r };
    let (mut ours, mut theirs): (Option<Measured>, Option<Measured>) = (None, None);
    let keep_best = |slot: &mut Option<Measured>, m: Measured| match slot {
        Some(b) => {
            b.prefill_s = b.prefill_s.min(m.prefill_s);
            b.decode_s = b.decode_s.min(m.decode_s);
        }
        None => *slot = Some(m),
    };
    for _ in 0..r.repeat {
        keep_best(&mut ours, measure(&model, &toks, one)?);
        if let Some((bm, _)) = &base_model {
            keep_best(&mut theirs, measure(bm, &toks, one)?);
        }
    }
    let ours = ours.expect("at least one round");
    let flops = prefill_flops(&c, r.prefill);
    let prefill_gflops = flops / ours.prefill_s / 1e9;
    let mut line = json!({
        "bench": "engine",
        "checkpoint": dir,
        "threads": rayon::current_num_threads(),
        "weights": weights.to_string(),
        "activations": activations.to_string(),
        "load_seconds": load_s,
        "gemm_gflops_engine_shape": gf,
        "gemm_gflops_1024": gf_sq,
        "bf16_linear_gflops_engine_shape": lf,
        "cpu_amx": ringbolt_kernels::x86::has_amx(),
        "prefill_tokens": r.prefill,
        "prefill_seconds": ours.prefill_s,
        "prefill_tokens_per_second": r.prefill as f64 / ours.prefill_s,
        "prefill_gflops": prefill_gflops,
        "prefill_fraction_of_gemm": prefill_gflops / gf,
        "decode_context": r.ctx,
        "decode_batch": r.batch,
        "decode_ms_per_step": ours.decode_s * 1e3,
        "decode_ms_per_token": ours.decode_s * 1e3 / r.batch as f64,
        "decode_tokens_per_second": r.batch as f64 / ours.decode_s,
        "decode_cache_bytes": ours.cache_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if let (Some(b), Some((_, base_load_s))) = (theirs, base_model) {
        let (err, rel) = logits_error(&ours.logits, &b.logits);
        line["baseline"] = json!({
            "weights": "bf16",
            "activations": "f32",
            "load_seconds": base_load_s,
            "prefill_seconds": b.prefill_s,
            "decode_ms_per_token": b.decode_s * 1e3 / r.batch as f64,
        });
        line["prefill_speedup_vs_baseline"] = json!(b.prefill_s / ours.prefill_s);
        line["decode_speedup_vs_baseline"] = json!(b.decode_s / ours.decode_s);
        line["logits_max_abs_error_vs_baseline"] = json!(err);
        line["logits_rel_rms_error_vs_baseline"] = json!(rel);
        line["same_argmax_as_baseline"] = json!(argmax(&ours.logits) == argmax(&b.logits));
    }
    println!("{line}");
    Ok(())
}

/// Largest absolute difference, and the RMS of the difference relative to the RMS of `want`.
fn logits_error(got: &[f32], want: &[f32]) -> (f32, f64) {
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let d: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let w: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (err, (d / w.max(f64::MIN_POSITIVE)).sqrt())
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        })
        .0
}

/// Seconds per decode step of `batch` sequences after a prefill of `ctx` tokens each, and one
/// sequence's cache bytes.
fn decode_time(
    model: &Model<Cpu>,
    ctx: usize,
    steps: usize,
    repeat: usize,
    batch: usize,
) -> Result<(f64, usize)> {
    let c = model.config();
    let toks: Vec<Vec<u32>> = (0..batch)
        .map(|b| random_tokens(ctx + steps, c.vocab_size, 9 + b as u64))
        .collect();
    let mut best = f64::MAX;
    let mut bytes = 0;
    for _ in 0..repeat {
        let mut states: Vec<_> = (0..batch).map(|_| model.new_state()).collect();
        for (st, t) in states.iter_mut().zip(&toks) {
            model.forward(st, &t[..ctx], Logits::None)?;
        }
        let t = Instant::now();
        for i in ctx..ctx + steps {
            let next: Vec<[u32; 1]> = toks.iter().map(|t| [t[i]]).collect();
            let mut seqs: Vec<_> = states
                .iter_mut()
                .zip(&next)
                .map(|(s, n)| (s, &n[..]))
                .collect();
            model.forward_batch(&mut seqs, Logits::Last)?;
        }
        best = best.min(t.elapsed().as_secs_f64() / steps as f64);
        bytes = states[0].cache_bytes(model.backend());
    }
    Ok((best, bytes))
}

/// See [`BenchKind::Context`].
fn context(
    dir: PathBuf,
    tokens: usize,
    ranks: usize,
    rounds: usize,
    link: Option<ringbolt_transport::Link>,
    exchange: ringbolt_context::StateExchange,
) -> Result<()> {
    let model = load_model(&dir)?;
    let c = model.config().clone();
    let toks = random_tokens(tokens, c.vocab_size, 5);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (mut base, mut cp) = (f64::MAX, f64::MAX);
    let mut best_times = Vec::new();
    let mut cache = Vec::new();
    let mut err = 0f32;
    for _ in 0..rounds {
        // One rank, one thread: the engine's own prefill, in chunks of 4096.
        let t = Instant::now();
        let want = one.install(|| -> Result<Vec<f32>> {
            let mut st = model.new_state();
            let mut last = Vec::new();
            for (i, part) in toks.chunks(4096).enumerate() {
                let end = (i + 1) * 4096 >= tokens;
                last =
                    model.forward(&mut st, part, if end { Logits::Last } else { Logits::None })?;
            }
            Ok(last)
        })?;
        base = base.min(t.elapsed().as_secs_f64());
        // The same prefill over either transport, timed from the ranks' start.
        fn timed<T: ringbolt_transport::Transport + 'static>(
            rt: &tokio::runtime::Runtime,
            model: &Model<Cpu>,
            toks: &[u32],
            group: Vec<T>,
            exchange: ringbolt_context::StateExchange,
        ) -> Result<(ringbolt_context::LocalPrefill<Cpu>, f64)> {
            let t = Instant::now();
            let got = ringbolt_context::prefill_group(
                rt.handle(),
                model,
                toks,
                group,
                exchange,
                &Default::default(),
            )?;
            Ok((got, t.elapsed().as_secs_f64()))
        }
        let (got, secs) = match link {
            None => {
                let group = ringbolt_transport::local::LocalGroup::ranks(
                    ranks,
                    0,
                    std::time::Duration::from_secs(3600),
                );
                timed(&rt, &model, &toks, group, exchange)?
            }
            Some(link) => {
                let (group, _) =
                    rt.block_on(ringbolt_transport::tcp::TcpTransport::loopback_group(
                        ranks,
                        1,
                        std::time::Duration::from_secs(3600),
                        link,
                    ))?;
                timed(&rt, &model, &toks, group, exchange)?
            }
        };
        if secs < cp {
            cp = secs;
            best_times = got.times.clone();
            cache = got.cache_bytes_per_rank.clone();
        }
        let max = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        err = err.max(
            want.iter()
                .zip(&got.logits)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / max,
        );
    }
    let layout = ringbolt_model::context::Layout::zigzag(tokens, ranks);
    let work: Vec<u64> = (0..ranks).map(|r| layout.softmax_work(r)).collect();
    let mean = work.iter().sum::<u64>() as f64 / ranks as f64;
    let total = |t: &ringbolt_context::RankTimes| {
        (t.compute + t.state_wait + t.ring_wait)
            .as_secs_f64()
            .max(1e-9)
    };
    let state_wait = best_times
        .iter()
        .map(|t| t.state_wait.as_secs_f64() / total(t))
        .fold(0f64, f64::max);
    let ring_wait = best_times
        .iter()
        .map(|t| t.ring_wait.as_secs_f64() / total(t))
        .fold(0f64, f64::max);
    let line = json!({
        "bench": "context",
        "tokens": tokens,
        "ranks": ranks,
        "softmax_layers": c.layers.iter().filter(|k| **k == LayerKind::Softmax).count(),
        "threads": rayon::current_num_threads(),
        "one_rank_seconds": base,
        "context_parallel_seconds": cp,
        "speedup": base / cp,
        "max_state_wait_fraction": state_wait,
        "max_ring_wait_fraction": ring_wait,
        "softmax_work_max_over_mean": *work.iter().max().unwrap_or(&0) as f64 / mean.max(1.0),
        "cache_bytes_per_rank": cache,
        "link_gbps": link.and_then(|l| l.bytes_per_second).map(|b| b / 1e9),
        "state_exchange": format!("{exchange:?}"),
        // The ring hops' transfers on the link, and how much of them compute hid.
        "ring_transfer_seconds_per_rank": best_times
            .iter()
            .map(|t| t.ring_transfer.as_secs_f64())
            .collect::<Vec<_>>(),
        "ring_hidden_fraction": best_times
            .iter()
            .map(|t| {
                let x = t.ring_transfer.as_secs_f64();
                if x > 0.0 {
                    1.0 - (t.ring_wait.as_secs_f64() / x).min(1.0)
                } else {
                    1.0
                }
            })
            .fold(1f64, f64::min),
        "bytes_sent_per_rank": best_times.iter().map(|t| t.sent).collect::<Vec<_>>(),
        "logits_max_relative_error": err,
    });
    println!("{line}");
    Ok(())
}

fn scaling(dir: PathBuf, lengths: &[usize], chunk: usize, rounds: usize) -> Result<()> {
    let model = load_model(&dir)?;
    let c = model.config().clone();
    if lengths.is_empty() || lengths.contains(&0) {
        bail!("--lengths needs positive lengths");
    }
    if rounds == 0 {
        bail!("--rounds must be positive");
    }
    let softmax_layers = c
        .layers
        .iter()
        .filter(|k| **k == LayerKind::Softmax)
        .count();
    // Lengths run in alternating rounds and each keeps its best time: the host's speed swings
    // within minutes, and a ratio of two single runs moved between 6.6 and 8.4.
    let mut best = vec![f64::MAX; lengths.len()];
    let mut cache = vec![0; lengths.len()];
    for _ in 0..rounds {
        for (i, &n) in lengths.iter().enumerate() {
            let toks = random_tokens(n, c.vocab_size, 3);
            let mut st = model.new_state();
            let step = if chunk == 0 { n } else { chunk };
            let t = Instant::now();
            for (p, part) in toks.chunks(step).enumerate() {
                let last = (p + 1) * step >= n;
                model.forward(
                    &mut st,
                    part,
                    if last { Logits::Last } else { Logits::None },
                )?;
            }
            best[i] = best[i].min(t.elapsed().as_secs_f64());
            cache[i] = st.cache_bytes(model.backend());
        }
    }
    let (n0, s0) = (lengths[0], best[0]);
    for (i, &n) in lengths.iter().enumerate() {
        let line = json!({
            "bench": "scaling",
            "softmax_layers": softmax_layers,
            "tokens": n,
            "rounds": rounds,
            "seconds": best[i],
            "length_ratio": n as f64 / n0 as f64,
            "time_ratio": best[i] / s0,
            "cache_bytes": cache[i],
            "peak_rss_bytes": peak_rss_bytes(),
        });
        println!("{line}");
    }
    Ok(())
}

/// One job through a server: its tokens, prefill tokens/s and decode tokens/s.
async fn timed_job(
    endpoint: &str,
    prompt: &[u32],
    new_tokens: u32,
) -> Result<(Vec<u32>, f64, f64)> {
    let t = timed(endpoint, prompt, new_tokens, false, 0).await?;
    Ok((t.tokens, t.prefill, t.decode))
}

/// What one job through a server measured.
pub struct Timed {
    pub tokens: Vec<u32>,
    /// Prompt tokens per second of prefill, and generated tokens per second of decode.
    pub prefill: f64,
    pub decode: f64,
    pub time_to_first_token: f64,
    /// Prompt tokens the context cache had.
    pub cached_tokens: u64,
}

/// One job through a server, with or without the server's context cache, split among
/// `context_parallel` ranks (0: the server's choice).
pub async fn timed(
    endpoint: &str,
    prompt: &[u32],
    new_tokens: u32,
    context_cache: bool,
    context_parallel: u32,
) -> Result<Timed> {
    let mut c = crate::client::connect(endpoint).await?;
    let header = ringbolt_proto::v1::JobHeader {
        max_new_tokens: new_tokens,
        sampling: Some(Default::default()),
        idempotency_key: String::new(),
        context_parallel,
        expected_prompt_tokens: prompt.len() as u64,
        // A benchmark measures the tokens it asks for, wherever the model would stop.
        ignore_eos: true,
        // ... and the prefill it asks for, unless it measures the cache.
        no_context_cache: !context_cache,
    };
    let r = crate::client::submit_tokens(&mut c, header, prompt.to_vec(), None, |_| {}).await?;
    let out = crate::client::watch(&mut c, &r.job_id, false).await?;
    let f = out.finished.unwrap_or_default();
    let t = f.timings.unwrap_or_default();
    Ok(Timed {
        prefill: prompt.len() as f64 / t.prefill_seconds.max(1e-9),
        decode: (out.tokens.len().saturating_sub(1)) as f64 / t.decode_seconds.max(1e-9),
        time_to_first_token: t.time_to_first_token_seconds,
        cached_tokens: f.cached_tokens,
        tokens: out.tokens,
    })
}

async fn cluster(
    checkpoint: PathBuf,
    lengths: Vec<usize>,
    new_tokens: u32,
    (attention_workers, expert_workers): (usize, usize),
    etcd: Option<String>,
    concurrent_jobs: usize,
) -> Result<()> {
    if lengths.is_empty() || lengths.contains(&0) {
        bail!("--prompt-tokens takes one or more positive lengths");
    }
    let cfg = ModelConfig::from_file(&checkpoint.join("config.json"))?;
    let mut rng = StdRng::seed_from_u64(7);
    let prompts: Vec<Vec<u32>> = lengths
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect()
        })
        .collect();
    let mut base = Vec::new();
    {
        let s = crate::local_cluster::StandaloneChild::start(&checkpoint).await?;
        for p in &prompts {
            base.push(timed_job(&s.endpoint, p, new_tokens).await?);
        }
    }
    let cl = crate::local_cluster::LocalCluster::start(
        &checkpoint,
        etcd,
        attention_workers,
        expert_workers,
    )
    .await?;
    for (p, (bt, bp, bd)) in prompts.iter().zip(&base) {
        let (ct, cp, cd) = timed_job(&cl.endpoint, p, new_tokens).await?;
        println!(
            "{}",
            json!({
                "bench": "cluster",
                "prompt_tokens": p.len(),
                "new_tokens": new_tokens,
                "attention_workers": attention_workers,
                "expert_workers": expert_workers,
                "standalone": {"prefill_tokens_per_second": bp, "decode_tokens_per_second": bd},
                "cluster": {"prefill_tokens_per_second": cp, "decode_tokens_per_second": cd},
                "prefill_ratio": cp / bp,
                "decode_ratio": cd / bd,
                "same_tokens": &ct == bt,
            })
        );
    }
    if concurrent_jobs > 0 {
        // The attention worker batches the decode steps of running jobs: the same jobs all at
        // once against one at a time, on the same cluster.
        let len = *lengths.iter().min().unwrap_or(&1);
        let ps: Vec<Vec<u32>> = (0..concurrent_jobs)
            .map(|_| {
                (0..len)
                    .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                    .collect()
            })
            .collect();
        let t = Instant::now();
        let mut one = Vec::new();
        for p in &ps {
            one.push(timed_job(&cl.endpoint, p, new_tokens).await?.0);
        }
        let one_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let all = futures::future::try_join_all(
            ps.iter().map(|p| timed_job(&cl.endpoint, p, new_tokens)),
        )
        .await?;
        let all_s = t.elapsed().as_secs_f64();
        let tokens = (concurrent_jobs * new_tokens as usize) as f64;
        println!(
            "{}",
            json!({
                "bench": "cluster_concurrent_jobs",
                "jobs": concurrent_jobs,
                "attention_workers": attention_workers,
                "expert_workers": expert_workers,
                "prompt_tokens": len,
                "new_tokens": new_tokens,
                "one_at_a_time": {"seconds": one_s, "generated_tokens_per_second": tokens / one_s},
                "all_at_once": {"seconds": all_s, "generated_tokens_per_second": tokens / all_s},
                "ratio": one_s / all_s,
                "same_tokens": all.iter().map(|r| &r.0).eq(one.iter()),
            })
        );
    }
    Ok(())
}
