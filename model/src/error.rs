use std::path::PathBuf;

/// Everything that can go wrong reading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("config field `{field}`: {msg}")]
    ConfigField { field: String, msg: String },

    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    #[error("tensor `{tensor}` in {file}: {msg}")]
    Tensor {
        tensor: String,
        file: PathBuf,
        msg: String,
    },

    #[error("token id {id} at position {pos} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, pos: usize, vocab: usize },

    #[error("context of {len} tokens exceeds the model's maximum of {max} positions")]
    ContextTooLong { len: usize, max: usize },

    #[error("invalid request: {0}")]
    Invalid(String),

    #[error("expert step failed: {0}")]
    Experts(String),

    /// Another rank of a context-parallel group failed (it holds part of the sequence).
    #[error("context-parallel peer: {0}")]
    Peer(String),
}

impl ModelError {
    pub(crate) fn field(field: &str, msg: impl Into<String>) -> Self {
        ModelError::ConfigField {
            field: field.to_string(),
            msg: msg.into(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
