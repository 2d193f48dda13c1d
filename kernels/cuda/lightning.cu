// Lightning attention (minimax-01.md §2.4) with an f32 state S [d_k, d_v] per head.
// qkv rows are [heads · 3d], per head [q_h; k_h; v_h] (already SiLU-activated); out rows are
// [heads · d]. λ per head: the decay per token is exp(−λ).
//
// Prefill, per block of m ≤ RB_LIGHTNING_BLOCK tokens:
//   O = ((Q Kᵀ) ⊙ D) V  +  (Q ⊙ exp(−λ(i+1))) S,   D[i][j] = exp(−λ(i−j)) for j ≤ i, else 0
//   S ← exp(−λ m) S + (K ⊙ exp(−λ(m−1−j)))ᵀ V
// The intra-block term, the inter-block term from the carried state and the state update all
// scale by the offset within the block only, so no term grows with the position.
#include "common.cuh"

#define RB_LIGHTNING_BLOCK 16
#define RB_MAX_HEAD_DIM 128

// One thread block per head; tokens in order, one block of m tokens at a time.
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
    for (int r = 0; r < d; ++r) {
        const float v = g * S[(size_t)r * d + c] + k[r] * vc;
        S[(size_t)r * d + c] = v;
        acc += q[r] * v;
    }
    out[(size_t)s * heads * d + (size_t)h * d + c] = acc;
}
