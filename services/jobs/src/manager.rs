//! The job manager: admission, durable acceptance, the live-job table, completion and expiry.
//! It is the handle the gRPC service (and tests) use; the engine thread does the compute.

use crate::auth::Caller;
use crate::error::{JobError, Result};
use crate::executor::{Completion, Engine, EngineConfig, Outcome};
use crate::live::LiveJob;
use crate::record::{FinishReason, JobRecord, JobState, now_unix_ms};
use crate::store::{JobStore, SpoolWriter};
use ringbolt_kernels::Backend;
use ringbolt_model::vision::VisionConfig;
use ringbolt_model::{Model, ModelConfig};
use ringbolt_proto::v1 as pb;
use ringbolt_text::Text;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Limits on what clients may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Jobs queued or running at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_jobs: usize,
    pub max_new_tokens: u32,
    pub max_prompt_tokens: u64,
    /// How long finished jobs' results are kept.
    pub result_ttl: Duration,
    /// Most ranks a job's prefill may be split among (a job asking 0 gets this many).
    pub context_parallel: u32,
    /// Jobs one token may have uploaded, queued or running at once (0: only `max_jobs`).
    pub max_jobs_per_token: usize,
    /// Images one job's prompt may hold.
    pub max_images: usize,
    /// Largest image accepted, in pixels.
    pub max_image_pixels: u64,
}

/// Images a job's prompt may hold by default.
pub const DEFAULT_MAX_IMAGES: usize = 16;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_jobs: 64,
            max_new_tokens: 4096,
            max_prompt_tokens: 4 << 20,
            result_ttl: Duration::from_secs(24 * 3600),
            context_parallel: 1,
            max_jobs_per_token: 0,
            max_images: DEFAULT_MAX_IMAGES,
            max_image_pixels: ringbolt_model::image::DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

/// Runs queued jobs on its own thread until `jobs` closes, and reports each job's end on
/// `done` (the manager makes it durable). The standalone engine is one; a cluster's
/// coordinator has another that drives workers.
pub trait Executor: Send + 'static {
    fn run(
        self: Box<Self>,
        jobs: Receiver<Arc<LiveJob>>,
        done: mpsc::Sender<Completion>,
        store: Arc<JobStore>,
    );
}

/// The in-process engine (standalone), on any backend. Its thread is the only one that
/// computes with the model.
struct LocalEngine<B: Backend> {
    model: Model<B>,
    cfg: EngineConfig,
    rt: tokio::runtime::Handle,
}

impl<B: Backend> Executor for LocalEngine<B> {
    fn run(
        self: Box<Self>,
        jobs: Receiver<Arc<LiveJob>>,
        done: mpsc::Sender<Completion>,
        store: Arc<JobStore>,
    ) {
        Engine {
            model: Arc::new(self.model),
            store,
            jobs,
            done,
            cfg: self.cfg,
            rt: self.rt,
        }
        .run()
    }
}

/// What a watcher reads from: a live job, or a finished record.
pub enum WatchSource {
    Live(Arc<LiveJob>),
    Finished(Box<JobRecord>),
}

/// A place among the `max_jobs` jobs admitted (being uploaded, queued or running): taken before
/// an upload starts, so admission is exact however many clients submit at once, and given back
/// when dropped (the upload failed, or the job left the live table).
pub struct Permit {
    _all: Slot,
    /// The caller's own place, when its token has a limit.
    _caller: Option<Slot>,
}

