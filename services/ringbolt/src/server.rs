//! `ringbolt standalone`: every role in one process, the embedded default.

use anyhow::{Context, Result};
use clap::Args;
use ringbolt_jobs::{EngineConfig, JobManager, JobStore, Limits};
use ringbolt_kernels::{Backend, OnBackend};
use ringbolt_model::{Checkpoint, Model};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Args, Clone)]
pub struct StandaloneArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, env = "RINGBOLT_CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// Address to serve the public gRPC API on (port 0: any free port).
    #[arg(long, env = "RINGBOLT_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Where job records and spooled prompts are kept.
    #[arg(long, env = "RINGBOLT_DATA_DIR")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub limits: ringbolt_cluster::JobLimitArgs,
    /// Sequences decoded together per step.
    #[arg(long, env = "RINGBOLT_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,
    /// Prompt tokens per prefill step.
    #[arg(long, env = "RINGBOLT_PREFILL_CHUNK", default_value_t = 4096)]
    pub prefill_chunk: usize,
    /// Ranks (threads) a job's prefill is split among by default (a job may ask for fewer):
    /// context parallelism within this process.
    #[arg(long, env = "RINGBOLT_CONTEXT_PARALLEL", default_value_t = 1)]
    pub context_parallel: u32,
    /// A Hugging Face `tokenizer.json` for text prompts (default: the checkpoint's, if any).
    #[arg(long, env = "RINGBOLT_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub compute: ringbolt_cluster::ComputeArgs,
    #[command(flatten)]
    pub auth: ringbolt_cluster::AuthArgs,
    #[command(flatten)]
    pub context_cache: ringbolt_cluster::ContextCacheArgs,
    #[command(flatten)]
    pub serve: ringbolt_shell::ServeArgs,
    #[command(flatten)]
    pub http: ringbolt_openai::HttpArgs,
}

impl StandaloneArgs {
    /// A server in this process on 127.0.0.1 (any port), on the CPU, without tokens or TLS:
    /// the demo's and the benchmarks' base, which they adjust field by field.
    pub fn in_process(checkpoint: PathBuf, data_dir: PathBuf) -> Self {
        StandaloneArgs {
            checkpoint,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            limits: ringbolt_cluster::JobLimitArgs {
                max_jobs: 4,
                result_ttl_secs: 3600,
                ..Default::default()
            },
            max_batch: 8,
            prefill_chunk: 4096,
            context_parallel: 1,
            tokenizer: None,
            compute: Default::default(),
            auth: Default::default(),
            // What the demo and benchmarks measure is the prefill itself.
            context_cache: ringbolt_cluster::ContextCacheArgs::off(),
            serve: Default::default(),
            http: Default::default(),
        }
    }
}

/// The engine's start once the device's backend is open: the model is loaded onto it and
/// moved to the engine thread, the only thread that computes with it.
struct StartEngine {
    ckpt: Checkpoint,
    weights: ringbolt_kernels::WeightFormat,
    store: JobStore,
    limits: Limits,
    engine: EngineConfig,
    text: Option<std::sync::Arc<ringbolt_text::Text>>,
    shutdown: CancellationToken,
}

impl OnBackend for StartEngine {
    type Output = Result<JobManager>;
    fn run<B: Backend>(self, backend: B) -> Result<JobManager> {
        let model = Model::load_parts(&self.ckpt, backend, true, self.weights)?;
        Ok(JobManager::start(
            model,
            self.store,
            self.limits,
            self.engine,
            self.text,
            self.shutdown,
        )?)
    }
}

/// Loads the model, recovers the job store and starts the engine; returns the manager.
pub fn start_manager(a: &StandaloneArgs, shutdown: CancellationToken) -> Result<JobManager> {
    start_manager_with(a, a.context_cache.open()?, shutdown)
}

/// [`start_manager`] with the context cache `cache` (one its caller also reads).
pub fn start_manager_with(
    a: &StandaloneArgs,
    cache: Option<ringbolt_model::prefix::ContextCache>,
    shutdown: CancellationToken,
) -> Result<JobManager> {
    let ckpt = Checkpoint::open(&a.checkpoint)?;
    let store =
        JobStore::open(&a.data_dir).with_context(|| format!("opening {}", a.data_dir.display()))?;
    let limits = a.limits.limits(a.context_parallel, &a.auth);
    let engine = EngineConfig {
        max_batch: a.max_batch.max(1),
        prefill_chunk: a.prefill_chunk.max(1),
        context_parallel: a.context_parallel.max(1) as usize,
        context_cache: cache,
    };
    let text = ringbolt_text::Text::load(&a.checkpoint, a.tokenizer.as_deref())?.map(Into::into);
    a.compute.open(StartEngine {
        ckpt,
        weights: a.compute.weights,
        store,
        limits,
        engine,
        text,
        shutdown,
    })?
}

pub async fn shutdown_signal(token: CancellationToken) {
    tokio::select! {
        _ = ringbolt_cluster::wait_for_signal() => {}
        _ = token.cancelled() => {}
    }
    token.cancel();
}

pub async fn standalone(a: StandaloneArgs) -> Result<()> {
    let token = CancellationToken::new();
    let shell = a.serve.start("standalone", a.listen, token.clone())?;
    let mgr = start_manager(&a, token.clone())?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let addr = listener.local_addr()?;
    eprintln!("ringbolt standalone listening on {addr}");
    let tokens = a.auth.tokens()?;
    ringbolt_shell::warn_if_exposed(addr, tokens.is_some(), || {
        format!(
            "standalone accepts jobs from anyone who can reach {addr}: give \
             --auth-tokens-file to require a token"
        )
    });
    let http = ringbolt_openai::start(
        &a.http,
        "standalone",
        &a.checkpoint,
        mgr.clone(),
        tokens.clone(),
        &shell,
        token.clone(),
    )
    .await?;
    ringbolt_jobs::grpc::serve(mgr, shell, listener, tokens, shutdown_signal(token.clone()))
        .await?;
    token.cancel();
    if let Some(h) = http {
        h.await??;
    }
    Ok(())
}
