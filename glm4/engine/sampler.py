"""Batched sampler: fp32 logits [N, V] plus one Sequence per row -> one token id (and optional logprobs) per row.

Processing order (vLLM's): raw logprobs are taken first, from the unprocessed model distribution; then
min_tokens masks the row's stop ids; repetition, frequency and presence penalties; greedy rows (temperature 0)
take the argmax here, so they see penalties but nothing else; the other rows divide by temperature, then apply
min_p, top_k and top_p (each relative to the distribution left by the previous one) and sample.

Each of min_p, top_k and top_p keeps a *prefix* of the tokens sorted by logit, so filtered rows work on the top
`CANDIDATES` logits only (`topk` instead of a full-vocabulary sort, then sampling among <= 1024 tokens); a row whose
kept set might reach past the candidates is redone exactly over the whole vocabulary.

Sampling is by inverse CDF with ONE uniform per row (no host sync, no V random numbers per row). Seeded rows
draw it from their own torch.Generator (seeded with params.seed + sample index, created on first use and kept on
the Sequence), so a seeded request's tokens do not depend on what else is in the batch. Unseeded rows share the
sampler's generator (engine-wide seed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from glm4.engine.sequence import Sequence
from glm4.kernels import cpu


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: {sampled id: lp, top-k ids: lp} or None if not requested


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy ids (rows,). On CPU through our vectorised kernel: torch's argmax over the 151552-entry vocabulary is
    scalar and took ~250 us of each batch-1 step. Same result, first index on ties, NaN counted as the maximum."""
    if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(-1) == 1 \
            and cpu.ready():
        return cpu.argmax(logits)
    return logits.argmax(dim=-1)


def _rows(seqs: list[Sequence], pred) -> list[int]:
    return [i for i, s in enumerate(seqs) if pred(s)]


def _needs_min_tokens_mask(s: Sequence) -> bool:
    return bool(s.stop_token_ids) and not s.min_tokens_reached


