//! The client side of the public API: `submit`, `jobs`, `status`.

use crate::model_cli::PromptArgs;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ringbolt_proto::v1 as pb;
use ringbolt_proto::v1::cluster_client::ClusterClient;
use ringbolt_proto::v1::jobs_client::JobsClient;
use ringbolt_shell::{ClientTls, Dial};
use serde_json::json;
use std::io::Write;

/// Tokens per uploaded chunk (1 MiB of packed ids).
pub const CHUNK_TOKENS: usize = 256 * 1024;

/// A gRPC failure as the CLI reports it: `code: message` on stderr, non-zero exit.
#[derive(Debug, thiserror::Error)]
#[error("{:?}: {}{}", .0.code(), .0.message(), hint(.0))]
pub struct RpcError(pub tonic::Status);

/// What a bare transport failure most likely means.
fn hint(s: &tonic::Status) -> &'static str {
    let garbled = s.code() == tonic::Code::Internal && s.message().contains("h2 protocol error");
    // A TLS server closes a plain-text connection at its first bytes; the client sees one of
    // these, depending on how far its request got.
    let dropped = (s.code() == tonic::Code::Unknown && s.message().contains("transport error"))
        || (s.code() == tonic::Code::Cancelled && s.message().contains("operation was canceled"));
    if garbled || dropped {
        " (if the server uses TLS, dial https://HOST:PORT, with --tls-ca for a private CA)"
    } else {
        ""
    }
}

impl From<tonic::Status> for RpcError {
    fn from(s: tonic::Status) -> Self {
        RpcError(s)
    }
}

