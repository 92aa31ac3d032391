"""Per-request state: one `Sequence` per sample (a request with n=4 is 4 sequences sharing a request_id).

Token bookkeeping (the invariants the block manager, scheduler and model runner rely on):
- `token_ids` = prompt + generated tokens; `len(seq)` is its length.
- `num_computed_tokens`: tokens whose K/V is in the paged cache (prefix-cache hits included). A decoding
  sequence has `num_computed_tokens == len(seq) - 1`: the last sampled token is fed in the next step.
  Chunked prefill advances it by the chunk size each step; preemption resets it to 0 (recompute).
- `num_cached_tokens`: how many of the computed tokens came from the prefix cache at the last allocation.
- `block_table[i]` holds positions i*block_size .. (i+1)*block_size-1; the K/V of position p lives at flat slot
  `block_table[p // block_size] * block_size + p % block_size`.

No torch import: the scheduler imports this module and must stay torch-free.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any, Iterable

from glm4.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


class Sequence:
    """One sample of one request. Owned by the scheduler; the engine reads outputs from it."""

    def __init__(self, request_id: str, prompt_token_ids: Iterable[int], params: SamplingParams, *,
                 index: int = 0, eos_token_ids: Iterable[int] = (), arrival_time: float | None = None):
        self.seq_id: int = next(_seq_counter)
        self.request_id = request_id
        self.index = index  # sample index within the request (0..n-1)
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING

        # The tokenizer's default stop ids (eos_token_ids) apply unless the request names its own
        # stop_token_ids; ignore_eos drops only the defaults, so an explicit stop id always stops.
        if params.stop_token_ids is not None:
            stop = set(params.stop_token_ids)
        elif params.ignore_eos:
            stop = set()
        else:
            stop = set(eos_token_ids)
        self.stop_token_ids: frozenset[int] = frozenset(stop)

        # KV-cache state (block manager / scheduler)
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of token_ids (grows lazily)
        self.num_hashed_blocks = 0  # blocks of block_table already registered in (or checked against) the cache
        self.num_preemptions = 0

        # Results
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.error: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None

        # Row of the persistent batch (0 .. max_num_seqs-1) while RUNNING, None otherwise. The scheduler assigns it
        # when the sequence starts running and takes it back when it stops (finish, abort, preemption); the model
        # runner's device block tables and the sampler's device penalty state are indexed by it, so a step's
        # host work is O(batch), not O(context).
        self.slot: int | None = None

        # Engine hooks for detokenization and streaming (the engine owns their meaning).
        self.detokenizer: Any = None  # e.g. an IncrementalDetokenizer
        self.output_text: str = ""
        self.num_returned_tokens = 0  # generated tokens already sent to the client
        self.returned_text_len = 0  # characters of output_text already sent

    # -- lengths and views -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed through the model before the next sample (1 while decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than one token lacks K/V: the prompt (or a recompute after preemption) is pending."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def min_tokens_reached(self) -> bool:
        return self.num_output_tokens >= self.params.min_tokens

    # -- mutation ----------------------------------------------------------------------------------------
    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)

    def finish(self, reason: str, stop_reason: int | str | None = None, error: str | None = None) -> None:
        """Mark finished. Callers that hold KV blocks must go through Scheduler.finish_seq to free them."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.error = error

    def check_token_stop(self, max_model_len: int) -> bool:
        """Apply the token-based stop rules after appending a token; True if the sequence just finished.

        Order matters: a stop id wins over max_tokens when both happen on the same token (finish_reason "stop"),
        and stop ids only count once min_tokens are generated.
        """
        tok = self.token_ids[-1]
        if tok in self.stop_token_ids and self.min_tokens_reached:
            self.finish("stop", stop_reason=tok)
        elif self.num_output_tokens >= self.params.max_tokens or len(self.token_ids) >= max_model_len:
            self.finish("length")
        return self.is_finished

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}#{self.index}, {self.status.value}, "
                f"len={len(self)}, computed={self.num_computed_tokens}, blocks={self.block_table})")
