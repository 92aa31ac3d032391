"""CPU kernels compute what the torch reference computes: oneDNN-packed linears, our streaming GEMV (weights in
huge pages), and fused paged decode attention, for every layer kind, fp32 and bf16."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from glm4.kernels import cpu, hugepages
from glm4.layers import onednn
from glm4.layers.linear import PackableLinear
from glm4.weights import load_model

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN linear kernels")
needs_kernels = pytest.mark.skipif(cpu.load() is None, reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")


@pytest.fixture
def no_kernels(monkeypatch):
    """Force the library paths (oneDNN packing, SDPA), as on a machine without AVX-512 or a compiler."""
    monkeypatch.setattr(cpu, "can_use", lambda w: False)
    monkeypatch.setattr(cpu, "can_attend", lambda q, k: False)


def _compare_models(tiny_checkpoint, dtype, tol):
    dense = load_model(tiny_checkpoint, dtype=dtype)
    prepared = load_model(tiny_checkpoint, dtype=dtype)
    linears = [m for m in prepared.modules() if isinstance(m, PackableLinear)]
    # qkv, dense, dense_h_to_4h, dense_4h_to_h per layer, and the LM head
    assert prepared.prepare_for_cpu() == len(linears) == 4 * prepared.config.num_layers + 1
    assert prepared.prepare_for_cpu() == 0  # idempotent
    ids = torch.randint(0, prepared.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(ids).float(), prepared(ids).float()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    return linears


@needs_onednn
@pytest.mark.parametrize("dtype, tol", [
    (torch.float32, 1e-5),
    pytest.param(torch.bfloat16, 5e-2, marks=pytest.mark.skipif(
        "AVX512" not in torch.backends.cpu.get_cpu_capability(),
        reason="oneDNN packs bf16 weights on AVX-512 CPUs only (elsewhere bf16 layers keep F.linear)")),
])
def test_packed_model_matches_dense(tiny_checkpoint, dtype, tol, no_kernels):
    linears = _compare_models(tiny_checkpoint, dtype, tol)
    assert all(m.packed_weight is not None and m.weight.numel() == 0 for m in linears)  # one copy, not two


@needs_kernels
def test_streaming_model_matches_dense(tiny_checkpoint):
    linears = _compare_models(tiny_checkpoint, torch.float32, 1e-5)
    assert all(m.streaming and m.packed_weight is None for m in linears)
    # One huge-page arena holding every weight back to back in the order a decode step reads them (module order),
    # each starting on a cache line.
    ptrs = [m.weight.data_ptr() for m in linears]
    assert len({m.weight.untyped_storage().data_ptr() for m in linears}) == 1
    assert ptrs == sorted(ptrs) and all(p % hugepages.Arena.ALIGN == 0 for p in ptrs)
    for m, nxt in zip(linears, linears[1:]):
        assert nxt.weight.data_ptr() - m.weight.data_ptr() == -(-m.weight.nbytes // 64) * 64


@needs_onednn
def test_packed_shapes_bias_and_fallback(no_kernels):
    _check_layer_shapes(expect_streaming=False)
    half = PackableLinear()
    half.weight = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float16), requires_grad=False)
    assert not half.prepare_for_cpu() and half.packed_weight is None  # unsupported dtype: stays on F.linear
    assert half.matmul(torch.randn(2, 4, dtype=torch.float16)).shape == (2, 8)


@needs_kernels
def test_streaming_shapes_bias_and_batch_sizes():
    _check_layer_shapes(expect_streaming=True)


def _check_layer_shapes(expect_streaming: bool):
    torch.manual_seed(0)
    layer = PackableLinear()
    layer.weight = torch.nn.Parameter(torch.randn(24, 16), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(24), requires_grad=False)
    # 1 row, the kernel's limit, one over it (oneDNN), leading dims, a non-contiguous input, no rows
    xs = [torch.randn(16), torch.randn(cpu.MAX_ROWS, 16), torch.randn(cpu.MAX_ROWS + 1, 16), torch.randn(2, 3, 16),
          torch.randn(16, 5).t(), torch.randn(0, 16)]
    want = [F.linear(x, layer.weight, layer.bias) for x in xs]
    assert layer.prepare_for_cpu()
    assert layer.streaming == expect_streaming
    for x, w in zip(xs, want):
        torch.testing.assert_close(layer.matmul(x), w, atol=1e-5, rtol=0)


@needs_kernels
@pytest.mark.parametrize("rows", range(1, cpu.MAX_ROWS + 1))
@pytest.mark.parametrize("k", [16, 40, 100, 512, 3424])  # multiples of 32 and masked tails
def test_gemv_kernel_matches_linear(rows, k):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    w, b = torch.randn(37, k, generator=g), torch.randn(37, generator=g)
    x = torch.randn(rows, k + 3, generator=g)[:, 2:-1]  # rows with a stride larger than k
    torch.testing.assert_close(cpu.linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cpu.linear(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-5)


@needs_kernels
def test_gemv_kernel_rejects_bad_input():
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="features"):
        cpu.linear(torch.randn(1, 15), w, None)
    with pytest.raises(RuntimeError, match="rows"):
        cpu.linear(torch.randn(cpu.MAX_ROWS + 1, 16), w, None)
    with pytest.raises(RuntimeError, match="float32"):
        cpu.linear(torch.randn(1, 16, dtype=torch.bfloat16), w.bfloat16(), None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux only")
def test_huge_page_copy_is_equal_and_advised():
    src = torch.randn(3 << 20)  # 12 MiB
    out = hugepages.copy_to_huge_pages(src.view(3, -1))
    assert torch.equal(out.flatten(), src) and out.is_contiguous()
    assert out.data_ptr() % hugepages.HUGE_PAGE == 0
    # The kernel records the advice on the mapping: VmFlags "hg" (MADV_HUGEPAGE) in /proc/self/smaps.
    addr, flags = out.data_ptr(), None
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            if lo <= addr < hi:
                flags = next(x for x in lines[i + 1:] if x.startswith("VmFlags")).split()[1:]
                break
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert flags is not None and "hg" in flags
    small = hugepages.copy_to_huge_pages(torch.arange(10.0))  # under 2 MiB: plain memory, same values
    assert torch.equal(small, torch.arange(10.0))


def test_arena_packs_tensors_back_to_back_and_refuses_overflow():
    parts = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(1 << 20)]  # 60 B, 56 B, 4 MiB
    arena = hugepages.Arena(hugepages.Arena.size_for(parts))
    copies = [arena.take(t) for t in parts]
    assert all(torch.equal(c, t) and c.dtype == t.dtype and c.shape == t.shape for c, t in zip(copies, parts))
    assert [c.data_ptr() - copies[0].data_ptr() for c in copies] == [0, 64, 128]
    assert copies[0].data_ptr() % hugepages.HUGE_PAGE == 0 or not sys.platform.startswith("linux")
    with pytest.raises(ValueError, match="arena of .* bytes is full"):
        arena.take(torch.zeros(1))


def _reference_decode_attention(q, k_cache, v_cache, tables, lens, scale):
    out = []
    bs = k_cache.shape[1]
    for i in range(q.shape[0]):
        n = int(lens[i])
        blocks = tables[i, :math.ceil(n / bs)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float().transpose(0, 1)  # (KVH, n, D)
        v = v_cache[blocks].flatten(0, 1)[:n].float().transpose(0, 1)
        o = F.scaled_dot_product_attention(q[i].float()[:, None], k, v, scale=scale, enable_gqa=True)
        out.append(o[:, 0])
    return torch.stack(out).to(q.dtype)


@needs_kernels
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 64), (32, 2, 128), (4, 4, 16)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_paged_decode_attention_matches_sdpa(dtype, tol, heads, kv_heads, head_dim, index_dtype):
    g = torch.Generator().manual_seed(heads + head_dim)
    bs, num_blocks = 8, 40
    k_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 7, 8, 9, 17, 64, 100])  # one token, within a block, block edges, long
    width = math.ceil(int(lens.max()) / bs)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in lens]).to(index_dtype)
    q = (3 * torch.randn(len(lens), heads, head_dim, generator=g)).to(dtype)  # sharp softmax: exp is exercised
    scale = head_dim ** -0.5
    got = cpu.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    want = _reference_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@needs_kernels
def test_paged_decode_attention_rejects_bad_input():
    k = torch.zeros(4, 8, 2, 64)
    q = torch.zeros(1, 8, 64)
    ok = dict(block_tables=torch.zeros(1, 1, dtype=torch.long), context_lens=torch.ones(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu.paged_decode_attention(torch.zeros(1, 8, 60), torch.zeros(4, 8, 2, 60), torch.zeros(4, 8, 2, 60),
                                   scale=1.0, **ok)
    with pytest.raises(RuntimeError, match="int64"):
        cpu.paged_decode_attention(q, k, k, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.int32),
                                   1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu.paged_decode_attention(q.bfloat16(), k, k, scale=1.0, **ok)
    with pytest.raises(RuntimeError, match=r"context length 9 of row 0 is not in \[1, 8\]"):
        cpu.paged_decode_attention(q, k, k, ok["block_tables"], torch.tensor([9]), 1.0)
    with pytest.raises(RuntimeError, match=r"block id 4 in row 0 of the block tables is not in \[0, 4\)"):
        cpu.paged_decode_attention(q, k, k, torch.tensor([[4]]), ok["context_lens"], 1.0)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 512), (3, 40), (5, 4096), (2, 7)])
def test_rms_norm_kernel_matches_module(shape):
    from glm4.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(shape[1])
    norm = RMSNorm(shape[1], 1.5625e-07)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[1], generator=g))
    x = 4 * torch.randn(shape[0], shape[1] + 3, generator=g)[:, 1:-2]  # strided rows
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps))  # the torch formula
    torch.testing.assert_close(cpu.rms_norm(x, norm.weight, norm.eps), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(x), want, atol=1e-5, rtol=1e-5)  # the module uses the kernel once built


@needs_kernels
@pytest.mark.parametrize("rotary_dim, head_dim", [(32, 64), (64, 128), (8, 16)])
def test_rotary_kernel_matches_torch(rotary_dim, head_dim):
    from glm4.layers.rotary import RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(rotary_dim)
    heads, kv_heads, tokens = 4, 2, 6
    rope = RotaryEmbedding(rotary_dim, 10000.0, 4096)
    cos_sin = rope.cos_sin(torch.tensor([0, 1, 5, 100, 4000, 7]), torch.float32)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    qk = qkv[:, :(heads + kv_heads) * head_dim].unflatten(-1, (heads + kv_heads, head_dim))
    want = torch.cat([apply_rotary(qk, cos_sin, rotary_dim).flatten(-2), qkv[:, (heads + kv_heads) * head_dim:]], -1)
    cpu.rotary_(qkv, *cos_sin, heads + kv_heads, head_dim, rotary_dim)
    torch.testing.assert_close(qkv, want, atol=1e-6, rtol=1e-6)  # v untouched, q and k rotated


@needs_kernels
def test_argmax_kernel_matches_torch_including_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 151552, generator=g)
    x[1, 100] = x[1, 70000] = 50.0  # tie: the first index wins
    x[2, -1] = 60.0  # the maximum in the scalar tail
    x[3, 5] = float("nan")  # NaN counts as the maximum
    x[4, :] = -float("inf")
    torch.testing.assert_close(cpu.argmax(x), x.argmax(-1))
    assert cpu.argmax(x[:, :17].contiguous()).tolist() == x[:, :17].argmax(-1).tolist()


def _random_model(config, seed: int):
    from glm4.model import GLM4ForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = GLM4ForCausalLM(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.1 * noise if "layernorm" in name else noise)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model


def _decode_metadata(tables: list[list[int]], lens: list[int], block_size: int, index_dtype):
    from glm4.layers.attention import AttentionMetadata

    slots = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lens)]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=index_dtype)
    return AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=bt, context_lens=torch.tensor(lens),
                             query_lens=[1] * len(lens), context_lens_list=lens, block_size=block_size)


@needs_kernels
@pytest.mark.parametrize("layout", ["tiny", "glm-4-9b heads", "no qkv bias"])
@pytest.mark.parametrize("rows", [1, 3, cpu.MAX_ROWS])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_fused_decode_layers_match_the_unfused_blocks(layout, rows, index_dtype, monkeypatch):
    """A pure decode step through `cpu.decode_layers` (one call for all blocks) gives the same hidden states and
    writes the same K/V as the blocks run op by op on the same kernels, for 1 to MAX_ROWS rows at contexts across block
    edges, GLM-4-9B's head layout (32 query heads sharing 2 KV heads of 128) and a checkpoint without qkv bias."""
    from glm4.config import preset

    overrides = {"tiny": {}, "glm-4-9b heads": dict(hidden_size=256, ffn_hidden_size=320, num_attention_heads=32,
                                                    head_dim=128, rotary_dim=64),
                 "no qkv bias": dict(add_qkv_bias=False, ffn_hidden_size=200)}[layout]
    config = preset("tiny", **overrides)
    model = _random_model(config, seed=rows)
    assert model.prepare_for_cpu() == 4 * config.num_layers + 1
    bs, num_blocks = 4, 64
    shape = (num_blocks, bs, config.num_kv_heads, config.head_dim)
    g = torch.Generator().manual_seed(7)
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(config.num_layers)]
    lens = [1, 4, 5, 9, 16, 17, 30, 2][:rows]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [perm[8 * i: 8 * i + -(-n // bs)] for i, n in enumerate(lens)]  # scattered blocks per sequence
    meta = _decode_metadata(tables, lens, bs, index_dtype)
    ids = torch.randint(0, config.vocab_size, (rows,), generator=g)
    positions = torch.tensor(lens) - 1
    calls = []
    monkeypatch.setattr(cpu, "decode_layers", lambda *a, f=cpu.decode_layers: calls.append(1) or f(*a))
    outs = {}
    threads = torch.get_num_threads()
    # The fused stack splits its work by thread: 1 thread, this machine's count, and more threads than KV tasks.
    runs = [(False, threads), (True, threads), (True, 1), (True, 2 * config.num_kv_heads * rows + 1)]
    try:
        for fused, n in runs:
            monkeypatch.setattr(cpu, "FUSE_DECODE_LAYERS", fused)
            torch.set_num_threads(n)
            kv = [(k.clone(), v.clone()) for k, v in caches]
            with torch.no_grad():
                outs[fused, n] = model.forward_cached(ids, positions, meta, kv), kv
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3  # the fused path ran, and only when switched on
    want, kv_want = outs[False, threads]
    for run in runs[1:]:
        got, kv_got = outs[run]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        for (k0, v0), (k1, v1) in zip(kv_want, kv_got):
            torch.testing.assert_close(k1, k0, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(v1, v0, atol=2e-5, rtol=1e-5)


@needs_kernels
def test_fused_decode_layers_reject_bad_input():
    h = torch.zeros(1, 128)
    layer = [torch.ones(128), torch.zeros(256, 128), torch.empty(0), torch.zeros(128, 128), torch.ones(128),
             torch.zeros(512, 128), torch.zeros(128, 256)]
    caches = [torch.zeros(4, 4, 2, 32) for _ in range(4)]
    kv = dict(slot_mapping=torch.zeros(1, dtype=torch.long), block_tables=torch.zeros(1, 1, dtype=torch.long),
              context_lens=torch.ones(1, dtype=torch.long), cos=torch.ones(1, 8), sin=torch.zeros(1, 8), heads=4,
              kv_heads=2, rotary_dim=16, eps=1e-6, scale=0.2)
    assert cpu.decode_layers(h, layer + layer, caches, **kv).shape == (1, 128)  # well-formed, two layers
    bad = layer[:1] + [torch.zeros(128, 256)] + layer[2:]
    with pytest.raises(RuntimeError, match=r"layer 1 query_key_value.weight must be a contiguous float32 tensor "
                                           r"of shape \[256, 128\]"):
        cpu.decode_layers(h, layer + bad, caches, **kv)
    with pytest.raises(RuntimeError, match="7 weights and 2 caches per layer"):
        cpu.decode_layers(h, layer, caches, **kv)
    with pytest.raises(RuntimeError, match="1 to 8 sequences"):
        cpu.decode_layers(torch.zeros(9, 128), layer + layer, caches, **kv)
    with pytest.raises(RuntimeError, match="int64"):
        cpu.decode_layers(h, layer + layer, caches, **{**kv, "context_lens": torch.ones(1, dtype=torch.int32)})
    with pytest.raises(RuntimeError, match="slot 16 of row 0 is outside the cache's 16 slots"):
        cpu.decode_layers(h, layer + layer, caches, **{**kv, "slot_mapping": torch.tensor([16])})
    with pytest.raises(RuntimeError, match=r"block id -1 in row 0"):
        cpu.decode_layers(h, layer + layer, caches, **{**kv, "block_tables": torch.tensor([[-1]])})
