"""Counter-based uniforms for sampling: one U[0, 1) per sampled row per step, a pure function of (key, counter).

A seeded sequence draws with key = (seed + sample index) mod 2**64 (vLLM's n > 1 rule) and counter = the number
of tokens it has generated so far. Its k-th uniform depends on its seed and k only, so its k-th token depends on
that and its logits: not on the other rows of the batch or their order, not on how many steps it waited or was
preempted; the same seed gives the same tokens run after run. Unseeded rows draw from the sampler's stream:
key = a hash of the engine seed plus the step number, counter = the row (engine seed None: a random stream).

The hash is SplitMix64's finaliser, applied to the key and again to (mixed key + counter * golden ratio), i.e.
SplitMix64's output number `counter` for the seed `mix(key)`; its top 24 bits become a float32 in [0, 1). Computed
in numpy on the host (uint64 arithmetic wraps by definition), O(batch) per step, the same numbers on every device.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from glm4.engine.sequence import Sequence

_MASK64 = 2**64 - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM_TAG = 0x5EED5EED5EED5EED  # keeps the unseeded stream's keys apart from small seeds


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (a bijection with full avalanche)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(keys: list[int], counters: list[int]) -> np.ndarray:
    """float32 U[0, 1) for each (key, counter) pair; keys and counters are ints in [0, 2**64)."""
    k = mix64(np.array(keys, dtype=np.uint64))
    z = mix64(k + np.array(counters, dtype=np.uint64) * _GOLDEN)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


class CounterUniforms:
    """The sampler's source of one uniform per sampled row."""

    def __init__(self, seed: int | None):
        base = secrets.randbits(64) if seed is None else seed & _MASK64
        self._stream = int(mix64(np.array([base ^ _STREAM_TAG], dtype=np.uint64))[0])
        self._step = 0

    def __call__(self, seqs: list[Sequence], device: torch.device) -> torch.Tensor:
        self._step += 1
        keys, counters = [], []
        for row, s in enumerate(seqs):
            if s.params.seed is None:
                keys.append((self._stream + self._step) & _MASK64)
                counters.append(row)
            else:
                keys.append((s.params.seed + s.index) & _MASK64)
                counters.append(s.num_output_tokens)
        return torch.from_numpy(uniforms(keys, counters)).to(device)