/// One place counted in a counter, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place in `counter` if fewer than `max` are taken; else how many are.
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> std::result::Result<Slot, usize> {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| Slot(counter.clone()))
    }

    /// A place taken whatever the count (a job that was admitted before a restart).
    fn force(counter: &Arc<AtomicUsize>) -> Slot {
        counter.fetch_add(1, Ordering::SeqCst);
        Slot(counter.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a finished job and its speeds.
fn record_finished(rec: &JobRecord) {
    let state = match rec.state {
        JobState::Succeeded => "succeeded",
        JobState::Cancelled => "cancelled",
        _ => "failed",
    };
    metrics::counter!("ringbolt_jobs_finished_total", "state" => state).increment(1);
    let t = &rec.timings;
    if rec.state != JobState::Succeeded {
        return;
    }
    metrics::histogram!("ringbolt_queue_seconds").record(t.queued_seconds);
    metrics::histogram!("ringbolt_time_to_first_token_seconds")
        .record(t.time_to_first_token_seconds);
    if t.prefill_seconds > 0.0 {
        metrics::histogram!("ringbolt_prefill_tokens_per_second")
            .record(rec.prompt_tokens as f64 / t.prefill_seconds);
    }
    if t.decode_seconds > 0.0 && rec.tokens.len() > 1 {
        metrics::histogram!("ringbolt_decode_tokens_per_second")
            .record((rec.tokens.len() - 1) as f64 / t.decode_seconds);
    }
}

/// A live job and its place among the admitted.
struct Entry {
    job: Arc<LiveJob>,
    _permit: Permit,
}

struct Inner {
    store: Arc<JobStore>,
    live: Mutex<HashMap<String, Entry>>,
    admitted: Arc<AtomicUsize>,
    /// Jobs admitted per caller (token), for `max_jobs_per_token`.
    per_caller: Mutex<HashMap<Caller, Arc<AtomicUsize>>>,
    to_engine: Sender<Arc<LiveJob>>,
    limits: Limits,
    model: ModelConfig,
    /// The image side of a MiniMax-VL-01 model (None: prompts take no images).
    vision: Option<VisionConfig>,
    text: Option<Arc<Text>>,
    /// Cancelled when the server stops (or steps down).
    shutdown: CancellationToken,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

impl JobManager {
    /// Starts the engine thread and the completion and expiry tasks, and re-queues every
    /// unfinished job found in the store. Must run inside a tokio runtime.
    pub fn start<B: Backend>(
        model: Model<B>,
        store: JobStore,
        limits: Limits,
        engine: EngineConfig,
        text: Option<Arc<Text>>,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let model_cfg = model.config().clone();
        let vision = model.vision().map(|v| v.config().clone());
        let exec: Box<dyn Executor> = Box::new(LocalEngine {
            model,
            cfg: engine,
            rt: tokio::runtime::Handle::current(),
        });
        Self::start_with(exec, (model_cfg, vision), store, limits, text, shutdown)
    }

    /// Like [`start`](Self::start), with jobs run by `executor` (a cluster's, say), for a
    /// model of this config (and vision side, for a MiniMax-VL-01 model).
    pub fn start_with(
        executor: Box<dyn Executor>,
        (model_cfg, vision): (ModelConfig, Option<VisionConfig>),
        store: JobStore,
        limits: Limits,
        text: Option<Arc<Text>>,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let ceiling = crate::bounds::MAX_NEW_TOKENS_CEILING;
        if limits.max_new_tokens > ceiling {
            return Err(JobError::InvalidArgument(format!(
                "the max_new_tokens limit {} is above the most a job's result can carry ({ceiling})",
                limits.max_new_tokens
            )));
        }
        store.recovery().log();
        let store = Arc::new(store);
        // Admission bounds what is queued or running (`max_jobs`); recovery after a restart
        // re-queues every unfinished job whatever the limit, so this channel is not bounded again.
        let (to_engine, jobs) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel(limits.max_jobs.max(1) * 2);
        let st = store.clone();
        std::thread::Builder::new()
            .name("ringbolt-engine".into())
            .spawn(move || executor.run(jobs, done_tx, st))
            .map_err(|e| JobError::Store(format!("cannot start the engine thread: {e}")))?;
        let mgr = JobManager {
            inner: Arc::new(Inner {
                store,
                live: Mutex::new(HashMap::new()),
                admitted: Arc::new(AtomicUsize::new(0)),
                per_caller: Mutex::new(HashMap::new()),
                to_engine,
                limits,
                model: model_cfg,
                vision,
                text,
                shutdown: shutdown.clone(),
            }),
        };
        tokio::spawn(mgr.clone().completions(done_rx));
        tokio::spawn(mgr.clone().gauge_loop(shutdown.clone()));
        tokio::spawn(mgr.clone().expire_loop(shutdown));
        let mut recovered = 0;
        for rec in mgr.inner.store.all()? {
            if !rec.state.is_finished() {
                let rec = JobRecord {
                    state: JobState::Queued,
                    tokens: Vec::new(),
                    ..rec
                };
                // Recovered jobs were admitted before the restart: they count, whatever the limit.
                let permit = Permit {
                    _all: Slot::force(&mgr.inner.admitted),
                    _caller: None,
                };
                mgr.enqueue(rec, permit)?;
                recovered += 1;
            }
        }
        if recovered > 0 {
            tracing::info!(recovered, "re-queued unfinished jobs from the store");
        }
        Ok(mgr)
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn model(&self) -> &ModelConfig {
        &self.inner.model
    }

    /// The image side of a MiniMax-VL-01 model.
    pub fn vision(&self) -> Option<&VisionConfig> {
        self.inner.vision.as_ref()
    }

    /// The model's text (tokenizer, chat template), when the checkpoint has a tokenizer.
    pub fn text(&self) -> Option<&Arc<Text>> {
        self.inner.text.as_ref()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live_job(&self, id: &str) -> Option<Arc<LiveJob>> {
        self.live().get(id).map(|e| e.job.clone())
    }

    /// The running jobs: id, context-parallel degree, cache bytes per rank (oldest first).
    pub fn running(&self) -> Vec<(String, u32, Vec<u64>)> {
        let mut out: Vec<(u64, String, u32, Vec<u64>)> = self
            .live()
            .values()
            .filter_map(|e| {
                let s = e.job.lock();
                let r = &s.record;
                (r.state == JobState::Running).then(|| {
                    (
                        r.created_unix_ms,
                        r.id.clone(),
                        r.context_parallel,
                        r.cache_bytes_per_rank.clone(),
                    )
                })
            })
            .collect();
        out.sort();
        out.into_iter().map(|(_, id, p, c)| (id, p, c)).collect()
    }

    /// Resolves when the server stops (or, a coordinator, steps down).
    /// Whether the server is stopping (or stepping down).
    pub fn is_stopping(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    pub async fn stopping(&self) {
        self.inner.shutdown.cancelled().await
    }

    /// (running, queued) jobs.
    pub fn counts(&self) -> (u32, u32) {
        let live = self.live();
        let running = live
            .values()
            .filter(|e| e.job.lock().record.state == JobState::Running)
            .count() as u32;
        (running, live.len() as u32 - running)
    }

    /// Takes a place among the admitted jobs, or says the server is full.
    pub fn admit(&self, caller: Option<Caller>) -> Result<Permit> {
        let max = self.inner.limits.max_jobs;
        let all = Slot::take(&self.inner.admitted, max).map_err(|n| {
            metrics::counter!("ringbolt_admission_rejected_total", "reason" => "max_jobs")
                .increment(1);
            JobError::ResourceExhausted(format!(
                "{n} jobs are being uploaded, queued or running (limit {max}); retry later"
            ))
        })?;
        let per = self.inner.limits.max_jobs_per_token;
        let caller = match caller {
            Some(c) if per > 0 => {
                let counter = self
                    .inner
                    .per_caller
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(c)
                    .or_default()
                    .clone();
                Some(Slot::take(&counter, per).map_err(|n| {
                    metrics::counter!(
                        "ringbolt_admission_rejected_total",
                        "reason" => "max_jobs_per_token"
                    )
                    .increment(1);
                    JobError::ResourceExhausted(format!(
                        "this token has {n} jobs being uploaded, queued or running (limit \
                         {per}); retry later"
                    ))
                })?)
            }
            _ => None,
        };
        Ok(Permit {
            _all: all,
            _caller: caller,
        })
    }

    pub fn lookup_idempotency_key(&self, key: &str) -> Result<Option<String>> {
        self.inner.store.lookup_key(key)
    }

    /// A new job id and the spool file its prompt streams into.
    pub fn new_upload(&self) -> Result<(String, SpoolWriter)> {
        let id = uuid::Uuid::now_v7().to_string();
        let w = self.inner.store.spool_writer(&id)?;
        Ok((id, w))
    }

    /// Makes an uploaded prompt a durable job and queues it under `permit`. Returns the job
    /// id, and whether an existing job with the same idempotency key was returned instead.
    pub async fn accept(
        &self,
        record: JobRecord,
        spool: SpoolWriter,
        permit: Permit,
    ) -> Result<(String, bool)> {
        // Committing and queueing run to the end together even if the client goes away
        // meanwhile (its call is dropped): a committed job is always queued.
        let mgr = self.clone();
        tokio::task::spawn_blocking(move || {
            let committed = mgr.inner.store.commit(&record, spool)?;
            match committed {
                Err(existing) => Ok((existing, true)),
                Ok(()) => {
                    let id = record.id.clone();
                    metrics::counter!("ringbolt_jobs_accepted_total").increment(1);
                    metrics::counter!("ringbolt_prompt_tokens_total")
                        .increment(record.prompt_tokens);
                    mgr.enqueue(record, permit)?;
                    tracing::info!(job = %id, "job accepted");
                    Ok((id, false))
                }
            }
        })
        .await
        .map_err(|e| JobError::Store(e.to_string()))?
    }

    fn enqueue(&self, record: JobRecord, permit: Permit) -> Result<()> {
        let job = LiveJob::new(record);
        self.live().insert(
            job.id.clone(),
            Entry {
                job: job.clone(),
                _permit: permit,
            },
        );
        self.inner
            .to_engine
            .send(job)
            .map_err(|_| JobError::ShuttingDown)
    }

    pub fn get(&self, id: &str) -> Result<JobRecord> {
        if let Some(j) = self.live_job(id) {
            return Ok(j.record());
        }
        self.inner
            .store
            .get(id)?
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    pub fn watch(&self, id: &str) -> Result<WatchSource> {
        if let Some(j) = self.live_job(id) {
            return Ok(WatchSource::Live(j));
        }
        match self.inner.store.get(id)? {
            Some(r) if r.state.is_finished() => Ok(WatchSource::Finished(Box::new(r))),
            // Between commit and the live table (or at shutdown): look again.
            Some(_) => self
                .live_job(id)
                .map(WatchSource::Live)
                .ok_or(JobError::ShuttingDown),
            None => Err(JobError::NotFound(id.to_string())),
        }
    }

    /// Every event of job `id` from its first, in order, live until it ends: what every
    /// watcher reads. With the model's tokenizer, tokens carry the text they complete. A
    /// server that stops (or steps down) ends its followers with UNAVAILABLE, so that it can
    /// stop; clients follow the job on another server.
    pub fn follow(&self, id: &str) -> Result<mpsc::Receiver<Result<pb::JobEvent>>> {
        let src = self.watch(id)?;
        let (tx, rx) = mpsc::channel(256);
        let mut detok = self.text().map(|t| t.detokenizer());
        let mgr = self.clone();
        let mut with_text = move |mut e: pb::JobEvent| {
            use pb::job_event::Event;
            match (&mut detok, &mut e.event) {
                (Some(d), Some(Event::Token(t))) => t.text = Some(d.push(t.token)),
                (Some(d), Some(Event::Finished(f))) => f.text = Some(d.finish()),
                _ => {}
            }
            e
        };
        tokio::spawn(async move {
            let job = match src {
                WatchSource::Finished(rec) => {
                    for e in crate::live::replay(&rec) {
                        if tx.send(Ok(with_text(e))).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                WatchSource::Live(job) => job,
            };
            let mut changed = job.subscribe();
            let mut sent = 0;
            loop {
                let (batch, done, kept) = {
                    let s = job.lock();
                    (s.events[sent..].to_vec(), s.done, s.stopped_at)
                };
                sent += batch.len();
                for e in batch {
                    // Tokens past a client's stop are not the job's (its record drops them).
                    if let (Some(n), Some(pb::job_event::Event::Token(t))) = (kept, &e.event)
                        && t.index as usize >= n
                    {
                        continue;
                    }
                    if tx.send(Ok(with_text(e))).await.is_err() {
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
                    _ = mgr.stopping() => {
                        let _ = tx
                            .send(Err(JobError::Unavailable(
                                "this server is stopping; the job goes on elsewhere \
                                 or after a restart"
                                    .into(),
                            )))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Ends job `id` after its first `tokens` tokens as a stop (see [`LiveJob::stop_after`]);
    /// nothing when it has finished.
    pub fn stop_after(&self, id: &str, tokens: usize) {
        if let Some(j) = self.live_job(id) {
            j.stop_after(tokens);
        }
    }

    /// Asks a queued or running job to stop. A finished job cannot be cancelled: that is
    /// FAILED_PRECONDITION, saying how it ended.
    pub fn cancel(&self, id: &str) -> Result<JobRecord> {
        if let Some(j) = self.live_job(id) {
            j.cancel();
            tracing::info!(job = %id, "cancel requested");
            return Ok(j.record());
        }
        let rec = self
            .inner
            .store
            .get(id)?
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        if !rec.state.is_finished() {
            // Committed a moment ago and not queued yet: ask again.
            return Err(JobError::Unavailable(format!(
                "job {id} is being queued; retry the cancel"
            )));
        }
        Err(JobError::FailedPrecondition(format!(
            "job {id} has already finished ({}): nothing to cancel",
            crate::convert::state(rec.state)
                .as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        )))
    }

    /// Up to `limit` jobs older than job `before` (all jobs when None), newest first, and
    /// whether older ones remain.
    pub fn list(&self, limit: usize, before: Option<&str>) -> Result<(Vec<JobRecord>, bool)> {
        let mut all = self.inner.store.all()?;
        if let Some(b) = before {
            all.retain(|r| r.id.as_str() < b);
        }
        let more = all.len() > limit;
        let mut page: Vec<JobRecord> = all.into_iter().rev().take(limit).collect();
        {
            let live = self.live();
            for r in page.iter_mut() {
                if let Some(e) = live.get(&r.id) {
                    *r = e.job.record();
                }
            }
        }
        Ok((page, more))
    }

    /// Makes each finished job durable, then closes its event log.
    async fn completions(self, mut rx: mpsc::Receiver<Completion>) {
        while let Some(c) = rx.recv().await {
            let mut rec = c.job.record();
            rec.timings = c.timings;
            rec.finished_unix_ms = Some(now_unix_ms());
            let outcome = match (c.outcome, c.job.stopped_at()) {
                // A client's stop sequence ended it: a stop, however the engine ended.
                (Outcome::Finished(_), Some(n)) => {
                    rec.tokens.truncate(n);
                    Outcome::Finished(FinishReason::Stop)
                }
                (o, _) => o,
            };
            match outcome {
                Outcome::Finished(reason) => {
                    rec.state = if reason == FinishReason::Cancelled {
                        JobState::Cancelled
                    } else {
                        JobState::Succeeded
                    };
                    rec.finish_reason = Some(reason);
                }
                Outcome::Failed(code, msg) => {
                    rec.state = JobState::Failed;
                    let msg = crate::bounds::clip(&msg, crate::bounds::MAX_ERROR_BYTES).to_string();
                    rec.error = Some((code, msg));
                }
            }
            let store = self.inner.store.clone();
            let r2 = rec.clone();
            match tokio::task::spawn_blocking(move || store.put(&r2)).await {
                Ok(Ok(())) => {}
                Ok(Err(JobError::NotLeader(e))) => {
                    // Another server leads and runs the job: it is not finished here (watchers
                    // of this server are told so when it stops, and follow the other).
                    tracing::warn!(job = %rec.id, error = %e, "not finishing the job: no longer the leader");
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::error!(job = %rec.id, error = %e, "cannot persist the result")
                }
                Err(e) => tracing::error!(job = %rec.id, error = %e, "cannot persist the result"),
            }
            tracing::info!(job = %rec.id, state = ?rec.state, tokens = rec.tokens.len(), "job finished");
            record_finished(&rec);
            // Out of the live table first (its admission place given back; readers find the
            // durable record), then watchers hear the end: a client that submits again on
            // hearing it finds the place free.
            self.live().remove(&c.job.id);
            c.job.finish(rec);
        }
    }

    /// Keeps the jobs-by-state gauges current, once a second.
    async fn gauge_loop(self, shutdown: CancellationToken) {
        loop {
            let (running, queued) = self.counts();
            metrics::gauge!("ringbolt_jobs", "state" => "running").set(running as f64);
            metrics::gauge!("ringbolt_jobs", "state" => "queued").set(queued as f64);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Deletes finished results older than the TTL, once a minute.
    async fn expire_loop(self, shutdown: CancellationToken) {
        let every = self
            .inner
            .limits
            .result_ttl
            .min(Duration::from_secs(60))
            .max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let store = self.inner.store.clone();
            let ttl = self.inner.limits.result_ttl.as_millis() as u64;
            let res = tokio::task::spawn_blocking(move || -> Result<usize> {
                let now = now_unix_ms();
                let mut n = 0;
                for r in store.all()? {
                    if r.finished_unix_ms
                        .is_some_and(|f| now.saturating_sub(f) > ttl)
                    {
                        store.delete(&r)?;
                        n += 1;
                    }
                }
                Ok(n)
            })
            .await;
            if let Ok(Ok(n)) = res
                && n > 0
            {
                tracing::info!(expired = n, "deleted expired job results");
            }
        }
    }
}
