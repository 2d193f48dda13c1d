//! Compute kernels for MiniMax-01.
//!
//! [`Backend`] is the compute interface the model engine is written against. Every
//! operation the forward pass needs is a method here; a backend owns its buffers
//! ([`Backend::Buf`]) and the engine never looks inside them except through
//! [`Backend::download`]. [`cpu::Cpu`] is the CPU implementation: f32 compute, GEMMs through
//! the `gemm` crate, threads through rayon. It is also the numerical reference that other
//! backends are checked against.
//!
//! Shapes are passed explicitly; matrices are row-major. A weight `w` of a linear layer has
//! the PyTorch `nn.Linear` layout `[out, in]`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_backend;
pub mod device;
pub mod format;
pub mod x86;

pub use device::{Device, DeviceError, OnBackend};
pub use format::{Activations, WeightFormat};

/// Lightning-attention geometry of one layer.
#[derive(Debug, Clone, Copy)]
pub struct LightningShape {
    pub heads: usize,
    pub head_dim: usize,
    /// Block size of the prefill algorithm; results do not depend on it beyond rounding.
    pub block: usize,
}

/// Softmax-attention geometry of one layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Rotary embedding parameters (NeoX "rotate half" pairing over the first `rotary_dim` dims).
#[derive(Debug, Clone, Copy)]
pub struct RopeParams {
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub theta: f64,
}

/// Result of routing `rows` tokens: for each row, `top_k` (expert, weight) pairs, renormalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    /// Rows and weights per expert (`experts` buckets), each in row order.
    pub fn by_expert(&self, experts: usize) -> Vec<(Vec<u32>, Vec<f32>)> {
        let mut out = vec![(Vec::new(), Vec::new()); experts];
        for (i, (&e, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            let b = &mut out[e as usize];
            b.0.push((i / self.top_k) as u32);
            b.1.push(w);
        }
        out
    }

    /// Rows routed to `expert`, with their weights, in row order.
    pub fn rows_for(&self, expert: u32) -> (Vec<u32>, Vec<f32>) {
        let mut rows = Vec::new();
        let mut weights = Vec::new();
        for (i, (&e, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            if e == expert {
                rows.push((i / self.top_k) as u32);
                weights.push(w);
            }
        }
        (rows, weights)
    }
}

/// The tokens one expert processes in an MoE step: their rows in the step's input, their
/// routing weights, and the expert's fused gate/up (`[2I, H]`) and down (`[H, I]`) weights.
pub struct ExpertGroup<'a, B: Backend + ?Sized> {
    pub ids: &'a [u32],
    pub weights: &'a [f32],
    pub w13: &'a B::Weight,
    pub w2: &'a B::Weight,
}

