"""The "torch" backend: eager PyTorch with exactly the semantics of the Triton kernels.

Used for CPU tensors (and anywhere with ``FASTPOOL_BACKEND=torch``). Same outputs as the kernels:
``out`` (B, n_modes * d), ``argmax`` (B, d or 0) int32 and ``stats`` (3, B) int32 holding the real
token count, the first and the last real position of each row (-1 for an empty row).

Batch invariance: a row's output and gradient bits depend only on its own real tokens (values, and
positions relative to its first real token) and on the arguments that concern it; not on the other
rows, the batch size, the padding (amount, side, contents), padded vs packed, the thread count or
the other modes of the call. A row's sum adds its tokens in an order fixed by the row alone
(``fastpool.eager_sums``: ``index_add_`` in token order on CPU, fixed lanes and trees elsewhere),
maxima are exact and canonical (``fastpool.eager_max``), every other step is elementwise per row.
No matmul: the sums stay float32 under autocast and whatever the matmul precision settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .eager_max import padded_max, padded_sum_and_max, token_rows, widens
from .eager_sums import feature_dots, padded_sum, row_tree_sum, tree_sum
from .masks import real_tokens
from .modes import mode_columns

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# Bounds the temporaries of a chunked pass over hidden (bytes): weights_grad's products, the
# backward's dense gradient in float32 before it is cast.
_WIDEN_CHUNK_BYTES = 4 * 2**20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_stats(real: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """(3, B) int32: count, first and last real position per row (-1 for empty rows). No host sync
    (the Triton launchers call it on CUDA tensors)."""
    return _row_stats(real, B, T, device, sync=False)[0]


def _row_stats(
    real: torch.Tensor | None, B: int, T: int, device: torch.device, sync: bool = True
) -> tuple[torch.Tensor, bool]:
    """(row_stats, whether some row may be empty (True when not ``sync``ed)); few ops: this is most
    of a cls / last call."""
    if real is None:
        count = torch.full((B,), T, dtype=torch.int32, device=device)
        first = torch.full((B,), 0 if T > 0 else -1, dtype=torch.int32, device=device)
        last = torch.full((B,), T - 1, dtype=torch.int32, device=device)
        return torch.stack([count, first, last]), T == 0 and B > 0
    if T == 0 or B == 0:
        stats = torch.full((3, B), -1, dtype=torch.int32, device=device)
        stats[0] = 0
        return stats, T == 0 and B > 0
    flags = real.view(torch.uint8)
    count = flags.sum(1)
    # argmax returns the first of equal maxima: the first real position (0 in an empty row).
    first = flags.argmax(1)
    last = (T - 1) - flags.flip(1).argmax(1)
    stats = torch.stack([count, first, last])
    any_empty = bool(count.min() == 0) if sync else True
    if any_empty:
        stats[1:].masked_fill_((count == 0).unsqueeze(0), -1)
    return stats.to(torch.int32), any_empty


def token_ranks(real: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """(B, T) int64: rank of each real token in its row (1, 2, ...), 0 at padding."""
    if real is None:
        return torch.arange(1, T + 1, device=device).expand(B, T)
    return torch.cumsum(real, dim=1) * real


def _first_real(real: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
    if real is None or real.shape[1] == 0:
        return torch.zeros(B, dtype=torch.int64, device=device)
    return real.view(torch.uint8).argmax(1)


def user_weights(
    weights: torch.Tensor, real: torch.Tensor | None, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """weighted_mean's user weights: ((B, T) weights in ``acc``, 0 at padding; (B,) their sum per row).

    Both backends take the row sums from here, so they divide by the same bits. The sums are
    batch-invariant (a fixed tree from each row's first real token, ``eager_sums.row_tree_sum``).
    """
    w = weights.to(acc)
    if real is not None:
        w = torch.where(real, w, torch.zeros((), dtype=acc, device=w.device))
    B = w.shape[0]
    return w, row_tree_sum(w, real, _first_real(real, B, w.device))


def _token_spans(B: int, T: int, d: int, element_size: int):
    step = max(1, _WIDEN_CHUNK_BYTES // max(1, B * d * element_size))
    for start in range(0, T, step):
        yield slice(start, min(T, start + step))


def token_dots(
    hidden: torch.Tensor, vectors: torch.Tensor, acc: torch.dtype, real: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) in ``acc``: the dot product of every token hidden[b, t] with vectors[b] (B, d); 0 where
    ``real`` is False (NaN there reaches no value and no gradient). Each dot is a fixed tree over d
    (``eager_sums.feature_dots``): it depends on that token and vector alone."""
    B, T, d = hidden.shape
    if T == 0 or B == 0:
        return torch.zeros((B, T), dtype=acc, device=hidden.device)
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)

    def tokens(span: slice) -> torch.Tensor:
        # Padding is zeroed before the product: NaN there must not reach a (double) backward either.
        x = hidden[:, span]
        return x if real is None else torch.where(real[:, span].unsqueeze(-1), x, zero)

    pieces = [feature_dots(tokens(span), vectors, acc) for span in _token_spans(B, T, d, 8)]
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


