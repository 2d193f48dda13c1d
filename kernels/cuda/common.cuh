// Shared helpers of Ringbolt's CUDA kernels (compiled by NVRTC: no host headers).
// `RB_HOST_EMU` is set by the CPU emulation of kernels/emu (threads and barriers for the GPU's
// blocks and warps), which compiles these same sources with a host compiler.
#pragma once
#include <cuda_bf16.h>

#define RB_EXTERN extern "C" __global__

// A kernel's dynamic shared memory.
#ifdef RB_HOST_EMU
#define RB_DYNAMIC_SMEM(name) unsigned char* name = rb_emu_dynamic_smem()
#else
#define RB_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float rb_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float rb_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block whose size is a multiple of 32 (at most 1024); every thread gets it.
__device__ __forceinline__ float rb_block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = rb_warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    float s = lane < warps ? part[lane] : 0.0f;
    return rb_warp_sum(s);
}

// ---- Tensor cores: mma.sync.m16n8k16 with bf16 inputs and f32 accumulators (sm_80+) ----
// Fragments follow the PTX ISA's layout for this shape. With g = lane / 4 and q = lane % 4:
//   A (16×16, row-major) a[0..3]: (g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)
//   B (16×8, "col")      b[0..1]: (k = 2q..2q+1, n = g), (k = 2q+8..2q+9, n = g)
//   C (16×8, f32)        c[0..3]: (g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)
// Each 32-bit register holds two bf16, the lower index in the low half.

__device__ __forceinline__ unsigned rb_pack_bf16(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16(lo)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
}

// A fragment of the 16×16 tile whose top-left element is p[0] (row-major, leading dim ld).
__device__ __forceinline__ void rb_frag_a(unsigned a[4], const __nv_bfloat16* p, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    a[0] = *reinterpret_cast<const unsigned*>(p + g * ld + 2 * q);
    a[1] = *reinterpret_cast<const unsigned*>(p + (g + 8) * ld + 2 * q);
    a[2] = *reinterpret_cast<const unsigned*>(p + g * ld + 2 * q + 8);
    a[3] = *reinterpret_cast<const unsigned*>(p + (g + 8) * ld + 2 * q + 8);
}

// B fragment of the 16×8 tile (k, n) stored n-major: element (k, n) at p[n·ld + k] (a K or
// Vᵀ row holds consecutive k). p points at element (0, 0) of the tile.
__device__ __forceinline__ void rb_frag_b(unsigned b[2], const __nv_bfloat16* p, long long ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    b[0] = *reinterpret_cast<const unsigned*>(p + g * ld + 2 * q);
    b[1] = *reinterpret_cast<const unsigned*>(p + g * ld + 2 * q + 8);
}

// c += a · b
__device__ __forceinline__ void rb_mma(float c[4], const unsigned a[4], const unsigned b[2]) {
#ifdef RB_HOST_EMU
    rb_emu_mma(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// The A fragment of a 16×16 tile held as the C fragments of its two 16×8 halves (an mma's
// result fed to the next one: columns 0–7 in c0, 8–15 in c1), rounded to bf16.
__device__ __forceinline__ void rb_frag_a_from_c(unsigned a[4], const float c0[4],
                                                 const float c1[4]) {
    a[0] = rb_pack_bf16(c0[0], c0[1]);
    a[1] = rb_pack_bf16(c0[2], c0[3]);
    a[2] = rb_pack_bf16(c1[0], c1[1]);
    a[3] = rb_pack_bf16(c1[2], c1[3]);
}

// Scores of a warp's 16 query rows against the first `tiles` (≤ NT) tiles of 8 key rows:
// s[nt] = Q · K[8nt .. 8nt+8)ᵀ over d, with Q (`q`: the warp's first row) and K row-major bf16
// of leading dimension ld. Tiles from `tiles` on are left at zero.
template <int NT>
__device__ __forceinline__ void rb_scores(float (&s)[NT][4], const __nv_bfloat16* q,
                                          const __nv_bfloat16* k, int ld, int d, int tiles) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    for (int c0 = 0; c0 < d; c0 += 16) {
        unsigned a[4];
        rb_frag_a(a, q + c0, ld);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            if (nt >= tiles) break;
            unsigned b[2];
            rb_frag_b(b, k + nt * 8 * ld + c0, ld);
            rb_mma(s[nt], a, b);
        }
    }
}
