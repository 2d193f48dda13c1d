// Shared helpers of Ringbolt's CUDA kernels (compiled by NVRTC: no host headers).
#pragma once
#include <cuda_bf16.h>

#define RB_EXTERN extern "C" __global__

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
