//! The public gRPC service (`ringbolt.v1.Jobs`, `ringbolt.v1.Cluster`, health) over a
//! [`JobManager`].

use crate::auth::{Authenticate, Caller, Tokens};
use crate::bounds::{self, MAX_IDEMPOTENCY_KEY_BYTES, MAX_STOP_TOKENS, echo};
use crate::convert;
use crate::error::JobError;
use crate::live;
use crate::manager::{JobManager, WatchSource};
use crate::record::{JobRecord, JobState, Sampling, Timings, now_unix_ms};
use ringbolt_model::SamplingParams;
use ringbolt_proto::v1 as pb;
use ringbolt_proto::v1::cluster_server::{Cluster, ClusterServer};
use ringbolt_proto::v1::jobs_server::{Jobs, JobsServer};
use ringbolt_shell::{Health, Shell};
use std::future::Future;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

/// Largest gRPC message accepted (a prompt chunk of up to 1M tokens fits).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Fills `Status` in cluster mode: mode, plan epoch and members (the service adds the model
/// and job counts).
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> pb::ClusterStatus;
}

#[derive(Clone)]
pub struct JobsService {
    mgr: JobManager,
    /// Address clients reach this server at (for `Status`).
    address: String,
    cluster: Option<std::sync::Arc<dyn StatusSource>>,
    /// The tokens requests must carry (None: any request passes).
    auth: Authenticate,
}

fn invalid(msg: impl Into<String>) -> JobError {
    JobError::InvalidArgument(msg.into())
}

fn job_id(id: &str) -> Result<&str, JobError> {
    bounds::check_job_id(id).map_err(JobError::InvalidArgument)?;
    Ok(id)
}

/// What a submission asks for, as one hash: its parameters and its prompt's token ids. A retry
/// under the same idempotency key must ask the same.
fn fingerprint(h: &pb::JobHeader, s: &Sampling, prompt_hash: u64) -> u64 {
    let mut x = xxhash_rust::xxh3::Xxh3::new();
    x.update(&h.max_new_tokens.to_le_bytes());
    x.update(&s.temperature.to_bits().to_le_bytes());
    x.update(&s.top_p.to_bits().to_le_bytes());
    x.update(&s.seed.to_le_bytes());
    x.update(&(s.stop_tokens.len() as u64).to_le_bytes());
    for t in &s.stop_tokens {
        x.update(&t.to_le_bytes());
    }
    x.update(&h.context_parallel.to_le_bytes());
    x.update(&[h.ignore_eos as u8]);
    x.update(&prompt_hash.to_le_bytes());
    x.digest()
}

impl JobsService {
    pub fn new(mgr: JobManager, address: String) -> Self {
        JobsService {
            mgr,
            address,
            cluster: None,
            auth: Authenticate::default(),
        }
    }

    /// A service whose requests must carry one of `tokens`.
    pub fn with_tokens(mut self, tokens: Option<std::sync::Arc<Tokens>>) -> Self {
        self.auth = Authenticate(tokens);
        self
    }

    /// A service whose `Status` reports a cluster's plan and members.
    pub fn with_status(mut self, source: std::sync::Arc<dyn StatusSource>) -> Self {
        self.cluster = Some(source);
        self
    }

