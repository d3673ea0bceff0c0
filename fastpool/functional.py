"""Public pooling functions: validate at the boundary, pick the backend, call the custom op.

Semantics shared by every function and every backend
------------------------------------------------------
hidden : (B, T, d) tensor, float16 / bfloat16 / float32 / float64, any strides (never copied).
mask : (B, T) tensor of any real dtype (bool, integer or float) on hidden's device, or None.
    Nonzero means "real token" (NaN counts as nonzero, -0.0 as zero); None means every token is
    real. Whatever padding holds (NaN and inf included) never influences an output or a gradient.
Accumulation is float32 (float64 for float64 input), token counts are exact integers, and the
output is cast to hidden's dtype once. A row with no real token pools to zeros in every mode and
passes zero gradient; its max index is -1. Empty dimensions give correctly shaped results.

Packed (variable-length) input
------------------------------
Every function also takes a packed batch: ``hidden`` (N, d) or (1, N, d) holding S sequences back
to back, with ``cu_seqlens`` (S + 1,) int32/int64 offsets (flash-attention's convention; sequence
s is ``hidden[cu_seqlens[s]:cu_seqlens[s + 1]]``) and optionally ``max_seqlen`` (a Python int,
an upper bound on the lengths). A ``torch.nested`` jagged tensor (S, j, d) is accepted in place
of hidden and cu_seqlens. The output is dense, (S, n_modes * d), and equals the padded result of
the same sequences right-padded; max indices are global token indices into the N axis. Empty
sequences pool to zeros (index -1). Without ``max_seqlen`` (or on CPU) the offsets are checked
on the host, one sync; with it, CUDA tensors run without any host-device sync (see
``fastpool.packed.validate_packed``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal, overload

import torch

from . import express, express_packed, ops
from .backend import resolve_backend
from .limits import FLOAT_DTYPES, MASK_DTYPES, MAX_BATCH, MAX_SEQUENCE_LENGTH
from .modes import normalize_modes
from .packed import check_dense, check_size_limits, resolve_negatives, validate_packed

_STRIDED = torch.strided
_is_compiling = torch.compiler.is_compiling


def _validate(hidden: object, mask: object) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor of shape (B, T, d), got {type(hidden).__name__}")
    # Inline tests on the common path (host cost); the helpers raise, or handle symbolic sizes.
    if hidden.layout is not _STRIDED:
        check_dense("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(
            f"hidden: expected 3 dimensions (B, T, d), got {hidden.dim()} with shape {tuple(hidden.shape)}"
        )
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden: expected dtype float16, bfloat16, float32 or float64, got {hidden.dtype}")
    B, T, _ = hidden.shape
    # Under torch.compile / torch.export the sizes may be symbolic: any comparison here would become a
    # shape guard, so only the op checks them, on concrete sizes.
    if not _is_compiling() and (
        type(B) is not int or type(T) is not int or B >= MAX_BATCH or T > MAX_SEQUENCE_LENGTH
    ):
        check_size_limits(B, T, packed=False)
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor of shape (B, T) or None, got {type(mask).__name__}")
    if mask.layout is not _STRIDED:
        check_dense("mask", mask)
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(
            f"mask: expected a bool, integer, float16, bfloat16, float32 or float64 dtype, got {mask.dtype}"
        )
    if mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"mask: expected shape (B, T) = {tuple(hidden.shape[:2])} to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    if not _same_device(mask, hidden):
        raise ValueError(f"mask: expected device {hidden.device} (hidden's device), got {mask.device}")


def _same_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Cheap tests first (``.device`` builds an object per access, a share of a small call's host cost):
    # both on the CPU, or both on the same CUDA device; anything else compares the devices.
    if a.is_cpu and b.is_cpu:
        return True
    if a.is_cuda and b.is_cuda:
        return a.get_device() == b.get_device()
    return a.device == b.device


def _validate_weights(hidden: torch.Tensor, weights: object, modes: tuple[str, ...]) -> None:
    if weights is None:
        return
    if "weighted_mean" not in modes:
        raise ValueError(
            f"weights: expected mode 'weighted_mean' among the modes (they weight it), got {list(modes)}"
        )
    if not isinstance(weights, torch.Tensor):
        raise TypeError(
            f"weights: expected a torch.Tensor of shape (B, T) or None, got {type(weights).__name__}"
        )
    if weights.layout is not _STRIDED:
        check_dense("weights", weights)
    if weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weights: expected dtype float16, bfloat16, float32 or float64, got {weights.dtype}")
    expected = tuple(hidden.shape[:2])
    if tuple(weights.shape) != expected:
        raise ValueError(
            f"weights: expected shape (B, T) = {expected} to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != hidden.device:
        raise ValueError(f"weights: expected device {hidden.device} (hidden's device), got {weights.device}")


def _pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    modes: tuple[str, ...],
    weights: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    normalize_eps: float = -1.0,
    return_indices: bool = False,
) -> tuple[torch.Tensor, ...]:
    joined = modes[0] if len(modes) == 1 else ",".join(modes)
    # A padded call with one output whose signature was seen before: validated and planned then.
    repeatable = cu_seqlens is None and weights is None and normalize_eps < 0 and not return_indices
    if repeatable and max_seqlen is None:
        out = express.pool(hidden, mask, joined)
        if out is not None:
            return (out,)
    packed = cu_seqlens is not None or (isinstance(hidden, torch.Tensor) and hidden.is_nested)
    if not packed:
        if max_seqlen is not None:
            raise ValueError(f"max_seqlen: expected None without cu_seqlens, got {max_seqlen!r}")
        _validate(hidden, mask)
        if weights is not None:
            _validate_weights(hidden, weights, modes)
        hidden, mask, weights = resolve_negatives(hidden, mask, weights)
        backend = resolve_backend(hidden.device)
        outputs = ops.pool_forward(hidden, mask, weights, joined, backend, normalize_eps, return_indices)
        if repeatable and backend == "triton":
            express.learn(hidden, mask, joined)
        return outputs
    if mask is None and weights is None and normalize_eps < 0 and not return_indices and len(modes) == 1:
        # A CPU inference call of one mean or max: checked and pooled in a few steps (else None).
        out = express_packed.pool(hidden, cu_seqlens, max_seqlen, joined)
        if out is not None:
            return (out,)
    if weights is not None and "weighted_mean" not in modes:
        raise ValueError(f"weights: expected mode 'weighted_mean' among the modes, got {list(modes)}")
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    backend = resolve_backend(device)
    batch = validate_packed(hidden, mask, cu_seqlens, max_seqlen, weights, backend)
    return ops.packed_pool_forward(
        batch.hidden, batch.cu_seqlens, batch.weights, joined, backend, batch.max_seqlen, normalize_eps,
        batch.check_offsets, return_indices,
    )  # fmt: skip


def pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str | Sequence[str] = "mean",
    *,
    weights: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    normalize: bool = False,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Pool (B, T, d) hidden states (or a packed batch) to (B, d) vectors in one pass over hidden.

    Parameters
    ----------
    hidden : Tensor (B, T, d), float16 / bfloat16 / float32 / float64, any strides.
    mask : Tensor (B, T) of bool, integer or float dtype (nonzero = real token), or None.
    mode : "mean", "max", "cls", "last", "mean_sqrt_len" (the sum over real tokens divided by
        the square root of their number) or "weighted_mean" (see ``weighted_mean_pool``), or a
        sequence of them. With a sequence the outputs are concatenated along the feature
        dimension in that order, (B, len(mode) * d), and hidden is still read once.
    weights : Tensor (B, T) float16 / bfloat16 / float32 / float64, or None. Token weights of
        "weighted_mean" (only allowed when that mode is requested); None means position weights.
        (N,) for a packed batch.
    cu_seqlens, max_seqlen : a packed batch instead of a padded one (see the module docstring):
        hidden (N, d) or (1, N, d), cu_seqlens (S + 1,) int32/int64, max_seqlen int or None.
    normalize, eps : when ``normalize``, each output row (all modes together) is divided by
        ``max(||row||_2, eps)`` as ``torch.nn.functional.normalize`` does, from the unrounded
        float32 values and rounded once. On the Triton backend this is the forward kernel's row
        epilogue (same launch), at any width and in every dtype.

    Returns
    -------
    Tensor (B, d) or (B, len(mode) * d) in hidden's dtype. Differentiable with respect to hidden
    and to ``weights``.
    """
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number (float, int or NumPy scalar), got {type(eps).__name__}")
    if not eps >= 0:  # also rejects NaN
        raise ValueError(f"eps: expected a non-negative finite floor, got {float(eps)!r}")
    normalize_eps = float(eps) if normalize else -1.0
    return _pool(hidden, mask, normalize_modes(mode), weights, cu_seqlens, max_seqlen, normalize_eps)[0]


