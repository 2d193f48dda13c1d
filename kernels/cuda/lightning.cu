// Lightning attention (minimax-01.md §2.4) with an f32 state S [d_k, d_v] per head.
// qkv rows are [heads · 3d], per head [q_h; k_h; v_h] (already SiLU-activated); out rows are
// [heads · d]. λ per head: the decay per token is exp(−λ).
//
// Prefill, per block of m ≤ RB_LIGHTNING_BLOCK tokens:
//   O = ((Q Kᵀ) ⊙ D) V  +  (Q ⊙ exp(−λ(i+1))) S,   D[i][j] = exp(−λ(i−j)) for j ≤ i, else 0
//   S ← exp(−λ m) S + (K ⊙ exp(−λ(m−1−j)))ᵀ V
// The intra-block term, the inter-block term from the carried state and the state update all
// scale by the offset within the block only, so no term grows with the position.
//
// Three implementations of prefill:
// - `lightning_block_kv` + `lightning_scan` + `lightning_block_out`, on tensor cores (head_dim
//   a multiple of 16, at most 128). Blocks of RB_LB tokens depend on each other only through
//   the state they start from, so: every (head, block) computes its own KV sum; a scan over
//   each head's blocks turns those into the state every block starts from (f32, element-wise,
//   memory-bound); every (head, block) then computes its outputs. Q, K, V are rounded to bf16
//   once; the carried state enters the products as bf16 hi + lo (~16 significant bits);
//   products accumulate in f32 and states stay f32. States between the launches are kept
//   transposed ([d_v, d_k]) so that every tensor-core operand is read along its k index.
// - `lightning_fused`, on tensor cores too: one launch, each head's blocks in order with the
//   state kept on chip (see there for when each tensor-core form wins).
// - `lightning_prefill`: scalar f32, one thread block per head (any head_dim ≤ 128).
#include "common.cuh"

#define RB_LIGHTNING_BLOCK 16
#define RB_MAX_HEAD_DIM 128
#define RB_LB 64            // tokens per block of the tensor-core prefill
#define RB_LT (RB_LB + 8)   // leading dimension of transposed [d, RB_LB] tiles (bank spread)

// Token rows [start, start + m) of one head's q, k or v (`part` 0, 1, 2) as bf16. Rows from m
// to RB_LB are zeros. With `decayed`, row j is scaled by exp(−λ(m−1−j)), its decay to the end
// of the block. `transposed`: dst[c·RB_LT + j], else dst[j·ld + c].
__device__ __forceinline__ void rb_load_block(__nv_bfloat16* dst, int ld, bool transposed,
                                              const float* __restrict__ qkv, int start, int m,
                                              int h, int heads, int d, int part, bool decayed,
                                              float lam) {
    const size_t row = (size_t)heads * 3 * d;
    for (int idx = threadIdx.x; idx < RB_LB * d; idx += blockDim.x) {
        const int j = idx / d, c = idx % d;
        float v = 0.0f;
        if (j < m) {
            v = qkv[(size_t)(start + j) * row + (size_t)h * 3 * d + (size_t)part * d + c];
            if (decayed) v *= expf(-lam * (float)(m - 1 - j));
        }
        dst[transposed ? c * RB_LT + j : j * ld + c] = __float2bfloat16(v);
    }
}

