"""Global pooling kernels: mean and/or max of a (B, C, *spatial) feature map over its spatial positions.

The launcher describes x as (B, C, S1, S2, S3): the spatial dims after merging the ones that are
one strided axis in memory (NDIM of them, 1 for contiguous NCHW and for channels_last), so a
logical spatial index s (row-major over the original spatial dims, 0 <= s < S) addresses
``s1 * stride_s1 + s2 * stride_s2 + s3 * stride_s3``. Only NDIM > 1 (sliced, non-mergeable
layouts) pays an integer division per element.

A program owns BLOCK_C channels of one sample and one chunk of ``chunk_len`` spatial positions; it
loads (BLOCK_C, BLOCK_S) tiles and keeps per-lane accumulators, reduced along S once at the end.
The launcher picks the tile orientation from the strides (which axis is contiguous: S for NCHW, C
for channels_last); the code is the same, the compiler vectorises along the unit-stride axis.
When a sample's spatial extent spans several chunks, each chunk writes a partial (sum, max and its
position) and ``global_pool_combine_kernel`` folds them in chunk order. Chunk boundaries depend on
S, C, the dtype and the layout only, never on B or the device: a sample's bits do not depend on
the other samples. No atomics.
"""

import triton
import triton.language as tl

# Position sentinel: "no element seen yet" (S < 2**31 - 1, checked by the public function).
NO_POS = tl.constexpr(2147483647)


@triton.jit
def _spatial_offsets(
    s,  # (BLOCK_S,) int32 logical spatial indices
    S2,  # int: size of merged spatial dim 2 (1 when NDIM < 2)
    S3,  # int: size of merged spatial dim 3 (1 when NDIM < 3)
    stride_s1,
    stride_s2,
    stride_s3,
    NDIM: tl.constexpr,
):
    """(BLOCK_S,) int64 element offsets of the logical spatial indices ``s``."""
    if NDIM == 1:
        return s.to(tl.int64) * stride_s1
    elif NDIM == 2:
        i1 = s // S2
        i2 = s - i1 * S2
        return i1.to(tl.int64) * stride_s1 + i2.to(tl.int64) * stride_s2
    else:
        i1 = s // (S2 * S3)
        rest = s - i1 * (S2 * S3)
        i2 = rest // S3
        i3 = rest - i2 * S3
        return i1.to(tl.int64) * stride_s1 + i2.to(tl.int64) * stride_s2 + i3.to(tl.int64) * stride_s3


@triton.jit
def _lanes_argmax(values, positions):
    """Reduce (BLOCK_C, BLOCK_S) per-lane maxima along S to one (value, position) per channel.

    NaN beats every number (as ``torch.amax``); among equal maxima, or among NaNs, the smallest
    position wins. Lanes that saw nothing hold NO_POS.
    """
    valid = positions != NO_POS
    is_nan = values != values
    has_nan = tl.max((valid & is_nan).to(tl.int32), axis=1) > 0
    best = tl.max(tl.where(valid & (values == values), values, float("-inf")), axis=1)
    hit = valid & tl.where(has_nan[:, None], is_nan, values == best[:, None])
    position = tl.min(tl.where(hit, positions, NO_POS), axis=1)
    value = tl.where(has_nan, float("nan"), best)
    return value, position


@triton.jit
def _better(candidate, candidate_pos, current, current_pos):
    """True where (candidate, candidate_pos) replaces (current, current_pos); candidates come in
    increasing position order, so a strict comparison keeps the first of equal maxima."""
    return (candidate_pos != NO_POS) & (
        (candidate > current) | ((candidate != candidate) & (current == current)) | (current_pos == NO_POS)
    )


