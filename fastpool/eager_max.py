"""Masked max of the eager backend: values (and, when asked, first positions) over real tokens.

A maximum is exact in any order, so these reductions are batch-invariant once the two results
that are not unique are made so: a zero maximum is returned as +0.0 (``-0.0`` and ``+0.0`` tie)
and a NaN maximum as the default NaN. The position of the maximum is the first real position
holding it (the first NaN when the maximum is NaN), found in a second pass that compares the
tokens with the maximum: ``amax`` without positions is several times faster than ``max(dim)``.
Nothing allocates a (B, T, d) temporary: padded chunks are bounded to ``_CHUNK_BYTES``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .eager_sums import RowBags, plain, row_groups_fit, row_runs, widened_row_groups

# A padded chunk of hidden (rows x tokens x d) handled by one op: cache-sized.
_CHUNK_BYTES = 2 * 2**20


def canonical(values: torch.Tensor) -> torch.Tensor:
    """values with -0.0 as +0.0 and every NaN as the default NaN (so order never shows in the bits)."""
    if values.is_cpu:
        return canonical_(values.clone())
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    nan = torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    return torch.where(values == 0, zero, torch.where(torch.isnan(values), nan, values))


def canonical_(values: torch.Tensor) -> torch.Tensor:
    """``canonical`` in place, on the CPU: adding +0.0 turns -0.0 into +0.0 and changes no other
    value (round to nearest); NaNs are replaced only when there is one, i.e. when the sum is not
    finite (one fast reduction and a host read, instead of two compares and two selects: ~5 us
    against ~35 us at 8k elements)."""
    values.add_(0.0)
    if values.numel() and not math.isfinite(values.sum().item()):
        values.masked_fill_(values.isnan(), float("nan"))
    return values


def _spans(
    real: torch.Tensor | None, B: int, T: int, size: int, merge: bool = True
) -> list[tuple[slice, int]]:
    """(positions, kind) covering the chunks of ``size`` positions that hold a real token: kind 2
    a chunk with padding (masked in a chunk-sized temporary), kind 1 a run of chunks where every
    token is real (read in place, in one op; one chunk each unless ``merge``)."""
    chunks = -(-T // size)
    if real is None:
        if not merge:
            return [(slice(c * size, min(T, (c + 1) * size)), 1) for c in range(chunks)]
        return [(slice(0, T), 1)] if T else []
    every = torch.ones((B, chunks * size), dtype=torch.bool, device=real.device)
    some = torch.zeros((B, chunks * size), dtype=torch.bool, device=real.device)
    every[:, :T] = real
    some[:, :T] = real
    full = every.view(B, chunks, size).all(2).all(0).tolist()
    partial = some.view(B, chunks, size).any(2).any(0).tolist()
    spans: list[tuple[slice, int]] = []
    for c in range(chunks):
        span = slice(c * size, min(T, (c + 1) * size))
        if merge and full[c] and spans and spans[-1][1] == 1 and spans[-1][0].stop == span.start:
            spans[-1] = (slice(spans[-1][0].start, span.stop), 1)  # extend the run in place
        elif full[c] or partial[c]:
            spans.append((span, 1 if full[c] else 2))
    return spans


def padded_max(
    hidden: torch.Tensor, real: torch.Tensor | None, count: torch.Tensor, need_indices: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, d) in hidden's dtype, positions (B, d) int32) of the max over each row's real
    tokens of hidden (B, T, d); an empty row gives 0 and -1. positions is (B, 0) unless
    ``need_indices``. Padding never reaches the result, NaN and inf included.

    Values only on the CPU: one ``scatter_reduce`` of the tokens into their rows (``_scatter_max``)
    or one ``amax`` per row's run of real tokens (``_row_range_max``) where they apply, else one
    masked ``amax`` pass. With positions, the pass keeps the max of every block of
    ``_BLOCK`` positions (B, T / _BLOCK, d); ``max`` over the blocks gives the first block holding
    the row's max, and the first position is searched inside that block only (a gather of _BLOCK
    tokens per feature) instead of running ``max(dim)`` (several times slower) over the row.
    """
    B, T, d = hidden.shape
    device = hidden.device
    if B == 0 or T == 0 or d == 0:
        positions = torch.full((B, d if need_indices else 0), -1, dtype=torch.int32, device=device)
        return hidden.new_zeros((B, d)), positions
    if not need_indices and hidden.is_cpu:
        values = _scatter_max(hidden, real, count)
        if values is None and real is not None:
            values = _row_range_max(hidden, real, count)
        if values is not None:
            return values, torch.empty((B, 0), dtype=torch.int32, device=device)
    # 16-bit chunks with padding are masked in float32 (see _maxima): size them by that copy.
    element_size = 4 if widens(hidden) else hidden.element_size()
    spans = _spans(real, B, T, _span_tokens(B, d, element_size))
    maxima = _maxima(hidden, real, spans, need_indices, select=False)
    return _finish(hidden, real, count, spans, maxima, need_indices)


