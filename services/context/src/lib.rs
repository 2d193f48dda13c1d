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
use ringbolt_model::context::{Chunk, Layout, RankPrefill, Share};
use ringbolt_model::context::{KvShard, group_prefix, holder};
use ringbolt_model::prefix::{ContextCache, Key, prefix_keys};
use ringbolt_model::scheduler::ContextPrefill;
use ringbolt_model::{ExpertExecutor, Model, ModelError};
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
    #[error("stopped: another rank failed, or the job was cancelled or ended")]
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

/// Runs rank `transport.rank()`'s part of the prefill of `prompt` split by `layout` (with
/// `embeddings` replacing token embeddings at some positions: images' features), its
/// transfers on `rt`. Call it on every rank at once, each on its own thread. A wait on the
/// other ranks ends early when `abort` is cancelled (another rank failed).
#[allow(clippy::too_many_arguments)]
pub fn prefill_rank<'m, B: Backend, T: Transport + 'static>(
    rt: &tokio::runtime::Handle,
    model: &'m Model<B>,
    experts: Option<&'m (dyn ExpertExecutor<B> + Sync)>,
    layout: &Layout,
    prompt: &[u32],
    embeddings: &[(usize, Vec<f32>)],
    exchange: StateExchange,
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
    let mut rp = model.rank_prefill_with(layout, rank, prompt, embeddings, experts)?;
    let (next, prev) = ((rank + 1) % p, (rank + p - 1) % p);
    while !rp.done() {
        let l = rp.layer();
        let t0 = Instant::now();
        let share = rp.begin_layer();
        times.compute += t0.elapsed();
        match share {
            Share::States(own) if exchange == StateExchange::Ring => {
                let t1 = Instant::now();
                let (prefixes, whole) =
                    ring_states(rt, &rp, layout, own, &*transport, abort, l, &mut times)?;
                times.state_wait += t1.elapsed();
                let t2 = Instant::now();
                rp.finish_layer_prefixes(prefixes, whole)?;
                times.compute += t2.elapsed();
            }
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

/// How lightning states travel between the ranks (the same result either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StateExchange {
    /// LASP-2: every rank sends each of its chunks' contributions to every other rank, in one
    /// round; each rank folds its own prefixes. P−1 messages of two states per rank per layer.
    #[default]
    AllGather,
    /// LASP-1: the state after each chunk goes to the next chunk's rank, which folds in its
    /// own chunk and passes it on: at most two states sent per rank, but 2P−1 hops in sequence.
    Ring,
}

impl std::str::FromStr for StateExchange {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "all-gather" => Ok(StateExchange::AllGather),
            "ring" => Ok(StateExchange::Ring),
            _ => Err(format!(
                "`{s}`: the state exchange is `all-gather` or `ring`"
            )),
        }
    }
}

/// Each own chunk's prefix state, and the whole context's where this rank has it.
type Prefixes = (Vec<Vec<f32>>, Option<Vec<f32>>);

