"""Attention over a paged KV cache (engine path) and plain causal attention (full-sequence path).

Both paths take q/k/v already projected and rotated, so the model runs the same layers either way.

Paged attention reads the cache through the block tables, tile by tile, with an online softmax (FlashAttention's
recurrence): for each tile of `tile_blocks` block-table columns, the tile's K/V blocks are read, every query of the
step scores them, and running (max, sum, weighted values) are rescaled and accumulated. Nothing the size of the
context is ever built: no gathered copy of a sequence's K/V, no (queries x keys) mask (causality and lengths are
compared per tile from positions), and the working memory of a layer is O(step tokens x heads x tile), bounded by
`TILE_BUDGET` whatever the context length (16K or 1M tokens). Decode rows of a step are one batched call; the
prefill chunks of a step (fresh prompts, later chunks, prompts behind a cached prefix) are another, padded to a
common query length within groups of similar lengths (no Python loop per sequence per layer). The plan (index
maps, positions, tile size) depends on lengths only, so it is built once per step and reused by every layer.

On AVX-512 CPUs decode rows go through our fused kernel instead (`glm4/kernels/cpu.py`), which reads K/V straight
from the blocks and is faster there (bench/engine.py (b)).

KV cache layout per layer: k_cache, v_cache of shape (num_blocks, block_size, num_kv_heads, head_dim).
A token at position p of a sequence lives in block `block_table[p // block_size]` at offset `p % block_size`,
i.e. at flat slot `block_id * block_size + offset`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glm4.kernels import cpu

# CUDA: elements of one tile's temporaries (scores of every query row against the tile's keys, plus the tile's K/V):
# bounds attention working memory per layer, independent of the context length. 2^26 fp32 = 256 MiB: wide tiles,
# few kernels (a 16K-token decode bucket of 256 rows is 34 tiles per layer).
TILE_BUDGET = 1 << 26
# On CPU the scores of one (query block x key tile) stay cache-sized, so the softmax passes over them (max, exp, sum)
# run from cache, not from DRAM: 2^20 fp32 = 4 MiB, key tiles of at most 2048 tokens.
CPU_SCORE_BLOCK = 1 << 20
CPU_MAX_TILE_KEYS = 2048

# A masked score: finite, so a query row whose keys in one tile are all masked gets exp(-huge) = 0 weight there, not
# NaN (every real query sees key 0 in the first tile, so its running max is finite from then on).
_MASKED = -1e30


@dataclass
class _Group:
    """Sequences attended in one call: their padded query rows and what each row may see."""

    rows: torch.Tensor  # (n, Lq) row of the flattened batch holding each padded query (padding: row 0)
    dest: torch.Tensor  # (n * Lq,) output row of each padded query; padding writes to a spare row past the end
    qpos: torch.Tensor  # (n, Lq) position of each query; padding -1 (sees nothing)
    block_tables: torch.Tensor  # (n, W) trimmed to the group's longest context
    max_ctx: int
    tile_blocks: int  # block columns per key tile
    query_block: int  # query positions per (query block x key tile) call
    first_pos: int = -1  # lowest position of a real query (-1: unknown): keys up to it need no mask
    fresh: bool = False  # every sequence's queries are its whole context (a prompt with nothing cached before it)
    last_start: int = 1 << 62  # highest first-query position of a sequence: keys past it + j are in the future of
    # query j of every sequence (a tile wholly in the future is skipped)


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
        self.decode_idx = [i for i, n in enumerate(self.query_lens) if n == 1]
        self.prefill_idx = [i for i, n in enumerate(self.query_lens) if n > 1]
        self.pure_decode = bool(self.decode_idx) and not self.prefill_idx  # row i of the batch is sequence i
        # Built at the first layer that needs them, reused by the others (they depend on lengths only).
        self._decode: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None
        self._groups: dict[tuple[str, int], list[_Group]] = {}

    def decode_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(rows of the flattened batch or None for all, block tables, context lengths) of the decode rows."""
        if self._decode is None:
            if self.pure_decode:
                self._decode = (None, self.block_tables, self.context_lens)
            else:
                dev = self.block_tables.device
                seqs = torch.tensor(self.decode_idx, device=dev)
                rows = torch.tensor([self.query_starts[i] for i in self.decode_idx], device=dev)
                self._decode = (rows, self.block_tables[seqs], self.context_lens[seqs])
        return self._decode

    def groups(self, kind: str, heads: int, kv_elems: int) -> list[_Group]:
        """The tiled path's plan for the "decode" or "prefill" sequences, for `heads` query heads and K/V rows of
        `kv_elems` elements (KV heads x head_dim), which size the tiles."""
        key = (kind, heads, kv_elems)
        if key not in self._groups:
            if kind == "decode":
                parts = [self.decode_idx]
            else:  # fresh prompts (nothing cached before them) apart: they need only the step's own K/V
                fresh = [i for i in self.prefill_idx if self.context_lens_list[i] == self.query_lens[i]]
                parts = [fresh, [i for i in self.prefill_idx if i not in set(fresh)]]
            self._groups[key] = [self._group(g, heads, kv_elems) for idx in parts if idx for g in self._split(idx)]
        return self._groups[key]

    def _split(self, idx: list[int]) -> list[list[int]]:
        """Sequences by query length, longest first, cut where padding to the group's longest would more than double
        the group's query rows: padded work stays within 2x of the real work, one call per group."""
        order = sorted(idx, key=lambda i: -self.query_lens[i])
        groups: list[list[int]] = []
        real = 0
        for i in order:
            if groups and (len(groups[-1]) + 1) * self.query_lens[groups[-1][0]] > 2 * (real + self.query_lens[i]):
                groups.append([])
                real = 0
            if not groups:
                groups.append([])
            groups[-1].append(i)
            real += self.query_lens[i]
        return groups

    def _group(self, seqs: list[int], heads: int, kv_elems: int) -> _Group:
        dev = self.block_tables.device
        lq = max(self.query_lens[i] for i in seqs)
        max_ctx = max(self.context_lens_list[i] for i in seqs)
        sel = torch.tensor(seqs, device=dev)
        start = torch.tensor([self.query_starts[i] for i in seqs], device=dev)[:, None]
        qlen = torch.tensor([self.query_lens[i] for i in seqs], device=dev)[:, None]
        j = torch.arange(lq, device=dev)[None, :]
        valid = j < qlen
        ctx = self.context_lens.to(dev)[sel][:, None]
        width = -(-max_ctx // self.block_size)
        tile, qblock = _tiling(dev, len(seqs), lq, heads, kv_elems, width, self.block_size)
        starts = [self.context_lens_list[i] - self.query_lens[i] for i in seqs]  # each sequence's first position
        total = self.query_starts[-1]
        return _Group(rows=torch.where(valid, start + j, 0), dest=torch.where(valid, start + j, total).flatten(),
                      qpos=torch.where(valid, ctx - qlen + j, -1), block_tables=self.block_tables[sel, :width],
                      max_ctx=max_ctx, tile_blocks=tile, query_block=qblock, first_pos=min(starts),
                      last_start=max(starts), fresh=max(starts) == 0)


def _tiling(device: torch.device, n: int, lq: int, heads: int, kv_elems: int, width: int,
            block_size: int) -> tuple[int, int]:
    """(block columns per key tile, query positions per block) for n sequences of lq queries. CUDA: the widest
    tile whose scores (query rows x heads x keys) and K/V (keys x kv_elems, twice) fit TILE_BUDGET, all queries at
    once (few, large kernels). CPU: cache-sized score blocks (CPU_SCORE_BLOCK)."""
    if device.type == "cuda":
        tile = TILE_BUDGET // (n * (lq * heads + 2 * kv_elems) * block_size)
        return max(1, min(width, tile)), lq
    # Keys per tile: as many as leave room for blocks of 64 queries (fewer, larger matmuls than tiny blocks).
    keys = min(CPU_MAX_TILE_KEYS, max(block_size, CPU_SCORE_BLOCK // (n * heads * min(lq, 64))))
    tile = max(1, min(width, keys // block_size))
    return tile, max(1, min(lq, CPU_SCORE_BLOCK // (n * heads * tile * block_size)))


@dataclass
class DecodeMetadata:
    """A decode step of fixed shape, for whole-forward CUDA graphs (glm4/engine/cuda_graphs.py): n rows of one new
    token each, block tables exactly W columns wide. Attention reads all W columns, tile by tile (a loop count
    fixed at capture) and masks keys past each row's context from `context_lens`, so a graph captured for width W
    serves every context up to W * block_size with nothing computed on the host.
    """

    slot_mapping: torch.Tensor  # (n,)
    block_tables: torch.Tensor  # (n, W)
    context_lens: torch.Tensor  # (n,) >= 1
    block_size: int

    def __post_init__(self) -> None:
        self._group: dict[tuple[int, int], _Group] = {}

    def group(self, heads: int, kv_elems: int) -> _Group:
        """Device ops only (captured with the graph); built at the first layer, reused by the others."""
        key = (heads, kv_elems)
        if key not in self._group:
            n, width = self.block_tables.shape
            rows = torch.arange(n, device=self.block_tables.device)
            tile, qblock = _tiling(self.block_tables.device, n, 1, heads, kv_elems, width, self.block_size)
            self._group[key] = _Group(rows=rows[:, None], dest=rows, qpos=(self.context_lens - 1)[:, None],
                                      block_tables=self.block_tables, max_ctx=width * self.block_size,
                                      tile_blocks=tile, query_block=qblock)
        return self._group[key]


def tile_working_bytes(device: torch.device, heads: int, kv_elems: int) -> int:
    """An upper bound on what one tiled attention call holds beyond its inputs and outputs, for `heads` query heads
    and K/V rows of `kv_elems` elements (the profile run that sizes the KV cache sees only fresh prompts, so this
    is reserved on top of what it measures). CUDA: TILE_BUDGET elements of scores + K/V in fp32, and as much again
    for the scores' copy in the value dtype and the exp. CPU: one score block (fp32, plus its bool mask), and a K/V
    tile of at most max(CPU_SCORE_BLOCK / heads, CPU_MAX_TILE_KEYS) keys (`_tiling`), twice, in fp32."""
    if device.type == "cuda":
        return TILE_BUDGET * 4 * 2
    keys = max(CPU_SCORE_BLOCK // heads, CPU_MAX_TILE_KEYS)
    return CPU_SCORE_BLOCK * 5 + 2 * keys * kv_elems * 4


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


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: _Group,
                  scale: float) -> torch.Tensor:
    """Tiled online-softmax attention of one group. q: (T, H, D) flattened batch -> (n, Lq, H, D) padded rows.

    Query head h reads KV head h // G (heads of a group are consecutive), so queries are shaped
    (n, KVH, Lq * G, D), query position major, and each (query block x key tile) is two batched matmuls against
    the tile's K (n, KVH, D, keys) and V (n, KVH, keys, D), each made contiguous once per tile."""
    n, lq = g.rows.shape
    _, bs, kvh, d = k_cache.shape
    h = q.shape[1]
    grp = h // kvh
    qg = (q[g.rows] * scale).view(n, lq, kvh, grp, d).transpose(1, 2).reshape(n, kvh, lq * grp, d)
    qpos = g.qpos.repeat_interleave(grp, dim=1)[:, None, :, None]  # (n, 1, Lq*G, 1)
    if g.tile_blocks * bs >= g.max_ctx and g.query_block >= lq:
        # One tile covers every key (short contexts, most decode steps): one masked SDPA call over strided views of
        # the tile (its mask is tile-sized, like the scores; query heads folded into the query axis, as SDPA's CPU
        # kernels are slow when GQA and a mask are combined).
        k_t, v_t = (cache[g.block_tables].view(n, -1, kvh, d).transpose(1, 2) for cache in (k_cache, v_cache))
        mask = torch.arange(k_t.shape[2], device=q.device) <= qpos
        out = F.scaled_dot_product_attention(qg, k_t, v_t, attn_mask=mask, scale=1.0)
        return out.view(n, kvh, lq, grp, d).transpose(1, 2).reshape(n, lq, h, d)
    m = torch.full((n, kvh, lq * grp, 1), _MASKED, device=q.device)  # running max, sum, weighted values (fp32)
    s = torch.zeros((n, kvh, lq * grp, 1), device=q.device)
    acc = torch.zeros((n, kvh, lq * grp, d), device=q.device)
    for c0 in range(0, -(-g.max_ctx // bs), g.tile_blocks):
        cols = g.block_tables[:, c0:c0 + g.tile_blocks]  # (n, c)
        k_t = k_cache[cols].view(n, -1, kvh, d).permute(0, 2, 3, 1).contiguous()  # (n, KVH, D, keys)
        v_t = v_cache[cols].view(n, -1, kvh, d).transpose(1, 2).contiguous()  # (n, KVH, keys, D)
        first_key, last_key = c0 * bs, (c0 + cols.shape[1]) * bs - 1
        kpos = torch.arange(first_key, last_key + 1, device=q.device)
        for j0 in range(0, lq, g.query_block):
            j1 = min(lq, j0 + g.query_block)
            if first_key > g.last_start + j1 - 1:  # every key of the tile is in these queries' future
                continue
            r = slice(j0 * grp, j1 * grp)
            # Matmuls in the cache dtype (bf16 on GPUs, fp32 accumulation inside), softmax statistics in fp32.
            scores = (qg[:, :, r] @ k_t).float()
            if last_key > g.first_pos + j0:  # causal + context length; tiles all queries see whole skip it
                scores.masked_fill_(kpos > qpos[:, :, r], _MASKED)
            m_r, s_r, acc_r = m[:, :, r], s[:, :, r], acc[:, :, r]
            m_new = torch.maximum(m_r, scores.amax(dim=-1, keepdim=True))
            p = scores.sub_(m_new).exp_()
            alpha = (m_r - m_new).exp_()
            s_r.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            acc_r.mul_(alpha).add_((p.to(v_t.dtype) @ v_t).float())
            m_r.copy_(m_new)
    out = (acc / s).view(n, kvh, lq, grp, d).transpose(1, 2).reshape(n, lq, h, d)
    return out.to(q.dtype)


def _fresh_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: _Group, scale: float) -> torch.Tensor:
    """Prompts with nothing cached before them see only their own new tokens: causal SDPA over the step's own K/V,
    padded per group (the flash kernels on CPU and CUDA; O(tokens) memory, no mask, the cache is not read). Padding
    rows sit after each sequence's real rows, so causality keeps them out of the real rows' view."""
    o = F.scaled_dot_product_attention(q[g.rows].transpose(1, 2), k[g.rows].transpose(1, 2),
                                       v[g.rows].transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata | DecodeMetadata, scale: float, k: torch.Tensor | None = None,
                    v: torch.Tensor | None = None) -> torch.Tensor:
    """q: (num_tokens, H, D) for the flattened batch, whose K/V were already written -> (num_tokens, H, D).
    `k`, `v`: the step's own new K/V (num_tokens, KVH, D), for fresh prompts (else they are read from the cache)."""
    t, h, d = q.shape
    if isinstance(meta, DecodeMetadata):
        g = meta.group(h, k_cache.shape[2] * k_cache.shape[3])
        return _attend_group(q, k_cache, v_cache, g, scale).view(t, h, d)
    out = torch.empty((t + 1, h, d), dtype=q.dtype, device=q.device)  # + a spare row for padded queries
    kinds = ["decode", "prefill"]
    if meta.decode_idx and cpu.can_attend(q, k_cache):
        rows, tables, lens = meta.decode_inputs()
        o = cpu.paged_decode_attention(q if rows is None else q[rows], k_cache, v_cache, tables, lens, scale)
        if rows is None:
            return o  # a pure decode step
        out[rows] = o
        kinds = ["prefill"]
    for kind in kinds:
        for g in meta.groups(kind, h, k_cache.shape[2] * k_cache.shape[3]):
            # index_copy_, not a boolean-mask assignment: no host sync (the destinations are known per step).
            o = (_fresh_prefill(q, k, v, g, scale) if g.fresh and k is not None
                 else _attend_group(q, k_cache, v_cache, g, scale))
            out.index_copy_(0, g.dest, o.flatten(0, 1))
    return out[:t]
