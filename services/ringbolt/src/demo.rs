//! `ringbolt demo`: the README's first command. Writes the `small` random checkpoint to a
//! cache directory if absent, starts standalone in-process, submits a long prompt through the
//! real client, shows upload, prefill and decode progress, streams the tokens, and ends with a
//! short report.

use crate::client::{self, submit_tokens};
use crate::local_cluster::LocalCluster;
use crate::server::{StandaloneArgs, start_manager};
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng, rngs::StdRng};
use ringbolt_model::{ModelConfig, Preset, WeightDtype, write_random_checkpoint};
use ringbolt_proto::v1 as pb;
use std::path::PathBuf;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo checkpoint lives (written on first use).
    #[arg(long, env = "RINGBOLT_DEMO_CHECKPOINT")]
    checkpoint: Option<PathBuf>,
    /// Prompt length in tokens (random ids).
    #[arg(long, env = "RINGBOLT_DEMO_PROMPT_TOKENS", default_value_t = 32_768)]
    prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, env = "RINGBOLT_MAX_NEW_TOKENS", default_value_t = 32)]
    max_new_tokens: u32,
    /// Run a local cluster instead: a coordinator, attention and expert workers as child
    /// processes, with a real etcd (from the PATH unless --etcd is given).
    #[arg(long)]
    cluster: bool,
    /// etcd for --cluster (default: start `etcd` from the PATH in a temporary directory).
    #[arg(long, env = "RINGBOLT_ETCD", requires = "cluster")]
    etcd: Option<String>,
    /// Attention workers of the local cluster.
    #[arg(long, default_value_t = 1, requires = "cluster")]
    attention_workers: usize,
    /// Expert workers of the local cluster.
    #[arg(long, default_value_t = 2, requires = "cluster")]
    expert_workers: usize,
    /// After the job, keep serving until Ctrl-C: gRPC on 127.0.0.1:7070 and the
    /// OpenAI-compatible HTTP API on --http-listen (the README's examples run against it).
    #[arg(long, conflicts_with = "cluster")]
    serve: bool,
    /// Where `--serve` serves the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080", requires = "serve")]
    http_listen: std::net::SocketAddr,
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("ringbolt")
}

