//! x86-64 kernels chosen at run time for bf16 and int8 weights:
//!
//! - [`gemv`]: one activation row against bf16 or int8 weight rows with AVX-512 (decode is
//!   memory-bound; four weight rows stream at once and each is converted to f32 in registers,
//!   so int8 reads half the bytes of bf16).
//! - [`amx_linear`]: `y = x·wᵀ` on the AMX tile unit. The f32 activations are split into
//!   three bf16 terms (`x = hi + mid + lo`, 24 significant bits in all, as many as f32 has), the
//!   bf16 (or int8) weights are exact, every product is exact in f32 and the tile unit
//!   accumulates in f32: the result has f32 GEMM accuracy at several times the f32 FMA rate.
//!   With one term the activations are rounded to bf16, as on a GPU.
//!
//! Both are used only when the CPU (and, for AMX, the kernel: `arch_prctl`) supports them;
//! `RINGBOLT_CPU_AMX=0` turns AMX off.

use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Tokens per AMX work item: two 16-row tiles.
const AMX_M: usize = 32;
/// Output features per inner step: two 16-column tiles.
const AMX_N: usize = 32;
/// Input features per tile step (16 bf16 pairs).
const AMX_K: usize = 32;
/// bf16 terms an f32 activation is split into.
const SPLITS: usize = 3;

/// Whether AVX-512F and AVX-512BW are available (decided once).
pub fn has_avx512() -> bool {
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the AMX tile unit with bf16 is usable by this process (CPU support, the kernel's
/// permission for the tile state, and not turned off by `RINGBOLT_CPU_AMX=0`). Decided once.
pub fn has_amx() -> bool {
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        if std::env::var("RINGBOLT_CPU_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        amx_supported()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_supported() -> bool {
    // CPUID.(EAX=7,ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let max_leaf = std::arch::x86_64::__cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only asks the kernel to allow the tile state for
    // this process; it touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx_supported() -> bool {
    false
}

/// Whether [`amx_linear`] takes this shape: every dimension in whole tiles of features.
pub fn amx_takes(k: usize, n: usize) -> bool {
    k > 0 && n > 0 && k.is_multiple_of(AMX_K) && n.is_multiple_of(AMX_N) && has_amx()
}

/// A weight element the GEMV kernels read: bf16 bits (`u16`) or an int8 value (`i8`, whose
/// per-row scale the caller applies). Either widens exactly to f32.
pub trait Packed: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Sixteen consecutive elements at `p`, widened to f32.
    ///
    /// # Safety
    /// AVX-512F must be present and `p..p+16` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// Thirty-two consecutive elements at `p` as bf16 bits, in order.
    ///
    /// # Safety
    /// AVX-512F and AVX-512BW must be present and `p..p+32` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load32_bf16(p: *const Self) -> std::arch::x86_64::__m512i;
}

impl Packed for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees AVX-512F and 16 readable elements (32 bytes).
        unsafe {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load32_bf16(p: *const u16) -> std::arch::x86_64::__m512i {
        // SAFETY: the caller guarantees AVX-512F and 32 readable elements (64 bytes).
        unsafe { std::arch::x86_64::_mm512_loadu_si512(p as *const _) }
    }
}

impl Packed for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const i8) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees AVX-512F and 16 readable elements (16 bytes).
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load32_bf16(p: *const i8) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees AVX-512F/BW and 32 readable elements (32 bytes). An
        // int8 value is exact in f32 and in bf16, so the top half of its f32 bits is its bf16.
        unsafe {
            let half = |q: *const i8| {
                let f = Self::load16(q);
                _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(f)))
            };
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(half(p)), half(p.add(16)))
        }
    }
}

/// `out[j] = Σᵢ x[i]·w[j·k + i]` for every row `j` of `w` (`out.len()` rows of `k`), the
/// weights widened to f32 in registers.
pub fn gemv<T: Packed>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    assert_eq!(x.len(), k, "gemv: input is not [k]");
    assert_eq!(w.len(), out.len() * k, "gemv: weight is not [rows, k]");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; the slices' lengths were checked above.
        unsafe { gemv_avx512(x, w, k, out) };
        return;
    }
    gemv_portable(x, w, k, out);
}

