//! NCCL transport (feature `cuda`): the same [`Transport`] over a NCCL communicator, one per
//! plan epoch, built from a unique id that one rank creates and the coordinator hands out.
//!
//! A NCCL communicator is neither `Send` nor `Sync`, so one OS thread owns it (with its CUDA
//! context and stream) and serves commands from the async side over a channel. Messages carry a
//! 16-byte header (tag, length) sent before the payload, so a receiver sizes its buffer and
//! matches tags; messages for another tag wait in a stash for their `recv`. `all_to_all_v` is
//! one NCCL group: sizes first, then every payload, so no rank waits on another's order.
//!
//! NCCL runs a communicator's operations in the order they are posted, and this transport's
//! one thread posts a `send` and waits for it: two ranks that `send` to each other at the same
//! time wait forever. `all_to_all_v` (one group) and one-way patterns (each rank receives, then
//! sends on) are safe; anything else must be grouped.
//!
//! Never run with two ranks here (no two-GPU machine); `services/cluster/src/group.rs` builds
//! one per plan epoch from the coordinator's id.

use crate::{Result, Transport, TransportError};
use bytes::Bytes;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

type Reply<T> = oneshot::Sender<Result<T>>;

enum Cmd {
    Send {
        to: usize,
        tag: u64,
        data: Bytes,
        reply: Reply<()>,
    },
    Recv {
        from: usize,
        reply: Reply<(u64, Bytes)>,
    },
    AllToAll {
        parts: Vec<Bytes>,
        reply: Reply<Vec<Bytes>>,
    },
}

pub struct NcclTransport {
    rank: usize,
    size: usize,
    epoch: u64,
    timeout: Duration,
    cmds: std::sync::mpsc::Sender<Cmd>,
    stash: Mutex<HashMap<(usize, u64), VecDeque<Bytes>>>,
}

/// Whether libnccl can be loaded here (it needs no GPU).
pub fn available() -> bool {
    // SAFETY: only tries to load the library (dlopen); calls nothing in it.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// A fresh NCCL unique id (rank 0 of a new epoch creates it; the coordinator hands it out).
pub fn unique_id() -> Result<[std::ffi::c_char; 128]> {
    // SAFETY: only tries to load the library (dlopen); calls nothing in it.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(TransportError::Peer {
            peer: 0,
            msg: "libnccl.so not found (pip's nvidia-nccl-cu13 ships libnccl.so.2: add a \
                  libnccl.so symlink on LD_LIBRARY_PATH)"
                .into(),
        });
    }
    Id::new()
        .map(|id| *id.internal())
        .map_err(|e| nccl_err(0, e))
}

fn nccl_err(peer: usize, e: impl std::fmt::Debug) -> TransportError {
    TransportError::Peer {
        peer,
        msg: format!("NCCL: {e:?}"),
    }
}

fn cuda_err(peer: usize, e: impl std::fmt::Debug) -> TransportError {
    TransportError::Peer {
        peer,
        msg: format!("CUDA: {e:?}"),
    }
}

struct Owner {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl Owner {
    fn upload(&self, peer: usize, b: &[u8]) -> Result<CudaSlice<u8>> {
        if b.is_empty() {
            return self
                .stream
                .alloc_zeros::<u8>(1)
                .map_err(|e| cuda_err(peer, e));
        }
        self.stream.clone_htod(b).map_err(|e| cuda_err(peer, e))
    }

    fn send(&self, to: usize, tag: u64, data: &[u8]) -> Result<()> {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&tag.to_le_bytes());
        h[8..].copy_from_slice(&(data.len() as u64).to_le_bytes());
        let hd = self.upload(to, &h)?;
        self.comm
            .send(&hd, to as i32)
            .map_err(|e| nccl_err(to, e))?;
        if !data.is_empty() {
            let d = self.upload(to, data)?;
            self.comm.send(&d, to as i32).map_err(|e| nccl_err(to, e))?;
            self.stream.synchronize().map_err(|e| cuda_err(to, e))?;
        } else {
            self.stream.synchronize().map_err(|e| cuda_err(to, e))?;
        }
        Ok(())
    }

