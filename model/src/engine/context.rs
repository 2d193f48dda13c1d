//! Context parallelism (design.md §4.1–4.2a): one prompt's prefill split among P ranks.
//!
//! [`Layout::zigzag`] cuts the prompt into 2P chunks and gives rank r chunks r and 2P−1−r, so
//! causal softmax work is balanced; the same layout holds for every layer, so hidden states
//! never move between ranks. A rank's prefill is driven layer by layer ([`RankPrefill`]): at
//! layer l it first computes what it can alone and returns what the other ranks need from it
//! ([`Share`]), then finishes the layer with what they sent:
//! - lightning layers (LASP): each chunk's intra-chunk output and its state contribution from
//!   a zero state, with no communication; the ranks exchange the chunk states (an all-gather of
//!   `[heads, d, d]` f32 per chunk, whatever the chunk's length); each rank folds the
//!   decay-weighted prefix state of each of its chunks in f32 and adds the inter-chunk term;
//! - softmax layers (ring attention): each chunk's keys and values (after RoPE at absolute
//!   positions) travel to the ranks whose queries come later; a rank attends its queries to
//!   each chunk as it arrives ([`RankPrefill::attend`], any order) and merges the partials by
//!   log-sum-exp.
//!
//! The result equals the single-worker forward pass up to float rounding (tests below). A
//! driver decides how shares travel (`ringbolt-context`: over a transport).

use super::{ExpertExecutor, LayerCache, Mixer, Model, SequenceState, SplitAttention};
use crate::config::LIGHTNING_NORM_EPS;
use crate::config::LayerKind;
use crate::error::{ModelError, Result};
use ringbolt_kernels::partial::fold_state;
use ringbolt_kernels::{AttentionShape, Backend, LightningShape, RopeParams};

/// A contiguous run of the context's tokens, owned by one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Its place among the layout's chunks (position order).
    pub index: usize,
    pub start: usize,
    pub len: usize,
    pub rank: usize,
}

/// How a context of `tokens` is split among `ranks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub tokens: usize,
    pub ranks: usize,
    /// Every chunk in position order (some may be empty when the context is short).
    pub chunks: Vec<Chunk>,
}

impl Layout {
    /// 2P chunks as even as possible (the first `tokens % 2P` one token longer); rank r holds
    /// chunks r and 2P−1−r.
    pub fn zigzag(tokens: usize, ranks: usize) -> Layout {
        let ranks = ranks.max(1);
        let n = 2 * ranks;
        let (base, extra) = (tokens / n, tokens % n);
        let mut start = 0;
        let chunks = (0..n)
            .map(|i| {
                let len = base + usize::from(i < extra);
                let c = Chunk {
                    index: i,
                    start,
                    len,
                    rank: if i < ranks { i } else { n - 1 - i },
                };
                start += len;
                c
            })
            .collect();
        Layout {
            tokens,
            ranks,
            chunks,
        }
    }

    /// Rank `r`'s non-empty chunks, in position order.
    pub fn of_rank(&self, r: usize) -> Vec<Chunk> {
        self.chunks
            .iter()
            .filter(|c| c.rank == r && c.len > 0)
            .copied()
            .collect()
    }

    /// Tokens rank `r` holds.
    pub fn rank_tokens(&self, r: usize) -> usize {
        self.of_rank(r).iter().map(|c| c.len).sum()
    }

    /// The rank holding the context's last token.
    pub fn last_rank(&self) -> usize {
        self.chunks
            .iter()
            .rev()
            .find(|c| c.len > 0)
            .map_or(0, |c| c.rank)
    }

    /// Causal softmax work of rank `r` (query–key pairs), for balance reports.
    pub fn softmax_work(&self, r: usize) -> u64 {
        self.of_rank(r)
            .iter()
            .map(|c| {
                let (s, n) = (c.start as u64, c.len as u64);
                n * s + n * (n + 1) / 2
            })
            .sum()
    }
}

/// Rows of a rank's MoE step at once (a rank's chunks may hold millions of rows).
pub const MOE_BLOCK_ROWS: usize = 16_384;

/// What a rank sends the others for one layer.
#[derive(Debug, Clone)]
pub enum Share {
    /// Lightning: each of its chunks' state contribution (`[heads, d, d]` f32, from a zero
    /// state, decayed to the chunk's end), by chunk index.
    States(Vec<(usize, Vec<f32>)>),
    /// Softmax: each of its chunks' keys (after RoPE) and values (`[len, kv_heads·d]` f32).
    KeysValues(Vec<(Chunk, Vec<f32>, Vec<f32>)>),
}

/// A partial attention: output and log-sum-exp (see [`Backend::attention_partial`]).
type Partial<B> = (<B as Backend>::Buf, Vec<f32>);

/// A layer between its two halves.
enum Pending<B: Backend> {
    Lightning {
        a: B::Buf,
        /// Per own chunk: its activated qkv and its output from a zero state.
        parts: Vec<(B::Buf, B::Buf)>,
    },
    Softmax {
        a: B::Buf,
        /// Per own chunk: its queries (after RoPE) and the partials gathered so far.
        parts: Vec<(B::Buf, Vec<Partial<B>>)>,
    },
}

/// A chunk's keys and values on the backend.
type KeptChunk<B> = (Chunk, <B as Backend>::Buf, <B as Backend>::Buf);

/// What a rank keeps of a layer after prefill (for decode).
pub enum Kept<B: Backend> {
    /// The state of the whole context (every chunk folded): the same on every rank.
    Lightning(Vec<f32>),
    /// This rank's keys and values, per own chunk.
    Softmax(Vec<KeptChunk<B>>),
}

/// One rank's part of a context-parallel prefill, stepped layer by layer.
pub struct RankPrefill<'m, B: Backend> {
    model: &'m Model<B>,
    /// Where its MoE layers run (None: the model's own experts).
    experts: Option<&'m (dyn ExpertExecutor<B> + Sync)>,
    layout: Layout,
    rank: usize,
    own: Vec<Chunk>,
    /// Hidden states of the own chunks' rows, in chunk order.
    h: B::Buf,
    rows: usize,
    layer: usize,
    pending: Option<Pending<B>>,
    kept: Vec<Kept<B>>,
    /// Rows per MoE step ([`MOE_BLOCK_ROWS`]).
    moe_block: usize,
}

