"""The "torch" backend: eager PyTorch with exactly the semantics of the Triton kernels.

Used for CPU tensors (and anywhere with ``FASTPOOL_BACKEND=torch``). Same outputs as the kernels:
``out`` (B, n_modes * d), ``argmax`` (B, d or 0) int32 and ``stats`` (3, B) int32 holding the real
token count, the first and the last real position of each row (-1 for an empty row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .masks import real_tokens
from .modes import mode_columns

# Rows per chunk when half-precision rows are widened to float32 for the mean: bounds the
# temporary to about this many bytes instead of a (B, T, d) copy.
_WIDEN_CHUNK_BYTES = 32 * 2**20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_stats(real: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """(3, B) int32: count, first and last real position per row (-1 for empty rows)."""
    if real is None:
        count = torch.full((B,), T, dtype=torch.int32, device=device)
        first = torch.full((B,), 0 if T > 0 else -1, dtype=torch.int32, device=device)
        last = torch.full((B,), T - 1, dtype=torch.int32, device=device)
        return torch.stack([count, first, last])
    positions = torch.arange(T, device=device, dtype=torch.int32)
    count = real.sum(1, dtype=torch.int32)
    first = torch.where(real, positions, T).amin(1) if T > 0 else count.new_full((B,), T)
    last = torch.where(real, positions, -1).amax(1) if T > 0 else count.new_full((B,), -1)
    first = torch.where(count > 0, first, -1).to(torch.int32)
    return torch.stack([count, first, last.to(torch.int32)])


def _full_precision_matmul(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` keep full float32 precision (no TF32 / bf16 passes)."""
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:
        # The new fp32_precision API makes the legacy query raise (issue 12 item 5): take the
        # select-and-sum path, which never depends on matmul precision.
        return False
    if precision != "highest":
        return False
    return not (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)


