"""Mergeable partial pooling states: pool a sequence chunk by chunk, merge, finish.

``pool_partial(hidden_chunk, mask_chunk, mode, start=...)`` pools one chunk of the sequence axis into
a ``PoolState``: per row, what the forward kernel folds (the float32 sum, or float64 for float64
input; the rank-weighted sum with ranks counted from 1 at the chunk's first real token, or the
user-weighted sum and the weights' sum; the real-token count; the first and last real positions,
global, and those tokens' values; the maximum and its global position). ``merge([s0, s1, ...])``
folds states of consecutive chunks in token order with the kernel's own chunk fold
(``kernels.pool_forward._fold_chunk``): ``sum = a.sum + b.sum``, ``weighted = (a.weighted +
b.weighted) + (a.count * b.sum if a.count > 0 else 0)`` (b's ranks shifted by a's real tokens), the
first / last of the first / last state that has real tokens, the maximum whose position comes first
among equal values (NaN wins). ``state.finish()`` turns a state into ``fastpool.pool``'s output.

Results equal one-shot pooling of all the tokens within the dtype's tolerance; selections (max values
and indices, cls, last) exactly. Gradients flow through ``merge`` and ``finish`` to every chunk's
hidden and weights.

Bit-identical to one-shot ``fastpool.pool`` (Triton backend). The kernel cuts each row into chunks of
``CHUNK`` (256) positions counted from the row's first real token, sums each chunk on its own and
folds the chunk sums in order, each chunk into the running row total. ``merge`` repeats that fold with
the same IEEE operations, and ``finish`` runs the kernel's own epilogue. So merged states give the
one-shot bits when, for each row:

1. no kernel chunk's real tokens are split between two states (state boundaries fall between the last
   real token of one kernel chunk and the first real token of the next: for example at multiples of
   CHUNK from the row's first real token), and
2. every state after the first one that holds a real token holds the real tokens of at most one
   kernel chunk (a state without real tokens is neutral anywhere).

The first state may hold any number of chunks (it is folded by the kernel itself). Right-padded and
unpadded rows have their first real token at 0: chunk-sized pieces ``hidden[:, k*256:(k+1)*256]``
merged onto a first piece of any multiple of 256 qualify. Otherwise (other boundaries, several chunks
in a later state, rows whose first real tokens differ so that no common boundary fits every row) the
result is within tolerance. On the torch backend a state's sum and maximum come from the eager
backend's own reductions and ``finish`` from its ``assemble_modes``: a state of a whole sequence
finishes to eager one-shot bits; merged states agree within tolerance (bit for bit only where the
eager backend's summation order allows, see the README).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from . import ops_partial
from .backend import resolve_backend
from .functional import _validate, _validate_weights
from .modes import normalize_modes
from .packed import resolve_negatives
from .state_layout import slot_index, state_slots

_SLOT_NAMES = ("sum", "weighted", "max", "first", "last")


class PoolState:
    """The partial pooling state of some consecutive tokens of B rows (see the module docstring).

    Attributes
    ----------
    modes : tuple of str, the modes ``finish`` returns (in that order).
    has_weights : bool, whether weighted_mean uses user weights.
    dtype : the output dtype (hidden's).
    backend : "triton" or "torch", the backend that computed it and finishes it.
    values : Tensor (B, n_slots * d) float32 (float64 for float64 input): the sum, weighted sum, raw
        maximum, first and last tokens that ``modes`` need, side by side (``state_layout``).
    weight_sum : Tensor (B,) or None, the user weights' sum over the real tokens.
    count : Tensor (B,) int64, real tokens. first, last : (B,) int64 global positions (-1: none).
    max_index : Tensor (B, d) int64 global position of each maximum (-1: none), or None.
    span : (start, end) global positions of the tokens covered when ``start`` was an int, else None.
    """

    __slots__ = ("modes", "has_weights", "dtype", "backend", "values", "weight_sum", "count", "first", "last",
                 "max_index", "span")  # fmt: skip

    def __init__(
        self,
        modes: tuple[str, ...],
        has_weights: bool,
        dtype: torch.dtype,
        backend: str,
        values: torch.Tensor,
        weight_sum: torch.Tensor | None,
        count: torch.Tensor,
        first: torch.Tensor,
        last: torch.Tensor,
        max_index: torch.Tensor | None,
        span: tuple[int, int] | None,
    ):
        self.modes = modes
        self.has_weights = has_weights
        self.dtype = dtype
        self.backend = backend
        self.values = values
        self.weight_sum = weight_sum
        self.count = count
        self.first = first
        self.last = last
        self.max_index = max_index
        self.span = span

    @property
    def slots(self) -> tuple[str, ...]:
        return state_slots(self.modes, self.has_weights)

    @property
    def d(self) -> int:
        return self.values.shape[1] // len(self.slots)

    @property
    def batch_size(self) -> int:
        return self.count.shape[0]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def part(self, name: str) -> torch.Tensor | None:
        """The (B, d) block of one slot ("sum", "weighted", "max", "first", "last"), None if not kept."""
        if name not in _SLOT_NAMES:
            raise ValueError(f"name: expected one of {_SLOT_NAMES}, got {name!r}")
        k = slot_index(self.slots, name)
        if k < 0:
            return None
        d = self.d
        return self.values[:, k * d : (k + 1) * d]

    def finish(
        self, normalize: bool = False, eps: float = 1e-12, return_indices: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The pooled output of the tokens this state covers: what ``fastpool.pool(hidden, mask,
        mode, weights=..., normalize=..., eps=...)`` returns for all of them, (B, n_modes * d) in the
        hidden dtype. ``return_indices`` (needs "max" among the modes): also the (B, d) int64 global
        positions of the maxima (-1 for a row without real token). Differentiable."""
        _check_normalize(normalize, eps)
        if not isinstance(return_indices, bool):
            raise TypeError(f"return_indices: expected a bool, got {type(return_indices).__name__}")
        if return_indices and "max" not in self.modes:
            raise ValueError(f"return_indices: expected mode 'max' among the modes, got {list(self.modes)}")
        acc = self.values.dtype
        wsum = self.weight_sum if self.has_weights else torch.empty((0,), dtype=acc, device=self.device)
        out, _ = ops_partial.partial_finish(
            self.values, self.count, wsum, ",".join(self.modes), self.backend, self.dtype, self.has_weights,
            float(eps) if normalize else -1.0,
        )  # fmt: skip
        if return_indices:
            return out, self.max_index.clone()
        return out

    def __repr__(self) -> str:
        return (
            f"PoolState(modes={list(self.modes)}, batch={self.batch_size}, d={self.d}, dtype={self.dtype}, "
            f"backend={self.backend!r}, span={self.span})"
        )


def _check_normalize(normalize: object, eps: object) -> None:
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number (float, int or NumPy scalar), got {type(eps).__name__}")
    if not eps >= 0:  # also rejects NaN
        raise ValueError(f"eps: expected a non-negative finite floor, got {float(eps)!r}")


def _check_start(start: object, hidden: torch.Tensor) -> int | torch.Tensor:
    """``start`` as an int >= 0 or a (B,) int64 tensor of values >= 0 on hidden's device."""
    B = hidden.shape[0]
    if isinstance(start, numbers.Integral) and not isinstance(start, bool):
        if start < 0:
            raise ValueError(f"start: expected a position >= 0, got {int(start)}")
        return int(start)
    if not isinstance(start, torch.Tensor):
        raise TypeError(f"start: expected an int or a (B,) int64 tensor, got {type(start).__name__}")
    if start.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"start: expected an int64 tensor, got dtype {start.dtype}")
    if tuple(start.shape) != (B,):
        raise ValueError(f"start: expected shape (B,) = ({B},), got {tuple(start.shape)}")
    if start.device != hidden.device:
        raise ValueError(f"start: expected device {hidden.device} (hidden's device), got {start.device}")
    if B and not torch.compiler.is_compiling() and bool((start < 0).any()):
        raise ValueError(f"start: expected positions >= 0, got a minimum of {int(start.min())}")
    return start.to(torch.int64)


