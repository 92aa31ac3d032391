"""Load and abuse of the Serve endpoint, bounded in time and count, aimed only at 127.0.0.1.

    .venv/bin/python bench/serve_abuse.py [--scale 1.0] [--fuzz-examples 300]

Starts a private local Ray cluster and the OpenAI app on the tiny generated checkpoint (small admission limits so
"far over capacity" is cheap to reach), then runs each section and prints ONE table: requests sent, answered by
class (2xx / 4xx / 429 / 5xx / no answer), and resources leaked afterwards (admission slots, engine sequences,
KV blocks, open streams; from GET /admin/stats). The same functions are used by tests/reliability with smaller
counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

LOOPBACK = "127.0.0.1"


def _check_loopback(base_url: str) -> None:
    host = httpx.URL(base_url).host
    if host not in (LOOPBACK, "localhost"):
        raise SystemExit(f"refusing to aim load at {host}: this tool only targets 127.0.0.1")


def status_class(code: int | None) -> str:
    if code is None:
        return "none"
    if code == 429:
        return "429"
    return f"{code // 100}xx"


@dataclass
class Section:
    name: str
    sent: int = 0
    classes: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    leaked: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    bad: list[str] = field(default_factory=list)  # unexpected answers (5xx, malformed error bodies)

    def record(self, code: int | None, what: str = "") -> None:
        self.sent += 1
        self.classes[status_class(code)] += 1
        if code is not None and code >= 500:
            self.bad.append(f"{code} for {what[:200]}")

    def row(self) -> dict[str, Any]:
        return {"section": self.name, "sent": self.sent, "2xx": self.classes["2xx"], "4xx": self.classes["4xx"],
                "429": self.classes["429"], "5xx": self.classes["5xx"], "no answer": self.classes["none"],
                "leaked": ", ".join(f"{k}={v}" for k, v in self.leaked.items() if v) or "none",
                "s": round(self.seconds, 1), "notes": "; ".join(self.notes)}


class Target:
    def __init__(self, base_url: str, model: str, api_key: str | None):
        _check_loopback(base_url)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        url = httpx.URL(self.base_url)
        self.host, self.port = url.host, url.port
        self.path_prefix = url.path.rstrip("/")

    def client(self, **kw) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=kw.pop("max_connections", 512), max_keepalive_connections=0)
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=kw.pop("timeout", 60),
                                 limits=limits, **kw)

    def stats(self) -> dict:
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30) as c:
            r = c.get("/admin/stats")
            r.raise_for_status()
            return r.json()

    def leaks(self, timeout: float = 20.0) -> dict[str, int]:
        """What is still held once everything should have drained (waits up to `timeout` for it to drain)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            e, a = s["engine"], s["admission"]
            held = {"admission_slots": a["ongoing"], "queued": a["queued"], "engine_seqs": e["num_running"]
                    + e["num_waiting"], "kv_blocks": e["kv_blocks_total"] - e["kv_blocks_free"],
                    "streams": e.get("num_streams", 0)}
            if not any(held.values()) or time.monotonic() > deadline:
                return held
            time.sleep(0.1)

    def body(self, **kw) -> dict:
        return {"model": self.model, "prompt": "hello", "max_tokens": 4, "temperature": 0, **kw}