impl<B: Backend> Model<B> {
    /// Rank `rank`'s part of the prefill of `prompt` split by `layout`, its MoE layers on
    /// `experts` (None: the model's own).
    pub fn rank_prefill<'m>(
        &'m self,
        layout: &Layout,
        rank: usize,
        prompt: &[u32],
        experts: Option<&'m (dyn ExpertExecutor<B> + Sync)>,
    ) -> Result<RankPrefill<'m, B>> {
        self.rank_prefill_with(layout, rank, prompt, &[], experts)
    }

    /// [`rank_prefill`](Self::rank_prefill) of a prompt whose token embeddings `embeddings`
    /// replace at some positions (images' features: (first position, `[n, H]` rows), as
    /// [`SequenceState::set_embeddings`](crate::SequenceState::set_embeddings) takes them).
    pub fn rank_prefill_with<'m>(
        &'m self,
        layout: &Layout,
        rank: usize,
        prompt: &[u32],
        embeddings: &[(usize, Vec<f32>)],
        experts: Option<&'m (dyn ExpertExecutor<B> + Sync)>,
    ) -> Result<RankPrefill<'m, B>> {
        if rank >= layout.ranks || prompt.len() != layout.tokens {
            return Err(ModelError::Invalid(format!(
                "rank {rank} of a {}-rank layout of {} tokens, for a {}-token prompt",
                layout.ranks,
                layout.tokens,
                prompt.len()
            )));
        }
        if experts.is_none() && !self.has_experts() {
            return Err(ModelError::Invalid(
                "this model was loaded without experts and no expert executor was given".into(),
            ));
        }
        self.check_tokens(0, prompt)?;
        let own = layout.of_rank(rank);
        let ids: Vec<u32> = own
            .iter()
            .flat_map(|c| prompt[c.start..c.start + c.len].iter().copied())
            .collect();
        let rows = ids.len();
        let hsz = self.cfg.hidden_size;
        let mut h = if rows > 0 {
            self.backend.weight_rows(&self.embed, &ids, hsz)
        } else {
            self.backend.zeros(0)
        };
        if !embeddings.is_empty() && rows > 0 {
            let mut host = self.backend.host_view(&h).into_owned();
            let mut at = 0;
            let mut any = false;
            for c in &own {
                let dst = &mut host[at * hsz..(at + c.len) * hsz];
                any |= crate::engine::patch_rows(embeddings, c.start, c.len, dst, hsz);
                at += c.len;
            }
            if any {
                h = self.backend.upload_owned(host);
            }
        }
        Ok(RankPrefill {
            model: self,
            experts,
            layout: layout.clone(),
            rank,
            own,
            h,
            rows,
            layer: 0,
            pending: None,
            kept: Vec::new(),
            moe_block: MOE_BLOCK_ROWS,
        })
    }
}

impl<'m, B: Backend> RankPrefill<'m, B> {
    /// The layer the next [`begin_layer`](Self::begin_layer) runs.
    pub fn layer(&self) -> usize {
        self.layer
    }

    pub fn done(&self) -> bool {
        self.layer == self.model.layers.len()
    }

