//! The standalone engine thread: owns the model, reads each queued job's spooled prompt when
//! the scheduler has room for it, and runs every job through the one scheduler core
//! ([`ringbolt_model::Scheduler`]: chunked prefill, continuous batching, stop rules, one error
//! policy); each job's events go to its live record, and its end to the manager.

use crate::live::LiveJob;
use crate::record::{FinishReason, Timings, now_unix_ms};
use crate::store::JobStore;
use ringbolt_kernels::Backend;
use ringbolt_model::scheduler::{self as sched, Event, LocalForward, Scheduler, SchedulerConfig};
use ringbolt_model::{FailKind, Model, SamplingParams};
use ringbolt_proto::v1 as pb;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use tokio::sync::mpsc;

/// Engine scheduling limits.
#[derive(Clone)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Prompt tokens per prefill step (decode steps of running jobs interleave between chunks).
    pub prefill_chunk: usize,
    /// Ranks (threads) a job's prefill is split among when it asks for the server's default.
    pub context_parallel: usize,
    /// Prefills start from, and add to, this cache (None: no cache).
    pub context_cache: Option<ringbolt_model::prefix::ContextCache>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 32,
            prefill_chunk: 4096,
            context_parallel: 1,
            context_cache: None,
        }
    }
}

pub enum Outcome {
    Finished(FinishReason),
    Failed(i32, String),
}

/// A job leaving the engine: the final state is made durable by the manager.
pub struct Completion {
    pub job: Arc<LiveJob>,
    pub outcome: Outcome,
    pub timings: Timings,
}

pub(crate) struct Engine<B: Backend> {
    pub model: Arc<Model<B>>,
    pub store: Arc<JobStore>,
    pub jobs: Receiver<Arc<LiveJob>>,
    pub done: mpsc::Sender<Completion>,
    pub cfg: EngineConfig,
    /// Runs the transfers of context-parallel prefills.
    pub rt: tokio::runtime::Handle,
}

/// A job whose context-parallel prefill is done, to decode on the engine thread.
type Prefilled<B> = sched::Prefilled<B, JobSink>;

/// What a thread of the engine's hands back to the engine thread (exactly one message each).
enum Back<B: Backend> {
    /// A context-parallel prefill done (None: the thread ended the job itself).
    Prefilled(Option<Box<Prefilled<B>>>),
    /// A job whose images the vision tower turned into features, to start.
    Seen {
        sink: JobSink,
        rec: Box<crate::record::JobRecord>,
        degree: usize,
        prompt: Vec<u32>,
        embeddings: Vec<(usize, Vec<f32>)>,
    },
}

