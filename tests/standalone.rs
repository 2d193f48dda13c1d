//! Cross-process tests of `ringbolt standalone`: the real server on 127.0.0.1, driven by the
//! real client (`ringbolt submit` / `jobs`) and, for malformed streams, by a raw gRPC client.

use ringbolt_proto::v1 as pb;
use ringbolt_proto::v1::jobs_client::JobsClient;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_ringbolt");

struct Server {
    child: Child,
    endpoint: String,
    /// The HTTP API's base URL (`http://ADDR/v1`), when started with `--http-listen`.
    http: Option<String>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    fn start(ckpt: &Path, data: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args([
                "standalone",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--data-dir", data.to_str().unwrap()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start standalone");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("ringbolt standalone listening on ") {
                    let _ = tx.send(format!("http://{addr}"));
                }
                if let Some(rest) = line
                    .strip_prefix("ringbolt standalone serving the OpenAI-compatible HTTP API on ")
                {
                    let _ = tx.send(rest.split(' ').next().unwrap_or("").to_string());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let endpoint = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server printed its address");
        let http = extra.contains(&"--http-listen").then(|| {
            rx.recv_timeout(Duration::from_secs(60))
                .expect("server printed its HTTP address")
        });
        Server {
            child,
            endpoint,
            http,
            log,
        }
    }

    fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run ringbolt");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok_json(args: &[&str]) -> Value {
    let (ok, out, err) = run(args);
    assert!(ok, "{args:?} failed: {err}");
    serde_json::from_str(out.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// `ringbolt jobs VERB ID --endpoint EP --json` (`get` or `wait`).
fn jobs_json(verb: &str, endpoint: &str, id: &str) -> Value {
    ok_json(&["jobs", verb, id, "--endpoint", endpoint, "--json"])
}

fn tokens(v: &Value) -> Vec<u64> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// A tiny checkpoint with room for long prompts.
fn checkpoint(dir: &Path, max_positions: u64, all_lightning: bool) -> PathBuf {
    let base = dir.join("base");
    run(&[
        "init-checkpoint",
        "--preset",
        "tiny",
        "--seed",
        "9",
        "--out",
        base.to_str().unwrap(),
    ]);
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = max_positions.into();
    if all_lightning {
        let n = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
        cfg["layer_types"] = vec!["linear_attention"; n].into();
    }
    let cfg_path = dir.join("cfg.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = dir.join(if all_lightning { "ckpt-linear" } else { "ckpt" });
    let (ok, _, err) = run(&[
        "init-checkpoint",
        "--config",
        cfg_path.to_str().unwrap(),
        "--seed",
        "9",
        "--dtype",
        "bf16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    out
}

fn prompt(n: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 509) as u32 + 1)
        .collect()
}

fn csv(ids: &[u32]) -> String {
    ids.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn generate(ckpt: &Path, ids: &[u32], n: u32) -> Vec<u64> {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), csv(ids)).unwrap();
    tokens(&ok_json(&[
        "generate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--tokens-file",
        file.path().to_str().unwrap(),
        "--max-new-tokens",
        &n.to_string(),
    ]))
}

fn submit_json(endpoint: &str, ids: &[u32], n: u32, extra: &[&str]) -> Value {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), csv(ids)).unwrap();
    let mut args = vec![
        "submit",
        "--endpoint",
        endpoint,
        "--tokens-file",
        file.path().to_str().unwrap(),
        "--max-new-tokens",
    ];
    let n = n.to_string();
    args.push(&n);
    args.extend_from_slice(extra);
    args.push("--json");
    ok_json(&args)
}

/// `submit --detach` of `ids` (through a tokens file in `dir`); returns the job id.
fn submit_detached(
    endpoint: &str,
    dir: &Path,
    ids: &[u32],
    max_new: u32,
    extra: &[&str],
) -> String {
    let file = dir.join(format!("prompt-{}.txt", ids.len()));
    std::fs::write(&file, csv(ids)).unwrap();
    let n = max_new.to_string();
    let mut args = vec![
        "submit",
        "--endpoint",
        endpoint,
        "--tokens-file",
        file.to_str().unwrap(),
        "--max-new-tokens",
        &n,
        "--detach",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    out.trim().to_string()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn client(endpoint: &str) -> JobsClient<tonic::transport::Channel> {
    JobsClient::connect(endpoint.to_string())
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
}

fn header(n: u32) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        item: Some(pb::submit_job_request::Item::Header(pb::JobHeader {
            max_new_tokens: n,
            ..Default::default()
        })),
    }
}

fn chunk(ids: &[u32]) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        item: Some(pb::submit_job_request::Item::Chunk(pb::PromptChunk {
            tokens: ringbolt_proto::pack_tokens(ids),
            ..Default::default()
        })),
    }
}

fn image_piece(data: &[u8], last: bool) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        item: Some(pb::submit_job_request::Item::Chunk(pb::PromptChunk {
            image: Some(pb::ImagePiece {
                data: data.to_vec(),
                last,
            }),
            ..Default::default()
        })),
    }
}

/// An image file as pieces of at most `size` bytes.
fn image_pieces(data: &[u8], size: usize) -> Vec<pb::SubmitJobRequest> {
    let n = data.chunks(size).count();
    data.chunks(size)
        .enumerate()
        .map(|(i, c)| image_piece(c, i + 1 == n))
        .collect()
}

fn end() -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        item: Some(pb::submit_job_request::Item::End(pb::PromptEnd {})),
    }
}

async fn submit_raw(
    endpoint: &str,
    msgs: Vec<pb::SubmitJobRequest>,
) -> Result<pb::SubmitJobResponse, tonic::Status> {
    let mut c = client(endpoint).await;
    c.submit_job(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn job_count(endpoint: &str) -> usize {
    let mut c = client(endpoint).await;
    c.list_jobs(pb::ListJobsRequest {
        limit: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .jobs
    .len()
}

#[test]
fn jobs_equal_generate_and_run_concurrently_with_batched_decode() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let server = Server::start(&ckpt, &dir.path().join("data"), &["--prefill-chunk", "64"]);
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(40 + 37 * i, i)).collect();
    let want: Vec<Vec<u64>> = prompts.iter().map(|p| generate(&ckpt, p, 12)).collect();
    // Six clients at once: their decode steps share batches.
    let got: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| submit_json(&server.endpoint, p, 12, &[])))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&tokens(g), w, "job {i}");
        assert_eq!(g["finish_reason"], "length");
        assert_eq!(
            g["prompt_tokens"].as_u64().unwrap() as usize,
            prompts[i].len()
        );
    }
    // A late watcher gets every token from the start.
    let id = got[0]["job_id"].as_str().unwrap();
    let again = jobs_json("wait", &server.endpoint, id);
    assert_eq!(tokens(&again), want[0]);
    let get = jobs_json("get", &server.endpoint, id);
    assert_eq!(get["state"], "succeeded");
    assert_eq!(get["context_parallel"], 1);
    let status = ok_json(&["status", "--endpoint", &server.endpoint, "--json"]);
    assert_eq!(status["members"][0]["role"], "standalone");
    assert!(status["epoch"].as_u64().is_some());
}

