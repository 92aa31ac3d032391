"""GLM-4 SwiGLU MLP with the fused gate/up projection (names mirror the checkpoint)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glm4.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: dist.ProcessGroup | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = dict(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group, dtype=dtype)
        self.dense_h_to_4h = MergedColumnParallelLinear(hidden_size, ffn_hidden_size, **kw)
        self.dense_4h_to_h = RowParallelLinear(ffn_hidden_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # first half gate, second half up
        return self.dense_4h_to_h(F.silu(gate) * up)
