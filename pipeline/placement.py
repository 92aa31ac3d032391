"""Where engine replicas run: resources from the job config, reserved as whole placement groups before any actor.

A replica is one Ray Data actor (tensor-parallel rank 0, the engine) plus tp-1 rank actors that
`pipeline.tp_ray.RayExecutor` starts. Its whole bundle set is one `STRICT_PACK` placement group, reserved before
the replica actor is placed in bundle 0:

    bundle 0      {"CPU": replica_num_cpus, "GPU": 1 (cuda), "memory": replica_memory}   <- the replica actor
    bundle 1..tp  {"CPU": 1 (cuda) | 0.5 (cpu), "GPU": 1 (cuda)}                          <- rank actors

Reserving the group first is what makes a tensor-parallel pool safe on an autoscaling cluster: an actor that took a
GPU and then asked for the rest of its node could end up, with a peer doing the same, holding half of two nodes
forever. Ray's own `ray.data.llm` reserves the group the same way; unlike it, our rank 0 runs inside the replica
actor (one process hop less per step), so the actor takes bundle 0's GPU from the reserved group.

Resources come only from the config (`device`, `tensor_parallel_size`); nothing here looks at what the cluster has,
except to say what is missing while waiting.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


class ResourcesUnavailableError(RuntimeError):
    """The replicas' resources did not appear within the configured time (the message names them)."""


@dataclass(frozen=True)
class ReplicaResources:
    device: str  # "cuda" | "cpu"
    tensor_parallel_size: int
    replica_num_cpus: float
    replica_memory: int | None = None

    @property
    def gpus_per_rank(self) -> int:
        return 1 if self.device == "cuda" else 0

    @property
    def rank_num_cpus(self) -> float:
        # pipeline.tp_ray.RayExecutor's default per-rank reservation (it takes min(its default, the bundle's CPU)).
        return 1.0 if self.device == "cuda" else 0.5

    def bundles(self) -> list[dict[str, float]]:
        gpu = {"GPU": 1.0} if self.gpus_per_rank else {}
        first: dict[str, float] = {"CPU": float(self.replica_num_cpus), **gpu}
        if self.replica_memory:
            first["memory"] = float(self.replica_memory)
        return [first] + [{"CPU": self.rank_num_cpus, **gpu} for _ in range(self.tensor_parallel_size - 1)]

    def actor_options(self) -> dict[str, Any]:
        """Static Ray options of the replica actor (what it takes from bundle 0)."""
        opts: dict[str, Any] = {"num_cpus": self.replica_num_cpus, "num_gpus": self.gpus_per_rank}
        if self.replica_memory:
            opts["memory"] = self.replica_memory
        return opts

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles():
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def describe(self) -> str:
        t = self.total()
        parts = [f"{t.get('GPU', 0):g} GPU"] if t.get("GPU") else []
        parts.append(f"{t.get('CPU', 0):g} CPU")
        if t.get("memory"):
            parts.append(f"{t['memory'] / 2**30:.1f} GiB memory")
        where = " on one node" if self.tensor_parallel_size > 1 else ""
        return f"{', '.join(parts)}{where} (tensor_parallel_size={self.tensor_parallel_size}, device={self.device})"


# Placement state lives in the driver process (Ray Data calls the remote-args function there when it starts an
# actor); the function itself is a picklable partial that finds its state by key.
_PLACEMENTS: dict[str, "ReplicaPlacement"] = {}


# Ray Data also calls the remote-args function when it only wants to read the options (its memory issue detector
# does, once per dataset); a placement group made for such a call would reserve resources no actor ever uses (on a
# small cluster, the CPU a read task needs). So a group is handed out only to an actor start, recognised by the
# caller's frame: Ray Data's internal `_start_actor` (Ray 2.60). tests/pipeline/test_placement.py fails if it goes.
_ACTOR_START_FRAME = "_start_actor"


def _called_to_start_an_actor(max_depth: int = 12) -> bool:
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return False
        if frame.f_code.co_name == _ACTOR_START_FRAME:
            return True
        frame = frame.f_back
    return False


