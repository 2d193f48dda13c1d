use tonic::{Code, Status};

/// Errors of the job API; mapped to gRPC statuses in exactly one place ([`JobError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// An unknown job id (quoted clipped: see [`crate::bounds::echo`]).
    #[error("no job with id `{}`", crate::bounds::echo(.0))]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A request without a valid token, where tokens are required.
    #[error("{0}")]
    Unauthenticated(String),
    /// Accepted data that is damaged or gone (a spooled prompt, a job record).
    #[error("{0}")]
    DataLoss(String),
    #[error("upload interrupted: {0}; no job was created")]
    UploadInterrupted(String),
    #[error("job store: {0}")]
    Store(String),
    /// A failure of the server's own (a panicked task, say).
    #[error("internal error: {0}")]
    Internal(String),
    #[error("model: {0}")]
    Model(#[from] ringbolt_model::ModelError),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Unavailable(String),
    /// This server no longer leads its cluster: its writes are refused (another took over).
    #[error("{0}")]
    NotLeader(String),
}

impl JobError {
    /// The model's verdict on what a request asked: an invalid request is INVALID_ARGUMENT
    /// (with the model's reason), anything else the model's own failure.
    pub fn from_request(e: ringbolt_model::ModelError) -> Self {
        match e {
            ringbolt_model::ModelError::Invalid(m) => JobError::InvalidArgument(m),
            e => JobError::Model(e),
        }
    }

    pub fn status(&self) -> Status {
        let code = match self {
            JobError::InvalidArgument(_) => Code::InvalidArgument,
            JobError::FailedPrecondition(_) => Code::FailedPrecondition,
            JobError::ResourceExhausted(_) => Code::ResourceExhausted,
            JobError::NotFound(_) => Code::NotFound,
            JobError::AlreadyExists(_) => Code::AlreadyExists,
            JobError::Unauthenticated(_) => Code::Unauthenticated,
            JobError::DataLoss(_) => Code::DataLoss,
            JobError::UploadInterrupted(_) => Code::Cancelled,
            JobError::Store(_) | JobError::Internal(_) => Code::Internal,
            JobError::Model(_) => Code::Internal,
            JobError::ShuttingDown | JobError::Unavailable(_) | JobError::NotLeader(_) => {
                Code::Unavailable
            }
        };
        Status::new(code, self.to_string())
    }
}

impl From<JobError> for Status {
    fn from(e: JobError) -> Self {
        e.status()
    }
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for JobError {
            fn from(e: $t) -> Self {
                JobError::Store(e.to_string())
            }
        }
    )*};
}
store_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    std::io::Error,
    serde_json::Error
);

pub type Result<T, E = JobError> = std::result::Result<T, E>;