/// One lightning layer's states by the ring exchange: walks this rank's chunks in position
/// order, each waiting for the state before it from the previous chunk's rank (none for the
/// first chunk), folding its own contribution and passing the state on. Returns each own
/// chunk's prefix state and, on the rank that decodes, the whole context's state.
#[allow(clippy::too_many_arguments)]
fn ring_states<B: Backend, T: Transport>(
    rt: &tokio::runtime::Handle,
    rp: &RankPrefill<'_, B>,
    layout: &Layout,
    own: Vec<(usize, Vec<f32>)>,
    transport: &T,
    abort: &CancellationToken,
    l: usize,
    times: &mut RankTimes,
) -> Result<Prefixes> {
    let me = transport.rank();
    // The chain runs over the non-empty chunks in position order; the last one's rank (the
    // one that decodes) ends with the whole context's state.
    let chain: Vec<Chunk> = layout
        .chunks
        .iter()
        .filter(|c| c.len > 0)
        .copied()
        .collect();
    let mut contributions: std::collections::HashMap<usize, Vec<f32>> = own.into_iter().collect();
    let state = |b: Bytes| -> Result<Vec<f32>> {
        let mut b = b;
        let v = get_f32s(&mut b)?;
        if v.len() != rp.state_len() {
            return Err(ContextError::Malformed(format!(
                "a state of {} values, {} expected",
                v.len(),
                rp.state_len()
            )));
        }
        Ok(v)
    };
    let mut prefixes = Vec::new();
    let mut carry: Option<(usize, Vec<f32>)> = None;
    let mut whole = None;
    for (k, c) in chain.iter().enumerate().filter(|(_, c)| c.rank == me) {
        let mut s = match carry.take() {
            Some((j, s)) if j == k => s,
            _ if k == 0 => vec![0f32; rp.state_len()],
            _ => state(until_aborted(
                rt,
                abort,
                transport.recv(chain[k - 1].rank, tag(l, 1 + k)),
            )?)?,
        };
        prefixes.push(s.clone());
        rp.fold(c.index, &mut s, contributions.remove(&c.index).as_deref());
        match chain.get(k + 1) {
            None => whole = Some(s),
            Some(next) if next.rank == me => carry = Some((k + 1, s)),
            Some(next) => {
                let mut msg = BytesMut::new();
                put_f32s(&mut msg, &s);
                let msg = msg.freeze();
                times.sent += msg.len() as u64;
                until_aborted(rt, abort, transport.send(next.rank, tag(l, 2 + k), msg))?;
            }
        }
    }
    Ok((prefixes, whole))
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

/// Tags of distributed decode: requests from the decoding rank, replies to it, by step.
const DECODE_REQUEST: u64 = 3 << 60;
const DECODE_REPLY: u64 = 4 << 60;

/// A decode request: `[kind u8: 0 done, 1 attend] [layer u32] [append u8] [q] ([k] [v])`.
fn encode_request(layer: usize, q: &[f32], kv: Option<(&[f32], &[f32])>) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(1);
    out.put_u32_le(layer as u32);
    out.put_u8(u8::from(kv.is_some()));
    put_f32s(&mut out, q);
    if let Some((k, v)) = kv {
        put_f32s(&mut out, k);
        put_f32s(&mut out, v);
    }
    out.freeze()
}

/// A decoded request: None for "done".
type Request = Option<(usize, Vec<f32>, Option<(Vec<f32>, Vec<f32>)>)>;

fn decode_request(mut b: Bytes) -> Result<Request> {
    if b.remaining() < 1 {
        return Err(ContextError::Malformed("empty decode request".into()));
    }
    if b.get_u8() == 0 {
        return Ok(None);
    }
    if b.remaining() < 5 {
        return Err(ContextError::Malformed("truncated decode request".into()));
    }
    let layer = b.get_u32_le() as usize;
    let append = b.get_u8() == 1;
    let q = get_f32s(&mut b)?;
    let kv = if append {
        Some((get_f32s(&mut b)?, get_f32s(&mut b)?))
    } else {
        None
    };
    Ok(Some((layer, q, kv)))
}

/// Serves rank `transport.rank()`'s share of a sequence's keys and values to the decoding rank
/// `to` (distributed decode): answers each decode step's query with this share's partial
/// attention, keeping the new key and value when asked, until `to` says the sequence is done
/// (Ok) or `abort` is cancelled.
pub fn serve_shard<B: Backend, T: Transport>(
    rt: &tokio::runtime::Handle,
    b: &B,
    mut shard: KvShard<B>,
    to: usize,
    transport: &T,
    abort: &CancellationToken,
) -> Result<()> {
    for step in 0u64.. {
        let msg = loop {
            // The decoding rank may be busy with other sequences for a while.
            match until_aborted(rt, abort, transport.recv(to, DECODE_REQUEST | step)) {
                Err(ContextError::Transport(TransportError::Timeout { .. })) => continue,
                r => break r?,
            }
        };
        let Some((layer, q, kv)) = decode_request(msg)? else {
            return Ok(());
        };
        let shape = shard.shape();
        let width = shape.heads * shape.head_dim;
        let kv_width = shape.kv_heads * shape.head_dim;
        let n = q.len() / width;
        if n == 0 || q.len() != n * width {
            return Err(ContextError::Malformed(format!(
                "a decode query of {} values (rows of {width})",
                q.len()
            )));
        }
        if let Some((k, v)) = &kv
            && (k.len() != n * kv_width || v.len() != n * kv_width)
        {
            return Err(ContextError::Malformed(format!(
                "{} keys and {} values for {n} queries (rows of {kv_width})",
                k.len(),
                v.len()
            )));
        }
        let kv = kv.map(|(k, v)| (b.upload(&k), b.upload(&v)));
        let part = shard.attend(b, layer, &b.upload(&q), n, kv);
        let mut out = BytesMut::new();
        match part {
            None => out.put_u8(0),
            Some((o, lse)) => {
                out.put_u8(1);
                put_f32s(&mut out, &b.download(&o));
                put_f32s(&mut out, &lse);
            }
        }
        until_aborted(
            rt,
            abort,
            transport.send(to, DECODE_REPLY | step, out.freeze()),
        )?;
    }
    Ok(())
}

