"""The persistent batch (vLLM's name): rank-local step state on the model's device that outlives a step.

Today it is the block table: one int32 row per scheduler slot (`Sequence.slot`, 0 .. max_num_seqs-1), as many
columns as the longest sequence can have blocks. Each step applies the few entries rank 0 sent
(`StepInputs.table_updates`, one index_put) and gathers the step's rows (`table[seq_slots, :width]`), so no
per-step work, on the host or in transfers, grows with context length.
"""

from __future__ import annotations

import math

import torch

from glm4.engine.step_inputs import StepInputs
from glm4.layers.attention import AttentionMetadata


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        # Zeros: a row holds its sequence's table padded with 0, the padding AttentionMetadata promises.
        self.block_table = torch.zeros((max_num_seqs, math.ceil(max_model_len / block_size)), dtype=torch.int32,
                                       device=device)

    def prepare(self, inputs: StepInputs) -> tuple[StepInputs, AttentionMetadata]:
        """Apply the step's block-table updates; return the inputs on the device and the attention metadata."""
        step = inputs.to(self.device)  # one copy for every field
        upd = step.table_updates
        if upd.numel():
            self.block_table.index_put_((upd[:, 0], upd[:, 1]), upd[:, 2].to(torch.int32))
        meta = AttentionMetadata(
            slot_mapping=step.slot_mapping,
            # Narrow first, then pick rows: copies S x width entries, never whole max_model_len rows.
            block_tables=self.block_table[:, :inputs.block_table_width].index_select(0, step.seq_slots),
            context_lens=step.context_lens,
            query_lens=inputs.query_lens.tolist(),  # the host copy: no device sync
            context_lens_list=inputs.context_lens.tolist(),
            block_size=self.block_size,
        )
        return step, meta
