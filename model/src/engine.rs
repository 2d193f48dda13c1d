//! The forward pass with the semantics of the original remote code (minimax-01.md §2),
//! in f32, written against the [`Backend`] compute interface.

use crate::checkpoint::Checkpoint;
use crate::config::{LIGHTNING_NORM_EPS, LayerKind, ModelConfig};
use crate::error::{ModelError, Result};
use crate::weights::{expert_name, layer_prefix};
use ringbolt_kernels::{
    AttentionShape, Backend, ExpertGroup, LightningShape, RopeParams, Routing, WeightFormat,
};

pub mod context;

/// Computes the routed experts of one MoE layer somewhere else (a cluster's expert workers).
/// A model loaded without its experts runs its MoE layers through one of these.
pub trait ExpertExecutor<B: Backend> {
    /// Starts the weighted sum over each row's routed experts (`[rows, H]`) for `x` (`[rows,
    /// H]`, the post-attention-normed hidden states) and returns without waiting for it, so the
    /// caller can compute meanwhile; [`PendingExperts::wait`] gives the result. `part` numbers
    /// the micro-batches one forward pass sends for `layer` (0, 1, …): a layer step is one layer
    /// of one forward pass, however many parts carry it. An error aborts the forward step; an
    /// executor that can recover (re-send after a plan change) does so before returning.
    fn dispatch<'a>(
        &'a self,
        backend: &B,
        layer: usize,
        part: usize,
        x: &B::Buf,
        rows: usize,
        routing: &Routing,
    ) -> Result<Box<dyn PendingExperts<B> + 'a>>;

    /// [`dispatch`](Self::dispatch) and wait.
    fn experts(
        &self,
        backend: &B,
        layer: usize,
        x: &B::Buf,
        rows: usize,
        routing: &Routing,
    ) -> Result<B::Buf> {
        self.dispatch(backend, layer, 0, x, rows, routing)?
            .wait(backend)
    }
}

/// A layer step started by [`ExpertExecutor::dispatch`].
pub trait PendingExperts<B: Backend> {
    /// The weighted expert outputs (`[rows, H]`), once they are back.
    fn wait(self: Box<Self>, backend: &B) -> Result<B::Buf>;
}

/// Forward passes whose experts run elsewhere and that have at least this many rows are cut
/// into [`PIPELINE_PARTS`] micro-batches, so that one micro-batch's attention computes while
/// another's experts do (design.md §4.3).
pub const PIPELINE_MIN_ROWS: usize = 64;
/// Micro-batches of a pipelined forward pass.
pub const PIPELINE_PARTS: usize = 2;

/// One micro-batch's share of a sequence: (sequence index, first token, token count).
type Piece = (usize, usize, usize);

/// Splits a forward pass into micro-batches of contiguous rows: whole sequences when there are
/// several (cut where the rows balance best), else the one sequence's tokens in halves (the
/// second continues from the first's caches, as a later chunk would).
fn micro_batches(lens: &[usize], parts: usize) -> Vec<Vec<Piece>> {
    let rows: usize = lens.iter().sum();
    if lens.len() == 1 {
        let n = lens[0];
        let mut out = Vec::new();
        let mut t0 = 0;
        for p in 0..parts {
            let t1 = n * (p + 1) / parts;
            if t1 > t0 {
                out.push(vec![(0, t0, t1 - t0)]);
            }
            t0 = t1;
        }
        return out;
    }
    let mut out: Vec<Vec<Piece>> = vec![Vec::new()];
    let mut done = 0;
    for (i, &n) in lens.iter().enumerate() {
        let target = rows * out.len() / parts;
        // Start the next micro-batch when this sequence would carry the current one further
        // past its share than stopping short of it does.
        if !out.last().is_some_and(|v| v.is_empty()) && out.len() < parts && done + n / 2 > target {
            out.push(Vec::new());
        }
        if let Some(v) = out.last_mut() {
            v.push((i, 0, n));
        }
        done += n;
    }
    out
}

/// Weights of one expert (SwiGLU): gate `w1` and up `w3` fused as `w13` (`[2I, H]`, w1 rows
/// first) so one GEMM computes both, and down `w2` (`[H, I]`).
pub struct Expert<B: Backend> {
    pub w13: B::Weight,
    pub w2: B::Weight,
}

impl<B: Backend> Expert<B> {
    /// Loads one expert onto `backend`, quantized to int8 when `weights` says so.
    pub fn load(
        ckpt: &Checkpoint,
        backend: &B,
        layer: usize,
        expert: usize,
        weights: WeightFormat,
    ) -> Result<Self> {
        let c = ckpt.config();
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let names = ["w1", "w3", "w2"].map(|w| expert_name(layer, expert, w));
        if weights.int8_experts() {
            // Read through a scratch mapping of its own, returned to the OS when dropped: the
            // f32 values are only on their way to int8, and a heap block that size would stay
            // with the allocator, beyond the int8 bytes the planner counts.
            let mut scratch = ringbolt_kernels::cpu::WeightStore::<f32>::zeroed(2 * i * h);
            ckpt.read_into(&names[0], &[i, h], &mut scratch[..i * h])?;
            ckpt.read_into(&names[1], &[i, h], &mut scratch[i * h..])?;
            let w13 = backend.upload_weight_int8(&scratch, 2 * i, h);
            ckpt.read_into(&names[2], &[h, i], &mut scratch[..h * i])?;
            let w2 = backend.upload_weight_int8(&scratch[..h * i], h, i);
            return Ok(Expert { w13, w2 });
        }
        // Sized once: no reallocation of the fused matrix; the backend takes the buffers.
        let mut w13 = Vec::with_capacity(2 * i * h);
        ckpt.load_into(&names[0], &[i, h], &mut w13)?;
        ckpt.load_into(&names[1], &[i, h], &mut w13)?;
        let w2 = ckpt.load(&names[2], &[h, i])?;
        Ok(Expert {
            w13: backend.upload_weight_owned(w13, 2 * i, h),
            w2: backend.upload_weight_owned(w2, h, i),
        })
    }

