"""EngineConfig: the engine's options, validated up front with errors a user can act on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from glm4.engine.scheduler import POLICIES

SUPPORTED_TP = (1, 2, 4, 8)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    dtype: str | torch.dtype | None = None  # a name or a torch.dtype, kept as the name; None: bf16 on CUDA, fp32 on CPU
    device: str | None = None  # None: cuda if available, else cpu
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256  # sequences decoding at once
    max_num_batched_tokens: int = 2048  # tokens per model step (decodes + prefill chunks)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_memory: int | float | None = None  # bytes, or a fraction of free memory; None: see ModelRunner
    enable_prefix_caching: bool = True
    scheduling_policy: str = "lpm"  # "lpm" (longest cached prefix first) or "fcfs"
    seed: int | None = 0  # engine-wide seed for unseeded random sampling
    executor: Any = None  # Executor subclass or "module:Class"; None: in-process (tp=1) / local processes
    worker_timeout_s: float = 30.0  # a TP worker silent for this long is declared dead
    startup_timeout_s: float = 600.0  # bound on starting a TP group (launch, rendezvous, loading the shards)
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    load_format: str = "safetensors"  # "dummy": random weights of config.json's shape, for benchmarks only
    enforce_eager: bool = False  # True: never capture CUDA graphs for decode steps (CUDA captures them by default)

    def __post_init__(self) -> None:
        # One spelling from here on (ExecutorSpec, the worker ranks, logs): the name. Like vLLM, callers may pass
        # either; anything else is left for validate() to refuse with the list of choices.
        if isinstance(self.dtype, torch.dtype) and str(self.dtype).removeprefix("torch.") in DTYPES:
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; valid options: {sorted(names)}")
        return cls(**kwargs).validate()

    def validate(self) -> "EngineConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.dtype is None or (isinstance(self.dtype, str) and self.dtype in DTYPES),
             f"dtype must be one of {', '.join(DTYPES)} (the name or the torch.dtype), got {self.dtype!r}")
        need(self.device is None or str(self.device).split(":")[0] in ("cpu", "cuda"),
             f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        need(self.tensor_parallel_size in SUPPORTED_TP,
             f"tensor_parallel_size must be one of {SUPPORTED_TP}, got {self.tensor_parallel_size!r}")
        need(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
             f"max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        need(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens must be an integer >= 1, got {self.max_num_batched_tokens!r}")
        need(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 2),
             f"max_model_len must be None or an integer >= 2, got {self.max_model_len!r}")
        need(isinstance(self.block_size, int) and self.block_size >= 1 and not self.block_size & (self.block_size - 1),
             f"block_size must be a power of two, got {self.block_size!r}")
        kv = self.kv_cache_memory
        need(kv is None or (isinstance(kv, float) and 0 < kv <= 1) or (isinstance(kv, int) and kv > 0),
             f"kv_cache_memory must be bytes (int > 0) or a fraction of free memory in (0, 1], got {kv!r}")
        need(self.scheduling_policy in POLICIES,
             f"scheduling_policy must be one of {POLICIES}, got {self.scheduling_policy!r}")
        need(self.load_format in ("safetensors", "dummy"),
             f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")
        need(isinstance(self.enforce_eager, bool), f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        need(self.worker_timeout_s > 0, f"worker_timeout_s must be > 0, got {self.worker_timeout_s!r}")
        return self
