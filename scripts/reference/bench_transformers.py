#!/usr/bin/env python3
"""Baseline for `ringbolt bench engine`: transformers' MiniMaxForCausalLM on the same
checkpoint, same machine, same thread count. Prints one JSON line.

  prefill: one forward over N tokens with logits of the last position only (logits_to_keep=1)
  decode:  seconds per token after a context of C tokens (use_cache, explicit positions)
"""
import argparse
import json
import time

import torch
from transformers import MiniMaxForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="what the model is loaded and computed in")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model = MiniMaxForCausalLM.from_pretrained(a.checkpoint, dtype=dtype).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (1, a.prefill), generator=g)
    best = float("inf")
    with torch.no_grad():
        for _ in range(a.repeat):
            t = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            best = min(best, time.perf_counter() - t)
        ctx = torch.randint(0, vocab, (1, a.decode_context + a.decode_steps), generator=g)
        dbest = float("inf")
        for _ in range(a.repeat):
            out = model(ctx[:, : a.decode_context], use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            t = time.perf_counter()
            for i in range(a.decode_context, a.decode_context + a.decode_steps):
                out = model(ctx[:, i : i + 1], past_key_values=past, use_cache=True,
                            position_ids=torch.tensor([[i]]), cache_position=torch.tensor([i]))
                past = out.past_key_values
            dbest = min(dbest, (time.perf_counter() - t) / a.decode_steps)
    print(json.dumps({
        "bench": "transformers",
        "torch": torch.__version__,
        "dtype": a.dtype,
        "threads": torch.get_num_threads(),
        "prefill_tokens": a.prefill,
        "prefill_seconds": best,
        "decode_context": a.decode_context,
        "decode_ms_per_token": dbest * 1e3,
    }))


if __name__ == "__main__":
    main()
