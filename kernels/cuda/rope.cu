// Rotary embeddings, NeoX pairing (j, j + rotary_dim/2) over the first `rotary_dim` dims of
// each head; the angle is the f32 product position × inverse frequency (one rounding, as the
// reference), its cosine and sine taken in double.
#include "common.cuh"

// One (row, head, pair) of x: the pair (j, j + half) of head `hrow % heads` of its row,
// rotated by the angle position × inv_freq[j].
__device__ __forceinline__ void rb_rope_pair(float* __restrict__ x,
                                             const float* __restrict__ inv_freq, size_t hrow,
                                             int j, int head_dim, int half, long long pos) {
    const float a = (float)pos * inv_freq[j];
    const float c = (float)cos((double)a), s = (float)sin((double)a);
    float* xh = x + hrow * head_dim;
    const float u = xh[j], v = xh[j + half];
    xh[j] = u * c - v * s;
    xh[j + half] = v * c + u * s;
}

// Rows at consecutive positions: row r at pos0 + r (a prefill chunk).
RB_EXTERN void rope_inplace(float* __restrict__ x, const float* __restrict__ inv_freq, int t,
                            int heads, int head_dim, int half, long long pos0) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)t * heads * half) return;
    const size_t hrow = i / half;  // row * heads + head
    rb_rope_pair(x, inv_freq, hrow, (int)(i % half), head_dim, half,
                 pos0 + (long long)(hrow / heads));
}

// Rows at any positions: row r at positions[r] (a decode step, one row per sequence).
RB_EXTERN void rope_rows(float* __restrict__ x, const float* __restrict__ inv_freq,
                         const long long* __restrict__ positions, int t, int heads, int head_dim,
                         int half) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)t * heads * half) return;
    const size_t hrow = i / half;
    rb_rope_pair(x, inv_freq, hrow, (int)(i % half), head_dim, half, positions[hrow / heads]);
}
