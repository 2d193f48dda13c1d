//! Request/response exchange over the TCP data plane: how an attention worker hands a layer's
//! routed rows to an expert worker and gets the experts' outputs back. Every message carries
//! the sender's plan epoch; a server refuses one from an epoch older than its own (the sender
//! then learns the new plan and re-sends), so a worker that missed a plan change never gets an
//! answer computed under another placement.
//!
//! Frames: a 32-byte header (magic u32, kind u32, epoch u64, request id u64, length u64,
//! little-endian) and the payload, written straight from the caller's buffer. Connections are
//! pooled per peer; one request at a time per connection, so concurrency is by connections.

use crate::guard::Guard;
use crate::listen::ConnLimits;
use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// Changes with the payloads' layout (RBX2: expert requests say their value type), so peers
/// of two versions refuse each other's frames instead of misreading them.
const MAGIC: u32 = u32::from_le_bytes(*b"RBX2");
const HEADER: usize = 32;
/// Largest payload accepted: a bound on what a corrupt or hostile peer can make us allocate.
pub const MAX_PAYLOAD: u64 = 1 << 32;

const REQUEST: u32 = 0;
const OK: u32 = 1;
const STALE: u32 = 2;
const FAILED: u32 = 3;
/// A request whose payload starts with the caller's trace: one byte of length, then a W3C
/// `traceparent`.
const TRACED_REQUEST: u32 = 4;

/// Why a server did not answer a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request's epoch is older than the server's (`current`).
    StaleEpoch { current: u64 },
    /// The request could not be served (message says why).
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("peer {peer}: {msg}")]
    Peer { peer: SocketAddr, msg: String },
    #[error("peer {peer} refused plan epoch {sent}: it is at epoch {current}")]
    StaleEpoch {
        peer: SocketAddr,
        sent: u64,
        current: u64,
    },
    #[error("peer {peer} could not serve the request: {msg}")]
    Remote { peer: SocketAddr, msg: String },
    #[error("peer {peer}: no answer within {timeout:?}")]
    Timeout { peer: SocketAddr, timeout: Duration },
}

impl ExchangeError {
    /// The peer is unreachable or broke the connection (it may have died).
    pub fn is_peer_lost(&self) -> bool {
        matches!(
            self,
            ExchangeError::Peer { .. } | ExchangeError::Timeout { .. }
        )
    }
}

fn header(kind: u32, epoch: u64, id: u64, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h[24..32].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

struct Frame {
    kind: u32,
    epoch: u64,
    id: u64,
    payload: Bytes,
}

async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Frame> {
    let mut h = [0u8; HEADER];
    s.read_exact(&mut h).await?;
    let word = |a: usize| u64::from_le_bytes(h[a..a + 8].try_into().unwrap_or_default());
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not a Ringbolt exchange frame of this version (magic {magic:#x}, want {MAGIC:#x}: \
                 are the workers of one release?)"
            ),
        ));
    }
    let len = word(24);
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"),
        ));
    }
    // Once a header is in, its payload must follow at a bounded pace.
    let within = crate::frame_time(len);
    let payload = tokio::time::timeout(within, crate::read_payload(s, len))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("a frame of {len} bytes did not arrive within {within:?}"),
            )
        })??;
    metrics::counter!("ringbolt_data_plane_bytes_total", "plane" => "experts", "direction" => "received")
        .increment(len);
    Ok(Frame {
        kind: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
        epoch: word(8),
        id: word(16),
        payload,
    })
}

