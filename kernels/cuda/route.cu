// Router: softmax over the experts' logits of each row, top-k (ties to the lower index),
// weights renormalised over the k chosen. One thread per row.
#include "common.cuh"

#define RB_MAX_TOPK 16

RB_EXTERN void route_topk(const float* __restrict__ logits, unsigned* __restrict__ experts,
                          float* __restrict__ weights, int rows, int n_experts, int top_k) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows || top_k > RB_MAX_TOPK) return;
    const float* l = logits + (size_t)r * n_experts;
    float m = -INFINITY;
    for (int e = 0; e < n_experts; ++e) m = fmaxf(m, l[e]);
    float z = 0.0f;
    for (int e = 0; e < n_experts; ++e) z += expf(l[e] - m);
    int chosen[RB_MAX_TOPK];
    float p[RB_MAX_TOPK];
    float sum = 0.0f;
    for (int k = 0; k < top_k; ++k) {
        int best = -1;
        float bv = -INFINITY;
        for (int e = 0; e < n_experts; ++e) {
            bool taken = false;
            for (int j = 0; j < k; ++j) taken |= chosen[j] == e;
            if (!taken && (best < 0 || l[e] > bv)) { best = e; bv = l[e]; }
        }
        chosen[k] = best;
        p[k] = expf(bv - m) / z;
        sum += p[k];
    }
    for (int k = 0; k < top_k; ++k) {
        experts[(size_t)r * top_k + k] = (unsigned)chosen[k];
        weights[(size_t)r * top_k + k] = p[k] / sum;
    }
}
