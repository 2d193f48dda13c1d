//! Accepting connections: the one accept loop of every Ringbolt server (the gRPC services and
//! the data plane). An accept error — file descriptors run out in a burst of connections, say —
//! never ends it: it logs, backs off and keeps accepting, and reports the listener unhealthy
//! while errors last longer than [`UNHEALTHY_AFTER`], healthy again once a connection is
//! accepted. Every connection is bounded in time ([`ConnLimits`]): its first bytes must arrive
//! within the handshake time, and one from which nothing arrives, or to which nothing can be
//! written, for the idle time is closed. (gRPC servers ping idle clients well within that
//! time, so a live client always answers something.)

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};

/// Accept errors lasting this long make a listener unhealthy.
pub const UNHEALTHY_AFTER: Duration = Duration::from_secs(2);
/// Longest back-off between failed accepts.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Time bounds of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// The peer's first bytes must arrive within this.
    pub handshake: Duration,
    /// A connection with no bytes read, or a write blocked, this long is closed (None: never,
    /// after the handshake).
    pub idle: Option<Duration>,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            handshake: Duration::from_secs(10),
            idle: Some(Duration::from_secs(60)),
        }
    }
}

impl ConnLimits {
    /// The HTTP/2 keep-alive ping interval a gRPC server uses with these limits: a third of the
    /// idle time, so a live client's answers keep its connection open.
    pub fn keepalive(&self) -> Option<Duration> {
        self.idle.map(|d| (d / 3).max(Duration::from_millis(500)))
    }
}

/// A stream of accepted connections (never an error: accept errors are handled inside), as
/// tonic's `serve_with_incoming` takes it.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<io::Result<TimedStream>>;

/// Accepts connections on `listener` until the returned stream is dropped. The receiver says
/// whether the listener is accepting (false while accept errors have lasted over
/// [`UNHEALTHY_AFTER`]).
pub fn incoming(listener: TcpListener, limits: ConnLimits) -> (Incoming, watch::Receiver<bool>) {
    let (tx, rx) = mpsc::channel(64);
    let (health_tx, health) = watch::channel(true);
    let local = listener.local_addr().ok();
    // While unhealthy the loop dials itself now and then: a listener whose errors dropped the
    // connections that were waiting still sees an accept succeed once it can.
    let probe = local.map(|mut a| {
        if a.ip().is_unspecified() {
            a.set_ip(match a {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        a
    });
    tokio::spawn(async move {
        // The current run of accept errors: when it began, and the last error.
        let mut failing_since: Option<Instant> = None;
        let mut last_error = Instant::now();
        let mut backoff = Duration::from_millis(5);
        let mut probe_every = tokio::time::interval(Duration::from_secs(1));
        loop {
            let unhealthy = !*health_tx.borrow();
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
                _ = probe_every.tick(), if unhealthy => {
                    if let Some(p) = probe {
                        tokio::spawn(async move { drop(TcpStream::connect(p).await) });
                    }
                    continue;
                }
            };
            match accepted {
                Ok((s, peer)) => {
                    if failing_since.take().is_some() {
                        tracing::warn!(?local, "accepting connections again");
                        health_tx.send_replace(true);
                    }
                    backoff = Duration::from_millis(5);
                    let _ = s.set_nodelay(true);
                    if tx
                        .send(Ok(TimedStream::new(s, peer, limits)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    // Errors more than a second apart are separate runs, not one long failure.
                    if last_error.elapsed() > Duration::from_secs(1) && *health_tx.borrow() {
                        failing_since = None;
                    }
                    last_error = Instant::now();
                    let since = *failing_since.get_or_insert_with(|| {
                        tracing::warn!(?local, error = %e, "cannot accept a connection; backing off and retrying");
                        Instant::now()
                    });
                    if since.elapsed() >= UNHEALTHY_AFTER && *health_tx.borrow() {
                        tracing::error!(?local, error = %e, "accept has failed for {:?}: not ready until it recovers", since.elapsed());
                        health_tx.send_replace(false);
                    }
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), health)
}

/// An accepted TCP connection bounded by [`ConnLimits`].
pub struct TimedStream {
    inner: TcpStream,
    peer: SocketAddr,
    idle: Option<Duration>,
    /// When the next read must have brought bytes by (None: no bound).
    read_by: Option<Pin<Box<Sleep>>>,
    /// Set while a write is blocked: when it must have progressed by.
    write_by: Option<Pin<Box<Sleep>>>,
    /// The peer has sent its first bytes (the handshake bound no longer applies).
    greeted: bool,
}

impl TimedStream {
    fn new(inner: TcpStream, peer: SocketAddr, limits: ConnLimits) -> Self {
        TimedStream {
            inner,
            peer,
            idle: limits.idle,
            read_by: Some(Box::pin(tokio::time::sleep(limits.handshake))),
            write_by: None,
            greeted: false,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn timed_out(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connection from {}: {what}", self.peer),
        )
    }
}

impl AsyncRead for TimedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.greeted = true;
                    match self.idle {
                        Some(idle) => match self.read_by.as_mut() {
                            Some(d) => d.as_mut().reset(Instant::now() + idle),
                            None => self.read_by = Some(Box::pin(tokio::time::sleep(idle))),
                        },
                        None => self.read_by = None,
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some(d) = self.read_by.as_mut()
                    && d.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(self.timed_out("nothing arrived in time")));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl TimedStream {
    fn poll_write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match f(Pin::new(&mut self.inner), cx) {
            Poll::Pending => {
                if let Some(idle) = self.idle {
                    let d = self
                        .write_by
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    if d.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(self.timed_out("the peer stopped reading")));
                    }
                }
                Poll::Pending
            }
            ready => {
                self.write_by = None;
                // The peer reads: the connection is in use (an answer after a long computation
                // must not find the read deadline already past).
                if let (Poll::Ready(Ok(_)), Some(idle), true) = (&ready, self.idle, self.greeted)
                    && let Some(d) = self.read_by.as_mut()
                {
                    d.as_mut().reset(Instant::now() + idle);
                }
                ready
            }
        }
    }
}

impl AsyncWrite for TimedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_with(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for TimedStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn silent_and_idle_connections_are_closed_live_ones_are_not() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let limits = ConnLimits {
            handshake: Duration::from_millis(300),
            idle: Some(Duration::from_millis(600)),
        };
        let (mut inc, health) = incoming(l, limits);
        // An echo server over the bounded connections.
        tokio::spawn(async move {
            while let Some(Ok(mut s)) = inc.next().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    loop {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&b[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        let t0 = Instant::now();
        // Silent from the start: closed after the handshake time.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut b))
            .await
            .expect("a silent connection is closed");
        assert!(matches!(n, Ok(0) | Err(_)));
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        // Talking every 200 ms for 1.5 s (past the idle time) stays open; then silence closes it.
        let mut live = TcpStream::connect(addr).await.unwrap();
        for i in 0..8u8 {
            live.write_all(&[i]).await.unwrap();
            live.read_exact(&mut b[..1]).await.unwrap();
            assert_eq!(b[0], i);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), live.read(&mut b))
            .await
            .expect("an idle connection is closed");
        assert!(matches!(n, Ok(0) | Err(_)));
        assert!(*health.borrow());
    }
}