def _scatter_amax(rows: int, dest: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(rows, d) in tokens' dtype: the max of the tokens (n, d) sent to row ``dest`` (n, d) int64
    (an index expanded along d), -inf for a row that receives none, NaN where one is NaN. For plain
    tensors in place from -inf with include_self=True: the same maxima without scatter_reduce's own
    initialising pass or a copy of the result; torch.func and forward-mode AD need the out-of-place op."""
    out = torch.full((rows, tokens.shape[1]), float("-inf"), dtype=tokens.dtype, device=tokens.device)
    if plain(tokens):
        return out.scatter_reduce_(0, dest, tokens, "amax", include_self=True)
    return out.scatter_reduce(0, dest, tokens, "amax", include_self=False)


def token_rows(hidden: torch.Tensor) -> torch.Tensor | None:
    """hidden (B, T, d) as a (B * T, d) view of its tokens, or None when its (B, T) dims are not one
    strided axis (a view would need a copy): where ``padded_max`` can scatter without copying."""
    try:
        return hidden.view(-1, hidden.shape[2])
    except RuntimeError:
        return None


def _scatter_max(hidden: torch.Tensor, real: torch.Tensor | None, count: torch.Tensor) -> torch.Tensor | None:
    """(B, d) values-only max on the CPU by one ``scatter_reduce`` "amax" of the (B * T, d) tokens
    into their rows, padding into a spare row B (so NaN or inf there never meets a real token), as
    the packed path's ``segment_max``. ATen's scatter with an index expanded along d reduces whole
    rows with vector code: 1.5x faster than ``amax`` over T in float32 and 3-5x in 16-bit, where
    ``amax`` converts element by element (bench/NOTES.md CPU v2.7). It also reads the padding:
    taken for 16-bit input, and for float32 when at most 1/8 of the tokens are padding (else one
    ``amax`` per row's run of real tokens reads less). Exact, canonical, 0 for an empty row; None
    where ``token_rows`` has no view (no copy is made) or a case above does not hold."""
    B, T, d = hidden.shape
    if real is not None and not widens(hidden) and int(count.sum()) * 8 < 7 * B * T:
        return None
    tokens = token_rows(hidden)
    if tokens is None:
        return None
    rows = torch.arange(B, device=hidden.device).unsqueeze(1).expand(B, T)
    dest = (rows if real is None else torch.where(real, rows, B)).reshape(B * T, 1).expand(B * T, d)
    values = _scatter_amax(B + 1, dest, tokens)[:B]
    if real is not None and not bool(count.all()):
        values = values.masked_fill((count == 0).unsqueeze(1), 0.0)  # an empty row: 0
    return canonical_(values) if plain(values) else canonical(values)


# Real bytes per row from which one amax per row beats a masked pass over the whole batch (an op
# costs a few microseconds; a masked pass reads and masks the padding too).
_ROW_RANGE_BYTES = 64 * 2**10


def _row_range_max(hidden: torch.Tensor, real: torch.Tensor, count: torch.Tensor) -> torch.Tensor | None:
    """(B, d) values-only max on the CPU when every row's real tokens are one run of positions
    (right or left padding, no holes): one ``amax`` per row over its run, never reading padding
    (2-3.5x faster than the masked pass at 25-50% padding). Exact, canonical, 0 for an empty row;
    None where a row has holes or the rows are too short for an op each."""
    B, T, d = hidden.shape
    if int(count.sum()) * d * hidden.element_size() < B * _ROW_RANGE_BYTES:
        return None
    runs = row_runs(real, count)
    if runs is None:
        return None  # a hole somewhere: the masked pass
    first, counts = runs
    out = torch.empty((B, d), dtype=hidden.dtype, device=hidden.device)
    for b, n in enumerate(counts):
        if n:
            torch.amax(hidden[b, first[b] : first[b] + n], 0, out=out[b])
        else:
            out[b] = 0.0
    return canonical_(out)


def padded_sum_and_max(
    hidden: torch.Tensor, real: torch.Tensor | None, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum (B, d) float32, max values (B, d) in hidden's dtype) over each row's real tokens of a
    16-bit hidden (B, T, d) on the CPU, in one read of hidden: every cache-sized chunk is widened to
    float32 once, added to the sums and then masked for the max. The bits of
    ``eager_sums.padded_sum`` (tokens added one after the other in token order per row, by
    ``index_add_`` into float32 rows) and of ``padded_max(..., need_indices=False)``."""
    B, T, d = hidden.shape
    if B == 0 or T == 0 or d == 0:
        return torch.zeros((B, d), dtype=torch.float32, device=hidden.device), padded_max(
            hidden, real, count, False
        )[0]
    if row_groups_fit(hidden) and plain(hidden) and (real is None or plain(real)):
        return _row_group_sum_and_max(hidden, real, count)
    spans = _spans(real, B, T, _span_tokens(B, d, 4), merge=False)
    rows = torch.arange(B, device=hidden.device).unsqueeze(1).expand(B, T)
    # Padding is added to the spare row B: it never meets a real token.
    dest = rows if real is None else torch.where(real, rows, B)
    total = torch.zeros((B + 1, d), dtype=torch.float32, device=hidden.device)
    maxima = _maxima(hidden, real, spans, False, select=False, sums=(total, dest))
    return total[:B], _finish(hidden, real, count, spans, maxima, False)[0]


def _row_group_sum_and_max(
    hidden: torch.Tensor, real: torch.Tensor | None, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``padded_sum_and_max`` a group of whole rows at a time (``eager_sums.widened_row_groups``):
    each widened group is bag-summed (``eager_sums.RowBags``: ``padded_sum``'s bits), its padding
    then set to -inf in place and the group reduced by one float32 ``amax`` while it is in cache.
    The bag sum reads only real tokens and -inf never wins a max, so padding (NaN, inf) cannot
    reach either result: no row is redone. ~20-30% faster than chunks over positions, whose sums go
    through ``index_add_``."""
    B, T, d = hidden.shape
    bags = RowBags(real, B, T, count)
    total = torch.empty((B, d), dtype=torch.float32, device=hidden.device)
    maxima = torch.empty((B, d), dtype=hidden.dtype, device=hidden.device)
    for b0, b1, x in widened_row_groups(hidden):
        total[b0:b1] = bags.sum(x, b0, b1)
        if real is not None:
            x.masked_fill_(~real[b0:b1].unsqueeze(-1), float("-inf"))
        maxima[b0:b1] = x.amax(1)
    canonical_(maxima)
    if real is not None and not bool(count.all()):
        maxima.masked_fill_((count == 0).unsqueeze(1), 0.0)  # an empty row: 0, as padded_max
    return total, maxima


def _finish(hidden, real, count, spans, maxima, need_indices: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """padded_max's values and positions from the masked pass's maxima (rows redone where padding
    held +inf or NaN; empty rows 0 and -1; canonical zeros and NaNs)."""
    B, T, d = hidden.shape
    device = hidden.device
    if real is not None:
        # A padded +inf or NaN turns the -inf bias into NaN: redo those rows by selection.
        redo = torch.isnan(maxima.flatten(1)).any(1)
        if bool(redo.any()):
            rows = redo.nonzero().squeeze(1)
            again = _maxima(
                hidden.index_select(0, rows), real.index_select(0, rows), spans, need_indices, select=True
            )
            maxima = maxima.index_put((rows,), again)
    empty = (count == 0).unsqueeze(1)
    zero = torch.zeros((), dtype=hidden.dtype, device=device)
    if not need_indices:
        no_positions = torch.empty((B, 0), dtype=torch.int32, device=device)
        if real is None and maxima.is_cpu:  # T > 0 here: no empty row; maxima is this call's own
            return canonical_(maxima), no_positions
        return torch.where(empty, zero, canonical(maxima)), no_positions
    values, block = maxima.max(1)  # the first block holding the max (the first NaN's block)
    positions = _first_position(hidden, real, block, values)
    return torch.where(empty, zero, canonical(values)), torch.where(empty, -1, positions).to(torch.int32)


# Positions per block of the max pass: the position search reads one block per feature.
_BLOCK = 16


def _span_tokens(B: int, d: int, element_size: int) -> int:
    """Tokens per chunk of the max pass: a multiple of _BLOCK, about _CHUNK_BYTES of hidden."""
    return max(1, _CHUNK_BYTES // max(1, B * d * element_size * _BLOCK)) * _BLOCK


def widens(hidden: torch.Tensor) -> bool:
    """Whether chunks with padding are masked and reduced in float32: 16-bit input on the CPU, where
    16-bit elementwise ops and reductions convert every element on their own (one conversion
    into a cache-sized float32 copy, masked in place, is ~1.5x faster than the 16-bit add and
    amax). Exact: every 16-bit value is a float32 value, and the max converts back unchanged."""
    return hidden.device.type == "cpu" and hidden.dtype in (torch.float16, torch.bfloat16)


def _maxima(hidden, real, spans, blocks: bool, select: bool, sums=None) -> torch.Tensor:
    """The max over real tokens (-inf where there is none; NaN where padding holds +inf or NaN
    unless ``select``): (B, d), or with ``blocks`` (B, ceil(T / _BLOCK), d) per block of positions.
    ``sums`` = (total (B + 1, d) float32, dest (B, T) int64): every chunk is also widened and added
    into ``total[dest]`` in token order (16-bit input, chunk-sized spans)."""
    B, T, d = hidden.shape
    widen = widens(hidden)
    work = torch.float32 if widen else hidden.dtype  # chunks with padding are masked in this dtype
    low = torch.full((), float("-inf"), dtype=work, device=hidden.device)
    # Without blocks the first span's maxima are the start (no -inf tensor to fold them into).
    out = (
        torch.full((B, -(-T // _BLOCK), d), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        if blocks
        else None
    )
    bias = None
    if real is not None and not select:
        # 0 at real tokens, -inf at padding: finite padding never wins (+inf / NaN are redone).
        bias = torch.zeros((B, T, 1), dtype=work, device=hidden.device)
        bias.masked_fill_(~real.unsqueeze(-1), float("-inf"))
    for span, kind in spans:
        x = hidden[:, span]
        if sums is not None:
            x = x.to(torch.float32, memory_format=torch.contiguous_format)
            sums[0].index_add_(0, sums[1][:, span].reshape(-1), x.view(-1, d))
        if kind == 2:
            if select:
                x = torch.where(real[:, span].unsqueeze(-1), x.to(work), low)
            elif sums is not None:
                x = x.add_(bias[:, span])  # already this call's own float32 copy
            elif widen:
                x = x.to(work).add_(bias[:, span])
            else:
                x = x + bias[:, span]
        if not blocks:
            part = x.amax(1).to(hidden.dtype)
            out = part if out is None else torch.maximum(out, part)
            continue
        first_block = span.start // _BLOCK
        whole = (x.shape[1] // _BLOCK) * _BLOCK
        if whole:
            view = x[:, :whole].unflatten(1, (whole // _BLOCK, _BLOCK))
            out[:, first_block : first_block + whole // _BLOCK] = view.amax(2)
        if whole < x.shape[1]:  # the last, shorter block of the row
            out[:, -1] = x[:, whole:].amax(1)
    if out is None:  # no real token anywhere
        out = torch.full((B, d), float("-inf"), dtype=hidden.dtype, device=hidden.device)
    return out


def _first_position(hidden, real, block, values) -> torch.Tensor:
    """(B, d) int64: the first real position t with hidden[b, t] == values[b] (the first NaN when
    the max is NaN), given the first block holding it; for an empty row any value."""
    B, T, d = hidden.shape
    device = hidden.device
    width = min(_BLOCK, T)
    # The last block may be shorter: slide its window back (the positions this adds precede the
    # first block holding the max, so none of them holds it).
    start = (block * _BLOCK).clamp(max=T - width)
    offsets = torch.arange(width, device=device).view(1, width, 1)
    low = torch.full((), float("-inf"), dtype=hidden.dtype, device=device)
    first = torch.empty((B, d), dtype=torch.int64, device=device)
    for rows in _row_groups(B, width * d):
        pos = start[rows].unsqueeze(1) + offsets  # (rows, width, d)
        window = hidden[rows].gather(1, pos)
        if real is not None:
            inside = real[rows].gather(1, pos.flatten(1)).view_as(pos)
            window = torch.where(inside, window, low)
        first[rows] = start[rows] + window.max(1).indices
    if real is not None:
        # A max of -inf ties with the padding's -inf: search those (rare) rows whole.
        tied = (values == float("-inf")).any(1)
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            hit = (hidden.index_select(0, rows) == float("-inf")) & real.index_select(0, rows).unsqueeze(-1)
            fixed = hit.view(torch.uint8).argmax(1)
            first = first.index_put((rows,), torch.where(values[rows] == float("-inf"), fixed, first[rows]))
    return first


# Elements of a position-search window (rows x _BLOCK x d) handled at once: bounds its int64 index.
_WINDOW_ELEMENTS = 2**20


def _row_groups(rows: int, per_row: int):
    step = max(1, _WINDOW_ELEMENTS // max(1, per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _first_in_window(
    hidden: torch.Tensor, begin: torch.Tensor, length: torch.Tensor, block: torch.Tensor
) -> torch.Tensor:
    """(S, d) int64: the global index of the first maximum of each segment and feature, given the
    first block of ``_BLOCK`` tokens holding it (``block`` (S, d)); any value for an empty segment.

    Each (segment, feature) reads a window of ``width`` consecutive tokens of its column through
    ``hidden.unfold`` (a view: no (S, width, d) int64 index tensor). A window that would end past
    the segment slides back into its earlier blocks, which hold no maximum (a smaller max, no NaN),
    so the first maximum in the window is the segment's. Only a segment shorter than the window
    sees other segments' tokens: those are set to -inf, and a first index before the segment (a
    -inf maximum tied with them) is the segment's first token, where its -inf maxima start.
    """
    N, d = hidden.shape
    width = min(_BLOCK, N)
    end = (begin + length).unsqueeze(1)
    start = torch.minimum(begin.unsqueeze(1) + block * _BLOCK, end - width).clamp_(min=0)  # (S, d)
    windows = hidden.unfold(0, width, 1)  # (N - width + 1, d, width)
    features = torch.arange(d, device=hidden.device)
    first = torch.empty_like(start)
    short = length < width
    # Only the short segments' windows hold other segments' tokens: those are searched at -inf.
    offsets = torch.arange(width, device=hidden.device)
    low = torch.full((), float("-inf"), dtype=hidden.dtype, device=hidden.device)
    for which, masked in ((~short).nonzero().squeeze(1), False), (short.nonzero().squeeze(1), True):
        for group in _row_groups(which.shape[0], width * d):
            rows = which[group]
            at = start[rows]
            window = windows[at, features]  # (rows, d, width)
            if masked:
                lo, hi = begin[rows].unsqueeze(1) - at, end[rows] - at
                inside = (offsets >= lo.unsqueeze(2)) & (offsets < hi.unsqueeze(2))
                window = torch.where(inside, window, low)
            found = at + window.max(2).indices
            first[rows] = torch.maximum(found, begin[rows].unsqueeze(1)) if masked else found
    return first


def segment_max(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    need_indices: bool,
    seg: torch.Tensor | None = None,
    host: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (S, d) in hidden's dtype, global token indices (S, d) int32) of the max over each
    segment ``hidden[cu[s] : cu[s + 1]]`` of hidden (N, d); an empty segment gives 0 and -1.
    indices is (S, 0) unless ``need_indices``.

    Values only: one ``scatter_reduce`` over the tokens (a max is exact in any order). With
    indices, the same pass reduces into blocks of ``_BLOCK`` tokens counted from each segment's
    start; the blocks, laid out (S, most blocks, d), give each segment's max and its first block
    holding it in one ``max``, and the first position is searched in that block only, as on the
    padded path. seg (N,) int64 and host (S + 1,): the segment of every token and the offsets read
    in place (``packed.host_offsets``), when the caller has them (CPU).
    """
    N, d = hidden.shape
    S = cu_seqlens.shape[0] - 1
    device = hidden.device
    if not need_indices and seg is not None and host is not None and N and d:
        # Few ops (host cost): empty segments (known on the host) are zeroed; made canonical.
        values = _scatter_amax(S, seg.unsqueeze(1).expand(N, d), hidden)
        empty = host[1:] == host[:-1]
        if empty.any():
            values = values.masked_fill(torch.from_numpy(empty).unsqueeze(1), 0.0)
        values = canonical_(values) if plain(values) else canonical(values)
        return values, torch.empty((S, 0), dtype=torch.int32, device=device)
    values = torch.zeros((S, d), dtype=hidden.dtype, device=device)
    index = torch.full((S, d if need_indices else 0), -1, dtype=torch.int32, device=device)
    if S == 0 or N == 0 or d == 0:
        return values, index
    begin = cu_seqlens[:-1].long()
    length = cu_seqlens[1:].long() - begin
    if seg is None:
        seg = torch.repeat_interleave(torch.arange(S, device=device), length, output_size=N)
    if not need_indices:
        values = values.scatter_reduce(0, seg.unsqueeze(1).expand(N, d), hidden, "amax", include_self=False)
        return canonical(values), index
    count = (length + _BLOCK - 1) // _BLOCK  # blocks per segment
    most = int(count.max())
    # Block b of segment s is row s * most + b of an (S * most, d) layout; rows past a segment's
    # blocks stay -inf, so they never win a max (a -inf max ties at the segment's first block).
    row = seg * most + (torch.arange(N, device=device) - begin[seg]) // _BLOCK
    blocks = _scatter_amax(S * most, row.unsqueeze(1).expand(N, d), hidden)
    values, block = blocks.view(S, most, d).max(1)  # first block holding the max (first NaN's block)
    first = _first_in_window(hidden, begin, length, block)
    empty = (length == 0).unsqueeze(1)
    zero = torch.zeros((), dtype=hidden.dtype, device=device)
    return torch.where(empty, zero, canonical(values)), torch.where(empty, -1, first).to(torch.int32)
