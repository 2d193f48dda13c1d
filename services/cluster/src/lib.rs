//! Ringbolt's cluster roles (design.md §2-6): the coordinator (public API, job records in etcd,
//! placement plan in epochs, leader election, job driving), attention workers (attention weights
//! and a job's context segment; MoE layers through the expert workers) and expert workers
//! (experts placed by the plan). Control goes over gRPC (`ringbolt.internal.v1`), tensors over
//! the data plane ([`ringbolt_transport::exchange`]), membership and the plan through etcd.

pub mod attention;
pub mod coordinator;
pub mod etcd;
pub mod expert;
pub mod group;
pub mod plan;
pub mod remote;
pub mod store;
pub mod wire;

use clap::Args;
use ringbolt_membership::EtcdMembership;
pub use ringbolt_shell::Health;
use ringbolt_shell::{ClientTls, Dial, ServeArgs, Shell};
use ringbolt_transport::guard::Guard;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("model: {0}")]
    Model(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<ClusterError> for tonic::Status {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Invalid(m) => tonic::Status::invalid_argument(m),
            ClusterError::Unavailable(m) => tonic::Status::unavailable(m),
            ClusterError::Etcd(m) => tonic::Status::unavailable(format!("etcd: {m}")),
            ClusterError::Model(m) => tonic::Status::failed_precondition(m),
            ClusterError::Io(m) => tonic::Status::internal(m),
        }
    }
}

/// What a job may ask for (standalone and coordinator: one definition of the flags).
#[derive(Args, Clone, Debug)]
pub struct JobLimitArgs {
    /// Jobs queued or running at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "RINGBOLT_MAX_JOBS", default_value_t = 64)]
    pub max_jobs: usize,
    /// Largest max_new_tokens a job may ask for.
    #[arg(long, env = "RINGBOLT_MAX_NEW_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_new_tokens_limit: u32,
    /// Longest prompt accepted (also bounded by the model's positions; an image counts as
    /// its features).
    #[arg(long, env = "RINGBOLT_MAX_PROMPT_TOKENS", default_value_t = 4 << 20)]
    pub max_prompt_tokens: u64,
    /// Seconds finished results are kept.
    #[arg(long, env = "RINGBOLT_RESULT_TTL_SECS", default_value_t = 86_400)]
    pub result_ttl_secs: u64,
    /// Most images one job's prompt may hold (a MiniMax-VL-01 model).
    #[arg(long, env = "RINGBOLT_MAX_IMAGES", default_value_t = ringbolt_jobs::DEFAULT_MAX_IMAGES)]
    pub max_images: usize,
    /// Largest image accepted, in pixels.
    #[arg(long, env = "RINGBOLT_MAX_IMAGE_PIXELS",
          default_value_t = ringbolt_model::image::DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
}

impl Default for JobLimitArgs {
    fn default() -> Self {
        let l = ringbolt_jobs::Limits::default();
        JobLimitArgs {
            max_jobs: l.max_jobs,
            max_new_tokens_limit: l.max_new_tokens,
            max_prompt_tokens: l.max_prompt_tokens,
            result_ttl_secs: l.result_ttl.as_secs(),
            max_images: l.max_images,
            max_image_pixels: l.max_image_pixels,
        }
    }
}

impl JobLimitArgs {
    /// The limits, with a server's context-parallel degree and per-token job limit.
    pub fn limits(&self, context_parallel: u32, auth: &AuthArgs) -> ringbolt_jobs::Limits {
        ringbolt_jobs::Limits {
            max_jobs: self.max_jobs.max(1),
            max_new_tokens: self.max_new_tokens_limit,
            max_prompt_tokens: self.max_prompt_tokens,
            result_ttl: Duration::from_secs(self.result_ttl_secs),
            context_parallel: context_parallel.max(1),
            max_jobs_per_token: auth.max_jobs_per_token,
            max_images: self.max_images,
            max_image_pixels: self.max_image_pixels,
        }
    }
}

/// Who may use the public API (standalone and coordinator).
#[derive(Args, Clone, Debug, Default)]
pub struct AuthArgs {
    /// A file of bearer tokens, one a line (at least 16 characters each; `#` comments): every
    /// job and status request must carry one (`ringbolt --token`). Re-read when it changes.
    #[arg(long, env = "RINGBOLT_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<std::path::PathBuf>,
    /// Jobs one token may have uploaded, queued or running at once (0: only --max-jobs).
    #[arg(long, env = "RINGBOLT_MAX_JOBS_PER_TOKEN", default_value_t = 0)]
    pub max_jobs_per_token: usize,
}

impl AuthArgs {
    /// The tokens of `--auth-tokens-file`, if given.
    pub fn tokens(
        &self,
    ) -> Result<Option<std::sync::Arc<ringbolt_jobs::auth::Tokens>>, ClusterError> {
        self.auth_tokens_file
            .as_deref()
            .map(|p| {
                ringbolt_jobs::auth::Tokens::load(p)
                    .map(std::sync::Arc::new)
                    .map_err(|e| ClusterError::Io(e.to_string()))
            })
            .transpose()
    }
}

