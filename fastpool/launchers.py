"""The "triton" backend for padded batches: grids, workspaces and launches of the pooling kernels.

Kernels live in ``fastpool.kernels``; this module imports them lazily so ``import fastpool`` works
without triton. Nothing here copies hidden: every stride is passed to the kernels as it is, and the
mask is reinterpreted (``Tensor.view(dtype)``, no copy) as an integer of its own width. Every pass is
one kernel launch with no host-device synchronisation. Shared rules (block sizes, the fixed
chunking, workspaces) live in ``fastpool.launch``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .launch import (
    CHUNK,
    LANES,
    MAX_GRID_YZ,
    NUM_STAGES,
    PROGRAMS_PER_SM,
    SCAN_BLOCK,
    check_feature_blocks,
    feature_block,
    forward_setup,
    has_overrides,
    kernel_columns,
    mode_flags,
    on_device,
    outputs,
    overridden,
    partial_buffers,
    placeholder,
    sm_count,
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

    chunk: int  # CHUNK: positions per chunk (fixed; only tests override it)
    lanes: int  # LANES (fixed; only tests override it)
    n_slots: int  # cdiv(T, chunk): the most chunks a row can have
    chunks_per_program: int  # G: chunks one program pools
    programs_per_row: int  # Z = cdiv(n_slots, G); 1 means one program holds a whole row
    scan_block: int
    num_stages: int


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
    chunk = overridden("chunk", CHUNK)
    n_slots = max(1, triton_cdiv(T, chunk))
    programs = B * n_dblocks
    target = PROGRAMS_PER_SM * sms
    if programs >= target:
        per_program = n_slots
    else:
        per_program = triton_cdiv(n_slots, min(triton_cdiv(target, max(programs, 1)), n_slots))
    per_program = overridden("chunks_per_program", per_program)
    per_program = max(per_program, triton_cdiv(n_slots, MAX_GRID_YZ))
    return ForwardGrid(
        chunk=chunk,
        lanes=overridden("lanes", LANES),
        n_slots=n_slots,
        chunks_per_program=per_program,
        programs_per_row=triton_cdiv(n_slots, per_program),
        scan_block=overridden("scan_block", SCAN_BLOCK),
        num_stages=overridden("num_stages", NUM_STAGES),
    )


def mask_arguments(mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(mask view, MASK_BITS, stride_mb, stride_mt): the integer view the kernels read, or a fallback
    pointer (never read) without a mask."""
    if mask is None:
        return fallback, -1, 0, 0
    view, bits = integer_view(mask)
    return view, bits, *view.stride()