def weights_grad(
    grad_block: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor,
) -> torch.Tensor:
    """(B, T) gradient of weighted_mean with user weights with respect to the weights, in their dtype.

    grad_block (B, d) is the gradient of the weighted_mean output. d/dw_t of sum_s w_s x_s / W is
    (x_t - out) / W, so the gradient is (g . x_t - g . out) / W at real tokens, with
    g . out = sum_s w_s (g . x_s) / W; 0 at padding and in rows whose weights sum to 0.
    Reads hidden once; every sum is batch-invariant (fixed trees over d and over the row's tokens).
    """
    acc = accumulation_dtype(hidden.dtype)
    real = real_tokens(mask)
    B = hidden.shape[0]
    w, total = user_weights(weights, real, acc)
    dots = token_dots(hidden, grad_block, acc, real)
    nonzero = total != 0
    keep = nonzero.unsqueeze(1) if real is None else real & nonzero.unsqueeze(1)
    zero = torch.zeros((), dtype=acc, device=dots.device)
    W = torch.where(nonzero, total, 1).unsqueeze(1)
    mean_dot = row_tree_sum(w * dots, real, _first_real(real, B, dots.device)).unsqueeze(1) / W
    return torch.where(keep, (dots - mean_dot) / W, zero).to(weights.dtype)


def _gather(hidden: torch.Tensor, position: torch.Tensor, any_empty: bool = True) -> torch.Tensor:
    """(B, d): hidden[b, position[b]], zeros where position is -1 (only checked when ``any_empty``)."""
    B, T, d = hidden.shape
    if T == 0:
        return hidden.new_zeros((B, d))
    at = position.clamp(min=0) if any_empty else position
    if hidden.stride(0) == T * hidden.stride(1):
        # (B * T, d) is a view: one index_select of B rows.
        rows = torch.arange(0, B * T, T, device=hidden.device)
        picked = hidden.flatten(0, 1).index_select(0, rows + at)
    else:
        picked = hidden[torch.arange(B, device=hidden.device), at.long()]
    if any_empty:
        picked.masked_fill_((position < 0).unsqueeze(1), 0)
    return picked


# Rows up to which a CPU mask column is tested as a Python list (``tolist``, ~2 us) rather than by
# an ATen reduction (~3 us fixed cost, less per row).
_LISTED_ROWS = 64


def _column_all_real(mask: torch.Tensor, edge: int) -> bool:
    """Whether ``mask[:, edge]`` is a real token in every row (``masks.real_tokens``' meaning), read
    without testing the whole (B, T) mask: a lone cls / last call costs about this test."""
    column = mask[:, edge]
    if column.dtype.is_floating_point:  # -0.0 is padding, NaN and denormals are real: the bit test
        return bool(real_tokens(column).all())
    if column.is_cpu and column.shape[0] <= _LISTED_ROWS:
        return all(column.tolist())
    return int(torch.count_nonzero(column)) == column.shape[0]


