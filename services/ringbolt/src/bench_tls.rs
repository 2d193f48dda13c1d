//! `ringbolt bench tls`: what TLS costs where Ringbolt moves bytes — a long prompt's upload
//! through the public API (the same server on a plain and a TLS listener), and the data
//! plane's message sizes over a plain and a TLS stream on 127.0.0.1 (the data plane itself is
//! authenticated by the cluster secret, not encrypted: this is the price encryption would
//! add). Also the secret's handshake per connection. Rounds alternate; each side's best is
//! reported with the ratio.

use crate::client::submit_tokens;
use crate::server::{StandaloneArgs, start_manager};
use anyhow::Result;
use clap::Args;
use ringbolt_proto::v1 as pb;
use ringbolt_proto::v1::jobs_client::JobsClient;
use ringbolt_shell::{ClientTls, Dial, ServeArgs, TlsArgs};
use ringbolt_transport::guard::Guard;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct TlsBenchArgs {
    #[arg(long, env = "RINGBOLT_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Prompt tokens of each upload (4 bytes each on the wire).
    #[arg(long, default_value_t = 4 << 20)]
    prompt_tokens: usize,
    /// Bytes of one data-plane message (a layer step's routed rows).
    #[arg(long, default_value_t = 8 << 20)]
    message_bytes: usize,
    /// Messages per data-plane measurement.
    #[arg(long, default_value_t = 64)]
    messages: usize,
    /// Rounds (each side reports its best).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// An in-process engine for upload benchmarks: prompts of `prompt_tokens` accepted, one job
/// computing at a time, its data under `dir`.
pub async fn upload_engine(
    checkpoint: &std::path::Path,
    prompt_tokens: usize,
    dir: &std::path::Path,
    stop: &CancellationToken,
) -> Result<ringbolt_jobs::JobManager> {
    let mut args = StandaloneArgs {
        max_batch: 1,
        ..StandaloneArgs::in_process(checkpoint.to_path_buf(), dir.join("data"))
    };
    args.limits.max_new_tokens_limit = 16;
    args.limits.max_prompt_tokens = prompt_tokens as u64 + 1;
    args.limits.result_ttl_secs = 60;
    let s = stop.clone();
    tokio::task::spawn_blocking(move || start_manager(&args, s)).await?
}

/// Seconds to upload `ids` as a job through the gRPC API at `addr` until it is accepted; the
/// job is then cancelled (it is not what is measured).
pub async fn grpc_upload(dial: &Dial, addr: &str, ids: &[u32]) -> Result<f64> {
    let mut c = JobsClient::new(dial.connect(addr, Duration::from_secs(5)).await?)
        .max_encoding_message_size(ringbolt_jobs::grpc::MAX_MESSAGE_BYTES)
        .max_decoding_message_size(ringbolt_jobs::grpc::MAX_MESSAGE_BYTES);
    let header = pb::JobHeader {
        max_new_tokens: 1,
        ..Default::default()
    };
    let t = Instant::now();
    let r = submit_tokens(&mut c, header, ids.to_vec(), None, |_| {}).await?;
    let secs = t.elapsed().as_secs_f64();
    let _ = c
        .cancel_job(pb::CancelJobRequest { job_id: r.job_id })
        .await;
    Ok(secs)
}

pub fn run(a: TlsBenchArgs) -> Result<()> {
    crate::run_async(bench(a))
}

async fn bench(a: TlsBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = ringbolt_shell::testing::write_certs(dir.path());
    let stop = CancellationToken::new();

    // One engine, served on a plain and on a TLS listener.
    let mgr = upload_engine(&a.checkpoint, a.prompt_tokens, dir.path(), &stop).await?;
    let tls_args = ServeArgs {
        tls: TlsArgs {
            tls_cert: Some(certs.cert.clone()),
            tls_key: Some(certs.key.clone()),
            tls_client_ca: None,
        },
        ..Default::default()
    };
    let mut endpoints = Vec::new();
    for (name, serve) in [("plain", ServeArgs::default()), ("tls", tls_args)] {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let shell = serve.start("bench", addr, stop.clone())?;
        let dial = match name {
            "tls" => Dial::new(Some(ClientTls {
                ca: Some(certs.ca.clone()),
                identity: None,
                server_name: None,
            })),
            _ => Dial::default(),
        };
        let s = stop.clone();
        tokio::spawn(ringbolt_jobs::grpc::serve(
            mgr.clone(),
            shell,
            l,
            None,
            async move { s.cancelled().await },
        ));
        endpoints.push((name, addr.to_string(), dial));
    }
    let vocab = ringbolt_model::ModelConfig::from_file(&a.checkpoint.join("config.json"))?
        .vocab_size as u32;
    let ids: Vec<u32> = (0..a.prompt_tokens as u32)
        .map(|i| (i * 7919) % vocab)
        .collect();
    let mut upload = [f64::MAX; 2];
    for _ in 0..a.rounds.max(1) {
        for (i, (_, addr, dial)) in endpoints.iter().enumerate() {
            upload[i] = upload[i].min(grpc_upload(dial, addr, &ids).await?);
        }
    }
    let mb = (a.prompt_tokens * 4) as f64 / 1e6;

    // The data plane's messages over plain and TLS streams (mutual TLS, as between roles).
    let server_tls = ringbolt_shell::ServerTls::load(
        ringbolt_shell::ServerFiles {
            cert: certs.cert.clone(),
            key: certs.key.clone(),
            client_ca: Some(certs.ca.clone()),
        },
        &[],
    )?;
    let client_tls = ClientTls {
        ca: Some(certs.ca.clone()),
        identity: Some((certs.cert.clone(), certs.key.clone())),
        server_name: None,
    }
    .rustls()?;
    let mut stream = [f64::MAX; 2];
    for _ in 0..a.rounds.max(1) {
        for (i, tls) in [false, true].into_iter().enumerate() {
            let secs = pump(
                tls.then(|| (server_tls.config(), client_tls.clone())),
                a.message_bytes,
                a.messages,
            )
            .await?;
            stream[i] = stream[i].min(secs);
        }
    }
    let gb = (a.message_bytes * a.messages) as f64 / 1e9;

    // The secret's handshake: connections opened per second with and without it.
    let conns = 200;
    let open = handshakes(Guard::open(), conns).await?;
    let guarded = handshakes(Guard::secret(&[42u8; 32]), conns).await?;
    stop.cancel();
    println!(
        "{}",
        json!({
            "bench": "tls",
            "upload": {
                "prompt_tokens": a.prompt_tokens,
                "plain_mb_per_s": mb / upload[0],
                "tls_mb_per_s": mb / upload[1],
                "tls_over_plain": upload[0] / upload[1],
            },
            "data_plane_stream": {
                "message_bytes": a.message_bytes,
                "messages": a.messages,
                "plain_gb_per_s": gb / stream[0],
                "tls_gb_per_s": gb / stream[1],
                "tls_over_plain": stream[0] / stream[1],
            },
            "secret_handshake": {
                "connections": conns,
                "open_us_per_connection": open * 1e6 / conns as f64,
                "secret_us_per_connection": guarded * 1e6 / conns as f64,
            },
        })
    );
    Ok(())
}

/// Seconds to send `n` messages of `bytes` (each answered by an 8-byte acknowledgement, as
/// the exchange answers each request) over one connection, plain or TLS.
async fn pump(
    tls: Option<(
        Arc<tokio_rustls::rustls::ServerConfig>,
        Arc<tokio_rustls::rustls::ClientConfig>,
    )>,
    bytes: usize,
    n: usize,
) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let server_cfg = tls.as_ref().map(|t| t.0.clone());
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await?;
        s.set_nodelay(true)?;
        match server_cfg {
            Some(cfg) => {
                let s = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await?;
                sink(s, bytes, n).await
            }
            None => sink(s, bytes, n).await,
        }
    });
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let payload = vec![7u8; bytes];
    let secs = match tls {
        Some((_, cfg)) => {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost")?;
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, s)
                .await?;
            source(s, &payload, n).await?
        }
        None => source(s, &payload, n).await?,
    };
    server.await??;
    Ok(secs)
}

async fn source<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    payload: &[u8],
    n: usize,
) -> Result<f64> {
    let t = Instant::now();
    let mut ack = [0u8; 8];
    for _ in 0..n {
        s.write_all(payload).await?;
        s.flush().await?;
        s.read_exact(&mut ack).await?;
    }
    Ok(t.elapsed().as_secs_f64())
}

async fn sink<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    bytes: usize,
    n: usize,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; bytes];
    for _ in 0..n {
        s.read_exact(&mut buf).await?;
        s.write_all(&[1u8; 8]).await?;
        s.flush().await?;
    }
    Ok(())
}

/// Seconds to open `n` connections, each through `guard`'s handshake.
async fn handshakes(guard: Guard, n: usize) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let g = guard.clone();
    let server = tokio::spawn(async move {
        for _ in 0..n {
            let (mut s, _) = l.accept().await?;
            g.accept(&mut s, Duration::from_secs(5)).await?;
        }
        std::io::Result::Ok(())
    });
    let t = Instant::now();
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        guard.connect(&mut s, Duration::from_secs(5)).await?;
    }
    let secs = t.elapsed().as_secs_f64();
    server.await??;
    Ok(secs)
}
