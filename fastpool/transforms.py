"""torch.func support for the pooling autograd Functions (``ops.PoolFunctionForTransforms``,
``PackedPoolFunctionForTransforms``; the jvp rule also serves the plain ``PoolFunction``s).

- ``vmap``: the vmapped dimension is folded into the batch (rows for padded input, a longer packed
  batch with shifted offsets for packed input), so one kernel launch serves every vmapped slice.
  Where hidden cannot be folded without a copy (it is not vmapped, or its vmapped dimension does not
  merge with the batch), the slices run one after the other instead.
- ``jvp`` (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``): the derivative of every
  mode at the forward's selection. mean, mean_sqrt_len, weighted_mean, cls and last are linear in
  hidden with a selection fixed by the mask, so their tangent is the pooling of the tangent; max's
  is the tangent at the saved argmax; the normalisation's follows. A tangent on user ``weights`` is
  refused with one clear error (reverse mode handles weights).
- ``PoolBackward``: the hidden gradient as a Function of its own (the kernels or the eager ops in
  its forward) that is itself differentiable (its backward is the linearised pooling, J u) and
  vmappable. Every backward that builds a graph (``create_graph=True``, torch.func) goes through it.
"""

from __future__ import annotations

import torch


def active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is running."""
    return torch._C._are_functorch_transforms_active()


def forward_mode_error(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"fastpool: forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) with "
        f"a tangent on {what} is not supported; use reverse mode (torch.func.grad, vjp, jacrev) for it"
    )


def _gather_at(u: torch.Tensor, argmax: torch.Tensor, packed: bool) -> torch.Tensor:
    """(rows, d): u at the saved max positions (along T, or global token indices when packed), 0 at -1."""
    axis = 0 if packed else 1
    rows, d = argmax.shape
    if u.shape[axis] == 0:
        return u.new_zeros((rows, d))
    index = argmax.clamp(min=0).long()
    picked = torch.gather(u, 0, index) if packed else torch.gather(u, 1, index.unsqueeze(1)).squeeze(1)
    return torch.where(argmax >= 0, picked, torch.zeros((), dtype=u.dtype, device=u.device))


def linear_pool(u, layout, weights, argmax, modes: str, backend: str, packed: bool, max_seqlen: int):
    """(J u, wmean): the pooling's derivative at the forward's selection applied to u ((B, T, d) or
    (N, d)), (rows, n * d) in u's dtype, un-normalised; and the un-rounded weighted mean of u with user
    weights (rows, d) that the Triton weights gradient reads (empty where it is not computed)."""
    from . import ops

    names = modes.split(",")
    linear = [name for name in names if name != "max"]
    d = u.shape[-1]
    blocks = {}
    wmean = None
    if linear:
        function = ops.PackedPoolFunctionForTransforms if packed else ops.PoolFunctionForTransforms
        extra = (max_seqlen, False) if packed else ()
        # for_backward: J u may itself be differentiated (third order), and the Triton backward of
        # this call then needs what its forward saves.
        outputs = function.apply(u, layout, weights, ",".join(linear), backend, -1.0, False, True, *extra)
        pooled, wmean = outputs[0], outputs[5]
        for i, name in enumerate(linear):
            blocks[name] = pooled[:, i * d : (i + 1) * d]
    if "max" in names:
        blocks["max"] = _gather_at(u, argmax, packed)
    v = blocks[names[0]] if len(names) == 1 else torch.cat([blocks[name] for name in names], dim=1)
    return v, wmean


def forward_jvp(ctx, tangents) -> tuple:
    """Output tangents (out, argmax, stats, norms, wsum, wmean, prefix) of a pooling Function from its
    input tangents; only out and (with normalisation) norms are differentiable."""
    hidden_dot, _, weights_dot = tangents[:3]
    if weights_dot is not None:
        raise forward_mode_error("weights")
    layout, weights, argmax, stats, _wsum, _prefix, out, norms = ctx.saved_tensors
    eps = ctx.normalize_eps
    # The float outputs get explicit tangents (a None tangent for the differentiable norms trips an
    # internal assert of functorch); the others are non-differentiable.
    if hidden_dot is None:
        norms_dot = torch.zeros_like(norms) if eps >= 0 else None
        return torch.zeros_like(out), None, None, norms_dot, None, None, None
    v_dot, _ = linear_pool(
        hidden_dot, layout, weights, argmax, ctx.modes, ctx.backend, ctx.packed, ctx.max_seqlen
    )
    if eps < 0:
        return v_dot.to(out.dtype), None, None, None, None, None, None
    # y = v / max(||v||, eps): y' = (v' - y (y . v')) / ||v|| above eps, v' / eps below it;
    # ||v||' = (v . v') / ||v|| = (y . v') max(||v||, eps) / ||v|| (0 for a zero row).
    acc = norms.dtype
    v_dot = v_dot.to(acc)
    y = out.to(acc)
    n = norms.unsqueeze(1)
    above = n > eps
    y_dot_v = (y * v_dot).sum(1, keepdim=True)
    out_dot = torch.where(
        above, (v_dot - y * y_dot_v) / torch.where(above, n, 1), v_dot / max(eps, torch.finfo(acc).tiny)
    )
    nonzero = n > 0
    norms_dot = torch.where(nonzero, y_dot_v * n.clamp(min=eps) / torch.where(nonzero, n, 1), 0).squeeze(1)
    return out_dot.to(out.dtype), None, None, norms_dot, None, None, None


# --- vmap: fold the vmapped dimension into the batch -------------------------------------------------


def _folded(x, dim, V: int):
    """A small per-row tensor (mask, weights, offsets) as (V * rows, ...): merged when vmapped,
    repeated V times when not (a copy of a small tensor, never of hidden)."""
    if x is None:
        return None
    x = x.movedim(dim, 0) if dim is not None else x.unsqueeze(0).expand(V, *x.shape)
    return x.reshape(V * x.shape[1], *x.shape[2:])


def _folded_rows(x, dim, V: int, rows: int):
    """``_folded`` for a forward result of ``rows`` rows along dimension 0 (argmax, wsum, wmean,
    prefix); an unbatched result without that many rows is empty (absent) and passes as it is."""
    if dim is None and (x.dim() == 0 or x.shape[0] != rows or rows == 0):
        return x
    return _folded(x, dim, V)


def _unfolded_rows(x, V: int, rows: int):
    """A folded call's result of V * rows rows along dimension 0 split back into V slices (batched at
    0); an empty (absent) result without those rows stays unbatched."""
    if x.dim() == 0 or x.shape[0] != V * rows:
        return x, None
    return x.reshape(V, rows, *x.shape[1:]), 0


def _merged_view(x, dim, V: int):
    """hidden's vmapped dimension merged with its first one as a view, or None (unbatched, or a copy
    would be needed)."""
    if dim is None:
        return None
    x = x.movedim(dim, 0)
    try:
        return x.view(V * x.shape[1], *x.shape[2:])
    except RuntimeError:
        return None


def _slice(x, dim, v: int):
    return x if dim is None or x is None else x.select(dim, v)


def _run_slices(function, info, in_dims, inputs):
    """vmap by running the slices one after the other: outputs stacked along dimension 0."""
    results = [
        function.apply(*(_slice(x, dim, v) for x, dim in zip(inputs, in_dims, strict=True)))
        for v in range(info.batch_size)
    ]
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results), 0
    return tuple(torch.stack(parts) for parts in zip(*results, strict=True)), (0,) * len(results[0])


def _shifted_offsets(cu_seqlens: torch.Tensor, V: int, N: int) -> torch.Tensor:
    """(V * S + 1,): the offsets of V packed batches of N tokens each, laid end to end."""
    starts = torch.arange(V, device=cu_seqlens.device, dtype=cu_seqlens.dtype).unsqueeze(1) * N
    body = (cu_seqlens[:-1].unsqueeze(0) + starts).reshape(-1)
    return torch.cat([body, cu_seqlens.new_full((1,), V * N)])


def _token_shift(V: int, N: int, device) -> torch.Tensor:
    return (torch.arange(V, device=device, dtype=torch.int32) * N).view(V, 1, 1)


def _positions_to_slices(positions: torch.Tensor, V: int, N: int) -> torch.Tensor:
    """(V, rows, k) global token indices of the folded batch -> indices into each slice (-1 stays)."""
    return torch.where(positions >= 0, positions - _token_shift(V, N, positions.device), positions)


def _positions_to_folded(positions: torch.Tensor, V: int, N: int) -> torch.Tensor:
    """The inverse of ``_positions_to_slices``."""
    return torch.where(positions >= 0, positions + _token_shift(V, N, positions.device), positions)


def _fits(V: int, rows: int, length: int, packed: bool) -> bool:
    """Whether the folded batch stays within the kernels' size limits (else: slices)."""
    from .limits import MAX_BATCH, MAX_SEQUENCE_LENGTH

    if packed:
        return V * length <= MAX_SEQUENCE_LENGTH and V * rows < MAX_BATCH
    return V * rows < MAX_BATCH


