//! TCP transport: one connection per (sender, receiver) pair, opened on first send; frames are
//! a 28-byte header (sender rank u32, epoch u64, tag u64, length u64, little-endian) followed by
//! the payload, written straight from the caller's buffer.
//!
//! A group either owns its listener ([`TcpTransport::start`]: the plan epoch's group) or shares
//! a [`TcpHub`]'s with other groups: a worker in many short-lived groups at once (one per
//! context-parallel job) listens once, and each frame goes to the group its epoch field names.

use crate::guard::Guard;
use crate::listen::{ConnLimits, TimedStream};
use crate::{Link, Mailbox, Result, Transport, TransportError};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_stream::StreamExt;

const HEADER: usize = 28;
/// What a connection's first bytes say (after the data-plane handshake, if any): the frame
/// layout's name and version. A peer of another release is refused, not misread.
const PREAMBLE: [u8; 8] = *b"RBTG\x01\x00\x00\x00";
/// Largest frame accepted: a bound on what a corrupt or hostile peer can make us allocate.
pub const MAX_FRAME: u64 = 1 << 32;

pub struct TcpTransport {
    rank: usize,
    epoch: u64,
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    mailbox: Arc<Mailbox>,
    conns: Vec<Mutex<Option<TcpStream>>>,
    guard: Guard,
    /// Its own listener's accept task, or its place in a hub.
    incoming: Incoming,
    link: Link,
}

enum Incoming {
    Own(tokio::task::JoinHandle<()>),
    Hub(Arc<Router>),
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        match &self.incoming {
            Incoming::Own(accept) => accept.abort(),
            Incoming::Hub(router) => router.leave(self.epoch),
        }
    }
}

/// Where a connection's frames go: one group's mailbox, or the hub's group of each frame.
#[derive(Clone)]
enum Route {
    One(Arc<Mailbox>),
    Hub(Arc<Router>),
}

impl Route {
    fn mailbox(&self, group: u64) -> Option<Arc<Mailbox>> {
        match self {
            Route::One(m) => Some(m.clone()),
            Route::Hub(r) => r.arrived(group),
        }
    }
}

/// A hub's groups by id. Frames may arrive for a group before this process joins it (a peer
/// started sooner): they wait in an unclaimed mailbox, and one left unclaimed for the timeout
/// is dropped — as are frames beyond [`MAX_UNCLAIMED`] such groups.
struct Router {
    timeout: Duration,
    groups: std::sync::Mutex<std::collections::HashMap<u64, Group>>,
}

struct Group {
    mailbox: Arc<Mailbox>,
    /// When it was created by an arriving frame; None once a transport joined it.
    unclaimed_since: Option<std::time::Instant>,
}

/// Groups a hub holds frames for before anyone here joins them.
pub const MAX_UNCLAIMED: usize = 256;

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Group>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arrived(&self, group: u64) -> Option<Arc<Mailbox>> {
        let mut groups = self.lock();
        if let Some(g) = groups.get(&group) {
            return Some(g.mailbox.clone());
        }
        let timeout = self.timeout;
        groups.retain(|_, g| g.unclaimed_since.is_none_or(|t| t.elapsed() < timeout));
        if groups
            .values()
            .filter(|g| g.unclaimed_since.is_some())
            .count()
            >= MAX_UNCLAIMED
        {
            tracing::warn!(group, "dropping frames for a group nobody here joined");
            return None;
        }
        let mailbox = Arc::new(Mailbox::new(group, self.timeout));
        groups.insert(
            group,
            Group {
                mailbox: mailbox.clone(),
                unclaimed_since: Some(std::time::Instant::now()),
            },
        );
        Some(mailbox)
    }

    fn join(&self, group: u64, timeout: Duration) -> Result<Arc<Mailbox>> {
        let mut groups = self.lock();
        match groups.get_mut(&group) {
            Some(g) if g.unclaimed_since.is_none() => Err(TransportError::Peer {
                peer: 0,
                msg: format!("group {group} is already joined here"),
            }),
            Some(g) => {
                g.unclaimed_since = None;
                Ok(g.mailbox.clone())
            }
            None => {
                let mailbox = Arc::new(Mailbox::new(group, timeout));
                groups.insert(
                    group,
                    Group {
                        mailbox: mailbox.clone(),
                        unclaimed_since: None,
                    },
                );
                Ok(mailbox)
            }
        }
    }

    fn leave(&self, group: u64) {
        self.lock().remove(&group);
    }
}

/// One listener shared by many groups (see the module's docs).
pub struct TcpHub {
    router: Arc<Router>,
    address: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    guard: Guard,
}

