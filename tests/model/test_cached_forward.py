"""The engine's paged-KV forward (`forward_cached`) computes the same logits as the full causal forward."""

from __future__ import annotations

import pytest
import torch

from glm4.layers.attention import AttentionMetadata
from glm4.weights import load_model


def _meta(block_tables: list[list[int]], ctx: list[int], qlens: list[int], block_size: int) -> tuple:
    slots, positions = [], []
    for table, c, q in zip(block_tables, ctx, qlens):
        for p in range(c - q, c):
            slots.append(table[p // block_size] * block_size + p % block_size)
            positions.append(p)
    width = max(len(t) for t in block_tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in block_tables])
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=bt, context_lens=torch.tensor(ctx),
                             query_lens=qlens, context_lens_list=ctx, block_size=block_size)
    return meta, torch.tensor(positions)


def _model_and_cache(checkpoint, num_blocks: int, block_size: int) -> tuple:
    model = load_model(checkpoint, dtype=torch.float32)
    shape = (num_blocks, block_size, model.num_kv_heads_per_rank, model.config.head_dim)
    return model, [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.config.num_layers)]


def test_chunked_prefill_and_decode_match_full_forward(tiny_checkpoint):
    bs = 4
    model, kv = _model_and_cache(tiny_checkpoint, num_blocks=32, block_size=bs)
    cfg = model.config
    torch.manual_seed(0)
    a = torch.randint(0, cfg.vocab_size, (13,))
    b = torch.randint(0, cfg.vocab_size, (6,))
    ta, tb = [3, 7, 1, 9], [12, 4]  # scattered, non-contiguous blocks
    with torch.no_grad():
        full_a, full_b = model(a[None])[0], model(b[None])[0]
        # step 1: first 8 tokens of a (chunked prefill) + all but the last token of b
        meta, pos = _meta([ta, tb], [8, 5], [8, 5], bs)
        h = model.forward_cached(torch.cat([a[:8], b[:5]]), pos, meta, kv)
        out = model.compute_logits(h)
        torch.testing.assert_close(out[:8], full_a[:8], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[8:], full_b[:5], atol=1e-5, rtol=0)
        # step 2: rest of a's prompt (chunk attends to the cached prefix) + one decode token of b
        meta, pos = _meta([ta, tb], [13, 6], [5, 1], bs)
        h = model.forward_cached(torch.cat([a[8:], b[5:]]), pos, meta, kv)
        out = model.compute_logits(h)
        torch.testing.assert_close(out[:5], full_a[8:], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[5], full_b[5], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_decode_rows_beside_prefill_match_full_forward(tiny_checkpoint, monkeypatch, fused):
    """Decode rows beside a prefill chunk, unsorted, through the tiled path with tiny tiles (many tiles per row)
    or the fused CPU kernel; logits don't change."""
    from glm4.kernels import cpu
    from glm4.layers import attention

    if fused and cpu.load() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu.unavailable_reason()}")
    if not fused:
        monkeypatch.setattr(cpu, "can_attend", lambda q, k: False)
    monkeypatch.setattr(attention, "CPU_SCORE_BLOCK", 1)  # one block column and one query per call
    monkeypatch.setattr(attention, "CPU_MAX_TILE_KEYS", 1)
    bs = 4
    model, kv = _model_and_cache(tiny_checkpoint, num_blocks=40, block_size=bs)
    cfg = model.config
    torch.manual_seed(1)
    lens = [9, 3, 14, 6]  # decode rows' final context lengths, deliberately unsorted
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lens]
    tables = [[0, 1, 2, 3], [4], [5, 6, 7, 8], [9, 10]]
    pre = torch.randint(0, cfg.vocab_size, (5,))  # a prefill chunk in the same step
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]
        full_pre = model(pre[None])[0]
        meta, pos = _meta(tables, [n - 1 for n in lens], [n - 1 for n in lens], bs)  # prompts minus last token
        model.forward_cached(torch.cat([s[:-1] for s in seqs]), pos, meta, kv)
        meta, pos = _meta(tables + [[11, 12]], lens + [5], [1, 1, 1, 1, 5], bs)
        if fused:
            assert meta.decode_inputs()[0] is not None  # decode rows picked out of a mixed batch
        out = model.compute_logits(model.forward_cached(torch.cat([s[-1:] for s in seqs] + [pre]), pos, meta, kv))
    for i, f in enumerate(full):
        torch.testing.assert_close(out[i], f[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[4:], full_pre, atol=1e-5, rtol=0)
