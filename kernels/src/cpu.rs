//! The CPU backend: f32 compute, GEMMs through `gemm`, threads through rayon.

use crate::{AttentionShape, Backend, LightningShape, RopeParams, Routing};
use rayon::prelude::*;

/// Rows below which a linear layer runs as parallel dot products instead of a GEMM
/// (decode is memory-bound; a GEMM's packing costs more than it saves there).
const GEMV_ROWS: usize = 4;
/// Query rows per softmax-attention work item.
const ATTN_Q_BLOCK: usize = 64;

/// The CPU backend. Stateless; cheap to clone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// A matrix operand for [`gemm`]: base slice plus row and column strides (in elements).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
    fn check(&self, r: usize, c: usize) {
        if r > 0 && c > 0 {
            let last = (r - 1) * self.rs + (c - 1) * self.cs;
            assert!(last < self.data.len(), "gemm operand out of bounds");
        }
    }
}

/// `dst[m×n] (row stride dst_rs) = alpha·dst + lhs[m×k]·rhs[k×n]` when `accumulate`, else
/// `dst = lhs·rhs`. Bounds are checked before the unchecked GEMM call.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: Option<f32>,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "gemm destination out of bounds"
    );
    if k == 0 {
        match accumulate {
            Some(alpha) => dst_rows(dst, dst_rs, m, n).for_each(|x| *x *= alpha),
            None => dst_rows(dst, dst_rs, m, n).for_each(|x| *x = 0.0),
        }
        return;
    }
    lhs.check(m, k);
    rhs.check(k, n);
    let par = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the GEMM touches is inside the slices (checked above), and `dst`
    // does not alias the operands (it is a unique borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate.is_some(),
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            accumulate.unwrap_or(0.0),
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

fn dst_rows(dst: &mut [f32], rs: usize, m: usize, n: usize) -> impl Iterator<Item = &mut f32> {
    dst.chunks_mut(rs)
        .take(m)
        .flat_map(move |r| r[..n].iter_mut())
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `inv_freq[i] = 1 / θ^(2i/rotary_dim)` in f32, the reference's rounding.
pub fn rope_inv_freq(rope: RopeParams) -> Vec<f32> {
    (0..rope.rotary_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / rope.rotary_dim as f32;
            (1.0 / (rope.theta.powf(e as f64))) as f32
        })
        .collect()
}