#[test]
fn upload_larger_than_the_message_limit_streams_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 4 << 20, true);
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &["--prefill-chunk", "8192"],
    );
    // 2.5M tokens = 10 MB of ids, above the server's 8 MiB message limit.
    let ids = prompt(2_500_000, 3);
    let id = submit_detached(&server.endpoint, dir.path(), &ids, 2, &[]);
    let get = jobs_json("get", &server.endpoint, &id);
    assert_eq!(get["prompt_tokens"], 2_500_000);
    // The spooled prompt is exactly what was sent.
    let spooled =
        std::fs::read(dir.path().join("data/spool").join(format!("{id}.tokens"))).unwrap();
    let packed = ringbolt_proto::pack_tokens(&ids);
    assert!(
        spooled.len() > packed.len() && spooled[..packed.len()] == packed[..],
        "the spool file starts with the prompt as sent"
    );
    assert!(
        spooled.ends_with(b"RBSPOOL1"),
        "and ends with its checksum trailer"
    );
    // A single message above the limit is refused.
    let err = rt()
        .block_on(submit_raw(
            &server.endpoint,
            vec![header(2), chunk(&ids[..2_200_000]), end()],
        ))
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("chunks"), "{err:?}");
    let cancelled = ok_json(&[
        "jobs",
        "cancel",
        &id,
        "--endpoint",
        &server.endpoint,
        "--json",
    ]);
    assert_eq!(cancelled["job_id"], id.as_str());
    let done = jobs_json("wait", &server.endpoint, &id);
    assert_eq!(done["finish_reason"], "cancelled");
}