    fn recv(&self, from: usize) -> Result<(u64, Bytes)> {
        let mut hd = self
            .stream
            .alloc_zeros::<u8>(16)
            .map_err(|e| cuda_err(from, e))?;
        self.comm
            .recv(&mut hd, from as i32)
            .map_err(|e| nccl_err(from, e))?;
        let h = self.stream.clone_dtoh(&hd).map_err(|e| cuda_err(from, e))?;
        let tag = u64::from_le_bytes(h[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default()) as usize;
        if len == 0 {
            return Ok((tag, Bytes::new()));
        }
        let mut d = self
            .stream
            .alloc_zeros::<u8>(len)
            .map_err(|e| cuda_err(from, e))?;
        self.comm
            .recv(&mut d, from as i32)
            .map_err(|e| nccl_err(from, e))?;
        let v = self.stream.clone_dtoh(&d).map_err(|e| cuda_err(from, e))?;
        Ok((tag, Bytes::from(v)))
    }

    fn all_to_all(&self, parts: Vec<Bytes>) -> Result<Vec<Bytes>> {
        let n = parts.len();
        let me = self.comm.rank();
        // Sizes first (one u64 per peer), in one group.
        let sizes: Vec<CudaSlice<u64>> = parts
            .iter()
            .map(|p| self.stream.clone_htod(&[p.len() as u64]))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| cuda_err(me, e))?;
        let mut theirs: Vec<CudaSlice<u64>> = (0..n)
            .map(|_| self.stream.alloc_zeros::<u64>(1))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| cuda_err(me, e))?;
        {
            let mut g = self.comm.group();
            for (r, (s, t)) in sizes.iter().zip(theirs.iter_mut()).enumerate() {
                if r == me {
                    continue;
                }
                g.send(s.as_view(), r as i32).map_err(|e| nccl_err(r, e))?;
                g.recv(t.as_view_mut(), r as i32)
                    .map_err(|e| nccl_err(r, e))?;
            }
        }
        let lens: Vec<usize> = theirs
            .iter()
            .map(|t| self.stream.clone_dtoh(t).map(|v| v[0] as usize))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| cuda_err(me, e))?;
        let sends: Vec<CudaSlice<u8>> = parts
            .iter()
            .enumerate()
            .map(|(r, p)| self.upload(r, p))
            .collect::<Result<_>>()?;
        let mut recvs: Vec<CudaSlice<u8>> = lens
            .iter()
            .map(|&l| self.stream.alloc_zeros::<u8>(l.max(1)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| cuda_err(me, e))?;
        {
            let mut g = self.comm.group();
            for (r, (s, t)) in sends.iter().zip(recvs.iter_mut()).enumerate() {
                if r == me {
                    continue;
                }
                if !parts[r].is_empty() {
                    g.send(s.as_view(), r as i32).map_err(|e| nccl_err(r, e))?;
                }
                if lens[r] > 0 {
                    g.recv(t.as_view_mut(), r as i32)
                        .map_err(|e| nccl_err(r, e))?;
                }
            }
        }
        self.stream.synchronize().map_err(|e| cuda_err(me, e))?;
        let mut out = Vec::with_capacity(n);
        for (r, t) in recvs.iter().enumerate() {
            if r == me {
                out.push(parts[r].clone());
            } else if lens[r] == 0 {
                out.push(Bytes::new());
            } else {
                let mut v = self.stream.clone_dtoh(t).map_err(|e| cuda_err(r, e))?;
                v.truncate(lens[r]);
                out.push(Bytes::from(v));
            }
        }
        Ok(out)
    }
}

