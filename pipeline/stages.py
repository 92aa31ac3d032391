"""Ray Data stages of the batch job: validate+tokenize (CPU tasks), engine replicas (actors), postprocess.

Rows travel as Arrow tables. Internal columns start with `__` and are dropped before the write:

    after preprocess   __token_ids list<int32> (null if not tokenized)  __params string (JSON sampling params)
                       __error string (null unless the row is bad)
    prefix order       (optional) rows of a bounded window reordered by their leading token ids
    after the engine   generated_text, finish_reason, num_prompt_tokens, num_generated_tokens,
                       num_cached_tokens (prompt tokens served by the prefix cache), error

Detokenization happens inside the engine (it must, to apply stop strings), so the postprocess stage only shapes
the output schema; the replicas never see text.

A bad row never fails the job: it becomes an error row with a specific message. What does fail the job is a dead
engine (`glm4.engine.async_engine.EngineDeadError`: every later row would fail too) -- it propagates, and a rerun
resumes from the checkpoint. A replica process that dies is restarted by Ray Data and its batches are retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config import StorageOptions
from pipeline.progress import count_error_kinds

STATS_INTERVAL_S = 2.0

logger = logging.getLogger(__name__)

TOKEN_IDS = "__token_ids"
PARAMS = "__params"
ERROR_IN = "__error"
OUTPUT_COLUMNS = (
    "generated_text", "finish_reason", "num_prompt_tokens", "num_generated_tokens", "num_cached_tokens", "error",
)
OUTPUT_TYPES = {
    "generated_text": pa.string(),
    "finish_reason": pa.string(),
    "num_prompt_tokens": pa.int32(),
    "num_generated_tokens": pa.int32(),
    "num_cached_tokens": pa.int32(),
    "error": pa.string(),
}


# --- preprocess: validate + tokenize --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreprocessSpec:
    model: str
    storage: StorageOptions
    model_cache_dir: str
    prompt_column: str | None
    messages_column: str | None
    sampling_params_column: str | None
    default_params: dict[str, Any]
    max_model_len: int | None


_TOKENIZERS: dict[tuple, tuple[Any, int | None]] = {}


def _tokenizer_and_len(model: str, storage: StorageOptions, cache_dir: str, max_model_len: int | None):
    """Per worker process: Ray reuses task workers, so the tokenizer loads once per process, not per batch."""
    key = (model, cache_dir, max_model_len)
    if key not in _TOKENIZERS:
        from glm4 import load_tokenizer

        from pipeline.io import model_max_len, resolve_model_dir

        model_dir = resolve_model_dir(model, storage, cache_dir, weights=False)
        _TOKENIZERS[key] = (load_tokenizer(model_dir), max_model_len or model_max_len(model_dir))
    return _TOKENIZERS[key]


class RowError(ValueError):
    """A problem with one row: it becomes an error row, the job goes on."""


def preprocess_batch(batch: pa.Table, spec: PreprocessSpec) -> pa.Table:
    """Validate and tokenize each row. Never raises for a bad row."""
    tok, max_len = _tokenizer_and_len(spec.model, spec.storage, spec.model_cache_dir, spec.max_model_len)
    source = batch[spec.prompt_column or spec.messages_column].to_pylist()
    overrides = (
        batch[spec.sampling_params_column].to_pylist() if spec.sampling_params_column else [None] * batch.num_rows
    )
    token_ids, params, errors = [], [], []
    for value, override in zip(source, overrides):
        ids = None
        try:
            p = _row_params(spec.default_params, override)
            ids = _tokenize(tok, value, is_chat=spec.messages_column is not None)
            if max_len is not None and len(ids) + 1 > max_len:
                raise RowError(
                    f"prompt too long: {len(ids)} tokens, the model's context is {max_len} tokens "
                    "(no room for one generated token)"
                )
            token_ids.append(ids)
            params.append(json.dumps(p, sort_keys=True))
            errors.append(None)
        except RowError as e:
            token_ids.append(ids)  # kept for error rows that were tokenized (num_prompt_tokens)
            params.append(None)
            errors.append(str(e))
    return (
        batch.append_column(TOKEN_IDS, pa.array(token_ids, pa.list_(pa.int32())))
        .append_column(PARAMS, pa.array(params, pa.string()))
        .append_column(ERROR_IN, pa.array(errors, pa.string()))
    )


def _tokenize(tok, value: Any, *, is_chat: bool) -> list[int]:
    if not is_chat:
        if value is None:
            raise RowError("null prompt")
        if not isinstance(value, str):
            raise RowError(f"prompt must be a string, got {type(value).__name__}")
        if not value.strip():
            raise RowError("empty prompt")
        return tok.encode_prompt(value)
    if value is None:
        raise RowError("null messages")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RowError(f"malformed messages: not valid JSON ({e})") from None
    if isinstance(value, list) and not value:
        raise RowError("malformed messages: empty conversation")
    if isinstance(value, list):
        # Arrow structs come back with every field of the union schema; drop absent (None) optional fields.
        value = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in value]
    try:
        ids = tok.apply_chat_template(value, add_generation_prompt=True)
    except (ValueError, TypeError) as e:
        raise RowError(f"malformed messages: {e}") from None
    if len(ids) <= len(tok.prefix_ids) + 1:  # only [gMASK]<sop><|assistant|>: every message was empty
        raise RowError("malformed messages: no message has content")
    return ids


def _row_params(defaults: dict[str, Any], override: Any) -> dict[str, Any]:
    """The job's default SamplingParams kwargs updated with a row's override (a dict, JSON text or struct; nulls
    mean "use the default"). The override may use OpenAI request names as well as SamplingParams' (mapped by
    `pipeline.openai_requests.sampling_kwargs_from_openai`, the mapping the Serve endpoint uses): `max_completion_tokens`,
    `stop` as a string, chat's `logprobs: true` + `top_logprobs`; `logit_bias` only empty; `stream: true` refused."""
    from pipeline.openai_requests import FieldError, sampling_kwargs_from_openai, validate_sampling_kwargs

    p = dict(defaults)
    if override is not None:
        if isinstance(override, str):
            try:
                override = json.loads(override) if override.strip() else {}
            except ValueError as e:
                raise RowError(f"invalid sampling params: not valid JSON ({e})") from None
        if not isinstance(override, dict):
            raise RowError(f"invalid sampling params: expected an object, got {type(override).__name__}")
        try:
            p.update(sampling_kwargs_from_openai(override))
        except FieldError as e:
            raise RowError(f"invalid sampling params: {e}") from None
    if p.get("n", 1) != 1:
        raise RowError("invalid sampling params: n must be 1 in batch jobs (one generated_text per row)")
    try:
        validate_sampling_kwargs(p)
    except FieldError as e:
        raise RowError(f"invalid sampling params: {e}") from None
    return p