#[test]
fn bad_input_gets_the_right_status_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    // A checkpoint without a tokenizer: text prompts are refused.
    std::fs::remove_file(ckpt.join("tokenizer.json")).unwrap();
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &["--max-prompt-tokens", "100", "--max-new-tokens-limit", "50"],
    );
    let ep = server.endpoint.clone();
    let rt = rt();
    let with = |f: &dyn Fn(&mut pb::JobHeader)| {
        let mut h = pb::JobHeader {
            max_new_tokens: 4,
            ..Default::default()
        };
        f(&mut h);
        pb::SubmitJobRequest {
            item: Some(pb::submit_job_request::Item::Header(h)),
        }
    };
    let cases: Vec<(&str, Vec<pb::SubmitJobRequest>, Code, &str)> = vec![
        (
            "empty prompt",
            vec![header(4), end()],
            Code::InvalidArgument,
            "empty",
        ),
        (
            "token >= vocab",
            vec![header(4), chunk(&[1, 2, 512]), end()],
            Code::InvalidArgument,
            "position 2",
        ),
        (
            "max new tokens 0",
            vec![header(0), chunk(&[1]), end()],
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        (
            "max new tokens above limit",
            vec![header(51), chunk(&[1]), end()],
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        (
            "negative temperature",
            vec![
                with(&|h| {
                    h.sampling = Some(pb::SamplingParams {
                        temperature: -1.0,
                        ..Default::default()
                    })
                }),
                chunk(&[1]),
                end(),
            ],
            Code::InvalidArgument,
            "temperature",
        ),
        (
            "top_p above 1",
            vec![
                with(&|h| {
                    h.sampling = Some(pb::SamplingParams {
                        top_p: 1.5,
                        ..Default::default()
                    })
                }),
                chunk(&[1]),
                end(),
            ],
            Code::InvalidArgument,
            "top_p",
        ),
        (
            "prompt above the configured maximum",
            vec![header(4), chunk(&prompt(101, 1)), end()],
            Code::InvalidArgument,
            "maximum of 100",
        ),
        (
            "an image for a text model",
            vec![header(4), chunk(&[1]), image_piece(b"\x89PNG", true), end()],
            Code::InvalidArgument,
            "MiniMax-VL-01",
        ),
        (
            "chunk before header",
            vec![chunk(&[1]), header(4), end()],
            Code::InvalidArgument,
            "header",
        ),
        (
            "chunk after end",
            vec![header(4), chunk(&[1]), end(), chunk(&[2])],
            Code::InvalidArgument,
            "after the end",
        ),
        (
            "second header",
            vec![header(4), header(4), end()],
            Code::InvalidArgument,
            "second header",
        ),
        (
            "odd byte count",
            vec![
                header(4),
                pb::SubmitJobRequest {
                    item: Some(pb::submit_job_request::Item::Chunk(pb::PromptChunk {
                        tokens: vec![1, 2, 3],
                        ..Default::default()
                    })),
                },
                end(),
            ],
            Code::InvalidArgument,
            "packed",
        ),
        (
            "no end marker",
            vec![header(4), chunk(&[1, 2])],
            Code::Cancelled,
            "end marker",
        ),
        (
            "context parallel 2",
            vec![with(&|h| h.context_parallel = 2), chunk(&[1]), end()],
            Code::FailedPrecondition,
            "context-parallel",
        ),
        (
            "text without tokenizer",
            vec![
                header(4),
                pb::SubmitJobRequest {
                    item: Some(pb::submit_job_request::Item::Chunk(pb::PromptChunk {
                        text: "hi".into(),
                        ..Default::default()
                    })),
                },
                end(),
            ],
            Code::FailedPrecondition,
            "tokenizer",
        ),
    ];
    for (what, msgs, code, needle) in cases {
        let err = rt.block_on(submit_raw(&ep, msgs)).expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(err.message().contains(needle), "{what}: {}", err.message());
    }
    // A client that disconnects mid-upload: no job is created.
    rt.block_on(async {
        let mut c = client(&ep).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(header(4)).await.unwrap();
        tx.send(chunk(&[1, 2, 3])).await.unwrap();
        let call = tokio::spawn(async move {
            c.submit_job(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        call.abort();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(job_count(&ep).await, 0, "no job was created");
        // Unknown ids.
        let mut c = client(&ep).await;
        for r in [
            c.get_job(pb::GetJobRequest {
                job_id: "nope".into(),
            })
            .await
            .err(),
            c.cancel_job(pb::CancelJobRequest {
                job_id: "nope".into(),
            })
            .await
            .err(),
            c.watch_job(pb::WatchJobRequest {
                job_id: "nope".into(),
            })
            .await
            .err(),
        ] {
            let e = r.expect("unknown id is an error");
            assert_eq!(e.code(), Code::NotFound);
            assert!(e.message().contains("nope"));
        }
    });
    // The CLI reports a failure with the status on stderr and a non-zero exit.
    let (ok, _, err) = run(&[
        "submit",
        "--endpoint",
        &ep,
        "--tokens",
        "1,999",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("999"),
        "{err}"
    );
    // Still serving.
    let v = submit_json(&ep, &[5, 6, 7], 3, &[]);
    assert_eq!(tokens(&v).len(), 3);
    assert_eq!(rt.block_on(job_count(&ep)), 1);
}

#[test]
fn kill_9_after_acceptance_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let data = dir.path().join("data");
    let slow = ["--prefill-chunk", "256"];
    let mut server = Server::start(&ckpt, &data, &slow);
    let ids = prompt(6000, 5);
    let want = generate(&ckpt, &ids, 10);
    let key = ["--idempotency-key", "k1"];
    let id = submit_detached(&server.endpoint, dir.path(), &ids, 10, &key);
    server.kill9();

    let server = Server::start(&ckpt, &data, &slow);
    // The same key after the restart: the same job.
    assert_eq!(
        submit_detached(&server.endpoint, dir.path(), &ids, 10, &key),
        id
    );
    // The watcher checks indices: each token exactly once, in order.
    let done = jobs_json("wait", &server.endpoint, &id);
    assert_eq!(tokens(&done), want);
    assert_eq!(done["finish_reason"], "length");
    assert!(
        server.logged("re-queued unfinished jobs"),
        "the job was still running when the first server died, and the second one re-ran it"
    );
    let list = rt().block_on(job_count(&server.endpoint));
    assert_eq!(list, 1, "one job, not two");
}

#[test]
fn cancel_stops_a_running_job_and_admission_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &["--prefill-chunk", "128", "--max-jobs", "1"],
    );
    let ids = prompt(20_000, 2);
    let id = submit_detached(&server.endpoint, dir.path(), &ids, 50, &[]);
    // The one admission slot is taken.
    let (ok, _, err) = run(&[
        "submit",
        "--endpoint",
        &server.endpoint,
        "--tokens",
        "1,2",
        "--max-new-tokens",
        "2",
    ]);
    assert!(!ok && err.contains("ResourceExhausted"), "{err}");
    ok_json(&[
        "jobs",
        "cancel",
        &id,
        "--endpoint",
        &server.endpoint,
        "--json",
    ]);
    let done = jobs_json("wait", &server.endpoint, &id);
    assert_eq!(done["finish_reason"], "cancelled");
    assert!(tokens(&done).len() < 50);
    let get = jobs_json("get", &server.endpoint, &id);
    assert_eq!(get["state"], "cancelled");
    // The slot is free again.
    assert_eq!(
        tokens(&submit_json(&server.endpoint, &[1, 2], 2, &[])).len(),
        2
    );
}

#[test]
fn text_prompts_use_the_tokenizer_and_results_expire() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    // A word-level tokenizer in Hugging Face's tokenizer.json format.
    let tok = dir.path().join("tokenizer.json");
    std::fs::write(
        &tok,
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":7,"long":8,"context":9},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &[
            "--tokenizer",
            tok.to_str().unwrap(),
            "--result-ttl-secs",
            "1",
        ],
    );
    let text = ok_json(&[
        "submit",
        "--endpoint",
        &server.endpoint,
        "--text",
        "hello long context",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(text["prompt_tokens"], 3);
    assert_eq!(
        tokens(&text),
        generate(&ckpt, &[7, 8, 9], 4),
        "the text became ids 7, 8, 9"
    );
    // Finished results are kept for --result-ttl-secs, then removed.
    let id = text["job_id"].as_str().unwrap().to_string();
    let mut gone = false;
    for _ in 0..100 {
        let (ok, _, err) = run(&["jobs", "get", &id, "--endpoint", &server.endpoint, "--json"]);
        if !ok {
            assert!(err.contains("NotFound"), "{err}");
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gone, "the result expired");
    assert!(
        !dir.path()
            .join("data/spool")
            .join(format!("{id}.tokens"))
            .exists()
    );
}

/// The gRPC health status of `service` ("" for the server as a whole).
async fn health(endpoint: &str, service: &str) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let ch = tonic::transport::Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(ch);
    h.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("health of `{service}`: {e}"))
    .into_inner()
    .status
}

#[test]
fn hostile_input_is_bounded_and_admission_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &["--max-jobs", "4", "--prefill-chunk", "128"],
    );
    let ep = server.endpoint.clone();
    let rt = rt();
    rt.block_on(async {
        // Every public service says it serves.
        for s in ["", "ringbolt.v1.Jobs", "ringbolt.v1.Cluster"] {
            assert_eq!(health(&ep, s).await, 1, "`{s}` is SERVING");
        }
        // 16 clients at once against --max-jobs 4: exactly 4 accepted, whatever the timing
        // (the jobs run for a long time: 20K-token prompts in 128-token chunks).
        let ids = prompt(20_000, 3);
        let subs = (0..16).map(|_| submit_raw(&ep, vec![header(64), chunk(&ids), end()]));
        let results = futures::future::join_all(subs).await;
        let accepted: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|r| r.job_id.clone()))
            .collect();
        for r in &results {
            if let Err(e) = r {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            }
        }
        assert_eq!(accepted.len(), 4, "admission is exact: {results:?}");
        let mut c = client(&ep).await;
        for id in &accepted {
            c.cancel_job(pb::CancelJobRequest { job_id: id.clone() })
                .await
                .unwrap();
        }
        // Their places are free once they have stopped.
        for id in &accepted {
            let mut w = c
                .watch_job(pb::WatchJobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            while w.message().await.unwrap().is_some() {}
        }

        // Oversized fields are refused before anything is stored.
        let with = |f: &dyn Fn(&mut pb::JobHeader)| {
            let mut h = pb::JobHeader {
                max_new_tokens: 2,
                ..Default::default()
            };
            f(&mut h);
            vec![
                pb::SubmitJobRequest {
                    item: Some(pb::submit_job_request::Item::Header(h)),
                },
                chunk(&[1, 2]),
                end(),
            ]
        };
        let big_key = "k".repeat(3 << 20);
        let e = submit_raw(&ep, with(&|h| h.idempotency_key = big_key.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("idempotency key") && e.message().len() < 300);
        let e = submit_raw(
            &ep,
            with(&|h| {
                h.sampling = Some(pb::SamplingParams {
                    stop_tokens: vec![3; 100_000],
                    ..Default::default()
                })
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("stop tokens"), "{}", e.message());

        // Unknown ids are quoted clipped; ids no server could have made are refused as such.
        let long = "x".repeat(10_000);
        let e = c
            .get_job(pb::GetJobRequest { job_id: long })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().len() < 300, "{}", e.message());
        let e = c
            .watch_job(pb::WatchJobRequest {
                job_id: "y".repeat(60),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains(&"y".repeat(60)));

        // The same key with another prompt is refused; with the same, it is the same job.
        let key = |h: &mut pb::JobHeader| h.idempotency_key = "same-key".into();
        let first = submit_raw(&ep, with(&key)).await.unwrap();
        let again = submit_raw(&ep, with(&key)).await.unwrap();
        assert_eq!(
            (again.job_id.as_str(), again.existing),
            (first.job_id.as_str(), true)
        );
        let mut other = with(&key);
        other[1] = chunk(&[1, 3]);
        let e = submit_raw(&ep, other).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        assert!(e.message().contains(&first.job_id), "{}", e.message());
    });

    // Cancelling a finished job says so and fails.
    let done = submit_json(&ep, &[4, 5], 2, &[]);
    let id = done["job_id"].as_str().unwrap().to_string();
    let (ok, out, err) = run(&["jobs", "cancel", &id, "--endpoint", &ep]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("FailedPrecondition") && err.contains("already finished (succeeded)"),
        "{err}"
    );

    // Listing pages: every job once, newest first, through pages of two.
    rt.block_on(async {
        let mut c = client(&ep).await;
        let (mut seen, mut token) = (Vec::new(), String::new());
        loop {
            let page = c
                .list_jobs(pb::ListJobsRequest {
                    limit: 2,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.jobs.len() <= 2);
            seen.extend(page.jobs.into_iter().map(|j| j.job_id));
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        let mut sorted = seen.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        sorted.dedup();
        assert_eq!(seen, sorted, "newest first, each once");
        assert_eq!(seen.len(), 4 + 1 + 1);
    });
    let all = ok_json(&["jobs", "list", "--endpoint", &ep, "--limit", "0", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 6);
    // The server's log is plain text when it is not a terminal.
    assert!(
        !server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains('\x1b')),
        "colour escapes in a log file"
    );
}

#[test]
fn the_client_says_how_to_dial_and_accepts_bare_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &["--handshake-timeout-secs", "1", "--idle-timeout-secs", "3"],
    );
    let bare = server.endpoint.trim_start_matches("http://").to_string();
    // A connection that never says anything is closed after the handshake time.
    {
        use std::io::Read;
        let mut silent = std::net::TcpStream::connect(&bare).unwrap();
        silent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 256];
        // The server's HTTP/2 greeting may come first; then the connection ends.
        let closed = loop {
            match silent.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(closed, "a silent connection stayed open");
    }
    // Live clients are not affected: a job through a bare host:port address.
    let v = submit_json(&bare, &[1, 2, 3], 2, &[]);
    assert_eq!(tokens(&v).len(), 2);
    // TLS to a plain-text server: refused, saying how to dial it.
    let https = format!("https://{bare}");
    let (ok, _, err) = run(&["status", "--endpoint", &https]);
    assert!(
        !ok && err.contains("does not speak TLS") && err.contains(&format!("http://{bare}")),
        "{err}"
    );
    let (ok, _, err) = run(&["jobs", "list", "--endpoint", "ftp://x:1"]);
    assert!(!ok && err.contains("scheme"), "{err}");
    // `generate --help` describes each flag under its own name.
    let (_, help, _) = run(&["generate", "--help"]);
    let text_of = |flag: &str| {
        let lines: Vec<&str> = help.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("no {flag} in {help}"));
        lines.get(at + 1).copied().unwrap_or_default().to_string()
    };
    assert!(
        text_of("--max-new-tokens").contains("Number of tokens"),
        "{help}"
    );
    assert!(
        text_of("--device").contains("Where the model computes"),
        "{help}"
    );
    assert!(text_of("--weights").contains("int8"), "{help}");
}

