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
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::{Backend, Device, OnBackend};
use ringbolt_membership::{Member, Membership, Role};
use ringbolt_model::{Checkpoint, Logits, Model, Sampler, SamplingParams, SequenceState};
use ringbolt_proto::internal as ipb;
use ringbolt_proto::internal::attention_worker_server::{AttentionWorker, AttentionWorkerServer};
use ringbolt_transport::listen::{grpc_server, incoming};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
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
/// that computes with the model (one per backend, so one per GPU): job steps queue to it, and
/// each round it runs one prefill chunk of the oldest prefilling job, then one decode step for
/// every decoding job together (their rows share each layer's step to the expert workers).
pub struct AttentionHost<B: Backend = Cpu> {
    model: Model<B>,
    experts: RemoteExperts,
    prefill_chunk: usize,
    max_batch: usize,
}

/// One job step in the engine.
struct Step<B: Backend> {
    job: String,
    prompt: Vec<u32>,
    /// Prompt tokens prefilled so far.
    done: usize,
    chunk: usize,
    state: SequenceState<B>,
    sampler: Sampler,
    max_new: u32,
    stop: Vec<u32>,
    /// Tokens emitted so far, and the last one (the next decode step's input).
    emitted: u32,
    last: u32,
    t0: Instant,
    prefill_seconds: f64,
    t1: Instant,
    layer_steps: u64,
    resent: u64,
    /// The most jobs this one shared a decode step with (itself included).
    widest_batch: usize,
    tx: mpsc::UnboundedSender<Result<ipb::JobStep, Status>>,
}

impl<B: Backend> Step<B> {
    /// Sends an event; false when the coordinator dropped the stream (the step is aborted).
    fn send(&self, ev: ipb::job_step::Event) -> bool {
        self.tx.send(Ok(ipb::JobStep { event: Some(ev) })).is_ok()
    }

    fn fail(self, status: Status) {
        tracing::warn!(job = %self.job, status = %status, "job step failed");
        let _ = self.tx.send(Err(status));
    }
}

/// What a job step does after a round.
enum Next<B: Backend> {
    Prefill(Step<B>),
    Decode(Step<B>),
    Gone,
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

    /// Checks a job step's request: its prompt, sampler and prefill chunk.
    fn check(&self, req: &ipb::RunJobRequest) -> Result<(Vec<u32>, Sampler, usize), Status> {
        check_job_id(&req.job_id).map_err(Status::invalid_argument)?;
        let prompt = ringbolt_proto::unpack_tokens(&req.prompt)
            .ok_or_else(|| Status::invalid_argument("prompt bytes are not a multiple of 4"))?;
        if prompt.is_empty() {
            return Err(Status::invalid_argument("the prompt is empty"));
        }
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
        // The coordinator checked all of this against the public limits; a worker checks it
        // again against the model, whoever sent it.
        let cfg = self.model.config();
        let positions = cfg.max_position_embeddings as u64;
        if req.max_new_tokens == 0 || req.max_new_tokens > MAX_NEW_TOKENS_CEILING {
            return Err(Status::invalid_argument(format!(
                "max_new_tokens must be between 1 and {MAX_NEW_TOKENS_CEILING}, got {}",
                req.max_new_tokens
            )));
        }
        if prompt.len() as u64 + req.max_new_tokens as u64 > positions {
            return Err(Status::invalid_argument(format!(
                "{} prompt tokens + {} new tokens exceed the model's {positions} positions",
                prompt.len(),
                req.max_new_tokens
            )));
        }
        if req.stop_tokens.len() > MAX_STOP_TOKENS {
            return Err(Status::invalid_argument(format!(
                "{} stop tokens; at most {MAX_STOP_TOKENS} are allowed",
                req.stop_tokens.len()
            )));
        }
        if let Some(&t) = req
            .stop_tokens
            .iter()
            .find(|&&t| t as usize >= cfg.vocab_size)
        {
            return Err(Status::invalid_argument(format!(
                "stop token {t} is outside the vocabulary (size {})",
                cfg.vocab_size
            )));
        }
        self.model
            .check_tokens(0, &prompt)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let sampler = Sampler::new(SamplingParams {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
        })
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let chunk = if req.prefill_chunk > 0 {
            req.prefill_chunk as usize
        } else {
            self.prefill_chunk
        };
        Ok((prompt, sampler, chunk))
    }

    /// Sets a job step up, or refuses it on its stream with the status that says why.
    fn admit(&self, inc: Incoming) -> Option<Step<B>> {
        let Incoming { req, tx } = inc;
        let (prompt, sampler, chunk) = match self.check(&req) {
            Ok(c) => c,
            Err(status) => {
                tracing::warn!(job = %echo(&req.job_id), status = %status, "job step refused");
                let _ = tx.send(Err(status));
                return None;
            }
        };
        tracing::info!(job = %req.job_id, tokens = prompt.len(), "job step started");
        let now = Instant::now();
        Some(Step {
            job: req.job_id,
            prompt,
            done: 0,
            chunk,
            state: self.model.new_state(),
            sampler,
            max_new: req.max_new_tokens,
            stop: req.stop_tokens,
            emitted: 0,
            last: 0,
            t0: now,
            prefill_seconds: 0.0,
            t1: now,
            layer_steps: 0,
            resent: 0,
            widest_batch: 1,
            tx,
        })
    }

