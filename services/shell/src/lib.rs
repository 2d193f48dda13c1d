//! The service shell: the one place every Ringbolt role serves gRPC and dials its peers. A
//! server built here bounds its connections in time, speaks TLS when given a certificate
//! (mutual TLS with a client CA; the files re-read when they change), serves gRPC health,
//! exports metrics and starts a span per request; a dial made here uses TLS, a bearer token
//! and carries the caller's trace. Each of these concerns is changed here, once.

pub mod conn;
pub mod health;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

pub use conn::Conn;
pub use health::Health;
pub use telemetry::TelemetryArgs;
pub use tls::{ClientTls, ServerFiles, ServerTls, TlsError};

use clap::Args;
use ringbolt_transport::listen::ConnLimits;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Listen(String),
    #[error("{0}")]
    Endpoint(String),
    #[error("cannot connect to {address}: {msg}")]
    Connect { address: String, msg: String },
}

/// Time bounds of the connections a server accepts (gRPC and data plane).
#[derive(Args, Clone, Debug)]
pub struct ConnArgs {
    /// A connection's first bytes (and its TLS handshake) must arrive within this many seconds.
    #[arg(long, env = "RINGBOLT_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,
    /// A connection from which nothing arrives (or to which nothing can be written) for this
    /// many seconds is closed; gRPC clients are pinged at a third of it.
    #[arg(long, env = "RINGBOLT_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
}

impl Default for ConnArgs {
    /// The flags' defaults.
    fn default() -> Self {
        let d = ConnLimits::default();
        ConnArgs {
            handshake_timeout_secs: d.handshake.as_secs(),
            idle_timeout_secs: d.idle.map_or(60, |i| i.as_secs()),
        }
    }
}

impl ConnArgs {
    pub fn limits(&self) -> ConnLimits {
        ConnLimits {
            handshake: Duration::from_secs(self.handshake_timeout_secs.max(1)),
            idle: Some(Duration::from_secs(self.idle_timeout_secs.max(1))),
        }
    }
}

