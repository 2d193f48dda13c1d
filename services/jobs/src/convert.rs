//! Job records to and from the wire types.

use crate::bounds::{MAX_ERROR_BYTES, MAX_IDEMPOTENCY_KEY_BYTES, MAX_STOP_TOKENS, clip};
use crate::record::{FinishReason, JobRecord, JobState, Sampling, Timings};
use ringbolt_proto::v1 as pb;

pub fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

pub fn state(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn timings(t: &Timings) -> pb::Timings {
    pb::Timings {
        queued_seconds: t.queued_seconds,
        prefill_seconds: t.prefill_seconds,
        decode_seconds: t.decode_seconds,
        time_to_first_token_seconds: t.time_to_first_token_seconds,
    }
}

pub fn sampling(s: &Sampling) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        seed: s.seed,
        stop_tokens: s.stop_tokens[..s.stop_tokens.len().min(MAX_STOP_TOKENS)].to_vec(),
    }
}

/// A record on the wire. Stored fields are bounded when accepted; records written before those
/// bounds existed are clipped here, so one job can never make a message too large. With the
/// model's text, the job carries its generated text.
pub fn job(r: &JobRecord, text: Option<&ringbolt_text::Text>) -> pb::Job {
    pb::Job {
        job_id: r.id.clone(),
        state: state(r.state) as i32,
        prompt_tokens: r.prompt_tokens,
        max_new_tokens: r.max_new_tokens,
        sampling: Some(sampling(&r.sampling)),
        tokens: r.tokens.clone(),
        generated_tokens: r.tokens.len() as u32,
        cache_bytes_per_rank: r.cache_bytes_per_rank.clone(),
        context_parallel: r.context_parallel,
        finish_reason: r
            .finish_reason
            .map(finish_reason)
            .unwrap_or(pb::FinishReason::Unspecified) as i32,
        error: r
            .error
            .as_ref()
            .map(|e| clip(&e.1, MAX_ERROR_BYTES).to_string())
            .unwrap_or_default(),
        created_unix_ms: r.created_unix_ms,
        timings: Some(timings(&r.timings)),
        idempotency_key: r
            .idempotency_key
            .as_deref()
            .map(|k| clip(k, MAX_IDEMPOTENCY_KEY_BYTES).to_string())
            .unwrap_or_default(),
        text: text.map(|t| t.decode(&r.tokens)),
        cached_tokens: r.cached_tokens,
        images: r.images.len() as u32,
    }
}
