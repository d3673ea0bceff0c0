"""The "torch" backend for packed batches: (N, d) tokens cut into segments by ``cu_seqlens``.

Same outputs and semantics as the packed Triton kernels, and as the padded path on the same
sequences right-padded: ``out`` (S, n_modes * d), ``argmax`` (S, d) int32 global token indices
(-1 for an empty segment) and ``stats`` (3, S) int32 holding the length, the first and the last
token index of each segment (-1 when empty). Batch-invariant with the very bits of the padded
path: the sums are ``eager_sums.segment_sum``, the weight sums ``eager_sums.segment_tree_sum``,
the maxima exact (``eager_max.segment_max``); no (N, d) float32 copy of the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .eager import _WIDEN_CHUNK_BYTES, accumulation_dtype, assemble_modes, write_columns
from .eager_max import segment_max
from .eager_sums import feature_dots, segment_sum, segment_tree_sum
from .launch import empty
from .modes import mode_columns
from .packed import host_offsets


def segment_ids(cu_seqlens: torch.Tensor, N: int, host: np.ndarray | None = None) -> torch.Tensor:
    """(N,) int64: the segment of every token (offsets assumed well formed). ``host``: the offsets
    read in place (``packed.host_offsets``), which builds it with one NumPy op."""
    if host is None:
        host = host_offsets(cu_seqlens)
    if host is not None:
        return torch.from_numpy(np.repeat(np.arange(host.shape[0] - 1), host[1:] - host[:-1]))
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    S = lengths.shape[0]
    return torch.repeat_interleave(torch.arange(S, device=cu_seqlens.device), lengths, output_size=N)


def packed_stats(cu_seqlens: torch.Tensor, host: np.ndarray | None = None) -> torch.Tensor:
    """(3, S) int32: length, first and last token index of each segment (-1 when empty)."""
    if host is None:
        host = host_offsets(cu_seqlens)
    if host is not None:
        # Offsets are at most MAX_SEQUENCE_LENGTH < 2**31: int32 holds them and their differences.
        cu = host.astype(np.int32, copy=False)
        stats = np.empty((3, cu.shape[0] - 1), dtype=np.int32)
        np.subtract(cu[1:], cu[:-1], out=stats[0])
        stats[1] = cu[:-1]
        np.subtract(cu[1:], 1, out=stats[2])
        empty = stats[0] == 0
        if empty.any():  # a masked store costs more than the test (host cost of every call)
            stats[1:, empty] = -1
        return torch.from_numpy(stats)
    begin, end = cu_seqlens[:-1], cu_seqlens[1:]
    stats = torch.stack([end - begin, begin, end - 1]).to(torch.int32)
    positions = torch.arange(3, device=stats.device).unsqueeze(1) > 0  # first and last, not the count
    return stats.masked_fill_((stats[0] == 0).unsqueeze(0) & positions, -1)


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
    """(S,) sum of (N,) ``values`` over each segment, 0 for an empty one; batch-invariant, with the
    bits the padded path gives the same values (``eager_sums.segment_tree_sum``), on every device
    and without a host sync.

    Both backends take user-weight sums from here, so they divide by the same bits.
    """
    return segment_tree_sum(values, cu_seqlens)


def pool_forward(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
    normalize_eps: float = -1.0,
    need_indices: bool = True,
    need_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager packed forward. hidden (N, d) float; cu_seqlens (S + 1,) int32/int64, well formed;
    weights (N,) float or None; normalize_eps >= 0: L2-normalise each output row;
    need_indices=False: no max positions are needed (argmax is (S, 0)); need_stats=False: the
    caller reads only out and argmax (stats may then come back empty).

    Returns out (S, len(modes) * d) in hidden's dtype, argmax (S, d) int32 global token indices
    (or (S, 0) without "max" or need_indices), stats (3, S) int32 (a shared empty placeholder when
    not need_stats) and norms (S,) (or (0,)).
    """
    N = hidden.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    # CPU offsets are read in place once; what the outputs need comes from them on the host.
    host = host_offsets(cu_seqlens)
    lone = len(modes) == 1 and (modes[0] == "mean" or (modes[0] == "max" and not need_indices))
    if host is not None and normalize_eps < 0 and lone:
        # One mean, or one max without positions, on the CPU: the fewest small ops.
        if need_stats:
            stats, norms = packed_stats(cu_seqlens, host), torch.empty(0, dtype=acc, device=hidden.device)
        else:  # unread: shared placeholders
            stats, norms = empty(hidden.device, torch.int32), empty(hidden.device, acc)
        argmax = torch.empty((host.shape[0] - 1, 0), dtype=torch.int32, device=hidden.device)
        return pool_lone(hidden, cu_seqlens, host, modes[0]), argmax, stats, norms
    stats = packed_stats(cu_seqlens, host)
    segments: list[torch.Tensor] = []

    def seg() -> torch.Tensor | None:
        if host is None:
            return None
        if not segments:
            segments.append(segment_ids(cu_seqlens, N, host))
        return segments[0]

    def weighted() -> tuple[torch.Tensor, torch.Tensor]:
        ids = segment_ids(cu_seqlens, N, host) if host is None else seg()
        w, w_total = token_weights(cu_seqlens, ids, weights, acc)
        return segment_sum(hidden, cu_seqlens, acc, w, ids), w_total

    return assemble_modes(
        modes, stats, hidden.dtype, normalize_eps,
        plain_sum=lambda: segment_sum(hidden, cu_seqlens, acc, None, seg()),
        weighted_sum=weighted,
        maximum=lambda: segment_max(hidden, cu_seqlens, need_indices, seg(), host),
        gather=lambda position: _gather(hidden, position),
    )  # fmt: skip


