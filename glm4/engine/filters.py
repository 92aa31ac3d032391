"""min_p / top_k / top_p sampling over the whole vocabulary without sorting it.

Input: probabilities p [n, Vp] (softmax of the tempered logits; padding columns 0) and their row sums z, summed in
chunks (the fused softmax normalises only to ~1e-5 over 150K tokens, so masses are compared against this accurate
sum). Vp is a multiple of SAMPLE_CHUNK.

vLLM keeps, in order: p >= min_p * p_max; every token whose logit is >= the k-th largest; a token iff the mass of
the tokens more probable than it is < top_p times the mass left by min_p and top_k. (That is FlashInfer's top_p
rule, which keeps a tie at the boundary whole; vLLM's sort-based PyTorch path keeps as many of the tied tokens as
its sort order reaches. Without ties, as with fp32 logits, they agree; bf16 logits tie often.) Each keeps the tokens
whose probability is >= a per-row threshold, so the kept set is {p >= tau} and sampling is an inverse CDF with one
uniform over p * (p >= tau). Two exact ways to find tau and draw; which one a row takes depends on that row alone,
so a seeded row's token never depends on the batch:

1. Candidates (`top_candidates`, `candidate_thresholds`): the K largest probabilities plus a bound b that no other
   token exceeds, found from the rows' CHUNK-token chunk sums (a chunk's sum bounds each of its tokens) and the K+1
   chunks with the largest sums. tau is exact from these alone when the kept set ends inside them: top_k <= K
   without a tie reaching b, or the top_p mass reached inside them, min_p's mass known, and every kept probability
   > b (or b == 0: nothing is left beyond). Peaked rows (what a trained model mostly gives) end here, with a few
   [n, K] operations; K = 64 first, then 256 for the rows that 64 did not settle.
2. Radix select (`radix_threshold`, `fallback_sample`), for the others (flat distributions, large top_k): a
   probability's float bits order like the probability, so tau is found 15 bits at a time from two histograms of
   the row (counts for top_k, masses for top_p: the bucket where the count or mass from the top reaches its target,
   then the exact key inside it); then a two-level inverse CDF over SAMPLE_CHUNK-token chunk sums. A fixed number
   of passes over the row, no sort; rows go RADIX_ROWS at a time so the histograms and masks stay small.
"""

from __future__ import annotations

import torch

CHUNK = 32  # tokens per chunk whose sum the candidate search reads
CANDIDATES = (64, 256)  # candidate counts tried in turn, each on the rows the previous one did not settle
SAMPLE_CHUNK = 1024  # the two-level inverse CDF's chunk; the workspace width is a multiple of it
RADIX_BITS = 15  # probabilities are in [0, 1]: their float bits fit 30 bits, two levels of 15
RADIX_ROWS = 128  # rows per radix group: bounds its scratch (int32 [rows, Vp], histograms [rows, 2**15])

_DIGITS = 1 << RADIX_BITS


