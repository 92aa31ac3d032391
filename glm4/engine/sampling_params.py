"""Per-request sampling options, with vLLM's field names and defaults.

    >>> params = SamplingParams(temperature=0, max_tokens=32).validate()   # greedy
    >>> SamplingParams(top_p=1.5).validate()
    Traceback (most recent call last):
    ...
    ValueError: top_p must be in (0, 1], got 1.5

No torch here: the scheduler reads these fields and must stay torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20


def _is_int(x: object) -> bool:
    # bool is a subclass of int; `n=True` is almost certainly a mistake, so refuse it.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 -> greedy (argmax after penalties)
    top_p: float = 1.0
    top_k: int = -1  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # vLLM semantics: prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI semantics: output tokens only
    frequency_penalty: float = 0.0
    seed: int | None = None  # sample i of a request uses seed + i (as vLLM does for n > 1)
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None  # a str is normalised to [str]
    stop_token_ids: list[int] | None = None  # None -> the tokenizer's stop ids (GLM-4: 3 of them)
    ignore_eos: bool = False  # drop the default stop ids; explicit stop_token_ids still stop
    logprobs: int | None = None  # top-k logprobs of the raw model distribution per generated token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first bad field and its allowed range; return self when valid."""
        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"{field} must be {allowed}, got {getattr(self, field)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not _is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise bad("temperature", "a finite number >= 0 (0 means greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (off) or an integer >= 1")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            raise bad("repetition_penalty", "a finite number > 0 (1 = off)")
        for f in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, f)
            if not _is_number(v) or not -2 <= v <= 2:
                raise bad(f, "in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "None or an integer")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]")
        if self.stop is not None and (not isinstance(self.stop, list)
                                      or not all(isinstance(s, str) and s for s in self.stop)):
            raise bad("stop", "None, a non-empty string, or a list of non-empty strings")
        if self.stop_token_ids is not None and (not isinstance(self.stop_token_ids, list)
                                                or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "None or a list of integers >= 0")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "a bool")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", "a bool")
        return self
