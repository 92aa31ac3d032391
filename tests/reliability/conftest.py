"""Fixtures of the reliability/security tests. They reuse the pipeline and Serve test helpers (loaded from their
files, not edited): the session Ray cluster, moto's S3 server behind a stoppable TCP proxy, and a Serve app of
the tiny checkpoint. The Serve app here is our own (name ``glm4-reliability`` under ``/rel``, small admission
limits, a max_tokens cap), so it can live next to tests/serve's app in the same session."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent


def _load(name: str, path: Path):
    """Import another test directory's helper module under a private name (its package name depends on how
    pytest was invoked, so importing it by name is fragile)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


pipeline_helpers = _load("_glm4_rel_pipeline_conftest", TESTS / "pipeline" / "conftest.py")
serve_helpers = _load("_glm4_rel_serve_conftest", TESTS / "serve" / "conftest.py")

# Session fixtures re-registered for this directory (same code as tests/pipeline).
ray_cluster = pipeline_helpers.ray_cluster
moto_s3 = pipeline_helpers.moto_s3
s3_endpoint = pipeline_helpers.s3_endpoint
s3 = pipeline_helpers.s3
bucket = pipeline_helpers.bucket
model_dir = pipeline_helpers.model_dir

REL_APP = "glm4-reliability"
REL_PREFIX = "/rel"
REL_MAX_ONGOING = 4
REL_MAX_QUEUED = 4
REL_MAX_TOKENS = 200  # max_tokens_limit: fuzzed requests never run long
REL_MAX_MODEL_LEN = 256
REL_MAX_REQUEST_BYTES = 256 * 1024


def rel_app_args(model: Path | str, **overrides) -> dict:
    args = serve_helpers.app_args(model, max_model_len=REL_MAX_MODEL_LEN, max_ongoing_requests=REL_MAX_ONGOING,
                                  max_queued_requests=REL_MAX_QUEUED, max_tokens_limit=REL_MAX_TOKENS,
                                  max_request_bytes=REL_MAX_REQUEST_BYTES, retry_after_s=1)
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def rel_serve(tiny_checkpoint):
    """Our own Serve app on 127.0.0.1 (module-scoped: deleted when the module's tests are done)."""
    import ray
    from ray import serve

    from pipeline.serve.app import build_app

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": serve_helpers.free_port()})
    port = serve.context._get_global_client().http_config.port
    serve.run(build_app(rel_app_args(tiny_checkpoint)), name=REL_APP, route_prefix=REL_PREFIX)
    handle = serve_helpers.ServeHandle(f"http://127.0.0.1:{port}{REL_PREFIX}", "glm4-tiny", serve_helpers.API_KEY)
    handle.host, handle.port = "127.0.0.1", port
    yield handle
    serve.delete(REL_APP)


os.environ.setdefault("RAY_AUTH_MODE", "disabled")
