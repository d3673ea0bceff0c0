"""Batch-invariant sums of the eager backend: a row's sum depends only on the row's own values.

Elementwise ATen ops (add, mul, where) round every element on its own, whatever the shape, the
strides, the vector width or the number of threads. ATen reductions (``sum``, ``bmm``, ``cumsum``,
``segment_reduce``) do not promise that: their order follows the shape, where the zeros sit and
the thread count. So the sums over tokens here are built in an order fixed by each row alone:

* CPU (``padded_sum`` / ``segment_sum``): one float32 (float64) accumulator per row and feature,
  the row's real tokens added one after the other in token order, starting from +0.0. This is
  ``index_add_``, whose documented semantics is to add "in the order given in index" (on CPU it is
  a stable sort of the destinations then a sequential add per destination, or a sequential loop):
  the token order is the index order. Padding is sent to a spare row, so whatever it holds (NaN,
  inf) never meets a real token. One read of hidden, no temporary for float32 / float64 input and
  a cache-sized float32 chunk for 16-bit input. Plain sums (no weights) use ``embedding_bag`` (``_bags``),
  which adds each bag's rows in that same order from +0.0: the same bits, about twice as fast.
* Other devices, where ``index_add_`` uses atomics (``padded_lane_sum`` / ``segment_lane_sum``):
  ``LANES`` accumulators per row and feature; the row's r-th token (counted from its first real
  token) is added to lane ``r % LANES`` in token order, then the lanes are added in a fixed
  pairwise tree. An accumulator starts at +0.0 and a sum of two values is never -0.0 unless both
  are, so adding +0.0 for a padded token is exact: padding changes no bit. Padded rows need no
  gather: slices at absolute positions put position t in lane ``t % LANES``, the same sequence of
  adds as lane ``(t - first) % LANES``; the lanes are rotated once by ``first % LANES``.
* Short axes (``tree_sum``, ``row_tree_sum``, ``segment_tree_sum``: weight sums, dot products,
  norms): a fixed pairwise tree, elementwise ops only, no host sync.

On each device a packed segment gets the bits of the same tokens in a padded row.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np
import torch
from torch._C import _functorch
from torch.autograd import forward_ad

#: Accumulators per row: a fixed constant, so the order of a row's adds never depends on B, T or N.
LANES = 32
# Accumulators (rows x LANES x d) of one group of rows: bounds the working set of a call.
_GROUP_BYTES = 8 * 2**20


def _rows_per_group(d: int, element_size: int) -> int:
    return max(1, _GROUP_BYTES // max(1, LANES * d * element_size))


def tree_sum(values: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (...): pairwise sum over the last axis in a fixed tree (adjacent pairs, an odd
    last element carried up). Its bits depend on n and the values only."""
    n = values.shape[-1]
    if n == 0:
        return values.new_zeros(values.shape[:-1])
    x = values
    while n > 1:
        pairs = x[..., 0 : n - 1 : 2] + x[..., 1:n:2]
        x = torch.cat([pairs, x[..., n - 1 :]], dim=-1) if n % 2 else pairs
        n = x.shape[-1]
    return x[..., 0]


def _doubling_levels(n: int) -> int:
    return max(0, (n - 1).bit_length())


def row_tree_sum(values: torch.Tensor, real: torch.Tensor | None, first: torch.Tensor) -> torch.Tensor:
    """(B,) sum of each row of values (B, T) over its real tokens (values elsewhere are ignored, NaN
    included), batch-invariant: the adjacent-pair tree over the row's positions counted from its
    first real token (first (B,)), padded with +0.0 to a power of two. ``segment_tree_sum`` gives
    the same bits for the same values packed. Elementwise ops only, no host sync."""
    B, T = values.shape
    if B == 0 or T == 0:
        return values.new_zeros(B)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    x = (values if real is None else torch.where(real, values, zero)) + 0.0  # no -0.0: +0.0 adds nothing
    for level in range(_doubling_levels(T)):
        # x[t] becomes the tree over [t, t + 2 ** (level + 1)): itself plus its right neighbour block.
        h = 1 << level
        x = x + torch.cat([x[:, h:], zero.expand(B, min(h, T))], dim=1)
    if real is None:
        return x[:, 0].contiguous()  # (B,): the launchers index it with stride 1
    return x.gather(1, first.clamp(0, T - 1).long().unsqueeze(1)).squeeze(1)


