//! The attention worker: the model without its experts. A job step (`RunJob`) prefills the
//! segment of the context it names, then decodes; every MoE layer goes to the expert workers
//! of the current plan epoch. One engine thread owns the model (and so the GPU's context on a
//! CUDA backend): job steps queue to it, and the decode steps of all running jobs are batched
//! into one forward pass, so each layer sends their rows to the expert workers together.

use crate::etcd::PlanView;
use crate::remote::RemoteExperts;
use crate::{ClusterError, CommonArgs, Health, bind, connect_membership, wait_for_signal};
use clap::Args;
use futures::future::BoxFuture;
use ringbolt_jobs::bounds::{MAX_NEW_TOKENS_CEILING, MAX_STOP_TOKENS, check_job_id, echo};
use ringbolt_jobs::executor::fail_code;
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::{Backend, Device, OnBackend};
use ringbolt_membership::{Member, Membership, Role};
use ringbolt_model::scheduler::{
    self, Event, FinishReason, Forward, ForwardCounts, Phase, Scheduler, SchedulerConfig, Sink,
};
use ringbolt_model::{Checkpoint, Logits, Model, SamplingParams, SequenceState};
use ringbolt_proto::internal as ipb;
use ringbolt_proto::internal::attention_worker_server::{AttentionWorker, AttentionWorkerServer};
use ringbolt_transport::listen::{grpc_server, incoming};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

/// Largest control message (a 4M-token prompt is 16 MiB packed).
pub const MAX_CONTROL_MESSAGE: usize = 64 << 20;

/// Job steps waiting for the engine thread at most; more are refused (RESOURCE_EXHAUSTED).
const ENGINE_QUEUE: usize = 256;

#[derive(Args, Clone, Debug)]
pub struct AttentionWorkerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Prompt tokens per prefill chunk.
    #[arg(long, env = "RINGBOLT_PREFILL_CHUNK", default_value_t = 4096)]
    pub prefill_chunk: usize,
    /// Bound on one expert exchange on the data plane.
    #[arg(long, env = "RINGBOLT_DATA_TIMEOUT_SECS", default_value_t = 60)]
    pub data_timeout_secs: u64,
    /// How long a layer step waits for a plan that can serve it after a failure.
    #[arg(long, env = "RINGBOLT_RESEND_WINDOW_SECS", default_value_t = 120)]
    pub resend_window_secs: u64,
    /// Where attention computes: `cpu`, or `cuda:N` (a build with `--features cuda`).
    #[arg(long, env = "RINGBOLT_DEVICE", default_value = "cpu")]
    pub device: Device,
}

/// A job step as the engine thread receives it, with the stream its events go to.
struct Incoming {
    req: ipb::RunJobRequest,
    tx: mpsc::UnboundedSender<Result<ipb::JobStep, Status>>,
}

/// The attention worker's model and its engine thread. The engine thread is the only thread
/// that computes with the model (one per backend, so one per GPU): job steps queue to it and
/// run through the scheduler core (one prefill chunk at a time, the decode steps of all
/// running jobs batched, so their rows share each layer's step to the expert workers).
pub struct AttentionHost<B: Backend = Cpu> {
    model: Model<B>,
    experts: RemoteExperts,
    prefill_chunk: usize,
    max_batch: usize,
}

/// A job step's events, as the coordinator reads them on its stream. A closed stream (the
/// coordinator went away or gave up) cancels the step.
struct StepSink {
    job: String,
    tx: mpsc::UnboundedSender<Result<ipb::JobStep, Status>>,
}