pub async fn run(a: DemoArgs) -> Result<()> {
    if a.prompt_tokens == 0 || a.max_new_tokens == 0 {
        bail!("--prompt-tokens and --max-new-tokens must be positive");
    }
    let dir = a
        .checkpoint
        .unwrap_or_else(|| cache_dir().join("small-seed0"));
    if !dir.join("config.json").exists() {
        eprintln!(
            "writing the `small` random checkpoint to {} ...",
            dir.display()
        );
        let d = dir.clone();
        tokio::task::spawn_blocking(move || {
            write_random_checkpoint(&Preset::Small.config(), 0, WeightDtype::Bf16, &d, None)
        })
        .await?
        .with_context(|| format!("writing {}", dir.display()))?;
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    // Text for the HTTP API's examples (demo checkpoints of older releases have none).
    if !dir.join("tokenizer.json").exists() {
        ringbolt_text::init::write(&dir, cfg.vocab_size, &[])?;
    }
    if a.cluster {
        if a.attention_workers == 0 || a.expert_workers == 0 {
            bail!("a cluster needs at least one attention worker and one expert worker");
        }
        eprintln!(
            "starting a local cluster: 1 coordinator, {} attention worker(s), {} expert worker(s) ...",
            a.attention_workers, a.expert_workers
        );
        let t_load = Instant::now();
        let cl = LocalCluster::start(&dir, a.etcd.clone(), a.attention_workers, a.expert_workers)
            .await?;
        eprintln!(
            "cluster ready in {:.1}s, coordinator on {}",
            t_load.elapsed().as_secs_f64(),
            cl.endpoint
        );
        cl.print_status().await?;
        run_job(&cl.endpoint, &cfg, a.prompt_tokens, a.max_new_tokens).await?;
        cl.print_status().await?;
        return Ok(());
    }
    let data = tempfile::tempdir()?;
    let mut args = StandaloneArgs::in_process(dir.clone(), data.path().to_path_buf());
    args.limits.max_new_tokens_limit = a.max_new_tokens.max(4096);
    if a.serve {
        args.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 7070));
        args.http.http_listen = Some(a.http_listen);
    }
    let token = CancellationToken::new();
    let t_load = Instant::now();
    let a2 = args.clone();
    let t2 = token.clone();
    let mgr = tokio::task::spawn_blocking(move || start_manager(&a2, t2)).await??;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let stop = token.clone();
    let shell = ringbolt_shell::Shell::plain(Default::default());
    let http = ringbolt_openai::start(
        &args.http,
        "demo",
        &dir,
        mgr.clone(),
        None,
        &shell,
        token.clone(),
    )
    .await?;
    let server = tokio::spawn(ringbolt_jobs::grpc::serve(
        mgr,
        shell,
        listener,
        None,
        async move { stop.cancelled().await },
    ));
    eprintln!(
        "standalone server on {addr} ({:.1}s to load {}): {} layers ({} lightning), hidden {}, {} experts top-{}",
        t_load.elapsed().as_secs_f64(),
        dir.display(),
        cfg.num_layers(),
        cfg.layers
            .iter()
            .filter(|k| **k == ringbolt_model::LayerKind::Lightning)
            .count(),
        cfg.hidden_size,
        cfg.num_experts,
        cfg.experts_per_tok
    );

    let endpoint = format!("http://{addr}");
    run_job(&endpoint, &cfg, a.prompt_tokens, a.max_new_tokens).await?;
    if a.serve {
        eprintln!(
            "serving until Ctrl-C: gRPC on {endpoint}, the OpenAI-compatible HTTP API on \
             http://{}/v1 (model `{}`); see README, Usage",
            a.http_listen,
            args.http.model_id(&dir)
        );
        crate::server::shutdown_signal(token.clone()).await;
    }
    token.cancel();
    let _ = server.await;
    if let Some(h) = http {
        let _ = h.await;
    }
    Ok(())
}

/// Submits a random prompt, shows its progress and tokens, and prints a report.
async fn run_job(
    endpoint: &str,
    cfg: &ModelConfig,
    prompt_tokens: usize,
    max_new_tokens: u32,
) -> Result<()> {
    let mut c = client::connect(endpoint).await?;
    let mut rng = StdRng::seed_from_u64(42);
    let prompt: Vec<u32> = (0..prompt_tokens)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let header = pb::JobHeader {
        max_new_tokens,
        sampling: Some(pb::SamplingParams::default()),
        idempotency_key: String::new(),
        context_parallel: 0,
        expected_prompt_tokens: prompt.len() as u64,
        ignore_eos: false,
        no_context_cache: false,
    };
    let up = ProgressBar::new(prompt.len() as u64).with_style(
        ProgressStyle::with_template("upload  {bar:40} {pos}/{len} tokens ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let up2 = up.clone();
    let t0 = Instant::now();
    let resp = submit_tokens(&mut c, header, prompt, None, move |n| up2.inc(n as u64)).await?;
    up.finish_and_clear();
    eprintln!(
        "job {} accepted: {} prompt tokens uploaded in {:.2}s",
        resp.job_id,
        resp.prompt_tokens,
        t0.elapsed().as_secs_f64()
    );
    let out = client::watch(&mut c, &resp.job_id, true).await?;
    let f = out.finished.unwrap_or_default();
    let t = f.timings.unwrap_or_default();
    println!("prompt tokens:        {}", f.prompt_tokens);
    println!(
        "prefill:              {:.0} tokens/s",
        f.prompt_tokens as f64 / t.prefill_seconds.max(1e-9)
    );
    if out.tokens.len() > 1 && t.decode_seconds > 0.0 {
        println!(
            "decode:               {:.1} tokens/s",
            (out.tokens.len() - 1) as f64 / t.decode_seconds
        );
    }
    println!(
        "time to first token:  {:.2} s",
        t.time_to_first_token_seconds
    );
    println!("generated:            {} tokens", out.tokens.len());
    Ok(())
}
