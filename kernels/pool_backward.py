"""Backward pooling kernels: the gradient of hidden, every element written exactly once, and the
gradient of weighted_mean's user weights.

``pool_backward_kernel`` grid: (B * cdiv(T, BLOCK_T), cdiv(d, BLOCK_D)). Each program owns one
(BLOCK_T, BLOCK_D) tile of the gradient and writes all of it: real tokens get the mean share
``grad / count`` plus the max gradient where the saved argmax equals the position plus the
first/last-token gradient at the saved first/last position; every other element, padding included,
gets 0. The tiles partition (B, T, d), so there is no separate memset, no read of hidden, no atomics,
and each element is a function of its own row only (batch-invariant bits). Gradients are summed in a
fixed order in float32 (float64 for float64) and cast once.

``packed_backward_kernel`` runs over the forward's packed programs (a segment's first chunk, or the
later chunk that starts in a window of the token axis) and writes every token of its chunk.
"""

import triton
import triton.language as tl

from .mask_scan import COLUMN_ARGS, exact_sqrt, packed_program, weight_total


@triton.jit
def _mode_grad(
    grad_row,  # pointer: grad_out of this row
    col,  # int: slot of the mode's block (its columns start at col * d)
    d,
    d_offs,  # (BLOCK_D,) int32
    d_in,  # (BLOCK_D,) bool
    stride_god,
    ACC_DTYPE: tl.constexpr,
):
    g = tl.load(grad_row + (col * d + d_offs).to(tl.int64) * stride_god, mask=d_in, other=0.0)
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
    d,
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
            share += _mode_grad(grad_row, col_mean, d, d_offs, d_in, stride_god, ACC_DTYPE) / n
        if col_sqrt >= 0:
            share += _mode_grad(grad_row, col_sqrt, d, d_offs, d_in, stride_god, ACC_DTYPE) / exact_sqrt(n)
        acc += tl.where(real[:, None], share[None, :], 0.0)
    if col_weighted >= 0:
        nonzero = total_weight != 0.0  # an empty row, or user weights summing to 0: no gradient
        g = _mode_grad(grad_row, col_weighted, d, d_offs, d_in, stride_god, ACC_DTYPE)
        g = tl.where(nonzero, g / tl.where(nonzero, total_weight, 1.0), 0.0)
        acc += weight[:, None] * g[None, :]
    if col_max >= 0:
        g = _mode_grad(grad_row, col_max, d, d_offs, d_in, stride_god, ACC_DTYPE)
        pos = tl.load(argmax_row + d_offs, mask=d_in, other=-1)
        acc += tl.where(t[:, None] == pos[None, :], g[None, :], 0.0)
    if col_first >= 0:
        g = _mode_grad(grad_row, col_first, d, d_offs, d_in, stride_god, ACC_DTYPE)
        acc += tl.where((t == first)[:, None], g[None, :], 0.0)
    if col_last >= 0:
        g = _mode_grad(grad_row, col_last, d, d_offs, d_in, stride_god, ACC_DTYPE)
        acc += tl.where((t == last)[:, None], g[None, :], 0.0)
    return acc


