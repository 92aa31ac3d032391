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

Tensors = tuple[torch.Tensor, ...]


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_batch` (vLLM's default spacing), plus `max_batch`."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


class _Segment:
    """One captured piece of the forward: `fn(*inputs)` -> a tuple of tensors at fixed addresses."""

    def __init__(self, fn: Callable[..., Tensors], inputs: Tensors, pool: object | None, emulate: bool) -> None:
        self.fn, self.inputs = fn, inputs
        self.graph: torch.cuda.CUDAGraph | None = None
        if emulate:
            self.outputs = fn(*inputs)
            return
        # Warm up on a side stream first (lazy tables, library handles), as the CUDA graphs notes advise.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*inputs)

    def replay(self) -> Tensors:
        if self.graph is not None:
            self.graph.replay()
        else:
            for dst, src in zip(self.outputs, self.fn(*self.inputs)):
                dst.copy_(src)
        return self.outputs


class _SizeGraphs:
    """The segments of one batch size, wired through static input buffers."""

    def __init__(self, model: torch.nn.Module, size: int, pool: object | None, emulate: bool) -> None:
        cfg, layers = model.config, model.transformer.encoder.layers
        emb = model.transformer.embedding.word_embeddings.weight  # never packed: its device and dtype are the model's
        dev, dtype = emb.device, emb.dtype
        attn_width = layers[0].self_attention.num_heads * cfg.head_dim
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(size, dtype=torch.long, device=dev)
        self.attn = torch.zeros(size, attn_width, dtype=dtype, device=dev)  # attention output of the layer before
        t = model.transformer

        def first(ids: torch.Tensor, positions: torch.Tensor) -> Tensors:
            h = t.embedding(ids)
            cos, sin = t.rotary_pos_emb.cos_sin(positions, h.dtype)
            return (h, *layers[0].pre_attention(h, (cos, sin)), cos, sin)

        def middle(i: int) -> Callable[..., Tensors]:
            def seg(h: torch.Tensor, attn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tensors:
                h = layers[i - 1].post_attention(h, attn)
                return (h, *layers[i].pre_attention(h, (cos, sin)))
            return seg

        def last(h: torch.Tensor, attn: torch.Tensor) -> Tensors:
            h = layers[-1].post_attention(h, attn)
            return (model.compute_logits(t.encoder.final_layernorm(h)),)

        self.first = _Segment(first, (self.input_ids, self.positions), pool, emulate)
        h, _, _, _, cos, sin = self.first.outputs
        self.middle: list[_Segment] = []
        for i in range(1, len(layers)):
            seg = _Segment(middle(i), (h, self.attn, cos, sin), pool, emulate)
            self.middle.append(seg)
            h = seg.outputs[0]
        self.last = _Segment(last, (h, self.attn), pool, emulate)


class DecodeGraphs:
    """Captured decode forwards for every size of `capture_sizes(max_batch)` (one shared memory pool)."""

    def __init__(self, model: torch.nn.Module, max_batch: int, *, emulate: bool = False) -> None:
        self.model = model
        self.layers = model.transformer.encoder.layers
        pool = None if emulate else torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _SizeGraphs] = {}
        with torch.inference_mode():
            # Largest first: the smaller sizes then reuse the pool's memory.
            for size in sorted(capture_sizes(max_batch), reverse=True):
                self.graphs[size] = _SizeGraphs(model, size, pool, emulate)
        self.max_batch = max(self.graphs)
        logger.info("captured decode %s for batch sizes %s", "segments (emulated)" if emulate else "CUDA graphs",
                    sorted(self.graphs))

    def handles(self, meta: AttentionMetadata, num_logits: int) -> bool:
        """A pure decode step (one token per sequence, every row sampled) within the captured sizes."""
        n = meta.num_seqs
        return 0 < n <= self.max_batch and len(meta.decode_idx) == n and num_logits == n

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """-> fp32 logits (n, vocab) for the n decode rows, in row order."""
        n = input_ids.numel()
        g = self.graphs[min(s for s in self.graphs if s >= n)]
        g.input_ids[:n].copy_(input_ids)
        g.positions[:n].copy_(positions)
        if n < g.size:  # padding rows: any valid id and position; their outputs are never read
            g.input_ids[n:].zero_()
            g.positions[n:].zero_()
            g.attn[n:].zero_()
        outs = g.first.replay()
        for i, layer in enumerate(self.layers):
            _, q, k, v = outs[:4]
            g.attn[:n].copy_(layer.self_attention.attend(q[:n], k[:n], v[:n], meta, kv_caches[i]))
            outs = g.middle[i].replay() if i < len(g.middle) else g.last.replay()
        return outs[0][:n]
