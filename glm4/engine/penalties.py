"""Repetition / presence / frequency penalties from per-slot token statistics kept on the logits' device.

vLLM's definitions: repetition_penalty r divides a seen token's positive logit by r and multiplies a negative one
by r, "seen" meaning in the prompt or the output; frequency f and presence p subtract f * count + p * (count > 0),
counting the output only (OpenAI's).

State per slot of the persistent batch (`Sequence.slot`, unique among running sequences):
- `ids[slot, :num]`: the distinct tokens of prompt + output in order of first appearance; entries past `num` point
  at a scratch column of the sampler's workspace, so fixed-width reads and writes need no mask;
- `counts[slot, :num]`: how often each occurs in the output.
A step gathers, penalises and scatters back the first `width` (the batch's largest `num`, + 1) entries of its
penalised rows, then appends each sampled token (a compare over those entries tells whether it is new): device work
O(batch x distinct tokens), host work O(batch), no token list read. A slot is rebuilt from its sequence's tokens
(O(length), once) only when the statistics do not describe that sequence at its current length: another sequence
held the slot, the sequence comes back from preemption to a slot someone else used, a sampled token was never
appended (aborted mid-step), or the step failed before its tokens came back. The host knows each slot's `num`
exactly: it comes back with the sampled ids.
Allocated on first use; the width grows (doubling) with the most distinct tokens a slot holds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from glm4.engine.sequence import Sequence


def has_penalty(s: Sequence) -> bool:
    p = s.params
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def distinct_tokens(s: Sequence) -> tuple[list[int], list[int]]:
    """(distinct tokens of prompt + output in order of first appearance, their counts in the output)."""
    out = Counter(s.output_token_ids)
    ids = list(dict.fromkeys(s.token_ids))
    return ids, [out.get(t, 0) for t in ids]


@dataclass
class PenaltyStep:
    """One step's penalised rows: positions in the batch, their slots and parameters."""
    rows: torch.Tensor  # [P] rows of the workspace
    slots: torch.Tensor  # [P]
    num: torch.Tensor  # [P] distinct tokens per slot before this step
    width: int  # entries read per row
    params: torch.Tensor  # [P, 3]: repetition, frequency, presence
    any_repetition: bool  # some row has a repetition penalty (each half of `apply` is skipped when none has it)
    any_counted: bool  # some row has a frequency or presence penalty


