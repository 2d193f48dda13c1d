//! The attention worker: the model without its experts. A job step (`RunJob`) prefills the
//! segment of the context it names, then decodes; every MoE layer goes to the expert workers
//! of the current plan epoch. One engine thread owns the model (and so the GPU's context on a
//! CUDA backend): job steps queue to it, and the decode steps of all running jobs are batched
//! into one forward pass, so each layer sends their rows to the expert workers together.
//!
//! A job step may be one rank of a context-parallel prefill (design.md §4.1–4.2a): it runs on
//! a thread of its own (so ranks of several jobs never wait on each other's engine), exchanges
//! lightning states and softmax keys and values with the other ranks over this worker's
//! context data plane (one [`TcpHub`] for every group), and keeps its keys and values: the
//! rank holding the last position decodes in the engine's batch, asking every rank for its
//! part of each decode step's softmax attention; the others serve those requests until the
//! sequence ends ("prefilled").

use crate::remote::RemoteExperts;
use crate::store::{EtcdStore, Store};
use crate::{
    ClusterError, CommonArgs, Health, bind, bind_data, connect_membership, wait_for_signal,
};
use clap::Args;
use futures::future::BoxFuture;
use ringbolt_jobs::bounds::{MAX_NEW_TOKENS_CEILING, MAX_STOP_TOKENS, check_job_id, echo};
use ringbolt_jobs::executor::fail_code;
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::{Backend, OnBackend};
use ringbolt_membership::{Member, Membership, Role};
use ringbolt_model::scheduler::ContextPrefill;
use ringbolt_model::scheduler::{
    self, Event, FinishReason, Forward, ForwardCounts, Phase, Scheduler, SchedulerConfig, Sink,
};
use ringbolt_model::{Checkpoint, Logits, Model, ModelError, SamplingParams, SequenceState};
use ringbolt_proto::internal as ipb;
use ringbolt_proto::internal::attention_worker_server::{AttentionWorker, AttentionWorkerServer};
use ringbolt_transport::tcp::TcpHub;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

/// Largest control message (a 4M-token prompt is 16 MiB packed, and a job step carries up to
/// 64 MiB of images beside it).
pub const MAX_CONTROL_MESSAGE: usize = 96 << 20;

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
    #[command(flatten)]
    pub compute: crate::ComputeArgs,
    /// Where the context data plane listens: context-parallel ranks exchange lightning states
    /// and keys and values over it (default: the --listen host, any port).
    #[arg(long, env = "RINGBOLT_DATA_LISTEN")]
    pub data_listen: Option<SocketAddr>,
    /// Memory offered for one job's context cache (0: unlimited). The coordinator splits a
    /// context among enough attention workers that each one's share fits.
    #[arg(long, env = "RINGBOLT_MEMORY_BYTES", default_value_t = 0)]
    pub memory_bytes: u64,
    #[command(flatten)]
    pub context_cache: crate::ContextCacheArgs,
}

/// Most ranks a context-parallel group may have.
pub const MAX_CONTEXT_RANKS: usize = 256;

/// A job step as the engine thread receives it, with the stream its events go to.
struct Incoming {
    req: ipb::RunJobRequest,
    tx: mpsc::UnboundedSender<Result<ipb::JobStep, Status>>,
    /// The job step's span (a child of the coordinator's job span, through the request).
    span: tracing::Span,
}