#[test]
fn damaged_data_directories_lose_no_accepted_job_silently() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let long = prompt(300, 1);
    let short = [prompt(400, 2), prompt(500, 3)];
    let want_long = generate(&ckpt, &long, 300);
    let want_short: Vec<Vec<u64>> = short.iter().map(|p| generate(&ckpt, p, 6)).collect();
    for damage in [
        "empty job database",
        "truncated job database",
        "corrupted job database",
        "deleted job database",
        "damaged spool file",
    ] {
        let data = dir.path().join(damage.replace(' ', "-"));
        // One decoding job at a time: the long one holds the engine, the short ones wait.
        let flags = ["--max-batch", "1"];
        let mut server = Server::start(&ckpt, &data, &flags);
        let ep = server.endpoint.clone();
        let id_long = submit_detached(&ep, dir.path(), &long, 300, &[]);
        let ids: Vec<String> = short
            .iter()
            .map(|p| submit_detached(&ep, dir.path(), p, 6, &[]))
            .collect();
        server.kill9();
        let db = data.join("jobs.redb");
        let len = std::fs::metadata(&db).unwrap().len() as usize;
        match damage {
            "empty job database" => std::fs::write(&db, b"").unwrap(),
            "truncated job database" => {
                let bytes = std::fs::read(&db).unwrap();
                std::fs::write(&db, &bytes[..len / 3]).unwrap();
            }
            "corrupted job database" => {
                let mut bytes = std::fs::read(&db).unwrap();
                for (i, b) in bytes[len / 4..len * 3 / 4].iter_mut().enumerate() {
                    *b = (i * 131) as u8;
                }
                std::fs::write(&db, bytes).unwrap();
            }
            "deleted job database" => std::fs::remove_file(&db).unwrap(),
            _ => {
                // Tokens zeroed in the middle of the last job's spooled prompt.
                let f = data.join("spool").join(format!("{}.tokens", ids[1]));
                let mut bytes = std::fs::read(&f).unwrap();
                for b in &mut bytes[100..140] {
                    *b = 0;
                }
                std::fs::write(&f, bytes).unwrap();
            }
        }
        let server = Server::start(&ckpt, &data, &flags);
        let ep = server.endpoint.clone();
        let wait = |id: &str| run(&["jobs", "wait", id, "--endpoint", &ep, "--json"]);
        let (ok, out, err) = wait(&id_long);
        assert!(ok, "{damage}: {err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(tokens(&v), want_long, "{damage}");
        for (i, id) in ids.iter().enumerate() {
            let (ok, out, err) = wait(id);
            if damage == "damaged spool file" && i == 1 {
                assert!(!ok, "{damage}: a damaged prompt ran: {out}");
                assert!(
                    err.contains("DataLoss") && err.contains("checksum"),
                    "{err}"
                );
                continue;
            }
            assert!(ok, "{damage}: job {i}: {err}");
            let v: Value = serde_json::from_str(out.trim()).unwrap();
            assert_eq!(tokens(&v), want_short[i], "{damage}: job {i}");
        }
        if damage.ends_with("job database") {
            assert!(
                server.logged("re-created from their spooled prompts")
                    || server.logged("moved aside"),
                "{damage}: the server must say what happened"
            );
        }
    }
}

#[test]
fn jobs_and_generate_stop_at_the_models_eos_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let plain = checkpoint(dir.path(), 65_536, false);
    let ids = prompt(40, 4);
    let want = generate(&plain, &ids, 10);
    // The same weights, with the third greedy token as the end-of-sequence token.
    let eos = want[2];
    let ckpt = dir.path().join("eos");
    std::fs::create_dir_all(&ckpt).unwrap();
    for e in std::fs::read_dir(&plain).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, ckpt.join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    cfg["eos_token_id"] = eos.into();
    std::fs::write(ckpt.join("config.json"), cfg.to_string()).unwrap();

    assert_eq!(generate(&ckpt, &ids, 10), want[..3]);
    let server = Server::start(&ckpt, &dir.path().join("data"), &[]);
    let v = submit_json(&server.endpoint, &ids, 10, &[]);
    assert_eq!(tokens(&v), want[..3]);
    assert_eq!(v["finish_reason"], "stop");
    let v = submit_json(&server.endpoint, &ids, 10, &["--ignore-eos"]);
    assert_eq!(tokens(&v), want);
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn standalone_context_parallel_jobs_equal_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &["--context-parallel", "4"],
    );
    let ep = server.endpoint.clone();
    // Decode of 64 tokens after a P = 4 prefill equals one rank's.
    for (n, new, extra) in [
        (3000, 64, vec![]),
        (301, 12, vec!["--context-parallel", "2"]),
        (5, 12, vec![]),
    ] {
        let ids = prompt(n, 7);
        let want = generate(&ckpt, &ids, new);
        let v = submit_json(&ep, &ids, new, &extra);
        assert_eq!(tokens(&v), want, "{n} tokens {extra:?}");
        let id = v["job_id"].as_str().unwrap();
        let get = jobs_json("get", &ep, id);
        let degree = if extra.is_empty() { 4 } else { 2 };
        assert_eq!(get["context_parallel"], degree, "{get}");
        let per_rank: Vec<u64> = get["cache_bytes_per_rank"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(per_rank.len(), degree as usize, "{get}");
        if n == 3000 {
            // One softmax layer of the tiny model: K and V of 750 tokens per rank, f32.
            let total: u64 = per_rank.iter().sum();
            for b in &per_rank {
                assert!(
                    (*b as f64 / total as f64 - 0.25).abs() < 0.01,
                    "{per_rank:?}"
                );
            }
        }
    }
    // A context-parallel prefill runs on rank threads: a job submitted after it runs to its
    // end meanwhile, and cancelling it stops the ranks.
    let big = prompt(40_000, 3);
    let id = submit_detached(&ep, dir.path(), &big, 8, &[]);
    let small = prompt(60, 9);
    let want = generate(&ckpt, &small, 8);
    let v = submit_json(&ep, &small, 8, &["--context-parallel", "1"]);
    assert_eq!(tokens(&v), want);
    let get = jobs_json("get", &ep, &id);
    assert_eq!(get["state"], "running", "{get}");
    assert!(
        get["tokens"].as_array().is_none_or(|t| t.is_empty()),
        "{get}"
    );
    ok_json(&["jobs", "cancel", &id, "--endpoint", &ep, "--json"]);
    let done = jobs_json("wait", &ep, &id);
    assert_eq!(done["finish_reason"], "cancelled", "{done}");

    // More ranks than the server has: refused, saying how many it has.
    let (ok, _, err) = run(&[
        "submit",
        "--endpoint",
        &ep,
        "--tokens",
        "1,2,3",
        "--max-new-tokens",
        "2",
        "--context-parallel",
        "8",
    ]);
    assert!(
        !ok && err.contains("FailedPrecondition") && err.contains("at most 4"),
        "{err}"
    );
}