/// The decoding rank's [`SplitAttention`] over a group: its own share here, the others' on
/// their ranks (each serving [`serve_shard`]); each decode step's query goes to every rank at
/// once, the new key and value to the rank holding the fewest.
pub struct RemoteSplit<B: Backend, T: Transport + 'static> {
    rt: tokio::runtime::Handle,
    own: KvShard<B>,
    transport: Arc<T>,
    abort: CancellationToken,
    /// Keys per rank, per layer.
    counts: Vec<Vec<usize>>,
    step: u64,
    shape: ringbolt_kernels::AttentionShape,
}

impl<B: Backend, T: Transport + 'static> RemoteSplit<B, T> {
    /// `own` is this rank's share; `layout` how the prompt was split.
    pub fn new(
        rt: tokio::runtime::Handle,
        model: &Model<B>,
        own: KvShard<B>,
        layout: &Layout,
        transport: Arc<T>,
        abort: CancellationToken,
    ) -> Self {
        let c = model.config();
        let per_rank: Vec<usize> = (0..layout.ranks).map(|r| layout.rank_tokens(r)).collect();
        RemoteSplit {
            rt,
            own,
            transport,
            abort,
            counts: vec![per_rank; c.layers.len()],
            step: 0,
            shape: ringbolt_kernels::AttentionShape {
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
            },
        }
    }

    fn attend_all(
        &mut self,
        b: &B,
        layer: usize,
        q: &B::Buf,
        n: usize,
        k: B::Buf,
        v: B::Buf,
    ) -> Result<B::Buf> {
        let (me, p) = (self.transport.rank(), self.transport.size());
        let counts = self
            .counts
            .get_mut(layer)
            .ok_or_else(|| ContextError::Malformed(format!("no layer {layer}")))?;
        let h = holder(counts);
        counts[h] += n;
        let step = self.step;
        self.step += 1;
        let (qh, kh, vh) = (b.download(q), b.download(&k), b.download(&v));
        // Every other rank's query goes out first; this rank's share computes meanwhile.
        let t = self.transport.clone();
        let requests: Vec<(usize, Bytes)> = (0..p)
            .filter(|r| *r != me)
            .map(|r| {
                let kv = (r == h).then_some((&kh[..], &vh[..]));
                (r, encode_request(layer, &qh, kv))
            })
            .collect();
        let replies = self.rt.spawn(async move {
            let sends = requests
                .iter()
                .map(|(r, m)| t.send(*r, DECODE_REQUEST | step, m.clone()));
            for s in futures::future::join_all(sends).await {
                s?;
            }
            let recvs = requests
                .iter()
                .map(|(r, _)| t.recv(*r, DECODE_REPLY | step));
            futures::future::join_all(recvs)
                .await
                .into_iter()
                .collect::<std::result::Result<Vec<Bytes>, TransportError>>()
        });
        let mut parts: Vec<(B::Buf, Vec<f32>)> = Vec::with_capacity(p);
        parts.extend(self.own.attend(b, layer, q, n, (h == me).then_some((k, v))));
        let replies = until_aborted(&self.rt, &self.abort, async {
            replies
                .await
                .map_err(|e| ContextError::Malformed(format!("decode exchange: {e}")))?
                .map_err(ContextError::from)
        })?;
        let w = self.shape.heads * self.shape.head_dim;
        for mut r in replies {
            if r.remaining() < 1 {
                return Err(ContextError::Malformed("empty decode reply".into()));
            }
            if r.get_u8() == 0 {
                continue;
            }
            let o = get_f32s(&mut r)?;
            let lse = get_f32s(&mut r)?;
            if o.len() != n * w || lse.len() != n * self.shape.heads {
                return Err(ContextError::Malformed(format!(
                    "a decode reply of {} outputs and {} log-sum-exps",
                    o.len(),
                    lse.len()
                )));
            }
            parts.push((b.upload(&o), lse));
        }
        Ok(b.attention_merge(&parts, n, self.shape).0)
    }
}

