"""Public attention pooling: ``fastpool.attention_pool``."""

from __future__ import annotations

import torch

from . import ops_attention
from .backend import resolve_backend
from .functional import _validate
from .limits import FLOAT_DTYPES


def _validate_scores(hidden: torch.Tensor, scores: object) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"scores: expected a torch.Tensor of shape (B, T) or (B, T, H), got {type(scores).__name__}"
        )
    if scores.dim() not in (2, 3):
        raise ValueError(
            f"scores: expected 2 or 3 dimensions, (B, T) or (B, T, H), got shape {tuple(scores.shape)}"
        )
    if scores.dtype not in FLOAT_DTYPES:
        raise TypeError(f"scores: expected dtype float16, bfloat16, float32 or float64, got {scores.dtype}")
    if tuple(scores.shape[:2]) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"scores: expected leading shape (B, T) = {tuple(hidden.shape[:2])} to match hidden "
            f"{tuple(hidden.shape)}, got {tuple(scores.shape)}"
        )
    if scores.dim() == 3:
        H = scores.shape[2]
        if H < 1 or hidden.shape[2] % H != 0:
            raise ValueError(
                f"scores: expected a head count H >= 1 that divides d = {hidden.shape[2]}, got H = {H}"
            )
    if scores.device != hidden.device:
        raise ValueError(f"scores: expected device {hidden.device} (hidden's device), got {scores.device}")


def attention_pool(
    hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention pooling: a softmax over the real tokens weighs them.

    Parameters
    ----------
    hidden : (B, T, d) float16, bfloat16, float32 or float64, any strides.
    scores : (B, T) (one score per token) or (B, T, H) for H heads, H dividing d; head h pools the
        features ``h * d/H : (h + 1) * d/H``. Any float dtype.
    mask : (B, T) of any real dtype (nonzero = real token) or None (every token real).

    Returns
    -------
    (B, d) in hidden's dtype: per row and head ``sum_t p_t x_t`` with ``p = softmax`` of the real
    tokens' scores, computed with a running max in float32 (float64 for float64 input). Padding
    (hidden and scores, NaN/inf included) never reaches the output or a gradient; a -inf score on a
    real token gives it weight 0; a row (or head) with no real token, or only -inf scores, gives zeros
    and zero gradients. Differentiable in hidden and scores (``dscore_t = p_t (g.x_t - g.out)``).
    Packed (``cu_seqlens``) input is not supported: pad first.
    """
    _validate(hidden, mask)
    _validate_scores(hidden, scores)
    squeeze = scores.dim() == 2
    s3 = scores.unsqueeze(-1) if squeeze else scores
    out, _, _ = ops_attention.attention_pool_fwd(hidden, s3, mask, resolve_backend(hidden.device))
    return out