# --- prefix-aware order -----------------------------------------------------------------------------------------------
def prefix_order(batch: pa.Table, prefix_tokens: int) -> pa.Table:
    """The rows of one window in trie order of their first `prefix_tokens` token ids.

    Rows sharing any leading run of tokens become neighbours, so they travel in the same engine batches and the
    replica's prefix cache computes the shared part once. Runs on a bounded window (Ray Data hands this stage
    `prefix_window_rows` rows at a time): no global sort, no barrier, and no block larger than the window however
    skewed the prefixes are. Stable, so equal prefixes keep their input order; untokenized (error) rows go last.
    """
    if batch.num_rows < 2:
        return batch
    ids = batch[TOKEN_IDS].to_pylist()
    missing = (1 << 31,)  # sorts after every real token id
    order = sorted(range(len(ids)), key=lambda i: tuple(ids[i][:prefix_tokens]) if ids[i] is not None else missing)
    return batch.take(pa.array(order, pa.int64()))


# --- engine replicas ------------------------------------------------------------------------------------------------
@dataclass
class RowResult:
    text: str | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int | None = None
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None


def to_row_result(out: Any) -> RowResult:
    """A finished `glm4.RequestOutput` as a row result (a request the engine refused becomes an error row)."""
    if out.error:
        return RowResult(num_prompt_tokens=out.num_prompt_tokens, finish_reason="error",
                         error=f"engine error: {out.error}")
    return RowResult(
        text=out.text,
        finish_reason=out.finish_reason,
        num_prompt_tokens=out.num_prompt_tokens,
        num_generated_tokens=out.num_generated_tokens,
        num_cached_tokens=out.num_cached_tokens,
    )