/// Writes a frame whose payload is `prefix` then `data` (the caller's buffer, not copied).
async fn write_frame<S: AsyncWrite + Unpin>(
    s: &mut S,
    kind: u32,
    epoch: u64,
    id: u64,
    prefix: &[u8],
    data: &[u8],
) -> std::io::Result<()> {
    s.write_all(&header(kind, epoch, id, prefix.len() + data.len()))
        .await?;
    s.write_all(prefix).await?;
    s.write_all(data).await?;
    metrics::counter!("ringbolt_data_plane_bytes_total", "plane" => "experts", "direction" => "sent")
        .increment(data.len() as u64);
    Ok(())
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, Refusal>> + Send>>;
/// Serves one request: (the sender's epoch, the payload, the sender's W3C `traceparent` if
/// it sent one) → the answer or a refusal.
pub type Handler = Arc<dyn Fn(u64, Bytes, Option<String>) -> HandlerFuture + Send + Sync>;

/// Splits a traced request's payload into its trace and its body.
fn untrace(p: Bytes) -> Option<(String, Bytes)> {
    let n = *p.first()? as usize;
    if p.len() < 1 + n {
        return None;
    }
    let trace = std::str::from_utf8(&p[1..1 + n]).ok()?.to_string();
    Some((trace, p.slice(1 + n..)))
}

/// A running data-plane server.
pub struct Served {
    task: tokio::task::JoinHandle<()>,
    healthy: watch::Receiver<bool>,
}

impl Served {
    /// Stops accepting (connections already open finish their request).
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Whether the server is accepting connections (see [`crate::listen::incoming`]); it
    /// reads false for good if the server stopped.
    pub fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }
}

/// Answers requests on `listener` with the default connection limits.
pub fn serve(listener: TcpListener, handler: Handler) -> Served {
    serve_with(listener, handler, ConnLimits::default(), Guard::open())
}

