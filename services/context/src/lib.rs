//! Context parallelism over a [`Transport`] (design.md §4.1–4.2a): drives one rank's
//! layer-stepped prefill ([`ringbolt_model::context::RankPrefill`]) and carries what the ranks
//! need from each other:
//! - lightning layers: every rank's chunk states, all-gathered (LASP-2: small, fixed-size
//!   messages; each rank then folds its own prefixes);
//! - softmax layers: keys and values around a ring — at each of P−1 hops a rank sends the block
//!   it holds to the next rank and receives the previous rank's, and attends to the block it
//!   holds while the next one travels.
//!
//! The same code runs on every transport: in-process channels (ranks as threads of one
//! process), TCP, and NCCL on GPUs. A rank runs on its own thread (it computes synchronously);
//! the transport's futures run on a tokio runtime it is given.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ringbolt_kernels::Backend;
use ringbolt_model::context::KeptKv;
use ringbolt_model::context::{Chunk, Layout, RankPrefill, Share};
use ringbolt_model::{ExpertExecutor, Model, ModelError, SequenceState};
use ringbolt_transport::{Transport, TransportError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    #[error("a peer sent a malformed share: {0}")]
    Malformed(String),
    #[error("another rank failed; this one stopped")]
    Aborted,
}

pub type Result<T, E = ContextError> = std::result::Result<T, E>;

/// Where a rank's prefill time went.
#[derive(Debug, Clone, Default)]
pub struct RankTimes {
    /// Computing (both halves of every layer, attention to every block).
    pub compute: Duration,
    /// Waiting for lightning states from the other ranks.
    pub state_wait: Duration,
    /// Waiting for a ring hop's keys and values after its own attention was done (the part
    /// of the transfer that compute did not hide).
    pub ring_wait: Duration,
    /// How long the ring hops' transfers took (each from its start to its arrival).
    pub ring_transfer: Duration,
    /// Bytes sent.
    pub sent: u64,
}

/// Message tags: one per layer and ring hop.
fn tag(layer: usize, hop: usize) -> u64 {
    ((layer as u64) << 16) | hop as u64
}

fn put_f32s(out: &mut BytesMut, v: &[f32]) {
    out.put_u64_le(v.len() as u64);
    for x in v {
        out.put_f32_le(*x);
    }
}

fn get_f32s(b: &mut Bytes) -> Result<Vec<f32>> {
    if b.remaining() < 8 {
        return Err(ContextError::Malformed("truncated".into()));
    }
    let n = b.get_u64_le() as usize;
    if b.remaining() < n.saturating_mul(4) {
        return Err(ContextError::Malformed(format!(
            "{n} values announced, {} bytes left",
            b.remaining()
        )));
    }
    Ok((0..n).map(|_| b.get_f32_le()).collect())
}

/// A rank's chunk states: `[count u32] ([index u32] [values])*`.
fn encode_states(v: &[(usize, Vec<f32>)]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32_le(v.len() as u32);
    for (i, s) in v {
        out.put_u32_le(*i as u32);
        put_f32s(&mut out, s);
    }
    out.freeze()
}

fn decode_states(mut b: Bytes, into: &mut [Option<Vec<f32>>]) -> Result<()> {
    if b.remaining() < 4 {
        return Err(ContextError::Malformed("truncated".into()));
    }
    for _ in 0..b.get_u32_le() {
        if b.remaining() < 4 {
            return Err(ContextError::Malformed("truncated".into()));
        }
        let i = b.get_u32_le() as usize;
        let s = get_f32s(&mut b)?;
        *into
            .get_mut(i)
            .ok_or_else(|| ContextError::Malformed(format!("chunk {i} is not in the layout")))? =
            Some(s);
    }
    Ok(())
}

/// A block of keys and values: `[count u32] ([index u32] [rank u32] [start u64] [len u64]
/// [keys] [values])*`.
fn encode_kv(v: &[(Chunk, Vec<f32>, Vec<f32>)]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32_le(v.len() as u32);
    for (c, k, vv) in v {
        out.put_u32_le(c.index as u32);
        out.put_u32_le(c.rank as u32);
        out.put_u64_le(c.start as u64);
        out.put_u64_le(c.len as u64);
        put_f32s(&mut out, k);
        put_f32s(&mut out, vv);
    }
    out.freeze()
}

type KvBlock = Vec<(Chunk, Vec<f32>, Vec<f32>)>;

