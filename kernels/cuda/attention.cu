// Causal softmax attention with GQA, flash-style: one warp per (query, head) streams the keys
// with an online softmax (running max and sum), so memory stays O(d) per query whatever the
// context. Scale 1/sqrt(d). Besides the output it writes the log-sum-exp of the scaled scores:
// the partial-result form ring attention merges across key blocks (`attention_merge`).
//
// Queries are rows [t, heads·d] (f32) at absolute positions pos0 + i; keys/values rows
// [nkeys, kv_heads·d] at absolute positions kpos0 + j, in bf16 (the KV cache's type: half the
// memory and bandwidth of f32). Key j is visible to query i when kpos0 + j ≤ pos0 + i.
#include "common.cuh"

#define RB_MAX_DIM_PER_LANE 8  // head_dim ≤ 256

// Two implementations: `attention` (scalar f32, one warp per query and head, any head_dim ≤
// 256) and `attention_tc` (tensor cores, bf16 operands with f32 accumulation; below).

RB_EXTERN void attention(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                         const __nv_bfloat16* __restrict__ v, float* __restrict__ out,
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
        const __nv_bfloat16* kr = k + (size_t)j * kv_heads * d + (size_t)kvh * d;
        float s = 0.0f;
        for (int p = 0; p < per; ++p) {
            const int c = lane + 32 * p;
            if (c < d) s += qv[p] * __bfloat162float(kr[c]);
        }
        s = rb_warp_sum(s);
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn), w = expf(s - mn);
        l = l * corr + w;
        const __nv_bfloat16* vr = v + (size_t)j * kv_heads * d + (size_t)kvh * d;
        for (int p = 0; p < per; ++p) {
            const int c = lane + 32 * p;
            if (c < d) acc[p] = acc[p] * corr + w * __bfloat162float(vr[c]);
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

#define RB_AQ 64  // queries per thread block of attention_tc (4 warps × 16 rows)
#define RB_AK 64  // keys per tile
#define RB_AT (RB_AK + 8)
#define RB_AMAX 128  // largest head_dim of attention_tc

// One thread block of `attention_tc`: query rows [q0, q0 + 64) of head h (queries at absolute
// positions pos0 + i, keys at kpos0 + j, as above). Shared by the prefill/chunk entry point and
// the batched decode one.
__device__ __forceinline__ void rb_attention_tc_block(
    const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
    const __nv_bfloat16* __restrict__ v, float* __restrict__ out, float* __restrict__ lse, int t,
    int heads, int kv_heads, int d, long long pos0, long long kpos0, int nkeys, int q0, int h) {
    RB_DYNAMIC_SMEM(rb_smem);
    const int ld = d + 8;
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(rb_smem);
    __nv_bfloat16* ks = qs + RB_AQ * ld;
    __nv_bfloat16* vt = ks + RB_AK * ld;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qq = lane & 3;
    const int i0 = warp * 16;
    const int qa = q0 + i0 + g, qb = qa + 8;  // this lane's two query rows
    const float scale = rsqrtf((float)d);

    for (int idx = threadIdx.x; idx < RB_AQ * d; idx += blockDim.x) {
        const int i = idx / d, c = idx % d;
        const float x = q0 + i < t ? q[(size_t)(q0 + i) * heads * d + (size_t)h * d + c] : 0.0f;
        qs[i * ld + c] = __float2bfloat16(x);
    }
    float o[RB_AMAX / 8][4];
#pragma unroll
    for (int nt = 0; nt < RB_AMAX / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
    // Keys past the block's last query are invisible to all of it.
    const long long last_q = pos0 + (long long)min(q0 + RB_AQ, t) - 1;
    const int kend = (int)max(0LL, min((long long)nkeys, last_q - kpos0 + 1));

    for (int kb = 0; kb < kend; kb += RB_AK) {
        __syncthreads();  // the previous tile is no longer read (and qs is written)
        for (int idx = threadIdx.x; idx < RB_AK * d; idx += blockDim.x) {
            const int j = idx / d, c = idx % d;
            __nv_bfloat16 kx = __float2bfloat16(0.0f), vx = kx;
            if (kb + j < nkeys) {
                const size_t at = (size_t)(kb + j) * kv_heads * d + (size_t)kvh * d + c;
                kx = k[at];
                vx = v[at];
            }
            ks[j * ld + c] = kx;
            vt[c * RB_AT + j] = vx;
        }
        __syncthreads();

        float s[RB_AK / 8][4];
        rb_scores(s, qs + i0 * ld, ks, ld, d, RB_AK / 8);
        // Mask, scale, and the running max of each of this lane's two rows.
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < RB_AK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e < 2 ? qa : qb, j = kb + nt * 8 + 2 * qq + (e & 1);
                const bool vis = i < t && j < nkeys && kpos0 + j <= pos0 + i;
                s[nt][e] = vis ? s[nt][e] * scale : -INFINITY;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
            }
        }
        float corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(mrow[r], mx[r]);
            corr[r] = mn == -INFINITY ? 1.0f : expf(mrow[r] - mn);
            mrow[r] = mn;
        }
#pragma unroll
        for (int nt = 0; nt < RB_AK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float mn = mrow[e >> 1];
                const float p = mn == -INFINITY ? 0.0f : expf(s[nt][e] - mn);
                s[nt][e] = p;
                sum[e >> 1] += p;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
            sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
            lrow[r] = lrow[r] * corr[r] + sum[r];
        }
#pragma unroll
        for (int nt = 0; nt < RB_AMAX / 8; ++nt) {
            o[nt][0] *= corr[0];
            o[nt][1] *= corr[0];
            o[nt][2] *= corr[1];
            o[nt][3] *= corr[1];
        }
        // O += P V, P as bf16 A fragments of 16 keys.
#pragma unroll
        for (int kc = 0; kc < RB_AK / 16; ++kc) {
            unsigned pa[4];
            rb_frag_a_from_c(pa, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
            for (int nt = 0; nt < RB_AMAX / 8; ++nt) {
                if (nt * 8 >= d) break;
                unsigned bf[2];
                rb_frag_b(bf, vt + nt * 8 * RB_AT + kc * 16, RB_AT);
                rb_mma(o[nt], pa, bf);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = r == 0 ? qa : qb;
        if (i >= t) continue;
        const float inv = lrow[r] > 0.0f ? 1.0f / lrow[r] : 0.0f;
        float* row = out + (size_t)i * heads * d + (size_t)h * d;
#pragma unroll
        for (int nt = 0; nt < RB_AMAX / 8; ++nt) {
            if (nt * 8 >= d) break;
            row[nt * 8 + 2 * qq] = o[nt][2 * r] * inv;
            row[nt * 8 + 2 * qq + 1] = o[nt][2 * r + 1] * inv;
        }
        if (qq == 0 && lse)
            lse[(size_t)i * heads + h] = lrow[r] > 0.0f ? mrow[r] + logf(lrow[r]) : -INFINITY;
    }
}

// Tensor-core form of `attention` (head_dim a multiple of 16, at most 128), same arguments and
// results. Grid (ceil(t/64), heads), 128 threads; warp w owns query rows [16w, 16w + 16) of the
// block. Per tile of 64 keys (staged in shared memory: K row-major, V transposed), the
// scores come from tensor cores into registers, the online softmax runs on them in f32 (the
// four lanes that share a row combine by shuffles), and P (bf16) · V accumulates into f32
// registers. Dynamic shared memory: 2·64·(d+8)·2 + d·72·2 bytes.
RB_EXTERN void attention_tc(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                            const __nv_bfloat16* __restrict__ v, float* __restrict__ out,
                            float* __restrict__ lse, int t, int heads, int kv_heads, int d,
                            long long pos0, long long kpos0, int nkeys) {
    if (d % 16 || d > RB_AMAX || blockDim.x != 128) return;
    // Split keys (flash-decoding): with gridDim.z = S > 1, block z takes keys
    // [z·per, (z+1)·per) and writes its partial result and log-sum-exp at part z of out/lse
    // (parts of t·heads·d and t·heads), which `attention_merge_splits` combines.
    if (gridDim.z > 1) {
        const int per = (nkeys + (int)gridDim.z - 1) / (int)gridDim.z;
        const int beg = min(nkeys, (int)blockIdx.z * per);
        k += (size_t)beg * kv_heads * d;
        v += (size_t)beg * kv_heads * d;
        kpos0 += beg;
        nkeys = min(nkeys, beg + per) - beg;
        out += (size_t)blockIdx.z * t * heads * d;
        lse += (size_t)blockIdx.z * t * heads;
    }
    rb_attention_tc_block(q, k, v, out, lse, t, heads, kv_heads, d, pos0, kpos0, nkeys,
                          blockIdx.x * RB_AQ, blockIdx.y);
}

// Decode of a batch of sequences in one launch: sequence s's query is row s of q ([batch,
// heads·d]) at position lens[s] − 1, over its own cache (kptrs[s], vptrs[s]: bf16 [lens[s],
// kv_heads·d]). Grid (1, heads, batch·splits), 128 threads, the dynamic shared memory of
// `attention_tc`. Block z = s·splits + p takes part p of the sequence's keys and writes its
// partial result at out + (p·batch + s)·heads·d and its log-sum-exp at lse + (p·batch + s)·heads:
// with splits > 1, `attention_merge_splits` over batch·heads rows combines them.
RB_EXTERN void attention_decode_tc(const float* __restrict__ q,
                                   const unsigned long long* __restrict__ kptrs,
                                   const unsigned long long* __restrict__ vptrs,
                                   const int* __restrict__ lens, float* __restrict__ out,
                                   float* __restrict__ lse, int batch, int heads, int kv_heads,
                                   int d, int splits) {
    if (d % 16 || d > RB_AMAX || blockDim.x != 128) return;
    const int s = (int)blockIdx.z / splits, p = (int)blockIdx.z % splits;
    if (s >= batch) return;
    const int n = lens[s];
    const int per = (n + splits - 1) / splits;
    const int beg = min(n, p * per);
    const __nv_bfloat16* k = reinterpret_cast<const __nv_bfloat16*>(kptrs[s]);
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(vptrs[s]);
    k += (size_t)beg * kv_heads * d;
    v += (size_t)beg * kv_heads * d;
    const size_t part = (size_t)p * batch + s;
    rb_attention_tc_block(q + (size_t)s * heads * d, k, v, out + part * heads * d,
                          lse + part * heads, 1, heads, kv_heads, d, (long long)n - 1, beg,
                          min(n, beg + per) - beg, 0, blockIdx.y);
}

// Combines `splits` partial results over disjoint key sets (parts [splits][t·heads][d] and
// their log-sum-exps [splits][t·heads]) into out [t·heads][d]: weights e^{lse_z − max}. One
// thread per output value.
RB_EXTERN void attention_merge_splits(const float* __restrict__ parts,
                                      const float* __restrict__ lses, float* __restrict__ out,
                                      int splits, int rows, int d) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)rows * d) return;
    const size_t row = idx / d;
    float m = -INFINITY;
    for (int z = 0; z < splits; ++z) m = fmaxf(m, lses[(size_t)z * rows + row]);
    if (m == -INFINITY) {
        out[idx] = 0.0f;
        return;
    }
    float num = 0.0f, den = 0.0f;
    for (int z = 0; z < splits; ++z) {
        const float w = expf(lses[(size_t)z * rows + row] - m);
        num += w * parts[(size_t)z * rows * d + idx];
        den += w;
    }
    out[idx] = num / den;
}