/// Where a role computes and in what formats: `--device`, `--weights`, `--activations` (one
/// definition for standalone, the workers, `logits`, `generate` and `bench engine`).
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct ComputeArgs {
    /// Where the model computes: `cpu`, or `cuda:N` (a build with `--features cuda`).
    #[arg(long, env = "RINGBOLT_DEVICE", default_value = "cpu")]
    pub device: ringbolt_kernels::Device,
    /// How weights are held: `bf16` (as the checkpoint has them), `int8` (the routed experts
    /// quantized at load to int8 with one scale per output channel, computed as W8A16: half the
    /// memory and bytes read of bf16), `int8-all` (the attention projections too).
    #[arg(long, env = "RINGBOLT_WEIGHTS", default_value = "bf16")]
    pub weights: ringbolt_kernels::WeightFormat,
    /// What GEMMs multiply: `f32` (exact; the CPU's default) or `bf16` (rounded before each
    /// GEMM, f32 accumulation: a GPU's numerics, the fastest CPU prefill). A GPU always
    /// computes with bf16 activations.
    #[arg(long, env = "RINGBOLT_ACTIVATIONS")]
    pub activations: Option<ringbolt_kernels::Activations>,
}

impl ComputeArgs {
    /// Opens the device's backend with these activations and runs `task` on it.
    pub fn open<T: ringbolt_kernels::OnBackend>(
        &self,
        task: T,
    ) -> Result<T::Output, ringbolt_kernels::DeviceError> {
        self.device.open(None, self.activations, task)
    }
}

/// The context cache of a role that prefills (standalone; attention workers): what prefills
/// computed, kept by prompt prefix, so that jobs sharing a prefix start after it.
#[derive(Args, Clone, Debug)]
pub struct ContextCacheArgs {
    /// Bytes of memory the context cache may hold (0: no cache).
    #[arg(long, env = "RINGBOLT_CONTEXT_CACHE_BYTES", default_value_t = DEFAULT_CONTEXT_CACHE_BYTES)]
    pub context_cache_bytes: usize,
    /// A local directory evicted entries spill to (checksummed; at most 4 times the memory
    /// budget), read back on a hit.
    #[arg(long, env = "RINGBOLT_CONTEXT_CACHE_DIR")]
    pub context_cache_dir: Option<std::path::PathBuf>,
}

/// 2 GiB.
pub const DEFAULT_CONTEXT_CACHE_BYTES: usize = 2 << 30;

impl Default for ContextCacheArgs {
    fn default() -> Self {
        ContextCacheArgs {
            context_cache_bytes: DEFAULT_CONTEXT_CACHE_BYTES,
            context_cache_dir: None,
        }
    }
}

impl ContextCacheArgs {
    /// No cache (benchmarks and tests that measure prefills).
    pub fn off() -> Self {
        ContextCacheArgs {
            context_cache_bytes: 0,
            context_cache_dir: None,
        }
    }

    /// The cache these flags ask for (None with a budget of 0).
    pub fn open(&self) -> Result<Option<ringbolt_model::prefix::ContextCache>, ClusterError> {
        if self.context_cache_bytes == 0 {
            return Ok(None);
        }
        ringbolt_model::prefix::ContextCache::new(
            self.context_cache_bytes,
            self.context_cache_dir.as_deref(),
        )
        .map(Some)
        .map_err(|e| {
            let dir = self
                .context_cache_dir
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            ClusterError::Io(format!(
                "the context cache directory {}: {e}",
                dir.display()
            ))
        })
    }
}

