"""Iteration-level scheduler: continuous batching over a paged KV cache. Pure Python (no torch).

Each `schedule()` builds ONE model step under a token budget (`max_num_batched_tokens`):
1. running sequences that decode (1 token each) first, so ongoing streams never stall behind prompts;
2. running sequences in the middle of a chunked prefill, each taking as much of the remaining budget as it needs;
3. waiting sequences, admitted while the budget, `max_num_seqs` and free blocks allow, ordered by policy:
   `lpm` (longest cached-prefix match first, like SGLang; plain FCFS once the queue exceeds `lpm_max_queue`,
   which bounds the sorting cost) or `fcfs`. Preempted sequences always go first.
When a running sequence needs a block and none is free, the most recently admitted running sequence is preempted
(recompute: its blocks are freed, its tokens kept, it goes back to the front of the queue). No new sequence is
admitted in a step that preempted. The oldest running sequence is therefore never a victim while others run, and
`add` rejects any request that could not fit in the whole cache alone, so the engine always makes progress.

Slots: a sequence that starts running takes a free slot in [0, max_num_seqs) (`Sequence.slot`: its row in the
model runner's persistent batch) and gives it back when it stops running (finish, abort, preemption); O(1) each.

Shared prefixes: a waiting sequence whose next uncached full block is being computed right now by a running
prefill (the other samples of an n>1 request, or prompts with a common system prompt) waits a step and then hits
the prefix cache instead of computing the same K/V twice.

Engine loop:
    scheduler.add(seq)                       # seq.is_finished afterwards -> rejected, seq.error says why
    out = scheduler.schedule()               # SchedulerOutput: what the model runs this step
    ... model runner: tokens seq.token_ids[e.start_pos : e.start_pos + e.num_new_tokens] for e in out.scheduled,
        sampling one token for every entry with e.sample ...
    finished = scheduler.postprocess(out, sampled_token_ids)   # one id (or None if not e.sample) per entry
    scheduler.finish_seq(seq, "stop", stop_reason=stop_string) # stop strings found by the detokenizer
    scheduler.abort(request_id)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence as Seq

from glm4.engine.block_manager import BlockManager
from glm4.engine.sequence import Sequence, SequenceStatus

POLICIES = ("lpm", "fcfs")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start_pos: int  # seq.num_computed_tokens before this step: new tokens are positions start_pos.. +num_new_tokens-1
    is_prefill: bool  # more than one token was pending (prompt or recompute); False for a 1-token decode step
    sample: bool  # the chunk reaches the end of seq.token_ids, so its last row's logits are sampled


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefill chunks
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return [e.seq for e in self.scheduled]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, *, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_prefix_caching: bool = True, policy: str = "lpm",
                 lpm_max_queue: int = 1024):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 2:
            raise ValueError("need max_num_seqs >= 1, max_num_batched_tokens >= 1 and max_model_len >= 2, got "
                             f"{max_num_seqs}, {max_num_batched_tokens}, {max_model_len}")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        # lpm sorts the queue only up to this length (beyond it: FCFS); it also caps how many waiting sequences
        # one step examines, so a long queue of deferred sequences cannot make schedule() slow.
        self.lpm_max_queue = lpm_max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; the last one is the preemption victim
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))  # a stack: pop() hands out slot 0 first
        self._requests: dict[str, list[Sequence]] = {}  # unfinished seqs per request id
        self.num_preemptions = 0
        self.num_prefill_tokens = 0
        self.num_decode_tokens = 0
        self.num_steps = 0

    # -- requests ----------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence, or finish it at once with finish_reason "error" if it can never run."""
        error = self._check_fits(seq)
        if error is not None:
            seq.finish("error", error=error)
            return
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._requests.setdefault(seq.request_id, []).append(seq)

    def _check_fits(self, seq: Sequence) -> str | None:
        n = len(seq)
        if n == 0:
            return "prompt is empty"
        if n >= self.max_model_len:
            return f"prompt has {n} tokens but max_model_len is {self.max_model_len}: no room to generate"
        # The last sampled token is never fed back, so K/V is stored for at most final_len - 1 tokens.
        final_len = min(n + seq.params.max_tokens, self.max_model_len)
        bm = self.block_manager
        if bm.blocks_for_tokens(final_len - 1) > bm.num_blocks:
            return (f"request needs KV cache for up to {final_len - 1} tokens (prompt {n} + max_tokens "
                    f"{seq.params.max_tokens}) but the whole cache holds {bm.num_blocks * bm.block_size}; "
                    "lower max_tokens or give the KV cache more memory")
        return None

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sample of the request with "abort" and free its blocks."""
        seqs = list(self._requests.get(request_id, ()))
        for seq in seqs:
            self.finish_seq(seq, "abort")
        return seqs

    def finish_seq(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish a waiting or running sequence (stop string, abort) and free its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release_slot(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.finish(reason, stop_reason=stop_reason)
        self._forget(seq)

    def _forget(self, seq: Sequence) -> None:
        seqs = self._requests.get(seq.request_id)
        if seqs is not None and seq in seqs:
            seqs.remove(seq)
            if not seqs:
                del self._requests[seq.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling --------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: dict[int, ScheduledSeq] = {}  # seq_id -> entry; insertion order is the batch order
        preempted: list[Sequence] = []

        decodes = [s for s in self.running if not s.is_prefill]
        prefills = [s for s in self.running if s.is_prefill]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted as a victim earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim.seq_id in scheduled:  # undo its place in this step
                    budget += scheduled.pop(victim.seq_id).num_new_tokens
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                bm.append_slot(seq, n)
                scheduled[seq.seq_id] = self._entry(seq, n)
                budget -= n

        # Admitting after a preemption would just thrash: the victims need those blocks back first.
        if not preempted:
            budget = self._admit(budget, scheduled)

        out = SchedulerOutput(list(scheduled.values()), self.max_num_batched_tokens - budget, preempted)
        self.num_steps += 1
        for e in out.scheduled:
            if e.is_prefill:
                self.num_prefill_tokens += e.num_new_tokens
            else:
                self.num_decode_tokens += e.num_new_tokens
        return out

    def _admit(self, budget: int, scheduled: dict[int, ScheduledSeq]) -> int:
        bm = self.block_manager
        if not self.waiting or budget == 0 or len(self.running) >= self.max_num_seqs:
            return budget  # no room: skip the lpm sort, which costs O(queue * prompt blocks)
        self._order_waiting()
        caching = bm.enable_prefix_caching
        in_flight = self._in_flight_hashes() if caching else set()
        deferred: list[Sequence] = []
        scanned = 0
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and scanned < self.lpm_max_queue):
            seq = self.waiting.popleft()
            scanned += 1
            cached = bm.get_num_cached_prefix_tokens(seq)
            if in_flight and self._next_block_in_flight(seq, cached, in_flight):
                deferred.append(seq)
                continue
            n = min(len(seq) - cached, budget)
            if not bm.can_allocate(seq, n):
                self.waiting.appendleft(seq)
                break
            bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            seq.slot = self._free_slots.pop()  # one is free: fewer than max_num_seqs are running
            self.running.append(seq)
            scheduled[seq.seq_id] = ScheduledSeq(seq, n, seq.num_computed_tokens, True, n == len(seq) - cached)
            budget -= n
            if caching:
                in_flight.update(bm.block_hashes(seq)[cached // self.block_size:])
        self.waiting.extendleft(reversed(deferred))
        return budget

    def _entry(self, seq: Sequence, n: int) -> ScheduledSeq:
        return ScheduledSeq(seq, n, seq.num_computed_tokens, seq.is_prefill, n == seq.num_uncomputed_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_slot(seq)
        self.block_manager.free(seq)  # also resets num_computed_tokens: the whole sequence is recomputed
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release_slot(self, seq: Sequence) -> None:
        self._free_slots.append(seq.slot)
        seq.slot = None

    def _order_waiting(self) -> None:
        if (self.policy != "lpm" or not self.block_manager.enable_prefix_caching
                or not 1 < len(self.waiting) <= self.lpm_max_queue):
            return
        bm = self.block_manager
        # Stable sort: FCFS among equal keys; preempted sequences first so they cannot starve.
        order = sorted(self.waiting, key=lambda s: (s.num_preemptions == 0, -bm.get_num_cached_prefix_tokens(s)))
        self.waiting = deque(order)

    def _in_flight_hashes(self) -> set[int]:
        """Hashes of full blocks that running prefills have yet to compute (registered when computed)."""
        out: set[int] = set()
        for seq in self.running:
            if seq.is_prefill:
                out.update(self.block_manager.block_hashes(seq)[seq.num_computed_tokens // self.block_size:])
        return out

    def _next_block_in_flight(self, seq: Sequence, cached: int, in_flight: set[int]) -> bool:
        b = cached // self.block_size
        # Only blocks a later allocation could hit count: a hit never covers the last token (see BlockManager).
        if (b + 1) * self.block_size > len(seq) - 1:
            return False
        return self.block_manager.block_hashes(seq)[b] in in_flight

    # -- after the model step ----------------------------------------------------------------------------
    def postprocess(self, out: SchedulerOutput, sampled_token_ids: Seq[int | None],
                    logprobs: Seq[dict[int, float] | None] | None = None) -> list[Sequence]:
        """Advance computed counts, register full blocks, append sampled tokens, apply token stop rules.

        `sampled_token_ids[i]` belongs to `out.scheduled[i]` (None where the entry did not sample).
        Returns the sequences that finished in this step (their blocks are already freed).
        """
        assert len(sampled_token_ids) == len(out.scheduled), "one sampled id (or None) per scheduled entry"
        finished = []
        for i, (entry, token) in enumerate(zip(out.scheduled, sampled_token_ids)):
            seq = entry.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted while the step ran
                continue
            seq.num_computed_tokens += entry.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if not entry.sample:
                continue
            assert token is not None, f"{seq} was scheduled to sample but got no token"
            seq.append_token(int(token), logprobs[i] if logprobs is not None else None)
            if seq.check_token_stop(self.max_model_len):
                self.running.remove(seq)
                self._release_slot(seq)
                self.block_manager.free(seq)
                self._forget(seq)
                finished.append(seq)
        return finished

    def stats(self) -> dict[str, float]:
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                "num_preemptions": self.num_preemptions, "num_steps": self.num_steps,
                "num_prefill_tokens": self.num_prefill_tokens, "num_decode_tokens": self.num_decode_tokens,
                **self.block_manager.stats()}
