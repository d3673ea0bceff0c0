"""Registration table of attention pooling: ``fastpool::attention_pool_fwd`` / ``_bwd`` (padded
batches) and ``fastpool::packed_attention_pool_fwd`` / ``_bwd`` (packed batches), their fake
kernels and their autograd. Each op takes the concrete backend ("triton" or "torch") as an
argument, so a compiled graph keeps the choice made when it was traced.

Outside ``torch.compile`` calls skip the custom-op dispatch (its Python overhead costs more than
the kernel at serving shapes): ``AttentionFunction`` / ``PackedAttentionFunction`` run the same
implementations with the same setup_context and backward; a call that needs no gradient runs the
implementation alone.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from . import eager_attention
from .eager import accumulation_dtype

_BACKENDS = ("triton", "torch")
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _impl(backend: str):
    if backend not in _BACKENDS:  # not torch._check: it imports a module on every call
        raise RuntimeError(f"fastpool: unknown backend {backend!r}")
    if backend == "torch":
        return eager_attention
    from . import attention_launchers

    return attention_launchers


def forward_impl(
    hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, backend: str
) -> Outputs:
    """The forward of ``attention_pool_fwd`` without any dispatch: (out, max, sum)."""
    return _impl(backend).attention_pool_forward(hidden, scores, mask)


@torch.library.custom_op("fastpool::attention_pool_fwd", mutates_args=())
def attention_pool_fwd(
    hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, backend: str
) -> Outputs:
    """hidden (B, T, d), scores (B, T, H), mask (B, T) or None -> out (B, d) in hidden's dtype,
    softmax max and sum (B, H) in the accumulation dtype."""
    return forward_impl(hidden, scores, mask, backend)


def _fake_outputs(hidden: torch.Tensor, rows, d, H) -> Outputs:
    acc = accumulation_dtype(hidden.dtype)
    return (
        hidden.new_empty((rows, d)),
        hidden.new_empty((rows, H), dtype=acc),
        hidden.new_empty((rows, H), dtype=acc),
    )


@attention_pool_fwd.register_fake
def _fwd_fake(hidden, scores, mask, backend):
    return _fake_outputs(hidden, hidden.shape[0], hidden.shape[2], scores.shape[2])


def packed_forward_impl(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    check_offsets: bool,
    backend: str,
) -> Outputs:
    """The forward of ``packed_attention_pool_fwd`` without any dispatch: (out, max, sum)."""
    if check_offsets:
        from .packed import check_offsets as check

        check(cu_seqlens, hidden.shape[0])
    if backend == "torch":
        return eager_attention.packed_attention_pool_forward(hidden, scores, cu_seqlens)
    return _impl(backend).attention_pool_forward(hidden, scores, None, cu_seqlens)


@torch.library.custom_op("fastpool::packed_attention_pool_fwd", mutates_args=())
def packed_attention_pool_fwd(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    check_offsets: bool,
    backend: str,
) -> Outputs:
    """Attention pooling of a packed batch: hidden (N, d), scores (N, H), cu_seqlens (S + 1,)
    int32/int64 offsets, max_seqlen a bound on the lengths (-1: unknown); check_offsets: check the
    offsets' values first (when the caller could not, under compile). -> out (S, d), max and sum (S, H)."""
    return packed_forward_impl(hidden, scores, cu_seqlens, max_seqlen, check_offsets, backend)


@packed_attention_pool_fwd.register_fake
def _packed_fwd_fake(hidden, scores, cu_seqlens, max_seqlen, check_offsets, backend):
    return _fake_outputs(hidden, cu_seqlens.shape[0] - 1, hidden.shape[1], scores.shape[1])


def backward_impl(grad_out, hidden, scores, mask, out, m, total, backend):
    """The backward of ``attention_pool_bwd`` without any dispatch."""
    if backend == "torch":
        return eager_attention.attention_pool_backward(grad_out, hidden, scores, mask, out)
    return _impl(backend).attention_pool_backward(grad_out, hidden, scores, mask, out, m, total)


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
    return backward_impl(grad_out, hidden, scores, mask, out, m, total, backend)


def _bwd_fake_outputs(hidden, scores) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
        torch.empty(scores.shape, dtype=scores.dtype, device=scores.device),
    )


@attention_pool_bwd.register_fake
def _bwd_fake(grad_out, hidden, scores, mask, out, m, total, backend):
    return _bwd_fake_outputs(hidden, scores)


def packed_backward_impl(grad_out, hidden, scores, cu_seqlens, out, m, total, max_seqlen, backend):
    """The backward of ``packed_attention_pool_bwd`` without any dispatch."""
    if backend == "torch":
        return eager_attention.packed_attention_pool_backward(grad_out, hidden, scores, cu_seqlens, out)
    return _impl(backend).attention_pool_backward(
        grad_out, hidden, scores, None, out, m, total, cu_seqlens, max_seqlen
    )