    /// SwiGLU over `rows` rows of `x` (`[rows, H]`).
    pub fn forward(&self, backend: &B, x: &B::Buf, rows: usize, h: usize, i: usize) -> B::Buf {
        let h13 = backend.linear(x, &self.w13, rows, h, 2 * i);
        let a = backend.swiglu(&h13, rows, i);
        backend.linear(&a, &self.w2, rows, i, h)
    }
}

/// A weight matrix onto `backend`, quantized to int8 when `int8`.
fn upload_as<B: Backend>(
    backend: &B,
    w: Vec<f32>,
    rows: usize,
    cols: usize,
    int8: bool,
) -> B::Weight {
    if int8 {
        backend.upload_weight_int8(&w, rows, cols)
    } else {
        backend.upload_weight_owned(w, rows, cols)
    }
}

enum Mixer<B: Backend> {
    Lightning {
        qkv: B::Weight,
        gate: B::Weight,
        norm: B::Buf,
        out: B::Weight,
        decay: Vec<f32>,
    },
    Softmax {
        q: B::Weight,
        k: B::Weight,
        v: B::Weight,
        o: B::Weight,
    },
}

struct Layer<B: Backend> {
    input_norm: B::Buf,
    post_norm: B::Buf,
    mixer: Mixer<B>,
    router: B::Weight,
    experts: Vec<Expert<B>>,
}

/// Per-layer cache of one sequence.
pub enum LayerCache<B: Backend> {
    /// `[heads, d, d]` f32 state: constant size, whatever the context length.
    Lightning(B::Buf),
    /// Keys and values `[len, kv_heads·d]` (keys after RoPE).
    Softmax { k: B::Cache, v: B::Cache },
}

/// Everything a sequence carries between forward calls.
pub struct SequenceState<B: Backend> {
    /// Tokens processed so far (the next token's position).
    pub pos: usize,
    pub layers: Vec<LayerCache<B>>,
    /// Where its softmax layers attend when its keys and values are split among
    /// context-parallel ranks (None: the caches in `layers`).
    pub split: Option<Box<dyn SplitAttention<B>>>,
    /// Input rows that replace the token embeddings at some positions (an image's features
    /// at its placeholders): (first position, `[n, H]` rows), by position.
    pub embeddings: Vec<(usize, Vec<f32>)>,
}

/// Softmax attention of a sequence whose keys and values stay split among the ranks of a
/// context-parallel prefill (distributed decode, design.md §4.2a): each decode step's query
/// goes to every rank holding keys, and the partial results merge by log-sum-exp.
pub trait SplitAttention<B: Backend>: Send + Sync {
    /// The attention output (`[n, heads·d]`) of the sequence's next `n` tokens at softmax
    /// layer `layer`, given their queries, keys and values (`n` rows each, after RoPE): each
    /// sees every earlier key and, causally, the others'. One rank keeps the new keys and
    /// values.
    fn attend(
        &mut self,
        b: &B,
        layer: usize,
        q: &B::Buf,
        n: usize,
        k: B::Buf,
        v: B::Buf,
    ) -> Result<B::Buf>;

    /// Keys of softmax layer `layer` each rank holds.
    fn tokens_per_rank(&self, layer: usize) -> Vec<usize>;
}

/// Writes the rows of `embeddings` ((first position, `[n, h]` rows)) that fall in positions
/// `pos..pos + count` into `dst` (`[count, h]`); whether there were any.
pub(crate) fn patch_rows(
    embeddings: &[(usize, Vec<f32>)],
    pos: usize,
    count: usize,
    dst: &mut [f32],
    h: usize,
) -> bool {
    let mut any = false;
    for (start, rows) in embeddings {
        let n = rows.len() / h.max(1);
        let (lo, hi) = ((*start).max(pos), (start + n).min(pos + count));
        if lo < hi {
            dst[(lo - pos) * h..(hi - pos) * h]
                .copy_from_slice(&rows[(lo - start) * h..(hi - start) * h]);
            any = true;
        }
    }
    any
}

impl<B: Backend> SequenceState<B> {
    /// Rows `rows` (`[n, H]`) replace the token embeddings at positions `pos..pos + n` when
    /// those positions are computed.
    pub fn set_embeddings(&mut self, pos: usize, rows: Vec<f32>) {
        self.embeddings.push((pos, rows));
        self.embeddings.sort_by_key(|e| e.0);
    }

    /// Writes the replacement rows for positions `pos..pos + count` into `dst` (`[count, h]`);
    /// whether there were any.
    fn patch_embeddings(&self, pos: usize, count: usize, dst: &mut [f32], h: usize) -> bool {
        patch_rows(&self.embeddings, pos, count, dst, h)
    }

    /// Bytes held by this sequence's caches (f32 lightning states, keys and values as the
    /// backend stores them).
    pub fn cache_bytes(&self, backend: &B) -> usize {
        self.layers
            .iter()
            .map(|c| match c {
                LayerCache::Lightning(s) => backend.len(s) * 4,
                LayerCache::Softmax { k, v } => backend.cache_bytes(k) + backend.cache_bytes(v),
            })
            .sum::<usize>()
    }
}