/// TLS on a role's listener.
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM certificate (chain) served on the gRPC listener: TLS on. Re-read when it changes.
    #[arg(long, env = "RINGBOLT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "RINGBOLT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: clients must present a certificate it signed (mutual TLS).
    #[arg(long, env = "RINGBOLT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub fn server_files(&self) -> Option<ServerFiles> {
        Some(ServerFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

/// Everything about how a role serves: connection bounds, TLS, telemetry.
#[derive(Args, Clone, Debug, Default)]
pub struct ServeArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl ServeArgs {
    /// Starts the shell of `role` listening on `listen`: telemetry on, TLS loaded (an error
    /// names the file), and a loud warning if `listen` is reachable from other machines in
    /// plain text. `stop` ends the certificate reloads.
    pub fn start(
        &self,
        role: &'static str,
        listen: SocketAddr,
        stop: CancellationToken,
    ) -> Result<Shell, ShellError> {
        self.telemetry.start(role)?;
        let tls = self
            .tls
            .server_files()
            .map(|f| ServerTls::load(f, &[b"h2"]))
            .transpose()?;
        if let Some(t) = &tls {
            t.follow(stop);
        }
        warn_if_open(role, listen, tls.is_some());
        Ok(Shell {
            limits: self.conn.limits(),
            tls,
        })
    }
}

/// The secure default: a port other machines can reach at `addr` without `protected` (TLS,
/// a secret, tokens) is said loudly, on stderr and in the log; `warning` says what is open
/// and which flag closes it.
pub fn warn_if_exposed(addr: SocketAddr, protected: bool, warning: impl FnOnce() -> String) {
    if !protected && !addr.ip().is_loopback() {
        let msg = warning();
        eprintln!("WARNING: {msg}");
        tracing::warn!(%addr, "{msg}");
    }
}

/// [`warn_if_exposed`] for a gRPC listener without TLS.
pub fn warn_if_open(role: &str, listen: SocketAddr, tls: bool) {
    warn_if_exposed(listen, tls, || {
        format!(
            "{role} serves gRPC on {listen} in PLAIN TEXT to the network: anyone who can \
             reach it can read and send its traffic. Give --tls-cert and --tls-key (and \
             --tls-client-ca between roles), or listen on 127.0.0.1."
        )
    });
}

/// How a role serves gRPC: built by [`ServeArgs::start`].
#[derive(Clone)]
pub struct Shell {
    limits: ConnLimits,
    tls: Option<Arc<ServerTls>>,
}

impl Shell {
    /// A shell without TLS (tests, the demo and benchmarks on 127.0.0.1).
    pub fn plain(limits: ConnLimits) -> Self {
        Shell { limits, tls: None }
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    pub fn tls(&self) -> Option<&Arc<ServerTls>> {
        self.tls.as_ref()
    }

    /// The shell an HTTP/1.1 server beside this one uses: the same connection bounds and
    /// certificate files (followed until `stop`), offering `http/1.1`.
    pub fn http(&self, stop: CancellationToken) -> Result<Shell, ShellError> {
        let tls = self
            .tls
            .as_ref()
            .map(|t| t.with_alpn(&[b"http/1.1"]))
            .transpose()?;
        if let Some(t) = &tls {
            t.follow(stop);
        }
        Ok(Shell {
            limits: self.limits,
            tls,
        })
    }

    /// The connections accepted on `listener` under this shell's bounds, handshaken when it
    /// has TLS.
    pub fn incoming(&self, listener: TcpListener) -> conn::Incoming {
        conn::incoming(listener, self.limits, self.tls.clone()).0
    }

    /// A gRPC server builder: it pings idle clients (their answers count as traffic) and
    /// drops those that do not answer, and opens a span per request.
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(self.limits.keepalive())
            .http2_keepalive_timeout(self.limits.keepalive())
            .trace_fn(|req| {
                let span = tracing::info_span!("grpc", path = %req.uri().path());
                telemetry::set_parent_from_headers(&span, req.headers());
                span
            })
    }

    /// [`Shell::serve`] on a task of its own, until `stop`.
    pub fn spawn(
        self,
        router: tonic::transport::server::Router,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
        tokio::spawn(async move { self.serve(router, listener, stop.cancelled()).await })
    }

    /// Serves `router` (made from [`Shell::server`]) on `listener` until `shutdown`.
    pub async fn serve(
        &self,
        router: tonic::transport::server::Router,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let (incoming, _accepting) = conn::incoming(listener, self.limits, self.tls.clone());
        router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

/// How this process dials gRPC servers: TLS (and its client certificate) and the token its
/// requests carry.
#[derive(Clone, Debug, Default)]
pub struct Dial {
    /// Given: addresses without a scheme are dialed over TLS.
    pub tls: Option<ClientTls>,
    token: Option<MetadataValue<Ascii>>,
}

impl Dial {
    pub fn new(tls: Option<ClientTls>) -> Self {
        Dial { tls, token: None }
    }

    /// Requests carry `Authorization: Bearer token`.
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, ShellError> {
        self.token = token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ShellError::Endpoint("a token must be printable ASCII".into()))
            })
            .transpose()?;
        Ok(self)
    }

    /// The endpoint of `address`: `https://host:port` (TLS), `http://host:port` (plain
    /// text), or `host:port` (TLS when this process dials with TLS).
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, ShellError> {
        let a = address.trim();
        let bad = |why: String| ShellError::Endpoint(format!("endpoint `{a}` {why}"));
        let (tls, rest) = match a.split_once("://") {
            None => (self.tls.is_some(), a),
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            Some((scheme, _)) => {
                return Err(bad(format!(
                    "has the scheme `{scheme}`; use https://HOST:PORT, http://HOST:PORT or \
                     HOST:PORT"
                )));
            }
        };
        let uri = format!("{}://{rest}", if tls { "https" } else { "http" });
        let mut ep = Channel::from_shared(uri)
            .map_err(|e| bad(format!("is not an address of the form HOST:PORT ({e})")))?;
        match ep.uri().host() {
            Some(h) if !h.is_empty() => {}
            _ => return Err(bad("has no host; use HOST:PORT".into())),
        }
        if tls {
            let cfg = self.tls.clone().unwrap_or_default().config()?;
            ep = ep
                .tls_config(cfg)
                .map_err(|e| bad(format!("cannot use TLS: {e}")))?;
        }
        Ok(ep)
    }

    /// Connects to `address` within `timeout`, keeping the connection alive with pings.
    pub async fn connect(&self, address: &str, timeout: Duration) -> Result<Peer, ShellError> {
        let ch = self
            .endpoint(address)?
            .connect_timeout(timeout)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| {
                let mut msg = error_chain(&e);
                if msg.contains("InvalidContentType") {
                    let bare = address.trim().trim_start_matches("https://");
                    msg.push_str(&format!(
                        " (the server does not speak TLS: dial http://{bare})"
                    ));
                }
                ShellError::Connect {
                    address: address.to_string(),
                    msg,
                }
            })?;
        Ok(self.wrap(ch))
    }

    /// `channel` with this process's requests' metadata added.
    pub fn wrap(&self, channel: Channel) -> Peer {
        InterceptedService::new(channel, Outgoing(self.token.clone()))
    }
}

/// An error and its causes on one line (tonic's transport errors hide the cause: a TLS
/// refusal reads only "transport error").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

/// Adds this process's metadata (its token) to each request.
#[derive(Clone, Debug)]
pub struct Outgoing(Option<MetadataValue<Ascii>>);

impl Interceptor for Outgoing {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        // The caller's trace goes on with the callee.
        if let Some(tp) = telemetry::traceparent(&tracing::Span::current())
            && let Ok(v) = tp.parse()
        {
            r.metadata_mut().insert("traceparent", v);
        }
        Ok(r)
    }
}

