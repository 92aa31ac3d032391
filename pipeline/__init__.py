"""Ray glue around glm4: the Ray Data batch pipeline, the Ray-actor TP launcher and the Serve endpoint."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so importing `pipeline.serve` or `pipeline.tp_ray` does not pull in Ray Data.
    if name == "run_batch":
        from pipeline.batch import run_batch

        return run_batch
    if name == "BatchJobConfig":
        from pipeline.config import BatchJobConfig

        return BatchJobConfig
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
