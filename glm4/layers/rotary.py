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

    def __init__(self, rotary_dim: int, theta: float, max_position: int) -> None:
        super().__init__()
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

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the table for `positions` (..., num_tokens), shaped to broadcast over heads. Every layer uses
        the same rows, so the model looks them up once per forward and passes them down.

        Positions must be < max_position (checked once per forward by the caller: a check here would force a
        device sync on CUDA)."""
        cos, sin = self._table(positions.device, dtype)
        return cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)  # (..., num_tokens, 1, rotary_dim // 2)


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], rotary_dim: int) -> torch.Tensor:
    """x: (..., num_tokens, num_heads, head_dim) with `cos_sin` from `RotaryEmbedding.cos_sin`; out of place."""
    c, s = cos_sin
    rot = x[..., :rotary_dim].unflatten(-1, (-1, 2))
    x0, x1 = rot[..., 0], rot[..., 1]
    out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    if rotary_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)
