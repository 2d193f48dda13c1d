//! Bearer tokens for the public API: a file of tokens, one a line (blank lines and `#`
//! comments ignored), read again when it changes. A request's `authorization: Bearer T`
//! metadata is compared in constant time against every token; a missing or wrong one is
//! UNAUTHENTICATED. The caller a request is admitted as (for per-token limits) is its token's
//! hash, so a reload that keeps a token keeps its jobs counted.

use crate::error::JobError;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// How often the token file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// Who a request came as: its token's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Caller(pub u64);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {path}: {msg}")]
    File { path: PathBuf, msg: String },
}

struct State {
    tokens: Vec<Vec<u8>>,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// The tokens of a token file.
pub struct Tokens {
    path: PathBuf,
    state: Mutex<State>,
}

fn read(path: &Path) -> Result<(Vec<Vec<u8>>, Option<SystemTime>), TokenError> {
    let err = |msg: String| TokenError::File {
        path: path.to_path_buf(),
        msg,
    };
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let tokens: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    if tokens.is_empty() {
        return Err(err("no tokens (one a line)".into()));
    }
    if let Some(t) = tokens.iter().find(|t| t.len() < 16) {
        return Err(err(format!(
            "a token of {} characters; tokens must have at least 16",
            t.len()
        )));
    }
    Ok((tokens, modified))
}

impl Tokens {
    /// Reads `path`; an unreadable or empty file, or a token shorter than 16 characters, is
    /// an error.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let (tokens, modified) = read(path)?;
        Ok(Tokens {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                tokens,
                modified,
                checked: Instant::now(),
            }),
        })
    }

    /// Re-reads the file when its modification time changed (at most once a second). A file
    /// that became unreadable or empty keeps the tokens read last, and says so in the log.
    fn refresh(&self, st: &mut State) {
        if st.checked.elapsed() < RECHECK {
            return;
        }
        st.checked = Instant::now();
        let now = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if now == st.modified {
            return;
        }
        match read(&self.path) {
            Ok((tokens, modified)) => {
                tracing::info!(path = %self.path.display(), tokens = tokens.len(), "token file reloaded");
                st.tokens = tokens;
                st.modified = modified;
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the tokens read before");
                st.modified = now;
            }
        }
    }

    /// The caller `presented` is, if it is one of the tokens.
    pub fn verify(&self, presented: &[u8]) -> Option<Caller> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(&mut st);
        // Every token is compared, whichever matches: the time taken does not say which.
        let mut found = None;
        for t in &st.tokens {
            if bool::from(t.as_slice().ct_eq(presented)) {
                found = Some(Caller(xxhash_rust::xxh3::xxh3_64(t)));
            }
        }
        found
    }
}

/// The interceptor of the public services: with tokens, every request must carry one (its
/// [`Caller`] goes into the request's extensions); without, every request passes.
#[derive(Clone, Default)]
pub struct Authenticate(pub Option<Arc<Tokens>>);

impl Authenticate {
    /// The caller presenting `authorization` (an HTTP or gRPC `Authorization` header's value):
    /// None when this server has no tokens; UNAUTHENTICATED when it has and the header is
    /// missing or carries none of them.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<Option<Caller>, JobError> {
        let Some(tokens) = &self.0 else {
            return Ok(None);
        };
        let header = authorization.ok_or_else(|| {
            JobError::Unauthenticated("this server needs a token (--token)".into())
        })?;
        let presented = header.strip_prefix(b"Bearer ").ok_or_else(|| {
            JobError::Unauthenticated("authorization is not `Bearer TOKEN`".into())
        })?;
        match tokens.verify(presented) {
            Some(c) => Ok(Some(c)),
            None => {
                metrics::counter!("ringbolt_admission_rejected_total", "reason" => "token")
                    .increment(1);
                Err(JobError::Unauthenticated(
                    "the token is not valid here".into(),
                ))
            }
        }
    }
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        if let Some(c) = self.check(header)? {
            req.extensions_mut().insert(c);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_token(t: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
        r
    }

    #[test]
    fn tokens_are_checked_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(
            &f,
            "# ops\nfirst-token-0123456789\n\nsecond-token-0123456789\n",
        )
        .unwrap();
        let mut auth = Authenticate(Some(Arc::new(Tokens::load(&f).unwrap())));
        let a = auth.call(with_token("first-token-0123456789")).unwrap();
        let b = auth.call(with_token("second-token-0123456789")).unwrap();
        let (ca, cb) = (
            *a.extensions().get::<Caller>().unwrap(),
            *b.extensions().get::<Caller>().unwrap(),
        );
        assert_ne!(ca, cb);
        for bad in [
            auth.call(Request::new(())),
            auth.call(with_token("first-token-012345678")),
            auth.call(with_token("first-token-0123456789x")),
        ] {
            assert_eq!(bad.unwrap_err().code(), tonic::Code::Unauthenticated);
        }
        // Rewritten: the new token works, the removed one no longer does, the kept one is the
        // same caller.
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        std::fs::write(&f, "first-token-0123456789\nthird-token-0123456789\n").unwrap();
        let file = std::fs::File::options().append(true).open(&f).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        let c = auth.call(with_token("first-token-0123456789")).unwrap();
        assert_eq!(*c.extensions().get::<Caller>().unwrap(), ca);
        assert!(auth.call(with_token("third-token-0123456789")).is_ok());
        assert!(auth.call(with_token("second-token-0123456789")).is_err());
        // Without tokens everything passes.
        assert!(Authenticate(None).call(Request::new(())).is_ok());
        // Bad files are refused at start.
        std::fs::write(&f, "\n# nothing\n").unwrap();
        assert!(Tokens::load(&f).is_err());
        std::fs::write(&f, "short\n").unwrap();
        assert!(Tokens::load(&f).is_err());
    }
}
