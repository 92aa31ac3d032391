"""Host milliseconds per DECODE step outside the model, at batch 256 (issue 14).

Runs the real `LLMEngine` (scheduler, block manager, step inputs, the persistent batch, sampler, postprocess,
detokenizer with the real GLM-4 tokenizer) on an executor that skips only the model forward: it applies every
step's inputs to a real persistent batch (the runner-side host work) and returns a preallocated logits tensor
[rows, 151552] (GLM-4's padded vocabulary), `randn * 4` so that a top_p=0.8 nucleus is about as peaked as a trained
LM's (its mean size is printed). Each (context, mode) gets a fresh engine with 256 prompts of that length; the
prefill and a few decode steps are warm-up, then only pure decode steps are timed.

    python bench/host_overhead.py [--steps 20] [--contexts 128,2048,8192]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glm4.config import GLM4Config, preset
from glm4.engine.executor import Executor, ExecutorSpec
from glm4.engine.input_batch import InputBatch
from glm4.engine.llm_engine import LLMEngine
from glm4.engine.sampling_params import SamplingParams
from glm4.engine.step_inputs import StepInputs
from glm4.kernels import cpu

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "glm4-tokenizer" / "tokenizer.model"
BATCH = 256
VOCAB = 151552  # GLM-4's padded vocabulary (the logits' width)
MAX_MODEL_LEN = 8192 + 512
MODES = {
    "greedy": dict(temperature=0.0),
    "greedy+penalties": dict(temperature=0.0, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
    "sampled": dict(temperature=0.8, top_p=0.8),
}


class NoForwardExecutor(Executor):
    """Everything an executor does for a step except the model forward: the runner's persistent batch takes the
    step's inputs and builds the attention metadata; the KV cache is never read, so none is allocated."""

    def __init__(self, spec: ExecutorSpec) -> None:
        self.config = GLM4Config.from_json(Path(spec.model_dir) / "config.json")
        self.block_size = spec.block_size
        self.num_blocks = spec.max_blocks_needed
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.input_batch = InputBatch(spec.max_num_seqs, spec.max_model_len, spec.block_size, self.device)
        cpu.load()  # the CPU runner's kernels (greedy argmax where the CPU has AVX-512), as a CPU engine has them
        self.logits = torch.randn(BATCH, self.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 4

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        step, _ = self.input_batch.prepare(inputs)
        return self.logits[:step.logits_indices.numel()]

    def shutdown(self) -> None:
        pass


def model_dir(root: Path) -> Path:
    """GLM-4-9B's config (long context) and the real tokenizer; no weights: the executor never reads them."""
    config = preset("glm-4-9b", max_position_embeddings=MAX_MODEL_LEN)
    (root / "config.json").write_text(json.dumps(config.to_dict()))
    (root / "tokenizer.model").symlink_to(TOKENIZER)
    return root


class TimedSampler:
    """The engine's sampler, timing its calls (the sampler's share of a step, the rest is the engine loop)."""

    def __init__(self, sampler) -> None:
        self.sampler, self.seconds = sampler, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.sampler(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name: str):  # the sampler's other methods (e.g. per-slot state) pass through untimed
        return getattr(self.sampler, name)


def measure(mdir: Path, context: int, mode: dict, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds of each timed pure-decode step of a batch of 256 prompts of `context` tokens, and of its sampling."""
    engine = LLMEngine.from_pretrained(mdir, executor=NoForwardExecutor, max_num_seqs=BATCH,
                                       max_num_batched_tokens=16384, max_model_len=MAX_MODEL_LEN)
    engine.sampler = sampler = TimedSampler(engine.sampler)
    g = torch.Generator().manual_seed(context)
    # The first prompts decode while the last ones prefill: leave them room to run until the end.
    params = SamplingParams(max_tokens=MAX_MODEL_LEN - context, ignore_eos=True, **mode)
    num_ranks = engine.tokenizer.num_ranks  # ordinary tokens only: no special ids in the prompts
    for i in range(BATCH):
        prompt = torch.randint(0, num_ranks, (context,), generator=g).tolist()
        engine.add_request(f"r{i}", prompt, params, final_only=True)  # as LLM.generate adds them
    sched = engine.scheduler
    while sched.waiting or any(s.is_prefill for s in sched.running):
        engine.step()
    for _ in range(warmup):
        engine.step()
    times, sampling = [], []
    for _ in range(steps):
        prefill_before = sched.num_prefill_tokens
        sampler.seconds = 0.0
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        sampling.append(sampler.seconds)
        assert sched.num_prefill_tokens == prefill_before and len(sched.running) == BATCH, "not a pure decode step"
    engine.shutdown()
    return times, sampling


def nucleus_size(top_p: float = 0.8, temperature: float = 0.8, rows: int = 32) -> float:
    """Mean number of tokens in the top_p nucleus of the benchmark's logits (randn * 4 over the vocabulary)."""
    x = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)) * 4 / temperature
    p = torch.softmax(x, dim=-1).sort(dim=-1, descending=True).values
    return ((p.cumsum(-1) - p) < top_p).sum(-1).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per (context, mode)")
    ap.add_argument("--warmup", type=int, default=3, help="decode steps after the prefill, not timed")
    ap.add_argument("--contexts", default="128,2048,8192")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"batch {BATCH}, vocabulary {VOCAB}, {args.steps} timed decode steps per cell, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (others' work inflates the timings); "
          f"sampled logits: randn*4, mean top_p=0.8 nucleus at temperature 0.8 = {nucleus_size():.0f} tokens")
    results: dict[tuple[int, str], tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mdir = model_dir(Path(tmp))
        for context in contexts:
            for name, mode in MODES.items():
                results[context, name] = measure(mdir, context, mode, args.steps, args.warmup)
    mean = {k: 1e3 * statistics.fmean(v[0]) for k, v in results.items()}
    med = {k: 1e3 * statistics.median(v[0]) for k, v in results.items()}
    rest = {k: mean[k] - 1e3 * statistics.fmean(v[1]) for k, v in results.items()}  # the step less sampling
    short = contexts[0]
    print(f"\n| context | mode | mean ms | median ms | sampler ms | rest ms | mean vs {short} ctx "
          f"| rest vs {short} ctx | penalties / without | sampled / greedy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for context in contexts:
        for name in MODES:
            k = (context, name)
            vs_short = f"{mean[k] / mean[short, name]:.2f}x" if context != short else "-"
            rest_vs_short = f"{rest[k] / rest[short, name]:.2f}x" if context != short else "-"
            pen = f"{mean[k] / mean[context, 'greedy']:.2f}x" if name == "greedy+penalties" else ""
            samp = f"{mean[k] / mean[context, 'greedy']:.2f}x" if name == "sampled" else ""
            print(f"| {context} | {name} | {mean[k]:.2f} | {med[k]:.2f} | {mean[k] - rest[k]:.2f} | {rest[k]:.2f} "
                  f"| {vs_short} | {rest_vs_short} | {pen} | {samp} |")


if __name__ == "__main__":
    main()
