"""OpenAI-compatible request/response models for /v1/completions and /v1/chat/completions.

Requests are parsed with ``Model.model_validate_json(body)`` in strict mode: JSON parsing and type checks happen in
one pydantic-core pass, ``"max_tokens": "10"`` or ``"stream": 1`` are type errors (OpenAI rejects them too), and a
malformed body is a ``json_invalid`` validation error. Every failure becomes a 4xx with OpenAI's error body
(:func:`error_body`), never a 500. Unknown request fields are ignored, as vLLM does (SDKs add new fields over time).

Extensions beyond OpenAI (vLLM names, sent by the openai client through ``extra_body``): ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``.

Responses are plain dicts built by the app for speed (one per streamed token); the response models below document
their shape, are what /openapi.json shows, and let tests validate what the server sends.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_LOGPROBS = 20  # the engine's limit (glm4.engine.sampling_params.MAX_LOGPROBS)
MAX_STOP = 16
MAX_N = 16

_REQUEST_CONFIG = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error the API reports to the client with OpenAI's error body."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """pydantic error location -> OpenAI ``param`` ("messages[0].content"); union branch names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str):
            # pydantic adds the union member / function validator name to the location, e.g. 'list[int]'.
            if any(c in part for c in "[]()") or part in {"str", "int", "float", "bool", "function-after",
                                                           "function-before", "function-wrap"}:
                continue
            out += ("." if out else "") + part
    return out or None


def validation_error_to_api_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if first.get("type") in {"model_type", "model_attributes_type"} and not first.get("loc"):
        return APIError(400, "request body must be a JSON object", code="invalid_request_body")
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    # Strip pydantic's "Value error, " prefix from our own validators' messages.
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    text = f"{param}: {msg}{more}" if param else f"{msg}{more}"
    return APIError(400, text, param=param, code="invalid_value" if param else "invalid_request_body")


# --------------------------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints."""

    model_config = _REQUEST_CONFIG

    model: str = Field(description="Served model name (GET /v1/models).")
    n: int = Field(1, ge=1, le=MAX_N, description="Number of samples per prompt.")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 = greedy. Default 1.")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1, description="Extension: -1 or 0 = off.")
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0, description="Extension.")
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0, description="Extension (vLLM semantics).")
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Optional[Union[str, list[str]]] = Field(None, description=f"Up to {MAX_STOP} stop strings.")
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0)]]] = Field(None, description="Extension.")
    ignore_eos: bool = Field(False, description="Extension: do not stop at the tokenizer's end tokens.")
    min_tokens: int = Field(0, ge=0, description="Extension.")
    skip_special_tokens: bool = Field(True, description="Extension.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, max_length=256, description="End-user id (accepted; not used).")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Not supported: must be empty or absent.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops or None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return None

    @model_validator(mode="after")
    def _check_stream_options(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions"""

    prompt: PromptType = Field(description="Text, list of texts, token ids, or list of token-id lists.")
    max_tokens: Optional[int] = Field(16, ge=1, description="Default 16, as in OpenAI.")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="Top-k logprobs per token.")
    echo: bool = Field(False, description="Not supported: must be false.")
    suffix: Optional[str] = Field(None, description="Not supported: must be absent.")
    best_of: Optional[int] = Field(None, ge=1, description="Only best_of == n (or absent) is supported.")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: PromptType) -> PromptType:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if isinstance(v[0], list) and any(not p for p in v):
                raise ValueError("token-id prompts must not be empty")
            if isinstance(v[0], int) and any(t < 0 for t in v):
                raise ValueError("token ids must be >= 0")
            if isinstance(v[0], list) and any(t < 0 for p in v for t in p):
                raise ValueError("token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _check_unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (or be absent): server-side best-of is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextContentPart(BaseModel):
    model_config = _REQUEST_CONFIG
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG
    role: Literal["system", "developer", "user", "assistant", "observation", "tool"]
    content: Optional[Union[str, list[TextContentPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def glm_role(self) -> str:
        # OpenAI's "developer" is the newer name for "system"; tool results are GLM-4's "observation".
        return {"developer": "system", "tool": "observation"}.get(self.role, self.role)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="Deprecated OpenAI name of max_completion_tokens.")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Default: the rest of the context.")
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[dict[str, Any]] = Field(None, description="Only {'type': 'text'} is supported.")
    tools: Optional[list[Any]] = Field(None, description="Not supported: must be empty or absent.")
    tool_choice: Optional[Any] = Field(None, description="Only 'none' (or absent) is supported.")

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: only 'none' is supported")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


# --------------------------------------------------------------------------------------------------------------
# responses (documentation and test validation; the app sends equivalent dicts)
# --------------------------------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "error"]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "error"]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "error"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm4-ray"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


__all__ = [
    "APIError", "ChatChoice", "ChatChoiceLogprobs", "ChatCompletionChunk", "ChatCompletionRequest",
    "ChatCompletionResponse", "ChatMessage", "CompletionChoice", "CompletionChunk", "CompletionLogprobs",
    "CompletionRequest", "CompletionResponse", "ErrorInfo", "ErrorResponse", "MAX_LOGPROBS", "MAX_N", "MAX_STOP",
    "ModelCard", "ModelList", "StreamOptions", "UsageInfo", "error_body", "validation_error_to_api_error",
]