def token_ranks(real: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """(B, T) int64: rank of each real token in its row (1, 2, ...), 0 at padding."""
    if real is None:
        return torch.arange(1, T + 1, device=device).expand(B, T)
    return torch.cumsum(real, dim=1) * real


def user_weights(
    weights: torch.Tensor, real: torch.Tensor | None, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """weighted_mean's user weights: ((B, T) weights in ``acc``, 0 at padding; (B,) their sum per row).

    Both backends take the row sums from here, so they divide by the same bits.
    """
    w = weights.to(acc)
    if real is not None:
        w = torch.where(real, w, torch.zeros((), dtype=acc, device=w.device))
    return w, w.sum(1)


def _rows_in_chunks(hidden: torch.Tensor, acc: torch.dtype):
    """(row slice, rows of hidden widened to ``acc``): bounds the widened temporary to a chunk."""
    B, T, d = hidden.shape
    rows = max(1, B) if hidden.dtype == acc else max(1, _WIDEN_CHUNK_BYTES // max(1, T * d * 4))
    for start in range(0, B, rows):
        yield slice(start, start + rows), hidden[start : start + rows].to(acc)


def _masked_sum(
    hidden: torch.Tensor, real: torch.Tensor | None, acc: torch.dtype, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, d) sum over real tokens in ``acc`` precision, of ``weights * hidden`` when weights
    ((B, T) in ``acc``, 0 at padding) are given. Padding never reaches the result.
    """
    exact_matmul = _full_precision_matmul(hidden.device)
    if weights is None:
        if real is None:
            return hidden.sum(1, dtype=acc)
        if not exact_matmul:
            # TF32 / reduced-precision matmuls would round the inputs: select and sum instead.
            zero = torch.zeros((), dtype=hidden.dtype)
            return torch.where(real.unsqueeze(-1), hidden, zero).sum(1, dtype=acc)
        weights = real.to(acc)
    elif not exact_matmul:
        scaled = hidden.to(acc) * weights.unsqueeze(-1)
        return (scaled if real is None else torch.where(real.unsqueeze(-1), scaled, 0)).sum(1)
    if hidden.shape[0] == 0:
        return torch.zeros((0, hidden.shape[2]), dtype=acc, device=hidden.device)
    w = weights.unsqueeze(1)  # (B, 1, T): selection (or token) weights
    total = torch.cat([torch.bmm(w[rows], h) for rows, h in _rows_in_chunks(hidden, acc)]).squeeze(1)
    # A weight of 0 times NaN/inf padding is NaN: the product form is exact only for finite rows.
    # Redo the (rare) non-finite rows by selection, so padding can never leak into the result.
    bad = ~torch.isfinite(total).all(1)
    if bool(bad.any()):
        rows_idx = bad.nonzero().squeeze(1)
        picked = hidden.index_select(0, rows_idx).to(acc) * weights.index_select(0, rows_idx).unsqueeze(-1)
        if real is not None:
            picked = torch.where(real.index_select(0, rows_idx).unsqueeze(-1), picked, 0)
        total[rows_idx] = picked.sum(1)
    return total


def token_dots(
    hidden: torch.Tensor, vectors: torch.Tensor, acc: torch.dtype, real: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) in ``acc``: the dot product of every token hidden[b, t] with vectors[b] (B, d); 0 where
    ``real`` is False (padding is zeroed first, so NaN there reaches no value and no gradient)."""
    v = vectors.to(acc).unsqueeze(-1)  # (B, d, 1)
    exact_matmul = _full_precision_matmul(hidden.device)

    def dots(rows: slice, h: torch.Tensor) -> torch.Tensor:
        if real is not None:
            h = torch.where(real[rows].unsqueeze(-1), h, torch.zeros((), dtype=acc, device=h.device))
        return torch.bmm(h, v[rows]) if exact_matmul else (h * v[rows].transpose(1, 2)).sum(-1, keepdim=True)

    pieces = [dots(rows, h) for rows, h in _rows_in_chunks(hidden, acc)]
    B, T, _ = hidden.shape
    return torch.cat(pieces).squeeze(-1) if pieces else torch.zeros((B, T), dtype=acc, device=hidden.device)


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
    Reads hidden once (a batched matrix-vector product).
    """
    acc = accumulation_dtype(hidden.dtype)
    real = real_tokens(mask)
    w, total = user_weights(weights, real, acc)
    dots = token_dots(hidden, grad_block, acc, real)
    nonzero = total != 0
    keep = nonzero.unsqueeze(1) if real is None else real & nonzero.unsqueeze(1)
    zero = torch.zeros((), dtype=acc, device=dots.device)
    dots = torch.where(keep, dots, zero)  # padding may hold NaN: its dot products never count
    W = torch.where(nonzero, total, 1).unsqueeze(1)
    mean_dot = (w * dots).sum(1, keepdim=True) / W
    return torch.where(keep, (dots - mean_dot) / W, zero).to(weights.dtype)


def _masked_max(
    hidden: torch.Tensor, real: torch.Tensor | None, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, d) max over real tokens and its int32 position (first of equal maxima; 0 / -1 if empty)."""
    B, T, d = hidden.shape
    if T == 0:
        return hidden.new_zeros((B, d)), torch.full((B, d), -1, dtype=torch.int32, device=hidden.device)
    if real is None:
        values, index = hidden.max(1)
    else:
        fill = torch.tensor(float("-inf"), dtype=hidden.dtype, device=hidden.device)
        values, index = torch.where(real.unsqueeze(-1), hidden, fill).max(1)
        # Where the maximum is -inf itself, a padded -inf fill may have won the tie: redo those
        # (rare) rows by position, the first real -inf wins.
        tied = (values == float("-inf")).any(1) & (count > 0)
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            hit = (hidden.index_select(0, rows) == float("-inf")) & real.index_select(0, rows).unsqueeze(-1)
            positions = torch.arange(T, device=hidden.device).view(1, T, 1)
            first_hit = torch.where(hit, positions, T).amin(1)
            fixed = torch.where(values[rows] == float("-inf"), first_hit, index[rows])
            index = index.index_put((rows,), fixed)
    empty = (count == 0).unsqueeze(1)
    values = torch.where(empty, torch.zeros((), dtype=values.dtype, device=values.device), values)
    index = torch.where(empty, -1, index).to(torch.int32)
    return values, index


def _gather(hidden: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(B, d): hidden[b, position[b]], zeros where position is -1."""
    B, T, d = hidden.shape
    if T == 0:
        return hidden.new_zeros((B, d))
    rows = torch.arange(B, device=hidden.device)
    picked = hidden[rows, position.clamp(min=0).long()]
    return torch.where((position >= 0).unsqueeze(1), picked, torch.zeros((), dtype=hidden.dtype))


def finish_rows(
    pieces: list[torch.Tensor], dtype: torch.dtype, normalize_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, norms): the per-mode (B, d) pieces (accumulation or hidden dtype) concatenated into
    (B, n * d) in ``dtype``, L2-normalised from the unrounded values when ``normalize_eps >= 0``
    (``x / max(||x||, eps)`` as ``F.normalize``; norms (B,) the norms before), else norms (0,)."""
    acc = accumulation_dtype(dtype)
    if normalize_eps < 0:
        out = torch.cat([p.to(dtype) for p in pieces], dim=1) if len(pieces) > 1 else pieces[0]
        out = out.to(dtype)
        return out.contiguous(), torch.empty(0, dtype=acc, device=out.device)
    rows = torch.cat([p.to(acc) for p in pieces], dim=1)
    norms = torch.linalg.vector_norm(rows, dim=1)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager forward. hidden (B, T, d) float; mask (B, T) any dtype or None; weights (B, T) float or
    None (weighted_mean's token weights; None: the rank of each real token); normalize_eps >= 0:
    L2-normalise each output row.

    Returns out (B, len(modes) * d) in hidden's dtype, argmax (B, d) int32 (or (B, 0) without
    "max"), stats (3, B) int32 and norms (B,) (or (0,)). Memory traffic: the mean reads hidden once
    through a batched matrix-vector product with 0/1 weights (no (B, T, d) temporary); max builds
    one masked copy.
    """
    B, T, d = hidden.shape
    acc = accumulation_dtype(hidden.dtype)
    real = real_tokens(mask)
    stats = row_stats(real, B, T, hidden.device)
    count = stats[0]

    def weighted() -> tuple[torch.Tensor, torch.Tensor]:
        if weights is None:
            w = token_ranks(real, B, T, hidden.device).to(acc)  # exact integers in float32 to 2**24
            c = count.to(acc)
            w_total = c * (c + 1) / 2
        else:
            w, w_total = user_weights(weights, real, acc)
        return _masked_sum(hidden, real, acc, w), w_total

    return assemble_modes(
        modes, stats, hidden.dtype, normalize_eps,
        plain_sum=lambda: _masked_sum(hidden, real, acc),
        weighted_sum=weighted,
        maximum=lambda: _masked_max(hidden, real, count),
        gather=lambda position: _gather(hidden, position),
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
    zero = torch.zeros((), dtype=acc, device=count.device)
    pieces: list[torch.Tensor] = []
    argmax = torch.empty((count.shape[0], 0), dtype=torch.int32, device=count.device)
    total = None
    for name in modes:
        if name in ("mean", "mean_sqrt_len"):
            if total is None:
                total = plain_sum()
            denom = count.clamp(min=1).to(acc).unsqueeze(1)
            denom = denom if name == "mean" else denom.sqrt()
            pieces.append(torch.where((count > 0).unsqueeze(1), total / denom, zero))
        elif name == "weighted_mean":
            weighted, w_total = weighted_sum()
            nonzero = (w_total != 0).unsqueeze(1)
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
    at the saved first/last position; padding and empty rows get exactly 0.
    """
    B = stats.shape[1]
    d = grad_out.shape[1] // len(modes)
    acc = accumulation_dtype(dtype)
    cols = mode_columns(modes, d)
    device = grad_out.device
    real = real_tokens(mask)
    count = stats[0]
    if B == 0 or T == 0 or d == 0:
        return torch.zeros((B, T, d), dtype=dtype, device=device)
    rows = torch.arange(B, device=device)

    def block(name: str) -> torch.Tensor:
        return grad_out[:, cols[name] : cols[name] + d].to(acc)

    if "mean" in modes or "mean_sqrt_len" in modes:
        # One pass that writes every element: the share at real tokens, 0 elsewhere.
        n = count.clamp(min=1).to(acc).unsqueeze(1)
        share = torch.zeros((B, d), dtype=acc, device=device)
        if "mean" in modes:
            share = share + block("mean") / n
        if "mean_sqrt_len" in modes:
            share = share + block("mean_sqrt_len") / n.sqrt()
        has_tokens = (count > 0).view(B, 1, 1)
        keep = has_tokens.expand(B, T, 1) if real is None else real.unsqueeze(-1) & has_tokens
        grad = torch.where(keep, share.unsqueeze(1), torch.zeros((), dtype=acc, device=device))
    else:
        grad = torch.zeros((B, T, d), dtype=acc, device=device)
    if "weighted_mean" in modes:
        if weights is None:
            c = count.to(acc).unsqueeze(1)
            g = block("weighted_mean") / (c * (c + 1) / 2).clamp(min=1)
            w = token_ranks(real, B, T, device).to(acc) * (count > 0).unsqueeze(1)
        else:
            w, w_total = user_weights(weights, real, acc)
            nonzero = (w_total != 0).unsqueeze(1)
            g = torch.where(
                nonzero, block("weighted_mean") / torch.where(nonzero, w_total.unsqueeze(1), 1), 0
            )
        grad = grad + w.unsqueeze(-1) * g.unsqueeze(1)
    if "max" in modes:
        g = block("max")
        hit = argmax >= 0
        src = torch.where(hit, g, torch.zeros((), dtype=acc, device=device))
        grad.scatter_add_(1, argmax.clamp(min=0).long().unsqueeze(1), src.unsqueeze(1))
    for name, position in (("cls", stats[1]), ("last", stats[2])):
        if name in modes:
            g = block(name)
            hit = position >= 0
            at = position.clamp(min=0).long()
            grad[rows[hit], at[hit]] += g[hit]
    return grad.to(dtype)
