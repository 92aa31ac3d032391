"""Vocabulary-parallel embedding and LM head (rows of the 151552-entry vocabulary split across ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glm4.layers.linear import PackableLinear, WeightSource, _copy, _expect, divide


class _VocabShard(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, tp_rank: int, tp_size: int,
                 tp_group: dist.ProcessGroup | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.total_vocab_size, self.hidden_size = vocab_size, hidden_size
        self.shard_size = divide(vocab_size, tp_size, "vocabulary size")
        self.vocab_start = tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: str | None = None) -> None:
        _expect(src, (self.total_vocab_size, self.hidden_size))
        _copy(param, src.read(rows=(self.vocab_start, self.vocab_start + self.shard_size)))


class VocabParallelEmbedding(_VocabShard):
    def __init__(self, vocab_size: int, hidden_size: int, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: dist.ProcessGroup | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(vocab_size, hidden_size, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Each rank embeds the ids it owns and contributes zeros for the rest; the sum is the full lookup.
        local = input_ids - self.vocab_start
        mask = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(y, group=self.tp_group)
        return y


class ParallelLMHead(_VocabShard, PackableLinear):
    """Untied output layer. Every rank ends up with the full logits (all-gather over the vocabulary).

    The largest matrix of a decode step (151552 x hidden): on CPU it gets the same kernels as the other linears
    (`PackableLinear.prepare_for_cpu`: our streaming GEMV at the end of the weight arena, or oneDNN packed), which
    read it 2-3x faster than `F.linear` at batch 1."""

    def __init__(self, vocab_size: int, hidden_size: int, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: dist.ProcessGroup | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(vocab_size, hidden_size, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(hidden)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)
