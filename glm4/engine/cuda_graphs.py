"""Decode steps replayed from CUDA graphs, whole: embedding, every layer WITH its paged attention, final norm and LM
head in one graph per (batch size, context bucket).

Why: at small decode batches a GPU step is shorter than the time Python and the CUDA launcher take to issue its
kernels (GLM-4-9B at batch 1 reads ~17.6 GB in ~4 ms on an H200; 40 layers of eager launches take longer). A graph
replays a captured sequence of kernels with one launch, and nothing of the step runs on the host but a few copies
into the static buffers.

How attention fits in a graph: a graph has fixed shapes, so it is captured for a block-table width W (a context
bucket: 1K, 2K, 4K, ... tokens, up to `MAX_GRAPH_CONTEXT` and the model length). Inside, attention reads all W
columns tile by tile (`glm4.layers.attention.DecodeMetadata`) and masks keys past each row's context, which it
reads from the static `context_lens` buffer; a step runs in the narrowest bucket that holds its longest context,
so it reads at most 2x the keys it needs. Rows are padded up to the captured batch size; padding rows write their
K/V into the cache's spare block (`ModelRunner.allocate_kv_cache` keeps one past the scheduler's blocks) and their
outputs are never read. With tensor parallelism every rank captures and replays the same graphs; the NCCL
all-reduce/all-gather of the layers are captured with them.

`emulate=True` builds the same static buffers and forwards without CUDA (replay re-runs the forward): the CPU tests
exercise the bucket choice, padding and buffer wiring this way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from glm4.layers.attention import AttentionMetadata, DecodeMetadata

logger = logging.getLogger(__name__)

# Contexts above this run eagerly: a bucket's graph reads every tile of its width, and past ~16K tokens per row the
# step is long enough that launch overhead no longer matters.
MAX_GRAPH_CONTEXT = 16384
MIN_BUCKET = 1024


def capture_sizes(max_batch: int) -> list[int]:
    """Powers of two up to `max_batch`, plus `max_batch`: padding at most doubles a step's rows."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sorted(set(sizes + [max_batch]))


def context_buckets(max_context: int, block_size: int) -> list[int]:
    """Block-table widths (columns) of the captured graphs: 1K tokens doubling up to the largest context."""
    top = min(max_context, MAX_GRAPH_CONTEXT)
    tokens, out = MIN_BUCKET, []
    while True:
        out.append(-(-min(tokens, top) // block_size))
        if tokens >= top:
            return out
        tokens *= 2


class _Graph:
    """One captured forward: `fn()` reads and writes only the static buffers."""

    def __init__(self, fn: Callable[[], None], pool: object | None, emulate: bool) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        if emulate:
            fn()
            return
        # Warm up on a side stream first (lazy tables, library handles), as the CUDA graphs notes advise.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


class _Buffers:
    """Inputs and logits of every graph, allocated once at the largest size and width, outside the graphs' pool; a
    graph uses their first rows and columns. Every graph's pool memory is then scratch only, so graphs of different
    shapes may replay in any order."""

    def __init__(self, model: torch.nn.Module, rows: int, width: int, block_table_dtype: torch.dtype,
                 pad_slot: int) -> None:
        cfg = model.config
        dev = model.transformer.embedding.word_embeddings.weight.device
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        # The spare block's slot until a step fills it: warm-up and capture write no real block.
        self.slot_mapping = torch.full((rows,), pad_slot, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(rows, dtype=torch.long, device=dev)
        # Only ever holds valid block ids (zeros, then real tables), so columns past a row's table read real blocks,
        # whose keys the context mask then drops.
        self.block_tables = torch.zeros(rows, width, dtype=block_table_dtype, device=dev)
        self.logits = torch.zeros(rows, cfg.vocab_size, dtype=torch.float32, device=dev)


class DecodeGraphs:
    """Captured decode forwards for every (size, bucket) of `capture_sizes(max_batch)` x `context_buckets`."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_batch: int,
                 max_context: int, pad_slot: int, *, emulate: bool = False,
                 block_table_dtype: torch.dtype = torch.long) -> None:
        self.block_size = kv_caches[0][0].shape[1]
        self.sizes = capture_sizes(max_batch)
        self.widths = context_buckets(max_context, self.block_size)
        self.pad_slot = pad_slot
        self.buffers = _Buffers(model, self.sizes[-1], self.widths[-1], block_table_dtype, pad_slot)
        pool = None if emulate else torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Graph] = {}
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: the pool grows once
                for width in reversed(self.widths):
                    self.graphs[size, width] = _Graph(self._forward(model, kv_caches, size, width), pool, emulate)
        self.max_batch, self.max_width = self.sizes[-1], self.widths[-1]
        self.replays = 0
        logger.info("captured decode %s for batch sizes %s x context buckets %s tokens",
                    "forwards (emulated)" if emulate else "CUDA graphs", self.sizes,
                    [w * self.block_size for w in self.widths])

    def _forward(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], size: int,
                 width: int) -> Callable[[], None]:
        b = self.buffers

        def fn() -> None:
            meta = DecodeMetadata(slot_mapping=b.slot_mapping[:size], block_tables=b.block_tables[:size, :width],
                                  context_lens=b.context_lens[:size], block_size=self.block_size)
            hidden = model.forward_cached(b.input_ids[:size], b.positions[:size], meta, kv_caches)
            b.logits[:size].copy_(model.compute_logits(hidden))

        return fn

    def handles(self, meta: AttentionMetadata, num_logits: int) -> bool:
        """A pure decode step (one token per sequence, every row sampled) within the captured sizes and contexts."""
        n = meta.num_seqs
        return (0 < n <= self.max_batch and meta.pure_decode and num_logits == n
                and max(meta.context_lens_list) <= self.max_width * self.block_size)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """-> fp32 logits (n, vocab) for the n decode rows, in row order (a view of a static buffer, valid until
        the next step)."""
        n = input_ids.numel()
        size = next(s for s in self.sizes if s >= n)
        need = -(-max(meta.context_lens_list) // self.block_size)
        width = next(w for w in self.widths if w >= need)
        b = self.buffers
        b.input_ids[:n].copy_(input_ids)
        b.positions[:n].copy_(positions)
        b.slot_mapping[:n].copy_(meta.slot_mapping)
        b.context_lens[:n].copy_(meta.context_lens)
        cols = min(meta.block_tables.shape[1], width)
        b.block_tables[:n, :cols].copy_(meta.block_tables[:, :cols])
        if n < size:  # padding rows: position 0, one key, K/V into the spare block; outputs never read
            b.input_ids[n:size].zero_()
            b.positions[n:size].zero_()
            b.slot_mapping[n:size].fill_(self.pad_slot)
            b.context_lens[n:size].fill_(1)
        self.graphs[size, width].replay()
        self.replays += 1
        return b.logits[:n]