/// A spooled prompt as the model takes it: its images decoded and run through the vision
/// tower, their placeholders expanded ([`Model::prompt_with_images`]).
#[allow(clippy::type_complexity)]
pub fn with_images<B: Backend>(
    model: &Model<B>,
    p: crate::store::Prompt,
) -> Result<(Vec<u32>, Vec<(usize, Vec<f32>)>), crate::JobError> {
    if p.images.is_empty() {
        return Ok((p.tokens, Vec::new()));
    }
    let images = p
        .images
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            // Checked against the pixel limit when the job was accepted.
            ringbolt_model::image::Rgb::decode(bytes, u64::MAX)
                .map_err(|e| crate::JobError::InvalidArgument(format!("image {}: {e}", i + 1)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    model
        .prompt_with_images(&p.tokens, &images)
        .map_err(crate::JobError::from_request)
}

/// The gRPC code of a sequence failure.
pub fn fail_code(kind: FailKind) -> tonic::Code {
    match kind {
        FailKind::InvalidArgument => tonic::Code::InvalidArgument,
        FailKind::Unavailable => tonic::Code::Unavailable,
        FailKind::Aborted => tonic::Code::Aborted,
        FailKind::Internal => tonic::Code::Internal,
    }
}

/// A job's events into its live record; its end to the manager.
struct JobSink {
    job: Arc<LiveJob>,
    done: mpsc::Sender<Completion>,
    queued: f64,
    ttft: f64,
}

impl JobSink {
    fn complete(&self, outcome: Outcome, timings: Timings) {
        // The manager's task is gone only at shutdown; the job then reruns after restart.
        let _ = self.done.blocking_send(Completion {
            job: self.job.clone(),
            outcome,
            timings,
        });
    }
}

impl sched::Sink for JobSink {
    fn send(&mut self, event: Event<'_>) -> bool {
        match event {
            Event::Progress {
                phase,
                done,
                tokens_per_second,
            } => {
                let phase = match phase {
                    sched::Phase::Prefill => pb::Phase::Prefill,
                    sched::Phase::Decode => pb::Phase::Decode,
                };
                self.job.progress(phase, done, tokens_per_second);
            }
            Event::ContextParallel {
                cache_bytes_per_rank,
                ..
            } => self.job.set_cache_bytes(cache_bytes_per_rank),
            Event::Cached { tokens } => self.job.set_cached_tokens(tokens),
            Event::Token { index, token } => {
                if index == 0 {
                    let created = self.job.lock().record.created_unix_ms;
                    self.ttft = now_unix_ms().saturating_sub(created) as f64 / 1e3;
                }
                self.job.token(token);
            }
            Event::Finished { reason, stats } => {
                let reason = match reason {
                    sched::FinishReason::Stop => FinishReason::Stop,
                    sched::FinishReason::Length => FinishReason::Length,
                    sched::FinishReason::Cancelled => FinishReason::Cancelled,
                };
                let timings = Timings {
                    queued_seconds: self.queued,
                    prefill_seconds: stats.prefill_seconds,
                    decode_seconds: stats.decode_seconds,
                    time_to_first_token_seconds: self.ttft,
                };
                self.complete(Outcome::Finished(reason), timings);
            }
            Event::Failed(e) => {
                let code = fail_code(e.kind) as i32;
                self.complete(Outcome::Failed(code, e.message), Timings::default());
            }
        }
        true
    }

    fn cancelled(&self) -> bool {
        self.job.is_cancelled()
    }
}

impl<B: Backend> Engine<B> {
    /// Runs until the job channel closes and every job has left the scheduler.
    pub fn run(self) {
        let mut pending: VecDeque<Arc<LiveJob>> = VecDeque::new();
        let mut sched: Scheduler<B, JobSink> = Scheduler::new(SchedulerConfig {
            max_batch: self.cfg.max_batch,
            prefill_chunk: self.cfg.prefill_chunk,
        })
        .with_context_cache(self.cfg.context_cache.clone());
        // Context-parallel prefills run on rank threads of their own, and vision towers on a
        // thread each (the engine keeps decoding other jobs meanwhile); they come back here.
        let (back, prefilled) = std::sync::mpsc::channel::<Back<B>>();
        let mut in_flight = 0usize;
        let mut open = true;
        loop {
            while let Ok(p) = prefilled.try_recv() {
                in_flight -= 1;
                match p {
                    Back::Prefilled(Some(p)) => sched.admit_prefilled(&self.model, *p),
                    Back::Prefilled(None) => {}
                    Back::Seen {
                        sink,
                        rec,
                        degree,
                        prompt,
                        embeddings,
                    } => {
                        let started = self.launch(
                            &mut sched,
                            sink,
                            &rec,
                            degree,
                            (prompt, embeddings),
                            &back,
                        );
                        in_flight += usize::from(started);
                    }
                }
            }
            if open && pending.is_empty() && sched.is_idle() {
                if in_flight > 0 {
                    // Woken now and then for the prefills that come back.
                    match self.jobs.recv_timeout(std::time::Duration::from_millis(20)) {
                        Ok(j) => pending.push_back(j),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => open = false,
                    }
                } else {
                    match self.jobs.recv() {
                        Ok(j) => pending.push_back(j),
                        Err(_) => return,
                    }
                }
            }
            while open {
                match self.jobs.try_recv() {
                    Ok(j) => pending.push_back(j),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if !open && pending.is_empty() && sched.is_idle() && in_flight == 0 {
                return;
            }
            // Prompts are read from the spool only when their job can start.
            while sched.has_room()
                && let Some(job) = pending.pop_front()
            {
                in_flight += usize::from(self.start(&mut sched, job, &back));
            }
            if !sched.is_idle() {
                sched.step(&*self.model, &LocalForward);
            }
        }
    }

    /// Starts `job`: into the scheduler, or onto a thread whose result comes back on `back`
    /// (always exactly one message): its vision tower when the prompt has images, or
    /// (context-parallel) its rank threads. Returns whether it went to a thread.
    fn start(
        &self,
        sched: &mut Scheduler<B, JobSink>,
        job: Arc<LiveJob>,
        back: &std::sync::mpsc::Sender<Back<B>>,
    ) -> bool {
        let rec = job.record();
        let queued = now_unix_ms().saturating_sub(rec.created_unix_ms) as f64 / 1e3;
        let sink = self.sink(job.clone(), queued);
        if job.is_cancelled() {
            sink.complete(
                Outcome::Finished(FinishReason::Cancelled),
                Timings::default(),
            );
            return false;
        }
        let prompt = match self.store.read_prompt(&rec) {
            Ok(p) => p,
            Err(e) => {
                sink.complete(
                    Outcome::Failed(e.status().code() as i32, e.to_string()),
                    Timings::default(),
                );
                return false;
            }
        };
        let degree = match rec.context_parallel {
            0 => self.cfg.context_parallel.max(1),
            n => n as usize,
        };
        job.set_running(degree as u32);
        job.progress(pb::Phase::Prefill, 0, 0.0);
        tracing::info!(job = %rec.id, prompt_tokens = rec.prompt_tokens, "prefill started");
        if prompt.images.is_empty() {
            return self.launch(sched, sink, &rec, degree, (prompt.tokens, Vec::new()), back);
        }
        let (model, back) = (self.model.clone(), back.clone());
        self.spawn_for(
            "vision",
            "the vision tower's thread",
            job,
            queued,
            move || {
                let _span = tracing::info_span!("vision", job = %rec.id).entered();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    with_images(&model, prompt)
                }));
                let msg = match r {
                    Ok(Ok((prompt, embeddings))) => Back::Seen {
                        sink,
                        rec: Box::new(rec),
                        degree,
                        prompt,
                        embeddings,
                    },
                    Ok(Err(e)) => {
                        let code = e.status().code() as i32;
                        sink.complete(Outcome::Failed(code, e.to_string()), Timings::default());
                        Back::Prefilled(None)
                    }
                    Err(p) => {
                        let msg =
                            format!("the vision tower panicked: {}", sched::panic_message(&*p));
                        sink.complete(
                            Outcome::Failed(tonic::Code::Internal as i32, msg),
                            Timings::default(),
                        );
                        Back::Prefilled(None)
                    }
                };
                let _ = back.send(msg);
            },
        )
    }

    /// Runs `work` (which ends `job` or hands it back) on a thread named `name`; when the
    /// thread cannot start, `job` fails saying `what` could not. Whether it started.
    fn spawn_for(
        &self,
        name: &str,
        what: &str,
        job: Arc<LiveJob>,
        queued: f64,
        work: impl FnOnce() + Send + 'static,
    ) -> bool {
        match std::thread::Builder::new().name(name.into()).spawn(work) {
            Ok(_) => true,
            Err(e) => {
                // The job's sink went with the closure: it ends through a new one.
                self.sink(job, queued).complete(
                    Outcome::Failed(
                        tonic::Code::Internal as i32,
                        format!("cannot start {what}: {e}"),
                    ),
                    Timings::default(),
                );
                false
            }
        }
    }

    fn sink(&self, job: Arc<LiveJob>, queued: f64) -> JobSink {
        JobSink {
            job,
            done: self.done.clone(),
            queued,
            ttft: 0.0,
        }
    }

    /// Starts the prefill of job `rec` (its prompt as the model takes it, images expanded):
    /// into the scheduler, or onto `degree` rank threads whose result comes back on `back`.
    /// Returns whether it went to ranks.
    fn launch(
        &self,
        sched: &mut Scheduler<B, JobSink>,
        sink: JobSink,
        rec: &crate::record::JobRecord,
        degree: usize,
        (prompt, embeddings): (Vec<u32>, Vec<(usize, Vec<f32>)>),
        back: &std::sync::mpsc::Sender<Back<B>>,
    ) -> bool {
        let (job, queued) = (sink.job.clone(), sink.queued);
        let req = sched::Request {
            prompt,
            max_new_tokens: rec.max_new_tokens,
            sampling: SamplingParams {
                temperature: rec.sampling.temperature,
                top_p: rec.sampling.top_p,
                seed: rec.sampling.seed,
            },
            stop_tokens: rec.sampling.stop_tokens.clone(),
            ignore_eos: rec.ignore_eos,
            prefill_chunk: None,
            context_parallel: degree,
            context_cache: !rec.no_context_cache,
            embeddings,
        };
        if degree <= 1 {
            sched.admit(&self.model, req, sink);
            return false;
        }
        if let Err(e) = Scheduler::<B, JobSink>::check_request(&self.model, &req) {
            let code = fail_code(e.kind) as i32;
            sink.complete(Outcome::Failed(code, e.message), Timings::default());
            return false;
        }
        let (model, rt, back) = (self.model.clone(), self.rt.clone(), back.clone());
        let chunk = self.cfg.prefill_chunk;
        let cache = self.cfg.context_cache.clone();
        let what = "the context-parallel prefill";
        self.spawn_for("context-prefill", what, job, queued, move || {
            let started = std::time::Instant::now();
            // A cancelled job stops the ranks at their next wait.
            let cancel = sink.job.cancellation().clone();
            let group = ringbolt_transport::local::LocalGroup::ranks(
                degree,
                0,
                std::time::Duration::from_secs(3600),
            );
            let job = ringbolt_context::GroupJob {
                prompt: &req.prompt,
                embeddings: &req.embeddings,
                chunk,
                context_cache: req.context_cache,
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ringbolt_context::prefill_group_cached(
                    &rt,
                    &model,
                    job,
                    cache.as_ref(),
                    group,
                    &cancel,
                )
            }));
            let msg = match r {
                Ok(Ok(done)) => Some(Prefilled {
                    done,
                    req,
                    started,
                    sink,
                }),
                Ok(Err(_)) if sink.job.is_cancelled() => {
                    sink.complete(
                        Outcome::Finished(FinishReason::Cancelled),
                        Timings::default(),
                    );
                    None
                }
                Ok(Err(e)) => {
                    let code = match &e {
                        ringbolt_context::ContextError::Model(m) => {
                            fail_code(sched::failure_kind(m))
                        }
                        _ => tonic::Code::Internal,
                    };
                    sink.complete(
                        Outcome::Failed(code as i32, e.to_string()),
                        Timings::default(),
                    );
                    None
                }
                Err(p) => {
                    sink.complete(
                        Outcome::Failed(
                            tonic::Code::Internal as i32,
                            format!(
                                "the context-parallel prefill panicked: {}",
                                sched::panic_message(&*p)
                            ),
                        ),
                        Timings::default(),
                    );
                    None
                }
            };
            let _ = back.send(Back::Prefilled(msg.map(Box::new)));
        })
    }
}
