"""Tensor-parallel linear layers. Each layer owns its shard, its weight loader and its collective.

Sharding follows Megatron/vLLM: column-parallel layers split output features across ranks (no communication),
row-parallel layers split input features and all-reduce the partial sums inside `forward`. `tp_rank`/`tp_size`
are constructor arguments so layers can be built and tested without a process group.

Weight loaders receive a `WeightSource` (a lazily sliced checkpoint tensor) and read only this rank's rows or
columns, so per-rank peak memory stays about 1/tp of the weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glm4.kernels import cpu, hugepages
from glm4.layers import onednn


class WeightSource(Protocol):
    """A checkpoint tensor that can be read in slices without materialising all of it."""

    shape: tuple[int, ...]

    def read(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor: ...


class TensorSource:
    """WeightSource over an in-memory tensor (tests, conversions)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def read(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        t = self.tensor
        if rows is not None:
            t = t[rows[0]:rows[1]]
        if cols is not None:
            t = t[:, cols[0]:cols[1]]
        return t


def _expect(src: WeightSource, shape: tuple[int, ...]) -> None:
    if tuple(src.shape) != tuple(shape):
        raise ValueError(f"shape mismatch: checkpoint has {list(src.shape)}, model expects {list(shape)}")


def _copy(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype))


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


