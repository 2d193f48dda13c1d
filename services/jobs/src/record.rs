//! The durable job record.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    Stop,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop_tokens: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub queued_seconds: f64,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub time_to_first_token_seconds: f64,
}

/// An image of a job's prompt (its bytes are spooled after the prompt's token ids).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Length of the image file.
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
    /// Positions its placeholder takes once expanded.
    pub features: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub state: JobState,
    /// Positions the prompt takes: its token ids, each image placeholder counted as its
    /// image's features.
    pub prompt_tokens: u64,
    pub max_new_tokens: u32,
    pub sampling: Sampling,
    pub idempotency_key: Option<String>,
    pub context_parallel: u32,
    pub created_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    pub tokens: Vec<u32>,
    pub finish_reason: Option<FinishReason>,
    /// gRPC code and message of a failure.
    pub error: Option<(i32, String)>,
    pub timings: Timings,
    /// Hash of what was asked (prompt and parameters): a retry with the same idempotency key
    /// must ask the same (absent in records of older releases).
    #[serde(default)]
    pub fingerprint: Option<u64>,
    /// Generation does not stop at the model's end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Softmax key and value bytes each rank of a context-parallel prefill held.
    #[serde(default)]
    pub cache_bytes_per_rank: Vec<u64>,
    /// Prompt tokens the context cache had (its prefill started after them).
    #[serde(default)]
    pub cached_tokens: u64,
    /// The job neither starts from nor adds to the context cache.
    #[serde(default)]
    pub no_context_cache: bool,
    /// The prompt's images, in placeholder order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageInfo>,
}

/// Positions a prompt's images add to its token ids: each placeholder becomes its image's
/// features.
pub fn image_positions(images: &[ImageInfo]) -> u64 {
    images.iter().map(|i| i.features.saturating_sub(1)).sum()
}

impl JobRecord {
    /// Token ids spooled for the prompt: each image is one placeholder there.
    pub fn spooled_tokens(&self) -> u64 {
        self.prompt_tokens
            .saturating_sub(image_positions(&self.images))
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
