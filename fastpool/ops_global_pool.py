"""Registration table of global pooling: ``fastpool::global_pool_fwd`` / ``_bwd``, their fake kernels
and their autograd. Each op takes the concrete backend ("triton" or "torch") as an argument, so a
compiled graph keeps the choice made when it was traced.

Outside ``torch.compile`` calls skip the custom-op dispatch (its Python overhead costs more than
the kernel at small feature maps): ``GlobalPoolFunction`` runs the same implementations with the
same setup_context and backward, and a call that needs no gradient runs the implementation alone.
The backward keeps only argmax and x's shape and strides: x itself is not saved.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from . import eager_global_pool

_BACKENDS = ("triton", "torch")


def _impl(backend: str):
    if backend not in _BACKENDS:  # not torch._check: it imports a module on every call
        raise RuntimeError(f"fastpool: unknown backend {backend!r}")
    if backend == "torch":
        return eager_global_pool
    from . import global_pool_launchers

    return global_pool_launchers


def forward_impl(x: torch.Tensor, modes: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of ``global_pool_fwd`` without any dispatch: (out, argmax)."""
    return _impl(backend).global_pool_forward(x, modes.split(","))


def _inference(x: torch.Tensor, modes: str, backend: str) -> torch.Tensor:
    """The output alone (no gradient wanted): the eager max skips the position of the maximum."""
    if backend == "torch":
        return eager_global_pool.global_pool_values(x, modes.split(","))
    return forward_impl(x, modes, backend)[0]


@torch.library.custom_op("fastpool::global_pool_fwd", mutates_args=())
def global_pool_fwd(x: torch.Tensor, modes: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, *spatial) float; modes "mean", "max", "mean,max" or "max,mean" -> out
    (B, n_modes * C) in x's dtype and argmax (B, C) int32 (logical spatial index of the first
    maximum) when "max" is requested, else (B, 0)."""
    return forward_impl(x, modes, backend)


@global_pool_fwd.register_fake
def _fwd_fake(x, modes, backend):
    names = modes.split(",")
    B, C = x.shape[:2]
    argmax = x.new_empty((B, C if "max" in names else 0), dtype=torch.int32)
    return x.new_empty((B, len(names) * C)), argmax


def backward_impl(grad_out, argmax, shape, strides, dtype, modes, backend) -> torch.Tensor:
    """The backward of ``global_pool_bwd`` without any dispatch."""
    return _impl(backend).global_pool_backward(grad_out, argmax, shape, strides, dtype, modes.split(","))


@torch.library.custom_op("fastpool::global_pool_bwd", mutates_args=())
def global_pool_bwd(
    grad_out: torch.Tensor,
    argmax: torch.Tensor,
    shape: list[int],
    strides: list[int],
    dtype: torch.dtype,
    modes: str,
    backend: str,
) -> torch.Tensor:
    """Gradient of x (``shape``, ``dtype``, dense in the memory order of x's ``strides``) from
    grad_out (B, n_modes * C) and the forward's argmax."""
    return backward_impl(grad_out, argmax, shape, strides, dtype, modes, backend)


@global_pool_bwd.register_fake
def _bwd_fake(grad_out, argmax, shape, strides, dtype, modes, backend):
    return torch.empty_strided(
        shape, eager_global_pool.grad_strides(shape, strides), dtype=dtype, device=grad_out.device
    )


def _setup_context(ctx, inputs, output):
    x, modes, backend = inputs
    _, argmax = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(argmax)
    ctx.shape, ctx.strides, ctx.dtype = list(x.shape), list(x.stride()), x.dtype
    ctx.modes, ctx.backend = modes, backend
    ctx.direct = False


def _backward(ctx, grad_out, _grad_argmax):
    (argmax,) = ctx.saved_tensors
    if grad_out is None or not ctx.needs_input_grad[0]:
        return None, None, None
    args = (grad_out, argmax, ctx.shape, ctx.strides, ctx.dtype, ctx.modes)
    if ctx.direct:
        # create_graph=True needs a differentiable backward: the eager one is built from torch ops.
        return backward_impl(*args, "torch" if torch.is_grad_enabled() else ctx.backend), None, None
    return global_pool_bwd(*args, ctx.backend), None, None


global_pool_fwd.register_autograd(_backward, setup_context=_setup_context)


class GlobalPoolFunction(torch.autograd.Function):
    """Eager fast path of ``global_pool_fwd``: same implementation and backward, no dispatch."""

    @staticmethod
    def forward(ctx, x, modes, backend):
        output = forward_impl(x, modes, backend)
        ctx.mark_non_differentiable(output[1])
        _setup_context(ctx, (x, modes, backend), output)
        ctx.direct = True
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_argmax):
        return _backward(ctx, grad_out, grad_argmax)


def global_pool_forward(x: torch.Tensor, modes: str, backend: str) -> torch.Tensor:
    """The output (B, n_modes * C) with autograd: the custom op while compiling, the fast path
    otherwise, the implementation alone when no gradient is wanted."""
    if torch.compiler.is_compiling():
        return global_pool_fwd(x, modes, backend)[0]
    # Forward-mode AD on the kernels goes through autograd too, so it fails loudly (no jvp).
    dual = backend == "triton" and forward_ad._current_level >= 0
    if (x.requires_grad and torch.is_grad_enabled()) or dual:
        return GlobalPoolFunction.apply(x, modes, backend)[0]
    return _inference(x, modes, backend)