// Tensor-core prefill, step 1. Grid (heads, blocks), 256 threads.
// kv[h][b] = (Σ_j exp(−λ(m−1−j)) k_jᵀ v_j)ᵀ over block b's m tokens: [d_v, d_k], f32.
RB_EXTERN void lightning_block_kv(const float* __restrict__ qkv, float* __restrict__ kv,
                                  const float* __restrict__ lambda, int t, int heads, int d) {
    __shared__ __align__(16) __nv_bfloat16 kt[RB_MAX_HEAD_DIM * RB_LT];
    __shared__ __align__(16) __nv_bfloat16 vt[RB_MAX_HEAD_DIM * RB_LT];
    if (d > RB_MAX_HEAD_DIM || d % 16) return;
    const int h = blockIdx.x, b = blockIdx.y, nb = gridDim.y;
    const int start = b * RB_LB, m = min(RB_LB, t - start);
    rb_load_block(kt, 0, true, qkv, start, m, h, heads, d, 1, true, lambda[h]);
    rb_load_block(vt, 0, true, qkv, start, m, h, heads, d, 2, false, 0.0f);
    __syncthreads();
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    float* dst = kv + ((size_t)h * nb + b) * d * d;
    // Vᵀ Kd: A = Vᵀ (row c, k = token), B = Kd (k = token, n = r), stored as kt[r][token].
    for (int mt = warp; mt < d / 16; mt += warps) {
        unsigned a[RB_LB / 16][4];
#pragma unroll
        for (int kc = 0; kc < RB_LB / 16; ++kc)
            if (kc * 16 < m) rb_frag_a(a[kc], vt + mt * 16 * RB_LT + kc * 16, RB_LT);
        for (int nt = 0; nt < d / 8; ++nt) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int kc = 0; kc < RB_LB / 16; ++kc) {
                if (kc * 16 >= m) break;
                unsigned bf[2];
                rb_frag_b(bf, kt + nt * 8 * RB_LT + kc * 16, RB_LT);
                rb_mma(acc, a[kc], bf);
            }
            const int c = mt * 16 + g, r = nt * 8 + 2 * q;
            dst[(size_t)c * d + r] = acc[0];
            dst[(size_t)c * d + r + 1] = acc[1];
            dst[(size_t)(c + 8) * d + r] = acc[2];
            dst[(size_t)(c + 8) * d + r + 1] = acc[3];
        }
    }
}

// Tensor-core prefill, step 2. Grid (ceil(d²/blockDim), heads): one thread per state element.
// Walks a head's blocks in order: writes the state block b starts from (transposed, as bf16 hi
// and lo) and folds the block in, S ← exp(−λ m_b) S + kv[h][b]. `state` ([heads, d_k, d_v],
// f32) holds the starting state and receives the final one.
RB_EXTERN void lightning_scan(const float* __restrict__ kv, __nv_bfloat16* __restrict__ p_hi,
                              __nv_bfloat16* __restrict__ p_lo, float* __restrict__ state,
                              const float* __restrict__ lambda, int t, int nb, int d) {
    const int h = blockIdx.y;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;  // c·d + r (transposed)
    if (e >= d * d) return;
    const int c = e / d, r = e % d;
    const float lam = lambda[h];
    const float full = expf(-lam * (float)RB_LB);
    float* st = state + (size_t)h * d * d + (size_t)r * d + c;
    float s = *st;
    for (int b = 0; b < nb; ++b) {
        const size_t at = ((size_t)h * nb + b) * d * d + e;
        const __nv_bfloat16 hi = __float2bfloat16(s);
        p_hi[at] = hi;
        p_lo[at] = __float2bfloat16(s - __bfloat162float(hi));
        const int m = min(RB_LB, t - b * RB_LB);
        s = (m == RB_LB ? full : expf(-lam * (float)m)) * s + kv[at];
    }
    *st = s;
}

// One block's outputs for one warp's 16 rows (warp w: rows 16w..16w+15), `cols` value columns
// starting at c0 (NC ≥ cols / 8 tiles of 8):
//   O = ((Q Kᵀ) ⊙ D) V + (Q ⊙ exp(−λ(i+1))) P,  D[i][j] = exp(−λ(i−j)) for j ≤ i, else 0
// qs, ks: the block's Q and K, [RB_LB][ld] bf16; vt: its Vᵀ for these columns, [cols][RB_LT];
// P = ph + pl, the state it starts from as bf16 hi + lo, transposed (element (r, c) at
// c·pld + r). Rows i < m go to out rows start + i, columns h·d + c0 + c.
template <int NC>
__device__ __forceinline__ void rb_lightning_block_rows(
    float* __restrict__ out, const __nv_bfloat16* qs, const __nv_bfloat16* ks, int ld,
    const __nv_bfloat16* vt, const __nv_bfloat16* ph, const __nv_bfloat16* pl, long long pld,
    float lam, int m, int d, int cols, int start, int heads, int h, int c0) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int i0 = warp * 16, ia = i0 + g, ib = ia + 8;  // this lane's two rows

    // Scores Q Kᵀ for the key tiles at or before this warp's rows, the causal decay mask, then
    // the scores as bf16 A fragments (16 keys per fragment).
    float s[RB_LB / 8][4];
    rb_scores(s, qs + i0 * ld, ks, ld, d, (i0 + 16) / 8);
    unsigned pa[RB_LB / 16][4];