class PenaltyState:
    """The per-slot statistics (see the module docstring) and the host's record of what each slot describes."""

    def __init__(self, max_num_seqs: int):
        self.max_num_seqs = max_num_seqs
        self.ids: torch.Tensor | None = None  # [max_num_seqs, width] int64
        self.counts: torch.Tensor | None = None  # [max_num_seqs, width] float32
        self.scratch = -1
        self._owner: list[tuple[int, int] | None] = [None] * max_num_seqs  # (seq_id, len) the stats describe
        self._num = [0] * max_num_seqs

    def prepare(self, seqs: list[Sequence], rows: list[int], scratch: int, device: torch.device) -> PenaltyStep:
        """Bring the slots of seqs[rows] up to date (rebuilding those that changed hands); scratch: a workspace
        column that is never sampled."""
        slots = [seqs[i].slot for i in rows]
        assert all(s is not None and 0 <= s < self.max_num_seqs for s in slots), \
            f"penalised sequences need a slot in [0, {self.max_num_seqs}) from the scheduler, got {slots}"
        assert len(set(slots)) == len(slots), f"two sequences share a slot: {slots}"
        stale = [(slot, seqs[i]) for i, slot in zip(rows, slots)
                 if self._owner[slot] != (seqs[i].seq_id, len(seqs[i]))]
        rebuilt = [(slot, *distinct_tokens(s)) for slot, s in stale]
        for slot, ids, _ in rebuilt:
            self._num[slot] = len(ids)
        for slot in slots:  # until `commit`: a step that fails after `record` leaves its slots to be rebuilt
            self._owner[slot] = None
        nums = [self._num[s] for s in slots]
        self._reserve(max(nums) + 1, scratch, device)  # room to append this step's token
        if rebuilt:
            self._write(rebuilt, device)
        params = [(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in (seqs[i].params for i in rows)]
        index = torch.tensor([rows, slots, nums], device=device)
        return PenaltyStep(rows=index[0], slots=index[1], num=index[2], width=max(nums) + 1,
                           params=torch.tensor(params, dtype=torch.float32, device=device),
                           any_repetition=any(r != 1 for r, _, _ in params),
                           any_counted=any(f != 0 or p != 0 for _, f, p in params))

    def _reserve(self, width: int, scratch: int, device: torch.device) -> None:
        if self.ids is not None:
            assert scratch == self.scratch and self.ids.device == device, "the vocabulary or device changed"
            if self.ids.shape[1] >= width:
                return
        old = self.ids.shape[1] if self.ids is not None else 0
        new = max(width, 2 * old, 256)
        ids = torch.full((self.max_num_seqs, new), scratch, dtype=torch.long, device=device)
        counts = torch.zeros((self.max_num_seqs, new), device=device)
        if self.ids is not None:
            ids[:, :old] = self.ids
            counts[:, :old] = self.counts
        self.ids, self.counts, self.scratch = ids, counts, scratch

    def _write(self, rebuilt: list[tuple[int, list[int], list[int]]], device: torch.device) -> None:
        width = max(len(ids) for _, ids, _ in rebuilt)
        ids = [i + [self.scratch] * (width - len(i)) for _, i, _ in rebuilt]
        counts = [c + [0] * (width - len(c)) for _, _, c in rebuilt]
        slots = torch.tensor([s for s, _, _ in rebuilt], device=device)
        self.ids[slots, :width] = torch.tensor(ids, dtype=torch.long, device=device)
        self.ids[slots, width:] = self.scratch
        self.counts[slots, :width] = torch.tensor(counts, dtype=torch.float32, device=device)
        self.counts[slots, width:] = 0.0

    def apply(self, logits: torch.Tensor, step: PenaltyStep, scale: torch.Tensor) -> None:
        """In place on the contiguous workspace [n, Vp], which holds the logits times scale [n, 1] (> 0: the
        sampler applies 1 / temperature while copying): only the seen tokens of the penalised rows change. A
        positive scale keeps the sign, so the repetition rule commutes with it; the subtractions are scaled."""
        ids = self.ids[step.slots, :step.width]
        flat = (step.rows.unsqueeze(1) * logits.shape[1] + ids).view(-1)  # padding entries: the scratch column
        g = logits.view(-1).index_select(0, flat).view(ids.shape)  # index_select / index_copy_: ~2x take / put_
        rep, freq, pres = step.params.unsqueeze(2).unbind(1)
        if step.any_repetition:
            g = g * torch.where(g > 0, 1.0 / rep, rep)
        if step.any_counted:
            counts = self.counts[step.slots, :step.width]
            g = torch.addcmul(g, scale[step.rows], torch.addcmul(pres * (counts > 0), freq, counts), value=-1.0)
        logits.view(-1).index_copy_(0, flat, g.view(-1))  # duplicates only at the scratch column, all -inf

    def record(self, step: PenaltyStep, sampled: torch.Tensor) -> torch.Tensor:
        """Count each penalised row's sampled token (device only); returns the rows' new distinct-token counts."""
        new = sampled[step.rows]
        hit = self.ids[step.slots, :step.width] == new.unsqueeze(1)
        seen = hit.any(dim=1)
        pos = torch.where(seen, hit.int().argmax(dim=1), step.num)
        self.ids[step.slots, pos] = new
        self.counts[step.slots, pos] += 1.0
        return step.num + (~seen).long()

    def commit(self, seqs: list[Sequence], rows: list[int], nums: list[int]) -> None:
        """After the transfer: the slots now describe seqs[rows] with the sampled token appended."""
        for i, num in zip(rows, nums):
            s = seqs[i]
            self._owner[s.slot] = (s.seq_id, len(s) + 1)
            self._num[s.slot] = num