fn decode_kv(mut b: Bytes) -> Result<KvBlock> {
    if b.remaining() < 4 {
        return Err(ContextError::Malformed("truncated".into()));
    }
    let n = b.get_u32_le();
    let mut out = Vec::new();
    for _ in 0..n {
        if b.remaining() < 24 {
            return Err(ContextError::Malformed("truncated".into()));
        }
        let c = Chunk {
            index: b.get_u32_le() as usize,
            rank: b.get_u32_le() as usize,
            start: b.get_u64_le() as usize,
            len: b.get_u64_le() as usize,
        };
        let k = get_f32s(&mut b)?;
        let v = get_f32s(&mut b)?;
        out.push((c, k, v));
    }
    Ok(out)
}

/// Runs rank `transport.rank()`'s part of the prefill of `prompt` split by `layout`, its
/// transfers on `rt`. Call it on every rank at once, each on its own thread. A wait on the
/// other ranks ends early when `abort` is cancelled (another rank failed).
#[allow(clippy::too_many_arguments)]
pub fn prefill_rank<'m, B: Backend, T: Transport + 'static>(
    rt: &tokio::runtime::Handle,
    model: &'m Model<B>,
    experts: Option<&'m (dyn ExpertExecutor<B> + Sync)>,
    layout: &Layout,
    prompt: &[u32],
    transport: Arc<T>,
    abort: &CancellationToken,
) -> Result<(RankPrefill<'m, B>, RankTimes)> {
    let (rank, p) = (transport.rank(), transport.size());
    if p != layout.ranks {
        return Err(ContextError::Model(ModelError::Invalid(format!(
            "a {p}-rank group for a {}-rank layout",
            layout.ranks
        ))));
    }
    let mut times = RankTimes::default();
    let mut rp = model.rank_prefill(layout, rank, prompt, experts)?;
    let (next, prev) = ((rank + 1) % p, (rank + p - 1) % p);
    while !rp.done() {
        let l = rp.layer();
        let t0 = Instant::now();
        let share = rp.begin_layer();
        times.compute += t0.elapsed();
        match share {
            Share::States(own) => {
                let msg = encode_states(&own);
                times.sent += msg.len() as u64 * (p as u64 - 1);
                let t1 = Instant::now();
                let all = until_aborted(rt, abort, transport.all_gather(tag(l, 0), msg))?;
                times.state_wait += t1.elapsed();
                let mut states = vec![None; layout.chunks.len()];
                for b in all {
                    decode_states(b, &mut states)?;
                }
                let t2 = Instant::now();
                rp.finish_layer(&states)?;
                times.compute += t2.elapsed();
            }
            Share::KeysValues(own) => {
                // The block this rank holds at each hop: its own first, then its predecessor's
                // predecessor's, ... Each hop's transfer runs while the held block is attended.
                let mut held = encode_kv(&own);
                let mut held_kv = own;
                for hop in 0..p {
                    let transfer = (hop + 1 < p).then(|| {
                        let (t, msg) = (transport.clone(), held.clone());
                        let tg = tag(l, hop + 1);
                        rt.spawn(async move {
                            let t0 = Instant::now();
                            let (sent, got) = tokio::join!(t.send(next, tg, msg), t.recv(prev, tg));
                            sent.and(got).map(|g| (g, t0.elapsed()))
                        })
                    });
                    if transfer.is_some() {
                        times.sent += held.len() as u64;
                    }
                    let t1 = Instant::now();
                    for (c, k, v) in &held_kv {
                        rp.attend(*c, k, v);
                    }
                    times.compute += t1.elapsed();
                    if let Some(h) = transfer {
                        let t2 = Instant::now();
                        let hop = async {
                            h.await
                                .map_err(|e| ContextError::Malformed(format!("ring hop: {e}")))?
                                .map_err(ContextError::from)
                        };
                        let (got, took) = until_aborted(rt, abort, hop)?;
                        times.ring_wait += t2.elapsed();
                        times.ring_transfer += took;
                        held_kv = decode_kv(got.clone())?;
                        held = got;
                    }
                }
                let t3 = Instant::now();
                rp.finish_layer(&[])?;
                times.compute += t3.elapsed();
            }
        }
    }
    Ok((rp, times))
}

/// Waits for `fut` on `rt`, or until `abort` is cancelled (another rank failed).
fn until_aborted<T, E: Into<ContextError>>(
    rt: &tokio::runtime::Handle,
    abort: &CancellationToken,
    fut: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    rt.block_on(async {
        tokio::select! {
            r = fut => r.map_err(Into::into),
            _ = abort.cancelled() => Err(ContextError::Aborted),
        }
    })
}

