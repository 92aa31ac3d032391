"""The endpoint through the official `openai` client: completions and chat, streaming and not, against the
offline engine's greedy output."""

from __future__ import annotations

import asyncio

import pytest

from glm4 import SamplingParams
from pipeline.serve.protocol import (ChatCompletionChunk, ChatCompletionResponse, CompletionChunk,
                                     CompletionResponse, ModelList)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def _greedy(reference_llm, prompt, max_tokens):
    return reference_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))[0]


def _greedy_chat(reference_llm, messages, max_tokens):
    return reference_llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))[0]


def test_models_and_health(serve_app):
    client = serve_app.openai()
    models = client.models.list()
    assert [m.id for m in models.data] == [serve_app.model]
    with serve_app.client() as c:
        ModelList.model_validate(c.get("/v1/models").json())
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_greedy_equals_offline_engine(serve_app, reference_llm):
    ref = _greedy(reference_llm, PROMPT, 16)
    resp = serve_app.openai().completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=16,
                                                 temperature=0)
    CompletionResponse.model_validate(resp.model_dump())
    assert resp.id.startswith("cmpl-") and resp.created > 0 and resp.object == "text_completion"
    assert resp.choices[0].text == ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_greedy_equals_offline_engine(serve_app, reference_llm):
    ref = _greedy_chat(reference_llm, MESSAGES, 12)
    resp = serve_app.openai().chat.completions.create(model=serve_app.model, messages=MESSAGES, max_tokens=12,
                                                      temperature=0)
    ChatCompletionResponse.model_validate(resp.model_dump())
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.token_ids)


def test_completion_stream_concatenates_to_full_text(serve_app):
    client = serve_app.openai()
    full = client.completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    for ch in chunks:
        CompletionChunk.model_validate(ch.model_dump())
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2, "the text must arrive in several events"
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_concatenates_to_full_text(serve_app):
    client = serve_app.openai()
    full = client.chat.completions.create(model=serve_app.model, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=serve_app.model, messages=MESSAGES, max_tokens=20,
                                                 temperature=0, stream=True))
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch.model_dump())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_raw_sse_framing(serve_app):
    body = {"model": serve_app.model, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with serve_app.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_n_seed_and_multiple_prompts(serve_app):
    client = serve_app.openai()
    kw = dict(model=serve_app.model, max_tokens=8, temperature=1.0, seed=1234, n=2)
    a = client.completions.create(prompt=["first prompt", "second prompt"], **kw)
    b = client.completions.create(prompt=["first prompt", "second prompt"], **kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices], "same seed, same samples"
    assert a.usage.completion_tokens == sum(8 if c.finish_reason == "length" else 0 for c in a.choices) or \
        a.usage.completion_tokens > 0
    # streaming n=2 chat: both indices arrive and finish
    chunks = list(client.chat.completions.create(model=serve_app.model, messages=MESSAGES, max_tokens=6, n=2,
                                                 seed=7, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_token_id_prompts_and_extensions(serve_app, reference_llm):
    ids = reference_llm.tokenizer.encode_prompt(PROMPT)
    client = serve_app.openai()
    by_ids = client.completions.create(model=serve_app.model, prompt=ids, max_tokens=10, temperature=0)
    by_text = client.completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    # vLLM-style extensions through extra_body: top_k, min_tokens, ignore_eos
    r = client.completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=12, temperature=0.8,
                                  extra_body={"top_k": 5, "min_tokens": 12, "ignore_eos": True,
                                              "repetition_penalty": 1.1},
                                  presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9, user="u-1")
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_stop_string(serve_app):
    client = serve_app.openai()
    full = client.completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    candidates = [full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2]]
    if not candidates:
        pytest.skip("greedy text has no clean 2-character window")
    stop = candidates[0]
    expected = full[:full.find(stop)]
    r = client.completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                         stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_logprobs(serve_app):
    client = serve_app.openai()
    r = client.completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert tok_lp <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(tok_lp, abs=1e-5)  # greedy: the chosen token is the top one
    c = client.chat.completions.create(model=serve_app.model, messages=MESSAGES, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
        assert isinstance(item.bytes, list)
    chunks = list(client.chat.completions.create(model=serve_app.model, messages=MESSAGES, max_tokens=5,
                                                 temperature=0, logprobs=True, top_logprobs=1, stream=True))
    streamed = [i for ch in chunks if ch.choices and ch.choices[0].logprobs for i in ch.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in content]


def test_32_concurrent_streams_all_complete(serve_app, reference_llm):
    prompts = [f"Request number {i}: tell me something" for i in range(32)]
    refs = reference_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))

    async def one(client, prompt):
        stream = await client.completions.create(model=serve_app.model, prompt=prompt, max_tokens=12,
                                                 temperature=0, stream=True)
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        client = serve_app.async_openai()
        try:
            return await asyncio.gather(*(one(client, p) for p in prompts))
        finally:
            await client.close()

    before = serve_app.wait_idle()
    results = asyncio.run(main())
    assert [t for t, _ in results] == [r.text for r in refs]
    assert [f for _, f in results] == [r.finish_reason for r in refs]
    after = serve_app.wait_idle()
    assert after["admission"]["rejected"] == before["admission"]["rejected"], "32 streams fit ongoing + queued"


def test_prometheus_metrics_exported(serve_app):
    """Requests, TTFT, tokens, queue depth and KV-cache use reach Ray's Prometheus endpoint."""
    import time

    import httpx
    import ray

    port = getattr(ray._private.worker._global_node, "metrics_export_port", None)
    if not port:
        pytest.skip("this Ray node exports no metrics")
    serve_app.openai().completions.create(model=serve_app.model, prompt=PROMPT, max_tokens=4)
    wanted = ["ray_glm4_requests_total", "ray_glm4_time_to_first_token_seconds_bucket",
              "ray_glm4_output_tokens_total", "ray_glm4_queued_requests", "ray_glm4_kv_cache_usage",
              "ray_glm4_engine_num_running", "ray_glm4_request_output_tokens_per_second_bucket"]
    deadline = time.monotonic() + 60
    missing = wanted
    while missing and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [m for m in wanted if m + "{" not in text]
        time.sleep(1)
    assert not missing, f"not exported: {missing}"
