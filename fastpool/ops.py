"""Registration table: the ``fastpool::`` custom ops, their fake (meta) kernels and their autograd.

``torch.ops.fastpool.pool_fwd`` and ``pool_bwd`` are opaque to ``torch.compile`` (no graph break,
no tracing into Triton). Each takes the concrete backend ("triton" or "torch") as an argument, so
a compiled graph keeps the choice made when it was traced. Autograd is registered here and only
here: ``pool_fwd``'s backward is ``pool_bwd``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import eager

_BACKENDS = ("triton", "torch")


def _impl(backend: str):
    torch._check(backend in _BACKENDS, lambda: f"fastpool: unknown backend {backend!r}")
    if backend == "torch":
        return eager
    from . import launchers

    return launchers


@torch.library.custom_op("fastpool::pool_fwd", mutates_args=())
def pool_fwd(
    hidden: torch.Tensor, mask: Optional[torch.Tensor], modes: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused masked pooling. hidden (B, T, d); mask (B, T) or None; modes comma-separated, e.g. "mean,max".

    Returns out (B, len(modes) * d) in hidden's dtype, argmax (B, d) int32 when "max" is requested
    (else (B, 0)), and stats (3, B) int32: real-token count, first and last real position (-1 if none).
    """
    return _impl(backend).pool_forward(hidden, mask, modes.split(","))


@pool_fwd.register_fake
def _pool_fwd_fake(hidden, mask, modes, backend):
    B, _, d = hidden.shape
    names = modes.split(",")
    out = hidden.new_empty((B, len(names) * d))
    argmax = hidden.new_empty((B, d if "max" in names else 0), dtype=torch.int32)
    stats = hidden.new_empty((3, B), dtype=torch.int32)
    return out, argmax, stats


@torch.library.custom_op("fastpool::pool_bwd", mutates_args=())
def pool_bwd(
    grad_out: torch.Tensor,
    mask: Optional[torch.Tensor],
    argmax: torch.Tensor,
    stats: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    modes: str,
    backend: str,
) -> torch.Tensor:
    """Gradient of hidden, (B, T, d) in ``dtype``, from grad_out (B, len(modes) * d)."""
    return _impl(backend).pool_backward(grad_out, mask, argmax, stats, T, dtype, modes.split(","))


@pool_bwd.register_fake
def _pool_bwd_fake(grad_out, mask, argmax, stats, T, dtype, modes, backend):
    B = stats.shape[1]
    return grad_out.new_empty((B, T, grad_out.shape[1] // len(modes.split(","))), dtype=dtype)


def _setup_context(ctx, inputs, output):
    hidden, mask, modes, backend = inputs
    _, argmax, stats = output
    ctx.save_for_backward(mask, argmax, stats)
    ctx.T = hidden.shape[1]
    ctx.dtype = hidden.dtype
    ctx.modes = modes
    ctx.backend = backend


def _backward(ctx, grad_out, _grad_argmax, _grad_stats):
    mask, argmax, stats = ctx.saved_tensors
    grad_hidden = None
    if ctx.needs_input_grad[0]:
        grad_hidden = pool_bwd(grad_out, mask, argmax, stats, ctx.T, ctx.dtype, ctx.modes, ctx.backend)
    return grad_hidden, None, None, None


pool_fwd.register_autograd(_backward, setup_context=_setup_context)