impl Drop for TcpHub {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TcpHub {
    /// Accepts on `listener` the peers `guard` admits; `timeout` bounds handshakes, and how
    /// long frames for a group nobody here joined are kept. Groups joined here dial their
    /// peers through `guard` too.
    pub fn start(listener: TcpListener, timeout: Duration, guard: Guard) -> Result<Self> {
        let address = listener.local_addr().map_err(|e| TransportError::Peer {
            peer: 0,
            msg: format!("the hub's listener: {e}"),
        })?;
        let router = Arc::new(Router {
            timeout,
            groups: Default::default(),
        });
        let accept = accept_frames(listener, timeout, Route::Hub(router.clone()), guard.clone());
        Ok(TcpHub {
            router,
            address,
            accept,
            guard,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Rank `rank` of group `group`, whose ranks' hub addresses are `addrs`; its frames carry
    /// `group` in the epoch field. Sends go over `link`.
    pub fn join(
        &self,
        group: u64,
        rank: usize,
        addrs: Vec<SocketAddr>,
        timeout: Duration,
        link: Link,
    ) -> Result<TcpTransport> {
        check_rank(rank, &addrs)?;
        let mailbox = self.router.join(group, timeout)?;
        let incoming = Incoming::Hub(self.router.clone());
        Ok(TcpTransport {
            rank,
            epoch: group,
            conns: addrs.iter().map(|_| Mutex::new(None)).collect(),
            addrs,
            timeout,
            mailbox,
            incoming,
            link,
            guard: self.guard.clone(),
        })
    }
}

/// Whether `rank` is one of the group of `addrs`.
fn check_rank(rank: usize, addrs: &[SocketAddr]) -> Result<()> {
    if rank >= addrs.len() {
        return Err(TransportError::BadRank {
            rank,
            size: addrs.len(),
        });
    }
    Ok(())
}

/// Accepts connections on `listener` and reads their frames into `route`.
fn accept_frames(
    listener: TcpListener,
    timeout: Duration,
    route: Route,
    guard: Guard,
) -> tokio::task::JoinHandle<()> {
    // Peers keep their connections for the whole epoch, idle between steps: only the
    // handshake is bounded (and each frame, by its size).
    let limits = ConnLimits {
        handshake: timeout,
        idle: None,
    };
    let (mut conns, _accepting) = crate::listen::incoming(listener, limits);
    tokio::spawn(async move {
        while let Some(Ok(mut s)) = conns.next().await {
            let (route, guard) = (route.clone(), guard.clone());
            tokio::spawn(async move {
                match guard.accept(&mut s, timeout).await {
                    Ok(()) => read_frames(s, route).await,
                    Err(e) => {
                        tracing::warn!(peer = %s.peer(), error = %e, "data-plane peer refused")
                    }
                }
            });
        }
    })
}

async fn read_frames(mut s: TimedStream, route: Route) {
    let mut p = [0u8; PREAMBLE.len()];
    if s.read_exact(&mut p).await.is_err() {
        return;
    }
    if p != PREAMBLE {
        tracing::warn!(
            peer = %s.peer(),
            "not a Ringbolt group connection of this version (are the workers of one release?); closing"
        );
        return;
    }
    let mut h = [0u8; HEADER];
    loop {
        if s.read_exact(&mut h).await.is_err() {
            return; // the peer closed the connection
        }
        let from = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let epoch = u64::from_le_bytes(h[4..12].try_into().unwrap_or_default());
        let tag = u64::from_le_bytes(h[12..20].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(h[20..28].try_into().unwrap_or_default());
        let Some(mailbox) = route.mailbox(epoch) else {
            return;
        };
        if len > MAX_FRAME {
            mailbox.fail(TransportError::Peer {
                peer: from,
                msg: format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
            });
            return;
        }
        let within = crate::frame_time(len);
        let payload = tokio::time::timeout(within, crate::read_payload(&mut s, len)).await;
        let buf = match payload {
            Ok(Ok(b)) => b,
            Err(_) => {
                mailbox.fail(TransportError::Peer {
                    peer: from,
                    msg: format!("a frame of {len} bytes did not arrive within {within:?}"),
                });
                return;
            }
            Ok(Err(e)) => {
                mailbox.fail(TransportError::Peer {
                    peer: from,
                    msg: format!("connection lost mid-frame: {e}"),
                });
                return;
            }
        };
        metrics::counter!("ringbolt_data_plane_bytes_total", "plane" => "group", "direction" => "received")
            .increment(len);
        mailbox.deliver(from, epoch, tag, buf);
    }
}

impl TcpTransport {
    /// Starts rank `rank` of the group whose data-plane addresses are `addrs` (its own is
    /// where `listener` listens). Waits for nobody: peers are connected on first send.
    pub fn start(
        rank: usize,
        epoch: u64,
        listener: TcpListener,
        addrs: Vec<SocketAddr>,
        timeout: Duration,
    ) -> Result<Self> {
        Self::start_with_link(rank, epoch, listener, addrs, timeout, Link::from_env())
    }

    /// [`start`](Self::start) with every send to a peer going over an emulated `link`.
    pub fn start_with_link(
        rank: usize,
        epoch: u64,
        listener: TcpListener,
        addrs: Vec<SocketAddr>,
        timeout: Duration,
        link: Link,
    ) -> Result<Self> {
        check_rank(rank, &addrs)?;
        let mailbox = Arc::new(Mailbox::new(epoch, timeout));
        let accept = accept_frames(
            listener,
            timeout,
            Route::One(mailbox.clone()),
            Guard::open(),
        );
        Ok(TcpTransport {
            rank,
            epoch,
            conns: addrs.iter().map(|_| Mutex::new(None)).collect(),
            addrs,
            timeout,
            mailbox,
            incoming: Incoming::Own(accept),
            link,
            guard: Guard::open(),
        })
    }

    /// A whole group of `size` ranks in this process on 127.0.0.1 (tests and measurements),
    /// every send over `link`; with the ranks' data-plane addresses.
    pub async fn loopback_group(
        size: usize,
        epoch: u64,
        timeout: Duration,
        link: Link,
    ) -> Result<(Vec<Self>, Vec<SocketAddr>)> {
        let io = |e: std::io::Error| TransportError::Peer {
            peer: 0,
            msg: format!("binding 127.0.0.1: {e}"),
        };
        let mut ls = Vec::new();
        for _ in 0..size {
            ls.push(TcpListener::bind("127.0.0.1:0").await.map_err(io)?);
        }
        let addrs = ls
            .iter()
            .map(|l| l.local_addr())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(io)?;
        let group = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| Self::start_with_link(r, epoch, l, addrs.clone(), timeout, link))
            .collect::<Result<Vec<_>>>()?;
        Ok((group, addrs))
    }

    async fn connect(&self, to: usize) -> Result<TcpStream> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            match tokio::time::timeout_at(deadline, TcpStream::connect(self.addrs[to])).await {
                Ok(Ok(mut s)) => {
                    let _ = s.set_nodelay(true);
                    let hello = async {
                        self.guard.connect(&mut s, self.timeout).await?;
                        s.write_all(&PREAMBLE).await
                    };
                    hello.await.map_err(|e| TransportError::Peer {
                        peer: to,
                        msg: format!("{}: {e}", self.addrs[to]),
                    })?;
                    return Ok(s);
                }
                Ok(Err(e)) if tokio::time::Instant::now() + backoff >= deadline => {
                    return Err(TransportError::Peer {
                        peer: to,
                        msg: format!("cannot connect to {}: {e}", self.addrs[to]),
                    });
                }
                Ok(Err(_)) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(_) => {
                    return Err(TransportError::Peer {
                        peer: to,
                        msg: format!(
                            "no connection to {} within {:?}",
                            self.addrs[to], self.timeout
                        ),
                    });
                }
            }
        }
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.addrs.len()
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    async fn send(&self, to: usize, tag: u64, data: Bytes) -> Result<()> {
        check_rank(to, &self.addrs)?;
        if to == self.rank {
            self.mailbox.deliver(self.rank, self.epoch, tag, data);
            return Ok(());
        }
        let mut conn = self.conns[to].lock().await;
        if conn.is_none() {
            *conn = Some(self.connect(to).await?);
        }
        if self.link.is_emulated() {
            // The message occupies the emulated link (held under the peer's lock: messages to
            // one peer queue behind each other).
            tokio::time::sleep(self.link.time(data.len() + HEADER)).await;
        }
        let mut h = [0u8; HEADER];
        h[0..4].copy_from_slice(&(self.rank as u32).to_le_bytes());
        h[4..12].copy_from_slice(&self.epoch.to_le_bytes());
        h[12..20].copy_from_slice(&tag.to_le_bytes());
        h[20..28].copy_from_slice(&(data.len() as u64).to_le_bytes());
        let s = conn.as_mut().ok_or(TransportError::Closed)?;
        let write = async {
            s.write_all(&h).await?;
            s.write_all(&data).await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(())) => {
                metrics::counter!("ringbolt_data_plane_bytes_total", "plane" => "group", "direction" => "sent")
                    .increment(data.len() as u64);
                Ok(())
            }
            Ok(Err(e)) => {
                *conn = None;
                Err(TransportError::Peer {
                    peer: to,
                    msg: format!("send failed: {e}"),
                })
            }
            Err(_) => {
                *conn = None;
                Err(TransportError::Peer {
                    peer: to,
                    msg: format!("send did not finish within {:?}", self.timeout),
                })
            }
        }
    }

    async fn recv(&self, from: usize, tag: u64) -> Result<Bytes> {
        check_rank(from, &self.addrs)?;
        self.mailbox.take(from, tag).await
    }
}
