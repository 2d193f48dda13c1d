#!/usr/bin/env python3
"""Proves that `ringbolt init-checkpoint` writes a checkpoint transformers loads, and that
transformers computes the same logits from it as `ringbolt logits`.

Uses a config with rotary_dim == head_dim (transformers ignores rotary_dim) and restores the
original slope formula (see gen_fixtures.py). Needs the pinned reference environment:
  pip install -r scripts/reference/requirements.txt
  python scripts/reference/check_init_checkpoint.py --ringbolt target/release/ringbolt
Exits non-zero on a mismatch.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import MiniMaxForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from gen_fixtures import use_original_decay  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ringbolt", default="target/release/ringbolt")
    args = ap.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, shard in (("f32", None), ("bf16", "200000")):
            base = os.path.join(tmp, "base")
            subprocess.run([args.ringbolt, "init-checkpoint", "--preset", "tiny", "--seed", "1", "--out", base],
                           check=True)
            cfg = json.load(open(os.path.join(base, "config.json")))
            cfg["rotary_dim"] = cfg["head_dim"]
            cfg_path = os.path.join(tmp, "cfg.json")
            json.dump(cfg, open(cfg_path, "w"))
            out = os.path.join(tmp, f"ckpt-{dtype}")
            cmd = [args.ringbolt, "init-checkpoint", "--config", cfg_path, "--seed", "3", "--dtype", dtype,
                   "--out", out]
            if shard:
                cmd += ["--max-shard-bytes", shard]
            subprocess.run(cmd, check=True)
            model = MiniMaxForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            use_original_decay(model)
            tokens = [(i * 37 + 11) % cfg["vocab_size"] for i in range(45)]
            with torch.no_grad():
                ref = model(torch.tensor([tokens]), use_cache=False).logits[0].float()
            lpath = os.path.join(tmp, f"logits-{dtype}.safetensors")
            subprocess.run([args.ringbolt, "logits", "--checkpoint", out, "--tokens", ",".join(map(str, tokens)),
                            "--out", lpath], check=True)
            ours = load_file(lpath)["logits"]
            rel = ((ours - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, rel)
            print(f"{dtype}{' sharded' if shard else ''}: transformers loaded {out}; "
                  f"max|ringbolt - transformers| / max|logit| = {rel:.2e}")
    if worst > 1e-4:
        print("MISMATCH", file=sys.stderr)
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
