//! The CPU backend: f32 compute, GEMMs through `gemm`, threads through rayon.

use crate::format::{Activations, quantize_int8_into, round_bf16};
use crate::{AttentionShape, Backend, ExpertGroup, LightningShape, RopeParams, Routing};
use rayon::prelude::*;

/// Rows up to which a linear layer runs as parallel dot products instead of a GEMM: decode
/// (one row per sequence in the batch) is memory-bound, so each weight row is read once,
/// converted once, and dotted with every input row; a GEMM would first convert and pack the
/// whole weight.
const GEMV_ROWS: usize = 16;
/// Query rows per softmax-attention work item.
const ATTN_Q_BLOCK: usize = 64;

/// The CPU backend: how activations enter its GEMMs is its only setting. Cheap to copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    activations: Activations,
}

impl Cpu {
    /// A CPU backend whose GEMMs take their activations as `activations` says.
    pub fn new(activations: Activations) -> Self {
        Cpu { activations }
    }
}

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
    dot_as(a, b, |v| v)
}

/// `Σ a[i]·f(b[i])` with 16 independent accumulators (so the loop vectorises); `f` widens the
/// weight's storage type to f32.
#[inline(always)]
pub(crate) fn dot_as<T: Copy>(a: &[f32], b: &[T], f: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for i in 0..16 {
            acc[i] += x[i] * f(y[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 16..a.len() {
        s += a[i] * f(b[i]);
    }
    s
}

/// `exp(x)` in f32 to about 1 ulp for x in [−87, 88] (clamped outside), written so that loops
/// over slices vectorize: range reduction `x = n·ln2 + r`, a degree-6 polynomial for `e^r` in
/// Horner form, and `2^n` built from the exponent bits.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    // Fused multiply-adds throughout (the x86-64-v3 baseline has FMA): half the operations
    // of separate products and sums.
    let t = x.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    // t's low mantissa bits hold n (t = 1.5·2^23 + n exactly, n in [−126, 127]): 2^n from
    // them with integer lane arithmetic. (`n as i32`, a saturating cast, does not vectorize:
    // it went lane by lane through scalar conversions and NaN checks.)
    let bits = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + fast_exp(-x))
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// An element-wise loop compiled twice, for the AVX2 baseline and with AVX-512 (16 lanes: the
/// exponentials of SiLU and softmax run twice as wide), the wide one chosen at run time. The
/// body must only call `#[inline(always)]` helpers, so that it vectorizes as a whole.
macro_rules! elementwise {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if crate::x86::has_avx512() {
                #[target_feature(enable = "avx512f")]
                fn wide($($arg: $ty),*) $(-> $ret)? $body
                // SAFETY: AVX-512F is present.
                return unsafe { wide($($arg),*) };
            }
            $body
        }
    };
}

/// `len` values written chunk by chunk in parallel by `fill` (chunk i holds elements
/// `i·chunk..`; the last may be shorter), without zeroing the buffer first: for outputs that
/// every element of is computed, where zeroing was a whole extra pass over memory.
///
/// # Safety
/// `fill` must write every element of the chunk it is given.
unsafe fn par_written(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: the chunks cover 0..len and `fill` wrote each of them whole (the caller's
    // promise); the capacity is at least len.
    unsafe { v.set_len(len) };
    v
}

elementwise! {
    /// `Σ x²` in f64, over 8 independent lanes: one running sum was a chain of dependent
    /// additions (four cycles each) that no compiler may reorder.
    fn sum_squares(x: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let mut it = x.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                acc[l] += c[l] as f64 * c[l] as f64;
            }
        }
        let tail: f64 = it.remainder().iter().map(|&v| v as f64 * v as f64).sum();
        acc.iter().sum::<f64>() + tail
    }
}

elementwise! {
    /// `x ← silu(x)`.
    fn silu_slice(x: &mut [f32]) {
        x.iter_mut().for_each(|v| *v = silu(*v));
    }
}

elementwise! {
    /// `x ← x · sigmoid(g)`.
    fn sigmoid_gate_slice(x: &mut [f32], g: &[f32]) {
        x.iter_mut().zip(g).for_each(|(v, &g)| *v *= sigmoid(g));
    }
}

elementwise! {
    /// `o ← silu(g) · u` (written whole when the three have one length).
    fn swiglu_slice(o: &mut [std::mem::MaybeUninit<f32>], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            o.write(silu(g) * u);
        }
    }
}

#[inline(always)]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// A weight matrix on the CPU: bf16 when every value is exactly a bf16 (a bf16 checkpoint: half
/// the memory traffic in decode, converted to f32 as it is used), else f32; or int8 with one
/// scale per row (output channel) when quantized ([`Backend::upload_weight_int8`]).
pub enum CpuWeight {
    F32(WeightStore<f32>),
    Bf16(WeightStore<u16>),
    Int8 {
        q: WeightStore<i8>,
        scales: WeightStore<f32>,
    },
}

/// Element types a [`WeightStore`] holds: plain numbers, for which every bit pattern (all zeros
/// included) is a value, so a fresh zeroed mapping is already a valid array of them.
pub trait Plain: Copy + Send + Sync + 'static + plain::Sealed {}

mod plain {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
    impl Sealed for i8 {}
}

impl Plain for f32 {}
impl Plain for u16 {}
impl Plain for i8 {}

/// A weight's values in their own anonymous memory mapping: in memory they take exactly their
/// pages, whatever the heap allocator does with large blocks (mimalloc, which the binary uses
/// for its fast reuse of big temporaries, kept about 20% more than asked for the 1–2 MiB
/// expert matrices), and they go back to the OS when dropped. Page-aligned.
pub struct WeightStore<T: Plain> {
    map: Option<memmap2::MmapMut>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Plain> WeightStore<T> {
    /// `len` zeros, writable.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        WeightStore {
            map: (bytes > 0).then(|| {
                memmap2::MmapMut::map_anon(bytes)
                    .unwrap_or_else(|e| panic!("cannot map {bytes} bytes for a weight: {e}"))
            }),
            len,
            _t: std::marker::PhantomData,
        }
    }

    pub fn from_slice(v: &[T]) -> Self {
        let mut store = Self::zeroed(v.len());
        store.copy_from_slice(v);
        store
    }
}

impl<T: Plain> std::ops::DerefMut for WeightStore<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.map {
            // SAFETY: as in `deref`, and `&mut self` makes this the only view.
            Some(m) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr() as *mut T, self.len)
            },
            None => &mut [],
        }
    }
}

impl<T: Plain> std::ops::Deref for WeightStore<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.map {
            // SAFETY: the mapping is `len` values of T long, page-aligned (so aligned for T),
            // zeroed when made (a valid T: `Plain`) and lives as long as `self`.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr() as *const T, self.len) },
            None => &[],
        }
    }
}

impl CpuWeight {
    pub fn new(data: &[f32]) -> Self {
        match Self::bf16_of(data) {
            Some(w) => w,
            None => CpuWeight::F32(WeightStore::from_slice(data)),
        }
    }

    /// Like [`new`](Self::new), keeping `data` itself when it stays f32.
    pub fn from_vec(data: Vec<f32>) -> Self {
        match Self::bf16_of(&data) {
            Some(w) => w,
            None => CpuWeight::F32(WeightStore::from_slice(&data)),
        }
    }

