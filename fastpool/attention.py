"""Public attention pooling: ``fastpool.attention_pool``."""

from __future__ import annotations

import torch

from . import ops_attention
from .backend import resolve_backend
from .functional import _validate
from .limits import FLOAT_DTYPES
from .packed import resolve_negative, resolve_negatives, validate_packed

# Heads are a grid dimension of the kernels (CUDA allows 65535 blocks there).
MAX_HEADS = 65535


def _check_heads(H: int, d: int) -> None:
    if H < 1 or d % H != 0:
        raise ValueError(f"scores: expected a head count H >= 1 that divides d = {d}, got H = {H}")
    if H > MAX_HEADS:
        raise ValueError(f"scores: expected at most {MAX_HEADS} heads, got H = {H}")


def _check_scores_tensor(scores: object, hidden: torch.Tensor, shapes: str) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a torch.Tensor of shape {shapes}, got {type(scores).__name__}")
    if scores.dtype not in FLOAT_DTYPES:
        raise TypeError(f"scores: expected dtype float16, bfloat16, float32 or float64, got {scores.dtype}")
    if scores.device != hidden.device:
        raise ValueError(f"scores: expected device {hidden.device} (hidden's device), got {scores.device}")


def _validate_scores(hidden: torch.Tensor, scores: object) -> None:
    _check_scores_tensor(scores, hidden, "(B, T) or (B, T, H)")
    if scores.dim() not in (2, 3):
        raise ValueError(
            f"scores: expected 2 or 3 dimensions, (B, T) or (B, T, H), got shape {tuple(scores.shape)}"
        )
    if tuple(scores.shape[:2]) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"scores: expected leading shape (B, T) = {tuple(hidden.shape[:2])} to match hidden "
            f"{tuple(hidden.shape)}, got {tuple(scores.shape)}"
        )
    _check_heads(scores.shape[2] if scores.dim() == 3 else 1, hidden.shape[2])


def _packed_scores(scores: object, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """scores of a packed batch as (N, H): from (N,), (N, H), (1, N), (1, N, H) or a nested jagged
    tensor with hidden's offsets (a view, no copy)."""
    N, d = hidden.shape
    if isinstance(scores, torch.Tensor) and scores.is_nested:
        offsets = scores.offsets() if scores.layout == torch.jagged else None
        if offsets is None or offsets.shape != cu_seqlens.shape or not bool(torch.equal(offsets, cu_seqlens)):
            raise ValueError(
                "scores: expected a jagged nested tensor with hidden's offsets, got other offsets"
            )
        scores = scores.values()
    _check_scores_tensor(scores, hidden, "(N,) or (N, H)")
    if scores.dim() >= 2 and scores.shape[0] == 1 and N != 1 and scores.shape[1] == N:
        scores = scores[0]  # (1, N) or (1, N, H), as (1, N, d) hidden
    if scores.dim() == 1:
        scores = scores.unsqueeze(-1)
    if scores.dim() != 2 or scores.shape[0] != N:
        raise ValueError(
            f"scores: expected shape (N,) or (N, H) with N = {N} tokens for a packed batch, "
            f"got {tuple(scores.shape)}"
        )
    _check_heads(scores.shape[1], d)
    return scores


def attention_pool(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Attention pooling: a softmax over the real tokens weighs them.

    Parameters
    ----------
    hidden : (B, T, d) float16, bfloat16, float32 or float64, any strides.
    scores : (B, T) (one score per token) or (B, T, H) for H heads, H dividing d; head h pools the
        features ``h * d/H : (h + 1) * d/H``. Any float dtype (computed in hidden's accumulation dtype).
    mask : (B, T) of any real dtype (nonzero = real token) or None (every token real).
    cu_seqlens, max_seqlen : packed input, as for ``fastpool.pool``: hidden (N, d) or (1, N, d) (or a
        jagged nested tensor (S, j, d), then scores may be one with the same offsets), scores (N,) or
        (N, H), cu_seqlens (S + 1,) int32/int64 offsets, max_seqlen an optional bound on the lengths
        (with it, a CUDA batch on the Triton backend runs without host sync). Result (S, d).

    Returns
    -------
    (B, d) in hidden's dtype: per row and head ``sum_t p_t x_t`` with ``p = softmax`` of the real
    tokens' scores, computed with a running max in float32 (float64 for float64 input). Padding
    (hidden and scores, NaN/inf included) never reaches the output or a gradient; a -inf score on a
    real token gives it weight 0; a row (or head, or empty packed sequence) with no real token, or
    only -inf scores, gives zeros and zero gradients. Differentiable in hidden and scores
    (``dscore_t = p_t (g.x_t - g.out)``). Deterministic and batch-invariant: each row's softmax and
    sum run in one program over that row's tokens in a fixed order, whatever the other rows.
    """
    if cu_seqlens is not None or (isinstance(hidden, torch.Tensor) and hidden.is_nested):
        backend = resolve_backend(hidden.device)
        packed = validate_packed(hidden, mask, cu_seqlens, max_seqlen, None, backend)
        s2 = resolve_negative(_packed_scores(scores, packed.hidden, packed.cu_seqlens))
        out, _, _ = ops_attention.packed_attention_pool_forward(
            packed.hidden, s2, packed.cu_seqlens, packed.max_seqlen, packed.check_offsets, backend
        )
        return out
    if max_seqlen is not None:
        raise ValueError("max_seqlen: expected None without cu_seqlens (it bounds packed sequences)")
    _validate(hidden, mask)
    _validate_scores(hidden, scores)
    hidden, mask, scores = resolve_negatives(hidden, mask, scores)
    s3 = scores.unsqueeze(-1) if scores.dim() == 2 else scores
    out, _, _ = ops_attention.attention_pool_forward(hidden, s3, mask, resolve_backend(hidden.device))
    return out