def _remote_args_for(key: str, fallback: ReplicaResources) -> dict[str, Any]:
    if not _called_to_start_an_actor():
        return {}
    placement = _PLACEMENTS.get(key)
    if placement is None:  # called in another process (a copied plan): reserve a fresh group there
        placement = ReplicaPlacement(fallback)
    return placement.next_actor_args()


class ReplicaPlacement:
    """Placement groups of one job's replicas: `reserve()` the first ones and wait for them; Ray Data then takes
    a reserved group for each actor it starts (a new one when the pool grows); `release()` removes them all."""

    strategy = "STRICT_PACK"  # a replica never spans nodes: it waits (and the autoscaler adds a node) instead

    def __init__(self, resources: ReplicaResources):
        self.resources = resources
        self.key = uuid.uuid4().hex[:12]
        self._ready: list[Any] = []  # reserved groups not yet given to an actor
        self._all: list[Any] = []

    def _new_group(self):
        from ray.util.placement_group import placement_group

        pg = placement_group(self.resources.bundles(), strategy=self.strategy,
                             name=f"glm4-replica-{self.key}-{len(self._all)}")
        self._all.append(pg)
        return pg

    def reserve(self, n: int, timeout_s: float, say: Callable[[str], None] | None = None,
                interval_s: float = 10.0) -> float:
        """Reserve `n` replicas' groups and wait until all are placed; return the seconds waited.

        Pending groups are what an autoscaler scales up for, so this is also how GPU nodes get requested. Raises
        `ResourcesUnavailableError` (and removes the groups) when they are not all placed within `timeout_s`.
        """
        import ray

        pgs = [self._new_group() for _ in range(n)]
        refs = [pg.ready() for pg in pgs]
        start = time.monotonic()
        deadline = start + timeout_s
        ready: list[Any] = []
        while True:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, min(interval_s, left)))
            waited = time.monotonic() - start
            if len(ready) == len(refs):
                self._ready.extend(pgs)
                return waited
            if time.monotonic() >= deadline:
                break
            if say is not None:
                say(f"[glm4-batch] phase: resources pending ({waited:.0f}s of at most {timeout_s:.0f}s): "
                    f"{len(ready)}/{n} replica(s) placed, each needs {self.resources.describe()}; "
                    f"cluster has {_cluster_line()}")
        self.release()
        raise ResourcesUnavailableError(
            f"{n - len(ready)} of {n} replica(s) could not be placed within {timeout_s:.0f}s: each needs "
            f"{self.resources.describe()}, bundles {self.resources.bundles()} ({self.strategy}); the cluster has "
            f"{_cluster_line()}. Add nodes with these resources (or let the autoscaler add them: check its GPU "
            "worker group), lower num_replicas / tensor_parallel_size, raise resource_timeout_s, or run with "
            "device: cpu."
        )

    def next_actor_args(self) -> dict[str, Any]:
        """Ray remote args for the next replica actor: bundle 0 of a reserved group (a new group when none is
        left; the actor then waits for it, as the pool grows on an autoscaling cluster)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = self._ready.pop(0) if self._ready else self._new_group()
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}

    def remote_args_fn(self) -> Callable[[], dict[str, Any]]:
        _PLACEMENTS[self.key] = self
        return functools.partial(_remote_args_for, self.key, self.resources)

    def map_batches(self, ds, fn, **kwargs: Any):
        """`ds.map_batches(fn, ...)` with this placement: static options of bundle 0 plus the per-actor group."""
        with warnings.catch_warnings():
            # `ray_remote_args_fn` is deprecated for removal in Ray 2.64; ray.data.llm places its engines the same
            # way in 2.60. tests/pipeline/test_placement.py fails loudly when it goes.
            warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
            return ds.map_batches(fn, **kwargs, **self.resources.actor_options(),
                                  ray_remote_args_fn=self.remote_args_fn())

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        _PLACEMENTS.pop(self.key, None)
        for pg in self._all:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already gone with its job
                pass
        self._all.clear()
        self._ready.clear()

    @property
    def groups(self) -> list[Any]:
        return list(self._all)


def _cluster_line() -> str:
    import ray

    total, avail = ray.cluster_resources(), ray.available_resources()
    parts = []
    for k in ("GPU", "CPU"):
        parts.append(f"{k} {avail.get(k, 0):g} free of {total.get(k, 0):g}")
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{', '.join(parts)} on {nodes} node(s)"
