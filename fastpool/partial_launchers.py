"""Triton launchers of the partial pooling states (``fastpool.partial``).

- ``state_forward``: ``pool_forward_kernel`` with ``STATE``: the same chunking, fold and launch as a
  one-shot pooling, but each row's folded values are written in the accumulation dtype instead of
  the outputs (one launch).
- ``state_finish``: ``pool_finish_kernel``, the one-shot kernel's epilogue (``_write_results`` and
  the row normalisation) applied to a (merged) state (one launch).
- ``state_backward``: the gradient of hidden from the gradient of a state, by ``pool_backward_kernel``
  (one launch): each slot's derivative is one mode's backward with a row count (and weight total)
  of 1, so nothing is divided or rounded on the way.

Imported lazily (it imports triton); see ``fastpool.launchers`` for the shared conventions.
"""

from __future__ import annotations

import torch

from .eager import row_stats, user_weights
from .fast_launch import KernelLauncher, aligned, specialization
from .launch import (
    CHUNK,
    NUM_WARPS,
    check_feature_blocks,
    forward_plan,
    has_overrides,
    launch_on,
    overridden,
    partial_buffers,
    placeholder,
    sm_count,
    ticket_counters,
    triton_acc_dtype,
    triton_cdiv,
    workspace,
)
from .launchers import forward_grid, forward_launcher, mask_arguments, pool_backward
from .masks import real_tokens
from .state_layout import SLOT_MODE, slot_index, state_slots

_state_constexprs: dict = {}


def _constexprs(plan) -> dict:
    """The plan's constexprs with STATE on, cached per plan (plans are cached per call signature and
    compared by identity)."""
    if has_overrides():
        return {**plan.constexprs, "STATE": True}
    constexprs = _state_constexprs.get(plan)
    if constexprs is None:
        constexprs = _state_constexprs[plan] = {**plan.constexprs, "STATE": True}
    return constexprs


def _slot_columns(slots: tuple[str, ...]) -> tuple[int, ...]:
    """The kernel's col_* arguments (mean, max, first, last, sqrt, weighted) in STATE mode: slots."""
    return (
        slot_index(slots, "sum"), slot_index(slots, "max"), slot_index(slots, "first"),
        slot_index(slots, "last"), -1, slot_index(slots, "weighted"),
    )  # fmt: skip


def state_forward(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    modes: str,
    weights: torch.Tensor | None,
    for_backward: bool,
) -> tuple[torch.Tensor, ...]:
    """Partial state of a padded chunk on the forward kernel: one launch.

    hidden (B, T, d) fp16/bf16/fp32/fp64, any strides; mask (B, T) any dtype or None; modes
    comma-separated; weights (B, T) float or None; for_backward: also store the real tokens before
    each chunk (rank weights with a mask: the backward's ranks).

    Returns (values, argmax, stats, wsum, prefix): values (B, n_slots * d) acc dtype (slots of
    ``state_layout.state_slots``); argmax (B, d) int32 max positions in [0, T) (-1 for an empty row;
    (B, 0) without max); stats (3, B) int32 count, first, last (-1 when empty); wsum (B,) acc
    user weights' sum ((0,) without); prefix (B, cdiv(T, CHUNK)) int32 or (B, 0).

    Memory traffic: as ``launchers.pool_forward`` (hidden's real tokens read once), writing
    ``4 * B * n_slots * d`` bytes of state (8 for float64) instead of the outputs.
    """
    B, T, d = hidden.shape
    device = hidden.device
    names = modes.split(",")
    has_weights = weights is not None
    slots = state_slots(names, has_weights)
    plan = forward_plan(modes, hidden.dtype, mask is not None, has_weights, False, True, for_backward, False)
    acc = plan.acc
    values = torch.empty((B, len(slots) * d), dtype=acc, device=device)
    argmax = torch.empty((B, d if plan.do_max else 0), dtype=torch.int32, device=device)
    stats = torch.empty((3, B), dtype=torch.int32, device=device)
    wsum = torch.empty((B if has_weights else 0,), dtype=acc, device=device)
    n_chunks = triton_cdiv(T, overridden("chunk", CHUNK))
    prefix = torch.empty((B, n_chunks if plan.store_prefix else 0), dtype=torch.int32, device=device)
    if B == 0 or d == 0:
        real = real_tokens(mask)
        stats = row_stats(real, B, T, device)
        if has_weights:
            wsum = user_weights(weights, real, acc)[1]
        prefix.zero_()
        return values, argmax, stats, wsum, prefix
    n_dblocks = check_feature_blocks(d, plan.block_d)
    grid = forward_grid(B, T, n_dblocks, sm_count(device))
    split = grid.programs_per_row > 1
    mask_view, mask_bits, stride_mb, stride_mt = mask_arguments(mask, stats)
    acc_dummy = placeholder(device, acc)
    if has_weights:
        weights_arg, (stride_wb, stride_wt) = weights, weights.stride()
    else:
        weights_arg, stride_wb, stride_wt = acc_dummy, 0, 0
    partials = partial_buffers(plan, B * grid.n_slots if split else 0, d, n_dblocks, device)
    n_tickets = plan.ticket_count(B, n_dblocks, split)
    counters, epoch = ticket_counters(device, n_tickets) if n_tickets else (stats, 1)
    stride_hb, stride_ht, stride_hd = hidden.stride()
    args = (
        hidden, mask_view, values, argmax if plan.do_max else stats, stats,
        wsum if has_weights else acc_dummy, acc_dummy, prefix if plan.store_prefix else stats, *partials,
        counters, weights_arg, stats, acc_dummy, acc_dummy, B, T, d, grid.chunks_per_program, grid.n_slots, 0,
        epoch,
        stride_hb, stride_ht, stride_hd, stride_mb, stride_mt, stride_wb, stride_wt, values.stride(0),
        *_slot_columns(slots), -1.0, 0, int(plan.store_prefix), mask_bits,
    )  # fmt: skip
    key = None if has_overrides() else (
        "state", plan, device, hidden.dtype, mask_view.dtype if mask is not None else None,
        weights.dtype if has_weights else None, specialization(d), specialization(stride_hb),
        specialization(stride_ht), specialization(stride_hd), specialization(stride_mb),
        specialization(stride_mt), specialization(stride_wb), specialization(stride_wt),
        specialization(values.stride(0)), aligned(hidden), mask is None or aligned(mask_view),
        not has_weights or aligned(weights), mask_bits >= 2**31,
    )  # fmt: skip
    launch_on(
        device, forward_launcher(), key, (B, n_dblocks, grid.programs_per_row), args, _constexprs(plan),
        plan.options,
    )  # fmt: skip
    return values, argmax, stats, wsum, prefix