/// One head of lightning attention over `t` tokens: `q`, `k`, `v` are `[t, d]`, `state` is
/// `[d, d]` (rows: key dim, columns: value dim). Writes `out` (`[t, d]`).
#[allow(clippy::too_many_arguments)]
pub fn lightning_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    d: usize,
    lambda: f32,
    block: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    let block = block.max(1);
    if t == 1 {
        // Decode: S ← γ S + kᵀv, o = q S.
        let g = (-lambda).exp();
        for r in 0..d {
            let kr = k[r];
            let row = &mut state[r * d..(r + 1) * d];
            for c in 0..d {
                row[c] = g * row[c] + kr * v[c];
            }
        }
        for c in 0..d {
            out[c] = 0.0;
        }
        for r in 0..d {
            let qr = q[r];
            let row = &state[r * d..(r + 1) * d];
            for c in 0..d {
                out[c] += qr * row[c];
            }
        }
        return;
    }
    // decay[n] = exp(−λ n), n = 0..=block
    let decay: Vec<f32> = (0..=block).map(|n| (-lambda * n as f32).exp()).collect();
    let mut scores = vec![0f32; block * block];
    let mut scaled = vec![0f32; block * d];
    let mut start = 0;
    while start < t {
        let m = block.min(t - start);
        let qb = &q[start * d..(start + m) * d];
        let kb = &k[start * d..(start + m) * d];
        let vb = &v[start * d..(start + m) * d];
        let ob = &mut out[start * d..(start + m) * d];
        // Intra-block: ((Q Kᵀ) ⊙ D) V with D[i][j] = exp(−λ(i−j)) for j ≤ i.
        let sc = &mut scores[..m * m];
        gemm(
            m,
            m,
            d,
            sc,
            m,
            Mat::rows(qb, d),
            Mat::transposed(kb, d),
            None,
            false,
        );
        for i in 0..m {
            let row = &mut sc[i * m..(i + 1) * m];
            for (j, s) in row.iter_mut().enumerate() {
                *s = if j <= i { *s * decay[i - j] } else { 0.0 };
            }
        }
        gemm(
            m,
            d,
            m,
            ob,
            d,
            Mat::rows(sc, m),
            Mat::rows(vb, d),
            None,
            false,
        );
        // Inter-block: (Q ⊙ exp(−λ(i+1))) S from the carried state.
        let qs = &mut scaled[..m * d];
        for i in 0..m {
            let f = decay[i + 1];
            for c in 0..d {
                qs[i * d + c] = qb[i * d + c] * f;
            }
        }
        gemm(
            m,
            d,
            d,
            ob,
            d,
            Mat::rows(qs, d),
            Mat::rows(state, d),
            Some(1.0),
            false,
        );
        // State: S ← exp(−λ m) S + (K ⊙ exp(−λ(m−1−j)))ᵀ V.
        for j in 0..m {
            let f = decay[m - 1 - j];
            for c in 0..d {
                qs[j * d + c] = kb[j * d + c] * f;
            }
        }
        gemm(
            d,
            d,
            m,
            state,
            d,
            Mat::transposed(qs, d),
            Mat::rows(vb, d),
            Some(decay[m]),
            false,
        );
        start += m;
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }

    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn rows(&self, x: &Vec<f32>, start: usize, count: usize, width: usize) -> Vec<f32> {
        x[start * width..(start + count) * width].to_vec()
    }

    fn gather_rows(&self, x: &Vec<f32>, ids: &[u32], width: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * width);
        for &i in ids {
            let i = i as usize;
            out.extend_from_slice(&x[i * width..(i + 1) * width]);
        }
        out
    }

    fn concat_rows(&self, parts: &[Vec<f32>]) -> Vec<f32> {
        parts.concat()
    }

    fn append(&self, dst: &mut Vec<f32>, src: &Vec<f32>) {
        dst.extend_from_slice(src);
    }

    fn linear(&self, x: &Vec<f32>, w: &Vec<f32>, m: usize, k: usize, n: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * k, "linear: input is not [m, k]");
        assert_eq!(w.len(), n * k, "linear: weight is not [n, k]");
        let mut y = vec![0f32; m * n];
        if m <= GEMV_ROWS {
            // Parallel over output features, each a dot product per input row.
            const CH: usize = 64;
            let mut yt = vec![0f32; n * m];
            yt.par_chunks_mut(CH * m).enumerate().for_each(|(c, out)| {
                for (jj, o) in out.chunks_mut(m).enumerate() {
                    let j = c * CH + jj;
                    let wr = &w[j * k..(j + 1) * k];
                    for (r, or) in o.iter_mut().enumerate() {
                        *or = dot(&x[r * k..(r + 1) * k], wr);
                    }
                }
            });
            for r in 0..m {
                for j in 0..n {
                    y[r * n + j] = yt[j * m + r];
                }
            }
        } else {
            gemm(
                m,
                n,
                k,
                &mut y,
                n,
                Mat::rows(x, k),
                Mat::transposed(w, k),
                None,
                true,
            );
        }
        y
    }

    fn rms_norm(&self, x: &Vec<f32>, g: &Vec<f32>, width: usize, eps: f32) -> Vec<f32> {
        assert_eq!(g.len(), width);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(width)
            .zip(x.par_chunks(width))
            .for_each(|(yr, xr)| {
                let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / width as f64;
                let r = (1.0 / (ms + eps as f64).sqrt()) as f32;
                for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(g) {
                    *o = w * (v * r);
                }
            });
        y
    }

    fn silu_inplace(&self, x: &mut Vec<f32>) {
        x.par_chunks_mut(4096)
            .for_each(|c| c.iter_mut().for_each(|v| *v = silu(*v)));
    }

    fn sigmoid_gate_inplace(&self, x: &mut Vec<f32>, gate: &Vec<f32>) {
        assert_eq!(x.len(), gate.len());
        x.par_chunks_mut(4096)
            .zip(gate.par_chunks(4096))
            .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(v, &g)| *v *= sigmoid(g)));
    }

    fn axpby(&self, alpha: f32, a: &Vec<f32>, beta: f32, b: &Vec<f32>) -> Vec<f32> {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&a, &b)| alpha * a + beta * b)
            .collect()
    }

    fn swiglu(&self, h1: &Vec<f32>, h3: &Vec<f32>) -> Vec<f32> {
        assert_eq!(h1.len(), h3.len());
        let mut y = vec![0f32; h1.len()];
        y.par_chunks_mut(4096)
            .zip(h1.par_chunks(4096).zip(h3.par_chunks(4096)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = silu(a) * b;
                }
            });
        y
    }

    fn scatter_add_rows(
        &self,
        out: &mut Vec<f32>,
        y: &Vec<f32>,
        ids: &[u32],
        weights: &[f32],
        width: usize,
    ) {
        assert_eq!(y.len(), ids.len() * width);
        for (i, (&r, &w)) in ids.iter().zip(weights).enumerate() {
            let r = r as usize;
            let dst = &mut out[r * width..(r + 1) * width];
            for (d, &s) in dst.iter_mut().zip(&y[i * width..(i + 1) * width]) {
                *d += w * s;
            }
        }
    }

    fn lightning(
        &self,
        qkv: &Vec<f32>,
        t: usize,
        shape: LightningShape,
        decay: &[f32],
        state: &mut Vec<f32>,
    ) -> Vec<f32> {
        let LightningShape {
            heads,
            head_dim: d,
            block,
        } = shape;
        assert_eq!(
            qkv.len(),
            t * heads * 3 * d,
            "lightning: qkv is not [t, heads*3d]"
        );
        assert_eq!(
            state.len(),
            heads * d * d,
            "lightning: state is not [heads, d, d]"
        );
        assert_eq!(decay.len(), heads);
        let row = heads * 3 * d;
        let per_head: Vec<Vec<f32>> = state
            .par_chunks_mut(d * d)
            .enumerate()
            .map(|(h, st)| {
                let mut q = vec![0f32; t * d];
                let mut k = vec![0f32; t * d];
                let mut v = vec![0f32; t * d];
                for i in 0..t {
                    let base = i * row + h * 3 * d;
                    q[i * d..(i + 1) * d].copy_from_slice(&qkv[base..base + d]);
                    k[i * d..(i + 1) * d].copy_from_slice(&qkv[base + d..base + 2 * d]);
                    v[i * d..(i + 1) * d].copy_from_slice(&qkv[base + 2 * d..base + 3 * d]);
                }
                let mut o = vec![0f32; t * d];
                lightning_head(&q, &k, &v, t, d, decay[h], block, st, &mut o);
                o
            })
            .collect();
        let mut out = vec![0f32; t * heads * d];
        out.par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(i, orow)| {
                for (h, o) in per_head.iter().enumerate() {
                    orow[h * d..(h + 1) * d].copy_from_slice(&o[i * d..(i + 1) * d]);
                }
            });
        out
    }

    fn rope_inplace(
        &self,
        x: &mut Vec<f32>,
        t: usize,
        heads: usize,
        pos0: usize,
        rope: RopeParams,
    ) {
        let hd = rope.head_dim;
        assert_eq!(x.len(), t * heads * hd);
        let half = rope.rotary_dim / 2;
        if half == 0 {
            return;
        }
        let inv = rope_inv_freq(rope);
        x.par_chunks_mut(heads * hd)
            .enumerate()
            .for_each(|(i, row)| {
                let p = (pos0 + i) as f32;
                let cs: Vec<(f32, f32)> = inv
                    .iter()
                    .map(|&f| {
                        let a = p * f; // f32 angle, one rounding, as the reference
                        ((a as f64).cos() as f32, (a as f64).sin() as f32)
                    })
                    .collect();
                for h in 0..heads {
                    let xh = &mut row[h * hd..(h + 1) * hd];
                    for (j, &(c, s)) in cs.iter().enumerate() {
                        let a = xh[j];
                        let b = xh[j + half];
                        xh[j] = a * c - b * s;
                        xh[j + half] = b * c + a * s;
                    }
                }
            });
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        t: usize,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        pos0: usize,
        shape: AttentionShape,
    ) -> Vec<f32> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        assert_eq!(q.len(), t * heads * d);
        let kvw = kv_heads * d;
        assert!(
            k_cache.len() >= (pos0 + t) * kvw,
            "attention: cache shorter than positions"
        );
        assert_eq!(k_cache.len(), v_cache.len());
        let group = heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let qblocks = t.div_ceil(ATTN_Q_BLOCK);
        let items: Vec<(usize, usize)> = (0..heads)
            .flat_map(|h| (0..qblocks).map(move |b| (h, b)))
            .collect();
        let results: Vec<Vec<f32>> = items
            .par_iter()
            .map(|&(h, b)| {
                let g = h / group;
                let r0 = b * ATTN_Q_BLOCK;
                let mb = ATTN_Q_BLOCK.min(t - r0);
                let nk = pos0 + r0 + mb; // keys visible to the last row of the block
                let mut qb = vec![0f32; mb * d];
                for i in 0..mb {
                    let src = &q[(r0 + i) * heads * d + h * d..][..d];
                    for c in 0..d {
                        qb[i * d + c] = src[c] * scale;
                    }
                }
                let kg = &k_cache[g * d..];
                let vg = &v_cache[g * d..];
                let mut s = vec![0f32; mb * nk];
                gemm(
                    mb,
                    nk,
                    d,
                    &mut s,
                    nk,
                    Mat::rows(&qb, d),
                    Mat {
                        data: kg,
                        rs: 1,
                        cs: kvw,
                    },
                    None,
                    false,
                );
                let mut inv_sum = vec![0f32; mb];
                for i in 0..mb {
                    let vis = pos0 + r0 + i + 1;
                    let row = &mut s[i * nk..(i + 1) * nk];
                    let mx = row[..vis].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mut sum = 0f32;
                    for x in row[..vis].iter_mut() {
                        *x = (*x - mx).exp();
                        sum += *x;
                    }
                    row[vis..].iter_mut().for_each(|x| *x = 0.0);
                    inv_sum[i] = 1.0 / sum;
                }
                let mut o = vec![0f32; mb * d];
                gemm(
                    mb,
                    d,
                    nk,
                    &mut o,
                    d,
                    Mat::rows(&s, nk),
                    Mat {
                        data: vg,
                        rs: kvw,
                        cs: 1,
                    },
                    None,
                    false,
                );
                for i in 0..mb {
                    o[i * d..(i + 1) * d]
                        .iter_mut()
                        .for_each(|x| *x *= inv_sum[i]);
                }
                o
            })
            .collect();
        let mut out = vec![0f32; t * heads * d];
        for (&(h, b), o) in items.iter().zip(&results) {
            let r0 = b * ATTN_Q_BLOCK;
            for (i, orow) in o.chunks(d).enumerate() {
                out[(r0 + i) * heads * d + h * d..][..d].copy_from_slice(orow);
            }
        }
        out
    }

    fn route(&self, logits: &Vec<f32>, rows: usize, experts: usize, top_k: usize) -> Routing {
        assert_eq!(logits.len(), rows * experts);
        let mut ex = Vec::with_capacity(rows * top_k);
        let mut ws = Vec::with_capacity(rows * top_k);
        let mut p = vec![0f32; experts];
        let mut order: Vec<usize> = Vec::with_capacity(experts);
        for r in 0..rows {
            let l = &logits[r * experts..(r + 1) * experts];
            let mx = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for (pi, &li) in p.iter_mut().zip(l) {
                *pi = (li - mx).exp();
                sum += *pi;
            }
            p.iter_mut().for_each(|x| *x /= sum);
            order.clear();
            order.extend(0..experts);
            // Largest probability first; ties keep the lower expert index first.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let kept = &order[..top_k];
            let total: f32 = kept.iter().map(|&e| p[e]).sum();
            for &e in kept {
                ex.push(e as u32);
                ws.push(p[e] / total);
            }
        }
        Routing {
            top_k,
            experts: ex,
            weights: ws,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// The exact recurrence, in f64: S_t = γ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t.
    fn recurrence(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        d: usize,
        lambda: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let g = (-lambda).exp();
        let mut s = vec![0f64; d * d];
        let mut out = vec![0f64; t * d];
        for i in 0..t {
            for r in 0..d {
                for c in 0..d {
                    s[r * d + c] = g * s[r * d + c] + k[i * d + r] as f64 * v[i * d + c] as f64;
                }
            }
            for c in 0..d {
                out[i * d + c] = (0..d).map(|r| q[i * d + r] as f64 * s[r * d + c]).sum();
            }
        }
        (out, s)
    }

    fn max_rel(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
        a.iter()
            .zip(b)
            .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y).abs()))
            / scale
    }

    #[test]
    fn lightning_block_algorithm_equals_recurrence_for_any_block_size() {
        let mut rng = StdRng::seed_from_u64(7);
        let (t, d) = (77, 16);
        let q = rand_vec(&mut rng, t * d, 1.0);
        let k = rand_vec(&mut rng, t * d, 1.0);
        let v = rand_vec(&mut rng, t * d, 1.0);
        for &lambda in &[0.9f32, 0.05, 1e-5] {
            let (want, want_s) = recurrence(&q, &k, &v, t, d, lambda as f64);
            for &block in &[1usize, 3, 8, 16, 64, 256] {
                let mut s = vec![0f32; d * d];
                let mut o = vec![0f32; t * d];
                lightning_head(&q, &k, &v, t, d, lambda, block, &mut s, &mut o);
                assert!(
                    max_rel(&o, &want) < 1e-5,
                    "block {block} λ {lambda}: {}",
                    max_rel(&o, &want)
                );
                assert!(
                    max_rel(&s, &want_s) < 1e-5,
                    "state block {block} λ {lambda}"
                );
            }
        }
    }

    #[test]
    fn lightning_chunked_continuation_equals_one_pass() {
        let mut rng = StdRng::seed_from_u64(3);
        let (t, d) = (50, 8);
        let q = rand_vec(&mut rng, t * d, 1.0);
        let k = rand_vec(&mut rng, t * d, 1.0);
        let v = rand_vec(&mut rng, t * d, 1.0);
        let (want, _) = recurrence(&q, &k, &v, t, d, 0.3);
        // 20 tokens as a block prefill, then 1 decode step, then 29 more as a chunk.
        let mut s = vec![0f32; d * d];
        let mut o = vec![0f32; t * d];
        for (a, b) in [(0, 20), (20, 21), (21, 50)] {
            let n = b - a;
            lightning_head(
                &q[a * d..b * d],
                &k[a * d..b * d],
                &v[a * d..b * d],
                n,
                d,
                0.3,
                16,
                &mut s,
                &mut o[a * d..b * d],
            );
        }
        assert!(max_rel(&o, &want) < 1e-5);
    }

    #[test]
    fn attention_matches_naive_softmax_with_gqa_and_offset() {
        let mut rng = StdRng::seed_from_u64(11);
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let (pos0, t) = (70, 9);
        let len = pos0 + t;
        let q = rand_vec(&mut rng, t * 32, 1.0);
        let kc = rand_vec(&mut rng, len * 16, 1.0);
        let vc = rand_vec(&mut rng, len * 16, 1.0);
        let got = Cpu.attention(&q, t, &kc, &vc, pos0, shape);
        for i in 0..t {
            for h in 0..4 {
                let g = h / 2;
                let qi = &q[i * 32 + h * 8..][..8];
                let vis = pos0 + i + 1;
                let sc: Vec<f64> = (0..vis)
                    .map(|j| {
                        (0..8)
                            .map(|c| qi[c] as f64 * kc[j * 16 + g * 8 + c] as f64)
                            .sum::<f64>()
                            / 8f64.sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..8 {
                    let want: f64 = (0..vis)
                        .map(|j| e[j] / z * vc[j * 16 + g * 8 + c] as f64)
                        .sum();
                    let have = got[i * 32 + h * 8 + c] as f64;
                    assert!((want - have).abs() < 1e-5, "row {i} head {h} dim {c}");
                }
            }
        }
    }

    #[test]
    fn linear_gemv_and_gemm_paths_agree() {
        let mut rng = StdRng::seed_from_u64(5);
        let (k, n) = (70, 130);
        let w = rand_vec(&mut rng, n * k, 1.0);
        let x = rand_vec(&mut rng, 9 * k, 1.0);
        let big = Cpu.linear(&x, &w, 9, k, n);
        for m in 1..=GEMV_ROWS {
            let small = Cpu.linear(&x[..m * k].to_vec(), &w, m, k, n);
            for (a, b) in small.iter().zip(&big) {
                assert!((a - b).abs() < 1e-4);
            }
        }
        for r in 0..9 {
            for j in 0..n {
                let want: f32 = (0..k).map(|c| x[r * k + c] * w[j * k + c]).sum();
                assert!((big[r * n + j] - want).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn route_renormalises_top_k() {
        let logits = vec![0.0, 2.0, 1.0, 2.0, /* row 2 */ 5.0, 0.0, 0.0, 0.0];
        let r = Cpu.route(&logits, 2, 4, 2);
        assert_eq!(r.experts, vec![1, 3, 0, 1]);
        assert!((r.weights[0] - 0.5).abs() < 1e-6 && (r.weights[1] - 0.5).abs() < 1e-6);
        let (e0, e1) = (1f32, (-5f32).exp());
        assert!((r.weights[2] - e0 / (e0 + e1)).abs() < 1e-6);
        assert_eq!(
            r.rows_for(1),
            (vec![0, 1], vec![r.weights[0], r.weights[3]])
        );
    }

    #[test]
    fn rope_rotates_neox_pairs_and_keeps_the_rest() {
        let rope = RopeParams {
            head_dim: 8,
            rotary_dim: 4,
            theta: 10000.0,
        };
        let mut x: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect();
        let orig = x.clone();
        Cpu.rope_inplace(&mut x, 1, 1, 3, rope);
        let inv = rope_inv_freq(rope);
        for j in 0..2 {
            let a = 3.0f32 * inv[j];
            let (c, s) = (a.cos(), a.sin());
            assert!((x[j] - (orig[j] * c - orig[j + 2] * s)).abs() < 1e-5);
            assert!((x[j + 2] - (orig[j + 2] * c + orig[j] * s)).abs() < 1e-5);
        }
        assert_eq!(&x[4..], &orig[4..]);
    }
}
