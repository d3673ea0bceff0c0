"""Forward pooling kernel: one fused pass over hidden for any subset of {mean, max, first, last, weighted}.

A row (a padded row, or a packed segment) is cut into chunks of CHUNK positions counted from the
row's first real token. Inside a chunk a program adds LANES tokens at a time into LANES lane
accumulators, reduces them with a fixed tree at the end of the chunk, and folds the chunk sums into
the row's total in chunk order. Neither CHUNK nor LANES depends on the batch, the sequence length or
the device, so a row's bits depend only on its own real tokens: not on the batch size, its slot,
the padding (amount, side, content), padded versus packed layout, or the multiprocessor count.

Grid, padded: (B, cdiv(d, BLOCK_D), Z). Program z of a row owns chunks [z * G, (z + 1) * G)
(G = chunks_per_program, chosen by the launcher to fill the GPU). When one program holds the whole
row it folds in registers and writes the result. Otherwise each program writes one partial per
chunk (sums, counts) and one per program (max and its position) to a small workspace, takes a ticket
from a per-(row, feature block) counter, and the program that draws the last ticket folds every
partial in chunk order, writes the result and resets the counter to 0 for the next launch. The
atomic decides only who folds, never the order of the fold: results are bit-identical run to run.

Grid, packed: (S + cdiv(N, CHUNK), cdiv(d, BLOCK_D), 1). Program s < S owns the first chunk of segment
s; program S + p owns the (at most one) later chunk of a segment that starts in the window
[p * CHUNK, (p + 1) * CHUNK) of the token axis. No work list, no host-side preparation: a few long
segments among many short ones are spread over many programs.

How padding is never read: each chunk's mask is scanned first (one vector load), then only its span
[first real, last real] is loaded. A chunk without holes (count == last - first + 1) runs a loop whose
loads are predicated only on the span, so nothing waits on the mask; a chunk with holes predicates
each token's load on its mask element. A predicated-off load moves no bytes: padding reaches neither
the result nor the memory bus, whatever it holds.
"""

import triton
import triton.language as tl

from .mask_scan import (
    COLUMN_ARGS,
    NO_TOKEN,
    better_max,
    chunk_span,
    draw_ticket,
    exact_sqrt,
    first_real_token,
    lanes_argmax,
    lanes_max,
    packed_program,
    release_ticket,
    weight_total,
)


