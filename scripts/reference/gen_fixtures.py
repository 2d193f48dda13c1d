#!/usr/bin/env python3
"""Generate reference fixtures with Hugging Face transformers' MiniMaxForCausalLM (f32).

Each fixture is a small checkpoint plus the logits the reference computes for one prompt:
  tests/fixtures/reference/<name>/checkpoint/   config.json + safetensors (as written by save_pretrained)
  tests/fixtures/reference/<name>/expected.safetensors
      tokens          int32 [T]
      prefill_logits  f32 [T, V]   one forward over all T tokens
      decode_logits   f32 [T, V]   forward over the first K tokens, then one token at a time
      stepwise_logits f32 [T, V]   one token at a time from the start
      (metadata: prefill_len = K)

Ringbolt follows the original remote code where transformers differs (minimax-01.md 2.8):
  * the lightning slope denominator: transformers uses 1 - l/(L-1+1e-5) + 1e-5, the original
    1 - l/(L-1) + 1e-5 (with the ALiBi fallback for head counts that are not powers of two).
    We overwrite the decay buffers with the original formula, in f32, before taking logits.
  * RoPE: transformers rotates the whole head; fixtures use rotary_dim == head_dim, where both
    agree. Partial rotary is tested against an independent oracle in Rust instead.

Usage: pip install -r scripts/reference/requirements.txt
       python scripts/reference/gen_fixtures.py --out tests/fixtures/reference
"""
import argparse
import json
import math
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import MiniMaxConfig, MiniMaxForCausalLM
from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention


def original_slopes(n):
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return pow2(n)
    closest = 2 ** math.floor(math.log2(n))
    return pow2(closest) + original_slopes(2 * closest)[0::2][: n - closest]


def use_original_decay(model):
    for m in model.modules():
        if isinstance(m, MiniMaxLightningAttention):
            L, l = m.num_hidden_layers, m.layer_idx
            factor = (1 - l / (L - 1) + 1e-5) if L > 1 else (1 + 1e-5)
            slope = torch.tensor(original_slopes(m.num_attention_heads), dtype=torch.float32) * factor
            slope = slope[:, None, None]
            q, k, d = m.decay_factors(slope)
            with torch.no_grad():
                m.slope_rate.copy_(slope)
                m.query_decay.copy_(q)
                m.key_decay.copy_(k)
                m.diagonal_decay.copy_(d)


@torch.no_grad()
def reference_logits(model, tokens, prefill_len):
    ids = torch.tensor([tokens])
    full = model(ids, use_cache=False).logits[0].float()

    def incremental(k):
        out = model(ids[:, :k], use_cache=True)
        rows = [out.logits[0]]
        past = out.past_key_values
        for t in range(k, len(tokens)):
            # Explicit positions: transformers 5.23 takes the decode position from layer 0's
            # cache, which is empty when layer 0 is a lightning layer (RoPE would restart at 0).
            out = model(
                ids[:, t : t + 1],
                past_key_values=past,
                use_cache=True,
                position_ids=torch.tensor([[t]]),
                cache_position=torch.tensor([t]),
            )
            past = out.past_key_values
            rows.append(out.logits[0])
        return torch.cat(rows, 0).float()

    return full, incremental(prefill_len), incremental(1)


def to_original_config(cfg, hf_json):
    """Rewrite a transformers config.json in the original MiniMax-Text-01 dialect."""
    attn = [0 if t == "linear_attention" else 1 for t in cfg.layer_types]
    return {
        "architectures": ["MiniMaxText01ForCausalLM"],
        "model_type": "minimax_text_01",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rotary_dim": cfg.head_dim,
        "rope_theta": cfg.rope_parameters["rope_theta"],
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "attn_type_list": attn,
        "layernorm_linear_attention_alpha": cfg.linear_attn_alpha_factor,
        "layernorm_linear_attention_beta": cfg.linear_attn_beta_factor,
        "layernorm_full_attention_alpha": cfg.full_attn_alpha_factor,
        "layernorm_full_attention_beta": cfg.full_attn_beta_factor,
        "layernorm_mlp_alpha": cfg.mlp_alpha_factor,
        "layernorm_mlp_beta": cfg.mlp_beta_factor,
        "postnorm": True,
        "block": cfg.block_size,
        "num_local_experts": cfg.num_local_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "shared_intermediate_size": 0,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": hf_json.get("dtype") or hf_json.get("torch_dtype"),
    }


