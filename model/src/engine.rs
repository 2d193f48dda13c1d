//! The forward pass with the semantics of the original remote code (minimax-01.md §2),
//! in f32, written against the [`Backend`] compute interface.

use crate::checkpoint::Checkpoint;
use crate::config::{LIGHTNING_NORM_EPS, LayerKind, ModelConfig};
use crate::error::{ModelError, Result};
use crate::weights::{expert_name, layer_prefix};
use ringbolt_kernels::{AttentionShape, Backend, ExpertGroup, LightningShape, RopeParams, Routing};

/// Computes the routed experts of one MoE layer somewhere else (a cluster's expert workers).
/// A model loaded without its experts runs its MoE layers through one of these.
pub trait ExpertExecutor<B: Backend> {
    /// The weighted sum over each row's routed experts (`[rows, H]`) for `x` (`[rows, H]`,
    /// the post-attention-normed hidden states). An error aborts the forward step; an executor
    /// that can recover (re-send after a plan change) does so before returning.
    fn experts(
        &self,
        backend: &B,
        layer: usize,
        x: &B::Buf,
        rows: usize,
        routing: &Routing,
    ) -> Result<B::Buf>;
}

/// Weights of one expert (SwiGLU): gate `w1` and up `w3` fused as `w13` (`[2I, H]`, w1 rows
/// first) so one GEMM computes both, and down `w2` (`[H, I]`).
pub struct Expert<B: Backend> {
    pub w13: B::Weight,
    pub w2: B::Weight,
}

impl<B: Backend> Expert<B> {
    pub fn load(ckpt: &Checkpoint, backend: &B, layer: usize, expert: usize) -> Result<Self> {
        let c = ckpt.config();
        let (h, i) = (c.hidden_size, c.intermediate_size);
        // Sized once: no reallocation of the fused matrix; the backend takes the buffers.
        let mut w13 = Vec::with_capacity(2 * i * h);
        ckpt.load_into(&expert_name(layer, expert, "w1"), &[i, h], &mut w13)?;
        ckpt.load_into(&expert_name(layer, expert, "w3"), &[i, h], &mut w13)?;
        let w2 = ckpt.load(&expert_name(layer, expert, "w2"), &[h, i])?;
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
}

impl<B: Backend> SequenceState<B> {
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
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: B::Buf,
    lm_head: Option<B::Weight>,
}

impl<B: Backend> Model<B> {
    /// Loads every tensor of the model from `ckpt` onto `backend`.
    pub fn load(ckpt: &Checkpoint, backend: B) -> Result<Self> {
        Self::load_parts(ckpt, backend, true)
    }

    /// Loads the model; without `experts`, everything but the experts' weights (an attention
    /// worker's share: its MoE layers then run through an [`ExpertExecutor`]).
    pub fn load_parts(ckpt: &Checkpoint, backend: B, experts: bool) -> Result<Self> {
        let cfg = ckpt.config().clone();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let up = |name: &str, shape: &[usize]| -> Result<B::Buf> {
            Ok(backend.upload(&ckpt.load(name, shape)?))
        };
        let upw = |name: &str, rows: usize, cols: usize| -> Result<B::Weight> {
            Ok(backend.upload_weight_owned(ckpt.load(name, &[rows, cols])?, rows, cols))
        };
        let embed = upw("model.embed_tokens.weight", v, h)?;
        let mut layers = Vec::with_capacity(cfg.num_layers());
        for (l, kind) in cfg.layers.iter().enumerate() {
            let p = layer_prefix(l);
            let mixer = match kind {
                LayerKind::Lightning => Mixer::Lightning {
                    qkv: upw(&format!("{p}.self_attn.qkv_proj.weight"), 3 * nh * d, h)?,
                    gate: upw(&format!("{p}.self_attn.output_gate.weight"), nh * d, h)?,
                    norm: up(&format!("{p}.self_attn.norm.weight"), &[nh * d])?,
                    out: upw(&format!("{p}.self_attn.out_proj.weight"), h, nh * d)?,
                    decay: cfg.lightning_decay(l),
                },
                LayerKind::Softmax => Mixer::Softmax {
                    q: upw(&format!("{p}.self_attn.q_proj.weight"), nh * d, h)?,
                    k: upw(&format!("{p}.self_attn.k_proj.weight"), nkv * d, h)?,
                    v: upw(&format!("{p}.self_attn.v_proj.weight"), nkv * d, h)?,
                    o: upw(&format!("{p}.self_attn.o_proj.weight"), h, nh * d)?,
                },
            };
            let experts = if experts {
                (0..cfg.num_experts)
                    .map(|e| Expert::load(ckpt, &backend, l, e))
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
        Ok(Model {
            cfg,
            backend,
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Block size used by lightning prefill (the config's unless overridden).
    pub fn set_block_size(&mut self, block: usize) {
        self.cfg.block_size = block.max(1);
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
        SequenceState { pos: 0, layers }
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
        let mut h = b.weight_rows(&self.embed, &ids, hsz);

        for (l, layer) in self.layers.iter().enumerate() {
            let a = b.rms_norm(&h, &layer.input_norm, hsz, cfg.rms_norm_eps);
            let mix = self.mixer(l, layer, &a, rows, seqs, &spans);
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
        seqs: &mut [(&mut SequenceState<B>, &[u32])],
        spans: &[(usize, usize)],
    ) -> B::Buf {
        let b = &self.backend;
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
                let mut parts = Vec::with_capacity(spans.len());
                for (i, (st, toks)) in seqs.iter_mut().enumerate() {
                    let LayerCache::Lightning(state) = &mut st.layers[l] else {
                        unreachable!("cache kinds follow the config's layer kinds")
                    };
                    let own = per_seq(&p, 3 * nh * d, i);
                    parts.push(b.lightning(
                        own.as_ref().unwrap_or(&p),
                        toks.len(),
                        shape,
                        decay,
                        state,
                    ));
                }
                let o = if parts.len() == 1 {
                    parts.pop().unwrap_or_else(|| b.zeros(0))
                } else {
                    b.concat_rows(&parts)
                };
                let mut y = b.rms_norm(&o, norm, nh * d, LIGHTNING_NORM_EPS);
                let g = b.linear(a, gate, rows, hsz, nh * d);
                b.sigmoid_gate_inplace(&mut y, &g);
                b.linear(&y, out, rows, nh * d, hsz)
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
                let mut parts = Vec::with_capacity(spans.len());
                for (i, (st, toks)) in seqs.iter_mut().enumerate() {
                    let n = toks.len();
                    let pos0 = st.pos;
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
                let att = if parts.len() == 1 {
                    parts.pop().unwrap_or_else(|| b.zeros(0))
                } else {
                    b.concat_rows(&parts)
                };
                b.linear(&att, o, rows, nh * d, hsz)
            }
        }
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
        let logits = b.linear(x, &layer.router, rows, hsz, e);
        let routing = b.route(&logits, rows, e, cfg.experts_per_tok);
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