/// The attention worker's model and its engine thread. The engine thread is the only thread
/// that computes with the model (one per backend, so one per GPU): job steps queue to it and
/// run through the scheduler core (one prefill chunk at a time, the decode steps of all
/// running jobs batched, so their rows share each layer's step to the expert workers).
pub struct AttentionHost<B: Backend = Cpu> {
    model: Arc<Model<B>>,
    experts: Arc<RemoteExperts>,
    prefill_chunk: usize,
    max_batch: usize,
    /// Where context-parallel ranks exchange (None: such steps are refused).
    plane: Option<Arc<ContextPlane>>,
    /// Sequences prefilled by context-parallel ranks, to decode here.
    prefilled: (
        std::sync::mpsc::Sender<Prefilled<B>>,
        std::sync::mpsc::Receiver<Prefilled<B>>,
    ),
    /// Job steps whose images the vision tower (on a thread of its own) turned into features.
    seen: (
        std::sync::mpsc::Sender<Seen>,
        std::sync::mpsc::Receiver<Seen>,
    ),
    /// What this worker's prefills computed, by prompt prefix (None: no cache).
    cache: Option<ringbolt_model::prefix::ContextCache>,
}

/// This worker's context data plane.
pub struct ContextPlane {
    pub hub: TcpHub,
    pub rt: tokio::runtime::Handle,
    /// Bound on one wait for another rank.
    pub timeout: Duration,
}

/// A rank's step as its group gave it.
struct RankStep {
    group: u64,
    rank: usize,
    peers: Vec<SocketAddr>,
}

/// A job step whose prompt's images are features now, to start on the engine thread.
struct Seen {
    req: scheduler::Request,
    rank: Option<RankStep>,
    sink: StepSink,
}

/// A context-parallel prefill done, its sequence to decode on the engine thread.
type Prefilled<B> = scheduler::Prefilled<B, StepSink>;

/// A job step's events, as the coordinator reads them on its stream. A closed stream (the
/// coordinator went away or gave up) cancels the step.
struct StepSink {
    job: String,
    tx: mpsc::UnboundedSender<Result<ipb::JobStep, Status>>,
    span: tracing::Span,
    /// Prompt tokens the context cache had.
    cached_tokens: u64,
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
            Event::Cached { tokens } => {
                self.cached_tokens = tokens;
                return true;
            }
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
                    cached_tokens: self.cached_tokens,
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
    pub fn new(
        model: Model<B>,
        experts: RemoteExperts,
        prefill_chunk: usize,
        plane: Option<ContextPlane>,
    ) -> Self {
        AttentionHost {
            model: Arc::new(model),
            experts: Arc::new(experts),
            prefill_chunk: prefill_chunk.max(1),
            max_batch: 64,
            plane: plane.map(Arc::new),
            prefilled: std::sync::mpsc::channel(),
            seen: std::sync::mpsc::channel(),
            cache: None,
        }
    }

    /// Prefills start from, and add to, `cache`.
    pub fn with_context_cache(
        mut self,
        cache: Option<ringbolt_model::prefix::ContextCache>,
    ) -> Self {
        self.cache = cache;
        self
    }

    pub fn experts(&self) -> &RemoteExperts {
        &self.experts
    }

    /// Checks what only a job step has (its id, its segment, the bounds every server keeps);
    /// the scheduler checks the rest against the model, whoever sent the step.
    fn check(req: &ipb::RunJobRequest) -> Result<(scheduler::Request, Option<RankStep>), Status> {
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
        let rank = req.context.as_ref().map(Self::check_group).transpose()?;
        if rank.is_some() && req.prefill_chunk == 0 {
            // The ranks must cut the prompt alike (the group's part ends on a chunk boundary).
            return Err(Status::invalid_argument(
                "a context-parallel job step must name its prefill chunk",
            ));
        }
        Ok((
            scheduler::Request {
                context_parallel: rank.as_ref().map_or(1, |r| r.peers.len()),
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
                context_cache: !req.no_context_cache,
                embeddings: Vec::new(),
            },
            rank,
        ))
    }

    fn check_group(g: &ipb::ContextGroup) -> Result<RankStep, Status> {
        if g.peers.is_empty() || g.peers.len() > MAX_CONTEXT_RANKS {
            return Err(Status::invalid_argument(format!(
                "a context-parallel group has 1 to {MAX_CONTEXT_RANKS} ranks, got {}",
                g.peers.len()
            )));
        }
        if g.rank as usize >= g.peers.len() {
            return Err(Status::invalid_argument(format!(
                "rank {} of a {}-rank group",
                g.rank,
                g.peers.len()
            )));
        }
        let peers = g
            .peers
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|e| {
                    Status::invalid_argument(format!("peer address `{}`: {e}", echo(a)))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RankStep {
            group: g.group,
            rank: g.rank as usize,
            peers,
        })
    }

