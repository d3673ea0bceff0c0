"""Helpers shared by the pooling kernels: mask scans, the fixed chunking of a row, the lane-wise argmax.

These are ``@triton.jit`` device functions only; they are inlined into the kernels that call them.

The chunking is what makes a row's bits independent of the batch: a row is cut into chunks of CHUNK
positions counted from the row's first real token (whatever the padding before it), each chunk is
summed in LANES lanes and reduced by a fixed tree, and the chunk sums are folded in chunk order. The
same function computes the same bits whether one program folds every chunk in registers or the
chunks are spread over programs whose partials the last one to finish folds.
"""

import triton
import triton.language as tl

# Per-mode column offsets (-1 = mode not requested): uniform runtime flags, never specialized on.
COLUMN_ARGS = ["col_mean", "col_max", "col_first", "col_last", "col_sqrt", "col_weighted"]
# Sentinel position for "no real token seen": larger than any T we accept (T < 2**31 - 1).
NO_TOKEN = tl.constexpr(2147483647)


@triton.jit
def first_real_token(
    mask_row,  # pointer: the row of the (integer view of the) mask
    stride_mt,  # int: mask stride along T (elements)
    MASK_BITS,  # int: bits that make a mask element nonzero (float masks: all but the sign)
    T,  # int32: positions in the row
    HAS_MASK: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    """The first real position of a row, NO_TOKEN when it has none. Stops at the first block holding
    a real token: right-padded and unpadded rows read one block of the mask."""
    first = tl.full((), NO_TOKEN, tl.int32)
    if HAS_MASK:
        offs = tl.arange(0, SCAN_BLOCK)
        t0 = tl.full((), 0, tl.int32)
        while (first == NO_TOKEN) & (t0 < T):
            t = t0 + offs
            inside = t < T
            m = tl.load(mask_row + t.to(tl.int64) * stride_mt, mask=inside, other=0)
            real = ((m & MASK_BITS) != 0) & inside
            first = tl.min(tl.where(real, t, NO_TOKEN), axis=0)
            t0 += SCAN_BLOCK
    else:
        first = tl.where(T > 0, 0, NO_TOKEN)
    return first


@triton.jit
def chunk_span(
    mask_row,  # pointer: the row of the mask
    stride_mt,
    MASK_BITS,
    c_begin,  # int32: first position of the chunk
    c_end,  # int32: one past its last position (c_end - c_begin <= CHUNK)
    HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """(first, last, count) of the real tokens of one chunk; first = NO_TOKEN, last = -1 when it has none.

    One vector load of the chunk's mask (CHUNK elements), before any of its hidden states is read.
    """
    if HAS_MASK:
        t = c_begin + tl.arange(0, CHUNK)
        inside = t < c_end
        m = tl.load(mask_row + t.to(tl.int64) * stride_mt, mask=inside, other=0)
        real = ((m & MASK_BITS) != 0) & inside
        count = tl.sum(real.to(tl.int32), axis=0)
        first = tl.min(tl.where(real, t, NO_TOKEN), axis=0)
        last = tl.max(tl.where(real, t, -1), axis=0)
    else:
        count = tl.maximum(c_end - c_begin, 0)
        first = tl.where(count > 0, c_begin, NO_TOKEN)
        last = tl.where(count > 0, c_end - 1, -1)
    return first, last, count


@triton.jit
def lanes_argmax(values, positions):
    """Reduce (LANES, BLOCK_D) per-lane maxima to one (value, position) per column.

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
    value = tl.where(has_nan, float("nan"), best)
    return value, position


@triton.jit
def lanes_max(values):
    """(LANES, BLOCK_D) per-lane maxima (-inf where nothing was seen) to one value per column; NaN wins."""
    has_nan = tl.max((values != values).to(tl.int32), axis=0) > 0
    best = tl.max(tl.where(values == values, values, float("-inf")), axis=0)
    return tl.where(has_nan, float("nan"), best)


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
def segment_bounds(
    cu_seqlens_ptr,  # (S + 1,) int32/int64 segment offsets
    seg,  # int32 scalar, < S
    N,  # int32: tokens
):
    """(begin, end) of segment ``seg``, clamped into [0, N] with end >= begin, so that malformed offsets
    (when the launcher was told not to check them) can never address outside hidden."""
    begin = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + seg).to(tl.int32), 0), N)
    end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + seg + 1).to(tl.int32), begin), N)
    return begin, end


@triton.jit
def segment_of_token(
    cu_seqlens_ptr,  # (S + 1,) int32/int64 segment offsets
    token,  # int32 scalar in [0, N)
    S,
    search_steps,  # int32 >= bit length of S
):
    """The last segment s with cu_seqlens[s] <= token (binary search; the segment holding ``token`` when
    the offsets are well formed, some segment in [0, S) otherwise)."""
    lo = tl.full((), 0, tl.int32)
    hi = S - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        at = tl.load(cu_seqlens_ptr + tl.minimum(tl.maximum(mid, 0), S)).to(tl.int64)
        go_up = (lo < hi) & (at <= token)
        go_down = (lo < hi) & (at > token)
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_down, mid - 1, hi)
    return tl.maximum(lo, 0)


@triton.jit
def weight_total(
    wsum,  # acc dtype scalar: the user weights' sum over the row (HAS_WEIGHTS only)
    count,  # int32 scalar: real tokens of the row
    ACC_DTYPE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    """The sum of weighted_mean's weights over a row: the user weights' sum, or the rank weights'
    1 + 2 + ... + count in float (exact to count = 5791 in float32, rounded once beyond)."""
    if HAS_WEIGHTS:
        total = wsum.to(ACC_DTYPE)
    else:
        c = count.to(ACC_DTYPE)
        total = c * (c + 1.0) * 0.5
    return total


@triton.jit
def packed_program(
    cu_seqlens_ptr,  # (S + 1,) int32/int64 segment offsets
    q,  # int32: the program's index along grid axis 0
    S,
    N,
    search_steps,  # bit length of S
    CHUNK: tl.constexpr,
):
    """(segment, chunk index, segment begin, segment end) of packed program q.

    Program q < S owns chunk 0 of segment q (even an empty segment: its result is zeros). Program
    S + p owns the chunk of the segment holding token p * CHUNK that starts in the window
    [p * CHUNK, (p + 1) * CHUNK), if that chunk is not the segment's first; then chunk >= 1, else the
    program has nothing to do (chunk == 0 for a window program). Offsets are clamped (see
    ``segment_bounds``); every quantity stays below N + CHUNK, so nothing overflows int32.
    """
    is_window = q >= S
    seg = q
    if is_window:
        seg = segment_of_token(cu_seqlens_ptr, (q - S) * CHUNK, S, search_steps)
    begin, end = segment_bounds(cu_seqlens_ptr, seg, N)
    k = tl.full((), 0, tl.int32)
    if is_window:
        k = tl.cdiv(tl.maximum((q - S) * CHUNK - begin, 0), CHUNK)
    return seg, k, begin, end


@triton.jit
def draw_ticket(
    counter,  # pointer to one int64 counter: (epoch << 32) | arrivals, or 0
    epoch,  # int64 > 0: this launch's tag
):
    """Count one arrival and return how many came before it in this launch (acquire-release).

    A counter left by an earlier launch (tagged with another epoch) counts as 0: a launch that
    never completed a row (only possible with malformed offsets on the unchecked packed path) can
    never poison a later one. The last arrival resets the counter to 0 (``release_ticket``), so a
    replayed CUDA graph, whose epoch never changes, starts from 0 too.
    """
    tag = epoch.to(tl.int64) << 32
    current = tl.atomic_add(counter, 0, sem="relaxed")
    ticket = tl.full((), 0, tl.int64)
    done = tl.full((), 0, tl.int32)
    while done == 0:
        fresh = (current >> 32) != epoch.to(tl.int64)
        ticket = tl.where(fresh, 0, current & 0xFFFFFFFF)
        seen = tl.atomic_cas(counter, current, tag + ticket + 1, sem="acq_rel")
        done = (seen == current).to(tl.int32)
        current = seen
    return ticket


@triton.jit
def release_ticket(counter):
    """Reset a counter after the last arrival of a launch."""
    tl.atomic_xchg(counter, tl.full((), 0, tl.int64), sem="relaxed")
