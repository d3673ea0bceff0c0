"""Forward pooling kernels: one fused pass over hidden for any subset of {mean, max, first, last}.

Grid of ``pool_forward_kernel``: (B, cdiv(d, BLOCK_D), n_splits). A program owns one row, one
block of BLOCK_D features and one range of ``tokens_per_split`` positions.

How padding is never read: each program first scans its row's mask (only the mask) to find the
first and last real token of its range, then loops over ``[first, last]`` alone. Under right or
left padding the tokens outside that span are never addressed. Inside the span the per-token mask
is the load predicate, so a padded token (a hole) issues no load either; a predicated-off load
moves no bytes. Padding therefore reaches neither the result nor the memory bus, whatever it holds.

Why there is a split: a program's loop over T is serial, and the launcher needs several programs
per multiprocessor to keep enough loads in flight. When B * cdiv(d, BLOCK_D) is too small (small
batch, long T) the launcher splits T into ``n_splits`` ranges; each writes a partial (sum, max and
position, span) to a small float32 workspace, and ``pool_combine_kernel`` folds the partials in
split order. No atomics: the result is bit-for-bit deterministic.
"""

import triton
import triton.language as tl

from .mask_scan import (
    COLUMN_ARGS,
    NO_TOKEN,
    better_max,
    exact_sqrt,
    lanes_argmax,
    packed_range,
    row_span,
    weight_total,
)


