//! Accepted connections as a server sees them: bounded in time
//! ([`ringbolt_transport::listen`]), and with TLS configured, past the TLS handshake. A peer
//! that does not complete the handshake within the handshake time — a plain-text client, or a
//! client without a certificate the CA signed — is closed before any request is read.

use crate::tls::ServerTls;
use ringbolt_transport::listen::{self, ConnLimits, TimedStream};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;

/// Handshakes in progress at once on one listener; more wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// One accepted connection: plain, or TLS over it.
pub enum Conn {
    Plain(TimedStream),
    Tls(Box<tokio_rustls::server::TlsStream<TimedStream>>),
}

impl Conn {
    fn tcp(&self) -> &TimedStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, b))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}

/// A stream of accepted connections, as tonic's `serve_with_incoming` takes it.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<io::Result<Conn>>;

/// Accepts connections on `listener` (see [`listen::incoming`]); with `tls`, each is handed on
/// once its TLS handshake completes, within the handshake time. The receiver says whether the
/// listener is accepting.
pub fn incoming(
    listener: TcpListener,
    limits: ConnLimits,
    tls: Option<Arc<ServerTls>>,
) -> (Incoming, watch::Receiver<bool>) {
    let (mut tcp, accepting) = listen::incoming(listener, limits);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        loop {
            // The server stopped (it dropped the stream): stop accepting, freeing the port.
            let s = tokio::select! {
                _ = tx.closed() => return,
                s = tcp.next() => match s {
                    Some(Ok(s)) => s,
                    _ => return,
                },
            };
            let Some(tls) = &tls else {
                if tx.send(Ok(Conn::Plain(s))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let peer = s.peer();
                match tokio::time::timeout(limits.handshake, acceptor.accept(s)).await {
                    Ok(Ok(t)) => {
                        let _ = tx.send(Ok(Conn::Tls(Box::new(t)))).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!("ringbolt_tls_handshake_failures_total").increment(1);
                        tracing::debug!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        metrics::counter!("ringbolt_tls_handshake_failures_total").increment(1);
                        tracing::debug!(%peer, "no TLS handshake within {:?}", limits.handshake);
                    }
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), accepting)
}