#pragma unroll
    for (int nt = 0; nt < RB_LB / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = e < 2 ? ia : ib, j = nt * 8 + 2 * q + (e & 1);
            s[nt][e] = (j <= i && i < m) ? s[nt][e] * expf(-lam * (float)(i - j)) : 0.0f;
        }
    }
#pragma unroll
    for (int kc = 0; kc < RB_LB / 16; ++kc) rb_frag_a_from_c(pa[kc], s[2 * kc], s[2 * kc + 1]);

    // Inter-block term Q P, scaled by each row's decay.
    float o[NC][4];
#pragma unroll
    for (int nt = 0; nt < NC; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    for (int r0 = 0; r0 < d; r0 += 16) {
        unsigned a[4];
        rb_frag_a(a, qs + i0 * ld + r0, ld);
#pragma unroll
        for (int nt = 0; nt < NC; ++nt) {
            if (nt * 8 >= cols) break;
            unsigned bf[2];
            rb_frag_b(bf, ph + (size_t)nt * 8 * pld + r0, pld);
            rb_mma(o[nt], a, bf);
            rb_frag_b(bf, pl + (size_t)nt * 8 * pld + r0, pld);
            rb_mma(o[nt], a, bf);
        }
    }
    const float da = expf(-lam * (float)(ia + 1)), db = expf(-lam * (float)(ib + 1));
#pragma unroll
    for (int nt = 0; nt < NC; ++nt) {
        o[nt][0] *= da;
        o[nt][1] *= da;
        o[nt][2] *= db;
        o[nt][3] *= db;
    }

    // Intra-block term: O += S V over the causal key chunks.
#pragma unroll
    for (int kc = 0; kc < RB_LB / 16; ++kc) {
        if (kc * 16 > i0 + 15) break;
#pragma unroll
        for (int nt = 0; nt < NC; ++nt) {
            if (nt * 8 >= cols) break;
            unsigned bf[2];
            rb_frag_b(bf, vt + nt * 8 * RB_LT + kc * 16, RB_LT);
            rb_mma(o[nt], pa[kc], bf);
        }
    }
#pragma unroll
    for (int nt = 0; nt < NC; ++nt) {
        if (nt * 8 >= cols) break;
        const int c = c0 + nt * 8 + 2 * q;
        if (ia < m) {
            float* row = out + (size_t)(start + ia) * heads * d + (size_t)h * d + c;
            row[0] = o[nt][0];
            row[1] = o[nt][1];
        }
        if (ib < m) {
            float* row = out + (size_t)(start + ib) * heads * d + (size_t)h * d + c;
            row[0] = o[nt][2];
            row[1] = o[nt][3];
        }
    }
}

