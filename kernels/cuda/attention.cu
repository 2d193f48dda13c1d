// Causal softmax attention with GQA, flash-style: one warp per (query, head) streams the keys
// with an online softmax (running max and sum), so memory stays O(d) per query whatever the
// context. Scale 1/sqrt(d). Besides the output it writes the log-sum-exp of the scaled scores:
// the partial-result form ring attention merges across key blocks (`attention_merge`).
//
// Queries are rows [t, heads·d] at absolute positions pos0 + i; keys/values rows
// [nkeys, kv_heads·d] at absolute positions kpos0 + j. Key j is visible to query i when
// kpos0 + j ≤ pos0 + i.
#include "common.cuh"

#define RB_MAX_DIM_PER_LANE 8  // head_dim ≤ 256

RB_EXTERN void attention(const float* __restrict__ q, const float* __restrict__ k,
                         const float* __restrict__ v, float* __restrict__ out,
                         float* __restrict__ lse, int t, int heads, int kv_heads, int d,
                         long long pos0, long long kpos0, int nkeys) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= t * heads) return;
    const int i = warp / heads, h = warp % heads;
    const int kvh = h / (heads / kv_heads);
    const float scale = rsqrtf((float)d);
    const int per = (d + 31) / 32;
    float qv[RB_MAX_DIM_PER_LANE], acc[RB_MAX_DIM_PER_LANE];
    const float* qr = q + (size_t)i * heads * d + (size_t)h * d;
    for (int p = 0; p < per; ++p) {
        const int c = lane + 32 * p;
        qv[p] = c < d ? qr[c] * scale : 0.0f;
        acc[p] = 0.0f;
    }
    long long last = pos0 + i - kpos0;  // last visible key index
    int n = (int)min((long long)nkeys, last + 1);
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < n; ++j) {
        const float* kr = k + (size_t)j * kv_heads * d + (size_t)kvh * d;
        float s = 0.0f;
        for (int p = 0; p < per; ++p) {
            const int c = lane + 32 * p;
            if (c < d) s += qv[p] * kr[c];
        }
        s = rb_warp_sum(s);
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn), w = expf(s - mn);
        l = l * corr + w;
        const float* vr = v + (size_t)j * kv_heads * d + (size_t)kvh * d;
        for (int p = 0; p < per; ++p) {
            const int c = lane + 32 * p;
            if (c < d) acc[p] = acc[p] * corr + w * vr[c];
        }
        m = mn;
    }
    float* o = out + (size_t)i * heads * d + (size_t)h * d;
    for (int p = 0; p < per; ++p) {
        const int c = lane + 32 * p;
        if (c < d) o[c] = l > 0.0f ? acc[p] / l : 0.0f;
    }
    if (lane == 0 && lse) lse[(size_t)i * heads + h] = l > 0.0f ? m + logf(l) : -INFINITY;
}

// Merges two partial results over disjoint key sets into (o1, lse1):
// o = (e^{lse1} o1 + e^{lse2} o2) / (e^{lse1} + e^{lse2}). One thread per (query, head).
RB_EXTERN void attention_merge(float* __restrict__ o1, float* __restrict__ lse1,
                               const float* __restrict__ o2, const float* __restrict__ lse2,
                               int t, int heads, int d) {
    const size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;  // i * heads + h
    if (row >= (size_t)t * heads) return;
    const float a = lse1[row], b = lse2[row];
    const float m = fmaxf(a, b);
    if (m == -INFINITY) return;
    const float wa = expf(a - m), wb = expf(b - m);
    float* x = o1 + row * d;
    const float* y = o2 + row * d;
    for (int c = 0; c < d; ++c) x[c] = (wa * x[c] + wb * y[c]) / (wa + wb);
    lse1[row] = m + logf(wa + wb);
}
