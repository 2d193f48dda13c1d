#!/usr/bin/env python3
"""Sends images to Ringbolt's HTTP API with the official `openai` package, as `data:` URLs in
chat content parts (tests/standalone.rs runs it on a MiniMax-VL-01 checkpoint).

Prints one JSON line: {"id": JOB_ID, "text": TEXT, "prompt_tokens": N}.

Usage: PYTHONPATH=target/py/openai python3 tests/openai_images.py BASE_URL MODEL IMAGE1 IMAGE2
"""
import base64
import json
import sys

import openai

BASE, MODEL, IMAGES = sys.argv[1], sys.argv[2], sys.argv[3:5]
client = openai.OpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=120)


def data_url(path):
    kind = "png" if path.endswith(".png") else "jpeg"
    with open(path, "rb") as f:
        return f"data:image/{kind};base64," + base64.b64encode(f.read()).decode()


def part(path):
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


content = [{"type": "text", "text": "look"}, part(IMAGES[0]), {"type": "text", "text": "and"},
           part(IMAGES[1])]
r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0,
    extra_body={"ignore_eos": True})

# An image by address is refused (Ringbolt never fetches), and so is a corrupt one.
for url, needle in [("https://example.com/a.png", "not fetched"),
                    ("data:image/png;base64,aGVsbG8=", "PNG or JPEG")]:
    try:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
        sys.exit(f"{url} was accepted")
    except openai.BadRequestError as e:
        assert needle in str(e), str(e)

print(json.dumps({"id": r.id.split("-", 1)[1], "text": r.choices[0].message.content,
                  "prompt_tokens": r.usage.prompt_tokens}), flush=True)