/// [`gemv`] without AVX-512 (auto-vectorised dot products).
fn gemv_portable<T: Packed>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = crate::cpu::dot_as(x, &w[j * k..(j + 1) * k], T::to_f32);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemv_avx512<T: Packed>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let chunks = k / 16;
    let tail = chunks * 16;
    let xp = x.as_ptr();
    let rows = out.len();
    let ahead = (PREFETCH_BYTES / (std::mem::size_of::<T>() * k)).max(1);
    let mut j = 0;
    while j < rows {
        let nr = (rows - j).min(4);
        let mut acc = [_mm512_setzero_ps(); 4];
        let wp = [0, 1, 2, 3].map(|r| w.as_ptr().wrapping_add((j + r.min(nr - 1)) * k));
        for c in 0..chunks {
            // SAFETY: c·16 + 16 <= k: inside x and inside each weight row.
            unsafe {
                let xv = _mm512_loadu_ps(xp.add(c * 16));
                if c % 2 == 0 {
                    // One line of each of the rows `ahead` rows on: rows are short (1 KiB
                    // for hidden 512 in bf16), too short for the hardware prefetcher to ramp
                    // up.
                    for r in 0..4 {
                        let p = wp[r].wrapping_add(ahead * k + c * 16);
                        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                    }
                }
                for r in 0..4 {
                    acc[r] = _mm512_fmadd_ps(xv, T::load16(wp[r].add(c * 16)), acc[r]);
                }
            }
        }
        for r in 0..nr {
            let row = &w[(j + r) * k..(j + r + 1) * k];
            let t: f32 = (tail..k).map(|i| x[i] * row[i].to_f32()).sum();
            out[j + r] = _mm512_reduce_add_ps(acc[r]) + t;
        }
        j += nr;
    }
}

/// `out[j·m + r] = Σᵢ x[r·k + i]·w[j·k + i]` for `m` input rows (2 to 16: a decode step of
/// several sequences) against every row `j` of `w`. Each weight row is read once, from
/// memory, and converted once. Returns false (and writes nothing) without AVX-512.
pub fn gemv_rows<T: Packed>(x: &[f32], m: usize, w: &[T], k: usize, out: &mut [f32]) -> bool {
    assert_eq!(x.len(), m * k, "gemv: input is not [m, k]");
    assert_eq!(w.len() * m, out.len() * k, "gemv: weight is not [rows, k]");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY (each arm): AVX-512F is present; the lengths were checked above.
        unsafe {
            match m {
                2 => rows_avx512::<T, 2>(x, w, k, out),
                3 => rows_avx512::<T, 3>(x, w, k, out),
                4 => rows_avx512::<T, 4>(x, w, k, out),
                5 => rows_avx512::<T, 5>(x, w, k, out),
                6 => rows_avx512::<T, 6>(x, w, k, out),
                7 => rows_avx512::<T, 7>(x, w, k, out),
                8 => rows_avx512::<T, 8>(x, w, k, out),
                9 => rows_avx512::<T, 9>(x, w, k, out),
                10 => rows_avx512::<T, 10>(x, w, k, out),
                11 => rows_avx512::<T, 11>(x, w, k, out),
                12 => rows_avx512::<T, 12>(x, w, k, out),
                13 => rows_avx512::<T, 13>(x, w, k, out),
                14 => rows_avx512::<T, 14>(x, w, k, out),
                15 => rows_avx512::<T, 15>(x, w, k, out),
                16 => rows_avx512::<T, 16>(x, w, k, out),
                _ => return false,
            }
        }
        return true;
    }
    false
}

/// [`gemv_rows`] for `M` input rows: one accumulator register per input row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512<T: Packed, const M: usize>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let chunks = k / 16;
    let tail = chunks * 16;
    let ahead = (PREFETCH_BYTES / (std::mem::size_of::<T>() * k)).max(1);
    for (j, o) in out.chunks_exact_mut(M).enumerate() {
        let wr = &w[j * k..(j + 1) * k];
        let mut acc = [_mm512_setzero_ps(); M];
        for c in 0..chunks {
            // SAFETY: c·16 + 16 <= k: inside the weight row and inside each input row.
            unsafe {
                if c % 2 == 0 {
                    let p = wr.as_ptr().wrapping_add(ahead * k + c * 16);
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                }
                let f = T::load16(wr.as_ptr().add(c * 16));
                for r in 0..M {
                    let xv = _mm512_loadu_ps(x.as_ptr().add(r * k + c * 16));
                    acc[r] = _mm512_fmadd_ps(xv, f, acc[r]);
                }
            }
        }
        for r in 0..M {
            let xr = &x[r * k..(r + 1) * k];
            let t: f32 = (tail..k).map(|i| xr[i] * wr[i].to_f32()).sum();
            o[r] = _mm512_reduce_add_ps(acc[r]) + t;
        }
    }
}

/// How far ahead the GEMV prefetches weight rows: measured on the `small` preset's decode
/// (k = 512): 4 KiB ahead took decode from 9–10.5 to 5.9–6.5 ms per token, 8 KiB to 4.8–5.7,
/// 16 KiB to 5.8–6.7.
const PREFETCH_BYTES: usize = 8192;

