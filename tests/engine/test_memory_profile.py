"""The profile run before the KV cache is sized: it runs the largest step on CPU, measures a peak that covers the
step's own tensors, and a budget relative to free memory shrinks by the reserve it implies (others do not)."""

from __future__ import annotations

import pytest
import torch

import glm4.engine.model_runner as model_runner
from glm4.engine import memory_profile
from glm4.engine.memory_profile import kv_cache_budget, profile_step_memory, step_reserve_bytes
from glm4.layers.attention import tile_working_bytes
from glm4.engine.model_runner import ModelRunner
from glm4.tools.make_checkpoint import make_checkpoint

BLOCK = 8
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("profile") / "tiny", "tiny", seed=0, dtype="float32")
    return ModelRunner(ckpt, device="cpu", dtype="float32")


def test_profile_run_measures_the_steps_tensors(runner):
    c = runner.config
    small = profile_step_memory(runner.model, dtype=runner.dtype, device=runner.device, num_tokens=16,
                                num_logits=4, block_size=BLOCK)
    tokens, rows = 600, 64  # longer than nothing: 600 tokens need several blocks and one long prefill
    big = profile_step_memory(runner.model, dtype=runner.dtype, device=runner.device, num_tokens=tokens,
                              num_logits=rows, block_size=BLOCK)
    assert 0 < small < big
    # At its peak the step holds at least the hidden states of every token and the fp32 logits it samples.
    assert big >= tokens * c.hidden_size * 4 + rows * c.vocab_size * 4


def test_profile_run_splits_a_budget_longer_than_the_positions(runner):
    """More tokens than max_position_embeddings run as several sequences (a single one would leave the rotary
    table); the run still completes."""
    n = runner.config.max_position_embeddings + 100
    assert profile_step_memory(runner.model, dtype=runner.dtype, device=runner.device, num_tokens=n, num_logits=8,
                               block_size=BLOCK) > 0


def test_budget_arithmetic():
    gib = 1 << 30
    assert kv_cache_budget(0.5, 10 * gib, CPU, step_reserve=gib) == 4 * gib
    assert kv_cache_budget(None, 10 * gib, CUDA, step_reserve=gib) == 8 * gib
    assert kv_cache_budget(None, 10 * gib, CPU) == 2 * gib
    assert kv_cache_budget(None, 100 * gib, CPU) == 4 * gib  # the CPU default's cap
    assert kv_cache_budget(3 * gib, 10 * gib, CUDA) == 3 * gib  # bytes are taken as given
    with pytest.raises(ValueError, match="exceeds"):
        kv_cache_budget(11 * gib, 10 * gib, CPU)
    with pytest.raises(ValueError, match="fraction"):
        kv_cache_budget(1.5, 10 * gib, CPU)
    # the reserve: measured peak, fragmentation margin, the sampler's copies of the logits
    assert step_reserve_bytes(1000, 2, 10) == 1100 + memory_profile.SAMPLER_LOGITS_COPIES * 2 * 10 * 4


def test_fraction_budget_shrinks_by_the_profiled_reserve(runner, monkeypatch):
    free = 1 << 30
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda device: free)
    peaks = []

    def spy(*args, **kwargs):
        peaks.append(profile_step_memory(*args, **kwargs))
        return peaks[-1]

    monkeypatch.setattr(model_runner, "profile_step_memory", spy)
    per_block = runner.kv_bytes_per_block(BLOCK)
    opts = dict(max_num_batched_tokens=256, max_num_seqs=32)
    n = runner.num_blocks_for_budget(0.5, BLOCK, 10**9, **opts)
    assert len(peaks) == 1 and peaks[0] > 0
    # the profiled step, plus what a tiled attention call may hold (the profile runs fresh prompts only)
    attn = runner.model.transformer.encoder.layers[0].self_attention
    reserve = step_reserve_bytes(peaks[0], 32, runner.config.vocab_size) + tile_working_bytes(
        runner.device, attn.num_heads, attn.num_kv_heads * attn.head_dim)
    assert n == (free // 2 - reserve) // per_block < free // 2 // per_block

    # bytes are what the caller asked for, and the CPU default leaves 80% of RAM free: no profile run
    assert runner.num_blocks_for_budget(64 * per_block, BLOCK, 10**9, **opts) == 64
    assert runner.num_blocks_for_budget(None, BLOCK, 10**9, **opts) == free // 5 // per_block
    assert len(peaks) == 1

    with pytest.raises(ValueError, match="holding back .* for the largest step"):
        runner.num_blocks_for_budget(reserve / free / 2, BLOCK, 10**9, **opts)