@torch.library.custom_op("fastpool::packed_attention_pool_bwd", mutates_args=())
def packed_attention_pool_bwd(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: torch.Tensor,
    m: torch.Tensor,
    total: torch.Tensor,
    max_seqlen: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (grad_hidden (N, d), grad_scores (N, H)) of a packed batch from grad_out (S, d)."""
    return packed_backward_impl(grad_out, hidden, scores, cu_seqlens, out, m, total, max_seqlen, backend)


@packed_attention_pool_bwd.register_fake
def _packed_bwd_fake(grad_out, hidden, scores, cu_seqlens, out, m, total, max_seqlen, backend):
    return _bwd_fake_outputs(hidden, scores)


def _setup_context(ctx, inputs, output):
    # Padded: (hidden, scores, mask, backend); packed: (hidden, scores, cu_seqlens, max_seqlen,
    # check_offsets, backend).
    ctx.packed = len(inputs) == 6
    hidden, scores, layout = inputs[:3]
    out, m, total = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, scores, layout, out, m, total)
    ctx.n_inputs = len(inputs)
    ctx.max_seqlen = inputs[3] if ctx.packed else -1
    ctx.backend = inputs[-1]
    ctx.direct = False


def _backward(ctx, grad_out, _grad_m, _grad_total):
    hidden, scores, layout, out, m, total = ctx.saved_tensors
    grads = [None] * ctx.n_inputs
    if grad_out is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return tuple(grads)
    grad_out = grad_out.contiguous()
    backend = ctx.backend
    if ctx.direct:
        # create_graph=True needs a differentiable backward: the eager one is built from torch ops.
        backend = "torch" if torch.is_grad_enabled() else backend
        if ctx.packed:
            args = (grad_out, hidden, scores, layout, out, m, total, ctx.max_seqlen, backend)
            grad_hidden, grad_scores = packed_backward_impl(*args)
        else:
            grad_hidden, grad_scores = backward_impl(grad_out, hidden, scores, layout, out, m, total, backend)
    elif ctx.packed:
        args = (grad_out, hidden, scores, layout, out, m, total, ctx.max_seqlen, backend)
        grad_hidden, grad_scores = packed_attention_pool_bwd(*args)
    else:
        grad_hidden, grad_scores = attention_pool_bwd(
            grad_out, hidden, scores, layout, out, m, total, backend
        )
    grads[0] = grad_hidden if ctx.needs_input_grad[0] else None
    grads[1] = grad_scores if ctx.needs_input_grad[1] else None
    return tuple(grads)


attention_pool_fwd.register_autograd(_backward, setup_context=_setup_context)
packed_attention_pool_fwd.register_autograd(_backward, setup_context=_setup_context)


def _fast_path(implementation, name: str, doc: str) -> type[torch.autograd.Function]:
    """An autograd.Function running ``implementation`` with the ops' own setup_context and backward."""

    def forward(ctx, *inputs):
        output = implementation(*inputs)
        ctx.mark_non_differentiable(output[1], output[2])
        _setup_context(ctx, inputs, output)
        ctx.direct = True
        return output

    def backward(ctx, *grads):
        return _backward(ctx, *grads)

    namespace = {"forward": staticmethod(forward), "backward": staticmethod(backward), "__doc__": doc}
    return type(name, (torch.autograd.Function,), namespace)


AttentionFunction = _fast_path(
    forward_impl,
    "AttentionFunction",
    "Eager fast path of ``attention_pool_fwd`` (same implementation and backward).",
)
PackedAttentionFunction = _fast_path(
    packed_forward_impl,
    "PackedAttentionFunction",
    "Eager fast path of ``packed_attention_pool_fwd`` (same implementation and backward).",
)


def _run(op, function, implementation, inputs: tuple) -> Outputs:
    """The custom op while compiling; the autograd function when a gradient (or a loud forward-AD
    failure on the kernels) is needed; else the implementation itself."""
    hidden, scores, *_, backend = inputs
    if torch.compiler.is_compiling():
        return op(*inputs)
    dual = backend == "triton" and forward_ad._current_level >= 0
    wants_grad = (hidden.requires_grad or scores.requires_grad) and torch.is_grad_enabled()
    if wants_grad or dual:
        return function.apply(*inputs)
    return implementation(*inputs)


def attention_pool_forward(
    hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, backend: str
) -> Outputs:
    """Padded attention pooling with autograd: (out (B, d), max (B, H), sum (B, H))."""
    return _run(attention_pool_fwd, AttentionFunction, forward_impl, (hidden, scores, mask, backend))


def packed_attention_pool_forward(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    check_offsets: bool,
    backend: str,
) -> Outputs:
    """Packed attention pooling with autograd: (out (S, d), max (S, H), sum (S, H))."""
    inputs = (hidden, scores, cu_seqlens, max_seqlen, check_offsets, backend)
    return _run(packed_attention_pool_fwd, PackedAttentionFunction, packed_forward_impl, inputs)