    fn shape(&self) -> (LightningShape, AttentionShape) {
        let cfg = &self.model.cfg;
        (
            LightningShape {
                heads: cfg.num_heads,
                head_dim: cfg.head_dim,
                block: cfg.block_size,
            },
            AttentionShape {
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
        )
    }

    /// Row offset of each own chunk in `h`.
    fn offsets(&self) -> Vec<usize> {
        self.own
            .iter()
            .scan(0, |r, c| {
                let s = *r;
                *r += c.len;
                Some(s)
            })
            .collect()
    }

    /// The current layer's first half: what this rank computes alone. Returns what the other
    /// ranks need from it.
    pub fn begin_layer(&mut self) -> Share {
        let model = self.model;
        let (b, cfg) = (&model.backend, &model.cfg);
        let layer = &model.layers[self.layer];
        let (hsz, nh, nkv, d) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        let (lshape, _) = self.shape();
        let offsets = self.offsets();
        if self.rows == 0 {
            self.pending = Some(match layer.mixer {
                Mixer::Lightning { .. } => Pending::Lightning {
                    a: b.zeros(0),
                    parts: Vec::new(),
                },
                Mixer::Softmax { .. } => {
                    self.kept.push(Kept::Softmax(Vec::new()));
                    Pending::Softmax {
                        a: b.zeros(0),
                        parts: Vec::new(),
                    }
                }
            });
            return match layer.mixer {
                Mixer::Lightning { .. } => Share::States(Vec::new()),
                Mixer::Softmax { .. } => Share::KeysValues(Vec::new()),
            };
        }
        let a = b.rms_norm(&self.h, &layer.input_norm, hsz, cfg.rms_norm_eps);
        match &layer.mixer {
            Mixer::Lightning { qkv, decay, .. } => {
                let mut p = b.linear(&a, qkv, self.rows, hsz, 3 * nh * d);
                b.silu_inplace(&mut p);
                let mut parts = Vec::new();
                let mut states = Vec::new();
                for (c, &r0) in self.own.iter().zip(&offsets) {
                    let pc = b.rows(&p, r0, c.len, 3 * nh * d);
                    let mut st = b.zeros(nh * d * d);
                    let o0 = b.lightning(&pc, c.len, lshape, decay, &mut st);
                    states.push((c.index, b.download(&st)));
                    parts.push((pc, o0));
                }
                self.pending = Some(Pending::Lightning { a, parts });
                Share::States(states)
            }
            Mixer::Softmax { q, k, v, .. } => {
                let qa = b.linear(&a, q, self.rows, hsz, nh * d);
                let ka = b.linear(&a, k, self.rows, hsz, nkv * d);
                let va = b.linear(&a, v, self.rows, hsz, nkv * d);
                let rope = RopeParams {
                    head_dim: d,
                    rotary_dim: cfg.rotary_dim,
                    theta: cfg.rope_theta,
                };
                let mut parts = Vec::new();
                let mut kvs = Vec::new();
                let mut kept = Vec::new();
                for (c, &r0) in self.own.iter().zip(&offsets) {
                    let mut qs = b.rows(&qa, r0, c.len, nh * d);
                    let mut ks = b.rows(&ka, r0, c.len, nkv * d);
                    let vs = b.rows(&va, r0, c.len, nkv * d);
                    b.rope_inplace(&mut qs, c.len, nh, c.start, rope);
                    b.rope_inplace(&mut ks, c.len, nkv, c.start, rope);
                    kvs.push((*c, b.download(&ks), b.download(&vs)));
                    kept.push((*c, ks, vs));
                    parts.push((qs, Vec::new()));
                }
                self.pending = Some(Pending::Softmax { a, parts });
                self.kept.push(Kept::Softmax(kept));
                Share::KeysValues(kvs)
            }
        }
    }

    /// Softmax layers: attends this rank's queries to chunk `from`'s keys and values (its own
    /// included; chunks arrive in any order; chunks after all of its queries are skipped).
    pub fn attend(&mut self, from: Chunk, k: &[f32], v: &[f32]) {
        let b = &self.model.backend;
        let (_, shape) = self.shape();
        let Some(Pending::Softmax { parts, .. }) = self.pending.as_mut() else {
            return;
        };
        if from.len == 0 {
            return;
        }
        let (kb, vb) = (b.upload(k), b.upload(v));
        for (c, (q, partials)) in self.own.iter().zip(parts.iter_mut()) {
            if from.start > c.start + c.len - 1 {
                continue;
            }
            partials.push(
                b.attention_partial(q, c.len, c.start, &kb, &vb, from.len, from.start, shape),
            );
        }
    }

    /// The current layer's second half. Lightning layers take every chunk's state (`states[i]`
    /// for chunk i; empty chunks may be absent or empty: the all-gather exchange) and fold each
    /// own chunk's prefix from them; softmax layers merge what [`attend`](Self::attend)
    /// gathered.
    pub fn finish_layer(&mut self, states: &[Option<Vec<f32>>]) -> Result<()> {
        let lightning = if self.lightning_decay().is_none() {
            None
        } else {
            let want = self.state_len();
            // States come from other ranks: one of another size is refused, not folded.
            for (i, s) in states.iter().enumerate() {
                let n = s.as_ref().map_or(0, Vec::len);
                if n != 0 && n != want {
                    return Err(ModelError::Invalid(format!(
                        "layer {}: chunk {i}'s state has {n} values, {want} expected",
                        self.layer
                    )));
                }
            }
            let state_of = |i: usize| states.get(i).and_then(|s| s.as_deref());
            // The prefix state of chunk i: every earlier chunk's contribution, decayed.
            let mut prefix = vec![0f32; want];
            let mut next = 0;
            let mut prefixes = Vec::new();
            for c in &self.own {
                for ch in &self.layout.chunks[next..c.index] {
                    self.fold(ch.index, &mut prefix, state_of(ch.index));
                }
                next = c.index;
                prefixes.push(prefix.clone());
            }
            // The whole context's state, for decode.
            let mut whole = prefix;
            for ch in &self.layout.chunks[next..] {
                self.fold(ch.index, &mut whole, state_of(ch.index));
            }
            Some((prefixes, whole))
        };
        self.finish(lightning)
    }

    /// The current lightning layer's second half given each own chunk's prefix state (in
    /// own-chunk order) and, where this rank has it, the whole context's state (the ring
    /// exchange: see [`fold`](Self::fold)).
    pub fn finish_layer_prefixes(
        &mut self,
        prefixes: Vec<Vec<f32>>,
        whole: Option<Vec<f32>>,
    ) -> Result<()> {
        let want = self.state_len();
        if self.lightning_decay().is_none()
            || prefixes.len() != self.own.len()
            || prefixes.iter().any(|p| p.len() != want)
            || whole.as_ref().is_some_and(|w| w.len() != want)
        {
            return Err(ModelError::Invalid(format!(
                "layer {}: {} prefix states for {} chunks",
                self.layer,
                prefixes.len(),
                self.own.len()
            )));
        }
        self.finish(Some((prefixes, whole.unwrap_or_default())))
    }

    /// Values of one lightning state (`[heads, d, d]`).
    pub fn state_len(&self) -> usize {
        let c = &self.model.cfg;
        c.num_heads * c.head_dim * c.head_dim
    }

    /// The state after chunk `index` (of the layout) given the state before it: `prefix` decayed
    /// over the chunk plus the chunk's own contribution (None: an empty chunk's). The ring
    /// exchange passes this from each chunk's rank to the next chunk's.
    pub fn fold(&self, index: usize, prefix: &mut [f32], contribution: Option<&[f32]>) {
        let Some(decay) = self.lightning_decay() else {
            return;
        };
        let len = self.layout.chunks.get(index).map_or(0, |c| c.len);
        let zero;
        let contribution = match contribution {
            Some(c) if c.len() == prefix.len() => c,
            _ => {
                zero = vec![0f32; prefix.len()];
                &zero
            }
        };
        fold_state(prefix, len, contribution, decay, self.model.cfg.head_dim);
    }

    /// The current layer's per-head decay rates, if it is a lightning layer.
    fn lightning_decay(&self) -> Option<&'m [f32]> {
        match &self.model.layers.get(self.layer)?.mixer {
            Mixer::Lightning { decay, .. } => Some(decay),
            _ => None,
        }
    }

