"""Decode steps replayed from CUDA graphs, piecewise: attention over the paged cache runs eagerly in between.

Why: at small decode batches a GPU step is shorter than the time Python and the CUDA launcher take to issue its
~30 kernels per layer (GLM-4-9B at batch 1 reads 18.8 GB in ~4 ms on an H200; 40 layers of eager launches take
longer). A graph replays a captured sequence of kernels with one launch.

What is captured: for each batch size of `capture_sizes`, the forward is cut at every attention core into
segments, as vLLM's piecewise graphs do:
  seg 0      embedding + rotary table rows + layer 0 up to q/k/v
  seg l      layer l-1 after attention (o-proj, residual, MLP) + layer l up to q/k/v
  seg L      layer L-1 after attention + final norm + LM head -> fp32 logits
Every segment is row-wise (no token looks at another), so a step of n decode rows runs in the smallest captured
size >= n, with padding rows that nobody reads. The attention core in between (KV write, paged attention) runs
eagerly on the n real rows with the step's ordinary metadata, so variable context lengths and block tables need
no fixed-shape kernel. Mixed prefill/decode steps, and batches above the largest size, run fully eagerly.

`emulate=True` builds the same static buffers and segments without CUDA (replay re-runs the segment eagerly and
copies into the captured outputs): the CPU tests exercise the padding and buffer plumbing this way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from glm4.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_batch` (vLLM's default spacing), plus `max_batch`."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


class _Segment:
    """One captured piece of the forward: `fn()` reads and writes only the static buffers."""

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
    """Every segment's inputs and outputs, allocated once at the largest size, outside the graphs' pool; a batch
    size uses their first rows. Sharing them keeps graph memory to one set of activations whatever the number of
    sizes (outputs allocated inside each capture would cost sizes x layers sets, gigabytes for the 9B model).
    Every graph's pool memory is then scratch only, so graphs of different sizes may replay in any order."""

    def __init__(self, model: torch.nn.Module, rows: int) -> None:
        cfg, attn = model.config, model.transformer.encoder.layers[0].self_attention
        emb = model.transformer.embedding.word_embeddings.weight  # never packed: its device and dtype are the model's
        kw = dict(device=emb.device, dtype=emb.dtype)
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=emb.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=emb.device)
        self.h = torch.zeros(rows, cfg.hidden_size, **kw)
        self.q = torch.zeros(rows, attn.num_heads, cfg.head_dim, **kw)
        self.k = torch.zeros(rows, attn.num_kv_heads, cfg.head_dim, **kw)
        self.v = torch.zeros(rows, attn.num_kv_heads, cfg.head_dim, **kw)
        self.cos = torch.zeros(rows, 1, cfg.rotary_dim // 2, **kw)
        self.sin = torch.zeros(rows, 1, cfg.rotary_dim // 2, **kw)
        self.attn = torch.zeros(rows, attn.num_heads * cfg.head_dim, **kw)  # attention output of the layer before
        self.logits = torch.zeros(rows, cfg.vocab_size, dtype=torch.float32, device=emb.device)

    def rows(self, n: int) -> "_Buffers":
        view = object.__new__(_Buffers)
        view.__dict__.update({k: t[:n] for k, t in self.__dict__.items()})
        return view


class _SizeGraphs:
    """The segments of one batch size, reading and writing the first `size` rows of the shared buffers."""

    def __init__(self, model: torch.nn.Module, b: _Buffers, pool: object | None, emulate: bool) -> None:
        t, layers = model.transformer, model.transformer.encoder.layers

        def store(h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            b.h.copy_(h)
            b.q.copy_(q)
            b.k.copy_(k)
            b.v.copy_(v)

        def first() -> None:
            h = t.embedding(b.input_ids)
            cos, sin = t.rotary_pos_emb.cos_sin(b.positions, h.dtype)
            b.cos.copy_(cos)
            b.sin.copy_(sin)
            store(h, *layers[0].pre_attention(h, (b.cos, b.sin)))

        def middle(i: int) -> Callable[[], None]:
            def seg() -> None:
                h = layers[i - 1].post_attention(b.h, b.attn)
                store(h, *layers[i].pre_attention(h, (b.cos, b.sin)))
            return seg

        def last() -> None:
            h = layers[-1].post_attention(b.h, b.attn)
            b.logits.copy_(model.compute_logits(t.encoder.final_layernorm(h)))

        self.size = b.input_ids.numel()
        self.first = _Segment(first, pool, emulate)
        self.middle = [_Segment(middle(i), pool, emulate) for i in range(1, len(layers))]
        self.last = _Segment(last, pool, emulate)


class DecodeGraphs:
    """Captured decode forwards for every size of `capture_sizes(max_batch)` (one shared memory pool)."""

    def __init__(self, model: torch.nn.Module, max_batch: int, *, emulate: bool = False) -> None:
        self.layers = model.transformer.encoder.layers
        sizes = capture_sizes(max_batch)
        self.buffers = _Buffers(model, max(sizes))
        pool = None if emulate else torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _SizeGraphs] = {}
        with torch.inference_mode():
            for size in sorted(sizes, reverse=True):
                self.graphs[size] = _SizeGraphs(model, self.buffers.rows(size), pool, emulate)
        self.max_batch = max(sizes)
        logger.info("captured decode %s for batch sizes %s", "segments (emulated)" if emulate else "CUDA graphs",
                    sizes)

    def handles(self, meta: AttentionMetadata, num_logits: int) -> bool:
        """A pure decode step (one token per sequence, every row sampled) within the captured sizes."""
        n = meta.num_seqs
        return 0 < n <= self.max_batch and len(meta.decode_idx) == n and num_logits == n

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """-> fp32 logits (n, vocab) for the n decode rows, in row order (a view of a static buffer, valid until
        the next step)."""
        n = input_ids.numel()
        g = self.graphs[min(s for s in self.graphs if s >= n)]
        b = self.buffers
        b.input_ids[:n].copy_(input_ids)
        b.positions[:n].copy_(positions)
        if n < g.size:  # padding rows: any valid id and position; their outputs are never read
            b.input_ids[n:g.size].zero_()
            b.positions[n:g.size].zero_()
            b.attn[n:g.size].zero_()
        g.first.replay()
        for i, layer in enumerate(self.layers):
            b.attn[:n].copy_(layer.self_attention.attend(b.q[:n], b.k[:n], b.v[:n], meta, kv_caches[i]))
            (g.middle[i] if i < len(g.middle) else g.last).replay()
        return b.logits[:n]
