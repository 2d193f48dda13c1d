// Weight-only int8 GEMM (W8A16) for quantized MoE experts: y = (x · qᵀ) ⊙ scale, where q is an
// int8 weight matrix [n, k] row-major (nn.Linear layout, symmetric per-output-channel
// quantization) with its n f32 scales, x bf16 activations [m, k] and y f32 [m, n]. Batched:
// block z of a launch computes GEMM z (an expert of a layer: its own rows of x and y, its own
// weights), all with the same m, k, n:
//   y[z·m·n + r·n + j] = scale[z][j] · Σ_i x[z·m·k + r·k + i] · w[z][j·k + i]
// The int8 weights become bf16 in the tile loader (exact: an int8 has at most 7 significant
// bits, bf16 holds 8), the products run on bf16 tensor cores with f32 accumulation (a bf16 ×
// int8 product is exact in f32, so the f32 sum is the only rounding), and the per-channel scale
// is applied once, in the epilogue.
//
// Launch: grid (ceil(n/64), ceil(m/64), batch), block 128 threads (4 warps), no dynamic shared
// memory (10 KiB static). A block computes rows [64·by, +64) × features [64·bx, +64); warp w
// its rows [16w, 16w + 16) × all 64 features (8 mma tiles of 8). Any m, n, k ≥ 1.
#include "common.cuh"

#define RB_QM 64             // rows (tokens) per block
#define RB_QN 64             // output features per block
#define RB_QK 32             // k per shared-memory stage
#define RB_QLD (RB_QK + 8)   // padded row (80 bytes): a fragment load's 8 rows hit distinct banks

// 16 bytes: one vector load or store.
struct __align__(16) rb_q16 {
    unsigned v[4];
};

// This thread's share of the K stage [k0, k0 + 32), read from global memory into registers:
// two chunks of 8 bf16 of x (chunks t and t + 128 of the 64 rows × 4 chunks) and one chunk of
// 16 int8 of w (chunk t of the 64 rows × 2 chunks), zeros outside the matrices. With `vec`
// (k a multiple of 16 and both bases 16-byte aligned) a chunk lies wholly inside or outside
// and is one 16-byte load; otherwise (odd k: rows of any alignment) element by element.
__device__ __forceinline__ void rb_w8a16_fetch(rb_q16 xr[2], rb_q16& wr,
                                               const __nv_bfloat16* __restrict__ x,
                                               const signed char* __restrict__ w, int m, int n,
                                               int k, int m0, int n0, int k0, bool vec) {
    const int t = threadIdx.x;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int chunk = t + 128 * h, row = m0 + (chunk >> 2), col = k0 + (chunk & 3) * 8;
        rb_q16 v = {{0u, 0u, 0u, 0u}};
        if (row < m && col < k) {
            const __nv_bfloat16* src = x + (size_t)row * k + col;
            if (vec) {
                v = *reinterpret_cast<const rb_q16*>(src);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    if (col + i < k)
                        v.v[i >> 1] |= (unsigned)__bfloat16_as_ushort(src[i]) << (16 * (i & 1));
            }
        }
        xr[h] = v;
    }
    const int row = n0 + (t >> 1), col = k0 + (t & 1) * 16;
    rb_q16 v = {{0u, 0u, 0u, 0u}};
    if (row < n && col < k) {
        const signed char* src = w + (size_t)row * k + col;
        if (vec) {
            v = *reinterpret_cast<const rb_q16*>(src);
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i)
                if (col + i < k) v.v[i >> 2] |= ((unsigned)src[i] & 0xffu) << (8 * (i & 3));
        }
    }
    wr = v;
}

// The int8 at byte b of `word`, as a float (exact).
__device__ __forceinline__ float rb_s8(unsigned word, int b) {
    return (float)(signed char)((word >> (8 * b)) & 0xffu);
}