impl<B: Backend, T: Transport + 'static> ringbolt_model::SplitAttention<B> for RemoteSplit<B, T> {
    fn attend(
        &mut self,
        b: &B,
        layer: usize,
        q: &B::Buf,
        n: usize,
        k: B::Buf,
        v: B::Buf,
    ) -> ringbolt_model::Result<B::Buf> {
        self.attend_all(b, layer, q, n, k, v).map_err(|e| match e {
            ContextError::Model(m) => m,
            // Another try (on a new group) may succeed.
            other => ModelError::Peer(other.to_string()),
        })
    }

    fn tokens_per_rank(&self, layer: usize) -> Vec<usize> {
        self.counts.get(layer).cloned().unwrap_or_default()
    }
}

impl<B: Backend, T: Transport + 'static> Drop for RemoteSplit<B, T> {
    fn drop(&mut self) {
        // The other ranks may let their shares go.
        let (me, p, step) = (self.transport.rank(), self.transport.size(), self.step);
        let t = self.transport.clone();
        self.rt.spawn(async move {
            for r in (0..p).filter(|r| *r != me) {
                let _ = t
                    .send(r, DECODE_REQUEST | step, Bytes::from_static(&[0]))
                    .await;
            }
        });
    }
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

/// A context-parallel prefill of `prompt` by one thread of this process per rank of `group`
/// (any transport: the in-process one, or TCP with an emulated link for measurements).
pub fn prefill_group<B: Backend, T: Transport + 'static>(
    rt: &tokio::runtime::Handle,
    model: &Model<B>,
    prompt: &[u32],
    group: Vec<T>,
    exchange: StateExchange,
    cancel: &CancellationToken,
) -> Result<LocalPrefill<B>> {
    let layout = Layout::zigzag(prompt.len(), group.len());
    let results = run_ranks(group, cancel, |t, abort| {
        prefill_rank(rt, model, None, &layout, prompt, &[], exchange, t, abort)
    })?;
    let mut ranks_done = Vec::new();
    let mut times = Vec::new();
    for (rp, t) in results {
        ranks_done.push(rp);
        times.push(t);
    }
    let logits = ranks_done
        .iter()
        .find_map(|r| r.last_logits())
        .ok_or_else(|| ModelError::Invalid("no rank holds the last position".into()))?;
    let cache_bytes_per_rank = ranks_done.iter().map(|r| r.cache_bytes() as u64).collect();
    let state = ringbolt_model::context::local_split_state(ranks_done)?;
    Ok(LocalPrefill {
        logits,
        state,
        cache_bytes_per_rank,
        times,
    })
}

/// What a context-parallel job asks of one rank (the same on every rank of its group).
#[derive(Debug, Clone, Copy)]
pub struct GroupJob<'a> {
    pub prompt: &'a [u32],
    /// Rows that replace the prompt's token embeddings (images' features: (first position,
    /// `[n, H]` rows)); every rank has them all and takes its chunks' rows.
    pub embeddings: &'a [(usize, Vec<f32>)],
    /// The prefill chunk: the context cache's block, which [`group_prefix`] ends on.
    pub chunk: usize,
    /// Whether the job reads and adds to the context cache.
    pub context_cache: bool,
}

/// What one rank leaves after its part of a group's prefill ([`prefill_rank_cached`]).
pub struct RankPart<B: Backend> {
    /// How the group's part of the prompt (its first `layout.tokens` positions) was split;
    /// the decoding rank's scheduler prefills the rest.
    pub layout: Layout,
    /// This rank's keys and values.
    pub shard: KvShard<B>,
    /// On the decoding rank (the layout's last): the state to go on from.
    pub state: Option<ringbolt_model::SequenceState<B>>,
    /// On the decoding rank, when the layout covers the whole prompt: its last logits.
    pub logits: Option<Vec<f32>>,
    /// Positions the group took from the context cache (0: it prefilled them).
    pub cached: usize,
    pub times: RankTimes,
}

