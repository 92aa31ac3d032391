"""Ray Serve OpenAI-compatible endpoint: one ``glm4.AsyncLLMEngine`` per replica behind a FastAPI ingress.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` -> server-sent events ending in
``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /admin/stats`` (engine + admission counters).

Design choices (the weak points of the field this is built against):
- **One deployment, no extra hop.** The ingress and the engine live in the same replica, so a token goes engine ->
  SSE frame -> Serve proxy, with no second deployment call (Serve LLM's router->server hop is a known overhead).
- **Bounded admission, 429 at once.** A replica admits a bounded number of requests and refuses the rest with 429
  and ``Retry-After`` straight away (``admission``); Serve's own limits sit above it, its proxy queue bounded as a
  second line (``config.deployment_options``).
- **Cancellation.** When a client disconnects, Serve cancels the request's task; our cleanup aborts every engine
  request of that HTTP request, which frees its KV blocks at once (observable in ``/admin/stats``).
- **Never a 500 for bad input.** The body is parsed and type-checked in one strict pydantic pass; JSON errors,
  types, unknown models, prompts over the context and max_tokens over the limit are 4xx with
  ``{"error": {"message", "type", "param", "code"}}`` (``responses``).

This module is the deployment (:class:`GLM4Server`: auth, engine I/O, response bodies and streams) and the app
builder. Its parts live next to it in ``pipeline.serve``: ``config`` (:class:`ServeArgs`, Serve deployment options),
``admission``, ``preparation`` (reading, validating and tokenizing a request), ``engine`` (loading the engine),
``logprobs``, ``metrics``, ``responses`` (JSON/SSE bodies, error handlers) and ``protocol`` (the OpenAI request
models).

``build_app(args)`` is the Serve app builder (``import_path: pipeline.serve.app:build_app``); ``args`` are validated
by :class:`ServeArgs` with unknown keys rejected.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import TaskCancelledError as _RayTaskCancelled
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from pipeline.serve.admission import Admission, Overloaded
from pipeline.serve.config import (
    API_KEY_ENV,
    DEFAULT_ENGINE_CLS,
    DEFAULT_TP_EXECUTOR,
    DEPLOYMENT_NAME,
    ServeArgs,
    deployment_options,
)
from pipeline.serve.engine import engine_max_model_len, engine_tokenizer, load_engine
from pipeline.serve.logprobs import LogprobFormatter
from pipeline.serve.metrics import ServeMetrics
from pipeline.serve.protocol import APIError, error_body
from pipeline.serve.preparation import Prepared, RequestPreparer
from pipeline.serve.responses import (
    SSE_DONE,
    SSEResponse,
    add_error_handlers,
    api_error_response,
    json_response,
    sse_event,
)

if TYPE_CHECKING:
    from ray.serve import Application

logger = logging.getLogger("ray.serve")


def _now() -> float:
    return time.monotonic()  # the engine's clock too (RequestOutput.first_token_time)


# The FastAPI app is module-level because GLM4Server's routes below are registered on it at class definition.
app = FastAPI(title="GLM-4 OpenAI-compatible API", version="1.0",
              description="OpenAI-compatible completions and chat completions served by Ray Serve.")
add_error_handlers(app)


# One changed sample in an engine batch: (choice index, new text, new token ids, new logprob entries, finish_reason).
_Delta = tuple[int, str, list[int], Any, Optional[str]]
# Shapes one _Delta into an SSE choice object (completions and chat differ only in this).
_ChoiceFn = Callable[[int, str, list[int], Any, Optional[str]], dict[str, Any]]


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
        self.engine = load_engine(self.args, self.model_dir)
        self.tokenizer = engine_tokenizer(self.engine, self.model_dir)
        self.max_model_len = engine_max_model_len(self.engine, self.args, self.model_dir)
        logger.info("GLM4Server: engine for %s ready in %.1fs (max_model_len=%d)", self.model_dir, _now() - t0,
                    self.max_model_len)

        self.preparer = RequestPreparer(self.tokenizer, self.model_names, self.max_model_len,
                                        max_request_bytes=self.args.max_request_bytes,
                                        max_sequences_per_request=self.args.max_sequences_per_request,
                                        max_tokens_limit=self.args.max_tokens_limit)
        self.admission = Admission(self.args.max_ongoing_requests, self.args.max_queued_requests,
                                   self.args.retry_after_s)
        self.metrics = ServeMetrics(self.model_name)
        self._logprobs = LogprobFormatter(self.tokenizer)
        self._bg: set[asyncio.Task] = set()
        self._stats_task: asyncio.Task | None = None
        self._last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ setup
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

    async def _outputs(self, prep: Prepared, state: _RequestState,
                       final_only: bool = False) -> AsyncIterator[list[tuple[int, Any]]]:
        """Batches of (prompt index, RequestOutput): the newest output of every prompt that advanced since the
        last batch. Outputs are cumulative, so older ones can be skipped: when the HTTP side falls behind the
        engine (a slow client, a busy proxy), the tokens of several steps go out in one event instead of queueing
        one event per token. A consumer that keeps up gets every step at once, so this adds no latency.
        `final_only` (non-streaming): the engine sends each prompt's finished output only."""
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
                async for out in self.engine.generate(prep.prompts[i], prep.params, rid, final_only=final_only):
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
            body = await self.preparer.read_body(request)
            req = self.preparer.parse(body, chat)
            prep = self.preparer.prepare_chat(req) if chat else self.preparer.prepare_completion(req)
            self._ensure_background()
            await self.admission.acquire()
            state.admitted = True
            state.prompt_tokens = sum(len(p) for p in prep.prompts)
            if req.stream:
                gen = self._stream_chat(prep, state) if chat else self._stream_completion(prep, state)
                handed_off = True
                return SSEResponse(gen, lambda: self._close(state))
            body_obj = await (self._full_chat(prep, state) if chat else self._full_completion(prep, state))
            return json_response(body_obj)
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
    async def _collect(self, prep: Prepared, state: _RequestState) -> list[Any]:
        finals: list[Any] = [None] * len(prep.prompts)
        async for batch in self._outputs(prep, state, final_only=True):
            for i, out in batch:
                finals[i] = out
        firsts = [out.first_token_time for out in finals if out is not None and out.first_token_time is not None]
        if firsts:
            state.t_first = min(firsts)
            self.metrics.ttft(state.endpoint, state.t_first - state.t_arrival)
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

    async def _full_completion(self, prep: Prepared, state: _RequestState) -> dict[str, Any]:
        finals = await self._collect(prep, state)
        choices = []
        for i, out in enumerate(finals):
            for c in sorted(out.outputs, key=lambda c: c.index):
                lp = None
                if prep.logprobs is not None:
                    lp = self._logprobs.completion(list(c.token_ids), c.logprobs, prep.logprobs, 0)
                choices.append({"index": i * prep.n + c.index, "text": c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return {"id": state.request_id, "object": "text_completion", "created": int(time.time()),
                "model": prep.model, "choices": choices, "usage": self._usage(state)}

    async def _full_chat(self, prep: Prepared, state: _RequestState) -> dict[str, Any]:
        (out,) = await self._collect(prep, state)
        choices = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            lp = None
            if prep.logprobs is not None:
                lp = {"content": self._logprobs.chat(list(c.token_ids), c.logprobs, prep.logprobs)}
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": state.request_id, "object": "chat.completion", "created": int(time.time()),
                "model": prep.model, "choices": choices, "usage": self._usage(state)}

    # ---- streaming
    async def _deltas(self, prep: Prepared, state: _RequestState) -> AsyncIterator[list[_Delta]]:
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
            return sse_event(e.body())
        logger.exception("stream %s failed", state.request_id)
        state.status = 500
        return sse_event(error_body("internal server error", type="server_error", code="internal_error"))

    async def _stream(self, prep: Prepared, state: _RequestState, obj: str, choice: _ChoiceFn,
                      opening: list[dict[str, Any]] | None = None) -> AsyncIterator[str]:
        """The SSE body of both endpoints: the ``opening`` choices (if any), then per engine batch one event for
        every choice that changed (shaped by ``choice``), the usage chunk when asked for, and ``[DONE]``; a failure
        midway becomes an error event, so the client always sees the stream end."""
        head = {"id": state.request_id, "object": obj, "created": int(time.time()), "model": prep.model}

        def event(c: dict[str, Any]) -> str:
            chunk = {**head, "choices": [c]}
            if prep.include_usage:  # with stream_options.include_usage, OpenAI sends "usage": null until the end
                chunk["usage"] = None
            return sse_event(chunk)

        try:
            if opening is not None:
                yield "".join(event(c) for c in opening)
            async for items in self._deltas(prep, state):
                self._first_token(state)
                yield "".join(event(choice(*item)) for item in items)
            if prep.include_usage:
                yield sse_event({**head, "choices": [], "usage": self._usage(state)}) + SSE_DONE
                return
        except Exception as e:
            yield self._stream_failed(state, e)
        yield SSE_DONE

    def _stream_completion(self, prep: Prepared, state: _RequestState) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}  # per choice: where the next delta starts in its text (logprobs.text_offset)

        def choice(idx: int, delta: str, new_ids: list[int], entries: Any, finish: str | None) -> dict[str, Any]:
            lp = None
            if prep.logprobs is not None:
                lp = self._logprobs.completion(new_ids, entries, prep.logprobs, offsets.get(idx, 0))
                offsets[idx] = offsets.get(idx, 0) + len(delta)
            return {"index": idx, "text": delta, "logprobs": lp, "finish_reason": finish}

        return self._stream(prep, state, "text_completion", choice)

    def _stream_chat(self, prep: Prepared, state: _RequestState) -> AsyncIterator[str]:
        def choice(idx: int, delta: str, new_ids: list[int], entries: Any, finish: str | None) -> dict[str, Any]:
            lp = None
            if prep.logprobs is not None:
                lp = {"content": self._logprobs.chat(new_ids, entries, prep.logprobs)}
            return {"index": idx, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                    "finish_reason": finish}

        # The role comes first, before any token, as OpenAI does (clients use it as "stream opened").
        opening = [{"index": idx, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for idx in range(len(prep.prompts) * prep.n)]
        return self._stream(prep, state, "chat.completion.chunk", choice, opening)

    # ------------------------------------------------------------------------------------------------ other routes
    def models(self, request: Request) -> Response:
        self._check_auth(request)
        cards = [{"id": name, "object": "model", "created": self.created, "owned_by": "glm4-ray",
                  "max_model_len": self.max_model_len} for name in sorted(self.model_names)]
        return json_response({"object": "list", "data": cards})

    def health(self) -> Response:
        try:
            self.check_health()
        except Exception as e:
            return json_response(error_body(f"engine unhealthy: {e}", type="server_error",
                                             code="engine_unhealthy"), 503)
        return json_response({"status": "ok", "model": self.model_name, "ongoing": self.admission.ongoing,
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

        return json_response({
            "model": self.model_name, "max_model_len": self.max_model_len,
            "engine": engine_stats,
            "admission": {"ongoing": self.admission.ongoing, "queued": self.admission.queued,
                          "max_ongoing_requests": self.admission.max_ongoing,
                          "max_queued_requests": self.admission.max_queued, "rejected": self.admission.rejected,
                          "peak_ongoing": self.admission.peak_ongoing, "peak_queued": self.admission.peak_queued},
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


def build_app(args: dict[str, Any]) -> Application:
    """Serve app builder: ``import_path: pipeline.serve.app:build_app`` with ``args: {model: DIR, ...}``."""
    parsed = ServeArgs.model_validate(dict(args or {}))
    return GLM4Deployment.options(**deployment_options(parsed)).bind(parsed.model_dump())


# Names re-exported from the modules split out of this one, so existing imports (`from pipeline.serve.app import
# ServeArgs`, ...) keep working.
__all__ = ["API_KEY_ENV", "DEFAULT_ENGINE_CLS", "DEFAULT_TP_EXECUTOR", "DEPLOYMENT_NAME", "Admission",
           "GLM4Deployment", "GLM4Server", "Overloaded", "ServeArgs", "api_error_response", "app", "build_app",
           "deployment_options"]