def pool_forward(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
    normalize_eps: float = -1.0,
    track_positions: bool = True,
    for_backward: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fused masked pooling forward on the Triton kernels: one launch.

    hidden (B, T, d) fp16/bf16/fp32/fp64, any strides; mask (B, T) any dtype, any strides, or None;
    weights (B, T) float, any strides, or None (weighted_mean's user weights); normalize_eps >= 0:
    L2-normalise each output row (in the same launch: the last feature block of a row to finish);
    track_positions: keep max positions (indices or a gradient are needed; else values only);
    for_backward: also return what the backward kernels need (see below).

    Returns (out, argmax, stats, norms, wsum, wmean, prefix): out (B, len(modes) * d) hidden dtype;
    argmax (B, d) int32 when "max" is requested with track_positions (else (B, 0)); stats (3, B) int32
    (count, first, last; -1 when a row is empty); norms (B,) acc dtype (the rows' norms before
    normalisation; (0,) without); wsum (B,) acc dtype, the user weights' sum over each row's real
    tokens ((0,) without weights); wmean (B, d) acc dtype, the un-rounded weighted mean (only with
    user weights and for_backward, else (0, d)); prefix (B, n_chunks) int32, the real tokens before
    each chunk (only for rank-weighted mean with a mask and for_backward, else (B, 0)).

    Memory traffic: reads the real-token span of every row of hidden once, i.e.
    ``sum_b (real tokens of row b, holes excluded) * d * element_size`` bytes, plus the mask (one pass
    per feature block, L2-resident) and user weights' real elements; writes
    ``B * len(modes) * d * element_size`` bytes, ``4 * B * d`` for argmax and ``12 * B`` for stats.
    Rows spread over several programs add, per chunk of CHUNK positions, ``4 * d`` bytes written and
    read for each sum kept (mean, weighted) and, per program, ``4 * d`` for max (``8 * d`` with
    positions).
    """
    from .kernels.pool_forward import pool_forward_kernel

    B, T, d = hidden.shape
    device = hidden.device
    setup = forward_setup(
        hidden, B, d, modes, weights is not None, normalize_eps, track_positions, for_backward
    )
    store_prefix = for_backward and setup.do_weighted and not setup.has_weights and mask is not None
    if B == 0 or d == 0:
        if B:
            # Nothing to pool, but backward still needs the per-row sizes.
            from .eager import row_stats
            from .masks import real_tokens

            setup.stats = row_stats(real_tokens(mask), B, T, device)
        prefix = torch.zeros((B, triton_cdiv(T, overridden("chunk", CHUNK)) if store_prefix else 0),
                             dtype=torch.int32, device=device)  # fmt: skip
        return outputs(setup, prefix)
    n_dblocks = check_feature_blocks(d, setup.block_d)
    grid = forward_grid(B, T, n_dblocks, sm_count(device))
    split = grid.programs_per_row > 1
    out, stats = setup.out, setup.stats
    prefix = torch.empty((B, grid.n_slots if store_prefix else 0), dtype=torch.int32, device=device)
    mask_view, mask_bits, stride_mb, stride_mt = mask_arguments(mask, stats)
    acc_placeholder = placeholder(device, setup.acc)
    weights_arg, (stride_wb, stride_wt) = (
        (weights, weights.stride()) if weights is not None else (acc_placeholder, (0, 0))
    )
    partials = partial_buffers(setup, B * grid.n_slots if split else 0, d, n_dblocks, device)
    n_tickets = setup.ticket_count(B, n_dblocks, split)
    counters, epoch = ticket_counters(device, n_tickets) if n_tickets else (stats, 1)
    with on_device(device):
        pool_forward_kernel[(B, n_dblocks, grid.programs_per_row)](
            hidden, mask_view, out, setup.argmax if setup.track_positions else stats, stats,
            setup.wsum if setup.has_weights else acc_placeholder,
            setup.wmean if setup.wmean.numel() else acc_placeholder,
            prefix if store_prefix else stats,
            *partials, counters, weights_arg, stats,
            setup.norms if setup.normalize_eps >= 0 else acc_placeholder,
            setup.rowbuf if setup.normalize_eps >= 0 else acc_placeholder,
            B, T, d, grid.chunks_per_program, grid.n_slots, 0, epoch,
            *hidden.stride(), stride_mb, stride_mt, stride_wb, stride_wt, out.stride(0),
            *setup.col_args, setup.normalize_eps, int(setup.wmean.numel() > 0), int(store_prefix), mask_bits,
            HAS_MASK=mask is not None, LANES=grid.lanes, CHUNK=grid.chunk, SCAN_BLOCK=grid.scan_block,
            NUM_STAGES=grid.num_stages, **mode_flags(setup, hidden, packed=False),
        )  # fmt: skip
    return outputs(setup, prefix)


def pool_backward(
    grad_out: torch.Tensor,
    mask: torch.Tensor | None,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
    wsum: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of hidden (B, T, d) in ``dtype`` from grad_out (B, len(modes) * d), any strides: one launch.

    Uses what forward saved: argmax (B, d) int32, stats (3, B) int32, and for weighted_mean the user
    weights' sums wsum (B,) or, with rank weights and a mask, prefix (B, n_chunks) int32; plus the
    mask and user weights themselves.
    Memory traffic: writes ``B * T * d * element_size`` bytes (each element exactly once, no memset);
    reads grad_out (``B * len(modes) * d`` elements), argmax (``4 * B * d`` bytes) and the mask.
    """
    from .kernels.pool_backward import pool_backward_kernel

    B = stats.shape[1]
    d = grad_out.shape[1] // len(modes)
    device = grad_out.device
    grad = torch.empty((B, T, d), dtype=dtype, device=device)
    if grad.numel() == 0:
        return grad
    cols = mode_columns(modes, d)
    size = grad.element_size()
    block_t = overridden("block_t", token_block(size))
    block_d = overridden("block_d", feature_block(size))
    mask_view, mask_bits, stride_mb, stride_mt = mask_arguments(mask, stats)
    acc_placeholder = placeholder(device, torch.float64 if dtype == torch.float64 else torch.float32)
    if weights is not None:
        weights_arg, (stride_wb, stride_wt) = weights, weights.stride()
    else:
        weights_arg, stride_wb, stride_wt = acc_placeholder, 0, 0
    ranks_from_prefix = cols["weighted_mean"] >= 0 and weights is None and mask is not None
    n_tblocks = triton_cdiv(T, block_t)
    grid = (B * n_tblocks, check_feature_blocks(d, block_d))
    with on_device(device):
        pool_backward_kernel[grid](
            grad_out, mask_view, argmax if cols["max"] >= 0 else stats, stats,
            prefix if ranks_from_prefix else stats, weights_arg, wsum if weights is not None else acc_placeholder,
            grad,
            B, T, d, n_tblocks, prefix.shape[1] if ranks_from_prefix else 0,
            *grad_out.stride(), stride_mb, stride_mt, stride_wb, stride_wt, *grad.stride(),
            *kernel_columns(cols), mask_bits,
            HAS_MASK=mask is not None, HAS_WEIGHTS=weights is not None, ACC_DTYPE=triton_acc_dtype(dtype),
            CHUNK=overridden("chunk", CHUNK), BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=overridden("num_warps", 4),
        )  # fmt: skip
    return grad


def weights_backward(
    grad_block: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor,
    wsum: torch.Tensor,
    wmean: torch.Tensor,
) -> torch.Tensor:
    """(B, T) gradient of weighted_mean with user weights with respect to the weights, in their dtype:
    ``(g . x_t - g . out) / W`` at real tokens of rows with W != 0, else 0; one launch.

    grad_block (B, d) is the gradient of the weighted_mean output; wsum (B,) and wmean (B, d) the
    forward's un-rounded W and weighted mean. Each dot product runs over d in a fixed order, so the
    result's bits depend only on the row. Memory traffic: reads hidden's real tokens once, writes
    ``B * T`` weights.
    """
    from .kernels.pool_backward import weights_backward_kernel

    B, T, d = hidden.shape
    device = hidden.device
    grad = torch.empty((B, T), dtype=weights.dtype, device=device)
    if grad.numel() == 0:
        return grad
    size = hidden.element_size()
    block_t = overridden("block_t", token_block(size))
    block_d = overridden("block_d", feature_block(size))
    mask_view, mask_bits, stride_mb, stride_mt = mask_arguments(mask, wsum)
    with on_device(device):
        weights_backward_kernel[(B, triton_cdiv(T, block_t))](
            grad_block, hidden, mask_view, wsum, wmean, grad, placeholder(device, torch.int32),
            B, T, d, 0, *grad_block.stride(), *hidden.stride(), stride_mb, stride_mt, *grad.stride(),
            mask_bits,
            HAS_MASK=mask is not None, PACKED=False, ACC_DTYPE=triton_acc_dtype(hidden.dtype),
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=overridden("num_warps", 4),
        )  # fmt: skip
    return grad
