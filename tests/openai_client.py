#!/usr/bin/env python3
"""Drives Ringbolt's HTTP API with the official `openai` package (tests/standalone.rs runs it).

Checks what a client sees, and prints one JSON line per job it made, for the Rust side to check
against the gRPC API (same tokens for the same prompt and seed) and the tokenizer:
  {"check": NAME, "id": JOB_ID, "text": TEXT, "request": {...}}

Usage: PYTHONPATH=target/py/openai python3 tests/openai_client.py BASE_URL MODEL TOKEN
"""
import json
import sys
import time
import urllib.error
import urllib.request

import openai

BASE, MODEL, TOKEN = sys.argv[1], sys.argv[2], sys.argv[3]
ROOT = BASE.removesuffix("/v1")
client = openai.OpenAI(base_url=BASE, api_key=TOKEN, max_retries=0, timeout=120)


def report(check, id, text, **request):
    print(json.dumps({"check": check, "id": id, "text": text, "request": request}), flush=True)


def job_id(openai_id):
    # cmpl-<job>, chatcmpl-<job>, or the job id itself.
    return openai_id.split("-", 1)[1] if openai_id.startswith(("cmpl-", "chatcmpl-")) else openai_id


def raw(method, path, body=None, token=TOKEN, data=None):
    """A request as bytes, for what the openai package would never send."""
    if data is None and body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(ROOT + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def expect_error(status, fn, needle):
    try:
        fn()
    except openai.APIStatusError as e:
        assert e.status_code == status, (status, e.status_code, e.message)
        assert needle in e.message, (needle, e.message)
        body = e.body if isinstance(e.body, dict) else {}
        assert {"message", "type"} <= set(body), e.body
        return
    raise AssertionError(f"expected HTTP {status} ({needle})")


def expect_raw_error(status, needle, *args, **kw):
    code, body = raw(*args, **kw)
    assert code == status, (code, body)
    err = body["error"]
    assert needle in err["message"], (needle, err)
    assert err["type"] and "param" in err and "code" in err, err


# Models and health.
models = client.models.list()
assert [m.id for m in models.data] == [MODEL], models
status, body = raw("GET", "/health", token=None)
assert status == 200 and body == {"status": "ok"}, (status, body)

# Completions: whole and streamed give the same text and usage.
PROMPT = "The lighthouse keeper climbed the stairs"
kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, seed=5)
whole = client.completions.create(**kw)
choice = whole.choices[0]
assert choice.finish_reason in ("length", "stop"), choice
assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 3, whole.usage
assert whole.usage.prompt_tokens_details.cached_tokens == 0
assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
report("completion", job_id(whole.id), choice.text, prompt=PROMPT, max_tokens=12, temperature=0, seed=5)
chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
streamed = "".join(c.choices[0].text for c in chunks if c.choices)
assert streamed == choice.text, (streamed, choice.text)
assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

# A prompt of token ids.
ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=4, temperature=0)
assert ids.usage.prompt_tokens == 4
report("ids", job_id(ids.id), ids.choices[0].text, prompt=[5, 6, 7, 8], max_tokens=4, temperature=0, seed=None)

# Sampling with a seed is reproducible, and equals the gRPC API's (checked by the caller).
kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.8, seed=11)
a = client.completions.create(**kw)
b = client.completions.create(**kw)
assert a.choices[0].text == b.choices[0].text
report("sampled", job_id(a.id), a.choices[0].text, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.8, seed=11)

# Stop sequences: the text ends before the first one, as a stop.
long = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=1, seed=3, extra_body={"ignore_eos": True})
text = long.choices[0].text
stop = next(text[i:i + 2] for i in range(len(text) // 3, len(text) - 1) if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=1, seed=3, stop=[stop], extra_body={"ignore_eos": True})
assert cut.choices[0].text == text[: text.index(stop)], (cut.choices[0].text, text, stop)
assert cut.choices[0].finish_reason == "stop"
assert cut.usage.completion_tokens < 40
streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=1, seed=3, stop=stop, stream=True, extra_body={"ignore_eos": True}))
assert streamed == cut.choices[0].text, (streamed, cut.choices[0].text)
report("stop", job_id(cut.id), cut.choices[0].text, prompt=PROMPT, max_tokens=40, temperature=1, seed=3, stop=stop)

