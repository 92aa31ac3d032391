"""Fixtures for the Serve endpoint tests: one local Ray cluster, one Serve instance on a free 127.0.0.1 port and
one GLM4Server app (tiny checkpoint, bearer auth on, small admission limits) for the whole session."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

API_KEY = "test-key-0123456789"
APP_NAME = "glm4-serve-test"
MAX_MODEL_LEN = 2048  # the tiny model's max_position_embeddings: room for requests that run for seconds
MAX_ONGOING = 8
MAX_QUEUED = 24  # MAX_ONGOING + MAX_QUEUED = 32: the 32-stream test fits exactly; a 33rd waiter would get 429


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(model_dir: Path | str, **overrides) -> dict:
    args = {
        "model": str(model_dir),
        "served_model_name": "glm4-tiny",
        "api_key": API_KEY,
        "num_cpus": 0.5,
        "max_model_len": MAX_MODEL_LEN,
        "kv_cache_memory": 64 * 2**20,
        "dtype": "float32",
        "device": "cpu",
        "max_ongoing_requests": MAX_ONGOING,
        "max_queued_requests": MAX_QUEUED,
        "retry_after_s": 2,
    }
    args.update(overrides)
    return args


class ServeHandle:
    def __init__(self, base_url: str, model: str, api_key: str):
        self.base_url = base_url
        self.model = model
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"}

    def client(self, **kw):
        import httpx

        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=kw.pop("timeout", 60), **kw)

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def async_openai(self, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0,
                                  timeout=kw.pop("timeout", 120), **kw)

    def stats(self) -> dict:
        with self.client() as c:
            r = c.get("/admin/stats")
            r.raise_for_status()
            return r.json()

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Engine stats once nothing runs, waits or streams and every KV block is free again."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            e = s["engine"]
            idle = (e["num_running"] == 0 and e["num_waiting"] == 0 and e.get("num_streams", 0) == 0
                    and e["kv_blocks_free"] == e["kv_blocks_total"] and s["admission"]["ongoing"] == 0
                    and s["admission"]["queued"] == 0)
            if idle:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not idle after {timeout}s: {s}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def serve_app(tiny_checkpoint) -> ServeHandle:
    import ray
    from ray import serve

    from pipeline.serve.app import build_app

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    actual = serve.context._get_global_client().http_config.port  # an earlier serve.start in this session wins
    serve.run(build_app(app_args(tiny_checkpoint)), name=APP_NAME, route_prefix="/")
    handle = ServeHandle(f"http://127.0.0.1:{actual}", "glm4-tiny", API_KEY)
    yield handle
    serve.delete(APP_NAME)


@pytest.fixture(scope="session")
def reference_llm(tiny_checkpoint):
    """The offline engine on the same checkpoint: the server's greedy text must equal it."""
    from glm4 import LLM

    llm = LLM(str(tiny_checkpoint), max_model_len=MAX_MODEL_LEN, kv_cache_memory=16 * 2**20, dtype="float32",
              device="cpu")
    yield llm
    llm.shutdown()
