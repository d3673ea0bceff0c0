"""Triton launchers for packed batches: (N, d) tokens cut into S segments by ``cu_seqlens``.

The forward is the padded kernel run with ``PACKED``; the backward has a packed twin. Segments are
cut into the same fixed chunks as padded rows (CHUNK tokens from the segment's first token), so a
packed segment pools to the same bits as the same sequence in a padded batch. Program s < S owns the
first chunk of segment s; program S + p owns the later chunk of a segment that starts in the window
[p * CHUNK, (p + 1) * CHUNK) of the token axis, found by a binary search of the offsets on the device.
One launch per pass, no work list, no host-device sync; with ``max_seqlen <= CHUNK`` the window
programs are left out of the grid.
"""

from __future__ import annotations

import functools

import torch

from .fast_launch import KernelLauncher, aligned, specialization
from .launch import (
    CHUNK,
    MAX_GRID_X,
    NUM_WARPS,
    ForwardOutputs,
    check_feature_blocks,
    empty,
    feature_block,
    forward_plan,
    has_overrides,
    kernel_columns,
    launch_on,
    overridden,
    partial_buffers,
    placeholder,
    ticket_counters,
    token_block,
    triton_acc_dtype,
    triton_cdiv,
)
from .launchers import forward_launcher, traced, weights_launcher
from .modes import mode_columns


def _packed_backward_launcher() -> KernelLauncher:
    from .kernels.pool_backward import packed_backward_kernel

    return KernelLauncher(packed_backward_kernel)


packed_backward_launcher = functools.cache(_packed_backward_launcher)


def packed_programs(S: int, N: int, max_seqlen: int | None) -> tuple[int, int]:
    """(programs along grid axis 0, chunk length): S segment programs, plus one per window of the
    token axis unless every segment is known to fit one chunk."""
    chunk = overridden("chunk", CHUNK)
    windows = 0 if max_seqlen is not None and max_seqlen <= chunk else triton_cdiv(N, chunk)
    programs = S + windows
    if programs > MAX_GRID_X:
        raise ValueError(f"cu_seqlens: expected at most {MAX_GRID_X} programs, got {programs}")
    return programs, chunk


def search_steps(S: int) -> int:
    """Iterations of a binary search over S segments."""
    return max(1, S.bit_length())


