// A CPU emulation of the little of CUDA that Ringbolt's kernels use, so that the real
// kernels/cuda sources run (slowly) on a machine without a GPU and can be checked against
// plain references: every thread of a block is an OS thread; `__syncthreads` is a barrier of
// the block, warp shuffles and `mma.sync` are exchanges through a barrier of the warp; static
// `__shared__` arrays are function statics (blocks run one after another); dynamic shared
// memory is a buffer filled with a poison byte. Exited threads leave their barriers, as on
// sm_70 and later.
//
// What it checks: index algebra, shared-memory staging, barriers, shuffles, launch shapes and
// the tensor-core fragment layouts as the PTX ISA documents them (m16n8k16, bf16 → f32). What
// it cannot: timing, memory-model races between blocks, and whether the hardware agrees with
// the documented layouts.
#pragma once

#include <math.h>

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define RB_HOST_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline dim3 gridDim, blockDim;
inline thread_local dim3 threadIdx, blockIdx;

struct RbWarp {
    explicit RbWarp(int n) : size(n), bar(n) {}
    int size;
    std::barrier<> bar;
    float f[32];
    unsigned a[32][4];
    unsigned b[32][2];
};

inline std::barrier<>* rb_block_bar = nullptr;
inline thread_local RbWarp* rb_warp = nullptr;
inline thread_local int rb_lane = 0;
inline std::vector<unsigned char> rb_dyn_smem;
/// Byte that fills dynamic shared memory before each block: 0x7f7f… is about 3.4e38 as f32
/// and as bf16, so reading what was never written shows up in any result.
inline constexpr unsigned char RB_POISON = 0x7f;

inline unsigned char* rb_emu_dynamic_smem() { return rb_dyn_smem.data(); }

inline void __syncthreads() { rb_block_bar->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int o) {
    RbWarp* w = rb_warp;
    if (mask != 0xffffffffu || w->size != 32) throw std::logic_error("shuffle needs a full warp");
    w->f[rb_lane] = v;
    w->bar.arrive_and_wait();
    const float r = w->f[rb_lane ^ o];
    w->bar.arrive_and_wait();
    return r;
}

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

struct __nv_bfloat16 {
    unsigned short x;
};

// Round to nearest, ties to even (what `__float2bfloat16` does); NaN stays NaN.
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(unsigned short)(u >> 16)};
}
#define __float2bfloat16_rn __float2bfloat16

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

inline float rb_emu_bf16_half(unsigned word, int high) {
    return __bfloat162float({(unsigned short)(high ? word >> 16 : word & 0xffffu)});
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, c += a·b, with the PTX ISA's fragment
// layouts (g = lane / 4, q = lane % 4):
//   A a[0..3]: (g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)
//   B b[0..1]: (k = 2q..2q+1, n = g), (k = 2q+8..2q+9, n = g)
//   C c[0..3]: (g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)
// The lower index of a pair sits in the low half of its register.
inline void rb_emu_mma(float c[4], const unsigned a[4], const unsigned b[2]) {
    RbWarp* w = rb_warp;
    if (w->size != 32) throw std::logic_error("mma.sync needs a full warp");
    const int lane = rb_lane;
    for (int i = 0; i < 4; ++i) w->a[lane][i] = a[i];
    w->b[lane][0] = b[0];
    w->b[lane][1] = b[1];
    w->bar.arrive_and_wait();
    auto A = [&](int r, int k) {
        const int l = (r % 8) * 4 + (k % 8) / 2, reg = r / 8 + (k >= 8 ? 2 : 0);
        return rb_emu_bf16_half(w->a[l][reg], k % 2);
    };
    auto B = [&](int k, int n) {
        const int l = n * 4 + (k % 8) / 2, reg = k >= 8 ? 1 : 0;
        return rb_emu_bf16_half(w->b[l][reg], k % 2);
    };
    const int g = lane >> 2, q = lane & 3;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const int r = g + (e >= 2 ? 8 : 0), n = 2 * q + (e & 1);
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
        out[e] = acc;
    }
    w->bar.arrive_and_wait();
    for (int e = 0; e < 4; ++e) c[e] = out[e];
}

/// Runs `body` (a call of one kernel) as a launch of `grid` × `block` threads with `smem` bytes
/// of dynamic shared memory: blocks one after another, each block's threads at once.
template <class F>
void rb_launch(dim3 grid, dim3 block, size_t smem, F&& body) {
    gridDim = grid;
    blockDim = block;
    const int n = (int)(block.x * block.y * block.z);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                rb_dyn_smem.assign(smem, RB_POISON);
                std::barrier<> bar(n);
                rb_block_bar = &bar;
                std::vector<std::unique_ptr<RbWarp>> warps;
                for (int w = 0; w * 32 < n; ++w)
                    warps.push_back(std::make_unique<RbWarp>(std::min(32, n - w * 32)));
                std::vector<std::thread> threads;
                threads.reserve(n);
                for (int tid = 0; tid < n; ++tid)
                    threads.emplace_back([&, tid] {
                        threadIdx = {tid % block.x, (tid / block.x) % block.y,
                                     tid / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        rb_warp = warps[tid / 32].get();
                        rb_lane = tid % 32;
                        body();
                        rb_warp->bar.arrive_and_drop();
                        bar.arrive_and_drop();
                    });
                for (auto& t : threads) t.join();
            }
}
