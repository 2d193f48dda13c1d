//! The MiniMax-01 model engine: config dialects, Hugging Face checkpoints, the forward pass
//! (lightning attention, softmax attention, MoE) on any [`ringbolt_kernels::Backend`], and
//! sampling. This crate is the single source of truth for the model's math; everything else
//! in Ringbolt distributes it.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod image;
pub mod prefix;
pub mod sampling;
pub mod scheduler;
pub mod tokens;
pub mod vision;
pub mod weights;
pub mod writer;

pub use checkpoint::Checkpoint;
pub use config::{Dialect, LayerKind, ModelConfig};
pub use engine::context;
pub use engine::{
    Expert, ExpertExecutor, Logits, Model, PIPELINE_MIN_ROWS, PIPELINE_PARTS, PendingExperts,
    SequenceState, SplitAttention,
};
pub use error::{ModelError, Result};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{
    ContextPrefill, Event, FailKind, FinishReason, Forward, ForwardCounts, LocalForward, Phase,
    Request, Scheduler, SchedulerConfig, SeqError, SeqStats, Sink,
};
pub use writer::{
    Preset, WeightDtype, write_random_checkpoint, write_random_checkpoint_scaled,
    write_random_vl_checkpoint,
};