def pool_partial(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str | Sequence[str] = "mean",
    *,
    weights: torch.Tensor | None = None,
    start: int | torch.Tensor = 0,
) -> PoolState:
    """Pool one chunk of the sequence axis into a mergeable ``PoolState``.

    Parameters
    ----------
    hidden : Tensor (B, t, d), float16 / bfloat16 / float32 / float64, any strides: the tokens
        [start, start + t) of each row.
    mask : Tensor (B, t) (nonzero = real token), or None (every token real), as ``fastpool.pool``.
    mode : a mode or a list of modes, as ``fastpool.pool``.
    weights : Tensor (B, t) float or None: weighted_mean's user weights for these tokens.
    start : int, or Tensor (B,) int64: the global position of the chunk's first column in each row.
        Max indices and the first / last positions of the state are global (``start`` + local).

    Returns
    -------
    PoolState, to ``fastpool.merge`` with the states of the other chunks (in token order) and
    ``finish``. A chunk with no real token (or t = 0) gives an empty state, neutral in a merge.
    The state is differentiable with respect to hidden and weights.
    """
    modes = normalize_modes(mode)
    _validate(hidden, mask)
    _validate_weights(hidden, weights, modes)
    hidden, mask, weights = resolve_negatives(hidden, mask, weights)
    begin = _check_start(start, hidden)
    backend = resolve_backend(hidden.device)
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or (weights is not None and weights.requires_grad)
    )
    values, argmax, stats, wsum, _ = ops_partial.partial_fwd(
        hidden, mask, weights, ",".join(modes), backend, wants_grad
    )
    count, first, last = stats.to(torch.int64)
    has = count > 0
    minus_one = torch.full((), -1, dtype=torch.int64, device=hidden.device)
    first = torch.where(has, first + begin, minus_one)
    last = torch.where(has, last + begin, minus_one)
    max_index = None
    if "max" in modes:
        offset = begin if isinstance(begin, int) else begin.unsqueeze(1)
        max_index = torch.where(argmax >= 0, argmax.to(torch.int64) + offset, minus_one)
    span = (begin, begin + hidden.shape[1]) if isinstance(begin, int) else None
    return PoolState(
        modes, weights is not None, hidden.dtype, backend, values, wsum if weights is not None else None,
        count, first, last, max_index, span,
    )  # fmt: skip