    /// One forward pass of `seqs` (their new tokens) through the model and the expert
    /// workers; the layer steps it took count for every sequence in it.
    fn forward(
        &self,
        steps: &mut [&mut Step<B>],
        toks: &[Vec<u32>],
        logits: Logits,
    ) -> Result<Vec<Vec<f32>>, Status> {
        let experts = self.experts.for_job();
        let r = {
            let mut seqs: Vec<(&mut SequenceState<B>, &[u32])> = steps
                .iter_mut()
                .zip(toks)
                .map(|(s, t)| (&mut s.state, t.as_slice()))
                .collect();
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.model
                    .forward_batch_with(&mut seqs, logits, Some(&experts))
            }))
        };
        let c = experts.counts();
        for s in steps.iter_mut() {
            s.layer_steps += c.steps;
            s.resent += c.resent;
        }
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
            Err(_) => Err(Status::internal("the forward pass panicked")),
        }
    }

    /// Emits a sampled token; the step ends on a stop token or at its length.
    fn emit(&self, mut s: Step<B>, logits: &[f32]) -> Next<B> {
        let t = s.sampler.sample(logits);
        if !s.send(ipb::job_step::Event::Token(ipb::StepToken {
            index: s.emitted,
            token: t,
        })) {
            tracing::info!(job = %s.job, "job step aborted: the coordinator went away");
            return Next::Gone;
        }
        s.emitted += 1;
        s.last = t;
        let reason = if s.stop.contains(&t) {
            "stop"
        } else if s.emitted >= s.max_new {
            "length"
        } else {
            return Next::Decode(s);
        };
        tracing::info!(
            job = %s.job,
            layer_steps = s.layer_steps,
            resent = s.resent,
            widest_batch = s.widest_batch,
            "job step finished"
        );
        s.send(ipb::job_step::Event::Done(ipb::StepDone {
            finish_reason: reason.into(),
            prefill_seconds: s.prefill_seconds,
            decode_seconds: s.t1.elapsed().as_secs_f64(),
            layer_steps: s.layer_steps,
            layer_steps_resent: s.resent,
        }));
        Next::Gone
    }

    /// One prefill chunk of `s`; after the last one, its first token.
    fn prefill_round(&self, mut s: Step<B>) -> Next<B> {
        let end = (s.done + s.chunk).min(s.prompt.len());
        let last = end == s.prompt.len();
        let toks = vec![s.prompt[s.done..end].to_vec()];
        let r = self.forward(
            &mut [&mut s],
            &toks,
            if last { Logits::Last } else { Logits::None },
        );
        let logits = match r {
            Ok(mut v) => v.pop().unwrap_or_default(),
            Err(status) => {
                s.fail(status);
                return Next::Gone;
            }
        };
        s.done = end;
        let tps = s.done as f64 / s.t0.elapsed().as_secs_f64().max(1e-9);
        if !s.send(ipb::job_step::Event::Progress(ipb::StepProgress {
            phase: 1,
            tokens_done: s.done as u64,
            tokens_per_second: tps,
        })) {
            tracing::info!(job = %s.job, "job step aborted: the coordinator went away");
            return Next::Gone;
        }
        if !last {
            return Next::Prefill(s);
        }
        s.prefill_seconds = s.t0.elapsed().as_secs_f64();
        s.t1 = Instant::now();
        self.emit(s, &logits)
    }

    /// One decode step of every job in `batch` together.
    fn decode_round(&self, mut batch: Vec<Step<B>>) -> Vec<Step<B>> {
        let n = batch.len();
        for s in batch.iter_mut() {
            s.widest_batch = s.widest_batch.max(n);
        }
        let toks: Vec<Vec<u32>> = batch.iter().map(|s| vec![s.last]).collect();
        let r = {
            let mut refs: Vec<&mut Step<B>> = batch.iter_mut().collect();
            self.forward(&mut refs, &toks, Logits::Last)
        };
        match r {
            Ok(logits) => batch
                .into_iter()
                .zip(logits)
                .filter_map(|(s, l)| match self.emit(s, &l) {
                    Next::Decode(s) => Some(s),
                    _ => None,
                })
                .collect(),
            Err(status) => {
                for s in batch {
                    s.fail(status.clone());
                }
                Vec::new()
            }
        }
    }

    /// The engine thread: runs until every sender of `jobs` is gone and no job is left.
    fn run(&self, jobs: std::sync::mpsc::Receiver<Incoming>) {
        let mut prefilling: std::collections::VecDeque<Step<B>> = Default::default();
        let mut decoding: Vec<Step<B>> = Vec::new();
        loop {
            if prefilling.is_empty() && decoding.is_empty() {
                match jobs.recv() {
                    Ok(inc) => prefilling.extend(self.admit(inc)),
                    Err(_) => return,
                }
            }
            while let Ok(inc) = jobs.try_recv() {
                prefilling.extend(self.admit(inc));
            }
            // Steps whose coordinator went away stop here (their tokens would go nowhere).
            prefilling.retain(|s| !s.tx.is_closed());
            decoding.retain(|s| !s.tx.is_closed());
            if let Some(s) = prefilling.pop_front() {
                let _span = tracing::info_span!("prefill", job = %s.job).entered();
                match self.prefill_round(s) {
                    Next::Prefill(s) => prefilling.push_front(s),
                    Next::Decode(s) => decoding.push(s),
                    Next::Gone => {}
                }
            }
            if !decoding.is_empty() {
                let _span = tracing::info_span!("decode", batch = decoding.len()).entered();
                let mut rest = decoding.split_off(decoding.len().min(self.max_batch));
                let mut kept = self.decode_round(std::mem::take(&mut decoding));
                kept.append(&mut rest);
                decoding = kept;
            }
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
    let health = Health::start::<AttentionWorkerServer<Service>>().await;
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
