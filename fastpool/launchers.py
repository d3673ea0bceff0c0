"""The "triton" backend for padded batches: grids, workspaces and launches of the pooling kernels.

Kernels live in ``fastpool.kernels``; this module imports them lazily so ``import fastpool`` works
without triton. Nothing here copies hidden: every stride is passed to the kernels as it is, and the
mask is reinterpreted (``Tensor.view(dtype)``, no copy) as an integer of its own width. Every pass is
one kernel launch with no host-device synchronisation, launched through ``fastpool.fast_launch``
(the compiled kernel's own launcher, once a call signature has been seen). Shared rules (block
sizes, the fixed chunking, workspaces, launch plans) live in ``fastpool.launch``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .fast_launch import KernelLauncher, TracedLauncher, aligned, specialization
from .launch import (
    CHUNK,
    LANES,
    MAX_GRID_YZ,
    NUM_STAGES,
    NUM_WARPS,
    PROGRAMS_PER_SM,
    SCAN_BLOCK,
    ForwardOutputs,
    check_feature_blocks,
    empty,
    feature_block,
    forward_plan,
    has_overrides,
    kernel_columns,
    launch_on,
    next_epoch,
    overridden,
    partial_buffers,
    placeholder,
    sm_count,
    stream_key,
    ticket_counters,
    token_block,
    triton_acc_dtype,
    triton_cdiv,
)
from .masks import integer_view
from .modes import mode_columns


@dataclass(frozen=True)
class ForwardGrid:
    """How the rows of a padded forward are spread over programs."""

    n_slots: int  # cdiv(T, CHUNK): the most chunks a row can have
    chunks_per_program: int  # G: chunks one program pools
    programs_per_row: int  # Z = cdiv(n_slots, G); 1 means one program holds a whole row


def forward_grid(B: int, T: int, n_dblocks: int, sms: int) -> ForwardGrid:
    """Spread rows over programs: one program per (row, feature block) when that fills the GPU
    (PROGRAMS_PER_SM per multiprocessor), else groups of chunks of each row. Only the parallelism
    changes with the batch and the device: the chunks, and therefore the bits, do not."""
    if has_overrides():
        return _forward_grid(B, T, n_dblocks, sms)
    return _cached_forward_grid(B, T, n_dblocks, sms)


@functools.lru_cache(maxsize=4096)
def _cached_forward_grid(B: int, T: int, n_dblocks: int, sms: int) -> ForwardGrid:
    return _forward_grid(B, T, n_dblocks, sms)


def _forward_grid(B: int, T: int, n_dblocks: int, sms: int) -> ForwardGrid:
    n_slots = max(1, triton_cdiv(T, overridden("chunk", CHUNK)))
    programs = B * n_dblocks
    target = PROGRAMS_PER_SM * sms
    if programs >= target:
        per_program = n_slots
    else:
        per_program = triton_cdiv(n_slots, min(triton_cdiv(target, max(programs, 1)), n_slots))
    per_program = overridden("chunks_per_program", per_program)
    per_program = max(per_program, triton_cdiv(n_slots, MAX_GRID_YZ))
    return ForwardGrid(n_slots, per_program, triton_cdiv(n_slots, per_program))


# The integer arguments of each kernel that Triton specialises on (value 1, divisibility by 16): the
# launch keys below include each of them (tests/test_fast_launch.py checks these lists against the
# kernels' do_not_specialize lists). Every other integer argument is do_not_specialize.
FORWARD_SPECIALIZED = ("d", "stride_hb", "stride_ht", "stride_hd", "stride_mt", "stride_wt", "stride_ob")
BACKWARD_SPECIALIZED = (
    "d",
    "stride_gob",
    "stride_god",
    "stride_mt",
    "stride_wt",
    "stride_gb",
    "stride_gt",
    "stride_gd",
)


def mask_arguments(mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(mask view, MASK_BITS, stride_mb, stride_mt): the integer view the kernels read, or a fallback
    pointer (never read) without a mask."""
    if mask is None:
        return fallback, -1, 0, 0
    view, bits = integer_view(mask)
    return view, bits, *view.stride()


def _forward_launcher() -> KernelLauncher:
    from .kernels.pool_forward import pool_forward_kernel

    return KernelLauncher(pool_forward_kernel)