def forward_vmap(function, packed: bool, info, in_dims, inputs):
    """vmap rule of ``ops.PoolFunctionForTransforms`` / ``PackedPoolFunctionForTransforms``: inputs
    (hidden, layout, weights, modes, backend, normalize_eps, track_positions, for_backward[, max_seqlen,
    check_offsets])."""
    V = info.batch_size
    hidden, layout, weights, modes, backend, eps, *flags = inputs
    h_dim, l_dim, w_dim = in_dims[:3]
    merged = _merged_view(hidden, h_dim, V)
    if merged is None or (packed and l_dim is not None):
        return _run_slices(function, info, in_dims, inputs)
    length = merged.shape[0] // V
    rows = length if not packed else layout.shape[0] - 1
    if not _fits(V, rows, length, packed):
        return _run_slices(function, info, in_dims, inputs)
    folded_layout = _shifted_offsets(layout, V, length) if packed else _folded(layout, l_dim, V)
    outputs = function.apply(merged, folded_layout, _folded(weights, w_dim, V), modes, backend, eps, *flags)
    return _unfolded(outputs, V, rows, length if packed else None)


def _unfolded(outputs, V: int, rows: int, tokens: int | None):
    """Outputs of the folded call (out, argmax, stats, norms, wsum, wmean, prefix) split back into V
    slices: stats along dimension 1, the others along 0; absent (empty) ones stay unbatched. Packed
    (``tokens`` per slice): global token indices shifted back into each slice."""
    out, argmax, stats, *extras = outputs
    results, dims = zip(*(_unfolded_rows(x, V, rows) for x in (out, argmax, *extras)), strict=True)
    out, argmax, *extras = results
    stats = stats.reshape(3, V, rows)
    if tokens is not None:
        if dims[1] is not None:
            argmax = _positions_to_slices(argmax, V, tokens)
        positions = _positions_to_slices(stats[1:].transpose(0, 1), V, tokens).transpose(0, 1)
        stats = torch.cat([stats[:1], positions])
    return (out, argmax, stats, *extras), (dims[0], dims[1], 1, *dims[2:])


