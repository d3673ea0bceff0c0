"""The "torch" backend of global pooling: eager PyTorch with the kernels' semantics.

x is (B, C, *spatial) with any strides. Outputs as the Triton launchers': out (B, n_modes * C) in
x's dtype and argmax (B, C) int32, the logical (row-major) spatial index of the first maximum (NaN
counting as the maximum, its first occurrence), or (B, 0) without "max". No copy of x is made:
the mean is a ``sum`` over the spatial dims with a float32 (float64) accumulator (half precision
on CPU in chunks of samples, which torch widens to float32), the max one ``max`` per spatial dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .eager import accumulation_dtype

# On CPU, ``sum(dtype=float32)`` of a half-precision tensor first widens the whole input to float32:
# the mean sums chunks of samples so that temporary stays under this many bytes.
_WIDEN_CHUNK_BYTES = 32 * 2**20


def grad_strides(shape: Sequence[int], strides: Sequence[int]) -> list[int]:
    """Dense strides for the gradient of a tensor of ``shape`` and ``strides``: the same dimension
    order in memory (contiguous NCHW stays NCHW, channels_last stays channels_last; a sliced or
    expanded input gets the dense layout of its order), never overlapping."""
    order = sorted(range(len(shape)), key=lambda i: (-abs(strides[i]), i))  # outermost first
    out = [0] * len(shape)
    step = 1
    for i in reversed(order):
        out[i] = step
        step *= max(shape[i], 1)
    return out


def _max_and_index(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) max over the spatial dims and the int64 logical index of its first occurrence.

    One ``max`` over the flattened spatial dims when they are one strided axis (a view), else one
    per spatial dim, innermost first: each keeps the first of equal values (and the first NaN), so
    the outer ones pick the first row of the maximum in row-major order.
    """
    try:
        return x.view(x.shape[0], x.shape[1], -1).max(-1)
    except RuntimeError:  # spatial dims that are not one strided axis: no copy, reduce them one by one
        pass
    values, index = x.max(-1)
    span = x.shape[-1]
    while values.dim() > 2:
        size = values.shape[-1]
        values, outer = values.max(-1)
        index = outer * span + index.gather(-1, outer.unsqueeze(-1)).squeeze(-1)
        span *= size
    return values, index


def _spatial_sum(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, C) sum over the spatial dims in ``acc``, no (B, C, *spatial) widened copy on CPU."""
    dims = tuple(range(2, x.dim()))
    if x.dtype == acc or x.device.type == "cuda" or x.shape[0] == 0:
        return x.sum(dims, dtype=acc)  # CUDA reduces half precision into float32 without a copy
    rows = max(1, _WIDEN_CHUNK_BYTES // max(1, x[0].numel() * 4))
    return torch.cat([x[i : i + rows].sum(dims, dtype=acc) for i in range(0, x.shape[0], rows)])


def global_pool_forward(x: torch.Tensor, modes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, len(modes) * C) in x's dtype, argmax (B, C) int32 (or (B, 0) without "max").

    No spatial position (S = 0): the mean is NaN (0 / 0, as ``torch.mean``), the max NaN with index -1.
    """
    out, argmax = _forward(x, modes, need_index=True)
    if argmax is None:
        argmax = torch.empty((x.shape[0], 0), dtype=torch.int32, device=x.device)
    return out, argmax


def global_pool_values(x: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """``global_pool_forward``'s out alone (no gradient wanted): the max by ``amax``, several times
    faster than ``max`` with indices on CPU (only the backward needs the position)."""
    return _forward(x, modes, need_index=False)[0]


def _forward(
    x: torch.Tensor, modes: Sequence[str], need_index: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    acc = accumulation_dtype(x.dtype)
    dims = tuple(range(2, x.dim()))
    pieces = []
    argmax = None
    for mode in modes:
        if mode == "mean" and x.dtype == acc and S and x.is_cpu:
            # One op: torch's CPU mean is this very sum divided by S (same bits; CUDA's multiplies
            # by 1 / S instead).
            pieces.append(x.mean(dims))
        elif mode == "mean":
            pieces.append((_spatial_sum(x, acc) / S if S else x.new_full((B, C), math.nan)).to(x.dtype))
        elif S == 0 or x.numel() == 0:
            pieces.append(x.new_full((B, C), math.nan))
            argmax = torch.full((B, C), -1, dtype=torch.int32, device=x.device)
        elif not need_index:
            pieces.append(x.amax(dims))
        else:
            values, index = _max_and_index(x)
            pieces.append(values)
            argmax = index.to(torch.int32)
    out = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0].contiguous()
    return out, argmax


def global_pool_backward(
    grad_out: torch.Tensor,
    argmax: torch.Tensor,
    shape: Sequence[int],
    strides: Sequence[int],
    dtype: torch.dtype,
    modes: Sequence[str],
) -> torch.Tensor:
    """Gradient of x (``shape``, dense strides in x's memory order, ``dtype``) from grad_out
    (B, len(modes) * C): grad_mean / S at every position, plus grad_max at the saved argmax,
    computed in the accumulation dtype and rounded once. Differentiable in grad_out."""
    B, C = shape[:2]
    spatial = tuple(shape[2:])
    S = math.prod(spatial)
    acc = accumulation_dtype(dtype)
    grad = torch.empty_strided(
        tuple(shape), grad_strides(shape, strides), dtype=dtype, device=grad_out.device
    )
    if grad.numel() == 0:
        return grad
    blocks = dict(zip(modes, grad_out.split(C, dim=1), strict=True))
    base = blocks["mean"].to(acc) / S if "mean" in blocks else grad_out.new_zeros((B, C), dtype=acc)
    grad.copy_(base.to(dtype).view(B, C, *([1] * len(spatial))).expand(tuple(shape)))
    if "max" in blocks:
        peak = (base + blocks["max"].to(acc)).to(dtype)
        coords = torch.unravel_index(argmax.long(), spatial)
        b = torch.arange(B, device=grad.device).view(B, 1).expand(B, C)
        c = torch.arange(C, device=grad.device).view(1, C).expand(B, C)
        grad.index_put_((b, c, *coords), peak)
    return grad
