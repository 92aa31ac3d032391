"""Batched sampler: fp32 logits [N, V] plus one Sequence per row -> one token id (and optional logprobs) per row.

Processing order (vLLM's): raw logprobs come from the unprocessed logits; min_tokens masks the row's stop ids;
repetition, frequency and presence penalties; greedy rows (temperature 0) take the argmax here, so they see
penalties but nothing else; the other rows divide by temperature, then apply min_p, top_k and top_p (each relative
to the distribution left by the previous one) and sample.

Host work per step is O(batch), whatever the context length; device work is a fixed number of passes over the
logits, no sort of the vocabulary:
- all rows greedy and nothing to edit: one argmax over the logits, no copy;
- otherwise the logits are copied, times 1 / temperature (1 for greedy rows), into a persistent workspace padded to
  a multiple of 1024 columns (the caller's logits stay untouched for the raw logprobs). min_tokens and the penalties
  edit only the affected entries, one scatter each; the penalty statistics live on the device per slot
  (penalties.py). Greedy rows take their argmax from chunk maxima;
- sampled rows: a fused softmax in place, chunk sums (which also give the accurate row mass), then min_p / top_k /
  top_p and the draw from filters.py: candidate paths for peaked rows, an exact radix select for the others. Which
  path settles a row depends on that row alone;
- one uniform per sampled row from a counter-based hash (rng.py): a seeded row's tokens depend on its seed, position
  and logits only, and runs repeat;
- one device-to-host transfer: the ids, the penalised rows' distinct-token counts and the requested logprobs,
  packed into one float64 vector.
On CPU only the rows a path did not settle go on to the next (reading a CPU tensor stalls nothing); on an
accelerator every sampled row goes through every path and `where` keeps the first exact draw, so nothing waits on
the device. No [n, V] temporaries: on CPU a fresh allocation that size page-faults its way in at every step
(a 78 MB index_select took 300 ms; into a reused buffer, 13 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm4.engine import filters
from glm4.engine.penalties import PenaltyState, PenaltyStep, has_penalty
from glm4.engine.rng import CounterUniforms
from glm4.engine.sequence import Sequence
from glm4.kernels import cpu


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: {sampled id: lp, top-k ids: lp} or None if not requested


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy ids (rows,): first index on ties, NaN counted as the maximum. On CPU torch's argmax is scalar (~20 ms
    over 256 x 151552 logits, 4x its vectorised `amax`): our kernel where it is built (AVX-512), else the chunk
    maxima of the columns up to a multiple of CHUNK (`_argmax_chunked`) against the few columns left over."""
    if not (logits.is_cpu and logits.dim() == 2 and logits.stride(-1) == 1):
        return logits.argmax(dim=-1)
    if logits.dtype == torch.float32 and cpu.ready():
        return cpu.argmax(logits)
    body = logits.shape[1] - logits.shape[1] % filters.CHUNK
    if body == 0:
        return logits.argmax(dim=-1)
    ids = _argmax_chunked(logits[:, :body])
    if body == logits.shape[1]:
        return ids
    tail = logits[:, body:]
    best, tail_best = logits.gather(1, ids.unsqueeze(1)).squeeze(1), tail.amax(dim=1)
    # The tail wins only when strictly larger, or NaN where the body has none (ties keep the first index).
    use_tail = (tail_best > best) | (tail_best.isnan() & ~best.isnan())
    return torch.where(use_tail, body + tail.argmax(dim=1), ids)


def _argmax_chunked(xs: torch.Tensor) -> torch.Tensor:
    """Greedy ids of rows whose width is a multiple of CHUNK (the workspace, or the body of the logits) from their
    chunk maxima: the first chunk holding the row maximum, then the first position inside it (first index on ties,
    NaN counted as the maximum; a vectorised max instead of torch's scalar argmax)."""
    n = xs.shape[0]
    chunks = xs.unflatten(1, (-1, filters.CHUNK))
    c = chunks.amax(dim=2).argmax(dim=1)
    return c * filters.CHUNK + chunks[torch.arange(n, device=xs.device), c].argmax(dim=1)


