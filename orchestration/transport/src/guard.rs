//! Who may speak on the data plane. With a per-cluster secret, every TCP connection opens with
//! a mutual challenge-response before any frame: each side sends a fresh random nonce and
//! proves it knows the secret with an HMAC-SHA256 over both nonces and its role, checked in
//! constant time. A peer that cannot prove it is closed before a single payload byte is read;
//! the secret itself never crosses the wire, and a recorded handshake cannot be replayed
//! (the other side's nonce is new each time). The frames that follow are not encrypted: the
//! data plane runs on the cluster's own fabric, and encryption's cost is measured
//! (`ringbolt bench tls`, docs/BENCHMARKS.md).

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first bytes a guarded connection sends: "RBDP" and the handshake's version.
const HELLO: [u8; 5] = *b"RBDP\x01";
const NONCE: usize = 32;
const MAC: usize = 32;
/// Shortest secret accepted.
pub const MIN_SECRET_BYTES: usize = 32;

/// The data plane's admission rule: open, or the cluster's secret.
#[derive(Clone, Default)]
pub struct Guard(Option<Arc<hmac::Key>>);

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Guard(secret)"
        } else {
            "Guard(open)"
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("data-plane secret {path}: {msg}")]
pub struct SecretError {
    pub path: String,
    pub msg: String,
}

impl Guard {
    /// Anyone may connect.
    pub fn open() -> Self {
        Guard(None)
    }

    /// Peers must prove they hold `secret`.
    pub fn secret(secret: &[u8]) -> Self {
        Guard(Some(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, secret))))
    }

    /// The secret in `path` (surrounding whitespace ignored; at least
    /// [`MIN_SECRET_BYTES`] bytes).
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let err = |msg: String| SecretError {
            path: path.display().to_string(),
            msg,
        };
        let raw = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let s = raw.trim_ascii();
        if s.len() < MIN_SECRET_BYTES {
            return Err(err(format!(
                "{} bytes; a secret needs at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)",
                s.len()
            )));
        }
        Ok(Guard::secret(s))
    }

    pub fn is_open(&self) -> bool {
        self.0.is_none()
    }

    /// The server side of a new connection: returns once the peer proved the secret (at
    /// once when open), within `within`.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        within: Duration,
    ) -> io::Result<()> {
        let Some(key) = &self.0 else { return Ok(()) };
        let r = tokio::time::timeout(within, async {
            let mut hello = [0u8; HELLO.len() + NONCE];
            s.read_exact(&mut hello).await?;
            if hello[..HELLO.len()] != HELLO {
                return Err(refused(
                    "the peer did not open with the data-plane handshake",
                ));
            }
            let theirs: [u8; NONCE] = hello[HELLO.len()..].try_into().unwrap_or([0; NONCE]);
            let mine = nonce()?;
            let mut reply = [0u8; NONCE + MAC];
            reply[..NONCE].copy_from_slice(&mine);
            reply[NONCE..].copy_from_slice(sign(key, b"server", &theirs, &mine).as_ref());
            s.write_all(&reply).await?;
            let mut proof = [0u8; MAC];
            s.read_exact(&mut proof).await?;
            hmac::verify(key, &message(b"client", &theirs, &mine), &proof)
                .map_err(|_| refused("the peer does not hold the cluster's data-plane secret"))
        })
        .await;
        let r = r.unwrap_or_else(|_| Err(refused("no handshake in time")));
        if r.is_err() {
            metrics::counter!("ringbolt_data_plane_refused_total").increment(1);
        }
        r
    }

    /// The client side of a new connection: returns once both sides proved the secret (at
    /// once when open), within `within`.
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        within: Duration,
    ) -> io::Result<()> {
        let Some(key) = &self.0 else { return Ok(()) };
        let r = tokio::time::timeout(within, async {
            let mine = nonce()?;
            let mut hello = [0u8; HELLO.len() + NONCE];
            hello[..HELLO.len()].copy_from_slice(&HELLO);
            hello[HELLO.len()..].copy_from_slice(&mine);
            s.write_all(&hello).await?;
            let mut reply = [0u8; NONCE + MAC];
            s.read_exact(&mut reply).await?;
            let theirs: [u8; NONCE] = reply[..NONCE].try_into().unwrap_or([0; NONCE]);
            hmac::verify(key, &message(b"server", &mine, &theirs), &reply[NONCE..])
                .map_err(|_| refused("the server does not hold the cluster's data-plane secret"))?;
            s.write_all(sign(key, b"client", &mine, &theirs).as_ref())
                .await
        })
        .await;
        r.unwrap_or_else(|_| Err(refused("no handshake in time")))
    }
}

fn refused(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg.to_string())
}

fn nonce() -> io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| io::Error::other("no system randomness"))?;
    Ok(n)
}

/// What a side signs: its role, the client's nonce, the server's nonce.
fn message(role: &[u8], client: &[u8; NONCE], server: &[u8; NONCE]) -> Vec<u8> {
    [role, client.as_slice(), server.as_slice()].concat()
}

fn sign(key: &hmac::Key, role: &[u8], client: &[u8; NONCE], server: &[u8; NONCE]) -> hmac::Tag {
    hmac::sign(key, &message(role, client, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(server: Guard, client: Guard) -> (io::Result<()>, io::Result<()>) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let t = Duration::from_secs(2);
        let (s, c) = tokio::join!(server.accept(&mut a, t), async {
            let r = client.connect(&mut b, t).await;
            drop(b);
            r
        });
        (s, c)
    }

    #[tokio::test]
    async fn only_holders_of_the_secret_pass() {
        let k = [7u8; 32];
        let (s, c) = pair(Guard::secret(&k), Guard::secret(&k)).await;
        assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
        // Another secret: each side refuses the other.
        let (s, c) = pair(Guard::secret(&k), Guard::secret(&[8u8; 32])).await;
        assert!(s.is_err() && c.is_err());
        // No handshake at all (an open client): the server refuses.
        let (s, _) = pair(Guard::secret(&k), Guard::open()).await;
        assert!(s.is_err());
        let (s, c) = pair(Guard::open(), Guard::open()).await;
        assert!(s.is_ok() && c.is_ok());
    }

    #[test]
    fn short_or_missing_secrets_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let p = d.join("short");
        std::fs::write(&p, "too short\n").unwrap();
        let e = Guard::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("short") && e.contains("at least 32"), "{e}");
        assert!(Guard::from_file(&d.join("none")).is_err());
        std::fs::write(&p, format!("{}\n", "a".repeat(64))).unwrap();
        assert!(!Guard::from_file(&p).unwrap().is_open());
    }
}