impl NcclTransport {
    /// Joins the communicator of plan `epoch` as `rank` of `size` on GPU `ordinal`, with the
    /// unique id rank 0 created ([`unique_id`]). Every call waits at most `timeout` for its
    /// answer (a stuck peer leaves this rank's communicator to be rebuilt in the next epoch).
    pub fn start(
        ordinal: usize,
        rank: usize,
        size: usize,
        epoch: u64,
        id: [std::ffi::c_char; 128],
        timeout: Duration,
    ) -> Result<Self> {
        if rank >= size {
            return Err(TransportError::BadRank { rank, size });
        }
        // SAFETY: only tries to load the library (dlopen); calls nothing in it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(cuda_err(rank, "no CUDA driver on this machine"));
        }
        // SAFETY: only tries to load the library (dlopen); calls nothing in it.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(nccl_err(
                rank,
                "libnccl.so cannot be loaded (put it on LD_LIBRARY_PATH)",
            ));
        }
        let (tx, rx) = std::sync::mpsc::channel::<Cmd>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("nccl-{ordinal}-e{epoch}"))
            .spawn(move || {
                let owner = (|| -> Result<Owner> {
                    let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err(rank, e))?;
                    let stream = ctx.new_stream().map_err(|e| cuda_err(rank, e))?;
                    let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(id))
                        .map_err(|e| nccl_err(rank, e))?;
                    Ok(Owner { comm, stream })
                })();
                let owner = match owner {
                    Ok(o) => {
                        let _ = ready_tx.send(Ok(()));
                        o
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Cmd::Send {
                            to,
                            tag,
                            data,
                            reply,
                        } => {
                            let _ = reply.send(owner.send(to, tag, &data));
                        }
                        Cmd::Recv { from, reply } => {
                            let _ = reply.send(owner.recv(from));
                        }
                        Cmd::AllToAll { parts, reply } => {
                            let _ = reply.send(owner.all_to_all(parts));
                        }
                    }
                }
            })
            .map_err(|e| cuda_err(rank, e))?;
        ready_rx
            .recv_timeout(timeout)
            .map_err(|_| cuda_err(rank, "the NCCL communicator did not come up in time"))??;
        Ok(NcclTransport {
            rank,
            size,
            epoch,
            timeout,
            cmds: tx,
            stash: Mutex::new(HashMap::new()),
        })
    }

    async fn ask<T>(&self, peer: usize, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(make(tx))
            .map_err(|_| TransportError::Closed)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(TransportError::Closed),
            Err(_) => Err(TransportError::Peer {
                peer,
                msg: format!("NCCL call did not finish within {:?}", self.timeout),
            }),
        }
    }
}

impl Transport for NcclTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    async fn send(&self, to: usize, tag: u64, data: Bytes) -> Result<()> {
        if to >= self.size {
            return Err(TransportError::BadRank {
                rank: to,
                size: self.size,
            });
        }
        if to == self.rank {
            self.stash
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((to, tag))
                .or_default()
                .push_back(data);
            return Ok(());
        }
        self.ask(to, |reply| Cmd::Send {
            to,
            tag,
            data,
            reply,
        })
        .await
    }

    async fn recv(&self, from: usize, tag: u64) -> Result<Bytes> {
        if from >= self.size {
            return Err(TransportError::BadRank {
                rank: from,
                size: self.size,
            });
        }
        loop {
            if let Some(b) = self
                .stash
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&(from, tag))
                .and_then(|q| q.pop_front())
            {
                return Ok(b);
            }
            if from == self.rank {
                return Err(TransportError::Timeout {
                    from,
                    tag,
                    timeout: self.timeout,
                });
            }
            let (got, data) = self.ask(from, |reply| Cmd::Recv { from, reply }).await?;
            if got == tag {
                return Ok(data);
            }
            self.stash
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((from, got))
                .or_default()
                .push_back(data);
        }
    }

    async fn all_to_all_v(&self, _tag: u64, parts: Vec<Bytes>) -> Result<Vec<Bytes>> {
        if parts.len() != self.size {
            return Err(TransportError::Parts {
                size: self.size,
                got: parts.len(),
            });
        }
        self.ask(self.rank, |reply| Cmd::AllToAll { parts, reply })
            .await
    }
}