/// Tag of the context cache agreement's rounds.
const CACHE_AGREEMENT: u64 = 5 << 60;

/// Rank `transport.rank()`'s part of the context-parallel prefill of `job.prompt` with the
/// context cache: the group takes the prompt's first [`group_prefix`] positions (the rest is
/// the decoding rank's scheduler's). When the job uses the cache and that prefix ends on a
/// block boundary, the ranks first agree (two all-gathers) on the longest prefix every one of
/// them holds its share of, if the rest is then no more work for one rank than its part of a
/// whole prefill, and every rank restores its share; otherwise they prefill the prefix and
/// each keeps its share in `cache` (its own: a rank without one takes part, holding nothing).
/// Call it on every rank at once, as [`prefill_rank`].
pub fn prefill_rank_cached<B: Backend, T: Transport + 'static>(
    rt: &tokio::runtime::Handle,
    model: &Model<B>,
    experts: Option<&(dyn ExpertExecutor<B> + Sync)>,
    job: GroupJob<'_>,
    cache: Option<&ContextCache>,
    transport: Arc<T>,
    abort: &CancellationToken,
) -> Result<RankPart<B>> {
    let (rank, p) = (transport.rank(), transport.size());
    let prompt = job.prompt;
    let chunk = job.chunk.max(1);
    let end = group_prefix(prompt.len(), chunk);
    let agree = job.context_cache && end.is_multiple_of(chunk) && end < prompt.len();
    let prefixes = if agree {
        // Shares of a prompt with images' features are kept under a root of those features.
        let root = ringbolt_model::prefix::embeddings_root(model.cache_root(chunk), job.embeddings);
        prefix_keys(root, prompt, chunk, end)
    } else {
        Vec::new()
    };
    if agree {
        let min = prompt.len() - prompt.len() / p;
        let held: Vec<(usize, Key)> = prefixes
            .iter()
            .rev()
            .filter(|(n, k)| *n >= min && cache.is_some_and(|c| c.has_share(*k, p, rank)))
            .copied()
            .collect();
        let restored = restore_agreed(rt, model, prompt, &held, cache, &*transport, abort)?;
        if rank == 0
            && let Some(c) = cache
        {
            c.count_lookup(restored.as_ref().map_or(0, |r| r.layout.tokens));
        }
        if let Some(r) = restored {
            return Ok(r);
        }
    }
    let layout = Layout::zigzag(end, p);
    let part = &prompt[..end];
    let (rp, times) = prefill_rank(
        rt,
        model,
        experts,
        &layout,
        part,
        job.embeddings,
        // All-gather: measured no slower than the ring (docs/BENCHMARKS.md).
        StateExchange::AllGather,
        transport,
        abort,
    )?;
    let logits = rp.last_logits().filter(|_| end == prompt.len());
    let (shard, state) = rp.into_shard()?;
    if let (Some(c), Some((_, key))) = (cache.filter(|_| agree), prefixes.last()) {
        let bytes = shard.bytes()
            + state
                .as_ref()
                .map_or(0, |st| st.cache_bytes(model.backend()));
        if c.could_keep(bytes)
            && let Some(block) = model.share_block(&shard, state.as_ref(), part)
        {
            c.insert_share(*key, p, rank, block);
        }
    }
    Ok(RankPart {
        layout,
        shard,
        state,
        logits,
        cached: 0,
        times,
    })
}