impl Sink for StepSink {
    fn send(&mut self, event: Event<'_>) -> bool {
        use ipb::job_step::Event as E;
        let ev = match event {
            Event::Progress {
                phase,
                done,
                tokens_per_second,
            } => E::Progress(ipb::StepProgress {
                phase: match phase {
                    Phase::Prefill => 1,
                    Phase::Decode => 2,
                },
                tokens_done: done,
                tokens_per_second,
            }),
            Event::Token { index, token } => E::Token(ipb::StepToken { index, token }),
            // This worker prefills alone (Forward::prefill_context is not offered).
            Event::ContextParallel { .. } => return true,
            Event::Finished {
                reason: FinishReason::Cancelled,
                ..
            } => {
                tracing::info!(job = %self.job, "job step aborted: the coordinator went away");
                return false;
            }
            Event::Finished { reason, stats } => {
                tracing::info!(
                    job = %self.job,
                    layer_steps = stats.layer_steps,
                    resent = stats.resent,
                    widest_batch = stats.widest_batch,
                    "job step finished"
                );
                E::Done(ipb::StepDone {
                    finish_reason: if reason == FinishReason::Stop {
                        "stop"
                    } else {
                        "length"
                    }
                    .into(),
                    prefill_seconds: stats.prefill_seconds,
                    decode_seconds: stats.decode_seconds,
                    layer_steps: stats.layer_steps,
                    layer_steps_resent: stats.resent,
                })
            }
            Event::Failed(e) => {
                let status = Status::new(fail_code(e.kind), e.message);
                tracing::warn!(job = %self.job, status = %status, "job step failed");
                let _ = self.tx.send(Err(status));
                return false;
            }
        };
        self.tx.send(Ok(ipb::JobStep { event: Some(ev) })).is_ok()
    }