@triton.jit
def _accumulate(
    x,  # (LANES, BLOCK_D) hidden tile, hidden dtype, 0 where not loaded
    t,  # (LANES,) int32 positions
    real,  # (LANES,) bool: real tokens (loaded)
    load,  # (LANES, BLOCK_D) bool: loaded elements
    rank,  # (LANES,) int32: rank of each real token inside its chunk (1, 2, ...); rank weights only
    w,  # (LANES,) acc dtype user weights, 0 where not real; HAS_WEIGHTS only
    total,
    wtotal,
    wt,
    best,
    best_pos,
    ACC_DTYPE: tl.constexpr,
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    TRACK_POS: tl.constexpr,
    DO_WEIGHTED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    # Upcast before reducing: Triton does not widen floats in tl.sum / tl.max.
    x = x.to(ACC_DTYPE)
    if DO_MEAN:
        total += x  # lanes that were not loaded hold exactly 0
    if DO_WEIGHTED:
        if HAS_WEIGHTS:
            wtotal += x * w[:, None]
            wt += w
        else:
            # Exact integers in float32 up to 2**24: no fp16 overflow, no bf16 rounding of the weights.
            wtotal += x * tl.where(real, rank, 0).to(ACC_DTYPE)[:, None]
    if DO_MAX:
        if TRACK_POS:
            pos = tl.where(load, t[:, None], NO_TOKEN)
            take = better_max(x, pos, best, best_pos)
            best = tl.where(take, x, best)
            best_pos = tl.where(take, pos, best_pos)
        else:
            # Values only: NaN replaces a number, never the other way round (x > NaN is False).
            take = load & ((x > best) | ((x != x) & (best == best)))
            best = tl.where(take, x, best)
    return total, wtotal, wt, best, best_pos


@triton.jit
def _pool_chunk(
    col_ptrs,  # (1, BLOCK_D) pointers: hidden row at position 0, this program's features
    mask_row,  # pointer: this row of the mask; HAS_MASK only
    weights_row,  # pointer: this row of the user weights; HAS_WEIGHTS only
    stride_ht,
    stride_mt,
    stride_wt,
    MASK_BITS,
    c_begin,  # int32: first position of the chunk
    c_end,  # int32: one past its last position
    d_in,  # (BLOCK_D,) bool
    best,  # (LANES, BLOCK_D) running per-lane max, carried across chunks
    best_pos,  # (LANES, BLOCK_D) int32 its positions; TRACK_POS only
    ACC_DTYPE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    TRACK_POS: tl.constexpr,
    DO_WEIGHTED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    LANES: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SUBTILES: tl.constexpr = 1,
):
    """Pool one chunk: (sum, rank- or user-weighted sum, user weight sum, count, first, last, best, best_pos).

    Sums are reduced over the lanes here (a fixed tree); the max stays per lane (it is exact in any
    order, and is reduced once per program).
    """
    first, last, count = chunk_span(mask_row, stride_mt, MASK_BITS, c_begin, c_end, HAS_MASK, CHUNK)
    total = tl.zeros((LANES, BLOCK_D), ACC_DTYPE)
    wtotal = tl.zeros((LANES, BLOCK_D), ACC_DTYPE)
    wt = tl.zeros((LANES,), ACC_DTYPE)
    lanes = tl.arange(0, LANES)
    # Without holes nothing inside the span waits on the mask: the loads are predicated on the span
    # only and the loop is software-pipelined. (An empty chunk has first = NO_TOKEN: both loops are empty.)
    dense = (count > 0) & (last - first + 1 == count)
    if dense or (not HAS_MASK):
        for t0 in tl.range(first, last + 1, SUBTILES * LANES, num_stages=NUM_STAGES):
            for half in tl.static_range(SUBTILES):
                t = t0 + half * LANES + lanes
                real = t <= last
                load = real[:, None] & d_in[None, :]
                x = tl.load(col_ptrs + (t.to(tl.int64) * stride_ht)[:, None], mask=load, other=0.0)
                w = tl.zeros((LANES,), ACC_DTYPE)
                if HAS_WEIGHTS:
                    w = tl.load(weights_row + t.to(tl.int64) * stride_wt, mask=real, other=0.0).to(ACC_DTYPE)
                total, wtotal, wt, best, best_pos = _accumulate(
                    x, t, real, load, t - first + 1, w, total, wtotal, wt, best, best_pos,
                    ACC_DTYPE, DO_MEAN, DO_MAX, TRACK_POS, DO_WEIGHTED, HAS_WEIGHTS,
                )  # fmt: skip
    else:
        seen = tl.full((), 0, tl.int32)  # real tokens of the chunk before the current lanes
        for t0 in range(first, last + 1, SUBTILES * LANES):
            for half in tl.static_range(SUBTILES):
                t = t0 + half * LANES + lanes
                inside = t <= last
                m = tl.load(mask_row + t.to(tl.int64) * stride_mt, mask=inside, other=0)
                real = inside & ((m & MASK_BITS) != 0)
                load = real[:, None] & d_in[None, :]
                x = tl.load(col_ptrs + (t.to(tl.int64) * stride_ht)[:, None], mask=load, other=0.0)
                w = tl.zeros((LANES,), ACC_DTYPE)
                if HAS_WEIGHTS:
                    w = tl.load(weights_row + t.to(tl.int64) * stride_wt, mask=real, other=0.0).to(ACC_DTYPE)
                real_i = real.to(tl.int32)
                rank = seen + tl.cumsum(real_i, axis=0)
                seen += tl.sum(real_i, axis=0)
                total, wtotal, wt, best, best_pos = _accumulate(
                    x, t, real, load, rank, w, total, wtotal, wt, best, best_pos,
                    ACC_DTYPE, DO_MEAN, DO_MAX, TRACK_POS, DO_WEIGHTED, HAS_WEIGHTS,
                )  # fmt: skip
    chunk_sum = tl.sum(total, axis=0)
    chunk_wsum = tl.sum(wtotal, axis=0)
    chunk_wt = tl.sum(wt, axis=0)
    return chunk_sum, chunk_wsum, chunk_wt, count, first, last, best, best_pos


@triton.jit
def _fold_chunk(
    total, weighted, wsum, count, first, last,  # the row so far
    chunk_sum, chunk_wsum, chunk_wt, chunk_count, chunk_first, chunk_last,  # the next chunk
    ACC_DTYPE: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
):  # fmt: skip
    """Fold one chunk into the row. The only place sums are combined across chunks, used both by a
    program that holds the whole row and by the last program of a split row: the same bits."""
    weighted = weighted + chunk_wsum
    if not HAS_WEIGHTS:
        # Ranks in the chunk were counted from 1: shift them by the real tokens before it,
        # sum_k (k + offset) x_k = chunk weighted sum + offset * chunk sum. No shift before the first
        # real token (0 * a sum holding inf would be NaN).
        weighted = weighted + tl.where(count > 0, count.to(ACC_DTYPE) * chunk_sum, 0.0)
    total = total + chunk_sum
    wsum = wsum + chunk_wt
    count = count + chunk_count
    first = tl.minimum(first, chunk_first)
    last = tl.maximum(last, chunk_last)
    return total, weighted, wsum, count, first, last


@triton.jit
def _write_results(
    hidden_ptr,  # (B, T, d) / (N, d): read only for the first/last-token gather
    out_ptr,  # (rows, n_modes * d) output, hidden dtype
    argmax_ptr,  # (rows, d) int32; TRACK_POS only
    stats_ptr,  # (3, rows) int32: count, first, last
    wsum_ptr,  # (rows,) acc dtype: the user weights' sum per row; HAS_WEIGHTS only
    wmean_ptr,  # (rows, d) acc dtype: the un-rounded weighted mean; store_wmean only
    rowbuf_ptr,  # (rows, n_cols) acc dtype: un-rounded output rows; normalize_eps >= 0 only
    row,  # int64 scalar
    pid_d,  # int32 scalar: feature block
    d_offs,  # (BLOCK_D,) int32 feature indices
    d_in,  # (BLOCK_D,) bool: d_offs < d
    rows,
    d,
    n_cols,  # n_modes * d
    stride_hb,
    stride_ht,
    stride_hd,
    stride_ob,
    total,  # (BLOCK_D,) acc dtype: sum over real tokens
    weighted,  # (BLOCK_D,) acc dtype: weighted sum over real tokens
    wsum,  # acc dtype scalar: user weights' sum over real tokens
    count,  # int32 scalar: real tokens in the row
    max_value,  # (BLOCK_D,) acc dtype
    max_pos,  # (BLOCK_D,) int32, NO_TOKEN for an empty column; TRACK_POS only
    first,  # int32 scalar, NO_TOKEN for an empty row
    last,  # int32 scalar, -1 for an empty row
    col_mean,
    col_max,
    col_first,  # column offset, or -1 when the mode is not requested
    col_last,
    col_sqrt,  # mean_sqrt_len
    col_weighted,  # weighted_mean
    normalize_eps,  # float: >= 0: write to rowbuf for the row's normalisation; < 0: write out
    store_wmean,  # int: also store the weighted mean un-rounded (for the user weights' gradient)
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    TRACK_POS: tl.constexpr,
    DO_WEIGHTED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    has_tokens = count > 0
    owner = pid_d == 0
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
        w_total = weight_total(wsum, count, weighted.dtype, HAS_WEIGHTS)
        nonzero = w_total != 0.0  # no real token, or user weights summing to 0: zeros
        w_mean = tl.where(nonzero, weighted / tl.where(nonzero, w_total, 1.0), 0.0)
        if HAS_WEIGHTS:
            tl.store(wsum_ptr + row, wsum, mask=owner)
        if store_wmean != 0:
            tl.store(wmean_ptr + row * d + d_offs, w_mean, mask=d_in)
    if DO_MAX:
        # A zero maximum is returned as +0.0: which zero a reduction keeps when -0.0 and +0.0 tie
        # depends on its order, and a row's bits must not.
        max_out = tl.where(has_tokens & (max_value != 0.0), max_value, 0.0)
    # The gathers cost d loads per row: a uniform runtime branch, not another specialization.
    # The load mask is one block comparison (d_in, or nothing for an empty row): a scalar bool
    # broadcast by `&` reaches the Triton >= 3.7 interpreter's loads as int32, which they reject.
    gather = d_offs < tl.where(has_tokens, d, 0)
    if col_first >= 0:
        src = hidden_ptr + row * stride_hb + first.to(tl.int64) * stride_ht
        token = tl.load(src + d_offs.to(tl.int64) * stride_hd, mask=gather, other=0.0)
        first_token = token.to(total.dtype)
    if col_last >= 0:
        src = hidden_ptr + row * stride_hb + last.to(tl.int64) * stride_ht
        token = tl.load(src + d_offs.to(tl.int64) * stride_hd, mask=gather, other=0.0)
        last_token = token.to(total.dtype)
    if DO_MAX and TRACK_POS:
        tl.store(argmax_ptr + row * d + d_offs, tl.where(has_tokens, max_pos, -1), mask=d_in)
    # With normalisation the un-rounded values go to the row buffer; the last feature block of the
    # row to finish normalises the whole row from there (``_normalize_row``).
    if normalize_eps >= 0:
        _store_modes(
            rowbuf_ptr + row * n_cols, d, d_offs, d_in, mean, root_mean, w_mean, max_out, first_token, last_token,
            col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, DO_MAX,
        )  # fmt: skip
    else:
        _store_modes(
            out_ptr + row * stride_ob, d, d_offs, d_in, mean, root_mean, w_mean, max_out, first_token, last_token,
            col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, DO_MAX,
        )  # fmt: skip
    # Per-row sizes for backward, written by one feature block only.
    tl.store(stats_ptr + row, count, mask=owner)
    tl.store(stats_ptr + rows + row, tl.where(has_tokens, first, -1), mask=owner)
    tl.store(stats_ptr + 2 * rows + row, tl.where(has_tokens, last, -1), mask=owner)


@triton.jit
def _store_modes(
    dst,  # pointer: the row's first column (out, or the row buffer)
    d, d_offs, d_in, mean, root_mean, w_mean, max_out, first_token, last_token,
    col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, DO_MAX: tl.constexpr,
):  # fmt: skip
    """Store each requested mode's (BLOCK_D,) block at its slot (column offset slot * d), cast to dst's
    dtype once."""
    ty = dst.dtype.element_ty
    if col_mean >= 0:
        tl.store(dst + col_mean * d + d_offs, mean.to(ty), mask=d_in)
    if col_sqrt >= 0:
        tl.store(dst + col_sqrt * d + d_offs, root_mean.to(ty), mask=d_in)
    if col_weighted >= 0:
        tl.store(dst + col_weighted * d + d_offs, w_mean.to(ty), mask=d_in)
    if DO_MAX:
        tl.store(dst + col_max * d + d_offs, max_out.to(ty), mask=d_in)
    if col_first >= 0:
        tl.store(dst + col_first * d + d_offs, first_token.to(ty), mask=d_in)
    if col_last >= 0:
        tl.store(dst + col_last * d + d_offs, last_token.to(ty), mask=d_in)


@triton.jit
def _normalize_row(
    rowbuf_ptr,  # (rows, n_cols) acc dtype: the row's un-rounded values (every feature block's)
    out_ptr,  # (rows, n_cols) hidden dtype
    norm_ptr,  # (rows,) acc dtype: out, the row's L2 norm before normalisation
    row,  # int64
    n_cols,
    stride_ob,
    normalize_eps,  # float >= 0
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """x / max(||x||_2, eps) over a whole output row (all modes), as torch.nn.functional.normalize,
    from the un-rounded values, rounded once. The sum of squares runs over the row in BLOCK-wide
    lanes in a fixed order: it depends only on the row."""
    src = rowbuf_ptr + row * n_cols
    lanes = tl.arange(0, BLOCK)
    squares = tl.zeros((BLOCK,), ACC_DTYPE)
    for c0 in range(0, n_cols, BLOCK):
        v = tl.load(src + c0 + lanes, mask=c0 + lanes < n_cols, other=0.0, volatile=True)
        squares += v * v
    norm = _sqrt(tl.sum(squares, axis=0))
    # eps = 0 and an all-zero row (an empty row): 0 / 1 = 0, never 0 / 0.
    denominator = tl.maximum(norm, normalize_eps)
    scale = _reciprocal(tl.where(denominator > 0, denominator, 1.0))
    tl.store(norm_ptr + row, norm)
    dst = out_ptr + row * stride_ob
    for c0 in range(0, n_cols, BLOCK):
        inside = c0 + lanes < n_cols
        v = tl.load(src + c0 + lanes, mask=inside, other=0.0, volatile=True)
        tl.store(dst + c0 + lanes, (v * scale).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _sqrt(x):
    """Square root without a call frame: approximate (<= 2 ulp) in float32; in float64 a float32
    reciprocal square root refined by Newton steps (the float64 subroutine needs a stack frame)."""
    if x.dtype == tl.float64:
        r = tl.where(x > 0, tl.rsqrt(tl.where(x > 0, x, 1.0).to(tl.float32)).to(tl.float64), 0.0)
        r = r * (1.5 - 0.5 * x * r * r)
        r = r * (1.5 - 0.5 * x * r * r)
        r = r * (1.5 - 0.5 * x * r * r)
        return x * r
    else:
        return tl.sqrt(x)


@triton.jit
def _reciprocal(x):
    """1 / x without a call frame (float64: a float32 reciprocal refined by Newton steps)."""
    if x.dtype == tl.float64:
        r = (1.0 / x.to(tl.float32)).to(tl.float64)
        r = r * (2.0 - x * r)
        r = r * (2.0 - x * r)
        r = r * (2.0 - x * r)
        return r
    else:
        return 1.0 / x


# Triton specialises integer arguments on their value (== 1, divisible by 16) unless told not to:
# only d and the strides are worth it (vector loads); the rest would only multiply compiled variants
# (a batch of one would compile its own kernel).
@triton.jit(
    do_not_specialize=[
        *COLUMN_ARGS, "rows", "T", "chunks_per_program", "n_slots", "search_steps", "epoch", "stride_mb",
        "stride_wb", "normalize_eps", "store_wmean", "store_prefix", "MASK_BITS",
    ]
)  # fmt: skip
def pool_forward_kernel(
    hidden_ptr,  # (B, T, d) fp16/bf16/fp32/fp64, any strides; (N, d) when PACKED
    mask_ptr,  # (B, T) integer view of the mask, any strides, nonzero = real; HAS_MASK only
    out_ptr,  # (rows, n_modes * d) hidden dtype, unit stride along features
    argmax_ptr,  # (rows, d) int32; TRACK_POS only
    stats_ptr,  # (3, rows) int32: count, first, last
    wsum_ptr,  # (rows,) acc dtype: out, the user weights' sum over each row's real tokens; HAS_WEIGHTS only
    wmean_ptr,  # (rows, d) acc dtype: out, the un-rounded weighted mean; store_wmean only
    prefix_ptr,  # (rows, n_slots) int32: out, real tokens before each chunk; store_prefix only
    part_sum_ptr,  # (slots, d) acc dtype: per-chunk sums of split rows
    part_wsum_ptr,  # (slots, d) acc dtype: per-chunk weighted sums; DO_WEIGHTED only
    part_max_ptr,  # (slots, d) acc dtype: per-program max; DO_MAX only
    part_pos_ptr,  # (slots, d) int32: its position; TRACK_POS only
    part_stats_ptr,  # (slots, n_dblocks, 3) int32: per-chunk count, first, last
    part_wt_ptr,  # (slots, n_dblocks) acc dtype: per-chunk user weight sums; HAS_WEIGHTS only
    counter_ptr,  # (rows * n_dblocks + rows,) int64 tickets (see draw_ticket), 0 after every complete launch
    weights_ptr,  # (B, T) / (N,) float user weights, any strides; HAS_WEIGHTS only
    cu_seqlens_ptr,  # (S + 1,) int32/int64 segment offsets; PACKED only
    norm_ptr,  # (rows,) acc dtype: L2 norm of each output row; normalize_eps >= 0 only
    rowbuf_ptr,  # (rows, n_modes * d) acc dtype: un-rounded output rows; normalize_eps >= 0 only
    rows,  # B, or S when PACKED
    T,  # positions per row, or tokens N when PACKED
    d,
    chunks_per_program,  # G: chunks one program pools (>= a row's chunks: one program per row; packed: 1 or all)
    n_slots,  # padded: cdiv(T, CHUNK), the partial slots of a row
    search_steps,  # PACKED: bit length of S (binary search of a window's segment)
    epoch,  # int64 > 0: this launch's ticket tag
    stride_hb,  # 0 when PACKED: positions are global token indices
    stride_ht,
    stride_hd,
    stride_mb,
    stride_mt,
    stride_wb,
    stride_wt,
    stride_ob,
    col_mean,  # slot of each mode's (rows, d) block in out (its columns start at slot * d), -1 if absent
    col_max,
    col_first,
    col_last,
    col_sqrt,  # mean_sqrt_len
    col_weighted,  # weighted_mean
    normalize_eps,  # L2-normalise each output row with this floor; < 0: do not
    store_wmean,  # 1: store the un-rounded weighted mean (user weights that need a gradient)
    store_prefix,  # 1: store real tokens before each chunk (rank-weighted backward with a mask)
    MASK_BITS,  # bits of a mask element that make it nonzero (sign bit cleared for float masks)
    HAS_MASK: tl.constexpr,
    DO_MEAN: tl.constexpr,  # the plain sum (mean, mean_sqrt_len, and rank weights' chunk fold)
    DO_MAX: tl.constexpr,
    TRACK_POS: tl.constexpr,  # DO_MAX with positions (indices or a gradient are needed)
    DO_WEIGHTED: tl.constexpr,  # rank weights need DO_MEAN (the chunk fold uses the plain sum)
    HAS_WEIGHTS: tl.constexpr,  # weighted_mean with user weights (else rank weights)
    PACKED: tl.constexpr,  # hidden is (N, d) packed by cu_seqlens
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 input
    LANES: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    STATE: tl.constexpr = False,  # write the folded row (``_write_state``), not the pooled outputs
):
    """Masked mean / max+argmax / first / last / weighted sums of one (row, feature block, chunk range).

    With STATE the folded row itself is written, in the accumulation dtype (``fastpool.partial``'s
    mergeable state): out_ptr is then the (rows, n_slots * d) state, the col_* arguments its slots.
    """
    pid_d = tl.program_id(1)
    n_dblocks = tl.num_programs(1)
    n_cols = (col_mean >= 0).to(tl.int32) + (col_max >= 0).to(tl.int32) + (col_first >= 0).to(tl.int32)
    n_cols = (
        n_cols
        + (col_last >= 0).to(tl.int32)
        + (col_sqrt >= 0).to(tl.int32)
        + (col_weighted >= 0).to(tl.int32)
    ) * d
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_offs < d
    if PACKED:
        seg, k_begin, seg_begin, seg_end = packed_program(
            cu_seqlens_ptr, tl.program_id(0), rows, T, search_steps, CHUNK
        )
        row = seg.to(tl.int64)
        first_row = tl.where(seg_end > seg_begin, seg_begin, NO_TOKEN)
        row_end = seg_end
        n_chunks = tl.cdiv(seg_end - seg_begin, CHUNK)
        # chunks_per_program is 1 when the grid has window programs, else larger than any segment
        # (then a segment program pools all of its segment, even one longer than max_seqlen said).
        n_programs = tl.cdiv(n_chunks, chunks_per_program)
        active = (tl.program_id(0) < rows) | ((k_begin >= 1) & (k_begin < n_chunks))
        k_end = tl.minimum(k_begin + chunks_per_program, n_chunks)
        chunks = 1
    else:
        row = tl.program_id(0).to(tl.int64)
        z = tl.program_id(2)
        first_row = first_real_token(
            mask_ptr + row * stride_mb, stride_mt, MASK_BITS, T, HAS_MASK, SCAN_BLOCK
        )
        row_end = T
        n_chunks = tl.where(first_row < T, tl.cdiv(T - first_row, CHUNK), 0)
        n_programs = tl.cdiv(n_chunks, chunks_per_program)
        k_begin = z * chunks_per_program
        k_end = tl.minimum(k_begin + chunks_per_program, n_chunks)
        # An empty row is written by program 0; programs past the row's chunks have nothing to do.
        active = (z < n_programs) | (z == 0)
        chunks = chunks_per_program
    if active:
        col_ptrs = hidden_ptr + row * stride_hb + (d_offs.to(tl.int64) * stride_hd)[None, :]
        mask_row = mask_ptr + row * stride_mb
        weights_row = weights_ptr + row * stride_wb
        split = n_programs > 1
        total = tl.zeros((BLOCK_D,), ACC_DTYPE)
        weighted = tl.zeros((BLOCK_D,), ACC_DTYPE)
        wsum = tl.zeros((), ACC_DTYPE)
        count = tl.full((), 0, tl.int32)
        first = tl.full((), NO_TOKEN, tl.int32)
        last = tl.full((), -1, tl.int32)
        best = tl.full((LANES, BLOCK_D), float("-inf"), ACC_DTYPE)
        best_pos = tl.full((LANES, BLOCK_D), NO_TOKEN, tl.int32)
        for k in range(k_begin, k_end):
            c_begin = first_row + k * CHUNK
            c_end = c_begin + tl.minimum(CHUNK, row_end - c_begin)  # no int32 overflow near 2**31
            chunk_sum, chunk_wsum, chunk_wt, c_count, c_first, c_last, best, best_pos = _pool_chunk(
                col_ptrs, mask_row, weights_row, stride_ht, stride_mt, stride_wt, MASK_BITS,
                c_begin, c_end, d_in, best, best_pos,
                ACC_DTYPE, HAS_MASK, DO_MEAN, DO_MAX, TRACK_POS, DO_WEIGHTED, HAS_WEIGHTS,
                LANES, BLOCK_D, CHUNK, NUM_STAGES,
            )  # fmt: skip
            if split:
                slot = _slot(row, k, seg_begin_or_zero(first_row, PACKED), rows, n_slots, CHUNK, PACKED)
                if DO_MEAN:
                    tl.store(part_sum_ptr + slot * d + d_offs, chunk_sum, mask=d_in)
                if DO_WEIGHTED:
                    tl.store(part_wsum_ptr + slot * d + d_offs, chunk_wsum, mask=d_in)
                stats_at = part_stats_ptr + (slot * n_dblocks + pid_d) * 3
                tl.store(stats_at, c_count)
                tl.store(stats_at + 1, c_first)
                tl.store(stats_at + 2, c_last)
                if HAS_WEIGHTS:
                    tl.store(part_wt_ptr + slot * n_dblocks + pid_d, chunk_wt)
            else:
                if store_prefix != 0:
                    tl.store(prefix_ptr + row * n_slots + k, count, mask=pid_d == 0)
                total, weighted, wsum, count, first, last = _fold_chunk(
                    total, weighted, wsum, count, first, last,
                    chunk_sum, chunk_wsum, chunk_wt, c_count, c_first, c_last, ACC_DTYPE, HAS_WEIGHTS,
                )  # fmt: skip
        max_value = tl.full((BLOCK_D,), float("-inf"), ACC_DTYPE)
        max_pos = tl.full((BLOCK_D,), NO_TOKEN, tl.int32)
        if DO_MAX:
            if TRACK_POS:
                max_value, max_pos = lanes_argmax(best, best_pos)
            else:
                max_value = lanes_max(best)
        finish = not split
        if split:
            slot = _slot(row, k_begin, seg_begin_or_zero(first_row, PACKED), rows, n_slots, CHUNK, PACKED)
            if DO_MAX:
                tl.store(part_max_ptr + slot * d + d_offs, max_value, mask=d_in)
                if TRACK_POS:
                    tl.store(part_pos_ptr + slot * d + d_offs, max_pos, mask=d_in)
            # Release the partials, then draw a ticket; the last of the row's programs folds.
            tl.debug_barrier()
            finish = draw_ticket(counter_ptr + row * n_dblocks + pid_d, epoch) == n_programs - 1
            if finish:
                release_ticket(counter_ptr + row * n_dblocks + pid_d)
                # Fold every program's partial in order, this program's own included.
                max_value = tl.full((BLOCK_D,), float("-inf"), ACC_DTYPE)
                max_pos = tl.full((BLOCK_D,), NO_TOKEN, tl.int32)
                seg_first = seg_begin_or_zero(first_row, PACKED)
                for k in range(0, n_chunks):
                    slot = _slot(row, k, seg_first, rows, n_slots, CHUNK, PACKED)
                    stats_at = part_stats_ptr + (slot * n_dblocks + pid_d) * 3
                    c_count = tl.load(stats_at, volatile=True)
                    chunk_sum = tl.zeros((BLOCK_D,), ACC_DTYPE)
                    chunk_wsum = tl.zeros((BLOCK_D,), ACC_DTYPE)
                    chunk_wt = tl.zeros((), ACC_DTYPE)
                    if DO_MEAN:
                        chunk_sum = tl.load(
                            part_sum_ptr + slot * d + d_offs, mask=d_in, other=0.0, volatile=True
                        )
                    if DO_WEIGHTED:
                        chunk_wsum = tl.load(
                            part_wsum_ptr + slot * d + d_offs, mask=d_in, other=0.0, volatile=True
                        )
                    if HAS_WEIGHTS:
                        chunk_wt = tl.load(part_wt_ptr + slot * n_dblocks + pid_d, volatile=True)
                    if store_prefix != 0:
                        tl.store(prefix_ptr + row * n_slots + k, count, mask=pid_d == 0)
                    total, weighted, wsum, count, first, last = _fold_chunk(
                        total, weighted, wsum, count, first, last,
                        chunk_sum, chunk_wsum, chunk_wt, c_count,
                        tl.load(stats_at + 1, volatile=True), tl.load(stats_at + 2, volatile=True),
                        ACC_DTYPE, HAS_WEIGHTS,
                    )  # fmt: skip
                    if DO_MAX and (k % chunks == 0):
                        value = tl.load(part_max_ptr + slot * d + d_offs, mask=d_in, other=0.0, volatile=True)
                        if TRACK_POS:
                            pos = tl.load(
                                part_pos_ptr + slot * d + d_offs, mask=d_in, other=NO_TOKEN, volatile=True
                            )
                            take = better_max(value, pos, max_value, max_pos)
                            max_value = tl.where(take, value, max_value)
                            max_pos = tl.where(take, pos, max_pos)
                        else:
                            take = (value > max_value) | ((value != value) & (max_value == max_value))
                            max_value = tl.where(take, value, max_value)
        if STATE:
            if finish:
                _write_state(
                    hidden_ptr, out_ptr, argmax_ptr, stats_ptr, wsum_ptr, row, pid_d, d_offs, d_in, rows, d,
                    stride_hb, stride_ht, stride_hd, stride_ob, total, weighted, wsum, count, max_value,
                    max_pos, first, last, col_mean, col_max, col_first, col_last, col_weighted,
                    DO_MEAN, DO_MAX, TRACK_POS, DO_WEIGHTED, HAS_WEIGHTS,
                )  # fmt: skip
        elif finish:
            _write_results(
                hidden_ptr, out_ptr, argmax_ptr, stats_ptr, wsum_ptr, wmean_ptr, rowbuf_ptr,
                row, pid_d, d_offs, d_in, rows, d, n_cols, stride_hb, stride_ht, stride_hd, stride_ob,
                total, weighted, wsum, count, max_value, max_pos, first, last,
                col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, normalize_eps, store_wmean,
                DO_MEAN, DO_MAX, TRACK_POS, DO_WEIGHTED, HAS_WEIGHTS,
            )  # fmt: skip
            if normalize_eps >= 0:
                # The row's feature blocks draw tickets; the last one normalises the whole row.
                tl.debug_barrier()
                row_counter = counter_ptr + rows * n_dblocks + row
                if draw_ticket(row_counter, epoch) == n_dblocks - 1:
                    release_ticket(row_counter)
                    _normalize_row(
                        rowbuf_ptr,
                        out_ptr,
                        norm_ptr,
                        row,
                        n_cols,
                        stride_ob,
                        normalize_eps,
                        ACC_DTYPE,
                        BLOCK_D,
                    )


@triton.jit
def _write_state(
    hidden_ptr,  # (B, T, d) / (N, d): read only for the first/last-token gather
    state_ptr,  # (rows, n_slots * d) acc dtype: out, the folded row at its slots
    argmax_ptr,  # (rows, d) int32: out, max positions (-1 for an empty row); TRACK_POS only
    stats_ptr,  # (3, rows) int32: out, count, first, last (-1 for an empty row)
    wsum_ptr,  # (rows,) acc dtype: out, the user weights' sum; HAS_WEIGHTS only
    row,  # int64 scalar
    pid_d,  # int32 scalar: feature block
    d_offs,  # (BLOCK_D,) int32 feature indices
    d_in,  # (BLOCK_D,) bool: d_offs < d
    rows,
    d,
    stride_hb,
    stride_ht,
    stride_hd,
    stride_sb,  # state row stride
    total,  # (BLOCK_D,) acc dtype: sum over real tokens
    weighted,  # (BLOCK_D,) acc dtype: rank- (from 1 at the row's first real token) or user-weighted sum
    wsum,  # acc dtype scalar: user weights' sum
    count,  # int32 scalar
    max_value,  # (BLOCK_D,) acc dtype, -inf for an empty row (raw: a zero keeps its sign here)
    max_pos,  # (BLOCK_D,) int32, NO_TOKEN for an empty row
    first,  # int32 scalar, NO_TOKEN for an empty row
    last,  # int32 scalar, -1 for an empty row
    slot_sum,  # slot of each part in the state (its columns start at slot * d), -1 when absent
    slot_max,
    slot_first,  # the first real token's values
    slot_last,  # the last real token's values
    slot_weighted,
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    TRACK_POS: tl.constexpr,
    DO_WEIGHTED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    """Store what ``_write_results`` would turn into outputs, unrounded: the mergeable partial state
    of ``fastpool.partial``. Folding two such states in torch with ``_fold_chunk``'s operations and
    finishing with ``pool_finish_kernel`` reproduces this kernel's own fold and epilogue."""
    has_tokens = count > 0
    owner = pid_d == 0
    dst = state_ptr + row * stride_sb
    if DO_MEAN:
        tl.store(dst + slot_sum * d + d_offs, total, mask=d_in)
    if DO_WEIGHTED:
        tl.store(dst + slot_weighted * d + d_offs, weighted, mask=d_in)
        if HAS_WEIGHTS:
            tl.store(wsum_ptr + row, wsum, mask=owner)
    if DO_MAX:
        tl.store(dst + slot_max * d + d_offs, max_value, mask=d_in)
        if TRACK_POS:
            tl.store(argmax_ptr + row * d + d_offs, tl.where(has_tokens, max_pos, -1), mask=d_in)
    # One block comparison as the gathers' load mask, as in _write_results (never `d_in & has_tokens`:
    # the Triton >= 3.7 interpreter rejects a scalar bool broadcast by `&` as a load mask).
    gather = d_offs < tl.where(has_tokens, d, 0)
    if slot_first >= 0:
        src = hidden_ptr + row * stride_hb + first.to(tl.int64) * stride_ht
        token = tl.load(src + d_offs.to(tl.int64) * stride_hd, mask=gather, other=0.0)
        tl.store(dst + slot_first * d + d_offs, token.to(total.dtype), mask=d_in)
    if slot_last >= 0:
        src = hidden_ptr + row * stride_hb + last.to(tl.int64) * stride_ht
        token = tl.load(src + d_offs.to(tl.int64) * stride_hd, mask=gather, other=0.0)
        tl.store(dst + slot_last * d + d_offs, token.to(total.dtype), mask=d_in)
    tl.store(stats_ptr + row, count, mask=owner)
    tl.store(stats_ptr + rows + row, tl.where(has_tokens, first, -1), mask=owner)
    tl.store(stats_ptr + 2 * rows + row, tl.where(has_tokens, last, -1), mask=owner)


@triton.jit(
    do_not_specialize=[
        *COLUMN_ARGS, "rows", "stride_sb", "epoch", "normalize_eps", "slot_sum", "slot_max", "slot_first",
        "slot_last", "slot_weighted",
    ]
)  # fmt: skip
def pool_finish_kernel(
    state_ptr,  # (rows, n_slots * d) acc dtype: folded rows (``_write_state``'s layout, then merged)
    count_ptr,  # (rows,) int32: real tokens of each row
    wsum_in_ptr,  # (rows,) acc dtype: user weights' sums; HAS_WEIGHTS only
    out_ptr,  # (rows, n_modes * d) output dtype, unit stride along features
    scratch_ptr,  # (3, rows) int32: ``_write_results``' per-row sizes, never read
    wsum_out_ptr,  # (rows,) acc dtype: ``_write_results``' copy of the weights' sums, never read
    norm_ptr,  # (rows,) acc dtype: out, L2 norm of each output row; normalize_eps >= 0 only
    rowbuf_ptr,  # (rows, n_modes * d) acc dtype: un-rounded output rows; normalize_eps >= 0 only
    counter_ptr,  # (rows,) int64 tickets; normalize_eps >= 0 only
    rows,
    d,
    stride_sb,  # state row stride (n_slots * d)
    stride_ob,
    epoch,  # int64 > 0: this launch's ticket tag
    slot_sum,  # slot of each part in the state, -1 when absent
    slot_max,
    slot_first,
    slot_last,
    slot_weighted,
    col_mean,  # slot of each mode's block in out, -1 if absent
    col_max,
    col_first,
    col_last,
    col_sqrt,
    col_weighted,
    normalize_eps,  # L2-normalise each output row with this floor; < 0: do not
    DO_MEAN: tl.constexpr,
    DO_MAX: tl.constexpr,
    DO_WEIGHTED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The epilogue of ``pool_forward_kernel`` applied to a (merged) state: ``_write_results`` and the
    row normalisation, the very code of a one-shot launch, so a state holding the bits of a one-shot
    fold finishes to the one-shot output bits. Grid (rows, cdiv(d, BLOCK_D)).

    The first/last tokens are gathered from the state itself: it is passed as ``hidden`` with one
    "position" per slot (stride d), and the slots as the positions."""
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    n_dblocks = tl.num_programs(1)
    n_cols = (col_mean >= 0).to(tl.int32) + (col_max >= 0).to(tl.int32) + (col_first >= 0).to(tl.int32)
    n_cols = (
        n_cols
        + (col_last >= 0).to(tl.int32)
        + (col_sqrt >= 0).to(tl.int32)
        + (col_weighted >= 0).to(tl.int32)
    ) * d
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_offs < d
    src = state_ptr + row * stride_sb
    count = tl.load(count_ptr + row)
    total = tl.zeros((BLOCK_D,), ACC_DTYPE)
    weighted = tl.zeros((BLOCK_D,), ACC_DTYPE)
    wsum = tl.zeros((), ACC_DTYPE)
    max_value = tl.full((BLOCK_D,), float("-inf"), ACC_DTYPE)
    max_pos = tl.full((BLOCK_D,), NO_TOKEN, tl.int32)
    if DO_MEAN:
        total = tl.load(src + slot_sum * d + d_offs, mask=d_in, other=0.0)
    if DO_WEIGHTED:
        weighted = tl.load(src + slot_weighted * d + d_offs, mask=d_in, other=0.0)
        if HAS_WEIGHTS:
            wsum = tl.load(wsum_in_ptr + row)
    if DO_MAX:
        max_value = tl.load(src + slot_max * d + d_offs, mask=d_in, other=0.0)
    _write_results(
        state_ptr, out_ptr, scratch_ptr, scratch_ptr, wsum_out_ptr, wsum_out_ptr, rowbuf_ptr,
        row, pid_d, d_offs, d_in, rows, d, n_cols, stride_sb, d, 1, stride_ob,
        total, weighted, wsum, count, max_value, max_pos, slot_first, slot_last,
        col_mean, col_max, col_first, col_last, col_sqrt, col_weighted, normalize_eps, 0,
        DO_MEAN, DO_MAX, False, DO_WEIGHTED, HAS_WEIGHTS,
    )  # fmt: skip
    if normalize_eps >= 0:
        # As in pool_forward_kernel: the last feature block of the row to finish normalises it.
        tl.debug_barrier()
        row_counter = counter_ptr + row
        if draw_ticket(row_counter, epoch) == n_dblocks - 1:
            release_ticket(row_counter)
            _normalize_row(
                rowbuf_ptr, out_ptr, norm_ptr, row, n_cols, stride_ob, normalize_eps, ACC_DTYPE, BLOCK_D
            )


@triton.jit
def seg_begin_or_zero(first_row, PACKED: tl.constexpr):
    """The first token of a packed segment (its chunk slots are numbered from it); 0 when padded."""
    if PACKED:
        return first_row
    else:
        return 0


@triton.jit
def _slot(row, k, seg_begin, rows, n_slots, CHUNK: tl.constexpr, PACKED: tl.constexpr):
    """Workspace slot of chunk k of a row. Padded: row * n_slots + k. Packed: the chunk's program,
    the segment's own program for chunk 0, else rows + its start's window."""
    if PACKED:
        slot = tl.where(k == 0, row, rows + (seg_begin + k * CHUNK) // CHUNK)
    else:
        slot = row * n_slots + k
    return slot.to(tl.int64)