def pool_lone(hidden: torch.Tensor, cu_seqlens: torch.Tensor, host: np.ndarray, mode: str) -> torch.Tensor:
    """(S, d) in hidden's dtype: one "mean" or one "max" (values only) of CPU hidden (N, d) over
    well-formed offsets cu_seqlens (S + 1,) read in place as ``host`` (``packed.host_offsets``); the
    bits of ``pool_forward``'s general arithmetic (``assemble_modes``) with the fewest small ops. A
    packed call's fixed cost is Python and NumPy work, several times dearer once the pass over hidden
    has evicted the interpreter's data from the core's cache (bench/NOTES.md CPU v2.7)."""
    if mode == "max":
        seg = segment_ids(cu_seqlens, hidden.shape[0], host)
        return segment_max(hidden, cu_seqlens, False, seg, host)[0]
    acc = accumulation_dtype(hidden.dtype)
    # The float32 (float64) sums over the counts clamped to 1 (an empty segment's 0 / 1 is 0).
    # Lengths subtracted as integers, then converted (a float32 subtraction would round offsets
    # past 2**24 first).
    count = np.subtract(host[1:], host[:-1]).astype(np.float64 if acc == torch.float64 else np.float32)
    total = segment_sum(hidden, cu_seqlens, acc)
    return total.div_(torch.from_numpy(np.maximum(count, 1, out=count)).unsqueeze(1)).to(hidden.dtype)