@triton.jit
def _write_results(
    hidden_ptr,  # (B, T, d): read only for the first/last-token gather
    out_ptr,  # (B, n_modes * d) output, hidden dtype
    argmax_ptr,  # (B, d) int32
    stats_ptr,  # (3, B) int32: count, first, last
    row,  # int64 scalar
    pid_d,  # int32 scalar: feature block
    d_offs,  # (BLOCK_D,) int32 feature indices
    d_in,  # (BLOCK_D,) bool: d_offs < d
    B,
    d,
    stride_hb,
    stride_ht,
    stride_hd,
    stride_ob,
    total,  # (BLOCK_D,) acc dtype: sum over real tokens
    weighted,  # (BLOCK_D,) acc dtype: sum over real tokens of rank * token (rank 1, 2, ...)
    count,  # int32 scalar: real tokens in the row
    max_value,  # (BLOCK_D,) acc dtype
    max_pos,  # (BLOCK_D,) int32, NO_TOKEN for an empty row
    first,  # int32 scalar, NO_TOKEN for an empty row
    last,  # int32 scalar, -1 for an empty row
    col_mean,
    col_max,
    col_first,  # column offset, or -1 when the mode is not requested
    col_last,  # column offset, or -1 when the mode is not requested
    col_sqrt,  # column offset of mean_sqrt_len, or -1
    col_weighted,  # column offset of weighted_mean, or -1
    wsum_ptr,  # (B,) acc dtype: sum of the user weights over real tokens; HAS_WEIGHTS only
    norm_ptr,  # (B,) acc dtype: L2 norm of the whole output row; normalize_eps >= 0 only
    normalize_eps,  # float: L2-normalise the row with this floor; < 0: do not (needs one feature block)
    DO_MEAN: tl.constexpr,  # the sum was accumulated (mean and/or mean_sqrt_len requested)
    DO_MAX: tl.constexpr,
    DO_WEIGHTED: tl.constexpr,  # the weighted sum was accumulated
    HAS_WEIGHTS: tl.constexpr,  # user weights (else rank weights 1, 2, ...)
):
    out_row = out_ptr + row * stride_ob
    out_ty = out_ptr.dtype.element_ty
    has_tokens = count > 0
    # Every requested mode's values first, in the accumulation dtype: the optional L2 normalisation
    # needs the whole row before anything is stored, and then the output is rounded once.
    mean = tl.zeros_like(total)
    root_mean = tl.zeros_like(total)
    w_mean = tl.zeros_like(total)
    max_out = tl.zeros_like(total)
    first_token = tl.zeros_like(total)
    last_token = tl.zeros_like(total)
    if DO_MEAN:
        # Exact integer count, converted once; an empty row gives 0, never 0/0.
        # Float32 `/` is the fast division (<= 2 ulp): the IEEE one calls a slow-path subroutine
        # with a stack frame on sm_80, which the no-spill AOT check rejects.
        n = tl.maximum(count, 1).to(total.dtype)
        mean = tl.where(has_tokens & (col_mean >= 0), total / n, 0.0)
        root_mean = tl.where(has_tokens & (col_sqrt >= 0), total / exact_sqrt(n), 0.0)
    if DO_WEIGHTED:
        w_total = weight_total(wsum_ptr, row, count, weighted.dtype, HAS_WEIGHTS)
        nonzero = w_total != 0.0  # no real token, or user weights summing to 0: zeros
        w_mean = tl.where(nonzero, weighted / tl.where(nonzero, w_total, 1.0), 0.0)
    if DO_MAX:
        empty = max_pos == NO_TOKEN
        max_out = tl.where(empty, 0.0, max_value)
    # The gathers cost d loads per row: a uniform runtime branch, not another specialization.
    if col_first >= 0:
        src = hidden_ptr + row * stride_hb + first.to(tl.int64) * stride_ht
        token = tl.load(src + d_offs.to(tl.int64) * stride_hd, mask=d_in & has_tokens, other=0.0)
        first_token = token.to(total.dtype)
    if col_last >= 0:
        src = hidden_ptr + row * stride_hb + last.to(tl.int64) * stride_ht
        token = tl.load(src + d_offs.to(tl.int64) * stride_hd, mask=d_in & has_tokens, other=0.0)
        last_token = token.to(total.dtype)
    scale = tl.full((), 1.0, total.dtype)
    owner = pid_d == 0
    # float64 rows are normalised by the launcher instead: the float64 square root and division
    # subroutines need a stack frame, which the no-spill AOT check rejects.
    if (normalize_eps >= 0) & (total.dtype != tl.float64):
        # One program holds the whole row (the launcher picks BLOCK_D >= d): x / max(||x||, eps) as
        # torch.nn.functional.normalize, from the unrounded values. Absent modes hold zeros.
        squares = mean * mean + root_mean * root_mean + w_mean * w_mean + max_out * max_out
        squares += first_token * first_token + last_token * last_token
        norm = tl.sqrt(tl.sum(squares, axis=0))  # approximate (<= 2 ulp): sqrt_rn needed a stack frame here
        # eps = 0 and an all-zero row: 0 / 1 = 0, never 0 / 0.
        denominator = tl.maximum(norm, normalize_eps)
        scale = 1.0 / tl.where(denominator > 0, denominator, 1.0)
        tl.store(norm_ptr + row, norm, mask=owner)
    if col_mean >= 0:
        tl.store(out_row + col_mean + d_offs, (mean * scale).to(out_ty), mask=d_in)
    if col_sqrt >= 0:
        tl.store(out_row + col_sqrt + d_offs, (root_mean * scale).to(out_ty), mask=d_in)
    if col_weighted >= 0:
        tl.store(out_row + col_weighted + d_offs, (w_mean * scale).to(out_ty), mask=d_in)
    if DO_MAX:
        tl.store(out_row + col_max + d_offs, (max_out * scale).to(out_ty), mask=d_in)
        tl.store(argmax_ptr + row * d + d_offs, tl.where(empty, -1, max_pos), mask=d_in)
    if col_first >= 0:
        tl.store(out_row + col_first + d_offs, (first_token * scale).to(out_ty), mask=d_in)
    if col_last >= 0:
        tl.store(out_row + col_last + d_offs, (last_token * scale).to(out_ty), mask=d_in)
    # Per-row sizes for backward, written by one feature block only.
    tl.store(stats_ptr + row, count, mask=owner)
    tl.store(stats_ptr + B + row, tl.where(has_tokens, first, -1), mask=owner)
    tl.store(stats_ptr + 2 * B + row, tl.where(has_tokens, last, -1), mask=owner)