    /// Hands a job step to the scheduler, or refuses it on its stream with the status that
    /// says why.
    fn admit(&self, sched: &mut Scheduler<B, StepSink>, inc: Incoming) {
        let Incoming { mut req, tx, span } = inc;
        let job = echo(&req.job_id);
        let images = std::mem::take(&mut req.images);
        match Self::check(&req) {
            Ok((r, rank)) => {
                let sink = StepSink {
                    job,
                    tx,
                    span,
                    cached_tokens: 0,
                };
                if images.is_empty() {
                    self.dispatch(sched, r, rank, sink);
                } else {
                    self.see(r, rank, images, sink);
                }
            }
            Err(status) => {
                tracing::warn!(%job, status = %status, "job step refused");
                let _ = tx.send(Err(status));
            }
        }
    }

    /// Starts a checked job step: into the scheduler, or as one rank of a group.
    fn dispatch(
        &self,
        sched: &mut Scheduler<B, StepSink>,
        r: scheduler::Request,
        rank: Option<RankStep>,
        sink: StepSink,
    ) {
        match rank {
            None => {
                tracing::info!(job = %sink.job, tokens = r.prompt.len(), "job step started");
                sched.admit(&self.model, r, sink);
            }
            Some(rank) => self.start_rank(r, rank, sink),
        }
    }

