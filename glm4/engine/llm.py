"""LLM: offline batch generation over the engine (vLLM-style API).

    llm = glm4.LLM("/models/glm-4-9b", max_num_seqs=128)
    outs = llm.generate(["The capital of France is"], glm4.SamplingParams(temperature=0, max_tokens=16))
    print(outs[0].text, outs[0].finish_reason)
    outs = llm.chat([[{"role": "user", "content": "Hello"}]])

Prompts are strings (plain completion: `[gMASK]<sop>` + text), token-id lists, or {"prompt_token_ids": [...]}.
Outputs come back one per prompt, in input order. A prompt that cannot run gets an output with `error` set and
finish_reason "error"; all the others complete.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any, Sequence as Seq

from glm4.engine.engine_config import EngineConfig
from glm4.engine.llm_engine import LLMEngine
from glm4.engine.outputs import CompletionOutput, RequestOutput
from glm4.engine.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str | Path, **engine_options: Any) -> None:
        self.engine = LLMEngine(model, EngineConfig.from_kwargs(**engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    # ---- public API ------------------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, use_tqdm: bool | None = None) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        encoded: list[list[int] | str] = [self._encode(p) for p in prompts]
        return self._run(encoded, sampling_params, use_tqdm)

    def chat(self, conversations: list[dict[str, Any]] | Seq[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             *, add_generation_prompt: bool = True, use_tqdm: bool | None = None) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # a single conversation
        tok = self._need_tokenizer()
        encoded: list[list[int] | str] = []
        for conv in conversations:
            try:
                encoded.append(tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt))
            except (ValueError, TypeError) as e:
                encoded.append(f"invalid conversation: {e}")
        return self._run(encoded, sampling_params, use_tqdm)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals -------------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.engine.model_dir} has no tokenizer.model: pass token-id lists instead of text")
        return self.tokenizer

    def _encode(self, prompt: PromptType) -> list[int] | str:
        """Token ids, or an error message (a str) that becomes this prompt's error output."""
        if isinstance(prompt, str):
            return self._need_tokenizer().encode_prompt(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        return f"prompt must be a str, a list of token ids or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"

    def _run(self, encoded: list[list[int] | str], sampling_params: Any, use_tqdm: bool | None) -> list[RequestOutput]:
        if sampling_params is None:
            params_list = [SamplingParams()] * len(encoded)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(encoded)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(encoded):
                raise ValueError(f"got {len(params_list)} sampling params for {len(encoded)} prompts; pass one, "
                                 "or one per prompt")
        engine = self.engine
        ids = [f"gen-{next(self._ids)}" for _ in encoded]
        results: dict[str, RequestOutput] = {}
        for rid, prompt, params in zip(ids, encoded, params_list):
            if isinstance(prompt, str):  # could not even be encoded
                results[rid] = RequestOutput(rid, [], [CompletionOutput(0, "", [], "error")], True, error=prompt)
            else:
                engine.add_request(rid, prompt, params, final_only=True)  # results only: no incremental outputs
        bar = _progress(len(encoded), use_tqdm)
        start = time.monotonic()
        if bar is not None:
            bar.update(len(results))
        while engine.has_unfinished():
            for out in engine.step():
                results[out.request_id] = out
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                elapsed = max(time.monotonic() - start, 1e-9)
                bar.set_postfix_str(f"{engine.num_generated_tokens / elapsed:.0f} tok/s", refresh=False)
        if bar is not None:
            bar.close()
        return [results[rid] for rid in ids]


def _progress(total: int, use_tqdm: bool | None):
    """A tqdm bar (rows, tokens/s) for long calls; on by default only on an interactive terminal."""
    if use_tqdm is None:
        use_tqdm = total >= 16 and sys.stderr.isatty()
    if not use_tqdm:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)
