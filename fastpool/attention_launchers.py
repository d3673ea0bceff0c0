"""The "triton" backend of attention pooling: strides, allocation, block sizes and grids.

No copy of hidden or scores: every stride goes to the kernels as it is; the mask is reinterpreted
as an integer of its own width (``fastpool.masks.integer_view``).
"""

from __future__ import annotations

import torch

from .eager import accumulation_dtype
from .global_pool_launchers import on_device
from .masks import integer_view

# Bytes of hidden one program loads per loop iteration (BLOCK_T * BLOCK_D * element size), as in
# the pooling launchers; the feature block is one warp-wide row of 16-byte vectors.
TILE_BYTES = 8192
ROW_BYTES = 512
NUM_WARPS = 4
# Test hook: {"block_t": .., "block_d": ..} forces block sizes (small blocks under the interpreter).
OVERRIDE: dict[str, int] = {}


def block_sizes(dh: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D) for a head of ``dh`` features of ``element_size`` bytes."""
    import triton

    block_d = min(triton.next_power_of_2(max(dh, 1)), ROW_BYTES // element_size)
    block_t = max(TILE_BYTES // (block_d * element_size), 16)
    return OVERRIDE.get("block_t", block_t), OVERRIDE.get("block_d", block_d)


def _mask_args(mask: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    if mask is None:
        return dummy, 0, 0, -1, False
    view, bits = integer_view(mask)
    return view, view.stride(0), view.stride(1), bits, True


def _acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def _layout(hidden: torch.Tensor, scores: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple:
    """(rows, T, d, hidden strides (3), scores strides (3)): a packed (N, d) batch is one (1, N, d)
    row of tokens addressed from each sequence's offset (row stride 0), T = N."""
    if cu_seqlens is None:
        return (*hidden.shape, hidden.stride(), scores.stride())
    N, d = hidden.shape
    return (cu_seqlens.shape[0] - 1, N, d, (0, *hidden.stride()), (0, *scores.stride()))


def attention_pool_forward(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention pooling forward.

    hidden (B, T, d) float, any strides; scores (B, T, H) float, H divides d; mask (B, T) any real
    dtype or None. Packed batches: hidden (N, d), scores (N, H), cu_seqlens (S + 1,) int32/int64
    offsets, no mask, B = S. Returns out (B, d) in hidden's dtype and the softmax max and sum, (B, H)
    each in the accumulation dtype (float64 for float64 hidden, else float32), saved for backward.

    Grid (B, H, cdiv(d/H, BLOCK_D)), a loop over each row's tokens. Memory traffic: reads the real
    tokens of hidden and their scores (plus B*T mask bytes) once per feature block of a head (once
    for d/H <= BLOCK_D), writes B*d outputs and 2*B*H statistics.
    """
    from .kernels.attention_pool import attention_pool_forward_kernel

    B, T, d, hs, ss = _layout(hidden, scores, cu_seqlens)
    H = scores.shape[-1]
    dh = d // H
    acc = accumulation_dtype(hidden.dtype)
    out = hidden.new_empty((B, d))
    m = torch.empty((B, H), dtype=acc, device=hidden.device)
    total = torch.empty((B, H), dtype=acc, device=hidden.device)
    if B == 0 or d == 0:
        m.fill_(float("-inf")), total.zero_()
        return out, m, total
    block_t, block_d = block_sizes(dh, hidden.element_size())
    mask_ptr, smb, smt, bits, has_mask = _mask_args(mask, scores)
    packed = cu_seqlens is not None
    grid = (B, H, triton_cdiv(dh, block_d))
    with on_device(hidden.device):
        attention_pool_forward_kernel[grid](
            hidden, scores, mask_ptr, cu_seqlens if packed else m, out, m, total, T, dh,
            *hs, *ss, smb, smt, out.stride(0), out.stride(1), m.stride(0),
            ACC_DTYPE=_acc(hidden.dtype), MASK_BITS=bits, HAS_MASK=has_mask, PACKED=packed,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out, m, total


def attention_pool_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    m: torch.Tensor,
    total: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention pooling backward, one pass over hidden.

    grad_out (B, d); hidden, scores, mask (and cu_seqlens) as in forward; out (B, d), m and total
    (B, H) from forward; ``max_seqlen`` bounds a packed batch's sequence lengths (-1: read from the
    offsets, one host sync). Returns grad_hidden, contiguous in hidden's dtype and shape, and
    grad_scores, contiguous in scores' dtype and shape: dx_t = p_t g, dscore_t = p_t (g . x_t - g . out).

    Grid (B * cdiv(T, BLOCK_T), H), T the longest sequence when packed: token blocks are
    independent. Memory traffic: reads the real tokens of hidden and the scores once, writes every
    gradient element once; grad_out and out (B, d) are read once per token block (from L2).
    """
    from .kernels.attention_pool import attention_pool_backward_kernel

    B, T, d, hs, ss = _layout(hidden, scores, cu_seqlens)
    H = scores.shape[-1]
    dh = d // H
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    grad_scores = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    if B == 0 or T == 0 or H == 0:
        return grad_hidden, grad_scores
    if d == 0:
        return grad_hidden, grad_scores.zero_()
    block_t, block_d = block_sizes(dh, hidden.element_size())
    mask_ptr, smb, smt, bits, has_mask = _mask_args(mask, scores)
    packed = cu_seqlens is not None
    if packed and max_seqlen < 0:
        max_seqlen = int(cu_seqlens.diff().max()) if B else 0
    n_tblocks = triton_cdiv(max_seqlen if packed else T, block_t)
    if n_tblocks == 0:
        return grad_hidden.zero_(), grad_scores.zero_()
    with on_device(hidden.device):
        attention_pool_backward_kernel[(B * n_tblocks, H)](
            grad_out, hidden, scores, mask_ptr, out, m, total, cu_seqlens if packed else m,
            grad_hidden, grad_scores, T, dh, n_tblocks, grad_out.stride(0), grad_out.stride(1),
            *hs, *ss, smb, smt, out.stride(0), out.stride(1), m.stride(0),
            ACC_DTYPE=_acc(hidden.dtype), MASK_BITS=bits, HAS_MASK=has_mask, PACKED=packed,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=NUM_WARPS,
        )  # fmt: skip
    return grad_hidden, grad_scores


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