    /// The second half of the current layer; lightning layers with each own chunk's prefix
    /// state and the whole context's (empty where this rank does not have it).
    fn finish(&mut self, lightning: Option<(Vec<Vec<f32>>, Vec<f32>)>) -> Result<()> {
        let model = self.model;
        let (b, cfg) = (&model.backend, &model.cfg);
        let l = self.layer;
        let layer = &model.layers[l];
        let (hsz, nh, d) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim);
        let (lshape, ashape) = self.shape();
        let pending = self
            .pending
            .take()
            .ok_or_else(|| ModelError::Invalid(format!("layer {l} was not begun")))?;
        let mix = match (pending, &layer.mixer) {
            (
                Pending::Lightning { a, parts },
                Mixer::Lightning {
                    gate,
                    norm,
                    out,
                    decay,
                    ..
                },
            ) => {
                let (prefixes, whole) = lightning.ok_or_else(|| {
                    ModelError::Invalid(format!("layer {l}: no lightning states"))
                })?;
                let mut outs = Vec::new();
                for ((c, (pc, o0)), prefix) in self.own.iter().zip(&parts).zip(&prefixes) {
                    let inter = b.lightning_prefix(pc, c.len, lshape, decay, prefix);
                    outs.push(b.axpby(1.0, o0, 1.0, &inter));
                }
                self.kept.push(Kept::Lightning(whole));
                if self.rows == 0 {
                    None
                } else {
                    let o = concat(b, outs);
                    let mut y = b.rms_norm(&o, norm, nh * d, LIGHTNING_NORM_EPS);
                    let g = b.linear(&a, gate, self.rows, hsz, nh * d);
                    b.sigmoid_gate_inplace(&mut y, &g);
                    Some((a, b.linear(&y, out, self.rows, nh * d, hsz)))
                }
            }
            (Pending::Softmax { a, parts }, Mixer::Softmax { o, .. }) => {
                if self.rows == 0 {
                    None
                } else {
                    let mut outs = Vec::new();
                    for (c, (_, partials)) in self.own.iter().zip(&parts) {
                        if partials.is_empty() {
                            return Err(ModelError::Invalid(format!(
                                "layer {l}: chunk {} attended to no keys (its own were not sent)",
                                c.index
                            )));
                        }
                        outs.push(b.attention_merge(partials, c.len, ashape).0);
                    }
                    let att = concat(b, outs);
                    Some((a, b.linear(&att, o, self.rows, nh * d, hsz)))
                }
            }
            _ => {
                return Err(ModelError::Invalid(format!(
                    "layer {l}: the shares do not match the layer's kind"
                )));
            }
        };
        if let Some((a, mix)) = mix {
            let (alpha, beta) = cfg.attn_factors(l);
            let h1 = b.axpby(alpha, if cfg.postnorm { &a } else { &self.h }, beta, &mix);
            let n2 = b.rms_norm(&h1, &layer.post_norm, hsz, cfg.rms_norm_eps);
            let experts = self.experts.map(|e| e as &dyn ExpertExecutor<B>);
            // The MoE in blocks of rows: a rank may hold millions, and one block's routed rows
            // (and, with remote experts, one exchange) stay bounded.
            let block = self.moe_block.max(1);
            let moe = if self.rows <= block {
                model.moe(l, layer, &n2, self.rows, experts)?
            } else {
                let mut parts = Vec::with_capacity(self.rows.div_ceil(block));
                for r0 in (0..self.rows).step_by(block) {
                    let n = block.min(self.rows - r0);
                    let x = b.rows(&n2, r0, n, hsz);
                    parts.push(model.moe(l, layer, &x, n, experts)?);
                }
                b.concat_rows(&parts)
            };
            self.h = b.axpby(
                cfg.mlp_alpha,
                if cfg.postnorm { &n2 } else { &h1 },
                cfg.mlp_beta,
                &moe,
            );
        }
        self.layer += 1;
        Ok(())
    }

    /// Logits of the context's last position, on the rank that holds it (after every layer).
    pub fn last_logits(&self) -> Option<Vec<f32>> {
        let last = self.own.last()?;
        if !self.done() || last.start + last.len != self.layout.tokens {
            return None;
        }
        let x = self
            .model
            .backend
            .rows(&self.h, self.rows - 1, 1, self.model.cfg.hidden_size);
        Some(self.model.lm_head(&x, 1))
    }

    /// What this rank keeps per layer for decode.
    pub fn kept(&self) -> &[Kept<B>] {
        &self.kept
    }

    /// Bytes of softmax keys and values this rank holds (f32).
    pub fn cache_bytes(&self) -> usize {
        let b = &self.model.backend;
        self.kept
            .iter()
            .map(|k| match k {
                Kept::Softmax(kv) => kv
                    .iter()
                    .map(|(_, k, v)| (b.len(k) + b.len(v)) * 4)
                    .sum::<usize>(),
                Kept::Lightning(_) => 0,
            })
            .sum()
    }
}

fn concat<B: Backend>(b: &B, mut parts: Vec<B::Buf>) -> B::Buf {
    if parts.len() == 1 {
        parts.pop().unwrap_or_else(|| b.zeros(0))
    } else {
        b.concat_rows(&parts)
    }
}

impl<B: Backend> RankPrefill<'_, B> {
    /// Which rank this is.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Rows per MoE step (default [`MOE_BLOCK_ROWS`]).
    pub fn set_moe_block_rows(&mut self, rows: usize) {
        self.moe_block = rows.max(1);
    }
}

/// Keys and values `[rows, kv_heads·d]` of consecutive or scattered positions (decode
/// attends to all of them, so their order does not matter).
struct Segment<B: Backend> {
    k: B::Buf,
    v: B::Buf,
    rows: usize,
}

/// One rank's share of a sequence's softmax keys and values, kept where the prefill put it
/// for decode: per softmax layer its chunks' keys and values, and the decode tokens appended
/// to it since.
pub struct KvShard<B: Backend> {
    /// Per layer (empty for lightning layers): the prefill's chunks, then the decode tail.
    layers: Vec<Vec<Segment<B>>>,
    /// Per layer: whether the last segment is the decode tail.
    tail: Vec<bool>,
    /// Per layer: whether it is a softmax layer.
    softmax: Vec<bool>,
    shape: AttentionShape,
}

