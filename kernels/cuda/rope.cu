// Rotary embeddings, NeoX pairing (j, j + rotary_dim/2) over the first `rotary_dim` dims of
// each head; the angle is the f32 product position × inverse frequency (one rounding, as the
// reference), its cosine and sine taken in double.
#include "common.cuh"

RB_EXTERN void rope_inplace(float* __restrict__ x, const float* __restrict__ inv_freq, int t,
                            int heads, int head_dim, int half, long long pos0) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)t * heads * half) return;
    const int j = (int)(i % half);
    const size_t hrow = i / half;  // row * heads + head
    const size_t row = hrow / heads;
    const float a = (float)(pos0 + (long long)row) * inv_freq[j];
    const float c = (float)cos((double)a), s = (float)sin((double)a);
    float* xh = x + hrow * head_dim;
    const float u = xh[j], v = xh[j + half];
    xh[j] = u * c - v * s;
    xh[j + half] = v * c + u * s;
}
