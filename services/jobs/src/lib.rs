//! The public job API of Ringbolt: clients stream very long prompts in, a job is made durable
//! (prompt in a spool, record in an embedded database) before its id is returned, the engine
//! runs jobs with continuous batching, and watchers get every event from the start.

pub mod auth;
pub mod bounds;
pub mod convert;
pub mod error;
pub mod executor;
pub mod grpc;
pub mod live;
pub mod manager;
pub mod record;
pub mod store;
pub mod submit;

pub use error::JobError;
pub use executor::{Completion, EngineConfig, Outcome};
pub use live::LiveJob;
pub use manager::{DEFAULT_MAX_IMAGES, Executor, JobManager, Limits};
pub use record::{FinishReason, JobRecord, JobState, Timings};
pub use store::{JobStore, RecordBackend};
