"""Ray Serve OpenAI-compatible endpoint: one ``glm4.AsyncLLMEngine`` per replica behind a FastAPI ingress.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` -> server-sent events ending in
``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /admin/stats`` (engine + admission counters).

Design choices (the weak points of the field this is built against):
- **One deployment, no extra hop.** The ingress and the engine live in the same replica, so a token goes engine ->
  SSE frame -> Serve proxy, with no second deployment call (Serve LLM's router->server hop is a known overhead).
- **Bounded admission, 429 at once.** Each replica admits ``max_ongoing_requests`` requests into the engine and lets
  at most ``max_queued_requests`` more wait; past that a request gets 429 with ``Retry-After`` and OpenAI's error
  body straight away. Serve's own per-replica limit is set above ours (so the replica decides, not a proxy queue),
  and Serve's proxy queue is bounded too, answering 429 + Retry-After as a second line (Serve's
  ``BackpressureConfig``).
- **Cancellation.** When a client disconnects, Serve cancels the request's task; our cleanup aborts every engine
  request of that HTTP request, which frees its KV blocks at once (observable in ``/admin/stats``).
- **Never a 500 for bad input.** The body is parsed and type-checked in one strict pydantic pass; JSON errors,
  types, unknown models, prompts over the context and max_tokens over the limit are 4xx with
  ``{"error": {"message", "type", "param", "code"}}``.

``build_app(args)`` is the Serve app builder (``import_path: pipeline.serve.app:build_app``); ``args`` are validated
by :class:`ServeArgs` with unknown keys rejected.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib
import json
import logging
import math
import os
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from ray import serve
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from ray.exceptions import TaskCancelledError as _RayTaskCancelled
from starlette.responses import Response, StreamingResponse

from pipeline.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_error_to_api_error,
)

logger = logging.getLogger("ray.serve")

API_KEY_ENV = "GLM4_API_KEY"
DEPLOYMENT_NAME = "GLM4Server"
DEFAULT_ENGINE_CLS = "glm4:AsyncLLMEngine"
DEFAULT_TP_EXECUTOR = "pipeline.tp_ray:RayExecutor"
# Serve-level concurrency headroom above our admission limits, for /health, /v1/models and /admin/stats.
_CONTROL_HEADROOM = 16
_TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_LATENCY_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
_TPS_BUCKETS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]


# ==============================================================================================================
# app arguments
# ==============================================================================================================
class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of a Serve config application). Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Checkpoint directory (config.json, *.safetensors, tokenizer.model), or an "
                       "s3:// / file:// URI; s3:// is downloaded once per node into model_cache_dir.")
    model_cache_dir: Optional[str] = Field(None, description="Node-local cache for s3:// models; default "
                                           "$GLM4_MODEL_CACHE or ~/.cache/glm4-ray/models.")
    storage: dict[str, Any] = Field(default_factory=dict, description="Object-storage options for s3:// models "
                                    "(pipeline.config.StorageOptions fields); unset ones come from the environment.")
    served_model_name: Optional[str] = Field(None, description="Name clients send as `model`; default: the "
                                             "checkpoint directory's name.")
    model_aliases: list[str] = Field(default_factory=list, description="Other accepted `model` names.")
    api_key: Optional[str] = Field(None, description=f"Bearer token required on /v1/* and /admin/*; default: "
                                   f"env {API_KEY_ENV} in the replica; unset = no auth.")
    # --- replicas and resources
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored with autoscaling_config).")
    autoscaling_config: Optional[dict[str, Any]] = Field(None, description="Serve autoscaling_config.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica actor (fractional is fine).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica at tensor_parallel_size=1.")
    tensor_parallel_size: int = Field(1, ge=1, description="Ranks per replica; >1 uses placement-group bundles.")
    tp_worker_num_cpus: float = Field(1.0, ge=0, description="CPUs per extra TP rank bundle.")
    placement_group_strategy: str = Field("STRICT_PACK", description="For tensor_parallel_size > 1.")
    executor: Optional[str] = Field(None, description=f"Engine executor 'module:Class'; default "
                                    f"{DEFAULT_TP_EXECUTOR} when tensor_parallel_size > 1.")
    # --- admission control (per replica)
    max_ongoing_requests: int = Field(64, ge=1, description="Requests generating at once per replica.")
    max_queued_requests: int = Field(64, ge=0, description="Requests waiting per replica; past it: 429.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with 429.")
    proxy_max_queued_requests: int = Field(256, ge=1, description="Serve's own per-caller queue bound "
                                           "(second line, also 429).")
    # --- request limits
    max_tokens_limit: Optional[int] = Field(None, ge=1, description="Largest max_tokens a request may ask for "
                                            "(default: the context length).")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body; past it: 413.")
    max_sequences_per_request: int = Field(256, ge=1, description="Largest (number of prompts) x n of one "
                                           "request; past it: 400. One request holds one admission slot, so "
                                           "without this bound one call could queue thousands of sequences.")
    # --- engine
    engine_options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of "
                                           "AsyncLLMEngine.from_pretrained (as glm4.LLM).")
    dtype: Optional[str] = None
    device: Optional[str] = None
    max_model_len: Optional[int] = Field(None, ge=2)
    max_num_seqs: Optional[int] = Field(None, ge=1)
    kv_cache_memory: Optional[float] = Field(None, gt=0, description="Bytes (>1) or a fraction of free memory.")
    engine_cls: str = Field(DEFAULT_ENGINE_CLS, description="'module:Class' with from_pretrained(dir, **opts).")
    # --- observability
    enable_access_log: bool = Field(False, description="Serve's per-request access log line.")
    stats_interval_s: float = Field(1.0, gt=0, description="How often engine gauges are refreshed.")

    @field_validator("placement_group_strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        if v not in {"PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"}:
            raise ValueError(f"placement_group_strategy must be PACK/STRICT_PACK/SPREAD/STRICT_SPREAD, got {v!r}")
        return v

    def resolved_engine_options(self) -> dict[str, Any]:
        opts = dict(self.engine_options)
        for key in ("dtype", "device", "max_model_len", "max_num_seqs"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.kv_cache_memory is not None:
            kv = self.kv_cache_memory
            opts["kv_cache_memory"] = int(kv) if kv > 1 else float(kv)
        if self.tensor_parallel_size > 1:
            opts["tensor_parallel_size"] = self.tensor_parallel_size
            opts.setdefault("executor", self.executor or DEFAULT_TP_EXECUTOR)
        elif self.executor:
            opts.setdefault("executor", self.executor)
        return opts

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name or "glm4"

    def local_model_dir(self) -> Path:
        """The checkpoint as a local directory (downloading an s3:// model into the node cache first)."""
        from pipeline.config import StorageOptions
        from pipeline.io import resolve_model_dir

        cache = self.model_cache_dir or os.environ.get("GLM4_MODEL_CACHE") or str(
            Path.home() / ".cache" / "glm4-ray" / "models")
        storage = StorageOptions.model_validate(self.storage) if self.storage else None
        return resolve_model_dir(self.model, storage, cache)


# ==============================================================================================================
# admission control
# ==============================================================================================================
class Overloaded(APIError):
    def __init__(self, retry_after_s: float, ongoing: int, queued: int):
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(429, f"server overloaded: {ongoing} requests running and {queued} queued on this "
                              f"replica; retry after {seconds}s", type="rate_limit_error",
                         code="server_overloaded", headers={"Retry-After": str(seconds)})


class Admission:
    """At most ``max_ongoing`` holders at once, at most ``max_queued`` waiters; anyone past that is refused
    immediately (no waiting, no timeout)."""

    def __init__(self, max_ongoing: int, max_queued: int, retry_after_s: float):
        self.max_ongoing = max_ongoing
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.ongoing = 0
        self.queued = 0
        self.rejected = 0
        self._sem: asyncio.Semaphore | None = None

    async def acquire(self) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_ongoing)
        if self._sem.locked():
            if self.queued >= self.max_queued:
                self.rejected += 1
                raise Overloaded(self.retry_after_s, self.ongoing, self.queued)
            self.queued += 1
            try:
                await self._sem.acquire()
            finally:
                self.queued -= 1
        else:
            await self._sem.acquire()  # free slot: returns without suspending
        self.ongoing += 1

    def release(self) -> None:
        assert self._sem is not None
        self.ongoing -= 1
        self._sem.release()


