//! The data plane (design.md §5): tensors move between the ranks of a group that is fixed for
//! one plan epoch. Point-to-point `send`/`recv` are matched by (sender, tag); `all_to_all_v`
//! and `all_gather` are built on them. A message stamped with another epoch is refused, so a
//! worker that missed a plan change cannot corrupt a step of the new one.
//!
//! Implementations: [`local::LocalGroup`] (in-process channels: standalone and tests) and
//! [`tcp::TcpTransport`] (length-prefixed frames over tokio TCP: CPU clusters). NCCL joins them
//! behind the `cuda` feature with the CUDA backend.
//!
//! [`exchange`] is the request/response form of the same TCP data plane: an attention worker
//! sends a layer's routed rows to the expert workers that hold those experts.

pub mod exchange;
pub mod guard;
pub mod listen;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("rank {rank} is outside the group of {size}")]
    BadRank { rank: usize, size: usize },
    #[error("message from rank {from} carries plan epoch {got}, this group is epoch {want}")]
    StaleEpoch { from: usize, got: u64, want: u64 },
    #[error("no message from rank {from} with tag {tag} within {timeout:?}")]
    Timeout {
        from: usize,
        tag: u64,
        timeout: Duration,
    },
    #[error("peer {peer}: {msg}")]
    Peer { peer: usize, msg: String },
    #[error("all-to-all-v needs one part per rank ({size}), got {got}")]
    Parts { size: usize, got: usize },
    #[error("the transport is closed")]
    Closed,
}

pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// Reads exactly `len` bytes, growing the buffer as they arrive (from at most 1 MiB up front), so
/// a header that promises gigabytes costs memory only as the bytes come.
pub(crate) async fn read_payload<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    len: u64,
) -> std::io::Result<Bytes> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(len.min(1 << 20) as usize);
    let got = r.take(len).read_to_end(&mut buf).await?;
    if (got as u64) < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the peer closed the connection after {got} of {len} bytes"),
        ));
    }
    Ok(Bytes::from(buf))
}

/// An emulated network link, so that transfer/compute ratios of NVLink or InfiniBand can be
/// studied on one machine: every message a rank sends to a peer first occupies that link for
/// `latency + bytes / bandwidth` (messages to one peer queue behind each other). Set from the
/// environment: `RINGBOLT_LINK_GBPS` (GB/s, decimal) and `RINGBOLT_LINK_LATENCY_US`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Link {
    /// Bytes per second (None: unlimited).
    pub bytes_per_second: Option<f64>,
    pub latency: Duration,
}

impl Link {
    /// The link the environment asks for (no emulation when neither variable is set).
    pub fn from_env() -> Link {
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Link {
            bytes_per_second: num("RINGBOLT_LINK_GBPS")
                .filter(|g| *g > 0.0)
                .map(|g| g * 1e9),
            latency: Duration::from_secs_f64(
                num("RINGBOLT_LINK_LATENCY_US").unwrap_or(0.0).max(0.0) / 1e6,
            ),
        }
    }

    /// How long `bytes` occupy the link.
    pub fn time(&self, bytes: usize) -> Duration {
        self.latency
            + self
                .bytes_per_second
                .map(|b| Duration::from_secs_f64(bytes as f64 / b))
                .unwrap_or_default()
    }

    pub fn is_emulated(&self) -> bool {
        self.bytes_per_second.is_some() || !self.latency.is_zero()
    }
}

/// How long a frame's payload of `len` bytes may take to arrive once its header has: ten
/// seconds, plus a second per MiB (a peer slower than that is stuck or hostile).
pub(crate) fn frame_time(len: u64) -> Duration {
    Duration::from_secs(10) + Duration::from_secs(len >> 20)
}

