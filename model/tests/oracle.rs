//! The engine against a small, independent oracle written from the equations of
//! minimax-01.md §2, in f64, token by token (recurrence form of lightning attention, naive
//! causal attention). It covers what transformers cannot: partial `rotary_dim`, the
//! pre-norm residual (`postnorm = false`), ALiBi fallback slopes, tied embeddings.

use ringbolt_kernels::cpu::Cpu;
use ringbolt_model::{
    Checkpoint, LayerKind, Logits, Model, ModelConfig, Preset, WeightDtype,
    write_random_checkpoint_scaled,
};
use std::path::Path;

fn alibi(n: usize) -> Vec<f64> {
    // 2^(−8(i+1)/n) for powers of two; otherwise the closest power's slopes followed by every
    // other slope of twice that power.
    if n.is_power_of_two() {
        return (0..n)
            .map(|i| 2f64.powf(-8.0 * (i + 1) as f64 / n as f64))
            .collect();
    }
    let p = n.next_power_of_two() / 2;
    let mut s = alibi(p);
    s.extend(alibi(2 * p).into_iter().step_by(2).take(n - p));
    s
}

struct W<'a>(&'a Checkpoint);
impl W<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Vec<f64> {
        self.0
            .load(name, shape)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }
}

fn rms(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, w)| v * r * w).collect()
}

