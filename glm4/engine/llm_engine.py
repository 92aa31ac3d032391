"""LLMEngine: the synchronous engine loop (schedule -> run the model -> sample -> detokenize -> outputs).

    engine = LLMEngine.from_pretrained(model_dir, max_num_seqs=64)
    engine.add_request("r1", prompt_token_ids, SamplingParams(temperature=0, max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():          # incremental: every request that changed in this step
            print(out.request_id, out.text, out.finished)
    # add_request(..., final_only=True): that request is reported once, when it finishes (batch callers:
    # LLM.generate, a batch row, a non-streaming HTTP call)

A request that cannot run (invalid parameters, token ids outside the vocabulary, a prompt longer than the
context) is finished at once with finish_reason "error" and a message; it never takes the engine down. Neither
does a step that runs out of memory: the requests of that step finish the same way (glm4/engine/oom.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm4.config import GLM4Config
from glm4.engine.engine_config import EngineConfig
from glm4.engine.executor import Executor, ExecutorSpec, model_dir_str, resolve_executor_class
from glm4.engine.model_runner import max_blocks_needed
from glm4.engine.oom import is_recoverable_oom, oom_message, release_cached_memory
from glm4.engine.outputs import CompletionOutput, RequestOutput
from glm4.engine.sampler import Sampler, SamplerOutput
from glm4.engine.sampling_params import SamplingParams
from glm4.engine.scheduler import Scheduler, SchedulerOutput
from glm4.engine.sequence import Sequence
from glm4.engine.step_inputs import StepInputsBuilder

# Decode batches above this run eagerly: graphs pay off where launch overhead rivals the step's GPU time.
MAX_GRAPH_BATCH = 256

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    error: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_cached_tokens: int = 0  # most prompt tokens any sample took from the prefix cache
    final_only: bool = False  # output once, when finished (no incremental outputs)


    @property
    def finished(self) -> bool:
        return self.error is not None or all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig) -> None:
        from glm4.tokenizer import load_tokenizer

        self.model_dir = model_dir_str(model_dir)
        self.engine_config = config
        self.model_config = GLM4Config.from_json(Path(self.model_dir) / "config.json")
        tok_file = Path(self.model_dir) / "tokenizer.model"
        self.tokenizer = load_tokenizer(self.model_dir) if tok_file.is_file() else None
        limit = self.model_config.max_position_embeddings
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                             f"{limit}")
        spec = ExecutorSpec(
            model_dir=self.model_dir, dtype=config.dtype, device=config.device,
            tensor_parallel_size=config.tensor_parallel_size, block_size=config.block_size,
            kv_cache_memory=config.kv_cache_memory,
            max_blocks_needed=max_blocks_needed(config.max_num_seqs, self.max_model_len, config.block_size),
            worker_timeout_s=config.worker_timeout_s, master_addr=config.master_addr, master_port=config.master_port,
            load_format=config.load_format, startup_timeout_s=config.startup_timeout_s,
            cuda_graph_max_batch=0 if config.enforce_eager else min(config.max_num_seqs, MAX_GRAPH_BATCH),
            max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
            max_num_batched_tokens=config.max_num_batched_tokens)
        self.executor: Executor = resolve_executor_class(config.executor, config.tensor_parallel_size)(spec)
        self.scheduler = Scheduler(
            num_blocks=self.executor.num_blocks, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching, policy=config.scheduling_policy)
        self.step_inputs = StepInputsBuilder(config.max_num_seqs, config.block_size)
        self.vocab_limit = self.tokenizer.vocab_size if self.tokenizer else self.model_config.vocab_size
        self.sampler = Sampler(seed=config.seed, vocab_size=self.vocab_limit, max_num_seqs=config.max_num_seqs)
        self.stop_token_ids = tuple(self.tokenizer.stop_token_ids if self.tokenizer
                                    else self.model_config.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (rejected requests, aborts)
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        logger.info("engine ready: %s, KV cache %d tokens (%d blocks of %d)", self.model_dir,
                    self.kv_cache_tokens, self.executor.num_blocks, config.block_size)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **options: Any) -> "LLMEngine":
        return cls(model_dir, EngineConfig.from_kwargs(**options))

    @property
    def kv_cache_tokens(self) -> int:
        return self.executor.num_blocks * self.engine_config.block_size

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    final_only: bool = False) -> None:
        """Queue a request. With `final_only` step() returns its output once, when it finishes: an incremental
        output copies the request's tokens, text and logprobs so far, O(length) per step, which a caller that
        only keeps the last one (a batch row, a non-streaming HTTP request) should not pay for."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params = params or SamplingParams()
        req = _Request(request_id, list(prompt_token_ids), params, final_only=final_only)
        self._requests[request_id] = req
        try:
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling params must be a glm4.SamplingParams, got {type(params).__name__}")
            params.validate()
            self._check_prompt(req.prompt_token_ids)
        except ValueError as e:
            self._reject(req, str(e))
            return
        for i in range(params.n):
            seq = Sequence(request_id, req.prompt_token_ids, params, index=i, eos_token_ids=self.stop_token_ids)
            if self.tokenizer is not None:
                from glm4.tokenizer import IncrementalDetokenizer

                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            req.seqs.append(seq)
            self.scheduler.add(seq)
            if seq.is_finished:  # the scheduler refused it (e.g. longer than the context or the cache)
                self.scheduler.abort(request_id)
                self._reject(req, seq.error or "request rejected")
                return
        self.num_prompt_tokens += len(req.prompt_token_ids)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in ids):
            bad = next(t for t in ids if not (isinstance(t, int) and 0 <= t < self.model_config.vocab_size))
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.model_config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                             "no room to generate")

    def _reject(self, req: _Request, message: str) -> None:
        req.error = message
        del self._requests[req.request_id]
        self._pending.append(self._output(req))

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; its final output has finish_reason "abort"."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        self._pending.append(self._output(req))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return an output for every request that changed in it, except for requests added
        with `final_only`, which get theirs only when they finish."""
        outputs, self._pending = self._pending, []  # finished at submission (errors) or aborted
        out = self.scheduler.schedule()
        if out.is_empty:
            return outputs
        for e in out.scheduled:  # remember prefix hits now: freeing a finished seq's blocks resets its count
            req = self._requests.get(e.seq.request_id)
            if req is not None and e.seq.num_cached_tokens > req.num_cached_tokens:
                req.num_cached_tokens = e.seq.num_cached_tokens
        sample_rows = [i for i, e in enumerate(out.scheduled) if e.sample]
        try:
            sampled = self._forward_and_sample(out, sample_rows)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is an out-of-memory error
            if not is_recoverable_oom(e):
                raise
            sampled, error = None, oom_message(e, out.num_batched_tokens, len(out.scheduled))
        if sampled is None:  # past the except block: the failed step's tensors went with the exception
            return outputs + self._fail_step(out, error)
        tokens: list[int | None] = [None] * len(out.scheduled)
        logprobs: list[dict[int, float] | None] = [None] * len(out.scheduled)
        for row, i in enumerate(sample_rows):
            tokens[i], logprobs[i] = sampled.token_ids[row], sampled.logprobs[row]
        self.scheduler.postprocess(out, tokens, logprobs)
        touched: dict[str, _Request] = {}
        now = time.monotonic()
        for i in sample_rows:
            seq = out.scheduled[i].seq
            req = self._requests.get(seq.request_id)
            if req is None:
                continue
            self.num_generated_tokens += 1
            req.first_token_time = req.first_token_time or now
            self._detokenize(seq)
            touched[req.request_id] = req
        for req in touched.values():
            finished = req.finished  # a loop over the request's samples: once per request
            if finished or not req.final_only:
                outputs.append(self._output(req))
            if finished:
                del self._requests[req.request_id]
        return outputs

    def _forward_and_sample(self, out: SchedulerOutput, sample_rows: list[int]) -> SamplerOutput:
        logits = self.executor.execute(self.step_inputs.build(out))
        self.step_inputs.commit()  # only after a step that ran: a failed one's updates may not be on the device
        return self.sampler(logits, [out.scheduled[i].seq for i in sample_rows])

    def _fail_step(self, out: SchedulerOutput, error: str) -> list[RequestOutput]:
        """After an out-of-memory error: finish every request with a sequence in the step with `error` and free
        its blocks (nothing of the step reached the prefix cache), so the waiting requests run in later steps."""
        release_cached_memory(self.executor.device)
        failed = []
        for rid in dict.fromkeys(e.seq.request_id for e in out.scheduled):
            req = self._requests.pop(rid, None)
            if req is None:
                continue
            self.scheduler.abort(rid)
            req.error = error
            failed.append(self._output(req))
        logger.error("%s; failed %d request(s), the engine goes on", error, len(failed))
        return failed

    def _detokenize(self, seq: Sequence) -> None:
        if seq.detokenizer is None:
            return
        seq.output_text += seq.detokenizer.step([seq.token_ids[-1]])
        if seq.is_finished:
            seq.output_text += seq.detokenizer.finish()
        stops = seq.params.stop
        if not stops or seq.finish_reason == "error":
            return
        # Only the tail can contain a new match: the last token added at most len(token text) characters.
        window = max(len(s) for s in stops) + 16
        tail_start = max(0, len(seq.output_text) - window)
        hits = [(seq.output_text.find(s, tail_start), s) for s in stops]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if hits:
            pos, s = min(hits)
            seq.output_text = seq.output_text[:pos]  # the stop string is not part of the output
            if seq.is_finished:  # finished by a token rule in the same step: the stop string still wins
                seq.finish_reason, seq.stop_reason = "stop", s
            else:
                self.scheduler.finish_seq(seq, "stop", stop_reason=s)

    def _visible_text(self, seq: Sequence) -> str:
        """Text safe to show while running: withhold a tail that could still become a stop string, so streamed
        text never has to be taken back."""
        if seq.is_finished or not seq.params.stop:
            return seq.output_text
        hold = max(len(s) for s in seq.params.stop) - 1
        return seq.output_text[:max(0, len(seq.output_text) - hold)]

    def _output(self, req: _Request) -> RequestOutput:
        if req.error is not None:
            outs = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="error")
                    for i in range(max(1, req.params.n if isinstance(req.params, SamplingParams) else 1))]
            return RequestOutput(req.request_id, req.prompt_token_ids, outs, finished=True, error=req.error,
                                 arrival_time=req.arrival)
        outs = []
        for seq in req.seqs:
            if not seq.is_finished and req.request_id not in self._requests:
                seq.finish("abort")
            outs.append(CompletionOutput(index=seq.index, text=self._visible_text(seq),
                                         token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason,
                                         stop_reason=seq.stop_reason,
                                         logprobs=list(seq.logprobs) if seq.logprobs is not None else None))
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, finished=req.finished,
                             num_cached_tokens=req.num_cached_tokens, arrival_time=req.arrival,
                             first_token_time=req.first_token_time)

    # ---- status ------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        s = self.scheduler.stats()
        runner = getattr(self.executor, "runner", None)  # in-process rank 0 (not with Ray actors)
        s.update(num_requests=len(self._requests), kv_cache_tokens=self.kv_cache_tokens,
                 num_generated_tokens=self.num_generated_tokens, num_prompt_tokens=self.num_prompt_tokens,
                 cuda_graph_steps=getattr(runner, "graph_steps", 0), eager_steps=getattr(runner, "eager_steps", 0))
        return s

    def check_health(self) -> None:
        self.executor.check_health()

    def shutdown(self) -> None:
        for rid in list(self._requests):
            self.abort(rid)
        self.executor.shutdown()
