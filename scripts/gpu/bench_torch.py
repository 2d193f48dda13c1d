#!/usr/bin/env python3
"""Baselines for `ringbolt bench kernels`, measured on the same GPU in the same run
(scripts/gpu-check.sh): PyTorch's bf16 matmul, a device-to-device copy (HBM bandwidth, bytes
read + written) and scaled_dot_product_attention (causal, GQA, bf16: what Ringbolt's attention
computes in). Each measurement goes to stderr as it is made; one JSON line on stdout at the end.
Times: CUDA events around `iters` calls, median (and min) of `reps` such timings, after 3
warm-ups, as the Ringbolt side reports them."""
import argparse
import json
import sys

import torch
import torch.nn.functional as F


def timed(f, iters, reps=5):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            f()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / iters)
    out.sort()
    return out[len(out) // 2], out[0]


def said(what, value):
    print(f"bench torch: {what} {json.dumps(value)}", file=sys.stderr, flush=True)


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
    s, s_min = timed(lambda: x @ w, 5)
    gemm = 2 * g**3 / s / 1e12
    said("bf16 matmul", {"seconds": s, "min_seconds": s_min, "tflops": gemm})
    del x, w
    src = torch.empty(a.copy_bytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    s, s_min = timed(lambda: dst.copy_(src), 10)
    copy = 2 * a.copy_bytes / s / 1e9
    said("copy", {"seconds": s, "min_seconds": s_min, "gb_per_s": copy})
    del src, dst
    t, h, kvh, d = a.attention_tokens, a.heads, a.kv_heads, a.head_dim
    flops = 4 * d * h * t * (t + 1) / 2
    q = torch.randn(1, h, t, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, kvh, t, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, kvh, t, d, device=dev, dtype=torch.bfloat16)
    s, s_min = timed(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 1, 7
    )
    sdpa = flops / s / 1e12
    backends = {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
    }
    said("sdpa bf16", {"seconds": s, "min_seconds": s_min, "tflops": sdpa, "enabled": backends})
    print(json.dumps({
        "bench": "torch",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(),
        "bf16_matmul_tflops": gemm,
        "copy_gb_per_s": copy,
        "sdpa_causal_bf16_tflops": sdpa,
        "sdpa_backends_enabled": backends,
        "heads": h,
        "kv_heads": kvh,
        "head_dim": d,
        "attention_tokens": t,
    }))


if __name__ == "__main__":
    main()