def _needs_min_tokens_mask(s: Sequence) -> bool:
    return bool(s.stop_token_ids) and not s.min_tokens_reached


def _mask_stop_ids(xs: torch.Tensor, seqs: list[Sequence], rows: list[int], vocab: int) -> None:
    """In place: a row must not stop before it has generated min_tokens tokens, so its stop ids get -inf."""
    width = xs.shape[1]
    flat = [i * width + t for i in rows for t in seqs[i].stop_token_ids if t < vocab]
    if flat:
        xs.view(-1)[torch.tensor(flat, device=xs.device)] = float("-inf")


@dataclass
class _Params:
    """Per-row parameters as device tensors, built per step from the sequences (O(batch) host work). Greedy rows get
    neutral values: scale 1 (their argmax is taken on the scaled logits) and no filters."""
    scale: torch.Tensor  # [n, 1] 1 / temperature (1 for greedy rows): the logits are scaled while copied
    greedy: torch.Tensor  # [n] bool
    min_p: torch.Tensor  # [n], 0 = off
    top_k: torch.Tensor  # [n] int64, 0 = off (top_k >= vocab is off too)
    top_p: torch.Tensor  # [n], 1 = off
    any_greedy: bool
    any_min: bool
    any_k: bool
    any_p: bool

    @classmethod
    def of(cls, seqs: list[Sequence], vocab: int, device: torch.device) -> "_Params":
        rows = [(1.0, 1.0, 0.0, 0, 1.0) if p.temperature == 0 else
                (1.0 / p.temperature, 0.0, p.min_p, p.top_k if 0 < p.top_k < vocab else 0, p.top_p)
                for p in (s.params for s in seqs)]
        cols = torch.tensor(rows, dtype=torch.float32, device=device)
        return cls(scale=cols[:, :1], greedy=cols[:, 1] > 0, min_p=cols[:, 2], top_k=cols[:, 3].long(),
                   top_p=cols[:, 4], any_greedy=any(r[1] > 0 for r in rows), any_min=any(r[2] > 0 for r in rows),
                   any_k=any(r[3] > 0 for r in rows), any_p=any(r[4] < 1 for r in rows))


def _pending_rows(pending: torch.Tensor) -> torch.Tensor | None:
    """The rows still to settle, None when there are none. On CPU only those (reading a CPU tensor stalls nothing);
    elsewhere all rows, with `where` keeping the settled ones, since reading `pending` would wait for the device."""
    if not pending.is_cpu:
        return torch.arange(pending.shape[0], device=pending.device)
    rows = pending.nonzero().squeeze(1)
    return rows if rows.numel() else None


def _draw_candidates(p: torch.Tensor, chunk_sums: torch.Tensor, z: torch.Tensor, params: _Params, u: torch.Tensor,
                     ids: torch.Tensor) -> torch.Tensor:
    """The candidate paths (filters.CANDIDATES, in turn) on the sampled rows: writes the ids of the rows they settle
    into ids and returns which rows are still pending. A row goes on to the next count only if it might settle there
    (filters.could_settle); the others go straight to the radix path."""
    pending = ~params.greedy
    trying = pending.clone()
    for i, k in enumerate(filters.CANDIDATES):
        rows = _pending_rows(trying)
        if rows is None:
            break
        c, cols, b = filters.top_candidates(p, chunk_sums, k, rows)
        row_params = (z[rows], params.min_p[rows], params.top_k[rows], params.top_p[rows])
        tau, exact = filters.candidate_thresholds(c, b, *row_params)
        drawn = cols.gather(1, filters.sample_weights(c * (c >= tau.unsqueeze(1)), u[rows]).unsqueeze(1))
        settled = trying[rows] & exact
        ids[rows] = torch.where(settled, drawn.squeeze(1), ids[rows])
        pending[rows] &= ~settled
        wider = filters.CANDIDATES[i + 1] if i + 1 < len(filters.CANDIDATES) else 0
        trying[rows] &= ~exact & filters.could_settle(c, b, *row_params, wider)
    return pending


