"""torch.func support for the pooling autograd Functions (``ops.PoolFunction``, ``PackedPoolFunction``).

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

from . import eager, eager_packed


def active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


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
    """J u: the pooling's derivative at the forward's selection applied to u ((B, T, d) or (N, d)),
    (rows, n * d) in u's dtype, un-normalised."""
    from . import ops

    names = modes.split(",")
    linear = [name for name in names if name != "max"]
    d = u.shape[-1]
    blocks = {}
    if linear:
        function = ops.PackedPoolFunction if packed else ops.PoolFunction
        extra = (max_seqlen, False) if packed else ()
        pooled = function.apply(u, layout, weights, ",".join(linear), backend, -1.0, *extra)[0]
        for i, name in enumerate(linear):
            blocks[name] = pooled[:, i * d : (i + 1) * d]
    if "max" in names:
        blocks["max"] = _gather_at(u, argmax, packed)
    return blocks[names[0]] if len(names) == 1 else torch.cat([blocks[name] for name in names], dim=1)


def forward_jvp(ctx, tangents) -> tuple:
    """Output tangents (out, argmax, stats, norms) of a pooling Function from its input tangents."""
    hidden_dot, _, weights_dot = tangents[:3]
    if weights_dot is not None:
        raise forward_mode_error("weights")
    layout, weights, argmax, stats, out, norms = ctx.saved_tensors
    # The float outputs get explicit tangents (a None tangent for the float norms trips an internal
    # assert of functorch); the integer ones are non-differentiable.
    if hidden_dot is None:
        return torch.zeros_like(out), None, None, torch.zeros_like(norms)
    v_dot = linear_pool(
        hidden_dot, layout, weights, argmax, ctx.modes, ctx.backend, ctx.packed, ctx.max_seqlen
    )
    eps = ctx.normalize_eps
    if eps < 0:
        return v_dot.to(out.dtype), None, None, torch.zeros_like(norms)
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
    return out_dot.to(out.dtype), None, None, norms_dot


# --- vmap: fold the vmapped dimension into the batch -------------------------------------------------


def _moved(x, dim):
    return x if dim is None else x.movedim(dim, 0)


