"""Executors run the model for the engine: in-process (tp=1) or across a tensor-parallel worker group.

Every executor has the same small interface, so the engine loop does not know how ranks are launched:
  * `execute(StepInputs) -> logits` (fp32, rank 0's device), `check_health()`, `shutdown()`;
  * attributes `config`, `num_blocks`, `block_size`, `device`, `dtype`.
Launchers: `UniProcExecutor` (here), `MultiprocExecutor` (local processes, glm4/engine/tp_executor.py) and
`RayExecutor` (Ray actors in a placement group, pipeline/tp_ray.py; glm4 never imports Ray). This module names
the tensor-parallel launchers only as "module:Class" strings, so it imports none of them.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glm4.config import GLM4Config
from glm4.engine.model_runner import ModelRunner
from glm4.engine.step_inputs import StepInputs


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or stopped answering; the engine cannot continue and was shut down."""


@dataclass(frozen=True)
class ExecutorSpec:
    """What every launcher needs to build the ranks of one replica."""

    model_dir: str
    dtype: str | None
    device: str | None
    tensor_parallel_size: int
    block_size: int
    kv_cache_memory: int | float | None
    max_blocks_needed: int
    worker_timeout_s: float = 30.0
    master_addr: str = "127.0.0.1"
    # Bound on bringing the group up (process/actor start, rendezvous, per-rank weight loading): loading a
    # large checkpoint takes far longer than worker_timeout_s, which bounds a single collective.
    startup_timeout_s: float = 600.0
    master_port: int | None = None  # None: pick a free port
    load_format: str = "safetensors"  # or "dummy": random weights of config.json's shape (benchmarks)
    cuda_graph_max_batch: int = 0  # capture decode CUDA graphs up to this batch on every rank (0: never; CUDA)
    # The persistent batch's shape (a block-table row per scheduler slot, one column per block of the longest
    # sequence); the defaults are EngineConfig's (None: the model's max_position_embeddings).
    max_num_seqs: int = 256
    max_model_len: int | None = None
    # With max_num_seqs, the largest step the scheduler builds: a KV budget relative to free memory first leaves
    # room for its activations (glm4/engine/memory_profile.py). Default: EngineConfig's.
    max_num_batched_tokens: int = 2048


class Executor(ABC):
    config: GLM4Config
    num_blocks: int
    block_size: int
    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def execute(self, inputs: StepInputs) -> torch.Tensor: ...

    def check_health(self) -> None:
        """Raise TensorParallelError if a worker is gone (no-op for a single process)."""

    @abstractmethod
    def shutdown(self) -> None: ...

    def _adopt_runner(self, runner: ModelRunner, spec: ExecutorSpec) -> None:
        self.runner = runner
        self.config, self.device, self.dtype = runner.config, runner.device, runner.dtype
        self.block_size = spec.block_size


class UniProcExecutor(Executor):
    def __init__(self, spec: ExecutorSpec) -> None:
        if spec.tensor_parallel_size != 1:
            raise ValueError("UniProcExecutor runs tensor_parallel_size=1 only")
        runner = ModelRunner(spec.model_dir, dtype=spec.dtype, device=spec.device, load_format=spec.load_format)
        self._adopt_runner(runner, spec)
        self.num_blocks = runner.num_blocks_for_budget(spec.kv_cache_memory, spec.block_size, spec.max_blocks_needed,
                                                       max_num_batched_tokens=spec.max_num_batched_tokens,
                                                       max_num_seqs=spec.max_num_seqs)
        runner.allocate_kv_cache(self.num_blocks, spec.block_size, max_num_seqs=spec.max_num_seqs,
                                 max_model_len=spec.max_model_len)
        runner.capture_decode_graphs(spec.cuda_graph_max_batch)

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        return self.runner.run(inputs)

    def shutdown(self) -> None:
        self.runner.kv_caches = []


DEFAULT_TP_EXECUTOR = "glm4.engine.tp_executor:MultiprocExecutor"


def resolve_executor_class(executor: Any, tensor_parallel_size: int) -> type[Executor]:
    """An Executor subclass, a "module:Class" string, or None (tp=1 in-process, tp>1 local processes)."""
    if executor is None:
        if tensor_parallel_size == 1:
            return UniProcExecutor
        executor = DEFAULT_TP_EXECUTOR
    if isinstance(executor, str):
        module, _, name = executor.partition(":")
        if not name:
            raise ValueError(f"executor must look like 'package.module:ClassName', got {executor!r}")
        executor = getattr(importlib.import_module(module), name)
    if not (isinstance(executor, type) and issubclass(executor, Executor)):
        raise ValueError(f"executor must be an Executor subclass, got {executor!r}")
    return executor


def model_dir_str(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())
