"""GPU replicas on a real multi-node Ray cluster that starts without GPUs (as an autoscaling KubeRay cluster does).

The cluster is `ray start --head` plus worker nodes added while the job runs, with logical GPUs (`--num-gpus`, no
hardware): each replica must hold what its config asks for (`device: cuda` -> one GPU per tensor-parallel rank),
while the engine itself runs on CPU (`engine.device: cpu`). The job runs as the `glm4-batch` CLI in a subprocess,
as a scheduled job would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .ray_nodes import REPO, RayNodes

from .conftest import write_prompts

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def nodes():
    cluster = RayNodes().head(num_cpus=2, num_gpus=0)
    try:
        yield cluster
    finally:
        cluster.stop()


class Job:
    """`glm4-batch` in a subprocess; its stderr collected line by line."""

    def __init__(self, nodes: RayNodes, model_dir: Path, tmp: Path, rows: int, *args: str):
        write_prompts(tmp / "in.parquet", {"prompt": [f"question {i}: " + "word " * (i % 5) for i in range(rows)]})
        self.out = tmp / "out"
        cmd = [sys.executable, "-m", "jobs.batch", "--ray-address", nodes.address, "--model", str(model_dir),
               "--input", str(tmp / "in.parquet"), "--output", str(self.out), "--prompt-column", "prompt",
               "--model-cache-dir", str(tmp / "cache"), "--max-tokens", "4", "--batch-size", "4",
               "--replica-num-cpus", "0.5", "--progress-interval", "2", "--device", "cuda",
               "--engine-device", "cpu", *args]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.started = time.monotonic()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {needle!r} in the job's output within {timeout:.0f}s:\n{self.text[-4000:]}")
            time.sleep(0.5)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job still running after {timeout:.0f}s:\n{self.text[-4000:]}")
        self._reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def manifest(self) -> dict:
        return json.loads((self.out / "manifest.json").read_text())


def _replicas(manifest: dict) -> dict[str, dict]:
    """Every replica that started in the run: where it ran and what Ray gave it."""
    return manifest["replicas"]["started"]


def test_without_gpu_nodes_the_job_fails_in_bounded_time_naming_the_resource(nodes, model_dir, tmp_path):
    job = Job(nodes, model_dir, tmp_path, 4, "--resource-timeout", "8")
    rc = job.wait(timeout=120)
    elapsed = time.monotonic() - job.started
    assert rc == 1, job.text[-3000:]
    assert "phase: resources pending" in job.text  # it said what it waited for while waiting
    assert "1 of 1 replica(s) could not be placed within 8s: each needs 1 GPU, 0.5 CPU" in job.text, job.text[-3000:]
    assert "GPU 0 free of 0" in job.text
    assert not (job.out / "_SUCCESS").exists()
    assert elapsed < 90


def test_gpu_job_waits_for_a_gpu_node_then_each_replica_holds_its_gpu(nodes, model_dir, tmp_path):
    job = Job(nodes, model_dir, tmp_path, 12, "--resource-timeout", "240", "--num-replicas", "1")
    job.wait_for_line("phase: resources pending", timeout=120)  # a GPU job on a cluster with no GPU: it waits
    assert job.proc.poll() is None
    nodes.add(num_cpus=2, num_gpus=1)
    rc = job.wait(timeout=300)
    assert rc == 0, job.text[-4000:]
    m = job.manifest()
    assert m["counts"]["rows_ok"] == 12 and m["counts"]["missing_ids"] == 0
    assert m["replicas"]["bundles"] == [{"CPU": 0.5, "GPU": 1.0}]
    (stats,) = _replicas(m).values()
    assert stats["gpu_ids"] == "0"  # the replica actor holds a GPU from its reserved bundle
    assert stats["placement_group"] and stats["phase"] == "ready"
    assert m["config"]["device"] == "cuda"


def test_tensor_parallel_replicas_start_on_gpu_nodes_joining_one_after_the_other(nodes, model_dir, tmp_path):
    job = Job(nodes, model_dir, tmp_path, 16, "--resource-timeout", "300", "--num-replicas", "2",
              "--tensor-parallel-size", "2")
    job.wait_for_line("phase: resources pending", timeout=120)
    nodes.add(num_cpus=2, num_gpus=2)
    # One replica's group fits the first node; the job keeps waiting for the second (no half-placed replica).
    job.wait_for_line("1/2 replica(s) placed", timeout=120)
    nodes.add(num_cpus=2, num_gpus=2)
    rc = job.wait(timeout=400)
    assert rc == 0, job.text[-4000:]
    m = job.manifest()
    assert m["counts"]["rows_ok"] == 16 and m["counts"]["missing_ids"] == 0
    assert m["replicas"]["bundles"] == [{"CPU": 0.5, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    replicas = _replicas(m)
    assert len(replicas) == 2, replicas
    assert len({s["node_id"] for s in replicas.values()}) == 2  # STRICT_PACK: one replica per 2-GPU node
    # each replica actor holds one of its node's two GPUs (bundle 0); its rank-1 actor holds the other. Both started;
    # the second may still be loading when the first has done every row (Ray Data does not wait for the whole pool).
    assert all(s["gpu_ids"] in ("0", "1") and s["placement_group"] for s in replicas.values()), replicas
    assert len({s["placement_group"] for s in replicas.values()}) == 2
    assert "ready" in {s["phase"] for s in replicas.values()}


def test_replica_resources_come_from_the_config_only():
    from pipeline.batch import replica_resources
    from pipeline.config import BatchJobConfig

    base = dict(input="in.parquet", output="out", model="m", prompt_column="p")
    gpu = replica_resources(BatchJobConfig(**base, tensor_parallel_size=2, replica_num_cpus=2, replica_memory=2**34))
    assert gpu.bundles() == [{"CPU": 2.0, "GPU": 1.0, "memory": float(2**34)}, {"CPU": 1.0, "GPU": 1.0}]
    assert gpu.actor_options() == {"num_cpus": 2, "num_gpus": 1, "memory": 2**34}
    assert gpu.describe() == "2 GPU, 3 CPU, 16.0 GiB memory on one node (tensor_parallel_size=2, device=cuda)"
    cpu = replica_resources(BatchJobConfig(**base, device="cpu", replica_num_cpus=0.5))
    assert cpu.bundles() == [{"CPU": 0.5}] and cpu.actor_options() == {"num_cpus": 0.5, "num_gpus": 0}
    cfg = BatchJobConfig(**base)
    assert cfg.engine.llm_kwargs(1, cfg.device)["dtype"] == "bfloat16"  # bf16 by default on CUDA
    assert "dtype" not in cfg.engine.llm_kwargs(1, "cpu")


def test_ray_data_still_takes_a_per_actor_remote_args_function():
    """pipeline.placement hands each replica actor its placement group through map_batches' `ray_remote_args_fn`
    (deprecated for removal in Ray 2.64, as ray.data.llm still uses it in 2.60). Fails loudly when it goes: then move
    to whatever Ray Data offers for per-actor placement groups."""
    import inspect

    import ray.data

    assert "ray_remote_args_fn" in inspect.signature(ray.data.Dataset.map_batches).parameters


def test_each_replica_actor_gets_one_reserved_group_and_no_group_is_left_over(ray_cluster):
    """Ray Data starts the pool's actors with a reserved placement group each (bundle 0), and calls for the options
    that start no actor (its memory issue detector) get none: a stray group would hold CPU that read tasks need."""
    import ray
    import ray.data

    from pipeline.placement import ReplicaPlacement, ReplicaResources

    class Where:
        def __call__(self, batch):
            ctx = ray.get_runtime_context()
            return {"pg": [ctx.get_placement_group_id() or ""] * len(batch["id"])}

    placement = ReplicaPlacement(ReplicaResources(device="cpu", tensor_parallel_size=1, replica_num_cpus=0.25))
    try:
        placement.reserve(2, timeout_s=60)
        ds = ray.data.range(40, override_num_blocks=8)
        ds = placement.map_batches(ds, Where, batch_size=5,
                                   compute=ray.data.ActorPoolStrategy(min_size=2, max_size=2))
        pgs = {r["pg"] for r in ds.take_all()}
        assert len(placement.groups) == 2, "a placement group was created that no replica uses"
        assert pgs <= {pg.id.hex() for pg in placement.groups} and "" not in pgs
    finally:
        placement.release()
