"""Registration table of attention pooling: ``fastpool::attention_pool_fwd`` / ``_bwd``, their fake
kernels and their autograd. Each op takes the concrete backend ("triton" or "torch") as an argument,
so a compiled graph keeps the choice made when it was traced.
"""

from __future__ import annotations

import torch

from . import eager_attention
from .eager import accumulation_dtype

_BACKENDS = ("triton", "torch")


def _impl(backend: str):
    torch._check(backend in _BACKENDS, lambda: f"fastpool: unknown backend {backend!r}")
    if backend == "torch":
        return eager_attention
    from . import attention_launchers

    return attention_launchers


@torch.library.custom_op("fastpool::attention_pool_fwd", mutates_args=())
def attention_pool_fwd(
    hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, T, d), scores (B, T, H), mask (B, T) or None -> out (B, d) in hidden's dtype,
    softmax max and sum (B, H) in the accumulation dtype."""
    return _impl(backend).attention_pool_forward(hidden, scores, mask)


@attention_pool_fwd.register_fake
def _fwd_fake(hidden, scores, mask, backend):
    B, _, d = hidden.shape
    H = scores.shape[2]
    acc = accumulation_dtype(hidden.dtype)
    return hidden.new_empty((B, d)), hidden.new_empty((B, H), dtype=acc), hidden.new_empty((B, H), dtype=acc)


@torch.library.custom_op("fastpool::attention_pool_bwd", mutates_args=())
def attention_pool_bwd(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    m: torch.Tensor,
    total: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (grad_hidden (B, T, d), grad_scores (B, T, H)) from grad_out (B, d)."""
    if backend == "torch":
        return eager_attention.attention_pool_backward(grad_out, hidden, scores, mask, out)
    return _impl(backend).attention_pool_backward(grad_out, hidden, scores, mask, out, m, total)


@attention_pool_bwd.register_fake
def _bwd_fake(grad_out, hidden, scores, mask, out, m, total, backend):
    return (
        torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
        torch.empty(scores.shape, dtype=scores.dtype, device=scores.device),
    )


def _setup_context(ctx, inputs, output):
    hidden, scores, mask, backend = inputs
    out, m, total = output
    ctx.save_for_backward(hidden, scores, mask, out, m, total)
    ctx.backend = backend


def _backward(ctx, grad_out, _grad_m, _grad_total):
    hidden, scores, mask, out, m, total = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    grad_hidden, grad_scores = attention_pool_bwd(
        grad_out.contiguous(), hidden, scores, mask, out, m, total, ctx.backend
    )
    return (
        grad_hidden if ctx.needs_input_grad[0] else None,
        grad_scores if ctx.needs_input_grad[1] else None,
        None,
        None,
    )


attention_pool_fwd.register_autograd(_backward, setup_context=_setup_context)
