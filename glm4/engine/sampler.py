"""Batched sampler: fp32 logits [N, V] plus one Sequence per row -> one token id (and optional logprobs) per row.

Processing order (vLLM's): raw logprobs are taken first, from the unprocessed model distribution; then
min_tokens masks the row's stop ids; repetition, frequency and presence penalties; greedy rows (temperature 0)
take the argmax here, so they see penalties but nothing else; the other rows divide by temperature, then apply
min_p, top_k and top_p (each relative to the distribution left by the previous one) and sample.

Sampling is an exponential race, argmax(probs / E) with E ~ Exp(1) per token, which draws exactly from `probs`
without a cumulative sum or a host sync. Seeded rows draw E from their own torch.Generator (seeded with
params.seed + sample index, created on first use and kept on the Sequence), so a seeded request's tokens do not
depend on what else is in the batch. Unseeded rows share the sampler's generator (engine-wide seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm4.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: {sampled id: lp, top-k ids: lp} or None if not requested


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _rows(seqs: list[Sequence], pred) -> list[int]:
    return [i for i, s in enumerate(seqs) if pred(s)]


def _pad(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([x + [pad] * (width - len(x)) for x in lists], dtype=torch.long, device=device)


class Sampler:
    def __init__(self, seed: int | None = 0, vocab_size: int | None = None):
        """seed: for unseeded random rows (None -> nondeterministic). vocab_size: if set, ids >= vocab_size
        (the model's padding rows, which are no token) are never sampled."""
        self.seed = seed
        self.vocab_size = vocab_size
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = make_generator(self.seed, device)
        return self._generators[device]

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), (tuple(logits.shape), len(seqs))
        n, vocab = logits.shape
        dev = logits.device
        logits = logits.float().clone()  # processed in place below
        if self.vocab_size is not None and self.vocab_size < vocab:
            logits[:, self.vocab_size:] = float("-inf")

        lp_rows = _rows(seqs, lambda s: s.params.logprobs is not None)
        raw_logprobs = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None

        self._mask_stop_ids(logits, seqs)
        self._apply_penalties(logits, seqs)

        token_ids = torch.empty(n, dtype=torch.long, device=dev)
        greedy = _rows(seqs, lambda s: s.params.temperature == 0)
        if greedy:
            token_ids[greedy] = logits[greedy].argmax(dim=-1)
        rand = _rows(seqs, lambda s: s.params.temperature != 0)
        if rand:
            token_ids[rand] = self._sample(logits[rand], [seqs[i] for i in rand])

        ids = token_ids.tolist()
        out_lp: list[dict[int, float] | None] = [None] * n
        if lp_rows:
            k_max = max(seqs[i].params.logprobs for i in lp_rows)
            top_vals, top_ids = raw_logprobs.topk(k_max, dim=-1) if k_max else (None, None)
            chosen = raw_logprobs.gather(1, token_ids[lp_rows].unsqueeze(1)).squeeze(1).tolist()
            top_vals = top_vals.tolist() if k_max else None
            top_ids = top_ids.tolist() if k_max else None
            for j, i in enumerate(lp_rows):
                d = {ids[i]: chosen[j]}  # the sampled token first, then the top-k (vLLM's layout)
                for t, v in zip((top_ids[j] if k_max else [])[:seqs[i].params.logprobs],
                                (top_vals[j] if k_max else [])[:seqs[i].params.logprobs]):
                    d.setdefault(t, v)
                out_lp[i] = d
        return SamplerOutput(ids, out_lp)

    # -- logits processing -------------------------------------------------------------------------------
    @staticmethod
    def _mask_stop_ids(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens: a row must not stop before it has generated min_tokens tokens."""
        vocab = logits.shape[1]
        for i, s in enumerate(seqs):
            if not s.min_tokens_reached and s.stop_token_ids:
                ids = [t for t in s.stop_token_ids if t < vocab]
                logits[i, ids] = float("-inf")

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = _rows(seqs, lambda s: s.params.repetition_penalty != 1 or s.params.presence_penalty != 0
                     or s.params.frequency_penalty != 0)
        if not rows:
            return
        dev, vocab = logits.device, logits.shape[1]
        sub = logits[rows]
        # Output-token counts per row: scatter into an extra padding column that is then dropped.
        out_ids = _pad([seqs[i].output_token_ids for i in rows], vocab, dev)
        counts = torch.zeros(len(rows), vocab + 1, device=dev).scatter_add_(
            1, out_ids, torch.ones_like(out_ids, dtype=torch.float))[:, :vocab]

        rep = torch.tensor([seqs[i].params.repetition_penalty for i in rows], device=dev).unsqueeze(1)
        if (rep != 1).any():
            prompt_ids = _pad([seqs[i].prompt_token_ids for i in rows], vocab, dev)
            seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=dev).scatter_(
                1, prompt_ids, True)[:, :vocab] | (counts > 0)
            # vLLM/CTRL: shrink positive logits, push negative ones further down, for every seen token.
            penalised = torch.where(sub > 0, sub / rep, sub * rep)
            sub = torch.where(seen, penalised, sub)

        freq = torch.tensor([seqs[i].params.frequency_penalty for i in rows], device=dev).unsqueeze(1)
        pres = torch.tensor([seqs[i].params.presence_penalty for i in rows], device=dev).unsqueeze(1)
        sub = sub - freq * counts - pres * (counts > 0).float()  # OpenAI: generated tokens only
        logits[rows] = sub

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [M, V] of the non-greedy rows -> sampled ids [M]."""
        dev = logits.device
        temp = torch.tensor([s.params.temperature for s in seqs], device=dev).unsqueeze(1)
        logits = logits / temp

        rows = _rows(seqs, lambda s: s.params.min_p > 0)
        if rows:
            min_p = torch.tensor([seqs[i].params.min_p for i in rows], device=dev).unsqueeze(1)
            probs = torch.softmax(logits[rows], dim=-1)
            drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
            logits[rows] = logits[rows].masked_fill(drop, float("-inf"))

        rows = _rows(seqs, lambda s: s.params.top_k > 0)
        if rows:
            ks = torch.tensor([min(seqs[i].params.top_k, logits.shape[1]) for i in rows], device=dev)
            top = logits[rows].topk(int(ks.max()), dim=-1).values
            kth = top.gather(1, (ks - 1).unsqueeze(1))  # the k-th largest logit of each row
            logits[rows] = logits[rows].masked_fill(logits[rows] < kth, float("-inf"))

        rows = _rows(seqs, lambda s: s.params.top_p < 1)
        if rows:
            top_p = torch.tensor([seqs[i].params.top_p for i in rows], device=dev).unsqueeze(1)
            sorted_logits, order = logits[rows].sort(dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Keep the smallest top set whose mass reaches top_p: drop a token once the mass before it does.
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
            drop_sorted[:, 0] = False
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            logits[rows] = logits[rows].masked_fill(drop, float("-inf"))

        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        shared = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1], device=dev).exponential_(
                generator=self._shared_generator(dev))
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                if s.generator is None or s.generator.device != probs.device:
                    s.generator = make_generator(s.params.seed + s.index, dev)
                noise[i].exponential_(generator=s.generator)
        # Exp(1) can return 0; clamp so masked tokens (prob 0) can never win by 0/0.
        return (probs / noise.clamp_min_(1e-10)).argmax(dim=-1)
