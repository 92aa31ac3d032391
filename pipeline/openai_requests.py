"""One OpenAI request -> engine request mapping, shared by the Serve endpoint, OpenAI Batch files and the Parquet
path's per-row sampling params.

* :func:`parse_request`: a JSON body as a validated :class:`~pipeline.serve.protocol.ChatCompletionRequest` or
  :class:`~pipeline.serve.protocol.CompletionRequest` (one strict pydantic pass; errors are ``APIError`` 4xx).
* :func:`prepare_request`: the request checked against a deployment (:class:`RequestLimits`: model names,
  vocabulary, context length, limits) and turned into prompt token ids (chat template or ``encode_prompt``) and
  validated ``glm4.SamplingParams`` kwargs (:class:`PreparedRequest`).
* :func:`sampling_kwargs_from_openai`: the name mapping itself, OpenAI/vLLM request fields -> ``SamplingParams``
  kwargs (``max_completion_tokens`` -> ``max_tokens``, ``stop`` string -> list, chat ``logprobs``/``top_logprobs``
  -> ``logprobs``; ``logit_bias`` only empty). Used on validated requests and on raw per-row override dicts.

No HTTP here (no starlette/FastAPI): the errors are ``APIError`` (status, OpenAI error body), which the Serve app
answers with and which OpenAI Batch output lines embed. ``glm4`` is imported lazily, in the worker that prepares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

from pydantic import ValidationError

from pipeline.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error_to_api_error,
)

OpenAIRequest = Union[ChatCompletionRequest, CompletionRequest]

# Request fields that become SamplingParams kwargs (through sampling_kwargs_from_openai), for both endpoints.
REQUEST_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "skip_special_tokens", "logprobs",
    "top_logprobs", "max_tokens", "max_completion_tokens", "logit_bias",
)
# OpenAI fields that do not change what is generated: accepted and dropped by the mapping.
_NON_SAMPLING_FIELDS = frozenset({"user", "model", "stream_options", "response_format", "tool_choice", "metadata",
                                  "store", "service_tier", "parallel_tool_calls"})


class FieldError(ValueError):
    """A sampling field that cannot be mapped or is invalid; ``param`` names it (OpenAI's ``param``)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class PromptTooLongError(APIError):
    """The prompt alone fills the context (400 ``context_length_exceeded``); carries the numbers so that callers
    with their own wording (the batch job's ``prompt too long: ...``) need not parse the message."""

    def __init__(self, num_tokens: int, max_model_len: int, param: str):
        super().__init__(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                              f"{param} has {num_tokens} tokens, leaving no room for the completion. Please reduce "
                              f"the length of the {param}.", param=param, code="context_length_exceeded")
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len


@dataclass(frozen=True)
class RequestLimits:
    """What a deployment accepts. ``model_names=None`` accepts any ``model`` (echoed in the response);
    ``max_model_len=None`` skips the context checks (and then a missing max_tokens means SamplingParams' 16)."""

    max_model_len: int | None
    model_names: frozenset[str] | None = None
    vocab_size: int | None = None
    max_sequences_per_request: int | None = None
    max_tokens_limit: int | None = None


@dataclass
class PreparedRequest:
    """A validated request: one token-id list per prompt, the shared SamplingParams (as kwargs and validated)."""

    prompts: list[list[int]]
    sampling_kwargs: dict[str, Any]
    params: Any  # glm4.SamplingParams(**sampling_kwargs), validated
    n: int
    model: str
    logprobs: int | None
    include_usage: bool


def tokenizer_vocab_size(tokenizer: Any) -> int | None:
    return int(getattr(tokenizer, "vocab_size", 0)) or None


def parse_request(body: bytes | str, chat: bool) -> OpenAIRequest:
    """The body as a chat or completion request, in one strict pydantic pass (its errors become 4xx)."""
    try:
        return (ChatCompletionRequest if chat else CompletionRequest).model_validate_json(body)
    except ValidationError as e:
        raise validation_error_to_api_error(e) from None


def prepare_request(req: OpenAIRequest, tokenizer: Any, limits: RequestLimits) -> PreparedRequest:
    """Token ids and validated sampling params of a chat or completion request. Raises ``APIError``.

    Completions: every prompt (text through ``encode_prompt``, or token ids) with one shared SamplingParams,
    max_tokens checked against the longest prompt. Chat: the conversation through the chat template as one prompt.
    Without max_tokens a chat request may use the rest of the context (capped by ``max_tokens_limit``); a
    completion request gets OpenAI's default of 16.
    """
    _check_model(req.model, limits)
    if isinstance(req, ChatCompletionRequest):
        messages = [{"role": m.glm_role(), "content": m.text()} for m in req.messages]
        try:
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except (ValueError, TypeError) as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        _check_prompt_ids(ids, "messages", limits)
        prompts, param, requested = [ids], "messages", req.requested_max_tokens
    else:
        n_seqs = len(req.prompts()) * req.n
        if limits.max_sequences_per_request is not None and n_seqs > limits.max_sequences_per_request:
            raise APIError(400, f"this request asks for {n_seqs} sequences (prompts x n); this server allows at "
                                f"most {limits.max_sequences_per_request} per request", param="prompt",
                           code="invalid_value")
        prompts = []
        for p in req.prompts():
            ids = tokenizer.encode_prompt(p) if isinstance(p, str) else list(p)
            _check_prompt_ids(ids, "prompt", limits)
            prompts.append(ids)
        param, requested = "prompt", req.max_tokens
    max_tokens = _resolve_max_tokens(requested, max(len(p) for p in prompts), param, limits)
    try:
        kwargs = sampling_kwargs_from_openai({f: getattr(req, f) for f in REQUEST_SAMPLING_FIELDS if hasattr(req, f)})
    except FieldError as e:  # the pydantic model has already checked these; kept for completeness
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    if kwargs.get("min_tokens", 0) > kwargs.get("max_tokens", 16):
        raise APIError(400, f"min_tokens ({kwargs['min_tokens']}) is larger than max_tokens ({kwargs['max_tokens']})",
                       param="min_tokens", code="invalid_value")
    try:
        params = validate_sampling_kwargs(kwargs)
    except FieldError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    return PreparedRequest(prompts, kwargs, params, req.n, req.model, kwargs.get("logprobs"), req.include_usage)


def sampling_kwargs_from_openai(fields: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI/vLLM request fields -> ``glm4.SamplingParams`` kwargs (not yet validated; see
    :func:`validate_sampling_kwargs`). Raises :class:`FieldError` for what cannot be mapped.

    * ``None`` values are dropped, so SamplingParams' own defaults apply.
    * ``max_completion_tokens`` (chat) and ``max_tokens`` both become ``max_tokens``; both given and different is
      an error.
    * ``stop``: a string becomes a one-element list.
    * ``logprobs``: a bool is chat's switch (``top_logprobs`` is then the count, 0 if absent; ``False`` means none);
      an int is completions' (and SamplingParams') count. ``top_logprobs`` without ``logprobs: true`` is an error.
    * ``logit_bias``: only empty or absent (not supported).
    * ``stream: true`` is refused (it has no meaning for a prepared, non-streaming result); ``stream: false``,
      ``user``, ``model``, ``stream_options`` and other fields that do not change the tokens are dropped.
    * Every other name passes through unchanged (vLLM names such as ``top_k``, ``min_tokens``, ``ignore_eos``,
      ``stop_token_ids``), so SamplingParams reports unknown ones.
    """
    mct, mt = fields.get("max_completion_tokens"), fields.get("max_tokens")
    if mct is not None and mt is not None and mct != mt:
        raise FieldError("max_tokens", "max_tokens and max_completion_tokens disagree; send one of them")
    logprobs, top = fields.get("logprobs"), fields.get("top_logprobs")
    if top is not None and logprobs is not True:
        raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None or name in _NON_SAMPLING_FIELDS or name == "top_logprobs":
            continue
        if name == "max_completion_tokens":
            out["max_tokens"] = value
        elif name == "stop":
            out["stop"] = [value] if isinstance(value, str) else value
        elif name == "logprobs":
            if isinstance(value, bool):
                if value:
                    out["logprobs"] = top if top is not None else 0
            else:
                out["logprobs"] = value
        elif name == "logit_bias":
            if value:
                raise FieldError("logit_bias", "logit_bias is not supported by this server")
        elif name == "stream":
            if value is not False:
                raise FieldError("stream", "stream is not supported here: each request gets one complete result")
        else:
            out[name] = value
    return out


def validate_sampling_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """``glm4.SamplingParams(**kwargs).validate()``; an unknown name or a bad value is a :class:`FieldError`
    whose ``param`` is the field (SamplingParams' messages start with the field's name)."""
    from glm4.engine.sampling_params import SamplingParams

    try:
        return SamplingParams(**kwargs).validate()
    except TypeError as e:  # an unknown keyword
        raise FieldError(None, str(e)) from None
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise FieldError(field if field in kwargs else None, str(e)) from None


def _check_model(model: str, limits: RequestLimits) -> None:
    if limits.model_names is not None and model not in limits.model_names:
        raise APIError(404, f"The model '{model}' does not exist; this server serves "
                            f"{sorted(limits.model_names)}", param="model", code="model_not_found")


def _check_prompt_ids(ids: list[int], param: str, limits: RequestLimits) -> None:
    if not ids:
        raise APIError(400, f"{param} is empty", param=param, code="invalid_value")
    if limits.vocab_size is not None and max(ids) >= limits.vocab_size:
        raise APIError(400, f"{param} has token id {max(ids)} outside the vocabulary (size {limits.vocab_size})",
                       param=param, code="invalid_value")
    if limits.max_model_len is not None and len(ids) >= limits.max_model_len:
        raise PromptTooLongError(len(ids), limits.max_model_len, param)


def _resolve_max_tokens(requested: int | None, prompt_len: int, param: str, limits: RequestLimits) -> int | None:
    limit = limits.max_tokens_limit
    if limits.max_model_len is None:
        room = None
    else:
        room = limits.max_model_len - prompt_len
    if requested is None:
        if room is None:
            return limit
        return max(1, min(room, limit) if limit else room)
    if limit is not None and requested > limit:
        raise APIError(400, f"max_tokens is {requested} but this server allows at most {limit}",
                       param="max_tokens", code="invalid_value")
    if room is not None and requested > room:
        raise APIError(400, f"This model's maximum context length is {limits.max_model_len} tokens. However, you "
                            f"requested {prompt_len + requested} tokens ({prompt_len} in the {param}, {requested} in "
                            f"the completion). Please reduce the length of the {param} or completion.",
                       param="max_tokens", code="context_length_exceeded")
    return requested


__all__ = [
    "FieldError", "OpenAIRequest", "PreparedRequest", "PromptTooLongError", "REQUEST_SAMPLING_FIELDS",
    "RequestLimits", "parse_request", "prepare_request", "sampling_kwargs_from_openai", "tokenizer_vocab_size",
    "validate_sampling_kwargs",
]