def segment_tree_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(S,) sum of each segment ``values[cu[s] : cu[s + 1]]`` of values (N,), with the bits of
    ``row_tree_sum`` on the same values in a padded row; 0 for an empty segment. No host sync."""
    N = values.shape[0]
    S = cu_seqlens.shape[0] - 1
    if S <= 0 or N == 0:
        return values.new_zeros(max(S, 0))
    device = values.device
    begin, end = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    seg = torch.repeat_interleave(torch.arange(S, device=device), end - begin, output_size=N)
    end_of = end[seg]  # (N,) where each token's segment ends
    positions = torch.arange(N, device=device)
    zero = torch.zeros((), dtype=values.dtype, device=device)
    x = values + 0.0
    for level in range(_doubling_levels(N)):
        h = 1 << level
        partner = torch.cat([x[h:], zero.expand(min(h, N))])
        x = x + torch.where(positions + h < end_of, partner, zero)
    return torch.where(end > begin, x[begin.clamp(max=N - 1)], zero)


def _fold_lanes(acc: torch.Tensor) -> torch.Tensor:
    """(rows, LANES, d) -> (rows, d): the fixed pairwise tree over the lanes."""
    while acc.shape[1] > 1:
        half = acc.shape[1] // 2
        acc = acc[:, :half] + acc[:, half:]
    return acc[:, 0]


def padded_sum(
    hidden: torch.Tensor,
    real: torch.Tensor | None,
    first: torch.Tensor,
    acc: torch.dtype,
    weights: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, d) sum over each row's real tokens of hidden (B, T, d), or of ``weights * hidden`` with
    weights (B, T) in ``acc`` (any value at padding); in ``acc``, batch-invariant. first (B,): each
    row's first real position (used off the CPU); count (B,): the rows' real tokens when the caller
    has them (CPU). Padding never reaches the result."""
    if hidden.device.type == "cpu":
        return _sequential_padded_sum(hidden, real, acc, weights, count)
    if weights is not None and real is not None:
        weights = torch.where(real, weights, torch.zeros((), dtype=acc, device=weights.device))
    return padded_lane_sum(hidden, real, first, acc, weights)