/// The compute interface of the model engine.
pub trait Backend: Send + Sync + 'static {
    /// A device buffer of f32 values (or the device's working type).
    type Buf: Send + Sync;
    /// A weight matrix (`[out, in]`), stored as the backend likes (e.g. bf16 when that is
    /// lossless) and always computed with in f32 or better.
    type Weight: Send + Sync;
    /// A softmax layer's key or value cache: rows of `kv_heads·d` appended as a sequence
    /// grows, stored as the backend likes (f32 on the CPU, the reference; bf16 on GPUs, half
    /// the memory and bandwidth of the largest thing a long context holds).
    type Cache: Send + Sync;

    fn name(&self) -> String;

    /// Bytes one weight takes once uploaded, for a checkpoint stored in bf16 (`bf16`) or in a
    /// wider type. The default keeps bf16 as is and widens the rest to f32.
    fn bytes_per_weight(&self, bf16: bool) -> u64 {
        if bf16 { 2 } else { 4 }
    }

    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// Uploads a weight matrix of `rows × cols`.
    fn upload_weight(&self, data: &[f32], rows: usize, cols: usize) -> Self::Weight;
    /// [`upload_weight`](Self::upload_weight) of a buffer the caller gives up (a backend that
    /// keeps f32 in host memory takes it without a copy).
    fn upload_weight_owned(&self, data: Vec<f32>, rows: usize, cols: usize) -> Self::Weight {
        self.upload_weight(&data, rows, cols)
    }
    /// Uploads a weight matrix quantized to int8, one symmetric scale per row (output channel,
    /// [`format::quantize_int8`]); [`linear`](Self::linear) and
    /// [`moe_experts`](Self::moe_experts) read it as int8 and apply the scales (W8A16). It takes
    /// [`format::INT8_WEIGHT_BYTES`] per value plus [`format::SCALE_BYTES`] per row.
    fn upload_weight_int8(&self, data: &[f32], rows: usize, cols: usize) -> Self::Weight;
    /// Rows `ids` of a weight matrix with `width` columns, as activations (embedding lookup).
    fn weight_rows(&self, w: &Self::Weight, ids: &[u32], width: usize) -> Self::Buf;
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    /// The values of `buf` on the host: borrowed when the backend keeps them there, else
    /// downloaded.
    fn host_view<'a>(&self, buf: &'a Self::Buf) -> std::borrow::Cow<'a, [f32]> {
        std::borrow::Cow::Owned(self.download(buf))
    }
    /// [`upload`](Self::upload) of a buffer the caller gives up.
    fn upload_owned(&self, data: Vec<f32>) -> Self::Buf {
        self.upload(&data)
    }
    fn zeros(&self, len: usize) -> Self::Buf;
    fn len(&self, buf: &Self::Buf) -> usize;

    /// Rows `[start, start + count)` of a row-major matrix with `width` columns.
    fn rows(&self, x: &Self::Buf, start: usize, count: usize, width: usize) -> Self::Buf;
    /// Rows listed in `ids` (any order, repeats allowed).
    fn gather_rows(&self, x: &Self::Buf, ids: &[u32], width: usize) -> Self::Buf;
    /// Concatenates row blocks of the same width.
    fn concat_rows(&self, parts: &[Self::Buf]) -> Self::Buf;
    /// An empty key or value cache.
    fn new_cache(&self) -> Self::Cache;
    /// Appends the rows of `src` to the end of `cache`.
    fn cache_append(&self, cache: &mut Self::Cache, src: &Self::Buf);
    /// Values held by `cache`.
    fn cache_len(&self, cache: &Self::Cache) -> usize;
    /// Bytes of memory `cache` holds (what is allocated for it, used or not).
    fn cache_bytes(&self, cache: &Self::Cache) -> usize;
    /// Values `[start, start + len)` of a key or value cache, widened exactly to f32 (appending
    /// them to a cache gives back the same values: the context cache's copies).
    fn cache_read(&self, cache: &Self::Cache, start: usize, len: usize) -> Vec<f32>;

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ`.
    fn linear(&self, x: &Self::Buf, w: &Self::Weight, m: usize, k: usize, n: usize) -> Self::Buf;
    /// RMSNorm over each row of width `width`: `g ⊙ u / sqrt(mean(u²) + eps)`.
    fn rms_norm(&self, x: &Self::Buf, g: &Self::Buf, width: usize, eps: f32) -> Self::Buf;
    fn silu_inplace(&self, x: &mut Self::Buf);
    /// `x ← x ⊙ sigmoid(gate)`.
    fn sigmoid_gate_inplace(&self, x: &mut Self::Buf, gate: &Self::Buf);
    /// `alpha·a + beta·b`.
    fn axpby(&self, alpha: f32, a: &Self::Buf, beta: f32, b: &Self::Buf) -> Self::Buf;
    /// SwiGLU on a fused projection `h` (`[rows, 2·inter]`, gate columns first, then up):
    /// returns `SiLU(gate) ⊙ up` (`[rows, inter]`).
    fn swiglu(&self, h: &Self::Buf, rows: usize, inter: usize) -> Self::Buf;
    /// `out[ids[i]] += weights[i] · y[i]` for each row i of `y`.
    fn scatter_add_rows(
        &self,
        out: &mut Self::Buf,
        y: &Self::Buf,
        ids: &[u32],
        weights: &[f32],
        width: usize,
    );

    /// Mixture of experts: `out[r] = Σ_groups w · W2(SiLU(W1 x_r) ⊙ W3 x_r)` over the groups
    /// that hold row `r` (`x` is `[rows, hidden]`; rows no group names get zeros).
    fn moe_experts(
        &self,
        x: &Self::Buf,
        rows: usize,
        hidden: usize,
        inter: usize,
        groups: &[ExpertGroup<'_, Self>],
    ) -> Self::Buf;

    /// Lightning attention over `t` new tokens continuing from `state` (`[heads, d, d]`, f32).
    ///
    /// `qkv` is `[t, heads·3d]`, already activated, laid out per head as `[q_h; k_h; v_h]`.
    /// `decay` holds λ per head (decay per token is `exp(−λ)`). Returns `[t, heads·d]` and
    /// leaves the state after the last token in `state`.
    fn lightning(
        &self,
        qkv: &Self::Buf,
        t: usize,
        shape: LightningShape,
        decay: &[f32],
        state: &mut Self::Buf,
    ) -> Self::Buf;

    /// One lightning decode step of several sequences: row `s` of `qkv` (`[batch, heads·3d]`)
    /// is sequence `s`'s token, continuing from `states[s]` (updated). Returns `[batch,
    /// heads·d]`. The default runs [`lightning`](Self::lightning) per sequence; a GPU does the
    /// whole batch in one launch.
    fn lightning_decode(
        &self,
        qkv: &Self::Buf,
        shape: LightningShape,
        decay: &[f32],
        states: &mut [&mut Self::Buf],
    ) -> Self::Buf {
        let w = shape.heads * 3 * shape.head_dim;
        let parts: Vec<Self::Buf> = states
            .iter_mut()
            .enumerate()
            .map(|(s, st)| self.lightning(&self.rows(qkv, s, 1, w), 1, shape, decay, st))
            .collect();
        self.concat_rows(&parts)
    }

    /// Applies rotary embeddings in place to `x` (`[t, heads·head_dim]`), row `i` at absolute
    /// position `pos0 + i`.
    fn rope_inplace(
        &self,
        x: &mut Self::Buf,
        t: usize,
        heads: usize,
        pos0: usize,
        rope: RopeParams,
    );

    /// Rotary embeddings in place for rows at any positions: row `i` of `x` (`[rows,
    /// heads·head_dim]`) at absolute position `positions[i]` (a decode step: one row per
    /// sequence). The default runs [`rope_inplace`](Self::rope_inplace) per row; a GPU does
    /// every row in one launch.
    fn rope_at(&self, x: &mut Self::Buf, heads: usize, positions: &[usize], rope: RopeParams) {
        let w = heads * rope.head_dim;
        assert_eq!(self.len(x), positions.len() * w);
        let parts: Vec<Self::Buf> = positions
            .iter()
            .enumerate()
            .map(|(i, &pos)| {
                let mut r = self.rows(x, i, 1, w);
                self.rope_inplace(&mut r, 1, heads, pos, rope);
                r
            })
            .collect();
        *x = self.concat_rows(&parts);
    }

    /// Appends row `i` of `src` (`[caches.len(), width]`) to `caches[i]`: a decode step's keys
    /// or values, one row per sequence. The default appends one cache at a time; a GPU copies
    /// every row in one launch.
    fn cache_append_rows(&self, caches: &mut [&mut Self::Cache], src: &Self::Buf, width: usize) {
        assert_eq!(self.len(src), caches.len() * width);
        for (i, c) in caches.iter_mut().enumerate() {
            self.cache_append(c, &self.rows(src, i, 1, width));
        }
    }

    /// Causal softmax attention of `t` queries at absolute positions `pos0..pos0+t` over the
    /// first `pos0 + t` keys of the caches (`[len, kv_heads·d]`). Scale `1/sqrt(d)`.
    fn attention(
        &self,
        q: &Self::Buf,
        t: usize,
        k_cache: &Self::Cache,
        v_cache: &Self::Cache,
        pos0: usize,
        shape: AttentionShape,
    ) -> Self::Buf;

    /// One decode step of causal softmax attention for several sequences: row `s` of `q`
    /// (`[batch, heads·d]`) is sequence `s`'s query at position `positions[s]`, over the first
    /// `positions[s] + 1` keys of its caches `caches[s]` (keys, values). Returns `[batch,
    /// heads·d]`. The default runs [`attention`](Self::attention) per sequence; a GPU does the
    /// batch in one launch (and a merge when the keys are split).
    fn attention_decode(
        &self,
        q: &Self::Buf,
        caches: &[(&Self::Cache, &Self::Cache)],
        positions: &[usize],
        shape: AttentionShape,
    ) -> Self::Buf {
        attention_decode_each(self, q, caches, positions, shape)
    }

    /// Softmax over `experts` router logits per row, top-k, renormalised.
    fn route(&self, logits: &Self::Buf, rows: usize, experts: usize, top_k: usize) -> Routing;

    /// One part of ring attention: `t` queries at absolute positions `q_pos0..` over `k_len`
    /// keys and values (`[k_len, kv_heads·d]`, keys after RoPE) at absolute positions
    /// `k_pos0..`, causal by absolute position (a key after a query's position is masked).
    /// Returns the output normalised over these keys alone (`[t, heads·d]`) and the log-sum-exp
    /// of each (query, head)'s scaled scores (`[t, heads]`, −∞ where no key is visible): what
    /// [`attention_merge`](Self::attention_merge) combines. The default computes on the host.
    #[allow(clippy::too_many_arguments)]
    fn attention_partial(
        &self,
        q: &Self::Buf,
        t: usize,
        q_pos0: usize,
        k: &Self::Buf,
        v: &Self::Buf,
        k_len: usize,
        k_pos0: usize,
        shape: AttentionShape,
    ) -> (Self::Buf, Vec<f32>) {
        let (o, lse) = partial::attention(
            &self.host_view(q),
            t,
            q_pos0,
            &self.host_view(k),
            &self.host_view(v),
            k_len,
            k_pos0,
            shape,
        );
        (self.upload_owned(o), lse)
    }

    /// Merges partial attentions of the same queries over disjoint keys by log-sum-exp: the
    /// attention over all their keys, and its log-sum-exp. The default computes on the host.
    fn attention_merge(
        &self,
        parts: &[(Self::Buf, Vec<f32>)],
        t: usize,
        shape: AttentionShape,
    ) -> (Self::Buf, Vec<f32>) {
        let host: Vec<(std::borrow::Cow<'_, [f32]>, &[f32])> = parts
            .iter()
            .map(|(o, l)| (self.host_view(o), l.as_slice()))
            .collect();
        let views: Vec<(&[f32], &[f32])> = host.iter().map(|(o, l)| (&o[..], *l)).collect();
        let (o, lse) = partial::merge(&views, t, shape);
        (self.upload_owned(o), lse)
    }

    /// LayerNorm over each row of width `width`: `g ⊙ (u − mean) / sqrt(var + eps) + b` (the
    /// vision tower's norm). The default computes on the host.
    fn layer_norm(
        &self,
        x: &Self::Buf,
        g: &Self::Buf,
        b: &Self::Buf,
        width: usize,
        eps: f32,
    ) -> Self::Buf {
        let (g, bias) = (self.host_view(g), self.host_view(b));
        let out = partial::layer_norm(&self.host_view(x), &g, &bias, width, eps);
        self.upload_owned(out)
    }

    /// `x[r] += bias` for every row `r` of width `bias.len()` (a linear layer's bias). The
    /// default computes on the host.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf) {
        let bias = self.host_view(bias).into_owned();
        let mut v = self.host_view(x).into_owned();
        for row in v.chunks_mut(bias.len().max(1)) {
            row.iter_mut().zip(&bias).for_each(|(a, b)| *a += b);
        }
        *x = self.upload_owned(v);
    }

    /// GELU in place, the exact (erf) form: `x · (1 + erf(x / √2)) / 2`. The default computes
    /// on the host.
    fn gelu_inplace(&self, x: &mut Self::Buf) {
        let mut v = self.host_view(x).into_owned();
        v.iter_mut().for_each(|a| *a = partial::gelu(*a));
        *x = self.upload_owned(v);
    }

    /// The part of lightning attention that an earlier context contributes (LASP): for `t`
    /// tokens whose `qkv` is laid out as for [`lightning`](Self::lightning) and a state
    /// `prefix` (`[heads, d, d]`, the decayed sum of k^T v of everything before the first
    /// token), `o_i = exp(−λ(i+1)) · q_i · prefix` per head (`[t, heads·d]`). Added to the
    /// output of [`lightning`](Self::lightning) from a zero state, it gives the output from
    /// `prefix`. The default computes on the host.
    fn lightning_prefix(
        &self,
        qkv: &Self::Buf,
        t: usize,
        shape: LightningShape,
        decay: &[f32],
        prefix: &[f32],
    ) -> Self::Buf {
        let o = partial::lightning_prefix(&self.host_view(qkv), t, shape, decay, prefix);
        self.upload_owned(o)
    }
}