# Chat: whole and streamed.
messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is two plus two?"}]
chat = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, seed=2)
msg = chat.choices[0].message
assert msg.role == "assistant" and chat.object == "chat.completion"
assert chat.choices[0].finish_reason in ("length", "stop")
report("chat", job_id(chat.id), msg.content, messages=messages, max_tokens=10, temperature=0, seed=2)
stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, seed=2, stream=True)
parts = [c.choices[0].delta for c in stream]
assert parts[0].role == "assistant"
assert "".join(p.content or "" for p in parts) == msg.content

# Responses, background: start, poll, stream, resume.
r = client.responses.create(model=MODEL, input="Write a haiku about the sea.", background=True, max_output_tokens=24, temperature=0)
assert r.status in ("queued", "in_progress"), r.status
while r.status in ("queued", "in_progress"):
    time.sleep(0.1)
    r = client.responses.retrieve(r.id)
assert r.status == "completed", r
assert r.usage.output_tokens > 0
report("response", r.id, r.output_text, input="Write a haiku about the sea.", max_tokens=24, temperature=0, seed=None)
events = list(client.responses.retrieve(r.id, stream=True))
assert [e.sequence_number for e in events] == list(range(len(events)))
assert events[0].type == "response.created" and events[-1].type == "response.completed"
deltas = [e for e in events if e.type == "response.output_text.delta"]
assert "".join(e.delta for e in deltas) == r.output_text
assert events[-1].response.output_text == r.output_text
after = deltas[1].sequence_number
resumed = list(client.responses.retrieve(r.id, stream=True, starting_after=after))
assert [e.sequence_number for e in resumed] == list(range(after + 1, len(events)))
assert [e.model_dump() for e in resumed] == [e.model_dump() for e in events[after + 1:]]

# Responses, streamed at once (the same job is then visible by id).
live = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": "Hello!"}], stream=True, max_output_tokens=8, temperature=0))
done = live[-1].response
assert done.status == "completed" and client.responses.retrieve(done.id).output_text == done.output_text

# Cancel a long background job.
long = client.responses.create(model=MODEL, input="Tell me a long story.", background=True, max_output_tokens=4000, temperature=0, extra_body={"ignore_eos": True})
cancelled = client.responses.cancel(long.id)
assert cancelled.status == "cancelled", cancelled.status
assert client.responses.retrieve(long.id).status == "cancelled"

# Bad requests: the right status, OpenAI's error shape, and the server keeps serving.
expect_error(400, lambda: client.completions.create(model=MODEL, prompt="a", max_tokens=0), "max_tokens")
expect_error(400, lambda: client.completions.create(model=MODEL, prompt="a", max_tokens=100000), "max_tokens")
expect_error(404, lambda: client.completions.create(model="no-such-model", prompt="a"), "no-such-model")
expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=[]), "empty")
expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "not fetched")
expect_error(400, lambda: client.completions.create(model=MODEL, prompt=[1, 10 ** 9]), "vocabulary")
expect_error(404, lambda: client.responses.retrieve("resp_nope"), "resp_nope")
expect_error(401, lambda: openai.OpenAI(base_url=BASE, api_key="wrong", max_retries=0).models.list(), "token")
expect_raw_error(401, "token", "GET", "/v1/models", token=None)
expect_raw_error(400, "not valid JSON", "POST", "/v1/completions", data=b'{"prompt": ')
expect_raw_error(400, "`max_tokens` must be an integer", "POST", "/v1/completions", {"prompt": "a", "max_tokens": "ten"})
expect_raw_error(400, "`temperature` must be a number", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "temperature": "hot"})
expect_raw_error(400, "`prompt` is required", "POST", "/v1/completions", {"model": MODEL, "unknown_field": 1})
expect_raw_error(413, "larger than this server accepts", "POST", "/v1/completions", {"prompt": "x" * 200_000})
expect_raw_error(404, "no route", "GET", "/v1/engines")
expect_raw_error(400, "takes no `stop`", "POST", "/v1/responses", {"input": "a", "stop": ["x"]})

# Admission: one job at a time here; a second while one runs gets 429.
busy = client.responses.create(model=MODEL, input="Another long story.", background=True, max_output_tokens=4000, temperature=0, extra_body={"ignore_eos": True})
expect_error(429, lambda: client.completions.create(model=MODEL, prompt="a", max_tokens=2), "")
client.responses.cancel(busy.id)

# Still serving.
again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, seed=5)
assert again.choices[0].text == choice.text
print(json.dumps({"check": "done"}), flush=True)
