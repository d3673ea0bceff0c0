"""Helpers shared by the pooling kernels: the scan of a mask row and the lane-wise argmax.

These are ``@triton.jit`` device functions only; they are inlined into the kernels that call them.
"""

import triton
import triton.language as tl

# Per-mode column offsets (-1 = mode not requested): uniform runtime flags, never specialized on.
COLUMN_ARGS = ["col_mean", "col_max", "col_first", "col_last", "col_sqrt", "col_weighted"]
# Sentinel position for "no real token seen": larger than any T we accept (T < 2**31 - 1).
NO_TOKEN = tl.constexpr(2147483647)


@triton.jit
def row_span(
    mask_ptr,  # (B, T) integer view of the mask (int8/16/32/64), nonzero = real token
    stride_mb,  # int: mask stride along B (elements)
    stride_mt,  # int: mask stride along T (elements)
    MASK_BITS,  # int: bits that make a mask element nonzero (float masks: all but the sign)
    row,  # int64 scalar: batch row
    t_begin,  # int32 scalar: first position to scan
    t_end,  # int32 scalar: one past the last position to scan
    HAS_MASK: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    """(first, last, count) of the real tokens of ``row`` inside ``[t_begin, t_end)``.

    ``first`` is NO_TOKEN and ``last`` is -1 when the range holds no real token. Only the mask is
    read (one byte to eight per token), so the span is known before a single hidden element moves:
    the main loop of a kernel then runs over ``[first, last]`` and never touches the padding outside.
    """
    if HAS_MASK:
        offs = tl.arange(0, SCAN_BLOCK)
        first = tl.full((), NO_TOKEN, tl.int32)
        last = tl.full((), -1, tl.int32)
        count = tl.full((), 0, tl.int32)
        row_ptr = mask_ptr + row * stride_mb
        for t0 in range(t_begin, t_end, SCAN_BLOCK):
            t = t0 + offs
            inside = t < t_end
            m = tl.load(row_ptr + t.to(tl.int64) * stride_mt, mask=inside, other=0)
            real = ((m & MASK_BITS) != 0) & inside
            count += tl.sum(real.to(tl.int32), axis=0)
            first = tl.minimum(first, tl.min(tl.where(real, t, NO_TOKEN), axis=0))
            last = tl.maximum(last, tl.max(tl.where(real, t, -1), axis=0))
    else:
        count = tl.maximum(t_end - t_begin, 0)
        first = tl.where(count > 0, t_begin, NO_TOKEN)
        last = tl.where(count > 0, t_end - 1, -1)
    return first, last, count


@triton.jit
def lanes_argmax(values, positions):
    """Reduce (BLOCK_T, BLOCK_D) per-lane maxima to one (value, position) per column.

    ``positions`` holds NO_TOKEN in lanes that saw no real token. NaN beats every number (as in
    ``torch.max``); among equal maxima, or among NaNs, the smallest position wins. Returns the value
    (NaN, the maximum, or -inf for an empty column) and the position (NO_TOKEN for an empty column).
    """
    valid = positions != NO_TOKEN
    is_nan = values != values
    has_nan = tl.max((valid & is_nan).to(tl.int32), axis=0) > 0
    best = tl.max(tl.where(valid & (values == values), values, float("-inf")), axis=0)
    hit = valid & tl.where(has_nan[None, :], is_nan, values == best[None, :])
    position = tl.min(tl.where(hit, positions, NO_TOKEN), axis=0)
    # When -0.0 and +0.0 tie, the value's sign comes from the reduction, not from the winning lane:
    # taking the winning lane's value costs one more cross-warp reduction and spilled registers.
    value = tl.where(has_nan, float("nan"), best)
    return value, position


@triton.jit
def better_max(candidate, candidate_pos, current, current_pos):
    """True where (candidate, candidate_pos) should replace (current, current_pos).

    Candidates arrive in increasing position order, so a strict comparison keeps the first of equal
    maxima; NaN replaces a number but never an earlier NaN; anything real replaces "nothing yet".
    """
    return (candidate_pos != NO_TOKEN) & (
        (candidate > current) | ((candidate != candidate) & (current == current)) | (current_pos == NO_TOKEN)
    )


@triton.jit
def exact_sqrt(x):
    """Correctly rounded square root (tl.sqrt is approximate in float32; float64 sqrt is exact)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def packed_range(
    cu_seqlens_ptr,  # (S + 1,) int32/int64 segment offsets
    chunk_seg_ptr,  # (grid,) int32: segment of each chunk (S for a spare program); chunk_len > 0 only
    chunk_start_ptr,  # (S + 1,) int32: first chunk of each segment; chunk_len > 0 only
    chunk,  # int32 scalar: this program's chunk
    S,
    N,
    chunk_len,  # tokens per chunk, 0 when every segment is one chunk (then chunk == segment)
):
    """(segment, t_begin, t_end, seg_begin, n_parts) of one chunk of a packed batch.

    n_parts is the number of chunks of the segment: with more than one, the chunk's partial
    results go through ``pool_combine_kernel``.

    Offsets are clamped into [0, N] and made non-decreasing here, so even malformed offsets (when
    the launcher was told not to check them) can never address outside hidden. A spare program
    (beyond the last chunk) gets segment S and an empty range.
    """
    if chunk_len > 0:
        seg = tl.load(chunk_seg_ptr + chunk)
        seg_c = tl.minimum(seg, S - 1)
        part0 = tl.load(chunk_start_ptr + seg_c)
        n_parts = tl.load(chunk_start_ptr + seg_c + 1) - part0
        j = chunk - part0
    else:
        seg = chunk
        seg_c = chunk
        n_parts = 1
        j = 0
    seg_begin = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + seg_c).to(tl.int32), 0), N)
    seg_end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + seg_c + 1).to(tl.int32), seg_begin), N)
    if chunk_len > 0:
        # Differences first: begin + chunk_len could pass 2**31 near the end of a long batch.
        t_begin = seg_begin + tl.minimum(j * chunk_len, seg_end - seg_begin)
        t_end = t_begin + tl.minimum(chunk_len, seg_end - t_begin)
    else:
        t_begin = seg_begin
        t_end = seg_end
    t_end = tl.where(seg < S, t_end, t_begin)
    return seg, t_begin, t_end, seg_begin, n_parts


@triton.jit
def weight_total(
    wsum_ptr,  # (rows,) acc dtype: sums of the user weights; HAS_WEIGHTS only
    row,  # int64 scalar
    count,  # int32 scalar: real tokens of the row
    ACC_DTYPE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    """The sum of weighted_mean's weights over a row: the user weights' precomputed sum, or the
    rank weights' 1 + 2 + ... + count in float (exact to count = 5791 in float32, rounded once beyond)."""
    if HAS_WEIGHTS:
        total = tl.load(wsum_ptr + row).to(ACC_DTYPE)
    else:
        c = count.to(ACC_DTYPE)
        total = c * (c + 1.0) * 0.5
    return total
