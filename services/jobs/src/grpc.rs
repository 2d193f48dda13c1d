//! The public gRPC service (`ringbolt.v1.Jobs`, `ringbolt.v1.Cluster`, health) over a
//! [`JobManager`].

use crate::auth::{Authenticate, Caller, Tokens};
use crate::bounds::{self, echo};
use crate::convert;
use crate::error::JobError;
use crate::manager::JobManager;
use crate::submit::Submission;
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
        let mut sub = Submission::begin(&self.mgr, header, caller)?;
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
                Some(Item::Chunk(pb::PromptChunk {
                    image: Some(piece),
                    tokens,
                    text,
                })) => {
                    if !tokens.is_empty() || !text.is_empty() {
                        return Err(invalid(
                            "a prompt chunk holds tokens, text or an image piece, not several",
                        ));
                    }
                    sub.push_image(&piece.data, piece.last).await?;
                }
                Some(Item::Chunk(c)) if !c.text.is_empty() => {
                    sub.push_text(&c.text)?;
                    if !c.tokens.is_empty() {
                        return Err(invalid("a prompt is either token ids or text, not both"));
                    }
                }
                Some(Item::Chunk(c)) => {
                    let ids = ringbolt_proto::unpack_tokens(&c.tokens).ok_or_else(|| {
                        invalid(format!(
                            "a chunk of {} bytes is not packed u32 token ids",
                            c.tokens.len()
                        ))
                    })?;
                    sub.push_ids(&ids)?;
                }
            }
        }
        if stream.message().await.map_err(interrupted)?.is_some() {
            return Err(invalid("a message after the end marker"));
        }
        sub.finish().await
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
        let mut events = self.mgr.follow(job_id(&request.into_inner().job_id)?)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if tx.send(e.map_err(Status::from)).await.is_err() {
                    return;
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
        let rec = self.mgr.get(job_id(&r.job_id)?)?;
        Ok(Response::new(convert::job(
            &rec,
            self.mgr.text().map(|t| &**t),
        )))
    }

    #[tracing::instrument(skip_all, fields(job = %echo(&request.get_ref().job_id)))]
    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = request.into_inner();
        let rec = self.mgr.cancel(job_id(&r.job_id)?)?;
        Ok(Response::new(convert::job(
            &rec,
            self.mgr.text().map(|t| &**t),
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
            let j = convert::job(rec, self.mgr.text().map(|t| &**t));
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