    fn validate_header(&self, h: &pb::JobHeader) -> Result<Sampling, JobError> {
        let limit = self.mgr.limits().max_new_tokens;
        if h.max_new_tokens == 0 || h.max_new_tokens > limit {
            return Err(invalid(format!(
                "max_new_tokens must be between 1 and {limit}, got {}",
                h.max_new_tokens
            )));
        }
        let s = h.sampling.clone().unwrap_or_default();
        let params = SamplingParams {
            temperature: s.temperature,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            seed: s.seed,
        };
        params
            .validate()
            .map_err(|e| invalid(e.to_string().replace("invalid request: ", "")))?;
        let vocab = self.mgr.model().vocab_size;
        if s.stop_tokens.len() > MAX_STOP_TOKENS {
            return Err(invalid(format!(
                "{} stop tokens were given; at most {MAX_STOP_TOKENS} are allowed",
                s.stop_tokens.len()
            )));
        }
        if h.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(invalid(format!(
                "the idempotency key is {} bytes; at most {MAX_IDEMPOTENCY_KEY_BYTES} are allowed",
                h.idempotency_key.len()
            )));
        }
        if let Some(&t) = s.stop_tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid(format!(
                "stop token {t} is outside the vocabulary (size {vocab})"
            )));
        }
        let most = self.mgr.limits().context_parallel.max(1);
        if h.context_parallel > most {
            return Err(JobError::FailedPrecondition(format!(
                "context-parallel degree {} was requested, but this server splits a context \
                 among at most {most} rank(s) (standalone --context-parallel)",
                h.context_parallel
            )));
        }
        Ok(Sampling {
            temperature: params.temperature,
            top_p: params.top_p,
            seed: params.seed,
            stop_tokens: s.stop_tokens,
        })
    }

    async fn submit(
        &self,
        mut stream: Streaming<pb::SubmitJobRequest>,
        caller: Option<Caller>,
    ) -> Result<pb::SubmitJobResponse, JobError> {
        use pb::submit_job_request::Item;
        let interrupted = |s: Status| {
            if s.code() == tonic::Code::OutOfRange {
                // tonic's decoder refusing a message above the limit.
                JobError::ResourceExhausted(format!(
                    "{}; send the prompt in chunks of at most {} tokens",
                    s.message(),
                    MAX_MESSAGE_BYTES / 4 - 64
                ))
            } else {
                JobError::UploadInterrupted(s.message().to_string())
            }
        };
        let header = match stream.message().await.map_err(interrupted)? {
            Some(pb::SubmitJobRequest {
                item: Some(Item::Header(h)),
            }) => h,
            Some(_) => {
                return Err(invalid(
                    "the first message must be a header (prompt chunk before the header)",
                ));
            }
            None => return Err(invalid("no header: the request stream was empty")),
        };
        let sampling = self.validate_header(&header)?;
        let key = (!header.idempotency_key.is_empty()).then(|| header.idempotency_key.clone());
        // Every upload takes a place among the admitted jobs before it starts (a retry of a
        // known key too, while it uploads), so admission is exact under concurrency.
        let permit = self.mgr.admit(caller)?;
        let model = self.mgr.model().clone();
        let max_prompt = self
            .mgr
            .limits()
            .max_prompt_tokens
            .min(model.max_position_embeddings as u64);
        let (id, mut spool) = self.mgr.new_upload()?;
        let mut text = String::new();
        loop {
            let msg = stream.message().await.map_err(interrupted)?;
            match msg.and_then(|m| m.item) {
                None => {
                    return Err(JobError::UploadInterrupted(
                        "the request stream ended without an end marker".into(),
                    ));
                }
                Some(Item::Header(_)) => return Err(invalid("a second header")),
                Some(Item::End(_)) => break,
                Some(Item::Chunk(c)) => {
                    if !c.text.is_empty() {
                        if self.mgr.tokenizer().is_none() {
                            return Err(JobError::FailedPrecondition(
                                "text prompts need a tokenizer, and this server has none configured; send token ids"
                                    .into(),
                            ));
                        }
                        if !c.tokens.is_empty() || spool.tokens() > 0 {
                            return Err(invalid("a prompt is either token ids or text, not both"));
                        }
                        if (text.len() + c.text.len()) as u64 > max_prompt.saturating_mul(16) {
                            return Err(invalid(format!(
                                "the text prompt is longer than the maximum of {max_prompt} tokens allows"
                            )));
                        }
                        text.push_str(&c.text);
                        continue;
                    }
                    if !text.is_empty() {
                        return Err(invalid("a prompt is either token ids or text, not both"));
                    }
                    let ids = ringbolt_proto::unpack_tokens(&c.tokens).ok_or_else(|| {
                        invalid(format!(
                            "a chunk of {} bytes is not packed u32 token ids",
                            c.tokens.len()
                        ))
                    })?;
                    if let Some((i, &t)) = ids
                        .iter()
                        .enumerate()
                        .find(|(_, t)| **t as usize >= model.vocab_size)
                    {
                        return Err(invalid(format!(
                            "token id {t} at position {} is outside the vocabulary (size {})",
                            spool.tokens() + i as u64,
                            model.vocab_size
                        )));
                    }
                    if spool.tokens() + ids.len() as u64 > max_prompt {
                        return Err(invalid(format!(
                            "the prompt is longer than the maximum of {max_prompt} tokens"
                        )));
                    }
                    spool.write(&ids)?;
                }
            }
        }
        if stream.message().await.map_err(interrupted)?.is_some() {
            return Err(invalid("a message after the end marker"));
        }
        if let Some(tok) = self.mgr.tokenizer()
            && !text.is_empty()
        {
            let enc = tok
                .encode(text.as_str(), false)
                .map_err(|e| invalid(format!("the text cannot be tokenized: {e}")))?;
            let ids = enc.get_ids();
            if let Some((i, &t)) = ids
                .iter()
                .enumerate()
                .find(|(_, t)| **t as usize >= model.vocab_size)
            {
                return Err(invalid(format!(
                    "the tokenizer produced id {t} at position {i}, outside the model's vocabulary (size {})",
                    model.vocab_size
                )));
            }
            if ids.len() as u64 > max_prompt {
                return Err(invalid(format!(
                    "the prompt is longer than the maximum of {max_prompt} tokens"
                )));
            }
            spool.write(ids)?;
        }
        let n = spool.tokens();
        if n == 0 {
            return Err(invalid("the prompt is empty"));
        }
        if header.expected_prompt_tokens != 0 && header.expected_prompt_tokens != n {
            return Err(invalid(format!(
                "the header announced {} prompt tokens but {n} arrived",
                header.expected_prompt_tokens
            )));
        }
        if n as usize + header.max_new_tokens as usize > model.max_position_embeddings {
            return Err(invalid(format!(
                "{n} prompt tokens + {} new tokens exceed the model's {} positions",
                header.max_new_tokens, model.max_position_embeddings
            )));
        }
        let fp = fingerprint(&header, &sampling, spool.prompt_hash());
        if let Some(k) = &key
            && let Some(existing) = self.mgr.lookup_idempotency_key(k)?
        {
            return self.existing(k, existing, fp);
        }
        let record = JobRecord {
            id,
            state: JobState::Queued,
            prompt_tokens: n,
            max_new_tokens: header.max_new_tokens,
            sampling,
            idempotency_key: key.clone(),
            context_parallel: header.context_parallel,
            created_unix_ms: now_unix_ms(),
            finished_unix_ms: None,
            tokens: Vec::new(),
            finish_reason: None,
            error: None,
            timings: Timings::default(),
            fingerprint: Some(fp),
            ignore_eos: header.ignore_eos,
            cache_bytes_per_rank: Vec::new(),
        };
        let (job_id, existing) = self.mgr.accept(record, spool, permit).await?;
        if existing && let Some(k) = &key {
            return self.existing(k, job_id, fp);
        }
        Ok(pb::SubmitJobResponse {
            job_id,
            prompt_tokens: n,
            existing,
        })
    }

    /// The answer to a submission whose idempotency key names job `id`: that job, if it was
    /// asked with the same prompt and parameters; ALREADY_EXISTS if not.
    fn existing(&self, key: &str, id: String, fp: u64) -> Result<pb::SubmitJobResponse, JobError> {
        let rec = self.mgr.get(&id)?;
        if rec.fingerprint.is_some_and(|f| f != fp) {
            return Err(JobError::AlreadyExists(format!(
                "idempotency key `{}` already names job {id}, which was submitted with a \
                 different prompt or parameters; use a new key for a new job",
                echo(key)
            )));
        }
        Ok(pb::SubmitJobResponse {
            job_id: id,
            prompt_tokens: rec.prompt_tokens,
            existing: true,
        })
    }
}