def _has_penalty(s: Sequence) -> bool:
    p = s.params
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def apply_min_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place: a row must not stop before it has generated min_tokens tokens, so its stop ids get -inf."""
    vocab = logits.shape[1]
    for i, s in enumerate(seqs):
        if _needs_min_tokens_mask(s):
            logits[i, [t for t in s.stop_token_ids if t < vocab]] = float("-inf")


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place: repetition (prompt + output tokens), then frequency and presence (output tokens only).

    Only the seen tokens change, so work on them alone: gather their logits, penalise, scatter back
    (O(seen tokens) instead of several passes over the vocabulary)."""
    rows = _rows(seqs, _has_penalty)
    if not rows:
        return
    dev = logits.device
    uniq, out_counts = [], []
    for i in rows:
        counts = Counter(seqs[i].output_token_ids)
        in_prompt = dict.fromkeys(seqs[i].prompt_token_ids)
        ids = list(in_prompt) + [t for t in counts if t not in in_prompt]
        uniq.append(ids)
        out_counts.append([counts.get(t, 0) for t in ids])
    if not any(uniq):  # nothing seen yet (only possible with an empty prompt)
        return
    rows = [r for r, u in zip(rows, uniq) if u]
    out_counts = [c for c, u in zip(out_counts, uniq) if u]
    uniq = [u for u in uniq if u]
    width = max(len(u) for u in uniq)
    # Pad by repeating the row's first id: the duplicate computes and writes back the same value.
    ids = torch.tensor([u + [u[0]] * (width - len(u)) for u in uniq], dtype=torch.long, device=dev)
    cnt = torch.tensor([c + [c[0]] * (width - len(c)) for c in out_counts], dtype=torch.float, device=dev)
    rep = torch.tensor([seqs[i].params.repetition_penalty for i in rows], device=dev).unsqueeze(1)
    freq = torch.tensor([seqs[i].params.frequency_penalty for i in rows], device=dev).unsqueeze(1)
    pres = torch.tensor([seqs[i].params.presence_penalty for i in rows], device=dev).unsqueeze(1)
    # Flat indices into the contiguous logits, so no [rows, V] copies are made.
    flat_idx = torch.tensor(rows, dtype=torch.long, device=dev).unsqueeze(1) * logits.shape[1] + ids
    flat = logits.view(-1)
    g = flat[flat_idx]
    # vLLM/CTRL repetition penalty: shrink positive logits, push negative ones further down.
    g = torch.where(g > 0, g / rep, g * rep)
    g = g - freq * cnt - pres * (cnt > 0).float()  # OpenAI: counts of generated tokens only
    flat[flat_idx] = g


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
        if self.vocab_size is not None and self.vocab_size < vocab:
            logits = logits[:, :self.vocab_size]  # a view: the padding ids are no token and are never drawn
        # Copy only when something below edits logits in place (the all-greedy, no-penalty case skips it).
        if any(_needs_min_tokens_mask(s) or _has_penalty(s) for s in seqs):
            logits = logits.float().clone(memory_format=torch.contiguous_format)
        else:
            logits = logits.float()

        lp_rows = _rows(seqs, lambda s: s.params.logprobs is not None)
        raw_logprobs = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None

        apply_min_tokens(logits, seqs)
        apply_penalties(logits, seqs)

        greedy = _rows(seqs, lambda s: s.params.temperature == 0)
        if len(greedy) == n:  # common case: no gather/scatter copies of the logits
            token_ids = _argmax(logits)
        else:
            token_ids = torch.empty(n, dtype=torch.long, device=dev)
            if greedy:
                token_ids[greedy] = _argmax(logits[greedy])
            rand = _rows(seqs, lambda s: s.params.temperature != 0)
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

    def _uniforms(self, seqs: list[Sequence], dev: torch.device) -> torch.Tensor:
        """One U[0,1) per row; a seeded row consumes exactly one draw of its own generator per sampled token."""
        u = torch.empty(len(seqs), device=dev)
        shared = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if shared:
            u[shared] = torch.rand(len(shared), device=dev, generator=self._shared_generator(dev))
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                if s.generator is None or s.generator.device != u.device:
                    # vLLM's n>1 rule (seed + index), wrapped into the 64-bit range torch accepts.
                    s.generator = make_generator((s.params.seed + s.index) % 2**64, dev)
                u[i] = torch.rand(1, device=dev, generator=s.generator)[0]
        return u

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [M, V] of the non-greedy rows -> sampled ids [M]."""
        dev = logits.device
        temp = torch.tensor([s.params.temperature for s in seqs], device=dev).unsqueeze(1)
        x = logits / temp
        u = self._uniforms(seqs, dev)
        out = torch.empty(len(seqs), dtype=torch.long, device=dev)
        filtered = _rows(seqs, lambda s: s.params.min_p > 0 or s.params.top_k > 0 or s.params.top_p < 1)
        plain = _rows(seqs, lambda s: not (s.params.min_p > 0 or s.params.top_k > 0 or s.params.top_p < 1))
        if plain:
            out[plain] = _inverse_cdf(torch.softmax(x[plain], dim=-1), u[plain])
        # Group by candidate count so that a row's arithmetic (and so a seeded row's token) never depends on the
        # top_k of other rows in the batch.
        groups: dict[int, list[int]] = {}
        for i in filtered:
            groups.setdefault(min(x.shape[1], max(CANDIDATES, seqs[i].params.top_k)), []).append(i)
        for cap, rows in groups.items():
            out[rows] = _sample_filtered(x[rows], [seqs[i] for i in rows], u[rows], cap)
        return out


CANDIDATES = 1024


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [R, K] >= 0 (unnormalised), u [R] in [0, 1) -> index [R] drawn proportionally to weights.

    Zero-weight entries have an empty CDF interval, so they can never be chosen."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    idx = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)
    # u * total can round up to total; fall back to the last entry that has weight.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(idx, last).squeeze(1)


def _sample_filtered(x: torch.Tensor, seqs: list[Sequence], u: torch.Tensor, cap: int) -> torch.Tensor:
    """Tempered logits [R, V] with min_p / top_k / top_p -> ids [R], over the top `cap` candidates when exact."""
    rows, vocab = x.shape
    dev = x.device
    ks = [s.params.top_k if s.params.top_k > 0 else 0 for s in seqs]
    k = min(vocab, max(cap, max(ks)))  # callers group rows so that this equals cap
    # sorted descending; a full sort is cheaper than topk(k=V)
    vals, idx = x.sort(dim=-1, descending=True) if k == vocab else x.topk(k, dim=-1)
    pos = torch.arange(k, device=dev)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=dev).unsqueeze(1)
    top_k = torch.tensor([kk if kk else vocab for kk in ks], device=dev).unsqueeze(1)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=dev).unsqueeze(1)
    has_k = top_k < vocab

    # min_p: p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
    thr = vals[:, :1] + torch.log(min_p)  # -inf where min_p == 0
    keep = (vals >= thr) & (pos < top_k)
    # top_p is relative to what min_p and top_k left. With top_k that is all among the candidates; without it,
    # tokens beyond the candidates count too, so normalise over the whole (min_p-filtered) row.
    norm = torch.where(has_k, torch.logsumexp(vals.masked_fill(~keep, float("-inf")), dim=-1, keepdim=True),
                       torch.logsumexp(x.masked_fill(x < thr, float("-inf")), dim=-1, keepdim=True))
    probs = torch.exp(vals - norm).masked_fill(~keep, 0.0)
    cum = probs.cumsum(dim=-1)
    keep &= (cum - probs) < top_p  # drop a token once the mass before it reaches top_p (the first always stays)

    # Exact within the candidates unless the kept prefix could continue past them.
    exact = has_k | (vals[:, -1:] < thr) | ((top_p < 1) & (cum[:, -1:] >= top_p))
    exact = exact.squeeze(1) | (k == vocab)
    out = idx.gather(1, _inverse_cdf(torch.exp(vals - vals[:, :1]).masked_fill(~keep, 0.0), u).unsqueeze(1))
    out = out.squeeze(1)
    redo = torch.nonzero(~exact).flatten().tolist()
    if redo:
        out[redo] = _sample_filtered(x[redo], [seqs[i] for i in redo], u[redo], vocab)
    return out