/// One rank's view of a group.
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    fn epoch(&self) -> u64;

    /// Sends `data` to rank `to`, tagged `tag`.
    fn send(&self, to: usize, tag: u64, data: Bytes) -> impl Future<Output = Result<()>> + Send;
    /// The next message from rank `from` with tag `tag` (in send order).
    fn recv(&self, from: usize, tag: u64) -> impl Future<Output = Result<Bytes>> + Send;

    /// Sends `parts[r]` to each rank r and returns what each rank sent here (own part included).
    fn all_to_all_v(
        &self,
        tag: u64,
        parts: Vec<Bytes>,
    ) -> impl Future<Output = Result<Vec<Bytes>>> + Send
    where
        Self: Sized,
    {
        async move {
            let n = self.size();
            if parts.len() != n {
                return Err(TransportError::Parts {
                    size: n,
                    got: parts.len(),
                });
            }
            let me = self.rank();
            let mut own = Bytes::new();
            for (r, p) in parts.into_iter().enumerate() {
                if r == me {
                    own = p;
                } else {
                    self.send(r, tag, p).await?;
                }
            }
            let mut out = Vec::with_capacity(n);
            for r in 0..n {
                out.push(if r == me {
                    own.clone()
                } else {
                    self.recv(r, tag).await?
                });
            }
            Ok(out)
        }
    }

    /// Every rank's `data`, in rank order.
    fn all_gather(&self, tag: u64, data: Bytes) -> impl Future<Output = Result<Vec<Bytes>>> + Send
    where
        Self: Sized,
    {
        async move {
            let parts = vec![data; self.size()];
            self.all_to_all_v(tag, parts).await
        }
    }
}

/// Messages that arrived and wait for their `recv`, keyed by (sender, tag).
pub(crate) struct Mailbox {
    epoch: u64,
    timeout: Duration,
    pending: Mutex<HashMap<(usize, u64), VecDeque<Bytes>>>,
    errors: Mutex<Vec<TransportError>>,
    arrived: Notify,
}

impl Mailbox {
    pub(crate) fn new(epoch: u64, timeout: Duration) -> Self {
        Mailbox {
            epoch,
            timeout,
            pending: Mutex::new(HashMap::new()),
            errors: Mutex::new(Vec::new()),
            arrived: Notify::new(),
        }
    }

    /// Files an arriving message; one from another epoch is refused (and reported to the
    /// receiver that waits for that sender).
    pub(crate) fn deliver(&self, from: usize, epoch: u64, tag: u64, data: Bytes) {
        if epoch != self.epoch {
            tracing::warn!(
                from,
                epoch,
                want = self.epoch,
                "refusing a message of another plan epoch"
            );
            self.errors.lock().unwrap_or_else(|p| p.into_inner()).push(
                TransportError::StaleEpoch {
                    from,
                    got: epoch,
                    want: self.epoch,
                },
            );
        } else {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((from, tag))
                .or_default()
                .push_back(data);
        }
        self.arrived.notify_waiters();
    }

    pub(crate) fn fail(&self, err: TransportError) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(err);
        self.arrived.notify_waiters();
    }

    pub(crate) async fn take(&self, from: usize, tag: u64) -> Result<Bytes> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(d) = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&(from, tag))
                .and_then(|q| q.pop_front())
            {
                return Ok(d);
            }
            {
                let mut errs = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                let hit = errs.iter().position(|e| match e {
                    TransportError::StaleEpoch { from: f, .. }
                    | TransportError::Peer { peer: f, .. } => *f == from,
                    TransportError::Closed => true,
                    _ => false,
                });
                if let Some(i) = hit {
                    return Err(errs.remove(i));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(TransportError::Timeout {
                    from,
                    tag,
                    timeout: self.timeout,
                });
            }
        }
    }
}

#[cfg(test)]
mod payload_tests {
    #[tokio::test]
    async fn a_header_promising_a_terabyte_costs_only_what_arrives() {
        // Allocating what the header says up front would abort the process here.
        let mut r: &[u8] = b"ten bytes!";
        let e = super::read_payload(&mut r, 1 << 40).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("after 10 of"), "{e}");
        let mut r: &[u8] = b"exactly this, and more";
        assert_eq!(
            &super::read_payload(&mut r, 7).await.unwrap()[..],
            b"exactly"
        );
    }
}
