"""Attention over a paged KV cache (engine path) and plain causal attention (full-sequence path).

Both paths take q/k/v already projected and rotated, so the model runs the same layers either way.
Pure torch (SDPA), so it is correct on CPU and CUDA alike. On AVX-512 CPUs decode rows go through our fused
kernel instead (`glm4/kernels/cpu.py`), which reads K/V straight from the blocks.

KV cache layout per layer: k_cache, v_cache of shape (num_blocks, block_size, num_kv_heads, head_dim).
A token at position p of a sequence lives in block `block_table[p // block_size]` at offset `p % block_size`,
i.e. at flat slot `block_id * block_size + offset`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glm4.kernels import cpu


# Padded key positions (rows x longest context) one decode attention call may gather; bounds its temporary memory.
DECODE_GATHER_BUDGET = 1 << 18


@dataclass
class DecodeChunk:
    """Decode rows attended in one call: their rows of the flattened batch (None: all rows, in order), their block
    tables trimmed to the longest context among them, and the key-padding mask (n, max_len)."""

    rows: torch.Tensor | None
    block_tables: torch.Tensor
    max_len: int
    mask: torch.Tensor


@dataclass
class AttentionMetadata:
    """Per-step description of the flattened batch (built by the engine's model runner).

    Tokens of sequence i occupy rows query_start_loc[i]:query_start_loc[i+1] of the flattened batch; after this
    step the sequence holds context_lens[i] tokens in the cache (cached prefix + the new ones).
    """

    slot_mapping: torch.Tensor  # (num_tokens,) flat cache slot where each new token's K/V is written
    block_tables: torch.Tensor  # (num_seqs, max_blocks) block ids, padded with 0
    context_lens: torch.Tensor  # (num_seqs,)
    query_lens: list[int]
    context_lens_list: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def __post_init__(self) -> None:
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        self.query_starts = starts
        # Decode rows (one new token) are attended together, in as few batched calls as the gather budget allows;
        # prefill chunks one by one.
        self.decode_idx = [i for i, n in enumerate(self.query_lens) if n == 1]
        self.prefill_idx = [i for i, n in enumerate(self.query_lens) if n > 1]
        # Everything below depends on lengths only, not on the layer: built once per step, not once per layer.
        self._grouped_masks: dict[tuple[str, int], torch.Tensor] = {}  # grouped_mask's memo
        self.pure_decode = bool(self.decode_idx) and not self.prefill_idx  # row i of the batch is sequence i
        self._decode_chunks: list[DecodeChunk] | None = None
        self._kernel_inputs: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None

    @property
    def decode_chunks(self) -> list[DecodeChunk]:
        """The torch path's plan for the decode rows (planned at first use: the fused kernel needs none)."""
        if self._decode_chunks is None:
            self._decode_chunks = self._plan_decode() if self.decode_idx else []
        return self._decode_chunks

    @property
    def decode_in_order(self) -> bool:
        """One chunk holding every row of the batch, in order (a pure decode step within the gather budget)."""
        return self.pure_decode and len(self.decode_chunks) == 1

    def decode_kernel_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(rows of the flattened batch or None for all, block tables, context lengths) of the decode rows, for
        the fused kernel; built once per step."""
        if self._kernel_inputs is None:
            if self.pure_decode:
                self._kernel_inputs = (None, self.block_tables, self.context_lens)
            else:
                dev = self.block_tables.device
                seqs = torch.tensor(self.decode_idx, device=dev)
                rows = torch.tensor([self.query_starts[i] for i in self.decode_idx], device=dev)
                self._kernel_inputs = (rows, self.block_tables[seqs], self.context_lens[seqs])
        return self._kernel_inputs

    def _plan_decode(self) -> list[DecodeChunk]:
        """Split the decode rows into chunks whose gathered keys (rows x longest context) stay within
        DECODE_GATHER_BUDGET: the gather materialises K/V per chunk, which at 256 rows of 8k tokens would be
        gigabytes per layer. Over budget, rows are taken shortest context first, so a chunk pads little."""
        idx = self.decode_idx
        lens = [self.context_lens_list[i] for i in idx]
        if max(lens) * len(idx) <= DECODE_GATHER_BUDGET:
            groups = [list(range(len(idx)))]
        else:
            groups, cur = [], []
            for j in sorted(range(len(idx)), key=lens.__getitem__):
                if cur and (len(cur) + 1) * lens[j] > DECODE_GATHER_BUDGET:
                    groups.append(cur)
                    cur = []
                cur.append(j)
            groups.append(cur)
        in_order = len(groups) == 1 and self.pure_decode
        return [self._decode_chunk([idx[j] for j in g], in_order) for g in groups]

    def _decode_chunk(self, seqs: list[int], in_order: bool) -> DecodeChunk:
        dev = self.block_tables.device
        max_len = max(self.context_lens_list[i] for i in seqs)
        sel = None if in_order else torch.tensor(seqs, device=dev)
        tables = self.block_tables if sel is None else self.block_tables[sel]
        lens = self.context_lens if sel is None else self.context_lens[sel]
        return DecodeChunk(
            rows=None if in_order else torch.tensor([self.query_starts[i] for i in seqs], device=dev),
            # Only the blocks that hold one of these rows' keys: the table width is the whole batch's longest row.
            block_tables=tables[:, :-(-max_len // self.block_size)],
            max_len=max_len,
            mask=torch.arange(max_len, device=dev)[None, :] < lens[:, None])  # (n, max_len)

    def grouped_mask(self, key: str, group: int, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The (B, Lq, Lk) mask made by `build`, repeated for the `group` query heads folded into the query axis
        (see `_grouped_attention`); built at the first layer of a step and reused by the others."""
        k = (key, group)
        if k not in self._grouped_masks:
            mask = build()
            b, lq, lk = mask.shape
            self._grouped_masks[k] = mask.unsqueeze(1).expand(b, group, lq, lk).reshape(b, 1, group * lq, lk)
        return self._grouped_masks[k]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (B, S, H, D), k/v: (B, S, KVH, D) -> (B, S, H, D); plain causal attention with GQA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V (num_tokens, KVH, D) at their slots."""
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """(num_seqs, max_blocks) block ids -> (num_seqs, length, KVH, D) contiguous keys or values."""
    n, nb = block_tables.shape
    bs, kvh, d = cache.shape[1:]
    return cache[block_tables].reshape(n, nb * bs, kvh, d)[:, :length]


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """Masked GQA attention. q: (B, H, Lq, D); k, v: (B, KVH, Lk, D); mask: (B, 1, G*Lq, Lk) bool, the (B, Lq, Lk)
    mask repeated for the G = H // KVH heads of a group (`AttentionMetadata.grouped_mask`) -> (B, H, Lq, D).

    Query head h reads KV head h // G (G = H // KVH, heads of a group are consecutive), so the G query heads of
    a group are folded into the query-length axis and attend to their one KV head directly. Same math as SDPA's
    `enable_gqa=True`, but torch's CPU kernels take a far slower path (milliseconds for one decode row) when
    GQA and an explicit mask are combined; folded, it is a plain masked SDPA call.
    """
    b, h, lq, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    qg = q.reshape(b, kvh, g * lq, d)  # (B, KVH, G*Lq, D): query heads of one group, one after another
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, lq, d)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: (num_tokens, H, D) for the flattened batch, whose K/V were already written -> (num_tokens, H, D)."""
    group = q.shape[1] // k_cache.shape[2]
    if meta.decode_idx and cpu.can_attend(q, k_cache):
        rows, tables, lens = meta.decode_kernel_inputs()
        o = cpu.paged_decode_attention(q if rows is None else q[rows], k_cache, v_cache, tables, lens, scale)
        if rows is None:
            return o  # a pure decode step
        out = torch.empty_like(q)
        out[rows] = o
        chunks: list[DecodeChunk] = []
    else:
        out = None if meta.decode_in_order else torch.empty_like(q)
        chunks = meta.decode_chunks
    for c, chunk in enumerate(chunks):
        # Padded key positions get zero weight. The cache is zero-initialised, so padded slots never hold NaNs
        # that 0 * NaN could leak into other rows.
        keys = _gather(k_cache, chunk.block_tables, chunk.max_len)
        vals = _gather(v_cache, chunk.block_tables, chunk.max_len)
        qd = q if chunk.rows is None else q[chunk.rows]
        mask = meta.grouped_mask(f"decode{c}", group, lambda chunk=chunk: chunk.mask[:, None, :])
        o = _grouped_attention(qd.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2), mask, scale).squeeze(2)
        if chunk.rows is None:
            return o  # a pure decode step in one chunk: nothing to scatter
        out[chunk.rows] = o
    for i in meta.prefill_idx:
        s, e = meta.query_starts[i], meta.query_starts[i + 1]
        ctx, ql = meta.context_lens_list[i], e - s
        keys = _gather(k_cache, meta.block_tables[i:i + 1], ctx)[0]
        vals = _gather(v_cache, meta.block_tables[i:i + 1], ctx)[0]
        qi = q[s:e].transpose(0, 1).unsqueeze(0)  # (1, H, ql, D)
        kt, vt = keys.transpose(0, 1).unsqueeze(0), vals.transpose(0, 1).unsqueeze(0)
        if ctx == ql:  # no cached prefix: plain causal
            o = F.scaled_dot_product_attention(qi, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        else:  # query j sits at position ctx - ql + j and sees keys 0..that position
            def build(ctx: int = ctx, ql: int = ql) -> torch.Tensor:
                qpos = torch.arange(ctx - ql, ctx, device=q.device)
                return (torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None])[None]

            o = _grouped_attention(qi, kt, vt, meta.grouped_mask(f"prefill{i}", group, build), scale)
        out[s:e] = o[0].transpose(0, 1)
    return out
