"""Attention pooling kernels: softmax over the real tokens of each row and head, weighted sum of hidden.

Forward: one program per (row, head, feature block); one pass over T in BLOCK_T chunks with an
online (running-max) softmax in float32 (float64 for float64 input). Backward: one program per
(row, block of BLOCK_T tokens, head), writing its tile of the gradients of hidden and of the scores
from the forward's per-row softmax max and sum (hidden read once more, for g . x_t).
Padding (hidden and scores, NaN/inf included) is selected away with ``tl.where``, never multiplied.

Packed batches (PACKED): rows are the sequences of hidden (N, d) delimited by ``cu_seqlens``; the
same loops run over each sequence's token range, positions are global token indices.
"""

import triton
import triton.language as tl


@triton.jit
def _real(mask_ptr, b, offs_t, end, stride_mb, stride_mt, MASK_BITS: tl.constexpr, HAS_MASK: tl.constexpr):
    """(BLOCK_T,) bool: the positions ``offs_t`` of row ``b`` that are real tokens before ``end``."""
    in_range = offs_t < end
    if HAS_MASK:
        m = tl.load(mask_ptr + b * stride_mb + offs_t * stride_mt, mask=in_range, other=0)
        return in_range & ((m & MASK_BITS) != 0)
    return in_range


@triton.jit
def _row_range(cu_seqlens_ptr, b, T, PACKED: tl.constexpr):
    """[start, end) of row b's tokens: [0, T) for a padded row; sequence b's offsets for a packed
    batch (T = N tokens), clamped into [0, N] and made non-decreasing so malformed offsets never
    address outside hidden."""
    if PACKED:
        start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + b).to(tl.int32), 0), T)
        end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + b + 1).to(tl.int32), start), T)
    else:
        start = 0
        end = T
    return start, end


