"""Engine benchmark: our continuous-batching engine vs transformers' batched `generate`, and batch-1 decode
bandwidth vs the machine's measured memory bandwidth. Prints one table. Not a test.

    python bench/engine.py                      # float32 CPU, `small` preset (real 151552 vocabulary)
    python bench/engine.py --quick              # fewer prompts, for a smoke run
    python bench/engine.py --decode-only --breakdown   # (b) only, plus where a decode step's time goes
    python bench/engine.py --long-context 4096 16384 32768 131072   # (c) only

(a) Mixed workload: N prompts with lengths in [16, 512] and output lengths in [16, 256] (ignore_eos so both
    systems generate exactly the same number of tokens); a quarter share a long common prefix. The baseline is
    transformers' GlmForCausalLM.generate on the same weights, in batches of --hf-batch prompts, left-padded,
    each batch running until its longest output is done (the static batching users of `generate` get).
(b) Batch-1 decode: weight bytes read per decode step x steps/s, over the read bandwidth of a large `torch.sum`
    (from plain memory and from huge pages, the faster). This machine's bandwidth swings by ~2x within seconds
    (shared VM), so each of --rounds short decode runs sits between two bandwidth measurements and is compared with
    the faster of them; the table reports the median round's ratio and the range.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glm4  # noqa: E402
from glm4 import SamplingParams  # noqa: E402
from glm4.kernels import cpu, hugepages  # noqa: E402
from glm4.layers.attention import AttentionMetadata, paged_attention  # noqa: E402
from glm4.peak_memory import PeakMemory  # noqa: E402
from glm4.tools.make_checkpoint import make_checkpoint  # noqa: E402
from benchtable import print_table  # noqa: E402  (bench/, the script's own folder)

HEAD = ("metric", "baseline", "ours", "ratio", "target")


class Bandwidth:
    """The machine's read bandwidth: the best `torch.sum` rate over 1 GiB, from plain memory and from huge pages
    (where the engine keeps its CPU weights, glm4/kernels/hugepages.py), the faster of the two. The buffers are
    allocated once, so each measurement is only the sums (~0.2 s)."""

    def __init__(self, gib: float = 1.0) -> None:
        n = int(gib * 2**30 / 4)
        self.buffers = [torch.ones(n), hugepages.copy_to_huge_pages(torch.ones(n))]

    def measure(self, repeats: int = 3) -> float:
        best_rate = 0.0
        for x in self.buffers:
            x.sum()
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                x.sum()
                best = min(best, time.perf_counter() - t)
            best_rate = max(best_rate, x.numel() * 4 / best)
        return best_rate


def workload(n: int, vocab: int, seed: int = 0, max_prompt: int = 512, max_out: int = 256):
    rng = random.Random(seed)
    prefix = [rng.randrange(1000, vocab) for _ in range(256)]
    prompts, outs = [], []
    for i in range(n):
        length = rng.randrange(16, max_prompt + 1)
        body = [rng.randrange(1000, vocab) for _ in range(length)]
        prompts.append((prefix + body)[:max(length, 16)] if i % 4 == 0 else body)
        outs.append(rng.randrange(16, max_out + 1))
    return prompts, outs


def run_ours(model_dir: Path, prompts, outs, max_num_seqs: int) -> tuple[float, int]:
    llm = glm4.LLM(model_dir, max_num_seqs=max_num_seqs, max_num_batched_tokens=1024)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outs]
    llm.generate(prompts[:2], params[:2])  # warm-up
    t = time.perf_counter()
    res = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    return dt, sum(r.num_generated_tokens for r in res)


def run_hf(model_dir: Path, prompts, outs, batch: int) -> tuple[float, int]:
    from transformers import GlmForCausalLM

    hf = GlmForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokens, t = 0, time.perf_counter()
    for s in range(0, len(prompts), batch):
        ps, os_ = prompts[s:s + batch], outs[s:s + batch]
        width = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(os_), min_new_tokens=max(os_),
                        do_sample=False, pad_token_id=0, eos_token_id=None)
        tokens += sum(os_)  # useful tokens only: the rest of each static batch is padding work
    return time.perf_counter() - t, tokens


def decode_bandwidth(llm: glm4.LLM, steps: int, rounds: int) -> tuple[list[tuple[float, float, float]], int]:
    """Per round: (decode steps/s, weight bytes/s achieved, the machine's bandwidth around it: the FASTER of two
    `torch.sum` measurements taken right before and right after the decode, so a round that straddles a switch to
    the fast phase counts against us); and the weight bytes read per step."""
    cfg = llm.engine.executor.runner.model.config
    elem = torch.empty((), dtype=llm.engine.executor.runner.dtype).element_size()
    # Per decode step every weight is read once, except the embedding table (one row). Counted from the config:
    # on CPU the runner may keep linears in oneDNN's packed form, outside `parameters()`.
    step_bytes = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) * elem
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    bandwidth = Bandwidth()
    llm.generate([[5, 6, 7, 8]], params)  # warm-up, after the 2 GiB of bandwidth buffers are faulted in
    out = []
    for _ in range(rounds):
        before = bandwidth.measure()
        t = time.perf_counter()
        llm.generate([[5, 6, 7, 8]], params)  # includes the 4-token prefill and request set-up: conservative
        dt = time.perf_counter() - t
        out.append((steps / dt, step_bytes * steps / dt, max(before, bandwidth.measure())))
    del bandwidth
    return out, step_bytes


def decode_breakdown(llm: glm4.LLM, steps: int) -> list[tuple[str, float]]:
    """Where a batch-1 decode step's time goes (ms per step): the step split by timing wrappers, then the linears
    alone on a fresh input (what the GEMVs cost without the rest of the forward around them)."""
    from glm4.layers.linear import PackableLinear

    runner = llm.engine.executor.runner
    model = runner.model
    spent = {"run": 0.0, "forward": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    runner.run = timed("run", runner.run)
    model.forward_cached = timed("forward", model.forward_cached)
    try:
        llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        spent.update(run=0.0, forward=0.0)
        t = time.perf_counter()
        llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
        total = time.perf_counter() - t
    finally:
        del runner.run, model.forward_cached  # back to the class methods
    head = model.transformer.output_layer
    body = [m for m in model.modules() if isinstance(m, PackableLinear) and m is not head]

    def per_call(fn, n: int = 20) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n

    with torch.inference_mode():
        xs = {m: torch.randn(1, m.in_features if hasattr(m, "in_features") else m.hidden_size) for m in body + [head]}
        head_alone = per_call(lambda: head.matmul(xs[head]))
        body_alone = per_call(lambda: [m.matmul(xs[m]) for m in body])
    ms = lambda x: 1e3 * x / steps  # noqa: E731
    return [("whole step", ms(total)), ("  model forward (layers, attention, small ops)", ms(spent["forward"])),
            ("  LM head + logits", ms(spent["run"] - spent["forward"])),
            ("  engine loop (schedule, sample, detokenize)", ms(total - spent["run"])),
            ("LM head matmul alone", 1e3 * head_alone), (f"the other {len(body)} linears alone", 1e3 * body_alone)]


def long_context_memory(contexts: list[int], chunk: int = 2048) -> list[tuple[str, ...]]:
    """(c): peak working memory of attention for one `chunk`-token prefill chunk at each context length."""
    heads, kv_heads, head_dim, bs = 32, 2, 128, 16
    cpu.load = lambda: None  # the torch path (the fused CPU kernel handles decode rows only anyway)
    rows, base = [], None
    for ctx in sorted(contexts):
        nb = -(-ctx // bs)
        k_cache, v_cache = torch.randn(nb, bs, kv_heads, head_dim), torch.randn(nb, bs, kv_heads, head_dim)
        q = torch.randn(chunk, heads, head_dim)
        meta = AttentionMetadata(slot_mapping=torch.zeros(chunk, dtype=torch.long),
                                 block_tables=torch.randperm(nb)[None], context_lens=torch.tensor([ctx]),
                                 query_lens=[chunk], context_lens_list=[ctx], block_size=bs)
        t = time.perf_counter()
        with PeakMemory("cpu") as pm:
            paged_attention(q, k_cache, v_cache, meta, head_dim ** -0.5)
        dt = time.perf_counter() - t
        kv_bytes = 2 * ctx * kv_heads * head_dim * 4
        # The old path: bool mask (G x chunk x ctx) + SDPA's float copy of it (4 B each) + the gathered K/V.
        old = chunk * ctx * (heads // kv_heads) * 5 + kv_bytes
        base = base or pm.peak_bytes
        rows.append((f"(c) {chunk}-token chunk at {ctx // 1024}K context", f"{base / 2**20:.0f} MiB (ours, shortest)",
                     f"{pm.peak_bytes / 2**20:.0f} MiB ({dt:.1f} s; KV {kv_bytes / 2**20:.0f} MiB; "
                     f"old path ~{old / 2**30:.1f} GiB)", f"{pm.peak_bytes / base:.2f}x", "flat (<= 1.25x)"))
        del k_cache, v_cache, q
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=32, help="(b): tokens generated per round")
    p.add_argument("--rounds", type=int, default=15, help="(b): decode runs, each between two bandwidth measurements")
    p.add_argument("--model", default=None, help="existing checkpoint dir (default: generate one)")
    p.add_argument("--quick", action="store_true", help="16 prompts, short outputs")
    p.add_argument("--breakdown", action="store_true", help="also print where a batch-1 decode step's time goes")
    p.add_argument("--decode-only", action="store_true", help="skip (a): only the batch-1 decode measurement")
    p.add_argument("--long-context", type=int, nargs="*", default=None,
                   help="(c) only: attention working memory of a 2048-token chunk at these context lengths")
    args = p.parse_args()
    if args.long_context is not None:
        print_table(long_context_memory(args.long_context or [4096, 16384, 32768]), HEAD)
        return 0
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else make_checkpoint(Path(tmp.name) / args.preset, args.preset,
                                                                    layout="glm", dtype="float32", num_shards=1)
    cfg = glm4.GLM4Config.from_json(model_dir / "config.json")
    n = 16 if args.quick else args.num_prompts
    max_out = 32 if args.quick else 256
    prompts, outs = workload(n, min(cfg.vocab_size, 151329), max_out=max_out)
    print(f"model: {args.preset} ({cfg.num_parameters() / 1e6:.0f}M params, float32), threads={torch.get_num_threads()}, "
          f"{n} prompts (16-512 tokens, 25% share a 256-token prefix), outputs 16-{max_out} tokens", flush=True)

    rows = []
    if not args.decode_only:
        ours_dt, ours_tok = run_ours(model_dir, prompts, outs, args.max_num_seqs)
        hf_dt, hf_tok = run_hf(model_dir, prompts, outs, args.hf_batch)
        rows.append(("(a) mixed workload, output tok/s", f"{hf_tok / hf_dt:.1f} (HF generate, batch {args.hf_batch})",
                     f"{ours_tok / ours_dt:.1f}", f"{(ours_tok / ours_dt) / (hf_tok / hf_dt):.2f}x", ">= 3x"))
    decode_llm = glm4.LLM(model_dir, max_num_seqs=1)
    runs, step_bytes = decode_bandwidth(decode_llm, 16 if args.quick else args.decode_steps, args.rounds)
    runs.sort(key=lambda r: r[1] / r[2])
    steps_s, achieved, bw = runs[len(runs) // 2]  # the median round
    spread = f"{runs[0][1] / runs[0][2]:.0%}-{runs[-1][1] / runs[-1][2]:.0%}"
    rows.append(("(b) batch-1 decode, GB/s of weights", f"{bw / 1e9:.1f} (torch.sum read bandwidth)",
                 f"{achieved / 1e9:.1f} ({steps_s:.1f} tok/s, {step_bytes / 1e6:.0f} MB/step)",
                 f"{achieved / bw:.0%} (rounds {spread})", ">= 70%"))
    print_table(rows, HEAD)
    if not args.decode_only:
        print(f"(a) detail: ours {ours_tok} tokens in {ours_dt:.1f}s; HF {hf_tok} tokens in {hf_dt:.1f}s")
    print("(b) rounds (GB/s decode / GB/s torch.sum): "
          + ", ".join(f"{a / 1e9:.1f}/{b / 1e9:.1f}" for _, a, b in runs))
    if args.breakdown:
        print("\n| batch-1 decode step | ms |\n|---|---|")
        for name, value in decode_breakdown(decode_llm, 16 if args.quick else args.decode_steps):
            print(f"| {name} | {value:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
