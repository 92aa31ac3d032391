"""Fixtures for the tensor-parallel tests: tiny float32 checkpoints in both layouts, a local Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

LAYOUTS = ("chatglm", "glm")


@pytest.fixture(scope="session")
def tp_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny model (seed 0) in the original and the HF layout, float32, 2 shards each."""
    from glm4.tools.make_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("tp-ckpt")
    return {layout: make_checkpoint(root / layout, "tiny", layout=layout, seed=0, num_shards=2, dtype="float32")
            for layout in LAYOUTS}


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster (4 logical CPUs), shared by the TP test modules (or the session's, if one is up)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
