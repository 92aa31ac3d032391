"""Per-rank model owner: loads this rank's shard, owns the paged KV cache, runs one step of the flattened batch.

The scheduler's decisions become a `StepInputs` (plain int64 tensors: token ids, positions, slot mapping, block
tables, lengths, which rows to sample). With tensor parallelism, rank 0 packs it into ONE int64 tensor and
broadcasts it (two collectives per step, no pickling); every rank unpacks it and runs the same forward.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from glm4.config import GLM4Config
from glm4.engine.cuda_graphs import DecodeGraphs
from glm4.engine.scheduler import SchedulerOutput
from glm4.layers.attention import AttentionMetadata
from glm4.weights import default_dtype, load_model

logger = logging.getLogger(__name__)

HEADER_LEN = 6  # op, num_tokens, num_seqs, block_table_width, num_logits, reserved
OP_STEP, OP_SHUTDOWN = 1, 0


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    slot_mapping: torch.Tensor  # (T,)
    query_lens: torch.Tensor  # (S,)
    context_lens: torch.Tensor  # (S,)
    block_tables: torch.Tensor  # (S, W)
    logits_indices: torch.Tensor  # (L,) rows of the flattened batch whose logits are sampled

    @classmethod
    def from_schedule(cls, out: SchedulerOutput, block_size: int) -> "StepInputs":
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qlens, clens, tables, logits_rows = [], [], [], []
        for e in out.scheduled:
            seq, start, n = e.seq, e.start_pos, e.num_new_tokens
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            table = seq.block_table
            # flat slot of position p: block_table[p // block_size] * block_size + p % block_size
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
            qlens.append(n)
            clens.append(start + n)
            tables.append(table)
            if e.sample:
                logits_rows.append(len(ids) - 1)  # the chunk's last row predicts the next token
        width = max(1, max((len(t) for t in tables), default=0))
        padded: list[int] = []  # the block tables, each padded with 0 to the widest
        for t in tables:
            padded += t
            padded += [0] * (width - len(t))
        # One tensor for every field (per-step tensor creation costs ~5 us each), in the layout `pack` sends.
        body = torch.tensor(ids + pos + slots + qlens + clens + padded + logits_rows, dtype=torch.long)
        return cls._from_body(body, len(ids), len(qlens), width, len(logits_rows))

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (header, body): fixed-size header with the sizes, then every field in one int64 tensor."""
        s, w = self.block_tables.shape
        header = torch.tensor([OP_STEP, self.input_ids.numel(), s, w, self.logits_indices.numel(), 0],
                              dtype=torch.long)
        body = torch.cat([self.input_ids, self.positions, self.slot_mapping, self.query_lens, self.context_lens,
                          self.block_tables.flatten(), self.logits_indices])
        return header, body

    @classmethod
    def unpack(cls, header: torch.Tensor, body: torch.Tensor) -> "StepInputs":
        _, t, s, w, n_logits, _ = (int(x) for x in header.tolist())
        return cls._from_body(body, t, s, w, n_logits)

    @classmethod
    def _from_body(cls, body: torch.Tensor, t: int, s: int, w: int, n_logits: int) -> "StepInputs":
        """Views of `body` (the layout of `pack`) for t tokens, s sequences, tables w wide, n_logits sampled rows."""
        parts = body.split([t, t, t, s, s, s * w, n_logits])
        return cls(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5].view(s, w), parts[6])

    @staticmethod
    def body_numel(header: torch.Tensor) -> int:
        _, t, s, w, n_logits, _ = (int(x) for x in header.tolist())
        return 3 * t + 2 * s + s * w + n_logits


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
        self.decode_graphs: DecodeGraphs | None = None

    def capture_decode_graphs(self, max_batch: int, *, emulate: bool = False) -> bool:
        """CUDA graphs for pure decode steps of up to `max_batch` sequences (see glm4/engine/cuda_graphs.py).
        CUDA with tensor_parallel_size=1 only for now (NCCL inside graphs is untested here); elsewhere, and if
        capture fails, steps run eagerly. `emulate` builds the same segments without CUDA (tests)."""
        if max_batch < 1 or not (emulate or (self.device.type == "cuda" and self.tp_size == 1)):
            return False
        try:
            self.decode_graphs = DecodeGraphs(self.model, max_batch, emulate=emulate)
        except Exception:  # a graph that cannot be captured costs speed, never the engine
            logger.warning("CUDA graph capture failed; decoding eagerly", exc_info=True)
            self.decode_graphs = None
        return self.decode_graphs is not None

    # ---- KV cache -------------------------------------------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * c.num_layers * block_size * self.model.num_kv_heads_per_rank * c.head_dim * elem

    def num_blocks_for_budget(self, kv_cache_memory: int | float | None, block_size: int,
                              max_blocks_needed: int) -> int:
        """Blocks that fit in the budget: bytes (int), a fraction of the currently free memory (float), or None
        (CUDA: 90% of free memory after loading; CPU: 20% of available RAM, at most 4 GiB). Never more blocks than
        the engine could ever use (`max_blocks_needed`), so tiny models don't reserve gigabytes."""
        free = available_memory_bytes(self.device)
        if kv_cache_memory is None:
            budget = int(0.9 * free) if self.device.type == "cuda" else min(int(0.2 * free), 4 << 30)
        elif isinstance(kv_cache_memory, float):
            if not 0.0 < kv_cache_memory <= 1.0:
                raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {kv_cache_memory}")
            budget = int(kv_cache_memory * free)
        else:
            budget = int(kv_cache_memory)
            if budget > free:
                raise ValueError(f"kv_cache_memory={budget:,} bytes exceeds the {free:,} bytes free on "
                                 f"{self.device}; lower it or pass a fraction such as 0.5")
        n = min(budget // self.kv_bytes_per_block(block_size), max_blocks_needed)
        if n < 1:
            raise ValueError(f"kv_cache_memory budget of {budget:,} bytes holds no KV block of "
                             f"{self.kv_bytes_per_block(block_size):,} bytes (block_size={block_size}); "
                             "raise kv_cache_memory or lower block_size")
        return int(n)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        shape = (num_blocks, block_size, self.model.num_kv_heads_per_rank, c.head_dim)
        # zeros, not empty: padded block-table entries read real (finite) memory, never NaN garbage.
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(c.num_layers)]
        self.block_size = block_size
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB per rank)", num_blocks, block_size,
                    num_blocks * block_size, num_blocks * self.kv_bytes_per_block(block_size) / 2**20)

    # ---- one step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Forward the flattened batch; return fp32 logits (L, vocab) for the rows to sample."""
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=inputs.slot_mapping.to(dev, non_blocking=True),
            block_tables=inputs.block_tables.to(dev, non_blocking=True),
            context_lens=inputs.context_lens.to(dev, non_blocking=True),
            query_lens=inputs.query_lens.tolist(),
            context_lens_list=inputs.context_lens.tolist(),
            block_size=self.block_size,
        )
        if self.decode_graphs is not None and self.decode_graphs.handles(meta, inputs.logits_indices.numel()):
            return self.decode_graphs.run(inputs.input_ids.to(dev, non_blocking=True),
                                          inputs.positions.to(dev, non_blocking=True), meta, self.kv_caches)
        hidden = self.model.forward_cached(inputs.input_ids.to(dev, non_blocking=True),
                                           inputs.positions.to(dev, non_blocking=True), meta, self.kv_caches)
        return self.model.compute_logits(hidden[inputs.logits_indices.to(dev)])


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
