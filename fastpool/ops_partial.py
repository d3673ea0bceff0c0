"""Registration table of the partial pooling states: custom ops, fake kernels and autograd.

``torch.ops.fastpool.partial_fwd`` computes a chunk's state (``values, argmax, stats, wsum, prefix``,
see ``fastpool.partial_launchers.state_forward``), ``partial_bwd`` the gradient of hidden from the
gradient of a state, ``partial_finish`` turns (merged) states into outputs (``out, norms``). Each takes the
concrete backend ("triton" or "torch"). Merging states is plain elementwise torch (``fastpool.partial``),
so autograd differentiates it; the backward of ``partial_finish`` and the user weights' gradient
are small torch formulas over (rows, d) tensors and (B, T) dot products.
"""

from __future__ import annotations

import torch

from . import partial_eager
from .eager import accumulation_dtype, token_dots
from .launch import CHUNK
from .masks import real_tokens
from .ops import normalize_backward
from .state_layout import slot_index, state_slots

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _check_backend(backend: str) -> None:
    if backend not in ("triton", "torch"):  # not torch._check: it imports a module on every call
        raise RuntimeError(f"fastpool: unknown backend {backend!r}")


def _launchers():
    from . import partial_launchers

    return partial_launchers


@torch.library.custom_op("fastpool::partial_fwd", mutates_args=())
def partial_fwd(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    modes: str,
    backend: str,
    for_backward: bool,
) -> Outputs:
    """Partial state of a padded chunk. hidden (B, T, d); mask (B, T) or None; weights (B, T) or None;
    modes comma-separated. Returns values (B, n_slots * d) acc dtype, argmax (B, d) int32 positions in
    the chunk (or (B, 0) without max), stats (3, B) int32 count / first / last in the chunk (-1 when
    empty), wsum (B,) (or (0,)) and the Triton backward's prefix."""
    _check_backend(backend)
    if backend == "torch":
        return partial_eager.state_forward(hidden, mask, modes, weights)
    return _launchers().state_forward(hidden, mask, modes, weights, for_backward)


def _fake_state(
    hidden, rows: int, d: int, T: int, modes: str, has_weights: bool, prefix_columns: int
) -> Outputs:
    slots = state_slots(modes.split(","), has_weights)
    acc = accumulation_dtype(hidden.dtype)
    return (
        hidden.new_empty((rows, len(slots) * d), dtype=acc),
        hidden.new_empty((rows, d if "max" in slots else 0), dtype=torch.int32),
        hidden.new_empty((3, rows), dtype=torch.int32),
        hidden.new_empty((rows if has_weights else 0,), dtype=acc),
        hidden.new_empty((rows, prefix_columns), dtype=torch.int32),
    )


