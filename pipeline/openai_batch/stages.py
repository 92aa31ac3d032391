"""The OpenAI Batch preprocess and postprocess stages (Ray Data UDFs on Arrow batches), around the batch job's
unchanged engine stage (`pipeline.stages.EngineReplica`).

Column contract (internal columns start with ``__``):

    read         <id_column>, custom_id, url, body, __line_error, __line_error_code          (reader.py)
    preprocess   + __token_ids list<int32>, __params string (JSON SamplingParams kwargs), __error string
                   (what pipeline.stages.preprocess_batch adds, so EngineReplica and prefix ordering work as they
                   are), __kind ("chat" | "completion"), __model (the body's model, echoed in the response),
                   __error_status int32 + __error_body string (the HTTP status and OpenAI error body Serve would
                   answer a request that fails validation with)
    engine       + generated_text, finish_reason, num_prompt_tokens, num_generated_tokens, num_cached_tokens, error
    postprocess  <id_column>, custom_id, line (the output JSON line), status_code int32 (null for an unusable line:
                 there is no response), error_code string (null for a 200)

A bad line or an invalid request is an error row, never an exception.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config import StorageOptions
from pipeline.openai_batch.reader import BODY, CUSTOM_ID, LINE_ERROR, LINE_ERROR_CODE, URL, URL_KINDS
from pipeline.stages import ERROR_IN, PARAMS, TOKEN_IDS, _tokenizer_and_len

KIND = "__kind"
MODEL = "__model"
ERROR_STATUS = "__error_status"
ERROR_BODY = "__error_body"
LINE = "line"
STATUS_CODE = "status_code"
ERROR_CODE = "error_code"


@dataclass(frozen=True)
class OpenAIBatchSpec:
    """What the OpenAI Batch stages need; one spec for preprocess and postprocess.

    ``served_model_names``: the names a body's ``model`` may have (others get Serve's 404 ``model_not_found``);
    None accepts any name and echoes it in the response. ``max_tokens_limit`` caps ``max_tokens`` as Serve's
    option of that name does (and caps the default, which for chat is the rest of the context)."""

    model: str
    storage: StorageOptions
    model_cache_dir: str
    id_column: str
    max_model_len: int | None = None
    served_model_names: frozenset[str] | None = None
    max_tokens_limit: int | None = None


def prompt_too_long_message(num_tokens: int, max_len: int) -> str:
    """The Parquet path's wording (pipeline.stages.preprocess_batch), so error kinds count the same."""
    return (f"prompt too long: {num_tokens} tokens, the model's context is {max_len} tokens "
            "(no room for one generated token)")


def check_batch_request(req: Any) -> None:
    """What a batch line may not ask for, beyond what Serve refuses: each line is one engine request with one
    complete, text-only result. ``n`` > 1 and several completion prompts would need several result rows;
    ``stream: true`` is refused (a batch result is never streamed; refusing says so rather than silently
    answering differently from what was asked); logprobs are refused because the engine stage returns text only.
    Raises ``APIError`` (400), like Serve's own validation."""
    from pipeline.serve.protocol import APIError, CompletionRequest

    if req.n != 1:
        raise APIError(400, f"n must be 1 in batch files (one completion per request line), got {req.n}",
                       param="n", code="invalid_value")
    if isinstance(req, CompletionRequest) and len(req.prompts()) != 1:
        raise APIError(400, f"prompt must be one prompt in batch files (one completion per request line), got "
                            f"{len(req.prompts())}", param="prompt", code="invalid_value")
    if req.stream:
        raise APIError(400, "stream is not supported in batch files (each line gets one complete response)",
                       param="stream", code="invalid_value")
    # chat: a bool; completions: a count, where 0 (sampled token only) asks for logprobs too
    if req.logprobs is not None if isinstance(req, CompletionRequest) else req.logprobs:
        raise APIError(400, "logprobs are not supported in batch files", param="logprobs", code="invalid_value")


def preprocess_openai_batch(batch: pa.Table, spec: OpenAIBatchSpec) -> pa.Table:
    """Validate and tokenize each request line with the Serve endpoint's request model and mapping
    (`pipeline.openai_requests`). Appends the preprocess columns of the module docstring; never raises for a bad row."""
    from pipeline.openai_requests import (
        PromptTooLongError,
        RequestLimits,
        parse_request,
        prepare_request,
        tokenizer_vocab_size,
    )
    from pipeline.serve.protocol import APIError

    tok, max_len = _tokenizer_and_len(spec.model, spec.storage, spec.model_cache_dir, spec.max_model_len)
    limits = RequestLimits(max_model_len=max_len, model_names=spec.served_model_names,
                           vocab_size=tokenizer_vocab_size(tok), max_tokens_limit=spec.max_tokens_limit)
    out: dict[str, list[Any]] = {c: [] for c in (TOKEN_IDS, PARAMS, ERROR_IN, KIND, MODEL, ERROR_STATUS, ERROR_BODY)}
    for url, body, line_error in zip(batch[URL].to_pylist(), batch[BODY].to_pylist(),
                                     batch[LINE_ERROR].to_pylist()):
        row: dict[str, Any] = dict.fromkeys(out)
        if line_error is not None:
            row[ERROR_IN] = f"invalid line: {line_error}"
        else:
            row[KIND] = URL_KINDS[url]
            try:
                req = parse_request(body, chat=row[KIND] == "chat")
                row[MODEL] = req.model
                check_batch_request(req)
                prep = prepare_request(req, tok, limits)
                row[TOKEN_IDS] = prep.prompts[0]
                row[PARAMS] = json.dumps(prep.sampling_kwargs, sort_keys=True)
            except APIError as e:
                row[ERROR_IN] = (prompt_too_long_message(e.num_tokens, e.max_model_len)
                                 if isinstance(e, PromptTooLongError) else f"invalid request: {e.message}")
                row[ERROR_STATUS] = e.status_code
                row[ERROR_BODY] = json.dumps(e.body(), separators=(",", ":"), ensure_ascii=False)
        for c, v in row.items():
            out[c].append(v)
    types = {TOKEN_IDS: pa.list_(pa.int32()), ERROR_STATUS: pa.int32()}
    for c, values in out.items():
        batch = batch.append_column(c, pa.array(values, types.get(c, pa.string())))
    return batch