// Tensor-core prefill, step 3. Grid (heads, blocks), 128 threads: warp w owns rows
// [16w, 16w + 16) of the block. Dynamic shared memory 2·RB_LB·(d+8)·2 + d·RB_LT·2 bytes.
// For a block starting from state P:
//   O = (Q ⊙ exp(−λ(i+1))) P + ((Q Kᵀ) ⊙ D) V,  D[i][j] = exp(−λ(i−j)) for j ≤ i, else 0
RB_EXTERN void lightning_block_out(const float* __restrict__ qkv, float* __restrict__ out,
                                   const __nv_bfloat16* __restrict__ p_hi,
                                   const __nv_bfloat16* __restrict__ p_lo,
                                   const float* __restrict__ lambda, int t, int heads, int d) {
    RB_DYNAMIC_SMEM(rb_smem);
    if (d > RB_MAX_HEAD_DIM || d % 16 || blockDim.x != 128) return;
    const int ld = d + 8;
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(rb_smem);
    __nv_bfloat16* ks = qs + RB_LB * ld;
    __nv_bfloat16* vt = ks + RB_LB * ld;
    const int h = blockIdx.x, b = blockIdx.y, nb = gridDim.y;
    const int start = b * RB_LB, m = min(RB_LB, t - start);
    const float lam = lambda[h];
    rb_load_block(qs, ld, false, qkv, start, m, h, heads, d, 0, false, 0.0f);
    rb_load_block(ks, ld, false, qkv, start, m, h, heads, d, 1, false, 0.0f);
    rb_load_block(vt, 0, true, qkv, start, m, h, heads, d, 2, false, 0.0f);
    __syncthreads();
    rb_lightning_block_rows<RB_MAX_HEAD_DIM / 8>(out, qs, ks, ld, vt,
                                                 p_hi + ((size_t)h * nb + b) * d * d,
                                                 p_lo + ((size_t)h * nb + b) * d * d, d, lam, m, d,
                                                 d, start, heads, h, 0);
}

// Fused tensor-core prefill: one pass, the state kept on chip. Grid (heads, ceil(d / RB_FV)),
// 128 threads. Each thread block owns one head and RB_FV of its value columns, and walks the
// head's blocks of RB_LB tokens in order with its slice of the state S [d_k, cols] in registers
// (f32, the C fragments of Kᵀ V) and, as bf16 hi + lo, in shared memory for the next block's
// Q S. Per block: O = ((Q Kᵀ) ⊙ D) V + (Q ⊙ exp(−λ(i+1))) S, then S ← exp(−λm) S + Kdᵀ V.
// Q, K, V are read once per (block, column slice); nothing else goes through global memory, so
// unlike the three-launch form it is bound by the tensor cores, not by moving states (the
// price: a head's blocks run one after another, d/RB_FV thread blocks per head).
// `state` ([heads, d_k, d_v], f32) holds the starting state and receives the final one.
// Dynamic shared memory, bf16: qs and ks RB_LB·(d+8) each, kdt d·RB_LT, vt RB_FV·RB_LT, ph and
// pl RB_FV·(d+8) each: (4·RB_LB·(d+8) + d·RB_LT + RB_FV·RB_LT)·2 bytes when RB_FV = RB_LB (as
// `fused_smem` in cuda_backend.rs and kernels/emu/check.cpp compute it).
#define RB_FV 64
// Calls f(v, r, c) on each element v of the fused prefill's state slice this thread holds (the
// C fragments of its m-tiles warp and warp + 4): state row r (d_k) < d, slice column c < cv.
template <typename F>
__device__ __forceinline__ void rb_fused_each(float (&st)[2][RB_FV / 8][4], int d, int cv, F f) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int nt = 0; nt < RB_FV / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int mt = warp + 4 * u;
                const int r = mt * 16 + g + (e >> 1) * 8, c = nt * 8 + 2 * q + (e & 1);
                if (mt * 16 < d && c < cv) f(st[u][nt][e], r, c);
            }
}

// The state slice as bf16 hi + lo, transposed (element (r, c) at c·ld + r): the B operand of Q S.
__device__ __forceinline__ void rb_fused_publish(float (&st)[2][RB_FV / 8][4], __nv_bfloat16* ph,
                                                 __nv_bfloat16* pl, int ld, int d, int cv) {
    rb_fused_each(st, d, cv, [&](float& v, int r, int c) {
        const __nv_bfloat16 hi = __float2bfloat16(v);
        ph[c * ld + r] = hi;
        pl[c * ld + r] = __float2bfloat16(v - __bfloat162float(hi));
    });
}

