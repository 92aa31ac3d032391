"""RMSNorm as GLM-4's original remote code computes it."""

from __future__ import annotations

import torch
from torch import nn

from glm4.kernels import cpu


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and x.is_cpu and cpu.ready():
            return cpu.rms_norm(x, self.weight, self.eps)  # same formula, one fused call (glm4/kernels)
        # Statistics in fp32 and ONE rounding back to the activation dtype (weight * normalized in fp32), as in
        # THUDM's modeling_chatglm.py. transformers' GlmRMSNorm rounds twice; in fp32 both are identical.
        xf = x.float()
        var = xf.pow(2).mean(-1, keepdim=True)
        return (self.weight * (xf * torch.rsqrt(var + self.eps))).to(x.dtype)