impl<B: Backend> KvShard<B> {
    /// The share a prefill left: per layer of `cfg`, its segments (none for lightning layers).
    fn new(cfg: &crate::config::ModelConfig, layers: Vec<Vec<Segment<B>>>) -> Self {
        KvShard {
            tail: vec![false; layers.len()],
            softmax: cfg
                .layers
                .iter()
                .map(|k| *k == LayerKind::Softmax)
                .collect(),
            shape: AttentionShape {
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
            layers,
        }
    }

    /// Keys of `layer` held here.
    pub fn tokens(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .map_or(0, |s| s.iter().map(|g| g.rows).sum())
    }

    /// Per softmax layer, the keys and values the prefill put here (its segments' rows in
    /// order); None once decode tokens were appended.
    fn prefilled(&self, b: &B) -> Option<Vec<(Vec<f32>, Vec<f32>)>> {
        if self.tail.iter().any(|t| *t) {
            return None;
        }
        Some(
            self.layers
                .iter()
                .zip(&self.softmax)
                .filter(|(_, softmax)| **softmax)
                .map(|(segs, _)| {
                    let (mut k, mut v) = (Vec::new(), Vec::new());
                    for g in segs {
                        k.extend(b.download(&g.k));
                        v.extend(b.download(&g.v));
                    }
                    (k, v)
                })
                .collect(),
        )
    }

    /// The attention's heads and widths.
    pub fn shape(&self) -> AttentionShape {
        self.shape
    }

    /// Bytes of keys and values held here (f32).
    pub fn bytes(&self) -> usize {
        let w = self.shape.kv_heads * self.shape.head_dim;
        (0..self.layers.len())
            .map(|l| self.tokens(l) * w * 2 * 4)
            .sum()
    }

    /// The partial attention (output `[n, heads·d]` and log-sum-exp `[n, heads]`) of `n`
    /// queries `q` (after RoPE) at the positions after every key held here, over the keys of
    /// `layer` held here, after appending the new tokens' keys and values (`n` rows each) when
    /// `append` is given: the queries see every earlier key and, causally, the appended ones.
    /// None when nothing is held.
    pub fn attend(
        &mut self,
        b: &B,
        layer: usize,
        q: &B::Buf,
        n: usize,
        append: Option<(B::Buf, B::Buf)>,
    ) -> Option<(B::Buf, Vec<f32>)> {
        let segs = self.layers.get_mut(layer)?;
        let appended = append.is_some();
        if let Some((k, v)) = append {
            if self.tail[layer]
                && let Some(t) = segs.last_mut()
            {
                t.k = b.concat_rows(&[std::mem::replace(&mut t.k, b.zeros(0)), k]);
                t.v = b.concat_rows(&[std::mem::replace(&mut t.v, b.zeros(0)), v]);
                t.rows += n;
            } else {
                segs.push(Segment { k, v, rows: n });
                self.tail[layer] = true;
            }
        }
        let last = segs.len().saturating_sub(1);
        // The queries come after every key held; of the segment just appended to, its last
        // `n` keys are the queries' own (causal among themselves).
        let parts: Vec<(B::Buf, Vec<f32>)> = segs
            .iter()
            .enumerate()
            .filter(|(_, g)| g.rows > 0)
            .map(|(i, g)| {
                let q_pos0 = if appended && i == last {
                    g.rows - n
                } else {
                    g.rows
                };
                b.attention_partial(q, n, q_pos0, &g.k, &g.v, g.rows, 0, self.shape)
            })
            .collect();
        match parts.len() {
            0 => None,
            1 => parts.into_iter().next(),
            _ => Some(b.attention_merge(&parts, n, self.shape)),
        }
    }
}

impl<'m, B: Backend> RankPrefill<'m, B> {
    /// Ends the prefill keeping this rank's keys and values where they are (distributed
    /// decode): its share, and on the rank holding the whole context's lightning states (the
    /// one that decodes) the sequence state to decode from, its softmax caches empty (its
    /// softmax layers attend through a [`SplitAttention`] over every rank's share).
    pub fn into_shard(self) -> Result<(KvShard<B>, Option<SequenceState<B>>)> {
        let model = self.model;
        let b = &model.backend;
        if !self.done() {
            return Err(ModelError::Invalid(format!(
                "the prefill stopped at layer {} of {}",
                self.layer,
                model.layers.len()
            )));
        }
        let mut st = model.new_state();
        let mut whole_everywhere = true;
        let mut layers = Vec::with_capacity(self.kept.len());
        for (cache, kept) in st.layers.iter_mut().zip(self.kept) {
            match (cache, kept) {
                (LayerCache::Lightning(s), Kept::Lightning(whole)) => {
                    if whole.is_empty() {
                        whole_everywhere = false;
                    } else {
                        *s = b.upload(&whole);
                    }
                    layers.push(Vec::new());
                }
                (LayerCache::Softmax { .. }, Kept::Softmax(own)) => layers.push(
                    own.into_iter()
                        .map(|(c, k, v)| Segment { k, v, rows: c.len })
                        .collect(),
                ),
                _ => {
                    return Err(ModelError::Invalid(
                        "what was kept does not match the layers' kinds".into(),
                    ));
                }
            }
        }
        st.pos = self.layout.tokens;
        let decodes = whole_everywhere && self.layout.last_rank() == self.rank;
        Ok((KvShard::new(&model.cfg, layers), decodes.then_some(st)))
    }
}

/// Which rank keeps a decode token's key and value: the one holding the fewest keys of the
/// layer (the lowest such rank), so that memory stays balanced.
pub fn holder(tokens: &[usize]) -> usize {
    tokens
        .iter()
        .enumerate()
        .min_by_key(|(r, t)| (**t, *r))
        .map_or(0, |(r, _)| r)
}

/// A [`SplitAttention`] over shards all in this process (the ranks of an in-process group,
/// and the reference for the remote one).
pub struct LocalSplit<B: Backend> {
    pub shards: Vec<KvShard<B>>,
}

impl<B: Backend> SplitAttention<B> for LocalSplit<B> {
    fn attend(
        &mut self,
        b: &B,
        layer: usize,
        q: &B::Buf,
        n: usize,
        k: B::Buf,
        v: B::Buf,
    ) -> Result<B::Buf> {
        let counts: Vec<usize> = self.shards.iter().map(|s| s.tokens(layer)).collect();
        let h = holder(&counts);
        let mut append = Some((k, v));
        let mut parts = Vec::new();
        let mut shape = None;
        for (r, s) in self.shards.iter_mut().enumerate() {
            shape = Some(s.shape);
            let a = if r == h { append.take() } else { None };
            parts.extend(s.attend(b, layer, q, n, a));
        }
        let shape = shape.ok_or_else(|| ModelError::Invalid("no shards".into()))?;
        Ok(b.attention_merge(&parts, n, shape).0)
    }