# --- the hidden gradient as a differentiable, vmappable Function ------------------------------------


def _backward_impl(
    grad_out, layout, weights, argmax, stats, wsum, prefix, T, dtype, modes, backend, packed, max_seqlen
):  # fmt: skip
    from . import ops

    if packed:
        return ops._packed_backward_impl(
            grad_out, layout, weights, argmax, stats, wsum, T, dtype, modes, backend, max_seqlen
        )
    return ops._pool_backward_impl(
        grad_out, layout, weights, argmax, stats, wsum, prefix, T, dtype, modes, backend
    )


def _weighted_mean_of(u, layout, weights, backend: str, packed: bool, max_seqlen: int) -> torch.Tensor:
    """The un-rounded weighted mean of u with user weights, (rows, d), from the forward kernel."""
    from . import ops

    if packed:
        outputs = ops.packed_forward_impl(
            u, layout, weights, "weighted_mean", backend, -1.0, False, True, max_seqlen
        )
        return outputs[5]
    return ops.forward_impl(u, layout, weights, "weighted_mean", backend, -1.0, False, True)[5]


class PoolBackward(torch.autograd.Function):
    """J^T g: the hidden gradient (B, T, d) or (N, d) in ``dtype`` from the gradient g (rows, n * d) of
    the un-normalised output, for the selection (argmax, stats) and the backward extras (wsum, prefix)
    the forward saved."""

    @staticmethod
    def forward(*inputs):
        # (grad_out, layout, weights, argmax, stats, wsum, prefix, T, dtype, modes, backend, packed,
        # max_seqlen)
        return _backward_impl(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, layout, weights, argmax, stats, wsum, prefix, *args = inputs
        ctx.save_for_backward(grad_out if weights is not None else None, layout, weights, argmax, stats, wsum)
        ctx.save_for_forward(layout, weights, argmax, stats, wsum, prefix)
        ctx.grad_dtype = grad_out.dtype
        ctx.args = tuple(args)  # T, dtype, modes, backend, packed, max_seqlen

    @staticmethod
    def backward(ctx, u):
        grad_out, layout, weights, argmax, stats, wsum = ctx.saved_tensors
        T, dtype, modes, backend, packed, max_seqlen = ctx.args
        grads = [None] * 13
        if u is None:
            return tuple(grads)
        wmean = None
        if ctx.needs_input_grad[0]:
            v, wmean = linear_pool(u, layout, weights, argmax, modes, backend, packed, max_seqlen)
            grads[0] = v.to(ctx.grad_dtype)
        if weights is not None and ctx.needs_input_grad[2]:
            # The weighted_mean block of J^T g is w_t G / W: its derivative in w, applied to u, is
            # the user weights' gradient with u in place of hidden (weights_bwd's implementation).
            from . import ops

            names = modes.split(",")
            d = u.shape[-1]
            col = names.index("weighted_mean") * d
            block = grad_out[:, col : col + d]
            # A graph or a transform needs torch ops (differentiable, vmappable); else the kernel.
            if torch.is_grad_enabled() or active():
                backend = "torch"
            if backend == "triton" and (wmean is None or wmean.shape[0] != block.shape[0]):
                wmean = _weighted_mean_of(u, layout, weights, backend, packed, max_seqlen)
            wmean = wmean if wmean is not None else block.new_empty((0, d))
            grads[2] = ops._weights_backward(block, u, layout, weights, wsum, wmean, packed, backend)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, grad_out_dot, _layout_dot, weights_dot, *_):
        if weights_dot is not None:
            raise forward_mode_error("weights")
        layout, weights, argmax, stats, wsum, prefix = ctx.saved_tensors
        if grad_out_dot is None:
            return None
        return PoolBackward.apply(grad_out_dot, layout, weights, argmax, stats, wsum, prefix, *ctx.args)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        V = info.batch_size
        grad_out, layout, weights, argmax, stats, wsum, prefix = inputs[:7]
        T, dtype, modes, backend, packed, max_seqlen = inputs[7:]
        g_dim, l_dim, w_dim, a_dim, s_dim, ws_dim, p_dim = in_dims[:7]
        rows = grad_out.shape[0] if g_dim is None else grad_out.movedim(g_dim, 0).shape[1]
        if (packed and l_dim is not None) or not _fits(V, rows, T, packed):
            return _run_slices(PoolBackward, info, in_dims, inputs)
        g = _folded(grad_out, g_dim, V)
        stats = stats.movedim(s_dim, 1) if s_dim is not None else stats.unsqueeze(1).expand(3, V, rows)
        wsum = _folded_rows(wsum, ws_dim, V, rows)
        prefix = _folded_rows(prefix, p_dim, V, rows)
        weights = _folded(weights, w_dim, V)
        if packed:
            layout = _shifted_offsets(layout, V, T)
            positions = _positions_to_folded(stats[1:].transpose(0, 1), V, T).transpose(0, 1)
            stats = torch.cat([stats[:1], positions])
            if a_dim is not None or (argmax.dim() == 2 and argmax.shape[0] == rows and rows):
                positions = argmax.movedim(a_dim, 0) if a_dim is not None else argmax.expand(V, *argmax.shape)
                argmax = _positions_to_folded(positions, V, T).reshape(V * rows, -1)
            length = V * T
        else:
            layout = _folded(layout, l_dim, V)
            argmax = _folded_rows(argmax, a_dim, V, rows)
            length = T
        stats = stats.reshape(3, V * rows)
        grad = PoolBackward.apply(
            g, layout, weights, argmax, stats, wsum, prefix, length, dtype, modes, backend, packed, max_seqlen
        )
        return grad.view(V, -1, *grad.shape[1:]), 0