/// Issue 16: a server with a token file refuses requests without a valid token
/// (UNAUTHENTICATED), serves those with one (flag or env), limits each token's jobs in flight,
/// and keeps its health service open to probes.
#[test]
fn tokens_guard_the_api_and_limit_each_token() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        "# ops\nalpha-token-0123456789\nbeta-token-0123456789\n",
    )
    .unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_at = format!("127.0.0.1:{metrics_port}");
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &[
            "--auth-tokens-file",
            file.to_str().unwrap(),
            "--max-jobs-per-token",
            "1",
            "--metrics-listen",
            &metrics_at,
        ],
    );
    let ep = server.endpoint.clone();
    let submit = |extra: &[&str]| {
        let mut args = vec![
            "submit",
            "--endpoint",
            &ep,
            "--tokens",
            "1,2,3",
            "--max-new-tokens",
            "2",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    for (extra, why) in [
        (vec![], "needs a token"),
        (vec!["--token", "wrong-token-0123456789"], "not valid"),
    ] {
        let (ok, _, err) = submit(&extra);
        assert!(
            !ok && err.contains("Unauthenticated") && err.contains(why),
            "{err}"
        );
        let mut status = vec!["status", "--endpoint", &ep];
        status.extend_from_slice(&extra);
        let (ok, _, err) = run(&status);
        assert!(!ok && err.contains("Unauthenticated"), "{err}");
    }
    let (ok, out, err) = submit(&["--token", "alpha-token-0123456789", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(
        tokens(&serde_json::from_str(out.trim()).unwrap()),
        generate(&ckpt, &[1, 2, 3], 2)
    );
    // The environment works as the flag does.
    let out = Command::new(BIN)
        .args(["status", "--endpoint", &ep, "--json"])
        .env("RINGBOLT_TOKEN", "beta-token-0123456789")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One job in flight per token: alpha's second waits its turn, beta's runs.
    let big = prompt(20_000, 5);
    let id = submit_detached(
        &ep,
        dir.path(),
        &big,
        4,
        &["--token", "alpha-token-0123456789"],
    );
    let (ok, _, err) = submit(&["--token", "alpha-token-0123456789"]);
    assert!(
        !ok && err.contains("ResourceExhausted") && err.contains("this token"),
        "{err}"
    );
    let (ok, _, err) = submit(&["--token", "beta-token-0123456789"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&[
        "jobs",
        "wait",
        &id,
        "--endpoint",
        &ep,
        "--token",
        "alpha-token-0123456789",
    ]);
    assert!(ok, "{err}");
    // Its job done, alpha may submit again.
    let (ok, _, err) = submit(&["--token", "alpha-token-0123456789"]);
    assert!(ok, "{err}");
    // Probes need no token.
    assert_eq!(rt().block_on(health(&ep, "")), 1);
    // The refusals are counted: a wrong token (twice: submit and status) and the per-token
    // limit (a missing token is refused before a token is looked at, and not counted).
    let text = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let count = |reason: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("ringbolt_admission_rejected_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(count("token"), 2.0, "{text}");
    assert_eq!(count("max_jobs_per_token"), 1.0, "{text}");
}

/// Issue 16: a standalone server started with TLS refuses plain-text clients and clients that
/// do not trust its CA, serves those that do (`--tls-ca`, with or without `https://`), and
/// serves a renewed certificate without a restart.
#[test]
fn tls_refuses_plain_text_and_follows_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let f = ringbolt_shell::testing::write_certs(dir.path());
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&f.cert, &cert).unwrap();
    std::fs::copy(&f.key, &key).unwrap();
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    // The HTTP API is on the same certificate: HTTPS only.
    let base = server.http.clone().unwrap();
    assert!(base.starts_with("https://"), "{base}");
    let https = |url: &str, ca: &str| {
        Command::new("python3")
            .args([
                "-c",
                "import ssl, sys, urllib.request; ctx = ssl.create_default_context(cafile=sys.argv[2]); \
                 print(urllib.request.urlopen(sys.argv[1], context=ctx, timeout=10).read().decode())",
                url,
                ca,
            ])
            .output()
            .unwrap()
    };
    let health = base.trim_end_matches("/v1").to_string() + "/health";
    let out = https(&health, f.ca.to_str().unwrap());
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !https(&health, f.other_ca.to_str().unwrap())
            .status
            .success()
    );
    assert!(
        !https(
            &health.replace("https://", "http://"),
            f.ca.to_str().unwrap()
        )
        .status
        .success()
    );
    let addr = server
        .endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_string();
    let (ca, other_ca) = (f.ca.to_str().unwrap(), f.other_ca.to_str().unwrap());
    let status = |ep: &str, ca: Option<&str>| {
        let mut a = vec!["status", "--endpoint", ep, "--json"];
        if let Some(ca) = ca {
            a.extend(["--tls-ca", ca]);
        }
        run(&a)
    };
    let (ok, _, err) = status(&format!("http://{addr}"), None);
    assert!(
        !ok && err.contains("https://"),
        "plain text was served: {err}"
    );
    let (ok, _, err) = status(&format!("https://{addr}"), Some(other_ca));
    assert!(!ok, "a client that does not trust the CA connected: {err}");
    let (ok, out, err) = status(&addr, Some(ca));
    assert!(ok && out.contains("standalone"), "{err}");
    let (ok, _, err) = status(&format!("https://{addr}"), Some(ca));
    assert!(ok, "{err}");
    let (ok, out, err) = run(&[
        "submit",
        "--endpoint",
        &addr,
        "--tls-ca",
        ca,
        "--tokens",
        "1,2,3",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        tokens(&serde_json::from_str(out.trim()).unwrap()),
        generate(&ckpt, &[1, 2, 3], 2)
    );
    // Renewal: the files change (signed by the other CA now); within a reload period the
    // server presents the new certificate.
    std::fs::copy(&f.other_key, &key).unwrap();
    std::fs::copy(&f.other_cert, &cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(&addr, Some(other_ca)).0 {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!status(&addr, Some(ca)).0);
}

/// Where `scripts/test.sh` installs the `openai` package.
fn openai_pythonpath() -> PathBuf {
    std::env::var_os("RINGBOLT_OPENAI_PYTHONPATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/py/openai"))
}

/// Runs `tests/NAME` with python3 and the `openai` package; its standard output (the script
/// must succeed).
fn openai_script(name: &str, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests")
        .join(name);
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .env("PYTHONPATH", openai_pythonpath())
        .output()
        .expect("run the openai client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_openai_package_drives_the_http_api_and_it_agrees_with_grpc() {
    let pythonpath = openai_pythonpath();
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .expect("python3");
    assert!(
        probe.status.success(),
        "the `openai` package is not installed at {} (scripts/test.sh installs it): {}",
        pythonpath.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let token = "http-test-token-0123456789";
    let tokens_file = dir.path().join("tokens");
    std::fs::write(&tokens_file, format!("{token}\n")).unwrap();
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--model-name",
            "tiny-test",
            "--auth-tokens-file",
            tokens_file.to_str().unwrap(),
            "--max-jobs",
            "1",
            "--http-max-body-bytes",
            "65536",
            "--max-new-tokens-limit",
            "4000",
        ],
    );
    let base = server.http.clone().unwrap();
    let stdout = openai_script("openai_client.py", &[&base, "tiny-test", token]);
    let reports: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.last().unwrap()["check"], "done", "{stdout}");

    // Every job the client made is a job of the gRPC API, and equals the gRPC API's answer
    // to the same prompt and parameters; its text is the tokenizer's decoding of its tokens.
    let text = ringbolt_text::Text::load(&ckpt, None).unwrap().unwrap();
    let end_of_turn = text.end_of_turn()[0].to_string();
    let grpc = |args: &[&str]| {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--endpoint", &server.endpoint]);
        ok_json(&all)
    };
    let mut checked = 0;
    for r in &reports[..reports.len() - 1] {
        let check = r["check"].as_str().unwrap();
        let id = r["id"].as_str().unwrap();
        let http_text = r["text"].as_str().unwrap();
        let req = &r["request"];
        let job = grpc(&["jobs", "get", id, "--json"]);
        let job_tokens: Vec<u32> = tokens(&job).iter().map(|&t| t as u32).collect();
        assert_eq!(
            job["text"].as_str().unwrap(),
            text.decode(&job_tokens),
            "{check}"
        );
        let f = |k: &str| req[k].as_f64().map(|x| x.to_string());
        let max = req["max_tokens"].to_string();
        let temperature = f("temperature").unwrap();
        let top_p = f("top_p").unwrap_or_else(|| "1".into());
        let seed = req["seed"].as_u64().unwrap_or(0).to_string();
        // The prompt as the HTTP API made it: the text, the ids, or the chat template's.
        let rendered;
        let mut prompt: Vec<&str> = match (&req["prompt"], &req["messages"], &req["input"]) {
            (Value::String(p), _, _) => {
                let ids = text.encode(p).unwrap();
                assert_eq!(job["prompt_tokens"].as_u64().unwrap(), ids.len() as u64);
                vec!["--text", p]
            }
            (Value::Array(ids), _, _) => {
                rendered = ids
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                vec!["--tokens", &rendered]
            }
            (_, Value::Array(m), _) => {
                let msgs: Vec<ringbolt_text::Message> = m
                    .iter()
                    .map(|m| {
                        ringbolt_text::Message::new(
                            m["role"].as_str().unwrap(),
                            m["content"].as_str().unwrap(),
                        )
                    })
                    .collect();
                rendered = text.template().unwrap().render(&msgs, true).unwrap();
                vec!["--text", &rendered]
            }
            (_, _, Value::String(input)) => {
                let msgs = [ringbolt_text::Message::new("user", input)];
                rendered = text.template().unwrap().render(&msgs, true).unwrap();
                vec!["--text", &rendered]
            }
            _ => panic!("{r}"),
        };
        let mut args = vec!["submit"];
        args.append(&mut prompt);
        args.extend_from_slice(&[
            "--max-new-tokens",
            &max,
            "--temperature",
            &temperature,
            "--top-p",
            &top_p,
            "--seed",
            &seed,
            "--json",
        ]);
        if check == "stop" {
            // The HTTP job ended where its text met the stop sequence: a prefix of the whole
            // generation, finished as a stop; its text ends before the stop sequence.
            args.push("--ignore-eos");
            let whole = grpc(&args);
            let all = tokens(&whole);
            assert_eq!(job["finish_reason"], "stop");
            assert!(job_tokens.len() < all.len());
            assert_eq!(
                job_tokens.iter().map(|&t| t as u64).collect::<Vec<_>>(),
                all[..job_tokens.len()]
            );
            let stop = req["stop"].as_str().unwrap();
            let full = text.decode(&job_tokens);
            assert_eq!(&full[..http_text.len()], http_text);
            assert!(
                full[http_text.len()..].starts_with(stop),
                "{full:?} {stop:?}"
            );
        } else {
            args.extend_from_slice(&["--stop-tokens", &end_of_turn]);
            let again = grpc(&args);
            assert_eq!(tokens(&again), tokens(&job), "{check}: {r}");
            assert_eq!(again["text"].as_str().unwrap(), http_text, "{check}");
        }
        checked += 1;
    }
    assert_eq!(checked, 6);
}

/// Issue 18: jobs sharing a document's prefix start after the cached part and give the tokens
/// of a run without the cache; so after entries spill to disk and are read back, and after
/// the spill files are damaged (then they are misses). `cached_tokens` says what was reused.
#[test]
fn the_context_cache_reuses_a_shared_prefix_with_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let spill = dir.path().join("spill");
    let doc: Vec<u32> = (0..100).map(|i| (i * 29 % 500) as u32).collect();
    let question = |q: &[u32]| doc.iter().chain(q).copied().collect::<Vec<u32>>();
    let (q1, q2) = (question(&[7, 8, 9]), question(&[3, 1, 4, 1, 5]));
    let sampled = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "7"];
    fn with<'a>(sampled: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        sampled.iter().chain(extra).copied().collect()
    }
    let serve = |budget: &str| {
        Server::start(
            &ckpt,
            &dir.path().join("data"),
            &[
                "--prefill-chunk",
                "16",
                "--context-cache-bytes",
                budget,
                "--context-cache-dir",
                spill.to_str().unwrap(),
            ],
        )
    };
    let server = serve("100000000");
    let ep = server.endpoint.clone();
    let cold = submit_json(&ep, &q2, 12, &with(&sampled, &["--no-context-cache"]));
    assert_eq!(cold["cached_tokens"], 0);
    let first = submit_json(&ep, &q1, 12, &with(&sampled, &[]));
    assert_eq!(first["cached_tokens"], 0);
    let warm = submit_json(&ep, &q2, 12, &with(&sampled, &[]));
    // 100 shared tokens: the six whole chunks of 16 before them.
    assert_eq!(warm["cached_tokens"], 96);
    assert_eq!(tokens(&warm), tokens(&cold));
    let got = jobs_json("get", &ep, warm["job_id"].as_str().unwrap());
    assert_eq!(got["cached_tokens"], 96);
    drop(server);

    // A budget of two blocks: a prefill keeps its first two; another prompt's blocks evict
    // them to disk, and they come back for the next question.
    let server = serve("70000");
    let ep = server.endpoint.clone();
    let unrelated: Vec<u32> = (0..40).map(|i| (i * 7 % 300 + 100) as u32).collect();
    assert_eq!(
        submit_json(&ep, &q1, 4, &with(&sampled, &[]))["cached_tokens"],
        0
    );
    submit_json(&ep, &unrelated, 4, &with(&sampled, &[]));
    // The spill writer thread writes them soon after.
    let spilled = || -> Vec<String> {
        std::fs::read_dir(&spill)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while spilled().iter().filter(|n| n.ends_with(".ctx")).count() < 2 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let names = spilled();
    assert_eq!(
        names.len(),
        2,
        "the document's two blocks spilled: {names:?}"
    );
    let warm = submit_json(&ep, &q2, 12, &with(&sampled, &[]));
    assert_eq!(warm["cached_tokens"], 32);
    assert_eq!(tokens(&warm), tokens(&cold));
    // The unrelated prompt again: the document's blocks go back to disk.
    assert_eq!(
        submit_json(&ep, &unrelated, 4, &with(&sampled, &[]))["cached_tokens"],
        32
    );
    drop(server);

    // Damaged spill files are misses: the right tokens, from a cold prefill.
    for f in std::fs::read_dir(&spill).unwrap() {
        let p = f.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n / 3] ^= 0x10;
        std::fs::write(&p, &bytes).unwrap();
    }
    let server = serve("70000");
    let warm = submit_json(&server.endpoint, &q2, 12, &with(&sampled, &[]));
    assert_eq!(warm["cached_tokens"], 0);
    assert_eq!(tokens(&warm), tokens(&cold));
}

