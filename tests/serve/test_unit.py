"""Pieces of the Serve app that need no cluster: app args, deployment options, admission control, the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.serve.app import Admission, Overloaded, ServeArgs, deployment_options
from pipeline.serve.protocol import ChatCompletionRequest, CompletionRequest, validation_error_to_api_error


def test_serve_args_reject_unknown_keys():
    with pytest.raises(ValidationError, match="max_ongoing_request"):
        ServeArgs.model_validate({"model": "/m", "max_ongoing_request": 5})  # typo of max_ongoing_requests
    with pytest.raises(ValidationError):
        ServeArgs.model_validate({})  # model is required


def test_serve_args_engine_options_and_name():
    a = ServeArgs.model_validate({"model": "/models/glm-4-9b-chat/", "dtype": "bfloat16", "max_model_len": 8192,
                                  "kv_cache_memory": 0.8, "engine_options": {"block_size": 32}})
    assert a.model_name() == "glm-4-9b-chat"
    assert a.resolved_engine_options() == {"block_size": 32, "dtype": "bfloat16", "max_model_len": 8192,
                                           "kv_cache_memory": 0.8}
    assert ServeArgs(model="/m", kv_cache_memory=2**30).resolved_engine_options()["kv_cache_memory"] == 2**30


def test_deployment_options_tp1_and_limits():
    from ray.serve.config import BackpressureConfig

    opts = deployment_options(ServeArgs(model="/m", num_cpus=0.5, max_ongoing_requests=8, max_queued_requests=4,
                                        retry_after_s=3))
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert opts["num_replicas"] == 1 and "placement_group_bundles" not in opts
    # Serve's cap is above the replica's own admission limits; its queue answers 429 too
    assert opts["max_ongoing_requests"] > 8 + 4
    bp = opts["backpressure_config"]
    assert isinstance(bp, BackpressureConfig) and bp.status_code == 429 and bp.retry_after_s == 3
    auto = deployment_options(ServeArgs(model="/m", autoscaling_config={"min_replicas": 1, "max_replicas": 4}))
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4


def test_deployment_options_tensor_parallel_bundles():
    args = ServeArgs(model="/m", tensor_parallel_size=4, num_gpus=1, num_cpus=2, device="cuda")
    opts = deployment_options(args)
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["placement_group_bundles"] == [{"CPU": 2, "GPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 3
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1.0}
    eo = args.resolved_engine_options()
    assert eo["tensor_parallel_size"] == 4 and eo["executor"] == "pipeline.tp_ray:RayExecutor"
    # the Serve schema accepts these options
    from ray.serve.schema import DeploymentSchema

    DeploymentSchema.model_validate({"name": "GLM4Server", **{k: v for k, v in opts.items()
                                                               if k != "backpressure_config"}})


def test_admission_bounds_and_fifo():
    async def main():
        adm = Admission(max_ongoing=2, max_queued=2, retry_after_s=1.5)
        await adm.acquire()
        await adm.acquire()
        assert adm.ongoing == 2
        waiters = [asyncio.create_task(adm.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        assert adm.queued == 2
        with pytest.raises(Overloaded) as e:
            await adm.acquire()  # refused at once, not after a wait
        assert e.value.status_code == 429 and e.value.headers == {"Retry-After": "2"}
        assert adm.rejected == 1
        # a cancelled waiter gives its queue place back
        waiters[1].cancel()
        await asyncio.sleep(0)
        assert adm.queued == 1
        adm.release()
        await waiters[0]
        assert adm.ongoing == 2 and adm.queued == 0
        adm.release()
        adm.release()
        assert adm.ongoing == 0

    asyncio.run(main())


def test_admission_zero_queue():
    async def main():
        adm = Admission(max_ongoing=1, max_queued=0, retry_after_s=0)
        await adm.acquire()
        with pytest.raises(Overloaded):
            await adm.acquire()
        adm.release()
        await adm.acquire()

    asyncio.run(main())


@pytest.mark.parametrize("body,param", [
    (b'{"model": "m", "prompt": "x", "max_tokens": "5"}', "max_tokens"),
    (b'{"model": "m", "messages": [{"role": "user", "content": ["x"]}]}', "messages[0].content"),
])
def test_protocol_strict_types(body, param):
    cls = ChatCompletionRequest if b"messages" in body else CompletionRequest
    with pytest.raises(ValidationError) as e:
        cls.model_validate_json(body)
    err = validation_error_to_api_error(e.value)
    assert err.status_code == 400 and err.param == param


def test_protocol_prompt_forms_and_chat_fields():
    assert CompletionRequest.model_validate_json(b'{"model":"m","prompt":"a"}').prompts() == ["a"]
    assert CompletionRequest.model_validate_json(b'{"model":"m","prompt":[1,2]}').prompts() == [[1, 2]]
    assert CompletionRequest.model_validate_json(b'{"model":"m","prompt":[[1],[2]]}').prompts() == [[1], [2]]
    assert CompletionRequest.model_validate_json(b'{"model":"m","prompt":["a","b"]}').prompts() == ["a", "b"]
    r = ChatCompletionRequest.model_validate_json(
        b'{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},'
        b'{"type":"text","text":"b"}]},{"role":"tool","content":"r"}],"max_completion_tokens":7,'
        b'"logprobs":true,"top_logprobs":3,"stream":true,"stream_options":{"include_usage":true},"unknown":1}')
    assert [m.glm_role() for m in r.messages] == ["system", "observation"]
    assert r.messages[0].text() == "ab" and r.requested_max_tokens == 7 and r.num_logprobs == 3
    assert r.include_usage


def test_cli_builds_app_args(monkeypatch, tmp_path):
    from jobs.serve import build_args, parse_args

    monkeypatch.setenv("GLM4_API_KEY", "from-env")
    ns = parse_args(["--model", str(tmp_path), "--port", "9000", "--num-cpus", "0.5", "--max-ongoing-requests",
                     "16", "--max-queued-requests", "8", "--engine-option", "block_size=32",
                     "--engine-option", "enable_prefix_caching=false", "--max-model-len", "4096"])
    args = build_args(ns)
    assert args["api_key"] == "from-env"
    assert args["max_ongoing_requests"] == 16 and args["max_queued_requests"] == 8 and args["num_cpus"] == 0.5
    assert args["engine_options"] == {"block_size": 32, "enable_prefix_caching": False}
    assert args["max_model_len"] == 4096
    ServeArgs.model_validate(args)
    ns = parse_args(["--model", str(tmp_path), "--api-key", "explicit"])
    assert build_args(ns)["api_key"] == "explicit"


def test_cli_errors_return_exit_code(tmp_path, capsys):
    from jobs.serve import main

    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--engine-option", "novalue"]) == 2


def test_model_uri_resolution(tiny_checkpoint, tmp_path):
    from pipeline.io import ModelPathError

    assert ServeArgs(model=f"file://{tiny_checkpoint}").local_model_dir() == Path(tiny_checkpoint).resolve()
    assert ServeArgs(model=str(tiny_checkpoint)).local_model_dir() == Path(tiny_checkpoint).resolve()
    with pytest.raises(ModelPathError):
        ServeArgs(model=str(tmp_path / "missing")).local_model_dir()