/// Tag of the keys and values of `layer` sent to the decoding rank.
fn gather_tag(layer: usize) -> u64 {
    tag(layer, 0xffff)
}

/// After a prefill: every rank sends its softmax keys and values to rank `to`, one message per
/// softmax layer; `to` returns the sequence state one worker would hold after the whole prompt
/// (to decode from); the others return None.
pub fn gather_to<B: Backend, T: Transport + 'static>(
    rt: &tokio::runtime::Handle,
    rp: RankPrefill<'_, B>,
    to: usize,
    transport: Arc<T>,
    abort: &CancellationToken,
) -> Result<Option<SequenceState<B>>> {
    let (me, p) = (transport.rank(), transport.size());
    let mut kv = rp.export_kv();
    // Softmax layers in order: the same list on every rank (every rank kept every layer).
    let mut layers: Vec<usize> = kv.iter().map(|x| x.0).collect();
    layers.dedup();
    if me != to {
        let mut sends = Vec::new();
        for l in layers {
            let part: Vec<(Chunk, Vec<f32>, Vec<f32>)> = kv
                .extract_if(.., |x| x.0 == l)
                .map(|(_, c, k, v)| (c, k, v))
                .collect();
            sends.push((l, encode_kv(&part)));
        }
        // Empty messages for softmax layers this rank holds nothing of would be needed only
        // if the lists differed; they do not (see above).
        for (l, msg) in sends {
            until_aborted(rt, abort, transport.send(to, gather_tag(l), msg))?;
        }
        return Ok(None);
    }
    let mut others: Vec<KeptKv> = Vec::new();
    for &l in &layers {
        for from in (0..p).filter(|r| *r != me) {
            let got = until_aborted(rt, abort, transport.recv(from, gather_tag(l)))?;
            for (c, k, v) in decode_kv(got)? {
                if c.rank != from {
                    return Err(ContextError::Malformed(format!(
                        "rank {from} sent keys of chunk {} held by rank {}",
                        c.index, c.rank
                    )));
                }
                others.push((l, c, k, v));
            }
        }
    }
    Ok(Some(rp.into_state(others)?))
}

/// What a context-parallel prefill of P ranks in one process produced.
pub struct LocalPrefill<B: Backend> {
    /// The last position's logits.
    pub logits: Vec<f32>,
    /// The sequence state one worker would hold after the whole prompt (for decode).
    pub state: ringbolt_model::SequenceState<B>,
    /// Softmax key and value bytes each rank held.
    pub cache_bytes_per_rank: Vec<u64>,
    pub times: Vec<RankTimes>,
}

/// A context-parallel prefill of `prompt` by `ranks` threads of this process, exchanging over
/// the in-process transport (the path of a multi-GPU node). `rt` runs the transfers.
pub fn prefill_local<B: Backend>(
    rt: &tokio::runtime::Handle,
    model: &Model<B>,
    prompt: &[u32],
    ranks: usize,
) -> Result<LocalPrefill<B>> {
    let group =
        ringbolt_transport::local::LocalGroup::ranks(ranks.max(1), 0, Duration::from_secs(600));
    prefill_group(rt, model, prompt, group)
}