#[tonic::async_trait]
impl Jobs for JobsService {
    #[tracing::instrument(skip_all)]
    async fn submit_job(
        &self,
        request: Request<Streaming<pb::SubmitJobRequest>>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let caller = request.extensions().get::<Caller>().copied();
        let r = self.submit(request.into_inner(), caller).await;
        if let Err(e) = &r {
            tracing::info!(error = %e, "submission refused");
        }
        Ok(Response::new(r?))
    }

    type WatchJobStream = ReceiverStream<Result<pb::JobEvent, Status>>;

    #[tracing::instrument(skip_all, fields(job = %echo(&request.get_ref().job_id)))]
    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let src = self.mgr.watch(job_id(&request.into_inner().job_id)?)?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mgr = self.mgr.clone();
        tokio::spawn(async move {
            match src {
                WatchSource::Finished(rec) => {
                    for e in live::replay(&rec) {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                }
                WatchSource::Live(job) => {
                    let mut changed = job.subscribe();
                    let mut sent = 0;
                    loop {
                        let (batch, done) = {
                            let s = job.lock();
                            (s.events[sent..].to_vec(), s.done)
                        };
                        sent += batch.len();
                        for e in batch {
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                        if done && sent == job.lock().events.len() {
                            return;
                        }
                        tokio::select! {
                            r = changed.changed() => if r.is_err() {
                                return;
                            },
                            // A server that stops (or steps down) ends its watches, so that it
                            // can stop; clients follow the job on another server.
                            _ = mgr.stopping() => {
                                let _ = tx
                                    .send(Err(Status::unavailable(
                                        "this server is stopping; the job goes on elsewhere \
                                         or after a restart",
                                    )))
                                    .await;
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all, fields(job = %echo(&request.get_ref().job_id)))]
    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = request.into_inner();
        Ok(Response::new(convert::job(
            &self.mgr.get(job_id(&r.job_id)?)?,
        )))
    }

    #[tracing::instrument(skip_all, fields(job = %echo(&request.get_ref().job_id)))]
    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = request.into_inner();
        Ok(Response::new(convert::job(
            &self.mgr.cancel(job_id(&r.job_id)?)?,
        )))
    }

    /// One page of jobs, newest first: at most `limit` (default 100, at most 1000) and at most
    /// 4 MiB of them, so no job, however large, can keep the others from being listed.
    #[tracing::instrument(skip_all)]
    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        use prost::Message;
        let r = request.into_inner();
        let before = match r.page_token.as_str() {
            "" => None,
            t => Some(job_id(t).map_err(|_| {
                invalid(format!(
                    "page token `{}` is not one this server gave",
                    echo(t)
                ))
            })?),
        };
        let limit = match r.limit as usize {
            0 => bounds::DEFAULT_PAGE,
            n => n.min(bounds::MAX_PAGE),
        };
        let (records, mut more) = self.mgr.list(limit, before)?;
        let mut jobs = Vec::with_capacity(records.len());
        let mut bytes = 0;
        for rec in &records {
            let j = convert::job(rec);
            let len = j.encoded_len() + 8;
            if !jobs.is_empty() && bytes + len > bounds::PAGE_BYTES {
                more = true;
                break;
            }
            bytes += len;
            jobs.push(j);
        }
        let next_page_token = match (more, jobs.last()) {
            (true, Some(j)) => j.job_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }
}

#[tonic::async_trait]
impl Cluster for JobsService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let m = self.mgr.model();
        let (running, queued) = self.mgr.counts();
        let running_list: Vec<pb::RunningJob> = self
            .mgr
            .running()
            .into_iter()
            .map(|(job_id, p, cache)| pb::RunningJob {
                job_id,
                context_parallel: p,
                cache_bytes_per_rank: cache,
            })
            .collect();
        let model = format!(
            "{} layers, hidden {}, {} experts top-{}, vocab {}",
            m.num_layers(),
            m.hidden_size,
            m.num_experts,
            m.experts_per_tok,
            m.vocab_size
        );
        if let Some(c) = &self.cluster {
            let mut st = c.status();
            st.model = model;
            st.running_jobs = running;
            st.queued_jobs = queued;
            st.running = running_list;
            return Ok(Response::new(st));
        }
        let experts = (0..m.num_layers() as u32)
            .flat_map(|l| {
                (0..m.num_experts as u32).map(move |e| pb::ExpertSlot {
                    layer: l,
                    expert: e,
                })
            })
            .collect();
        Ok(Response::new(pb::ClusterStatus {
            mode: "standalone".into(),
            epoch: 1,
            members: vec![pb::Member {
                id: "standalone-0".into(),
                role: "standalone".into(),
                address: self.address.clone(),
                experts,
                ..Default::default()
            }],
            model,
            running_jobs: running,
            queued_jobs: queued,
            running: running_list,
        }))
    }
}

/// Serves the public API on `listener` through `shell` until `shutdown` resolves; with
/// `tokens`, every job and status request must carry one.
pub async fn serve(
    mgr: JobManager,
    shell: Shell,
    listener: TcpListener,
    tokens: Option<std::sync::Arc<Tokens>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let svc = JobsService::new(mgr, address).with_tokens(tokens);
    serve_service(svc, shell, listener, shutdown).await
}

/// Serves `svc` (the public API) on `listener` through `shell` until `shutdown` resolves.
pub async fn serve_service(
    svc: JobsService,
    shell: Shell,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    // This process serves both public services once it listens (a standby coordinator does
    // not listen until it leads).
    use tonic::server::NamedService;
    let health = Health::start(&[
        <JobsServer<JobsService> as NamedService>::NAME,
        <ClusterServer<JobsService> as NamedService>::NAME,
    ])
    .await;
    health.set(true).await;
    // Health stays open (probes carry no token); the job and cluster services check tokens.
    let auth = svc.auth.clone();
    let jobs = JobsServer::new(svc.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = shell
        .server()
        .add_service(health.service())
        .add_service(InterceptedService::new(jobs, auth.clone()))
        .add_service(InterceptedService::new(ClusterServer::new(svc), auth));
    shell.serve(router, listener, shutdown).await
}
