"""Overload gets 429 + Retry-After at once; a client that leaves (streaming or not) has its engine request
aborted and its KV blocks freed."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .conftest import MAX_ONGOING, MAX_QUEUED

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

LONG = 2000  # tokens: with ignore_eos the request runs for seconds unless aborted


def _long_body(model: str, stream: bool, i: int = 0) -> dict:
    return {"model": model, "prompt": f"long request {i}", "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def test_overload_gets_429_with_retry_after_quickly(serve_app):
    serve_app.wait_idle()
    before = serve_app.stats()
    total = MAX_ONGOING + MAX_QUEUED + 28
    results: list[tuple[int, float, dict | None, dict]] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        t0 = time.monotonic()
        async with client.stream("POST", "/v1/completions", json=_long_body(serve_app.model, True, i)) as r:
            body = None
            if r.status_code != 200:
                body = (await r.aread()) and r.json()
            results.append((r.status_code, time.monotonic() - t0, body, dict(r.headers)))
            if r.status_code == 200:
                await asyncio.sleep(3600)  # hold the stream open until cancelled

    async def main() -> dict:
        limits = httpx.Limits(max_connections=total + 8, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=serve_app.base_url, headers=serve_app.headers, timeout=60,
                                     limits=limits) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(total)]
            deadline = time.monotonic() + 20
            # Every request is either rejected at once or admitted (running or queued, i.e. no headers yet).
            while time.monotonic() < deadline and sum(1 for s, *_ in results if s == 429) < total - (
                    MAX_ONGOING + MAX_QUEUED):
                await asyncio.sleep(0.05)
            during = await asyncio.to_thread(serve_app.stats)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return during

    during = asyncio.run(main())
    rejected = [(dt, body, headers) for status, dt, body, headers in results if status == 429]
    assert {s for s, *_ in results} <= {200, 429}, results
    # Some admitted requests may finish while the burst arrives, freeing slots, but never more than a few.
    assert len(rejected) >= total - (MAX_ONGOING + MAX_QUEUED) - 4, (len(rejected), during)
    for dt, body, headers in rejected:
        assert headers.get("retry-after") == "2"
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "server_overloaded"
    # "At once" (a refusal never suspends) is Admission's unit test; here every refusal came within the burst's 20 s
    # window. Its latency is measured by bench/serve_abuse.py, not asserted: the shared 2-core machine is noisy.
    assert max(dt for dt, _, _ in rejected) < 20.0, sorted(dt for dt, _, _ in rejected)
    assert during["admission"]["ongoing"] <= MAX_ONGOING and during["admission"]["queued"] <= MAX_QUEUED
    assert during["engine"]["num_running"] + during["engine"]["num_waiting"] <= MAX_ONGOING
    # The cancelled streams and queued waiters all release their slots and blocks.
    after = serve_app.wait_idle()
    assert after["admission"]["rejected"] - before["admission"]["rejected"] == len(rejected)
    assert after["counters"]["requests_aborted"] > before["counters"]["requests_aborted"]


def test_openai_client_sees_rate_limit_error(serve_app):
    """Fill every slot with held streams, then one more request: RateLimitError from the openai client."""
    import openai

    serve_app.wait_idle()

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=serve_app.base_url, headers=serve_app.headers, timeout=60,
                                     limits=limits) as client:
            started = asyncio.Event()
            count = 0

            async def hold(i):
                nonlocal count
                async with client.stream("POST", "/v1/completions", json=_long_body(serve_app.model, True, i)):
                    count += 1
                    await asyncio.sleep(3600)

            tasks = [asyncio.create_task(hold(i)) for i in range(MAX_ONGOING + MAX_QUEUED)]
            for _ in range(400):
                s = await asyncio.to_thread(serve_app.stats)
                if s["admission"]["ongoing"] + s["admission"]["queued"] == MAX_ONGOING + MAX_QUEUED:
                    break
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            try:
                with pytest.raises(openai.RateLimitError) as e:
                    await asyncio.to_thread(serve_app.openai().completions.create, model=serve_app.model,
                                            prompt="one too many", max_tokens=4)
                assert time.monotonic() - t0 < 15.0  # refused, not queued until a held stream ends
                assert e.value.response.headers["retry-after"] == "2"
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    serve_app.wait_idle()


def test_disconnected_stream_is_aborted_and_blocks_freed(serve_app):
    before = serve_app.wait_idle()
    with serve_app.client() as c:
        with c.stream("POST", "/v1/completions", json=_long_body(serve_app.model, True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    got += 1
                if got >= 3:
                    break
            mid = serve_app.stats()
            assert mid["engine"]["num_running"] == 1
            assert mid["engine"]["kv_blocks_free"] < mid["engine"]["kv_blocks_total"]
        # leaving the `with` closes the connection mid-stream
    after = serve_app.wait_idle(timeout=10)  # raises if the engine is still busy after 10 s
    generated = after["engine"]["num_generated_tokens"] - before["engine"]["num_generated_tokens"]
    assert generated < LONG // 2, f"request kept generating after the client left ({generated} tokens)"
    assert after["counters"]["requests_aborted"] == before["counters"]["requests_aborted"] + 1
    assert after["engine"]["kv_blocks_free"] == after["engine"]["kv_blocks_total"]


def test_disconnected_non_streaming_request_is_aborted(serve_app):
    before = serve_app.wait_idle()
    with httpx.Client(base_url=serve_app.base_url, headers=serve_app.headers, timeout=0.25) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=_long_body(serve_app.model, False))
    after = serve_app.wait_idle(timeout=10)
    generated = after["engine"]["num_generated_tokens"] - before["engine"]["num_generated_tokens"]
    # A lone request decodes up to ~3k tokens/s here, so the whole request takes well under a second: what shows
    # the abort is that it stopped short of LONG and was counted as aborted, not as finished.
    assert generated < LONG, f"request kept generating after the client left ({generated} tokens)"
    assert after["counters"]["requests_aborted"] == before["counters"]["requests_aborted"] + 1