    fn tokens_per_rank(&self, layer: usize) -> Vec<usize> {
        self.shards.iter().map(|s| s.tokens(layer)).collect()
    }
}

/// How many of a `tokens`-token prompt's positions the ranks of a context-parallel group
/// prefill together: up to the last context cache boundary (a multiple of `chunk`) before its
/// last token; the decoding rank prefills the rest, under `chunk` tokens, attending through
/// the split keys and values. The group's part is then a prefix that later prompts sharing it
/// can take from the cache, and it is the same whether the cache is on or not. A prompt of at
/// most one chunk is the group's whole.
pub fn group_prefix(tokens: usize, chunk: usize) -> usize {
    let chunk = chunk.max(1);
    match tokens.saturating_sub(1) / chunk * chunk {
        0 => tokens,
        n => n,
    }
}

impl<B: Backend> Model<B> {
    /// The context cache's block of one rank's share of a context-parallel prefill of
    /// `tokens` (the positions its layout covers): the share's keys and values as the prefill
    /// left them and, given the decoding rank's `state`, every lightning state. None once
    /// tokens were appended to the share or the state.
    pub fn share_block(
        &self,
        shard: &KvShard<B>,
        state: Option<&SequenceState<B>>,
        tokens: &[u32],
    ) -> Option<crate::prefix::Block> {
        if state.is_some_and(|st| st.pos != tokens.len()) {
            return None;
        }
        Some(crate::prefix::Block {
            tokens: tokens.to_vec(),
            lightning: state.map_or_else(Vec::new, |st| self.lightning_states(st)),
            kv: shard.prefilled(&self.backend)?,
        })
    }

