"""Public global pooling of feature maps: ``fastpool.global_pool``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import ops_global_pool
from .backend import resolve_backend
from .limits import FLOAT_DTYPES, MAX_SEQUENCE_LENGTH
from .packed import resolve_negative

GLOBAL_MODES = ("mean", "max")


def _validate_modes(mode: object) -> tuple[str, ...]:
    if type(mode) is str and mode in GLOBAL_MODES:  # the common call, first (host cost)
        return (mode,)
    names = (mode,) if isinstance(mode, str) else mode
    if not isinstance(names, Sequence) or not all(isinstance(m, str) for m in names):
        raise TypeError(
            f"mode: expected 'mean', 'max' or a sequence of them, got {type(mode).__name__} {mode!r}"
        )
    if len(names) == 0:
        raise ValueError("mode: expected 'mean', 'max' or a sequence of them, got an empty sequence")
    for name in names:
        if name not in GLOBAL_MODES:
            raise ValueError(f"mode: expected 'mean' or 'max', got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"mode: expected each mode at most once, got {list(names)}")
    return tuple(names)


def _validate(x: object, modes: tuple[str, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape (B, C, *spatial), got {type(x).__name__}")
    if x.dim() not in (3, 4, 5):
        raise ValueError(
            f"x: expected 3, 4 or 5 dimensions, (B, C, L), (B, C, H, W) or (B, C, D, H, W), "
            f"got shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    S = math.prod(x.shape[2:])
    if S > MAX_SEQUENCE_LENGTH:
        raise ValueError(f"x: expected at most {MAX_SEQUENCE_LENGTH} spatial positions, got {S}")
    if S == 0 and "max" in modes and x.shape[0] * x.shape[1] > 0:
        raise ValueError(
            f"x: mode 'max' needs at least one spatial position (as torch.amax), got shape {tuple(x.shape)}"
        )


def global_pool(x: torch.Tensor, mode: str | Sequence[str] = "mean") -> torch.Tensor:
    """Global average and/or max pooling of a feature map over all its spatial positions.

    Parameters
    ----------
    x : (B, C, L), (B, C, H, W) or (B, C, D, H, W), float16, bfloat16, float32 or float64, any
        strides and memory format (contiguous, ``channels_last``, ``channels_last_3d``, slices,
        transposes). Never copied.
    mode : "mean", "max", or a sequence of them: their (B, C) results concatenated along dim 1 in
        that order, x read once.

    Returns
    -------
    (B, C) or (B, len(mode) * C) in x's dtype. "mean" equals ``x.flatten(2).mean(-1)`` (and
    ``nn.AdaptiveAvgPool{1,2,3}d(1)`` flattened), summed in float32 (float64 for float64 input) and
    rounded once; "max" equals ``x.flatten(2).amax(-1)``, NaN propagating. With no spatial position
    the mean is NaN, as in torch, and "max" raises ``ValueError``, as ``torch.amax`` raises.

    Gradient: grad / S at every position for the mean; for the max the whole gradient goes to the
    first maximum in row-major spatial order (the first NaN when there is one), as ``torch.max``
    and unlike ``amax``, which splits it among ties. The gradient is dense, in x's memory order
    (channels_last in, channels_last out).

    Determinism and batch invariance: no atomics; a sample's result depends only on its own values,
    C, the spatial shape, the dtype, the memory layout and the mode list, never on the other
    samples, the batch size or the device's multiprocessor count (the Triton kernels split a long
    spatial extent into chunks fixed by those alone and fold them in order).
    """
    modes = _validate_modes(mode)
    _validate(x, modes)
    x = resolve_negative(x)
    return ops_global_pool.global_pool_forward(x, ",".join(modes), resolve_backend(x.device))