def _fold(a: PoolState, b: PoolState) -> PoolState:
    """State a followed by state b: the forward kernel's chunk fold (``_fold_chunk``), op for op."""
    acc = a.values.dtype
    zero = torch.zeros((), dtype=acc, device=a.device)
    a_has, b_has = (a.count > 0).unsqueeze(1), (b.count > 0).unsqueeze(1)
    parts = []
    max_index = None
    for slot in a.slots:
        x, y = a.part(slot), b.part(slot)
        if slot == "sum":
            parts.append(x + y)
        elif slot == "weighted":
            weighted = x + y
            if not a.has_weights:
                # b's ranks were counted from 1: shift them by a's real tokens (no shift without
                # any: 0 * a sum holding inf would be NaN).
                shift = a.count.to(acc).unsqueeze(1) * b.part("sum")
                weighted = weighted + torch.where(a_has, shift, zero)
            parts.append(weighted)
        elif slot == "max":
            # b's positions come after a's: b wins only when strictly larger, or NaN over a number,
            # or where a has nothing (the first NaN / first of equal maxima wins, as in the kernel).
            take = (b.max_index >= 0) & ((y > x) | (torch.isnan(y) & ~torch.isnan(x)) | (a.max_index < 0))
            parts.append(torch.where(take, y, x))
            max_index = torch.where(take, b.max_index, a.max_index)
        elif slot == "first":
            parts.append(torch.where(a_has, x, y))
        else:
            parts.append(torch.where(b_has, y, x))
    values = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    a_has, b_has = a_has.squeeze(1), b_has.squeeze(1)
    span = None
    if a.span is not None and b.span is not None:
        span = (a.span[0], b.span[1])
    return PoolState(
        a.modes, a.has_weights, a.dtype, a.backend, values,
        a.weight_sum + b.weight_sum if a.has_weights else None, a.count + b.count,
        torch.where(a_has, a.first, b.first), torch.where(b_has, b.last, a.last), max_index, span,
    )  # fmt: skip


def merge(states: Sequence[PoolState]) -> PoolState:
    """Merge the states of consecutive chunks, given in token order, into the state of all of them.

    Every state must come from ``pool_partial`` calls with the same modes, user weights or not, hidden
    dtype, batch size, d, device and backend. States whose ``start`` was an int must not overlap or
    go backwards (gaps are allowed: the tokens in a gap are simply not pooled). A left fold: merge([a,
    b, c]) == merge([merge([a, b]), c]); see the module docstring for when the result is bit-identical
    to one-shot pooling. Differentiable.
    """
    if isinstance(states, PoolState) or not isinstance(states, Sequence):
        raise TypeError(f"states: expected a sequence of PoolState, got {type(states).__name__}")
    if len(states) == 0:
        raise ValueError("states: expected at least one PoolState, got an empty sequence")
    for i, state in enumerate(states):
        if not isinstance(state, PoolState):
            raise TypeError(f"states: expected PoolState items, got {type(state).__name__} at index {i}")
    ref = states[0]
    signature = (ref.modes, ref.has_weights, ref.dtype, ref.backend, ref.batch_size, ref.d, ref.device)
    for i, state in enumerate(states[1:], 1):
        other = (state.modes, state.has_weights, state.dtype, state.backend, state.batch_size, state.d,
                 state.device)  # fmt: skip
        if other != signature:
            names = ("modes", "has_weights", "dtype", "backend", "batch size", "d", "device")
            diff = [f"{n} {a!r} vs {b!r}" for n, a, b in zip(names, signature, other, strict=True) if a != b]
            raise ValueError(
                f"states: expected states of the same pooling (modes, weights, dtype, backend, batch, d, "
                f"device), got state {i} differing from state 0 in {', '.join(diff)}"
            )
    result = ref
    for i, state in enumerate(states[1:], 1):
        if result.span is not None and state.span is not None and state.span[0] < result.span[1]:
            raise ValueError(
                f"states: expected consecutive chunks in token order, got state {i} starting at position "
                f"{state.span[0]}, before the end {result.span[1]} of the states before it"
            )
        result = _fold(result, state)
    return result