/// Issue 18 with context parallelism: a group prefills a prompt up to its last cache boundary
/// and leaves every rank's share in the cache; a later prompt sharing that prefix starts from
/// the shares (the rank that decodes finishes it through the keys left on the ranks) and gives
/// the same tokens as without the cache.
#[test]
fn context_parallel_jobs_reuse_a_groups_cached_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 65_536, false);
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &[
            "--prefill-chunk",
            "16",
            "--context-cache-bytes",
            "100000000",
            "--context-parallel",
            "3",
        ],
    );
    let ep = server.endpoint.clone();
    let doc: Vec<u32> = (0..100).map(|i| (i * 31 % 500) as u32).collect();
    let question = |q: &[u32]| doc.iter().chain(q).copied().collect::<Vec<u32>>();
    let (q1, q2) = (question(&[7, 8, 9]), question(&[3, 1, 4, 1, 5]));
    let sampled = [
        "--context-parallel",
        "2",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "5",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        sampled.iter().chain(extra).copied().collect()
    };
    let cold = submit_json(&ep, &q2, 12, &with(&["--no-context-cache"]));
    assert_eq!(cold["cached_tokens"], 0);
    let first = submit_json(&ep, &q1, 12, &with(&[]));
    assert_eq!(first["cached_tokens"], 0);
    // The group prefilled q1's first 96 positions (six chunks of 16) and kept them.
    let warm = submit_json(&ep, &q2, 12, &with(&[]));
    assert_eq!(warm["cached_tokens"], 96, "{warm}");
    assert_eq!(tokens(&warm), tokens(&cold));
    let id = warm["job_id"].as_str().unwrap();
    let got = jobs_json("get", &ep, id);
    assert_eq!(got["cached_tokens"], 96);
    assert_eq!(got["context_parallel"], 2);
    // A longer question starts from the same 96 and finishes 24 positions on the decoding
    // rank; greedy, it gives one worker's tokens. A group of another size has no shares.
    let q3 = question(&(1..=20).collect::<Vec<u32>>());
    let want = generate(&ckpt, &q3, 12);
    let v = submit_json(&ep, &q3, 12, &["--context-parallel", "2"]);
    assert_eq!(v["cached_tokens"], 96, "{v}");
    assert_eq!(tokens(&v), want);
    let v = submit_json(&ep, &q3, 12, &["--context-parallel", "3"]);
    assert_eq!(v["cached_tokens"], 0, "{v}");
    assert_eq!(tokens(&v), want);
}