/// The time one layer's attention (the mixer) took, for the metrics.
fn record_attention(t0: std::time::Instant) {
    metrics::histogram!("ringbolt_layer_attention_seconds").record(t0.elapsed().as_secs_f64());
}

/// Which positions of a forward call get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// A loaded model on one backend.
pub struct Model<B: Backend> {
    cfg: ModelConfig,
    backend: B,
    /// The checkpoint's [`Checkpoint::fingerprint`] (the context cache's keys depend on it).
    fingerprint: u64,
    /// How the weights are held (the context cache's keys depend on it too).
    weights: WeightFormat,
    embed: B::Weight,
    /// A VL-01 checkpoint's vision tower and projector.
    vision: Option<crate::vision::VisionTower<B>>,
    layers: Vec<Layer<B>>,
    final_norm: B::Buf,
    lm_head: Option<B::Weight>,
}

impl<B: Backend> Model<B> {
    /// Loads every tensor of the model from `ckpt` onto `backend`, as the checkpoint has them.
    pub fn load(ckpt: &Checkpoint, backend: B) -> Result<Self> {
        Self::load_parts(ckpt, backend, true, WeightFormat::Bf16)
    }

    /// Loads the model with its weights held as `weights` says; without `experts`, everything
    /// but the experts' weights (an attention worker's share: its MoE layers then run through
    /// an [`ExpertExecutor`]).
    pub fn load_parts(
        ckpt: &Checkpoint,
        backend: B,
        experts: bool,
        weights: WeightFormat,
    ) -> Result<Self> {
        let started = std::time::Instant::now();
        let cfg = ckpt.config().clone();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let up = |name: &str, shape: &[usize]| -> Result<B::Buf> {
            Ok(backend.upload(&ckpt.load(name, shape)?))
        };
        let upw = |name: &str, rows: usize, cols: usize| -> Result<B::Weight> {
            Ok(backend.upload_weight_owned(ckpt.load(name, &[rows, cols])?, rows, cols))
        };
        // An attention projection, int8 under `--weights int8-all`.
        let proj = |name: &str, rows: usize, cols: usize| -> Result<B::Weight> {
            let w = ckpt.load(name, &[rows, cols])?;
            Ok(upload_as(&backend, w, rows, cols, weights.int8_attention()))
        };
        let embed = upw("model.embed_tokens.weight", v, h)?;
        let vision = crate::vision::VisionTower::load(ckpt, &backend)?;
        let mut layers = Vec::with_capacity(cfg.num_layers());
        for (l, kind) in cfg.layers.iter().enumerate() {
            let p = layer_prefix(l);
            let mixer = match kind {
                LayerKind::Lightning => Mixer::Lightning {
                    qkv: proj(&format!("{p}.self_attn.qkv_proj.weight"), 3 * nh * d, h)?,
                    gate: proj(&format!("{p}.self_attn.output_gate.weight"), nh * d, h)?,
                    norm: up(&format!("{p}.self_attn.norm.weight"), &[nh * d])?,
                    out: proj(&format!("{p}.self_attn.out_proj.weight"), h, nh * d)?,
                    decay: cfg.lightning_decay(l),
                },
                LayerKind::Softmax => Mixer::Softmax {
                    q: proj(&format!("{p}.self_attn.q_proj.weight"), nh * d, h)?,
                    k: proj(&format!("{p}.self_attn.k_proj.weight"), nkv * d, h)?,
                    v: proj(&format!("{p}.self_attn.v_proj.weight"), nkv * d, h)?,
                    o: proj(&format!("{p}.self_attn.o_proj.weight"), h, nh * d)?,
                },
            };
            let experts = if experts {
                (0..cfg.num_experts)
                    .map(|e| Expert::load(ckpt, &backend, l, e, weights))
                    .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            layers.push(Layer {
                input_norm: up(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: up(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mixer,
                router: upw(
                    &format!("{p}.block_sparse_moe.gate.weight"),
                    cfg.num_experts,
                    h,
                )?,
                experts,
            });
        }
        let final_norm = up("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(upw("lm_head.weight", v, h)?)
        };
        if weights != WeightFormat::Bf16 {
            tracing::info!(
                weights = %weights,
                seconds = started.elapsed().as_secs_f64(),
                "model loaded and quantized"
            );
        }
        Ok(Model {
            cfg,
            backend,
            fingerprint: ckpt.fingerprint(),
            weights,
            embed,
            vision,
            layers,
            final_norm,
            lm_head,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The vision tower of a VL-01 model.
    pub fn vision(&self) -> Option<&crate::vision::VisionTower<B>> {
        self.vision.as_ref()
    }

    /// The features an image puts in place of its placeholder tokens (`[n, H]`), from its
    /// crops' pixels and its original (height, width).
    pub fn image_features(&self, pixels: &[f32], size: (usize, usize)) -> Result<Vec<f32>> {
        self.vision_for_images()?
            .image_features(&self.backend, pixels, size)
    }

    /// The vision tower, or why this model takes no images.
    fn vision_for_images(&self) -> Result<&crate::vision::VisionTower<B>> {
        self.vision.as_ref().ok_or_else(|| {
            ModelError::Invalid(
                "images need a MiniMax-VL-01 checkpoint; this one has no vision tower".into(),
            )
        })
    }

    /// A prompt with images, as the model takes it: each image placeholder (one per image, in
    /// order) expanded to that image's feature count, and the features to put there
    /// ((position, `[n, H]` rows), for [`SequenceState::set_embeddings`] or a request).
    #[allow(clippy::type_complexity)]
    pub fn prompt_with_images(
        &self,
        prompt: &[u32],
        images: &[crate::image::Rgb],
    ) -> Result<(Vec<u32>, Vec<(usize, Vec<f32>)>)> {
        if images.is_empty() {
            return Ok((prompt.to_vec(), Vec::new()));
        }
        let v = self.vision_for_images()?;
        let token = v.config().image_token;
        let placeholders = prompt.iter().filter(|&&t| t == token).count();
        v.config().check_placeholders(placeholders, images.len())?;
        let mut ids = Vec::with_capacity(prompt.len());
        let mut rows = Vec::with_capacity(images.len());
        let mut next = images.iter();
        for &t in prompt {
            // As many images as placeholders: each placeholder takes the next one.
            match (t == token).then(|| next.next()).flatten() {
                Some(img) => {
                    let pixels = crate::image::crops(img, v.config())?;
                    let f = v.image_features(&self.backend, &pixels, (img.height, img.width))?;
                    let n = f.len() / self.cfg.hidden_size;
                    rows.push((ids.len(), f));
                    ids.extend(std::iter::repeat_n(token, n));
                }
                None => ids.push(t),
            }
        }
        Ok((ids, rows))
    }

    /// The input rows of a forward step: the token embeddings, with the rows the sequences
    /// replace (image features) in place.
    fn embed(&self, seqs: &[(&mut SequenceState<B>, &[u32])], ids: &[u32]) -> B::Buf {
        let b = &self.backend;
        let hsz = self.cfg.hidden_size;
        let h = b.weight_rows(&self.embed, ids, hsz);
        if seqs.iter().all(|(st, _)| st.embeddings.is_empty()) {
            return h;
        }
        let mut host = b.host_view(&h).into_owned();
        let mut row = 0;
        let mut any = false;
        for (st, toks) in seqs {
            let dst = &mut host[row * hsz..(row + toks.len()) * hsz];
            any |= st.patch_embeddings(st.pos, toks.len(), dst, hsz);
            row += toks.len();
        }
        if any { b.upload_owned(host) } else { h }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Block size used by lightning prefill (the config's unless overridden).
    pub fn set_block_size(&mut self, block: usize) {
        self.cfg.block_size = block.max(1);
    }

    /// The context cache's root key for prefills in chunks of `chunk`: everything that
    /// changes the arithmetic (weights, config, block size, backend and its threads, the CUDA
    /// lightning kernel's choice) is in it.
    pub fn cache_root(&self, chunk: usize) -> crate::prefix::Key {
        let env = |k: &str| std::env::var(k).unwrap_or_default();
        let id = format!(
            "{}|{}|{}|{:?}|{}|{}",
            self.fingerprint,
            self.weights,
            self.backend.name(),
            self.cfg,
            env("RINGBOLT_LIGHTNING"),
            env("RINGBOLT_CPU_AMX"),
        );
        crate::prefix::root(id.as_bytes(), chunk)
    }

    /// Bytes of a context cache block of `tokens` tokens of this model.
    pub fn cache_block_bytes(&self, tokens: usize) -> usize {
        let width = self.cfg.num_kv_heads * self.cfg.head_dim;
        let lightning = self.cfg.layers_of(LayerKind::Lightning);
        let softmax = self.cfg.layers_of(LayerKind::Softmax);
        (lightning * self.cfg.lightning_state_len() + softmax * 2 * tokens * width + tokens) * 4
    }

    /// The context cache's block of `st` for its last `tokens` (ending at `st.pos`): those
    /// positions' keys and values and every lightning state. None for a state whose keys and
    /// values are split among context-parallel ranks.
    pub fn cache_block(
        &self,
        st: &SequenceState<B>,
        tokens: &[u32],
    ) -> Option<crate::prefix::Block> {
        if st.split.is_some() || tokens.len() > st.pos {
            return None;
        }
        let b = &self.backend;
        let width = self.cfg.num_kv_heads * self.cfg.head_dim;
        let (start, n) = ((st.pos - tokens.len()) * width, tokens.len() * width);
        let kv = st
            .layers
            .iter()
            .filter_map(|c| match c {
                LayerCache::Softmax { k, v } => {
                    Some((b.cache_read(k, start, n), b.cache_read(v, start, n)))
                }
                LayerCache::Lightning(_) => None,
            })
            .collect();
        Some(crate::prefix::Block {
            tokens: tokens.to_vec(),
            lightning: self.lightning_states(st),
            kv,
        })
    }

    /// Every lightning layer's state of `st`, in layer order (what a context cache entry keeps).
    pub(crate) fn lightning_states(&self, st: &SequenceState<B>) -> Vec<Vec<f32>> {
        st.layers
            .iter()
            .filter_map(|c| match c {
                LayerCache::Lightning(s) => Some(self.backend.download(s)),
                LayerCache::Softmax { .. } => None,
            })
            .collect()
    }

    /// A fresh state at position `pos` holding `states` as its lightning layers' states (its
    /// softmax caches empty); None when they do not fit this model.
    pub(crate) fn state_with_lightning(
        &self,
        states: &[Vec<f32>],
        pos: usize,
    ) -> Option<SequenceState<B>> {
        if states.len() != self.cfg.layers_of(LayerKind::Lightning)
            || states
                .iter()
                .any(|s| s.len() != self.cfg.lightning_state_len())
        {
            return None;
        }
        let mut st = self.new_state();
        let mut states = states.iter();
        for c in st.layers.iter_mut() {
            if let LayerCache::Lightning(s) = c
                && let Some(x) = states.next()
            {
                *s = self.backend.upload(x);
            }
        }
        st.pos = pos;
        Some(st)
    }

    /// A state holding the prefix `blocks` make, in order: their keys and values, and the
    /// lightning states of the last. Blocks that do not fit this model are an error.
    pub fn restore(
        &self,
        blocks: &[std::sync::Arc<crate::prefix::Block>],
    ) -> Result<SequenceState<B>> {
        let b = &self.backend;
        let width = self.cfg.num_kv_heads * self.cfg.head_dim;
        let lightning_layers = self.cfg.layers_of(LayerKind::Lightning);
        let softmax_layers = self.cfg.layers_of(LayerKind::Softmax);
        let bad = |why: String| {
            Err(ModelError::Invalid(format!(
                "a context cache block does not fit the model: {why}"
            )))
        };
        for blk in blocks {
            let n = blk.tokens.len() * width;
            if blk.lightning.len() != lightning_layers || blk.kv.len() != softmax_layers {
                return bad(format!(
                    "{} lightning and {} softmax layers",
                    blk.lightning.len(),
                    blk.kv.len()
                ));
            }
            if blk
                .lightning
                .iter()
                .any(|s| s.len() != self.cfg.lightning_state_len())
                || blk.kv.iter().any(|(k, v)| k.len() != n || v.len() != n)
            {
                return bad("a layer's size".into());
            }
        }
        let Some(last) = blocks.last() else {
            return Ok(self.new_state());
        };
        let pos = blocks.iter().map(|blk| blk.tokens.len()).sum();
        let Some(mut st) = self.state_with_lightning(&last.lightning, pos) else {
            return bad("the lightning states".into());
        };
        let softmax = st.layers.iter_mut().filter_map(|c| match c {
            LayerCache::Softmax { k, v } => Some((k, v)),
            LayerCache::Lightning(_) => None,
        });
        for (si, (k, v)) in softmax.enumerate() {
            for blk in blocks {
                b.cache_append(k, &b.upload(&blk.kv[si].0));
                b.cache_append(v, &b.upload(&blk.kv[si].1));
            }
        }
        Ok(st)
    }

    pub fn new_state(&self) -> SequenceState<B> {
        let b = &self.backend;
        let layers = self
            .cfg
            .layers
            .iter()
            .map(|k| match k {
                LayerKind::Lightning => {
                    LayerCache::Lightning(b.zeros(self.cfg.lightning_state_len()))
                }
                LayerKind::Softmax => LayerCache::Softmax {
                    k: b.new_cache(),
                    v: b.new_cache(),
                },
            })
            .collect();
        SequenceState {
            embeddings: Vec::new(),
            pos: 0,
            layers,
            split: None,
        }
    }

    /// Runs `tokens` through the model, continuing `state`, and returns the logits asked for
    /// (`[rows, vocab]`, row-major).
    pub fn forward(
        &self,
        state: &mut SequenceState<B>,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let mut out = self.forward_batch(&mut [(state, tokens)], logits)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Checks that `tokens` may continue a sequence at position `pos`.
    pub fn check_tokens(&self, pos: usize, tokens: &[u32]) -> Result<()> {
        if let Some((i, &id)) = tokens
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= self.cfg.vocab_size)
        {
            return Err(ModelError::TokenOutOfRange {
                id,
                pos: pos + i,
                vocab: self.cfg.vocab_size,
            });
        }
        let len = pos + tokens.len();
        if len > self.cfg.max_position_embeddings {
            return Err(ModelError::ContextTooLong {
                len,
                max: self.cfg.max_position_embeddings,
            });
        }
        Ok(())
    }

    /// One forward step for several sequences at once: row-wise work (projections, norms,
    /// experts) runs on all rows together, attention per sequence. Returns logits per sequence.
    pub fn forward_batch(
        &self,
        seqs: &mut [(&mut SequenceState<B>, &[u32])],
        logits: Logits,
    ) -> Result<Vec<Vec<f32>>> {
        self.forward_batch_with(seqs, logits, None)
    }

    /// Whether the experts' weights are loaded here.
    pub fn has_experts(&self) -> bool {
        self.layers.iter().all(|l| !l.experts.is_empty())
    }

    /// [`forward_batch`](Self::forward_batch) with the MoE experts computed by `remote`
    /// (required when the model was loaded without experts).
    pub fn forward_batch_with(
        &self,
        seqs: &mut [(&mut SequenceState<B>, &[u32])],
        logits: Logits,
        remote: Option<&dyn ExpertExecutor<B>>,
    ) -> Result<Vec<Vec<f32>>> {
        if remote.is_none() && !self.has_experts() {
            return Err(ModelError::Invalid(
                "this model was loaded without experts and no expert executor was given".into(),
            ));
        }
        for (st, toks) in seqs.iter() {
            if toks.is_empty() {
                return Err(ModelError::Invalid(
                    "a forward step needs at least one token".into(),
                ));
            }
            if st.layers.len() != self.layers.len() {
                return Err(ModelError::Invalid(
                    "sequence state belongs to another model".into(),
                ));
            }
            self.check_tokens(st.pos, toks)?;
        }
        let b = &self.backend;
        let cfg = &self.cfg;
        let hsz = cfg.hidden_size;
        let ids: Vec<u32> = seqs.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let rows = ids.len();
        let spans: Vec<(usize, usize)> = seqs
            .iter()
            .scan(0, |start, (_, t)| {
                let s = *start;
                *start += t.len();
                Some((s, t.len()))
            })
            .collect();
        let h = match remote {
            Some(r) if rows >= PIPELINE_MIN_ROWS => self.forward_pipelined(seqs, &ids, r)?,
            _ => {
                let mut h = self.embed(seqs, &ids);
                let mut views: Vec<(&mut SequenceState<B>, usize, usize)> = seqs
                    .iter_mut()
                    .map(|(st, toks)| {
                        let pos = st.pos;
                        (&mut **st, pos, toks.len())
                    })
                    .collect();
                for (l, layer) in self.layers.iter().enumerate() {
                    let a = b.rms_norm(&h, &layer.input_norm, hsz, cfg.rms_norm_eps);
                    let t0 = std::time::Instant::now();
                    let mix = self.mixer(l, layer, &a, rows, &mut views)?;
                    record_attention(t0);
                    let (alpha, beta) = cfg.attn_factors(l);
                    let h1 = b.axpby(alpha, if cfg.postnorm { &a } else { &h }, beta, &mix);
                    let n2 = b.rms_norm(&h1, &layer.post_norm, hsz, cfg.rms_norm_eps);
                    let moe = self.moe(l, layer, &n2, rows, remote)?;
                    h = b.axpby(
                        cfg.mlp_alpha,
                        if cfg.postnorm { &n2 } else { &h1 },
                        cfg.mlp_beta,
                        &moe,
                    );
                }
                h
            }
        };

        for ((st, toks), _) in seqs.iter_mut().zip(&spans) {
            st.pos += toks.len();
        }

        let mut result = Vec::with_capacity(seqs.len());
        for &(start, n) in &spans {
            let (r0, count) = match logits {
                Logits::None => {
                    result.push(Vec::new());
                    continue;
                }
                Logits::Last => (start + n - 1, 1),
                Logits::All => (start, n),
            };
            let x = b.rows(&h, r0, count, hsz);
            result.push(self.lm_head(&x, count));
        }
        Ok(result)
    }

    /// The layers of a forward pass in micro-batches, pipelined with the remote experts: at each
    /// layer every micro-batch (in order: a later one continues an earlier one's caches) waits
    /// for its previous layer's experts, runs attention, and sends this layer's rows off, so one
    /// micro-batch's attention runs while the others' experts do. Returns the hidden rows.
    fn forward_pipelined(
        &self,
        seqs: &mut [(&mut SequenceState<B>, &[u32])],
        ids: &[u32],
        remote: &dyn ExpertExecutor<B>,
    ) -> Result<B::Buf> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let hsz = cfg.hidden_size;
        let lens: Vec<usize> = seqs.iter().map(|(_, t)| t.len()).collect();
        let mbs = micro_batches(&lens, PIPELINE_PARTS);
        let rows: Vec<usize> = mbs.iter().map(|v| v.iter().map(|p| p.2).sum()).collect();
        let mut hs = Vec::with_capacity(mbs.len());
        let all = self.embed(seqs, ids);
        let mut r0 = 0;
        for &n in &rows {
            hs.push(b.rows(&all, r0, n, hsz));
            r0 += n;
        }
        // Per micro-batch: the experts in flight and the residual they add to.
        type InFlight<'a, B> = (Box<dyn PendingExperts<B> + 'a>, <B as Backend>::Buf);
        let mut pending: Vec<Option<InFlight<'_, B>>> = mbs.iter().map(|_| None).collect();
        let finish = |f: InFlight<'_, B>| -> Result<B::Buf> {
            let (p, base) = f;
            let moe = p.wait(b)?;
            Ok(b.axpby(cfg.mlp_alpha, &base, cfg.mlp_beta, &moe))
        };
        for (l, layer) in self.layers.iter().enumerate() {
            for (m, mb) in mbs.iter().enumerate() {
                if let Some(f) = pending[m].take() {
                    hs[m] = finish(f)?;
                }
                let h = &hs[m];
                let a = b.rms_norm(h, &layer.input_norm, hsz, cfg.rms_norm_eps);
                let t0 = std::time::Instant::now();
                let mut views: Vec<(&mut SequenceState<B>, usize, usize)> = seqs
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(i, (st, _))| {
                        let &(_, t0, n) = mb.iter().find(|p| p.0 == i)?;
                        let pos = st.pos + t0;
                        Some((&mut **st, pos, n))
                    })
                    .collect();
                let mix = self.mixer(l, layer, &a, rows[m], &mut views)?;
                record_attention(t0);
                let (alpha, beta) = cfg.attn_factors(l);
                let h1 = b.axpby(alpha, if cfg.postnorm { &a } else { h }, beta, &mix);
                let n2 = b.rms_norm(&h1, &layer.post_norm, hsz, cfg.rms_norm_eps);
                let routing = self.route(layer, &n2, rows[m]);
                let p = remote.dispatch(b, l, m, &n2, rows[m], &routing)?;
                pending[m] = Some((p, if cfg.postnorm { n2 } else { h1 }));
            }
        }
        for (m, f) in pending.into_iter().enumerate() {
            if let Some(f) = f {
                hs[m] = finish(f)?;
            }
        }
        Ok(if hs.len() == 1 {
            hs.pop().unwrap_or_else(|| b.zeros(0))
        } else {
            b.concat_rows(&hs)
        })
    }

    /// Final norm and LM head over `rows` hidden rows.
    fn lm_head(&self, x: &B::Buf, rows: usize) -> Vec<f32> {
        let b = &self.backend;
        let hsz = self.cfg.hidden_size;
        let n = b.rms_norm(x, &self.final_norm, hsz, self.cfg.rms_norm_eps);
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        b.download(&b.linear(&n, w, rows, hsz, self.cfg.vocab_size))
    }

    fn mixer(
        &self,
        l: usize,
        layer: &Layer<B>,
        a: &B::Buf,
        rows: usize,
        seqs: &mut [(&mut SequenceState<B>, usize, usize)],
    ) -> Result<B::Buf> {
        let b = &self.backend;
        // Each sequence's (first row in `a`, rows); `seqs` holds (state, position of its first
        // row, rows).
        let spans: Vec<(usize, usize)> = seqs
            .iter()
            .scan(0, |start, (_, _, n)| {
                let s = *start;
                *start += n;
                Some((s, *n))
            })
            .collect();
        let cfg = &self.cfg;
        let (hsz, nh, nkv, d) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        let per_seq = |x: &B::Buf, width: usize, i: usize| -> Option<B::Buf> {
            // With one sequence the whole buffer is that sequence: no copy.
            (spans.len() > 1).then(|| b.rows(x, spans[i].0, spans[i].1, width))
        };
        match &layer.mixer {
            Mixer::Lightning {
                qkv,
                gate,
                norm,
                out,
                decay,
            } => {
                let mut p = b.linear(a, qkv, rows, hsz, 3 * nh * d);
                b.silu_inplace(&mut p);
                let shape = LightningShape {
                    heads: nh,
                    head_dim: d,
                    block: cfg.block_size,
                };
                let o = if seqs.len() > 1 && seqs.iter().all(|(_, _, n)| *n == 1) {
                    // A decode step of several sequences: one call for all of them.
                    let mut states: Vec<&mut B::Buf> = seqs
                        .iter_mut()
                        .map(|(st, _, _)| match &mut st.layers[l] {
                            LayerCache::Lightning(state) => state,
                            LayerCache::Softmax { .. } => {
                                unreachable!("cache kinds follow the config's layer kinds")
                            }
                        })
                        .collect();
                    b.lightning_decode(&p, shape, decay, &mut states)
                } else {
                    let mut parts = Vec::with_capacity(spans.len());
                    for (i, (st, _, n)) in seqs.iter_mut().enumerate() {
                        let LayerCache::Lightning(state) = &mut st.layers[l] else {
                            unreachable!("cache kinds follow the config's layer kinds")
                        };
                        let own = per_seq(&p, 3 * nh * d, i);
                        parts.push(b.lightning(
                            own.as_ref().unwrap_or(&p),
                            *n,
                            shape,
                            decay,
                            state,
                        ));
                    }
                    if parts.len() == 1 {
                        parts.pop().unwrap_or_else(|| b.zeros(0))
                    } else {
                        b.concat_rows(&parts)
                    }
                };
                let mut y = b.rms_norm(&o, norm, nh * d, LIGHTNING_NORM_EPS);
                let g = b.linear(a, gate, rows, hsz, nh * d);
                b.sigmoid_gate_inplace(&mut y, &g);
                Ok(b.linear(&y, out, rows, nh * d, hsz))
            }
            Mixer::Softmax { q, k, v, o } => {
                let qa = b.linear(a, q, rows, hsz, nh * d);
                let ka = b.linear(a, k, rows, hsz, nkv * d);
                let va = b.linear(a, v, rows, hsz, nkv * d);
                let rope = RopeParams {
                    head_dim: d,
                    rotary_dim: cfg.rotary_dim,
                    theta: cfg.rope_theta,
                };
                let shape = AttentionShape {
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: d,
                };
                let att = if seqs.iter().any(|(st, _, _)| st.split.is_some()) {
                    // Some sequences attend through their split keys and values: each
                    // sequence on its own.
                    let mut parts = Vec::with_capacity(spans.len());
                    for (i, (st, pos0, n)) in seqs.iter_mut().enumerate() {
                        let (n, pos0, s0) = (*n, *pos0, spans[i].0);
                        let mut qs = b.rows(&qa, s0, n, nh * d);
                        let mut ks = b.rows(&ka, s0, n, nkv * d);
                        let vs = b.rows(&va, s0, n, nkv * d);
                        b.rope_inplace(&mut qs, n, nh, pos0, rope);
                        b.rope_inplace(&mut ks, n, nkv, pos0, rope);
                        if let Some(split) = st.split.as_mut() {
                            parts.push(split.attend(b, l, &qs, n, ks, vs)?);
                        } else {
                            let LayerCache::Softmax { k: kc, v: vc } = &mut st.layers[l] else {
                                unreachable!("cache kinds follow the config's layer kinds")
                            };
                            b.cache_append(kc, &ks);
                            b.cache_append(vc, &vs);
                            parts.push(b.attention(&qs, n, kc, vc, pos0, shape));
                        }
                    }
                    if parts.len() == 1 {
                        parts.pop().unwrap_or_else(|| b.zeros(0))
                    } else {
                        b.concat_rows(&parts)
                    }
                } else if seqs.len() > 1 && seqs.iter().all(|(_, _, n)| *n == 1) {
                    // A decode step of several sequences: row s is sequence s's token; RoPE,
                    // the cache appends and attention each take one call for all of them.
                    let positions: Vec<usize> = seqs.iter().map(|(_, pos0, _)| *pos0).collect();
                    let (mut qa, mut ka) = (qa, ka);
                    b.rope_at(&mut qa, nh, &positions, rope);
                    b.rope_at(&mut ka, nkv, &positions, rope);
                    {
                        let (mut kcs, mut vcs): (Vec<&mut B::Cache>, Vec<&mut B::Cache>) = seqs
                            .iter_mut()
                            .map(|(st, _, _)| match &mut st.layers[l] {
                                LayerCache::Softmax { k, v } => (k, v),
                                LayerCache::Lightning(_) => {
                                    unreachable!("cache kinds follow the config's layer kinds")
                                }
                            })
                            .unzip();
                        b.cache_append_rows(&mut kcs, &ka, nkv * d);
                        b.cache_append_rows(&mut vcs, &va, nkv * d);
                    }
                    let caches: Vec<(&B::Cache, &B::Cache)> = seqs
                        .iter()
                        .map(|(st, _, _)| match &st.layers[l] {
                            LayerCache::Softmax { k, v } => (k, v),
                            LayerCache::Lightning(_) => {
                                unreachable!("cache kinds follow the config's layer kinds")
                            }
                        })
                        .collect();
                    b.attention_decode(&qa, &caches, &positions, shape)
                } else {
                    let mut parts = Vec::with_capacity(spans.len());
                    for (i, (st, pos0, n)) in seqs.iter_mut().enumerate() {
                        let (n, pos0) = (*n, *pos0);
                        let LayerCache::Softmax { k: kc, v: vc } = &mut st.layers[l] else {
                            unreachable!("cache kinds follow the config's layer kinds")
                        };
                        let mut qs =
                            per_seq(&qa, nh * d, i).unwrap_or_else(|| b.rows(&qa, 0, n, nh * d));
                        let mut ks =
                            per_seq(&ka, nkv * d, i).unwrap_or_else(|| b.rows(&ka, 0, n, nkv * d));
                        b.rope_inplace(&mut qs, n, nh, pos0, rope);
                        b.rope_inplace(&mut ks, n, nkv, pos0, rope);
                        b.cache_append(kc, &ks);
                        match per_seq(&va, nkv * d, i) {
                            Some(vs) => b.cache_append(vc, &vs),
                            None => b.cache_append(vc, &va),
                        }
                        parts.push(b.attention(&qs, n, kc, vc, pos0, shape));
                    }
                    if parts.len() == 1 {
                        parts.pop().unwrap_or_else(|| b.zeros(0))
                    } else {
                        b.concat_rows(&parts)
                    }
                };
                Ok(b.linear(&att, o, rows, nh * d, hsz))
            }
        }
    }

    /// The router's choice of experts for `x` (`[rows, H]`).
    fn route(&self, layer: &Layer<B>, x: &B::Buf, rows: usize) -> Routing {
        let b = &self.backend;
        let cfg = &self.cfg;
        let logits = b.linear(x, &layer.router, rows, cfg.hidden_size, cfg.num_experts);
        b.route(&logits, rows, cfg.num_experts, cfg.experts_per_tok)
    }

    fn moe(
        &self,
        l: usize,
        layer: &Layer<B>,
        x: &B::Buf,
        rows: usize,
        remote: Option<&dyn ExpertExecutor<B>>,
    ) -> Result<B::Buf> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let (hsz, e, i) = (cfg.hidden_size, cfg.num_experts, cfg.intermediate_size);
        let routing = self.route(layer, x, rows);
        if let Some(r) = remote {
            return r.experts(b, l, x, rows, &routing);
        }
        let buckets = routing.by_expert(e);
        let groups: Vec<ExpertGroup<'_, B>> = layer
            .experts
            .iter()
            .zip(&buckets)
            .filter(|(_, (ids, _))| !ids.is_empty())
            .map(|(ex, (ids, ws))| ExpertGroup {
                ids,
                weights: ws,
                w13: &ex.w13,
                w2: &ex.w2,
            })
            .collect();
        Ok(b.moe_experts(x, rows, hsz, i, &groups))
    }
}

#[cfg(test)]
mod tests {
    use super::micro_batches;

    #[test]
    fn micro_batches_cover_every_row_once_in_order() {
        // One sequence: its tokens in halves.
        assert_eq!(
            micro_batches(&[101], 2),
            vec![vec![(0, 0, 50)], vec![(0, 50, 51)]]
        );
        // Several: whole sequences, cut where the rows balance best.
        assert_eq!(
            micro_batches(&[30, 25, 20], 2),
            vec![vec![(0, 0, 30)], vec![(1, 0, 25), (2, 0, 20)]]
        );
        let decode = micro_batches(&[1; 64], 2);
        assert_eq!(decode.len(), 2);
        assert_eq!(decode[0].len() + decode[1].len(), 64);
        assert!(decode[0].len().abs_diff(decode[1].len()) <= 2);
        for lens in [
            vec![7],
            vec![100, 1],
            vec![1, 100],
            vec![5, 5, 5, 5, 5],
            vec![64, 64],
        ] {
            for parts in 1..4 {
                let mbs = micro_batches(&lens, parts);
                assert!(!mbs.is_empty() && mbs.len() <= parts, "{lens:?} {parts}");
                assert!(mbs.iter().all(|v| !v.is_empty()), "{lens:?} {parts}");
                // Rows in order: sequence by sequence, tokens in order.
                let flat: Vec<(usize, usize, usize)> = mbs.concat();
                let mut next = vec![0usize; lens.len()];
                let mut last_seq = 0;
                for (i, t0, n) in flat {
                    assert!(i >= last_seq && next[i] == t0 && n > 0, "{lens:?} {parts}");
                    next[i] += n;
                    last_seq = i;
                }
                assert_eq!(next, lens, "{lens:?} {parts}");
            }
        }
    }
}
