"""From an HTTP request to what the engine needs: the body read under its size limit, parsed and type-checked
(``protocol``), then checked against this replica (served model names, vocabulary, context length, server limits)
and turned into token ids and ``SamplingParams`` (:class:`Prepared`). The mapping itself (request model -> token ids
and ``SamplingParams``) is :mod:`pipeline.openai_requests`, shared with the batch job's OpenAI Batch files; this module adds
what is HTTP: the body read under its size limit.

Everything here runs before a request is admitted, so bad input costs no admission slot and no engine work; every
failure is an :class:`~pipeline.serve.protocol.APIError` (4xx, OpenAI's error body, with the offending ``param``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from pipeline.openai_requests import PreparedRequest, RequestLimits, parse_request, prepare_request, tokenizer_vocab_size
from pipeline.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest


@dataclass(slots=True)
class Prepared:
    """A validated request, ready for the engine: one token-id list per prompt and the shared sampling params."""

    prompts: list[list[int]]
    params: Any
    n: int
    model: str
    logprobs: int | None
    include_usage: bool


class RequestPreparer:
    """Validates and prepares completion and chat requests for one replica's tokenizer and context length."""

    def __init__(self, tokenizer: Any, model_names: set[str], max_model_len: int, *, max_request_bytes: int,
                 max_sequences_per_request: int, max_tokens_limit: int | None):
        self.tokenizer = tokenizer
        self.model_names = model_names
        self.max_model_len = max_model_len
        self.vocab_size = tokenizer_vocab_size(tokenizer)
        self.max_request_bytes = max_request_bytes
        self.max_sequences_per_request = max_sequences_per_request
        self.max_tokens_limit = max_tokens_limit
        self.limits = RequestLimits(max_model_len=max_model_len, model_names=frozenset(model_names),
                                    vocab_size=self.vocab_size, max_sequences_per_request=max_sequences_per_request,
                                    max_tokens_limit=max_tokens_limit)

    async def read_body(self, request: Request) -> bytes:
        """The raw body, refused (413) before reading when Content-Length already says it is too large."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            raise APIError(413, f"request body over {self.max_request_bytes} bytes", code="request_too_large")
        body = await request.body()
        if len(body) > self.max_request_bytes:
            raise APIError(413, f"request body over {self.max_request_bytes} bytes", code="request_too_large")
        if not body.strip():
            raise APIError(400, "request body is empty; send a JSON object", code="invalid_request_body")
        return body

    @staticmethod
    def parse(body: bytes, chat: bool) -> ChatCompletionRequest | CompletionRequest:
        """The body as a chat or completion request, in one strict pydantic pass (its errors become 4xx)."""
        return parse_request(body, chat)

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        """Tokenized prompts and sampling params of a completion request; max_tokens is checked against the
        longest prompt, since all prompts share one SamplingParams."""
        return _prepared(prepare_request(req, self.tokenizer, self.limits))

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        """The conversation through the chat template, as one prompt, with its sampling params."""
        return _prepared(prepare_request(req, self.tokenizer, self.limits))


def _prepared(p: PreparedRequest) -> Prepared:
    return Prepared(p.prompts, p.params, p.n, p.model, p.logprobs, p.include_usage)