    /// Runs the step's images through the vision tower on a thread of its own (the engine
    /// thread keeps stepping the other jobs), then hands the step back to start. Every rank of
    /// a context-parallel group does this, and takes its chunks' features.
    fn see(
        &self,
        mut r: scheduler::Request,
        rank: Option<RankStep>,
        images: Vec<Vec<u8>>,
        sink: StepSink,
    ) {
        let (model, back) = (self.model.clone(), self.seen.0.clone());
        let tx = sink.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("vision".into())
            .spawn(move || {
                let _span =
                    tracing::info_span!(parent: &sink.span, "vision", images = images.len())
                        .entered();
                let p = ringbolt_jobs::store::Prompt {
                    tokens: std::mem::take(&mut r.prompt),
                    images,
                };
                let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    ringbolt_jobs::executor::with_images(&model, p)
                }));
                match seen {
                    Ok(Ok((prompt, embeddings))) => {
                        (r.prompt, r.embeddings) = (prompt, embeddings);
                        let _ = back.send(Seen { req: r, rank, sink });
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(job = %sink.job, error = %e, "job step refused");
                        let _ = sink.tx.send(Err(e.status()));
                    }
                    Err(p) => {
                        let msg = format!(
                            "the vision tower panicked: {}",
                            scheduler::panic_message(&*p)
                        );
                        let _ = sink.tx.send(Err(Status::internal(msg)));
                    }
                }
            });
        if let Err(e) = spawned {
            let _ = tx.send(Err(Status::unavailable(format!(
                "cannot start the vision tower's thread: {e}"
            ))));
        }
    }

    /// The engine thread: runs until every sender of `jobs` is gone and no job is left.
    fn run(&self, jobs: std::sync::mpsc::Receiver<Incoming>) {
        let mut sched = Scheduler::new(SchedulerConfig {
            max_batch: self.max_batch,
            prefill_chunk: self.prefill_chunk,
        })
        .with_context_cache(self.cache.clone());
        loop {
            while let Ok(s) = self.seen.1.try_recv() {
                self.dispatch(&mut sched, s.req, s.rank, s.sink);
            }
            while let Ok(p) = self.prefilled.1.try_recv() {
                tracing::info!(job = %p.sink.job, "decoding after the context-parallel prefill");
                sched.admit_prefilled(&self.model, p);
            }
            if sched.is_idle() {
                // Woken now and then for sequences that context-parallel ranks prefilled.
                match jobs.recv_timeout(Duration::from_millis(20)) {
                    Ok(inc) => self.admit(&mut sched, inc),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(inc) = jobs.try_recv() {
                self.admit(&mut sched, inc);
            }
            // The step belongs to the trace of the sequence it serves first; the others'
            // job steps are linked to it.
            let mut sinks = sched.sinks();
            let first = sinks.next().and_then(|s| s.span.id());
            let span = tracing::info_span!(parent: first, "step", sequences = sched.len());
            for s in sinks {
                span.follows_from(&s.span);
            }
            let _span = span.entered();
            sched.step(&*self.model, &*self.experts);
        }
    }

    /// Starts rank `rank`'s part of the context-parallel prefill of `req` on a thread of its
    /// own; the rank holding the last position hands its sequence back to the engine thread.
    fn start_rank(&self, req: scheduler::Request, rank: RankStep, sink: StepSink) {
        let fail = |sink: StepSink, s: Status| {
            tracing::warn!(job = %sink.job, status = %s, "context-parallel step refused");
            let _ = sink.tx.send(Err(s));
        };
        let Some(plane) = self.plane.clone() else {
            return fail(
                sink,
                Status::unimplemented("this attention worker has no context data plane"),
            );
        };
        if let Err(e) = Scheduler::<B, StepSink>::check_request(&self.model, &req) {
            return fail(sink, Status::new(fail_code(e.kind), e.message));
        }
        let (model, experts, back) = (
            self.model.clone(),
            self.experts.clone(),
            self.prefilled.0.clone(),
        );
        let (cache, prefill_chunk) = (self.cache.clone(), self.prefill_chunk);
        let name = format!("context-rank-{}", rank.rank);
        let job = sink.job.clone();
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let _span = tracing::info_span!(parent: &sink.span, "context_rank", job = %sink.job, rank = rank.rank)
                .entered();
            let started = Instant::now();
            tracing::info!(
                ranks = rank.peers.len(),
                tokens = req.prompt.len(),
                "context-parallel rank started"
            );
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let group_job = ringbolt_context::GroupJob {
                    prompt: &req.prompt,
                    embeddings: &req.embeddings,
                    chunk: req.prefill_chunk.unwrap_or(prefill_chunk),
                    context_cache: req.context_cache,
                };
                run_rank(
                    &model,
                    &experts,
                    &plane,
                    group_job,
                    cache.as_ref(),
                    &rank,
                    &sink.tx,
                )
            }));
            let r = r.unwrap_or_else(|p| {
                Err(Status::internal(format!(
                    "the context-parallel prefill panicked: {}",
                    scheduler::panic_message(&*p)
                )))
            });
            match r {
                Ok((Some(done), _)) => {
                    // The engine thread takes it over (it polls for these while it idles).
                    let _ = back.send(Prefilled {
                        req,
                        started,
                        done,
                        sink,
                    });
                }
                Ok((None, counts)) => {
                    tracing::info!(seconds = started.elapsed().as_secs_f64(), "rank prefilled");
                    let done = ipb::StepDone {
                        finish_reason: "prefilled".into(),
                        prefill_seconds: started.elapsed().as_secs_f64(),
                        decode_seconds: 0.0,
                        layer_steps: counts.steps,
                        layer_steps_resent: counts.resent,
                        cached_tokens: 0,
                    };
                    let _ = sink.tx.send(Ok(ipb::JobStep {
                        event: Some(ipb::job_step::Event::Done(done)),
                    }));
                }
                Err(s) if sink.tx.is_closed() => {
                    // The coordinator is done with the job (it finished, or another rank failed).
                    tracing::info!(status = %s, "context-parallel rank stopped");
                }
                Err(s) => {
                    tracing::warn!(status = %s, "context-parallel rank failed");
                    let _ = sink.tx.send(Err(s));
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(%job, error = %e, "cannot start a context-parallel rank");
        }
    }
}