    /// The bf16 form when it is lossless.
    fn bf16_of(data: &[f32]) -> Option<Self> {
        data.par_iter().all(|v| v.to_bits() & 0xffff == 0).then(|| {
            let b: Vec<u16> = data
                .par_iter()
                .map(|v| (v.to_bits() >> 16) as u16)
                .collect();
            CpuWeight::Bf16(WeightStore::from_slice(&b))
        })
    }

    /// `data` (`[rows, cols]`) quantized to int8 per row, straight into its own mapping (no
    /// temporary copy: an expert worker's memory stays what it holds).
    pub fn int8(data: &[f32], rows: usize, cols: usize) -> Self {
        let mut q = WeightStore::<i8>::zeroed(data.len());
        let mut scales = WeightStore::<f32>::zeroed(rows);
        quantize_int8_into(data, rows, cols, &mut q, &mut scales);
        CpuWeight::Int8 { q, scales }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuWeight::F32(v) => v.len(),
            CpuWeight::Bf16(v) => v.len(),
            CpuWeight::Int8 { q, .. } => q.len(),
        }
    }

    /// Bytes the matrix holds (values and scales).
    pub fn bytes(&self) -> usize {
        match self {
            CpuWeight::F32(v) => v.len() * 4,
            CpuWeight::Bf16(v) => v.len() * 2,
            CpuWeight::Int8 { q, scales } => q.len() + scales.len() * 4,
        }
    }

    /// Row `j` of a matrix with `cols` columns in f32 (dequantized when int8), into `out`.
    fn row_into(&self, j: usize, cols: usize, out: &mut [f32]) {
        let r = j * cols..(j + 1) * cols;
        match self {
            CpuWeight::F32(v) => out.copy_from_slice(&v[r]),
            CpuWeight::Bf16(v) => out
                .iter_mut()
                .zip(&v[r])
                .for_each(|(x, &b)| *x = bf16_to_f32(b)),
            CpuWeight::Int8 { q, scales } => out
                .iter_mut()
                .zip(&q[r])
                .for_each(|(x, &b)| *x = b as f32 * scales[j]),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole matrix in f32 (borrowed when it is stored so; int8 dequantized).
    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            CpuWeight::F32(v) => std::borrow::Cow::Borrowed(&v[..]),
            CpuWeight::Bf16(v) => {
                std::borrow::Cow::Owned(v.par_iter().map(|&b| bf16_to_f32(b)).collect())
            }
            CpuWeight::Int8 { q, scales } => {
                let cols = q.len() / scales.len().max(1);
                let mut out = vec![0f32; q.len()];
                if cols > 0 {
                    out.par_chunks_mut(cols)
                        .enumerate()
                        .for_each(|(j, o)| self.row_into(j, cols, o));
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

/// Four dot products against one weight row: each weight value is loaded once for four rows.
#[inline]
fn dot4(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    const L: usize = 8;
    let mut acc = [[0f32; L]; 4];
    let chunks = w.len() / L;
    for c in 0..chunks {
        let wc = &w[c * L..c * L + L];
        for (a, xr) in acc.iter_mut().zip(&x) {
            let xc = &xr[c * L..c * L + L];
            for i in 0..L {
                a[i] += xc[i] * wc[i];
            }
        }
    }
    let mut out = [0f32; 4];
    for (o, (a, xr)) in out.iter_mut().zip(acc.iter().zip(&x)) {
        *o = a.iter().sum::<f32>() + (chunks * L..w.len()).map(|i| xr[i] * w[i]).sum::<f32>();
    }
    out
}

/// Largest lightning block the CPU backend uses: the intra-block product costs O(B) per token
/// and the state terms O(d), so a block near d is cheapest; results do not depend on it.
pub const CPU_LIGHTNING_BLOCK: usize = 64;

/// Rotary embeddings in place on `x` (`[rows, heads·head_dim]`), row `i` at `position(i)`.
fn rope_rows(
    x: &mut [f32],
    heads: usize,
    rope: RopeParams,
    position: impl Fn(usize) -> usize + Sync,
) {
    let hd = rope.head_dim;
    let half = rope.rotary_dim / 2;
    if half == 0 || x.is_empty() {
        return;
    }
    let inv = rope_inv_freq(rope);
    x.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(i, row)| {
            let p = position(i) as f32;
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

/// `inv_freq[i] = 1 / θ^(2i/rotary_dim)` in f32, the reference's rounding.
pub fn rope_inv_freq(rope: RopeParams) -> Vec<f32> {
    (0..rope.rotary_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / rope.rotary_dim as f32;
            (1.0 / (rope.theta.powf(e as f64))) as f32
        })
        .collect()
}

/// How [`lightning_head`] and [`flash_attention`] multiply.
#[derive(Clone, Copy, PartialEq)]
enum Products {
    /// f32 GEMMs (exact).
    F32,
    /// The AMX tile unit with bf16 operands and f32 accumulation, as a GPU kernel multiplies.
    Tile,
}

impl Products {
    /// Tile for bf16 activations where the tile unit takes heads of `d`; F32 otherwise.
    fn for_heads(activations: Activations, d: usize) -> Self {
        match activations {
            Activations::Bf16 if crate::x86::amx_takes(d, d) => Products::Tile,
            _ => Products::F32,
        }
    }
}

/// One head of lightning attention over `t` tokens: `q`, `k`, `v` are `[t, d]`, `state` is
/// `[d, d]` (rows: key dim, columns: value dim). Writes `out` (`[t, d]`). A prefill goes in
/// blocks: per block, the intra-block part `((Q Kᵀ) ⊙ D) V`, the inter-block part
/// `(Q ⊙ decay) S` from the carried state, and the state update `S ← exp(−λ m) S +
/// (K ⊙ decay)ᵀ V`, with the four products made as `products` says. The state and the
/// decays stay f32.
#[allow(clippy::too_many_arguments)]
fn lightning_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    d: usize,
    lambda: f32,
    block: usize,
    state: &mut [f32],
    out: &mut [f32],
    products: Products,
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
    use crate::x86::{TileCols, TileRows, amx_multiply};
    // The tile unit takes blocks of whole tiles only; other block sizes multiply in f32.
    let tile = products == Products::Tile && block.is_multiple_of(32);
    // decay[n] = exp(−λ n), n = 0..=block
    let decay: Vec<f32> = (0..=block).map(|n| (-lambda * n as f32).exp()).collect();
    let mut qs = vec![0f32; block * d];
    let mut start = 0;
    while start < t {
        let m = block.min(t - start);
        // Keys per row of the scores: the tile unit's operands are padded with zero keys to
        // whole tiles (they add nothing).
        let w = if tile { m.next_multiple_of(32) } else { m };
        let qb = &q[start * d..(start + m) * d];
        let kb = &k[start * d..(start + m) * d];
        let vb = &v[start * d..(start + m) * d];
        let ob = &mut out[start * d..(start + m) * d];
        let values = tile.then(|| TileCols::columns_of(vb, d, m, w, d));
        // Intra-block: ((Q Kᵀ) ⊙ D) V with D[i][j] = exp(−λ(i−j)) for j ≤ i.
        let mut sc = if tile {
            let keys = TileCols::rows_of(kb, d, m, w, d);
            amx_multiply(&TileRows::pack(qb, m, d, 1, false), &keys, false)
        } else {
            let mut sc = vec![0f32; m * m];
            let (qm, km) = (Mat::rows(qb, d), Mat::transposed(kb, d));
            gemm(m, m, d, &mut sc, m, qm, km, None, false);
            sc
        };
        for (i, row) in sc.chunks_mut(w).enumerate() {
            for (j, s) in row.iter_mut().enumerate() {
                *s = if j <= i { *s * decay[i - j] } else { 0.0 };
            }
        }
        // Inter-block: (Q ⊙ exp(−λ(i+1))) S from the carried state.
        for (i, (dst, src)) in qs.chunks_mut(d).zip(qb.chunks(d)).enumerate() {
            let f = decay[i + 1];
            dst.iter_mut().zip(src).for_each(|(o, &x)| *o = x * f);
        }
        let qs = &qs[..m * d];
        if let Some(values) = &values {
            let intra = amx_multiply(&TileRows::pack(&sc, m, w, 1, false), values, false);
            let carried = TileCols::columns_of(state, d, d, d, d);
            let inter = amx_multiply(&TileRows::pack(qs, m, d, 1, false), &carried, false);
            for ((o, &a), &b) in ob.iter_mut().zip(&intra).zip(&inter) {
                *o = a + b;
            }
        } else {
            gemm(
                m,
                d,
                m,
                ob,
                d,
                Mat::rows(&sc, m),
                Mat::rows(vb, d),
                None,
                false,
            );
            let (qm, sm) = (Mat::rows(qs, d), Mat::rows(state, d));
            gemm(m, d, d, ob, d, qm, sm, Some(1.0), false);
        }
        // State: S ← exp(−λ m) S + (K ⊙ exp(−λ(m−1−j)))ᵀ V, the left operand (K ⊙ ·)ᵀ as
        // [d, w].
        let mut kt = vec![0f32; d * w];
        for (j, kr) in kb.chunks(d).enumerate() {
            let f = decay[m - 1 - j];
            for (c, &x) in kr.iter().enumerate() {
                kt[c * w + j] = x * f;
            }
        }
        let g = decay[m];
        if let Some(values) = &values {
            let update = amx_multiply(&TileRows::pack(&kt, d, w, 1, false), values, false);
            state
                .iter_mut()
                .zip(&update)
                .for_each(|(s, &u)| *s = g * *s + u);
        } else {
            let (km, vm) = (Mat::rows(&kt, w), Mat::rows(vb, d));
            gemm(d, d, m, state, d, km, vm, Some(g), false);
        }
        start += m;
    }
}

/// Keys per tile of [`flash_attention`].
const ATTN_K_TILE: usize = 512;

elementwise! {
    /// The largest value of `x` (−∞ when empty), ignoring NaNs as `f32::max` does; written
    /// as compare-and-select so that it compiles to plain vector maxima.
    fn max_lanes(x: &[f32]) -> f32 {
        let pick = |a: f32, b: f32| if b > a { b } else { a };
        let mut m = [f32::NEG_INFINITY; 16];
        let mut it = x.chunks_exact(16);
        for c in &mut it {
            for l in 0..16 {
                m[l] = pick(m[l], c[l]);
            }
        }
        let r = m.iter().fold(f32::NEG_INFINITY, |a, &b| pick(a, b));
        it.remainder().iter().fold(r, |a, &b| pick(a, b))
    }
}

elementwise! {
    /// `x ← exp(x − m)` in place; returns the sum.
    fn exp_sum(x: &mut [f32], m: f32) -> f32 {
        let mut acc = [0f32; 16];
        let mut it = x.chunks_exact_mut(16);
        for c in &mut it {
            for l in 0..16 {
                c[l] = fast_exp(c[l] - m);
                acc[l] += c[l];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for v in it.into_remainder() {
            *v = fast_exp(*v - m);
            s += *v;
        }
        s
    }
}

/// Query rows up to which attention is computed with dot products instead of GEMM tiles
/// (decode: one query per head, where packing K/V for a GEMM costs more than the product).
const ATTN_DOT_ROWS: usize = 8;

/// [`flash_attention`] for a few rows: scores by dot products, softmax, weighted sum of V.
fn dot_attention(
    q: &[f32],
    rows: usize,
    d: usize,
    k: &[f32],
    v: &[f32],
    stride: usize,
    visible: impl Fn(usize) -> usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut o = vec![0f32; rows * d];
    let mut lse = vec![f32::NEG_INFINITY; rows];
    let mut s = Vec::new();
    for r in 0..rows {
        let vis = visible(r);
        if vis == 0 {
            continue;
        }
        let qr = &q[r * d..(r + 1) * d];
        s.clear();
        s.extend((0..vis).map(|j| dot(qr, &k[j * stride..j * stride + d])));
        let m = max_lanes(&s);
        let sum = exp_sum(&mut s, m);
        let inv = 1.0 / sum;
        lse[r] = m + sum.ln();
        let or = &mut o[r * d..(r + 1) * d];
        for (j, &p) in s.iter().enumerate() {
            let vj = &v[j * stride..j * stride + d];
            for c in 0..d {
                or[c] += p * vj[c];
            }
        }
        or.iter_mut().for_each(|x| *x *= inv);
    }
    (o, lse)
}

/// Rows `[t, heads·d]` from each head's `[t, d]` output.
fn interleave_heads(per_head: &[Vec<f32>], t: usize, d: usize) -> Vec<f32> {
    let heads = per_head.len();
    // SAFETY: chunk i is row i (heads·d elements); the loop writes d of them per head.
    unsafe {
        par_written(t * heads * d, heads * d, |i, orow| {
            for (h, o) in per_head.iter().enumerate() {
                let src = &o[i * d..(i + 1) * d];
                for (dst, &v) in orow[h * d..(h + 1) * d].iter_mut().zip(src) {
                    dst.write(v);
                }
            }
        })
    }
}

/// Causal softmax attention with GQA of `t` queries (`[t, heads·d]`) over keys and values
/// (`[n, kv_heads·d]`), query `i` seeing keys `0..visible(i)` (non-decreasing in `i`). One work
/// item per (KV head, query block): the group's query heads share each K/V tile, so it is
/// packed once for `group × block` rows. Returns the output and the log-sum-exp per (query,
/// head) (`[t, heads]`).
fn grouped_attention(
    q: &[f32],
    t: usize,
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    activations: Activations,
    visible: impl Fn(usize) -> usize + Sync,
) -> (Vec<f32>, Vec<f32>) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    assert_eq!(q.len(), t * heads * d);
    let kvw = kv_heads * d;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let qblocks = t.div_ceil(ATTN_Q_BLOCK);
    // bf16 operands on the tile unit, as a GPU's flash attention takes them.
    let products = Products::for_heads(activations, d);
    let items: Vec<(usize, usize)> = (0..kv_heads)
        .flat_map(|g| (0..qblocks).map(move |b| (g, b)))
        .collect();
    let results: Vec<(Vec<f32>, Vec<f32>)> = items
        .par_iter()
        .map(|&(g, b)| {
            let r0 = b * ATTN_Q_BLOCK;
            let mb = ATTN_Q_BLOCK.min(t - r0);
            let rows = group * mb; // row hh·mb + i: head g·group + hh, query r0 + i
            let mut qg = vec![0f32; rows * d];
            for hh in 0..group {
                let h = g * group + hh;
                for i in 0..mb {
                    let src = &q[(r0 + i) * heads * d + h * d..][..d];
                    let dst = &mut qg[(hh * mb + i) * d..][..d];
                    for c in 0..d {
                        dst[c] = src[c] * scale;
                    }
                }
            }
            let nk = visible(r0 + mb - 1);
            if nk == 0 {
                return (vec![0f32; rows * d], vec![f32::NEG_INFINITY; rows]);
            }
            let seen = |r| visible(r0 + r % mb);
            let (kg, vg) = (&k[g * d..], &v[g * d..]);
            flash_attention(&qg, rows, d, kg, vg, kvw, nk, seen, products)
        })
        .collect();
    let mut out = vec![0f32; t * heads * d];
    let mut lse = vec![f32::NEG_INFINITY; t * heads];
    for (&(g, b), (o, l)) in items.iter().zip(&results) {
        let r0 = b * ATTN_Q_BLOCK;
        let mb = ATTN_Q_BLOCK.min(t - r0);
        for (r, orow) in o.chunks(d).enumerate() {
            let (hh, i) = (r / mb, r % mb);
            let h = g * group + hh;
            out[(r0 + i) * heads * d + h * d..][..d].copy_from_slice(orow);
            lse[(r0 + i) * heads + h] = l[r];
        }
    }
    (out, lse)
}

/// The running softmax of [`flash_attention`]: per row, the largest score so far and the sum
/// of the exponentials relative to it.
struct OnlineSoftmax {
    m: Vec<f32>,
    l: Vec<f32>,
}

impl OnlineSoftmax {
    fn new(rows: usize) -> Self {
        OnlineSoftmax {
            m: vec![f32::NEG_INFINITY; rows],
            l: vec![0f32; rows],
        }
    }

    /// Takes in the scores of keys `kt..kt + kn` for rows `first..` (`s`, rows of `width` ≥
    /// kn): each row's visible scores become their exponentials (the rest zeros), and its
    /// output row in `o` (all rows, of `d`) is rescaled to the new maximum.
    #[allow(clippy::too_many_arguments)]
    fn absorb(
        &mut self,
        first: usize,
        s: &mut [f32],
        width: usize,
        kt: usize,
        kn: usize,
        visible: impl Fn(usize) -> usize,
        o: &mut [f32],
        d: usize,
    ) {
        for (i, row) in s.chunks_mut(width).enumerate() {
            let r = first + i;
            let cnt = visible(r).saturating_sub(kt).min(kn);
            if cnt == 0 {
                row.iter_mut().for_each(|x| *x = 0.0);
                continue;
            }
            let (m, l) = (&mut self.m[r], &mut self.l[r]);
            let m_new = m.max(max_lanes(&row[..cnt]));
            let rescale = if *m == f32::NEG_INFINITY {
                0.0
            } else {
                fast_exp(*m - m_new)
            };
            let sum = exp_sum(&mut row[..cnt], m_new);
            row[cnt..].iter_mut().for_each(|x| *x = 0.0);
            *l = *l * rescale + sum;
            *m = m_new;
            if rescale != 1.0 {
                o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= rescale);
            }
        }
    }

    /// The output normalised by each row's sum, and each row's log-sum-exp (−∞, with a zero
    /// output, for a row that saw no key).
    fn finish(self, mut o: Vec<f32>, d: usize) -> (Vec<f32>, Vec<f32>) {
        let mut lse = vec![f32::NEG_INFINITY; self.m.len()];
        for (r, (&m, &l)) in self.m.iter().zip(&self.l).enumerate() {
            if l == 0.0 {
                continue;
            }
            let inv = 1.0 / l;
            o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
            lse[r] = m + l.ln();
        }
        (o, lse)
    }
}

/// Softmax attention of `rows` (pre-scaled) queries `q` (`[rows, d]`) over the first `nk` keys
/// and values (row stride `stride`), row `r` seeing keys `0..visible(r)`. Keys go in tiles with
/// an online softmax (running max and sum per row), so memory stays O(rows × tile) whatever
/// the context length. Returns the output and each row's log-sum-exp (−∞, with a zero output,
/// for a row that sees no key).
///
/// With [`Products::Tile`] the queries, each tile of keys, the softmax weights and each tile of
/// values are rounded to bf16 and multiplied on the AMX tile unit with f32 accumulation, as a
/// GPU's flash attention does (for [`Activations::Bf16`]; needs `amx_takes(d, d)`); the
/// online softmax stays f32.
#[allow(clippy::too_many_arguments)]
fn flash_attention(
    q: &[f32],
    rows: usize,
    d: usize,
    k: &[f32],
    v: &[f32],
    stride: usize,
    nk: usize,
    visible: impl Fn(usize) -> usize,
    products: Products,
) -> (Vec<f32>, Vec<f32>) {
    if rows <= ATTN_DOT_ROWS {
        return dot_attention(q, rows, d, k, v, stride, visible);
    }
    let mut o = vec![0f32; rows * d];
    let mut soft = OnlineSoftmax::new(rows);
    if products == Products::Tile {
        use crate::x86::{TileCols, TileRows, amx_multiply};
        // Rows go through each key tile in blocks, so that a block's scores and weights stay in
        // cache between the products and the softmax.
        const ROWS: usize = 64;
        let blocks: Vec<(usize, TileRows)> = (0..rows)
            .step_by(ROWS)
            .map(|r0| {
                let n = ROWS.min(rows - r0);
                (r0, TileRows::pack(&q[r0 * d..(r0 + n) * d], n, d, 1, false))
            })
            .collect();
        let mut kt = 0;
        while kt < nk {
            let kn = ATTN_K_TILE.min(nk - kt);
            // Keys past kn are zero columns of the operand; every row masks them below.
            let knp = kn.next_multiple_of(32);
            let keys = TileCols::rows_of(&k[kt * stride..], stride, kn, knp, d);
            let values = TileCols::columns_of(&v[kt * stride..], stride, kn, knp, d);
            for (r0, qp) in &blocks {
                let n = qp.rows();
                let mut s = amx_multiply(qp, &keys, false);
                soft.absorb(*r0, &mut s, knp, kt, kn, &visible, &mut o, d);
                let pv = amx_multiply(&TileRows::pack(&s, n, knp, 1, false), &values, false);
                let ob = &mut o[r0 * d..(r0 + n) * d];
                ob.iter_mut().zip(&pv).for_each(|(o, p)| *o += p);
            }
            kt += kn;
        }
        return soft.finish(o, d);
    }
    let mut s = vec![0f32; rows * ATTN_K_TILE.min(nk)];
    let mut kt = 0;
    while kt < nk {
        let kn = ATTN_K_TILE.min(nk - kt);
        let st = &mut s[..rows * kn];
        gemm(
            rows,
            kn,
            d,
            st,
            kn,
            Mat::rows(q, d),
            Mat {
                data: &k[kt * stride..],
                rs: 1,
                cs: stride,
            },
            None,
            false,
        );
        soft.absorb(0, st, kn, kt, kn, &visible, &mut o, d);
        gemm(
            rows,
            d,
            kn,
            &mut o,
            d,
            Mat::rows(st, kn),
            Mat {
                data: &v[kt * stride..],
                rs: stride,
                cs: 1,
            },
            Some(1.0),
            false,
        );
        kt += kn;
    }
    soft.finish(o, d)
}

/// Each output row's features times their int8 channel scales (the int8 kernels sum x·q).
fn scaled(mut y: Vec<f32>, scales: &[f32]) -> Vec<f32> {
    for row in y.chunks_mut(scales.len()) {
        row.iter_mut().zip(scales).for_each(|(v, s)| *v *= s);
    }
    y
}

/// A bf16 or int8 weight packed for the AMX tile unit; int8 channel scales are applied to the
/// product.
struct TileWeight<'a> {
    cols: crate::x86::TileCols,
    k: usize,
    scales: Option<&'a [f32]>,
}

impl<'a> TileWeight<'a> {
    /// `w` (`[n, k]`) packed; None where the tile unit does not take it (no AMX, a shape not
    /// in whole tiles, f32 weights).
    fn of(w: &'a CpuWeight, k: usize, n: usize, parallel: bool) -> Option<Self> {
        if !crate::x86::amx_takes(k, n) {
            return None;
        }
        use crate::x86::TileCols;
        let (cols, scales) = match w {
            CpuWeight::Bf16(v) => (TileCols::weights(v, k, n, parallel), None),
            CpuWeight::Int8 { q, scales } => {
                (TileCols::weights(q, k, n, parallel), Some(&scales[..]))
            }
            CpuWeight::F32(_) => return None,
        };
        Some(TileWeight { cols, k, scales })
    }

    /// `x · wᵀ` for `m` rows: bf16 activations are one bf16 term on the tile unit, f32 ones
    /// need three (f32 accuracy).
    fn apply(&self, x: &[f32], m: usize, activations: Activations, parallel: bool) -> Vec<f32> {
        let terms = match activations {
            Activations::F32 => 3,
            Activations::Bf16 => 1,
        };
        let a = crate::x86::TileRows::pack(x, m, self.k, terms, parallel);
        let y = crate::x86::amx_multiply(&a, &self.cols, parallel);
        match self.scales {
            Some(s) => scaled(y, s),
            None => y,
        }
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`; `parallel` lets the GEMM fork across threads. With
/// [`Activations::Bf16`] the input is rounded to bf16 first (by the tile unit's packing where
/// it takes the GEMM, by a rounded copy otherwise).
fn linear(
    x: &[f32],
    w: &CpuWeight,
    m: usize,
    k: usize,
    n: usize,
    parallel: bool,
    activations: Activations,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "linear: input is not [m, k]");
    assert_eq!(w.len(), n * k, "linear: weight is not [n, k]");
    if m > GEMV_ROWS
        && let Some(tw) = TileWeight::of(w, k, n, parallel)
    {
        return tw.apply(x, m, activations, parallel);
    }
    let rounded: Vec<f32>;
    let x = match activations {
        Activations::F32 => x,
        Activations::Bf16 => {
            rounded = x.iter().map(|&v| round_bf16(v)).collect();
            &rounded[..]
        }
    };
    match w {
        CpuWeight::Bf16(v) => packed_linear(x, v, m, k, n),
        CpuWeight::Int8 { q, scales } => packed_linear(x, q, m, k, n).map(|y| scaled(y, scales)),
        CpuWeight::F32(_) => None,
    }
    .unwrap_or_else(|| plain_linear(x, w, m, k, n, parallel))
}

/// `x · wᵀ` for a few rows (decode) through the AVX-512 kernels that read packed (bf16 or int8)
/// weights in place, without int8 scales; None where no such kernel takes the shape (larger
/// GEMMs go to the tile unit or to [`plain_linear`]).
fn packed_linear<T: crate::x86::Packed>(
    x: &[f32],
    w: &[T],
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    const CH: usize = 64;
    if m == 1 {
        let mut y = vec![0f32; n];
        y.par_chunks_mut(CH).enumerate().for_each(|(c, out)| {
            let rows = &w[c * CH * k..(c * CH + out.len()) * k];
            crate::x86::gemv(x, rows, k, out);
        });
        return Some(y);
    }
    if m > GEMV_ROWS || !crate::x86::has_avx512() {
        return None;
    }
    // Memory-bound: parallel over output features, each weight row read once for all rows.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(CH * m).enumerate().for_each(|(c, out)| {
        let rows = &w[c * CH * k..(c * CH + out.len() / m) * k];
        let done = crate::x86::gemv_rows(x, m, rows, k, out);
        debug_assert!(done, "AVX-512 is present");
    });
    Some(transpose(&yt, n, m))
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// `x · wᵀ` with f32 arithmetic on any weight (int8 dequantized with its scales): dot
/// products per output feature for a few rows, a GEMM beyond.
fn plain_linear(
    x: &[f32],
    w: &CpuWeight,
    m: usize,
    k: usize,
    n: usize,
    parallel: bool,
) -> Vec<f32> {
    if m > GEMV_ROWS {
        let mut y = vec![0f32; m * n];
        let wf = w.to_f32();
        gemm(
            m,
            n,
            k,
            &mut y,
            n,
            Mat::rows(x, k),
            Mat::transposed(&wf, k),
            None,
            parallel,
        );
        return y;
    }
    // Memory-bound: parallel over output features, each a dot product per input row.
    const CH: usize = 64;
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(CH * m).enumerate().for_each(|(c, out)| {
        let mut row = Vec::new();
        for (jj, o) in out.chunks_mut(m).enumerate() {
            let j = c * CH + jj;
            let wr: &[f32] = match w {
                CpuWeight::F32(v) => &v[j * k..(j + 1) * k],
                _ => {
                    row.resize(k, 0.0);
                    w.row_into(j, k, &mut row);
                    &row
                }
            };
            let mut r = 0;
            while r + 4 <= m {
                let xs = [
                    &x[r * k..][..k],
                    &x[(r + 1) * k..][..k],
                    &x[(r + 2) * k..][..k],
                    &x[(r + 3) * k..][..k],
                ];
                o[r..r + 4].copy_from_slice(&dot4(xs, wr));
                r += 4;
            }
            for (rr, or) in o.iter_mut().enumerate().skip(r) {
                *or = dot(&x[rr * k..(rr + 1) * k], wr);
            }
        }
    });
    transpose(&yt, n, m)
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type Cache = Vec<f32>;

    fn name(&self) -> String {
        let act = match self.activations {
            Activations::F32 => "",
            Activations::Bf16 => ", bf16 activations",
        };
        format!("cpu ({} threads{act})", rayon::current_num_threads())
    }

    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }

    fn upload_weight(&self, data: &[f32], rows: usize, cols: usize) -> CpuWeight {
        assert_eq!(data.len(), rows * cols, "weight is not [rows, cols]");
        CpuWeight::new(data)
    }

    fn upload_weight_owned(&self, data: Vec<f32>, rows: usize, cols: usize) -> CpuWeight {
        assert_eq!(data.len(), rows * cols, "weight is not [rows, cols]");
        CpuWeight::from_vec(data)
    }

    fn upload_weight_int8(&self, data: &[f32], rows: usize, cols: usize) -> CpuWeight {
        CpuWeight::int8(data, rows, cols)
    }

    fn weight_rows(&self, w: &CpuWeight, ids: &[u32], width: usize) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * width];
        out.par_chunks_mut(width)
            .zip(ids.par_iter())
            .for_each(|(o, &i)| w.row_into(i as usize, width, o));
        out
    }

    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }

    fn host_view<'a>(&self, buf: &'a Vec<f32>) -> std::borrow::Cow<'a, [f32]> {
        std::borrow::Cow::Borrowed(buf)
    }

    fn upload_owned(&self, data: Vec<f32>) -> Vec<f32> {
        data
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

    fn new_cache(&self) -> Vec<f32> {
        Vec::new()
    }

    fn cache_append(&self, cache: &mut Vec<f32>, src: &Vec<f32>) {
        cache.extend_from_slice(src);
    }

    fn cache_len(&self, cache: &Vec<f32>) -> usize {
        cache.len()
    }

    fn cache_bytes(&self, cache: &Vec<f32>) -> usize {
        cache.capacity() * 4
    }

    fn cache_read(&self, cache: &Vec<f32>, start: usize, len: usize) -> Vec<f32> {
        cache[start..start + len].to_vec()
    }

    fn linear(&self, x: &Vec<f32>, w: &CpuWeight, m: usize, k: usize, n: usize) -> Vec<f32> {
        linear(x, w, m, k, n, true, self.activations)
    }

    fn moe_experts(
        &self,
        x: &Vec<f32>,
        rows: usize,
        hidden: usize,
        inter: usize,
        groups: &[ExpertGroup<'_, Self>],
    ) -> Vec<f32> {
        assert_eq!(x.len(), rows * hidden);
        // Enough experts to keep every thread busy: one expert per task, each GEMM on one
        // thread (no fork/join inside). Otherwise the GEMMs themselves go parallel.
        let per_task = groups.len() >= rayon::current_num_threads();
        let ys: Vec<Vec<f32>> = groups
            .par_iter()
            .map(|g| {
                let n = g.ids.len();
                let xs = self.gather_rows(x, g.ids, hidden);
                let h = linear(
                    &xs,
                    g.w13,
                    n,
                    hidden,
                    2 * inter,
                    !per_task,
                    self.activations,
                );
                let a = self.swiglu(&h, n, inter);
                linear(&a, g.w2, n, inter, hidden, !per_task, self.activations)
            })
            .collect();
        let mut out = vec![0f32; rows * hidden];
        for (g, y) in groups.iter().zip(&ys) {
            self.scatter_add_rows(&mut out, y, g.ids, g.weights, hidden);
        }
        out
    }

    fn rms_norm(&self, x: &Vec<f32>, g: &Vec<f32>, width: usize, eps: f32) -> Vec<f32> {
        assert_eq!(g.len(), width);
        assert!(x.len().is_multiple_of(width), "rms_norm: rows of {width}");
        // SAFETY: chunk i is row i of the output (width elements), and the loop writes each
        // of them: xr and g are width long too.
        unsafe {
            par_written(x.len(), width, |i, yr| {
                let xr = &x[i * width..(i + 1) * width];
                let ms = sum_squares(xr) / width as f64;
                let r = (1.0 / (ms + eps as f64).sqrt()) as f32;
                for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(g) {
                    o.write(w * (v * r));
                }
            })
        }
    }

    fn silu_inplace(&self, x: &mut Vec<f32>) {
        x.par_chunks_mut(4096).for_each(silu_slice);
    }

    fn sigmoid_gate_inplace(&self, x: &mut Vec<f32>, gate: &Vec<f32>) {
        assert_eq!(x.len(), gate.len());
        x.par_chunks_mut(4096)
            .zip(gate.par_chunks(4096))
            .for_each(|(a, g)| sigmoid_gate_slice(a, g));
    }

    fn axpby(&self, alpha: f32, a: &Vec<f32>, beta: f32, b: &Vec<f32>) -> Vec<f32> {
        assert_eq!(a.len(), b.len());
        const CH: usize = 4096;
        // SAFETY: chunk i covers elements i·CH.. of the output, as the same ranges of a and b
        // (equal lengths, asserted): the loop writes each of them.
        unsafe {
            par_written(a.len(), CH, |i, o| {
                let (a, b) = (&a[i * CH..][..o.len()], &b[i * CH..][..o.len()]);
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    o.write(alpha * a + beta * b);
                }
            })
        }
    }

    fn swiglu(&self, h: &Vec<f32>, rows: usize, inter: usize) -> Vec<f32> {
        assert_eq!(
            h.len(),
            rows * 2 * inter,
            "swiglu: input is not [rows, 2·inter]"
        );
        // SAFETY: chunk i is row i (inter elements); swiglu_slice writes each of them (g
        // and u are inter long).
        unsafe {
            par_written(rows * inter, inter, |i, o| {
                let (g, u) = h[i * 2 * inter..(i + 1) * 2 * inter].split_at(inter);
                swiglu_slice(o, g, u);
            })
        }
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
        let add = |dst: &mut [f32], i: usize, w: f32| {
            for (d, &s) in dst.iter_mut().zip(&y[i * width..(i + 1) * width]) {
                *d += w * s;
            }
        };
        if ids.windows(2).all(|p| p[0] < p[1]) {
            // Distinct ascending rows (one expert's tokens): parallel over blocks of rows.
            const CH: usize = 64;
            out.par_chunks_mut(CH * width)
                .enumerate()
                .for_each(|(c, oc)| {
                    let (r0, r1) = (c * CH, c * CH + oc.len() / width);
                    let lo = ids.partition_point(|&i| (i as usize) < r0);
                    let hi = ids.partition_point(|&i| (i as usize) < r1);
                    for p in lo..hi {
                        let r = ids[p] as usize - r0;
                        add(&mut oc[r * width..(r + 1) * width], p, weights[p]);
                    }
                });
        } else {
            for (i, (&r, &w)) in ids.iter().zip(weights).enumerate() {
                let r = r as usize;
                add(&mut out[r * width..(r + 1) * width], i, w);
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
        let block = block.min(CPU_LIGHTNING_BLOCK);
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
        // bf16 prefills run each block's products on the tile unit.
        let products = Products::for_heads(self.activations, d);
        let per_head: Vec<Vec<f32>> = state
            .par_chunks_mut(d * d)
            .enumerate()
            .map(|(h, st)| {
                let (mut q, mut k, mut v) = (
                    Vec::with_capacity(t * d),
                    Vec::with_capacity(t * d),
                    Vec::with_capacity(t * d),
                );
                for i in 0..t {
                    let base = i * row + h * 3 * d;
                    q.extend_from_slice(&qkv[base..base + d]);
                    k.extend_from_slice(&qkv[base + d..base + 2 * d]);
                    v.extend_from_slice(&qkv[base + 2 * d..base + 3 * d]);
                }
                let mut o = vec![0f32; t * d];
                lightning_head(&q, &k, &v, t, d, decay[h], block, st, &mut o, products);
                o
            })
            .collect();
        interleave_heads(&per_head, t, d)
    }

    fn rope_inplace(
        &self,
        x: &mut Vec<f32>,
        t: usize,
        heads: usize,
        pos0: usize,
        rope: RopeParams,
    ) {
        assert_eq!(x.len(), t * heads * rope.head_dim);
        rope_rows(x, heads, rope, |i| pos0 + i);
    }

    fn rope_at(&self, x: &mut Vec<f32>, heads: usize, positions: &[usize], rope: RopeParams) {
        assert_eq!(x.len(), positions.len() * heads * rope.head_dim);
        rope_rows(x, heads, rope, |i| positions[i]);
    }

    fn cache_append_rows(&self, caches: &mut [&mut Vec<f32>], src: &Vec<f32>, width: usize) {
        assert_eq!(src.len(), caches.len() * width);
        for (c, row) in caches.iter_mut().zip(src.chunks_exact(width.max(1))) {
            c.extend_from_slice(row);
        }
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
        let kvw = shape.kv_heads * shape.head_dim;
        assert!(
            k_cache.len() >= (pos0 + t) * kvw,
            "attention: cache shorter than positions"
        );
        assert_eq!(k_cache.len(), v_cache.len());
        grouped_attention(q, t, k_cache, v_cache, shape, self.activations, |i| {
            pos0 + i + 1
        })
        .0
    }

    fn lightning_prefix(
        &self,
        qkv: &Vec<f32>,
        t: usize,
        shape: LightningShape,
        decay: &[f32],
        prefix: &[f32],
    ) -> Vec<f32> {
        let (heads, d) = (shape.heads, shape.head_dim);
        assert_eq!(qkv.len(), t * heads * 3 * d);
        assert_eq!(prefix.len(), heads * d * d);
        // Per head one GEMM, q_h [t, d] · prefix_h [d, d], into its columns of the output;
        // then each row scaled by its decay.
        let per_head: Vec<Vec<f32>> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let mut o = vec![0f32; t * d];
                gemm(
                    t,
                    d,
                    d,
                    &mut o,
                    d,
                    Mat {
                        data: &qkv[h * 3 * d..],
                        rs: heads * 3 * d,
                        cs: 1,
                    },
                    Mat::rows(&prefix[h * d * d..(h + 1) * d * d], d),
                    None,
                    false,
                );
                for (i, row) in o.chunks_mut(d).enumerate() {
                    let scale = (-decay[h] * (i + 1) as f32).exp();
                    row.iter_mut().for_each(|x| *x *= scale);
                }
                o
            })
            .collect();
        interleave_heads(&per_head, t, d)
    }

    fn layer_norm(
        &self,
        x: &Vec<f32>,
        g: &Vec<f32>,
        b: &Vec<f32>,
        width: usize,
        eps: f32,
    ) -> Vec<f32> {
        const ROWS: usize = 64;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS * width)
            .zip(x.par_chunks(ROWS * width))
            .for_each(|(o, r)| o.copy_from_slice(&crate::partial::layer_norm(r, g, b, width, eps)));
        out
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>) {
        x.par_chunks_mut(bias.len().max(1))
            .for_each(|row| row.iter_mut().zip(bias).for_each(|(a, b)| *a += b));
    }

    fn gelu_inplace(&self, x: &mut Vec<f32>) {
        x.par_chunks_mut(1 << 14)
            .for_each(|c| c.iter_mut().for_each(|a| *a = crate::partial::gelu(*a)));
    }

    fn attention_partial(
        &self,
        q: &Vec<f32>,
        t: usize,
        q_pos0: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        k_len: usize,
        k_pos0: usize,
        shape: AttentionShape,
    ) -> (Vec<f32>, Vec<f32>) {
        let kvw = shape.kv_heads * shape.head_dim;
        assert!(k.len() >= k_len * kvw && v.len() >= k_len * kvw);
        grouped_attention(q, t, k, v, shape, self.activations, |i| {
            (q_pos0 + i + 1).saturating_sub(k_pos0).min(k_len)
        })
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
                lightning_head(
                    &q,
                    &k,
                    &v,
                    t,
                    d,
                    lambda,
                    block,
                    &mut s,
                    &mut o,
                    Products::F32,
                );
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

    /// bf16 prefills run lightning's block products on the tile unit: within bf16's error of
    /// the exact recurrence, over whole and partial blocks, from a carried state.
    #[test]
    fn bf16_lightning_on_the_tile_unit_follows_the_recurrence() {
        if !crate::x86::has_amx() {
            eprintln!("skipped: no AMX on this CPU");
            return;
        }
        let mut rng = StdRng::seed_from_u64(17);
        let (t, d) = (150, 64);
        let q = rand_vec(&mut rng, t * d, 1.0);
        let k = rand_vec(&mut rng, t * d, 1.0);
        let v = rand_vec(&mut rng, t * d, 1.0);
        for &lambda in &[0.9f32, 0.05, 1e-5] {
            let (want, want_s) = recurrence(&q, &k, &v, t, d, lambda as f64);
            // The first 40 tokens one way, the rest from the carried state.
            let (mut s, mut o) = (vec![0f32; d * d], vec![0f32; t * d]);
            let split = 40 * d;
            let tile = Products::Tile;
            let (q0, k0, v0) = (&q[..split], &k[..split], &v[..split]);
            lightning_head(q0, k0, v0, 40, d, lambda, 64, &mut s, &mut o[..split], tile);
            let (q1, k1, v1) = (&q[split..], &k[split..], &v[split..]);
            lightning_head(
                q1,
                k1,
                v1,
                t - 40,
                d,
                lambda,
                64,
                &mut s,
                &mut o[split..],
                tile,
            );
            let (eo, es) = (max_rel(&o, &want), max_rel(&s, &want_s));
            eprintln!("λ {lambda}: output {eo:e}, state {es:e}");
            // Operands with 8 significant bits, sums of up to ~150 terms.
            assert!(eo < 1.5e-2 && es < 1.5e-2, "λ {lambda}: {eo} {es}");
            assert!(eo > 1e-6, "the tile path rounds its operands");
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
                Products::F32,
            );
        }
        assert!(max_rel(&o, &want) < 1e-5);
    }

    #[test]
    fn attention_matches_naive_softmax_with_gqa_and_offset() {
        // (pos0, t): one key tile; several key tiles and query blocks; decode-sized (the
        // dot-product path).
        for (pos0, t) in [(70, 9), (1100, 70), (1100, 1), (0, 1), (70, 3)] {
            attention_case(pos0, t);
        }
    }

    fn attention_case(pos0: usize, t: usize) {
        let mut rng = StdRng::seed_from_u64(11 + pos0 as u64);
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let len = pos0 + t;
        let q = rand_vec(&mut rng, t * 32, 1.0);
        let kc = rand_vec(&mut rng, len * 16, 1.0);
        let vc = rand_vec(&mut rng, len * 16, 1.0);
        let got = Cpu::default().attention(&q, t, &kc, &vc, pos0, shape);
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

    /// With bf16 activations, prefill attention runs on the tile unit with bf16 operands: within
    /// bf16's error of the exact softmax, over several key tiles, a partial tile and GQA.
    #[test]
    fn bf16_attention_on_the_tile_unit_matches_the_exact_softmax() {
        if !crate::x86::has_amx() {
            eprintln!("skipped: no AMX on this CPU");
            return;
        }
        let (heads, kv, d) = (4, 2, 64);
        let shape = AttentionShape {
            heads,
            kv_heads: kv,
            head_dim: d,
        };
        let bf16 = Cpu::new(Activations::Bf16);
        for (pos0, t) in [(0, 70), (600, 45), (1000, 100)] {
            let mut rng = StdRng::seed_from_u64(21 + pos0 as u64);
            let len = pos0 + t;
            let q = rand_vec(&mut rng, t * heads * d, 1.0);
            let kc = rand_vec(&mut rng, len * kv * d, 1.0);
            let vc = rand_vec(&mut rng, len * kv * d, 1.0);
            let got = bf16.attention(&q, t, &kc, &vc, pos0, shape);
            let exact = Cpu::default().attention(&q, t, &kc, &vc, pos0, shape);
            let mut worst = 0f32;
            for i in 0..t {
                for h in 0..heads {
                    let g = h / (heads / kv);
                    let qi = &q[(i * heads + h) * d..][..d];
                    let vis = pos0 + i + 1;
                    let sc: Vec<f64> = (0..vis)
                        .map(|j| {
                            let kj = &kc[(j * kv + g) * d..][..d];
                            let dot: f64 =
                                qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                            dot / (d as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..vis)
                            .map(|j| e[j] / z * vc[(j * kv + g) * d + c] as f64)
                            .sum();
                        let at = (i * heads + h) * d + c;
                        worst = worst.max((got[at] as f64 - want).abs() as f32);
                        assert!((exact[at] as f64 - want).abs() < 1e-5);
                    }
                }
            }
            // bf16 operands (8 significant bits) on outputs of magnitude ~1.
            assert!(worst < 6e-3, "pos0 {pos0} t {t}: {worst}");
            assert!(worst > 0.0, "the bf16 path rounds its operands");
            eprintln!("pos0 {pos0} t {t}: largest error {worst:e}");
        }
    }

    #[test]
    fn linear_gemv_and_gemm_paths_agree_for_f32_and_bf16_weights() {
        let mut rng = StdRng::seed_from_u64(5);
        let (k, n) = (70, 130);
        let w32 = rand_vec(&mut rng, n * k, 1.0);
        // The same values rounded to bf16: stored as bf16 (lossless), computed in f32.
        let w16: Vec<f32> = w32
            .iter()
            .map(|v| f32::from_bits(v.to_bits() & 0xffff_0000))
            .collect();
        let rows = GEMV_ROWS + 3;
        let x = rand_vec(&mut rng, rows * k, 1.0);
        for w in [&w32, &w16] {
            let cw = Cpu::default().upload_weight(w, n, k);
            assert_eq!(matches!(cw, CpuWeight::Bf16(_)), std::ptr::eq(w, &w16));
            let big = Cpu::default().linear(&x, &cw, rows, k, n);
            for m in 1..=GEMV_ROWS {
                let small = Cpu::default().linear(&x[..m * k].to_vec(), &cw, m, k, n);
                for (a, b) in small.iter().zip(&big) {
                    assert!((a - b).abs() < 1e-4);
                }
            }
            for r in 0..rows {
                for j in 0..n {
                    let want: f32 = (0..k).map(|c| x[r * k + c] * w[j * k + c]).sum();
                    assert!((big[r * n + j] - want).abs() < 1e-3);
                }
            }
            assert_eq!(
                Cpu::default().weight_rows(&cw, &[3, 0], k),
                [&w[3 * k..4 * k], &w[..k]].concat()
            );
        }
    }

    /// Every path of `linear` with int8 weights (one row, a few rows, the tile unit or the
    /// GEMM, and the portable fallbacks) is within the quantization bound of the f32 product:
    /// |y_rj − Σ_c x_rc·w_jc| ≤ (s_j / 2)·Σ_c |x_rc| (each weight is off by at most half its
    /// row's step s_j), plus f32 rounding.
    #[test]
    fn int8_linear_is_within_half_a_step_per_weight_on_every_path() {
        let mut rng = StdRng::seed_from_u64(8);
        for (k, n) in [(64, 96), (70, 130)] {
            let w = rand_vec(&mut rng, n * k, 0.1);
            let cw = Cpu::default().upload_weight_int8(&w, n, k);
            let CpuWeight::Int8 { scales, .. } = &cw else {
                panic!("not int8")
            };
            assert_eq!(cw.bytes(), n * k + 4 * n);
            for rows in [1, 5, GEMV_ROWS, 45] {
                let x = rand_vec(&mut rng, rows * k, 2.0);
                let y = Cpu::default().linear(&x, &cw, rows, k, n);
                let plain = plain_linear(&x, &cw, rows, k, n, false);
                for r in 0..rows {
                    let xr = &x[r * k..][..k];
                    let l1: f32 = xr.iter().map(|v| v.abs()).sum();
                    for j in 0..n {
                        let exact: f32 = (0..k).map(|c| xr[c] * w[j * k + c]).sum();
                        let bound = scales[j] / 2.0 * l1 * 1.001 + 1e-5;
                        let got = y[r * n + j];
                        assert!(
                            (got - exact).abs() <= bound,
                            "k={k} rows={rows} ({r},{j}): {got} vs {exact}, bound {bound}"
                        );
                        assert!((got - plain[r * n + j]).abs() <= 1e-4 * (1.0 + exact.abs()));
                    }
                }
            }
            // Rows as activations: dequantized.
            let rows = Cpu::default().weight_rows(&cw, &[2], k);
            for (c, v) in rows.iter().enumerate() {
                assert!((v - w[2 * k + c]).abs() <= scales[2] / 2.0 * 1.001);
            }
        }
    }

    /// bf16 activations: every path equals the f32 product of the rounded inputs.
    #[test]
    fn bf16_activations_round_the_input_of_every_gemm() {
        let mut rng = StdRng::seed_from_u64(9);
        let (k, n) = (64, 96);
        let w: Vec<f32> = rand_vec(&mut rng, n * k, 0.1)
            .into_iter()
            .map(round_bf16)
            .collect();
        let bf16 = Cpu::new(Activations::Bf16);
        for cw in [
            bf16.upload_weight(&w, n, k),
            bf16.upload_weight_int8(&w, n, k),
        ] {
            for rows in [1, 7, 40] {
                let x = rand_vec(&mut rng, rows * k, 2.0);
                let xr: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
                let got = bf16.linear(&x, &cw, rows, k, n);
                let want = Cpu::default().linear(&xr, &cw, rows, k, n);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{rows}: {a} vs {b}"
                    );
                }
                if rows == 1 {
                    // And the rounding matters: f32 activations give another result.
                    let f32_out = Cpu::default().linear(&x, &cw, rows, k, n);
                    assert!(got.iter().zip(&f32_out).any(|(a, b)| a != b));
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((fast_exp(x) as f64) - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst:e}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-1000.0) < 1e-37 && fast_exp(-1000.0) >= 0.0);
    }

    #[test]
    fn swiglu_and_scatter_add() {
        let h = vec![1.0, -2.0, 3.0, 4.0, /* row 1 */ 0.5, 0.0, -1.0, 2.0];
        let y = Cpu::default().swiglu(&h, 2, 2);
        let s = |v: f32| v / (1.0 + (-v).exp());
        let want = [s(1.0) * 3.0, s(-2.0) * 4.0, -s(0.5), 0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
        // Ascending ids take the parallel path, unordered ones the serial path: same sums.
        let rows = 200;
        let src: Vec<f32> = (0..3 * 4).map(|i| i as f32).collect();
        let mut a = vec![1f32; rows * 4];
        let mut b = a.clone();
        Cpu::default().scatter_add_rows(&mut a, &src, &[5, 70, 199], &[0.5, 2.0, -1.0], 4);
        Cpu::default().scatter_add_rows(
            &mut b,
            &[&src[8..], &src[..8]].concat(),
            &[199, 5, 70],
            &[-1.0, 0.5, 2.0],
            4,
        );
        assert_eq!(a, b);
        assert_eq!(&a[70 * 4..71 * 4], &[9.0, 11.0, 13.0, 15.0]);
    }

    #[test]
    fn route_renormalises_top_k() {
        let logits = vec![0.0, 2.0, 1.0, 2.0, /* row 2 */ 5.0, 0.0, 0.0, 0.0];
        let r = Cpu::default().route(&logits, 2, 4, 2);
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
        Cpu::default().rope_inplace(&mut x, 1, 1, 3, rope);
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