def _gather(hidden: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(S, d): hidden[position[s]], zeros where position is -1."""
    picked = (
        hidden[position.clamp(min=0).long()]
        if hidden.shape[0] > 0
        else hidden.new_zeros((position.shape[0], hidden.shape[1]))
    )
    return torch.where(
        (position >= 0).unsqueeze(1), picked, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    )


def _token_spans(N: int, d: int, element_size: int):
    step = max(1, _WIDEN_CHUNK_BYTES // max(1, d * element_size))
    for start in range(0, N, step):
        yield slice(start, min(N, start + step))


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
    """Eager packed backward: (N, d) gradient of hidden in ``dtype`` from grad_out (S, n_modes * d).

    The padded backward's arithmetic element by element (``fastpool.eager.pool_backward``), so a
    token gets the same gradient bits packed and padded; written in ``dtype`` directly.
    """
    d = grad_out.shape[1] // len(modes)
    acc = accumulation_dtype(dtype)
    cols = mode_columns(modes, d)
    device = grad_out.device
    count = stats[0]
    if N == 0 or d == 0:
        return torch.zeros((N, d), dtype=dtype, device=device)
    seg = segment_ids(cu_seqlens, N)
    zero = torch.zeros((), dtype=acc, device=device)

    def block(name: str) -> torch.Tensor:
        return grad_out[:, cols[name] : cols[name] + d].to(acc)

    share = None
    if "mean" in modes or "mean_sqrt_len" in modes:
        n = count.clamp(min=1).to(acc).unsqueeze(1)
        if "mean" in modes:
            share = block("mean") / n
        if "mean_sqrt_len" in modes:
            part = block("mean_sqrt_len") / n.sqrt()
            share = part if share is None else share + part
    w = g_weighted = None
    if "weighted_mean" in modes:
        w, w_total = token_weights(cu_seqlens, seg, weights, acc)
        nonzero = (w_total != 0).unsqueeze(1)
        g_weighted = torch.where(
            nonzero, block("weighted_mean") / torch.where(nonzero, w_total.unsqueeze(1), 1), zero
        )
    if w is not None:
        grad = torch.empty((N, d), dtype=dtype, device=device)
        for span in _token_spans(N, d, torch.finfo(acc).bits // 8):
            v = w[span].unsqueeze(1) * g_weighted.index_select(0, seg[span])
            grad[span] = v if share is None else share.index_select(0, seg[span]) + v
    elif share is not None:
        grad = share.to(dtype).index_select(0, seg)  # one value per segment, cast once
    else:
        grad = torch.zeros((N, d), dtype=dtype, device=device)

    sparse = [
        (name, pos) for name, pos in (("max", argmax), ("cls", stats[1]), ("last", stats[2])) if name in modes
    ]
    if not sparse:
        return grad
    # Empty segments touch nothing (their -1 would land in another segment).
    rows = (count > 0).nonzero().squeeze(1)
    targets = {
        name: (pos if name == "max" else pos.unsqueeze(1)).index_select(0, rows).long()
        for name, pos in sparse
    }
    blocks = {name: block(name).index_select(0, rows) for name, _ in sparse}
    base = None if share is None else share.index_select(0, rows)
    g_rows = None if w is None else g_weighted.index_select(0, rows)

    def value_at(position: torch.Tensor) -> torch.Tensor:
        """(R, d) in ``dtype``: the whole gradient at hidden[position[r, j], j]."""
        v = base if base is not None else torch.zeros((rows.shape[0], d), dtype=acc, device=device)
        if w is not None:
            v = v + w[position] * g_rows
        for name, _ in sparse:
            v = v + torch.where(targets[name] == position, blocks[name], zero)
        return v.to(dtype)

    for name, _ in sparse:
        position = targets[name]
        if name == "max":
            write_columns(grad, position, value_at(position))
        else:
            grad[position.squeeze(1)] = value_at(position)
    return grad


def weights_grad(
    grad_block: torch.Tensor, hidden: torch.Tensor, cu_seqlens: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(N,) gradient of packed weighted_mean with user weights with respect to the weights.

    As ``fastpool.eager.weights_grad``, with the same bits for the same tokens: (g . x_t - g . out)
    / W for every token of a segment whose weights sum to W != 0, else 0.
    """
    N, d = hidden.shape
    acc = accumulation_dtype(hidden.dtype)
    seg = segment_ids(cu_seqlens, N)
    w, total = token_weights(cu_seqlens, seg, weights, acc)
    g = grad_block.to(acc)
    pieces = [
        feature_dots(hidden[span].unsqueeze(1), g.index_select(0, seg[span]), acc).view(-1)
        for span in _token_spans(N, d, 8)
    ]
    dots = torch.cat(pieces) if pieces else torch.zeros(0, dtype=acc, device=hidden.device)
    nonzero = total != 0
    W = torch.where(nonzero, total, 1)
    mean_dot = segment_sums(w * dots, cu_seqlens) / W
    grad = torch.where(
        nonzero[seg], (dots - mean_dot[seg]) / W[seg], torch.zeros((), dtype=acc, device=hidden.device)
    )
    return grad.to(weights.dtype)