def _backward_launcher() -> KernelLauncher:
    from .kernels.pool_backward import pool_backward_kernel

    return KernelLauncher(pool_backward_kernel)


def _weights_launcher() -> KernelLauncher:
    from .kernels.pool_backward import weights_backward_kernel

    return KernelLauncher(weights_backward_kernel)


forward_launcher = functools.cache(_forward_launcher)
backward_launcher = functools.cache(_backward_launcher)
weights_launcher = functools.cache(_weights_launcher)


def traced(launcher: KernelLauncher) -> TracedLauncher:
    """The ``wrap_triton`` launcher of the same kernel (for the triton ops torch.compile traces)."""
    return TracedLauncher(launcher.kernel)


def pool_forward(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    modes: str,
    weights: torch.Tensor | None = None,
    normalize_eps: float = -1.0,
    track_positions: bool = True,
    for_backward: bool = False,
    lean: bool = False,
    share_empty: bool = False,
    trace: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fused masked pooling forward on the Triton kernels: one launch.

    hidden (B, T, d) fp16/bf16/fp32/fp64, any strides; mask (B, T) any dtype, any strides, or None;
    modes comma-separated (e.g. "mean,max"); weights (B, T) float, any strides, or None
    (weighted_mean's user weights); normalize_eps >= 0: L2-normalise each output row (in the same
    launch: the last feature block of a row to finish); track_positions: keep max positions (indices
    or a gradient are needed; else values only); for_backward: also return what the backward needs;
    lean, share_empty: which outputs may come from shared buffers (see ``launch.ForwardOutputs``);
    trace: launched through ``wrap_triton`` with buffers of its own and no cached state, so that
    torch.compile can trace it (``fastpool.ops_triton``); every row may then span several programs.

    Returns (out, argmax, stats, norms, wsum, wmean, prefix): out (B, n_modes * d) hidden dtype;
    argmax (B, d) int32 when "max" is requested with track_positions (else (B, 0)); stats (3, B) int32
    (count, first, last; -1 when a row is empty); norms (B,) acc dtype (the rows' norms before
    normalisation; (0,) without); wsum (B,) acc dtype, the user weights' sum over each row's real
    tokens ((0,) without weights); wmean (B, d) acc dtype, the un-rounded weighted mean (only with
    user weights and for_backward, else (0, d)); prefix (B, n_chunks) int32, the real tokens before
    each chunk (only for rank-weighted mean with a mask and for_backward, else (B, 0)).

    Memory traffic: reads the real-token span of every row of hidden once, i.e.
    ``sum_b (real tokens of row b, holes excluded) * d * element_size`` bytes, plus the mask (one pass
    per feature block, L2-resident) and user weights' real elements; writes
    ``B * n_modes * d * element_size`` bytes, ``4 * B * d`` for argmax and ``12 * B`` for stats.
    Rows spread over several programs add, per chunk of CHUNK positions, ``4 * d`` bytes written and
    read for each sum kept (mean, weighted) and, per program, ``4 * d`` for max (``8 * d`` with
    positions); normalisation adds ``2 * 4 * B * n_modes * d`` (the un-rounded rows, L2-resident).
    """
    B, T, d = hidden.shape
    device = hidden.device
    if (lean or share_empty) and not trace and not has_overrides():
        repeat = _repeat_signature(
            hidden, mask, modes, weights, normalize_eps, track_positions, B, T, d, device, lean, for_backward
        )
        call = _repeat_calls.get(repeat)
        if call is not None:
            return call.launch(hidden, mask, weights, normalize_eps)
    plan = forward_plan(
        modes, hidden.dtype, mask is not None, weights is not None, normalize_eps >= 0, track_positions,
        for_backward, False,
    )  # fmt: skip
    outs = ForwardOutputs(plan, B, d, hidden.dtype, device, lean, share_empty, trace)
    if plan.store_prefix:
        prefix = torch.empty(
            (B, triton_cdiv(T, overridden("chunk", CHUNK))), dtype=torch.int32, device=device
        )
    elif lean or share_empty:
        prefix = empty(device, torch.int32)
    else:  # (B, 0) as documented and as the op's fake kernel says: an op returns no shared tensor
        prefix = torch.empty((B, 0), dtype=torch.int32, device=device)
    if B == 0 or d == 0:
        return _without_features(outs, mask, B, T, d, prefix)
    n_dblocks = check_feature_blocks(d, plan.block_d)
    if trace:
        # One program per chunk: no decision on the (possibly symbolic) sizes, the same bits.
        n_slots = max(1, triton_cdiv(T, overridden("chunk", CHUNK)))
        grid, split = ForwardGrid(n_slots, 1, n_slots), True
    else:
        grid = forward_grid(B, T, n_dblocks, sm_count(device))
        split = grid.programs_per_row > 1
    stats = outs.stats
    mask_view, mask_bits, stride_mb, stride_mt = mask_arguments(mask, stats)
    acc_dummy = placeholder(device, plan.acc)
    if weights is not None:
        weights_arg, (stride_wb, stride_wt) = weights, weights.stride()
    else:
        weights_arg, stride_wb, stride_wt = acc_dummy, 0, 0
    partials = partial_buffers(plan, B * grid.n_slots if split else 0, d, n_dblocks, device, trace)
    n_tickets = plan.ticket_count(B, n_dblocks, split)
    counters, epoch = ticket_counters(device, n_tickets, trace) if n_tickets else (stats, 1)
    stride_hb, stride_ht, stride_hd = hidden.stride()
    stride_ob = outs.out.stride(0)
    args = (
        hidden, mask_view, outs.out, outs.argmax if plan.track_positions else stats, stats,
        outs.wsum if plan.has_weights else acc_dummy, outs.wmean if plan.store_wmean else acc_dummy,
        prefix if plan.store_prefix else stats, *partials, counters, weights_arg, stats,
        outs.norms if plan.normalize else acc_dummy, outs.rowbuf if plan.normalize else acc_dummy,
        B, T, d, grid.chunks_per_program, grid.n_slots, 0, epoch,
        stride_hb, stride_ht, stride_hd, stride_mb, stride_mt, stride_wb, stride_wt, stride_ob,
        *plan.col_args, normalize_eps, int(plan.store_wmean), int(plan.store_prefix), mask_bits,
    )  # fmt: skip
    key = None if has_overrides() or trace else (
        plan, device, hidden.dtype, mask_view.dtype if mask is not None else None,
        weights.dtype if weights is not None else None, specialization(d), specialization(stride_hb),
        specialization(stride_ht), specialization(stride_hd), specialization(stride_mb),
        specialization(stride_mt), specialization(stride_wb), specialization(stride_wt),
        specialization(stride_ob), aligned(hidden), mask is None or aligned(mask_view),
        weights is None or aligned(weights), mask_bits >= 2**31,
    )  # fmt: skip
    grid_dims = (B, n_dblocks, grid.programs_per_row)
    launcher = traced(forward_launcher()) if trace else forward_launcher()
    launch_on(device, launcher, key, grid_dims, args, plan.constexprs, plan.options)
    if key is not None and (lean or (share_empty and plan.per_call_outputs_only)):
        mask_dtype = None if mask is None else mask.dtype
        _remember(
            repeat, RepeatCall(plan, outs, args, grid_dims, key, device, n_tickets > 0, lean, mask_dtype)
        )
    return outs.result(prefix)


# --- repeated calls --------------------------------------------------------------------------------
# An inference call (``lean``) with the same signature as an earlier one (modes, dtypes, shapes,
# strides, alignment, device and stream) reuses everything but the tensors it was given: its plan,
# grid, workspaces and launch key. Per call it allocates the output (and argmax when indices are
# asked for) and launches: what a serving loop calling with fixed shapes pays. A training call of the
# autograd fast path (``share_empty``) is repeated the same way when it returns nothing but out,
# argmax and stats (no user weights, normalisation or rank prefix): it also allocates its stats.

_repeat_calls: dict[tuple, RepeatCall] = {}
_REPEAT_LIMIT = 256


def _repeat_signature(
    hidden, mask, modes, weights, normalize_eps, track_positions, B, T, d, device, lean, for_backward
) -> tuple:
    stream = stream_key(device)
    hidden_part = (hidden.dtype, hidden.stride(), aligned(hidden))
    mask_part = None if mask is None else (mask.dtype, mask.stride(), aligned(mask))
    weights_part = None if weights is None else (weights.dtype, weights.stride(), aligned(weights))
    normalize = normalize_eps >= 0
    return (
        modes, B, T, d, hidden_part, mask_part, weights_part, normalize, track_positions, stream, lean,
        for_backward,
    )  # fmt: skip


def repeat_call(
    hidden: torch.Tensor, mask: torch.Tensor | None, modes: str, track_positions: bool, lean: bool,
    for_backward: bool,
) -> RepeatCall | None:  # fmt: skip
    """The repeatable launch an earlier ``pool_forward`` call with these arguments (no user weights or
    normalisation) left, on the current stream; None if there is none (``fastpool.express``)."""
    B, T, d = hidden.shape
    signature = _repeat_signature(
        hidden, mask, modes, None, -1.0, track_positions, B, T, d, hidden.device, lean, for_backward
    )
    return _repeat_calls.get(signature)


def _remember(signature: tuple, call: RepeatCall) -> None:
    if len(_repeat_calls) >= _REPEAT_LIMIT:
        _repeat_calls.clear()
    _repeat_calls[signature] = call


class RepeatCall:
    """A launch to repeat with new tensors: the argument tuple of the first call, cut around the
    per-call entries (hidden, mask, out, argmax, weights, epoch, normalize_eps)."""

    __slots__ = (
        "plan",
        "grid",
        "key",
        "device",
        "tickets",
        "shape",
        "dtype",
        "argmax_shape",
        "parts",
        "stats",
        "lean",
        "mask_view",
    )

    def __init__(
        self, plan, outs: ForwardOutputs, args: tuple, grid: tuple, key, device, tickets: bool, lean: bool,
        mask_dtype: torch.dtype | None,
    ):  # fmt: skip
        self.plan, self.grid, self.key, self.device, self.tickets = plan, grid, key, device, tickets
        self.shape, self.dtype = outs.out.shape, outs.out.dtype
        self.argmax_shape = outs.argmax.shape if plan.track_positions else None
        # lean: the stats live in the stream's workspace (nobody reads them); else each call's own.
        self.stats, self.lean = outs.stats, lean
        # The integer dtype a mask is viewed as (None: passed as it is), as integer_view decides.
        view = args[1]
        self.mask_view = None if view is outs.stats or view.dtype == mask_dtype else view.dtype
        # Positions in the kernel's argument list: 0 hidden, 1 mask, 2 out, 3 argmax, 15 weights,
        # 25 epoch, 40 normalize_eps.
        self.parts = (args[4:15], args[16:25], args[26:40], args[41:])
        if not self.plan.has_weights:
            self.parts = (args[4:15] + (args[15],) + args[16:25],) + self.parts[2:]

    def launch(self, hidden, mask, weights, normalize_eps: float) -> tuple:
        plan = self.plan
        # Sizes as separate ints: a tuple makes torch's argument parser try it as an int first and
        # format a TypeError (~3.5k host instructions an allocation). out has hidden's dtype.
        out = hidden.new_empty(*self.shape)
        argmax = (
            torch.empty(*self.argmax_shape, dtype=torch.int32, device=self.device)
            if self.argmax_shape
            else None
        )
        epoch = next_epoch() if self.tickets else 1
        # Pointer arguments a specialization never reads stay the first call's stats.
        placeholder_int = self.stats
        stats = (
            placeholder_int
            if self.lean
            else torch.empty(*self.stats.shape, dtype=torch.int32, device=self.device)
        )
        if mask is None:
            mask_arg = placeholder_int
        else:  # the mask's dtype is part of the signature: reinterpret it as the first call did
            mask_arg = mask if self.mask_view is None else mask.view(self.mask_view)
        argmax_arg = placeholder_int if argmax is None else argmax
        if plan.has_weights:
            head, middle, tail, rest = self.parts
            args = (
                hidden, mask_arg, out, argmax_arg, stats, *head[1:], weights, *middle, epoch, *tail,
                normalize_eps, *rest,
            )  # fmt: skip
        else:
            head, tail, rest = self.parts
            args = (hidden, mask_arg, out, argmax_arg, stats, *head[1:], epoch, *tail, normalize_eps, *rest)
        launch_on(self.device, forward_launcher(), self.key, self.grid, args, plan.constexprs, plan.options)
        empty_int = empty(self.device, torch.int32)
        if self.lean:
            return out, empty_int if argmax is None else argmax, stats, None, None, None, empty_int
        empty_acc = empty(self.device, plan.acc)
        return out, empty_int if argmax is None else argmax, stats, empty_acc, empty_acc, empty_acc, empty_int


def _without_features(outs: ForwardOutputs, mask, B: int, T: int, d: int, prefix: torch.Tensor) -> tuple:
    """B == 0 or d == 0: nothing to pool, but backward still needs the per-row sizes."""
    if B:
        from .eager import row_stats
        from .masks import real_tokens

        outs.stats = row_stats(real_tokens(mask), B, T, outs.out.device)
    prefix.zero_()
    outs.norms.zero_()
    outs.wsum.zero_()
    return outs.result(prefix)


def pool_backward(
    grad_out: torch.Tensor,
    mask: torch.Tensor | None,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    modes: str,
    weights: torch.Tensor | None = None,
    wsum: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    trace: bool = False,
) -> torch.Tensor:
    """Gradient of hidden (B, T, d) in ``dtype`` from grad_out (B, n_modes * d), any strides: one launch
    (through ``wrap_triton`` with ``trace``, as ``pool_forward``).

    Uses what forward saved: argmax (B, d) int32, stats (3, B) int32, and for weighted_mean the user
    weights' sums wsum (B,) or, with rank weights and a mask, prefix (B, n_chunks) int32; plus the
    mask and user weights themselves.
    Memory traffic: writes ``B * T * d * element_size`` bytes (each element exactly once, no memset);
    reads grad_out (``B * n_modes * d`` elements), argmax (``4 * B * d`` bytes) and the mask.
    """
    B = stats.shape[1]
    signature = None
    if not has_overrides() and not trace:
        signature = _backward_signature(grad_out, mask, weights, modes, B, T, dtype)
        call = _backward_calls.get(signature)
        if call is not None:
            return call.launch(grad_out, mask, argmax, stats, weights, wsum, prefix)
    call = BackwardCall(grad_out, mask, stats, T, dtype, modes, weights, prefix, signature is not None, trace)
    if signature is not None and call.grid is not None:
        if len(_backward_calls) >= _REPEAT_LIMIT:
            _backward_calls.clear()
        _backward_calls[signature] = call
    return call.launch(grad_out, mask, argmax, stats, weights, wsum, prefix)


_backward_calls: dict[tuple, BackwardCall] = {}


def _backward_signature(grad_out, mask, weights, modes: str, B: int, T: int, dtype: torch.dtype) -> tuple:
    return (
        modes, B, T, dtype, grad_out.dtype, grad_out.shape[1], grad_out.stride(), aligned(grad_out),
        None if mask is None else (mask.dtype, mask.stride(), aligned(mask)),
        None if weights is None else (weights.dtype, weights.stride(), aligned(weights)),
        stream_key(grad_out.device),
    )  # fmt: skip


def backward_call(
    grad_out: torch.Tensor, mask: torch.Tensor | None, modes: str, B: int, T: int, dtype: torch.dtype
) -> BackwardCall | None:
    """The cached launch an earlier ``pool_backward`` call with these arguments (no user weights) left
    on the current stream; None if there is none (``fastpool.express``)."""
    return _backward_calls.get(_backward_signature(grad_out, mask, None, modes, B, T, dtype))


class BackwardCall:
    """Everything about a backward launch but its tensors, for one call signature (modes, dtypes,
    shapes, strides, alignment, stream): built once, then each call allocates the gradient and
    launches."""

    __slots__ = (
        "shape", "dtype", "device", "grid", "key", "constexprs", "options", "slots", "tail", "ranks",
        "launcher", "same_dtype",
    )  # fmt: skip

    def __init__(self, grad_out, mask, stats, T, dtype, modes, weights, prefix, cacheable: bool, trace=False):
        names = modes.split(",")
        B = stats.shape[1]
        d = grad_out.shape[1] // len(names)
        self.shape, self.dtype, self.device = (B, T, d), dtype, grad_out.device
        self.same_dtype = grad_out.dtype == dtype
        self.grid = None
        self.launcher = traced(backward_launcher()) if trace else backward_launcher()
        if B * T * d == 0:
            return
        self.slots = slots = mode_columns(names, 1)
        size = torch.empty((), dtype=dtype).element_size()
        block_t = overridden("block_t", token_block(size))
        block_d = overridden("block_d", feature_block(size))
        mask_view, mask_bits, stride_mb, stride_mt = mask_arguments(mask, stats)
        stride_wb, stride_wt = weights.stride() if weights is not None else (0, 0)
        self.ranks = slots["weighted_mean"] >= 0 and weights is None and mask is not None
        n_tblocks = triton_cdiv(T, block_t)
        stride_gob, stride_god = grad_out.stride()
        grad_strides = (T * d, d, 1)  # the gradient is allocated contiguous
        self.tail = (
            B, T, d, n_tblocks, prefix.shape[1] if self.ranks else 0,
            stride_gob, stride_god, stride_mb, stride_mt, stride_wb, stride_wt, *grad_strides,
            *kernel_columns(slots), mask_bits,
        )  # fmt: skip
        self.constexprs = dict(
            HAS_MASK=mask is not None, HAS_WEIGHTS=weights is not None, ACC_DTYPE=triton_acc_dtype(dtype),
            CHUNK=overridden("chunk", CHUNK), BLOCK_T=block_t, BLOCK_D=block_d,
        )  # fmt: skip
        self.options = dict(num_warps=overridden("num_warps", NUM_WARPS))
        self.key = None
        if cacheable:
            self.key = (
                self.device, dtype, grad_out.dtype, mask_view.dtype if mask is not None else None,
                weights.dtype if weights is not None else None,
                *map(specialization, (d, stride_gob, stride_god, stride_mt, stride_wt, *grad_strides)),
                aligned(grad_out), mask is None or aligned(mask_view), weights is None or aligned(weights),
                mask_bits >= 2**31,
            )  # fmt: skip
        self.grid = (B * n_tblocks, check_feature_blocks(d, block_d), 1)

    def launch(self, grad_out, mask, argmax, stats, weights, wsum, prefix) -> torch.Tensor:
        # Sizes as separate ints (see RepeatCall.launch); grad_out's dtype is part of the cache key.
        if self.same_dtype:
            grad = grad_out.new_empty(*self.shape)
        else:
            grad = torch.empty(*self.shape, dtype=self.dtype, device=self.device)
        if self.grid is None:
            return grad
        dummy = placeholder(self.device, wsum.dtype) if weights is None else wsum
        args = (
            grad_out, stats if mask is None else integer_view(mask)[0],
            argmax if self.slots["max"] >= 0 else stats,
            stats, prefix if self.ranks else stats, dummy if weights is None else weights, dummy, grad,
            *self.tail,
        )  # fmt: skip
        launch_on(self.device, self.launcher, self.key, self.grid, args, self.constexprs, self.options)
        return grad


def weights_backward(
    grad_block: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor,
    wsum: torch.Tensor,
    wmean: torch.Tensor,
    trace: bool = False,
) -> torch.Tensor:
    """(B, T) gradient of weighted_mean with user weights with respect to the weights, in their dtype:
    ``(g . x_t - g . out) / W`` at real tokens of rows with W != 0, else 0; one launch.

    grad_block (B, d) is the gradient of the weighted_mean output; wsum (B,) and wmean (B, d) the
    forward's un-rounded W and weighted mean. Each dot product runs over d in a fixed order, so the
    result's bits depend only on the row. Memory traffic: reads hidden's real tokens once, writes
    ``B * T`` weights.
    """
    B, T, d = hidden.shape
    device = hidden.device
    grad = torch.empty((B, T), dtype=weights.dtype, device=device)
    if grad.numel() == 0:
        return grad
    if d == 0:
        return grad.zero_()
    size = hidden.element_size()
    block_t = overridden("block_t", token_block(size))
    block_d = overridden("block_d", feature_block(size))
    mask_view, mask_bits, stride_mb, stride_mt = mask_arguments(mask, wsum)
    args = (
        grad_block, hidden, mask_view, wsum, wmean, grad, placeholder(device, torch.int32),
        B, T, d, 0, *grad_block.stride(), *hidden.stride(), stride_mb, stride_mt, *grad.stride(), mask_bits,
    )  # fmt: skip
    constexprs = dict(
        HAS_MASK=mask is not None, PACKED=False, ACC_DTYPE=triton_acc_dtype(hidden.dtype),
        BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
    grid = (B, triton_cdiv(T, block_t), 1)
    launcher = traced(weights_launcher()) if trace else weights_launcher()
    launch_on(device, launcher, None, grid, args, constexprs, dict(num_warps=NUM_WARPS))
    return grad


__all__ = ["LANES", "NUM_STAGES", "SCAN_BLOCK", "forward_grid", "pool_backward", "pool_forward"]
