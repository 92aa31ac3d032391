"""A tensor-parallel replica: the deployment's placement-group bundles hold rank 0 (the replica) and the worker
rank (a Ray actor in bundle 1); its greedy text equals the single-process engine's."""

from __future__ import annotations

import pytest

from glm4 import SamplingParams

from .conftest import app_args

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def test_tp2_replica_matches_single_process(serve_app, reference_llm, tiny_checkpoint):
    import httpx
    from ray import serve

    from pipeline.serve.app import build_app

    args = app_args(tiny_checkpoint, tensor_parallel_size=2, tp_worker_num_cpus=0.5, api_key=None,
                    served_model_name="glm4-tiny-tp2")
    serve.run(build_app(args), name="glm4-serve-tp2", route_prefix="/tp2")
    try:
        prompt = "The capital of France is"
        ref = reference_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16))[0]
        with httpx.Client(base_url=serve_app.base_url + "/tp2", timeout=60) as c:
            r = c.post("/v1/completions", json={"model": "glm4-tiny-tp2", "prompt": prompt, "max_tokens": 16,
                                                "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref.text
    finally:
        serve.delete("glm4-serve-tp2")