/// Flags every cluster role takes.
#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// Checkpoint directory (shared storage: each process loads only its part).
    #[arg(long, env = "RINGBOLT_CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// Address the gRPC server listens on (port 0: any free port).
    #[arg(long, env = "RINGBOLT_LISTEN")]
    pub listen: SocketAddr,
    /// etcd endpoint(s), comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, env = "RINGBOLT_ETCD", value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// Cluster name: the etcd key prefix `/{cluster}/`.
    #[arg(long, env = "RINGBOLT_CLUSTER", default_value = "ringbolt")]
    pub cluster: String,
    /// Address others reach this process at, when not the --listen one (host:port).
    #[arg(long, env = "RINGBOLT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Member id (default: role, host and port).
    #[arg(long, env = "RINGBOLT_ID")]
    pub id: Option<String>,
    /// Membership lease TTL: a crashed process is noticed this long after its last keep-alive.
    #[arg(long, env = "RINGBOLT_LEASE_TTL_SECS", default_value_t = 5)]
    pub lease_ttl_secs: u64,
    /// Bound on every etcd request and on connecting to etcd at start.
    #[arg(long, env = "RINGBOLT_ETCD_TIMEOUT_SECS", default_value_t = 5)]
    pub etcd_timeout_secs: u64,
    /// PEM CA the roles this one dials must present certificates from: given, they are
    /// dialed over TLS, with --tls-cert/--tls-key as this role's client certificate.
    #[arg(long, env = "RINGBOLT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name the other roles' certificates must carry when dialed (default: the host
    /// dialed; roles advertise IPs, so give a name every role's certificate has).
    #[arg(long, env = "RINGBOLT_TLS_SERVER_NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// PEM CA etcd's certificate must be signed by: etcd is dialed over TLS (https:// endpoints).
    #[arg(long, env = "RINGBOLT_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for an etcd that requires one (--client-cert-auth).
    #[arg(long, env = "RINGBOLT_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, env = "RINGBOLT_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// A file holding the cluster's data-plane secret (32+ bytes, e.g. `openssl rand -hex
    /// 32`): every data-plane connection must prove it holds it before a frame is read. All
    /// workers of a cluster need the same file.
    #[arg(long, env = "RINGBOLT_DATA_SECRET_FILE")]
    pub data_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl CommonArgs {
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs.max(2))
    }

    /// How this role dials the others.
    pub fn dial(&self) -> Dial {
        Dial::new(self.tls_ca.as_ref().map(|ca| {
            ClientTls {
                ca: Some(ca.clone()),
                identity: self
                    .serve
                    .tls
                    .tls_cert
                    .clone()
                    .zip(self.serve.tls.tls_key.clone()),
                server_name: self.tls_server_name.clone(),
            }
        }))
    }

    /// The data plane's admission rule (`--data-secret-file`), warning loudly when a data
    /// plane reachable from the network is left open.
    pub fn data_guard(&self, data_listen: SocketAddr) -> Result<Guard, ClusterError> {
        match &self.data_secret_file {
            Some(p) => Guard::from_file(p).map_err(|e| ClusterError::Invalid(e.to_string())),
            None => {
                ringbolt_shell::warn_if_exposed(data_listen, false, || {
                    format!(
                        "the data plane on {data_listen} admits ANY peer that can reach it: \
                         give --data-secret-file (the same file on every worker)"
                    )
                });
                Ok(Guard::open())
            }
        }
    }

    /// Starts this role's service shell (telemetry, TLS) for its listener at `listen`.
    pub fn shell(
        &self,
        role: &'static str,
        listen: SocketAddr,
        stop: CancellationToken,
    ) -> Result<Shell, ClusterError> {
        self.serve
            .start(role, listen, stop)
            .map_err(|e| ClusterError::Invalid(e.to_string()))
    }

    pub fn member_id(&self, role: &str, address: &str) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{role}-{}", address.replace([':', '.', '[', ']'], "-")))
    }
}

pub async fn connect_membership(c: &CommonArgs) -> Result<EtcdMembership, ClusterError> {
    let timeout = Duration::from_secs(c.etcd_timeout_secs.max(1));
    let tls = c
        .etcd_ca
        .as_ref()
        .map(|ca| {
            ClientTls {
                ca: Some(ca.clone()),
                identity: c.etcd_cert.clone().zip(c.etcd_key.clone()),
                server_name: None,
            }
            .config()
            .map_err(|e| ClusterError::Invalid(format!("etcd TLS: {e}")))
        })
        .transpose()?;
    let m = EtcdMembership::connect_with(&c.etcd, &c.cluster, timeout, tls)
        .await
        .map_err(|e| {
            ClusterError::Etcd(format!(
                "cannot reach etcd at {} within {timeout:?}: {e}",
                c.etcd.join(",")
            ))
        })?;
    // The connection is lazy: prove etcd answers before going on.
    let mut client = m.client();
    tokio::time::timeout(timeout, client.status())
        .await
        .map_err(|_| {
            ClusterError::Etcd(format!(
                "cannot reach etcd at {}: no answer within {timeout:?}",
                c.etcd.join(",")
            ))
        })?
        .map_err(|e| {
            ClusterError::Etcd(format!("cannot reach etcd at {}: {e}", c.etcd.join(",")))
        })?;
    Ok(m)
}

/// Binds `addr`; returns the listener and the address to advertise.
pub async fn bind(
    addr: SocketAddr,
    advertise: Option<&str>,
) -> Result<(TcpListener, String), ClusterError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| ClusterError::Io(format!("binding {addr}: {e}")))?;
    let local = l
        .local_addr()
        .map_err(|e| ClusterError::Io(e.to_string()))?;
    let adv = match advertise {
        Some(a) => a.to_string(),
        None => local.to_string(),
    };
    Ok((l, adv))
}

/// Binds a worker's data plane at `data_listen` (default: the --listen host, any port); the
/// address it advertises is the advertised control host with the data port.
pub async fn bind_data(
    data_listen: Option<SocketAddr>,
    c: &CommonArgs,
) -> Result<(TcpListener, String, Guard), ClusterError> {
    let data_listen = data_listen.unwrap_or_else(|| SocketAddr::new(c.listen.ip(), 0));
    let guard = c.data_guard(data_listen)?;
    let (listener, local) = bind(data_listen, None).await?;
    let address = match c.advertise.as_deref().and_then(|a| a.rsplit_once(':')) {
        Some((host, _)) => format!("{host}:{}", local.rsplit(':').next().unwrap_or("0")),
        None => local,
    };
    Ok((listener, address, guard))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    let term = async {
        #[cfg(unix)]
        {
            if let Ok(mut s) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                s.recv().await;
            } else {
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
