//! The OpenAI-compatible HTTP API over Ringbolt's job manager: completions, chat completions
//! (streamed as server-sent events or not), the Responses API's background mode (start,
//! poll, resume a stream, cancel), models and health. Every job goes through the same
//! submission path, limits and store as the gRPC API's, so a job is visible through both.

pub mod completions;
pub mod error;
pub mod generate;
pub mod request;
pub mod responses;

pub use error::ApiError;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use ringbolt_jobs::JobManager;
use ringbolt_jobs::auth::{Authenticate, Tokens};
use ringbolt_shell::Shell;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;

/// How the HTTP API is served (`standalone`, `coordinator`).
#[derive(Args, Clone, Debug, Default)]
pub struct HttpArgs {
    /// Address to serve the OpenAI-compatible HTTP API on (none: not served; port 0: any).
    #[arg(long, env = "RINGBOLT_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// The model id the HTTP API serves (default: the checkpoint directory's name).
    #[arg(long, env = "RINGBOLT_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Largest HTTP request body, in bytes (a longer one gets 413).
    #[arg(long, env = "RINGBOLT_HTTP_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub http_max_body_bytes: usize,
}

/// 256 MiB: a 4M-token prompt as JSON token ids, or as text, fits.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 << 20;

impl HttpArgs {
    /// The model id for the checkpoint at `checkpoint`.
    pub fn model_id(&self, checkpoint: &Path) -> String {
        self.model_name.clone().unwrap_or_else(|| {
            // `canonicalize` turns `.` or `ckpt/` into a name.
            let p = checkpoint
                .canonicalize()
                .unwrap_or_else(|_| checkpoint.to_path_buf());
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "ringbolt".into())
        })
    }
}

/// What the handlers share.
pub struct Api {
    pub mgr: JobManager,
    /// The model id requests must name.
    pub model: String,
    pub auth: Authenticate,
    /// When this server started (the model's `created`).
    pub started: u64,
}

pub type Shared = Arc<Api>;

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Api {
    pub fn new(mgr: JobManager, model: String, tokens: Option<Arc<Tokens>>) -> Shared {
        Arc::new(Api {
            mgr,
            model,
            auth: Authenticate(tokens),
            started: now_secs(),
        })
    }

    /// Checks the request's `model` (absent: this one).
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None => Ok(()),
            Some(m) if m == self.model => Ok(()),
            Some(m) => Err(ApiError::not_found(format!(
                "the model `{}` does not exist here; this server serves `{}`",
                ringbolt_jobs::bounds::echo(m),
                self.model
            ))
            .with_code("model_not_found")),
        }
    }
}

/// Every `/v1` request must carry a token when the server has tokens; the caller it is goes
/// into the request's extensions (admission counts jobs per caller).
async fn authenticate(State(api): State<Shared>, mut req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match api.auth.check(header) {
        Ok(caller) => {
            if let Some(c) = caller {
                req.extensions_mut().insert(c);
            }
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn health(State(api): State<Shared>) -> Response {
    if api.mgr.is_stopping() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping")
            .into_response();
    }
    Json(serde_json::json!({"status": "ok"})).into_response()
}

fn model_object(api: &Api) -> serde_json::Value {
    let m = api.mgr.model();
    serde_json::json!({
        "id": api.model,
        "object": "model",
        "created": api.started,
        "owned_by": "ringbolt",
        "max_model_len": m.max_position_embeddings,
    })
}

async fn models(State(api): State<Shared>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": [model_object(&api)]}))
}

async fn model(
    State(api): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    api.check_model(Some(&id))?;
    Ok(Json(model_object(&api)))
}

async fn unknown_route(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} {}: this server serves /v1/completions, /v1/chat/completions, \
         /v1/responses, /v1/models and /health",
        req.method(),
        ringbolt_jobs::bounds::echo(req.uri().path())
    ))
}

/// The API's routes, bodies bounded by `max_body` bytes.
pub fn router(api: Shared, max_body: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::retrieve))
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            authenticate,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(api)
}

/// The body of a request, or the error saying why it could not be read (413 beyond the
/// limit).
pub fn body(b: request::BodyBytes) -> Result<bytes::Bytes, ApiError> {
    b.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "the request body is larger than this server accepts (--http-max-body-bytes); \
                 send long prompts as token ids, or raise it",
            )
        } else {
            ApiError::new(
                status,
                format!("the request body cannot be read: {}", r.body_text()),
            )
        }
    })
}

/// Accepted connections as axum serves them.
struct Connections(ringbolt_shell::conn::Incoming);

impl axum::serve::Listener for Connections {
    type Io = ringbolt_shell::conn::Conn;
    type Addr = ();

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.0.next().await {
                Some(Ok(c)) => return (c, ()),
                Some(Err(_)) => continue,
                // The acceptor ended (its listener failed): serve no more connections.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(())
    }
}

/// Serves the API on `listener` through `shell` (its connection bounds and TLS, offering
/// HTTP/1.1) until `shutdown`.
pub async fn serve(
    api: Shared,
    max_body: usize,
    shell: &Shell,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(api, max_body);
    axum::serve(Connections(shell.incoming(listener)), app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Starts the API when `args` asks for it: binds `--http-listen`, says where it serves, and
/// serves `mgr` beside the role's gRPC (its TLS files and bounds, from `shell`) until `stop`.
pub async fn start(
    args: &HttpArgs,
    role: &str,
    checkpoint: &Path,
    mgr: JobManager,
    tokens: Option<Arc<Tokens>>,
    shell: &Shell,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>, StartError> {
    let Some(listen) = args.http_listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| StartError(format!("binding the HTTP API on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError(e.to_string()))?;
    let shell = shell
        .http(stop.clone())
        .map_err(|e| StartError(e.to_string()))?;
    let tls = shell.tls().is_some();
    ringbolt_shell::warn_if_exposed(addr, tls, || {
        format!(
            "{role} serves its HTTP API on {addr} in PLAIN TEXT to the network: give \
             --tls-cert and --tls-key, or --http-listen on 127.0.0.1"
        )
    });
    ringbolt_shell::warn_if_exposed(addr, tokens.is_some(), || {
        format!(
            "{role}'s HTTP API accepts jobs from anyone who can reach {addr}: give \
             --auth-tokens-file to require a token"
        )
    });
    let model = args.model_id(checkpoint);
    let scheme = if tls { "https" } else { "http" };
    eprintln!(
        "ringbolt {role} serving the OpenAI-compatible HTTP API on {scheme}://{addr}/v1 (model `{model}`)"
    );
    let api = Api::new(mgr, model, tokens);
    let max_body = args.http_max_body_bytes.max(1024);
    Ok(Some(tokio::spawn(async move {
        serve(api, max_body, &shell, listener, async move {
            stop.cancelled().await
        })
        .await
    })))
}

/// The HTTP API could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);
