//! A job in memory while it is queued or running: its record, the ordered log of its events
//! (so a watcher that connects late gets every event from the start, exactly once, in order),
//! and its cancellation (a token: checked between steps, or awaited).

use crate::record::{FinishReason, JobRecord, JobState};
use ringbolt_proto::v1 as pb;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

pub struct LiveJob {
    pub id: String,
    state: Mutex<LiveState>,
    changed: watch::Sender<u64>,
    cancel: tokio_util::sync::CancellationToken,
}

pub struct LiveState {
    pub record: JobRecord,
    pub events: Vec<pb::JobEvent>,
    /// Set with the last event (finished or failed).
    pub done: bool,
    /// Tokens kept when a client's stop sequence ended the job.
    pub stopped_at: Option<usize>,
}

fn ev(e: pb::job_event::Event) -> pb::JobEvent {
    pb::JobEvent { event: Some(e) }
}

/// The events a finished (or newly accepted) job replays to a watcher.
pub fn replay(record: &JobRecord) -> Vec<pb::JobEvent> {
    let mut out = vec![ev(pb::job_event::Event::Accepted(pb::Accepted {
        job_id: record.id.clone(),
        prompt_tokens: record.prompt_tokens,
    }))];
    out.extend(record.tokens.iter().enumerate().map(|(i, &t)| {
        ev(pb::job_event::Event::Token(pb::Token {
            index: i as u32,
            token: t,
            text: None,
        }))
    }));
    if let Some(last) = final_event(record) {
        out.push(last);
    }
    out
}

/// The closing event of a finished record.
pub fn final_event(record: &JobRecord) -> Option<pb::JobEvent> {
    match record.state {
        JobState::Succeeded | JobState::Cancelled => {
            Some(ev(pb::job_event::Event::Finished(pb::Finished {
                reason: crate::convert::finish_reason(
                    record.finish_reason.unwrap_or(FinishReason::Length),
                ) as i32,
                generated_tokens: record.tokens.len() as u32,
                prompt_tokens: record.prompt_tokens,
                timings: Some(crate::convert::timings(&record.timings)),
                text: None,
                cached_tokens: record.cached_tokens,
            })))
        }
        JobState::Failed => {
            let (code, message) = record.error.clone().unwrap_or((13, "failed".into()));
            Some(ev(pb::job_event::Event::Failed(pb::Failed {
                code,
                message,
            })))
        }
        JobState::Queued | JobState::Running => None,
    }
}

impl LiveJob {
    pub fn new(record: JobRecord) -> Arc<Self> {
        let mut events = replay(&record);
        events.push(ev(pb::job_event::Event::Progress(pb::Progress {
            phase: pb::Phase::Queued as i32,
            prompt_tokens_done: 0,
            prompt_tokens_total: record.prompt_tokens,
            tokens_per_second: 0.0,
        })));
        Arc::new(LiveJob {
            id: record.id.clone(),
            state: Mutex::new(LiveState {
                record,
                events,
                done: false,
                stopped_at: None,
            }),
            changed: watch::channel(0).0,
            cancel: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, LiveState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record(&self) -> JobRecord {
        self.lock().record.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn push(&self, f: impl FnOnce(&mut LiveState) -> Option<pb::JobEvent>) {
        let n = {
            let mut s = self.lock();
            if let Some(e) = f(&mut s) {
                s.events.push(e);
            }
            s.events.len() as u64
        };
        self.changed.send_replace(n);
    }

    /// The job runs, its prefill split among `context_parallel` ranks.
    pub fn set_running(&self, context_parallel: u32) {
        self.push(|s| {
            s.record.state = JobState::Running;
            s.record.context_parallel = context_parallel;
            None
        });
    }

    /// The softmax key and value bytes each rank held after a context-parallel prefill.
    pub fn set_cache_bytes(&self, per_rank: &[u64]) {
        // The largest rank's, as an attention worker reports its own rank's.
        metrics::gauge!("ringbolt_context_rank_cache_bytes")
            .set(per_rank.iter().copied().max().unwrap_or(0) as f64);
        self.push(|s| {
            s.record.cache_bytes_per_rank = per_rank.to_vec();
            None
        });
    }

    /// Its prefill starts after `tokens` prompt tokens the context cache had.
    pub fn set_cached_tokens(&self, tokens: u64) {
        self.push(|s| {
            s.record.cached_tokens = tokens;
            None
        });
    }

    pub fn progress(&self, phase: pb::Phase, done: u64, tps: f64) {
        self.push(|s| {
            Some(ev(pb::job_event::Event::Progress(pb::Progress {
                phase: phase as i32,
                prompt_tokens_done: done,
                prompt_tokens_total: s.record.prompt_tokens,
                tokens_per_second: tps,
            })))
        });
    }

    pub fn token(&self, token: u32) {
        metrics::counter!("ringbolt_generated_tokens_total").increment(1);
        self.push(|s| {
            // Past a stop its client asked for, tokens are not the job's.
            if s.stopped_at.is_some() {
                return None;
            }
            let index = s.record.tokens.len() as u32;
            s.record.tokens.push(token);
            Some(ev(pb::job_event::Event::Token(pb::Token {
                index,
                token,
                text: None,
            })))
        });
    }

    /// Ends the job after its first `tokens` tokens, as a stop (a stop sequence its client
    /// matched in the text): later tokens are dropped, and it finishes with reason STOP.
    pub fn stop_after(&self, tokens: usize) {
        {
            let mut s = self.lock();
            if s.done || s.stopped_at.is_some() {
                return;
            }
            s.stopped_at = Some(tokens);
            s.record.tokens.truncate(tokens);
        }
        self.cancel.cancel();
    }

    /// Where [`stop_after`](Self::stop_after) ended the job, if it did.
    pub fn stopped_at(&self) -> Option<usize> {
        self.lock().stopped_at
    }

    /// Records the final state (already durable) and closes the log.
    pub fn finish(&self, record: JobRecord) {
        self.push(|s| {
            s.record = record;
            s.done = true;
            final_event(&s.record)
        });
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Cancelled when the job is (for work that waits rather than checks between steps).
    pub fn cancellation(&self) -> &tokio_util::sync::CancellationToken {
        &self.cancel
    }
}
