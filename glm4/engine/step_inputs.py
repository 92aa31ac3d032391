"""One model step's inputs as ONE int64 tensor, built on rank 0 from the scheduler's decisions.

The body holds, back to back: input_ids, positions and slot_mapping (one entry per token), query_lens,
context_lens and the sequences' persistent-batch slots (one per sequence), the block-table updates as
(slot, column, block_id) triplets, and the rows whose logits are sampled. With tensor parallelism rank 0
broadcasts a fixed-size header plus this body (two collectives per step, no pickling); every rank applies the
same updates to its own persistent block table (glm4/engine/input_batch.py).

Host work per step is O(tokens + batch): the block tables are not sent whole every step. `StepInputsBuilder`
mirrors what each slot of the device table holds and sends only the entries that changed: a decoding sequence
adds 0 or 1 blocks per step; a sequence that (re)takes a slot (admission with prefix-cache hits, a return after
preemption) sends its table once, plus zeros over whatever the slot's previous owner left beyond it, so every
row of the device table is the owner's block table padded with 0.
"""

from __future__ import annotations

import torch

from glm4.engine.scheduler import SchedulerOutput

HEADER_LEN = 6  # op, num_tokens, num_seqs, block_table_width, num_logits, num_table_updates
OP_STEP, OP_SHUTDOWN = 1, 0


class StepInputs:
    """Views of one int64 body (see the module docstring for the layout); `to(device)` moves it in one copy."""

    def __init__(self, body: torch.Tensor, num_tokens: int, num_seqs: int, block_table_width: int,
                 num_logits: int, num_updates: int) -> None:
        self.body = body
        self.sizes = (num_tokens, num_seqs, block_table_width, num_logits, num_updates)
        t, s, u = num_tokens, num_seqs, num_updates
        parts = body.split([t, t, t, s, s, s, 3 * u, num_logits])
        self.input_ids, self.positions, self.slot_mapping = parts[0], parts[1], parts[2]  # (T,)
        self.query_lens, self.context_lens, self.seq_slots = parts[3], parts[4], parts[5]  # (S,)
        self.table_updates = parts[6].view(u, 3)  # (U, 3): slot, column, block id
        self.logits_indices = parts[7]  # (L,) rows of the flattened batch whose logits are sampled
        # Columns of the block tables this step reads: enough blocks for the longest context.
        self.block_table_width = block_table_width

    @classmethod
    def from_lists(cls, input_ids: list[int], positions: list[int], slot_mapping: list[int], query_lens: list[int],
                   context_lens: list[int], seq_slots: list[int], table_updates: list[int],
                   logits_indices: list[int], block_size: int) -> "StepInputs":
        """`table_updates` flat: slot, column, block id, slot, column, ... One tensor for every field (creating a
        tensor costs ~5 us each)."""
        width = max((-(-c // block_size) for c in context_lens), default=0)
        body = torch.tensor(input_ids + positions + slot_mapping + query_lens + context_lens + seq_slots
                            + table_updates + logits_indices, dtype=torch.long)
        return cls(body, len(input_ids), len(query_lens), width, len(logits_indices), len(table_updates) // 3)

    def to(self, device: torch.device) -> "StepInputs":
        return StepInputs(self.body.to(device, non_blocking=True), *self.sizes)

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (header, body): fixed-size header with the sizes, then every field in one int64 tensor."""
        return torch.tensor([OP_STEP, *self.sizes], dtype=torch.long), self.body

    @classmethod
    def unpack(cls, header: torch.Tensor, body: torch.Tensor) -> "StepInputs":
        _, *sizes = (int(x) for x in header.tolist())
        return cls(body, *sizes)

    @staticmethod
    def body_numel(header: torch.Tensor) -> int:
        _, t, s, _, n_logits, u = (int(x) for x in header.tolist())
        return 3 * t + 3 * s + 3 * u + n_logits


class StepInputsBuilder:
    """Rank 0's mirror of the persistent block table: builds each step's inputs with only the changed entries.

    Call `commit()` once the executor ran the step without error; until then the mirror keeps its previous state,
    so after a failed step the next one sends those entries again (an update is idempotent).
    """

    def __init__(self, max_num_seqs: int, block_size: int) -> None:
        self.block_size = block_size
        # Per slot: whose table the device row holds ((seq_id, num_preemptions): a preempted sequence comes back
        # with new blocks), how many of its entries are there, and how many columns may be non-zero.
        self._owner: list[tuple[int, int] | None] = [None] * max_num_seqs
        self._synced = [0] * max_num_seqs
        # Grows as soon as an update is sent (a step that failed may still have written it), shrinks on commit.
        self._dirty = [0] * max_num_seqs
        self._pending: list[tuple[int, tuple[int, int], int, bool]] = []  # slot, owner, synced, cleared

    def build(self, out: SchedulerOutput) -> StepInputs:
        """The step's inputs: O(tokens + batch) host work, plus a table once per sequence that (re)took a slot."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_mapping: list[int] = []
        qlens: list[int] = []
        clens: list[int] = []
        slots: list[int] = []
        updates: list[int] = []
        logits_rows: list[int] = []
        pending = self._pending = []
        for e in out.scheduled:
            seq, start, n = e.seq, e.start_pos, e.num_new_tokens
            table, slot = seq.block_table, seq.slot
            assert slot is not None, f"{seq} is scheduled without a slot"
            if n == 1:  # decode: the common case, without the per-token generator below
                ids.append(seq.token_ids[start])
                pos.append(start)
                slot_mapping.append(table[start // bs] * bs + start % bs)
            else:
                ids.extend(seq.token_ids[start:start + n])
                pos.extend(range(start, start + n))
                slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            qlens.append(n)
            clens.append(start + n)
            slots.append(slot)
            if e.sample:
                logits_rows.append(len(ids) - 1)  # the chunk's last row predicts the next token
            key = (seq.seq_id, seq.num_preemptions)
            new_owner = self._owner[slot] != key
            synced = 0 if new_owner else self._synced[slot]
            if synced != len(table):
                for col in range(synced, len(table)):
                    updates += (slot, col, table[col])
                if new_owner:  # clear what earlier owners left beyond this table
                    for col in range(len(table), self._dirty[slot]):
                        updates += (slot, col, 0)
                self._dirty[slot] = max(self._dirty[slot], len(table))
                pending.append((slot, key, len(table), new_owner))
        return StepInputs.from_lists(ids, pos, slot_mapping, qlens, clens, slots, updates, logits_rows, bs)

    def commit(self) -> None:
        """The last built step ran: the device table now holds its updates."""
        for slot, key, synced, cleared in self._pending:
            self._owner[slot], self._synced[slot] = key, synced
            if cleared:
                self._dirty[slot] = synced
        self._pending = []