def clamped_offsets(cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """(S + 1,) int64 offsets clamped into [0, N] and made non-decreasing: equal to cu_seqlens when
    it is well formed, and safe to hand to torch ops that trust their offsets when it is not."""
    return torch.cummax(cu_seqlens.long().clamp(0, N), 0).values


def pool_forward(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    modes: str,
    weights: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    normalize_eps: float = -1.0,
    track_positions: bool = True,
    for_backward: bool = False,
    lean: bool = False,
    share_empty: bool = False,
    trace: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fused pooling of a packed batch on the Triton kernels: one launch.

    hidden (N, d) fp16/bf16/fp32/fp64, any strides; cu_seqlens (S + 1,) int32/int64 offsets;
    modes comma-separated; weights (N,) float or None; max_seqlen: an upper bound on the segment
    lengths, or None; normalize_eps, track_positions, for_backward, lean, share_empty, trace as
    ``launchers.pool_forward`` (traced launches always have window programs).
    Returns (out, argmax, stats, norms, wsum, wmean, prefix) as ``launchers.pool_forward`` with S
    rows: argmax holds global token indices, stats (length, first, last) global token indices, and
    prefix is always (S, 0) (ranks inside a segment need no prefix).

    Memory traffic: reads every token of hidden once (``N * d * element_size`` bytes) and
    ``cu_seqlens``; writes ``S * n_modes * d * element_size`` bytes plus argmax and stats.
    Segments longer than CHUNK add, per chunk, ``4 * d`` bytes written and read for each sum kept and
    ``4 * d`` (``8 * d`` with positions) for max.
    """
    N, d = hidden.shape
    S = cu_seqlens.shape[0] - 1
    device = hidden.device
    plan = forward_plan(
        modes,
        hidden.dtype,
        False,
        weights is not None,
        normalize_eps >= 0,
        track_positions,
        for_backward,
        True,
    )
    outs = ForwardOutputs(plan, S, d, hidden.dtype, device, lean, share_empty, trace)
    if lean or share_empty:
        prefix = empty(device, torch.int32)
    else:  # (S, 0) as documented and as the op's fake kernel says: an op returns no shared tensor
        prefix = torch.empty((S, 0), dtype=torch.int32, device=device)
    if S == 0 or d == 0:
        if S and d == 0:
            from .eager_packed import packed_stats

            outs.stats = packed_stats(cu_seqlens)
        outs.norms.zero_()
        outs.wsum.zero_()
        return outs.result(prefix)
    stats = outs.stats
    n_dblocks = check_feature_blocks(d, plan.block_d)
    programs, _ = packed_programs(S, N, None if trace else max_seqlen)
    split = trace or programs > S  # some segment may need several chunks
    acc_dummy = placeholder(device, plan.acc)
    weights_arg, stride_wt = (weights, weights.stride(0)) if weights is not None else (acc_dummy, 0)
    partials = partial_buffers(plan, programs if split else 0, d, n_dblocks, device, trace)
    n_tickets = plan.ticket_count(S, n_dblocks, split)
    counters, epoch = ticket_counters(device, n_tickets, trace) if n_tickets else (stats, 1)
    stride_ht, stride_hd = hidden.stride()
    stride_ob = outs.out.stride(0)
    args = (
        hidden, stats, outs.out, outs.argmax if plan.track_positions else stats, stats,
        outs.wsum if plan.has_weights else acc_dummy, outs.wmean if plan.store_wmean else acc_dummy, stats,
        *partials, counters, weights_arg, cu_seqlens,
        outs.norms if plan.normalize else acc_dummy, outs.rowbuf if plan.normalize else acc_dummy,
        S, N, d, 1 if split else 2**30, 0, search_steps(S), epoch,
        0, stride_ht, stride_hd, 0, 0, 0, stride_wt, stride_ob,
        *plan.col_args, normalize_eps, int(plan.store_wmean), 0, -1,
    )  # fmt: skip
    key = None if has_overrides() or trace else (
        plan, device, hidden.dtype, cu_seqlens.dtype, weights.dtype if weights is not None else None,
        specialization(d), specialization(stride_ht), specialization(stride_hd), specialization(stride_wt),
        specialization(stride_ob), aligned(hidden), aligned(cu_seqlens), weights is None or aligned(weights),
    )  # fmt: skip
    launcher = traced(forward_launcher()) if trace else forward_launcher()
    launch_on(device, launcher, key, (programs, n_dblocks, 1), args, plan.constexprs, plan.options)
    return outs.result(prefix)


def pool_backward(
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    N: int,
    dtype: torch.dtype,
    modes: str,
    weights: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    wsum: torch.Tensor | None = None,
    trace: bool = False,
) -> torch.Tensor:
    """Gradient of a packed hidden (N, d) in ``dtype`` from grad_out (S, len(modes) * d), any strides:
    one launch over the forward's programs.

    Memory traffic: writes ``N * d * element_size`` bytes (each element once, no memset); reads
    grad_out, argmax and stats (per segment, L2-resident) and the user weights if any.
    """
    names = modes.split(",")
    S = stats.shape[1]
    d = grad_out.shape[1] // len(names)
    device = grad_out.device
    grad = torch.empty((N, d), dtype=dtype, device=device)
    if grad.numel() == 0:
        return grad
    if S == 0:
        return grad.zero_()  # no segment covers a token
    cols = mode_columns(names, 1)
    size = grad.element_size()
    block_t = overridden("block_t", token_block(size))
    block_d = overridden("block_d", feature_block(size))
    programs, chunk = packed_programs(S, N, None if trace else max_seqlen)
    acc_placeholder = placeholder(device, torch.float64 if dtype == torch.float64 else torch.float32)
    weights_arg, stride_wt = (weights, weights.stride(0)) if weights is not None else (acc_placeholder, 0)
    stride_gob, stride_god = grad_out.stride()
    stride_gt, stride_gd = grad.stride()
    args = (
        grad_out, cu_seqlens, argmax if cols["max"] >= 0 else stats, stats,
        weights_arg, wsum if weights is not None else acc_placeholder, grad,
        S, N, d, search_steps(S), stride_gob, stride_god, stride_wt, stride_gt, stride_gd,
        *kernel_columns(cols),
    )  # fmt: skip
    constexprs = dict(
        HAS_WEIGHTS=weights is not None, ACC_DTYPE=triton_acc_dtype(dtype), CHUNK=chunk, BLOCK_T=block_t,
        BLOCK_D=block_d,
    )  # fmt: skip
    key = None if has_overrides() or trace else (
        device, dtype, grad_out.dtype, cu_seqlens.dtype, weights.dtype if weights is not None else None,
        *map(specialization, (d, stride_gob, stride_god, stride_wt, stride_gt, stride_gd)),
        aligned(grad_out), aligned(cu_seqlens), weights is None or aligned(weights),
    )  # fmt: skip
    grid = (programs, check_feature_blocks(d, block_d), 1)
    options = dict(num_warps=overridden("num_warps", NUM_WARPS))
    launcher = traced(packed_backward_launcher()) if trace else packed_backward_launcher()
    launch_on(device, launcher, key, grid, args, constexprs, options)
    return grad


def weights_backward(
    grad_block: torch.Tensor,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    weights: torch.Tensor,
    wsum: torch.Tensor,
    wmean: torch.Tensor,
    trace: bool = False,
) -> torch.Tensor:
    """(N,) gradient of packed weighted_mean with user weights with respect to the weights (as
    ``launchers.weights_backward``); one launch."""
    N, d = hidden.shape
    S = cu_seqlens.shape[0] - 1
    device = hidden.device
    grad = torch.empty((N,), dtype=weights.dtype, device=device)
    if N == 0:
        return grad
    if S == 0 or d == 0:
        return grad.zero_()
    size = hidden.element_size()
    block_t = overridden("block_t", token_block(size))
    block_d = overridden("block_d", feature_block(size))
    stride_ht, stride_hd = hidden.stride()
    args = (
        grad_block, hidden, wsum, wsum, wmean, grad, cu_seqlens,
        S, N, d, search_steps(S), *grad_block.stride(), 0, stride_ht, stride_hd, 0, 0, 0, grad.stride(0), -1,
    )  # fmt: skip
    constexprs = dict(
        HAS_MASK=False,
        PACKED=True,
        ACC_DTYPE=triton_acc_dtype(hidden.dtype),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    grid = (triton_cdiv(N, block_t), 1, 1)
    launcher = traced(weights_launcher()) if trace else weights_launcher()
    launch_on(device, launcher, None, grid, args, constexprs, dict(num_warps=NUM_WARPS))
    return grad
