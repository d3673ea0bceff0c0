"""Backward pooling kernel: the (B, T, d) gradient of hidden, every element written exactly once.

Grid: (B * cdiv(T, BLOCK_T), cdiv(d, BLOCK_D)). Each program owns one (BLOCK_T, BLOCK_D) tile of
the gradient and writes all of it: real tokens get the mean share ``grad / count`` plus the max
gradient where the saved argmax equals the position plus the first/last-token gradient at the saved
first/last position; every other element, padding included, gets 0. The tiles partition
(B, T, d), so there is no separate memset, no read of hidden, no atomics, and the result is the
same bit for bit on every run. Gradients are summed in a fixed order in float32 (float64 for
float64) and cast once.
"""

import triton
import triton.language as tl

from .mask_scan import COLUMN_ARGS, exact_sqrt, packed_range, weight_total


@triton.jit
def _mode_grad(
    grad_row,  # pointer: grad_out of this row
    col,  # int: column offset of the mode's block
    d_offs,  # (BLOCK_D,) int32
    d_in,  # (BLOCK_D,) bool
    stride_god,
    ACC_DTYPE: tl.constexpr,
):
    g = tl.load(grad_row + (col + d_offs).to(tl.int64) * stride_god, mask=d_in, other=0.0)
    return g.to(ACC_DTYPE)


@triton.jit
def grad_tile(
    grad_row,  # pointer: grad_out of this row (or segment)
    argmax_row,  # pointer: argmax of this row, (d,) int32; unused unless col_max >= 0
    t,  # (BLOCK_T,) int32 positions of the tile
    real,  # (BLOCK_T,) bool: real tokens of a row that has any
    weight,  # (BLOCK_T,) acc dtype: weighted_mean weight of each token (0 where not real)
    total_weight,  # acc dtype scalar: the weights' sum over the row (0: no weighted gradient)
    count,  # int32 scalar: real tokens of the row
    first,  # int32 scalar: first real position (-1 if none)
    last,  # int32 scalar: last real position (-1 if none)
    d_offs,  # (BLOCK_D,) int32
    d_in,  # (BLOCK_D,) bool
    stride_god,
    col_mean,
    col_max,
    col_first,
    col_last,
    col_sqrt,
    col_weighted,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_T, BLOCK_D) gradient of hidden at positions ``t``, summed over the requested modes.

    Mode flags are uniform runtime branches: the tile is written once whatever the mix of modes.
    """
    acc = tl.zeros((BLOCK_T, BLOCK_D), ACC_DTYPE)
    if (col_mean >= 0) | (col_sqrt >= 0):
        n = tl.maximum(count, 1).to(ACC_DTYPE)
        share = tl.zeros((BLOCK_D,), ACC_DTYPE)
        if col_mean >= 0:
            share += _mode_grad(grad_row, col_mean, d_offs, d_in, stride_god, ACC_DTYPE) / n
        if col_sqrt >= 0:
            share += _mode_grad(grad_row, col_sqrt, d_offs, d_in, stride_god, ACC_DTYPE) / exact_sqrt(n)
        acc += tl.where(real[:, None], share[None, :], 0.0)
    if col_weighted >= 0:
        nonzero = total_weight != 0.0  # an empty row, or user weights summing to 0: no gradient
        g = _mode_grad(grad_row, col_weighted, d_offs, d_in, stride_god, ACC_DTYPE)
        g = tl.where(nonzero, g / tl.where(nonzero, total_weight, 1.0), 0.0)
        acc += weight[:, None] * g[None, :]
    if col_max >= 0:
        g = _mode_grad(grad_row, col_max, d_offs, d_in, stride_god, ACC_DTYPE)
        pos = tl.load(argmax_row + d_offs, mask=d_in, other=-1)
        acc += tl.where(t[:, None] == pos[None, :], g[None, :], 0.0)
    if col_first >= 0:
        g = _mode_grad(grad_row, col_first, d_offs, d_in, stride_god, ACC_DTYPE)
        acc += tl.where((t == first)[:, None], g[None, :], 0.0)
    if col_last >= 0:
        g = _mode_grad(grad_row, col_last, d_offs, d_in, stride_god, ACC_DTYPE)
        acc += tl.where((t == last)[:, None], g[None, :], 0.0)
    return acc


@triton.jit(do_not_specialize=[*COLUMN_ARGS, "MASK_BITS"])
def pool_backward_kernel(
    grad_out_ptr,  # (B, n_modes * d) any strides, any float dtype
    mask_ptr,  # (B, T) integer view of the mask, any strides; unused unless HAS_MASK
    argmax_ptr,  # (B, d) int32, -1 for empty rows; unused unless col_max >= 0
    stats_ptr,  # (3, B) int32: count, first (-1 if empty), last (-1 if empty)
    ranks_ptr,  # (B, T) int32 rank of each real token (1, 2, ...), 0 at padding; weighted_mean with a mask
    weights_ptr,  # (B, T) float user weights of weighted_mean, any strides; HAS_WEIGHTS only
    wsum_ptr,  # (B,) acc dtype: their sum over real tokens; HAS_WEIGHTS only
    grad_ptr,  # (B, T, d) output, hidden dtype, any strides
    B,
    T,
    d,
    n_tblocks,  # cdiv(T, BLOCK_T)
    stride_gob,
    stride_god,
    stride_mb,
    stride_mt,
    stride_wb,
    stride_wt,
    stride_gb,
    stride_gt,
    stride_gd,
    col_mean,  # column offset of each mode's block in grad_out, -1 when not requested
    col_max,
    col_first,
    col_last,
    col_sqrt,  # mean_sqrt_len
    col_weighted,  # weighted_mean
    MASK_BITS,  # bits that make a mask element nonzero (float masks: all but the sign)
    HAS_MASK: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write one (BLOCK_T, BLOCK_D) tile of d(loss)/d(hidden)."""
    pid = tl.program_id(0)
    row = (pid // n_tblocks).to(tl.int64)
    t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = t < T
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_offs < d
    count = tl.load(stats_ptr + row)
    real = t_in & (count > 0)
    if HAS_MASK:
        if (col_mean >= 0) | (col_sqrt >= 0) | ((col_weighted >= 0) & HAS_WEIGHTS):
            m = tl.load(mask_ptr + row * stride_mb + t.to(tl.int64) * stride_mt, mask=t_in, other=0)
            real = real & ((m & MASK_BITS) != 0)
    weight = tl.zeros((BLOCK_T,), ACC_DTYPE)
    total_weight = tl.zeros((), ACC_DTYPE)
    if col_weighted >= 0:
        total_weight = weight_total(wsum_ptr, row, count, ACC_DTYPE, HAS_WEIGHTS)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + row * stride_wb + t.to(tl.int64) * stride_wt, mask=real, other=0.0)
            weight = w.to(ACC_DTYPE)  # 0 at padding (never loaded)
        else:
            if HAS_MASK:
                rank = tl.load(ranks_ptr + row * T + t, mask=t_in, other=0)
            else:
                rank = t + 1
            weight = tl.where(real, rank, 0).to(ACC_DTYPE)
    first = tl.load(stats_ptr + B + row)
    last = tl.load(stats_ptr + 2 * B + row)
    acc = grad_tile(
        grad_out_ptr + row * stride_gob, argmax_ptr + row * d, t, real, weight, total_weight, count,
        first, last, d_offs, d_in, stride_god,
        col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, ACC_DTYPE, BLOCK_T, BLOCK_D,
    )  # fmt: skip
    dst = grad_ptr + row * stride_gb + (t.to(tl.int64) * stride_gt)[:, None]
    dst += (d_offs.to(tl.int64) * stride_gd)[None, :]
    tl.store(dst, acc.to(grad_ptr.dtype.element_ty), mask=t_in[:, None] & d_in[None, :])


