"""Our CPU kernels for decode steps on AVX-512 machines: builds them on first use and wraps them.

* `linear` (`cpu_gemv.cpp`): decode-sized fp32 linears. A decode step's linears see 1 to a few activation rows,
  so their cost is reading the weights once. On the project's AMD EPYC the library GEMVs read them at 50-75% of
  the `torch.sum` bandwidth (oneDNN packed or plain, MKL); this kernel streams the plain row-major weight from
  huge pages and reads the 310 MB LM head at ~80-90% (bench/README.md). Larger batches stay on oneDNN, whose
  blocked GEMMs win once the work is compute-bound.
* `paged_decode_attention` (`cpu_attention.cpp`): one query token per sequence straight from the paged KV cache,
  instead of gathering K/V into a padded tensor, masking and calling SDPA (~10 small ops per layer).
* `rms_norm`, `rotary_`, `argmax` (`cpu_small_ops.cpp`): fp32 RMSNorm, rotary embedding and greedy argmax in one
  call each instead of chains of tiny torch ops (torch's argmax over 151552 logits alone takes ~250 us).
* `decode_layers` (`cpu_decode_layers.cpp`): all the blocks of a pure decode step of up to MAX_ROWS sequences in
  one call and one parallel region, built from the kernels above (`cpu_kernels.h`): no per-op dispatch or
  fork/join, no Python between layers.

Layers ask `ready()` before using the small ops, which never triggers a build: the kernels are built when the
engine's CPU runner prepares the model (`PackableLinear.prepare_for_cpu`).

The kernels are compiled once per machine with torch's C++ extension builder (~1 min, cached under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) and used only where the CPU has AVX-512. If they cannot be built
(no C++ compiler, no ninja) the layers fall back to oneDNN and torch's SDPA with a warning; GLM4_CPU_KERNELS=0
turns them off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(f) for f in ("bindings.cpp", "cpu_gemv.cpp", "cpu_attention.cpp",
                                                     "cpu_small_ops.cpp", "cpu_decode_layers.cpp")]
_HEADER = Path(__file__).with_name("cpu_kernels.h")
_NAME = "glm4_cpu_kernels"  # torch rebuilds when a source or flag changes
MAX_ROWS = 8  # activation rows per call; kMaxRows in cpu_kernels.h
ENV_SWITCH = "GLM4_CPU_KERNELS"
# -fopenmp matters: at::parallel_for is inlined from ATen's headers, and without it the pragma is dropped and every
# kernel runs on one thread. libgomp's soname is the one torch loads, so both share torch's thread pool.
_CFLAGS = ["-O3", "-mavx512f", "-mavx512dq", "-mfma", "-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used on this machine, or None when it can (it may still fail to build)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"CPU capability is {torch.backends.cpu.get_cpu_capability()}, the kernels need AVX512"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH (set CXX)"
    return _failed


def _find_ninja() -> None:
    """torch's builder runs `ninja` from PATH; the pip package (a dependency) installs it into the environment's
    bin directory, which is not on PATH when the venv's python is run without activating it."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load() -> ModuleType | None:
    """The compiled kernels' module, building it on first call; None where unavailable (reason logged once)."""
    global _module, _failed
    if _module is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        reason = unavailable_reason()
        if reason is not None:
            _failed = reason
            log.info("CPU kernels not used (%s); using oneDNN and SDPA", reason)
            return None
        from torch.utils import cpp_extension  # imported lazily: it pulls in setuptools

        _find_ninja()

        log.info("building the CPU kernels (once per machine, ~1 min)")
        # torch decides whether to rebuild from the sources' and flags' hash; the shared header is not a source,
        # so its hash goes into the flags.
        header = "-DGLM4K_HEADER=" + hashlib.sha256(_HEADER.read_bytes()).hexdigest()[:16]
        try:
            _module = cpp_extension.load(name=_NAME, sources=[str(p) for p in _SOURCES],
                                         extra_cflags=_CFLAGS + [header], extra_ldflags=["-fopenmp"],
                                         extra_include_paths=[str(_HEADER.parent)], verbose=False)
        except Exception as e:  # a missing toolchain must not stop inference: oneDNN still works
            _failed = f"build failed: {e}"
            log.warning("CPU kernels could not be built (%s); using oneDNN and SDPA", e)
        return _module


def can_use(weight: torch.Tensor) -> bool:
    """True when `weight` (N, K) can be served by `linear` on this machine."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and load() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T (+ b) for x of shape (..., K) with at most MAX_ROWS rows; W contiguous (N, K) fp32."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = _module.gemv(rows, weight, bias)  # type: ignore[union-attr]  # callers check can_use first
    return y.view(*x.shape[:-1], weight.shape[0])


def can_attend(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when `paged_decode_attention` handles these tensors (CPU, fp32/bf16, head_dim a multiple of 16)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k_cache.dtype
            and q.shape[-1] % 16 == 0 and load() is not None)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (n, H, D), one new token per sequence, whose K/V are already in the cache -> (n, H, D).
    block_tables: (n, W) covering each row's context_lens (int64, >= 1) tokens."""
    return _module.paged_decode_attention(  # type: ignore[union-attr]  # callers check can_attend first
        q.contiguous(), k_cache, v_cache, block_tables.contiguous(), context_lens.contiguous(), scale)


def ready() -> bool:
    """True once the kernels are built and loaded in this process (never builds them)."""
    return _module is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GLM-4 RMSNorm of fp32 `x` (..., n) with fp32 `weight` (n,); callers check `ready()`."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return _module.rms_norm(rows, weight, eps).view(x.shape)  # type: ignore[union-attr]


def rotary_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int,
            rotary_dim: int) -> None:
    """Rotate in place the first `heads` heads of fp32 rows `qkv` (tokens, width) (GLM-4's interleaved partial
    rotary); cos/sin: the tokens' table rows, (tokens, ..., rotary_dim // 2) contiguous."""
    _module.rotary_(qkv, cos, sin, heads, head_dim, rotary_dim)  # type: ignore[union-attr]


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) for fp32 rows (rows, n) with unit stride, vectorised; callers check `ready()`."""
    return _module.argmax_rows(logits)  # type: ignore[union-attr]


# Whether the model runs pure decode steps through `decode_layers` (tests switch it off to compare).
FUSE_DECODE_LAYERS = True


def decode_layers(h: torch.Tensor, weights: list[torch.Tensor], caches: list[torch.Tensor],
                  slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, rotary_dim: int, eps: float,
                  scale: float) -> torch.Tensor:
    """Every GLM-4 block of a pure decode step in one call: h (M <= MAX_ROWS, hidden) fp32, one new token per
    sequence -> the last block's output (M, hidden). `weights`: 7 per layer (input_layernorm, query_key_value
    weight and bias (an empty tensor for none), dense, post_attention_layernorm, dense_h_to_4h, dense_4h_to_h);
    `caches`: k and v per layer, written at `slot_mapping`. cos/sin: the tokens' rotary table rows
    (M, ..., rotary_dim // 2). Callers check `ready()`; the C++ side checks every shape."""
    return _module.decode_layers(  # type: ignore[union-attr]
        h.contiguous(), weights, caches, slot_mapping.contiguous(), block_tables.contiguous(),
        context_lens.contiguous(), cos.flatten(1), sin.flatten(1), heads, kv_heads, rotary_dim, eps, scale)
