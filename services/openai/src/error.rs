//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
//! matching HTTP status; job errors are mapped here, once.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ringbolt_jobs::JobError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// A request that is wrong (400).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A request that is wrong in field `param` (400).
    pub fn field(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param),
            ..Self::invalid(message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// OpenAI's error type for the status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The error object (what a stream's error event carries too).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }

    /// A job's failure as its gRPC status code reported it.
    pub fn from_grpc(code: i32, message: String) -> Self {
        // gRPC codes: INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE; NOT_FOUND;
        // RESOURCE_EXHAUSTED; UNAVAILABLE; UNAUTHENTICATED.
        let status = match code {
            3 | 9 | 11 => StatusCode::BAD_REQUEST,
            5 => StatusCode::NOT_FOUND,
            8 => StatusCode::TOO_MANY_REQUESTS,
            14 => StatusCode::SERVICE_UNAVAILABLE,
            16 => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, message)
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let status = match &e {
            JobError::InvalidArgument(_)
            | JobError::FailedPrecondition(_)
            | JobError::UploadInterrupted(_) => StatusCode::BAD_REQUEST,
            JobError::NotFound(_) => StatusCode::NOT_FOUND,
            JobError::AlreadyExists(_) => StatusCode::CONFLICT,
            JobError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            JobError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            JobError::ShuttingDown | JobError::Unavailable(_) | JobError::NotLeader(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            JobError::DataLoss(_)
            | JobError::Store(_)
            | JobError::Internal(_)
            | JobError::Model(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = match &e {
            JobError::Unauthenticated(_) => Some("invalid_api_key"),
            JobError::ResourceExhausted(_) => Some("rate_limit_exceeded"),
            _ => None,
        };
        ApiError {
            status,
            message: e.to_string(),
            param: None,
            code,
        }
    }
}

impl From<ringbolt_text::TextError> for ApiError {
    fn from(e: ringbolt_text::TextError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, error = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, error = %self.message, "request refused");
        }
        (self.status, axum::Json(self.body())).into_response()
    }
}