/// A context-parallel prefill of `prompt` by one thread of this process per rank of `group`
/// (any transport: the in-process one, or TCP with an emulated link for measurements).
pub fn prefill_group<B: Backend, T: Transport + 'static>(
    rt: &tokio::runtime::Handle,
    model: &Model<B>,
    prompt: &[u32],
    group: Vec<T>,
) -> Result<LocalPrefill<B>> {
    let layout = Layout::zigzag(prompt.len(), group.len());
    let abort = CancellationToken::new();
    let results: Vec<Result<(RankPrefill<'_, B>, RankTimes)>> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|t| {
                let (layout, abort) = (&layout, &abort);
                s.spawn(move || {
                    // A rank that fails (or panics) stops the others' waits at once.
                    let stop = abort.clone().drop_guard();
                    let r = prefill_rank(rt, model, None, layout, prompt, Arc::new(t), abort);
                    if r.is_ok() {
                        stop.disarm();
                    }
                    r
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ContextError::Model(ModelError::Invalid(
                        "a rank's thread panicked".into(),
                    )))
                })
            })
            .collect()
    });
    let mut ranks_done = Vec::new();
    let mut times = Vec::new();
    for r in results {
        let (rp, t) = r?;
        ranks_done.push(rp);
        times.push(t);
    }
    let logits = ranks_done
        .iter()
        .find_map(|r| r.last_logits())
        .ok_or_else(|| ModelError::Invalid("no rank holds the last position".into()))?;
    let cache_bytes_per_rank = ranks_done.iter().map(|r| r.cache_bytes() as u64).collect();
    let state = ringbolt_model::context::gather_state(ranks_done)?;
    Ok(LocalPrefill {
        logits,
        state,
        cache_bytes_per_rank,
        times,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringbolt_kernels::cpu::Cpu;
    use ringbolt_model::{
        Checkpoint, LayerKind, Logits, Preset, WeightDtype, write_random_checkpoint,
    };
    use ringbolt_transport::tcp::TcpTransport;

    fn model() -> (tempfile::TempDir, Model<Cpu>) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Preset::Tiny.config();
        cfg.layers = (0..cfg.layers.len())
            .map(|l| {
                if l % 3 == 2 {
                    LayerKind::Softmax
                } else {
                    LayerKind::Lightning
                }
            })
            .collect();
        write_random_checkpoint(&cfg, 4, WeightDtype::F32, dir.path(), None).unwrap();
        let m = Model::load(&Checkpoint::open(dir.path()).unwrap(), Cpu).unwrap();
        (dir, m)
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let max = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn ranks_as_threads_over_the_in_process_transport_equal_one_worker() {
        let (_d, m) = model();
        let rt = runtime();
        for n in [5usize, 37, 300] {
            let prompt: Vec<u32> = (0..n as u32).map(|i| (i * 31 + 7) % 500 + 1).collect();
            let mut st = m.new_state();
            let want = m.forward(&mut st, &prompt, Logits::Last).unwrap();
            for p in 1..=4 {
                let got = prefill_local(rt.handle(), &m, &prompt, p).unwrap();
                assert!(rel_err(&got.logits, &want) <= 1e-5, "n={n} P={p}");
                assert_eq!(got.cache_bytes_per_rank.len(), p);
                // Decode continues from the gathered state as from one worker's.
                let mut cp = got.state;
                let t = ringbolt_model::sampling::argmax(&want);
                let a = m.forward(&mut cp, &[t], Logits::Last).unwrap();
                let b = m.forward(&mut st, &[t], Logits::Last).unwrap();
                assert!(rel_err(&a, &b) <= 1e-5, "n={n} P={p}: decode");
                st = m.new_state();
                m.forward(&mut st, &prompt, Logits::None).unwrap();
            }
        }
    }

    #[test]
    fn ranks_over_tcp_equal_one_worker() {
        let (_d, m) = model();
        let rt = runtime();
        let prompt: Vec<u32> = (0..211u32).map(|i| (i * 13 + 3) % 500 + 1).collect();
        let want = m
            .forward(&mut m.new_state(), &prompt, Logits::Last)
            .unwrap();
        let p = 3;
        let (group, _) = rt
            .block_on(TcpTransport::loopback_group(
                p,
                1,
                Duration::from_secs(30),
                Default::default(),
            ))
            .unwrap();
        let layout = Layout::zigzag(prompt.len(), p);
        let last = layout.last_rank();
        type RankOut = (Option<Vec<f32>>, Option<ringbolt_model::SequenceState<Cpu>>);
        let out: Vec<RankOut> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|t| {
                    let (layout, prompt, m, h) = (&layout, &prompt, &m, rt.handle());
                    s.spawn(move || {
                        let abort = CancellationToken::new();
                        let t = Arc::new(t);
                        let (rp, times) =
                            prefill_rank(h, m, None, layout, prompt, t.clone(), &abort).unwrap();
                        assert!(times.sent > 0);
                        let logits = rp.last_logits();
                        // The keys and values go to the rank holding the last position.
                        (logits, gather_to(h, rp, last, t, &abort).unwrap())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let got: Vec<&Vec<f32>> = out.iter().filter_map(|o| o.0.as_ref()).collect();
        assert_eq!(got.len(), 1, "one rank holds the last position");
        assert!(rel_err(got[0], &want) <= 1e-5);
        // Only that rank has a state to decode from, and decode from it equals one worker's.
        let mut states: Vec<_> = out.into_iter().filter_map(|o| o.1).collect();
        assert_eq!(states.len(), 1);
        let mut cp = states.pop().unwrap();
        let mut one = m.new_state();
        m.forward(&mut one, &prompt, Logits::None).unwrap();
        let t = ringbolt_model::sampling::argmax(&want);
        let a = m.forward(&mut cp, &[t], Logits::Last).unwrap();
        let b = m.forward(&mut one, &[t], Logits::Last).unwrap();
        assert!(rel_err(&a, &b) <= 1e-5, "decode after gathering");
    }
}
