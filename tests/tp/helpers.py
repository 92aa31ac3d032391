"""Shared helpers for the tensor-parallel tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

import os
import time

import torch

from glm4.engine.step_inputs import StepInputs


def build_steps(vocab_size: int, block_size: int = 4, num_decode: int = 5, seed: int = 0) -> list[StepInputs]:
    """A fixed engine-like step sequence, built by hand: two prompts prefilled whole, a third prefilled in two
    chunks (the first chunk samples nothing), then decode steps of all three. Token ids are predetermined, so
    every executor sees exactly the same inputs whatever its logits. Each sequence keeps one slot of the persistent
    batch throughout; the first step sends the whole block tables, the later ones no update."""
    g = torch.Generator().manual_seed(seed)
    prompts = {"a": 7, "b": 5, "c": 9}
    total = {k: n + num_decode + 1 for k, n in prompts.items()}
    tokens = {k: torch.randint(0, vocab_size, (n,), generator=g).tolist() for k, n in total.items()}
    # disjoint block tables, deliberately not contiguous
    tables, next_block = {}, 1
    for k in prompts:
        nb = -(-total[k] // block_size)
        tables[k] = [next_block + 2 * i for i in range(nb)]
        next_block += 2 * nb + 1
    schedule = [[("a", 0, 7, True), ("b", 0, 5, True), ("c", 0, 6, False)],
                [("a", 7, 1, True), ("b", 5, 1, True), ("c", 6, 3, True)]]
    pos = {"a": 8, "b": 6, "c": 9}
    for _ in range(num_decode - 1):
        schedule.append([(k, pos[k], 1, True) for k in ("a", "b", "c")])
        pos = {k: v + 1 for k, v in pos.items()}
    seq_slot = {k: i for i, k in enumerate(prompts)}
    steps = []
    for step, entries in enumerate(schedule):
        ids, positions, slots, qlens, clens, seq_slots, updates, rows = [], [], [], [], [], [], [], []
        for k, start, n, sample in entries:
            ids += tokens[k][start:start + n]
            positions += list(range(start, start + n))
            slots += [tables[k][p // block_size] * block_size + p % block_size for p in range(start, start + n)]
            qlens.append(n)
            clens.append(start + n)
            seq_slots.append(seq_slot[k])
            if step == 0:
                for col, block in enumerate(tables[k]):
                    updates += (seq_slot[k], col, block)
            if sample:
                rows.append(len(ids) - 1)
        steps.append(StepInputs.from_lists(ids, positions, slots, qlens, clens, seq_slots, updates, rows, block_size))
    return steps


def blocks_needed(block_size: int = 4) -> int:
    return 64 // block_size * 4


def pid_gone(pid: int) -> bool:
    """True when the process no longer exists or is a zombie (dead, only not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def wait_pids_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Pids still alive after `timeout` seconds (empty list: all gone)."""
    end = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if not pid_gone(p)]
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.05)