/// Answers requests on `listener` until aborted. Accept errors never stop it (they are backed
/// off and reported through [`Served::healthy`]); each connection is bounded by `limits`, and
/// each frame's payload by its size. A connection `guard` does not admit is closed before
/// its first frame is read.
pub fn serve_with(
    listener: TcpListener,
    handler: Handler,
    limits: ConnLimits,
    guard: Guard,
) -> Served {
    let (mut conns, accepting) = crate::listen::incoming(listener, limits);
    let link = crate::Link::from_env();
    let (health_tx, healthy) = watch::channel(true);
    let task = tokio::spawn(async move {
        let mut accepting = accepting;
        loop {
            let next = tokio::select! {
                c = conns.next() => c,
                r = accepting.changed() => {
                    if r.is_err() { break; }
                    health_tx.send_replace(*accepting.borrow());
                    continue;
                }
            };
            let Some(Ok(mut s)) = next else { break };
            let (handler, guard) = (handler.clone(), guard.clone());
            tokio::spawn(async move {
                let peer = s.peer();
                if let Err(e) = guard.accept(&mut s, limits.handshake).await {
                    tracing::warn!(%peer, error = %e, "data-plane peer refused");
                    return;
                }
                loop {
                    let f = match read_frame(&mut s).await {
                        Ok(f) => f,
                        Err(e) => {
                            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                                tracing::warn!(%peer, error = %e, "dropping a data-plane connection");
                            }
                            return;
                        }
                    };
                    let (payload, trace) = match f.kind {
                        REQUEST => (f.payload, None),
                        TRACED_REQUEST => match untrace(f.payload) {
                            Some((t, p)) => (p, Some(t)),
                            None => {
                                tracing::warn!(%peer, "malformed traced request; closing");
                                return;
                            }
                        },
                        k => {
                            tracing::warn!(%peer, kind = k, "unexpected frame kind; closing");
                            return;
                        }
                    };
                    let (kind, epoch, body) = match handler(f.epoch, payload, trace).await {
                        Ok(b) => (OK, f.epoch, b),
                        Err(Refusal::StaleEpoch { current }) => (STALE, current, Bytes::new()),
                        Err(Refusal::Failed(msg)) => (FAILED, f.epoch, Bytes::from(msg)),
                    };
                    if link.is_emulated() {
                        tokio::time::sleep(link.time(body.len() + HEADER)).await;
                    }
                    if write_frame(&mut s, kind, epoch, f.id, &[], &body)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        health_tx.send_replace(false);
    });
    Served { task, healthy }
}

/// Sends requests to servers, reusing idle connections.
pub struct ExchangeClient {
    timeout: Duration,
    link: crate::Link,
    idle: Mutex<HashMap<SocketAddr, Vec<TcpStream>>>,
    next_id: AtomicU64,
    guard: Guard,
}

impl ExchangeClient {
    /// Every request (connect, send, answer) is bounded by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        ExchangeClient {
            timeout,
            link: crate::Link::from_env(),
            idle: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            guard: Guard::open(),
        }
    }

    /// New connections prove themselves through `guard`.
    pub fn with_guard(mut self, guard: Guard) -> Self {
        self.guard = guard;
        self
    }

    fn take_idle(&self, peer: SocketAddr) -> Option<TcpStream> {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&peer)
            .and_then(|v| v.pop())
    }

    fn put_idle(&self, peer: SocketAddr, s: TcpStream) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_default()
            .push(s);
    }

    /// Forgets pooled connections to `peer` (after it left the plan).
    pub fn forget(&self, peer: SocketAddr) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
    }

    /// Sends `data` stamped with `epoch` to `peer` and waits for its answer.
    pub async fn call(
        &self,
        peer: SocketAddr,
        epoch: u64,
        data: &[u8],
    ) -> Result<Bytes, ExchangeError> {
        self.call_traced(peer, epoch, data, None).await
    }

    /// [`call`](Self::call) carrying the caller's W3C `traceparent` (at most 255 bytes; a
    /// longer one is not sent), so the server's work joins the caller's trace.
    pub async fn call_traced(
        &self,
        peer: SocketAddr,
        epoch: u64,
        data: &[u8],
        trace: Option<&str>,
    ) -> Result<Bytes, ExchangeError> {
        let mut prefix = Vec::new();
        let kind = match trace.filter(|t| t.len() <= u8::MAX as usize) {
            Some(t) => {
                prefix.push(t.len() as u8);
                prefix.extend_from_slice(t.as_bytes());
                TRACED_REQUEST
            }
            None => REQUEST,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lost = |msg: String| ExchangeError::Peer { peer, msg };
        if self.link.is_emulated() {
            tokio::time::sleep(self.link.time(data.len() + HEADER)).await;
        }
        let attempt = async {
            // A pooled connection may have been closed by the peer since: one retry on a
            // fresh connection when a reused one fails before any answer.
            let mut reused = self.take_idle(peer);
            loop {
                let fresh = reused.is_none();
                let mut s = match reused.take() {
                    Some(s) => s,
                    None => {
                        let mut s = TcpStream::connect(peer)
                            .await
                            .map_err(|e| lost(format!("cannot connect: {e}")))?;
                        let _ = s.set_nodelay(true);
                        self.guard
                            .connect(&mut s, self.timeout)
                            .await
                            .map_err(|e| lost(format!("data-plane handshake: {e}")))?;
                        s
                    }
                };
                let sent = write_frame(&mut s, kind, epoch, id, &prefix, data).await;
                let answer = match sent {
                    Ok(()) => read_frame(&mut s).await,
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(f) => return Ok((s, f)),
                    Err(e) if fresh => return Err(lost(format!("connection lost: {e}"))),
                    Err(_) => continue,
                }
            }
        };
        let (s, f) = tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| ExchangeError::Timeout {
                peer,
                timeout: self.timeout,
            })??;
        if f.id != id {
            return Err(lost(format!("answer to request {} for request {id}", f.id)));
        }
        self.put_idle(peer, s);
        match f.kind {
            OK => Ok(f.payload),
            STALE => Err(ExchangeError::StaleEpoch {
                peer,
                sent: epoch,
                current: f.epoch,
            }),
            FAILED => Err(ExchangeError::Remote {
                peer,
                msg: String::from_utf8_lossy(&f.payload).into_owned(),
            }),
            k => Err(lost(format!("unknown answer kind {k}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    async fn server(epoch: Arc<AtomicU64>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let handler: Handler = Arc::new(move |e, data: Bytes, trace: Option<String>| {
            let current = epoch.load(Ordering::SeqCst);
            Box::pin(async move {
                if e < current {
                    return Err(Refusal::StaleEpoch { current });
                }
                if data.is_empty() {
                    return Err(Refusal::Failed("empty request".into()));
                }
                if let Some(t) = trace {
                    // Echoes the trace it was sent, to show it arrived apart from the body.
                    return Ok(Bytes::from(format!(
                        "{t}|{}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut v = data.to_vec();
                v.reverse();
                Ok(Bytes::from(v))
            })
        });
        serve(l, handler);
        addr
    }

    #[tokio::test]
    async fn answers_refuses_stale_epochs_and_reports_failures() {
        let epoch = Arc::new(AtomicU64::new(2));
        let addr = server(epoch.clone()).await;
        let c = ExchangeClient::new(Duration::from_secs(5));
        let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let mut want = big.clone();
        want.reverse();
        for _ in 0..3 {
            assert_eq!(c.call(addr, 2, &big).await.unwrap(), want);
        }
        match c.call(addr, 1, b"x").await {
            Err(ExchangeError::StaleEpoch {
                sent: 1,
                current: 2,
                ..
            }) => {}
            other => panic!("want a stale-epoch refusal, got {other:?}"),
        }
        let err = c.call(addr, 3, b"").await.unwrap_err();
        assert!(err.to_string().contains("empty request"), "{err}");
        // A traced request reaches the handler with its trace apart from its body.
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let got = c.call_traced(addr, 2, b"body", Some(tp)).await.unwrap();
        assert_eq!(&got[..], format!("{tp}|body").as_bytes());
        assert!(!err.is_peer_lost());
        // Concurrent calls use several connections.
        let futs = (0..8u8).map(|i| {
            let c = &c;
            async move { c.call(addr, 2, &[i, 0]).await.unwrap() }
        });
        let out = futures::future::join_all(futs).await;
        for (i, o) in out.iter().enumerate() {
            assert_eq!(&o[..], &[0, i as u8]);
        }
    }

    #[tokio::test]
    async fn a_dead_peer_is_reported_as_lost() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let c = ExchangeClient::new(Duration::from_secs(2));
        let err = c.call(addr, 1, b"x").await.unwrap_err();
        assert!(err.is_peer_lost(), "{err}");
        // A server that accepts and then dies mid-request.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            drop(s);
        });
        let err = c.call(addr, 1, b"x").await.unwrap_err();
        assert!(err.is_peer_lost(), "{err}");
    }

    #[tokio::test]
    async fn a_stalled_frame_or_a_silent_peer_loses_its_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let handler: Handler = Arc::new(|_, data: Bytes, _| Box::pin(async move { Ok(data) }));
        let limits = ConnLimits {
            handshake: Duration::from_millis(500),
            idle: Some(Duration::from_secs(30)),
        };
        let served = serve_with(l, handler, limits, Guard::open());
        let closed = |mut s: TcpStream, within: Duration| async move {
            let mut b = [0u8; 64];
            match tokio::time::timeout(within, s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                other => panic!("connection still open: {other:?}"),
            }
        };
        // Connects and says nothing: closed after the handshake time.
        closed(
            TcpStream::connect(addr).await.unwrap(),
            Duration::from_secs(5),
        )
        .await;
        // A header promising 2 MiB, then ten bytes and silence: closed once the frame's time
        // (10 s + 2 s) is up, although the idle time (30 s) is not.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&header(REQUEST, 1, 1, 2 << 20)).await.unwrap();
        s.write_all(&[0u8; 10]).await.unwrap();
        let t0 = std::time::Instant::now();
        closed(s, Duration::from_secs(20)).await;
        assert!(
            t0.elapsed() >= Duration::from_secs(11),
            "{:?}",
            t0.elapsed()
        );
        // Still serving.
        let c = ExchangeClient::new(Duration::from_secs(5));
        assert_eq!(&c.call(addr, 1, b"ok").await.unwrap()[..], b"ok");
        assert!(*served.healthy().borrow());
    }
}
