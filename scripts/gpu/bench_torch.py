#!/usr/bin/env python3
"""Baselines for `ringbolt bench kernels`, measured on the same GPU in the same run
(scripts/gpu-check.sh): PyTorch's bf16 matmul, a device-to-device copy (HBM bandwidth, bytes
read + written) and scaled_dot_product_attention (causal, GQA) in bf16 and f32.
Prints one JSON line. Times are CUDA-event means of `iters` calls after 3 warm-ups."""
import argparse
import json

import torch
import torch.nn.functional as F


def timed(f, iters):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        f()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemm", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--attention-tokens", type=int, default=8192)
    ap.add_argument("--copy-bytes", type=int, default=4 << 30)
    a = ap.parse_args()
    dev = torch.device("cuda")
    g = a.gemm
    x = torch.randn(g, g, device=dev, dtype=torch.bfloat16)
    w = torch.randn(g, g, device=dev, dtype=torch.bfloat16)
    s = timed(lambda: x @ w, 10)
    gemm = 2 * g**3 / s / 1e12
    del x, w
    src = torch.empty(a.copy_bytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    s = timed(lambda: dst.copy_(src), 10)
    copy = 2 * a.copy_bytes / s / 1e9
    del src, dst
    t, h, kvh, d = a.attention_tokens, a.heads, a.kv_heads, a.head_dim
    flops = 4 * d * h * t * (t + 1) / 2
    sdpa = {}
    for name, dt in [("bf16", torch.bfloat16), ("f32", torch.float32)]:
        q = torch.randn(1, h, t, d, device=dev, dtype=dt)
        k = torch.randn(1, kvh, t, d, device=dev, dtype=dt)
        v = torch.randn(1, kvh, t, d, device=dev, dtype=dt)
        s = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 5)
        sdpa[name] = flops / s / 1e12
        del q, k, v
    print(json.dumps({
        "bench": "torch",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "bf16_matmul_tflops": gemm,
        "copy_gb_per_s": copy,
        "sdpa_causal_tflops": sdpa,
        "attention_tokens": t,
    }))


if __name__ == "__main__":
    main()
