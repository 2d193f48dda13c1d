//! TLS from PEM files: a server's certificate and key (and, for mutual TLS, the CA its clients'
//! certificates must be signed by), re-read when the files change so a renewed certificate is
//! served without a restart; and the client side a process dials its peers with.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are looked at for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Config(String),
}

fn file_err(path: &Path, msg: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_err(path, e))
}

/// The certificates of a PEM file (at least one).
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| file_err(path, format!("holds no PEM private key: {e}")))
}

fn roots(path: &Path, pem: &[u8]) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for c in certificates(path, pem)? {
        store
            .add(c)
            .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

// ring, as tonic's `tls-ring` (aws-lc would need cmake and nasm to build); rustls 0.23.48
// deprecates it for lacking post-quantum key exchange, which the roles do not need between
// themselves.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The files of a TLS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Given: clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// A digest of the files' contents (what a reload compares).
    fn digest(&self) -> Result<u64, TlsError> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for p in self.paths() {
            h.update(&read(p)?);
        }
        Ok(h.digest())
    }

    /// The server configuration the files make, with `alpn` protocols offered.
    fn load(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let chain = certificates(&self.cert, &cert_pem)?;
        let key = private_key(&self.key, &key_pem)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots(ca, &read(ca)?)?,
                    provider(),
                )
                .build()
                .map_err(|e| file_err(ca, format!("cannot verify clients with it: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_single_cert(chain, key).map_err(|e| {
            TlsError::Config(format!(
                "{} and {} do not make a certificate and its key: {e}",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// A TLS server configuration that follows its files: checked every [`RELOAD_EVERY`], the
/// new certificate served from the next connection on. A change that does not load (a key
/// written before its certificate, say) keeps the last good one and logs why.
pub struct ServerTls {
    files: ServerFiles,
    alpn: Vec<&'static [u8]>,
    current: RwLock<(u64, Arc<rustls::ServerConfig>)>,
}

impl ServerTls {
    /// Loads `files` (an error names the file that is wrong), offering `alpn` (`h2` for gRPC).
    pub fn load(files: ServerFiles, alpn: &[&'static [u8]]) -> Result<Arc<Self>, TlsError> {
        let digest = files.digest()?;
        let cfg = files.load(alpn)?;
        Ok(Arc::new(ServerTls {
            files,
            alpn: alpn.to_vec(),
            current: RwLock::new((digest, cfg)),
        }))
    }

    /// The same files offering other ALPN protocols (`http/1.1` for an HTTP API beside gRPC).
    pub fn with_alpn(&self, alpn: &[&'static [u8]]) -> Result<Arc<Self>, TlsError> {
        ServerTls::load(self.files.clone(), alpn)
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration new connections are accepted with.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Reads the files again; true when a changed set was loaded.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let digest = self.files.digest()?;
        if digest == self.current.read().unwrap_or_else(|p| p.into_inner()).0 {
            return Ok(false);
        }
        let cfg = self.files.load(&self.alpn)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (digest, cfg);
        Ok(true)
    }

    /// Reloads every [`RELOAD_EVERY`] until `stop`.
    pub fn follow(self: &Arc<Self>, stop: CancellationToken) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RELOAD_EVERY) => {}
                }
                let Some(tls) = me.upgrade() else { return };
                match tls.reload() {
                    Ok(true) => {
                        failing = false;
                        tracing::info!(cert = %tls.files.cert.display(), "TLS certificate reloaded");
                    }
                    Ok(false) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %e, "TLS files changed but do not load; serving the previous certificate");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

/// How this process proves itself to, and checks, the TLS servers it dials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA servers must be signed by (None: the system's roots).
    pub ca: Option<PathBuf>,
    /// This process's certificate and key, for servers that require one (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name servers' certificates must carry (None: the dialed host). Roles dial each
    /// other at pod IPs, so one cluster-internal name in every role's certificate lets one
    /// certificate serve them all.
    pub server_name: Option<String>,
}

impl ClientTls {
    /// The files read now (a dial picks up renewed files).
    pub fn config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let mut c = tonic::transport::ClientTlsConfig::new();
        c = match &self.ca {
            Some(ca) => {
                let pem = read(ca)?;
                certificates(ca, &pem)?;
                c.ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => c.with_native_roots(),
        };
        if let Some(n) = &self.server_name {
            c = c.domain_name(n.clone());
        }
        if let Some((cert, key)) = &self.identity {
            let (cp, kp) = (read(cert)?, read(key)?);
            certificates(cert, &cp)?;
            private_key(key, &kp)?;
            c = c.identity(tonic::transport::Identity::from_pem(cp, kp));
        }
        Ok(c)
    }

    /// A rustls client configuration for a raw TLS stream (`ringbolt bench tls`), read now.
    pub fn rustls(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let Some(ca) = &self.ca else {
            return Err(TlsError::Config(
                "a raw TLS stream needs a CA file (--tls-ca)".into(),
            ));
        };
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca, &read(ca)?)?);
        let cfg = match &self.identity {
            Some((cert, key)) => {
                let chain = certificates(cert, &read(cert)?)?;
                let k = private_key(key, &read(key)?)?;
                b.with_client_auth_cert(chain, k)
                    .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?
            }
            None => b.with_no_client_auth(),
        };
        Ok(Arc::new(cfg))
    }
}