@triton.jit(do_not_specialize=[*COLUMN_ARGS, "MASK_BITS", "n_splits", "chunk_len", "normalize_eps"])
def pool_forward_kernel(
    hidden_ptr,  # (B, T, d) fp16/bf16/fp32/fp64, any strides
    mask_ptr,  # (B, T) integer view of the mask, any strides, nonzero = real; unused unless HAS_MASK
    out_ptr,  # (B, n_modes * d) hidden dtype, unit stride along features
    argmax_ptr,  # (B, d) int32; unused unless DO_MAX
    stats_ptr,  # (3, B) int32: count, first, last
    part_sum_ptr,  # (B, n_splits, d) acc dtype; T-split launches only
    part_max_ptr,  # (B, n_splits, d) acc dtype; T-split launches only
    part_pos_ptr,  # (B, n_splits, d) int32; T-split launches only
    part_stats_ptr,  # (B, n_splits, 3) int32; T-split launches only
    part_wsum_ptr,  # (B, n_splits, d) acc dtype; T-split launches with DO_WEIGHTED only
    weights_ptr,  # (B, T) float user weights, any strides; HAS_WEIGHTS only
    wsum_ptr,  # (B,) acc dtype: their sum over real tokens; HAS_WEIGHTS only
    cu_seqlens_ptr,  # (B + 1,) int32/int64 segment offsets; PACKED only
    chunk_seg_ptr,  # (grid,) int32 segment of each chunk; PACKED with chunk_len > 0 only
    chunk_start_ptr,  # (B + 1,) int32 first chunk of each segment; PACKED with chunk_len > 0 only
    norm_ptr,  # (B,) acc dtype: L2 norm of each output row; normalize_eps >= 0 only
    B,  # rows (segments when PACKED)
    T,  # positions per row (total tokens N when PACKED)
    d,
    tokens_per_split,  # positions per program along T (T when not split)
    n_splits,
    chunk_len,  # PACKED: tokens per chunk of a long segment, 0 when every segment is one chunk
    stride_hb,  # 0 when PACKED: positions are global token indices
    stride_ht,
    stride_hd,
    stride_mb,
    stride_mt,
    stride_wb,
    stride_wt,
    stride_ob,
    col_mean,  # column offset of each mode's block in out
    col_max,
    col_first,  # -1 when not requested
    col_last,  # -1 when not requested
    col_sqrt,  # mean_sqrt_len, -1 when not requested
    col_weighted,  # weighted_mean, -1 when not requested
    normalize_eps,  # L2-normalise each output row with this floor; < 0: do not (one feature block)
    MASK_BITS,  # bits of a mask element that make it nonzero (sign bit cleared for float masks)
    HAS_MASK: tl.constexpr,
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    DO_WEIGHTED: tl.constexpr,  # rank weights need DO_MEAN (the T-split fold uses the plain sum)
    HAS_WEIGHTS: tl.constexpr,  # weighted_mean with user weights (else rank weights)
    PACKED: tl.constexpr,  # hidden is (N, d) packed by cu_seqlens; program axis 0 enumerates chunks
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 input
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    """Masked mean / max+argmax / first / last of one (row, feature block, T range)."""
    pid_d = tl.program_id(1)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_offs < d
    if PACKED:
        # A packed segment is a row whose real tokens are [seg_begin, seg_end) of the flat axis;
        # a long one is cut into chunks, each folded like a T-split range.
        chunk = tl.program_id(0)
        seg, t_begin, t_end, _, n_parts = packed_range(
            cu_seqlens_ptr, chunk_seg_ptr, chunk_start_ptr, chunk, B, T, chunk_len
        )
        row = seg.to(tl.int64)
        part = chunk.to(tl.int64)
        is_part = n_parts > 1
        valid = seg < B
    else:
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(2)
        t_begin = split * tokens_per_split
        t_end = t_begin + tl.minimum(tokens_per_split, T - t_begin)  # no int32 overflow near 2**31
        part = row * n_splits + split
        is_part = n_splits > 1
        valid = row < B
    first, last, count = row_span(
        mask_ptr, stride_mb, stride_mt, MASK_BITS, row, t_begin, t_end, HAS_MASK, SCAN_BLOCK
    )

    total = tl.zeros((BLOCK_T, BLOCK_D), ACC_DTYPE)
    best = tl.full((BLOCK_T, BLOCK_D), float("-inf"), ACC_DTYPE)
    best_pos = tl.full((BLOCK_T, BLOCK_D), NO_TOKEN, tl.int32)
    wtotal = tl.zeros((BLOCK_T, BLOCK_D), ACC_DTYPE)
    seen = tl.full((), 0, tl.int32)  # real tokens before the current chunk, within this range
    if DO_MEAN or DO_MAX or DO_WEIGHTED:
        lanes = tl.arange(0, BLOCK_T)
        col_ptrs = hidden_ptr + row * stride_hb + (d_offs.to(tl.int64) * stride_hd)[None, :]
        mask_row = mask_ptr + row * stride_mb
        weights_row = weights_ptr + row * stride_wb
        for t0 in range(first, last + 1, BLOCK_T):
            t = t0 + lanes
            real = t <= last
            if HAS_MASK:
                m = tl.load(mask_row + t.to(tl.int64) * stride_mt, mask=real, other=0)
                real = real & ((m & MASK_BITS) != 0)
            load = real[:, None] & d_in[None, :]
            # Upcast before reducing: Triton does not widen floats in tl.sum / tl.max.
            x = tl.load(col_ptrs + (t.to(tl.int64) * stride_ht)[:, None], mask=load, other=0.0)
            x = x.to(ACC_DTYPE)
            if DO_MEAN:
                total += x  # padded lanes were never loaded and hold exactly 0
            if DO_WEIGHTED:
                if HAS_WEIGHTS:
                    w = tl.load(weights_row + t.to(tl.int64) * stride_wt, mask=real, other=0.0)
                    wtotal += x * w.to(ACC_DTYPE)[:, None]  # w is 0 wherever x was not loaded
                else:
                    # Rank of each real token in its row (1, 2, ...), computed in float32: exact
                    # integers up to 2**24, no fp16 overflow, no bf16 rounding of the weights.
                    real_i = real.to(tl.int32)
                    rank = seen + tl.cumsum(real_i, axis=0)
                    wtotal += x * tl.where(real, rank, 0).to(ACC_DTYPE)[:, None]
                    seen += tl.sum(real_i, axis=0)
            if DO_MAX:
                pos = tl.where(load, t[:, None], NO_TOKEN)
                take = better_max(x, pos, best, best_pos)
                best = tl.where(take, x, best)
                best_pos = tl.where(take, pos, best_pos)

    row_total = tl.sum(total, axis=0)
    row_weighted = tl.sum(wtotal, axis=0)
    max_value, max_pos = lanes_argmax(best, best_pos)
    # A runtime branch (n_splits is not specialized): one compiled kernel serves both launch shapes.
    if is_part:
        if DO_MEAN:
            tl.store(part_sum_ptr + part * d + d_offs, row_total, mask=d_in)
        if DO_WEIGHTED:
            tl.store(part_wsum_ptr + part * d + d_offs, row_weighted, mask=d_in)
        if DO_MAX:
            tl.store(part_max_ptr + part * d + d_offs, max_value, mask=d_in)
            tl.store(part_pos_ptr + part * d + d_offs, max_pos, mask=d_in)
        owner = pid_d == 0
        tl.store(part_stats_ptr + part * 3, count, mask=owner)
        tl.store(part_stats_ptr + part * 3 + 1, first, mask=owner)
        tl.store(part_stats_ptr + part * 3 + 2, last, mask=owner)
    elif valid:
        _write_results(
            hidden_ptr, out_ptr, argmax_ptr, stats_ptr, row, pid_d, d_offs, d_in, B, d,
            stride_hb, stride_ht, stride_hd, stride_ob,
            row_total, row_weighted, count, max_value, max_pos, first, last,
            col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, wsum_ptr, norm_ptr, normalize_eps,
            DO_MEAN, DO_MAX, DO_WEIGHTED, HAS_WEIGHTS,
        )  # fmt: skip


@triton.jit(do_not_specialize=[*COLUMN_ARGS, "n_splits", "normalize_eps"])
def pool_combine_kernel(
    hidden_ptr,  # (B, T, d) any strides: read only for the first/last-token gather
    out_ptr,  # (B, n_modes * d) hidden dtype
    argmax_ptr,  # (B, d) int32
    stats_ptr,  # (3, B) int32
    part_sum_ptr,  # (B, n_splits, d) acc dtype
    part_max_ptr,  # (B, n_splits, d) acc dtype
    part_pos_ptr,  # (B, n_splits, d) int32
    part_stats_ptr,  # (B, n_splits, 3) int32
    part_wsum_ptr,  # (B, n_splits, d) acc dtype; DO_WEIGHTED only
    wsum_ptr,  # (B,) acc dtype: sum of the user weights over real tokens; HAS_WEIGHTS only
    chunk_start_ptr,  # (B + 1,) int32 first chunk of each segment; PACKED only
    norm_ptr,  # (B,) acc dtype: L2 norm of each output row; normalize_eps >= 0 only
    B,
    d,
    n_splits,  # partials per row (padded launches)
    stride_hb,
    stride_ht,
    stride_hd,
    stride_ob,
    col_mean,
    col_max,
    col_first,  # -1 when not requested
    col_last,  # -1 when not requested
    col_sqrt,  # mean_sqrt_len, -1 when not requested
    col_weighted,  # weighted_mean, -1 when not requested
    normalize_eps,  # L2-normalise each output row with this floor; < 0: do not
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    DO_WEIGHTED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    PACKED: tl.constexpr,  # rows are segments; their partials are chunks chunk_start[row] ...
    ACC_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Fold the T-split partials of one (row, feature block) in split order. Grid: (B, cdiv(d, BLOCK_D)).

    A packed segment made of a single chunk was finished by the forward kernel and is skipped.
    """
    row = tl.program_id(0).to(tl.int64)
    if PACKED:
        first_part = tl.load(chunk_start_ptr + row).to(tl.int64)
        n_parts = tl.load(chunk_start_ptr + row + 1) - first_part
    else:
        first_part = row * n_splits
        n_parts = n_splits
    if n_parts > 1:
        _combine_parts(
            hidden_ptr, out_ptr, argmax_ptr, stats_ptr, part_sum_ptr, part_max_ptr, part_pos_ptr,
            part_stats_ptr, part_wsum_ptr, wsum_ptr, norm_ptr, row, first_part, n_parts, B, d,
            stride_hb, stride_ht, stride_hd, stride_ob,
            col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, normalize_eps,
            DO_MEAN, DO_MAX, DO_WEIGHTED, HAS_WEIGHTS, ACC_DTYPE, BLOCK_D,
        )  # fmt: skip


@triton.jit
def _combine_parts(
    hidden_ptr, out_ptr, argmax_ptr, stats_ptr, part_sum_ptr, part_max_ptr, part_pos_ptr,
    part_stats_ptr, part_wsum_ptr, wsum_ptr, norm_ptr, row, first_part, n_parts, B, d,
    stride_hb, stride_ht, stride_hd, stride_ob,
    col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, normalize_eps,
    DO_MEAN: tl.constexpr, DO_MAX: tl.constexpr, DO_WEIGHTED: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Fold partials first_part .. first_part + n_parts - 1 (arguments as in pool_combine_kernel)."""
    pid_d = tl.program_id(1)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_offs < d
    total = tl.zeros((BLOCK_D,), ACC_DTYPE)
    weighted = tl.zeros((BLOCK_D,), ACC_DTYPE)
    best = tl.full((BLOCK_D,), float("-inf"), ACC_DTYPE)
    best_pos = tl.full((BLOCK_D,), NO_TOKEN, tl.int32)
    count = tl.full((), 0, tl.int32)
    first = tl.full((), NO_TOKEN, tl.int32)
    last = tl.full((), -1, tl.int32)
    for s in range(0, n_parts):
        part = first_part + s
        if DO_WEIGHTED:
            weighted += tl.load(part_wsum_ptr + part * d + d_offs, mask=d_in, other=0.0)
            if not HAS_WEIGHTS:
                # Ranks in split s were counted from 1: shift them by the real tokens before it,
                # sum_k (k + offset) x_k = partial weighted sum + offset * partial sum.
                # No shift before the first real token: 0 * (a partial sum holding inf) is NaN.
                offset = count.to(ACC_DTYPE)
                shifted = offset * tl.load(part_sum_ptr + part * d + d_offs, mask=d_in, other=0.0)
                weighted += tl.where(count > 0, shifted, 0.0)
        count += tl.load(part_stats_ptr + part * 3)
        first = tl.minimum(first, tl.load(part_stats_ptr + part * 3 + 1))
        last = tl.maximum(last, tl.load(part_stats_ptr + part * 3 + 2))
        if DO_MEAN:
            total += tl.load(part_sum_ptr + part * d + d_offs, mask=d_in, other=0.0)
        if DO_MAX:
            value = tl.load(part_max_ptr + part * d + d_offs, mask=d_in, other=float("-inf"))
            pos = tl.load(part_pos_ptr + part * d + d_offs, mask=d_in, other=NO_TOKEN)
            take = better_max(value, pos, best, best_pos)
            best = tl.where(take, value, best)
            best_pos = tl.where(take, pos, best_pos)
    _write_results(
        hidden_ptr, out_ptr, argmax_ptr, stats_ptr, row, pid_d, d_offs, d_in, B, d,
        stride_hb, stride_ht, stride_hd, stride_ob,
        total, weighted, count, best, best_pos, first, last,
        col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, wsum_ptr, norm_ptr, normalize_eps,
        DO_MEAN, DO_MAX, DO_WEIGHTED, HAS_WEIGHTS,
    )  # fmt: skip