/// The cache agreement: every rank sends the prefixes it holds its share of (`held`: longest
/// first, by end), the longest one all hold is chosen, each rank restores its share of it and
/// says whether it could; the shares are used only when every rank could.
fn restore_agreed<B: Backend, T: Transport>(
    rt: &tokio::runtime::Handle,
    model: &Model<B>,
    prompt: &[u32],
    held: &[(usize, Key)],
    cache: Option<&ContextCache>,
    transport: &T,
    abort: &CancellationToken,
) -> Result<Option<RankPart<B>>> {
    let (rank, p) = (transport.rank(), transport.size());
    let mut msg = BytesMut::new();
    msg.put_u32_le(held.len() as u32);
    for (n, _) in held {
        msg.put_u64_le(*n as u64);
    }
    let all = gather_patiently(rt, transport, abort, CACHE_AGREEMENT, msg.freeze())?;
    let mut common: Option<std::collections::HashSet<u64>> = None;
    for mut b in all {
        if b.remaining() < 4 {
            return Err(ContextError::Malformed("truncated cache agreement".into()));
        }
        let n = b.get_u32_le() as usize;
        if b.remaining() != n.saturating_mul(8) {
            return Err(ContextError::Malformed(format!(
                "a cache agreement of {n} prefixes in {} bytes",
                b.remaining()
            )));
        }
        let ends: std::collections::HashSet<u64> = (0..n).map(|_| b.get_u64_le()).collect();
        common = Some(match common {
            None => ends,
            Some(c) => c.intersection(&ends).copied().collect(),
        });
    }
    let chosen = held
        .iter()
        .find(|(n, _)| common.as_ref().is_some_and(|c| c.contains(&(*n as u64))));
    let Some(&(end, key)) = chosen else {
        return Ok(None);
    };
    let layout = Layout::zigzag(end, p);
    let mine = cache
        .and_then(|c| c.share(key, p, rank, &prompt[..end]))
        .and_then(|blk| match model.restore_share(&blk, &layout, rank) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "a context cache share not used");
                None
            }
        });
    let ok = Bytes::from(vec![u8::from(mine.is_some())]);
    let all = gather_patiently(rt, transport, abort, CACHE_AGREEMENT | 1, ok)?;
    if all.iter().any(|b| b.first() != Some(&1)) {
        return Ok(None);
    }
    let Some((shard, state)) = mine else {
        return Ok(None);
    };
    Ok(Some(RankPart {
        layout,
        shard,
        state,
        logits: None,
        cached: end,
        times: RankTimes::default(),
    }))
}

/// Every rank's `msg`, in rank order, waiting for the others as long as it takes (a rank may be
/// reading its share back from disk) unless `abort` is cancelled or a peer is lost.
fn gather_patiently<T: Transport>(
    rt: &tokio::runtime::Handle,
    transport: &T,
    abort: &CancellationToken,
    tag: u64,
    msg: Bytes,
) -> Result<Vec<Bytes>> {
    let (me, p) = (transport.rank(), transport.size());
    for r in (0..p).filter(|r| *r != me) {
        until_aborted(rt, abort, transport.send(r, tag, msg.clone()))?;
    }
    (0..p)
        .map(|r| {
            if r == me {
                return Ok(msg.clone());
            }
            loop {
                match until_aborted(rt, abort, transport.recv(r, tag)) {
                    Err(ContextError::Transport(TransportError::Timeout { .. })) => continue,
                    got => return got,
                }
            }
        })
        .collect()
}