// Writes the registers of rb_w8a16_fetch to the shared stage: x as is, w widened to bf16.
__device__ __forceinline__ void rb_w8a16_stage(__nv_bfloat16* xs, __nv_bfloat16* ws,
                                               const rb_q16 xr[2], const rb_q16& wr) {
    const int t = threadIdx.x;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int chunk = t + 128 * h;
        *reinterpret_cast<rb_q16*>(xs + (chunk >> 2) * RB_QLD + (chunk & 3) * 8) = xr[h];
    }
    rb_q16 lo, hi;  // 16 int8 → 16 bf16: columns 0–7 and 8–15 of the chunk
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        rb_q16& d = j < 2 ? lo : hi;
        d.v[2 * (j & 1)] = rb_pack_bf16(rb_s8(wr.v[j], 0), rb_s8(wr.v[j], 1));
        d.v[2 * (j & 1) + 1] = rb_pack_bf16(rb_s8(wr.v[j], 2), rb_s8(wr.v[j], 3));
    }
    __nv_bfloat16* dst = ws + (t >> 1) * RB_QLD + (t & 1) * 16;
    *reinterpret_cast<rb_q16*>(dst) = lo;
    *reinterpret_cast<rb_q16*>(dst + 8) = hi;
}

RB_EXTERN void linear_w8a16(const __nv_bfloat16* x, const signed char* const* w,
                            const float* const* scale, float* y, int m, int k, int n) {
    __shared__ __align__(16) __nv_bfloat16 xs[RB_QM * RB_QLD];  // x rows [m0, +64) × stage
    __shared__ __align__(16) __nv_bfloat16 ws[RB_QN * RB_QLD];  // w rows [n0, +64) × stage
    if (blockDim.x != 128) return;
    const int z = blockIdx.z, n0 = blockIdx.x * RB_QN, m0 = blockIdx.y * RB_QM;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const __nv_bfloat16* xb = x + (size_t)z * m * k;
    const signed char* wb = w[z];
    const bool vec =
        k % 16 == 0 && (((unsigned long long)xb | (unsigned long long)wb) & 15ull) == 0;
    // Warps whose 16 rows all lie past m (decode: three of four) load but skip the mma.
    const bool active = m0 + warp * 16 < m;

    float c[RB_QN / 8][4];
#pragma unroll
    for (int nt = 0; nt < RB_QN / 8; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
    rb_q16 xr[2], wr;
    rb_w8a16_fetch(xr, wr, xb, wb, m, n, k, m0, n0, 0, vec);
    for (int k0 = 0; k0 < k; k0 += RB_QK) {
        __syncthreads();  // the previous stage is no longer read
        rb_w8a16_stage(xs, ws, xr, wr);
        __syncthreads();
        // The next stage's loads are in flight while this one's mma run.
        if (k0 + RB_QK < k) rb_w8a16_fetch(xr, wr, xb, wb, m, n, k, m0, n0, k0 + RB_QK, vec);
        if (active) {
#pragma unroll
            for (int kk = 0; kk < RB_QK; kk += 16) {
                unsigned a[4];
                rb_frag_a(a, xs + warp * 16 * RB_QLD + kk, RB_QLD);
#pragma unroll
                for (int nt = 0; nt < RB_QN / 8; ++nt) {
                    unsigned b[2];
                    rb_frag_b(b, ws + nt * 8 * RB_QLD + kk, RB_QLD);
                    rb_mma(c[nt], a, b);
                }
            }
        }
    }
    if (!active) return;
    const float* sc = scale[z];
    float* yb = y + (size_t)z * m * n;
#pragma unroll
    for (int nt = 0; nt < RB_QN / 8; ++nt) {
        const int col = n0 + nt * 8 + 2 * q;
        const float s0 = col < n ? sc[col] : 0.0f, s1 = col + 1 < n ? sc[col + 1] : 0.0f;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = m0 + warp * 16 + g + 8 * r;
            if (row >= m) continue;
            float* out = yb + (size_t)row * n + col;
            if (col < n) out[0] = c[nt][2 * r] * s0;
            if (col + 1 < n) out[1] = c[nt][2 * r + 1] * s1;
        }
    }
}