def padded_width(vocab: int) -> int:
    """Workspace columns for a vocabulary: a multiple of SAMPLE_CHUNK (and of CHUNK) with at least one spare column,
    which the penalty state uses as a scratch target."""
    return (vocab // SAMPLE_CHUNK + 1) * SAMPLE_CHUNK


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds target, never past the last index with weight
    (u * total can round up to total); clamped so that NaN weights still give an index."""
    idx = torch.searchsorted(cdf, target.unsqueeze(1), right=True)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.minimum(idx, last).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def sample_weights(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [n, K] >= 0, u [n] in [0, 1) -> index [n] drawn proportionally to weights (zero weights never)."""
    cdf = weights.cumsum(dim=1)
    return _search(cdf, u * cdf[:, -1])


def sample_chunked(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """w [n, Vp] >= 0 -> column [n] drawn proportionally to w: a chunk by its sum, then a column inside it."""
    n = w.shape[0]
    chunks = w.view(n, -1, SAMPLE_CHUNK)
    cdf = chunks.sum(dim=2).cumsum(dim=1)
    target = u * cdf[:, -1]
    c = _search(cdf, target)
    before = torch.where(c > 0, cdf.gather(1, (c - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    inside = chunks[torch.arange(n, device=w.device), c].cumsum(dim=1)
    return c * SAMPLE_CHUNK + _search(inside, target - before)


def top_candidates(p: torch.Tensor, chunk_sums: torch.Tensor, k: int,
                   rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For p's rows `rows`: (c [r, k], cols [r, k], b [r]): the k largest probabilities, descending, their columns,
    and a bound that no other token of the row exceeds.

    chunk_sums [n, Vp / CHUNK]: each chunk's total, which bounds every token in it. The k+1 chunks with the largest
    totals are searched; any token outside them is at most the largest total left out, and any token inside them
    but not among the first k is at most the (k+1)-th largest found. So b = the larger of those two, and every
    probability above b is among the candidates, in order."""
    sums = chunk_sums[rows]
    r, chunks = sums.shape
    searched = min(k + 1, chunks)
    k = min(k, searched * CHUNK - 1)  # a vocabulary of at most k tokens: all are searched
    tops, top = sums.topk(min(searched + 1, chunks), dim=1)
    left_out = tops[:, searched] if tops.shape[1] > searched else torch.zeros(r, device=p.device)
    top = top[:, :searched]
    vals, pos = p.view(p.shape[0], -1, CHUNK)[rows.unsqueeze(1), top].view(r, -1).topk(k + 1, dim=1)
    cols = top.gather(1, pos[:, :k] // CHUNK) * CHUNK + pos[:, :k] % CHUNK
    return vals[:, :k], cols, torch.maximum(vals[:, k], left_out)


def candidate_thresholds(c: torch.Tensor, b: torch.Tensor, z: torch.Tensor, min_p: torch.Tensor,
                         top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From `top_candidates`' c and b, the row mass z, min_p (0 = off), top_k (0 = off) and top_p (1 = off):
    (tau [n], exact [n]). Where exact, the kept tokens are the candidates with probability >= tau (and > 0)."""
    k = c.shape[1]
    tau_min = min_p * c[:, 0]  # min_p keeps p >= min_p * p_max (c[0] is the max wherever the row can be exact)
    c = c * (c >= tau_min.unsqueeze(1))
    b = torch.where(b >= tau_min, b, 0.0)  # 0: nothing beyond the candidates is left
    has_k, has_p = top_k > 0, top_p < 1
    k_inside = has_k & (top_k <= k)
    kth = c.gather(1, (top_k - 1).clamp(0, k - 1).unsqueeze(1)).squeeze(1)
    tau_k = torch.where(k_inside, kth, 0.0)
    # top_k's kept set is known unless it reaches past the candidates (top_k > K, or ties with the k-th value beyond)
    k_known = ~has_k | (b == 0) | (k_inside & (b < kth))
    kept = c * (c >= tau_k.unsqueeze(1))
    cum = kept.cumsum(dim=1)
    # top_p is relative to what min_p and top_k left: all among the candidates with top_k (when known) or when
    # nothing is left beyond them; otherwise the row's mass z, unknown here if min_p removed some of it
    inside = has_k | (b == 0)
    target = top_p * torch.where(inside, cum[:, -1], z)
    last = torch.searchsorted(cum, target.unsqueeze(1)).squeeze(1)  # first position whose mass reaches target
    tau_p = torch.where(has_p, c.gather(1, last.clamp(max=k - 1).unsqueeze(1)).squeeze(1), 0.0)
    p_known = ~has_p | ((last < k) & (inside | (min_p <= 0)))
    tau = torch.maximum(torch.maximum(tau_min, tau_k), tau_p)
    return tau, k_known & p_known & ((b < tau) | (b == 0))


def could_settle(c: torch.Tensor, b: torch.Tensor, z: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, wider: int) -> torch.Tensor:
    """Whether `wider` candidates might settle rows that these did not; False only where they surely cannot: top_k
    does not fit, or top_p's mass is out of reach of `wider` tokens (none outside these candidates exceeds b), and
    no min_p might end the kept set early. Skipping costs no exactness (the radix path is exact too): it spares flat
    rows a wider search that must fail."""
    reach = c.sum(dim=1) + wider * b >= top_p * z
    return (min_p > 0) | torch.where(top_k > 0, top_k <= wider, (top_p < 1) & reach)


class RadixBuffers:
    """The radix path's scratch (an int32 buffer shaped like the rows, and the histograms), kept across steps: fresh
    tensors this size page-fault their way in every time."""

    def __init__(self) -> None:
        self._index: torch.Tensor | None = None
        self._hist: torch.Tensor | None = None

    def get(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [n, Vp] int32, hist [n, _ROW] float32) for a group p of at most RADIX_ROWS rows."""
        if self._index is None or self._index.shape[1] != p.shape[1] or self._index.device != p.device:
            self._index = torch.empty(RADIX_ROWS, p.shape[1], dtype=torch.int32, device=p.device)
            self._hist = torch.empty(RADIX_ROWS, _ROW, device=p.device)
        return self._index[:p.shape[0]], self._hist[:p.shape[0]]


_BLOCK = 128  # histogram buckets per block of the two-stage crossing search
_ROW = _DIGITS + _BLOCK  # histogram row: the digits (level 2 adds a bucket below and one above), zero-padded


def _crossing(hist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """hist [n, _ROW] (higher buckets hold larger keys) -> the bucket where the mass counted from the top first
    reaches target (the lowest one where rounding leaves the row short of it). Blocks first, then inside the block:
    no [n, _ROW] temporaries."""
    n = hist.shape[0]
    blocks = hist.view(n, -1, _BLOCK)
    from_top = blocks.sum(dim=2).flip(1).cumsum(dim=1)
    j = torch.searchsorted(from_top, target.unsqueeze(1)).clamp_(max=from_top.shape[1] - 1)
    above = torch.where(j > 0, from_top.gather(1, (j - 1).clamp(min=0)), 0.0)
    block = from_top.shape[1] - 1 - j.squeeze(1)
    inside = blocks[torch.arange(n, device=hist.device), block].flip(1).cumsum(dim=1) + above
    i = torch.searchsorted(inside, target.unsqueeze(1)).squeeze(1).clamp_(max=_BLOCK - 1)
    return block * _BLOCK + _BLOCK - 1 - i


def radix_threshold(p: torch.Tensor, target: torch.Tensor, by_count: bool, buffers: RadixBuffers) -> torch.Tensor:
    """Per row, the largest probability t such that the tokens with p >= t reach target: in number (by_count, top_k)
    or in mass (top_p). p [n, Vp] in [0, 1], n <= RADIX_ROWS."""
    n = p.shape[0]
    index, hist = buffers.get(p)
    key = p.view(torch.int32)  # non-negative floats order like their bits
    source = torch.ones((), device=p.device).expand(p.numel()) if by_count else p.view(-1)
    offsets = torch.arange(n, device=p.device, dtype=torch.int32).unsqueeze(1) * _ROW

    def histogram() -> torch.Tensor:
        return hist.zero_().view(-1).index_add_(0, index.view(-1), source).view(n, _ROW)

    # The top 15 bits (p <= 1 keeps keys below 2**30; the clamp only keeps NaN rows in range).
    torch.bitwise_right_shift(key, RADIX_BITS, out=index).clamp_(0, _DIGITS - 1).add_(offsets)
    high = _crossing(histogram(), target)
    # The low 15 bits among the keys starting with `high` (buckets 1 .. 2**15); the others count in bucket 0
    # (below) or 2**15 + 1 (above).
    start = (high << RADIX_BITS).to(torch.int32).unsqueeze(1) - 1
    torch.sub(key, start, out=index).clamp_(0, _DIGITS + 1).add_(offsets)
    low = (_crossing(histogram(), target) - 1).clamp_(0, _DIGITS - 1)
    return ((high << RADIX_BITS) | low).to(torch.int32).view(torch.float32)


def _keep_at_least(p: torch.Tensor, tau: torch.Tensor, buffers: RadixBuffers) -> None:
    """In place: p[i] = 0 where p[i] < tau[i]. A float 0/1 mask and a multiply (masked_fill_ on CPU is a scalar
    loop, ~6x slower); the mask lives in the radix index buffer."""
    mask = buffers.get(p)[0].view(torch.float32)
    p.mul_(torch.ge(p, tau.unsqueeze(1), out=mask))


def fallback_sample(p: torch.Tensor, z: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, u: torch.Tensor, buffers: RadixBuffers, any_min: bool, any_k: bool,
                    any_p: bool) -> torch.Tensor:
    """Exact min_p, top_k, top_p, then a draw, over whole rows (at most RADIX_ROWS); p is overwritten. any_*:
    whether some row uses that filter (its passes are skipped otherwise)."""
    if any_min:
        _keep_at_least(p, min_p * p.amax(dim=1), buffers)
        z = p.sum(dim=1)
    if any_k:
        _keep_at_least(p, torch.where(top_k > 0, radix_threshold(p, top_k.float(), True, buffers), 0.0), buffers)
        z = p.sum(dim=1)
    if any_p:
        _keep_at_least(p, torch.where(top_p < 1, radix_threshold(p, top_p * z, False, buffers), 0.0), buffers)
    return sample_chunked(p, u)