@dataclass(frozen=True)
class EngineSpec:
    model: str
    storage: StorageOptions
    model_cache_dir: str
    llm_kwargs: dict[str, Any]
    torch_threads: int | None = None
    tracker: Any = None  # ProgressTracker actor handle (optional)
    max_engine_restarts: int = 3  # dead engines replaced by restarting the replica process, per job


class EngineReplica:
    """One engine replica per Ray Data actor.

    `__call__` is async: Ray Data keeps several batches in flight per actor (async UDF concurrency plus
    `max_concurrent_calls_per_actor`), and every row of every in-flight batch is a request of the same
    `glm4.AsyncLLMEngine`. The engine's continuous batching therefore mixes rows across batches: a batch with
    one long row holds only that row's sequence slot, never the replica. A replica process that dies is
    restarted by Ray Data and its batches are retried. An engine that dies inside a live process
    (`EngineDeadError`, e.g. a killed tensor-parallel worker) would fail every later row, so the replica exits
    its process to be replaced the same way -- at most `max_engine_restarts` times per job (counted by the
    tracker actor), after which the error propagates and the job fails cleanly instead of looping on a batch
    that kills every engine.
    """

    def __init__(self, spec: EngineSpec):
        from pipeline.io import is_s3, resolve_model_dir

        self.tracker = spec.tracker
        self.replica_id = f"{os.uname().nodename}:{os.getpid()}"
        self._placement = _placement_info()
        if spec.torch_threads:
            import torch

            torch.set_num_threads(spec.torch_threads)
        self._phase("model download" if is_s3(spec.model) else "model check")
        model_dir = resolve_model_dir(spec.model, spec.storage, spec.model_cache_dir)
        self._phase("engine start (weights, KV cache, kernels)")
        import glm4

        t0 = time.perf_counter()
        self.engine = glm4.AsyncLLMEngine.from_pretrained(str(model_dir), **spec.llm_kwargs)
        self._params_cls = glm4.SamplingParams
        from glm4.engine.async_engine import EngineDeadError

        self._engine_dead = EngineDeadError
        self.max_engine_restarts = spec.max_engine_restarts
        self.max_num_seqs = int(spec.llm_kwargs.get("max_num_seqs", 256))
        self._reporter: asyncio.Task | None = None
        self._phase("ready")
        logger.info("replica %s loaded %s in %.1fs", self.replica_id, spec.model, time.perf_counter() - t0)

    def _phase(self, name: str) -> None:
        if self.tracker is not None:
            self.tracker.replica_phase.remote(self.replica_id, name, self._placement)

    def _report_stats(self) -> None:
        if self.tracker is not None:
            stats = {**_scalar_stats(self.engine.stats()), **self._placement, "max_num_seqs": self.max_num_seqs}
            self.tracker.replica_stats.remote(self.replica_id, stats)

    async def _report_loop(self) -> None:
        """Engine occupancy every few seconds while the replica lives (batches finish too rarely to sample it)."""
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            self._report_stats()

    async def _generate(self, prompt: list[int], params: Any) -> RowResult:
        final = None
        async for out in self.engine.generate(prompt, params, final_only=True):  # one output per row
            final = out
        return to_row_result(final)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._reporter is None and self.tracker is not None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())
        n = batch.num_rows
        errors = batch[ERROR_IN].to_pylist()
        prompts = batch[TOKEN_IDS].to_pylist()
        params = batch[PARAMS].to_pylist()
        todo = [i for i in range(n) if errors[i] is None]
        try:
            done = await asyncio.gather(
                *(self._generate(prompts[i], self._params_cls(**json.loads(params[i]))) for i in todo)
            )
        except self._engine_dead as e:
            await self._replace_dead_engine(e)
            raise
        results: list[RowResult] = [
            RowResult(
                num_prompt_tokens=len(prompts[i]) if prompts[i] is not None else None,
                finish_reason="error",
                error=errors[i],
            )
            for i in range(n)
        ]
        for i, r in zip(todo, done):
            results[i] = r
        if self.tracker is not None:
            # Reported here rather than at the write: the writer buffers rows_per_file rows per file, which
            # would make the console sit at 0 rows for a long time.
            self.tracker.add.remote(
                n,
                sum(r.error is not None for r in results),
                sum(r.num_prompt_tokens or 0 for r in results),
                sum(r.num_generated_tokens for r in results),
                count_error_kinds(r.error for r in results),
            )
            self._report_stats()
        return add_result_columns(batch, results)

    async def _replace_dead_engine(self, error: BaseException) -> None:
        """Exit the process (Ray Data restarts the actor and retries its batches) while the job's budget of engine
        restarts lasts; past it, return so the caller re-raises and the job fails cleanly."""
        deaths = self.max_engine_restarts + 1
        if self.tracker is not None:
            try:
                deaths = await asyncio.wait_for(self.tracker.engine_died.remote(self.replica_id, repr(error)), 10)
            except Exception:  # tracker unreachable: don't restart blindly
                pass
        if deaths <= self.max_engine_restarts:
            logger.error("replica %s: engine died (%r); exiting so Ray Data replaces this replica "
                         "(engine restart %d of at most %d)", self.replica_id, error, deaths, self.max_engine_restarts)
            for h in logging.getLogger().handlers:
                h.flush()
            os._exit(1)
        logger.error("replica %s: engine died (%r) and the job's %d engine restart(s) are used up; failing the job",
                     self.replica_id, error, self.max_engine_restarts)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown(timeout=5.0)
            except Exception:  # interpreter shutdown: nothing left to clean up
                pass


