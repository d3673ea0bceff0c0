"""The "torch" backend for packed batches: (N, d) tokens cut into segments by ``cu_seqlens``.

Same outputs and semantics as the packed Triton kernels, and as the padded path on the same
sequences right-padded: ``out`` (S, n_modes * d), ``argmax`` (S, d) int32 global token indices
(-1 for an empty segment) and ``stats`` (3, S) int32 holding the length, the first and the last
token index of each segment (-1 when empty). Sums are accumulated per segment with ``index_add_``
over bounded chunks of tokens (no (N, d) float32 copy of half-precision input).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .eager import _WIDEN_CHUNK_BYTES, _full_precision_matmul, accumulation_dtype, assemble_modes
from .modes import mode_columns


def segment_ids(cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """(N,) int64: the segment of every token (offsets assumed well formed)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    S = lengths.shape[0]
    return torch.repeat_interleave(torch.arange(S, device=cu_seqlens.device), lengths, output_size=N)


def packed_stats(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(3, S) int32: length, first and last token index of each segment (-1 when empty)."""
    begin, end = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    count = end - begin
    first = torch.where(count > 0, begin, -1)
    last = torch.where(count > 0, end - 1, -1)
    return torch.stack([count, first, last]).to(torch.int32)


def _token_chunks(N: int, d: int) -> Iterator[slice]:
    step = max(1, _WIDEN_CHUNK_BYTES // max(1, d * 4))
    for start in range(0, N, step):
        yield slice(start, start + step)


def token_weights(
    cu_seqlens: torch.Tensor, seg: torch.Tensor, weights: torch.Tensor | None, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,) weight of every token in ``acc``, (S,) their sum per segment) for weighted_mean.

    Without user weights, a token's weight is its rank inside its segment (1, 2, ...).
    """
    if weights is None:
        N = seg.shape[0]
        rank = torch.arange(N, device=seg.device) - cu_seqlens.long()[seg] + 1
        count = (cu_seqlens[1:] - cu_seqlens[:-1]).to(acc)
        return rank.to(acc), count * (count + 1) / 2
    w = weights.to(acc)
    return w, segment_sums(w, cu_seqlens)


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(S,) sum of (N,) ``values`` over each segment, 0 for an empty one; deterministic on every device.

    Both backends take user-weight sums from here, so they divide by the same bits.
    """
    if values.shape[0] == 0:
        return values.new_zeros(cu_seqlens.shape[0] - 1)
    return torch.segment_reduce(values, "sum", offsets=cu_seqlens, axis=0)


def _segment_sum(
    hidden: torch.Tensor,
    seg: torch.Tensor,
    cu_seqlens: torch.Tensor,
    acc: torch.dtype,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(S, d) per-segment sum of ``weights * hidden`` (or of hidden) in ``acc``.

    On CPU ``index_add_`` over bounded chunks (sequential, deterministic); on other devices, where
    ``index_add_`` uses atomics, ``segment_reduce`` over the whole widened tensor (deterministic).
    """
    N, d = hidden.shape
    S = cu_seqlens.shape[0] - 1
    if hidden.device.type != "cpu":
        x = hidden.to(acc)
        if weights is not None:
            x = x * weights.unsqueeze(1)
        if N == 0:
            return torch.zeros((S, d), dtype=acc, device=hidden.device)
        return torch.segment_reduce(x, "sum", offsets=cu_seqlens, axis=0)
    total = torch.zeros((S, d), dtype=acc, device=hidden.device)
    for rows in _token_chunks(N, d):
        x = hidden[rows].to(acc)
        if weights is not None:
            x = x * weights[rows].unsqueeze(1)
        total.index_add_(0, seg[rows], x)
    return total


def _segment_max(
    hidden: torch.Tensor, seg: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, d) max per segment and its int32 global token index (first of equal maxima, NaN wins)."""
    N, d = hidden.shape
    S = count.shape[0]
    device = hidden.device
    values = torch.zeros((S, d), dtype=hidden.dtype, device=device)
    if N > 0:
        values = values.scatter_reduce(0, seg.unsqueeze(1).expand(N, d), hidden, "amax", include_self=False)
    # The first position holding the maximum: the max of minus the positions that hit it, in
    # float64 (exact integers; scatter "amax" on floats is several times faster than "amin" on int64).
    best = values.repeat_interleave(count.long(), dim=0, output_size=N)
    has_nan = bool(torch.isnan(values).any())
    neg_first = torch.full((S, d), -float(N), dtype=torch.float64, device=device)
    for rows in _token_chunks(N, d):
        x, b = hidden[rows], best[rows]
        hit = (x == b) | (torch.isnan(x) & torch.isnan(b)) if has_nan else x == b
        positions = torch.arange(rows.start, rows.start + x.shape[0], device=device, dtype=torch.float64)
        candidates = torch.where(hit, -positions.unsqueeze(1), -float(N))
        neg_first = neg_first.scatter_reduce(0, seg[rows].unsqueeze(1).expand_as(x), candidates, "amax")
    index = (-neg_first).to(torch.int64)
    empty = (count == 0).unsqueeze(1)
    index = torch.where(empty, -1, index).to(torch.int32)
    return values, index


def _gather(hidden: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(S, d): hidden[position[s]], zeros where position is -1."""
    picked = (
        hidden[position.clamp(min=0).long()]
        if hidden.shape[0] > 0
        else hidden.new_zeros((position.shape[0], hidden.shape[1]))
    )
    return torch.where((position >= 0).unsqueeze(1), picked, torch.zeros((), dtype=hidden.dtype))


def pool_forward(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
    normalize_eps: float = -1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager packed forward. hidden (N, d) float; cu_seqlens (S + 1,) int32/int64, well formed;
    weights (N,) float or None; normalize_eps >= 0: L2-normalise each output row.

    Returns out (S, len(modes) * d) in hidden's dtype, argmax (S, d) int32 global token indices
    (or (S, 0) without "max"), stats (3, S) int32 and norms (S,) (or (0,)).
    """
    N = hidden.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    stats = packed_stats(cu_seqlens)
    count = stats[0]
    seg = segment_ids(cu_seqlens, N)
    return assemble_modes(
        modes, stats, hidden.dtype, normalize_eps,
        plain_sum=lambda: _segment_sum(hidden, seg, cu_seqlens, acc),
        weighted_sum=lambda: _weighted_sum(hidden, seg, cu_seqlens, weights, acc),
        maximum=lambda: _segment_max(hidden, seg, count),
        gather=lambda position: _gather(hidden, position),
    )  # fmt: skip


def _weighted_sum(hidden, seg, cu_seqlens, weights, acc) -> tuple[torch.Tensor, torch.Tensor]:
    w, w_total = token_weights(cu_seqlens, seg, weights, acc)
    return _segment_sum(hidden, seg, cu_seqlens, acc, w), w_total


def pool_backward(
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    N: int,
    dtype: torch.dtype,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager packed backward: (N, d) gradient of hidden in ``dtype`` from grad_out (S, n_modes * d)."""
    S = stats.shape[1]
    d = grad_out.shape[1] // len(modes)
    acc = accumulation_dtype(dtype)
    cols = mode_columns(modes, d)
    device = grad_out.device
    count = stats[0]
    if N == 0 or d == 0:
        return torch.zeros((N, d), dtype=dtype, device=device)
    seg = segment_ids(cu_seqlens, N)

    def block(name: str) -> torch.Tensor:
        return grad_out[:, cols[name] : cols[name] + d].to(acc)

    share = torch.zeros((S, d), dtype=acc, device=device)
    n = count.clamp(min=1).to(acc).unsqueeze(1)
    if "mean" in modes:
        share = share + block("mean") / n
    if "mean_sqrt_len" in modes:
        share = share + block("mean_sqrt_len") / n.sqrt()
    grad = share[seg]
    if "weighted_mean" in modes:
        w, w_total = token_weights(cu_seqlens, seg, weights, acc)
        nonzero = (w_total != 0).unsqueeze(1)
        g = torch.where(nonzero, block("weighted_mean") / torch.where(nonzero, w_total.unsqueeze(1), 1), 0)
        grad = grad + w.unsqueeze(1) * g[seg]
    if "max" in modes:
        hit = argmax >= 0
        src = torch.where(hit, block("max"), torch.zeros((), dtype=acc, device=device))
        grad.scatter_add_(0, argmax.clamp(min=0).long(), src)
    for name, position in (("cls", stats[1]), ("last", stats[2])):
        if name in modes:
            hit = position >= 0
            grad.index_put_((position[hit].long(),), block(name)[hit], accumulate=True)
    return grad.to(dtype)


def weights_grad(
    grad_block: torch.Tensor, hidden: torch.Tensor, cu_seqlens: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(N,) gradient of packed weighted_mean with user weights with respect to the weights.

    As ``fastpool.eager.weights_grad``: (g . x_t - g . out) / W for every token of a segment whose
    weights sum to W != 0, else 0.
    """
    N, d = hidden.shape
    acc = accumulation_dtype(hidden.dtype)
    seg = segment_ids(cu_seqlens, N)
    w, total = token_weights(cu_seqlens, seg, weights, acc)
    g = grad_block.to(acc)
    exact = _full_precision_matmul(hidden.device)
    dots = torch.cat(
        [
            (hidden[rows].to(acc) * g[seg[rows]]).sum(1)
            if not exact
            else torch.bmm(hidden[rows].to(acc).unsqueeze(1), g[seg[rows]].unsqueeze(2)).view(-1)
            for rows in _token_chunks(N, d)
        ]
        or [torch.zeros(0, dtype=acc, device=hidden.device)]
    )
    mean_dot = segment_sums(w * dots, cu_seqlens)
    nonzero = total != 0
    W = torch.where(nonzero, total, 1)
    grad = torch.where(nonzero[seg], (dots - (mean_dot / W)[seg]) / W[seg], 0)
    return grad.to(weights.dtype)