@triton.jit
def _accumulate(
    row,  # (BLOCK_C, 1) pointers: x[b, c, 0...]
    s,  # (BLOCK_S,) int32 logical spatial indices
    valid,  # (BLOCK_C, 1) or (BLOCK_C, BLOCK_S) bool load predicate
    S2, S3, stride_s1, stride_s2, stride_s3,
    acc_sum,  # (BLOCK_C, BLOCK_S) per-lane sums
    acc_max,  # (BLOCK_C, BLOCK_S) per-lane maxima
    acc_pos,  # (BLOCK_C, BLOCK_S) int32 their positions (NO_POS: none yet)
    NDIM: tl.constexpr,
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    offs = _spatial_offsets(s, S2, S3, stride_s1, stride_s2, stride_s3, NDIM)
    v = tl.load(row + offs[None, :], mask=valid, other=0.0).to(ACC_DTYPE)
    if DO_MEAN:
        acc_sum += v  # masked lanes load 0
    if DO_MAX:
        pos = tl.where(valid, s[None, :], NO_POS)
        take = _better(v, pos, acc_max, acc_pos)
        acc_max = tl.where(take, v, acc_max)
        acc_pos = tl.where(take, pos, acc_pos)
    return acc_sum, acc_max, acc_pos


@triton.jit
def _write(
    row,  # (BLOCK_C, 1) pointers: grad[b, c, 0...]
    s,  # (BLOCK_S,) int32 logical spatial indices
    valid,  # (BLOCK_C, 1) or (BLOCK_C, BLOCK_S) bool store predicate
    pos,  # (BLOCK_C,) int32 position of the maximum (-1: none)
    peak,  # (BLOCK_C, 1) value at that position
    base,  # (BLOCK_C, 1) value everywhere else
    S2, S3, stride_s1, stride_s2, stride_s3,
    NDIM: tl.constexpr,
):  # fmt: skip
    offs = _spatial_offsets(s, S2, S3, stride_s1, stride_s2, stride_s3, NDIM)
    value = tl.where(s[None, :] == pos[:, None], peak, base)
    tl.store(row + offs[None, :], value, mask=valid)


@triton.jit
def _store(
    out_ptr,  # (B, n_modes * C) output, x's dtype
    argmax_ptr,  # (B, C) int32
    b,  # int64 scalar: sample
    c,  # (BLOCK_C,) int64 channels
    c_in,  # (BLOCK_C,) bool
    total,  # (BLOCK_C,) acc dtype: sum over the spatial positions
    max_value,  # (BLOCK_C,) acc dtype
    max_pos,  # (BLOCK_C,) int32
    S,
    stride_ob,
    stride_ab,
    col_mean,  # column offset of the mean block (ignored unless DO_MEAN)
    col_max,  # column offset of the max block (ignored unless DO_MAX)
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
):
    out_ty = out_ptr.dtype.element_ty
    if DO_MEAN:
        # Float `/` is the fast division (<= 2 ulp in float32): the IEEE one needs a stack frame.
        # S is divided as an integer argument: Triton turns S == 1 into a constexpr.
        mean = total / S
        tl.store(out_ptr + b * stride_ob + col_mean + c, mean.to(out_ty), mask=c_in)
    if DO_MAX:
        tl.store(out_ptr + b * stride_ob + col_max + c, max_value.to(out_ty), mask=c_in)
        tl.store(argmax_ptr + b * stride_ab + c, max_pos, mask=c_in)


@triton.jit
def global_pool_forward_kernel(
    x_ptr,  # (B, C, S1, S2, S3) any strides, float16/bfloat16/float32/float64
    out_ptr,  # (B, n_modes * C) x's dtype; written when n_chunks == 1
    argmax_ptr,  # (B, C) int32 logical spatial index of the first maximum; DO_MAX and n_chunks == 1
    part_sum_ptr,  # (B, n_chunks, C) acc dtype partial sums; n_chunks > 1 and DO_MEAN
    part_max_ptr,  # (B, n_chunks, C) acc dtype partial maxima; n_chunks > 1 and DO_MAX
    part_pos_ptr,  # (B, n_chunks, C) int32 their positions; n_chunks > 1 and DO_MAX
    C,
    S,  # spatial positions S1 * S2 * S3 (> 0)
    S2,
    S3,
    chunk_len,  # spatial positions per chunk (a multiple of BLOCK_S)
    n_chunks,
    n_cblocks,  # cdiv(C, BLOCK_C)
    stride_xb, stride_xc, stride_s1, stride_s2, stride_s3,
    stride_ob,
    stride_ab,
    col_mean,
    col_max,
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    NDIM: tl.constexpr,  # merged spatial dims (1, 2 or 3)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 input
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (pid // n_cblocks).to(tl.int64)
    c = ((pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_in = c < C
    row = x_ptr + b * stride_xb + c[:, None] * stride_xc
    acc_sum = tl.zeros((BLOCK_C, BLOCK_S), ACC_DTYPE)
    acc_max = tl.full((BLOCK_C, BLOCK_S), float("-inf"), ACC_DTYPE)
    acc_pos = tl.full((BLOCK_C, BLOCK_S), NO_POS, tl.int32)
    s_begin = chunk * chunk_len
    s_len = tl.minimum(S - s_begin, chunk_len)
    n_full = s_len // BLOCK_S
    # Whole blocks first, predicated on the channel only: the predicate is constant along S, so
    # loads along a unit-stride S (contiguous NCHW) can be vectorised. Then one partial block.
    for i in range(0, n_full):
        s = s_begin + i * BLOCK_S + tl.arange(0, BLOCK_S)
        acc_sum, acc_max, acc_pos = _accumulate(
            row, s, c_in[:, None], S2, S3, stride_s1, stride_s2, stride_s3, acc_sum, acc_max, acc_pos,
            NDIM, DO_MEAN, DO_MAX, ACC_DTYPE,
        )  # fmt: skip
    if n_full * BLOCK_S < s_len:
        s = s_begin + n_full * BLOCK_S + tl.arange(0, BLOCK_S)
        valid = c_in[:, None] & (s < s_begin + s_len)[None, :]
        acc_sum, acc_max, acc_pos = _accumulate(
            row, s, valid, S2, S3, stride_s1, stride_s2, stride_s3, acc_sum, acc_max, acc_pos,
            NDIM, DO_MEAN, DO_MAX, ACC_DTYPE,
        )  # fmt: skip
    total = tl.sum(acc_sum, axis=1)
    max_value = tl.zeros((BLOCK_C,), ACC_DTYPE)
    max_pos = tl.zeros((BLOCK_C,), tl.int32)
    if DO_MAX:
        max_value, max_pos = _lanes_argmax(acc_max, acc_pos)
    if n_chunks == 1:
        _store(
            out_ptr, argmax_ptr, b, c, c_in, total, max_value, max_pos, S, stride_ob, stride_ab,
            col_mean, col_max, DO_MEAN, DO_MAX,
        )  # fmt: skip
    else:
        part = (b * n_chunks + chunk) * C + c
        if DO_MEAN:
            tl.store(part_sum_ptr + part, total, mask=c_in)
        if DO_MAX:
            tl.store(part_max_ptr + part, max_value, mask=c_in)
            tl.store(part_pos_ptr + part, max_pos, mask=c_in)


@triton.jit
def global_pool_combine_kernel(
    out_ptr,  # (B, n_modes * C) x's dtype
    argmax_ptr,  # (B, C) int32
    part_sum_ptr,  # (B, n_chunks, C) acc dtype
    part_max_ptr,  # (B, n_chunks, C) acc dtype
    part_pos_ptr,  # (B, n_chunks, C) int32
    C,
    S,
    n_chunks,
    n_cblocks,
    stride_ob,
    stride_ab,
    col_mean,
    col_max,
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Fold the chunks' partials of BLOCK_C channels of one sample in chunk order."""
    pid = tl.program_id(0)
    b = (pid // n_cblocks).to(tl.int64)
    c = ((pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_in = c < C
    total = tl.zeros((BLOCK_C,), ACC_DTYPE)
    max_value = tl.full((BLOCK_C,), float("-inf"), ACC_DTYPE)
    max_pos = tl.full((BLOCK_C,), NO_POS, tl.int32)
    for j in range(0, n_chunks):
        part = (b * n_chunks + j) * C + c
        if DO_MEAN:
            total += tl.load(part_sum_ptr + part, mask=c_in, other=0.0)
        if DO_MAX:
            v = tl.load(part_max_ptr + part, mask=c_in, other=0.0)
            p = tl.load(part_pos_ptr + part, mask=c_in, other=NO_POS)
            take = _better(v, p, max_value, max_pos)
            max_value = tl.where(take, v, max_value)
            max_pos = tl.where(take, p, max_pos)
    _store(
        out_ptr, argmax_ptr, b, c, c_in, total, max_value, max_pos, S, stride_ob, stride_ab,
        col_mean, col_max, DO_MEAN, DO_MAX,
    )  # fmt: skip


@triton.jit
def global_pool_backward_kernel(
    grad_out_ptr,  # (B, n_modes * C) any strides
    argmax_ptr,  # (B, C) int32 from the forward; DO_MAX only
    grad_ptr,  # (B, C, S1, S2, S3) dense, x's dtype: every element written once
    C,
    S,
    S2,
    S3,
    chunk_len,
    n_cblocks,
    stride_gob, stride_goc,
    stride_ab,
    stride_gb, stride_gc, stride_s1, stride_s2, stride_s3,
    col_mean,
    col_max,
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    NDIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """grad = g_mean / S everywhere (+ g_max at the saved position of the maximum); reads no x."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (pid // n_cblocks).to(tl.int64)
    c = ((pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_in = c < C
    g_row = grad_out_ptr + b * stride_gob
    base = tl.zeros((BLOCK_C,), ACC_DTYPE)
    if DO_MEAN:
        g = tl.load(g_row + (col_mean + c) * stride_goc, mask=c_in, other=0.0).to(ACC_DTYPE)
        base = g / S
    peak = base
    pos = tl.full((BLOCK_C,), -1, tl.int32)
    if DO_MAX:
        peak = base + tl.load(g_row + (col_max + c) * stride_goc, mask=c_in, other=0.0).to(ACC_DTYPE)
        pos = tl.load(argmax_ptr + b * stride_ab + c, mask=c_in, other=-1)
    row = grad_ptr + b * stride_gb + c[:, None] * stride_gc
    out_ty = grad_ptr.dtype.element_ty
    base_t = base.to(out_ty)[:, None]
    peak_t = peak.to(out_ty)[:, None]
    s_begin = chunk * chunk_len
    s_len = tl.minimum(S - s_begin, chunk_len)
    n_full = s_len // BLOCK_S
    for i in range(0, n_full):  # whole blocks: the predicate is constant along S (vector stores)
        s = s_begin + i * BLOCK_S + tl.arange(0, BLOCK_S)
        _write(row, s, c_in[:, None], pos, peak_t, base_t, S2, S3, stride_s1, stride_s2, stride_s3, NDIM)
    if n_full * BLOCK_S < s_len:
        s = s_begin + n_full * BLOCK_S + tl.arange(0, BLOCK_S)
        valid = c_in[:, None] & (s < s_begin + s_len)[None, :]
        _write(row, s, valid, pos, peak_t, base_t, S2, S3, stride_s1, stride_s2, stride_s3, NDIM)
