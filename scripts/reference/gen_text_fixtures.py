#!/usr/bin/env python3
"""Generate the text fixture with Hugging Face transformers' tokenizer and chat templates.

Reads the tokenizer `ringbolt init-checkpoint` writes and records what transformers makes of it:
  tests/fixtures/reference/text/tokenizer.json, tokenizer_config.json   (copied)
  tests/fixtures/reference/text/expected.json
      encode:  [{text, ids, decoded}]            tokenizer(text, add_special_tokens=False)
      chat:    [{template, messages, add_generation_prompt, rendered, ids}]
               apply_chat_template with the checkpoint's template and with others

Usage: pip install transformers==5.23.0 jinja2
       target/debug/ringbolt init-checkpoint --out /tmp/tok
       python scripts/reference/gen_text_fixtures.py --checkpoint /tmp/tok --out tests/fixtures/reference/text
"""
import argparse
import json
import os
import shutil

from transformers import AutoTokenizer

# MiniMax-VL-01's template as its repository documents it (text parts only are used here).
VL01 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<beginning_of_sentence>system ai_setting=assistant\\n' }}"
    "{% for item in message['content'] %}{% if item.type == 'image' %}<image>{% elif item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}"
    "{{ '<end_of_sentence>\\n' }}{% endif %}{% if message['role'] == 'assistant' %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}"
    "{% for item in message['content'] %}{% if item.type == 'image' %}<image>{% elif item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}"
    "{{ '<end_of_sentence>\\n' }}{% endif %}{% if message['role'] == 'user' %}{{ '<beginning_of_sentence>user name=user\\n' }}"
    "{% for item in message['content'] %}{% if item.type == 'image' %}<image>{% elif item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}"
    "{{ '<end_of_sentence>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}"
    "{% generation %}{% endgeneration %}{% endif %}"
)

# A ChatML-style template over string contents, with whitespace control and Python methods.
CHATML = (
    "{%- for message in messages %}\n"
    "    {%- if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}\n"
    "    <|im_start|>{{ message['role'] }}\n{{ message['content'].strip() }}<|im_end|>\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant created by MiniMax based on MiniMax-Text-01 model."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "  And of Germany? Über-quick, s'il vous plaît \U0001F680  "},
    ],
]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京 🚀\n\tdef f(x):\n        return x * 2",
    "<beginning_of_sentence>user name=user\nhi<end_of_sentence>\n",
    "",
]


def parts(messages):
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(a.checkpoint, f), os.path.join(a.out, f))
    tok = AutoTokenizer.from_pretrained(a.out)
    encode = []
    for t in TEXTS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        encode.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    chat = []
    for name, template, form in (("checkpoint", None, parts), ("minimax-vl-01", VL01, parts), ("chatml", CHATML, list)):
        for conv in CONVERSATIONS:
            for gen in (True, False):
                rendered = tok.apply_chat_template(form(conv), chat_template=template, tokenize=False, add_generation_prompt=gen)
                ids = tok(rendered, add_special_tokens=False)["input_ids"]
                chat.append({
                    "template": name if template is None else template,
                    "messages": conv,
                    "add_generation_prompt": gen,
                    "rendered": rendered,
                    "ids": ids,
                })
    with open(os.path.join(a.out, "expected.json"), "w") as f:
        json.dump({"encode": encode, "chat": chat}, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