# ==============================================================================================================
# helpers
# ==============================================================================================================
def _now() -> float:
    return time.perf_counter()


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


_SSE_DONE = "data: [DONE]\n\n"


def _json_response(obj: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), status_code=status_code,
                    headers=headers, media_type="application/json")


def api_error_response(exc: APIError) -> Response:
    return _json_response(exc.body(), exc.status_code, exc.headers)


def _import_obj(path: str) -> Any:
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"expected 'package.module:Name', got {path!r}")
    return getattr(importlib.import_module(module), name)


def _find_attr(obj: Any, paths: list[str]) -> Any:
    for path in paths:
        cur = obj
        for part in path.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


class _Metrics:
    """Prometheus metrics through Ray (exported by each node's metrics agent), plus local counters for
    /admin/stats. Ray's metric classes are used when running inside Ray; otherwise only the counters exist."""

    def __init__(self, model_name: str):
        self.counters: dict[str, float] = {
            "requests_total": 0, "requests_ok": 0, "requests_4xx": 0, "requests_429": 0, "requests_error": 0,
            "requests_aborted": 0, "prompt_tokens_total": 0, "output_tokens_total": 0,
        }
        self.recent_ttft: deque[float] = deque(maxlen=1024)
        self._ray = None
        try:
            from ray.serve import metrics as m

            tags = {"model": model_name}
            self._ray = {
                "requests": m.Counter("glm4_requests", "HTTP requests by endpoint and status code.",
                                      tag_keys=("model", "endpoint", "status")),
                "ttft": m.Histogram("glm4_time_to_first_token_seconds", "Time to first token.",
                                    boundaries=_TTFT_BUCKETS, tag_keys=("model", "endpoint")),
                "latency": m.Histogram("glm4_request_latency_seconds", "End-to-end generation latency.",
                                       boundaries=_LATENCY_BUCKETS, tag_keys=("model", "endpoint")),
                "tps": m.Histogram("glm4_request_output_tokens_per_second",
                                   "Per-request decode speed (output tokens / (latency - TTFT)).",
                                   boundaries=_TPS_BUCKETS, tag_keys=("model", "endpoint")),
                "prompt_tokens": m.Counter("glm4_prompt_tokens", "Prompt tokens.", tag_keys=("model",)),
                "output_tokens": m.Counter("glm4_output_tokens", "Generated tokens (rate() = tokens/s).",
                                           tag_keys=("model",)),
                "aborted": m.Counter("glm4_requests_aborted", "Requests aborted because the client left.",
                                     tag_keys=("model",)),
                "rejected": m.Counter("glm4_requests_rejected", "Requests refused with 429 (overload).",
                                      tag_keys=("model",)),
                "ongoing": m.Gauge("glm4_ongoing_requests", "Requests admitted into the engine.",
                                   tag_keys=("model",)),
                "queued": m.Gauge("glm4_queued_requests", "Requests waiting for admission (queue depth).",
                                  tag_keys=("model",)),
                "engine_running": m.Gauge("glm4_engine_num_running", "Sequences running in the engine.",
                                          tag_keys=("model",)),
                "engine_waiting": m.Gauge("glm4_engine_num_waiting", "Sequences waiting in the engine.",
                                          tag_keys=("model",)),
                "kv_usage": m.Gauge("glm4_kv_cache_usage", "Fraction of KV-cache blocks in use.",
                                    tag_keys=("model",)),
            }
            for metric in self._ray.values():
                metric.set_default_tags(dict(tags))
        except Exception as e:  # pragma: no cover - outside Ray
            logger.info("Ray metrics unavailable (%s); keeping local counters only", e)
            self._ray = None

    def _call(self, name: str, method: str, value: float, tags: dict[str, str] | None = None) -> None:
        if self._ray is not None:
            try:
                getattr(self._ray[name], method)(value, tags=dict(tags or {}))
            except Exception:  # metrics must never fail a request
                pass

    def request_done(self, endpoint: str, status: int) -> None:
        self.counters["requests_total"] += 1
        if status == 200:
            self.counters["requests_ok"] += 1
        elif status == 429:
            self.counters["requests_429"] += 1
            self._call("rejected", "inc", 1)
        elif 400 <= status < 500:
            self.counters["requests_4xx"] += 1
        elif status == 499:
            pass
        else:
            self.counters["requests_error"] += 1
        self._call("requests", "inc", 1, {"endpoint": endpoint, "status": str(status)})

    def ttft(self, endpoint: str, seconds: float) -> None:
        self.recent_ttft.append(seconds)
        self._call("ttft", "observe", seconds, {"endpoint": endpoint})

    def finished(self, endpoint: str, latency: float, ttft: float | None, prompt_tokens: int,
                 output_tokens: int) -> None:
        self.counters["prompt_tokens_total"] += prompt_tokens
        self.counters["output_tokens_total"] += output_tokens
        self._call("latency", "observe", latency, {"endpoint": endpoint})
        self._call("prompt_tokens", "inc", prompt_tokens)
        self._call("output_tokens", "inc", output_tokens)
        if ttft is not None and output_tokens > 1 and latency > ttft:
            self._call("tps", "observe", (output_tokens - 1) / (latency - ttft), {"endpoint": endpoint})

    def aborted(self, n: int = 1) -> None:
        self.counters["requests_aborted"] += n
        self._call("aborted", "inc", n)

    def gauges(self, admission: Admission, stats: dict[str, Any]) -> None:
        self._call("ongoing", "set", admission.ongoing)
        self._call("queued", "set", admission.queued)
        if stats:
            self._call("engine_running", "set", float(stats.get("num_running", 0)))
            self._call("engine_waiting", "set", float(stats.get("num_waiting", 0)))
            total = float(stats.get("kv_blocks_total", 0) or 0)
            if total:
                self._call("kv_usage", "set", 1.0 - float(stats.get("kv_blocks_free", 0)) / total)


