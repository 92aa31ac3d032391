"""Serving-overhead benchmark: N concurrent streaming clients over the Ray Serve endpoint vs the bare
AsyncLLMEngine in-process, on the same prompts. Prints one table. Not a test.

    python bench/serve.py                          # tiny preset, float32 CPU, 16 clients x 4 requests, 64 tokens
    python bench/serve.py --concurrency 32 --max-tokens 128
    python bench/serve.py --model /models/glm-4-9b-chat --device cuda --dtype bfloat16 --concurrency 64

Both runs use the same prompts, greedy sampling and ignore_eos (every request generates exactly --max-tokens
tokens), so the difference is what the HTTP path adds: Serve proxy, FastAPI, SSE framing and JSON. Metrics:
- TTFT: request sent -> first token (engine: first RequestOutput with a token; Serve: first SSE text chunk),
  p50 and p99 over all requests;
- output tokens/s: all generated tokens / wall time of the whole run (N clients, each sending its requests back
  to back);
- overhead ratio: Serve / engine for TTFT (lower is better, 1.0 = no overhead) and engine / Serve for tokens/s.
The engine phase runs first and is shut down before Serve starts, so the two never share the CPU. A third column,
the bare engine with `final_only=True` requests (one output per request, when it finishes: what the batch replicas
and non-streaming HTTP requests use), shows what streaming itself costs the engine; its TTFT comes from the
outputs' `first_token_time`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_prompts(n: int, prompt_len: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    out = []
    for i in range(n):
        text = f"[{i}] " + " ".join(rng.choice(words) for _ in range(prompt_len))
        out.append(text[: max(8, prompt_len * 4)])
    return out


def engine_options(ns: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"max_model_len": ns.max_model_len, "max_num_seqs": max(ns.concurrency, 8)}
    if ns.dtype:
        opts["dtype"] = ns.dtype
    if ns.device:
        opts["device"] = ns.device
    if ns.kv_cache_memory:
        opts["kv_cache_memory"] = int(ns.kv_cache_memory) if ns.kv_cache_memory > 1 else ns.kv_cache_memory
    return opts


async def _run_clients(prompts: list[str], concurrency: int, one) -> tuple[list[float], int, float]:
    """Split prompts over `concurrency` clients, each sending its share back to back."""
    ttfts: list[float] = []
    tokens = 0
    shares = [prompts[i::concurrency] for i in range(concurrency)]

    async def client(share: list[str]) -> None:
        nonlocal tokens
        for p in share:
            ttft, n = await one(p)
            ttfts.append(ttft)
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(client(s) for s in shares if s))
    return ttfts, tokens, time.perf_counter() - t0


def bench_engine(model_dir: str, prompts: list[str], ns: argparse.Namespace,
                 final_only: bool = False) -> dict[str, Any]:
    from glm4 import AsyncLLMEngine, SamplingParams

    engine = AsyncLLMEngine.from_pretrained(model_dir, **engine_options(ns))
    tok = engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
    counter = iter(range(10**9))

    async def one(prompt: str) -> tuple[float, int]:
        ids = tok.encode_prompt(prompt)
        t0 = time.monotonic()  # the engine's clock (first_token_time)
        ttft, n = None, 0
        async for out in engine.generate(ids, params, f"bench-{next(counter)}", final_only=final_only):
            if ttft is None and out.outputs[0].token_ids:
                ttft = (out.first_token_time if final_only else time.monotonic()) - t0
            n = len(out.outputs[0].token_ids)
        return ttft or float("nan"), n

    async def main():
        await _run_clients(prompts[: ns.concurrency], ns.concurrency, one)  # warm-up
        return await _run_clients(prompts, ns.concurrency, one)

    try:
        ttfts, tokens, wall = asyncio.run(main())
    finally:
        engine.shutdown()
    return {"ttfts": ttfts, "tokens": tokens, "wall": wall}


def bench_serve(model_dir: str, prompts: list[str], ns: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import ray
    from ray import serve

    from pipeline.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": model_dir, "served_model_name": "bench", "num_cpus": ns.replica_cpus,
            "num_gpus": 1.0 if (ns.device or "").startswith("cuda") else 0.0,
            "max_ongoing_requests": max(ns.concurrency, 8), "max_queued_requests": ns.concurrency,
            "engine_options": engine_options(ns)}
    serve.run(build_app(args), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"

    async def main():
        limits = httpx.Limits(max_connections=ns.concurrency + 4, max_keepalive_connections=ns.concurrency + 4)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
            async def one(prompt: str) -> tuple[float, int]:
                body = {"model": "bench", "prompt": prompt, "max_tokens": ns.max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                t0 = time.perf_counter()
                ttft, n = None, 0
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        # Parse only what is measured (the first text chunk, the usage chunk): the client
                        # shares the CPU with the server here, and its JSON work is not serving overhead.
                        if ttft is None:
                            chunk = json.loads(line[6:])
                            if chunk.get("choices") and chunk["choices"][0]["text"]:
                                ttft = time.perf_counter() - t0
                        elif '"usage":{' in line:
                            n = json.loads(line[6:])["usage"]["completion_tokens"]
                return ttft or float("nan"), n

            await _run_clients(prompts[: ns.concurrency], ns.concurrency, one)  # warm-up
            return await _run_clients(prompts, ns.concurrency, one)

    try:
        ttfts, tokens, wall = asyncio.run(main())
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"ttfts": ttfts, "tokens": tokens, "wall": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: generate --preset into a temp dir)")
    p.add_argument("--preset", default="tiny", help="preset for the generated checkpoint (tiny, small)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--kv-cache-memory", type=float, default=None)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    ns = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = ns.model
        if model_dir is None:
            from glm4.tools.make_checkpoint import make_checkpoint

            model_dir = str(make_checkpoint(Path(tmp) / ns.preset, ns.preset, seed=0, dtype="float32"))
        prompts = make_prompts(ns.concurrency * ns.requests_per_client, ns.prompt_words)
        eng = bench_engine(model_dir, prompts, ns)
        fin = bench_engine(model_dir, prompts, ns, final_only=True)
        srv = bench_serve(model_dir, prompts, ns)

    rows = []
    res: dict[str, Any] = {"concurrency": ns.concurrency, "requests": len(prompts), "max_tokens": ns.max_tokens}
    for name, q in (("TTFT p50 (ms)", 0.5), ("TTFT p99 (ms)", 0.99)):
        e, s = percentile(eng["ttfts"], q) * 1e3, percentile(srv["ttfts"], q) * 1e3
        f = percentile(fin["ttfts"], q) * 1e3
        rows.append((name, f"{e:.1f}", f"{s:.1f}", f"{s / e:.2f}x" if e else "-", f"{f:.1f}"))
        res[name] = {"engine": e, "serve": s, "engine_final_only": f}
    e_tps, s_tps = eng["tokens"] / eng["wall"], srv["tokens"] / srv["wall"]
    f_tps = fin["tokens"] / fin["wall"]
    rows.append(("output tokens/s", f"{e_tps:.0f}", f"{s_tps:.0f}", f"{e_tps / s_tps:.2f}x" if s_tps else "-",
                 f"{f_tps:.0f} ({f_tps / e_tps:.2f}x streaming)"))
    rows.append(("output tokens", str(eng["tokens"]), str(srv["tokens"]), "", str(fin["tokens"])))
    res["output_tokens_per_s"] = {"engine": e_tps, "serve": s_tps, "engine_final_only": f_tps}
    res["serving_overhead_ratio"] = {"ttft_p50": res["TTFT p50 (ms)"]["serve"] / res["TTFT p50 (ms)"]["engine"],
                                     "throughput": e_tps / s_tps if s_tps else None}

    print(f"\nServing overhead: {ns.concurrency} concurrent streaming clients, {len(prompts)} requests, "
          f"{ns.max_tokens} output tokens each (greedy, ignore_eos), model {Path(model_dir).name}")
    header = ("metric", "bare engine", "Serve endpoint", "overhead (serve/engine)", "bare engine, final-only")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("(tokens/s overhead is engine/serve: 1.00x = the endpoint loses nothing)")
    if ns.json:
        print(json.dumps(res))
    bad = any(r["tokens"] != len(prompts) * ns.max_tokens for r in (eng, fin, srv))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
