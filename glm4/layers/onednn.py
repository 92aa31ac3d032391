"""CPU matmuls through oneDNN, with each weight reordered once into oneDNN's blocked layout.

Why: PyTorch's CPU `F.linear` calls MKL, whose fp32 GEMV/GEMM paths are slow on AMD CPUs and at the small batch
sizes of decoding. Measured on the project's 2-vCPU AMD EPYC (fp32, hidden 512): the 151552-row LM head at batch 1
takes 34 ms with `F.linear` and 12 ms packed; a 3072x512 projection at batch 64 takes 1.5 ms vs 1.1 ms; prefill
chunks of 1024 rows are ~1.4x faster. bf16 gains as much (oneDNN uses AVX512-BF16 where the CPU has it). The
kernels are the ones TorchInductor uses for CPU linears after freezing (`mkldnn::_linear_pointwise`), shipped in
every x86 PyTorch wheel; where they are missing, layers keep `F.linear`.

Results match `F.linear` to fp32 rounding (the reduction order differs), not bit for bit.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """True when this PyTorch build has the packed-linear kernels."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def can_pack(weight: torch.Tensor) -> bool:
    """fp32 anywhere oneDNN is; bf16 only on AVX-512 CPUs (oneDNN refuses to reorder bf16 weights without it, e.g.
    on AVX2-only machines, where the layer keeps `F.linear`)."""
    if weight.device.type != "cpu" or weight.dtype not in _DTYPES or weight.dim() != 2 or not available():
        return False
    return weight.dtype == torch.float32 or "AVX512" in torch.backends.cpu.get_cpu_capability()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(out_features, in_features) dense weight -> opaque oneDNN tensor (same bytes, blocked layout).

    No batch-size hint: the layout chosen without one was the fastest from 1 to 1024 rows in our measurements."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T (+ b) for x of shape (..., in_features) with a weight from `pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