/// y = W x for W [out, in].
fn mv(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Logits of every position of `tokens`, computed from the equations.
fn oracle(ckpt: &Checkpoint, tokens: &[u32]) -> Vec<f64> {
    let c = ckpt.config().clone();
    let w = W(ckpt);
    let (h, v, nh, nkv, d, inter) = (
        c.hidden_size,
        c.vocab_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
    );
    let t = tokens.len();
    let emb = w.get("model.embed_tokens.weight", &[v, h]);
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&id| emb[id as usize * h..][..h].to_vec())
        .collect();
    let nl = c.layers.len();
    for (l, kind) in c.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        let g_in = w.get(&format!("{p}.input_layernorm.weight"), &[h]);
        let a: Vec<Vec<f64>> = x
            .iter()
            .map(|r| rms(r, &g_in, c.rms_norm_eps as f64))
            .collect();
        let mix: Vec<Vec<f64>> = match kind {
            LayerKind::Lightning => {
                let wqkv = w.get(&format!("{p}.self_attn.qkv_proj.weight"), &[3 * nh * d, h]);
                let wg = w.get(&format!("{p}.self_attn.output_gate.weight"), &[nh * d, h]);
                let gn = w.get(&format!("{p}.self_attn.norm.weight"), &[nh * d]);
                let wo = w.get(&format!("{p}.self_attn.out_proj.weight"), &[h, nh * d]);
                let factor = if nl <= 1 {
                    1.0 + 1e-5
                } else {
                    1.0 - l as f64 / (nl as f64 - 1.0) + 1e-5
                };
                let lambda: Vec<f64> = alibi(nh).iter().map(|s| s * factor).collect();
                let mut state = vec![vec![0f64; d * d]; nh];
                a.iter()
                    .map(|ar| {
                        let qkv: Vec<f64> = mv(&wqkv, ar).into_iter().map(silu).collect();
                        let mut o = vec![0f64; nh * d];
                        for hh in 0..nh {
                            let (q, k, vv) = (
                                &qkv[hh * 3 * d..][..d],
                                &qkv[hh * 3 * d + d..][..d],
                                &qkv[hh * 3 * d + 2 * d..][..d],
                            );
                            let g = (-lambda[hh]).exp();
                            let s = &mut state[hh];
                            for r in 0..d {
                                for cc in 0..d {
                                    s[r * d + cc] = g * s[r * d + cc] + k[r] * vv[cc];
                                }
                            }
                            for cc in 0..d {
                                o[hh * d + cc] = (0..d).map(|r| q[r] * s[r * d + cc]).sum();
                            }
                        }
                        let normed = rms(&o, &gn, 1e-6);
                        let gate = mv(&wg, ar);
                        let y: Vec<f64> = normed
                            .iter()
                            .zip(&gate)
                            .map(|(n, g)| n / (1.0 + (-g).exp()))
                            .collect();
                        mv(&wo, &y)
                    })
                    .collect()
            }
            LayerKind::Softmax => {
                let wq = w.get(&format!("{p}.self_attn.q_proj.weight"), &[nh * d, h]);
                let wk = w.get(&format!("{p}.self_attn.k_proj.weight"), &[nkv * d, h]);
                let wv = w.get(&format!("{p}.self_attn.v_proj.weight"), &[nkv * d, h]);
                let wo = w.get(&format!("{p}.self_attn.o_proj.weight"), &[h, nh * d]);
                let rot = c.rotary_dim;
                let rope = |x: &mut [f64], pos: usize| {
                    for j in 0..rot / 2 {
                        let inv = 1.0 / c.rope_theta.powf(2.0 * j as f64 / rot as f64);
                        let ang = pos as f64 * inv;
                        let (a0, b0) = (x[j], x[j + rot / 2]);
                        x[j] = a0 * ang.cos() - b0 * ang.sin();
                        x[j + rot / 2] = b0 * ang.cos() + a0 * ang.sin();
                    }
                };
                let mut qs = Vec::new();
                let mut ks = Vec::new();
                let mut vs = Vec::new();
                for (pos, ar) in a.iter().enumerate() {
                    let mut q = mv(&wq, ar);
                    let mut k = mv(&wk, ar);
                    for hh in 0..nh {
                        rope(&mut q[hh * d..(hh + 1) * d], pos);
                    }
                    for hh in 0..nkv {
                        rope(&mut k[hh * d..(hh + 1) * d], pos);
                    }
                    qs.push(q);
                    ks.push(k);
                    vs.push(mv(&wv, ar));
                }
                (0..t)
                    .map(|i| {
                        let mut o = vec![0f64; nh * d];
                        for hh in 0..nh {
                            let g = hh / (nh / nkv);
                            let q = &qs[i][hh * d..][..d];
                            let sc: Vec<f64> = (0..=i)
                                .map(|j| {
                                    q.iter()
                                        .zip(&ks[j][g * d..][..d])
                                        .map(|(a, b)| a * b)
                                        .sum::<f64>()
                                        / (d as f64).sqrt()
                                })
                                .collect();
                            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                            let z: f64 = e.iter().sum();
                            for (j, ej) in e.iter().enumerate() {
                                for cc in 0..d {
                                    o[hh * d + cc] += ej / z * vs[j][g * d + cc];
                                }
                            }
                        }
                        mv(&wo, &o)
                    })
                    .collect()
            }
        };
        let (al, be) = match kind {
            LayerKind::Lightning => (c.lightning_alpha as f64, c.lightning_beta as f64),
            LayerKind::Softmax => (c.softmax_alpha as f64, c.softmax_beta as f64),
        };
        let g_post = w.get(&format!("{p}.post_attention_layernorm.weight"), &[h]);
        let router = w.get(
            &format!("{p}.block_sparse_moe.gate.weight"),
            &[c.num_experts, h],
        );
        let experts: Vec<[Vec<f64>; 3]> = (0..c.num_experts)
            .map(|e| {
                let n = |wn: &str| format!("{p}.block_sparse_moe.experts.{e}.{wn}.weight");
                [
                    w.get(&n("w1"), &[inter, h]),
                    w.get(&n("w2"), &[h, inter]),
                    w.get(&n("w3"), &[inter, h]),
                ]
            })
            .collect();
        for i in 0..t {
            let res1 = if c.postnorm { &a[i] } else { &x[i] };
            let h1: Vec<f64> = res1
                .iter()
                .zip(&mix[i])
                .map(|(r, m)| al * r + be * m)
                .collect();
            let b = rms(&h1, &g_post, c.rms_norm_eps as f64);
            let logits = mv(&router, &b);
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let pr: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let mut order: Vec<usize> = (0..c.num_experts).collect();
            order.sort_by(|&p, &q| pr[q].total_cmp(&pr[p]));
            let kept = &order[..c.experts_per_tok];
            let tot: f64 = kept.iter().map(|&e| pr[e]).sum();
            let mut moe = vec![0f64; h];
            for &e in kept {
                let [w1, w2, w3] = &experts[e];
                let g: Vec<f64> = mv(w1, &b)
                    .into_iter()
                    .zip(mv(w3, &b))
                    .map(|(a, u)| silu(a) * u)
                    .collect();
                for (o, y) in moe.iter_mut().zip(mv(w2, &g)) {
                    *o += pr[e] / tot * y;
                }
            }
            let res2 = if c.postnorm { &b } else { &h1 };
            x[i] = res2
                .iter()
                .zip(&moe)
                .map(|(r, m)| c.mlp_alpha as f64 * r + c.mlp_beta as f64 * m)
                .collect();
        }
    }
    let gf = w.get("model.norm.weight", &[h]);
    let head = if c.tie_word_embeddings {
        emb.clone()
    } else {
        w.get("lm_head.weight", &[v, h])
    };
    x.iter()
        .flat_map(|r| mv(&head, &rms(r, &gf, c.rms_norm_eps as f64)))
        .collect()
}

fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()))
        / scale
}

fn engine_logits(dir: &Path, tokens: &[u32], prefill: usize) -> Vec<f32> {
    let model = Model::load(&Checkpoint::open(dir).unwrap(), Cpu::default()).unwrap();
    let mut st = model.new_state();
    let mut out = model
        .forward(&mut st, &tokens[..prefill], Logits::All)
        .unwrap();
    for &t in &tokens[prefill..] {
        out.extend(model.forward(&mut st, &[t], Logits::All).unwrap());
    }
    out
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn check(cfg: &ModelConfig, what: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint_scaled(cfg, 5, WeightDtype::F32, dir.path(), None, 10.0).unwrap();
    let toks = tokens(37, cfg.vocab_size);
    let want = oracle(&Checkpoint::open(dir.path()).unwrap(), &toks);
    for prefill in [37, 20, 1] {
        let err = max_rel(&engine_logits(dir.path(), &toks, prefill), &want);
        assert!(
            err < 1e-4,
            "{what}, prefill {prefill}: relative error {err:e}"
        );
    }
    want
}

fn tiny() -> ModelConfig {
    let mut c = Preset::Tiny.config();
    c.layers = vec![
        LayerKind::Lightning,
        LayerKind::Softmax,
        LayerKind::Lightning,
        LayerKind::Lightning,
        LayerKind::Softmax,
        LayerKind::Lightning,
    ];
    c.rope_theta = 100.0; // fast rotation, so that a wrong rotary width shows
    c
}

#[test]
fn partial_rotary_matches_the_oracle_and_matters() {
    let c = tiny();
    assert_eq!((c.rotary_dim, c.head_dim), (8, 16));
    let partial = check(&c, "rotary 8 of 16");
    let full = check(
        &ModelConfig {
            rotary_dim: 16,
            ..c
        },
        "rotary 16 of 16",
    );
    // The two differ by far more than the tolerance: the test can tell them apart.
    let err = max_rel(
        &partial.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &full,
    );
    assert!(
        err > 1e-2,
        "rotary width changed the logits by only {err:e}"
    );
}

#[test]
fn prenorm_residual_matches_the_oracle() {
    let c = ModelConfig {
        postnorm: false,
        lightning_alpha: 1.0,
        softmax_alpha: 0.5,
        mlp_alpha: 1.5,
        ..tiny()
    };
    check(&c, "postnorm = false");
}

#[test]
fn fallback_slopes_and_tied_embeddings_match_the_oracle() {
    let c = ModelConfig {
        num_heads: 6,
        num_kv_heads: 3,
        head_dim: 8,
        rotary_dim: 4,
        tie_word_embeddings: true,
        block_size: 5,
        ..tiny()
    };
    check(&c, "6 heads, tied embeddings");
}