def _folded(x, dim, V: int):
    """A small per-row tensor (mask, weights, argmax, offsets) as (V * rows, ...): merged when vmapped,
    repeated V times when not (a copy of a small tensor, never of hidden)."""
    if x is None:
        return None
    x = x.movedim(dim, 0) if dim is not None else x.unsqueeze(0).expand(V, *x.shape)
    return x.reshape(V * x.shape[1], *x.shape[2:])


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
    """vmap rule of ``ops.PoolFunction`` / ``PackedPoolFunction``."""
    V = info.batch_size
    hidden, layout, weights, modes, backend, eps, *rest = inputs
    h_dim, l_dim, w_dim = in_dims[:3]
    merged = _merged_view(hidden, h_dim, V)
    if merged is None or (packed and l_dim is not None):
        return _run_slices(function, info, in_dims, inputs)
    rows = merged.shape[0] // V if not packed else layout.shape[0] - 1
    if not _fits(V, rows, merged.shape[0] // V, packed):
        return _run_slices(function, info, in_dims, inputs)
    if not packed:
        B = merged.shape[0] // V
        out, argmax, stats, norms = function.apply(
            merged, _folded(layout, l_dim, V), _folded(weights, w_dim, V), modes, backend, eps
        )
        return _unfolded(out, argmax, stats, norms, V, B, eps)
    N = merged.shape[0] // V
    S = layout.shape[0] - 1
    out, argmax, stats, norms = function.apply(
        merged, _shifted_offsets(layout, V, N), _folded(weights, w_dim, V), modes, backend, eps, *rest
    )
    out, argmax, stats, norms = _unfolded(out, argmax, stats, norms, V, S, eps)[0]
    argmax = _positions_to_slices(argmax, V, N)
    stats = torch.cat([stats[:1], _positions_to_slices(stats[1:].transpose(0, 1), V, N).transpose(0, 1)])
    return (out, argmax, stats, norms), (0, 0, 1, 0 if eps >= 0 else None)


def _unfolded(out, argmax, stats, norms, V: int, rows: int, eps: float):
    """Outputs of the folded call split back into V slices (stats along dimension 1; norms stay
    empty and unbatched without normalisation)."""
    outputs = (
        out.reshape(V, rows, out.shape[1]),
        argmax.reshape(V, rows, argmax.shape[1]),
        stats.reshape(3, V, rows),
        norms.reshape(V, rows) if eps >= 0 else norms,
    )
    return outputs, (0, 0, 1, 0 if eps >= 0 else None)


# --- the hidden gradient as a differentiable, vmappable Function ------------------------------------


def _backward_impl(grad_out, layout, weights, argmax, stats, T, dtype, modes, backend, packed, max_seqlen):
    from . import ops

    if packed:
        return ops._packed_backward_impl(
            grad_out, layout, weights, argmax, stats, T, dtype, modes, backend, max_seqlen
        )
    return ops._impl(backend).pool_backward(
        grad_out, layout, argmax, stats, T, dtype, modes.split(","), weights
    )


class PoolBackward(torch.autograd.Function):
    """J^T g: the hidden gradient (B, T, d) or (N, d) in ``dtype`` from the gradient g (rows, n * d) of
    the un-normalised output, for the selection (argmax, stats) the forward saved."""

    @staticmethod
    def forward(grad_out, layout, weights, argmax, stats, T, dtype, modes, backend, packed, max_seqlen):
        return _backward_impl(
            grad_out, layout, weights, argmax, stats, T, dtype, modes, backend, packed, max_seqlen
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, layout, weights, argmax, stats, T, dtype, modes, backend, packed, max_seqlen = inputs
        ctx.save_for_backward(grad_out if weights is not None else None, layout, weights, argmax, stats)
        ctx.save_for_forward(layout, weights, argmax, stats)
        ctx.grad_dtype = grad_out.dtype
        ctx.args = (T, dtype, modes, backend, packed, max_seqlen)

    @staticmethod
    def backward(ctx, u):
        grad_out, layout, weights, argmax, stats = ctx.saved_tensors
        T, dtype, modes, backend, packed, max_seqlen = ctx.args
        grads = [None] * 11
        if u is None:
            return tuple(grads)
        if ctx.needs_input_grad[0]:
            v = linear_pool(u, layout, weights, argmax, modes, backend, packed, max_seqlen)
            grads[0] = v.to(ctx.grad_dtype)
        if weights is not None and ctx.needs_input_grad[2]:
            # The weighted_mean block of J^T g is w_t G / W: its derivative in w, applied to u, is
            # weights_grad with u in place of hidden.
            names = modes.split(",")
            d = u.shape[-1]
            col = names.index("weighted_mean") * d
            block = grad_out[:, col : col + d]
            grad_of_weights = eager_packed.weights_grad if packed else eager.weights_grad
            grads[2] = grad_of_weights(block, u, layout, weights)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, grad_out_dot, _layout_dot, weights_dot, *_):
        if weights_dot is not None:
            raise forward_mode_error("weights")
        layout, weights, argmax, stats = ctx.saved_tensors
        if grad_out_dot is None:
            return None
        return PoolBackward.apply(grad_out_dot, layout, weights, argmax, stats, *ctx.args)

    @staticmethod
    def vmap(
        info, in_dims, grad_out, layout, weights, argmax, stats, T, dtype, modes, backend, packed, max_seqlen
    ):
        V = info.batch_size
        g_dim, l_dim, w_dim, a_dim, s_dim = in_dims[:5]
        inputs = (grad_out, layout, weights, argmax, stats, T, dtype, modes, backend, packed, max_seqlen)
        rows = grad_out.shape[0] if g_dim is None else grad_out.movedim(g_dim, 0).shape[1]
        if (packed and l_dim is not None) or not _fits(V, rows, T, packed):
            return _run_slices(PoolBackward, info, in_dims, inputs)
        g = _folded(grad_out, g_dim, V)
        argmax = (
            argmax.movedim(a_dim, 0) if a_dim is not None else argmax.unsqueeze(0).expand(V, *argmax.shape)
        )
        stats = (
            stats.movedim(s_dim, 1) if s_dim is not None else stats.unsqueeze(1).expand(3, V, stats.shape[1])
        )
        k = argmax.shape[2]
        if not packed:
            grad = PoolBackward.apply(
                g, _folded(layout, l_dim, V), _folded(weights, w_dim, V), argmax.reshape(V * rows, k),
                stats.reshape(3, V * rows), T, dtype, modes, backend, packed, max_seqlen,
            )  # fmt: skip
            return grad.view(V, rows, *grad.shape[1:]), 0
        argmax = _positions_to_folded(argmax, V, T).reshape(V * rows, k)
        positions = _positions_to_folded(stats[1:].transpose(0, 1), V, T).transpose(0, 1)
        stats = torch.cat([stats[:1], positions]).reshape(3, V * rows)
        grad = PoolBackward.apply(
            g, _shifted_offsets(layout, V, T), _folded(weights, w_dim, V), argmax, stats, V * T, dtype, modes,
            backend, packed, max_seqlen,
        )  # fmt: skip
        return grad.view(V, T, *grad.shape[1:]), 0
