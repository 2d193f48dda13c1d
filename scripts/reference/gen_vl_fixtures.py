#!/usr/bin/env python3
"""Generate the MiniMax-VL-01 reference fixture with Hugging Face transformers (f32).

The released MiniMax-VL-01 is LLaVA-NeXT with a CLIP vision tower and the MiniMax text model;
transformers builds the same structure as LlavaNextForConditionalGeneration with a MiniMax
text_config. The fixture:
  tests/fixtures/reference/vl/checkpoint/   config.json (model_type llava_next) + safetensors,
      renamed to the released layout: vision_tower.vision_model.* (transformers 5 writes
      vision_tower.* without `vision_model.`), no post_layernorm (unused, absent from the
      released checkpoint), no lightning decay buffers (the original formula is used, as in
      gen_fixtures.py)
  tests/fixtures/reference/vl/expected.safetensors
      pixels_<i>     f32 [crops, 3, S, S]   image i's crops as the processor hands them (base first)
      features_<i>   f32 [n, H]             image i's features after the projector, unpadding and
                                             the image_newline column (the model's packing)
      tokens         int32 [T]              a prompt with both images' placeholders expanded
      logits         f32 [T, V]             one forward over the prompt
      (metadata: image_sizes = "h0,w0;h1,w1")
  tests/fixtures/reference/vl/images/*.png, *.jpg   test images (Pillow wrote them)
      processed_<name>  f32 [crops, 3, S, S]  the released processor's crops of each image
                                             (Pillow bicubic, floor rounding of the fitted
                                             size; equal to transformers' LlavaNextImageProcessorPil
                                             with that rounding, which the script checks)
      tokens_files   int32, logits_files f32  a prompt with images a.png and b.png, through
                                             the processor and the model

Usage: python scripts/reference/gen_vl_fixtures.py --out tests/fixtures/reference
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MiniMaxConfig
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

sys.path.insert(0, os.path.dirname(__file__))
from gen_fixtures import use_original_decay  # noqa: E402

PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
SIZE = 28
IMAGE_SIZES = [[20, 50], [61, 33]]


def build():
    torch.manual_seed(20261206)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=2, image_size=SIZE, patch_size=14, hidden_act="gelu",
                          layer_norm_eps=1e-5, projection_dim=32, initializer_range=0.1)
    tc = MiniMaxConfig(vocab_size=96, hidden_size=48, intermediate_size=24, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
                       layer_types=["linear_attention", "full_attention", "linear_attention",
                                    "full_attention"],
                       block_size=8, initializer_range=0.1,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_grid_pinpoints=PINPOINTS,
                          image_token_index=95, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          tie_word_embeddings=False)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Larger than the default init so that every part moves the result.
        for name, p in model.named_parameters():
            if name.endswith("image_newline") or "class_embedding" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            elif "layer_norm" in name or "layrnorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight")
                        else 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    use_original_decay(model.model.language_model)
    return model


MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# (name, height, width, format)
IMAGES = [("a", 45, 70, "png"), ("b", 90, 31, "png"), ("c", 28, 28, "png"), ("d", 50, 61, "jpg")]


def select_best_resolution(h, w, pins):
    best, max_eff, min_waste = None, 0, float("inf")
    for th, tw in pins:
        s = min(tw / w, th / h)
        dw, dh = int(w * s), int(h * s)
        eff = min(dw * dh, w * h)
        waste = th * tw - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            best, max_eff, min_waste = (th, tw), eff, waste
    return best


def normalized(im):
    a = np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255)
    a = (a - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return a.transpose(2, 0, 1)


def released_crops(img, pins, size):
    """The released processor's anyres crops (image_processer.py: keepratio_resize with floor
    rounding, centred on black, tiles row-major, the base image resized to one tile)."""
    w, h = img.size
    th, tw = select_best_resolution(h, w, pins)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    if w / h > tw / th:
        nh = int(tw * h / w)
        canvas.paste(img.resize((tw, nh), Image.BICUBIC), (0, (th - nh) // 2))
    else:
        nw = int(th * w / h)
        canvas.paste(img.resize((nw, th), Image.BICUBIC), ((tw - nw) // 2, 0))
    tiles = [canvas.crop((j, i, j + size, i + size)) for i in range(0, th, size) for j in range(0, tw, size)]
    base = img.resize((size, size), Image.BICUBIC)
    return np.stack([normalized(t) for t in [base] + tiles])


def transformers_crops(imgs, pins, size):
    """transformers' LlavaNextImageProcessorPil with the released floor rounding."""
    import transformers.models.llava_next.image_processing_pil_llava_next as pilmod
    from transformers import LlavaNextImageProcessorPil

    def floor_patch_output_size(image, target_resolution, input_data_format):
        oh, ow = image.shape[-2:] if image.shape[0] in (1, 3) else image.shape[:2]
        th, tw = target_resolution
        if ow / oh > tw / th:
            return int(tw * oh / ow), tw
        return th, int(th * ow / oh)

    pilmod.get_patch_output_size = floor_patch_output_size
    proc = LlavaNextImageProcessorPil(size={"height": size, "width": size}, crop_size=None,
                                      do_center_crop=False, do_pad=True, image_grid_pinpoints=pins,
                                      resample=3)
    return proc(imgs, return_tensors="np")["pixel_values"]


