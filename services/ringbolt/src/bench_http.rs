//! `ringbolt bench http`: a long prompt's upload through the OpenAI-compatible HTTP API (JSON
//! token ids) against the same prompt through the gRPC API (packed ids), one engine behind
//! both, on 127.0.0.1. A request counts until the server has accepted the job (durable, its
//! answer begun); the job is then dropped. Rounds alternate; each side's best is reported.

use anyhow::{Result, bail};
use clap::Args;
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
    let mgr =
        crate::bench_tls::upload_engine(&a.checkpoint, a.prompt_tokens, dir.path(), &stop).await?;
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
        grpc_best = grpc_best.min(crate::bench_tls::grpc_upload(&dial, &grpc_addr, &ids).await?);
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
