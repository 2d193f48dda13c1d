//! The scheduler core: every engine loop in Ringbolt (the standalone job engine, an attention
//! worker's job steps, `ringbolt generate`) runs its sequences through this one. It owns the
//! sequences and their states and applies one set of rules to them:
//! - admission checks a request against the model (prompt, positions, stop tokens, sampling);
//! - chunked prefill: each step runs one chunk of the oldest prefilling sequence, so decode
//!   steps of running sequences interleave with a long prompt's prefill;
//! - continuous batching: every decoding sequence takes one decode step together, and a new
//!   prefill starts only while fewer than `max_batch` sequences decode;
//! - stop rules: a stop token, the model's end-of-sequence tokens (unless `ignore_eos`), or
//!   `max_new_tokens`;
//! - one error policy: a forward pass that fails or panics fails exactly the sequences in it,
//!   with a [`FailKind`] that callers map to their status codes;
//! - cancellation between steps.
//!
//! What a sequence produces goes to its [`Sink`]; what a forward pass is (local experts, or an
//! expert exchange) is the caller's [`Forward`].

use crate::engine::{Logits, Model, SequenceState};
use crate::error::{ModelError, Result};
use crate::prefix::ContextCache;
use crate::sampling::{Sampler, SamplingParams};
use ringbolt_kernels::Backend;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

/// Scheduling limits.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Prompt tokens per prefill step (a request may ask for its own).
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch: 32,
            prefill_chunk: 4096,
        }
    }
}

/// What a sequence asks for.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new_tokens: u32,
    pub sampling: SamplingParams,
    /// Generation stops after any of these (included in the output).
    pub stop_tokens: Vec<u32>,
    /// Do not stop at the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Prompt tokens per prefill step for this sequence (None: the scheduler's).
    pub prefill_chunk: Option<usize>,
    /// Ranks its prefill is split among (0 or 1: this engine alone; more: the owner runs the
    /// ranks and hands the result to [`Scheduler::admit_prefilled`]).
    pub context_parallel: usize,
    /// Whether its prefill may start from, and adds to, the scheduler's context cache.
    pub context_cache: bool,
    /// Input rows that replace the prompt's token embeddings (an image's features at its
    /// placeholders): (first position, `[n, H]` rows). The context cache keeps such a prompt's
    /// blocks under a root salted with these rows ([`crate::prefix::embeddings_root`]).
    pub embeddings: Vec<(usize, Vec<f32>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or an end-of-sequence token.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// The sink asked for it ([`Sink::cancelled`]).
    Cancelled,
}

/// Why a sequence failed, for callers to map to their status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// The request cannot run on this model.
    InvalidArgument,
    /// A remote part (the expert exchange) failed: another try may succeed.
    Unavailable,
    /// Another rank of its context-parallel group failed: another try may succeed, and the
    /// fault is not this engine's.
    Aborted,
    /// The engine failed (an error or a panic in the forward pass).
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SeqError {
    pub kind: FailKind,
    pub message: String,
}

/// What a sequence did, as of its end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqStats {
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Layer steps its forward passes took, and how many were re-sent (remote experts).
    pub layer_steps: u64,
    pub resent: u64,
    /// The most sequences it shared a decode step with (itself included).
    pub widest_batch: usize,
    /// Prompt tokens the context cache had: its prefill started after them.
    pub cached_tokens: u64,
}

/// What a sequence tells its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    Progress {
        phase: Phase,
        /// Prefill: prompt tokens done; decode: the sequence's position.
        done: u64,
        tokens_per_second: f64,
    },
    Token {
        index: u32,
        token: u32,
    },
    /// The prefill starts after `tokens` prompt tokens the context cache had.
    Cached {
        tokens: u64,
    },
    /// A context-parallel prefill is done: its degree and the softmax key and value bytes each
    /// rank held.
    ContextParallel {
        degree: usize,
        cache_bytes_per_rank: &'a [u64],
    },
    Finished {
        reason: FinishReason,
        stats: &'a SeqStats,
    },
    Failed(SeqError),
}

/// Where a sequence's events go.
pub trait Sink {
    /// Takes an event; false when nobody listens any more (the sequence is then dropped).
    fn send(&mut self, event: Event<'_>) -> bool;
    /// Whether the sequence should stop (checked between steps; it then finishes Cancelled).
    fn cancelled(&self) -> bool {
        false
    }
}

/// Layer steps a forward pass took and re-sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardCounts {
    pub layer_steps: u64,
    pub resent: u64,
}

/// A prompt prefilled by several ranks, up to `tokens` (the whole prompt, or a prefix whose
/// rest the scheduler prefills from `state`, its keys and values still split among the ranks).
pub struct ContextPrefill<B: Backend> {
    /// Positions the ranks prefilled (or the context cache restored).
    pub tokens: usize,
    /// The last position's logits, when `tokens` is the whole prompt.
    pub logits: Vec<f32>,
    /// The state prefill or decode continues from.
    pub state: SequenceState<B>,
    pub cache_bytes_per_rank: Vec<u64>,
    /// Positions restored from the context cache rather than prefilled.
    pub cached_tokens: usize,
}

