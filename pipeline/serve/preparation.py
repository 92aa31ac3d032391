"""From an HTTP request to what the engine needs: the body read under its size limit, parsed and type-checked
(``protocol``), then checked against this replica (served model names, vocabulary, context length, server limits)
and turned into token ids and ``SamplingParams`` (:class:`Prepared`).

Everything here runs before a request is admitted, so bad input costs no admission slot and no engine work; every
failure is an :class:`~pipeline.serve.protocol.APIError` (4xx, OpenAI's error body, with the offending ``param``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from pipeline.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error_to_api_error,
)


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
        # Imported here, in the replica, not at module level: importing pipeline.serve.app (for build_app, or in
        # the manifest tests) stays free of glm4, as it was before this module was split out.
        from glm4.engine.sampling_params import SamplingParams

        self._SamplingParams = SamplingParams
        self.tokenizer = tokenizer
        self.model_names = model_names
        self.max_model_len = max_model_len
        self.vocab_size = int(getattr(tokenizer, "vocab_size", 0)) or None
        self.max_request_bytes = max_request_bytes
        self.max_sequences_per_request = max_sequences_per_request
        self.max_tokens_limit = max_tokens_limit

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
        try:
            return (ChatCompletionRequest if chat else CompletionRequest).model_validate_json(body)
        except ValidationError as e:
            raise validation_error_to_api_error(e) from None

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        """Tokenized prompts and sampling params of a completion request; max_tokens is checked against the
        longest prompt, since all prompts share one SamplingParams."""
        self._check_model(req.model)
        n_seqs = len(req.prompts()) * req.n
        if n_seqs > self.max_sequences_per_request:
            raise APIError(400, f"this request asks for {n_seqs} sequences (prompts x n); this server allows at "
                                f"most {self.max_sequences_per_request} per request", param="prompt",
                           code="invalid_value")
        prompts: list[list[int]] = []
        for p in req.prompts():
            ids = self.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p)
            self._check_prompt_ids(ids, "prompt")
            prompts.append(ids)
        longest = max(len(p) for p in prompts)
        max_tokens = self._resolve_max_tokens(req.max_tokens, longest, "prompt")
        params = self._sampling_params(req, max_tokens, req.logprobs)
        return Prepared(prompts, params, req.n, req.model, req.logprobs, req.include_usage)

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        """The conversation through the chat template, as one prompt, with its sampling params."""
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
        return Prepared([ids], params, req.n, req.model, logprobs, req.include_usage)

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
        limit = self.max_tokens_limit
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
        # Unset sampling fields are left out, so SamplingParams' own defaults apply rather than None.
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
            # SamplingParams' messages start with the field's name ("top_p must be ..."): report it as the param.
            field = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=field if field in kwargs else None, code="invalid_value") from None
