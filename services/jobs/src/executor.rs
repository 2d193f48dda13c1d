//! The engine thread: owns the model and every running sequence. Each turn it takes new jobs,
//! drops cancelled ones, runs one prefill chunk of the job being prefilled, and one decode step
//! for all decoding jobs together (continuous batching), then emits tokens and progress.

use crate::live::LiveJob;
use crate::record::{FinishReason, Timings, now_unix_ms};
use crate::store::JobStore;
use ringbolt_kernels::Backend;
use ringbolt_model::{Logits, Model, Sampler, SamplingParams, SequenceState};
use ringbolt_proto::v1 as pb;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;
use tokio::sync::mpsc;

/// Engine scheduling limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Prompt tokens per prefill step (decode steps of running jobs interleave between chunks).
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 32,
            prefill_chunk: 4096,
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

struct Active<B: Backend> {
    job: Arc<LiveJob>,
    state: SequenceState<B>,
    prompt: Vec<u32>,
    done: usize,
    sampler: Sampler,
    last: u32,
    max_new: u32,
    stop: Vec<u32>,
    created_ms: u64,
    started: Instant,
    prefill_end: Option<Instant>,
    ttft: f64,
    queued: f64,
}

impl<B: Backend> Active<B> {
    fn timings(&self) -> Timings {
        let now = Instant::now();
        let prefill = self.prefill_end.unwrap_or(now) - self.started;
        Timings {
            queued_seconds: self.queued,
            prefill_seconds: prefill.as_secs_f64(),
            decode_seconds: self
                .prefill_end
                .map(|p| (now - p).as_secs_f64())
                .unwrap_or(0.0),
            time_to_first_token_seconds: self.ttft,
        }
    }
}

pub(crate) struct Engine<B: Backend> {
    pub model: Model<B>,
    pub store: Arc<JobStore>,
    pub jobs: Receiver<Arc<LiveJob>>,
    pub done: mpsc::Sender<Completion>,
    pub cfg: EngineConfig,
}

fn catch<T>(f: impl FnOnce() -> ringbolt_model::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(format!(
            "engine error: {}",
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default()
        )),
    }
}

impl<B: Backend> Engine<B> {
    fn complete(&self, job: Arc<LiveJob>, outcome: Outcome, timings: Timings) {
        // The manager's task is gone only at shutdown; the job then reruns after restart.
        let _ = self.done.blocking_send(Completion {
            job,
            outcome,
            timings,
        });
    }

    fn finished(&self, a: Active<B>, reason: FinishReason) {
        let t = a.timings();
        self.complete(a.job, Outcome::Finished(reason), t);
    }