def _placement_info() -> dict[str, Any]:
    """Where this replica runs and what Ray gave it (reported with its stats, kept in the manifest)."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        pg = ctx.get_placement_group_id()
        return {"node_id": ctx.get_node_id(), "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
                "placement_group": pg or ""}
    except Exception:  # not in a Ray worker (unit tests call the class directly)
        return {}


def _scalar_stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}


def add_result_columns(batch: pa.Table, results: list[RowResult]) -> pa.Table:
    cols = {
        "generated_text": [r.text for r in results],
        "finish_reason": [r.finish_reason for r in results],
        "num_prompt_tokens": [r.num_prompt_tokens for r in results],
        "num_generated_tokens": [r.num_generated_tokens for r in results],
        "num_cached_tokens": [r.num_cached_tokens for r in results],
        "error": [r.error for r in results],
    }
    for name, values in cols.items():
        batch = batch.append_column(name, pa.array(values, OUTPUT_TYPES[name]))
    return batch


# --- postprocess ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PostprocessSpec:
    id_column: str
    carry_columns: tuple[str, ...]


def postprocess_batch(batch: pa.Table, spec: PostprocessSpec) -> pa.Table:
    """The output schema: id, carried input columns, result columns (internal `__` columns dropped)."""
    keep = [spec.id_column] + [c for c in spec.carry_columns if c != spec.id_column] + list(OUTPUT_COLUMNS)
    return batch.select(keep)
