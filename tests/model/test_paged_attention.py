"""The tiled paged attention equals the reference (a gathered copy of each sequence's K/V + a dense masked SDPA,
the engine's path before issue 14) for decode, chunked prefill, cached-prefix prefill and mixed steps."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from glm4.kernels import cpu
from glm4.layers import attention
from glm4.layers.attention import AttentionMetadata, paged_attention


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: list[list[int]],
              ctx: list[int], qlens: list[int], scale: float) -> torch.Tensor:
    """Per sequence: gather its keys/values in order, then SDPA with an explicit (queries x keys) causal mask."""
    bs = k_cache.shape[1]
    out, start = [], 0
    for table, c, n in zip(tables, ctx, qlens):
        keys = k_cache[torch.tensor(table)].flatten(0, 1)[:c]  # (c, KVH, D)
        vals = v_cache[torch.tensor(table)].flatten(0, 1)[:c]
        assert keys.shape[0] == c and len(table) == -(-c // bs)
        qpos = torch.arange(c - n, c)
        mask = torch.arange(c)[None, :] <= qpos[:, None]  # (n, c)
        o = F.scaled_dot_product_attention(q[start:start + n].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                           vals.transpose(0, 1)[None], attn_mask=mask, scale=scale, enable_gqa=True)
        out.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(out)


def _case(seqs: list[tuple[int, int]], *, heads: int, kv_heads: int, head_dim: int, block_size: int,
          table_dtype: torch.dtype = torch.long, seed: int = 0):
    """seqs: (context length after the step, new tokens) per sequence -> inputs with scattered, shuffled blocks."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    need = sum(-(-c // block_size) for c, _ in seqs)
    ids = list(range(need + 3))
    rng.shuffle(ids)
    tables = []
    for c, _ in seqs:
        tables.append([ids.pop() for _ in range(-(-c // block_size))])
    shape = (need + 3, block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    ctx, qlens = [c for c, _ in seqs], [n for _, n in seqs]
    q = torch.randn(sum(qlens), heads, head_dim)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=table_dtype)
    # The new tokens' slots (their K/V are already in the cache, as after write_kv).
    slots = torch.tensor([t[p // block_size] * block_size + p % block_size
                          for t, (c, n) in zip(tables, seqs) for p in range(c - n, c)])
    meta = AttentionMetadata(slot_mapping=slots, block_tables=bt, context_lens=torch.tensor(ctx),
                             query_lens=qlens, context_lens_list=ctx, block_size=block_size)
    return q, k_cache, v_cache, tables, ctx, qlens, meta


STEPS = {
    "decode": [(37, 1), (5, 1), (1, 1), (64, 1), (17, 1)],
    "prefill": [(23, 23), (7, 7), (40, 40)],
    "chunked_prefill": [(48, 16), (33, 11)],  # later chunks of long prompts: the cached prefix + causal chunk
    "cached_prefix": [(30, 3), (61, 29), (16, 9)],  # prefix-cache hits: most of the context was never computed here
    "mixed": [(50, 1), (12, 12), (9, 1), (70, 20), (3, 1), (45, 2)],
}


def _own_kv(kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    kvh, d = kc.shape[-2:]
    return kc.view(-1, kvh, d)[meta.slot_mapping], vc.view(-1, kvh, d)[meta.slot_mapping]


@pytest.mark.parametrize("own_kv", [False, True])  # True: fresh prompts take causal SDPA over the step's K/V
@pytest.mark.parametrize("tiles", ["one_block", "default"])  # one block column / query per call, and the defaults
@pytest.mark.parametrize("block_size", [16, 5])  # 5 divides none of the lengths
@pytest.mark.parametrize("step", sorted(STEPS))
def test_tiled_attention_equals_reference(monkeypatch, step, block_size, tiles, own_kv):
    monkeypatch.setattr(cpu, "can_attend", lambda q, k: False)  # the tiled path for decode rows too
    if tiles == "one_block":
        monkeypatch.setattr(attention, "CPU_SCORE_BLOCK", 1)
        monkeypatch.setattr(attention, "CPU_MAX_TILE_KEYS", 1)
    q, kc, vc, tables, ctx, qlens, meta = _case(STEPS[step], heads=8, kv_heads=2, head_dim=16,
                                                block_size=block_size)
    got = paged_attention(q, kc, vc, meta, 0.25, *(_own_kv(kc, vc, meta) if own_kv else ()))
    torch.testing.assert_close(got, reference(q, kc, vc, tables, ctx, qlens, 0.25), atol=1e-5, rtol=0)


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.long])
def test_glm4_head_layout_and_int32_tables(monkeypatch, table_dtype):
    """GLM-4-9B's 32 query heads over 2 KV heads of 128, block tables as int32 (the persistent batch's dtype)."""
    monkeypatch.setattr(cpu, "can_attend", lambda q, k: False)
    q, kc, vc, tables, ctx, qlens, meta = _case(STEPS["mixed"], heads=32, kv_heads=2, head_dim=128, block_size=16,
                                                table_dtype=table_dtype, seed=3)
    got = paged_attention(q, kc, vc, meta, 128 ** -0.5)
    torch.testing.assert_close(got, reference(q, kc, vc, tables, ctx, qlens, 128 ** -0.5), atol=1e-5, rtol=0)


def test_bf16_cache_close_to_fp32_reference(monkeypatch):
    """bf16 (the GPU dtype): matmuls in bf16, softmax statistics in fp32."""
    monkeypatch.setattr(cpu, "can_attend", lambda q, k: False)
    q, kc, vc, tables, ctx, qlens, meta = _case(STEPS["mixed"], heads=8, kv_heads=2, head_dim=64, block_size=16)
    got = paged_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), meta, 0.125)
    assert got.dtype == torch.bfloat16
    want = reference(q.bfloat16().float(), kc.bfloat16().float(), vc.bfloat16().float(), tables, ctx, qlens, 0.125)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_plan_is_built_once_per_step_and_pads_little(monkeypatch):
    """Groups depend on lengths only: every layer reuses the first layer's plan. Prefill chunks of very different
    lengths go to different groups, so padding never more than doubles the query rows of a call."""
    monkeypatch.setattr(cpu, "can_attend", lambda q, k: False)
    seqs = [(600, 500)] + [(10, 10)] * 20 + [(120, 100), (90, 90)]
    q, kc, vc, tables, ctx, qlens, meta = _case(seqs, heads=4, kv_heads=2, head_dim=16, block_size=16)
    paged_attention(q, kc, vc, meta, 0.25)
    groups = meta.groups("prefill", 4, 32)
    assert meta.groups("prefill", 4, 32) is groups
    for g in groups:
        real = int((g.qpos >= 0).sum())
        assert g.rows.numel() <= 2 * real
    assert sum(int((g.qpos >= 0).sum()) for g in groups) == sum(n for _, n in seqs)


def test_tiles_are_bounded_by_budget_not_context():
    """Key tiles and query blocks never depend on the context length: a call's scores stay within CPU_SCORE_BLOCK
    on CPU (cache-sized), and scores plus K/V within TILE_BUDGET on CUDA."""
    def tiling(ctx: int, qlen: int) -> tuple[int, int]:
        meta = AttentionMetadata(slot_mapping=torch.zeros(qlen, dtype=torch.long),
                                 block_tables=torch.zeros((1, -(-ctx // 16)), dtype=torch.long),
                                 context_lens=torch.tensor([ctx]), query_lens=[qlen], context_lens_list=[ctx],
                                 block_size=16)
        g = meta.groups("prefill", 32, 2 * 128)[0]
        return g.tile_blocks, g.query_block

    assert tiling(16384, 2048) == tiling(131072, 2048) == tiling(1 << 20, 2048)
    tile, qblock = tiling(16384, 2048)
    assert 32 * qblock * tile * 16 <= attention.CPU_SCORE_BLOCK and tile * 16 <= attention.CPU_MAX_TILE_KEYS
    cuda = torch.device("cuda")
    for ctx in (16384, 1 << 20):
        tile, qblock = attention._tiling(cuda, 1, 2048, 32, 256, -(-ctx // 16), 16)
        assert qblock == 2048 and tile * 16 * (2048 * 32 + 2 * 256) <= attention.TILE_BUDGET
        assert (tile, qblock) == attention._tiling(cuda, 1, 2048, 32, 256, 1 << 16, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: the tiled path on CUDA in bf16")
def test_cuda_bf16_matches_reference():
    q, kc, vc, tables, ctx, qlens, meta = _case(STEPS["mixed"], heads=32, kv_heads=2, head_dim=128, block_size=16)
    dev = torch.device("cuda")
    meta = AttentionMetadata(slot_mapping=meta.slot_mapping.to(dev), block_tables=meta.block_tables.to(dev),
                             context_lens=meta.context_lens.to(dev), query_lens=qlens, context_lens_list=ctx,
                             block_size=16)
    got = paged_attention(q.to(dev, torch.bfloat16), kc.to(dev, torch.bfloat16), vc.to(dev, torch.bfloat16), meta,
                          128 ** -0.5)
    want = reference(q.bfloat16().float(), kc.bfloat16().float(), vc.bfloat16().float(), tables, ctx, qlens,
                     128 ** -0.5)
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)
