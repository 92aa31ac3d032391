"""OpenAI Batch files for the batch job: JSONL request files in, JSONL response files out.

Input lines ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}``;
output lines ``{"id": "batch_req_<hex>", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
in no particular order (join on ``custom_id``), as OpenAI's Batch API and vLLM's ``run-batch`` write them.

* ``reader``: :func:`make_jsonl_datasource` (byte-range read tasks, stable ``"<rel>@<offset>"`` row ids),
  :func:`parse_line`.
* ``stages``: :func:`preprocess_openai_batch` (the Serve endpoint's request model and request -> SamplingParams
  mapping from :mod:`pipeline.openai_requests`, so a line is accepted, refused and answered exactly as Serve would) and
  :func:`postprocess_openai_batch` (the response body built with Serve's response models).
* ``sink``: :class:`JsonlLinesDatasink` (Ray Data file datasink: row-level checkpointing applies).

Choices, mirroring OpenAI:

* A line that is not a request (not JSON, not an object, no string ``custom_id``, ``method`` not POST, ``url``
  not one of the two endpoints, ``body`` not an object) gets ``"response": null`` and ``"error": {"code",
  "message"}`` (codes ``invalid_json_line``, ``invalid_custom_id``, ``invalid_method``, ``invalid_url``,
  ``invalid_body``); ``custom_id`` is null when the line had no usable one.
* A request that reaches the endpoint and fails there (validation, unknown model, context length, engine
  refusal) gets ``response.status_code`` 4xx with the OpenAI error body Serve answers with, and ``"error": null``.
* Batch-only refusals (400, ``param`` named): ``n`` other than 1, several completion prompts in one line,
  ``stream: true`` (a batch result is never streamed: refused rather than silently answered differently), and
  ``logprobs`` (the engine stage returns text only).
* Without ``max_tokens`` a chat request may use the rest of the context, as on Serve (``max_tokens_limit`` caps
  it); completions default to 16.
"""

from pipeline.openai_batch.reader import (
    BODY,
    CUSTOM_ID,
    LINE_ERROR,
    LINE_ERROR_CODE,
    URL,
    URL_KINDS,
    ParsedLine,
    iter_owned_lines,
    make_jsonl_datasource,
    parse_line,
    split_ranges,
)
from pipeline.openai_batch.sink import JsonlLinesDatasink
from pipeline.openai_batch.stages import (
    ERROR_BODY,
    ERROR_CODE,
    ERROR_STATUS,
    KIND,
    LINE,
    MODEL,
    STATUS_CODE,
    OpenAIBatchSpec,
    check_batch_request,
    postprocess_openai_batch,
    preprocess_openai_batch,
    prompt_too_long_message,
)

__all__ = [
    "BODY", "CUSTOM_ID", "ERROR_BODY", "ERROR_CODE", "ERROR_STATUS", "JsonlLinesDatasink", "KIND", "LINE",
    "LINE_ERROR", "LINE_ERROR_CODE", "MODEL", "OpenAIBatchSpec", "ParsedLine", "STATUS_CODE", "URL", "URL_KINDS",
    "check_batch_request", "iter_owned_lines", "make_jsonl_datasource", "parse_line", "postprocess_openai_batch",
    "preprocess_openai_batch", "prompt_too_long_message", "split_ranges",
]