    /// Runs until the job channel closes.
    pub fn run(self) {
        let mut pending: VecDeque<Arc<LiveJob>> = VecDeque::new();
        let mut prefilling: Option<Active<B>> = None;
        let mut decoding: Vec<Active<B>> = Vec::new();
        loop {
            if pending.is_empty() && prefilling.is_none() && decoding.is_empty() {
                match self.jobs.recv() {
                    Ok(j) => pending.push_back(j),
                    Err(_) => return,
                }
            }
            loop {
                match self.jobs.try_recv() {
                    Ok(j) => pending.push_back(j),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if pending.is_empty() && prefilling.is_none() && decoding.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }

            // Cancellations take effect between steps.
            for j in std::mem::take(&mut pending) {
                if j.is_cancelled() {
                    self.complete(
                        j,
                        Outcome::Finished(FinishReason::Cancelled),
                        Timings::default(),
                    );
                } else {
                    pending.push_back(j);
                }
            }
            if prefilling.as_ref().is_some_and(|a| a.job.is_cancelled())
                && let Some(a) = prefilling.take()
            {
                self.finished(a, FinishReason::Cancelled);
            }
            for a in std::mem::take(&mut decoding) {
                if a.job.is_cancelled() {
                    self.finished(a, FinishReason::Cancelled);
                } else {
                    decoding.push(a);
                }
            }

            if prefilling.is_none()
                && decoding.len() < self.cfg.max_batch
                && let Some(job) = pending.pop_front()
            {
                prefilling = self.start(job);
            }
            if let Some(a) = prefilling.take() {
                prefilling = self.prefill_step(a, &mut decoding);
            }
            if !decoding.is_empty() {
                self.decode_step(&mut decoding);
            }
        }
    }

    fn start(&self, job: Arc<LiveJob>) -> Option<Active<B>> {
        let rec = job.record();
        let prompt = match self.store.read_prompt(&rec.id) {
            Ok(p) if p.len() as u64 == rec.prompt_tokens => p,
            Ok(p) => {
                let msg = format!(
                    "spooled prompt has {} tokens, the record says {}",
                    p.len(),
                    rec.prompt_tokens
                );
                self.complete(
                    job,
                    Outcome::Failed(tonic::Code::DataLoss as i32, msg),
                    Timings::default(),
                );
                return None;
            }
            Err(e) => {
                self.complete(
                    job,
                    Outcome::Failed(tonic::Code::DataLoss as i32, e.to_string()),
                    Timings::default(),
                );
                return None;
            }
        };
        let params = SamplingParams {
            temperature: rec.sampling.temperature,
            top_p: rec.sampling.top_p,
            seed: rec.sampling.seed,
        };
        let sampler = match Sampler::new(params) {
            Ok(s) => s,
            Err(e) => {
                self.complete(
                    job,
                    Outcome::Failed(tonic::Code::InvalidArgument as i32, e.to_string()),
                    Timings::default(),
                );
                return None;
            }
        };
        job.set_running();
        job.progress(pb::Phase::Prefill, 0, 0.0);
        let queued = now_unix_ms().saturating_sub(rec.created_unix_ms) as f64 / 1e3;
        tracing::info!(job = %rec.id, prompt_tokens = rec.prompt_tokens, "prefill started");
        Some(Active {
            state: self.model.new_state(),
            prompt,
            done: 0,
            sampler,
            last: 0,
            max_new: rec.max_new_tokens,
            stop: rec.sampling.stop_tokens.clone(),
            created_ms: rec.created_unix_ms,
            started: Instant::now(),
            prefill_end: None,
            ttft: 0.0,
            queued,
            job,
        })
    }

    fn prefill_step(&self, mut a: Active<B>, decoding: &mut Vec<Active<B>>) -> Option<Active<B>> {
        let end = (a.done + self.cfg.prefill_chunk).min(a.prompt.len());
        let last = end == a.prompt.len();
        let chunk = &a.prompt[a.done..end];
        let model = &self.model;
        let state = &mut a.state;
        let logits = match catch(|| {
            model.forward(state, chunk, if last { Logits::Last } else { Logits::None })
        }) {
            Ok(l) => l,
            Err(msg) => {
                let t = a.timings();
                self.complete(a.job, Outcome::Failed(tonic::Code::Internal as i32, msg), t);
                return None;
            }
        };
        a.done = end;
        let tps = a.done as f64 / a.started.elapsed().as_secs_f64().max(1e-9);
        a.job.progress(pb::Phase::Prefill, a.done as u64, tps);
        if !last {
            return Some(a);
        }
        a.prefill_end = Some(Instant::now());
        a.prompt = Vec::new();
        let t = a.sampler.sample(&logits);
        a.ttft = now_unix_ms().saturating_sub(a.created_ms) as f64 / 1e3;
        self.emit(a, t, decoding);
        None
    }

    /// Emits token `t` of `a`; keeps it decoding unless it is finished.
    fn emit(&self, mut a: Active<B>, t: u32, decoding: &mut Vec<Active<B>>) {
        a.job.token(t);
        a.last = t;
        let n = a.job.lock().record.tokens.len() as u32;
        if a.stop.contains(&t) {
            self.finished(a, FinishReason::Stop);
        } else if n >= a.max_new {
            self.finished(a, FinishReason::Length);
        } else {
            if n == 1 || n.is_multiple_of(16) {
                let secs = a
                    .prefill_end
                    .map(|p| p.elapsed().as_secs_f64())
                    .unwrap_or(0.0);
                let tps = if secs > 0.0 {
                    (n - 1) as f64 / secs
                } else {
                    0.0
                };
                a.job.progress(pb::Phase::Decode, a.state.pos as u64, tps);
            }
            decoding.push(a);
        }
    }

    fn decode_step(&self, decoding: &mut Vec<Active<B>>) {
        let lasts: Vec<[u32; 1]> = decoding.iter().map(|a| [a.last]).collect();
        let model = &self.model;
        let result = {
            let mut seqs: Vec<(&mut SequenceState<B>, &[u32])> = decoding
                .iter_mut()
                .zip(&lasts)
                .map(|(a, l)| (&mut a.state, &l[..]))
                .collect();
            catch(|| model.forward_batch(&mut seqs, Logits::Last))
        };
        let all = std::mem::take(decoding);
        match result {
            Ok(logits) => {
                for (mut a, l) in all.into_iter().zip(logits) {
                    let t = a.sampler.sample(&l);
                    self.emit(a, t, decoding);
                }
            }
            Err(msg) => {
                for a in all {
                    let t = a.timings();
                    self.complete(
                        a.job,
                        Outcome::Failed(tonic::Code::Internal as i32, msg.clone()),
                        t,
                    );
                }
            }
        }
    }
}
