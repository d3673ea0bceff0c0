"""The "torch" backend of the partial pooling states (``fastpool.partial``), with the eager backend's
own formulas: its masked sums and maxima for a chunk, its ``assemble_modes`` to finish.

Same outputs as ``fastpool.partial_launchers`` (values, argmax, stats, wsum, prefix), with the eager
backend's bits: a state of a whole sequence finishes to the bits of eager one-shot pooling.
"""

from __future__ import annotations

import torch

from . import eager
from .eager import accumulation_dtype, row_stats, token_ranks, user_weights
from .masks import real_tokens
from .state_layout import slot_index, state_slots

try:  # the batch-invariant eager sums and maxima, where the eager backend has them
    from .eager_max import padded_max as _padded_max
    from .eager_sums import padded_sum as _padded_sum
except ImportError:  # pragma: no cover - depends on the eager backend's version
    _padded_sum = _padded_max = None

# Bytes of one slab of the backward's float32 (float64) temporaries (tokens x features of a batch).
_SLAB_BYTES = 4 * 2**20


def _masked_sum(hidden, real, first, acc, weights=None) -> torch.Tensor:
    """(B, d) in ``acc``: the eager backend's sum over real tokens (of ``weights * hidden``)."""
    if _padded_sum is not None:
        return _padded_sum(hidden, real, first, acc, weights)
    return eager._masked_sum(hidden, real, acc, weights)


def _masked_max(hidden, real, count) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, d) max over real tokens, (B, d) int32 first position; 0 and -1 for an empty row)."""
    if _padded_max is not None:
        return _padded_max(hidden, real, count, True)
    return eager._masked_max(hidden, real, count)


def _gather(hidden: torch.Tensor, position: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, d) in ``acc``: hidden[b, position[b]], zeros where position is -1."""
    B, T, d = hidden.shape
    if T == 0:
        return torch.zeros((B, d), dtype=acc, device=hidden.device)
    picked = hidden[torch.arange(B, device=hidden.device), position.clamp(min=0).long()].to(acc)
    return torch.where((position >= 0).unsqueeze(1), picked, torch.zeros((), dtype=acc, device=hidden.device))