/// The reference fixtures' images (`tests/fixtures/reference/vl/images`).
fn fixture_image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/reference/vl/images")
        .join(name)
}

/// A random `vl-tiny` checkpoint in `dir`.
fn vl_checkpoint(dir: &Path, seed: u32) -> PathBuf {
    let ckpt = dir.join("vl");
    let seed = seed.to_string();
    let out = ckpt.to_str().unwrap();
    let (ok, _, err) = run(&[
        "init-checkpoint",
        "--preset",
        "vl-tiny",
        "--seed",
        &seed,
        "--out",
        out,
    ]);
    assert!(ok, "{err}");
    ckpt
}

/// A VL checkpoint's image placeholder id, as text.
fn image_token(ckpt: &Path) -> String {
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    cfg["image_token_index"].as_u64().unwrap().to_string()
}

/// `generate` of `prompt` (token ids) with `images`, `n` tokens past any end-of-sequence.
fn generate_with_images(ckpt: &Path, prompt: &str, images: &[&str], n: u32) -> Value {
    let n = n.to_string();
    let mut args = vec![
        "generate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--tokens",
        prompt,
    ];
    for i in images {
        args.extend(["--image", i]);
    }
    args.extend(["--max-new-tokens", &n, "--ignore-eos"]);
    ok_json(&args)
}