def _compact_(x: torch.Tensor, rows: list[int]) -> None:
    """In place: x[j] = x[rows[j]] for ascending rows (rows[j] >= j, so no row is overwritten before it is read)."""
    for j, i in enumerate(rows):
        if i != j:
            x[j].copy_(x[i])


class Sampler:
    def __init__(self, seed: int | None = 0, vocab_size: int | None = None, max_num_seqs: int = 256):
        """seed: for unseeded random rows (None -> nondeterministic). vocab_size: if set, ids >= vocab_size
        (the model's padding rows, which are no token) are never sampled. max_num_seqs: the slots
        (`Sequence.slot`) the penalty state is indexed by."""
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.uniforms = CounterUniforms(seed)
        self.penalties = PenaltyState(max_num_seqs)
        self._workspace: torch.Tensor | None = None  # [rows, padded vocab] float32, reused every step
        self._radix = filters.RadixBuffers()

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), (tuple(logits.shape), len(seqs))
        if self.vocab_size is not None and self.vocab_size < logits.shape[1]:
            logits = logits[:, :self.vocab_size]  # a view: the padding ids are no token and are never drawn
        vocab = logits.shape[1]
        all_greedy = all(s.params.temperature == 0 for s in seqs)
        stop_rows = [i for i, s in enumerate(seqs) if _needs_min_tokens_mask(s)]
        pen_rows = [i for i, s in enumerate(seqs) if has_penalty(s)]
        pen = None
        if all_greedy and not stop_rows and not pen_rows:
            ids = _argmax(logits)
        else:
            params = _Params.of(seqs, vocab, logits.device)
            xs = self._load(logits, None if all_greedy else params.scale)
            if stop_rows:
                _mask_stop_ids(xs, seqs, stop_rows, vocab)
            if pen_rows:
                pen = self.penalties.prepare(seqs, pen_rows, vocab, logits.device)
                self.penalties.apply(xs, pen, params.scale)
            ids = _argmax_chunked(xs) if all_greedy else self._sample(xs, seqs, params)
            # A padding column can only be drawn from NaN logits (every weight NaN); even then return a real id.
            ids.clamp_(max=vocab - 1)
        return self._finish(logits, seqs, ids, pen, pen_rows)

    def _load(self, logits: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """The logits (times scale, [n, 1], if given) copied into the workspace [n, padded vocab]; padding -inf."""
        n, vocab = logits.shape
        width = filters.padded_width(vocab)
        ws = self._workspace
        if ws is None or ws.shape[0] < n or ws.shape[1] != width or ws.device != logits.device:
            rows = min(1 << (n - 1).bit_length(), max(n, self.max_num_seqs))
            ws = self._workspace = torch.empty(rows, width, device=logits.device)
        xs = ws[:n]
        if scale is None:
            xs[:, :vocab].copy_(logits)
        else:
            torch.mul(logits, scale, out=xs[:, :vocab])
        xs[:, vocab:].fill_(float("-inf"))
        return xs

    def _sample(self, xs: torch.Tensor, seqs: list[Sequence], params: _Params) -> torch.Tensor:
        """Tempered logits in the workspace (overwritten) -> ids [n] (greedy rows: argmax)."""
        n = xs.shape[0]
        ids = _argmax_chunked(xs) if params.any_greedy else torch.zeros(n, dtype=torch.long, device=xs.device)
        u = self.uniforms(seqs, xs.device)
        p = torch.ops.aten._softmax.out(xs, 1, False, out=xs)  # in place: the fused kernel, no [n, V] temporary
        chunk_sums = p.view(n, -1, filters.CHUNK).sum(dim=2)
        z = chunk_sums.sum(dim=1)  # the kernel's own normalisation is only good to ~1e-5
        pending = _draw_candidates(p, chunk_sums, z, params, u, ids)
        rows = _pending_rows(pending)
        if rows is not None:
            ids[rows] = torch.where(pending[rows], self._radix_rows(p, z, params, u, rows), ids[rows])
        return ids

    def _radix_rows(self, p: torch.Tensor, z: torch.Tensor, params: _Params, u: torch.Tensor,
                    rows: torch.Tensor) -> torch.Tensor:
        """Draws for p's rows `rows` through the radix path (filters.fallback_sample), RADIX_ROWS at a time; p is
        overwritten (a subset of rows is first moved to the front)."""
        if rows.numel() < p.shape[0]:
            _compact_(p, rows.tolist())  # only on CPU: elsewhere `rows` are all rows
        used = None if p.is_cpu else (params.any_min, params.any_k, params.any_p)
        return self._radix_groups(p[:rows.numel()], z[rows], params.min_p[rows], params.top_k[rows],
                                  params.top_p[rows], u[rows], used)

    def _radix_groups(self, p: torch.Tensor, z: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, u: torch.Tensor, used: tuple[bool, bool, bool] | None) -> torch.Tensor:
        """filters.fallback_sample, RADIX_ROWS rows at a time. used: which filters some row has (None: look, on CPU)."""
        out = []
        for g in range(0, p.shape[0], filters.RADIX_ROWS):
            s = slice(g, g + filters.RADIX_ROWS)
            flags = used or (bool((min_p[s] > 0).any()), bool((top_k[s] > 0).any()), bool((top_p[s] < 1).any()))
            out.append(filters.fallback_sample(p[s], z[s], min_p[s], top_k[s], top_p[s], u[s], self._radix, *flags))
        return torch.cat(out)

    def _finish(self, logits: torch.Tensor, seqs: list[Sequence], ids: torch.Tensor, pen: PenaltyStep | None,
                pen_rows: list[int]) -> SamplerOutput:
        """Record the penalised rows' tokens, bring everything to the host in one transfer, build the output."""
        n = len(seqs)
        parts = [ids]
        if pen is not None:
            parts.append(self.penalties.record(pen, ids))
        lp_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        k = max((seqs[i].params.logprobs for i in lp_rows), default=0)
        if lp_rows:
            parts += _raw_logprobs(logits, ids, lp_rows, k)
        host = torch.cat([p.reshape(-1).double() for p in parts]).tolist()
        token_ids = [int(t) for t in host[:n]]
        pos = n
        if pen is not None:
            self.penalties.commit(seqs, pen_rows, [int(v) for v in host[pos:pos + len(pen_rows)]])
            pos += len(pen_rows)
        out_lp: list[dict[int, float] | None] = [None] * n
        for i, d in zip(lp_rows, _logprob_dicts(seqs, lp_rows, k, token_ids, host[pos:])):
            out_lp[i] = d
        return SamplerOutput(token_ids, out_lp)


_LOGPROB_ROWS = 16  # rows per log_softmax: its [rows, V] temporary stays small enough to be reused, not page-faulted


def _raw_logprobs(logits: torch.Tensor, ids: torch.Tensor, rows: list[int], k: int) -> list[torch.Tensor]:
    """Logprobs of the unprocessed logits for `rows`: the sampled tokens' [m, 1], then (k > 0) the top k values and
    ids [m, k]."""
    parts: list[list[torch.Tensor]] = []
    for g in range(0, len(rows), _LOGPROB_ROWS):
        r = torch.tensor(rows[g:g + _LOGPROB_ROWS], device=logits.device)
        raw = torch.log_softmax(logits[r].float(), dim=-1)
        parts.append([raw.gather(1, ids[r].unsqueeze(1)), *(raw.topk(k, dim=-1) if k else ())])
    return [torch.cat(column) for column in zip(*parts)]


def _logprob_dicts(seqs: list[Sequence], rows: list[int], k: int, token_ids: list[int],
                   flat: list[float]) -> list[dict[int, float]]:
    """Per row of `rows`, {sampled id: lp, then its top logprobs ids: lp} (vLLM's layout) from `_raw_logprobs`'
    tensors as they came back flattened: the m sampled values, then m * k top values, then m * k top ids."""
    m = len(rows)
    chosen, vals, tops = flat[:m], flat[m:m + m * k], flat[m + m * k:m + 2 * m * k]
    out = []
    for j, i in enumerate(rows):
        d = {token_ids[i]: chosen[j]}
        top = seqs[i].params.logprobs
        for t, v in zip(tops[j * k:j * k + top], vals[j * k:j * k + top]):
            d.setdefault(int(t), v)
        out.append(d)
    return out
