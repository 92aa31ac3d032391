"""Partial, interleaved rotary position embedding (GLM-4: the first half of each head, pairs (2i, 2i+1))."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates the first `rotary_dim` dims of each head; the remaining dims pass through unchanged.

    GLM-4 pairs ADJACENT dims (GPT-J / "NORM" style), not the NeoX half-split. The cos/sin table is computed in
    fp32 and cast to the activation dtype, which matches both reference implementations bit for bit in bf16.
    The table is a plain attribute (not a registered buffer) so that building the model on the meta device and
    materialising it with `to_empty` never leaves it uninitialised.
    """

    def __init__(self, head_dim: int, rotary_dim: int, theta: float, max_position: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.max_position = max_position
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32,
                                                          device=device) / self.rotary_dim))
            pos = torch.arange(self.max_position, dtype=torch.float32, device=device)
            ang = torch.outer(pos, inv_freq)  # (max_position, rotary_dim // 2)
            self._cache[key] = (ang.cos().to(dtype), ang.sin().to(dtype))
        return self._cache[key]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: (..., num_tokens, num_heads, head_dim) with positions broadcastable to (..., num_tokens).

        Positions must be < max_position (checked once per forward by the caller, not here: a check per layer
        would force a device sync per layer on CUDA)."""
        cos, sin = self._table(x.device, x.dtype)
        c = cos[positions].unsqueeze(-2)  # (..., num_tokens, 1, rotary_dim // 2)
        s = sin[positions].unsqueeze(-2)
        rot = x[..., : self.rotary_dim].unflatten(-1, (-1, 2))
        x0, x1 = rot[..., 0], rot[..., 1]
        out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
        if self.rotary_dim == self.head_dim:
            return out
        return torch.cat((out, x[..., self.rotary_dim:]), dim=-1)
