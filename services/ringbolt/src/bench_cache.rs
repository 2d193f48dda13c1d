//! `ringbolt bench cache`: the context cache's case — one long document, then several short
//! questions about it, each a job whose prompt is the document and the question. The first
//! question prefills the whole document (cold, filling the cache); the others start after the
//! document's cached blocks. Reports each question's time to first token, the warm ones' median
//! against the cold one, and the memory the cache holds per cached token against the planner's
//! figure for a context.

use crate::server::{StandaloneArgs, start_manager_with};
use anyhow::{Result, bail};
use clap::Args;
use rand::{Rng, SeedableRng, rngs::StdRng};
use ringbolt_model::ModelConfig;
use ringbolt_model::prefix::ContextCache;
use serde_json::json;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct CacheBenchArgs {
    #[arg(long, env = "RINGBOLT_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Tokens of the document every question shares.
    #[arg(long, default_value_t = 262_144)]
    document_tokens: usize,
    /// Questions asked (the first is the cold one).
    #[arg(long, default_value_t = 9)]
    questions: usize,
    /// Tokens of each question.
    #[arg(long, default_value_t = 200)]
    question_tokens: usize,
    /// Prompt tokens per prefill step (the cache's block).
    #[arg(long, default_value_t = 4096)]
    prefill_chunk: usize,
    /// The cache's memory budget.
    #[arg(long, default_value_t = 8 << 30)]
    context_cache_bytes: usize,
    /// Ask a local cluster instead (a coordinator, two attention workers each with its own
    /// cache at the default budget, two expert workers; etcd from the PATH): the coordinator
    /// routes each question to the worker holding the document.
    #[arg(long)]
    cluster: bool,
    /// Prefill every question with a context-parallel group of this many ranks (standalone:
    /// threads; --cluster: attention workers, at most two); each rank keeps its share of the
    /// document in its cache.
    #[arg(long, default_value_t = 1)]
    context_parallel: u32,
}

pub fn run(a: CacheBenchArgs) -> Result<()> {
    crate::run_async(bench(a))
}

async fn bench(a: CacheBenchArgs) -> Result<()> {
    if a.questions < 2 || a.question_tokens == 0 || a.document_tokens == 0 {
        bail!("--questions must be at least 2, and the document and questions not empty");
    }
    let cfg = ModelConfig::from_file(&a.checkpoint.join("config.json"))?;
    let dir = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let cache = ContextCache::new(a.context_cache_bytes, None)?;
    let mut cluster = None;
    let endpoint = if a.cluster {
        let cl = crate::local_cluster::LocalCluster::start(&a.checkpoint, None, 2, 2).await?;
        let ep = cl.endpoint.clone();
        cluster = Some(cl);
        ep
    } else {
        let args = StandaloneArgs {
            prefill_chunk: a.prefill_chunk,
            max_batch: 1,
            context_parallel: a.context_parallel.max(1),
            ..StandaloneArgs::in_process(a.checkpoint.clone(), dir.path().join("data"))
        };
        let (a2, c2, s2) = (args.clone(), cache.clone(), stop.clone());
        let mgr =
            tokio::task::spawn_blocking(move || start_manager_with(&a2, Some(c2), s2)).await??;
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let s = stop.clone();
        tokio::spawn(ringbolt_jobs::grpc::serve(
            mgr,
            ringbolt_shell::Shell::plain(Default::default()),
            listener,
            None,
            async move { s.cancelled().await },
        ));
        endpoint
    };
    let mut rng = StdRng::seed_from_u64(11);
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..cfg.vocab_size as u32))
            .collect()
    };
    let document = ids(a.document_tokens);
    let mut ttft = Vec::new();
    let mut cached = Vec::new();
    for q in 0..a.questions {
        let mut prompt = document.clone();
        prompt.extend(ids(a.question_tokens));
        let t = crate::bench::timed(&endpoint, &prompt, 1, true, a.context_parallel).await?;
        eprintln!(
            "question {q}: {} cached tokens, time to first token {:.3} s",
            t.cached_tokens, t.time_to_first_token
        );
        ttft.push(t.time_to_first_token);
        cached.push(t.cached_tokens);
    }
    stop.cancel();
    drop(cluster);
    let mut warm = ttft[1..].to_vec();
    warm.sort_by(f64::total_cmp);
    let median = warm[warm.len() / 2];
    let stats = cache.stats();
    let planner = ringbolt_planner::ContextCost::of(&cfg, 4);
    let cached_tokens = cached[1..].iter().copied().max().unwrap_or(0);
    // One set of lightning states per block, or per group prefix (on its decoding rank).
    let blocks = if a.context_parallel > 1 {
        1
    } else {
        (cached_tokens as usize).div_ceil(a.prefill_chunk) as u64
    };
    println!(
        "{}",
        json!({
            "bench": "cache",
            "where": if a.cluster { "cluster: 2 attention workers, 2 expert workers" } else { "standalone" },
            "context_parallel": a.context_parallel.max(1),
            "document_tokens": a.document_tokens,
            "question_tokens": a.question_tokens,
            "prefill_chunk": a.prefill_chunk,
            "cold_ttft_seconds": ttft[0],
            "warm_ttft_seconds": &ttft[1..],
            "warm_median_ttft_seconds": median,
            "cold_over_warm": ttft[0] / median,
            "cached_tokens": cached,
            // In a cluster the caches are the workers' (not measured here).
            "cache": if a.cluster { serde_json::Value::Null } else { json!({
                "bytes": stats.bytes,
                "entries": stats.entries,
                "bytes_per_cached_token": stats.bytes as f64 / cached_tokens.max(1) as f64,
                "planner_kv_bytes_per_token": planner.kv_bytes_per_token,
                "planner_bytes_per_cached_token": (cached_tokens * planner.kv_bytes_per_token
                    + blocks * planner.state_bytes) as f64 / cached_tokens.max(1) as f64,
                "lightning_state_bytes_per_block": planner.state_bytes,
            })},
        })
    );
    Ok(())
}