def mean_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Masked mean over real tokens: (B, T, d) -> (B, d) in hidden's dtype (or packed (N, d) -> (S, d)).

    Sums in float32 (float64 for float64 input), divides by the exact number of real tokens.
    A row with no real token gives zeros. Gradient: ``grad / count`` at each real token, 0 at padding.
    """
    return _pool(hidden, mask, ("mean",), None, cu_seqlens, max_seqlen)[0]


@overload
def max_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    return_indices: Literal[False] = False,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor: ...
@overload
def max_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    return_indices: Literal[True],
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def max_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    return_indices: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Masked element-wise max over real tokens: (B, T, d) -> (B, d) in hidden's dtype.

    Among equal maxima the first position wins, for the index and for the gradient (the whole
    gradient goes to that one position). NaN in a real token wins (as in ``torch.max``; the first
    NaN's position is returned). A row with no real token gives 0 and index -1.

    Returns values, or ``(values, indices)`` with indices (B, d) int64 positions along T when
    ``return_indices`` is True (global token indices into N for a packed batch).
    """
    outputs = _pool(hidden, mask, ("max",), None, cu_seqlens, max_seqlen, -1.0, return_indices)
    if return_indices:
        return outputs[0], outputs[1].to(torch.int64)
    return outputs[0]


def cls_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """The first real token of each row: (B, T, d) -> (B, d).

    Position 0 when mask is None or right-padded, the first real position under left padding or
    holes. Zeros for a row with no real token. Gradient goes to that one token.
    """
    return _pool(hidden, mask, ("cls",), None, cu_seqlens, max_seqlen)[0]