/// A request whose whole prompt context-parallel ranks prefilled (from `started`), to decode
/// on the engine's thread ([`Scheduler::admit_prefilled`]).
pub struct Prefilled<B: Backend, S> {
    pub req: Request,
    pub started: Instant,
    pub done: ContextPrefill<B>,
    pub sink: S,
}

/// One forward pass of several sequences: on the model's own experts, or through an exchange.
pub trait Forward<B: Backend> {
    fn forward(
        &self,
        model: &Model<B>,
        seqs: &mut [(&mut SequenceState<B>, &[u32])],
        logits: Logits,
    ) -> (Result<Vec<Vec<f32>>>, ForwardCounts);
}

/// The model's own experts.
pub struct LocalForward;

impl<B: Backend> Forward<B> for LocalForward {
    fn forward(
        &self,
        model: &Model<B>,
        seqs: &mut [(&mut SequenceState<B>, &[u32])],
        logits: Logits,
    ) -> (Result<Vec<Vec<f32>>>, ForwardCounts) {
        (model.forward_batch(seqs, logits), ForwardCounts::default())
    }
}

struct Seq<B: Backend, S: Sink> {
    sink: S,
    state: SequenceState<B>,
    prompt: Vec<u32>,
    /// Prompt tokens prefilled so far.
    done: usize,
    chunk: usize,
    /// The context cache's key of the prompt's first `done` tokens (None: not cached).
    chain: Option<crate::prefix::Key>,
    sampler: Sampler,
    max_new: u32,
    /// Stop tokens, the model's end-of-sequence tokens among them unless ignored.
    stop: Vec<u32>,
    emitted: u32,
    last: u32,
    started: Instant,
    prefill_end: Option<Instant>,
    stats: SeqStats,
}

impl<B: Backend, S: Sink> Seq<B, S> {
    /// Goes on from `state` (restored from the cache, or left by context-parallel ranks),
    /// which covers a prefix of the prompt: the features of the positions still to prefill
    /// stay with the sequence.
    fn resume_from(&mut self, mut state: SequenceState<B>) {
        state.embeddings = std::mem::take(&mut self.state.embeddings);
        self.state = state;
    }

    fn stats(&mut self) -> &SeqStats {
        let now = Instant::now();
        self.stats.prefill_seconds = (self.prefill_end.unwrap_or(now) - self.started).as_secs_f64();
        self.stats.decode_seconds = self
            .prefill_end
            .map(|p| (now - p).as_secs_f64())
            .unwrap_or(0.0);
        &self.stats
    }

    fn finish(mut self, reason: FinishReason) {
        self.stats();
        let stats = std::mem::take(&mut self.stats);
        self.sink.send(Event::Finished {
            reason,
            stats: &stats,
        });
    }

    fn fail(mut self, e: SeqError) {
        self.sink.send(Event::Failed(e));
    }
}

/// The sequences of one engine and the rules they run by. Lives on the engine's thread.
pub struct Scheduler<B: Backend, S: Sink> {
    cfg: SchedulerConfig,
    cache: Option<ContextCache>,
    prefilling: VecDeque<Seq<B, S>>,
    decoding: Vec<Seq<B, S>>,
}

/// What a caught panic said (its `&str` or `String` payload).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn invalid(e: impl std::fmt::Display) -> SeqError {
    SeqError {
        kind: FailKind::InvalidArgument,
        message: e.to_string().replace("invalid request: ", ""),
    }
}

/// The kind of failure a forward error is: a failed expert exchange may succeed elsewhere, a
/// failed peer was another engine's fault.
pub fn failure_kind(e: &ModelError) -> FailKind {
    match e {
        ModelError::Experts(_) => FailKind::Unavailable,
        ModelError::Peer(_) => FailKind::Aborted,
        _ => FailKind::Internal,
    }
}

/// A forward error as a sequence failure.
fn failure(e: ModelError) -> SeqError {
    let kind = failure_kind(&e);
    SeqError {
        kind,
        message: e.to_string(),
    }
}