def test_image(h, w, seed):
    """Smooth colour gradients with noise: content the resize filter has to work on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / (3 + c) + y / (5 + 2 * c) + c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def released_layout(src_dir, dst_dir):
    """transformers' save_pretrained output renamed to the released checkpoint's names."""
    os.makedirs(dst_dir, exist_ok=True)
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    out = {}
    for k, v in tensors.items():
        if k.startswith("vision_tower.post_layernorm") or k.split(".")[-1] in (
                "slope_rate", "query_decay", "key_decay", "diagonal_decay"):
            continue
        if k.startswith("vision_tower."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        out[k] = v.contiguous()
    save_file(out, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src_dir, "config.json"), os.path.join(dst_dir, "config.json"))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model = build()
    base = os.path.join(a.out, "vl")
    tmp = base + ".tmp"
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    released_layout(tmp, os.path.join(base, "checkpoint"))
    shutil.rmtree(tmp)

    g = torch.Generator().manual_seed(7)
    expected, pixels, sizes = {}, [], []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        n = image_size_to_num_patches([h, w], PINPOINTS, SIZE)
        pv = torch.randn(n, 3, SIZE, SIZE, generator=g)
        feats = model.model.get_image_features(
            pixel_values=pv[None], image_sizes=torch.tensor([[h, w]]),
            vision_feature_layer=-1, vision_feature_select_strategy="default").pooler_output[0]
        expected[f"pixels_{i}"] = pv.contiguous()
        expected[f"features_{i}"] = feats.float().contiguous()
        pixels.append(pv)
        sizes.append([h, w])
    img = model.config.image_token_index
    counts = [expected[f"features_{i}"].shape[0] for i in range(len(IMAGE_SIZES))]
    tokens = [5, 17, 3] + [img] * counts[0] + [40, 41, 9] + [img] * counts[1] + [12, 13, 14, 15]
    n_max = max(p.shape[0] for p in pixels)
    pv = torch.zeros(len(pixels), n_max, 3, SIZE, SIZE)
    for i, p in enumerate(pixels):
        pv[i, : p.shape[0]] = p
    out = model(input_ids=torch.tensor([tokens]), pixel_values=pv,
                image_sizes=torch.tensor(sizes), use_cache=False)
    expected["tokens"] = torch.tensor(tokens, dtype=torch.int32)
    expected["logits"] = out.logits[0].float().contiguous()
    meta = {"image_sizes": ";".join(f"{h},{w}" for h, w in sizes)}

    # Images from files: the processor's crops, checked against transformers', and a prompt
    # with two of them through the model.
    images_dir = os.path.join(base, "images")
    os.makedirs(images_dir)
    files = {}
    for k, (name, h, w, fmt) in enumerate(IMAGES):
        path = os.path.join(images_dir, f"{name}.{fmt}")
        Image.fromarray(test_image(h, w, k)).save(path, quality=90) if fmt == "jpg" else \
            Image.fromarray(test_image(h, w, k)).save(path)
        pic = Image.open(path).convert("RGB")
        ours = released_crops(pic, PINPOINTS, SIZE)
        theirs = transformers_crops([pic], PINPOINTS, SIZE)[0][: ours.shape[0]]
        assert np.abs(ours - theirs).max() == 0.0, name
        expected[f"processed_{name}"] = torch.from_numpy(ours).contiguous()
        files[name] = (pic, ours, [h, w])
    counts = []
    for name in ("a", "b"):
        _, crops, (h, w) = files[name]
        feats = model.model.get_image_features(
            pixel_values=torch.from_numpy(crops)[None], image_sizes=torch.tensor([[h, w]]),
            vision_feature_layer=-1, vision_feature_select_strategy="default").pooler_output[0]
        counts.append(feats.shape[0])
    tokens = [7, 8] + [img] * counts[0] + [30] + [img] * counts[1] + [31, 32, 33]
    n_max = max(files[n][1].shape[0] for n in ("a", "b"))
    pv = torch.zeros(2, n_max, 3, SIZE, SIZE)
    for i, n in enumerate(("a", "b")):
        pv[i, : files[n][1].shape[0]] = torch.from_numpy(files[n][1])
    out = model(input_ids=torch.tensor([tokens]), pixel_values=pv,
                image_sizes=torch.tensor([files["a"][2], files["b"][2]]), use_cache=False)
    expected["tokens_files"] = torch.tensor(tokens, dtype=torch.int32)
    expected["logits_files"] = out.logits[0].float().contiguous()
    save_file(expected, os.path.join(base, "expected.safetensors"), metadata=meta)
    print(json.dumps({"tokens": len(tokens), "image_features": counts,
                      "crops": [p.shape[0] for p in pixels]}))


if __name__ == "__main__":
    main()
