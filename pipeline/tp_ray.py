"""Tensor parallelism on Ray: rank 0 in the calling process (the engine), ranks 1..tp-1 in Ray actors.

    llm = LLM(model_dir, tensor_parallel_size=2, executor="pipeline.tp_ray:RayExecutor")
    llm = LLM(model_dir, tensor_parallel_size=2, executor=RayExecutor.with_options(num_cpus_per_rank=2))

Placement: one bundle per rank in a `STRICT_PACK` placement group, so a replica never spans nodes. If the caller
already runs inside a placement group (e.g. an engine actor that a Serve deployment or a Ray Data actor pool placed
in bundle 0 of a tp-bundle group), worker rank r goes to bundle r of that group and the group is left alone at
shutdown. Otherwise a group is created with bundle 0 pinned to the caller's node (for rank 0) and removed at
shutdown. Bundles are {"CPU": c} on CPU and {"CPU": c, "GPU": 1} for worker ranks on GPU (Ray then gives each
worker actor its own GPU as cuda:0).

Protocol and failure handling are those of `glm4.engine.tp_executor` (same `serve_rank` on the worker side).
Each worker actor runs the whole worker side in one long-running call; its ObjectRef resolves only when the worker
stops, so `ray.wait` on those refs is the liveness check: a killed or crashed actor makes `execute` raise
`TensorParallelError`, after which the remaining actors are killed and the group is removed.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import ray
import torch
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from glm4.engine.executor import ExecutorSpec, TensorParallelError
from glm4.engine.tp_executor import TPExecutorBase, serve_rank, worker_num_threads

logger = logging.getLogger(__name__)

__all__ = ["RayExecutor", "TPRankActor"]


class _TPRankActor:
    """One worker rank. `serve` blocks for the life of the group; `info` answers meanwhile (max_concurrency=2)."""

    def __init__(self, num_threads: int) -> None:
        # Ray sets OMP_NUM_THREADS from num_cpus (1 for fractions); a reused worker may have imported torch with
        # another count. Set it explicitly.
        torch.set_num_threads(num_threads)

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "gpu_ids": ray.get_gpu_ids()}

    def serve(self, spec: ExecutorSpec, rank: int, master_addr: str, master_port: int, device: str) -> int:
        return serve_rank(spec, rank, master_addr, master_port, device)


TPRankActor = ray.remote(_TPRankActor)

_OPTION_NAMES = ("num_cpus_per_rank", "liveness_check_interval_s")


def _short(e: BaseException, limit: int = 300) -> str:
    cause = getattr(e, "cause", None)  # RayTaskError wraps the worker's exception
    text = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class RayExecutor(TPExecutorBase):
    """Executor over Ray actors. Class-level options (set them with `RayExecutor.with_options(...)`):

    num_cpus_per_rank: logical CPUs per bundle (None: 1 on GPU, 0.5 on CPU). Worker torch threads are
        the node's cores divided by tp, whatever the logical reservation.
    liveness_check_interval_s: at most this often, `execute` asks Ray whether a worker ended before starting a
        step (a dead peer also fails the step itself at once; this only catches it one step earlier).
    """

    num_cpus_per_rank: float | None = None
    liveness_check_interval_s: float = 1.0

    @classmethod
    def with_options(cls, **options: Any) -> type["RayExecutor"]:
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown RayExecutor option(s) {unknown}; valid: {list(_OPTION_NAMES)}")
        return type(cls.__name__, (cls,), dict(options))

    def __init__(self, spec: ExecutorSpec) -> None:
        self._actors: list[Any] = []
        self._loop_refs: list[Any] = []
        self._infos: list[dict[str, Any]] = []
        self._pg = None
        self._own_pg = False
        self._node_id: str | None = None
        super().__init__(spec)

    # ---- placement -----------------------------------------------------------------------------------------
    def _rank0_device(self) -> str:
        spec = self.spec
        dev = torch.device(spec.device) if spec.device else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
        if dev.type == "cuda" and dev.index is None:  # NCCL and set_device need an index
            dev = torch.device("cuda", torch.cuda.current_device())
        return str(dev)

    def _bundle_cpus(self, cuda: bool) -> float:
        return float(self.num_cpus_per_rank) if self.num_cpus_per_rank is not None else (1.0 if cuda else 0.5)

    def _placement(self, cuda: bool) -> list[dict[str, float]]:
        """Place the group; return the actor resources of ranks 1..tp-1."""
        tp, cpus = self.tp_size, self._bundle_cpus(cuda)
        current = get_current_placement_group()
        if current is not None:
            if current.bundle_count < tp:
                raise ValueError(f"the caller runs in a placement group of {current.bundle_count} bundle(s); "
                                 f"tensor_parallel_size={tp} needs one bundle per rank")
            self._pg, self._own_pg = current, False
            res = []
            for r in range(1, tp):
                b = current.bundle_specs[r]
                if cuda and b.get("GPU", 0) < 1:
                    raise ValueError(f"bundle {r} of the caller's placement group has no GPU: {b}")
                res.append({"num_cpus": min(cpus, float(b.get("CPU", 0.0))), "num_gpus": 1 if cuda else 0})
            return res
        ip = ray.util.get_node_ip_address()
        worker_bundle = {"CPU": cpus, **({"GPU": 1.0} if cuda else {})}
        bundles = [{"CPU": cpus, f"node:{ip}": 0.001}] + [dict(worker_bundle) for _ in range(tp - 1)]
        self._pg = placement_group(bundles, strategy="STRICT_PACK", name=f"glm4-tp{tp}-{uuid.uuid4().hex[:8]}")
        self._own_pg = True
        ready, _ = ray.wait([self._pg.ready()], timeout=float(self.spec.startup_timeout_s))
        if not ready:
            raise TensorParallelError(
                f"could not place tensor_parallel_size={tp} on one node within {self.spec.startup_timeout_s:.0f} s "
                f"(STRICT_PACK bundles {bundles}); available: {ray.available_resources()}")
        return [{"num_cpus": cpus, "num_gpus": 1 if cuda else 0} for _ in range(1, tp)]

    def _launch_workers(self, master_port: int) -> str:
        if not ray.is_initialized():
            ray.init()
        cuda = self.rank0_device.startswith("cuda")
        self._node_id = ray.get_runtime_context().get_node_id()
        resources = self._placement(cuda)
        threads = worker_num_threads(self.tp_size)
        for r, res in zip(range(1, self.tp_size), resources):
            self._actors.append(TPRankActor.options(
                **res, max_concurrency=2, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r),
            ).remote(threads))
        self._infos = ray.get([a.info.remote() for a in self._actors], timeout=float(self.spec.startup_timeout_s))
        same_node = all(i["node_id"] == self._node_id for i in self._infos)
        addr = self.spec.master_addr if same_node else ray.util.get_node_ip_address()
        device = "cuda:0" if cuda else "cpu"  # Ray gives each GPU worker actor exactly its own GPU
        self._loop_refs = [a.serve.remote(self.spec, r, addr, master_port, device)
                           for r, a in zip(range(1, self.tp_size), self._actors)]
        return addr

    @property
    def worker_pids(self) -> list[int]:
        return [i["pid"] for i in self._infos]

    @property
    def placement_group(self):
        return self._pg

    # ---- supervision hooks -----------------------------------------------------------------------------------
    def _check_interval(self) -> float:
        return float(self.liveness_check_interval_s)

    def _dead_workers(self) -> list[str]:
        if self._stopping or not self._loop_refs:
            return []
        ready, _ = ray.wait(self._loop_refs, num_returns=len(self._loop_refs), timeout=0)
        dead = []
        for ref in ready:
            r = self._loop_refs.index(ref) + 1
            pid = self._infos[r - 1]["pid"] if r - 1 < len(self._infos) else "?"
            try:
                ray.get(ref, timeout=0)
                how = "left the group unexpectedly"
            except Exception as e:  # noqa: BLE001 - ActorDiedError, RayTaskError(...), ...
                how = _short(e)
            dead.append(f"rank {r} (actor pid {pid}): {how}")
        return dead

    def _join_workers(self, timeout: float) -> bool:
        if not self._loop_refs:
            return True
        ready, _ = ray.wait(self._loop_refs, num_returns=len(self._loop_refs), timeout=timeout)
        return len(ready) == len(self._loop_refs)

    def _kill_workers(self) -> None:
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass

    def _reap_workers(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        if self._loop_refs:
            ray.wait(self._loop_refs, num_returns=len(self._loop_refs), timeout=timeout)
        local = [i["pid"] for i in self._infos if i["node_id"] == self._node_id]
        while local and time.monotonic() < end:
            local = [p for p in local if _pid_alive(p)]
            if local:
                time.sleep(0.05)
        if local:
            logger.error("tensor-parallel worker actor process(es) %s still alive after kill", local)
        if self._own_pg and self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                logger.warning("removing placement group failed", exc_info=True)
            self._own_pg = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False