type StepTx = mpsc::UnboundedSender<Result<ipb::JobStep, Status>>;

/// One rank's prefill over `plane`; returns what the decoding rank decodes from (None on the
/// other ranks) and the layer steps its MoE layers took.
fn run_rank<B: Backend>(
    model: &Model<B>,
    experts: &RemoteExperts,
    plane: &ContextPlane,
    group_job: ringbolt_context::GroupJob<'_>,
    cache: Option<&ringbolt_model::prefix::ContextCache>,
    rank: &RankStep,
    tx: &StepTx,
) -> Result<(Option<ContextPrefill<B>>, crate::remote::StepCounts), Status> {
    let me = rank.rank;
    let transport = plane
        .hub
        .join(
            rank.group,
            me,
            rank.peers.clone(),
            plane.timeout,
            ringbolt_transport::Link::from_env(),
        )
        .map_err(|e| Status::failed_precondition(format!("context group {}: {e}", rank.group)))?;
    let transport = Arc::new(transport);
    // The coordinator going away (it closes the stream when another rank failed) stops this
    // rank's waits at once.
    let abort = CancellationToken::new();
    let stop = abort.clone().drop_guard();
    {
        let (tx, abort) = (tx.clone(), abort.clone());
        plane.rt.spawn(async move {
            tokio::select! {
                _ = tx.closed() => abort.cancel(),
                _ = abort.cancelled() => {}
            }
        });
    }
    let failed = |e: ringbolt_context::ContextError| rank_status(me, e);
    let job = experts.for_job();
    let part = ringbolt_context::prefill_rank_cached(
        &plane.rt,
        model,
        Some(&job),
        group_job,
        cache,
        transport.clone(),
        &abort,
    )
    .map_err(failed)?;
    let times = &part.times;
    tracing::info!(
        compute_s = times.compute.as_secs_f64(),
        state_wait_s = times.state_wait.as_secs_f64(),
        ring_wait_s = times.ring_wait.as_secs_f64(),
        sent_bytes = times.sent,
        "rank's layers done"
    );
    for (part, t) in [
        ("compute", times.compute),
        ("state_wait", times.state_wait),
        ("ring_wait", times.ring_wait),
    ] {
        metrics::histogram!("ringbolt_context_rank_seconds", "part" => part)
            .record(t.as_secs_f64());
    }
    let ringbolt_context::RankPart {
        layout,
        shard,
        state,
        logits,
        cached,
        ..
    } = part;
    let cache_bytes = shard.bytes();
    metrics::gauge!("ringbolt_context_rank_cache_bytes").set(cache_bytes as f64);
    let _ = tx.send(Ok(ipb::JobStep {
        event: Some(ipb::job_step::Event::Context(ipb::StepContext {
            rank: me as u32,
            cache_bytes: cache_bytes as u64,
        })),
    }));
    // The keys and values stay here: the rank that decodes asks every rank for its part of
    // each decode step's attention (and of the rest of the prompt's, when the group's part
    // ended before it).
    let counts = job.counts();
    match state {
        None => {
            tracing::info!(
                cached_tokens = cached,
                "rank prefilled; serving its keys and values to the decoding rank"
            );
            ringbolt_context::serve_shard(
                &plane.rt,
                model.backend(),
                shard,
                layout.last_rank(),
                &*transport,
                &abort,
            )
            .map_err(failed)?;
            Ok((None, counts))
        }
        Some(mut state) => {
            // The decode outlives this function: its waits end when the coordinator goes.
            stop.disarm();
            state.split = Some(Box::new(ringbolt_context::RemoteSplit::new(
                plane.rt.clone(),
                model,
                shard,
                &layout,
                transport,
                abort,
            )));
            Ok((
                Some(ContextPrefill {
                    tokens: layout.tokens,
                    logits: logits.unwrap_or_default(),
                    state,
                    cache_bytes_per_rank: Vec::new(),
                    cached_tokens: cached,
                }),
                counts,
            ))
        }
    }
}

