"""Piecewise decode graphs (glm4/engine/cuda_graphs.py): the padded, static-buffer forward is the eager forward.

CUDA capture itself needs a GPU (bench/gpu.sh exercises it); here the same segments run emulated on CPU, which
checks everything but the capture: bucket choice, padding rows, buffer wiring between segments and the eager
attention in between.
"""

from __future__ import annotations

import random

import pytest
import torch

import glm4
from glm4 import SamplingParams
from glm4.engine import cuda_graphs
from glm4.engine.cuda_graphs import DecodeGraphs, capture_sizes
from glm4.tools.make_checkpoint import make_checkpoint


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256)[-3:] == [240, 248, 256] and len(capture_sizes(256)) == 35


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return make_checkpoint(tmp_path_factory.mktemp("graphs") / "m", "tiny", layout="glm", dtype="float32")


def test_emulated_graphs_generate_what_eager_generates(ckpt, monkeypatch):
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 250) for _ in range(rng.randrange(3, 40))] for _ in range(11)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(4, 20), ignore_eos=True) for _ in prompts]
    eager = glm4.LLM(ckpt, max_num_seqs=16, max_num_batched_tokens=64, block_size=8)
    want = [o.token_ids for o in eager.generate(prompts, params)]

    graphed = glm4.LLM(ckpt, max_num_seqs=16, max_num_batched_tokens=64, block_size=8)
    runner = graphed.engine.executor.runner
    assert not runner.capture_decode_graphs(6)  # CPU: no CUDA graphs unless emulated
    assert runner.capture_decode_graphs(6, emulate=True)
    assert sorted(runner.decode_graphs.graphs) == [1, 2, 4, 6]
    sizes = []
    real_run = DecodeGraphs.run

    def spy(self, input_ids, *args):
        sizes.append(input_ids.numel())
        return real_run(self, input_ids, *args)

    monkeypatch.setattr(DecodeGraphs, "run", spy)
    got = [o.token_ids for o in graphed.generate(prompts, params)]
    assert got == want
    # Pure decode steps of up to 6 rows went through the graphs, some padded (3 -> 4, 5 -> 6); the rest ran eagerly.
    assert sizes and max(sizes) <= 6 and set(sizes) - {1, 2, 4, 6}


def test_padded_rows_do_not_touch_real_rows(ckpt):
    """Logits of n real rows are the same whichever captured size they are padded to."""
    llm = glm4.LLM(ckpt, max_num_seqs=8, block_size=8)
    runner = llm.engine.executor.runner
    graphs = DecodeGraphs(runner.model, 8, emulate=True)
    meta = cuda_graphs.AttentionMetadata(
        slot_mapping=torch.tensor([0, 8, 16]), block_tables=torch.tensor([[0], [1], [2]]),
        context_lens=torch.tensor([1, 1, 1]), query_lens=[1, 1, 1], context_lens_list=[1, 1, 1], block_size=8)
    ids, pos = torch.tensor([5, 6, 7]), torch.tensor([0, 0, 0])
    with torch.inference_mode():
        eager = runner.model.compute_logits(runner.model.forward_cached(ids, pos, meta, runner.kv_caches))
        small = graphs.run(ids, pos, meta, runner.kv_caches).clone()  # size 4: one padding row (a static buffer)
        graphs.graphs = {8: graphs.graphs[8]}
        big = graphs.run(ids, pos, meta, runner.kv_caches)  # size 8: five padding rows
    torch.testing.assert_close(small, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(big, eager, atol=1e-5, rtol=0)
    assert small.shape == (3, runner.config.vocab_size)
    # One set of static buffers serves every size: rows of the largest size, not a copy per size.
    assert graphs.buffers.logits.shape[0] == 8 and big.data_ptr() == graphs.buffers.logits.data_ptr()