RB_EXTERN void __launch_bounds__(128)
lightning_fused(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ state,
                const float* __restrict__ lambda, int t, int heads, int d) {
    RB_DYNAMIC_SMEM(rb_smem);
    if (d > RB_MAX_HEAD_DIM || d % 16 || blockDim.x != 128) return;
    const int ld = d + 8;
    const int h = blockIdx.x, c0 = blockIdx.y * RB_FV, cv = min(RB_FV, d - c0);
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(rb_smem);  // [RB_LB][ld]
    __nv_bfloat16* ks = qs + RB_LB * ld;                             // [RB_LB][ld]
    __nv_bfloat16* kdt = ks + RB_LB * ld;                            // [d][RB_LT], decayed
    __nv_bfloat16* vt = kdt + d * RB_LT;                             // [RB_FV][RB_LT]
    __nv_bfloat16* ph = vt + RB_FV * RB_LT;                          // [RB_FV][ld]: S hi, transposed
    __nv_bfloat16* pl = ph + RB_FV * ld;                             // S lo
    const float lam = lambda[h];
    const int warp = threadIdx.x >> 5;
    const size_t row = (size_t)heads * 3 * d;
    float* S = state + (size_t)h * d * d;

    // The state slice: warp w holds rows (d_k) of m-tiles w and w + 4, all cv columns.
    float st[2][RB_FV / 8][4] = {};
    rb_fused_each(st, d, cv, [&](float& v, int r, int c) { v = S[(size_t)r * d + c0 + c]; });
    rb_fused_publish(st, ph, pl, ld, d, cv);

    for (int start = 0; start < t; start += RB_LB) {
        const int m = min(RB_LB, t - start);
        __syncthreads();  // the previous block's tiles are done with; S published
        rb_load_block(qs, ld, false, qkv, start, m, h, heads, d, 0, false, 0.0f);
        // K once: row-major for the scores, transposed and decayed for the state update.
        for (int idx = threadIdx.x; idx < RB_LB * d; idx += blockDim.x) {
            const int j = idx / d, c = idx % d;
            const float k = j < m ? qkv[(size_t)(start + j) * row + (size_t)h * 3 * d + d + c] : 0.0f;
            ks[j * ld + c] = __float2bfloat16(k);
            kdt[c * RB_LT + j] = __float2bfloat16(k * expf(-lam * (float)(m - 1 - j)));
        }
        for (int idx = threadIdx.x; idx < RB_LB * cv; idx += blockDim.x) {
            const int j = idx / cv, c = idx % cv;
            const float v = j < m ? qkv[(size_t)(start + j) * row + (size_t)h * 3 * d + 2 * d + c0 + c]
                                  : 0.0f;
            vt[c * RB_LT + j] = __float2bfloat16(v);
        }
        __syncthreads();

        rb_lightning_block_rows<RB_FV / 8>(out, qs, ks, ld, vt, ph, pl, ld, lam, m, d, cv, start,
                                           heads, h, c0);

        // State update S ← exp(−λm) S + Kdᵀ V, in registers.
        const float full = expf(-lam * (float)m);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int mt = warp + 4 * u;
            if (mt * 16 >= d) break;
            unsigned a[RB_LB / 16][4];
#pragma unroll
            for (int kc = 0; kc < RB_LB / 16; ++kc)
                if (kc * 16 < m) rb_frag_a(a[kc], kdt + mt * 16 * RB_LT + kc * 16, RB_LT);
#pragma unroll
            for (int nt = 0; nt < RB_FV / 8; ++nt) {
                if (nt * 8 >= cv) break;
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int kc = 0; kc < RB_LB / 16; ++kc) {
                    if (kc * 16 >= m) break;
                    unsigned bf[2];
                    rb_frag_b(bf, vt + nt * 8 * RB_LT + kc * 16, RB_LT);
                    rb_mma(acc, a[kc], bf);
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) st[u][nt][e] = full * st[u][nt][e] + acc[e];
            }
        }
        if (start + RB_LB < t) {  // the same for every thread: the barrier is safe
            __syncthreads();  // every warp is done reading this block's S
            rb_fused_publish(st, ph, pl, ld, d, cv);
        }
    }
    rb_fused_each(st, d, cv, [&](float& v, int r, int c) { S[(size_t)r * d + c0 + c] = v; });
}

