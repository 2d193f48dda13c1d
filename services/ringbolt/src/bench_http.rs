//! `ringbolt bench http`: a long prompt's upload through the OpenAI-compatible HTTP API (JSON
//! token ids) against the same prompt through the gRPC API (packed ids), one engine behind
//! both, on 127.0.0.1. A request counts until the server has accepted the job (durable, its
//! answer begun); the job is then dropped. Rounds alternate; each side's best is reported.

use crate::client::submit_tokens;
use crate::server::{StandaloneArgs, start_manager};
use anyhow::{Result, bail};
use clap::Args;
use ringbolt_proto::v1 as pb;
use ringbolt_proto::v1::jobs_client::JobsClient;
use ringbolt_shell::{Dial, Shell};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct HttpBenchArgs {
    /// A checkpoint whose positions hold the prompt.
    #[arg(long, env = "RINGBOLT_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Prompt tokens of each upload.
    #[arg(long, default_value_t = 4 << 20)]
    prompt_tokens: usize,
    /// Rounds (each side reports its best).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub fn run(a: HttpBenchArgs) -> Result<()> {
    crate::run_async(bench(a))
}

/// Seconds until the HTTP API answers `body` (a streamed completion) with its status line and
/// headers: the job is accepted then. Closing the connection cancels it.
async fn http_upload(addr: std::net::SocketAddr, body: &[u8]) -> Result<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("the HTTP API closed the connection");
        }
        got.extend_from_slice(&buf[..n]);
    }
    let secs = t.elapsed().as_secs_f64();
    if !got.starts_with(b"HTTP/1.1 200") {
        bail!("the HTTP API answered {}", String::from_utf8_lossy(&got));
    }
    Ok(secs)
}

async fn bench(a: HttpBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let args = StandaloneArgs {
        max_new_tokens_limit: 16,
        max_prompt_tokens: a.prompt_tokens as u64 + 1,
        result_ttl_secs: 60,
        max_batch: 1,
        ..StandaloneArgs::in_process(a.checkpoint.clone(), dir.path().join("data"))
    };
    let (a2, s2) = (args.clone(), stop.clone());
    let mgr = tokio::task::spawn_blocking(move || start_manager(&a2, s2)).await??;
    let shell = Shell::plain(Default::default());
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_addr = grpc.local_addr()?.to_string();
    let s = stop.clone();
    tokio::spawn(ringbolt_jobs::grpc::serve(
        mgr.clone(),
        shell.clone(),
        grpc,
        None,
        async move { s.cancelled().await },
    ));
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let http_addr = http.local_addr()?;
    let api = ringbolt_openai::Api::new(mgr.clone(), "bench".into(), None);
    let s = stop.clone();
    tokio::spawn(async move {
        ringbolt_openai::serve(
            api,
            ringbolt_openai::DEFAULT_MAX_BODY_BYTES,
            &shell,
            http,
            async move { s.cancelled().await },
        )
        .await
    });

    let vocab = ringbolt_model::ModelConfig::from_file(&a.checkpoint.join("config.json"))?
        .vocab_size as u32;
    let ids: Vec<u32> = (0..a.prompt_tokens as u32)
        .map(|i| (i * 7919) % vocab)
        .collect();
    let body = serde_json::to_vec(&json!({
        "model": "bench", "prompt": ids, "max_tokens": 1, "stream": true,
    }))?;
    let dial = Dial::default();
    let (mut grpc_best, mut http_best) = (f64::MAX, f64::MAX);
    for _ in 0..a.rounds.max(1) {
        let mut c = JobsClient::new(dial.connect(&grpc_addr, Duration::from_secs(5)).await?)
            .max_encoding_message_size(ringbolt_jobs::grpc::MAX_MESSAGE_BYTES)
            .max_decoding_message_size(ringbolt_jobs::grpc::MAX_MESSAGE_BYTES);
        let header = pb::JobHeader {
            max_new_tokens: 1,
            ..Default::default()
        };
        let t = Instant::now();
        let r = submit_tokens(&mut c, header, ids.clone(), None, |_| {}).await?;
        grpc_best = grpc_best.min(t.elapsed().as_secs_f64());
        let _ = c
            .cancel_job(pb::CancelJobRequest { job_id: r.job_id })
            .await;
        http_best = http_best.min(http_upload(http_addr, &body).await?);
        // The job is not what is measured: stop it before it computes.
        for rec in mgr.list(16, None)?.0 {
            if !rec.state.is_finished() {
                let _ = mgr.cancel(&rec.id);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    let n = a.prompt_tokens as f64;
    println!(
        "{}",
        json!({
            "bench": "http",
            "prompt_tokens": a.prompt_tokens,
            "grpc": {"bytes": a.prompt_tokens * 4, "seconds": grpc_best, "tokens_per_s": n / grpc_best},
            "http": {"bytes": body.len(), "seconds": http_best, "tokens_per_s": n / http_best},
            "http_over_grpc_time": http_best / grpc_best,
        })
    );
    Ok(())
}