@triton.jit
def attention_pool_forward_kernel(
    hidden_ptr,  # (B, T, H * DH); packed: (N, H * DH) with stride_hb = 0
    scores_ptr,  # (B, T, H); packed: (N, H) with stride_sb = 0
    mask_ptr,  # (B, T) integer view, or a dummy when HAS_MASK is False
    cu_seqlens_ptr,  # (B + 1,) int32/int64 sequence offsets when PACKED, else a dummy
    out_ptr,  # (B, H * DH) in hidden's dtype (B = sequences when packed)
    max_ptr,  # (B, H) accumulation dtype: running max of the real scores (-inf if none)
    sum_ptr,  # (B, H) accumulation dtype: sum of exp(score - max) over the real tokens
    T,  # tokens per row; packed: N, the tokens of the batch
    DH,
    stride_hb, stride_ht, stride_hd,
    stride_sb, stride_st, stride_sh,
    stride_mb, stride_mt,
    stride_ob, stride_od,
    stride_stat_b,
    ACC_DTYPE: tl.constexpr,
    MASK_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = offs_d < DH
    feat = h * DH + offs_d.to(tl.int64)
    start, end = _row_range(cu_seqlens_ptr, b, T, PACKED)
    m_run = tl.full((), float("-inf"), ACC_DTYPE)
    l_run = tl.zeros((), ACC_DTYPE)
    acc = tl.zeros((BLOCK_D,), ACC_DTYPE)
    for t0 in range(start, end, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        real = _real(mask_ptr, b, offs_t, end, stride_mb, stride_mt, MASK_BITS, HAS_MASK)
        s = tl.load(scores_ptr + b * stride_sb + offs_t * stride_st + h * stride_sh, mask=real, other=0.0)
        s = tl.where(real, s.to(ACC_DTYPE), float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, axis=0))
        # With no finite score yet, m_new is -inf: subtract 0 instead so no -inf - -inf NaN appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        p = tl.where(s == float("-inf"), 0.0, tl.exp(s - m_safe))
        # Tokens of weight 0 (padding, -inf scores, underflow) are neither loaded nor summed.
        x = tl.load(
            hidden_ptr + b * stride_hb + offs_t[:, None] * stride_ht + feat[None, :] * stride_hd,
            mask=(p > 0)[:, None] & d_in[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        acc = acc * alpha + tl.sum(p[:, None] * x, axis=0)
        l_run = l_run * alpha + tl.sum(p, axis=0)
        m_run = m_new
    out = tl.where(l_run > 0, acc / tl.where(l_run > 0, l_run, 1.0), 0.0)
    tl.store(out_ptr + b * stride_ob + feat * stride_od, out.to(out_ptr.dtype.element_ty), mask=d_in)
    if pid_d == 0:
        tl.store(max_ptr + b * stride_stat_b + h, m_run)
        tl.store(sum_ptr + b * stride_stat_b + h, l_run)


@triton.jit
def attention_pool_backward_kernel(
    grad_out_ptr,  # (B, H * DH)
    hidden_ptr,  # (B, T, H * DH)
    scores_ptr,  # (B, T, H)
    mask_ptr,  # (B, T) integer view or dummy
    out_ptr,  # (B, H * DH) forward output
    max_ptr,  # (B, H)
    sum_ptr,  # (B, H)
    cu_seqlens_ptr,  # (B + 1,) sequence offsets when PACKED, else a dummy
    grad_hidden_ptr,  # (B, T, H * DH) contiguous, hidden's dtype; packed: (N, H * DH)
    grad_scores_ptr,  # (B, T, H) contiguous, scores' dtype; packed: (N, H)
    T,  # tokens per row; packed: N
    DH,
    n_tblocks,  # token blocks per row: cdiv(T, BLOCK_T); packed: cdiv(longest sequence, BLOCK_T)
    stride_gb, stride_gd,
    stride_hb, stride_ht, stride_hd,
    stride_sb, stride_st, stride_sh,
    stride_mb, stride_mt,
    stride_ob, stride_od,
    stride_stat_b,
    ACC_DTYPE: tl.constexpr,
    MASK_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (row, block of BLOCK_T tokens, head): every token's weight p_t comes from the
    forward's softmax statistics, so token blocks are independent and the grid covers B * T / BLOCK_T
    tiles per head (no serial loop over T). Each program writes its tile of both gradients once."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    H = tl.num_programs(1)
    b = (pid // n_tblocks).to(tl.int64)
    start, end = _row_range(cu_seqlens_ptr, b, T, PACKED)
    t0 = start + (pid % n_tblocks) * BLOCK_T
    m_run = tl.load(max_ptr + b * stride_stat_b + h)
    l_run = tl.load(sum_ptr + b * stride_stat_b + h)
    m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
    inv_l = tl.where(l_run > 0, 1.0 / tl.where(l_run > 0, l_run, 1.0), 0.0)
    offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_in = offs_t < end
    real = _real(mask_ptr, b, offs_t, end, stride_mb, stride_mt, MASK_BITS, HAS_MASK)
    # Gradient rows: (b, t) of (B, T, d) padded; the global token t of (N, d) packed.
    grad_row = offs_t if PACKED else b * T + offs_t
    s = tl.load(scores_ptr + b * stride_sb + offs_t * stride_st + h * stride_sh, mask=real, other=0.0)
    s = tl.where(real, s.to(ACC_DTYPE), float("-inf"))
    p = tl.where(s == float("-inf"), 0.0, tl.exp(s - m_safe) * inv_l)
    # g . out and g . x_t for this head, one pass over the head's features (grad_out and out are
    # (B, d): L2-resident, read by every token block of the row).
    g_dot_out = tl.zeros((), ACC_DTYPE)
    g_dot_x = tl.zeros((BLOCK_T,), ACC_DTYPE)
    D = H * DH
    for d0 in range(0, DH, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_in = offs_d < DH
        feat = h * DH + offs_d.to(tl.int64)
        g = tl.load(grad_out_ptr + b * stride_gb + feat * stride_gd, mask=d_in, other=0.0).to(ACC_DTYPE)
        o = tl.load(out_ptr + b * stride_ob + feat * stride_od, mask=d_in, other=0.0).to(ACC_DTYPE)
        g_dot_out += tl.sum(g * o, axis=0)
        x = tl.load(
            hidden_ptr + b * stride_hb + offs_t[:, None] * stride_ht + feat[None, :] * stride_hd,
            mask=(p > 0)[:, None] & d_in[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        x = tl.where((p > 0)[:, None], x, 0.0)
        g_dot_x += tl.sum(x * g[None, :], axis=1)
        dx = p[:, None] * g[None, :]
        tl.store(
            grad_hidden_ptr + grad_row[:, None] * D + feat[None, :],
            dx.to(grad_hidden_ptr.dtype.element_ty),
            mask=t_in[:, None] & d_in[None, :],
        )
    ds = tl.where(p > 0, p * (g_dot_x - g_dot_out), 0.0)
    tl.store(grad_scores_ptr + grad_row * H + h, ds.to(grad_scores_ptr.dtype.element_ty), mask=t_in)
