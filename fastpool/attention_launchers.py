"""The "triton" backend of attention pooling: strides, allocation, block sizes and grids.

No copy of hidden or scores: every stride goes to the kernels as it is; the mask is reinterpreted
as an integer of its own width (``fastpool.masks.integer_view``).
"""

from __future__ import annotations

import torch

from .eager import accumulation_dtype
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


def attention_pool_forward(
    hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention pooling forward.

    hidden (B, T, d) float, any strides; scores (B, T, H) float, H divides d; mask (B, T) any real
    dtype or None. Returns out (B, d) in hidden's dtype and the softmax max and sum, (B, H) each in
    the accumulation dtype (float64 for float64 hidden, else float32), saved for backward.

    Memory traffic: reads B*T*d hidden elements and B*T*H scores (plus B*T mask bytes) once per
    feature block of a head (once for d/H <= BLOCK_D), writes B*d outputs and 2*B*H statistics.
    """
    from .kernels.attention_pool import attention_pool_forward_kernel

    B, T, d = hidden.shape
    H = scores.shape[2]
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
    grid = (B, H, triton_cdiv(dh, block_d))
    attention_pool_forward_kernel[grid](
        hidden, scores, mask_ptr, out, m, total, T, dh,
        hidden.stride(0), hidden.stride(1), hidden.stride(2),
        scores.stride(0), scores.stride(1), scores.stride(2),
        smb, smt, out.stride(0), out.stride(1), m.stride(0),
        ACC_DTYPE=_acc(hidden.dtype), MASK_BITS=bits, HAS_MASK=has_mask,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention pooling backward, one pass over hidden.

    grad_out (B, d); hidden, scores, mask as in forward; out (B, d), m and total (B, H) from
    forward. Returns grad_hidden (B, T, d) contiguous in hidden's dtype and grad_scores (B, T, H)
    contiguous in scores' dtype: dx_t = p_t g, dscore_t = p_t (g . x_t - g . out).

    Memory traffic: reads B*T*d hidden elements and B*T*H scores once, writes B*T*d + B*T*H
    gradient elements; grad_out and out (B, d) are read once per token block.
    """
    from .kernels.attention_pool import attention_pool_backward_kernel

    B, T, d = hidden.shape
    H = scores.shape[2]
    dh = d // H
    grad_hidden = torch.empty((B, T, d), dtype=hidden.dtype, device=hidden.device)
    grad_scores = torch.empty((B, T, H), dtype=scores.dtype, device=scores.device)
    if B == 0 or T == 0 or H == 0:
        return grad_hidden, grad_scores
    if d == 0:
        return grad_hidden, grad_scores.zero_()
    block_t, block_d = block_sizes(dh, hidden.element_size())
    mask_ptr, smb, smt, bits, has_mask = _mask_args(mask, scores)
    attention_pool_backward_kernel[(B, H)](
        grad_out, hidden, scores, mask_ptr, out, m, total, grad_hidden, grad_scores, T, dh,
        grad_out.stride(0), grad_out.stride(1),
        hidden.stride(0), hidden.stride(1), hidden.stride(2),
        scores.stride(0), scores.stride(1), scores.stride(2),
        smb, smt, out.stride(0), out.stride(1), m.stride(0),
        ACC_DTYPE=_acc(hidden.dtype), MASK_BITS=bits, HAS_MASK=has_mask,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )  # fmt: skip
    return grad_hidden, grad_scores


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