def last_token_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """The last real token of each row: (B, T, d) -> (B, d).

    Works for right padding, left padding and holes. Zeros for a row with no real token.
    Gradient goes to that one token.
    """
    return _pool(hidden, mask, ("last",), None, cu_seqlens, max_seqlen)[0]


def weighted_mean_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Weighted mean over real tokens: (B, T, d) -> (B, d) in hidden's dtype.

    ``sum_t w_t * hidden[b, t] / sum_t w_t`` over the real tokens of each row, accumulated in
    float32 (float64 for float64 input). With ``weights=None`` the weight of a real token is its
    rank in the row (1, 2, 3, ... counting real tokens only, whatever the padding side), computed
    in float32 so it neither overflows in float16 nor rounds in bfloat16 (exact to 2**24 tokens).
    With ``weights`` (B, T) float, those are the weights; their values at padding are ignored
    (NaN included), and they may be negative. A row with no real token, or whose weights sum to
    exactly 0, gives zeros and passes zero gradient.

    Gradient: ``grad * w_t / W`` to hidden at real tokens; ``(grad . (hidden[b, t] - out[b])) / W``
    to the weights at real tokens (0 at padding).
    """
    return _pool(hidden, mask, ("weighted_mean",), weights, cu_seqlens, max_seqlen)[0]