def segment_sum(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    acc: torch.dtype,
    weights: torch.Tensor | None = None,
    seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """(S, d) sum over each segment ``hidden[cu[s] : cu[s + 1]]`` of hidden (N, d), or of
    ``weights * hidden`` (weights (N,) in ``acc``); in ``acc``, with the bits ``padded_sum`` gives
    the same tokens in a padded row on the same device. seg (N,) int64: the segment of every token
    when the caller has it (CPU)."""
    if hidden.device.type == "cpu":
        N = hidden.shape[0]
        S = cu_seqlens.shape[0] - 1
        if weights is None and acc == torch.float32 and plain(hidden) and plain(cu_seqlens):
            if hidden.dtype == torch.float32 and hidden.is_contiguous():
                return _bag_sum(hidden, cu_seqlens)
            if hidden.dtype != torch.float32:
                return _bag_sum_widened(hidden, cu_seqlens.numpy(), acc)
        if seg is None:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            seg = torch.repeat_interleave(torch.arange(S, device=hidden.device), lengths, output_size=N)
        return _sequential_sum(hidden, seg, S, acc, weights)
    begin = cu_seqlens[:-1]
    return segment_lane_sum(hidden, begin, (cu_seqlens[1:] - begin).tolist(), acc, weights)


def plain(tensor: torch.Tensor) -> bool:
    """A CPU tensor whose values ATen reads directly: not under torch.func or forward-mode AD, no
    gradient to record (the eager path never differentiates through the bag sums below)."""
    return (
        type(tensor) is torch.Tensor
        and not (tensor.requires_grad and torch.is_grad_enabled())
        and not _functorch.is_functorch_wrapped_tensor(tensor)
        and forward_ad._current_level < 0
    )


def _bags(rows: torch.Tensor, index: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(len(starts), d) float32: bag i sums ``rows[index[starts[i] : starts[i + 1]]]`` (the last to
    the end of index) by ``embedding_bag``: on CPU (fbgemm) each bag is one float32 accumulator per
    feature starting at +0.0, its rows added one after the other in index order, so the bits are
    ``index_add_``'s (asserted by the tests), at about twice its speed (no sort of the destinations).
    rows (n, d) contiguous float32."""
    # detach: rows that require grad send embedding_bag to its training variant (4x slower).
    return torch.embedding_bag(rows.detach(), index, starts, False, 0)[0]


def _bag_sum(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(S, d) float32 segment sums of a contiguous float32 hidden (N, d) (``_bags``)."""
    return _bags(hidden, _iota(hidden.shape[0], cu_seqlens.dtype), cu_seqlens[:-1])


# 0, 1, 2, ... per index dtype, kept up to _IOTA_LIMIT elements: embedding_bag's indices for tokens
# that are summed in place (building them is ~6 us per call at 3k tokens, a share of a packed call).
_iotas: dict[torch.dtype, torch.Tensor] = {}
_IOTA_LIMIT = 2**20


def _iota(n: int, dtype: torch.dtype) -> torch.Tensor:
    """(n,) CPU tensor 0, 1, ..., n - 1 of an integer dtype; a view of a shared tensor (never
    written) when n <= _IOTA_LIMIT."""
    kept = _iotas.get(dtype)
    if kept is not None and kept.shape[0] >= n:
        return kept[:n]
    if n > _IOTA_LIMIT:
        return torch.arange(n, dtype=dtype, device="cpu")
    _iotas[dtype] = kept = torch.arange(max(n, 4096), dtype=dtype, device="cpu")
    return kept[:n]


# Rows of 16-bit hidden widened to float32 per embedding_bag call: a buffer that stays in the last
# level cache. Each chunk costs ~20 us of fixed work (copy, embedding_bag's own set-up, slicing),
# so 8 MB beats 2 MB by 12-20% on bf16 mean (bench/NOTES.md CPU v2.5); 16 MB spills.
_BAG_CHUNK_BYTES = 8 * 2**20


def _bag_sum_widened(hidden: torch.Tensor, cu: np.ndarray, acc: torch.dtype) -> torch.Tensor:
    """(S, d) float32 segment sums of 16-bit (or strided) hidden (N, d) with offsets cu (S + 1,) on
    the host: chunks of tokens widened into one reused float32 buffer, summed by ``_bags`` in
    sequential adds. A segment that continues past a chunk restarts in the next one from its running
    sum, put as the buffer's first row: +0.0 + sum is that sum exactly (a running sum that starts at
    +0.0 is never -0.0), so every segment gets the bits of one sequential pass over its tokens."""
    N, d = hidden.shape
    S = cu.shape[0] - 1
    rows = min(N, max(1, _BAG_CHUNK_BYTES // (d * 4)))
    if rows == N and N and d:
        # One chunk: one widening copy and one bag sum (the loop's bookkeeping is ~20 us per call).
        rows_fp32 = hidden.to(acc, memory_format=torch.contiguous_format)
        return _bags(rows_fp32, _iota(N, torch.int64), torch.from_numpy(cu[:-1].astype(np.int64)))
    out = torch.zeros((S, d), dtype=acc, device="cpu")
    if N == 0 or d == 0:
        return out
    cu = cu.astype(np.int64, copy=False)
    buffer = torch.empty((rows + 1, d), dtype=acc, device="cpu")
    index = torch.arange(rows + 1, device="cpu")
    for a in range(0, N, rows):
        b = min(N, a + rows)
        # Segments holding tokens a and b - 1; the empty ones in between get empty bags (zeros).
        lo = int(np.searchsorted(cu, a, "right")) - 1
        hi = int(np.searchsorted(cu, b - 1, "right")) - 1
        carry = int(cu[lo] < a)
        if carry:
            buffer[0].copy_(out[lo])
        n = carry + b - a
        buffer[carry:n].copy_(hidden[a:b])
        starts = np.maximum(cu[lo : hi + 1] - a, 0) + carry
        starts[0] = 0
        out[lo : hi + 1] = _bags(buffer[:n], index[:n], torch.from_numpy(starts))
    return out


def _bag_padded_sum(
    hidden: torch.Tensor, real: torch.Tensor | None, count: torch.Tensor | None = None
) -> torch.Tensor | None:
    """(B, d) float32 sums over each row's real tokens of hidden (B, T, d) on the CPU by
    ``embedding_bag`` (one bag per row: its real tokens' flat indices, in token order), with
    ``index_add_``'s bits (see ``_bags``); None where this path does not apply (a row of more than
    ``_BAG_CHUNK_BYTES`` in float32, or a float32 hidden that is not contiguous). Rows are widened
    to float32 a cache-sized group at a time into one reused buffer (16-bit input); a contiguous
    float32 hidden is read in place."""
    B, T, d = hidden.shape
    in_place = hidden.dtype == torch.float32
    if (in_place and not hidden.is_contiguous()) or (not in_place and not row_groups_fit(hidden)):
        return None
    if not in_place and real is not None:
        runs = row_runs(real, count)
        if runs is not None and sum(runs[1]) <= _RUNS_SHARE * B * T:
            return _bag_sum_of_runs(hidden, *runs)
    bags = RowBags(real, B, T, count)
    if in_place:
        return _bags(hidden.view(B * T, d), bags.flat, bags.starts[:-1])
    out = torch.empty((B, d), dtype=torch.float32, device="cpu")
    for b0, b1, x in widened_row_groups(hidden):
        out[b0:b1] = bags.sum(x, b0, b1)
    return out


# Share of real tokens under which widening each row's run alone (one copy per row) beats widening
# whole rows, padding included.
_RUNS_SHARE = 0.85


def row_runs(real: torch.Tensor, count: torch.Tensor | None = None) -> tuple[list[int], list[int]] | None:
    """(first, counts): each row's real tokens as one run of positions ``first[b] : first[b] +
    counts[b]`` (right or left padding, empty rows with count 0), as host lists; None when a row has
    a hole. real (B, T) bool on the CPU, count (B,) its row sums when the caller has them."""
    flags = real.view(torch.uint8)
    counts = (flags.sum(1) if count is None else count).tolist()
    T = real.shape[1]
    # argmax returns the first of equal maxima: the first and the last real position of each row.
    first = flags.argmax(1).tolist()
    last = ((T - 1) - flags.flip(1).argmax(1)).tolist()
    if any(n and last[b] - first[b] + 1 != n for b, n in enumerate(counts)):
        return None
    return first, counts


def _bag_sum_of_runs(hidden: torch.Tensor, first: list[int], counts: list[int]) -> torch.Tensor:
    """(B, d) float32 sums of 16-bit hidden (B, T, d) over each row's run of real tokens
    (``row_runs``): the runs widened back to back into one reused float32 buffer (padding is
    never read), each buffer summed by ``_bags`` with one bag per row: ``padded_sum``'s bits. Every
    run fits the buffer (``row_groups_fit``)."""
    B, T, d = hidden.shape
    out = torch.zeros((B, d), dtype=torch.float32, device="cpu")
    buffer = torch.empty((max(T, _BAG_CHUNK_BYTES // (d * 4)), d), dtype=torch.float32, device="cpu")
    rows: list[int] = []  # the rows in the buffer, and where each starts
    starts: list[int] = []
    filled = 0
    for b in range(B + 1):
        n = counts[b] if b < B else 0
        if rows and (b == B or filled + n > buffer.shape[0]):
            sums = _bags(buffer[:filled], _iota(filled, torch.int64), torch.tensor(starts))
            out.index_copy_(0, torch.tensor(rows), sums)
            rows, starts, filled = [], [], 0
        if n:
            buffer[filled : filled + n].copy_(hidden[b, first[b] : first[b] + n])
            rows.append(b)
            starts.append(filled)
            filled += n
    return out


def row_groups_fit(hidden: torch.Tensor) -> bool:
    """Whether one row of hidden (B, T, d) fits ``widened_row_groups``' buffer in float32."""
    return hidden.shape[1] * hidden.shape[2] * 4 <= _BAG_CHUNK_BYTES


def widened_row_groups(hidden: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(b0, b1, x) over hidden (B, T, d) (B, T, d > 0, ``row_groups_fit``): rows b0:b1 widened to
    float32 into one reused buffer of at most ``_BAG_CHUNK_BYTES``, x (b1 - b0, T, d) contiguous;
    x is overwritten by the next group (its user may modify it in place)."""
    B, T, d = hidden.shape
    rows = max(1, _BAG_CHUNK_BYTES // (T * d * 4))
    buffer = torch.empty((min(rows, B), T, d), dtype=torch.float32, device="cpu")
    for b0 in range(0, B, rows):
        b1 = min(B, b0 + rows)
        x = buffer[: b1 - b0]
        x.copy_(hidden[b0:b1])
        yield b0, b1, x


class RowBags:
    """Each row's real tokens as an ``embedding_bag`` bag of flat indices into (B * T, d), in token
    order: ``flat`` (n,) int64, ``starts`` (B + 1,) where each row's bag starts (and the end)."""

    def __init__(self, real: torch.Tensor | None, B: int, T: int, count: torch.Tensor | None = None):
        if real is None:
            self.flat = _iota(B * T, torch.int64)
            self.starts = torch.arange(0, B * T + 1, T, device="cpu")
        else:
            self.flat = real.reshape(-1).nonzero().squeeze(1)
            self.starts = torch.zeros(B + 1, dtype=torch.int64, device="cpu")
            torch.cumsum(real.sum(1) if count is None else count, 0, out=self.starts[1:])
        self.T = T
        self._bound: list[int] | None = None

    def sum(self, x: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """(b1 - b0, d) float32 bag sums of rows b0:b1, read from x (b1 - b0, T, d) float32."""
        if self._bound is None:
            self._bound = self.starts.tolist()
        lo, hi = self._bound[b0], self._bound[b1]
        index = self.flat[lo:hi] - b0 * self.T
        return _bags(x.view(-1, x.shape[2]), index, self.starts[b0:b1] - lo)


def _sequential_padded_sum(hidden, real, acc, weights, count=None) -> torch.Tensor:
    B, T, d = hidden.shape
    if B == 0 or T == 0 or d == 0:
        return torch.zeros((B, d), dtype=acc, device=hidden.device)
    if weights is None and acc == torch.float32 and plain(hidden) and (real is None or plain(real)):
        bagged = _bag_padded_sum(hidden, real, count)
        if bagged is not None:
            return bagged
    rows = torch.arange(B, device=hidden.device).unsqueeze(1).expand(B, T)
    # Padding goes to the spare row B: it never meets a real token.
    dest = rows if real is None else torch.where(real, rows, B)
    if hidden.stride(0) == T * hidden.stride(1):
        tokens = hidden.flatten(0, 1)  # (B * T, d), a view
        flat_weights = None if weights is None else weights.reshape(B * T)
        return _sequential_sum(tokens, dest.reshape(B * T), B + 1, acc, flat_weights)[:B]
    total = torch.zeros((B + 1, d), dtype=acc, device=hidden.device)
    for b in range(B):  # rows that cannot be viewed as one (B * T, d) tensor: one row at a time
        w = None if weights is None else weights[b]
        total += _sequential_sum(hidden[b], dest[b], B + 1, acc, w)
    return total[:B]


# Tokens per index_add_ call when they are converted (16-bit input) or weighted first.
_CONVERT_BYTES = 1 * 2**20


def _sequential_sum(tokens, dest, rows: int, acc, weights) -> torch.Tensor:
    """(rows, d): tokens (n, d) added into row dest[i] (n,) one after the other, in token order."""
    n, d = tokens.shape
    total = torch.zeros((rows, d), dtype=acc, device=tokens.device)
    if n == 0 or d == 0:
        return total
    if tokens.dtype == acc and weights is None:
        return total.index_add_(0, dest, tokens)
    step = max(1, _CONVERT_BYTES // (d * torch.finfo(acc).bits // 8))
    for start in range(0, n, step):
        part = slice(start, start + step)
        x = tokens[part].to(acc)
        if weights is not None:
            x = x * weights[part].unsqueeze(1)
        total.index_add_(0, dest[part], x)
    return total


def chunk_kinds(real: torch.Tensor | None, B: int, T: int) -> list[int]:
    """Per chunk of LANES positions: 0 no real token in any row, 1 every token real, 2 mixed."""
    chunks = -(-T // LANES)
    if real is None:
        return [1] * chunks
    # Positions past T count as real for "every token real" and as padding for "some token real".
    every = torch.ones((B, chunks * LANES), dtype=torch.bool, device=real.device)
    some = torch.zeros((B, chunks * LANES), dtype=torch.bool, device=real.device)
    every[:, :T] = real
    some[:, :T] = real
    full = every.view(B, chunks, LANES).all(2).all(0)
    partial = some.view(B, chunks, LANES).any(2).any(0)
    return torch.where(full, 1, torch.where(partial, 2, 0)).tolist()


def padded_lane_sum(
    hidden: torch.Tensor,
    real: torch.Tensor | None,
    first: torch.Tensor,
    acc: torch.dtype,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, d) sum over each row's real tokens of hidden (B, T, d), or of ``weights * hidden`` with
    weights (B, T) in ``acc`` and 0 at padding; in ``acc``, batch-invariant (module docstring).

    first (B,) int: each row's first real position (any value for an empty row). Padding never
    reaches the result, NaN and inf included: padded tokens are multiplied by 0 on the fast path, and
    a row that comes out non-finite is summed again by selection, which gives the same bits when
    its padding is finite.
    """
    B, T, d = hidden.shape
    if B == 0 or T == 0 or d == 0:
        return torch.zeros((B, d), dtype=acc, device=hidden.device)
    kinds = chunk_kinds(real, B, T)
    total = _lane_sum_rows(hidden, real, first, acc, weights, kinds, select=False)
    if real is None:
        return total
    bad = ~torch.isfinite(total).all(1)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        again = _lane_sum_rows(
            hidden.index_select(0, rows),
            None if real is None else real.index_select(0, rows),
            first.index_select(0, rows),
            acc,
            None if weights is None else weights.index_select(0, rows),
            kinds,
            select=True,
        )
        total = total.index_put((rows,), again)
    return total


def _lane_sum_rows(hidden, real, first, acc, weights, kinds, select: bool) -> torch.Tensor:
    B, T, d = hidden.shape
    group = _rows_per_group(d, torch.finfo(acc).bits // 8)
    mask = None if real is None or select else real.to(acc).unsqueeze(-1)  # (B, T, 1) 0/1
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    pieces = []
    for r0 in range(0, B, group):
        rows = slice(r0, r0 + group)
        h = hidden[rows]
        lanes = torch.zeros((h.shape[0], LANES, d), dtype=acc, device=hidden.device)
        for c, kind in enumerate(kinds):
            if kind == 0:
                continue  # no row has a real token here: adding zeros would change nothing
            span = slice(c * LANES, min(T, (c + 1) * LANES))
            x = h[:, span]
            into = lanes[:, : x.shape[1]]
            if weights is not None:
                x = x * weights[rows, span].unsqueeze(-1)
                if select and kind == 2:
                    x = torch.where(real[rows, span].unsqueeze(-1), x, zero)
                into.add_(x)
            elif kind == 1:
                into.add_(x)
            elif select:
                into.add_(torch.where(real[rows, span].unsqueeze(-1), x.to(acc), zero))
            else:
                into.addcmul_(x, mask[rows, span])  # exact: x * 1 or x * 0, then one rounding
        shift = first[rows].clamp(min=0).remainder(LANES)
        if bool((shift != 0).any()):
            # Lane t % LANES holds the tokens of lane (t - first) % LANES: rotate to the row's own.
            order = (shift.unsqueeze(1) + torch.arange(LANES, device=shift.device)).remainder(LANES)
            lanes = lanes[torch.arange(lanes.shape[0], device=shift.device).unsqueeze(1), order]
        pieces.append(_fold_lanes(lanes))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def segment_lane_sum(
    hidden: torch.Tensor,
    starts: torch.Tensor,
    lengths: list[int],
    acc: torch.dtype,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(S, d) sum over each segment of hidden (N, d) (or of ``weights * hidden``, weights (N,) in
    ``acc``), segment s being ``hidden[starts[s] : starts[s] + lengths[s]]``; in ``acc``, with the
    very bits ``padded_lane_sum`` gives the same tokens as a padded row."""
    N, d = hidden.shape
    S = len(lengths)
    device = hidden.device
    out = torch.zeros((S, d), dtype=acc, device=device)
    if S == 0 or N == 0 or d == 0:
        return out
    # Longest first: at chunk c the segments still running are a prefix, sliced without a gather.
    order = sorted(range(S), key=lambda s: -lengths[s])
    group = _rows_per_group(d, max(hidden.element_size(), torch.finfo(acc).bits // 8))
    lane_pos = torch.arange(LANES, device=device)
    zero = torch.zeros((), dtype=acc, device=device)
    for g0 in range(0, S, group):
        members = order[g0 : g0 + group]
        lens = [lengths[s] for s in members]
        if lens[0] == 0:
            break
        index = torch.tensor(members, device=device)
        begin = starts.index_select(0, index).long()
        end = begin + torch.tensor(lens, device=device)
        lanes = torch.zeros((len(members), LANES, d), dtype=acc, device=device)
        negated = [-n for n in lens]  # ascending, for bisect
        for c in range(-(-lens[0] // LANES)):
            running = bisect.bisect_left(negated, -c * LANES)  # segments longer than c * LANES
            full = bisect.bisect_right(negated, -(c + 1) * LANES)  # at least (c + 1) * LANES long
            pos = begin[:running, None] + c * LANES + lane_pos  # (running, LANES)
            flat = pos.clamp(max=N - 1).view(-1)
            x = hidden.index_select(0, flat).view(running, LANES, d)
            if weights is not None:
                x = x * weights.index_select(0, flat).view(running, LANES, 1)
            if full:
                lanes[:full].add_(x[:full])
            if running > full:
                inside = (pos[full:] < end[full:running, None]).unsqueeze(-1)
                lanes[full:running].add_(torch.where(inside, x[full:].to(acc), zero))
        out[index] = _fold_lanes(lanes)
    return out


def feature_dots(x: torch.Tensor, vectors: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(rows, n) dot products x[r, t] . vectors[r] over d, x (rows, n, d), vectors (rows, d): each a
    ``tree_sum`` over d of the products in ``acc``, so a token's dot depends on that token alone."""
    return tree_sum(x.to(acc) * vectors.to(acc).unsqueeze(1))
