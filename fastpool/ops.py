"""Registration table: the ``fastpool::`` custom ops, their fake (meta) kernels and their autograd.

``torch.ops.fastpool.pool_fwd`` / ``pool_bwd`` (padded batches) and ``packed_pool_fwd`` /
``packed_pool_bwd`` (packed batches) are opaque to ``torch.compile`` (no graph break, no tracing
into Triton). Each takes the concrete backend ("triton" or "torch") as an argument, so a compiled
graph keeps the choice made when it was traced.

Autograd lives here and only here, in ``_setup_context`` / ``_backward``, registered on both
forward ops (what torch.compile sees) and used by ``PoolFunction`` / ``PackedPoolFunction``, the
eager fast paths. Outside compilation the custom-op dispatch (Python autograd wrapper plus Python
redispatch) costs several times the kernel's own time at serving shapes, so eager calls go through
those functions (or straight to the implementation when no gradient is needed), which run the very
same implementations and backward.

Every forward returns ``(out, argmax, stats, norms, wsum, wmean, prefix)``: norms (B,) is the L2 norm
of each output row before normalisation when ``normalize_eps >= 0`` (empty otherwise); wsum, wmean
and prefix are what the Triton backward kernels need (user weights' sums, the un-rounded weighted
mean, real tokens before each chunk), empty where a mode, the backend or the call does not need them.
``track_positions=False`` (no indices and no gradient wanted) lets max skip its positions: argmax is
then (rows, 0).
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from . import eager, eager_packed, transforms
from .eager_sums import tree_sum
from .launch import CHUNK
from .launch import empty as shared_empty
from .packed import check_size_limits

_BACKENDS = ("triton", "torch")
# Whether a torch.func transform (grad, vmap, jvp, ...) is running: one C call, cheap enough for
# the inference path.
_functorch_active = torch._C._are_functorch_transforms_active

Outputs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


_triton_modules: tuple | None = None


def _impl(backend: str, packed: bool = False):
    """The module implementing ``backend`` (padded or packed); triton's launchers import lazily, once."""
    global _triton_modules
    if backend == "torch":
        return eager_packed if packed else eager
    if backend != "triton":  # not torch._check: it imports a module on every call
        raise RuntimeError(f"fastpool: unknown backend {backend!r}")
    if _triton_modules is None:
        from . import launchers, packed_launchers

        _triton_modules = (launchers, packed_launchers)
    return _triton_modules[1] if packed else _triton_modules[0]


def _hint(max_seqlen: int) -> int | None:
    return None if max_seqlen < 0 else max_seqlen


