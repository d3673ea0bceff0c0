"""The "torch" backend of attention pooling: eager PyTorch with the kernels' semantics.

scores are (B, T, H); hidden (B, T, H * dh). Per row and head, p = softmax of the scores over the
real tokens (padding and -inf scores weigh 0, NaN/inf in padding never reaches a result); a row or
head with no real finite-weight token pools to zeros with zero gradients.
"""

from __future__ import annotations

import torch

from .eager import accumulation_dtype
from .masks import real_tokens


def _weights(
    scores: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p (B, T, H), max (B, H), sum (B, H)) in the accumulation dtype."""
    s = scores.to(accumulation_dtype(scores.dtype))
    real = real_tokens(mask)
    if real is not None:
        s = torch.where(real[..., None], s, float("-inf"))
    m = s.amax(dim=1) if s.shape[1] > 0 else s.new_full((s.shape[0], s.shape[2]), float("-inf"))
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    e = torch.where(s == float("-inf"), 0.0, torch.exp(s - m_safe[:, None, :]))
    total = e.sum(dim=1)
    p = torch.where(total[:, None, :] > 0, e / torch.where(total > 0, total, 1.0)[:, None, :], 0.0)
    return p, m, total


def _heads(hidden: torch.Tensor, H: int, p: torch.Tensor) -> torch.Tensor:
    """hidden as (B, T, H, dh) in the accumulation dtype, zero where the weight is zero."""
    B, T, d = hidden.shape
    x = hidden.to(p.dtype).reshape(B, T, H, d // H)
    return torch.where(p[..., None] > 0, x, 0.0)


def attention_pool_forward(
    hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (B, d) in hidden's dtype, max (B, H) and sum (B, H) of the softmax in the accumulation dtype."""
    B, T, d = hidden.shape
    H = scores.shape[2]
    p, m, total = _weights(scores, mask)
    out = torch.einsum("bth,bthk->bhk", p, _heads(hidden, H, p)).reshape(B, d)
    return out.to(hidden.dtype), m, total


def attention_pool_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden (B, T, d) in hidden's dtype, grad_scores (B, T, H) in scores' dtype)."""
    B, T, d = hidden.shape
    H = scores.shape[2]
    p, _, _ = _weights(scores, mask)
    g = grad_out.to(p.dtype).reshape(B, H, d // H)
    o = out.to(p.dtype).reshape(B, H, d // H)
    grad_hidden = (p[..., None] * g[:, None]).reshape(B, T, d)
    g_dot_x = torch.einsum("bthk,bhk->bth", _heads(hidden, H, p), g)
    grad_scores = p * (g_dot_x - (g * o).sum(-1)[:, None, :])
    grad_scores = torch.where(p > 0, grad_scores, 0.0)
    return grad_hidden.to(hidden.dtype), grad_scores.to(scores.dtype)
