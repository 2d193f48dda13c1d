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

/// Whether AVX-512F is available (decided once).
pub fn has_avx512() -> bool {
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
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

/// Whether [`amx_linear_bf16`] takes this shape: every dimension in whole tiles of features.
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
/// tile work). Call only when [`amx_takes`]`(k, n)`. `parallel` spreads the 32-token blocks
/// over rayon's threads.
pub fn amx_linear<T: Packed>(
    x: &[f32],
    w: &[T],
    m: usize,
    k: usize,
    n: usize,
    terms: usize,
    parallel: bool,
) -> Vec<f32> {
    assert!(
        amx_takes(k, n),
        "amx_linear: shape {m}x{k}x{n} not in whole tiles"
    );
    assert!(
        terms == 1 || terms == SPLITS,
        "amx_linear: 1 or {SPLITS} terms"
    );
    assert_eq!(x.len(), m * k, "amx: input is not [m, k]");
    assert_eq!(w.len(), n * k, "amx: weight is not [n, k]");
    let mp = m.div_ceil(AMX_M) * AMX_M;
    let kh = k / 2;
    // Weights in the tile unit's pair-interleaved layout: for each block of 16 output features
    // and each pair of input features, 16 × (w[j][2r], w[j][2r+1]) — one 64-byte tile row.
    // bf16 bits: exact for bf16 and int8 weights alike.
    let bits = |v: T| v.to_f32().to_bits() >> 16;
    let mut wp = vec![0u32; n * kh];
    let run = |(jb, blk): (usize, &mut [u32])| {
        for f in 0..16 {
            let row = &w[(jb * 16 + f) * k..(jb * 16 + f + 1) * k];
            for r in 0..kh {
                blk[r * 16 + f] = bits(row[2 * r]) | bits(row[2 * r + 1]) << 16;
            }
        }
    };
    if parallel {
        wp.par_chunks_mut(16 * kh).enumerate().for_each(run);
    } else {
        wp.chunks_mut(16 * kh).enumerate().for_each(run);
    }
    // Activations as `terms` bf16 terms, packed tile by tile: for each block of 32 tokens, each
    // step of 32 input features, each term and each half of the block, one 16 × 64-byte tile
    // (rows past m are zero). A block's tiles are contiguous, so a k-chunk of them stays in L1.
    let kk_steps = k / AMX_K;
    let block_len = kk_steps * terms * AMX_M * AMX_K;
    let mut xp = uninit::<u16>(mp / AMX_M * block_len);
    let pack = |(tb, dst): (usize, &mut [MaybeUninit<u16>])| {
        for t in 0..AMX_M {
            let (h, row) = (t / 16, t % 16);
            let xr = (tb * AMX_M + t < m).then(|| &x[(tb * AMX_M + t) * k..][..k]);
            for kk in 0..kk_steps {
                let mut parts = [[0u16; AMX_K]; SPLITS];
                let Some(xr) = xr else {
                    // Padding rows: zero terms.
                    for (s, term) in parts.iter().take(terms).enumerate() {
                        let at = (((kk * terms + s) * 2 + h) * 16 + row) * AMX_K;
                        write_all(&mut dst[at..at + AMX_K], term);
                    }
                    continue;
                };
                let src = &xr[kk * AMX_K..][..AMX_K];
                for c in 0..AMX_K {
                    let v = src[c];
                    let a = bf16_rne(v);
                    let r1 = v - f32::from_bits((a as u32) << 16);
                    let b = bf16_rne(r1);
                    let r2 = r1 - f32::from_bits((b as u32) << 16);
                    parts[0][c] = a;
                    parts[1][c] = b;
                    parts[2][c] = bf16_rne(r2);
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
    let xp = unsafe { assume_init(xp) };
    let mut y = uninit::<f32>(mp * n);
    let (xp, wp) = (&xp[..], &wp[..]);
    let block = |(tb, yb): (usize, &mut [MaybeUninit<f32>])| {
        // SAFETY: AMX is usable (amx_takes); the block reads its own packed tiles (inside xp),
        // the whole of wp, and writes its 32 rows of y.
        unsafe { amx_block(&xp[tb * block_len..][..block_len], k, terms, wp, n, yb) }
    };
    if parallel {
        y.par_chunks_mut(AMX_M * n).enumerate().for_each(block);
    } else {
        y.chunks_mut(AMX_M * n).enumerate().for_each(block);
    }
    // SAFETY: every block stored all 32 of its rows × n features.
    let mut y = unsafe { assume_init(y) };
    y.truncate(m * n);
    y
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

/// Input-feature steps per chunk: a chunk of a block's packed activations (4 steps × 3 terms ×
/// 2 halves × 1 KiB = 24 KiB at most) stays in L1 while every output feature passes over it.
const KC_STEPS: usize = 4;

/// One block of 32 tokens (its packed activation tiles `xa`, `terms` per input step) × all n
/// features into `y` (32 rows of n). Tiles: 0–3 accumulators (token half × feature half), 4–5
/// activations, 6–7 weights.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_block(
    xa: &[u16],
    k: usize,
    terms: usize,
    wp: &[u32],
    n: usize,
    y: &mut [MaybeUninit<f32>],
) {
    use std::arch::asm;
    let kk_steps = k / AMX_K;
    debug_assert!(xa.len() == kk_steps * terms * AMX_M * AMX_K);
    debug_assert!(y.len() == AMX_M * n && wp.len() * 2 == n * k);
    let cfg = TileConfig::full();
    let sc = (n * 4) as isize; // output row stride in bytes
    let s64: isize = 64; // packed tiles: 64-byte rows
    let s_part = (AMX_N * 4) as isize; // partial-sum blocks: 32 f32 per row
    let kh = k / 2;
    // SAFETY (whole function): every tile load reads 16 rows of 64 bytes inside `xa`, `wp` or
    // `acc`, every store writes 16 rows of 64 bytes inside `acc` or `y`; the caller checked
    // AMX support.
    // Partial sums between k-chunks live in their own buffer, 32 × 32 per feature block:
    // loading and storing them through y's rows, n·4 bytes apart, thrashes a few L1 sets.
    let chunks = kk_steps.div_ceil(KC_STEPS);
    let mut acc = uninit::<f32>(if chunks > 1 { AMX_M * n } else { 0 });
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        for (ci, kc) in (0..kk_steps).step_by(KC_STEPS).enumerate() {
            for jb in (0..n).step_by(AMX_N) {
                // This feature block's partial sums: a 32 × 32 block with 128-byte rows.
                let part = acc.as_mut_ptr().wrapping_add(jb * AMX_M) as *mut u8;
                if ci == 0 {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                } else {
                    let [c0, c1, c2, c3] = c_tiles(part, s_part);
                    asm!(
                        "tileloadd tmm0, [{c0} + {s}*1]",
                        "tileloadd tmm1, [{c1} + {s}*1]",
                        "tileloadd tmm2, [{c2} + {s}*1]",
                        "tileloadd tmm3, [{c3} + {s}*1]",
                        c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                        s = in(reg) s_part,
                        options(nostack, readonly),
                    );
                }
                let b0 = wp.as_ptr().add((jb / 16) * 16 * kh) as *const u8;
                let b1 = wp.as_ptr().add((jb / 16 + 1) * 16 * kh) as *const u8;
                for kk in kc..(kc + KC_STEPS).min(kk_steps) {
                    let boff = kk * 16 * 64;
                    asm!(
                        "tileloadd tmm6, [{b0} + {s}*1]",
                        "tileloadd tmm7, [{b1} + {s}*1]",
                        b0 = in(reg) b0.add(boff),
                        b1 = in(reg) b1.add(boff),
                        s = in(reg) s64,
                        options(nostack, readonly),
                    );
                    for sp in 0..terms {
                        let a0 = xa.as_ptr().add((kk * terms + sp) * AMX_M * AMX_K) as *const u8;
                        asm!(
                            "tileloadd tmm4, [{a0} + {s}*1]",
                            "tileloadd tmm5, [{a1} + {s}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0,
                            a1 = in(reg) a0.add(16 * 64),
                            s = in(reg) s64,
                            options(nostack, readonly),
                        );
                    }
                }
                // Partial sums go back to the buffer; the last chunk's go to y.
                let (base, stride) = if ci + 1 < chunks {
                    (part, s_part)
                } else {
                    (y.as_mut_ptr().add(jb) as *mut u8, sc)
                };
                let [c0, c1, c2, c3] = c_tiles(base, stride);
                asm!(
                    "tilestored [{c0} + {s}*1], tmm0",
                    "tilestored [{c1} + {s}*1], tmm1",
                    "tilestored [{c2} + {s}*1], tmm2",
                    "tilestored [{c3} + {s}*1], tmm3",
                    c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                    s = in(reg) stride,
                    options(nostack),
                );
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn amx_block(
    _: &[u16],
    _: usize,
    _: usize,
    _: &[u32],
    _: usize,
    _: &mut [MaybeUninit<f32>],
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

    /// The three-term split keeps f32 accuracy: the AMX result is as close to an f64
    /// reference as an f32 GEMM is (here within 2e-6 of the largest output).
    #[test]
    fn amx_linear_has_f32_accuracy() {
        if !has_amx() {
            eprintln!("skipped: no AMX on this CPU");
            return;
        }
        let mut rng = StdRng::seed_from_u64(4);
        for (m, k, n) in [(1, 32, 32), (45, 64, 96), (100, 512, 64), (33, 1024, 32)] {
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
