"""Per-rank model owner: loads this rank's shard, owns the paged KV cache and the persistent batch, runs one step
of the flattened batch.

The scheduler's decisions become a `StepInputs` (glm4/engine/step_inputs.py: one int64 tensor with token ids,
positions, slot mapping, lengths, block-table updates, which rows to sample). With tensor parallelism, rank 0
broadcasts it (two collectives per step, no pickling); every rank applies it to its own persistent batch
(glm4/engine/input_batch.py) and runs the same forward.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from glm4.config import GLM4Config
from glm4.engine.cuda_graphs import DecodeGraphs
from glm4.engine.input_batch import InputBatch
from glm4.engine.memory_profile import (kv_cache_budget, profile_step_memory, profiles_step,
                                       step_reserve_bytes)
from glm4.engine.step_inputs import StepInputs
from glm4.layers.attention import tile_working_bytes
from glm4.weights import default_dtype, load_model

logger = logging.getLogger(__name__)

def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ModelRunner:
    """Owns one rank's model shard and KV cache. Construct on every rank; only rank 0 samples."""

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype | str | None = None,
                 device: str | torch.device | None = None, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: dist.ProcessGroup | None = None, load_format: str = "safetensors") -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype or default_dtype(self.device)
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        if load_format == "dummy":  # benchmarks: random weights made on the device, only config.json is read
            self.model = dummy_model(model_dir, dtype=self.dtype, device=self.device, tp_rank=tp_rank,
                                     tp_size=tp_size, tp_group=tp_group)
        elif load_format == "safetensors":
            self.model = load_model(model_dir, dtype=self.dtype, device=self.device, tp_rank=tp_rank,
                                    tp_size=tp_size, tp_group=tp_group)
        else:
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
        self.config: GLM4Config = self.model.config
        if self.device.type == "cpu":
            prepared = self.model.prepare_for_cpu()
            logger.debug("prepared %d linear layers for the CPU kernels", prepared)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.input_batch: InputBatch | None = None
        self.num_blocks = 0  # the scheduler's blocks; the cache holds one more (see allocate_kv_cache)
        self.max_model_len = 0
        self.decode_graphs: DecodeGraphs | None = None
        self.graph_steps = 0  # steps replayed from a CUDA graph / run eagerly (engine stats)
        self.eager_steps = 0

    def capture_decode_graphs(self, max_batch: int, *, emulate: bool = False) -> bool:
        """CUDA graphs of whole decode forwards for up to `max_batch` sequences (glm4/engine/cuda_graphs.py), on
        every rank with tensor parallelism (each rank must call this at the same point: the capture runs the
        layers' collectives). CPU: nothing, unless `emulate` (tests build the same forwards without CUDA). A
        capture that fails raises: graphs are the configured behaviour, and `enforce_eager=True` is the explicit
        way to run without them."""
        if max_batch < 1 or not (emulate or self.device.type == "cuda"):
            return False
        assert self.kv_caches, "allocate_kv_cache first: the graphs capture the cache's addresses"
        try:
            self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, max_batch, self.max_model_len,
                                              pad_slot=self.num_blocks * self.block_size, emulate=emulate,
                                              block_table_dtype=self.input_batch.block_table.dtype)
        except Exception as e:
            raise RuntimeError(f"CUDA graph capture failed on {self.device} (tp rank {self.tp_rank}): "
                               f"{type(e).__name__}: {e}; pass enforce_eager=True to decode without graphs") from e
        return True

    # ---- KV cache -------------------------------------------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * c.num_layers * block_size * self.model.num_kv_heads_per_rank * c.head_dim * elem

    def num_blocks_for_budget(self, kv_cache_memory: int | float | None, block_size: int, max_blocks_needed: int,
                              *, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """Blocks that fit in the budget: bytes (int), a fraction of the currently free memory (float), or None
        (CUDA: 90% of free memory after loading; CPU: 20% of available RAM, at most 4 GiB). A budget relative to
        free memory first gives up the measured working memory of the largest step: `max_num_batched_tokens`
        tokens, `max_num_seqs` sampled rows (glm4/engine/memory_profile.py). Never more blocks than the engine
        could ever use (`max_blocks_needed`), so tiny models don't reserve gigabytes."""
        reserve = 0
        if profiles_step(kv_cache_memory, self.device):
            num_logits = min(max_num_seqs, max_num_batched_tokens)
            peak = profile_step_memory(self.model, dtype=self.dtype, device=self.device,
                                       num_tokens=max_num_batched_tokens, num_logits=num_logits,
                                       block_size=block_size)
            attn = self.model.transformer.encoder.layers[0].self_attention
            reserve = step_reserve_bytes(peak, num_logits, self.config.vocab_size) + tile_working_bytes(
                self.device, attn.num_heads, attn.num_kv_heads * attn.head_dim)
        free = available_memory_bytes(self.device)  # measured after the profile run gave its memory back
        budget = kv_cache_budget(kv_cache_memory, free, self.device, reserve)
        per_block = self.kv_bytes_per_block(block_size)
        n = min(budget // per_block, max_blocks_needed)
        if n < 1:
            held = f" (after holding back {reserve:,} bytes for the largest step)" if reserve else ""
            raise ValueError(f"kv_cache_memory leaves {budget:,} bytes{held}, no room for a KV block of "
                             f"{per_block:,} bytes (block_size={block_size}); raise kv_cache_memory or lower "
                             "block_size" + (", max_num_batched_tokens or max_num_seqs" if reserve else ""))
        return int(n)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, *, max_num_seqs: int,
                          max_model_len: int | None) -> None:
        """The KV cache, and the persistent batch whose block table indexes it: a row per scheduler slot, a column
        per block of a `max_model_len` sequence (None: the model's max_position_embeddings)."""
        c = self.config
        # One spare block past the scheduler's: the padding rows of a CUDA-graph decode step write their K/V there.
        shape = (num_blocks + 1, block_size, self.model.num_kv_heads_per_rank, c.head_dim)
        # zeros, not empty: padded block-table entries read real (finite) memory, never NaN garbage.
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(c.num_layers)]
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_model_len = max_model_len or c.max_position_embeddings
        self.input_batch = InputBatch(max_num_seqs, self.max_model_len, block_size, self.device)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB per rank)", num_blocks, block_size,
                    num_blocks * block_size, num_blocks * self.kv_bytes_per_block(block_size) / 2**20)

    # ---- one step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Forward the flattened batch; return fp32 logits (L, vocab) for the rows to sample."""
        assert self.input_batch is not None, "allocate_kv_cache first"
        step, meta = self.input_batch.prepare(inputs)
        if self.decode_graphs is not None and self.decode_graphs.handles(meta, step.logits_indices.numel()):
            self.graph_steps += 1
            return self.decode_graphs.run(step.input_ids, step.positions, meta)
        self.eager_steps += 1
        hidden = self.model.forward_cached(step.input_ids, step.positions, meta, self.kv_caches)
        return self.model.compute_logits(hidden[step.logits_indices])


@torch.no_grad()
def dummy_model(model_dir: str | Path, *, dtype: torch.dtype, device: torch.device, tp_rank: int = 0,
                tp_size: int = 1, tp_group: dist.ProcessGroup | None = None):
    """The model of `model_dir/config.json` with seeded random weights, built directly on the device (no I/O):
    measures speed on the real shape (e.g. GLM-4-9B on a GPU) without 18.8 GB of downloads."""
    from glm4.model import GLM4ForCausalLM

    config = GLM4Config.from_json(Path(model_dir) / "config.json")
    with torch.device("meta"):
        model = GLM4ForCausalLM(config, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group, dtype=dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(1234 + tp_rank)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0) if "layernorm" in name else p.normal_(0.0, 0.02, generator=g)
        else:
            p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
    return model.eval()


def max_blocks_needed(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    return max_num_seqs * math.ceil(max_model_len / block_size) + 1