/// Host implementations of the context-parallel pieces (the reference; the defaults of the
/// [`Backend`] methods that use them).
pub mod partial {
    use super::{AttentionShape, LightningShape};

    /// See [`super::Backend::attention_partial`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        q: &[f32],
        t: usize,
        q_pos0: usize,
        k: &[f32],
        v: &[f32],
        k_len: usize,
        k_pos0: usize,
        shape: AttentionShape,
    ) -> (Vec<f32>, Vec<f32>) {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let kvw = kv_heads * d;
        assert_eq!(
            q.len(),
            t * heads * d,
            "attention_partial: q is not [t, heads*d]"
        );
        assert!(k.len() >= k_len * kvw && v.len() >= k_len * kvw);
        let group = heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; t * heads * d];
        let mut lse = vec![f32::NEG_INFINITY; t * heads];
        let mut scores = vec![0f32; k_len];
        for i in 0..t {
            let qpos = q_pos0 + i;
            // Keys at positions <= qpos: the first `visible` of this part.
            let visible = (qpos + 1).saturating_sub(k_pos0).min(k_len);
            if visible == 0 {
                continue;
            }
            for h in 0..heads {
                let g = h / group;
                let qv = &q[(i * heads + h) * d..][..d];
                let mut m = f32::NEG_INFINITY;
                for j in 0..visible {
                    let kv = &k[j * kvw + g * d..][..d];
                    let s = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale;
                    scores[j] = s;
                    m = m.max(s);
                }
                let mut sum = 0f32;
                let o = &mut out[(i * heads + h) * d..][..d];
                for j in 0..visible {
                    let w = (scores[j] - m).exp();
                    sum += w;
                    let vv = &v[j * kvw + g * d..][..d];
                    for c in 0..d {
                        o[c] += w * vv[c];
                    }
                }
                for x in o.iter_mut() {
                    *x /= sum;
                }
                lse[i * heads + h] = m + sum.ln();
            }
        }
        (out, lse)
    }

    /// See [`super::Backend::attention_merge`].
    /// The log-sum-exp over all parts of each row, from `parts` parts' log-sum-exps stacked
    /// (`[parts][rows]`): what [`merge`] returns beside the output.
    pub fn merge_lse(lses: &[f32], parts: usize, rows: usize) -> Vec<f32> {
        (0..rows)
            .map(|r| {
                let at = |z: usize| lses[z * rows + r];
                let m = (0..parts).map(at).fold(f32::NEG_INFINITY, f32::max);
                if m == f32::NEG_INFINITY {
                    return m;
                }
                m + (0..parts).map(|z| (at(z) - m).exp()).sum::<f32>().ln()
            })
            .collect()
    }

    pub fn merge(
        parts: &[(&[f32], &[f32])],
        t: usize,
        shape: AttentionShape,
    ) -> (Vec<f32>, Vec<f32>) {
        let (heads, d) = (shape.heads, shape.head_dim);
        let mut out = vec![0f32; t * heads * d];
        for r in 0..t * heads {
            let m = parts
                .iter()
                .map(|(_, l)| l[r])
                .fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let total: f32 = parts.iter().map(|(_, l)| (l[r] - m).exp()).sum();
            let o = &mut out[r * d..][..d];
            for (po, l) in parts {
                let w = (l[r] - m).exp() / total;
                if w == 0.0 {
                    continue;
                }
                for (x, y) in o.iter_mut().zip(&po[r * d..][..d]) {
                    *x += w * y;
                }
            }
        }
        let stacked: Vec<f32> = parts
            .iter()
            .flat_map(|(_, l)| l[..t * heads].iter().copied())
            .collect();
        (out, merge_lse(&stacked, parts.len(), t * heads))
    }

    /// See [`super::Backend::layer_norm`]; statistics in f64.
    pub fn layer_norm(x: &[f32], g: &[f32], b: &[f32], width: usize, eps: f32) -> Vec<f32> {
        assert!(
            g.len() == width && b.len() == width,
            "layer_norm: parameters are not [width]"
        );
        let mut out = vec![0f32; x.len()];
        for (o, r) in out.chunks_mut(width).zip(x.chunks(width)) {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (((o, &v), &g), &b) in o.iter_mut().zip(r).zip(g).zip(b) {
                *o = ((v as f64 - mean) * inv) as f32 * g + b;
            }
        }
        out
    }

    /// Exact GELU: `x · (1 + erf(x / √2)) / 2`.
    pub fn gelu(x: f32) -> f32 {
        0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
    }

    /// See [`super::Backend::lightning_prefix`].
    pub fn lightning_prefix(
        qkv: &[f32],
        t: usize,
        shape: LightningShape,
        decay: &[f32],
        prefix: &[f32],
    ) -> Vec<f32> {
        let (heads, d) = (shape.heads, shape.head_dim);
        assert_eq!(qkv.len(), t * heads * 3 * d);
        assert_eq!(prefix.len(), heads * d * d);
        let mut out = vec![0f32; t * heads * d];
        for i in 0..t {
            for h in 0..heads {
                let f = (-decay[h] * (i + 1) as f32).exp();
                let q = &qkv[i * heads * 3 * d + h * 3 * d..][..d];
                let s = &prefix[h * d * d..][..d * d];
                let o = &mut out[(i * heads + h) * d..][..d];
                for (a, &qa) in q.iter().enumerate() {
                    if qa == 0.0 {
                        continue;
                    }
                    let row = &s[a * d..][..d];
                    for c in 0..d {
                        o[c] += f * qa * row[c];
                    }
                }
            }
        }
        out
    }

    /// The state a context of `len` tokens hands on, decayed over the `n` tokens that follow:
    /// `state ← exp(−λ n) · state + next` per head, in place (the LASP fold).
    pub fn fold_state(state: &mut [f32], n: usize, next: &[f32], decay: &[f32], d: usize) {
        for (h, (s, x)) in state.chunks_mut(d * d).zip(next.chunks(d * d)).enumerate() {
            let f = (-decay[h] * n as f32).exp();
            for (a, b) in s.iter_mut().zip(x) {
                *a = f * *a + b;
            }
        }
    }
}

/// [`Backend::attention_decode`] one sequence at a time.
pub fn attention_decode_each<B: Backend + ?Sized>(
    b: &B,
    q: &B::Buf,
    caches: &[(&B::Cache, &B::Cache)],
    positions: &[usize],
    shape: AttentionShape,
) -> B::Buf {
    assert_eq!(caches.len(), positions.len());
    let w = shape.heads * shape.head_dim;
    let parts: Vec<B::Buf> = caches
        .iter()
        .zip(positions)
        .enumerate()
        .map(|(s, ((k, v), &pos))| b.attention(&b.rows(q, s, 1, w), 1, k, v, pos, shape))
        .collect();
    b.concat_rows(&parts)
}