    fn cancelled(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Forward passes whose experts are the cluster's expert workers.
impl<B: Backend> Forward<B> for RemoteExperts {
    fn forward(
        &self,
        model: &Model<B>,
        seqs: &mut [(&mut SequenceState<B>, &[u32])],
        logits: Logits,
    ) -> (ringbolt_model::Result<Vec<Vec<f32>>>, ForwardCounts) {
        let experts = self.for_job();
        let r = model.forward_batch_with(seqs, logits, Some(&experts));
        let c = experts.counts();
        (
            r,
            ForwardCounts {
                layer_steps: c.steps,
                resent: c.resent,
            },
        )
    }
}

impl<B: Backend> AttentionHost<B> {
    pub fn new(model: Model<B>, experts: RemoteExperts, prefill_chunk: usize) -> Self {
        AttentionHost {
            model,
            experts,
            prefill_chunk: prefill_chunk.max(1),
            max_batch: 64,
        }
    }

    pub fn experts(&self) -> &RemoteExperts {
        &self.experts
    }

    /// Checks what only a job step has (its id, its segment, the bounds every server keeps);
    /// the scheduler checks the rest against the model, whoever sent the step.
    fn check(req: &ipb::RunJobRequest) -> Result<scheduler::Request, Status> {
        check_job_id(&req.job_id).map_err(Status::invalid_argument)?;
        let prompt = ringbolt_proto::unpack_tokens(&req.prompt)
            .ok_or_else(|| Status::invalid_argument("prompt bytes are not a multiple of 4"))?;
        let seg = req.segment.unwrap_or_default();
        if seg.start != 0 || seg.end != prompt.len() as u64 {
            return Err(Status::unimplemented(format!(
                "segment [{}, {}) of a {}-token context: this worker runs whole contexts \
                 (context parallelism across attention workers is not implemented yet)",
                seg.start,
                seg.end,
                prompt.len()
            )));
        }
        if req.max_new_tokens > MAX_NEW_TOKENS_CEILING {
            return Err(Status::invalid_argument(format!(
                "max_new_tokens must be between 1 and {MAX_NEW_TOKENS_CEILING}, got {}",
                req.max_new_tokens
            )));
        }
        if req.stop_tokens.len() > MAX_STOP_TOKENS {
            return Err(Status::invalid_argument(format!(
                "{} stop tokens; at most {MAX_STOP_TOKENS} are allowed",
                req.stop_tokens.len()
            )));
        }
        Ok(scheduler::Request {
            prompt,
            max_new_tokens: req.max_new_tokens,
            sampling: SamplingParams {
                temperature: req.temperature,
                top_p: req.top_p,
                seed: req.seed,
            },
            stop_tokens: req.stop_tokens.clone(),
            ignore_eos: req.ignore_eos,
            prefill_chunk: (req.prefill_chunk > 0).then_some(req.prefill_chunk as usize),
            context_parallel: 1,
        })
    }

    /// Hands a job step to the scheduler, or refuses it on its stream with the status that
    /// says why.
    fn admit(&self, sched: &mut Scheduler<B, StepSink>, inc: Incoming) {
        let Incoming { req, tx } = inc;
        let job = echo(&req.job_id);
        match Self::check(&req) {
            Ok(r) => {
                tracing::info!(%job, tokens = r.prompt.len(), "job step started");
                sched.admit(&self.model, r, StepSink { job, tx });
            }
            Err(status) => {
                tracing::warn!(%job, status = %status, "job step refused");
                let _ = tx.send(Err(status));
            }
        }
    }

    /// The engine thread: runs until every sender of `jobs` is gone and no job is left.
    fn run(&self, jobs: std::sync::mpsc::Receiver<Incoming>) {
        let mut sched = Scheduler::new(SchedulerConfig {
            max_batch: self.max_batch,
            prefill_chunk: self.prefill_chunk,
        });
        loop {
            if sched.is_idle() {
                match jobs.recv() {
                    Ok(inc) => self.admit(&mut sched, inc),
                    Err(_) => return,
                }
            }
            while let Ok(inc) = jobs.try_recv() {
                self.admit(&mut sched, inc);
            }
            let _span = tracing::info_span!("step", sequences = sched.len()).entered();
            sched.step(&self.model, &self.experts);
        }
    }
}

#[derive(Clone)]
struct Service {
    jobs: std::sync::mpsc::SyncSender<Incoming>,
}

#[tonic::async_trait]
impl AttentionWorker for Service {
    type RunJobStream = UnboundedReceiverStream<Result<ipb::JobStep, Status>>;

    async fn run_job(
        &self,
        request: Request<ipb::RunJobRequest>,
    ) -> Result<Response<Self::RunJobStream>, Status> {
        let req = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let job = echo(&req.job_id);
        match self.jobs.try_send(Incoming { req, tx }) {
            Ok(()) => Ok(Response::new(UnboundedReceiverStream::new(rx))),
            Err(std::sync::mpsc::TrySendError::Full(_)) => Err(Status::resource_exhausted(
                format!("job {job}: this attention worker's queue is full"),
            )),
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(Status::unavailable(
                "this attention worker's engine has stopped",
            )),
        }
    }
}

/// Starts the engine thread of `host`; job steps go to the returned sender (at most `queue`
/// waiting). The receiver turns true when the thread has ended (it should not, while the
/// sender lives).
fn start_engine<B: Backend>(
    host: AttentionHost<B>,
    queue: usize,
) -> Result<
    (
        std::sync::mpsc::SyncSender<Incoming>,
        tokio::sync::watch::Receiver<bool>,
    ),
    ClusterError,
> {
    let (tx, rx) = std::sync::mpsc::sync_channel(queue.max(1));
    let (ended_tx, ended) = tokio::sync::watch::channel(false);
    /// Says the engine ended however it ends (a panic included).
    struct Ended(tokio::sync::watch::Sender<bool>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.send_replace(true);
        }
    }
    std::thread::Builder::new()
        .name("attention-engine".into())
        .spawn(move || {
            let _ended = Ended(ended_tx);
            host.run(rx)
        })
        .map_err(|e| ClusterError::Model(format!("cannot start the engine thread: {e}")))?;
    Ok((tx, ended))
}

/// `ringbolt attention-worker`.
pub async fn run(a: AttentionWorkerArgs) -> Result<(), ClusterError> {
    let device = a.device;
    // The device's backend is opened and the model loaded on a blocking thread; what comes back
    // is the worker, typed by its backend, ready to serve.
    let serve = tokio::task::spawn_blocking(move || {
        device
            .open(None, Load { a })
            .map_err(|e| ClusterError::Model(e.to_string()))?
    })
    .await
    .map_err(|e| ClusterError::Model(e.to_string()))??;
    serve.await
}

/// Loads the attention weights onto the opened backend.
struct Load {
    a: AttentionWorkerArgs,
}

impl OnBackend for Load {
    type Output = Result<BoxFuture<'static, Result<(), ClusterError>>, ClusterError>;
    fn run<B: Backend>(self, backend: B) -> Self::Output {
        let ckpt = Checkpoint::open(&self.a.common.checkpoint)
            .map_err(|e| ClusterError::Model(e.to_string()))?;
        let model = Model::load_parts(&ckpt, backend, false)
            .map_err(|e| ClusterError::Model(e.to_string()))?;
        tracing::info!(backend = %model.backend().name(), "attention weights loaded");
        Ok(Box::pin(serve(self.a, model)))
    }
}

async fn serve<B: Backend>(a: AttentionWorkerArgs, model: Model<B>) -> Result<(), ClusterError> {
    let c = &a.common;
    let membership = connect_membership(c).await?;
    let (listener, address) = bind(c.listen, c.advertise.as_deref()).await?;
    let id = c.member_id("attention", &address);
    let stop = CancellationToken::new();
    let view = PlanView::follow(membership.client(), &c.cluster, stop.clone()).await?;
    let _group = crate::group::follow_on(
        a.device,
        &id,
        &view,
        membership.client(),
        &c.cluster,
        stop.clone(),
    );
    let cfg = model.config().clone();
    let experts = RemoteExperts::new(
        view,
        tokio::runtime::Handle::current(),
        cfg.num_experts,
        cfg.hidden_size,
        Duration::from_secs(a.data_timeout_secs.max(1)),
        Duration::from_secs(a.resend_window_secs.max(1)),
    );
    let host = AttentionHost::new(model, experts, a.prefill_chunk);
    let (jobs, mut engine_ended) = start_engine(host, ENGINE_QUEUE)?;
    let svc = AttentionWorkerServer::new(Service { jobs })
        .max_decoding_message_size(MAX_CONTROL_MESSAGE)
        .max_encoding_message_size(MAX_CONTROL_MESSAGE);
    let health = Health::start(&[<AttentionWorkerServer<Service> as NamedService>::NAME]).await;
    let limits = c.conn.limits();
    let (incoming, _) = incoming(listener, limits);
    let grpc = tokio::spawn(
        grpc_server(&limits)
            .add_service(health.service())
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
    );
    let reg = membership
        .register(
            Member {
                id: id.clone(),
                role: Role::AttentionWorker,
                address: address.clone(),
                data_address: String::new(),
                capacity_bytes: 0,
                expert_bytes: 0,
                device: a.device.to_string(),
            },
            c.lease_ttl(),
        )
        .await
        .map_err(|e| ClusterError::Etcd(e.to_string()))?;
    health.set(true).await;
    eprintln!("ringbolt attention-worker {id} listening on {address}");
    let mut lost = reg.lost();
    let result = tokio::select! {
        _ = lost.wait_for(|l| *l) => {
            Err(ClusterError::Etcd("membership lease lost: etcd unreachable".into()))
        }
        _ = engine_ended.wait_for(|e| *e) => {
            Err(ClusterError::Model("the engine thread stopped: no job can run here".into()))
        }
        _ = wait_for_signal() => Ok(()),
    };
    health.set(false).await;
    let _ = reg.leave().await;
    stop.cancel();
    let _ = grpc.await;
    result
}
