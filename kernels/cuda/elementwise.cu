// Row-wise and element-wise kernels: RMSNorm, LayerNorm, activations, gates, biases, axpby,
// gathers and the weighted scatter-add that combines expert outputs, and bf16 conversion.
#include "common.cuh"

// y = g ⊙ x / sqrt(mean(x²) + eps), one block per row.
RB_EXTERN void rms_norm(const float* __restrict__ x, const float* __restrict__ g,
                        float* __restrict__ y, int width, float eps) {
    const float* xr = x + (size_t)blockIdx.x * width;
    float* yr = y + (size_t)blockIdx.x * width;
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += xr[i] * xr[i];
    s = rb_block_sum(s);
    const float r = rsqrtf(s / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) yr[i] = g[i] * (xr[i] * r);
}

// y = g ⊙ (x − mean) / sqrt(var + eps) + b, one block per row (the vision tower's LayerNorm;
// the variance from the mean's deviations, a second pass over the row).
RB_EXTERN void layer_norm(const float* __restrict__ x, const float* __restrict__ g,
                          const float* __restrict__ b, float* __restrict__ y, int width,
                          float eps) {
    const float* xr = x + (size_t)blockIdx.x * width;
    float* yr = y + (size_t)blockIdx.x * width;
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += xr[i];
    const float mean = rb_block_sum(s) / (float)width;
    float v = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float d = xr[i] - mean;
        v += d * d;
    }
    const float r = rsqrtf(rb_block_sum(v) / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) yr[i] = (xr[i] - mean) * r * g[i] + b[i];
}

// x[i] += bias[i mod width]: a linear layer's bias on every row.
RB_EXTERN void add_bias(float* __restrict__ x, const float* __restrict__ bias, size_t n,
                        int width) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += bias[i % (size_t)width];
}

// Exact GELU: x · (1 + erf(x / √2)) / 2.
RB_EXTERN void gelu_inplace(float* __restrict__ x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { float v = x[i]; x[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }
}

RB_EXTERN void silu_inplace(float* __restrict__ x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { float v = x[i]; x[i] = v / (1.0f + expf(-v)); }
}

// x ← x ⊙ sigmoid(gate)
RB_EXTERN void sigmoid_gate(float* __restrict__ x, const float* __restrict__ gate, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = x[i] / (1.0f + expf(-gate[i]));
}

RB_EXTERN void axpby(float alpha, const float* __restrict__ a, float beta,
                     const float* __restrict__ b, float* __restrict__ y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = alpha * a[i] + beta * b[i];
}

// h is [rows, 2·inter] (gate columns, then up): y = SiLU(gate) ⊙ up, [rows, inter].
RB_EXTERN void swiglu(const float* __restrict__ h, float* __restrict__ y, int rows, int inter) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * inter) return;
    size_t r = i / inter, c = i % inter;
    float gt = h[r * 2 * inter + c], up = h[r * 2 * inter + inter + c];
    y[i] = gt / (1.0f + expf(-gt)) * up;
}

// y[i] = x[ids[i]] (rows of `width`): expert permute, cache slices, embedding rows.
RB_EXTERN void gather_rows(const float* __restrict__ x, const unsigned* __restrict__ ids,
                           float* __restrict__ y, int count, int width) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)count * width) return;
    size_t r = i / width, c = i % width;
    y[i] = x[(size_t)ids[r] * width + c];
}

// Embedding rows from a bf16 table.
RB_EXTERN void gather_rows_bf16(const __nv_bfloat16* __restrict__ w,
                                const unsigned* __restrict__ ids, float* __restrict__ y,
                                int count, int width) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)count * width) return;
    size_t r = i / width, c = i % width;
    y[i] = __bfloat162float(w[(size_t)ids[r] * width + c]);
}

// Expert unpermute: out[dst[k]] += Σ weights[j] · y[src[j]] over j in [starts[k], starts[k+1]),
// in j order. `dst` has no repeats, so no two threads write one element; a token routed to
// several experts sums their outputs in a fixed order (the order of adding the experts one
// after another), so results repeat exactly from run to run.
RB_EXTERN void scatter_add_rows(float* __restrict__ out, const float* __restrict__ y,
                                const unsigned* __restrict__ dst,
                                const unsigned* __restrict__ starts,
                                const unsigned* __restrict__ src,
                                const float* __restrict__ weights, int count, int width) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)count * width) return;
    size_t k = i / width, c = i % width;
    float* o = out + (size_t)dst[k] * width + c;
    float acc = *o;
    for (unsigned j = starts[k]; j < starts[k + 1]; ++j)
        acc += weights[j] * y[(size_t)src[j] * width + c];
    *o = acc;
}

// Row r of src (`width` values) rounded to bf16 at dst[r]: a decode step's keys or values
// appended to each sequence's cache (dst[r] points at the cache's first free row).
RB_EXTERN void cache_append_rows(const float* __restrict__ src,
                                 const unsigned long long* __restrict__ dst, int count,
                                 int width) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)count * width) return;
    const size_t r = i / width, c = i % width;
    reinterpret_cast<__nv_bfloat16*>(dst[r])[c] = __float2bfloat16_rn(src[i]);
}

RB_EXTERN void f32_to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2bfloat16_rn(x[i]);
}

RB_EXTERN void bf16_to_f32(const __nv_bfloat16* __restrict__ x, float* __restrict__ y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __bfloat162float(x[i]);
}
