#!/usr/bin/env python3
"""Baseline for `ringbolt bench vision`: transformers' LLaVA-NeXT vision path (CLIPVisionModel
ViT-L/14 at 336 pixels, the GELU projector into 6144, anyres packing with image_newline) on the
crops of one image of the same size, same thread count. Prints one JSON line.

  preprocess: LlavaNextImageProcessorPil on a synthetic image (Pillow bicubic)
  tower: model.model.get_image_features(pixel_values, image_sizes)
"""
import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessorPil, MiniMaxConfig)

PIN = [[336 * a, 336 * b] for a in range(1, 7) for b in range(1, 7) if a * b <= 18]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1344)
    ap.add_argument("--height", type=int, default=1344)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, image_size=336, patch_size=14, hidden_act="gelu",
                          layer_norm_eps=1e-5, projection_dim=6144)
    tc = MiniMaxConfig(vocab_size=512, hidden_size=6144, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=64, num_local_experts=2,
                       num_experts_per_tok=2, layer_types=["linear_attention"], block_size=256)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_grid_pinpoints=PIN,
                          image_token_index=511, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaNextForConditionalGeneration(cfg).eval().to(getattr(torch, a.dtype))
    proc = LlavaNextImageProcessorPil(size={"height": 336, "width": 336}, crop_size=None,
                                      do_center_crop=False, do_pad=True, image_grid_pinpoints=PIN,
                                      resample=3)
    y, x = np.mgrid[0:a.height, 0:a.width]
    arr = np.stack([128 + 100 * np.sin(x / (7 + c) + y / 11) for c in range(3)], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    pre, tower, n = float("inf"), float("inf"), 0
    with torch.no_grad():
        for _ in range(a.repeat):
            t = time.perf_counter()
            enc = proc([img], return_tensors="pt")
            pre = min(pre, time.perf_counter() - t)
            t = time.perf_counter()
            f = model.model.get_image_features(
                pixel_values=enc["pixel_values"].to(model.dtype), image_sizes=enc["image_sizes"],
                vision_feature_layer=-1, vision_feature_select_strategy="default").pooler_output[0]
            tower = min(tower, time.perf_counter() - t)
            n = f.shape[0]
    print(json.dumps({"bench": "vision-transformers", "torch": torch.__version__, "dtype": a.dtype,
                      "threads": torch.get_num_threads(), "image": [a.height, a.width],
                      "crops": int(enc["pixel_values"].shape[1]), "features": n,
                      "preprocess_seconds": pre, "tower_and_projector_seconds": tower,
                      "total_seconds": pre + tower}))


if __name__ == "__main__":
    main()