impl<B: Backend, S: Sink> Scheduler<B, S> {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler {
            cfg: SchedulerConfig {
                max_batch: cfg.max_batch.max(1),
                prefill_chunk: cfg.prefill_chunk.max(1),
            },
            cache: None,
            prefilling: VecDeque::new(),
            decoding: Vec::new(),
        }
    }

    /// Prefills start from, and add to, `cache` (requests that allow it).
    pub fn with_context_cache(mut self, cache: Option<ContextCache>) -> Self {
        self.cache = cache;
        self
    }

    /// No sequence left.
    pub fn is_idle(&self) -> bool {
        self.prefilling.is_empty() && self.decoding.is_empty()
    }

    /// Whether a new sequence would start prefilling at the next step (none prefills, and fewer
    /// than `max_batch` decode): an owner that holds requests back admits them then.
    pub fn has_room(&self) -> bool {
        self.prefilling.is_empty() && self.decoding.len() < self.cfg.max_batch
    }

    /// Sequences prefilling and decoding.
    pub fn len(&self) -> usize {
        self.prefilling.len() + self.decoding.len()
    }

    pub fn is_empty(&self) -> bool {
        self.is_idle()
    }

    /// The sinks of the sequences, in the order the next step serves them (the sequence being
    /// prefilled first).
    pub fn sinks(&self) -> impl Iterator<Item = &S> {
        self.prefilling
            .iter()
            .chain(self.decoding.iter())
            .map(|s| &s.sink)
    }

    /// Checks `req` against `model`; a request that cannot run fails on its sink at once.
    pub fn admit(&mut self, model: &Model<B>, req: Request, mut sink: S) {
        if req.context_parallel > 1 {
            sink.send(Event::Failed(invalid(format!(
                "a context-parallel prefill of degree {} is run by the engine's owner \
                 (admit_prefilled), not by the scheduler",
                req.context_parallel
            ))));
            return;
        }
        if let Some(s) = self.new_seq(model, req, sink) {
            self.prefilling.push_back(s);
        }
    }

    /// Starts `s`'s prefill after the longest prefix of its prompt the context cache holds.
    fn resume_from_cache(&self, model: &Model<B>, s: &mut Seq<B, S>) {
        let (Some(cache), Some(root)) = (&self.cache, s.chain) else {
            return;
        };
        let blocks = cache.lookup(root, &s.prompt, s.chunk);
        if blocks.is_empty() {
            return;
        }
        match model.restore(&blocks) {
            Ok(state) => {
                s.resume_from(state);
                s.done = blocks.len() * s.chunk;
                s.chain = Some(
                    blocks
                        .iter()
                        .fold(root, |k, b| crate::prefix::key(k, &b.tokens)),
                );
                s.stats.cached_tokens = s.done as u64;
            }
            Err(e) => tracing::warn!(error = %e, "context cache blocks not used"),
        }
    }

    /// A sequence for `req`, or None when it cannot run (its sink has been told why).
    fn new_seq(&self, model: &Model<B>, req: Request, mut sink: S) -> Option<Seq<B, S>> {
        match Self::check(model, &req) {
            Ok(sampler) => {
                let cfg = model.config();
                let mut stop = req.stop_tokens;
                if !req.ignore_eos {
                    stop.extend(cfg.eos_token_ids.iter().copied());
                }
                let now = Instant::now();
                let chunk = req.prefill_chunk.unwrap_or(self.cfg.prefill_chunk).max(1);
                // A prompt with images' features has a root of its own per set of features.
                let chain =
                    (self.cache.is_some() && req.context_cache && req.context_parallel <= 1).then(
                        || crate::prefix::embeddings_root(model.cache_root(chunk), &req.embeddings),
                    );
                let mut state = model.new_state();
                for (pos, rows) in req.embeddings {
                    state.set_embeddings(pos, rows);
                }
                Some(Seq {
                    sink,
                    state,
                    chunk,
                    chain,
                    prompt: req.prompt,
                    done: 0,
                    sampler,
                    max_new: req.max_new_tokens,
                    stop,
                    emitted: 0,
                    last: 0,
                    started: now,
                    prefill_end: None,
                    stats: SeqStats {
                        widest_batch: 1,
                        ..Default::default()
                    },
                })
            }
            Err(e) => {
                sink.send(Event::Failed(e));
                None
            }
        }
    }

    fn check(model: &Model<B>, req: &Request) -> std::result::Result<Sampler, SeqError> {
        let cfg = model.config();
        if req.prompt.is_empty() {
            return Err(invalid("the prompt is empty"));
        }
        if req.max_new_tokens == 0 {
            return Err(invalid("max_new_tokens must be at least 1"));
        }
        let positions = cfg.max_position_embeddings as u64;
        if req.prompt.len() as u64 + req.max_new_tokens as u64 > positions {
            return Err(invalid(format!(
                "{} prompt tokens + {} new tokens exceed the model's {positions} positions",
                req.prompt.len(),
                req.max_new_tokens
            )));
        }
        model.check_tokens(0, &req.prompt).map_err(invalid)?;
        for (pos, rows) in &req.embeddings {
            let n = rows.len() / cfg.hidden_size;
            if rows.len() % cfg.hidden_size != 0 || pos + n > req.prompt.len() {
                return Err(invalid(format!(
                    "{} input values at position {pos} are not rows of {} inside the {}-token \
                     prompt",
                    rows.len(),
                    cfg.hidden_size,
                    req.prompt.len()
                )));
            }
        }
        if let Some(&t) = req
            .stop_tokens
            .iter()
            .find(|&&t| t as usize >= cfg.vocab_size)
        {
            return Err(invalid(format!(
                "stop token {t} is outside the vocabulary (size {})",
                cfg.vocab_size
            )));
        }
        Sampler::new(req.sampling).map_err(invalid)
    }

    /// One round: cancelled or abandoned sequences leave, the oldest prefilling sequence runs
    /// one chunk (while fewer than `max_batch` decode), and every decoding sequence takes one
    /// decode step together.
    pub fn step(&mut self, model: &Model<B>, fwd: &impl Forward<B>) {
        for s in std::mem::take(&mut self.prefilling) {
            if s.sink.cancelled() {
                s.finish(FinishReason::Cancelled);
            } else {
                self.prefilling.push_back(s);
            }
        }
        for s in std::mem::take(&mut self.decoding) {
            if s.sink.cancelled() {
                s.finish(FinishReason::Cancelled);
            } else {
                self.decoding.push(s);
            }
        }
        if self.decoding.len() < self.cfg.max_batch
            && let Some(s) = self.prefilling.pop_front()
            && let Some(s) = self.prefill(model, fwd, s)
        {
            self.prefilling.push_front(s);
        }
        if !self.decoding.is_empty() {
            self.decode(model, fwd);
        }
    }

    /// Runs a forward pass of `seqs`; counts its layer steps for each of them. A panic is
    /// caught: it fails the pass like an error.
    fn run(
        model: &Model<B>,
        fwd: &impl Forward<B>,
        seqs: &mut [&mut Seq<B, S>],
        toks: &[Vec<u32>],
        logits: Logits,
    ) -> std::result::Result<Vec<Vec<f32>>, SeqError> {
        let (r, counts) = {
            let mut refs: Vec<(&mut SequenceState<B>, &[u32])> = seqs
                .iter_mut()
                .zip(toks)
                .map(|(s, t)| (&mut s.state, t.as_slice()))
                .collect();
            match std::panic::catch_unwind(AssertUnwindSafe(|| {
                fwd.forward(model, &mut refs, logits)
            })) {
                Ok(r) => r,
                Err(p) => {
                    return Err(SeqError {
                        kind: FailKind::Internal,
                        message: format!("the forward pass panicked: {}", panic_message(&*p)),
                    });
                }
            }
        };
        for s in seqs.iter_mut() {
            s.stats.layer_steps += counts.layer_steps;
            s.stats.resent += counts.resent;
        }
        r.map_err(failure)
    }

    /// One prefill chunk of `s`; after the last, its first token. Returns it while it still
    /// prefills.
    fn prefill(
        &mut self,
        model: &Model<B>,
        fwd: &impl Forward<B>,
        mut s: Seq<B, S>,
    ) -> Option<Seq<B, S>> {
        // The cache is looked up when the prefill starts, not when it is queued: a job queued
        // behind another with the same prefix finds what that one added.
        if s.done == 0 && s.chain.is_some() && s.stats.cached_tokens == 0 {
            self.resume_from_cache(model, &mut s);
            if s.stats.cached_tokens > 0 {
                let tokens = s.stats.cached_tokens;
                if !s.sink.send(Event::Cached { tokens }) {
                    return None;
                }
            }
        }
        let end = (s.done + s.chunk).min(s.prompt.len());
        let last = end == s.prompt.len();
        let toks = vec![s.prompt[s.done..end].to_vec()];
        let logits = if last { Logits::Last } else { Logits::None };
        let logits = match Self::run(model, fwd, &mut [&mut s], &toks, logits) {
            Ok(mut v) => v.pop().unwrap_or_default(),
            Err(e) => {
                s.fail(e);
                return None;
            }
        };
        // A whole chunk (aligned: prefills start at a multiple of the chunk) is a block of the
        // context cache.
        if let (Some(cache), Some(parent)) = (&self.cache, s.chain) {
            let tokens = &s.prompt[s.done..end];
            let k = crate::prefix::key(parent, tokens);
            s.chain = Some(k);
            if tokens.len() == s.chunk && !cache.contains(k) {
                let kept = cache.could_keep(model.cache_block_bytes(tokens.len()))
                    && model
                        .cache_block(&s.state, tokens)
                        .is_some_and(|block| cache.insert(k, parent, block));
                if !kept {
                    // The prompt's later blocks could never be reached: none are added.
                    s.chain = None;
                }
            }
        }
        s.done = end;
        let tps = s.done as f64 / s.started.elapsed().as_secs_f64().max(1e-9);
        let progress = Event::Progress {
            phase: Phase::Prefill,
            done: s.done as u64,
            tokens_per_second: tps,
        };
        if !s.sink.send(progress) {
            return None;
        }
        if !last {
            return Some(s);
        }
        s.prefill_end = Some(Instant::now());
        s.prompt = Vec::new();
        self.emit(s, &logits);
        None
    }

    /// A sequence whose prompt context-parallel ranks prefilled, whole or up to a prefix: its
    /// events, then its first token, or the rest of its prefill (queued like any other).
    fn prefilled(&mut self, mut s: Seq<B, S>, done: ContextPrefill<B>, ranks: usize) {
        if done.tokens == 0 || done.tokens > s.prompt.len() {
            let e = invalid(format!(
                "context-parallel ranks prefilled {} positions of a {}-token prompt",
                done.tokens,
                s.prompt.len()
            ));
            s.fail(e);
            return;
        }
        s.resume_from(done.state);
        s.done = done.tokens;
        s.stats.cached_tokens = done.cached_tokens as u64;
        let tps = s.done as f64 / s.started.elapsed().as_secs_f64().max(1e-9);
        let cached = (done.cached_tokens > 0).then_some(Event::Cached {
            tokens: done.cached_tokens as u64,
        });
        let events = cached.into_iter().chain([
            Event::ContextParallel {
                degree: ranks,
                cache_bytes_per_rank: &done.cache_bytes_per_rank,
            },
            Event::Progress {
                phase: Phase::Prefill,
                done: s.done as u64,
                tokens_per_second: tps,
            },
        ]);
        for ev in events {
            if !s.sink.send(ev) {
                return;
            }
        }
        if s.done < s.prompt.len() {
            // The rest runs here, attending through the state's split keys and values.
            self.prefilling.push_back(s);
            return;
        }
        s.prefill_end = Some(Instant::now());
        s.prompt = Vec::new();
        self.emit(s, &done.logits);
    }

    /// Admits a request whose prompt was prefilled elsewhere (context-parallel ranks driven
    /// by the owner, on threads of their own): it decodes from its state like any sequence.
    pub fn admit_prefilled(&mut self, model: &Model<B>, p: Prefilled<B, S>) {
        let Prefilled {
            req,
            started,
            done,
            sink,
        } = p;
        let ranks = req.context_parallel;
        let Some(mut s) = self.new_seq(model, req, sink) else {
            return;
        };
        s.started = started;
        self.prefilled(s, done, ranks);
    }

    /// Checks `req` against `model` as [`admit`](Self::admit) does, for an owner that runs
    /// part of it elsewhere first.
    pub fn check_request(model: &Model<B>, req: &Request) -> std::result::Result<(), SeqError> {
        Self::check(model, req).map(|_| ())
    }

    /// One decode step of every decoding sequence together.
    fn decode(&mut self, model: &Model<B>, fwd: &impl Forward<B>) {
        let mut batch = std::mem::take(&mut self.decoding);
        let n = batch.len();
        let toks: Vec<Vec<u32>> = batch.iter().map(|s| vec![s.last]).collect();
        for s in batch.iter_mut() {
            s.stats.widest_batch = s.stats.widest_batch.max(n);
        }
        let r = {
            let mut refs: Vec<&mut Seq<B, S>> = batch.iter_mut().collect();
            Self::run(model, fwd, &mut refs, &toks, Logits::Last)
        };
        match r {
            Ok(logits) => {
                for (s, l) in batch.into_iter().zip(logits) {
                    self.emit(s, &l);
                }
            }
            Err(e) => {
                for s in batch {
                    s.fail(e.clone());
                }
            }
        }
    }

    /// Samples the next token of `s` from `logits` and emits it; `s` keeps decoding unless it
    /// is finished.
    fn emit(&mut self, mut s: Seq<B, S>, logits: &[f32]) {
        let t = s.sampler.sample(logits);
        let index = s.emitted;
        if !s.sink.send(Event::Token { index, token: t }) {
            return;
        }
        s.emitted += 1;
        s.last = t;
        if s.stop.contains(&t) {
            return s.finish(FinishReason::Stop);
        }
        if s.emitted >= s.max_new {
            return s.finish(FinishReason::Length);
        }
        let n = s.emitted;
        if n == 1 || n.is_multiple_of(16) {
            let secs = s
                .prefill_end
                .map(|p| p.elapsed().as_secs_f64())
                .unwrap_or(0.0);
            let tps = if secs > 0.0 {
                (n - 1) as f64 / secs
            } else {
                0.0
            };
            let progress = Event::Progress {
                phase: Phase::Decode,
                done: s.state.pos as u64,
                tokens_per_second: tps,
            };
            if !s.sink.send(progress) {
                return;
            }
        }
        self.decoding.push(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::engine::LayerCache;
    use crate::writer::{Preset, WeightDtype, write_random_checkpoint};
    use ringbolt_kernels::cpu::Cpu;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[derive(Default)]
    struct Log {
        tokens: Vec<u32>,
        end: Option<std::result::Result<FinishReason, SeqError>>,
        progress: Vec<(Phase, u64)>,
    }

    #[derive(Clone)]
    struct Collect(Rc<RefCell<Log>>, Rc<RefCell<bool>>);

    impl Sink for Collect {
        fn send(&mut self, ev: Event<'_>) -> bool {
            let mut l = self.0.borrow_mut();
            match ev {
                Event::Token { index, token } => {
                    assert_eq!(index as usize, l.tokens.len(), "indices in order");
                    l.tokens.push(token);
                }
                Event::Progress { phase, done, .. } => l.progress.push((phase, done)),
                Event::ContextParallel { .. } | Event::Cached { .. } => {}
                Event::Finished { reason, .. } => l.end = Some(Ok(reason)),
                Event::Failed(e) => l.end = Some(Err(e)),
            }
            true
        }
        fn cancelled(&self) -> bool {
            *self.1.borrow()
        }
    }

    fn model(eos: Option<u32>) -> (tempfile::TempDir, Model<Cpu>) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Preset::Tiny.config();
        cfg.eos_token_ids = eos.into_iter().collect();
        write_random_checkpoint(&cfg, 3, WeightDtype::F32, dir.path(), None).unwrap();
        let m = Model::load(&Checkpoint::open(dir.path()).unwrap(), Cpu::default()).unwrap();
        (dir, m)
    }

    fn request(prompt: Vec<u32>, n: u32) -> Request {
        Request {
            context_cache: true,
            embeddings: Vec::new(),
            prompt,
            max_new_tokens: n,
            sampling: SamplingParams::default(),
            stop_tokens: Vec::new(),
            ignore_eos: false,
            prefill_chunk: None,
            context_parallel: 0,
        }
    }

    /// Greedy tokens of `prompt`, one sequence alone, the plain way.
    fn alone(m: &Model<Cpu>, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut st = m.new_state();
        let mut l = m.forward(&mut st, prompt, Logits::Last).unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let t = crate::sampling::argmax(&l);
            out.push(t);
            l = m.forward(&mut st, &[t], Logits::Last).unwrap();
        }
        out
    }

    fn sink() -> (Collect, Rc<RefCell<Log>>, Rc<RefCell<bool>>) {
        let log = Rc::new(RefCell::new(Log::default()));
        let cancel = Rc::new(RefCell::new(false));
        (Collect(log.clone(), cancel.clone()), log, cancel)
    }

    #[test]
    fn chunked_prefill_and_batched_decode_equal_each_sequence_alone() {
        let (_d, m) = model(None);
        let mut s = Scheduler::new(SchedulerConfig {
            max_batch: 2,
            prefill_chunk: 7,
        });
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|k| {
                (0..20 + 9 * k)
                    .map(|i| (i * 13 + k * 5) % 400 + 1)
                    .collect()
            })
            .collect();
        let logs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (sk, log, _) = sink();
                s.admit(&m, request(p.clone(), 12), sk);
                log
            })
            .collect();
        let mut steps = 0;
        while !s.is_idle() {
            s.step(&m, &LocalForward);
            steps += 1;
            assert!(steps < 1000);
        }
        for (p, log) in prompts.iter().zip(&logs) {
            let l = log.borrow();
            assert_eq!(l.tokens, alone(&m, p, 12));
            assert_eq!(l.end, Some(Ok(FinishReason::Length)));
            // Prefill progress per chunk of 7, then decode progress.
            let chunks = p.len().div_ceil(7);
            assert_eq!(
                l.progress.iter().filter(|x| x.0 == Phase::Prefill).count(),
                chunks
            );
            assert!(l.progress.iter().any(|x| x.0 == Phase::Decode));
        }
    }

    #[test]
    fn eos_stops_unless_ignored_and_bad_requests_fail_at_admission() {
        let prompt: Vec<u32> = (1..30).collect();
        let (_d, plain) = model(None);
        let want = alone(&plain, &prompt, 8);
        // The third greedy token is the model's end-of-sequence token.
        let (_d2, m) = model(Some(want[2]));
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, la, _) = sink();
        let (b, lb, _) = sink();
        s.admit(&m, request(prompt.clone(), 8), a);
        let mut r = request(prompt.clone(), 8);
        r.ignore_eos = true;
        s.admit(&m, r, b);
        while !s.is_idle() {
            s.step(&m, &LocalForward);
        }
        assert_eq!(la.borrow().tokens, want[..3]);
        assert_eq!(la.borrow().end, Some(Ok(FinishReason::Stop)));
        assert_eq!(lb.borrow().tokens, want);
        assert_eq!(lb.borrow().end, Some(Ok(FinishReason::Length)));

        let positions = m.config().max_position_embeddings as u32;
        let vocab = m.config().vocab_size as u32;
        for (what, r) in [
            ("empty", request(vec![], 1)),
            ("zero new", request(vec![1], 0)),
            ("positions", request(vec![1], positions)),
            ("vocab", request(vec![vocab], 1)),
            ("stop token", {
                let mut r = request(vec![1], 1);
                r.stop_tokens = vec![vocab];
                r
            }),
            ("temperature", {
                let mut r = request(vec![1], 1);
                r.sampling.temperature = -1.0;
                r
            }),
        ] {
            let (k, log, _) = sink();
            s.admit(&m, r, k);
            match &log.borrow().end {
                Some(Err(e)) => assert_eq!(e.kind, FailKind::InvalidArgument, "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert!(s.is_idle());
    }

    struct Panics;
    impl Forward<Cpu> for Panics {
        fn forward(
            &self,
            _: &Model<Cpu>,
            _: &mut [(&mut SequenceState<Cpu>, &[u32])],
            _: Logits,
        ) -> (Result<Vec<Vec<f32>>>, ForwardCounts) {
            panic!("boom")
        }
    }

    #[test]
    fn a_panic_fails_the_pass_and_cancellation_ends_a_sequence() {
        let (_d, m) = model(None);
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (k, log, _) = sink();
        s.admit(&m, request(vec![1, 2, 3], 4), k);
        s.step(&m, &Panics);
        match &log.borrow().end {
            Some(Err(e)) => {
                assert_eq!(e.kind, FailKind::Internal);
                assert!(e.message.contains("boom"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(s.is_idle());
        let (k, log, cancel) = sink();
        s.admit(&m, request(vec![1, 2, 3], 100), k);
        s.step(&m, &LocalForward);
        s.step(&m, &LocalForward);
        *cancel.borrow_mut() = true;
        s.step(&m, &LocalForward);
        assert!(s.is_idle());
        let l = log.borrow();
        assert_eq!(l.end, Some(Ok(FinishReason::Cancelled)));
        assert!(l.tokens.len() < 100);
    }

    /// Issue 18: a prefill that resumes from the context cache gives the cold run's logits bit
    /// for bit (prefix ending on and inside a block; softmax and lightning layers alike).
    #[test]
    fn a_cached_prefix_resumes_to_the_cold_runs_exact_logits() {
        let (_d, m) = model(None);
        let chunk = 16;
        let doc: Vec<u32> = (0..70).map(|i| (i * 37 % 500) as u32).collect();
        let cold = |prompt: &[u32]| {
            let mut st = m.new_state();
            let mut last = Vec::new();
            for c in prompt.chunks(chunk) {
                let end = st.pos + c.len() == prompt.len();
                last = m
                    .forward(&mut st, c, if end { Logits::Last } else { Logits::None })
                    .unwrap();
            }
            (last, st)
        };
        let cache = ContextCache::new(64 << 20, None).unwrap();
        let root = m.cache_root(chunk);
        // The first prompt's blocks go in as a prefill would put them.
        let (_, mut st) = (Vec::<f32>::new(), m.new_state());
        let mut parent = root;
        for c in doc[..64].chunks(chunk) {
            m.forward(&mut st, c, Logits::None).unwrap();
            let k = crate::prefix::key(parent, c);
            cache.insert(k, parent, m.cache_block(&st, c).unwrap());
            parent = k;
        }
        for (len, cached) in [(70, 64), (64, 48), (50, 48), (33, 32), (16, 0)] {
            let prompt = &doc[..len];
            let blocks = cache.lookup(root, prompt, chunk);
            assert_eq!(blocks.len() * chunk, cached, "prompt of {len}");
            let mut st = m.restore(&blocks).unwrap();
            assert_eq!(st.pos, cached);
            let mut last = Vec::new();
            for c in prompt[cached..].chunks(chunk) {
                let end = st.pos + c.len() == len;
                last = m
                    .forward(&mut st, c, if end { Logits::Last } else { Logits::None })
                    .unwrap();
            }
            let (want, cold_st) = cold(prompt);
            assert_eq!(
                last, want,
                "logits of a {len}-token prompt after {cached} cached"
            );
            for (a, b) in st.layers.iter().zip(&cold_st.layers) {
                match (a, b) {
                    (LayerCache::Lightning(x), LayerCache::Lightning(y)) => assert_eq!(x, y),
                    (LayerCache::Softmax { k, v }, LayerCache::Softmax { k: k2, v: v2 }) => {
                        assert_eq!((k, v), (k2, v2))
                    }
                    _ => panic!("layer kinds differ"),
                }
            }
        }
        // A block of another model's shape is refused, not used.
        let mut wrong = (*cache.lookup(root, &doc, chunk)[0]).clone();
        wrong.lightning.pop();
        assert!(m.restore(&[std::sync::Arc::new(wrong)]).is_err());
    }

    /// Through the scheduler: jobs sharing a prefix get the cold run's tokens, report the
    /// cached tokens, and a job that opts out neither reads nor adds.
    #[test]
    fn the_scheduler_resumes_prefills_from_the_cache() {
        let (_d, m) = model(None);
        let cache = ContextCache::new(64 << 20, None).unwrap();
        let cfg = SchedulerConfig {
            max_batch: 4,
            prefill_chunk: 8,
        };
        let doc: Vec<u32> = (0..40).map(|i| (i * 13 % 500) as u32).collect();
        let run = |sched: &mut Scheduler<Cpu, Collect>, prompt: Vec<u32>, use_cache: bool| {
            let (snk, log, _) = sink();
            let mut req = request(prompt, 6);
            req.sampling = SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                seed: 5,
            };
            req.context_cache = use_cache;
            sched.admit(&m, req, snk);
            while !sched.is_idle() {
                sched.step(&m, &LocalForward);
            }
            let l = log.borrow();
            assert_eq!(l.end, Some(Ok(FinishReason::Length)));
            (l.tokens.clone(), l.progress.first().copied())
        };
        let mut plain: Scheduler<Cpu, Collect> = Scheduler::new(cfg);
        let mut cached: Scheduler<Cpu, Collect> =
            Scheduler::new(cfg).with_context_cache(Some(cache.clone()));
        let mut q1 = doc.clone();
        q1.extend([7, 7, 7]);
        let mut q2 = doc.clone();
        q2.extend([9, 8, 7, 6, 5]);
        assert_eq!(
            run(&mut cached, q1.clone(), true).0,
            run(&mut plain, q1, true).0
        );
        assert_eq!(cache.stats().entries, 5);
        let (warm, first) = run(&mut cached, q2.clone(), true);
        assert_eq!(warm, run(&mut plain, q2.clone(), true).0);
        // The first progress after a hit is past the cached 40 tokens.
        assert_eq!(first, Some((Phase::Prefill, 45)));
        assert_eq!(cache.stats().hits, 1);
        assert_eq!(cache.stats().hit_tokens, 40);
        // Opting out: no lookup, no new blocks.
        let before = cache.stats();
        let mut q3 = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
        run(&mut cached, q3.clone(), false);
        q3.push(1);
        assert_eq!(cache.stats(), before);
    }

    /// Prompts with replaced embeddings (images' features) share cached blocks only with the
    /// same rows at the same positions; rows after the cached prefix still apply on a hit.
    #[test]
    fn cached_blocks_of_prompts_with_embeddings_are_keyed_by_their_rows() {
        let (_d, m) = model(None);
        let h = m.config().hidden_size;
        let cache = ContextCache::new(64 << 20, None).unwrap();
        let cfg = SchedulerConfig {
            max_batch: 4,
            prefill_chunk: 8,
        };
        let rows = |seed: u32, n: usize| -> Vec<f32> {
            (0..n * h)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0
                        - 1.0
                })
                .collect()
        };
        // Features in the first blocks, and rows past the 40 tokens that get cached.
        let image = |seed: u32| {
            vec![
                (3, rows(seed, 10)),
                (25, rows(seed + 1, 5)),
                (44, rows(seed + 2, 1)),
            ]
        };
        let doc: Vec<u32> = (0..40).map(|i| (i * 13 % 500) as u32).collect();
        let run =
            |sched: &mut Scheduler<Cpu, Collect>, prompt: &[u32], emb: Vec<(usize, Vec<f32>)>| {
                let (snk, log, _) = sink();
                let mut req = request(prompt.to_vec(), 6);
                req.embeddings = emb;
                sched.admit(&m, req, snk);
                while !sched.is_idle() {
                    sched.step(&m, &LocalForward);
                }
                let l = log.borrow();
                assert_eq!(l.end, Some(Ok(FinishReason::Length)));
                l.tokens.clone()
            };
        let mut plain: Scheduler<Cpu, Collect> = Scheduler::new(cfg);
        let mut cached: Scheduler<Cpu, Collect> =
            Scheduler::new(cfg).with_context_cache(Some(cache.clone()));
        let q1: Vec<u32> = doc.iter().copied().chain([7, 7, 7, 7, 7]).collect();
        let q2: Vec<u32> = doc.iter().copied().chain([9, 8, 7, 6, 5]).collect();
        assert_eq!(
            run(&mut cached, &q1, image(1)),
            run(&mut plain, &q1, image(1))
        );
        assert_eq!(cache.stats().entries, 5);
        // The same features: a hit, and the cold run's tokens (the last row applied after it).
        let warm = run(&mut cached, &q2, image(1));
        assert_eq!(cache.stats().hits, 1);
        assert_eq!(warm, run(&mut plain, &q2, image(1)));
        let without_tail: Vec<_> = image(1).into_iter().take(2).collect();
        assert_ne!(
            warm,
            run(&mut plain, &q2, without_tail),
            "the last row matters"
        );
        // Other features, or none, at the same token ids: no hit, their own tokens.
        assert_eq!(
            run(&mut cached, &q2, image(7)),
            run(&mut plain, &q2, image(7))
        );
        assert_eq!(
            run(&mut cached, &q2, Vec::new()),
            run(&mut plain, &q2, Vec::new())
        );
        assert_eq!(cache.stats().hits, 1);
    }
}