/// A connection to a peer whose requests carry this process's metadata.
pub type Peer = InterceptedService<Channel, Outgoing>;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    async fn healthy(dial: &Dial, addr: &str) -> Result<(), String> {
        let ch = dial
            .connect(addr, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }

    fn client(ca: &std::path::Path, id: Option<(&std::path::Path, &std::path::Path)>) -> Dial {
        Dial::new(Some(ClientTls {
            ca: Some(ca.to_path_buf()),
            identity: id.map(|(c, k)| (c.to_path_buf(), k.to_path_buf())),
            server_name: None,
        }))
    }

    #[tokio::test]
    async fn mutual_tls_refuses_plain_and_uncertified_clients_and_follows_renewed_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = crate::testing::write_certs(dir.path());
        let (cert, key) = (
            dir.path().join("served.pem"),
            dir.path().join("served-key.pem"),
        );
        std::fs::copy(&f.cert, &cert).unwrap();
        std::fs::copy(&f.key, &key).unwrap();
        let args = ServeArgs {
            tls: TlsArgs {
                tls_cert: Some(cert.clone()),
                tls_key: Some(key.clone()),
                tls_client_ca: Some(f.ca.clone()),
            },
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shell = args
            .start("test", listener.local_addr().unwrap(), stop.clone())
            .unwrap();
        let tls = shell.tls().unwrap().clone();
        assert!(tls.mutual());
        let health = Health::start(&["test"]).await;
        health.set(true).await;
        let router = shell.server().add_service(health.service());
        let served = shell.spawn(router, listener, stop.clone());

        let me = Some((f.cert.as_path(), f.key.as_path()));
        healthy(&client(&f.ca, me), &addr).await.unwrap();
        // The same address with `https://` is the same dial.
        healthy(&client(&f.ca, me), &format!("https://{addr}"))
            .await
            .unwrap();
        // The name checked can be one the certificate carries rather than the address.
        let named = |n: &str| {
            let mut d = client(&f.ca, me);
            if let Some(t) = d.tls.as_mut() {
                t.server_name = Some(n.to_string());
            }
            d
        };
        healthy(&named("localhost"), &addr).await.unwrap();
        assert!(healthy(&named("ringbolt.internal"), &addr).await.is_err());
        // Plain text, no client certificate, a certificate of another CA, or trusting
        // another CA: refused.
        let plain = Dial::default();
        assert!(healthy(&plain, &addr).await.is_err());
        assert!(healthy(&plain, &format!("http://{addr}")).await.is_err());
        assert!(healthy(&client(&f.ca, None), &addr).await.is_err());
        let theirs = Some((f.other_cert.as_path(), f.other_key.as_path()));
        assert!(healthy(&client(&f.ca, theirs), &addr).await.is_err());
        assert!(healthy(&client(&f.other_ca, me), &addr).await.is_err());

        // Renewed files (now signed by the other CA) are served from the next connection on;
        // a half-written renewal (a key without its certificate) keeps the last good pair.
        std::fs::copy(&f.other_key, &key).unwrap();
        assert!(tls.reload().is_err());
        healthy(&client(&f.ca, me), &addr).await.unwrap();
        std::fs::copy(&f.other_cert, &cert).unwrap();
        assert!(tls.reload().unwrap());
        assert!(!tls.reload().unwrap());
        healthy(&client(&f.other_ca, me), &addr).await.unwrap();
        assert!(healthy(&client(&f.ca, me), &addr).await.is_err());
        // A stopped server lets its port go.
        stop.cancel();
        served.await.unwrap().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while TcpListener::bind(&addr).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{addr} is still taken"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = crate::testing::write_certs(dir.path());
        let files = |cert: &std::path::Path, key: &std::path::Path| ServerFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
        };
        let missing = dir.path().join("missing.pem");
        let e = ServerTls::load(files(&missing, &f.key), &[b"h2"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        // A key where the certificate should be.
        let e = ServerTls::load(files(&f.key, &f.key), &[b"h2"])
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("key.pem") && e.to_string().contains("no PEM certificate"),
            "{e}"
        );
        // A certificate with another's key.
        let e = ServerTls::load(files(&f.cert, &f.other_key), &[b"h2"])
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("do not make a certificate and its key"),
            "{e}"
        );
    }

    #[test]
    fn endpoints_pick_tls_by_scheme_or_by_the_dial() {
        let plain = Dial::default();
        assert_eq!(
            plain.endpoint("h:1").unwrap().uri().scheme_str(),
            Some("http")
        );
        assert_eq!(
            plain.endpoint("http://h:1").unwrap().uri().scheme_str(),
            Some("http")
        );
        let e = plain.endpoint("ftp://h:1").unwrap_err().to_string();
        assert!(e.contains("`ftp`"), "{e}");
        let e = plain.endpoint("http://:1").unwrap_err().to_string();
        assert!(e.contains("endpoint `http://:1`"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = crate::testing::write_certs(dir.path());
        let tls = client(&f.ca, None);
        assert_eq!(
            tls.endpoint("h:1").unwrap().uri().scheme_str(),
            Some("https")
        );
        // An explicit http:// stays plain even for a TLS dialer.
        assert_eq!(
            tls.endpoint("http://h:1").unwrap().uri().scheme_str(),
            Some("http")
        );
        let broken = client(&dir.path().join("nope.pem"), None);
        let e = broken.endpoint("h:1").unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
    }
}