@triton.jit
def _token_ranks(
    mask_row,  # pointer: the row of the mask
    prefix_row,  # pointer: (n_slots,) int32 real tokens before each chunk of the row (from forward)
    stride_mt,
    MASK_BITS,
    t,  # (BLOCK_T,) int32 positions
    real,  # (BLOCK_T,) bool
    first,  # int32: the row's first real position
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Rank (1, 2, ...) of each real token of the tile among the row's real tokens, 0 elsewhere:
    the real tokens before the tile's first chunk (saved by forward) plus those counted from that
    chunk's start, which is at most CHUNK + BLOCK_T positions of the mask away."""
    t_first = tl.min(tl.where(real, t, 2147483647), axis=0)
    t_last = tl.max(tl.where(real, t, -1), axis=0)
    any_real = t_last >= 0  # then first >= 0 too (a row with real tokens)
    k = tl.where(any_real, t_first - first, 0) // CHUNK
    c_begin = tl.maximum(first, 0) + k * CHUNK
    before = tl.load(prefix_row + k, mask=any_real, other=0)
    WINDOW: tl.constexpr = triton.next_power_of_2(CHUNK + BLOCK_T)
    u = c_begin + tl.arange(0, WINDOW)
    inside = u <= t_last  # none when the tile has no real token (t_last = -1, u >= 0)
    m = tl.load(mask_row + u.to(tl.int64) * stride_mt, mask=inside, other=0)
    u_real = inside & ((m & MASK_BITS) != 0)
    upto = tl.sum((u_real[None, :] & (u[None, :] <= t[:, None])).to(tl.int32), axis=1)
    return tl.where(real, before + upto, 0)


@triton.jit(do_not_specialize=[*COLUMN_ARGS, "MASK_BITS", "B", "T", "n_tblocks", "n_slots", "stride_mb", "stride_wb"])
def pool_backward_kernel(
    grad_out_ptr,  # (B, n_modes * d) any strides, any float dtype
    mask_ptr,  # (B, T) integer view of the mask, any strides; unused unless HAS_MASK
    argmax_ptr,  # (B, d) int32, -1 for empty rows; unused unless col_max >= 0
    stats_ptr,  # (3, B) int32: count, first (-1 if empty), last (-1 if empty)
    prefix_ptr,  # (B, n_slots) int32 real tokens before each chunk; rank-weighted with a mask only
    weights_ptr,  # (B, T) float user weights of weighted_mean, any strides; HAS_WEIGHTS only
    wsum_ptr,  # (B,) acc dtype: their sum over real tokens (from forward); HAS_WEIGHTS only
    grad_ptr,  # (B, T, d) output, hidden dtype, any strides
    B,
    T,
    d,
    n_tblocks,  # cdiv(T, BLOCK_T)
    n_slots,  # columns of prefix
    stride_gob,
    stride_god,
    stride_mb,
    stride_mt,
    stride_wb,
    stride_wt,
    stride_gb,
    stride_gt,
    stride_gd,
    col_mean,  # slot of each mode's block in grad_out (columns slot * d ...), -1 when not requested
    col_max,
    col_first,
    col_last,
    col_sqrt,  # mean_sqrt_len
    col_weighted,  # weighted_mean
    MASK_BITS,  # bits that make a mask element nonzero (float masks: all but the sign)
    HAS_MASK: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
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
    first = tl.load(stats_ptr + B + row)
    last = tl.load(stats_ptr + 2 * B + row)
    # One block comparison (t_in, or nothing for an empty row), never `t_in & scalar_bool`: the
    # Triton >= 3.7 interpreter broadcasts a scalar bool to int32 and rejects it as a load mask.
    real = t < tl.where(count > 0, T, 0)
    if HAS_MASK:
        if (col_mean >= 0) | (col_sqrt >= 0) | (col_weighted >= 0):
            m = tl.load(mask_ptr + row * stride_mb + t.to(tl.int64) * stride_mt, mask=t_in, other=0)
            real = real & ((m & MASK_BITS) != 0)
    weight = tl.zeros((BLOCK_T,), ACC_DTYPE)
    total_weight = tl.zeros((), ACC_DTYPE)
    if col_weighted >= 0:
        wsum = tl.zeros((), ACC_DTYPE)
        if HAS_WEIGHTS:
            wsum = tl.load(wsum_ptr + row)
        total_weight = weight_total(wsum, count, ACC_DTYPE, HAS_WEIGHTS)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + row * stride_wb + t.to(tl.int64) * stride_wt, mask=real, other=0.0)
            weight = w.to(ACC_DTYPE)  # 0 at padding (never loaded)
        else:
            if HAS_MASK:
                rank = _token_ranks(
                    mask_ptr + row * stride_mb, prefix_ptr + row * n_slots, stride_mt, MASK_BITS, t, real,
                    first, CHUNK, BLOCK_T,
                )  # fmt: skip
            else:
                rank = t + 1
            weight = tl.where(real, rank, 0).to(ACC_DTYPE)
    acc = grad_tile(
        grad_out_ptr + row * stride_gob, argmax_ptr + row * d, t, real, weight, total_weight, count,
        first, last, d, d_offs, d_in, stride_god,
        col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, ACC_DTYPE, BLOCK_T, BLOCK_D,
    )  # fmt: skip
    dst = grad_ptr + row * stride_gb + (t.to(tl.int64) * stride_gt)[:, None]
    dst += (d_offs.to(tl.int64) * stride_gd)[None, :]
    tl.store(dst, acc.to(grad_ptr.dtype.element_ty), mask=t_in[:, None] & d_in[None, :])


@triton.jit(do_not_specialize=[*COLUMN_ARGS, "S", "N", "search_steps"])
def packed_backward_kernel(
    grad_out_ptr,  # (S, n_modes * d) any strides, any float dtype
    cu_seqlens_ptr,  # (S + 1,) int32/int64 segment offsets
    argmax_ptr,  # (S, d) int32 global token index, -1 for empty segments; unused unless col_max >= 0
    stats_ptr,  # (3, S) int32: count, first (-1 if empty), last (-1 if empty), global indices
    weights_ptr,  # (N,) float user weights of weighted_mean, any stride; HAS_WEIGHTS only
    wsum_ptr,  # (S,) acc dtype: their sum per segment (from forward); HAS_WEIGHTS only
    grad_ptr,  # (N, d) output, hidden dtype, any strides
    S,
    N,
    d,
    search_steps,  # bit length of S
    stride_gob,
    stride_god,
    stride_wt,
    stride_gt,
    stride_gd,
    col_mean,  # slot of each mode's block in grad_out (columns slot * d ...), -1 when not requested
    col_max,
    col_first,
    col_last,
    col_sqrt,
    col_weighted,
    HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write the gradient of one chunk of a packed segment, tile by tile.

    Grid: (S + cdiv(N, CHUNK), cdiv(d, BLOCK_D)), the forward's programs: program s < S writes the
    first chunk of segment s, program S + p the later chunk of a segment that starts in the window
    [p * CHUNK, (p + 1) * CHUNK). Chunks partition the tokens of a well-formed batch, so every
    element of grad is written exactly once.
    """
    seg, k, seg_begin, seg_end = packed_program(cu_seqlens_ptr, tl.program_id(0), S, N, search_steps, CHUNK)
    n_chunks = tl.cdiv(seg_end - seg_begin, CHUNK)
    active = (k < n_chunks) & ((k >= 1) | (tl.program_id(0) < S))
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_offs < d
    if active:
        row = seg.to(tl.int64)
        t_begin = seg_begin + k * CHUNK
        t_end = t_begin + tl.minimum(CHUNK, seg_end - t_begin)
        count = tl.load(stats_ptr + row)
        first = tl.load(stats_ptr + S + row)
        last = tl.load(stats_ptr + 2 * S + row)
        total_weight = tl.zeros((), ACC_DTYPE)
        if col_weighted >= 0:
            wsum = tl.zeros((), ACC_DTYPE)
            if HAS_WEIGHTS:
                wsum = tl.load(wsum_ptr + row)
            total_weight = weight_total(wsum, count, ACC_DTYPE, HAS_WEIGHTS)
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
                first, last, d, d_offs, d_in, stride_god,
                col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, ACC_DTYPE, BLOCK_T, BLOCK_D,
            )  # fmt: skip
            dst = grad_ptr + (t.to(tl.int64) * stride_gt)[:, None]
            dst += (d_offs.to(tl.int64) * stride_gd)[None, :]
            tl.store(dst, acc.to(grad_ptr.dtype.element_ty), mask=real[:, None] & d_in[None, :])


@triton.jit(do_not_specialize=["MASK_BITS", "rows", "T", "search_steps", "stride_mb"])
def weights_backward_kernel(
    grad_block_ptr,  # (rows, d) gradient of the weighted_mean output, any strides, any float dtype
    hidden_ptr,  # (B, T, d) / (N, d) when PACKED, any strides
    mask_ptr,  # (B, T) integer view of the mask; HAS_MASK only
    wsum_ptr,  # (rows,) acc dtype: user weights' sum over each row's real tokens (from forward)
    wmean_ptr,  # (rows, d) acc dtype: the un-rounded weighted mean (from forward)
    grad_ptr,  # (B, T) / (N,) output: gradient of the weights, their dtype
    cu_seqlens_ptr,  # (S + 1,) offsets; PACKED only
    rows,  # B, or S when PACKED
    T,  # positions per row, or tokens N when PACKED
    d,
    search_steps,  # PACKED: bit length of S
    stride_gbb,
    stride_gbd,
    stride_hb,  # unused when PACKED
    stride_ht,
    stride_hd,
    stride_mb,
    stride_mt,
    stride_wgb,  # grad of weights: row stride (0 when PACKED)
    stride_wgt,
    MASK_BITS,
    HAS_MASK: tl.constexpr,
    PACKED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(g . x_t - g . out) / W for BLOCK_T tokens: grid (B, cdiv(T, BLOCK_T)) padded,
    (cdiv(N, BLOCK_T), 1) packed (each token finds its segment). Dot products run over d in BLOCK_D
    tiles in a fixed order: the bits depend only on the row."""
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    if PACKED:
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = t < T
    if PACKED:
        # Lanes of a tile may belong to different segments: one binary search per lane.
        row_t = _segments_of_tokens(cu_seqlens_ptr, t, rows, search_steps, BLOCK_T)
        begin = tl.load(cu_seqlens_ptr + row_t).to(tl.int32)
        end = tl.load(cu_seqlens_ptr + row_t + 1).to(tl.int32)
        real = t_in & (t >= begin) & (t < end)
        row_t = row_t.to(tl.int64)
        h_rows = hidden_ptr + t.to(tl.int64) * stride_ht
    else:
        row = tl.program_id(0).to(tl.int64)
        row_t = tl.zeros((BLOCK_T,), tl.int64) + row
        real = t_in
        if HAS_MASK:
            m = tl.load(mask_ptr + row * stride_mb + t.to(tl.int64) * stride_mt, mask=t_in, other=0)
            real = real & ((m & MASK_BITS) != 0)
        h_rows = hidden_ptr + row * stride_hb + t.to(tl.int64) * stride_ht
    dots = tl.zeros((BLOCK_T,), ACC_DTYPE)
    mean_dot = tl.zeros((BLOCK_T,), ACC_DTYPE)
    for d0 in range(0, d, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        d_in = d_offs < d
        g = tl.load(
            grad_block_ptr + row_t[:, None] * stride_gbb + (d_offs * stride_gbd)[None, :],
            mask=real[:, None] & d_in[None, :], other=0.0,
        ).to(ACC_DTYPE)  # fmt: skip
        x = tl.load(
            h_rows[:, None] + (d_offs.to(tl.int64) * stride_hd)[None, :], mask=real[:, None] & d_in[None, :],
            other=0.0,
        ).to(ACC_DTYPE)  # fmt: skip
        out = tl.load(wmean_ptr + row_t[:, None] * d + d_offs[None, :], mask=real[:, None] & d_in[None, :],
                      other=0.0)  # fmt: skip
        dots += tl.sum(g * x, axis=1)
        mean_dot += tl.sum(g * out, axis=1)
    W = tl.load(wsum_ptr + row_t, mask=real, other=0.0)
    nonzero = real & (W != 0.0)
    grad = tl.where(nonzero, (dots - mean_dot) / tl.where(nonzero, W, 1.0), 0.0)
    if PACKED:
        dst = grad_ptr + t.to(tl.int64) * stride_wgt
    else:
        dst = grad_ptr + tl.program_id(0).to(tl.int64) * stride_wgb + t.to(tl.int64) * stride_wgt
    tl.store(dst, grad.to(grad_ptr.dtype.element_ty), mask=t_in)


@triton.jit
def _segments_of_tokens(cu_seqlens_ptr, t, S, search_steps, BLOCK_T: tl.constexpr):
    """(BLOCK_T,) the last segment s with cu_seqlens[s] <= t, per lane (binary search)."""
    lo = tl.zeros((BLOCK_T,), tl.int32)
    hi = tl.zeros((BLOCK_T,), tl.int32) + (S - 1)
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        at = tl.load(cu_seqlens_ptr + tl.minimum(tl.maximum(mid, 0), S)).to(tl.int64)
        go_up = (lo < hi) & (at <= t)
        go_down = (lo < hi) & (at > t)
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_down, mid - 1, hi)
    return tl.maximum(lo, 0)
