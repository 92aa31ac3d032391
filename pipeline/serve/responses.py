"""How the endpoint answers on the wire: compact JSON bodies, server-sent events, and OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` for every failure FastAPI or Starlette would otherwise answer
in their own format (never a 500 for bad input).

(Not named ``http.py``: a module that shadows the standard library's ``http`` breaks any tool that puts this
folder on ``sys.path``.)
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray.exceptions import TaskCancelledError as _RayTaskCancelled
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from pipeline.serve.protocol import APIError, error_body

logger = logging.getLogger("ray.serve")

SSE_DONE = "data: [DONE]\n\n"


def sse_event(obj: Any) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


def json_response(obj: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), status_code=status_code,
                    headers=headers, media_type="application/json")


def api_error_response(exc: APIError) -> Response:
    return json_response(exc.body(), exc.status_code, exc.headers)


# ---------------------------------------------------------------------------------------------- exception handlers
async def _api_error_handler(request: Request, exc: APIError) -> Response:
    return api_error_response(exc)


async def _request_validation_handler(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return json_response(error_body("request body is not valid JSON", code="invalid_json"), 400)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return json_response(error_body(f"{param or 'request'}: {first.get('msg', 'invalid value')}",
                                    param=param, code="invalid_value"), 400)


async def _json_error_handler(request: Request, exc: json.JSONDecodeError) -> Response:
    return json_response(error_body(f"request body is not valid JSON: {exc}", code="invalid_json"), 400)


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return json_response(error_body(str(exc.detail), type=kind, code=str(exc.status_code)), exc.status_code,
                         getattr(exc, "headers", None))


async def _unexpected_error_handler(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error while handling %s %s", request.method, request.url.path)
    return json_response(error_body("internal server error", type="server_error", code="internal_error"), 500)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's error format (API errors, bad JSON, validation, 404/405, anything else)."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _request_validation_handler)
    app.add_exception_handler(json.JSONDecodeError, _json_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)


# ---------------------------------------------------------------------------------------------- streaming
class SSEResponse(StreamingResponse):
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