    /// Rank `rank`'s share as [`share_block`](Self::share_block) kept it, split as `layout`
    /// (of the block's tokens) splits it, and on the layout's last rank (the one that
    /// decodes) the state to decode from: what [`RankPrefill::into_shard`] left, bit for bit.
    pub fn restore_share(
        &self,
        blk: &crate::prefix::Block,
        layout: &Layout,
        rank: usize,
    ) -> Result<(KvShard<B>, Option<SequenceState<B>>)> {
        let b = &self.backend;
        let bad = |why: String| {
            Err(ModelError::Invalid(format!(
                "a context cache share does not fit the model: {why}"
            )))
        };
        if rank >= layout.ranks
            || blk.tokens.len() != layout.tokens
            || blk.kv.len() != self.cfg.layers_of(LayerKind::Softmax)
        {
            return bad(format!(
                "rank {rank} of {}: {} tokens for {}, {} softmax layers",
                layout.ranks,
                blk.tokens.len(),
                layout.tokens,
                blk.kv.len()
            ));
        }
        let own = layout.of_rank(rank);
        let rows: usize = own.iter().map(|c| c.len).sum();
        let width = self.cfg.num_kv_heads * self.cfg.head_dim;
        let mut kv = blk.kv.iter();
        let mut layers = Vec::with_capacity(self.cfg.num_layers());
        for (l, kind) in self.cfg.layers.iter().enumerate() {
            let mut segs = Vec::new();
            if *kind == LayerKind::Softmax
                && let Some((k, v)) = kv.next()
            {
                if k.len() != rows * width || v.len() != rows * width {
                    return bad(format!("the keys of layer {l}"));
                }
                let mut row = 0;
                for c in &own {
                    let span = row * width..(row + c.len) * width;
                    segs.push(Segment {
                        k: b.upload(&k[span.clone()]),
                        v: b.upload(&v[span]),
                        rows: c.len,
                    });
                    row += c.len;
                }
            }
            layers.push(segs);
        }
        let state = if rank == layout.last_rank() {
            match self.state_with_lightning(&blk.lightning, layout.tokens) {
                Some(st) => Some(st),
                None => return bad("the decoding rank's lightning states".into()),
            }
        } else {
            None
        };
        Ok((KvShard::new(&self.cfg, layers), state))
    }
}

/// The sequence state to decode from after the ranks of a context-parallel prefill ran in
/// one process: the decoding rank's, attending through a [`LocalSplit`] over every rank's
/// share (the keys and values stay where each rank put them, as on the GPUs of one node).
pub fn local_split_state<B: Backend + 'static>(
    ranks: Vec<RankPrefill<'_, B>>,
) -> Result<SequenceState<B>> {
    let mut shards = Vec::with_capacity(ranks.len());
    let mut decoding = None;
    for r in ranks {
        let (shard, st) = r.into_shard()?;
        shards.push(shard);
        decoding = decoding.or(st);
    }
    let mut st =
        decoding.ok_or_else(|| ModelError::Invalid("no rank holds the last position".into()))?;
    st.split = Some(Box::new(LocalSplit { shards }));
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::config::LayerKind;
    use crate::engine::Logits;
    use crate::writer::{Preset, WeightDtype, write_random_checkpoint};
    use ringbolt_kernels::cpu::Cpu;

    /// A context-parallel prefill of `prompt` over `ranks` ranks run in turn in this thread (every
    /// share goes to every rank, as an all-gather would carry it): the reference for the math;
    /// `ringbolt-context` drives ranks over a transport. Returns the last position's
    /// logits and each rank's prefill (its kept caches).
    fn prefill<'m, B: Backend>(
        model: &'m Model<B>,
        prompt: &[u32],
        ranks: usize,
    ) -> Result<(Vec<f32>, Vec<RankPrefill<'m, B>>)> {
        prefill_with(model, prompt, &[], ranks)
    }

    /// [`prefill`] with embeddings replaced at some positions.
    fn prefill_with<'m, B: Backend>(
        model: &'m Model<B>,
        prompt: &[u32],
        embeddings: &[(usize, Vec<f32>)],
        ranks: usize,
    ) -> Result<(Vec<f32>, Vec<RankPrefill<'m, B>>)> {
        let layout = Layout::zigzag(prompt.len(), ranks);
        let mut rs: Vec<RankPrefill<'m, B>> = (0..layout.ranks)
            .map(|r| model.rank_prefill_with(&layout, r, prompt, embeddings, None))
            .collect::<Result<_>>()?;
        // MoE steps in blocks of a few rows (a rank's millions of rows in blocks).
        for r in rs.iter_mut() {
            r.set_moe_block_rows(13);
        }
        for l in 0..model.layers.len() {
            let shares: Vec<Share> = rs.iter_mut().map(|r| r.begin_layer()).collect();
            match model.cfg.layers[l] {
                LayerKind::Lightning => {
                    let mut states = vec![None; layout.chunks.len()];
                    for s in shares {
                        if let Share::States(v) = s {
                            for (i, st) in v {
                                states[i] = Some(st);
                            }
                        }
                    }
                    for r in rs.iter_mut() {
                        r.finish_layer(&states)?;
                    }
                }
                LayerKind::Softmax => {
                    for s in &shares {
                        if let Share::KeysValues(v) = s {
                            for (c, k, vv) in v {
                                for r in rs.iter_mut() {
                                    r.attend(*c, k, vv);
                                }
                            }
                        }
                    }
                    for r in rs.iter_mut() {
                        r.finish_layer(&[])?;
                    }
                }
            }
        }
        let logits = rs
            .iter()
            .find_map(|r| r.last_logits())
            .ok_or_else(|| ModelError::Invalid("no rank holds the last position".into()))?;
        Ok((logits, rs))
    }

    #[test]
    fn zigzag_covers_every_token_once_and_balances_causal_work() {
        for (tokens, ranks) in [(0, 1), (5, 4), (37, 4), (1000, 3), (1 << 20, 4), (7, 1)] {
            let l = Layout::zigzag(tokens, ranks);
            assert_eq!(l.chunks.len(), 2 * ranks);
            let mut next = 0;
            for (i, c) in l.chunks.iter().enumerate() {
                assert_eq!((c.index, c.start), (i, next));
                next += c.len;
            }
            assert_eq!(next, tokens);
            let total: usize = (0..ranks).map(|r| l.rank_tokens(r)).sum();
            assert_eq!(total, tokens);
            assert!(
                l.chunks
                    .iter()
                    .all(|c| l.chunks[2 * ranks - 1 - c.index].rank == c.rank)
            );
        }
        // Softmax work of the slowest rank within 1% of the mean at P = 4 on a long context.
        let l = Layout::zigzag(65_536, 4);
        let work: Vec<u64> = (0..4).map(|r| l.softmax_work(r)).collect();
        let mean = work.iter().sum::<u64>() as f64 / 4.0;
        let max = *work.iter().max().unwrap() as f64;
        assert!(max / mean < 1.01, "{work:?}");
    }

    fn model(softmax_every: usize) -> (tempfile::TempDir, Model<Cpu>) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Preset::Tiny.config();
        // Several softmax layers among the lightning ones.
        cfg.layers = (0..cfg.layers.len())
            .map(|l| {
                if l % softmax_every == softmax_every - 1 {
                    LayerKind::Softmax
                } else {
                    LayerKind::Lightning
                }
            })
            .collect();
        write_random_checkpoint(&cfg, 11, WeightDtype::F32, dir.path(), None).unwrap();
        let m = Model::load(&Checkpoint::open(dir.path()).unwrap(), Cpu::default()).unwrap();
        (dir, m)
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let max = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max
    }

    #[test]
    fn context_parallel_prefill_equals_one_worker() {
        let (_d, m) = model(3);
        let block = m.config().block_size;
        // Lengths: shorter than 2P (empty chunks), chunks shorter than the block, uneven chunks,
        // several blocks per chunk.
        for n in [3usize, 5, 37, block * 8 + 3, 301] {
            let prompt: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 11) % 500 + 1).collect();
            let mut st = m.new_state();
            let want = m.forward(&mut st, &prompt, Logits::Last).unwrap();
            for p in 1..=4 {
                let (got, ranks) = prefill(&m, &prompt, p).unwrap();
                let e = rel_err(&got, &want);
                assert!(e <= 1e-5, "n={n} P={p}: relative error {e}");
                // Decoding on from the gathered state equals decoding on from one worker's.
                let mut cp = local_split_state(ranks).unwrap();
                let mut one = m.new_state();
                m.forward(&mut one, &prompt, Logits::None).unwrap();
                let t = crate::sampling::argmax(&want);
                let a = m.forward(&mut cp, &[t], Logits::Last).unwrap();
                let b = m.forward(&mut one, &[t], Logits::Last).unwrap();
                assert!(rel_err(&a, &b) <= 1e-5, "n={n} P={p}: decode after prefill");
            }
        }
    }

    /// Images' features (rows that replace token embeddings), across chunk and rank
    /// boundaries, give one worker's logits.
    #[test]
    fn context_parallel_prefill_with_replaced_embeddings_equals_one_worker() {
        let (_d, m) = model(3);
        let h = m.config().hidden_size;
        let prompt: Vec<u32> = (0..61u32).map(|i| (i * 37 + 11) % 500 + 1).collect();
        let rows = |seed: usize, n: usize| -> Vec<f32> {
            (0..n * h)
                .map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let emb = vec![(2, rows(1, 17)), (30, rows(2, 3)), (50, rows(3, 11))];
        let mut st = m.new_state();
        for (p, r) in &emb {
            st.set_embeddings(*p, r.clone());
        }
        let want = m.forward(&mut st, &prompt, Logits::Last).unwrap();
        let plain = m
            .forward(&mut m.new_state(), &prompt, Logits::Last)
            .unwrap();
        assert!(rel_err(&plain, &want) > 1e-3, "the rows change the logits");
        for p in 1..=4 {
            let (got, _) = prefill_with(&m, &prompt, &emb, p).unwrap();
            let e = rel_err(&got, &want);
            assert!(e <= 1e-5, "P={p}: relative error {e}");
        }
    }

    #[test]
    fn decode_with_the_keys_left_on_their_ranks_equals_one_worker() {
        let (_d, m) = model(3);
        let block = m.config().block_size;
        for (n, p) in [(5usize, 4usize), (block * 5 + 3, 4), (301, 3), (64, 2)] {
            let prompt: Vec<u32> = (0..n as u32).map(|i| (i * 29 + 5) % 500 + 1).collect();
            let mut one = m.new_state();
            let mut want = m.forward(&mut one, &prompt, Logits::Last).unwrap();
            let (got, ranks) = prefill(&m, &prompt, p).unwrap();
            assert!(rel_err(&got, &want) <= 1e-5);
            let mut shards = Vec::new();
            let mut decoding = None;
            for r in ranks {
                let (shard, st) = r.into_shard().unwrap();
                shards.push(shard);
                if let Some(st) = st {
                    assert!(decoding.is_none(), "one rank decodes");
                    decoding = Some(st);
                }
            }
            let before: Vec<usize> = shards.iter().map(|s| s.tokens(2)).collect();
            assert_eq!(before.iter().sum::<usize>(), n);
            let mut cp = decoding.expect("a rank decodes");
            cp.split = Some(Box::new(LocalSplit { shards }));
            // 64 greedy tokens: the same logits at every step.
            for step in 0..64 {
                let t = crate::sampling::argmax(&want);
                let a = m.forward(&mut cp, &[t], Logits::Last).unwrap();
                want = m.forward(&mut one, &[t], Logits::Last).unwrap();
                assert!(rel_err(&a, &want) <= 1e-5, "n={n} P={p} step {step}");
            }
            // The 64 new keys went to the ranks holding the fewest: still balanced.
            let after = cp.split.as_ref().unwrap().tokens_per_rank(2);
            assert_eq!(after.iter().sum::<usize>(), n + 64);
            let (lo, hi) = (after.iter().min().unwrap(), after.iter().max().unwrap());
            let spread = before.iter().max().unwrap() - before.iter().min().unwrap();
            assert!(hi - lo <= spread.max(1), "{before:?} -> {after:?}");
        }
    }

    #[test]
    fn a_prompt_finished_through_split_keys_and_restored_from_the_cache_equals_one_worker() {
        let (_d, m) = model(3);
        let block = m.config().block_size;
        let chunk = block * 2;
        // The group prefills up to the last chunk boundary; the rest (inside a chunk or a
        // whole one) goes through the split keys and values in one step, as the scheduler runs it.
        for (n, p) in [
            (chunk * 3 + 5, 2usize),
            (chunk * 4, 3),
            (chunk + 1, 4),
            (chunk * 2 + 9, 1),
        ] {
            let prompt: Vec<u32> = (0..n as u32).map(|i| (i * 31 + 7) % 500 + 1).collect();
            let mut one = m.new_state();
            let want = m.forward(&mut one, &prompt, Logits::Last).unwrap();
            let end = group_prefix(n, chunk);
            assert!(end < n && end.is_multiple_of(chunk), "n={n}: {end}");
            let (_, ranks) = prefill(&m, &prompt[..end], p).unwrap();
            let layout = Layout::zigzag(end, p);
            // Each rank's share as the cache keeps it.
            let mut shards = Vec::new();
            let mut cold = None;
            let mut blocks = Vec::new();
            for r in ranks {
                let (shard, st) = r.into_shard().unwrap();
                blocks.push(m.share_block(&shard, st.as_ref(), &prompt[..end]).unwrap());
                assert_eq!(blocks.last().unwrap().lightning.is_empty(), st.is_none());
                shards.push(shard);
                cold = cold.or(st);
            }
            let mut cold = cold.expect("a rank decodes");
            cold.split = Some(Box::new(LocalSplit { shards }));
            let got = m.forward(&mut cold, &prompt[end..], Logits::Last).unwrap();
            assert!(
                rel_err(&got, &want) <= 1e-5,
                "n={n} P={p}: {}",
                rel_err(&got, &want)
            );
            // Restored: the same arithmetic, bit for bit, then decode the same.
            let mut shards = Vec::new();
            let mut warm = None;
            for (r, blk) in blocks.iter().enumerate() {
                let (shard, st) = m.restore_share(blk, &layout, r).unwrap();
                assert_eq!(st.is_some(), r == layout.last_rank());
                // What it restored is what it was given.
                assert_eq!(
                    m.share_block(&shard, st.as_ref(), &prompt[..end]).as_ref(),
                    Some(blk)
                );
                shards.push(shard);
                warm = warm.or(st);
            }
            let mut warm = warm.unwrap();
            warm.split = Some(Box::new(LocalSplit { shards }));
            let again = m.forward(&mut warm, &prompt[end..], Logits::Last).unwrap();
            assert_eq!(again, got, "n={n} P={p}");
            let t = crate::sampling::argmax(&got);
            let a = m.forward(&mut cold, &[t], Logits::Last).unwrap();
            let b = m.forward(&mut warm, &[t], Logits::Last).unwrap();
            assert_eq!(a, b);
            // Shares of another layout do not restore; nor a decoding share without its states.
            let other = Layout::zigzag(end + 1, p);
            assert!(m.restore_share(&blocks[0], &other, 0).is_err());
            let last = layout.last_rank();
            let mut stateless = blocks[last].clone();
            stateless.lightning.clear();
            assert!(m.restore_share(&stateless, &layout, last).is_err());
        }
        assert_eq!(group_prefix(chunk, chunk), chunk);
        assert_eq!(group_prefix(chunk + 1, chunk), chunk);
        assert_eq!(group_prefix(3, chunk), 3);
    }

    #[test]
    fn a_state_of_the_wrong_size_is_refused_not_folded() {
        let (_d, m) = model(3);
        let prompt: Vec<u32> = (1..=40).collect();
        let layout = Layout::zigzag(prompt.len(), 2);
        let mut r = m.rank_prefill(&layout, 1, &prompt, None).unwrap();
        assert!(matches!(r.begin_layer(), Share::States(_)));
        let mut states = vec![None; layout.chunks.len()];
        states[0] = Some(vec![0.5f32; 7]);
        let e = r.finish_layer(&states).unwrap_err().to_string();
        assert!(e.contains("chunk 0's state has 7 values"), "{e}");
    }

    #[test]
    fn new_keys_go_to_the_rank_holding_the_fewest() {
        assert_eq!(holder(&[5, 3, 3, 4]), 1);
        assert_eq!(holder(&[0]), 0);
        let mut counts = vec![10usize, 7, 9];
        for _ in 0..11 {
            let h = holder(&counts);
            counts[h] += 1;
        }
        // 37 keys over three ranks: 13, 12, 12.
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "{counts:?}");
    }

    #[test]
    fn each_rank_holds_about_one_pth_of_the_keys_and_values() {
        let (_d, m) = model(2);
        let prompt: Vec<u32> = (0..4000u32).map(|i| i % 500 + 1).collect();
        let (_, one) = prefill(&m, &prompt, 1).unwrap();
        let whole = one[0].cache_bytes();
        let (_, four) = prefill(&m, &prompt, 4).unwrap();
        for r in &four {
            let share = r.cache_bytes() as f64 / whole as f64;
            assert!((share - 0.25).abs() < 0.01, "{share}");
        }
    }
}