@partial_fwd.register_fake
def _partial_fwd_fake(hidden, mask, weights, modes, backend, for_backward):
    B, T, d = hidden.shape
    ranks = (
        backend == "triton" and for_backward and mask is not None and weights is None
        and "weighted_mean" in modes.split(",")
    )  # fmt: skip
    return _fake_state(hidden, B, d, T, modes, weights is not None, -(-T // CHUNK) if ranks else 0)


@torch.library.custom_op("fastpool::partial_bwd", mutates_args=())
def partial_bwd(
    grad_values: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    prefix: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    modes: str,
    backend: str,
) -> torch.Tensor:
    """Gradient of a padded chunk's hidden, (B, T, d) in ``dtype``, from the gradient of its state's
    values (B, n_slots * d)."""
    _check_backend(backend)
    if backend == "torch":
        return partial_eager.state_backward(grad_values, mask, weights, argmax, stats, T, dtype, modes)
    return _launchers().state_backward(grad_values, mask, weights, argmax, stats, prefix, T, dtype, modes)


@partial_bwd.register_fake
def _partial_bwd_fake(grad_values, mask, weights, argmax, stats, prefix, T, dtype, modes, backend):
    slots = state_slots(modes.split(","), weights is not None)
    return grad_values.new_empty((stats.shape[1], T, grad_values.shape[1] // len(slots)), dtype=dtype)


def weights_grad(
    grad_values: torch.Tensor,
    grad_wsum: torch.Tensor | None,
    hidden: torch.Tensor,
    real: torch.Tensor | None,
    weights: torch.Tensor,
    modes: str,
) -> torch.Tensor:
    """(B, T) gradient of the user weights, in their dtype, from the state's: the weighted sum's
    gradient dotted with each real token of hidden (B, T, d), plus the weights' sum's; 0 at padding
    (real (B, T) bool, or None: every token is real)."""
    slots = state_slots(modes.split(","), True)
    d = grad_values.shape[1] // len(slots)
    k = slot_index(slots, "weighted")
    g = grad_values[:, k * d : (k + 1) * d]
    acc = accumulation_dtype(hidden.dtype)
    dots = token_dots(hidden, g, acc, real)
    if grad_wsum is not None:
        dots = dots + grad_wsum.to(acc).unsqueeze(1)
    if real is not None:
        dots = torch.where(real, dots, torch.zeros((), dtype=acc, device=dots.device))
    return dots.to(weights.dtype)


def _fwd_setup_context(ctx, inputs, output):
    hidden, mask, weights, modes, backend, _for_backward = inputs
    _, argmax, stats, _, prefix = output
    ctx.set_materialize_grads(False)
    weights_need_grad = weights is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(mask, weights, argmax, stats, prefix, hidden if weights_need_grad else None)
    ctx.T, ctx.d = hidden.shape[1], hidden.shape[2]
    ctx.dtype = hidden.dtype
    ctx.modes = modes
    ctx.backend = backend


def _fwd_backward(ctx, grad_values, _grad_argmax, _grad_stats, grad_wsum, _grad_prefix):
    mask, weights, argmax, stats, prefix, hidden = ctx.saved_tensors
    grads: list = [None] * 6
    if grad_values is None and grad_wsum is None:
        return tuple(grads)
    if grad_values is None:  # only the weights' sum was used: no gradient to hidden's values
        n_slots = len(state_slots(ctx.modes.split(","), weights is not None))
        acc = accumulation_dtype(ctx.dtype)
        grad_values = torch.zeros((stats.shape[1], n_slots * ctx.d), dtype=acc, device=stats.device)
    if ctx.needs_input_grad[0]:
        grads[0] = partial_bwd(
            grad_values, mask, weights, argmax, stats, prefix, ctx.T, ctx.dtype, ctx.modes, ctx.backend
        )
    if weights is not None and ctx.needs_input_grad[2]:
        grads[2] = weights_grad(grad_values, grad_wsum, hidden, real_tokens(mask), weights, ctx.modes)
    return tuple(grads)


partial_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op("fastpool::partial_finish", mutates_args=())
def partial_finish(
    values: torch.Tensor,
    count: torch.Tensor,
    wsum: torch.Tensor,
    modes: str,
    backend: str,
    dtype: torch.dtype,
    has_weights: bool,
    normalize_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of (merged) states: values (rows, n_slots * d) acc dtype, count (rows,) integer, wsum
    (rows,) or (0,). Returns out (rows, n_modes * d) in ``dtype`` and norms (rows,) (the rows' norms
    before normalisation when normalize_eps >= 0, else (0,))."""
    _check_backend(backend)
    if backend == "torch":
        return partial_eager.state_finish(values, count, wsum, modes, has_weights, dtype, normalize_eps)
    return _launchers().state_finish(values, count, wsum, modes, has_weights, dtype, normalize_eps)


@partial_finish.register_fake
def _partial_finish_fake(values, count, wsum, modes, backend, dtype, has_weights, normalize_eps):
    names = modes.split(",")
    d = values.shape[1] // len(state_slots(names, has_weights))
    out = values.new_empty((values.shape[0], len(names) * d), dtype=dtype)
    return out, values.new_empty((values.shape[0] if normalize_eps >= 0 else 0,))


def _finish_setup_context(ctx, inputs, output):
    values, count, wsum, modes, _backend, _dtype, has_weights, normalize_eps = inputs
    out, norms = output
    ctx.set_materialize_grads(False)
    normalized = normalize_eps >= 0
    ctx.save_for_backward(values, count, wsum, out if normalized else None, norms if normalized else None)
    ctx.modes = modes
    ctx.has_weights = has_weights
    ctx.normalize_eps = normalize_eps


def finish_backward(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    count: torch.Tensor,
    wsum: torch.Tensor,
    modes: str,
    has_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gradient of values (rows, n_slots * d), of wsum (rows,) or None) from the gradient of the
    un-normalised output (rows, n_modes * d). mean: g / n to the sum; mean_sqrt_len: g / sqrt(n);
    weighted_mean: g / W to the weighted sum and -(g . out) / W to the user weights' sum W; max, cls,
    last: g to their part. Rows without real token (or with W = 0) get 0."""
    names = modes.split(",")
    slots = state_slots(names, has_weights)
    rows = values.shape[0]
    d = values.shape[1] // len(slots)
    acc = values.dtype
    g = grad_out.to(acc)
    zero = torch.zeros((), dtype=acc, device=values.device)
    has = (count > 0).unsqueeze(1)
    n = count.clamp(min=1).to(acc).unsqueeze(1)
    parts = {slot: None for slot in slots}
    grad_wsum = None
    for i, name in enumerate(names):
        gm = g[:, i * d : (i + 1) * d]
        if name in ("mean", "mean_sqrt_len"):
            share = torch.where(has, gm / (n if name == "mean" else n.sqrt()), zero)
            parts["sum"] = share if parts["sum"] is None else parts["sum"] + share
        elif name == "weighted_mean":
            k = slot_index(slots, "weighted")
            weighted = values[:, k * d : (k + 1) * d]
            if has_weights:
                W = wsum.unsqueeze(1)
            else:
                c = count.to(acc).unsqueeze(1)
                W = c * (c + 1) / 2
            nonzero = W != 0
            gw = torch.where(nonzero, gm / torch.where(nonzero, W, 1), zero)
            parts["weighted"] = gw
            if has_weights:
                mean = torch.where(nonzero, weighted / torch.where(nonzero, W, 1), zero)
                grad_wsum = -(gw * mean).sum(1)
        else:
            slot = {"max": "max", "cls": "first", "last": "last"}[name]
            parts[slot] = torch.where(has, gm, zero)
    pieces = [
        parts[s] if parts[s] is not None else torch.zeros((rows, d), dtype=acc, device=values.device)
        for s in slots
    ]
    return torch.cat(pieces, dim=1), grad_wsum


def _finish_backward(ctx, grad_out, _grad_norms):
    values, count, wsum, out, norms = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    if ctx.normalize_eps >= 0:
        grad_out = normalize_backward(grad_out, out, norms, ctx.normalize_eps)
    grad_values, grad_wsum = finish_backward(grad_out, values, count, wsum, ctx.modes, ctx.has_weights)
    return grad_values, None, grad_wsum, None, None, None, None, None


partial_finish.register_autograd(_finish_backward, setup_context=_finish_setup_context)