#[test]
fn jobs_with_images_equal_generate_survive_kill_9_and_bad_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = vl_checkpoint(dir.path(), 3);
    let img = image_token(&ckpt);
    let prompt = format!("5,{img},6,7,{img},8");
    let (a, b, d) = (
        fixture_image("a.png"),
        fixture_image("b.png"),
        fixture_image("d.jpg"),
    );
    let (a, b, d) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        d.to_str().unwrap(),
    );
    let images = ["--image", d, "--image", b];
    let want = generate_with_images(&ckpt, &prompt, &[d, b], 6);
    let expanded = want["prompt_tokens"].as_u64().unwrap();
    assert!(expanded > 6, "the placeholders were expanded: {want}");

    // d.jpg is 61 × 50 (3050 pixels), b.png 31 × 90 (2790), a.png 70 × 45 (3150).
    let data = dir.path().join("data");
    let limits = [
        "--max-images",
        "2",
        "--max-image-pixels",
        "3100",
        "--prefill-chunk",
        "16",
    ];
    let mut server = Server::start(&ckpt, &data, &limits);
    let submit = |ep: &str, extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "submit",
            "--endpoint",
            ep,
            "--tokens",
            &prompt,
            "--max-new-tokens",
            "6",
            "--ignore-eos",
        ];
        args.extend_from_slice(&images);
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect()
    };
    let args = submit(&server.endpoint, &["--json"]);
    let got = ok_json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(tokens(&got), tokens(&want));
    assert_eq!(got["prompt_tokens"].as_u64(), Some(expanded), "{got}");
    // Asked again: the context cache has its blocks (keyed by the images' features too), and
    // the tokens are the same; the same token ids with the images swapped do not hit.
    let again = ok_json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(tokens(&again), tokens(&want));
    assert!(again["cached_tokens"].as_u64().unwrap() >= 16, "{again}");
    let swapped: Vec<&str> = args
        .iter()
        .map(|a| match a.as_str() {
            x if x == d => b,
            x if x == b => d,
            x => x,
        })
        .collect();
    let other = ok_json(&swapped);
    assert_eq!(other["cached_tokens"], 0, "{other}");

    // Accepted, then the server is killed: the job and its images are on disk.
    let args = submit(&server.endpoint, &["--idempotency-key", "v1", "--detach"]);
    let (ok, out, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let id = out.trim().to_string();
    server.kill9();
    let server = Server::start(&ckpt, &data, &limits);
    let done = jobs_json("wait", &server.endpoint, &id);
    assert_eq!(tokens(&done), tokens(&want), "{done}");
    let job = jobs_json("get", &server.endpoint, &id);
    assert_eq!(job["images"], 2, "{job}");
    assert_eq!(job["prompt_tokens"].as_u64(), Some(expanded), "{job}");

    // Bad images: INVALID_ARGUMENT with the reason, and no job.
    let ep = server.endpoint.clone();
    let rt = rt();
    let before = rt.block_on(job_count(&ep));
    let [a_bytes, b_bytes, d_bytes] = [a, b, d].map(|p| std::fs::read(p).unwrap());
    let ids = |p: &str| -> Vec<u32> { p.split(',').map(|t| t.parse().unwrap()).collect() };
    let two = ids(&prompt);
    let one = ids(&format!("5,{img},6"));
    let with_images = |prompt: &[u32], imgs: &[&[u8]]| {
        let mut m = vec![header(4), chunk(prompt)];
        for i in imgs {
            m.extend(image_pieces(i, 1000));
        }
        m.push(end());
        m
    };
    let corrupt = b_bytes[..b_bytes.len() / 2].to_vec();
    let zero = {
        // A PNG header that says 0 × 0 pixels.
        let mut b = a_bytes[..33].to_vec();
        b[16..24].copy_from_slice(&[0; 8]);
        b
    };
    let cases: Vec<(&str, Vec<pb::SubmitJobRequest>, &str)> = vec![
        ("corrupt bytes", with_images(&one, &[&corrupt]), "image 1"),
        (
            "not an image",
            with_images(&one, &[b"hello"]),
            "PNG or JPEG",
        ),
        ("zero size", with_images(&one, &[&zero]), "image 1"),
        (
            "above the pixel limit",
            with_images(&one, &[&a_bytes]),
            "limit of 3100 pixels",
        ),
        (
            "too many images",
            with_images(&two, &[&d_bytes, &d_bytes, &d_bytes]),
            "at most 2",
        ),
        (
            "fewer placeholders than images",
            with_images(&one, &[&d_bytes, &d_bytes]),
            "placeholder",
        ),
        (
            "more placeholders than images",
            with_images(&two, &[&d_bytes]),
            "placeholder",
        ),
        (
            "an image never finished",
            vec![
                header(4),
                chunk(&one),
                image_piece(&d_bytes[..100], false),
                end(),
            ],
            "not finished",
        ),
    ];
    for (what, msgs, needle) in cases {
        let err = rt.block_on(submit_raw(&ep, msgs)).expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(needle), "{what}: {}", err.message());
    }
    assert_eq!(rt.block_on(job_count(&ep)), before, "no job was created");
    // Still serving images, sent in pieces the raw way.
    let r = rt
        .block_on(submit_raw(&ep, with_images(&one, &[&d_bytes])))
        .unwrap();
    assert!(r.prompt_tokens > 3);
}

#[test]
fn the_openai_package_sends_images_as_data_urls_and_they_equal_grpc_images() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = vl_checkpoint(dir.path(), 4);
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &["--http-listen", "127.0.0.1:0", "--model-name", "vl"],
    );
    let (d, b) = (fixture_image("d.jpg"), fixture_image("b.png"));
    let (d, b) = (d.to_str().unwrap(), b.to_str().unwrap());
    let stdout = openai_script(
        "openai_images.py",
        &[server.http.as_deref().unwrap(), "vl", d, b],
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();
    let job = jobs_json("get", &server.endpoint, r["id"].as_str().unwrap());
    assert_eq!(job["images"], 2, "{job}");
    assert_eq!(job["prompt_tokens"], r["prompt_tokens"], "{job}");
    // The same chat through the gRPC API: the template's text with the placeholders, and
    // the images by file.
    let text = ringbolt_text::Text::load(&ckpt, None).unwrap().unwrap();
    let chat = text
        .template()
        .unwrap()
        .render(
            &[ringbolt_text::Message::new("user", "look<image>and<image>")],
            true,
        )
        .unwrap();
    let grpc = ok_json(&[
        "submit",
        "--endpoint",
        &server.endpoint,
        "--text",
        &chat,
        "--image",
        d,
        "--image",
        b,
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(tokens(&grpc), tokens(&job));
    assert_eq!(grpc["prompt_tokens"], r["prompt_tokens"]);
    assert_eq!(job["text"], r["text"]);
}

#[test]
fn context_parallel_jobs_with_images_equal_generate_and_reuse_the_groups_shares() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = vl_checkpoint(dir.path(), 5);
    let img = image_token(&ckpt);
    // Text before, between and after the images: they land in several ranks' chunks.
    let prompt = format!("5,9,12,{img},6,7,8,9,10,{img},8,3,4");
    let (d, b) = (fixture_image("d.jpg"), fixture_image("b.png"));
    let (d, b) = (d.to_str().unwrap(), b.to_str().unwrap());
    let want = generate_with_images(&ckpt, &prompt, &[d, b], 6);
    let server = Server::start(
        &ckpt,
        &dir.path().join("data"),
        &["--context-parallel", "2", "--prefill-chunk", "16"],
    );
    let job = |first: &str, second: &str| {
        ok_json(&[
            "submit",
            "--endpoint",
            &server.endpoint,
            "--tokens",
            &prompt,
            "--image",
            first,
            "--image",
            second,
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--json",
        ])
    };
    let cold = job(d, b);
    assert_eq!(tokens(&cold), tokens(&want), "{cold}");
    let rec = jobs_json("get", &server.endpoint, cold["job_id"].as_str().unwrap());
    assert_eq!(rec["context_parallel"], 2, "{rec}");
    // Again: the group's shares, kept under the images' features, and the same tokens.
    let warm = job(d, b);
    assert_eq!(tokens(&warm), tokens(&want));
    assert!(warm["cached_tokens"].as_u64().unwrap() >= 16, "{warm}");
    // The images swapped: no shares of the other images are used.
    let other = job(b, d);
    assert_eq!(other["cached_tokens"], 0, "{other}");
}