/// Runs `rank` on one thread of this process per transport of `group`, at once; a rank that
/// fails (or panics) stops the others' waits (as does `cancel`). The ranks' results in rank
/// order.
fn run_ranks<T: Transport + 'static, R: Send>(
    group: Vec<T>,
    cancel: &CancellationToken,
    rank: impl Fn(Arc<T>, &CancellationToken) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let abort = cancel.child_token();
    let results: Vec<Result<R>> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|t| {
                let (abort, rank) = (&abort, &rank);
                s.spawn(move || {
                    let stop = abort.clone().drop_guard();
                    let r = rank(Arc::new(t), abort);
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
    results.into_iter().collect()
}

/// A context-parallel prefill with the context cache by one thread of this process per rank
/// of `group` ([`prefill_rank_cached`] on each, sharing one cache): the state the scheduler
/// goes on from, its keys and values left on the ranks.
pub fn prefill_group_cached<B: Backend + 'static, T: Transport + 'static>(
    rt: &tokio::runtime::Handle,
    model: &Model<B>,
    job: GroupJob<'_>,
    cache: Option<&ContextCache>,
    group: Vec<T>,
    cancel: &CancellationToken,
) -> Result<ContextPrefill<B>> {
    let parts = run_ranks(group, cancel, |t, abort| {
        prefill_rank_cached(rt, model, None, job, cache, t, abort)
    })?;
    local_prefill(parts)
}

/// The state the scheduler goes on from after the ranks of this process left `parts` (in
/// rank order): the decoding rank's, attending through every rank's share.
fn local_prefill<B: Backend + 'static>(parts: Vec<RankPart<B>>) -> Result<ContextPrefill<B>> {
    let mut shards = Vec::with_capacity(parts.len());
    let mut decoding = None;
    let mut cache_bytes_per_rank = Vec::with_capacity(parts.len());
    for part in parts {
        cache_bytes_per_rank.push(part.shard.bytes() as u64);
        shards.push(part.shard);
        if let Some(st) = part.state {
            decoding = Some((st, part.logits, part.layout.tokens, part.cached));
        }
    }
    let (mut state, logits, tokens, cached_tokens) =
        decoding.ok_or_else(|| ModelError::Invalid("no rank holds the last position".into()))?;
    state.split = Some(Box::new(ringbolt_model::context::LocalSplit { shards }));
    Ok(ContextPrefill {
        tokens,
        logits: logits.unwrap_or_default(),
        state,
        cache_bytes_per_rank,
        cached_tokens,
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
        let m = Model::load(&Checkpoint::open(dir.path()).unwrap(), Cpu::default()).unwrap();
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
            for (p, exchange) in (1..=4)
                .flat_map(|p| [StateExchange::AllGather, StateExchange::Ring].map(|e| (p, e)))
            {
                let group =
                    ringbolt_transport::local::LocalGroup::ranks(p, 0, Duration::from_secs(60));
                let got = prefill_group(
                    rt.handle(),
                    &m,
                    &prompt,
                    group,
                    exchange,
                    &CancellationToken::new(),
                )
                .unwrap();
                assert!(
                    rel_err(&got.logits, &want) <= 1e-5,
                    "n={n} P={p} {exchange:?}"
                );
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

    /// The ranks start from the cache only when every one of them holds its share (each rank
    /// its own cache here, as attention workers have); the tokens are those of a cold run.
    #[test]
    fn ranks_agree_on_the_cached_prefix_every_one_of_them_holds() {
        let (_d, m) = model();
        let rt = runtime();
        let prompt: Vec<u32> = (0..100u32).map(|i| (i * 13 + 3) % 500 + 1).collect();
        let mut one = m.new_state();
        let want = m.forward(&mut one, &prompt, Logits::Last).unwrap();
        let job = GroupJob {
            prompt: &prompt,
            embeddings: &[],
            chunk: 16,
            context_cache: true,
        };
        // Logits after the whole prompt, and the positions the group took from the caches.
        let run = |caches: [Option<&ContextCache>; 2]| -> (Vec<f32>, usize) {
            let group = ringbolt_transport::local::LocalGroup::ranks(2, 0, Duration::from_secs(30));
            let parts = run_ranks(group, &CancellationToken::new(), |t, abort| {
                prefill_rank_cached(rt.handle(), &m, None, job, caches[t.rank()], t, abort)
            })
            .unwrap();
            let mut done = local_prefill(parts).unwrap();
            assert_eq!(
                done.tokens, 96,
                "the group's part ends on the last boundary"
            );
            let logits = m
                .forward(&mut done.state, &prompt[done.tokens..], Logits::Last)
                .unwrap();
            (logits, done.cached_tokens)
        };
        let dir = tempfile::tempdir().unwrap();
        let a = ContextCache::new(1 << 30, None).unwrap();
        let budget = 4 << 20;
        let b = ContextCache::new(budget, Some(dir.path())).unwrap();
        let (cold, cached) = run([Some(&a), Some(&b)]);
        assert_eq!(cached, 0);
        assert!(rel_err(&cold, &want) <= 1e-5);
        let (warm, cached) = run([Some(&a), Some(&b)]);
        assert_eq!(cached, 96);
        assert_eq!(warm, cold, "from the shares, bit for bit");
        assert_eq!(a.stats().hits, 1, "rank 0 counts the group's lookups");
        // One rank without its share (a fresh cache; none at all): both prefill.
        let fresh = ContextCache::new(1 << 30, None).unwrap();
        assert_eq!(run([Some(&a), Some(&fresh)]), (cold.clone(), 0));
        assert_eq!(run([None, Some(&b)]), (cold.clone(), 0));
        // One rank's share damaged on disk: it says so in the second round; both prefill.
        let filler = ringbolt_model::prefix::Block {
            tokens: Vec::new(),
            lightning: Vec::new(),
            kv: vec![(
                vec![0.0; (budget - b.stats().bytes as usize) / 4 + 1],
                Vec::new(),
            )],
        };
        assert!(b.insert(1, 2, filler));
        assert_eq!(
            b.stats().spilled,
            1,
            "the share went to disk: {:?}",
            b.stats()
        );
        b.flush();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let p = f.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        }
        assert_eq!(run([Some(&a), Some(&b)]), (cold.clone(), 0));
        assert_eq!(b.stats().corrupt, 1);
    }

    #[test]
    fn ranks_over_tcp_equal_one_worker_and_finish_and_decode_with_the_keys_left_on_them() {
        let (_d, m) = model();
        let rt = runtime();
        let prompt: Vec<u32> = (0..211u32).map(|i| (i * 13 + 3) % 500 + 1).collect();
        // One worker's logits for the prompt and 64 greedy tokens after it.
        let mut one = m.new_state();
        let mut want = vec![m.forward(&mut one, &prompt, Logits::Last).unwrap()];
        for _ in 0..64 {
            let t = ringbolt_model::sampling::argmax(want.last().unwrap());
            want.push(m.forward(&mut one, &[t], Logits::Last).unwrap());
        }
        let p = 3;
        let (group, _) = rt
            .block_on(TcpTransport::loopback_group(
                p,
                1,
                Duration::from_secs(30),
                Default::default(),
            ))
            .unwrap();
        // The ranks prefill the first 180 positions; the decoding rank runs the other 31 in one
        // step through the keys left on the ranks (as the scheduler finishes a group's prefix).
        let part = 180;
        let layout = Layout::zigzag(part, p);
        let last = layout.last_rank();
        // The decoding rank's logits at every step and its keys per rank at the end.
        type Decoded = Option<(Vec<Vec<f32>>, Vec<usize>)>;
        let decoded: Vec<Decoded> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|t| {
                    let (layout, prompt, m, h) = (&layout, &prompt, &m, rt.handle());
                    let head = &prompt[..part];
                    s.spawn(move || {
                        let abort = CancellationToken::new();
                        let t = Arc::new(t);
                        let (rp, times) = prefill_rank(
                            h,
                            m,
                            None,
                            layout,
                            head,
                            &[],
                            StateExchange::Ring,
                            t.clone(),
                            &abort,
                        )
                        .unwrap();
                        assert!(times.sent > 0);
                        let (shard, state) = rp.into_shard().unwrap();
                        let Some(mut st) = state else {
                            // The other ranks serve their keys until the sequence is done.
                            serve_shard(h, m.backend(), shard, last, &*t, &abort).unwrap();
                            return None;
                        };
                        st.split = Some(Box::new(RemoteSplit::new(
                            h.clone(),
                            m,
                            shard,
                            layout,
                            t,
                            abort,
                        )));
                        let mut got =
                            vec![m.forward(&mut st, &prompt[part..], Logits::Last).unwrap()];
                        for _ in 0..64 {
                            let tok = ringbolt_model::sampling::argmax(got.last().unwrap());
                            got.push(m.forward(&mut st, &[tok], Logits::Last).unwrap());
                        }
                        let counts = st.split.as_ref().unwrap().tokens_per_rank(2);
                        Some((got, counts))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut decoders: Vec<_> = decoded.into_iter().flatten().collect();
        assert_eq!(decoders.len(), 1, "one rank decodes");
        let (got, counts) = decoders.pop().unwrap();
        for (step, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(rel_err(a, b) <= 1e-5, "step {step}");
        }
        // The keys stayed spread: 180 + 31 + 64 over three ranks.
        assert_eq!(counts.iter().sum::<usize>(), 211 + 64);
        assert!(counts.iter().all(|c| *c >= 91 && *c <= 92), "{counts:?}");
    }
}
