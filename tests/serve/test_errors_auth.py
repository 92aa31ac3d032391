"""Every invalid request kind gets its 4xx with OpenAI's error body (never a 500), and bearer auth."""

from __future__ import annotations

import json

import openai
import pytest

from pipeline.serve.protocol import ErrorResponse

from .conftest import MAX_MODEL_LEN

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _assert_error(r, status: int, *, param=None, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    ErrorResponse.model_validate(body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _bad_requests(model: str):
    ok = {"model": model, "prompt": "hi", "max_tokens": 4}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    C, CH = "/v1/completions", "/v1/chat/completions"
    return [
        # (id, path, raw body or JSON, status, param, code)
        ("malformed-json", C, b'{"model": "x", "prompt": ', 400, None, "invalid_json"),
        ("malformed-json-chat", CH, b"{not json}", 400, None, "invalid_json"),
        ("empty-body", C, b"", 400, None, None),
        ("not-an-object", C, b"[1, 2, 3]", 400, None, None),
        ("missing-model", C, {"prompt": "hi"}, 400, "model", None),
        ("missing-prompt", C, {"model": model}, 400, "prompt", None),
        ("missing-messages", CH, {"model": model}, 400, "messages", None),
        ("unknown-model", C, {**ok, "model": "gpt-17"}, 404, "model", "model_not_found"),
        ("unknown-model-chat", CH, {**chat, "model": "nope"}, 404, "model", "model_not_found"),
        ("prompt-over-context", C, {**ok, "prompt": "a" * (MAX_MODEL_LEN + 10)}, 400, "prompt",
         "context_length_exceeded"),
        ("messages-over-context", CH, {**chat, "messages": [{"role": "user", "content": "b" * MAX_MODEL_LEN}]},
         400, "messages", "context_length_exceeded"),
        ("max-tokens-over-limit", C, {**ok, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens",
         "context_length_exceeded"),
        ("max-completion-tokens-over-limit", CH, {**chat, "max_tokens": None, "max_completion_tokens": 10**6},
         400, "max_tokens", "context_length_exceeded"),
        ("max-tokens-zero", C, {**ok, "max_tokens": 0}, 400, "max_tokens", None),
        ("max-tokens-string", C, {**ok, "max_tokens": "ten"}, 400, "max_tokens", None),
        ("max-tokens-float", C, {**ok, "max_tokens": 1.5}, 400, "max_tokens", None),
        ("temperature-string", C, {**ok, "temperature": "hot"}, 400, "temperature", None),
        ("temperature-range", C, {**ok, "temperature": 7}, 400, "temperature", None),
        ("top-p-zero", C, {**ok, "top_p": 0}, 400, "top_p", None),
        ("n-zero", C, {**ok, "n": 0}, 400, "n", None),
        ("n-bool", C, {**ok, "n": True}, 400, "n", None),
        ("stream-int", C, {**ok, "stream": 1}, 400, "stream", None),
        ("prompt-int", C, {**ok, "prompt": 5}, 400, "prompt", None),
        ("prompt-empty-list", C, {**ok, "prompt": []}, 400, "prompt", None),
        ("prompt-token-outside-vocab", C, {**ok, "prompt": [1, 2, 10**6]}, 400, "prompt", None),
        ("prompt-negative-token", C, {**ok, "prompt": [1, -2]}, 400, "prompt", None),
        ("stop-not-string", C, {**ok, "stop": [1, 2]}, 400, "stop", None),
        ("logprobs-too-many", C, {**ok, "logprobs": 99}, 400, "logprobs", None),
        ("presence-penalty-range", C, {**ok, "presence_penalty": 3}, 400, "presence_penalty", None),
        ("seed-string", C, {**ok, "seed": "x"}, 400, "seed", None),
        ("min-tokens-over-max", C, {**ok, "min_tokens": 10}, 400, "min_tokens", None),
        ("logit-bias-unsupported", C, {**ok, "logit_bias": {"1": 5}}, 400, "logit_bias", None),
        ("echo-unsupported", C, {**ok, "echo": True}, 400, None, None),
        ("stream-options-without-stream", C, {**ok, "stream_options": {"include_usage": True}}, 400, None, None),
        ("messages-empty", CH, {**chat, "messages": []}, 400, "messages", None),
        ("message-bad-role", CH, {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400,
         "messages[0].role", None),
        ("message-content-int", CH, {**chat, "messages": [{"role": "user", "content": 3}]}, 400,
         "messages[0].content", None),
        ("messages-not-list", CH, {**chat, "messages": "hello"}, 400, "messages", None),
        ("top-logprobs-without-logprobs", CH, {**chat, "top_logprobs": 2}, 400, None, None),
        ("tools-unsupported", CH, {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
         None, None),
    ]


CASES = _bad_requests("glm4-tiny")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_invalid_requests_get_4xx_with_error_shape(serve_app, case):
    _, path, body, status, param, code = case
    with serve_app.client() as c:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(path, json=body)
    err = _assert_error(r, status, param=param, code=code)
    assert err["type"] in {"invalid_request_error", "not_found_error"}


def test_streaming_request_errors_before_the_stream(serve_app):
    with serve_app.client() as c:
        r = c.post("/v1/completions", json={"model": serve_app.model, "prompt": "x" * (MAX_MODEL_LEN + 1),
                                            "stream": True})
    _assert_error(r, 400, param="prompt")


def test_unknown_route_and_method(serve_app):
    with serve_app.client() as c:
        _assert_error(c.get("/v1/nothing-here"), 404)
        _assert_error(c.get("/v1/completions"), 405)


def test_oversized_body(serve_app):
    with serve_app.client() as c:
        big = json.dumps({"model": serve_app.model, "prompt": "x" * (5 * 1024 * 1024)})
        _assert_error(c.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)


def test_openai_client_maps_errors(serve_app):
    client = serve_app.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=serve_app.model, prompt="hi", max_tokens=10**6)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_server_still_healthy_after_bad_input(serve_app):
    s = serve_app.stats()
    assert s["counters"]["requests_error"] == 0, "a bad request must never become a 5xx"
    r = serve_app.openai().completions.create(model=serve_app.model, prompt="ok", max_tokens=2)
    assert r.choices[0].finish_reason in {"length", "stop"}


# ---------------------------------------------------------------------------------------------------- auth
AUTH_ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
               ("GET", "/admin/stats")]


@pytest.mark.parametrize("method,path", AUTH_ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic dGVzdA==", "Bearer", "test-key-0123456789",
                                    "Bearer test-key-0123456789x", "bearer test-key-012345678"])
def test_auth_rejects_missing_or_wrong_key(serve_app, method, path, header):
    import httpx

    headers = {"Authorization": header} if header is not None else {}
    with httpx.Client(base_url=serve_app.base_url, timeout=30) as c:
        # even a malformed body is refused with 401 first: nothing is parsed for an unauthenticated caller
        r = c.request(method, path, headers=headers, content=b"{bad" if method == "POST" else None)
    err = _assert_error(r, 401, code="invalid_api_key")
    assert err["type"] == "invalid_request_error"
    assert r.headers.get("www-authenticate") == "Bearer"


def test_auth_accepts_the_key_and_health_is_open(serve_app):
    import httpx

    with httpx.Client(base_url=serve_app.base_url, timeout=30) as c:
        assert c.get("/health").status_code == 200
    bad = openai.OpenAI(base_url=serve_app.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert serve_app.openai().models.list().data
