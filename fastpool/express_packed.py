"""CPU packed inference calls of one mean or one max: checked and pooled with the fewest host steps.

A packed call on the eager backend spends most of its fixed cost in Python and NumPy: the general
path validates at the boundary (``packed.validate_packed``), dispatches through the custom op's
autograd choice (``ops.packed_pool_forward``) and builds outputs nobody reads. Once the pass over
hidden has evicted the interpreter's data from the core's cache, every such step costs several times
its warm time: ~190 us of fixed cost per call against the index_add idiom's ~130 us (3170 tokens,
d = 1, bench/NOTES.md CPU v2.7). ``pool`` serves the common inference call -- plain CPU tensors,
one "mean" or one "max", no gradient wanted, no weights, normalisation or returned indices -- with
the checks of the general path as cheap tests and the general path's own arithmetic
(``eager_packed.pool_lone``): the same bits. Anything it does not serve, and every input the
general path would reject, returns None, and the caller takes the general path (which raises).
"""

from __future__ import annotations

import torch
from torch._C import _functorch
from torch.autograd import forward_ad

from .backend import requested_backend
from .eager_packed import pool_lone
from .limits import FLOAT_DTYPES, MAX_BATCH, MAX_SEQUENCE_LENGTH
from .packed import OFFSET_DTYPES

_Tensor = torch.Tensor
_is_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_is_wrapped = _functorch.is_functorch_wrapped_tensor


def pool(hidden: object, cu_seqlens: object, max_seqlen: object, modes: str) -> torch.Tensor | None:
    """``fastpool.pool(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, mode=modes)`` for a
    CPU inference call: out (S, d) in hidden's dtype, or None when the call takes the general path.

    hidden (N, d) float and cu_seqlens (S + 1,) int32/int64 contiguous, plain CPU tensors;
    max_seqlen None or a non-negative int (a hint: the offsets are checked either way); modes
    "mean" or "max". No user weights, normalisation or returned indices (the caller checks)."""
    if (
        (modes != "mean" and modes != "max")
        or type(hidden) is not _Tensor
        or type(cu_seqlens) is not _Tensor
        or _is_compiling()
        or not hidden.is_cpu
        or not cu_seqlens.is_cpu
        or hidden.layout is not torch.strided
        or hidden.is_nested
        or hidden.dtype not in FLOAT_DTYPES
        or cu_seqlens.dtype not in OFFSET_DTYPES
        or hidden.dim() != 2
        or cu_seqlens.dim() != 1
        or (hidden.requires_grad and _is_grad_enabled())
        or (max_seqlen is not None and (type(max_seqlen) is not int or max_seqlen < 0))
    ):
        return None
    N, d = hidden.shape
    S = cu_seqlens.shape[0] - 1
    # Empty shapes, negative views, torch.func and forward-mode AD, the Triton interpreter asked for:
    # the general path.
    if (
        N == 0
        or d == 0
        or S <= 0
        or S >= MAX_BATCH
        or N > MAX_SEQUENCE_LENGTH
        or hidden.is_neg()
        or not cu_seqlens.is_contiguous()
        or _functorch_active()
        or forward_ad._current_level >= 0
        or _is_wrapped(hidden)
        or _is_wrapped(cu_seqlens)
        or requested_backend() == "triton"
    ):
        return None
    host = cu_seqlens.numpy()
    # Well formed (the general path's check_offsets): from 0 to N, never decreasing.
    if host[0] != 0 or host[-1] != N or (host[1:] < host[:-1]).any():
        return None
    return pool_lone(hidden, cu_seqlens, host, modes)