CASES = {
    # transformers dialect, f32, single file: GQA (4 heads / 2 KV), head_dim*heads != hidden,
    # two softmax layers, residual factors != 1, block 8 with 29 tokens (partial last block).
    "hf-f32": dict(
        config=dict(
            vocab_size=96, hidden_size=48, intermediate_size=24, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            layer_types=["linear_attention", "linear_attention", "full_attention",
                         "linear_attention", "full_attention", "linear_attention"],
            block_size=8, num_local_experts=4, num_experts_per_tok=2,
            linear_attn_alpha_factor=2.5, linear_attn_beta_factor=0.75,
            full_attn_alpha_factor=3.25, full_attn_beta_factor=0.5,
            mlp_alpha_factor=1.75, mlp_beta_factor=1.25,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            max_position_embeddings=4096, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        ),
        tokens=29, prefill_len=13, seed=1, dtype=torch.float32, shard=None, original=False,
    ),
    # original dialect, bf16 weights in shards: 6 heads (ALiBi fallback slopes), GQA group 3,
    # the real model's alpha, block 16 with 40 tokens, softmax layers 3 and 7.
    "original-bf16-sharded": dict(
        config=dict(
            vocab_size=80, hidden_size=40, intermediate_size=32, num_hidden_layers=8,
            num_attention_heads=6, num_key_value_heads=2, head_dim=8,
            layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
            + ["full_attention"],
            block_size=16, num_local_experts=5, num_experts_per_tok=2,
            linear_attn_alpha_factor=3.5565588200778455, linear_attn_beta_factor=1.0,
            full_attn_alpha_factor=3.5565588200778455, full_attn_beta_factor=1.0,
            mlp_alpha_factor=3.5565588200778455, mlp_beta_factor=1.0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0},
            max_position_embeddings=4096, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        ),
        tokens=40, prefill_len=17, seed=2, dtype=torch.bfloat16, shard="60KB", original=True,
    ),
}


def generate(name, case, out_root):
    torch.manual_seed(case["seed"])
    cfg = MiniMaxConfig(**case["config"])
    model = MiniMaxForCausalLM(cfg).float().eval()
    if case["dtype"] == torch.bfloat16:
        # The checkpoint stores bf16: the reference computes in f32 on the bf16-rounded weights.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    use_original_decay(model)
    g = torch.Generator().manual_seed(case["seed"] + 100)
    tokens = torch.randint(0, cfg.vocab_size, (case["tokens"],), generator=g).tolist()
    full, dec, step = reference_logits(model, tokens, case["prefill_len"])

    out = os.path.join(out_root, name)
    ckpt = os.path.join(out, "checkpoint")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    save_model = model.to(case["dtype"]) if case["dtype"] != torch.float32 else model
    kwargs = {"max_shard_size": case["shard"]} if case["shard"] else {}
    save_model.save_pretrained(ckpt, **kwargs)
    if case["original"]:
        path = os.path.join(ckpt, "config.json")
        with open(path) as f:
            hf_json = json.load(f)
        with open(path, "w") as f:
            json.dump(to_original_config(cfg, hf_json), f, indent=2)
    save_file(
        {
            "tokens": torch.tensor(tokens, dtype=torch.int32),
            "prefill_logits": full.contiguous(),
            "decode_logits": dec.contiguous(),
            "stepwise_logits": step.contiguous(),
        },
        os.path.join(out, "expected.safetensors"),
        metadata={
            "prefill_len": str(case["prefill_len"]),
            "generator": "scripts/reference/gen_fixtures.py",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
    )
    spread = (full.max() - full.min()).item()
    print(f"{name}: T={len(tokens)} V={cfg.vocab_size} max|logit|={full.abs().max().item():.4f} "
          f"spread={spread:.4f} prefill-vs-decode={((full - dec).abs().max()).item():.2e} "
          f"files={sorted(os.listdir(ckpt))}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/reference")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, case in CASES.items():
        generate(name, case, args.out)


if __name__ == "__main__":
    main()