def select_rows(hidden: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """(B, d) in hidden's dtype: "cls" (first real token) or "last" (last real token) of each row, 0
    for an empty row; the bits of ``pool_forward(..., [name])`` with none of its row statistics.

    The inference path of a lone cls / last: a few small ops (read the mask once, one index per
    row, ``_gather`` of B rows), because at any size this call is its fixed cost. hidden (B, T, d)
    float, mask (B, T) any dtype or None. Never a view of hidden.
    """
    return select_rows_at(hidden, mask, name)[0]


def select_rows_at(
    hidden: torch.Tensor, mask: torch.Tensor | None, name: str
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """(out, position): ``select_rows`` and where each row's token was taken, for its backward
    (``select_rows_backward``): one column for every row (an int), or (B,) int64 positions with -1
    for an empty row."""
    B, T, d = hidden.shape
    edge = 0 if name == "cls" else T - 1
    if B == 0 or T == 0:
        return hidden.new_zeros((B, d)), edge
    if mask is None or _column_all_real(mask, edge):
        # Every row has a real token at that end (cls: no left padding; last: no right padding, as
        # decoder batches are usually left-padded): one strided copy.
        return hidden[:, edge].clone(memory_format=torch.contiguous_format), edge
    flags = real_tokens(mask).view(torch.uint8)
    # max returns the first of equal maxima: the first real position and whether there is one
    # (from the end for last: the flipped row's first is the last).
    found, position = (flags if name == "cls" else flags.flip(1)).max(1)
    if name != "cls":
        position = (T - 1) - position
    picked = _gather(hidden, position, any_empty=False)
    # An empty row picked some token: replaced by zeros, and its position by -1.
    if not bool(found.all()):
        empty = found == 0
        picked.masked_fill_(empty.unsqueeze(1), 0)
        position = position.masked_fill(empty, -1)
    return picked, position


def select_rows_backward(
    grad_out: torch.Tensor, position: int | torch.Tensor, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """(B, T, d) gradient in ``dtype`` of a selection of one token per row: grad_out (B, d) at each
    row's ``position`` (a column for every row, or (B,) with -1 for an empty row, which gets 0), 0
    everywhere else. Built from differentiable ops (a second-order pass differentiates it)."""
    B, T, d = shape
    device = grad_out.device
    if isinstance(position, int):
        grad = torch.zeros((B, T, d), dtype=dtype, device=device)
        if B and T and d:
            grad[:, position] = grad_out
        return grad
    value = grad_out.to(dtype)
    kept = position >= 0
    # On the CPU a check is cheaper than the (B, d) select it saves; elsewhere no host sync.
    if device.type != "cpu" or not bool(kept.all()):
        value = torch.where(kept.unsqueeze(1), value, torch.zeros((), dtype=dtype, device=device))
    rows, at = torch.arange(B, device=device), position.clamp(min=0)
    # The (B, T, d) gradient after the small temporaries: allocated before them, in some heap states
    # it lands on untouched pages at every call (first-touch page faults on the CPU, bench/NOTES.md
    # CPU v2.4).
    grad = torch.zeros((B, T, d), dtype=dtype, device=device)
    grad[rows, at] = value
    return grad


def finish_rows(
    pieces: list[torch.Tensor], dtype: torch.dtype, normalize_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, norms): the per-mode (B, d) pieces (accumulation or hidden dtype) concatenated into
    (B, n * d) in ``dtype``, L2-normalised from the unrounded values when ``normalize_eps >= 0``
    (``x / max(||x||, eps)`` as ``F.normalize``; norms (B,) the norms before), else norms (0,).
    The norm is a fixed tree over the row's squares in float64: it depends on the row alone."""
    acc = accumulation_dtype(dtype)
    if normalize_eps < 0:
        out = torch.cat([p.to(dtype) for p in pieces], dim=1) if len(pieces) > 1 else pieces[0]
        out = out.to(dtype)
        return out.contiguous(), torch.empty(0, dtype=acc, device=out.device)
    rows = torch.cat([p.to(acc) for p in pieces], dim=1)
    wide = rows.to(torch.float64)
    norms = tree_sum(wide * wide).sqrt().to(acc)
    denominator = norms.clamp_min(normalize_eps)
    # eps = 0 and an all-zero row (an empty row): 0 / 1 = 0, never 0 / 0.
    denominator = torch.where(denominator > 0, denominator, 1.0)
    out = (rows / denominator.unsqueeze(1)).to(dtype)
    return out, norms


def pool_forward(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
    normalize_eps: float = -1.0,
    need_indices: bool = True,
    lean: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager forward. hidden (B, T, d) float; mask (B, T) any dtype or None; weights (B, T) float or
    None (weighted_mean's token weights; None: the rank of each real token); normalize_eps >= 0:
    L2-normalise each output row; need_indices=False: the caller needs neither max positions nor a
    gradient through max, so only the max values are computed and argmax is (B, 0). lean: only out
    (and argmax) will be read, so on the CPU without cls / last the statistics are the counts alone
    ((1, B) instead of (3, B)): a small call's fixed cost is mostly those few ops.

    Returns out (B, len(modes) * d) in hidden's dtype, argmax (B, d) int32 (or (B, 0) without
    "max" or without need_indices), stats (3, B) int32 and norms (B,) (or (0,)). Memory traffic: each
    sum and the max read hidden once, in cache-sized chunks (no (B, T, d) temporary); the max
    positions take a second read.
    """
    B, T, d = hidden.shape
    acc = accumulation_dtype(hidden.dtype)
    real = real_tokens(mask)
    on_cpu = hidden.device.type == "cpu"
    if real is not None and on_cpu and real.numel() and bool(real.view(torch.uint8).min()):
        # No padding at all (a batch of equal lengths): the mask-free paths, with the same bits (a
        # row's results depend on its real tokens alone) and none of the masking work. A min over
        # the flags, 2-5 us (``all`` takes up to 60 us).
        real = None
    if lean and on_cpu and "cls" not in modes and "last" not in modes:
        # The sums on the CPU never read the first real positions; the counts are _row_stats' own.
        count = torch.full((B,), T, device=hidden.device) if real is None else real.view(torch.uint8).sum(1)
        stats, first = count.unsqueeze(0), None
    else:
        stats, any_empty = _row_stats(real, B, T, hidden.device)
        count, first = stats[0], stats[1]

    def weighted() -> tuple[torch.Tensor, torch.Tensor]:
        if weights is None:
            w = token_ranks(real, B, T, hidden.device).to(acc)  # exact integers in float32 to 2**24
            c = count.to(acc)
            w_total = c * (c + 1) / 2
        else:
            w, w_total = user_weights(weights, real, acc)
        return padded_sum(hidden, real, first, acc, w), w_total

    plain_sum = lambda: padded_sum(hidden, real, first, acc, count=count)  # noqa: E731
    maximum = lambda: padded_max(hidden, real, count, need_indices)  # noqa: E731
    if (
        "max" in modes
        and ("mean" in modes or "mean_sqrt_len" in modes)
        and not need_indices
        and widens(hidden)
        and token_rows(hidden) is None
    ):
        # One read of 16-bit hidden for both: each chunk widened once, summed, then masked for max.
        # (Where the tokens are one (B * T, d) view, the widened sums and padded_max's 16-bit scatter
        # are 1.1-2x faster than this fused pass, bench/NOTES.md CPU v2.7.)
        total, values = padded_sum_and_max(hidden, real, count)
        positions = torch.empty((B, 0), dtype=torch.int32, device=hidden.device)
        plain_sum, maximum = (lambda: total), (lambda: (values, positions))  # noqa: E731

    return assemble_modes(
        modes, stats, hidden.dtype, normalize_eps,
        plain_sum=plain_sum,
        weighted_sum=weighted,
        maximum=maximum,
        gather=lambda position: _gather(hidden, position, any_empty),
    )  # fmt: skip


def assemble_modes(
    modes: Sequence[str],
    stats: torch.Tensor,
    dtype: torch.dtype,
    normalize_eps: float,
    plain_sum,
    weighted_sum,
    maximum,
    gather,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, argmax, stats, norms) of an eager forward, padded or packed, from its layout's pieces.

    stats (3, rows) int32 (count, first, last); ``plain_sum()`` -> (rows, d) sum over real tokens
    in the accumulation dtype; ``weighted_sum()`` -> (weighted sum, (rows,) sum of the weights);
    ``maximum()`` -> (values, int32 positions); ``gather(position)`` -> (rows, d) token at each
    position (zeros at -1). Each piece is computed at most once, in the order of ``modes``.
    """
    count = stats[0]
    acc = accumulation_dtype(dtype)
    pieces: list[torch.Tensor] = []
    argmax = torch.empty((count.shape[0], 0), dtype=torch.int32, device=count.device)
    total = None
    for name in modes:
        if name in ("mean", "mean_sqrt_len"):
            if total is None:
                total = plain_sum()
            # An empty row's sum is exactly +0.0: divided by 1 it stays the zero row it must be.
            denom = count.clamp(min=1).to(acc).unsqueeze(1)
            pieces.append(total / (denom if name == "mean" else denom.sqrt()))
        elif name == "weighted_mean":
            weighted, w_total = weighted_sum()
            nonzero = (w_total != 0).unsqueeze(1)
            zero = torch.zeros((), dtype=acc, device=count.device)
            pieces.append(
                torch.where(nonzero, weighted / torch.where(nonzero, w_total.unsqueeze(1), 1), zero)
            )
        elif name == "max":
            values, argmax = maximum()
            pieces.append(values)
        elif name == "cls":
            pieces.append(gather(stats[1]))
        elif name == "last":
            pieces.append(gather(stats[2]))
        else:
            raise ValueError(f"mode: unknown mode {name!r}")
    out, norms = finish_rows(pieces, dtype, normalize_eps)
    return out, argmax, stats, norms


def pool_backward(
    grad_out: torch.Tensor,
    mask: torch.Tensor | None,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager backward: (B, T, d) gradient of hidden in ``dtype`` from grad_out (B, n_modes * d).

    Real tokens get grad/count (mean), the max gradient at the saved argmax, the cls/last gradient
    at the saved first/last position; padding and empty rows get exactly 0. Every element is
    computed on its own in float32 (float64), in the fixed order dense share (mean, mean_sqrt_len,
    weighted_mean) + max + cls + last, and rounded once to ``dtype``: the gradient is written in
    ``dtype`` directly, without a float32 (B, T, d) copy.
    """
    B = stats.shape[1]
    d = grad_out.shape[1] // len(modes)
    acc = accumulation_dtype(dtype)
    cols = mode_columns(modes, d)
    device = grad_out.device
    count = stats[0]
    if B == 0 or T == 0 or d == 0:
        return torch.zeros((B, T, d), dtype=dtype, device=device)
    dense = any(name in modes for name in ("mean", "mean_sqrt_len", "weighted_mean"))
    real = real_tokens(mask) if dense else None  # only the dense part reads the mask
    zero = torch.zeros((), dtype=acc, device=device)

    def block(name: str) -> torch.Tensor:
        return grad_out[:, cols[name] : cols[name] + d].to(acc)

    share = None  # (B, d): the gradient every real token of the row gets from the means
    if "mean" in modes or "mean_sqrt_len" in modes:
        n = count.clamp(min=1).to(acc).unsqueeze(1)
        if "mean" in modes:
            share = block("mean") / n
        if "mean_sqrt_len" in modes:
            part = block("mean_sqrt_len") / n.sqrt()
            share = part if share is None else share + part
    w = g_weighted = None  # (B, T) token weights (0 at padding) and (B, d) gradient per unit weight
    if "weighted_mean" in modes:
        if weights is None:
            c = count.to(acc).unsqueeze(1)
            g_weighted = block("weighted_mean") / (c * (c + 1) / 2).clamp(min=1)
            w = token_ranks(real, B, T, device).to(acc)
        else:
            w, w_total = user_weights(weights, real, acc)
            nonzero = (w_total != 0).unsqueeze(1)
            g_weighted = torch.where(
                nonzero, block("weighted_mean") / torch.where(nonzero, w_total.unsqueeze(1), 1), zero
            )
    sparse = [(n, pos) for n, pos in (("max", argmax), ("cls", stats[1]), ("last", stats[2])) if n in modes]
    if share is None and w is None and len(sparse) == 1 and sparse[0][0] != "max":
        # A lone cls / last: one position per row, (B,) index work; an empty row (-1) writes 0 at 0.
        name, position = sparse[0][0], sparse[0][1].long()
        return select_rows_backward(grad_out[:, cols[name] : cols[name] + d], position, (B, T, d), dtype)
    grad = _dense_grad(share, w, g_weighted, real, (B, T, d), dtype, device)
    if not sparse:
        return grad
    # (B, d) positions of each sparse mode's gradient (cls / last: one position per row).
    targets = {name: (pos if name == "max" else pos.unsqueeze(1).expand(B, d)).long() for name, pos in sparse}
    if share is None and w is None and len(sparse) == 1:
        # One mode and nothing else: its gradient, 0 for an empty row (position -1).
        (name, _), position = sparse[0], targets[sparse[0][0]]
        value = grad_out[:, cols[name] : cols[name] + d].to(dtype)
        value = torch.where(position >= 0, value, torch.zeros((), dtype=dtype, device=device))
        return _write(grad, name, position.clamp(min=0), value)
    blocks = {name: block(name) for name, _ in sparse}

    def value_at(position: torch.Tensor) -> torch.Tensor:
        """(B, d) in ``dtype``: the whole gradient at hidden[b, position[b, j], j]."""
        v = share
        if w is not None:
            part = w.gather(1, position.clamp(min=0)) * g_weighted
            v = part if v is None else v + part
        for name, _ in sparse:
            part = torch.where(targets[name] == position, blocks[name], zero)
            v = part if v is None else v + part
        return torch.where(position >= 0, v, zero).to(dtype)

    # Each touched position gets the same value from every mode that touches it (written, not added).
    for name, _ in sparse:
        position = targets[name]
        _write(grad, name, position.clamp(min=0), value_at(position))
    return grad


def _write(grad: torch.Tensor, name: str, position: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """grad[b, position[b, j], j] = value[b, j] for grad (B, T, d) contiguous, position (B, d) >= 0."""
    B, T, d = grad.shape
    rows = torch.arange(B, device=grad.device)
    if name != "max":  # one position per row
        grad[rows, position[:, 0]] = value
    else:
        write_columns(grad.view(B * T, d), rows.unsqueeze(1) * T + position, value)
    return grad


def write_columns(grad: torch.Tensor, token: torch.Tensor, value: torch.Tensor) -> None:
    """grad[token[r, j], j] = value[r, j] in place, for grad (n, d) contiguous and token (R, d) int64
    indices into its rows, distinct within each column (the max gradient's one token per feature)."""
    if grad.dtype in (torch.float32, torch.float64):
        grad.scatter_(0, token, value)
    else:  # scatter_ has no vectorised path for 16-bit floats on CPU (30x slower, two copies): flat indices
        flat = token * grad.shape[1] + torch.arange(grad.shape[1], device=grad.device)
        grad.view(-1).index_put_((flat.view(-1),), value.view(-1))


def _dense_grad(share, w, g_weighted, real, shape, dtype, device) -> torch.Tensor:
    """(B, T, d) in ``dtype``: share (B, d) + w (B, T) * g_weighted (B, d) at real tokens, 0 elsewhere."""
    B, T, d = shape
    if share is None and w is None:
        return torch.zeros((B, T, d), dtype=dtype, device=device)
    if w is None:
        # The same value at every real token of a row: cast once per row, then spread.
        s = share.to(dtype).unsqueeze(1)
        if real is None:
            return s.expand(B, T, d).clone(memory_format=torch.contiguous_format)  # never share's storage
        # Selection by bits: AND with all ones at real tokens, all zeros (+0.0) at padding. Exact for
        # any value (inf and NaN included, where a product by 0 would give NaN), one pass, and a
        # third faster than a 16-bit multiply.
        if s.requires_grad:  # create_graph=True: a differentiable selection instead
            return torch.where(real.unsqueeze(-1), s, torch.zeros((), dtype=dtype, device=device))
        bits = _INT_OF_WIDTH[s.element_size()]
        keep = -real.to(bits).unsqueeze(-1)
        return (s.view(bits) & keep).view(dtype)
    acc = g_weighted.dtype
    zero = torch.zeros((), dtype=acc, device=device)
    grad = torch.empty((B, T, d), dtype=dtype, device=device)
    for span in _token_spans(B, T, d, torch.finfo(acc).bits // 8):
        v = w[:, span].unsqueeze(-1) * g_weighted.unsqueeze(1)
        if share is not None:
            v = share.unsqueeze(1) + v
        if real is not None:
            v = torch.where(real[:, span].unsqueeze(-1), v, zero)
        grad[:, span] = v
    return grad