@triton.jit(do_not_specialize=[*COLUMN_ARGS, "chunk_len"])
def packed_backward_kernel(
    grad_out_ptr,  # (S, n_modes * d) any strides, any float dtype
    cu_seqlens_ptr,  # (S + 1,) int32/int64 segment offsets
    chunk_seg_ptr,  # (grid,) int32 segment of each chunk; chunk_len > 0 only
    chunk_start_ptr,  # (S + 1,) int32 first chunk of each segment; chunk_len > 0 only
    argmax_ptr,  # (S, d) int32 global token index, -1 for empty segments; unused unless col_max >= 0
    stats_ptr,  # (3, S) int32: count, first (-1 if empty), last (-1 if empty), global indices
    weights_ptr,  # (N,) float user weights of weighted_mean, any stride; HAS_WEIGHTS only
    wsum_ptr,  # (S,) acc dtype: their sum per segment; HAS_WEIGHTS only
    grad_ptr,  # (N, d) output, hidden dtype, any strides
    S,
    N,
    d,
    chunk_len,  # tokens per chunk, 0 when every segment is one chunk
    stride_gob,
    stride_god,
    stride_wt,
    stride_gt,
    stride_gd,
    col_mean,  # column offset of each mode's block in grad_out, -1 when not requested
    col_max,
    col_first,
    col_last,
    col_sqrt,
    col_weighted,
    HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write the (chunk length, BLOCK_D) gradient of one chunk of a packed segment, tile by tile.

    Grid: (chunks, cdiv(d, BLOCK_D)), the same chunks as the forward. Chunks partition the tokens
    of a well-formed batch, so every element of grad is written exactly once.
    """
    seg, t_begin, t_end, seg_begin, _ = packed_range(
        cu_seqlens_ptr, chunk_seg_ptr, chunk_start_ptr, tl.program_id(0), S, N, chunk_len
    )
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_offs < d
    if seg < S:
        row = seg.to(tl.int64)
        count = tl.load(stats_ptr + row)
        first = tl.load(stats_ptr + S + row)
        last = tl.load(stats_ptr + 2 * S + row)
        total_weight = tl.zeros((), ACC_DTYPE)
        if col_weighted >= 0:
            total_weight = weight_total(wsum_ptr, row, count, ACC_DTYPE, HAS_WEIGHTS)
        lanes = tl.arange(0, BLOCK_T)
        for t0 in range(t_begin, t_end, BLOCK_T):
            t = t0 + lanes
            real = t < t_end
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + t.to(tl.int64) * stride_wt, mask=real, other=0.0).to(ACC_DTYPE)
            else:
                w = tl.where(real, t - seg_begin + 1, 0).to(ACC_DTYPE)  # rank inside the segment
            acc = grad_tile(
                grad_out_ptr + row * stride_gob, argmax_ptr + row * d, t, real, w, total_weight, count,
                first, last, d_offs, d_in, stride_god,
                col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, ACC_DTYPE, BLOCK_T, BLOCK_D,
            )  # fmt: skip
            dst = grad_ptr + (t.to(tl.int64) * stride_gt)[:, None]
            dst += (d_offs.to(tl.int64) * stride_gd)[None, :]
            tl.store(dst, acc.to(grad_ptr.dtype.element_ty), mask=real[:, None] & d_in[None, :])