def _fake_outputs(
    hidden: torch.Tensor,
    rows,
    d,
    T,
    modes: str,
    normalize_eps: float,
    backend: str,
    has_weights: bool,
    track_positions: bool,
    for_backward: bool,
    has_mask: bool,
) -> Outputs:
    names = modes.split(",")
    acc = eager.accumulation_dtype(hidden.dtype)
    triton = backend == "triton"
    out = hidden.new_empty((rows, len(names) * d))
    argmax = hidden.new_empty((rows, d if "max" in names and track_positions else 0), dtype=torch.int32)
    stats = hidden.new_empty((3, rows), dtype=torch.int32)
    norms = hidden.new_empty((rows if normalize_eps >= 0 else 0,), dtype=acc)
    wsum = hidden.new_empty((rows if triton and has_weights else 0,), dtype=acc)
    wmean = hidden.new_empty((rows if triton and has_weights and for_backward else 0, d), dtype=acc)
    ranks = triton and for_backward and has_mask and "weighted_mean" in names and not has_weights
    prefix = hidden.new_empty((rows, -(-T // CHUNK) if ranks else 0), dtype=torch.int32)
    return out, argmax, stats, norms, wsum, wmean, prefix


def _with_empty_extras(outputs, rows: int, d: int, track_positions: bool, lean: bool = False) -> Outputs:
    """The eager backend's (out, argmax, stats, norms) with the Triton-only outputs left empty (and
    argmax too when positions were not asked for); ``lean``: only out and argmax are read, the
    empty outputs are one shared tensor."""
    out, argmax, stats, norms = outputs
    acc = norms.dtype
    if not track_positions and argmax.shape[1]:
        argmax = argmax.new_empty((rows, 0))
    if lean:
        unread = shared_empty(out.device, acc)
        return out, argmax, stats, norms, unread, unread, unread
    return (
        out, argmax, stats, norms, out.new_empty((0,), dtype=acc), out.new_empty((0, d), dtype=acc),
        out.new_empty((rows, 0), dtype=torch.int32),
    )  # fmt: skip


def forward_impl(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    modes: str,
    backend: str,
    normalize_eps: float,
    track_positions: bool = True,
    for_backward: bool = False,
    lean: bool = False,
    share_empty: bool = False,
) -> Outputs:
    """The forward of ``pool_fwd`` without any dispatch: (out, argmax, stats, norms, wsum, wmean, prefix).
    ``lean``: only out and argmax will be read (an inference call); ``share_empty``: absent outputs
    may be shared zero-size tensors (not returned by a custom op)."""
    if backend == "torch":
        if lean and (modes == "cls" or modes == "last") and normalize_eps < 0 and not track_positions:
            # Only out is read: the selection without the row statistics a backward would need.
            out = eager.select_rows_at(hidden, mask, modes)[0]
            unread = shared_empty(out.device, out.dtype)
            return out, unread, unread, unread, unread, unread, unread
        # Values-only max when neither indices nor a gradient are wanted (forward-mode AD on the eager
        # ops differentiates the max at its positions too).
        need_indices = track_positions or forward_ad._current_level >= 0
        outputs = eager.pool_forward(
            hidden, mask, modes.split(","), weights, normalize_eps, need_indices, lean=lean
        )
        return _with_empty_extras(outputs, hidden.shape[0], hidden.shape[2], track_positions, lean)
    return _impl(backend).pool_forward(
        hidden, mask, modes, weights, normalize_eps, track_positions, for_backward, lean, share_empty
    )


@torch.library.custom_op("fastpool::pool_fwd", mutates_args=())
def pool_fwd(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    modes: str,
    backend: str,
    normalize_eps: float,
    track_positions: bool,
    for_backward: bool,
) -> Outputs:
    """Fused masked pooling. hidden (B, T, d); mask (B, T) or None; weights (B, T) float or None
    (weighted_mean's token weights); modes comma-separated, e.g. "mean,max"; normalize_eps >= 0
    L2-normalises each output row (``x / max(||x||, eps)``), < 0 does not; track_positions: max keeps
    its positions; for_backward: also return what the backward needs.

    Returns out (B, len(modes) * d) in hidden's dtype, argmax (B, d) int32 when "max" is requested
    with track_positions (else (B, 0)), stats (3, B) int32: real-token count, first and last real
    position (-1 if none), norms (B,) (or (0,) without normalisation), and the Triton backward's
    wsum, wmean, prefix (see ``launchers.pool_forward``; empty on the torch backend).
    """
    # The public checks let symbolic sizes through (torch.export with dynamic dims): the op
    # runs with concrete ones.
    check_size_limits(hidden.shape[0], hidden.shape[1], packed=False)
    return forward_impl(hidden, mask, weights, modes, backend, normalize_eps, track_positions, for_backward)


@pool_fwd.register_fake
def _pool_fwd_fake(hidden, mask, weights, modes, backend, normalize_eps, track_positions, for_backward):
    B, T, d = hidden.shape
    return _fake_outputs(
        hidden, B, d, T, modes, normalize_eps, backend, weights is not None, track_positions, for_backward,
        mask is not None,
    )  # fmt: skip


@torch.library.custom_op("fastpool::pool_bwd", mutates_args=())
def pool_bwd(
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
    """Gradient of hidden, (B, T, d) in ``dtype``, from grad_out (B, len(modes) * d) of the
    un-normalised output."""
    return _pool_backward_impl(grad_out, mask, weights, argmax, stats, wsum, prefix, T, dtype, modes, backend)


def _pool_backward_impl(grad_out, mask, weights, argmax, stats, wsum, prefix, T, dtype, modes, backend):
    names = modes.split(",")
    if backend == "torch":
        return eager.pool_backward(grad_out, mask, argmax, stats, T, dtype, names, weights)
    return _impl(backend).pool_backward(grad_out, mask, argmax, stats, T, dtype, modes, weights, wsum, prefix)


@pool_bwd.register_fake
def _pool_bwd_fake(grad_out, mask, weights, argmax, stats, wsum, prefix, T, dtype, modes, backend):
    B = stats.shape[1]
    return grad_out.new_empty((B, T, grad_out.shape[1] // len(modes.split(","))), dtype=dtype)


@torch.library.custom_op("fastpool::weights_bwd", mutates_args=())
def weights_bwd(
    grad_block: torch.Tensor,
    hidden: torch.Tensor,
    layout: torch.Tensor | None,
    weights: torch.Tensor,
    wsum: torch.Tensor,
    wmean: torch.Tensor,
    packed: bool,
    backend: str,
) -> torch.Tensor:
    """Gradient of weighted_mean's user weights, (B, T) or (N,) in their dtype, from grad_block
    (rows, d), the gradient of the weighted_mean output. layout: the mask (padded) or cu_seqlens."""
    return _weights_backward(grad_block, hidden, layout, weights, wsum, wmean, packed, backend)


@weights_bwd.register_fake
def _weights_bwd_fake(grad_block, hidden, layout, weights, wsum, wmean, packed, backend):
    return torch.empty_like(weights)


def _weights_backward(grad_block, hidden, layout, weights, wsum, wmean, packed, backend):
    if backend == "torch":
        grad_of_weights = eager_packed.weights_grad if packed else eager.weights_grad
        return grad_of_weights(grad_block, hidden, layout, weights)
    from . import launchers, packed_launchers

    launcher = packed_launchers.weights_backward if packed else launchers.weights_backward
    return launcher(grad_block, hidden, layout, weights, wsum, wmean)


def packed_forward_impl(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    weights: torch.Tensor | None,
    modes: str,
    backend: str,
    normalize_eps: float,
    track_positions: bool,
    for_backward: bool,
    max_seqlen: int,
    check_offsets: bool = False,
    lean: bool = False,
    share_empty: bool = False,
) -> Outputs:
    """The forward of ``packed_pool_fwd`` without any dispatch (outputs as ``forward_impl``)."""
    if check_offsets:
        from .packed import check_offsets as check

        check(cu_seqlens, hidden.shape[0])
    names = modes.split(",")
    if backend == "torch":
        need_indices = track_positions or forward_ad._current_level >= 0
        outputs = eager_packed.pool_forward(
            hidden, cu_seqlens, names, weights, normalize_eps, need_indices, need_stats=not lean
        )
        return _with_empty_extras(outputs, cu_seqlens.shape[0] - 1, hidden.shape[1], track_positions, lean)
    return _impl(backend, packed=True).pool_forward(
        hidden, cu_seqlens, modes, weights, _hint(max_seqlen), normalize_eps, track_positions,
        for_backward, lean,
        share_empty,
    )  # fmt: skip


@torch.library.custom_op("fastpool::packed_pool_fwd", mutates_args=())
def packed_pool_fwd(
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
    """Fused pooling of a packed batch. hidden (N, d); cu_seqlens (S + 1,) int32/int64 offsets;
    weights (N,) float or None; max_seqlen an upper bound on segment lengths (-1: unknown);
    check_offsets: check the offsets' values first (when the caller could not, under compile).

    Returns out (S, len(modes) * d), argmax (S, d) int32 global token indices (or (S, 0)), stats
    (3, S) int32: length, first and last token index of each segment (-1 if empty), norms, and the
    Triton backward's wsum and wmean (prefix is (S, 0)).
    """
    check_size_limits(cu_seqlens.shape[0] - 1, hidden.shape[0], packed=True)
    return packed_forward_impl(
        hidden, cu_seqlens, weights, modes, backend, normalize_eps, track_positions, for_backward, max_seqlen,
        check_offsets,
    )  # fmt: skip


@packed_pool_fwd.register_fake
def _packed_pool_fwd_fake(
    hidden, cu_seqlens, weights, modes, backend, normalize_eps, track_positions, for_backward, max_seqlen,
    check_offsets,
):  # fmt: skip
    return _fake_outputs(
        hidden, cu_seqlens.shape[0] - 1, hidden.shape[1], 0, modes, normalize_eps, backend,
        weights is not None,
        track_positions, for_backward, False,
    )  # fmt: skip


def _packed_backward_impl(
    grad_out, cu_seqlens, weights, argmax, stats, wsum, N, dtype, modes, backend, max_seqlen
):  # fmt: skip
    names = modes.split(",")
    if backend == "torch":
        return eager_packed.pool_backward(grad_out, cu_seqlens, argmax, stats, N, dtype, names, weights)
    return _impl(backend, packed=True).pool_backward(
        grad_out, cu_seqlens, argmax, stats, N, dtype, modes, weights, _hint(max_seqlen), wsum
    )


@torch.library.custom_op("fastpool::packed_pool_bwd", mutates_args=())
def packed_pool_bwd(
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
    """Gradient of a packed hidden, (N, d) in ``dtype``, from grad_out (S, len(modes) * d)."""
    return _packed_backward_impl(
        grad_out, cu_seqlens, weights, argmax, stats, wsum, N, dtype, modes, backend, max_seqlen
    )


@packed_pool_bwd.register_fake
def _packed_pool_bwd_fake(
    grad_out, cu_seqlens, weights, argmax, stats, wsum, N, dtype, modes, backend, max_seqlen
):
    return grad_out.new_empty((N, grad_out.shape[1] // len(modes.split(","))), dtype=dtype)


def _setup_context(ctx, inputs, output):
    # Padded: (hidden, mask, weights, modes, backend, normalize_eps, track_positions, for_backward);
    # packed: the same with cu_seqlens in place of the mask, then max_seqlen and check_offsets.
    # Position 1 never takes a gradient.
    hidden, layout, weights, modes, backend, normalize_eps, _track, _for_backward, *packed = inputs
    ctx.n_inputs = len(inputs)
    out, argmax, stats, norms, wsum, wmean, prefix = output
    # The integer outputs never carry gradient: no zero tensors materialised for them.
    ctx.set_materialize_grads(False)
    # hidden is kept only for the gradient of user weights (the hidden gradient never reads it);
    # the output and its norms only to undo a normalisation.
    weights_need_grad = weights is not None and ctx.needs_input_grad[2]
    normalized = normalize_eps >= 0
    ctx.slim = False  # the slim functions keep their own context (_slim_path)
    ctx.save_for_backward(
        layout, weights, argmax, stats, hidden if weights_need_grad else None,
        out if normalized else None, norms if normalized else None, wsum, wmean, prefix,
    )  # fmt: skip
    ctx.packed = bool(packed)
    ctx.max_seqlen = packed[0] if packed else -1
    ctx.T = hidden.shape[0] if packed else hidden.shape[1]  # tokens N when packed
    ctx.dtype = hidden.dtype
    ctx.modes = modes
    ctx.backend = backend
    ctx.normalize_eps = normalize_eps
    ctx.direct = False
    ctx.traced = False  # set by fastpool.ops_triton: the backward then uses its ops too


def normalize_backward(
    grad: torch.Tensor | None,
    out: torch.Tensor,
    norms: torch.Tensor,
    eps: float,
    grad_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the un-normalised rows v from the gradient of y = v / max(||v||, eps) (as
    ``F.normalize``): (g - y (y . g)) / ||v|| where ||v|| > eps, g / eps elsewhere. (B, n), float.

    ``grad_norms`` (B,) is the gradient reaching the saved norms ||v|| themselves, which happens
    when a second-order pass differentiates this very formula: it adds grad_norms * v / ||v||
    (= grad_norms * y * max(||v||, eps) / ||v||; 0 for a zero row)."""
    acc = norms.dtype
    y = out.to(acc)
    n = norms.unsqueeze(1)
    above = n > eps
    result = None
    if grad is not None:
        g = grad.to(acc)
        # A fixed pairwise tree, not .sum(1): ATen's order follows the batch (CUDA's block shape
        # depends on the number of rows; on CPU one long row is split over the threads).
        projected = (g - y * tree_sum(y * g).unsqueeze(1)) / torch.where(above, n, 1)
        result = torch.where(above, projected, g / max(eps, torch.finfo(acc).tiny))
    if grad_norms is not None:
        nonzero = n > 0
        scale = torch.where(nonzero, n.clamp(min=eps) / torch.where(nonzero, n, 1), 0)
        through_norms = grad_norms.to(acc).unsqueeze(1) * y * scale
        result = through_norms if result is None else result + through_norms
    return result


def _hidden_grad(ctx, grad_out, layout, weights, argmax, stats, wsum, prefix):
    backend = ctx.backend
    if ctx.direct:
        if torch.is_grad_enabled() or _functorch_active():
            # create_graph=True and torch.func need a differentiable, vmappable backward: the kernel's
            # (or the eager) backward wrapped as a Function whose own backward is the linear pooling.
            return transforms.PoolBackward.apply(
                grad_out, layout, weights, argmax, stats, wsum, prefix, ctx.T, ctx.dtype, ctx.modes, backend,
                ctx.packed, ctx.max_seqlen,
            )  # fmt: skip
        if ctx.packed:
            return _packed_backward_impl(
                grad_out, layout, weights, argmax, stats, wsum, ctx.T, ctx.dtype, ctx.modes, backend,
                ctx.max_seqlen,
            )  # fmt: skip
        return _pool_backward_impl(
            grad_out, layout, weights, argmax, stats, wsum, prefix, ctx.T, ctx.dtype, ctx.modes, backend
        )
    # Through the op: under torch.compile / AOT tracing this sees fake tensors.
    if ctx.packed:
        return (_traced.triton_packed_pool_bwd if ctx.traced else packed_pool_bwd)(
            grad_out,
            layout,
            weights,
            argmax,
            stats,
            wsum,
            ctx.T,
            ctx.dtype,
            ctx.modes,
            backend,
            ctx.max_seqlen,
        )
    return (_traced.triton_pool_bwd if ctx.traced else pool_bwd)(
        grad_out, layout, weights, argmax, stats, wsum, prefix, ctx.T, ctx.dtype, ctx.modes, backend
    )


_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def check_not_legacy_batched(grad_out: torch.Tensor | None) -> None:
    """RuntimeError for a gradient batched by ``torch.autograd.grad(..., is_grads_batched=True)``: its
    legacy vmap hands the backward a tensor without storage, which neither the kernels nor the eager
    backward's ops (no batching rule for ``aten::alias``) can take."""
    if grad_out is not None and _legacy_batched(grad_out):
        raise RuntimeError(
            "fastpool: torch.autograd.grad(..., is_grads_batched=True) is not supported (its legacy vmap "
            "cannot run the pooling backward); use torch.func.vmap over torch.autograd.grad, or one "
            "torch.autograd.grad per gradient"
        )


def _backward(ctx, grad_out, _grad_argmax, _grad_stats, grad_norms, *_grads_of_backward_extras):
    check_not_legacy_batched(grad_out)
    if ctx.slim:
        layout, weights, hidden = ctx.saved_tensors
        (argmax, stats, wsum, wmean, prefix), out, norms = ctx.kept, None, None
    else:
        layout, weights, argmax, stats, hidden, out, norms, wsum, wmean, prefix = ctx.saved_tensors
    # Saved forward results are constants of the backward (no gradient flows through them).
    if not ctx.slim:  # the slim path's are plain tensors already
        wsum, wmean = wsum.detach(), wmean.detach()
    grads = [None] * ctx.n_inputs
    normalized = ctx.normalize_eps >= 0
    # The norms are a differentiable output: a second-order pass through normalize_backward
    # sends gradient to them (they depend on hidden like the output does).
    if grad_out is None and (grad_norms is None or not normalized):
        return tuple(grads)
    if normalized:
        grad_out = normalize_backward(grad_out, out, norms, ctx.normalize_eps, grad_norms)
    if ctx.needs_input_grad[0]:
        grads[0] = _hidden_grad(ctx, grad_out, layout, weights, argmax, stats, wsum, prefix)
    if weights is not None and ctx.needs_input_grad[2]:
        modes = ctx.modes.split(",")
        d = grad_out.shape[1] // len(modes)
        col = modes.index("weighted_mean") * d
        block = grad_out[:, col : col + d]
        if ctx.direct:
            # A graph or a torch.func transform needs torch ops (differentiable, vmappable).
            backend = "torch" if torch.is_grad_enabled() or _functorch_active() else ctx.backend
            grads[2] = _weights_backward(block, hidden, layout, weights, wsum, wmean, ctx.packed, backend)
        else:
            op = _traced.triton_weights_bwd if ctx.traced else weights_bwd
            grads[2] = op(block, hidden, layout, weights, wsum, wmean, ctx.packed, ctx.backend)
    return tuple(grads)


pool_fwd.register_autograd(_backward, setup_context=_setup_context)
packed_pool_fwd.register_autograd(_backward, setup_context=_setup_context)


def _fast_path(implementation, name: str, doc: str, packed: bool) -> tuple[type, type]:
    """Two autograd.Functions running ``implementation`` with the ops' own setup_context and backward,
    and the jvp rule of ``fastpool.transforms``: the plain one (``forward(ctx, ...)``: its ``apply``
    binds no signature, a sizeable share of a small call's host cost) for eager calls, and one in
    setup_context style with the vmap rule too, which torch.func transforms require."""

    def setup(ctx, inputs, output, for_forward_ad: bool):
        out, argmax, stats, norms, wsum, wmean, prefix = output
        # The norms are differentiable (second order through normalize=True, jvp); without
        # normalisation they are empty and may be the same shared tensor as wsum or wmean.
        if inputs[5] >= 0:
            ctx.mark_non_differentiable(argmax, stats, wsum, wmean, prefix)
        else:
            ctx.mark_non_differentiable(argmax, stats, norms, wsum, wmean, prefix)
        _setup_context(ctx, inputs, output)
        ctx.direct = True  # eager only: the backward may call the implementation directly
        if for_forward_ad:  # what the jvp rule reads
            ctx.save_for_forward(inputs[1], inputs[2], argmax, stats, wsum, prefix, out, norms)

    def plain_forward(ctx, *inputs):
        output = implementation(*inputs, share_empty=True)
        setup(ctx, inputs, output, forward_ad._current_level >= 0)
        return output

    def forward(*inputs):
        return implementation(*inputs, share_empty=True)

    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output, True)

    def backward(ctx, *grads):
        return _backward(ctx, *grads)

    def jvp(ctx, *tangents):
        return transforms.forward_jvp(ctx, tangents)

    def vmap(info, in_dims, *inputs):
        return transforms.forward_vmap(transformable, packed, info, in_dims, inputs)

    rules = {"backward": staticmethod(backward), "jvp": staticmethod(jvp), "__doc__": doc}
    plain = type(name, (torch.autograd.Function,), {**rules, "forward": staticmethod(plain_forward)})
    transformable = type(
        name + "ForTransforms",
        (torch.autograd.Function,),
        {
            **rules, "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
            "vmap": staticmethod(vmap),
        },
    )  # fmt: skip
    return plain, transformable


def _slim_path(implementation, name: str, packed: bool) -> type:
    """An autograd.Function with one output, ``out``: the common training call (first order, no
    normalisation, no torch.func, no forward-mode AD). Autograd's bookkeeping grows with every
    argument, output and saved tensor (wrapping, version counters, unpacking), a large share of a
    small call's host cost, so it takes five arguments (hidden, mask or cu_seqlens, weights, the
    op's other arguments as one tuple ``spec``, and ``box``, a list through which the forward's
    other results go back) and keeps everything but the three tensors on ctx in two tuples."""

    def slim_forward(ctx, hidden, layout, weights, spec, box):
        output = implementation(hidden, layout, weights, *spec, share_empty=True)
        box.append(output)
        # hidden is kept only for the gradient of user weights (the hidden gradient never reads it).
        keep_hidden = weights is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(layout, weights, hidden if keep_hidden else None)
        # Not out: ctx holding its own output would be a reference cycle.
        _, argmax, stats, _, wsum, wmean, prefix = output
        ctx.kept = (argmax, stats, wsum, wmean, prefix)
        ctx.spec = spec
        ctx.T = hidden.shape[0] if packed else hidden.shape[1]  # tokens N when packed
        ctx.dtype = hidden.dtype
        return output[0]

    def slim_backward(ctx, grad_out):
        check_not_legacy_batched(grad_out)
        if _needs_general_backward(ctx):
            return _slim_generic_backward(ctx, grad_out, packed)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        layout, weights, _ = ctx.saved_tensors
        argmax, stats, wsum, _, prefix = ctx.kept
        spec = ctx.spec
        if packed:
            grad = _packed_backward_impl(
                grad_out, layout, weights, argmax, stats, wsum, ctx.T, ctx.dtype, spec[0], spec[1], spec[5]
            )
        else:
            grad = _pool_backward_impl(
                grad_out, layout, weights, argmax, stats, wsum, prefix, ctx.T, ctx.dtype, spec[0], spec[1]
            )
        return grad, None, None, None, None

    doc = f"Slim eager fast path of ``{name}``: one differentiable output, same implementation and backward."
    return type(
        "Slim" + name,
        (torch.autograd.Function,),
        {"forward": staticmethod(slim_forward), "backward": staticmethod(slim_backward), "__doc__": doc},
    )


def _needs_general_backward(ctx) -> bool:
    """Whether a slim backward needs the general one: a gradient for user weights, or a backward
    that is itself differentiated (create_graph=True) or transformed."""
    return ctx.needs_input_grad[2] or torch.is_grad_enabled() or _functorch_active()


def _slim_generic_backward(ctx, grad_out, packed: bool) -> tuple:
    """A slim function's backward through ``_backward``, with ctx given the fields it reads."""
    modes, backend, normalize_eps, _track, _for_backward, *tail = ctx.spec
    ctx.slim, ctx.n_inputs = True, 3
    ctx.packed, ctx.max_seqlen = packed, tail[0] if packed else -1
    ctx.modes, ctx.backend, ctx.normalize_eps = modes, backend, normalize_eps
    ctx.direct, ctx.traced = True, False
    grads = _backward(ctx, grad_out, None, None, None)
    return (*grads, None, None)


PoolFunction, PoolFunctionForTransforms = _fast_path(
    forward_impl,
    "PoolFunction",
    "Eager fast path of ``pool_fwd``: same implementation and backward, no dispatch.",
    packed=False,
)
PackedPoolFunction, PackedPoolFunctionForTransforms = _fast_path(
    packed_forward_impl,
    "PackedPoolFunction",
    "Eager fast path of ``packed_pool_fwd`` (same implementation and backward).",
    packed=True,
)
SlimPoolFunction = _slim_path(forward_impl, "PoolFunction", packed=False)
SlimPackedPoolFunction = _slim_path(packed_forward_impl, "PackedPoolFunction", packed=True)


class SelectFunction(torch.autograd.Function):
    """Training path of a lone cls / last on the eager backend (first order, no torch.func, no
    forward-mode AD): out (B, d) = the selected token of each row (``eager.select_rows_at``). It keeps
    only the positions, no mask and no row statistics, and its backward writes grad_out at them
    into zeros (``eager.select_rows_backward``, differentiable for create_graph=True): the same bits
    as the general path, with about the idiom's own work (``hidden[:, 0]``'s select backward)."""

    @staticmethod
    def forward(ctx, hidden, mask, name):
        out, ctx.position = eager.select_rows_at(hidden, mask, name)
        ctx.shape, ctx.dtype = hidden.shape, hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        check_not_legacy_batched(grad_out)
        return eager.select_rows_backward(grad_out, ctx.position, ctx.shape, ctx.dtype), None, None


# The slim functions' C entry point (autograd.Function's own base class): ``Function.apply`` adds a
# Python layer that checks for torch.func transforms (``_run`` has, just before) and unwraps dead
# functorch wrappers from every argument (done below for the three tensor arguments): ~11k host
# instructions of a ~430k training call.
_slim_apply = {
    pool_fwd: super(torch.autograd.Function, SlimPoolFunction).apply,
    packed_pool_fwd: super(torch.autograd.Function, SlimPackedPoolFunction).apply,
}
_select_apply = super(torch.autograd.Function, SelectFunction).apply
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _run(
    op, function, transformable, implementation, inputs: tuple, return_indices: bool, tail: tuple = ()
) -> Outputs:
    """The custom op while compiling or for meta tensors (its fake kernel gives the shapes, and its
    autograd the gradient's); else the autograd function when a gradient or forward-mode AD needs it
    (``transformable`` under a torch.func transform); else the implementation itself. Max keeps its
    positions only when indices are asked for or a gradient may follow. ``inputs``: the op's first six
    arguments; ``tail``: the packed op's last two."""
    hidden, weights, backend = inputs[0], inputs[2], inputs[4]
    # Forward-mode AD (dual tensors) on the kernels goes through the Function's jvp rule; the eager
    # ops handle it themselves. torch.func transforms always need the Function's rules.
    wants = (
        (hidden.requires_grad or (weights is not None and weights.requires_grad)) and torch.is_grad_enabled()
    ) or (backend == "triton" and forward_ad._current_level >= 0)
    functorch = _functorch_active()
    wants = wants or functorch
    inputs = (*inputs, return_indices or wants, wants, *tail)
    if hidden.is_meta or torch.compiler.is_compiling():
        if backend == "triton" and _traced is not None and _traced.ENABLED and not hidden.is_meta:
            # The kernels' launches go into the compiled graph (a packed call that must check its
            # offsets' values stays on the opaque op).
            if op is pool_fwd:
                return _traced.triton_pool_fwd(*inputs)
            if not inputs[-1]:
                return _traced.triton_packed_pool_fwd(*inputs)
        return op(*inputs)
    if wants:
        if functorch:
            return transformable.apply(*inputs)
        if inputs[5] < 0 and forward_ad._current_level < 0:
            mask = inputs[1]
            if op is pool_fwd and backend == "torch" and (inputs[3] == "cls" or inputs[3] == "last"):
                out = _select_apply(
                    _unwrap_if_dead(hidden), None if mask is None else _unwrap_if_dead(mask), inputs[3]
                )
                unread = shared_empty(out.device, out.dtype)
                return out, unread, unread, unread, unread, unread, unread
            box: list = []
            out = _slim_apply[op](
                _unwrap_if_dead(hidden), None if mask is None else _unwrap_if_dead(mask), inputs[2] if
                weights is None else _unwrap_if_dead(weights), inputs[3:], box
            )  # fmt: skip
            return (out, *box[0][1:])
        return function.apply(*inputs)
    return implementation(*inputs, lean=True)


def pool_forward(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    modes: str,
    backend: str,
    normalize_eps: float = -1.0,
    return_indices: bool = False,
) -> Outputs:
    """Run the forward with autograd: the custom op while compiling, the fast path otherwise."""
    inputs = (hidden, mask, weights, modes, backend, float(normalize_eps))
    return _run(pool_fwd, PoolFunction, PoolFunctionForTransforms, forward_impl, inputs, return_indices)


def packed_pool_forward(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    weights: torch.Tensor | None,
    modes: str,
    backend: str,
    max_seqlen: int,
    normalize_eps: float = -1.0,
    check_offsets: bool = False,
    return_indices: bool = False,
) -> Outputs:
    """``pool_forward`` for a packed batch: hidden (N, d), cu_seqlens (S + 1,), max_seqlen (-1: unknown)."""
    inputs = (hidden, cu_seqlens, weights, modes, backend, float(normalize_eps))
    return _run(
        packed_pool_fwd, PackedPoolFunction, PackedPoolFunctionForTransforms, packed_forward_impl, inputs,
        return_indices, (max_seqlen, check_offsets),
    )  # fmt: skip


# The traceable triton ops (after this module's ops and autograd, which they reuse); absent where
# triton or torch.library.triton_op is.
try:
    from . import ops_triton as _traced
except ImportError:
    _traced = None