class PackableLinear(nn.Module):
    """Base of the layers whose local math is y = x W^T (+ b). On CPU the runner calls `prepare_for_cpu` once the
    weights are loaded, which picks the fastest kernels this machine has:

    * fp32 on AVX-512 (`glm4/kernels/cpu.py`): the dense weight moves into huge pages; decode-sized inputs
      (up to `cpu.MAX_ROWS` rows) go through our streaming GEMV, larger ones through oneDNN on the same
      plain weight, so the model still holds one copy.
    * otherwise (bf16, no AVX-512, no compiler): the weight is packed into oneDNN's blocked layout and the dense
      parameter emptied.
    """

    weight: nn.Parameter
    packed_weight: torch.Tensor | None = None
    streaming: bool = False

    def streamable(self) -> bool:
        """True when `prepare_for_cpu` would put this layer on the streaming GEMV (fp32 weights, AVX-512 kernels)."""
        return self.packed_weight is None and not self.streaming and cpu.can_use(self.weight)

    def prepare_for_cpu(self, streaming_weight: torch.Tensor | None = None) -> bool:
        """Switch this layer to the CPU kernels above; False where neither applies (non-CPU device, fp16,
        PyTorch build without oneDNN) or when already done. Irreversible: call after loading weights.

        `streaming_weight`: for a streamable layer, its weight already copied where it should live (the model
        lays all its weights out in one huge-page arena, `GLM4ForCausalLM.prepare_for_cpu`); by default a huge-page
        copy of its own."""
        if self.packed_weight is not None or self.streaming:
            return False
        if cpu.can_use(self.weight):
            self.weight.data = (hugepages.copy_to_huge_pages(self.weight.data) if streaming_weight is None
                                else streaming_weight)
            self.streaming = True
            return True
        if not onednn.can_pack(self.weight):
            return False
        self.packed_weight = onednn.pack(self.weight)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
        return True

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, "bias", None)  # only column-parallel layers (QKV) have one
        if self.streaming:
            if 0 < x.numel() <= cpu.MAX_ROWS * x.shape[-1]:
                return cpu.linear(x, self.weight, bias)
            return onednn.linear(x, self.weight, bias)  # oneDNN also runs on the plain layout
        if self.packed_weight is not None:
            return onednn.linear(x, self.packed_weight, bias)
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(PackableLinear):
    """y = x W^T (+ b) with W's output rows split across ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: dist.ProcessGroup | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.in_features, self.total_out_features = in_features, out_features
        self.out_features = divide(out_features, tp_size, "output features")
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def _rows(self) -> tuple[int, int]:
        return self.tp_rank * self.out_features, (self.tp_rank + 1) * self.out_features

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: str | None = None) -> None:
        full = (self.total_out_features, self.in_features) if param.dim() == 2 else (self.total_out_features,)
        _expect(src, full)
        _copy(param, src.read(rows=self._rows()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q|k|v projection. Query heads are split across ranks; KV heads are split while tp <= num_kv_heads
    and replicated beyond that (GLM-4 has 2 KV heads: at tp=4 each KV head lives on 2 ranks)."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int, bias: bool,
                 *, tp_rank: int = 0, tp_size: int = 1, tp_group: dist.ProcessGroup | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "attention heads")
        if tp_size >= total_num_kv_heads:
            divide(tp_size, total_num_kv_heads, "(replicated) KV heads: tensor_parallel_size must be a multiple of "
                   "num_kv_heads;")
            self.num_kv_heads, self.kv_replicas = 1, tp_size // total_num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = divide(total_num_kv_heads, tp_size, "KV heads"), 1
        local_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, local_out * tp_size, bias, tp_rank=tp_rank, tp_size=tp_size,
                         tp_group=tp_group, dtype=dtype)
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim

    def _shard_rows(self) -> dict[str, tuple[int, int]]:
        """Rows of this rank's q/k/v slices within the full (unsharded) q, k and v tensors."""
        kv_rank = self.tp_rank // self.kv_replicas
        q0, k0 = self.tp_rank * self.q_size, kv_rank * self.kv_size
        return {"q": (q0, q0 + self.q_size), "k": (k0, k0 + self.kv_size), "v": (k0, k0 + self.kv_size)}

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: str | None = None) -> None:
        d = self.head_dim
        total = {"q": self.total_num_heads * d, "k": self.total_num_kv_heads * d, "v": self.total_num_kv_heads * d}
        local_off = {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}
        tail = (self.in_features,) if param.dim() == 2 else ()
        rows = self._shard_rows()
        if shard_id is None:  # original layout: one fused [q; k; v] tensor on disk
            _expect(src, (sum(total.values()), *tail))
            base = {"q": 0, "k": total["q"], "v": total["q"] + total["k"]}
            parts = {s: src.read(rows=(base[s] + rows[s][0], base[s] + rows[s][1])) for s in "qkv"}
        else:  # HF layout: q_proj / k_proj / v_proj
            _expect(src, (total[shard_id], *tail))
            parts = {shard_id: src.read(rows=rows[shard_id])}
        for s, value in parts.items():
            n = value.shape[0]
            _copy(param.data[local_off[s]:local_off[s] + n], value)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """GLM's fused dense_h_to_4h = [gate; up]. Each half is sharded separately, so every rank holds
    [gate_shard; up_shard] and can apply SwiGLU locally."""

    def __init__(self, in_features: int, intermediate_size: int, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: dist.ProcessGroup | None = None, dtype: torch.dtype | None = None) -> None:
        self.total_intermediate = intermediate_size
        super().__init__(in_features, 2 * intermediate_size, False, tp_rank=tp_rank, tp_size=tp_size,
                         tp_group=tp_group, dtype=dtype)
        self.local_intermediate = self.out_features // 2

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: str | None = None) -> None:
        _expect(src, (2 * self.total_intermediate, self.in_features))
        n, r = self.local_intermediate, self.tp_rank
        gate = src.read(rows=(r * n, (r + 1) * n))
        up = src.read(rows=(self.total_intermediate + r * n, self.total_intermediate + (r + 1) * n))
        _copy(param.data[:n], gate)
        _copy(param.data[n:], up)


class RowParallelLinear(PackableLinear):
    """y = x W^T with W's input columns split across ranks; partial sums are all-reduced here."""

    def __init__(self, in_features: int, out_features: int, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: dist.ProcessGroup | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.total_in_features, self.out_features = in_features, out_features
        self.in_features = divide(in_features, tp_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: str | None = None) -> None:
        _expect(src, (self.out_features, self.total_in_features))
        c0 = self.tp_rank * self.in_features
        _copy(param, src.read(cols=(c0, c0 + self.in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.tp_size > 1:
            dist.all_reduce(y, group=self.tp_group)
        return y