// Scalar prefill: one thread block per head; tokens in order, one block of m tokens at a time.
RB_EXTERN void lightning_prefill(const float* __restrict__ qkv, float* __restrict__ out,
                                 float* __restrict__ state, const float* __restrict__ lambda,
                                 int t, int heads, int d) {
    __shared__ float qs[RB_LIGHTNING_BLOCK][RB_MAX_HEAD_DIM];
    __shared__ float ks[RB_LIGHTNING_BLOCK][RB_MAX_HEAD_DIM];
    __shared__ float vs[RB_LIGHTNING_BLOCK][RB_MAX_HEAD_DIM];
    __shared__ float sc[RB_LIGHTNING_BLOCK][RB_LIGHTNING_BLOCK];
    __shared__ float dec[RB_LIGHTNING_BLOCK + 1];
    if (d > RB_MAX_HEAD_DIM) return;
    const int h = blockIdx.x;
    const float lam = lambda[h];
    float* S = state + (size_t)h * d * d;
    const size_t row = (size_t)heads * 3 * d;
    if (threadIdx.x <= RB_LIGHTNING_BLOCK) dec[threadIdx.x] = expf(-lam * (float)threadIdx.x);
    for (int start = 0; start < t; start += RB_LIGHTNING_BLOCK) {
        const int m = min(RB_LIGHTNING_BLOCK, t - start);
        __syncthreads();
        for (int idx = threadIdx.x; idx < m * d; idx += blockDim.x) {
            const int i = idx / d, c = idx % d;
            const float* base = qkv + (size_t)(start + i) * row + (size_t)h * 3 * d;
            qs[i][c] = base[c];
            ks[i][c] = base[d + c];
            vs[i][c] = base[2 * d + c];
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < m * m; idx += blockDim.x) {
            const int i = idx / m, j = idx % m;
            float s = 0.0f;
            if (j <= i) {
                for (int c = 0; c < d; ++c) s += qs[i][c] * ks[j][c];
                s *= dec[i - j];
            }
            sc[i][j] = s;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < m * d; idx += blockDim.x) {
            const int i = idx / d, c = idx % d;
            float intra = 0.0f;
            for (int j = 0; j <= i; ++j) intra += sc[i][j] * vs[j][c];
            float inter = 0.0f;
            for (int r = 0; r < d; ++r) inter += qs[i][r] * S[(size_t)r * d + c];
            out[(size_t)(start + i) * heads * d + (size_t)h * d + c] = intra + dec[i + 1] * inter;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < d * d; idx += blockDim.x) {
            const int r = idx / d, c = idx % d;
            float acc = 0.0f;
            for (int j = 0; j < m; ++j) acc += ks[j][r] * dec[m - 1 - j] * vs[j][c];
            S[idx] = dec[m] * S[idx] + acc;
        }
    }
}

// Decode, batched over sequences: sequence s's token is row s of qkv/out and its state is at
// states[s] ([heads, d, d]). Grid (heads, sequences); one thread per value column c:
//   S ← exp(−λ) S + kᵀv,  o = q S
RB_EXTERN void lightning_decode(const float* __restrict__ qkv, float* __restrict__ out,
                                const unsigned long long* __restrict__ states,
                                const float* __restrict__ lambda, int heads, int d) {
    const int h = blockIdx.x, s = blockIdx.y, c = threadIdx.x;
    if (c >= d) return;
    const float g = expf(-lambda[h]);
    const float* base = qkv + (size_t)s * heads * 3 * d + (size_t)h * 3 * d;
    const float* q = base;
    const float* k = base + d;
    const float vc = base[2 * d + c];
    float* S = reinterpret_cast<float*>(states[s]) + (size_t)h * d * d;
    float acc = 0.0f;
#pragma unroll 8
    for (int r = 0; r < d; ++r) {
        const float v = g * S[(size_t)r * d + c] + k[r] * vc;
        S[(size_t)r * d + c] = v;
        acc += q[r] * v;
    }
    out[(size_t)s * heads * d + (size_t)h * d + c] = acc;
}