# --------------------------------------------------------------------------------------------------- sections
async def burst(t: Target, n: int, hold_tokens: int, recover_within_s: float = 30.0) -> Section:
    """n streaming requests at once, each asking for hold_tokens tokens (ignore_eos: they hold their slot).
    Expect: admitted ones 200, the rest 429 fast, no 5xx; afterwards a plain request succeeds again."""
    sec = Section("burst far over capacity")
    t0 = time.monotonic()
    lat429: list[float] = []

    async def one(c: httpx.AsyncClient, i: int) -> None:
        s0 = time.monotonic()
        try:
            async with c.stream("POST", "/v1/completions",
                                json=t.body(prompt=f"burst {i}", max_tokens=hold_tokens, ignore_eos=True,
                                            stream=True)) as r:
                sec.record(r.status_code, "burst")
                if r.status_code == 429:
                    lat429.append(time.monotonic() - s0)
                    await r.aread()
                    return
                async for _ in r.aiter_raw():  # consume the stream (slowly enough: the engine is busy)
                    pass
        except httpx.HTTPError:
            sec.record(None)

    async with t.client(timeout=120) as c:
        tasks = [asyncio.create_task(one(c, i)) for i in range(n)]
        # Every request past the admitted ones (capacity = running + queued slots) must be answered at once.
        stats = await asyncio.to_thread(t.stats)
        capacity = stats["admission"]["max_ongoing_requests"] + stats["admission"]["max_queued_requests"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(sec.classes.values()) < n - capacity:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        for task in tasks:  # the admitted streams are cut: the burst is over
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Requests that neither got an answer nor were cut count as "no answer" via record(None) above; cancelled
    # ones that had their 200 headers were already recorded.
    sec.sent = max(sec.sent, n)
    sec.classes["none"] += n - sum(sec.classes.values())  # still queued when the burst was called off
    if lat429:
        lat429.sort()
        sec.notes.append(f"429 latency p50 {statistics.median(lat429) * 1000:.0f} ms, max {lat429[-1] * 1000:.0f} ms")
    # Recovery: the next plain request is answered 200.
    r0 = time.monotonic()
    ok = False
    async with t.client(timeout=30) as c:
        while time.monotonic() - r0 < recover_within_s:
            r = await c.post("/v1/completions", json=t.body(prompt="after the burst"))
            sec.record(r.status_code, "recovery")
            if r.status_code == 200:
                ok = True
                break
            await asyncio.sleep(0.2)
    sec.notes.append(f"recovered in {time.monotonic() - r0:.1f}s" if ok else "NOT recovered")
    sec.leaked = t.leaks()
    sec.seconds = time.monotonic() - t0
    sec.lat429 = lat429  # type: ignore[attr-defined]
    sec.recovered = ok  # type: ignore[attr-defined]
    return sec


async def disconnects(t: Target, n: int, concurrency: int, hold_tokens: int) -> Section:
    """Clients that read a few SSE events and hang up (half streaming completions, half chat)."""
    sec = Section("disconnect mid-stream")
    t0 = time.monotonic()
    sem = asyncio.Semaphore(concurrency)

    async def one(c: httpx.AsyncClient, i: int) -> None:
        async with sem:
            chat = i % 2 == 1
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body = t.body(prompt=f"leave {i}", max_tokens=hold_tokens, ignore_eos=True, stream=True)
            if chat:
                body.pop("prompt")
                body["messages"] = [{"role": "user", "content": f"leave {i}"}]
            try:
                async with c.stream("POST", path, json=body) as r:
                    sec.record(r.status_code, path)
                    if r.status_code != 200:
                        await r.aread()
                        return
                    events = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events += 1
                        if events >= 1 + i % 3:
                            break  # leaving the `async with` closes the connection mid-stream
            except httpx.HTTPError:
                sec.record(None)

    async with t.client(timeout=60) as c:
        await asyncio.gather(*(one(c, i) for i in range(n)))
    sec.leaked = t.leaks()
    sec.seconds = time.monotonic() - t0
    return sec


async def slow_clients(t: Target, n_readers: int, n_trickle: int, duration_s: float) -> Section:
    """Slow readers (a stream read one chunk per second) and slowloris writers (a body trickled one byte per
    second) while normal requests keep arriving: the normal ones must be served as usual."""
    sec = Section("slow clients")
    t0 = time.monotonic()
    stop = asyncio.Event()

    async def reader(c: httpx.AsyncClient, i: int) -> None:
        try:
            async with c.stream("POST", "/v1/completions",
                                json=t.body(prompt=f"slow {i}", max_tokens=24, ignore_eos=True, stream=True)) as r:
                sec.record(r.status_code, "slow reader")
                async for _ in r.aiter_raw(16):
                    if stop.is_set():
                        break
                    await asyncio.sleep(1.0)
        except httpx.HTTPError:
            sec.record(None)

    async def trickle(i: int) -> None:
        body = json.dumps(t.body(prompt=f"trickle {i}")).encode()
        head = (f"POST {t.path_prefix}/v1/completions HTTP/1.1\r\nHost: {t.host}:{t.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in t.headers.items()) + "\r\n").encode()
        try:
            reader_, writer = await asyncio.open_connection(t.host, t.port)
        except OSError:
            sec.record(None)
            return
        code = None
        try:
            writer.write(head)
            await writer.drain()
            for b in body:
                if stop.is_set():
                    break
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(1.0)
            else:
                line = await asyncio.wait_for(reader_.readline(), 30)
                code = int(line.split()[1]) if line else None
        except (OSError, asyncio.TimeoutError, ValueError, IndexError):
            pass
        finally:
            writer.close()
        # an unfinished trickle is the client's choice: count it as sent with no answer
        sec.record(code, "trickle")

    normal_lat: list[float] = []

    async def normal(c: httpx.AsyncClient) -> None:
        while not stop.is_set():
            s0 = time.monotonic()
            r = await c.post("/v1/completions", json=t.body(prompt="normal", max_tokens=4))
            sec.record(r.status_code, "normal during slow clients")
            if r.status_code == 200:
                normal_lat.append(time.monotonic() - s0)
            await asyncio.sleep(0.2)

    async with t.client(timeout=60) as c:
        tasks = [asyncio.create_task(reader(c, i)) for i in range(n_readers)]
        tasks += [asyncio.create_task(trickle(i)) for i in range(n_trickle)]
        tasks.append(asyncio.create_task(normal(c)))
        await asyncio.sleep(duration_s)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    if normal_lat:
        sec.notes.append(f"normal requests during it: {len(normal_lat)} ok, p50 "
                         f"{statistics.median(normal_lat) * 1000:.0f} ms, max {max(normal_lat) * 1000:.0f} ms")
    sec.normal_lat = normal_lat  # type: ignore[attr-defined]
    sec.leaked = t.leaks()
    sec.seconds = time.monotonic() - t0
    return sec


def hostile_bodies(t: Target, max_request_bytes: int, max_model_len: int) -> list[tuple[str, str, bytes, set[int]]]:
    """(name, path, raw body, acceptable status codes)."""
    C, CH = "/v1/completions", "/v1/chat/completions"
    ok = t.body()
    deep = min(100_000, max_request_bytes // 2 - 64)  # under the body limit: the nesting is what is tested
    return [
        ("body over the limit", C, json.dumps(t.body(prompt="x" * (max_request_bytes + 10))).encode(), {413}),
        ("prompt over the context (text)", C, json.dumps(t.body(prompt="word " * (4 * max_model_len))).encode(),
         {400}),
        ("prompt over the context (ids)", C, json.dumps(t.body(prompt=[5] * (4 * max_model_len))).encode(), {400}),
        ("many prompts in one request", C, json.dumps(t.body(prompt=["p"] * 2000, n=16)).encode(), {400}),
        ("many messages", CH, json.dumps({"model": t.model, "max_tokens": 2, "messages": [
            {"role": "user", "content": "m"}] * 5000}).encode(), {400}),
        ("deeply nested array body", C, b"[" * deep + b"]" * deep, {400}),
        ("deeply nested object body", C, b'{"a":' * (deep // 3) + b"1" + b"}" * (deep // 3), {400}),
        ("deeply nested prompt", C, b'{"model":"%s","prompt":' % t.model.encode() + b"[" * deep + b"]" * deep
         + b"}", {400}),
        ("non-UTF-8 body", C, b'{"model":"' + t.model.encode() + b'","prompt":"\xff\xfe\xc3\x28"}', {400}),
        ("latin-1 body", C, json.dumps(t.body(prompt="caf\u00e9"), ensure_ascii=False).encode("latin-1"), {400}),
        ("UTF-16 body", C, json.dumps(t.body()).encode("utf-16"), {400}),
        ("lone surrogate in prompt", C, b'{"model":"' + t.model.encode() + b'","prompt":"a\\ud800b","max_tokens":2}',
         {200, 400}),
        ("lone surrogate in chat", CH, b'{"model":"' + t.model.encode()
         + b'","max_tokens":2,"messages":[{"role":"user","content":"\\udfff"}]}', {200, 400}),
        ("NUL bytes in prompt", C, json.dumps(t.body(prompt="a\u0000b", max_tokens=2)).encode(), {200, 400}),
        ("NaN temperature", C, json.dumps({**ok, "temperature": float("nan")}).encode(), {400}),
        ("Infinity top_p", C, json.dumps({**ok, "top_p": float("inf")}).encode(), {400}),
        ("huge integer max_tokens", C, b'{"model":"' + t.model.encode() + b'","prompt":"x","max_tokens":'
         + b"9" * 5000 + b"}", {400}),
        ("huge float seed", C, json.dumps({**ok, "seed": 1e308}).encode(), {400}),
        ("huge token id", C, json.dumps(t.body(prompt=[2**70])).encode(), {400}),
        ("duplicate keys", C, b'{"model":"x","model":"' + t.model.encode() + b'","prompt":"a","max_tokens":2}',
         {200, 400}),
        ("stop list over the cap", C, json.dumps({**ok, "stop": ["s"] * 10_000}).encode(), {400}),
        ("very long stop string", C, json.dumps({**ok, "stop": "s" * 100_000}).encode(), {200, 400}),
        ("stop_token_ids huge list", C, json.dumps({**ok, "stop_token_ids": list(range(20_000))}).encode(),
         {200, 400}),
        ("huge user field", C, json.dumps({**ok, "user": "u" * 100_000}).encode(), {400}),
        ("content-type text/plain", C, json.dumps(ok).encode(), {200, 400, 415}),
    ]


async def hostile(t: Target, max_request_bytes: int, max_model_len: int) -> Section:
    sec = Section("oversized / hostile JSON")
    t0 = time.monotonic()
    async with t.client(timeout=60) as c:
        for name, path, raw, expected in hostile_bodies(t, max_request_bytes, max_model_len):
            ctype = "text/plain" if "text/plain" in name else "application/json"
            try:
                r = await c.post(path, content=raw, headers={"content-type": ctype})
                code = r.status_code
            except httpx.HTTPError as e:
                code = None
                sec.notes.append(f"{name}: no answer ({type(e).__name__})")
            sec.record(code, name)
            if code not in expected:
                sec.bad.append(f"{name}: {code} (expected {sorted(expected)})")
            elif code is not None and code >= 400:
                try:
                    err = r.json()["error"]
                    assert err["message"] and err["type"]
                except Exception:  # noqa: BLE001
                    sec.bad.append(f"{name}: {code} without OpenAI's error body: {r.text[:120]!r}")
        # a Content-Length that lies (announces more than the limit): refused before the body is read
        reader, writer = await asyncio.open_connection(t.host, t.port)
        writer.write((f"POST {t.path_prefix}/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      f"\r\nContent-Length: {10 * max_request_bytes}\r\n"
                      + "".join(f"{k}: {v}\r\n" for k, v in t.headers.items()) + "\r\n{").encode())
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), 15)
            code = int(line.split()[1])
        except (asyncio.TimeoutError, ValueError, IndexError):
            code = None
        writer.close()
        sec.record(code, "lying content-length")
        if code != 413:
            sec.bad.append(f"lying content-length: {code} (expected 413 before the body arrives)")
    sec.leaked = t.leaks()
    sec.seconds = time.monotonic() - t0
    return sec


def fuzz(t: Target, max_examples: int, seed: int = 0) -> Section:
    """Hypothesis over the request fields: any JSON value in any field, plus near-valid values. Never a 5xx."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from hypothesis import seed as hseed

    sec = Section("hypothesis fuzz of request fields")
    t0 = time.monotonic()
    json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                            st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
    json_any = st.recursive(json_scalar, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                                st.dictionaries(st.text(max_size=8), kids,
                                                                                max_size=4)), max_leaves=12)
    near = {
        "model": st.one_of(st.just(t.model), st.text(max_size=20)),
        "prompt": st.one_of(st.text(max_size=60), st.lists(st.text(max_size=10), min_size=0, max_size=3),
                            st.lists(st.integers(-5, 200_000), max_size=12),
                            st.lists(st.lists(st.integers(-5, 300), max_size=4), max_size=3)),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(
            ["system", "user", "assistant", "observation", "tool", "developer", "x"]),
            "content": st.one_of(st.text(max_size=30), st.none(), st.lists(st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}), max_size=2))}),
            max_size=3),
        "max_tokens": st.one_of(st.integers(-3, 64), st.none()),
        "max_completion_tokens": st.integers(-3, 64),
        "temperature": st.one_of(st.floats(-1, 3), st.none()),
        "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-3, 300), "min_p": st.floats(-0.5, 1.5),
        "n": st.integers(-1, 20), "seed": st.integers(-2**64, 2**65),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=4), max_size=20)),
        "stop_token_ids": st.lists(st.integers(-3, 200_000), max_size=5),
        "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
        "repetition_penalty": st.floats(-1, 12), "min_tokens": st.integers(-2, 80),
        "logprobs": st.one_of(st.integers(-2, 30), st.booleans()), "top_logprobs": st.integers(-2, 30),
        "stream": st.booleans(), "stream_options": st.one_of(st.none(), st.fixed_dictionaries(
            {"include_usage": st.booleans()})),
        "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(), "echo": st.booleans(),
        "user": st.text(max_size=20), "logit_bias": st.dictionaries(st.text(max_size=3), st.floats(-5, 5),
                                                                    max_size=2),
        "best_of": st.integers(-1, 20), "suffix": st.text(max_size=5), "response_format": json_any,
        "tools": json_any, "tool_choice": json_any,
    }
    field_value = st.sampled_from(sorted(near)).flatmap(
        lambda k: st.tuples(st.just(k), st.one_of(near[k], json_any)))
    request = st.tuples(st.booleans(), st.lists(field_value, max_size=10))
    client = httpx.Client(base_url=t.base_url, headers=t.headers, timeout=60)

    @hseed(seed)
    @settings(max_examples=max_examples, deadline=None, derandomize=False, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request)
    def run(req) -> None:
        chat, fields = req
        body: dict[str, Any] = {"model": t.model, "max_tokens": 4}
        body["messages" if chat else "prompt"] = [{"role": "user", "content": "hi"}] if chat else "hi"
        body.update(dict(fields))
        path = "/v1/chat/completions" if chat else "/v1/completions"
        raw = json.dumps(body, allow_nan=False).encode()
        try:
            if body.get("stream") is True:
                with client.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
                    text = r.read().decode("utf-8", "replace")
                    code = r.status_code
                    if code == 200 and "server_error" in text:
                        sec.bad.append(f"stream error event for {raw[:300]!r}: {text[-300:]}")
            else:
                r = client.post(path, content=raw, headers={"content-type": "application/json"})
                code = r.status_code
        except httpx.HTTPError:
            code = None
        sec.record(code, raw.decode()[:300])
        if code is not None and 400 <= code < 500 and code != 429:
            try:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            except Exception:  # noqa: BLE001
                sec.bad.append(f"{code} without OpenAI's error body for {raw[:200]!r}")

    try:
        run()
    finally:
        client.close()
    sec.leaked = t.leaks()
    sec.seconds = time.monotonic() - t0
    return sec


# --------------------------------------------------------------------------------------------------- table
def print_table(sections: list[Section]) -> str:
    rows = [s.row() for s in sections]
    cols = ["section", "sent", "2xx", "4xx", "429", "5xx", "no answer", "leaked", "s", "notes"]
    total = {"section": "total", **{c: sum(r[c] for r in rows) for c in ["sent", "2xx", "4xx", "429", "5xx",
                                                                           "no answer"]},
             "leaked": "none" if all(r["leaked"] == "none" for r in rows) else "SEE ABOVE",
             "s": round(sum(r["s"] for r in rows), 1), "notes": ""}
    rows.append(total)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    for s in sections:
        for b in s.bad[:10]:
            print(f"UNEXPECTED [{s.name}] {b}")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every request count")
    ap.add_argument("--fuzz-examples", type=int, default=300)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import tempfile

    import ray
    from ray import serve

    from glm4.tools.make_checkpoint import make_checkpoint
    from pipeline.serve.app import build_app

    work = args.workdir or tempfile.mkdtemp(prefix="serve-abuse-")
    ckpt = make_checkpoint(os.path.join(work, "tiny"), "tiny", seed=0, num_shards=1, dtype="float32")
    max_len, max_bytes, key = 256, 256 * 1024, "bench-key-abuse"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": LOOPBACK, "port": port})
    serve.run(build_app({"model": str(ckpt), "served_model_name": "glm4-tiny", "api_key": key, "num_cpus": 0.5,
                         "max_model_len": max_len, "kv_cache_memory": 16 * 2**20, "dtype": "float32",
                         "device": "cpu", "max_ongoing_requests": 4, "max_queued_requests": 4,
                         "max_tokens_limit": 200, "max_request_bytes": max_bytes, "retry_after_s": 1}),
              name="abuse", route_prefix="/")
    t = Target(f"http://{LOOPBACK}:{port}", "glm4-tiny", key)
    k = args.scale
    sections = [
        asyncio.run(burst(t, n=int(400 * k), hold_tokens=200)),
        asyncio.run(slow_clients(t, n_readers=int(6 * k), n_trickle=int(20 * k), duration_s=15)),
        asyncio.run(disconnects(t, n=int(100 * k), concurrency=8, hold_tokens=32)),
        asyncio.run(hostile(t, max_bytes, max_len)),
        fuzz(t, max_examples=args.fuzz_examples),
    ]
    print_table(sections)
    final = t.stats()
    print(f"server counters after the run: {json.dumps(final['counters'])}")
    serve.shutdown()
    ray.shutdown()
    return 1 if any(s.bad or s.classes["5xx"] for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
