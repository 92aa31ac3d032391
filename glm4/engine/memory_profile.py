"""How much memory the KV cache gets: a relative budget minus the working memory of the largest step.

The largest step the scheduler can build is `max_num_batched_tokens` tokens through every layer, then fp32 logits
for up to `max_num_seqs` rows (what that step samples). Like vLLM's profile run, that step is run once before the
KV cache is sized and its peak memory measured, so whatever the attention and linear kernels allocate is counted
and the activations of any step fit next to the cache. Measured, not estimated:
  * CUDA: the caching allocator's peak (`max_memory_allocated`) over the forward;
  * CPU: the running sum of the torch profiler's allocation and free events (`glm4.peak_memory.PeakMemory`).
What the run cannot see is added as a margin: the sampler's working copies of the logits (it runs after the model,
on rank 0) and allocator fragmentation.

Attention's working memory does not grow with the context of the step's sequences (it reads the cache in tiles
of bounded size, glm4/layers/attention.py), so a profile at the start of a context holds for every later step.
"""

from __future__ import annotations

import logging
import math

import torch

from glm4.layers.attention import AttentionMetadata
from glm4.peak_memory import PeakMemory

logger = logging.getLogger(__name__)

SAMPLER_LOGITS_COPIES = 2  # probabilities and a filtered copy of the (num_seqs, vocab) fp32 logits
FRAGMENTATION_MARGIN = 0.1  # of the measured peak: blocks the caching allocator cannot reuse for other shapes
CUDA_DEFAULT_FRACTION = 0.9  # kv_cache_memory=None on CUDA: this fraction of free memory, less the step's reserve
CPU_DEFAULT_FRACTION, CPU_DEFAULT_CAP = 0.2, 4 << 30  # None on CPU: 20% of available RAM, at most 4 GiB


def profiles_step(kv_cache_memory: int | float | None, device: torch.device) -> bool:
    """Whether sizing the cache needs the profile run: only a budget relative to free memory leaves the step's
    memory to subtract. Not the CPU default either: it leaves 80% of RAM to everything else, and a forward of
    the full token budget costs a 9B model tens of seconds of start-up on a CPU."""
    return isinstance(kv_cache_memory, float) or (kv_cache_memory is None and device.type == "cuda")


def kv_cache_budget(kv_cache_memory: int | float | None, free_bytes: int, device: torch.device,
                    step_reserve: int = 0) -> int:
    """Bytes for the KV cache. kv_cache_memory: bytes (int, taken as given), a fraction of `free_bytes` (float), or
    None (the device's default). A relative budget gives up `step_reserve` (see `step_reserve_bytes`)."""
    if kv_cache_memory is None:
        if device.type == "cuda":
            return int(CUDA_DEFAULT_FRACTION * free_bytes) - step_reserve
        return min(int(CPU_DEFAULT_FRACTION * free_bytes), CPU_DEFAULT_CAP) - step_reserve
    if isinstance(kv_cache_memory, float):
        if not 0.0 < kv_cache_memory <= 1.0:
            raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {kv_cache_memory}")
        return int(kv_cache_memory * free_bytes) - step_reserve
    budget = int(kv_cache_memory)
    if budget > free_bytes:
        raise ValueError(f"kv_cache_memory={budget:,} bytes exceeds the {free_bytes:,} bytes free on {device}; lower "
                         "it or pass a fraction such as 0.5")
    return budget


def step_reserve_bytes(peak_bytes: int, num_logits: int, vocab_size: int) -> int:
    """What a relative KV budget leaves free for a step: the measured peak plus the margins the run cannot see."""
    sampler = SAMPLER_LOGITS_COPIES * num_logits * vocab_size * 4
    return int(peak_bytes * (1 + FRAGMENTATION_MARGIN)) + sampler


@torch.inference_mode()
def profile_step_memory(model: torch.nn.Module, *, dtype: torch.dtype, device: torch.device, num_tokens: int,
                        num_logits: int, block_size: int) -> int:
    """Peak bytes allocated by one forward of `num_tokens` tokens (as few prefill sequences as the model's
    positions allow) plus `compute_logits` on `num_logits` rows, above what was allocated before: the weights and
    the small temporary KV cache built here do not count. With tensor parallelism every rank must call this at
    the same time (the forward runs the layers' collectives)."""
    config = model.config
    seq_lens = _split(num_tokens, config.max_position_embeddings)
    blocks = [math.ceil(n / block_size) for n in seq_lens]
    shape = (sum(blocks), block_size, model.num_kv_heads_per_rank, config.head_dim)
    kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                 for _ in range(config.num_layers)]
    input_ids, positions, meta = _prefill_step(seq_lens, blocks, block_size, config.vocab_size, device)
    rows = torch.arange(num_tokens - num_logits, num_tokens, device=device)

    def step() -> None:
        hidden = model.forward_cached(input_ids, positions, meta, kv_caches)
        model.compute_logits(hidden[rows])

    with PeakMemory(device) as pm:
        step()
    peak = pm.peak_bytes
    del kv_caches
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the free memory measured next must not count the run's cached blocks as used
    logger.info("profile run: a step of %d tokens with %d sampled rows peaks at %.1f MiB of working memory on %s",
                num_tokens, num_logits, peak / 2**20, device)
    return int(peak)


def _split(num_tokens: int, max_len: int) -> list[int]:
    """Sequence lengths summing to num_tokens, none longer than max_len."""
    full, rest = divmod(num_tokens, max_len)
    return [max_len] * full + ([rest] if rest else [])


def _prefill_step(seq_lens: list[int], blocks: list[int], block_size: int, vocab_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Whole-prompt prefills of seq_lens tokens, each on its own consecutive blocks of the temporary cache."""
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    first_block = [sum(blocks[:i]) for i in range(len(blocks))]
    slots = torch.cat([b * block_size + torch.arange(n) for b, n in zip(first_block, seq_lens)])
    tables = torch.zeros((len(seq_lens), max(blocks)), dtype=torch.long)
    for i, (b, nb) in enumerate(zip(first_block, blocks)):
        tables[i, :nb] = torch.arange(b, b + nb)
    meta = AttentionMetadata(slot_mapping=slots.to(device), block_tables=tables.to(device),
                             context_lens=torch.tensor(seq_lens, device=device), query_lens=list(seq_lens),
                             context_lens_list=list(seq_lens), block_size=block_size)
    input_ids = (torch.arange(sum(seq_lens)) % vocab_size).to(device)
    return input_ids, positions.to(device), meta