# ==============================================================================================================
# FastAPI app
# ==============================================================================================================
app = FastAPI(title="GLM-4 OpenAI-compatible API", version="1.0",
              description="OpenAI-compatible completions and chat completions served by Ray Serve.")


@app.exception_handler(APIError)
async def _api_error_handler(request: Request, exc: APIError) -> Response:
    return api_error_response(exc)


@app.exception_handler(RequestValidationError)
async def _request_validation_handler(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return _json_response(error_body("request body is not valid JSON", code="invalid_json"), 400)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return _json_response(error_body(f"{param or 'request'}: {first.get('msg', 'invalid value')}",
                                     param=param, code="invalid_value"), 400)


@app.exception_handler(json.JSONDecodeError)
async def _json_error_handler(request: Request, exc: json.JSONDecodeError) -> Response:
    return _json_response(error_body(f"request body is not valid JSON: {exc}", code="invalid_json"), 400)


@app.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _json_response(error_body(str(exc.detail), type=kind, code=str(exc.status_code)), exc.status_code,
                          getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected_error_handler(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error while handling %s %s", request.method, request.url.path)
    return _json_response(error_body("internal server error", type="server_error", code="internal_error"), 500)


class _SSEResponse(StreamingResponse):
    """StreamingResponse whose cleanup runs however the response ends (done, client gone, task cancelled), even
    if the body iterator never started."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, _RayTaskCancelled):
            # The client left: Serve's receive() may raise instead of sending http.disconnect. Nothing can be sent
            # any more; the cleanup below aborts the generation. Not a server error (no 500, no traceback).
            pass
        finally:
            self._cleanup()

    def __del__(self) -> None:
        # Safety net: a response dropped without ever being sent (its task cancelled in between) must still give
        # its admission slot back. The cleanup is idempotent.
        try:
            self._cleanup()
        except Exception:
            pass


class _RequestState:
    """Bookkeeping of one HTTP request: its engine requests, admission slot and timings."""

    __slots__ = ("endpoint", "request_id", "t_arrival", "t_first", "engine_ids", "unfinished", "admitted",
                 "closed", "prompt_tokens", "output_tokens", "status")

    def __init__(self, endpoint: str, request_id: str, t_arrival: float):
        self.endpoint = endpoint
        self.request_id = request_id
        self.t_arrival = t_arrival
        self.t_first: float | None = None
        self.engine_ids: list[str] = []
        self.unfinished: set[str] = set()
        self.admitted = False
        self.closed = False
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.status = 200


class _Prepared:
    __slots__ = ("prompts", "params", "n", "model", "logprobs", "include_usage")

    def __init__(self, prompts: list[list[int]], params: Any, n: int, model: str, logprobs: int | None,
                 include_usage: bool):
        self.prompts = prompts
        self.params = params
        self.n = n
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage


def _load_engine(args: ServeArgs, model_dir: Path) -> Any:
    cls = _import_obj(args.engine_cls)
    return cls.from_pretrained(str(model_dir), **args.resolved_engine_options())


class GLM4Server:
    """One replica: an AsyncLLMEngine plus the HTTP handlers. Wrapped by ``serve.deployment`` below."""

    def __init__(self, args: dict[str, Any]):
        self.args = ServeArgs.model_validate(args)
        self.model_name = self.args.model_name()
        self.model_names = {self.model_name, *self.args.model_aliases}
        key = self.args.api_key if self.args.api_key is not None else os.environ.get(API_KEY_ENV)
        self._api_key: bytes | None = key.encode() if key else None
        self.created = int(time.time())

        t0 = _now()
        self.model_dir = self.args.local_model_dir()
        self.engine = _load_engine(self.args, self.model_dir)
        self.tokenizer = _find_attr(self.engine, ["tokenizer", "engine.tokenizer", "llm_engine.tokenizer"])
        if self.tokenizer is None:
            from glm4.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.model_dir)
        self.max_model_len = self._resolve_max_model_len()
        self.vocab_size = int(getattr(self.tokenizer, "vocab_size", 0)) or None
        logger.info("GLM4Server: engine for %s ready in %.1fs (max_model_len=%d)", self.model_dir, _now() - t0,
                    self.max_model_len)

        from glm4.engine.sampling_params import SamplingParams

        self._SamplingParams = SamplingParams
        self.admission = Admission(self.args.max_ongoing_requests, self.args.max_queued_requests,
                                   self.args.retry_after_s)
        self.metrics = _Metrics(self.model_name)
        self._token_str: dict[int, str] = {}
        self._bg: set[asyncio.Task] = set()
        self._stats_task: asyncio.Task | None = None
        self._last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ setup
    def _resolve_max_model_len(self) -> int:
        value = _find_attr(self.engine, ["max_model_len", "engine.max_model_len", "llm_engine.max_model_len",
                                         "engine.scheduler.max_model_len", "scheduler.max_model_len",
                                         "config.max_model_len"])
        if value is None:
            value = self.args.resolved_engine_options().get("max_model_len")
        if value is None:
            config = _find_attr(self.engine, ["model_config", "engine.model_config", "config", "engine.config"])
            value = getattr(config, "max_position_embeddings", None)
        if value is None:
            from glm4.config import GLM4Config

            value = GLM4Config.from_json(self.model_dir / "config.json").max_position_embeddings
        return int(value)

    def _ensure_background(self) -> None:
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.get_running_loop().create_task(self._stats_loop())

    async def _stats_loop(self) -> None:
        while True:
            try:
                self._last_stats = dict(self.engine.stats())
                self.metrics.gauges(self.admission, self._last_stats)
            except Exception as e:  # keep going; health checks report a dead engine
                logger.debug("stats refresh failed: %s", e)
            await asyncio.sleep(self.args.stats_interval_s)

    # ------------------------------------------------------------------------------------------------ serve hooks
    def check_health(self) -> None:
        """Called by the Serve controller; raising marks the replica unhealthy and gets it replaced."""
        for name in ("check_health", "raise_if_dead"):
            fn = getattr(self.engine, name, None)
            if callable(fn):
                fn()
                return
        for flag in ("errored", "is_dead"):
            if getattr(self.engine, flag, False) is True:
                raise RuntimeError(f"engine {flag}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:
                pass

    # ------------------------------------------------------------------------------------------------ auth
    def _check_auth(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key)
        if not ok:
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------------------------------------ validation
    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.args.max_request_bytes:
            raise APIError(413, f"request body over {self.args.max_request_bytes} bytes", code="request_too_large")
        body = await request.body()
        if len(body) > self.args.max_request_bytes:
            raise APIError(413, f"request body over {self.args.max_request_bytes} bytes", code="request_too_large")
        if not body.strip():
            raise APIError(400, "request body is empty; send a JSON object", code="invalid_request_body")
        return body

    def _check_model(self, model: str) -> None:
        if model not in self.model_names:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"{sorted(self.model_names)}", param="model", code="model_not_found")

    def _check_prompt_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param} is empty", param=param, code="invalid_value")
        if self.vocab_size is not None and max(ids) >= self.vocab_size:
            raise APIError(400, f"{param} has token id {max(ids)} outside the vocabulary (size {self.vocab_size})",
                           param=param, code="invalid_value")
        if len(ids) >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"your {param} has {len(ids)} tokens, leaving no room for the completion. Please "
                                f"reduce the length of the {param}.", param=param, code="context_length_exceeded")

    def _resolve_max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        room = self.max_model_len - prompt_len
        limit = self.args.max_tokens_limit
        if requested is None:
            return max(1, min(room, limit) if limit else room)
        if limit is not None and requested > limit:
            raise APIError(400, f"max_tokens is {requested} but this server allows at most {limit}",
                           param="max_tokens", code="invalid_value")
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {prompt_len + requested} tokens ({prompt_len} in the {param}, "
                                f"{requested} in the completion). Please reduce the length of the {param} or "
                                "completion.", param="max_tokens", code="context_length_exceeded")
        return requested

    def _sampling_params(self, req: Any, max_tokens: int, logprobs: int | None) -> Any:
        kwargs: dict[str, Any] = dict(n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
                                      stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                                      logprobs=logprobs, skip_special_tokens=req.skip_special_tokens, seed=req.seed)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        if kwargs["min_tokens"] > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) is larger than max_tokens ({max_tokens})",
                           param="min_tokens", code="invalid_value")
        try:
            return self._SamplingParams(**kwargs).validate()
        except (ValueError, TypeError) as e:
            field = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=field if field in kwargs else None, code="invalid_value") from None

    def _prepare_completion(self, req: CompletionRequest) -> _Prepared:
        self._check_model(req.model)
        n_seqs = len(req.prompts()) * req.n
        if n_seqs > self.args.max_sequences_per_request:
            raise APIError(400, f"this request asks for {n_seqs} sequences (prompts x n); this server allows at "
                                f"most {self.args.max_sequences_per_request} per request", param="prompt",
                           code="invalid_value")
        prompts: list[list[int]] = []
        for p in req.prompts():
            ids = self.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p)
            self._check_prompt_ids(ids, "prompt")
            prompts.append(ids)
        longest = max(len(p) for p in prompts)
        max_tokens = self._resolve_max_tokens(req.max_tokens, longest, "prompt")
        params = self._sampling_params(req, max_tokens, req.logprobs)
        return _Prepared(prompts, params, req.n, req.model, req.logprobs, req.include_usage)

    def _prepare_chat(self, req: ChatCompletionRequest) -> _Prepared:
        self._check_model(req.model)
        messages = [{"role": m.glm_role(), "content": m.text()} for m in req.messages]
        try:
            ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except (ValueError, TypeError) as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        self._check_prompt_ids(ids, "messages")
        max_tokens = self._resolve_max_tokens(req.requested_max_tokens, len(ids), "messages")
        logprobs = req.num_logprobs
        params = self._sampling_params(req, max_tokens, logprobs)
        return _Prepared([ids], params, req.n, req.model, logprobs, req.include_usage)

    # ------------------------------------------------------------------------------------------------ logprobs
    def _tok_str(self, tid: int) -> str:
        """A token's text; a token that is not valid UTF-8 on its own (part of a multi-byte character) is shown
        as OpenAI does, ``bytes:\\xe4\\xbd``, so distinct tokens never share a string."""
        s = self._token_str.get(tid)
        if s is None:
            try:
                raw = self.tokenizer.token_bytes(tid)
                try:
                    s = raw.decode("utf-8")
                except UnicodeDecodeError:
                    s = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            except (IndexError, AttributeError):
                s = self.tokenizer.decode([tid], skip_special_tokens=False)
            if len(self._token_str) < 200_000:
                self._token_str[tid] = s
        return s

    def _tok_bytes(self, tid: int) -> list[int]:
        try:
            return list(self.tokenizer.token_bytes(tid))
        except (IndexError, AttributeError):
            return list(self._tok_str(tid).encode())

    @staticmethod
    def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]

    def _completion_logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None, k: int,
                             text_offset0: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = text_offset0
        for i, tid in enumerate(token_ids):
            entry = entries[i] if entries is not None and i < len(entries) else {}
            s = self._tok_str(tid)
            tokens.append(s)
            token_lps.append(entry.get(tid))
            if not entry:
                tops.append(None)
            elif k:
                tops.append({self._tok_str(t): lp for t, lp in self._top(entry, k)})
            else:  # logprobs=0: only the sampled token, as vLLM does
                tops.append({s: entry[tid]} if tid in entry else None)
            offsets.append(offset)
            offset += len(s) if not s.startswith("bytes:") else 0
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None, k: int
                       ) -> list[dict[str, Any]]:
        content = []
        for i, tid in enumerate(token_ids):
            entry = entries[i] if entries is not None and i < len(entries) else {}
            lp = entry.get(tid)
            content.append({
                "token": self._tok_str(tid), "logprob": lp if lp is not None else -9999.0,
                "bytes": self._tok_bytes(tid),
                "top_logprobs": [{"token": self._tok_str(t), "logprob": v, "bytes": self._tok_bytes(t)}
                                 for t, v in self._top(entry, k)] if k else [],
            })
        return content

    # ------------------------------------------------------------------------------------------------ engine I/O
    def _abort_soon(self, request_ids: list[str]) -> None:
        async def _abort() -> None:
            for rid in request_ids:
                try:
                    await self.engine.abort(rid)
                except Exception as e:
                    logger.debug("abort(%s) failed: %s", rid, e)

        task = asyncio.get_running_loop().create_task(_abort())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _close(self, state: _RequestState) -> None:
        """Idempotent end of an HTTP request: abort what is still generating, free the admission slot, record."""
        if state.closed:
            return
        state.closed = True
        if state.unfinished:
            self.metrics.aborted(1)
            if state.status == 200:
                state.status = 499
            try:
                self._abort_soon(list(state.unfinished))
            except RuntimeError:  # no running loop (interpreter shutdown)
                pass
            state.unfinished.clear()
        if state.admitted:
            state.admitted = False
            self.admission.release()
        latency = _now() - state.t_arrival
        ttft = None if state.t_first is None else state.t_first - state.t_arrival
        if state.status == 200:
            self.metrics.finished(state.endpoint, latency, ttft, state.prompt_tokens, state.output_tokens)
        self.metrics.request_done(state.endpoint, state.status)

    async def _outputs(self, prep: _Prepared, state: _RequestState) -> AsyncIterator[list[tuple[int, Any]]]:
        """Batches of (prompt index, RequestOutput): the newest output of every prompt that advanced since the
        last batch. Outputs are cumulative, so older ones can be skipped: when the HTTP side falls behind the
        engine (a slow client, a busy proxy), the tokens of several steps go out in one event instead of queueing
        one event per token. A consumer that keeps up gets every step at once, so this adds no latency."""
        for i in range(len(prep.prompts)):
            rid = f"{state.request_id}-{i}"
            state.engine_ids.append(rid)
            state.unfinished.add(rid)
        latest: dict[int, Any] = {}
        ready = asyncio.Event()
        failure: list[BaseException] = []
        done = [0]

        async def pump(i: int, rid: str) -> None:
            try:
                async for out in self.engine.generate(prep.prompts[i], prep.params, rid):
                    latest[i] = out
                    ready.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the engine died (EngineDeadError) or refused the call
                failure.append(e)
            finally:
                done[0] += 1
                ready.set()

        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(pump(i, rid)) for i, rid in enumerate(state.engine_ids)]
        try:
            while True:
                await ready.wait()
                ready.clear()
                if failure:
                    logger.error("engine failure on %s: %r", state.request_id, failure[0])
                    raise APIError(503, f"the engine is unavailable: {failure[0]}", type="server_error",
                                   code="engine_unavailable")
                if latest:
                    batch = sorted(latest.items())
                    latest.clear()
                    for i, out in batch:
                        if out.finished:
                            state.unfinished.discard(state.engine_ids[i])
                    yield batch
                if done[0] == len(tasks) and not latest:
                    return
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()  # the engine's generate() aborts the request when its iteration is cancelled

    @staticmethod
    def _engine_error(out: Any) -> APIError | None:
        for c in out.outputs:
            if c.finish_reason == "error":
                msg = getattr(out, "error", None) or getattr(c, "error", None) or "generation failed"
                return APIError(400, f"the engine refused the request: {msg}", code="engine_error")
        if getattr(out, "error", None) and out.finished:
            return APIError(400, f"the engine refused the request: {out.error}", code="engine_error")
        return None

    # ------------------------------------------------------------------------------------------------ handlers
    async def _handle(self, request: Request, endpoint: str) -> Response:
        t_arrival = _now()
        chat = endpoint == "chat"
        state = _RequestState(endpoint, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, t_arrival)
        handed_off = False
        try:
            self._check_auth(request)
            body = await self._read_body(request)
            try:
                req = (ChatCompletionRequest if chat else CompletionRequest).model_validate_json(body)
            except ValidationError as e:
                raise validation_error_to_api_error(e) from None
            prep = self._prepare_chat(req) if chat else self._prepare_completion(req)
            self._ensure_background()
            await self.admission.acquire()
            state.admitted = True
            state.prompt_tokens = sum(len(p) for p in prep.prompts)
            if req.stream:
                gen = self._stream_chat(prep, state) if chat else self._stream_completion(prep, state)
                handed_off = True
                return _SSEResponse(gen, lambda: self._close(state))
            body_obj = await (self._full_chat(prep, state) if chat else self._full_completion(prep, state))
            return _json_response(body_obj)
        except APIError as e:
            state.status = e.status_code
            return api_error_response(e)
        except (ClientDisconnect, _RayTaskCancelled):  # the client left while its body was read: not a 5xx
            state.status = 499
            return Response(status_code=499)
        except Exception:
            state.status = 500
            raise
        finally:
            if not handed_off:
                self._close(state)

    # ---- non-streaming
    async def _collect(self, prep: _Prepared, state: _RequestState) -> list[Any]:
        finals: list[Any] = [None] * len(prep.prompts)
        async for batch in self._outputs(prep, state):
            for i, out in batch:
                if state.t_first is None and any(c.token_ids for c in out.outputs):
                    state.t_first = _now()
                    self.metrics.ttft(state.endpoint, state.t_first - state.t_arrival)
                finals[i] = out
        for out in finals:
            if out is None:
                raise APIError(500, "the engine returned no output", type="server_error", code="engine_error")
            err = self._engine_error(out)
            if err is not None:
                raise err
        state.output_tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
        return finals

    def _usage(self, state: _RequestState) -> dict[str, int]:
        return {"prompt_tokens": state.prompt_tokens, "completion_tokens": state.output_tokens,
                "total_tokens": state.prompt_tokens + state.output_tokens}

    async def _full_completion(self, prep: _Prepared, state: _RequestState) -> dict[str, Any]:
        finals = await self._collect(prep, state)
        choices = []
        for i, out in enumerate(finals):
            for c in sorted(out.outputs, key=lambda c: c.index):
                lp = None
                if prep.logprobs is not None:
                    lp = self._completion_logprobs(list(c.token_ids), c.logprobs, prep.logprobs, 0)
                choices.append({"index": i * prep.n + c.index, "text": c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return {"id": state.request_id, "object": "text_completion", "created": int(time.time()),
                "model": prep.model, "choices": choices, "usage": self._usage(state)}

    async def _full_chat(self, prep: _Prepared, state: _RequestState) -> dict[str, Any]:
        (out,) = await self._collect(prep, state)
        choices = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            lp = None
            if prep.logprobs is not None:
                lp = {"content": self._chat_logprobs(list(c.token_ids), c.logprobs, prep.logprobs)}
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": state.request_id, "object": "chat.completion", "created": int(time.time()),
                "model": prep.model, "choices": choices, "usage": self._usage(state)}

    # ---- streaming
    async def _deltas(self, prep: _Prepared, state: _RequestState
                      ) -> AsyncIterator[list[tuple[int, str, list[int], Any, str | None]]]:
        """Per engine batch: (choice index, new text, new token ids, new logprob entries, finish_reason) for every
        sample that changed."""
        sent_text: dict[int, int] = {}
        sent_toks: dict[int, int] = {}
        for_logprobs = prep.logprobs is not None
        async for batch in self._outputs(prep, state):
            items = []
            for i, out in batch:
                err = self._engine_error(out)
                if err is not None:
                    raise err
                for c in out.outputs:
                    idx = i * prep.n + c.index
                    t0, k0 = sent_text.get(idx, 0), sent_toks.get(idx, 0)
                    text = c.text
                    delta = text[t0:] if len(text) >= t0 else ""
                    new_ids = list(c.token_ids[k0:])
                    if not delta and not c.finish_reason and not (for_logprobs and new_ids):
                        continue
                    sent_text[idx] = max(t0, len(text))
                    sent_toks[idx] = len(c.token_ids)
                    entries = (c.logprobs[k0:len(c.token_ids)] if (for_logprobs and c.logprobs is not None)
                               else None)
                    items.append((idx, delta, new_ids, entries, c.finish_reason))
            if items:
                yield items
            state.output_tokens = sum(sent_toks.values())

    def _first_token(self, state: _RequestState) -> None:
        if state.t_first is None:
            state.t_first = _now()
            self.metrics.ttft(state.endpoint, state.t_first - state.t_arrival)

    def _stream_failed(self, state: _RequestState, e: Exception) -> str:
        if isinstance(e, APIError):
            state.status = e.status_code
            return _sse(e.body())
        logger.exception("stream %s failed", state.request_id)
        state.status = 500
        return _sse(error_body("internal server error", type="server_error", code="internal_error"))

    async def _stream_completion(self, prep: _Prepared, state: _RequestState) -> AsyncIterator[str]:
        created = int(time.time())
        head = {"id": state.request_id, "object": "text_completion", "created": created, "model": prep.model}
        usage_null = prep.include_usage
        offsets: dict[int, int] = {}
        try:
            async for items in self._deltas(prep, state):
                self._first_token(state)
                events = []
                for idx, delta, new_ids, entries, finish in items:
                    lp = None
                    if prep.logprobs is not None:
                        lp = self._completion_logprobs(new_ids, entries, prep.logprobs, offsets.get(idx, 0))
                        offsets[idx] = offsets.get(idx, 0) + len(delta)
                    chunk = {**head, "choices": [{"index": idx, "text": delta, "logprobs": lp,
                                                  "finish_reason": finish}]}
                    if usage_null:
                        chunk["usage"] = None
                    events.append(_sse(chunk))
                yield "".join(events)
            if prep.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(state)}) + _SSE_DONE
                return
        except Exception as e:
            yield self._stream_failed(state, e)
        yield _SSE_DONE

    async def _stream_chat(self, prep: _Prepared, state: _RequestState) -> AsyncIterator[str]:
        created = int(time.time())
        head = {"id": state.request_id, "object": "chat.completion.chunk", "created": created, "model": prep.model}
        usage_null = prep.include_usage
        try:
            # The role comes first, before any token, as OpenAI does (clients use it as "stream opened").
            events = []
            for idx in range(len(prep.prompts) * prep.n):
                chunk = {**head, "choices": [{"index": idx, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]}
                if usage_null:
                    chunk["usage"] = None
                events.append(_sse(chunk))
            yield "".join(events)
            async for items in self._deltas(prep, state):
                self._first_token(state)
                events = []
                for idx, delta, new_ids, entries, finish in items:
                    lp = None
                    if prep.logprobs is not None:
                        lp = {"content": self._chat_logprobs(new_ids, entries, prep.logprobs)}
                    choice = {"index": idx, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                              "finish_reason": finish}
                    chunk = {**head, "choices": [choice]}
                    if usage_null:
                        chunk["usage"] = None
                    events.append(_sse(chunk))
                yield "".join(events)
            if prep.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(state)}) + _SSE_DONE
                return
        except Exception as e:
            yield self._stream_failed(state, e)
        yield _SSE_DONE

    # ------------------------------------------------------------------------------------------------ other routes
    def models(self, request: Request) -> Response:
        self._check_auth(request)
        cards = [{"id": name, "object": "model", "created": self.created, "owned_by": "glm4-ray",
                  "max_model_len": self.max_model_len} for name in sorted(self.model_names)]
        return _json_response({"object": "list", "data": cards})

    def health(self) -> Response:
        try:
            self.check_health()
        except Exception as e:
            return _json_response(error_body(f"engine unhealthy: {e}", type="server_error",
                                             code="engine_unhealthy"), 503)
        return _json_response({"status": "ok", "model": self.model_name, "ongoing": self.admission.ongoing,
                               "queued": self.admission.queued})

    def stats(self, request: Request) -> Response:
        self._check_auth(request)
        try:
            engine_stats = dict(self.engine.stats())
        except Exception as e:
            engine_stats = {"error": str(e)}
        ttfts = sorted(self.metrics.recent_ttft)

        def pct(q: float) -> float | None:
            return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None

        return _json_response({
            "model": self.model_name, "max_model_len": self.max_model_len,
            "engine": engine_stats,
            "admission": {"ongoing": self.admission.ongoing, "queued": self.admission.queued,
                          "max_ongoing_requests": self.admission.max_ongoing,
                          "max_queued_requests": self.admission.max_queued, "rejected": self.admission.rejected},
            "counters": dict(self.metrics.counters),
            "ttft_s": {"p50": pct(0.5), "p99": pct(0.99), "samples": len(ttfts)},
        })


    # ------------------------------------------------------------------------------------------------ routes
    @app.post("/v1/completions", response_model=None)
    async def create_completion(self, request: Request) -> Response:
        return await self._handle(request, "completions")

    @app.post("/v1/chat/completions", response_model=None)
    async def create_chat_completion(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    @app.get("/v1/models", response_model=None)
    async def list_models(self, request: Request) -> Response:
        return self.models(request)

    @app.get("/health", response_model=None)
    async def get_health(self) -> Response:
        return self.health()

    @app.get("/admin/stats", response_model=None)
    async def get_stats(self, request: Request) -> Response:
        return self.stats(request)


# The Serve deployment (created once: serve.ingress rewires the module-level FastAPI app's routes).
GLM4Deployment = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress(app)(GLM4Server))


def deployment_options(args: ServeArgs) -> dict[str, Any]:
    """Serve deployment options derived from the app args (resources, limits, placement group)."""
    from ray.serve.config import BackpressureConfig

    opts: dict[str, Any] = {
        # The replica's own admission control decides (and answers 429 with OpenAI's body); Serve's cap sits
        # above it so requests reach a replica instead of waiting in a proxy queue.
        "max_ongoing_requests": args.max_ongoing_requests + args.max_queued_requests + _CONTROL_HEADROOM,
        "max_queued_requests": args.proxy_max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=max(1.0, args.retry_after_s)),
        "logging_config": {"enable_access_log": args.enable_access_log},
        "graceful_shutdown_timeout_s": 60.0,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }
    if args.autoscaling_config is not None:
        opts["autoscaling_config"] = args.autoscaling_config
    else:
        opts["num_replicas"] = args.num_replicas
    tp = args.tensor_parallel_size
    if tp > 1:
        # Bundle 0 holds the replica (rank 0, which runs the scheduler); bundles 1..tp-1 the other ranks, on one
        # node (STRICT_PACK: NVLink, and the placement fails instead of silently spanning nodes).
        gpu = 1.0 if (args.num_gpus > 0 or args.device not in (None, "cpu")) else 0.0
        bundle0: dict[str, float] = {"CPU": args.num_cpus}
        rest: dict[str, float] = {"CPU": args.tp_worker_num_cpus}
        if gpu:
            bundle0["GPU"] = gpu
            rest["GPU"] = gpu
        opts["ray_actor_options"] = {"num_cpus": args.num_cpus, "num_gpus": gpu}
        opts["placement_group_bundles"] = [bundle0] + [dict(rest) for _ in range(tp - 1)]
        opts["placement_group_strategy"] = args.placement_group_strategy
    else:
        opts["ray_actor_options"] = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    return opts


def build_app(args: dict[str, Any]):
    """Serve app builder: ``import_path: pipeline.serve.app:build_app`` with ``args: {model: DIR, ...}``."""
    parsed = ServeArgs.model_validate(dict(args or {}))
    return GLM4Deployment.options(**deployment_options(parsed)).bind(parsed.model_dump())


__all__ = ["Admission", "GLM4Deployment", "GLM4Server", "ServeArgs", "app", "build_app", "deployment_options"]