def _finish_launcher() -> KernelLauncher:
    from .kernels.pool_forward import pool_finish_kernel

    return KernelLauncher(pool_finish_kernel)


_finish = None


def state_finish(
    values: torch.Tensor,
    count: torch.Tensor,
    wsum: torch.Tensor,
    modes: str,
    has_weights: bool,
    dtype: torch.dtype,
    normalize_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of (merged) states: the one-shot kernel's epilogue, one launch.

    values (rows, n_slots * d) acc dtype; count (rows,) integer; wsum (rows,) acc (user weights) or
    (0,); dtype: the output dtype (hidden's). Returns (out (rows, n_modes * d) in dtype, norms
    (rows,) acc, or (0,) without normalisation).

    Memory traffic: reads the state (``4 * rows * n_slots * d`` bytes, 8 for float64), writes
    ``rows * n_modes * d * element_size``; normalisation adds the un-rounded rows (L2-resident).
    """
    global _finish
    names = modes.split(",")
    slots = state_slots(names, has_weights)
    rows = values.shape[0]
    d = values.shape[1] // len(slots)
    device = values.device
    normalize = normalize_eps >= 0
    plan = forward_plan(modes, dtype, False, has_weights, normalize, False, False, False)
    acc = plan.acc
    out = torch.empty((rows, len(names) * d), dtype=dtype, device=device)
    norms = torch.empty((rows if normalize else 0,), dtype=acc, device=device)
    if rows == 0 or d == 0:
        return out, norms.zero_()
    n_dblocks = check_feature_blocks(d, plan.block_d)
    values = values.contiguous()
    acc_dummy = placeholder(device, acc)
    scratch = workspace(device, "finish_scratch", torch.int32, 3 * rows)
    wsum_out = workspace(device, "finish_wsum", acc, rows) if has_weights else acc_dummy
    rowbuf = workspace(device, "rowbuf", acc, rows * len(names) * d) if normalize else acc_dummy
    counters, epoch = ticket_counters(device, rows) if normalize else (scratch, 1)
    args = (
        values, count.to(torch.int32), wsum if has_weights else acc_dummy, out, scratch, wsum_out,
        norms if normalize else acc_dummy, rowbuf, counters, rows, d, values.stride(0), out.stride(0), epoch,
        slot_index(slots, "sum"), slot_index(slots, "max"), slot_index(slots, "first"),
        slot_index(slots, "last"), slot_index(slots, "weighted"), *plan.col_args, float(normalize_eps),
    )  # fmt: skip
    constexprs = dict(
        DO_MEAN=plan.do_mean, DO_MAX=plan.do_max, DO_WEIGHTED=plan.do_weighted, HAS_WEIGHTS=has_weights,
        ACC_DTYPE=triton_acc_dtype(dtype), BLOCK_D=plan.block_d,
    )  # fmt: skip
    if _finish is None:
        _finish = _finish_launcher()
    options = dict(num_warps=overridden("num_warps", NUM_WARPS))
    launch_on(device, _finish, None, (rows, n_dblocks, 1), args, constexprs, options)
    return out, norms


def state_backward(
    grad_values: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    prefix: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    modes: str,
) -> torch.Tensor:
    """(B, T, d) gradient of hidden in ``dtype`` from the gradient of a padded state's values
    (B, n_slots * d): one launch of the backward kernel, each slot read as one mode's gradient of a
    row counted as one token (so sum -> g at every real token, weighted -> w_t g with the state's own
    ranks or the user weights, max -> g at argmax, first/last -> g at that token), exactly."""
    slots = state_slots(modes.split(","), weights is not None)
    one_token = torch.stack([stats[0].clamp(max=1), stats[1], stats[2]])
    unit = torch.ones((stats.shape[1],), dtype=grad_values.dtype, device=grad_values.device)
    return pool_backward(
        grad_values, mask, argmax, one_token, T, dtype, ",".join(SLOT_MODE[s] for s in slots), weights,
        unit, prefix,
    )  # fmt: skip