/// How long the client keeps trying to reach a server (a standby coordinator takes over
/// within its lease TTL).
fn connect_window() -> std::time::Duration {
    let secs = std::env::var("RINGBOLT_CONNECT_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    std::time::Duration::from_secs(secs)
}

/// How this process dials servers (`--tls-ca`, `--token`), set once at start.
static DIAL: std::sync::OnceLock<Dial> = std::sync::OnceLock::new();

/// Sets how requests are made (once, at start): the CA `https://` servers must be signed by
/// (None: the system's roots) and the token requests carry.
pub fn set_dial(tls_ca: Option<std::path::PathBuf>, token: Option<&str>) -> Result<()> {
    let tls = tls_ca.map(|ca| ClientTls {
        ca: Some(ca),
        identity: None,
        server_name: None,
    });
    let _ = DIAL.set(Dial::new(tls).with_token(token)?);
    Ok(())
}

fn dial() -> Dial {
    DIAL.get().cloned().unwrap_or_default()
}

/// Connects to the first of `endpoints` (comma-separated: a coordinator and its standby)
/// that answers, trying them in turn for up to `RINGBOLT_CONNECT_TIMEOUT_SECS` (10 s). An
/// endpoint is `https://HOST:PORT` (TLS), `http://HOST:PORT` or `HOST:PORT` (plain text, or TLS
/// with `--tls-ca`).
pub async fn connect_channel(endpoints: &str) -> Result<Conn> {
    let d = dial();
    let list: Vec<&str> = endpoints
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if list.is_empty() {
        bail!("no endpoint given");
    }
    for e in &list {
        d.endpoint(e)?;
    }
    let deadline = std::time::Instant::now() + connect_window();
    let mut last = String::new();
    loop {
        for e in &list {
            match d.connect(e, std::time::Duration::from_secs(2)).await {
                Ok(ch) => return Ok(ch),
                Err(err) => last = err.to_string(),
            }
        }
        if std::time::Instant::now() >= deadline {
            bail!("cannot connect to {endpoints} (last error: {last})");
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// A connection whose requests carry the token.
pub type Conn = ringbolt_shell::Peer;

/// [`connect_channel`] as a client of the job API.
pub async fn connect(endpoints: &str) -> Result<JobsClient<Conn>> {
    Ok(JobsClient::new(connect_channel(endpoints).await?)
        .max_decoding_message_size(ringbolt_jobs::grpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ringbolt_jobs::grpc::MAX_MESSAGE_BYTES))
}

/// Whether a failed watch may succeed on another try (server gone or taking over).
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) || (s.code() == tonic::Code::Internal && s.message().contains("h2"))
}

/// Follows a job to its end like [`watch`], reconnecting (to any of `endpoints`) when the
/// server goes away; tokens already received are not repeated.
pub async fn follow(endpoints: &str, id: &str, live: bool) -> Result<Outcome> {
    let mut out = Outcome::new(id);
    let mut client = connect(endpoints).await?;
    // Reconnects are bounded: at most 20 in a row that bring no new token.
    let mut idle = 0;
    loop {
        let before = out.tokens.len();
        match watch_into(&mut client, id, live, &mut out).await {
            Ok(()) => return Ok(out),
            Err(RpcError(s)) if transient(&s) => {
                idle = if out.tokens.len() > before {
                    0
                } else {
                    idle + 1
                };
                if idle > 20 {
                    return Err(RpcError(s).into());
                }
                if live {
                    eprintln!(
                        "\nconnection lost ({}); reconnecting after {} tokens",
                        s.message(),
                        out.tokens.len().max(before)
                    );
                }
                client = connect(endpoints).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[derive(Args)]
pub struct SubmitArgs {
    /// PEM CA the server's certificate must be signed by (`https://` endpoints; default: the
    /// system's roots); given, endpoints without a scheme are dialed over TLS too.
    #[arg(long, env = "RINGBOLT_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Server address, e.g. http://127.0.0.1:7070 or https://HOST:PORT (comma-separate a coordinator and its standby).
    #[arg(long, env = "RINGBOLT_ENDPOINT")]
    pub endpoint: String,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Text prompt (needs a server with a tokenizer).
    #[arg(long, env = "RINGBOLT_TEXT", conflicts_with_all = ["tokens", "tokens_file"])]
    pub text: Option<String>,
    #[arg(long, env = "RINGBOLT_MAX_NEW_TOKENS")]
    pub max_new_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, env = "RINGBOLT_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, env = "RINGBOLT_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, env = "RINGBOLT_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Token ids that end generation (comma-separated).
    #[arg(long, env = "RINGBOLT_STOP_TOKENS", value_delimiter = ',')]
    pub stop_tokens: Vec<u32>,
    /// Keep generating past the model's end-of-sequence tokens (by default they end a job).
    #[arg(long, env = "RINGBOLT_IGNORE_EOS")]
    pub ignore_eos: bool,
    /// Same key, same job: retries return the first job.
    #[arg(long, env = "RINGBOLT_IDEMPOTENCY_KEY")]
    pub idempotency_key: Option<String>,
    /// Neither start from nor add to the server's context cache (the results are the same).
    #[arg(long, env = "RINGBOLT_NO_CONTEXT_CACHE")]
    pub no_context_cache: bool,
    /// Context-parallel degree (attention workers splitting the context).
    #[arg(long, env = "RINGBOLT_CONTEXT_PARALLEL", default_value_t = 0)]
    pub context_parallel: u32,
    /// An image (PNG or JPEG) for the prompt's next image placeholder (a MiniMax-VL-01
    /// model's `image_token_index`; one per image, in order). Repeatable.
    #[arg(long = "image")]
    pub images: Vec<std::path::PathBuf>,
    /// Print the job id once accepted and exit.
    #[arg(long, env = "RINGBOLT_DETACH")]
    pub detach: bool,
    /// Print one JSON line at the end.
    #[arg(long, env = "RINGBOLT_JSON")]
    pub json: bool,
}

#[derive(Args)]
pub struct JobsArgs {
    /// PEM CA the server's certificate must be signed by (`https://` endpoints; default: the
    /// system's roots); given, endpoints without a scheme are dialed over TLS too.
    #[arg(long, env = "RINGBOLT_TLS_CA", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub cmd: JobsCmd,
}

#[derive(Subcommand)]
pub enum JobsCmd {
    /// The newest jobs.
    List {
        #[arg(long, env = "RINGBOLT_ENDPOINT")]
        endpoint: String,
        /// How many (0: all).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, env = "RINGBOLT_JSON")]
        json: bool,
    },
    /// One job's state and tokens so far.
    Get {
        id: String,
        #[arg(long, env = "RINGBOLT_ENDPOINT")]
        endpoint: String,
        #[arg(long, env = "RINGBOLT_JSON")]
        json: bool,
    },
    /// Follow a job to its end (from the start, whenever you connect).
    Wait {
        id: String,
        #[arg(long, env = "RINGBOLT_ENDPOINT")]
        endpoint: String,
        #[arg(long, env = "RINGBOLT_JSON")]
        json: bool,
    },
    /// Cancel a job.
    Cancel {
        id: String,
        #[arg(long, env = "RINGBOLT_ENDPOINT")]
        endpoint: String,
        #[arg(long, env = "RINGBOLT_JSON")]
        json: bool,
    },
}

#[derive(Args)]
pub struct StatusArgs {
    /// PEM CA the server's certificate must be signed by (`https://` endpoints; default: the
    /// system's roots); given, endpoints without a scheme are dialed over TLS too.
    #[arg(long, env = "RINGBOLT_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    #[arg(long, env = "RINGBOLT_ENDPOINT")]
    pub endpoint: String,
    #[arg(long, env = "RINGBOLT_JSON")]
    pub json: bool,
}

/// Uploads a prompt; returns the server's answer. `on_chunk` sees each chunk's size.
pub async fn submit_tokens(
    client: &mut JobsClient<Conn>,
    header: pb::JobHeader,
    ids: Vec<u32>,
    text: Option<String>,
    on_chunk: impl Fn(usize) + Send + 'static,
) -> Result<pb::SubmitJobResponse, RpcError> {
    submit_prompt(client, header, ids, text, Vec::new(), on_chunk).await
}

/// Bytes of an image file per prompt chunk.
const IMAGE_PIECE_BYTES: usize = 1 << 20;

/// Uploads a prompt with images (files, in placeholder order, after the tokens).
pub async fn submit_prompt(
    client: &mut JobsClient<Conn>,
    header: pb::JobHeader,
    ids: Vec<u32>,
    text: Option<String>,
    images: Vec<Vec<u8>>,
    on_chunk: impl Fn(usize) + Send + 'static,
) -> Result<pb::SubmitJobResponse, RpcError> {
    use pb::submit_job_request::Item;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let req = |item| pb::SubmitJobRequest { item: Some(item) };
        if tx.send(req(Item::Header(header))).await.is_err() {
            return;
        }
        if let Some(t) = text {
            let _ = tx
                .send(req(Item::Chunk(pb::PromptChunk {
                    text: t,
                    ..Default::default()
                })))
                .await;
        }
        for chunk in ids.chunks(CHUNK_TOKENS) {
            let c = pb::PromptChunk {
                tokens: ringbolt_proto::pack_tokens(chunk),
                ..Default::default()
            };
            if tx.send(req(Item::Chunk(c))).await.is_err() {
                return;
            }
            on_chunk(chunk.len());
        }
        for image in images {
            // An empty file is still one (last) piece, for the server to refuse.
            let pieces = image.chunks(IMAGE_PIECE_BYTES).count().max(1);
            for i in 0..pieces {
                let at = (i * IMAGE_PIECE_BYTES).min(image.len());
                let end = (at + IMAGE_PIECE_BYTES).min(image.len());
                let c = pb::PromptChunk {
                    image: Some(pb::ImagePiece {
                        data: image[at..end].to_vec(),
                        last: i + 1 == pieces,
                    }),
                    ..Default::default()
                };
                if tx.send(req(Item::Chunk(c))).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(req(Item::End(pb::PromptEnd {}))).await;
    });
    Ok(client
        .submit_job(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner())
}

/// The end of a watched job.
pub struct Outcome {
    pub job_id: String,
    pub tokens: Vec<u32>,
    /// The generated text, when the server has the model's tokenizer.
    pub text: Option<String>,
    pub finished: Option<pb::Finished>,
}

impl Outcome {
    fn new(id: &str) -> Self {
        Outcome {
            job_id: id.to_string(),
            tokens: Vec::new(),
            text: None,
            finished: None,
        }
    }
}

pub fn outcome_json(o: &Outcome) -> serde_json::Value {
    let f = o.finished.clone().unwrap_or_default();
    let t = f.timings.unwrap_or_default();
    let mut v = json!({
        "job_id": o.job_id,
        "tokens": o.tokens,
        "finish_reason": pb::FinishReason::try_from(f.reason).map(|r| r.as_str_name().trim_start_matches("FINISH_REASON_").to_lowercase()).unwrap_or_default(),
        "prompt_tokens": f.prompt_tokens,
        "cached_tokens": f.cached_tokens,
        "timings": {
            "queued_seconds": t.queued_seconds,
            "prefill_seconds": t.prefill_seconds,
            "decode_seconds": t.decode_seconds,
            "time_to_first_token_seconds": t.time_to_first_token_seconds,
        },
    });
    if let Some(text) = &o.text {
        v["text"] = json!(text);
    }
    v
}

/// Follows a job from its first event to its end. `live` prints progress and tokens.
pub async fn watch(
    client: &mut JobsClient<Conn>,
    id: &str,
    live: bool,
) -> Result<Outcome, RpcError> {
    let mut out = Outcome::new(id);
    watch_into(client, id, live, &mut out).await?;
    Ok(out)
}

/// Follows a job into `out`; tokens `out` already has are checked and skipped (a watch
/// replays the job from its start).
async fn watch_into(
    client: &mut JobsClient<Conn>,
    id: &str,
    live: bool,
    out: &mut Outcome,
) -> Result<(), RpcError> {
    use pb::job_event::Event;
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: id.to_string(),
        })
        .await?
        .into_inner();
    let bar = if live {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} prompt tokens ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("queued ");
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Accepted(a)) => bar.set_length(a.prompt_tokens),
            Some(Event::Progress(p)) if p.phase == pb::Phase::Prefill as i32 => {
                bar.set_message("prefill");
                bar.set_position(p.prompt_tokens_done);
            }
            Some(Event::Progress(_)) => {}
            Some(Event::Token(t))
                if (t.index as usize) < out.tokens.len()
                    && out.tokens[t.index as usize] != t.token =>
            {
                return Err(RpcError(tonic::Status::data_loss(format!(
                    "token {} changed from {} to {} on reconnect",
                    t.index, out.tokens[t.index as usize], t.token
                ))));
            }
            // Replayed after a reconnect: the client has it already.
            Some(Event::Token(t)) if (t.index as usize) < out.tokens.len() => {}
            Some(Event::Token(t)) => {
                if t.index as usize != out.tokens.len() {
                    return Err(RpcError(tonic::Status::data_loss(format!(
                        "token {} arrived where {} was expected",
                        t.index,
                        out.tokens.len()
                    ))));
                }
                if live {
                    if out.tokens.is_empty() {
                        bar.finish_and_clear();
                        if t.text.is_none() {
                            print!("tokens:");
                        }
                    }
                    match &t.text {
                        Some(piece) => print!("{piece}"),
                        None => print!(" {}", t.token),
                    }
                    let _ = std::io::stdout().flush();
                }
                if let Some(piece) = &t.text {
                    out.text.get_or_insert_default().push_str(piece);
                }
                out.tokens.push(t.token);
            }
            Some(Event::Finished(f)) => {
                bar.finish_and_clear();
                if let Some(rest) = &f.text {
                    out.text.get_or_insert_default().push_str(rest);
                    if live {
                        print!("{rest}");
                    }
                }
                if live {
                    println!();
                }
                out.finished = Some(f);
                return Ok(());
            }
            Some(Event::Failed(f)) => {
                bar.finish_and_clear();
                return Err(RpcError(tonic::Status::new(
                    tonic::Code::from(f.code),
                    f.message,
                )));
            }
            None => {}
        }
    }
    Err(RpcError(tonic::Status::unavailable(
        "the job stream ended before the job did",
    )))
}

fn print_summary(o: &Outcome) {
    let f = o.finished.clone().unwrap_or_default();
    let t = f.timings.unwrap_or_default();
    let decode_tps = if t.decode_seconds > 0.0 && o.tokens.len() > 1 {
        (o.tokens.len() - 1) as f64 / t.decode_seconds
    } else {
        0.0
    };
    eprintln!(
        "job {}: {} prompt tokens, {} generated ({}); prefill {:.0} tokens/s, decode {:.1} tokens/s, time to first token {:.2} s",
        o.job_id,
        f.prompt_tokens,
        o.tokens.len(),
        pb::FinishReason::try_from(f.reason)
            .map(|r| r.as_str_name())
            .unwrap_or("?"),
        f.prompt_tokens as f64 / t.prefill_seconds.max(1e-9),
        decode_tps,
        t.time_to_first_token_seconds
    );
}

pub async fn submit(a: SubmitArgs) -> Result<()> {
    let (ids, text) = match &a.text {
        Some(t) => (Vec::new(), Some(t.clone())),
        None => (a.prompt.read()?, None),
    };
    let images = a
        .images
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let mut client = connect(&a.endpoint).await?;
    let header = pb::JobHeader {
        max_new_tokens: a.max_new_tokens,
        sampling: Some(pb::SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
            stop_tokens: a.stop_tokens.clone(),
        }),
        idempotency_key: a.idempotency_key.clone().unwrap_or_default(),
        context_parallel: a.context_parallel,
        expected_prompt_tokens: ids.len() as u64,
        ignore_eos: a.ignore_eos,
        no_context_cache: a.no_context_cache,
    };
    let live = !a.json && !a.detach;
    let up = if live {
        ProgressBar::new(ids.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    up.set_style(
        ProgressStyle::with_template("upload  {bar:40} {pos}/{len} tokens ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let up2 = up.clone();
    let resp = submit_prompt(&mut client, header, ids, text, images, move |n| {
        up2.inc(n as u64)
    })
    .await?;
    up.finish_and_clear();
    if a.detach {
        if a.json {
            println!(
                "{}",
                json!({"job_id": resp.job_id, "prompt_tokens": resp.prompt_tokens, "existing": resp.existing})
            );
        } else {
            println!("{}", resp.job_id);
        }
        return Ok(());
    }
    if live {
        eprintln!(
            "job {} accepted ({} prompt tokens)",
            resp.job_id, resp.prompt_tokens
        );
    }
    drop(client);
    let out = follow(&a.endpoint, &resp.job_id, live).await?;
    if a.json {
        println!("{}", outcome_json(&out));
    } else {
        print_summary(&out);
    }
    Ok(())
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    let state = pb::JobState::try_from(j.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default();
    let mut v = json!({
        "job_id": j.job_id,
        "state": state,
        "prompt_tokens": j.prompt_tokens,
        "max_new_tokens": j.max_new_tokens,
        "tokens": j.tokens,
        "cached_tokens": j.cached_tokens,
        "created_unix_ms": j.created_unix_ms,
    });
    if j.context_parallel > 0 {
        v["context_parallel"] = json!(j.context_parallel);
    }
    if j.images > 0 {
        v["images"] = json!(j.images);
    }
    if !j.cache_bytes_per_rank.is_empty() {
        v["cache_bytes_per_rank"] = json!(j.cache_bytes_per_rank);
    }
    if !j.error.is_empty() {
        v["error"] = json!(j.error);
    }
    if let Some(text) = &j.text {
        v["text"] = json!(text);
    }
    if let Ok(r) = pb::FinishReason::try_from(j.finish_reason)
        && r != pb::FinishReason::Unspecified
    {
        v["finish_reason"] = json!(
            r.as_str_name()
                .trim_start_matches("FINISH_REASON_")
                .to_lowercase()
        );
    }
    v
}

pub async fn jobs(a: JobsArgs) -> Result<()> {
    match a.cmd {
        JobsCmd::List {
            endpoint,
            limit,
            json,
        } => {
            let mut c = connect(&endpoint).await?;
            // Pages until `limit` jobs (0: all of them) are listed.
            let mut jobs = Vec::new();
            let mut page_token = String::new();
            loop {
                let want = if limit == 0 {
                    0
                } else {
                    limit - jobs.len() as u32
                };
                let page = c
                    .list_jobs(pb::ListJobsRequest {
                        limit: want,
                        page_token,
                    })
                    .await
                    .map_err(RpcError)?
                    .into_inner();
                jobs.extend(page.jobs);
                page_token = page.next_page_token;
                if page_token.is_empty() || (limit > 0 && jobs.len() as u32 >= limit) {
                    break;
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(jobs.iter().map(job_json).collect())
                );
            } else {
                for j in &jobs {
                    let v = job_json(j);
                    println!(
                        "{}  {:<10} prompt {:>9}  generated {:>5}",
                        j.job_id,
                        v["state"].as_str().unwrap_or(""),
                        j.prompt_tokens,
                        j.generated_tokens
                    );
                }
            }
        }
        JobsCmd::Get { id, endpoint, json } => {
            let mut c = connect(&endpoint).await?;
            let j = c
                .get_job(pb::GetJobRequest { job_id: id })
                .await
                .map_err(RpcError)?
                .into_inner();
            let v = job_json(&j);
            if json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        JobsCmd::Wait { id, endpoint, json } => {
            let out = follow(&endpoint, &id, !json).await?;
            if json {
                println!("{}", outcome_json(&out));
            } else {
                print_summary(&out);
            }
        }
        JobsCmd::Cancel { id, endpoint, json } => {
            let mut c = connect(&endpoint).await?;
            let j = c
                .cancel_job(pb::CancelJobRequest { job_id: id })
                .await
                .map_err(RpcError)?
                .into_inner();
            if json {
                println!("{}", job_json(&j));
            } else {
                println!("cancel requested for {}", j.job_id);
            }
        }
    }
    Ok(())
}

pub async fn status(a: StatusArgs) -> Result<()> {
    let ch = connect_channel(&a.endpoint).await?;
    let s = ClusterClient::new(ch)
        .status(pb::StatusRequest {})
        .await
        .map_err(RpcError)?
        .into_inner();
    let members: Vec<serde_json::Value> = s
        .members
        .iter()
        .map(|m| {
            let mut v = json!({"id": m.id, "role": m.role, "address": m.address});
            if !m.device.is_empty() {
                v["device"] = json!(m.device);
            }
            if let Some(r) = m.data_group_rank {
                v["data_group_rank"] = json!(r);
            }
            if m.role == "expert-worker" || m.role == "standalone" {
                v["experts"] = json!(
                    m.experts
                        .iter()
                        .map(|e| [e.layer, e.expert])
                        .collect::<Vec<_>>()
                );
                if m.role == "expert-worker" {
                    v["weight_bytes"] = json!(m.weight_bytes);
                }
            }
            v
        })
        .collect();
    let running: Vec<serde_json::Value> = s
        .running
        .iter()
        .map(|j| {
            json!({"job_id": j.job_id, "context_parallel": j.context_parallel,
                   "cache_bytes_per_rank": j.cache_bytes_per_rank})
        })
        .collect();
    if a.json {
        println!(
            "{}",
            json!({"mode": s.mode, "epoch": s.epoch, "members": members, "model": s.model,
                   "running_jobs": s.running_jobs, "queued_jobs": s.queued_jobs,
                   "running": running})
        );
    } else {
        println!("mode {}  epoch {}  model: {}", s.mode, s.epoch, s.model);
        println!("jobs: {} running, {} queued", s.running_jobs, s.queued_jobs);
        for j in &s.running {
            let cache = if j.cache_bytes_per_rank.is_empty() {
                String::new()
            } else {
                format!(", cache bytes per rank {:?}", j.cache_bytes_per_rank)
            };
            println!(
                "  job {}  context-parallel {}{cache}",
                j.job_id, j.context_parallel
            );
        }
        for m in &s.members {
            let group = m
                .data_group_rank
                .map(|r| format!(", data-group rank {r}"))
                .unwrap_or_default();
            println!(
                "  {:<16} {:<18} {} {} ({} experts{group})",
                m.id,
                m.role,
                m.address,
                m.device,
                m.experts.len()
            );
        }
    }
    if s.members.is_empty() {
        bail!("no members");
    }
    Ok(())
}