def postprocess_openai_batch(batch: pa.Table, spec: OpenAIBatchSpec) -> pa.Table:
    """The output lines: ``[<id_column>, custom_id, line, status_code, error_code]``.

    * unusable line: ``{"id", "custom_id" (null if it had none), "response": null, "error": {"code", "message"}}``
    * request Serve would refuse (validation, unknown model, context): ``response.status_code`` 4xx and
      ``response.body`` the OpenAI error body Serve answers with; ``error`` null (what OpenAI's Batch API does for
      requests that reach the endpoint and fail there)
    * engine refusal: 400 ``engine_error`` ("the engine refused the request: ..."), as Serve answers it
    * success: 200 and the chat.completion / text_completion body Serve returns for the request
    """
    cols = {c: batch[c].to_pylist() for c in (spec.id_column, CUSTOM_ID, LINE_ERROR, LINE_ERROR_CODE, ERROR_STATUS, ERROR_BODY,
                                              KIND, MODEL, "generated_text", "finish_reason", "num_prompt_tokens",
                                              "num_generated_tokens", "error")}
    lines, statuses, codes = [], [], []
    now = int(time.time())
    for i in range(batch.num_rows):
        row = {c: v[i] for c, v in cols.items()}
        status, body, error = _response(row, now)
        if error is not None:
            record = {"id": batch_request_id(row[spec.id_column]), "custom_id": row[CUSTOM_ID], "response": None,
                      "error": error}
            codes.append(error["code"])
        else:
            record = {"id": batch_request_id(row[spec.id_column]), "custom_id": row[CUSTOM_ID],
                      "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
                      "error": None}
            codes.append(None if status == 200 else (body["error"].get("code") or body["error"].get("type")))
        statuses.append(None if error is not None else status)
        lines.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
    return pa.table({
        spec.id_column: batch[spec.id_column],
        CUSTOM_ID: batch[CUSTOM_ID],
        LINE: pa.array(lines, pa.string()),
        STATUS_CODE: pa.array(statuses, pa.int32()),
        ERROR_CODE: pa.array(codes, pa.string()),
    })


def batch_request_id(row_id: str) -> str:
    """The output line's `id`, derived from the row's stable id: a retried or resumed row keeps it, and the
    manifest's exactly-once check counts output lines by it."""
    return "batch_req_" + hashlib.sha256(row_id.encode()).hexdigest()[:32]


def _response(row: dict[str, Any], now: int) -> tuple[int | None, dict[str, Any] | None, dict[str, str] | None]:
    """(status_code, body, None) for a response, (None, None, {"code", "message"}) for an unusable line."""
    from pipeline.serve.protocol import error_body

    if row[LINE_ERROR] is not None:
        return None, None, {"code": row[LINE_ERROR_CODE] or "invalid_request", "message": row[LINE_ERROR]}
    if row[ERROR_STATUS] is not None:
        return row[ERROR_STATUS], json.loads(row[ERROR_BODY]), None
    if row["error"] is not None:
        msg = row["error"].removeprefix("engine error: ")
        return 400, error_body(f"the engine refused the request: {msg}", code="engine_error"), None
    if row["finish_reason"] not in ("stop", "length"):
        return 500, error_body(f"generation ended with finish_reason {row['finish_reason']!r}", type="server_error",
                               code="engine_error"), None
    return 200, _completion_body(row, now), None


def _completion_body(row: dict[str, Any], now: int) -> dict[str, Any]:
    """The body Serve returns for this (non-streaming, n=1) request, built with its response models."""
    from pipeline.serve.protocol import (
        ChatChoice,
        ChatCompletionResponse,
        ChatResponseMessage,
        CompletionChoice,
        CompletionResponse,
        UsageInfo,
    )

    prompt, generated = row["num_prompt_tokens"] or 0, row["num_generated_tokens"] or 0
    usage = UsageInfo(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)
    text = row["generated_text"] or ""
    if row[KIND] == "chat":
        resp: Any = ChatCompletionResponse(
            id="chatcmpl-" + uuid.uuid4().hex, created=now, model=row[MODEL], usage=usage,
            choices=[ChatChoice(index=0, message=ChatResponseMessage(content=text), logprobs=None,
                                finish_reason=row["finish_reason"])])
    else:
        resp = CompletionResponse(
            id="cmpl-" + uuid.uuid4().hex, created=now, model=row[MODEL], usage=usage,
            choices=[CompletionChoice(index=0, text=text, logprobs=None, finish_reason=row["finish_reason"])])
    # Serve's dicts have no system_fingerprint key; everything else is the model's fields in order.
    return resp.model_dump(mode="json", exclude={"system_fingerprint"})