/// Round-to-nearest-even f32 → bf16 (finite inputs).
#[inline(always)]
fn bf16_rne(v: f32) -> u16 {
    (crate::format::round_bf16(v).to_bits() >> 16) as u16
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` on the AMX tile unit, with `w` bf16 or int8 (int8 values
/// are exact in bf16; the caller applies their scales). `terms` bf16 terms per activation: 3
/// gives f32 accuracy, 1 rounds the activations to bf16 (a GPU's numerics, a third of the
/// tile work). Call only when [`amx_takes`]`(k, n)`. `parallel` spreads the work over rayon's
/// threads. The packing and [`amx_multiply`] check the shapes.
pub fn amx_linear<T: Packed>(
    x: &[f32],
    w: &[T],
    m: usize,
    k: usize,
    n: usize,
    terms: usize,
    parallel: bool,
) -> Vec<f32> {
    let b = TileCols::weights(w, k, n, parallel);
    amx_multiply(&TileRows::pack(x, m, k, terms, parallel), &b, parallel)
}

/// The left operand of [`amx_multiply`]: `m` rows of `k` activations as `terms` bf16 terms,
/// packed tile by tile (see [`pack_activations`]).
pub struct TileRows {
    data: Vec<u16>,
    m: usize,
    k: usize,
    terms: usize,
}

impl TileRows {
    /// `x` (`[m, k]`, k a multiple of 32) packed; `terms` is 1 (bf16) or 3 (f32 accuracy).
    pub fn pack(x: &[f32], m: usize, k: usize, terms: usize, parallel: bool) -> Self {
        assert!(
            terms == 1 || terms == SPLITS,
            "amx: 1 or {SPLITS} terms, not {terms}"
        );
        assert!(k > 0 && k.is_multiple_of(AMX_K), "amx: k = {k}");
        assert_eq!(x.len(), m * k, "amx: input is not [m, k]");
        TileRows {
            data: pack_activations(x, m, k, terms, parallel),
            m,
            k,
            terms,
        }
    }

    /// The rows packed.
    pub fn rows(&self) -> usize {
        self.m
    }
}

/// The right operand of [`amx_multiply`]: `n` output features of `k` inputs in the tile unit's
/// pair-interleaved layout (see [`pack_weights`]).
pub struct TileCols {
    data: Vec<u32>,
    n: usize,
    k: usize,
}

impl TileCols {
    /// A weight `w` (`[n, k]`, bf16 bits or int8 values; the caller applies int8 scales to
    /// the product) packed once, to multiply several inputs. Needs [`amx_takes`]`(k, n)`.
    pub fn weights<T: Packed>(w: &[T], k: usize, n: usize, parallel: bool) -> Self {
        assert!(
            k > 0 && n > 0 && k.is_multiple_of(AMX_K) && n.is_multiple_of(AMX_N),
            "amx: weight {n}x{k} not in whole tiles"
        );
        assert_eq!(w.len(), n * k, "amx: weight is not [n, k]");
        TileCols {
            data: pack_weights(w, k, n, parallel),
            n,
            k,
        }
    }

    /// Rows `src[i·stride..][..k]` for i < `rows` as the operand's features, rounded to bf16,
    /// then zero features up to `n` (≥ rows; n and k multiples of 32): `x · srcᵀ`, e.g. the
    /// scores of queries against a tile of keys.
    pub fn rows_of(src: &[f32], stride: usize, rows: usize, n: usize, k: usize) -> Self {
        assert!(rows <= n && n.is_multiple_of(AMX_N) && k.is_multiple_of(AMX_K));
        assert!(rows == 0 || (rows - 1) * stride + k <= src.len());
        let kh = k / 2;
        let mut data = uninit::<u32>(n * kh);
        for (jb, blk) in data.chunks_mut(16 * kh).enumerate() {
            #[cfg(target_arch = "x86_64")]
            if has_avx512() {
                // SAFETY: AVX-512F/BW are present (has_avx512 checks both); the rows read
                // are inside src (checked above), blk holds 16 · k/2 elements.
                unsafe { pack_f32_rows_avx512(src, stride, rows, jb, k, blk) };
                continue;
            }
            for f in 0..16 {
                let j = jb * 16 + f;
                for r in 0..kh {
                    let pair = if j < rows {
                        let p = &src[j * stride + 2 * r..][..2];
                        bf16_rne(p[0]) as u32 | (bf16_rne(p[1]) as u32) << 16
                    } else {
                        0
                    };
                    blk[r * 16 + f].write(pair);
                }
            }
        }
        // SAFETY: every block wrote all of its elements.
        let data = unsafe { assume_init(data) };
        TileCols { data, n, k }
    }

    /// Rows `src[i·stride..][..n]` for i < `rows` as the operand's inputs, rounded to bf16,
    /// then zero inputs up to `k` (≥ rows; n and k multiples of 32): `p · src`, e.g. attention
    /// weights against a tile of values.
    pub fn columns_of(src: &[f32], stride: usize, rows: usize, k: usize, n: usize) -> Self {
        assert!(rows <= k && n.is_multiple_of(AMX_N) && k.is_multiple_of(AMX_K));
        assert!(rows == 0 || (rows - 1) * stride + n <= src.len());
        let kh = k / 2;
        let mut data = uninit::<u32>(n * kh);
        for (jb, blk) in data.chunks_mut(16 * kh).enumerate() {
            for r in 0..kh {
                let dst = &mut blk[r * 16..][..16];
                let row = |i: usize| (i < rows).then(|| &src[i * stride + jb * 16..][..16]);
                let (lo, hi) = (row(2 * r), row(2 * r + 1));
                #[cfg(target_arch = "x86_64")]
                if has_avx512() {
                    // SAFETY: AVX-512F is present; each present row holds 16 values, dst 16.
                    unsafe { interleave_avx512(lo, hi, dst) };
                    continue;
                }
                for f in 0..16 {
                    let b = |r: Option<&[f32]>| r.map_or(0, |r| bf16_rne(r[f]) as u32);
                    dst[f].write(b(lo) | b(hi) << 16);
                }
            }
        }
        // SAFETY: every block wrote all of its elements.
        let data = unsafe { assume_init(data) };
        TileCols { data, n, k }
    }
}

/// One 16-feature block of [`TileCols::rows_of`]: 32 values of each of 16 rows rounded to bf16
/// (one register per row; rows past `rows` are zeros), then [`transpose_into`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_f32_rows_avx512(
    src: &[f32],
    stride: usize,
    rows: usize,
    jb: usize,
    k: usize,
    blk: &mut [MaybeUninit<u32>],
) {
    use std::arch::x86_64::*;
    transpose_into(k, blk, |f, kk| {
        let j = jb * 16 + f;
        if j >= rows {
            return _mm512_setzero_si512();
        }
        // SAFETY: j·stride + kk·32 + 32 <= (rows-1)·stride + k <= src.len() (the caller's
        // check), so 32 values at p are readable.
        let (a, b) = unsafe {
            let p = src.as_ptr().add(j * stride + kk * AMX_K);
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        };
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm512_cvtepi32_epi16(rne16(a).0)),
            _mm512_cvtepi32_epi16(rne16(b).0),
        )
    });
}

/// Sixteen pairs `(lo[f], hi[f])` rounded to bf16 into `dst` (an absent row is zeros).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave_avx512(lo: Option<&[f32]>, hi: Option<&[f32]>, dst: &mut [MaybeUninit<u32>]) {
    use std::arch::x86_64::*;
    debug_assert!(dst.len() == 16);
    // SAFETY: each present row holds 16 values.
    let bits = |r: Option<&[f32]>| {
        r.map_or(_mm512_setzero_si512(), |r| {
            rne16(unsafe { _mm512_loadu_ps(r.as_ptr()) }).0
        })
    };
    let v = _mm512_or_si512(bits(lo), _mm512_slli_epi32::<16>(bits(hi)));
    // SAFETY: dst holds 16 u32.
    unsafe { _mm512_storeu_si512(dst.as_mut_ptr() as *mut _, v) };
}

/// `a · bᵀ` on the tile unit: `[a.m, b.n]` in f32. `parallel` spreads the work over rayon's
/// threads. Panics unless AMX is usable and the operands agree on k.
///
/// Blocking: the packed rows of a chunk of [`CHUNK_TOKENS`] stay in L2 while each 32-feature
/// panel of `b` (32 × k bf16: 32 KiB at k = 512) stays in L1 and every 32-row block of the
/// chunk passes over it, accumulating in the tiles across the whole of k.
pub fn amx_multiply(a: &TileRows, b: &TileCols, parallel: bool) -> Vec<f32> {
    assert!(has_amx(), "amx: the tile unit is not usable here");
    assert_eq!(a.k, b.k, "amx: operands differ in k");
    let (m, k, n, terms) = (a.m, a.k, b.n, a.terms);
    let mp = m.div_ceil(AMX_M) * AMX_M;
    let block_len = k / AMX_K * terms * AMX_M * AMX_K;
    let blocks = mp / AMX_M;
    let per_chunk = CHUNK_TOKENS / AMX_M;
    let chunks = blocks.div_ceil(per_chunk);
    let panels = n / AMX_N;
    // Work items: (chunk, run of panels); enough of them to keep every thread busy.
    let splits = if parallel {
        (4 * rayon::current_num_threads())
            .div_ceil(chunks)
            .clamp(1, panels)
    } else {
        1
    };
    let per_split = panels.div_ceil(splits);
    let mut y = uninit::<f32>(mp * n);
    let out = OutPtr(y.as_mut_ptr() as *mut f32);
    let (xp, wp) = (&a.data[..], &b.data[..]);
    let run = |item: usize| {
        let (c, s) = (item / splits, item % splits);
        let (b0, b1) = (c * per_chunk, ((c + 1) * per_chunk).min(blocks));
        let (p0, p1) = (s * per_split, ((s + 1) * per_split).min(panels));
        if p0 >= p1 {
            return;
        }
        // SAFETY: AMX is usable (checked above); the item reads its chunk's packed tiles and
        // its panels of wp, and writes rows b0·32..b1·32 × its panels' columns of y, which no
        // other item writes (items differ in chunk or in panels); y has mp × n elements.
        unsafe {
            amx_panels(
                &xp[b0 * block_len..b1 * block_len],
                k,
                terms,
                wp,
                p0..p1,
                out.at(b0 * AMX_M * n),
                n,
            )
        }
    };
    if parallel {
        (0..chunks * splits).into_par_iter().for_each(run);
    } else {
        (0..chunks * splits).for_each(run);
    }
    // SAFETY: the items covered every chunk × panel: all mp rows × n features were stored.
    let mut y = unsafe { assume_init(y) };
    y.truncate(m * n);
    y
}

/// Tokens per chunk in [`amx_multiply`]: 256 tokens of packed activations take 256 KiB at
/// k = 512 with one term (768 KiB with three), well inside L2.
const CHUNK_TOKENS: usize = 256;

/// The output's base pointer, shared by work items that write disjoint parts of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointer is only written through by work items whose regions do not overlap
// (see amx_multiply); the allocation outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Weights in the tile unit's pair-interleaved layout: for each block of 16 output features
/// and each pair of input features r, the 16 features' `(w[j][2r], w[j][2r+1])` as bf16 bits —
/// one 64-byte tile row. Exact for bf16 and int8 weights alike.
fn pack_weights<T: Packed>(w: &[T], k: usize, n: usize, parallel: bool) -> Vec<u32> {
    let kh = k / 2;
    let mut wp = uninit::<u32>(n * kh);
    let run = |(jb, blk): (usize, &mut [MaybeUninit<u32>])| {
        let rows = &w[jb * 16 * k..(jb + 1) * 16 * k];
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F is present; rows holds 16 rows of k, blk 16·k/2 elements.
            unsafe { pack_block_avx512(rows, k, blk) };
            return;
        }
        let bits = |v: T| v.to_f32().to_bits() >> 16;
        for f in 0..16 {
            let row = &rows[f * k..(f + 1) * k];
            for r in 0..kh {
                blk[r * 16 + f].write(bits(row[2 * r]) | bits(row[2 * r + 1]) << 16);
            }
        }
    };
    if parallel {
        wp.par_chunks_mut(16 * kh).enumerate().for_each(run);
    } else {
        wp.chunks_mut(16 * kh).enumerate().for_each(run);
    }
    // SAFETY: every block wrote all of its 16 · k/2 elements.
    unsafe { assume_init(wp) }
}

/// One 16-feature block of [`pack_weights`]: each row's 32 bf16 of a step (16 pairs, one
/// 512-bit register), then [`transpose_into`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_block_avx512<T: Packed>(rows: &[T], k: usize, blk: &mut [MaybeUninit<u32>]) {
    debug_assert!(rows.len() == 16 * k);
    // SAFETY: f·k + kk·32 + 32 <= 16·k: 32 readable elements; AVX-512F/BW are enabled here.
    transpose_into(k, blk, |f, kk| unsafe {
        T::load32_bf16(rows.as_ptr().add(f * k + kk * AMX_K))
    });
}

/// A 16-feature block of a [`TileCols`] (`blk`, 16 · k/2 pairs) from its 16 features' bf16
/// values: `row(f, kk)` gives feature f's 32 inputs of step kk (16 pairs in one register);
/// each step's 16 × 16 transpose of pairs is 16 tile rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose_into(
    k: usize,
    blk: &mut [MaybeUninit<u32>],
    row: impl Fn(usize, usize) -> std::arch::x86_64::__m512i,
) {
    use std::arch::x86_64::*;
    assert!(blk.len() * 2 == 16 * k && k.is_multiple_of(AMX_K));
    for kk in 0..k / AMX_K {
        let r: [__m512i; 16] = std::array::from_fn(|f| row(f, kk));
        for (i, t) in transpose16(r).iter().enumerate() {
            let dst = &mut blk[(kk * 16 + i) * 16..][..16];
            // SAFETY: dst holds 16 u32, 64 bytes.
            unsafe { _mm512_storeu_si512(dst.as_mut_ptr() as *mut _, *t) };
        }
    }
}

/// The 16 × 16 transpose of 32-bit elements held in 16 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // 2 × 2 blocks of 32-bit elements, then of 64-bit pairs, then of 128-bit lanes, then of
    // 256-bit halves.
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    // Within each 128-bit lane, b[4i + j] now holds row j of the 4 × 4 block of rows 4i..4i+4.
    let mut c = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        for j in 0..2 {
            let (lo, hi) = (b[8 * j + i], b[8 * j + 4 + i]);
            // Lanes 0, 2 of lo then 0, 2 of hi; lanes 1, 3 of lo then 1, 3 of hi.
            c[8 * j + i] = _mm512_shuffle_i32x4::<0b10_00_10_00>(lo, hi);
            c[8 * j + 4 + i] = _mm512_shuffle_i32x4::<0b11_01_11_01>(lo, hi);
        }
    }
    let mut d = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        let (lo, hi) = (c[i], c[8 + i]);
        d[i] = _mm512_shuffle_i32x4::<0b10_00_10_00>(lo, hi);
        d[8 + i] = _mm512_shuffle_i32x4::<0b11_01_11_01>(lo, hi);
    }
    // d[s] is column s of the input: row s of the transpose.
    d
}

/// Activations as `terms` bf16 terms, packed tile by tile: for each block of 32 tokens, each
/// step of 32 input features, each term and each half of the block, one 16 × 64-byte tile
/// (rows past m are zero).
fn pack_activations(x: &[f32], m: usize, k: usize, terms: usize, parallel: bool) -> Vec<u16> {
    let mp = m.div_ceil(AMX_M) * AMX_M;
    let kk_steps = k / AMX_K;
    let block_len = kk_steps * terms * AMX_M * AMX_K;
    let mut xp = uninit::<u16>(mp / AMX_M * block_len);
    let pack = |(tb, dst): (usize, &mut [MaybeUninit<u16>])| {
        for t in 0..AMX_M {
            let (h, row) = (t / 16, t % 16);
            let xr = (tb * AMX_M + t < m).then(|| &x[(tb * AMX_M + t) * k..][..k]);
            for kk in 0..kk_steps {
                let mut parts = [[0u16; AMX_K]; SPLITS];
                if let Some(xr) = xr {
                    split_terms(&xr[kk * AMX_K..][..AMX_K], terms, &mut parts);
                }
                for (s, term) in parts.iter().take(terms).enumerate() {
                    let at = (((kk * terms + s) * 2 + h) * 16 + row) * AMX_K;
                    write_all(&mut dst[at..at + AMX_K], term);
                }
            }
        }
    };
    if parallel {
        xp.par_chunks_mut(block_len).enumerate().for_each(pack);
    } else {
        xp.chunks_mut(block_len).enumerate().for_each(pack);
    }
    // SAFETY: `pack` wrote every element (data rows and zero padding rows).
    unsafe { assume_init(xp) }
}

/// 32 activations as `terms` bf16 terms (`v = hi + mid + lo` to 24 bits with three; `hi`,
/// the rounded value, with one).
fn split_terms(src: &[f32], terms: usize, parts: &mut [[u16; AMX_K]; SPLITS]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; src holds 32 values.
        unsafe { split_terms_avx512(src, terms, parts) };
        return;
    }
    for c in 0..AMX_K {
        let v = src[c];
        let a = bf16_rne(v);
        parts[0][c] = a;
        if terms > 1 {
            let r1 = v - f32::from_bits((a as u32) << 16);
            let b = bf16_rne(r1);
            parts[1][c] = b;
            parts[2][c] = bf16_rne(r1 - f32::from_bits((b as u32) << 16));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_terms_avx512(src: &[f32], terms: usize, parts: &mut [[u16; AMX_K]; SPLITS]) {
    use std::arch::x86_64::*;
    debug_assert!(src.len() == AMX_K);
    for half in 0..2 {
        // SAFETY: 16 values at half·16 are inside src (32 values).
        let mut v = unsafe { _mm512_loadu_ps(src.as_ptr().add(half * 16)) };
        for part in parts.iter_mut().take(terms) {
            let (bits, hi) = rne16(v);
            // SAFETY: 16 u16 at half·16 are inside the 32 of the term.
            unsafe {
                _mm256_storeu_si256(
                    part.as_mut_ptr().add(half * 16) as *mut __m256i,
                    _mm512_cvtepi32_epi16(bits),
                )
            };
            v = _mm512_sub_ps(v, hi);
        }
    }
}

/// Sixteen f32 rounded to bf16 as [`crate::format::round_bf16`] does (ties to even, non-finite
/// values truncated): the bf16 bits in the low half of each 32-bit lane, and the rounded
/// values as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn rne16(v: std::arch::x86_64::__m512) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let b = _mm512_castps_si512(v);
    let exp = _mm512_set1_epi32(0x7f80_0000);
    let finite = _mm512_cmpneq_epi32_mask(_mm512_and_si512(b, exp), exp);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let up = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    let r = _mm512_mask_mov_epi32(b, finite, up);
    let bits = _mm512_srli_epi32::<16>(r);
    (bits, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits)))
}

/// A vector of `len` values to be written before they are read.
fn uninit<T>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation; the capacity is `len`.
    unsafe { v.set_len(len) };
    v
}

/// The vector as initialised values.
///
/// # Safety
/// Every element must have been written.
unsafe fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<T> has T's layout; the caller guarantees initialisation; the
    // allocation is handed over whole (pointer, length, capacity).
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

fn write_all<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// The four accumulator tiles of a 32 × 32 f32 block at `base` with `stride`-byte rows:
/// (tokens 0–15, features 0–15), (0–15, 16–31), (16–31, 0–15), (16–31, 16–31).
fn c_tiles(base: *mut u8, stride: isize) -> [*mut u8; 4] {
    let lower = base.wrapping_offset(16 * stride);
    [base, base.wrapping_add(64), lower, lower.wrapping_add(64)]
}

/// The tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64; // colsb, little-endian u16
            c[48 + t] = 16; // rows
        }
        TileConfig(c)
    }
}

/// The 32-token blocks of a chunk (`xa`: their packed activation tiles, `terms` per input
/// step) against the 32-feature `panels` of `wp`, into `y` (the chunk's first row; rows of n).
/// Tiles: 0–3 accumulators (token half × feature half), 4–5 activations, 6–7 weights.
///
/// # Safety
/// AMX must be usable; `y` must be valid for writes of the chunk's rows × the panels'
/// columns (row stride n).
#[cfg(target_arch = "x86_64")]
unsafe fn amx_panels(
    xa: &[u16],
    k: usize,
    terms: usize,
    wp: &[u32],
    panels: std::ops::Range<usize>,
    y: *mut f32,
    n: usize,
) {
    use std::arch::asm;
    let kk_steps = k / AMX_K;
    let block_len = kk_steps * terms * AMX_M * AMX_K;
    debug_assert!(xa.len().is_multiple_of(block_len) && wp.len() * 2 == n * k);
    debug_assert!(panels.end * AMX_N <= n);
    let blocks = xa.len() / block_len;
    let cfg = TileConfig::full();
    let sc = (n * 4) as isize; // output row stride in bytes
    let s64: isize = 64; // packed tiles: 64-byte rows
    let kh = k / 2;
    // SAFETY (whole block): every tile load reads 16 rows of 64 bytes inside `xa` (block tb,
    // step kk, term sp, half) or `wp` (feature blocks 2p and 2p+1, step kk); every store
    // writes 16 rows of 64 bytes at rows tb·32.. and columns p·32.. of y, which the caller
    // lets us write; the caller checked AMX support.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        for p in panels {
            let b0 = wp.as_ptr().add(2 * p * 16 * kh) as *const u8;
            let b1 = b0.add(16 * kh * 4);
            for tb in 0..blocks {
                let xb = xa.as_ptr().add(tb * block_len) as *const u8;
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for kk in 0..kk_steps {
                    let boff = kk * 16 * 64;
                    let a = xb.add(kk * terms * AMX_M * AMX_K * 2);
                    // Loads between the products that need them, so that a load overlaps
                    // the products before it (a tile load takes about two products' time).
                    asm!(
                        "tileloadd tmm6, [{b0} + {s}*1]",
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {s}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        b0 = in(reg) b0.add(boff),
                        b1 = in(reg) b1.add(boff),
                        a0 = in(reg) a,
                        a1 = in(reg) a.add(16 * 64),
                        s = in(reg) s64,
                        options(nostack, readonly),
                    );
                    for sp in 1..terms {
                        let a0 = a.add(sp * AMX_M * AMX_K * 2);
                        asm!(
                            "tileloadd tmm4, [{a0} + {s}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tileloadd tmm5, [{a1} + {s}*1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0,
                            a1 = in(reg) a0.add(16 * 64),
                            s = in(reg) s64,
                            options(nostack, readonly),
                        );
                    }
                }
                let base = y.add(tb * AMX_M * n + p * AMX_N) as *mut u8;
                let [c0, c1, c2, c3] = c_tiles(base, sc);
                asm!(
                    "tilestored [{c0} + {s}*1], tmm0",
                    "tilestored [{c1} + {s}*1], tmm1",
                    "tilestored [{c2} + {s}*1], tmm2",
                    "tilestored [{c3} + {s}*1], tmm3",
                    c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                    s = in(reg) sc,
                    options(nostack),
                );
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn amx_panels(
    _: &[u16],
    _: usize,
    _: usize,
    _: &[u32],
    _: std::ops::Range<usize>,
    _: *mut f32,
    _: usize,
) {
    unreachable!("AMX is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn bf16_weights(rng: &mut StdRng, len: usize) -> Vec<u16> {
        (0..len)
            .map(|_| bf16_rne(rng.random_range(-0.1f32..0.1)))
            .collect()
    }

    fn reference(x: &[f32], w: &[u16], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = (0..k)
                    .map(|i| {
                        x[r * k + i] as f64 * f32::from_bits((w[j * k + i] as u32) << 16) as f64
                    })
                    .sum();
            }
        }
        y
    }

    fn max_err(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max)
            / scale
    }

    #[test]
    fn gemv_matches_f64_reference() {
        let mut rng = StdRng::seed_from_u64(3);
        for (k, rows) in [(512, 37), (70, 5), (16, 4)] {
            let x: Vec<f32> = (0..k).map(|_| rng.random_range(-2f32..2.0)).collect();
            let w = bf16_weights(&mut rng, rows * k);
            let want = reference(&x, &w, 1, k, rows);
            let mut out = vec![0f32; rows];
            gemv(&x, &w, k, &mut out);
            let e = max_err(&out, &want);
            assert!(e < 1e-6, "k={k} rows={rows}: {e}");
            gemv_portable(&x, &w, k, &mut out);
            let e = max_err(&out, &want);
            assert!(e < 1e-6, "portable, k={k} rows={rows}: {e}");
        }
    }

    #[test]
    fn gemv_rows_matches_f64_reference() {
        let mut rng = StdRng::seed_from_u64(5);
        for (m, k, rows) in [(2, 512, 37), (7, 70, 5), (16, 64, 3), (9, 1024, 8)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2f32..2.0)).collect();
            let w = bf16_weights(&mut rng, rows * k);
            let want = reference(&x, &w, m, k, rows); // [m, rows]
            let mut out = vec![0f32; rows * m]; // [rows, m]
            if !gemv_rows(&x, m, &w, k, &mut out) {
                eprintln!("skipped: no AVX-512 on this CPU");
                return;
            }
            let t: Vec<f32> = (0..m * rows)
                .map(|i| out[(i % rows) * m + i / rows])
                .collect();
            let e = max_err(&t, &want);
            assert!(e < 1e-6, "m={m} k={k} rows={rows}: {e}");
        }
    }

    /// The vectorised packing (a 16 × 16 transpose per step) lays weights out as the scalar
    /// rule does, for bf16 and int8 weights.
    #[test]
    fn packed_weights_follow_the_scalar_layout() {
        let mut rng = StdRng::seed_from_u64(8);
        let (k, n) = (96, 48);
        let w = bf16_weights(&mut rng, n * k);
        let q: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127i8..=127)).collect();
        fn scalar<T: Packed>(w: &[T], k: usize, n: usize) -> Vec<u32> {
            let bits = |v: T| v.to_f32().to_bits() >> 16;
            let kh = k / 2;
            let mut out = vec![0u32; n * kh];
            for jb in 0..n / 16 {
                for f in 0..16 {
                    let row = &w[(jb * 16 + f) * k..][..k];
                    for r in 0..kh {
                        out[jb * 16 * kh + r * 16 + f] =
                            bits(row[2 * r]) | bits(row[2 * r + 1]) << 16;
                    }
                }
            }
            out
        }
        for parallel in [false, true] {
            assert_eq!(pack_weights(&w, k, n, parallel), scalar(&w, k, n));
            assert_eq!(pack_weights(&q, k, n, parallel), scalar(&q, k, n));
        }
    }

    /// One term: the activations rounded to bf16 (as `format::round_bf16` rounds them), then
    /// an exact-product f32 sum; int8 weights go through the same tiles.
    #[test]
    fn amx_linear_with_one_term_rounds_the_activations() {
        if !has_amx() {
            eprintln!("skipped: no AMX on this CPU");
            return;
        }
        let mut rng = StdRng::seed_from_u64(6);
        for (m, k, n) in [(1, 32, 32), (300, 64, 96), (33, 1024, 64), (513, 96, 32)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3f32..3.0)).collect();
            let rounded: Vec<f32> = x.iter().map(|&v| crate::format::round_bf16(v)).collect();
            let w = bf16_weights(&mut rng, n * k);
            let q: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127i8..=127)).collect();
            let qw: Vec<u16> = q.iter().map(|&v| bf16_rne(v as f32)).collect();
            for parallel in [false, true] {
                let e = max_err(
                    &amx_linear(&x, &w, m, k, n, 1, parallel),
                    &reference(&rounded, &w, m, k, n),
                );
                assert!(e < 2e-6, "{m}x{k}x{n}: {e}");
                let e = max_err(
                    &amx_linear(&x, &q, m, k, n, 1, parallel),
                    &reference(&rounded, &qw, m, k, n),
                );
                assert!(e < 2e-6, "int8 {m}x{k}x{n}: {e}");
            }
        }
    }

    /// The three-term split keeps f32 accuracy: the AMX result is as close to an f64
    /// reference as an f32 GEMM is (here within 2e-6 of the largest output).
    #[test]
    fn amx_linear_has_f32_accuracy() {
        if !has_amx() {
            eprintln!("skipped: no AMX on this CPU");
            return;
        }
        let mut rng = StdRng::seed_from_u64(4);
        for (m, k, n) in [
            (1, 32, 32),
            (45, 64, 96),
            (100, 512, 64),
            (33, 1024, 32),
            (600, 64, 64),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3f32..3.0)).collect();
            let w = bf16_weights(&mut rng, n * k);
            for parallel in [false, true] {
                let y = amx_linear(&x, &w, m, k, n, SPLITS, parallel);
                assert_eq!(y.len(), m * n);
                let e = max_err(&y, &reference(&x, &w, m, k, n));
                assert!(e < 2e-6, "{m}x{k}x{n}: {e}");
            }
        }
    }
}