def state_forward(
    hidden: torch.Tensor, mask: torch.Tensor | None, modes: str, weights: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Partial state of a padded chunk: (values, argmax, stats, wsum, prefix) as
    ``partial_launchers.state_forward`` (prefix is (B, 0): the eager backward counts ranks itself)."""
    B, T, d = hidden.shape
    device = hidden.device
    acc = accumulation_dtype(hidden.dtype)
    real = real_tokens(mask)
    stats = row_stats(real, B, T, device)
    count, first, last = stats
    slots = state_slots(modes.split(","), weights is not None)
    wsum = torch.empty((0,), dtype=acc, device=device)
    argmax = torch.empty((B, 0), dtype=torch.int32, device=device)
    pieces = []
    for slot in slots:
        if slot == "sum":
            pieces.append(_masked_sum(hidden, real, first, acc))
        elif slot == "weighted":
            if weights is None:
                w = token_ranks(real, B, T, device).to(acc)  # ranks from 1 at the chunk's first real token
            else:
                w, wsum = user_weights(weights, real, acc)
            pieces.append(_masked_sum(hidden, real, first, acc, w))
        elif slot == "max":
            value, argmax = _masked_max(hidden, real, count)
            pieces.append(value.to(acc))
        else:
            pieces.append(_gather(hidden, first if slot == "first" else last, acc))
    values = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    return values, argmax, stats, wsum, torch.empty((B, 0), dtype=torch.int32, device=device)


def state_finish(
    values: torch.Tensor,
    count: torch.Tensor,
    wsum: torch.Tensor,
    modes: str,
    has_weights: bool,
    dtype: torch.dtype,
    normalize_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, norms) of (merged) states by the eager backend's ``assemble_modes``, as
    ``partial_launchers.state_finish``."""
    names = modes.split(",")
    slots = state_slots(names, has_weights)
    rows = values.shape[0]
    d = values.shape[1] // len(slots)
    acc = values.dtype
    zero = torch.zeros((), dtype=acc, device=values.device)
    has = count > 0

    def part(name: str) -> torch.Tensor:
        k = slot_index(slots, name)
        return values[:, k * d : (k + 1) * d]

    def weighted_sum() -> tuple[torch.Tensor, torch.Tensor]:
        if has_weights:
            return part("weighted"), wsum
        c = count.to(acc)
        return part("weighted"), c * (c + 1) / 2  # the eager forward's rank-weight total

    def maximum() -> tuple[torch.Tensor, torch.Tensor]:
        value = part("max")
        # A zero maximum as +0.0, as the kernels return it.
        return torch.where(has.unsqueeze(1) & (value != 0), value, zero), count.new_empty((rows, 0))

    # cls / last are gathered from the state's (rows, 2, d) tokens: first at "position" 0, last at 1.
    tokens = torch.stack(
        [part("first") if "first" in slots else values.new_zeros((rows, d)),
         part("last") if "last" in slots else values.new_zeros((rows, d))], dim=1,
    )  # fmt: skip
    ones = torch.ones_like(count)
    stats = torch.stack([count, torch.where(has, 0 * ones, -ones), torch.where(has, ones, -ones)])

    def gather(position: torch.Tensor) -> torch.Tensor:
        picked = tokens[torch.arange(rows, device=values.device), position.clamp(min=0)]
        return torch.where((position >= 0).unsqueeze(1), picked, zero)

    out, _, _, norms = eager.assemble_modes(
        names, stats, dtype, normalize_eps, plain_sum=lambda: part("sum"), weighted_sum=weighted_sum,
        maximum=maximum, gather=gather,
    )  # fmt: skip
    return out, norms


def _slabs(B: int, T: int, d: int, element_size: int):
    step = max(1, _SLAB_BYTES // max(1, B * d * element_size))
    for start in range(0, T, step):
        yield slice(start, min(T, start + step))


def state_backward(
    grad_values: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    modes: str,
) -> torch.Tensor:
    """(B, T) x d gradient of hidden in ``dtype`` from the gradient of a padded state's values: the
    sum's gradient at every real token, plus the weighted sum's times each token's weight (its rank
    in the chunk, or its user weight), plus the max's at its position and the first / last token's
    at theirs; summed in the accumulation dtype in that order and rounded once, slab by slab."""
    B = stats.shape[1]
    slots = state_slots(modes.split(","), weights is not None)
    d = grad_values.shape[1] // len(slots)
    device = grad_values.device
    acc = grad_values.dtype
    grad = torch.empty((B, T, d), dtype=dtype, device=device)
    if grad.numel() == 0:
        return grad
    count, first, last = stats
    real = real_tokens(mask)
    zero = torch.zeros((), dtype=acc, device=device)

    def part(name: str) -> torch.Tensor | None:
        k = slot_index(slots, name)
        return None if k < 0 else grad_values[:, k * d : (k + 1) * d]

    g_sum, g_weighted, g_max, g_first, g_last = map(part, ("sum", "weighted", "max", "first", "last"))
    w = None
    if g_weighted is not None:
        w = (
            token_ranks(real, B, T, device).to(acc)
            if weights is None
            else user_weights(weights, real, acc)[0]
        )
    keep = (count > 0).view(B, 1, 1)
    for span in _slabs(B, T, d, torch.finfo(acc).bits // 8):
        t = torch.arange(span.start, span.stop, device=device)
        v = torch.zeros((B, span.stop - span.start, d), dtype=acc, device=device)
        if g_sum is not None:
            v = v + g_sum.unsqueeze(1)
        if w is not None:
            v = v + w[:, span].unsqueeze(-1) * g_weighted.unsqueeze(1)
        inside = keep if real is None else keep & real[:, span].unsqueeze(-1)
        v = torch.where(inside, v, zero)
        if g_max is not None:
            v = v + torch.where(argmax.unsqueeze(1) == t.view(1, -1, 1), g_max.unsqueeze(1), zero)
        if g_first is not None:
            v = v + torch.where((first.unsqueeze(1) == t).unsqueeze(-1), g_first.unsqueeze(1), zero)
        if g_last is not None:
            v = v + torch.where((last.unsqueeze(1) == t).unsqueeze(-1), g_last.unsqueeze(1), zero)
        grad[:, span] = v.to(dtype)
    return grad
