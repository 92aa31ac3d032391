"""Whole-forward decode graphs (glm4/engine/cuda_graphs.py): the padded, fixed-width, static-buffer forward (paged
attention included) is the eager forward.

CUDA capture itself needs a GPU (bench/gpu.sh and the GPU-only test below exercise it); here the same forwards run
emulated on CPU, which checks everything but the capture: size and context-bucket choice, padding rows and their
writes into the spare block, buffer wiring, and attention over fixed-width block tables.
"""

from __future__ import annotations

import random

import pytest
import torch

import glm4
from glm4 import SamplingParams
from glm4.engine import cuda_graphs
from glm4.engine.cuda_graphs import DecodeGraphs, capture_sizes, context_buckets
from glm4.layers.attention import AttentionMetadata
from glm4.tools.make_checkpoint import make_checkpoint


def test_capture_sizes_and_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert context_buckets(131072, 16) == [64, 128, 256, 512, 1024]  # 1K .. 16K tokens, longer runs eagerly
    assert context_buckets(3000, 16) == [64, 128, 188]  # the last bucket stops at the model length
    assert context_buckets(512, 16) == [32]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return make_checkpoint(tmp_path_factory.mktemp("graphs") / "m", "tiny", layout="glm", dtype="float32")


def test_emulated_graphs_generate_what_eager_generates(ckpt, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MIN_BUCKET", 16)  # buckets of 16, 32, 64 tokens: several in one run
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPH_CONTEXT", 64)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 250) for _ in range(rng.randrange(3, 30))] for _ in range(11)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(4, 30), ignore_eos=True) for _ in prompts]
    eager = glm4.LLM(ckpt, max_num_seqs=4, max_num_batched_tokens=64, block_size=8, enforce_eager=True)
    want = [o.token_ids for o in eager.generate(prompts, params)]
    assert eager.stats()["cuda_graph_steps"] == 0

    graphed = glm4.LLM(ckpt, max_num_seqs=4, max_num_batched_tokens=64, block_size=8, enforce_eager=True)
    runner = graphed.engine.executor.runner
    assert runner.capture_decode_graphs(4, emulate=True)
    assert sorted(runner.decode_graphs.graphs) == [(s, w) for s in (1, 2, 4) for w in (2, 4, 8)]
    used = []
    real_replay = cuda_graphs._Graph.replay

    def spy(self):
        used.append(next(k for k, g in runner.decode_graphs.graphs.items() if g is self))
        return real_replay(self)

    monkeypatch.setattr(cuda_graphs._Graph, "replay", spy)
    got = [o.token_ids for o in graphed.generate(prompts, params)]
    assert got == want
    # Pure decode steps within 64 tokens went through the graphs, in more than one bucket, 3 rows padded to 4; the
    # rest (longer contexts, steps with a prefill) ran eagerly.
    assert len({w for _, w in used}) >= 2 and {s for s, _ in used} >= {2, 4}
    stats = graphed.stats()
    assert stats["cuda_graph_steps"] == len(used) > 0 and stats["eager_steps"] > 0


def test_padded_rows_touch_only_the_spare_block(ckpt):
    """Logits of n real rows are the same whichever size and bucket they run in; padding rows write their K/V into
    the spare block past the scheduler's blocks, never into a real one."""
    llm = glm4.LLM(ckpt, max_num_seqs=8, block_size=8, enforce_eager=True)
    runner = llm.engine.executor.runner
    spare = runner.num_blocks  # the runner allocates one block past the scheduler's
    assert runner.kv_caches[0][0].shape[0] == spare + 1
    graphs = DecodeGraphs(runner.model, runner.kv_caches, 8, 64, pad_slot=spare * 8, emulate=True)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([0, 8, 16]), block_tables=torch.tensor([[0], [1], [2]]),
        context_lens=torch.tensor([1, 1, 1]), query_lens=[1, 1, 1], context_lens_list=[1, 1, 1], block_size=8)
    ids, pos = torch.tensor([5, 6, 7]), torch.tensor([0, 0, 0])
    with torch.inference_mode():
        eager = runner.model.compute_logits(runner.model.forward_cached(ids, pos, meta, runner.kv_caches))
        before = [k.clone() for k, _ in runner.kv_caches]
        small = graphs.run(ids, pos, meta).clone()  # size 4: one padding row
        graphs.sizes = [8]
        big = graphs.run(ids, pos, meta)  # size 8: five padding rows
    torch.testing.assert_close(small, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(big, eager, atol=1e-5, rtol=0)
    for (k, _), k0 in zip(runner.kv_caches, before):
        torch.testing.assert_close(k[:spare], k0[:spare], atol=0, rtol=0)  # real blocks: only rewritten as before
    assert big.data_ptr() == graphs.buffers.logits.data_ptr() and graphs.replays == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: real CUDA graph capture and replay")
def test_cuda_graphs_generate_what_eager_generates(ckpt):
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 250) for _ in range(rng.randrange(3, 300))] for _ in range(20)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in glm4.LLM(ckpt, device="cuda", dtype="float32", enforce_eager=True)
            .generate(prompts, params)]
    llm = glm4.LLM(ckpt, device="cuda", dtype="float32", max_num_seqs=32)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want and llm.stats()["cuda_graph_steps"] > 0