/// The status of a failed rank: ABORTED when it stopped for another rank (a peer lost or
/// malformed, the coordinator gone), so the coordinator blames that one, not this one.
fn rank_status(rank: usize, e: ringbolt_context::ContextError) -> Status {
    use ringbolt_context::ContextError as E;
    let msg = format!("context-parallel rank {rank}: {e}");
    match e {
        E::Transport(_) | E::Aborted | E::Malformed(_) => Status::aborted(msg),
        E::Model(ModelError::Experts(_)) => Status::unavailable(msg),
        E::Model(ModelError::Peer(_)) => Status::aborted(msg),
        E::Model(_) => Status::internal(msg),
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
        let span = tracing::info_span!("job_step", job = %job);
        match self.jobs.try_send(Incoming { req, tx, span }) {
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
    let compute = a.compute;
    // The device's backend is opened and the model loaded on a blocking thread; what comes back
    // is the worker, typed by its backend, ready to serve.
    let serve = tokio::task::spawn_blocking(move || {
        compute
            .open(Load { a })
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
        let model = Model::load_parts(&ckpt, backend, false, self.a.compute.weights)
            .map_err(|e| ClusterError::Model(e.to_string()))?;
        tracing::info!(backend = %model.backend().name(), "attention weights loaded");
        Ok(Box::pin(serve(self.a, model)))
    }
}

async fn serve<B: Backend>(a: AttentionWorkerArgs, model: Model<B>) -> Result<(), ClusterError> {
    let c = &a.common;
    let stop = CancellationToken::new();
    let shell = c.shell("attention-worker", c.listen, stop.clone())?;
    let membership = connect_membership(c).await?;
    let (listener, address) = bind(c.listen, c.advertise.as_deref()).await?;
    let id = c.member_id("attention", &address);
    let store: Arc<dyn Store> = Arc::new(EtcdStore::new(membership.client(), &c.cluster));
    let view = store.follow_plan(stop.clone()).await?;
    let _group = crate::group::follow_on(a.compute.device, &id, &view, store.clone(), stop.clone());
    let cfg = model.config().clone();
    let (data_listener, data_address, guard) = bind_data(a.data_listen, c).await?;
    let experts = RemoteExperts::new(
        view,
        tokio::runtime::Handle::current(),
        cfg.num_experts,
        cfg.hidden_size,
        Duration::from_secs(a.data_timeout_secs.max(1)),
        Duration::from_secs(a.resend_window_secs.max(1)),
        guard.clone(),
    );
    let plane = ContextPlane {
        hub: TcpHub::start(
            data_listener,
            Duration::from_secs(a.data_timeout_secs.max(1)),
            guard,
        )
        .map_err(|e| ClusterError::Io(e.to_string()))?,
        rt: tokio::runtime::Handle::current(),
        timeout: Duration::from_secs(a.data_timeout_secs.max(1)),
    };
    let host = AttentionHost::new(model, experts, a.prefill_chunk, Some(plane))
        .with_context_cache(a.context_cache.open()?);
    let (jobs, mut engine_ended) = start_engine(host, ENGINE_QUEUE)?;
    let svc = AttentionWorkerServer::new(Service { jobs })
        .max_decoding_message_size(MAX_CONTROL_MESSAGE)
        .max_encoding_message_size(MAX_CONTROL_MESSAGE);
    let health = Health::start(&[<AttentionWorkerServer<Service> as NamedService>::NAME]).await;
    let router = shell
        .server()
        .add_service(health.service())
        .add_service(svc);
    let grpc = shell.spawn(router, listener, stop.clone());
    let reg = membership
        .register(
            Member {
                id: id.clone(),
                role: Role::AttentionWorker,
                address: address.clone(),
                data_address,
                capacity_bytes: a.memory_bytes,
                expert_bytes: 0,
                device: a.compute.device.to_string(),
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
