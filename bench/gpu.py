"""GPU benchmark on the exact GLM-4-9B shape with random bf16 weights (load_format="dummy": nothing to download).

    python bench/gpu.py            # on a CUDA machine: bf16, batch-1 decode + throughput at 64 and 256 requests
    python bench/gpu.py --smoke    # anywhere: the same code path on the `tiny` preset, float32 CPU, seconds
    python bench/gpu.py --tp 2     # tensor parallel over 2 GPUs (run by gpu.sh when >= 2 GPUs are visible)

Prints one table: batch-1 decode tokens/s against the HBM bound (4.8 TB/s over the bytes a decode step reads:
every weight except the embedding table, whose one row per token is negligible: 17.6 GB, ~273 tok/s on an H200);
output tokens/s at 64 and 256 concurrent requests (128-token prompts, 128 output tokens, ignore_eos); a 32K-token
prompt's prefill (tokens/s, time to first token); and a ShareGPT-like mix (inputs 256-2048 tokens, outputs
128-512, 256 requests at once): output and total tokens/s and the mean time per output token.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glm4  # noqa: E402
from glm4 import SamplingParams  # noqa: E402
from glm4.config import preset  # noqa: E402

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny preset on CPU, a few tokens (checks the code path)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--concurrency", type=int, nargs="*", default=[64, 256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--long-prompt", type=int, default=32768, help="prefill case: one prompt of this many tokens")
    p.add_argument("--mix-requests", type=int, default=256, help="ShareGPT-like mix: requests submitted at once")
    args = p.parse_args()
    mix_in, mix_out = (256, 2048), (128, 512)
    if args.smoke:
        name, device, dtype = "tiny", "cpu", "float32"
        args.concurrency, args.output_len, args.decode_tokens, args.prompt_len = [4, 8], 8, 16, 16
        args.long_prompt, args.mix_requests, mix_in, mix_out = 1024, 8, (16, 64), (4, 16)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for the CPU code path", file=sys.stderr)
            return 2
        name, device, dtype = "glm-4-9b", "cuda", "bfloat16"
    config = preset(name, torch_dtype=dtype)
    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(tmp.name)
    (model_dir / "config.json").write_text(json.dumps(config.to_dict("chatglm")))
    t0 = time.perf_counter()
    llm = glm4.LLM(model_dir, load_format="dummy", device=device, dtype=dtype, tensor_parallel_size=args.tp,
                   max_num_seqs=max(args.concurrency + [args.mix_requests]), max_num_batched_tokens=8192,
                   max_model_len=max(args.prompt_len + max(args.output_len, args.decode_tokens),
                                     args.long_prompt, mix_in[1] + mix_out[1]) + 8,
                   kv_cache_memory=0.5 if device == "cuda" else None)
    load_s = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    bound_bw = next((bw for k, bw in HBM_BYTES_PER_S.items() if k in gpu), None)
    # What one decode step reads: every weight but the embedding table (it reads one row per token).
    weight_bytes = (config.num_parameters() - config.vocab_size * config.hidden_size) * (2 if dtype == "bfloat16"
                                                                                         else 4)
    rng = random.Random(0)
    vocab = min(config.vocab_size, 151329)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(n)]

    rows = []
    runner = getattr(llm.engine.executor, "runner", None)  # tp=1: the in-process runner
    if args.smoke and runner is not None:
        runner.capture_decode_graphs(8, emulate=True)  # CPU: the graph code path without CUDA
    graphs = runner.decode_graphs if runner is not None else None
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    llm.generate(prompts(1), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up

    def decode_tok_s() -> float:
        t = time.perf_counter()
        llm.generate(prompts(1), params)
        return args.decode_tokens / (time.perf_counter() - t)

    tok_s = decode_tok_s()
    bound = f"{bound_bw / weight_bytes:.0f} tok/s bound" if bound_bw else "n/a"
    ratio = f"{tok_s / (bound_bw / weight_bytes):.0%}" if bound_bw else ""
    mode = "eager" if graphs is None else "graphs, emulated on CPU" if args.smoke else "CUDA graphs"
    rows.append((f"batch-1 decode ({mode})", f"{tok_s:.1f} tok/s", bound, ratio))
    if graphs is not None:  # the same engine with its graphs switched off: what the graphs are worth
        runner.decode_graphs = None
        eager = decode_tok_s()
        runner.decode_graphs = graphs
        rows.append(("batch-1 decode (eager)", f"{eager:.1f} tok/s", bound,
                     f"{eager / (bound_bw / weight_bytes):.0%}" if bound_bw else f"graphs {tok_s / eager:.2f}x"))
    for c in args.concurrency:
        ps = prompts(c)
        t = time.perf_counter()
        outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))
        dt = time.perf_counter() - t
        n_out = sum(o.num_generated_tokens for o in outs)
        rows.append((f"{c} concurrent requests", f"{n_out / dt:.0f} output tok/s",
                     f"{(n_out + c * args.prompt_len) / dt:.0f} total tok/s", f"{dt:.1f} s"))
    rows.append(long_prefill(llm, prompts(1)[0] * (args.long_prompt // args.prompt_len + 1), args.long_prompt))
    rows.append(sharegpt_mix(llm, rng, vocab, args.mix_requests, mix_in, mix_out))
    print(f"device: {gpu}, model: {name} ({config.num_parameters() / 1e9:.2f}B params, {dtype}), tp={args.tp}, "
          f"engine start {load_s:.1f} s, KV cache {llm.engine.kv_cache_tokens:,} tokens")
    print("| case | ours | reference | note |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    llm.shutdown()
    return 0


def long_prefill(llm: glm4.LLM, ids: list[int], n: int) -> tuple[str, ...]:
    """One prompt of n tokens, one output token: prefill throughput and time to first token."""
    t = time.perf_counter()
    llm.generate([ids[:n]], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    dt = time.perf_counter() - t
    return (f"{n // 1024}K-token prompt prefill", f"{n / dt:.0f} prefill tok/s", f"TTFT {dt:.2f} s", "")


def sharegpt_mix(llm: glm4.LLM, rng: random.Random, vocab: int, n: int, lens_in: tuple[int, int],
                 lens_out: tuple[int, int]) -> tuple[str, ...]:
    """n requests at once, inputs and outputs drawn uniformly from the ShareGPT-like ranges; the engine is stepped
    directly so each request's finish time is known: time per output token = (finish - first token) / (n - 1)."""
    engine = llm.engine
    outs = {}
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*lens_in))]
        engine.add_request(f"mix-{i}", prompt, SamplingParams(temperature=0, max_tokens=rng.randint(*lens_out),
                                                              ignore_eos=True), final_only=True)
    t = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = (o, time.monotonic())
    dt = time.perf_counter() - t
    n_in = sum(o.num_prompt_tokens for o, _ in outs.values())
    n_out = sum(o.num_generated_tokens for o, _ in outs.values())
    tpot = [(end - o.first_token_time) / (o.num_generated_tokens - 1) for o, end in outs.values()
            if o.num_generated_tokens > 1 and o.first_token_time is not None]
    return (f"ShareGPT-like mix, {n} at once (in {lens_in[0]}-{lens_in[1]}, out {lens_out[0]}-{lens_out[1]})",
            f"{n_out / dt:.0f} output tok/s", f"{(n_in + n_out) / dt:.0f} total tok/s",
            f"TPOT {1000 * sum(tpot) / max(len(tpot), 1):.1f} ms, {dt:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
