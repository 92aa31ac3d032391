"""OpenAI ``logprobs`` in both shapes: the completions one (parallel lists: tokens, token_logprobs, top_logprobs,
text_offset) and the chat one (a list of {token, logprob, bytes, top_logprobs}).

A class rather than free functions: it keeps a cache of token texts for its tokenizer, since the same tokens come
up again and again (in top-k lists, across events and requests).
"""

from __future__ import annotations

from typing import Any


class LogprobFormatter:
    """Formats the engine's per-token logprob entries (``{token id: logprob}``) for one tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._token_str: dict[int, str] = {}

    def token_str(self, tid: int) -> str:
        """A token's text; a token that is not valid UTF-8 on its own (part of a multi-byte character) is shown
        as OpenAI does, ``bytes:\\xe4\\xbd``, so distinct tokens never share a string."""
        s = self._token_str.get(tid)
        if s is None:
            try:
                raw = self.tokenizer.token_bytes(tid)
                try:
                    s = raw.decode("utf-8")
                except UnicodeDecodeError:
                    s = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            except (IndexError, AttributeError):
                s = self.tokenizer.decode([tid], skip_special_tokens=False)
            if len(self._token_str) < 200_000:
                self._token_str[tid] = s
        return s

    def token_bytes(self, tid: int) -> list[int]:
        try:
            return list(self.tokenizer.token_bytes(tid))
        except (IndexError, AttributeError):
            return list(self.token_str(tid).encode())

    @staticmethod
    def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]

    def completion(self, token_ids: list[int], entries: list[dict[int, float]] | None, k: int,
                   text_offset0: int) -> dict[str, Any]:
        """Completions ``logprobs`` of ``token_ids``; ``text_offset0`` is where their text starts in the choice."""
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = text_offset0
        for i, tid in enumerate(token_ids):
            entry = entries[i] if entries is not None and i < len(entries) else {}
            s = self.token_str(tid)
            tokens.append(s)
            token_lps.append(entry.get(tid))
            if not entry:
                tops.append(None)
            elif k:
                tops.append({self.token_str(t): lp for t, lp in self._top(entry, k)})
            else:  # logprobs=0: only the sampled token, as vLLM does
                tops.append({s: entry[tid]} if tid in entry else None)
            offsets.append(offset)
            offset += len(s) if not s.startswith("bytes:") else 0
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, token_ids: list[int], entries: list[dict[int, float]] | None, k: int) -> list[dict[str, Any]]:
        """Chat ``logprobs.content`` of ``token_ids``."""
        content = []
        for i, tid in enumerate(token_ids):
            entry = entries[i] if entries is not None and i < len(entries) else {}
            lp = entry.get(tid)
            content.append({
                "token": self.token_str(tid), "logprob": lp if lp is not None else -9999.0,
                "bytes": self.token_bytes(tid),
                "top_logprobs": [{"token": self.token_str(t), "logprob": v, "bytes": self.token_bytes(t)}
                                 for t, v in self._top(entry, k)] if k else [],
            })
        return content
