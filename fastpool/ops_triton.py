"""The pooling kernels as ``torch.library.triton_op``s: what ``torch.compile`` traces on the Triton backend.

``fastpool::pool_fwd`` and friends (``fastpool.ops``) are opaque custom ops: a compiled graph calls
back into fastpool's Python launcher on every call. The ops here have the same signatures and
results but launch through ``torch.library.wrap_triton``, so when torch.compile traces them the
kernel launches themselves land in the graph (``triton_kernel_wrapper_functional`` nodes) and
Inductor launches the kernels with its own generated launcher: no fastpool Python per call, and
the graph is capturable as a CUDA graph (``mode="reduce-overhead"``).

``fastpool.ops._run`` picks them under torch.compile when the backend is "triton" and the kernels
are real (``ENABLED``: not the Triton interpreter, whose kernels cannot be traced; not turned off
with ``FASTPOOL_TRACED_OPS=0``). Eager calls keep the direct launch path (``fastpool.launchers``).
Traced launches differ from direct ones only in what a trace cannot hold: every buffer is allocated
by the graph (no cached workspaces), a long row always goes to one program per chunk (the grid
cannot depend on the device), packed offsets are not checked on the host (the kernels clamp them),
and the launch's register cap is not forwarded. The summation order, hence every bit of every
result, is the same.
"""

from __future__ import annotations

import os

import torch
from torch.library import triton_op

from . import launch
from .ops import Outputs, _backward, _setup_context
from .packed import check_size_limits


def enabled() -> bool:
    """Whether torch.compile should trace the triton ops (real kernels, not turned off); read once,
    at import, into ``ENABLED``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return os.environ.get("FASTPOOL_TRACED_OPS", "1").strip().lower() not in ("0", "false", "off", "no")


ENABLED = enabled()


def _launchers(packed: bool):
    from . import launchers, packed_launchers

    return packed_launchers if packed else launchers


@triton_op("fastpool::triton_pool_fwd", mutates_args=())
def triton_pool_fwd(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    modes: str,
    backend: str,
    normalize_eps: float,
    track_positions: bool,
    for_backward: bool,
) -> Outputs:
    """``fastpool::pool_fwd`` on the Triton kernels, traceable (``backend`` is "triton")."""
    check_size_limits(hidden.shape[0], hidden.shape[1], packed=False)
    with launch.fresh_buffers():
        return _launchers(False).pool_forward(
            hidden, mask, modes, weights, normalize_eps, track_positions, for_backward, trace=True
        )


@triton_op("fastpool::triton_packed_pool_fwd", mutates_args=())
def triton_packed_pool_fwd(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    weights: torch.Tensor | None,
    modes: str,
    backend: str,
    normalize_eps: float,
    track_positions: bool,
    for_backward: bool,
    max_seqlen: int,
    check_offsets: bool,
) -> Outputs:
    """``fastpool::packed_pool_fwd`` on the Triton kernels, traceable. ``check_offsets`` must be
    False (checking the offsets' values needs the host; ``fastpool.ops`` keeps those calls on the
    opaque op); ``max_seqlen`` is not used (a traced grid covers any segment length)."""
    if check_offsets:
        raise RuntimeError("fastpool: traced packed pooling cannot check offsets")
    check_size_limits(cu_seqlens.shape[0] - 1, hidden.shape[0], packed=True)
    with launch.fresh_buffers():
        return _launchers(True).pool_forward(
            hidden, cu_seqlens, modes, weights, None, normalize_eps, track_positions, for_backward, trace=True
        )


@triton_op("fastpool::triton_pool_bwd", mutates_args=())
def triton_pool_bwd(
    grad_out: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    wsum: torch.Tensor,
    prefix: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    modes: str,
    backend: str,
) -> torch.Tensor:
    """``fastpool::pool_bwd`` on the Triton kernel, traceable: the gradient of hidden (B, T, d)."""
    with launch.fresh_buffers():
        return _launchers(False).pool_backward(
            grad_out, mask, argmax, stats, T, dtype, modes, weights, wsum, prefix, trace=True
        )


@triton_op("fastpool::triton_packed_pool_bwd", mutates_args=())
def triton_packed_pool_bwd(
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    weights: torch.Tensor | None,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    wsum: torch.Tensor,
    N: int,
    dtype: torch.dtype,
    modes: str,
    backend: str,
    max_seqlen: int,
) -> torch.Tensor:
    """``fastpool::packed_pool_bwd`` on the Triton kernel, traceable: the gradient of hidden (N, d)."""
    with launch.fresh_buffers():
        return _launchers(True).pool_backward(
            grad_out, cu_seqlens, argmax, stats, N, dtype, modes, weights, None, wsum, trace=True
        )


@triton_op("fastpool::triton_weights_bwd", mutates_args=())
def triton_weights_bwd(
    grad_block: torch.Tensor,
    hidden: torch.Tensor,
    layout: torch.Tensor | None,
    weights: torch.Tensor,
    wsum: torch.Tensor,
    wmean: torch.Tensor,
    packed: bool,
    backend: str,
) -> torch.Tensor:
    """``fastpool::weights_bwd`` on the Triton kernel, traceable: the gradient of the user weights."""
    with launch.fresh_buffers():
        return _launchers(packed).weights_backward(
            grad_block, hidden, layout, weights, wsum, wmean, trace=True
        )


def _setup_traced_context(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.traced = True  # the backward goes through the triton ops too


triton_pool_fwd.register_autograd(_backward, setup_context=_setup_traced_context)
triton_packed_pool_fwd.register_autograd(_backward, setup_context=_setup_traced_context)

__all__ = [
    "ENABLED", "enabled", "triton_packed_pool_bwd", "triton_packed_pool_fwd", "triton_pool_bwd",
    "triton_pool_fwd",
    "triton_weights_bwd",
]  # fmt: skip
