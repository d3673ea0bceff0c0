"""The "torch" backend of attention pooling: eager PyTorch with the kernels' semantics.

scores are (B, T, H); hidden (B, T, H * dh). Per row and head, p = softmax of the scores over the
real tokens (padding and -inf scores weigh 0, NaN/inf in padding never reaches a result); a row or
head with no real finite-weight token pools to zeros with zero gradients. Packed batches (hidden
(N, d), scores (N, H), cu_seqlens) use segment reductions with the same semantics per sequence.
Everything is computed in hidden's accumulation dtype (float64 for float64 hidden, else float32).
"""

from __future__ import annotations

import contextlib

import torch

from .eager import accumulation_dtype
from .masks import real_tokens


def _weights(
    scores: torch.Tensor, mask: torch.Tensor | None, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p (B, T, H), max (B, H), sum (B, H)) in ``acc``, hidden's accumulation dtype (as the kernels)."""
    s = scores.to(acc)
    real = real_tokens(mask)
    if real is not None:
        s = torch.where(real[..., None], s, float("-inf"))
    m = s.amax(dim=1) if s.shape[1] > 0 else s.new_full((s.shape[0], s.shape[2]), float("-inf"))
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    e = torch.where(s == float("-inf"), 0.0, torch.exp(s - m_safe[:, None, :]))
    total = e.sum(dim=1)
    p = torch.where(total[:, None, :] > 0, e / torch.where(total > 0, total, 1.0)[:, None, :], 0.0)
    return p, m, total


def _full_precision(hidden: torch.Tensor):
    """A context without autocast on hidden's device: the weighted sums and g . x below are matmuls,
    which autocast would run in 16 bits (the semantics say the accumulation dtype)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def _heads(hidden: torch.Tensor, H: int, p: torch.Tensor) -> torch.Tensor:
    """hidden as (B, T, H, dh) in the accumulation dtype, zero where the weight is zero."""
    return torch.where(p[..., None] > 0, _head_view(hidden, H, p.dtype), 0.0)


def _head_view(hidden: torch.Tensor, H: int, acc: torch.dtype) -> torch.Tensor:
    """hidden as (B, T, H, dh) in the accumulation dtype (a view for float32 / float64 hidden)."""
    B, T, d = hidden.shape
    return hidden.to(acc).reshape(B, T, H, d // H)


# Rows of 16-bit hidden widened to the accumulation dtype at a time: the products below read float32
# (float64) copies of hidden, bounded to this many bytes instead of a copy of the whole (B, T, d).
_WIDEN_CHUNK_BYTES = 32 * 2**20


def _row_groups(hidden: torch.Tensor, acc: torch.dtype) -> list[slice]:
    """Slices of rows whose widened copy stays under ``_WIDEN_CHUNK_BYTES`` (all rows at once when
    hidden already has the accumulation dtype: its view is read in place)."""
    B, T, d = hidden.shape
    if hidden.dtype == acc:
        return [slice(0, B)]
    rows = max(1, _WIDEN_CHUNK_BYTES // max(1, T * d * torch.finfo(acc).bits // 8))
    return [slice(i, min(B, i + rows)) for i in range(0, B, rows)]


def attention_pool_forward(
    hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (B, d) in hidden's dtype, max (B, H) and sum (B, H) of the softmax in the accumulation dtype.

    One weighted sum over hidden as it is: a weight-0 token (padding, a -inf score) adds 0 * x, exactly
    0 unless x is inf or NaN; only rows whose result is not finite are summed again with those tokens
    zeroed first (a masked copy of every row would cost a second pass over hidden)."""
    B, T, d = hidden.shape
    H = scores.shape[2]
    p, m, total = _weights(scores, mask, accumulation_dtype(hidden.dtype))
    with _full_precision(hidden):
        parts = [
            torch.einsum("bth,bthk->bhk", p[r], _head_view(hidden[r], H, p.dtype))
            for r in _row_groups(hidden, p.dtype)
        ]
        out = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(B, d)
        redo = ~torch.isfinite(out).all(1)
        if bool(redo.any()):
            rows = redo.nonzero().squeeze(1)
            again = torch.einsum("bth,bthk->bhk", p[rows], _heads(hidden[rows], H, p[rows])).reshape(-1, d)
            out = out.index_put((rows,), again)
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
    p, _, _ = _weights(scores, mask, accumulation_dtype(hidden.dtype))
    g = grad_out.to(p.dtype).reshape(B, H, d // H)
    o = out.to(p.dtype).reshape(B, H, d // H)
    groups = _row_groups(hidden, p.dtype)
    if len(groups) == 1 or torch.is_grad_enabled():  # create_graph: one differentiable product
        grad_hidden = (p[..., None] * g[:, None]).reshape(B, T, d).to(hidden.dtype)
    else:  # each group's products rounded once into the 16-bit gradient: no (B, T, d) float32 temporary
        grad_hidden = torch.empty((B, T, d), dtype=hidden.dtype, device=hidden.device)
        for r in groups:
            grad_hidden[r] = (p[r][..., None] * g[r][:, None]).reshape(-1, T, d)
    # g . x of weight-0 tokens may be NaN (padding holding inf / NaN): the select below drops it, so
    # hidden is read as it is (no masked copy).
    # As (1, dh) x (dh, T) products per row and head: ATen's einsum picks (T, dh) x (dh, 1), a
    # matrix-vector batch that ran ~4x slower on the CPU (7 ms against 1.5 ms at 32x256x768).
    # A differentiated backward (create_graph=True) reads weight-0 tokens zeroed: its own backward
    # multiplies them by a zero gradient, and 0 * NaN (padding holding inf / NaN) would reach the
    # second-order gradients of every token through the softmax.
    masked = torch.is_grad_enabled()
    dots = []
    for r in groups:
        x = _heads(hidden[r], H, p[r]) if masked else _head_view(hidden[r], H, p.dtype)
        x_t = x.permute(0, 2, 3, 1)  # (rows, H, dh, T), a view
        with _full_precision(hidden):
            dots.append(torch.matmul(g[r].unsqueeze(2), x_t).squeeze(2).transpose(1, 2))  # (rows, T, H)
    g_dot_x = dots[0] if len(dots) == 1 else torch.cat(dots)
    grad_scores = p * (g_dot_x - (g * o).sum(-1)[:, None, :])
    grad_scores = torch.where(p > 0, grad_scores, 0.0)
    return grad_hidden, grad_scores.to(scores.dtype)


# --- Packed batches: hidden (N, d), scores (N, H), S sequences delimited by cu_seqlens (S + 1,) ---
def _segments(cu_seqlens: torch.Tensor, N: int) -> tuple[int, torch.Tensor]:
    """(S, the sequence of every token (N,) int64). No host sync: output_size is N."""
    S = cu_seqlens.shape[0] - 1
    lengths = cu_seqlens.diff().long()
    return S, torch.repeat_interleave(torch.arange(S, device=cu_seqlens.device), lengths, output_size=N)


def _packed_weights(
    scores: torch.Tensor, cu_seqlens: torch.Tensor, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p (N, H), max (S, H), sum (S, H), segment ids (N,)) in ``acc``."""
    N, H = scores.shape
    S, seg = _segments(cu_seqlens, N)
    s = scores.to(acc)
    index = seg.unsqueeze(1).expand(N, H)
    m = s.new_full((S, H), float("-inf")).scatter_reduce(0, index, s, "amax", include_self=True)
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    e = torch.where(s == float("-inf"), 0.0, torch.exp(s - m_safe[seg]))
    total = s.new_zeros((S, H)).index_add(0, seg, e)
    per_token = total[seg]
    p = torch.where(per_token > 0, e / torch.where(per_token > 0, per_token, 1.0), 0.0)
    return p, m, total, seg


def packed_attention_pool_forward(
    hidden: torch.Tensor, scores: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (S, d) in hidden's dtype, softmax max and sum (S, H) in the accumulation dtype."""
    N, d = hidden.shape
    H = scores.shape[1]
    p, m, total, seg = _packed_weights(scores, cu_seqlens, accumulation_dtype(hidden.dtype))
    out = p.new_zeros((m.shape[0], H, d // H))
    for t in _token_chunks(N, d):
        x = _heads(hidden[t].unsqueeze(0), H, p[t].unsqueeze(0))[0]  # (n, H, dh), 0 where p == 0
        out = out.index_add(0, seg[t], p[t].unsqueeze(-1) * x)  # in token order, chunk after chunk
    return out.reshape(-1, d).to(hidden.dtype), m, total


# Tokens of a packed batch per step of its eager attention: the float32 products of a step stay
# cache-sized instead of several (N, d) temporaries.
_TOKEN_CHUNK_BYTES = 4 * 2**20


def _token_chunks(N: int, d: int) -> list[slice]:
    step = max(1, _TOKEN_CHUNK_BYTES // max(1, 8 * d))
    return [slice(a, min(N, a + step)) for a in range(0, N, step)] or [slice(0, 0)]


def packed_attention_pool_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden (N, d) in hidden's dtype, grad_scores (N, H) in scores' dtype)."""
    N, d = hidden.shape
    H = scores.shape[1]
    p, _, _, seg = _packed_weights(scores, cu_seqlens, accumulation_dtype(hidden.dtype))
    per_sequence = grad_out.to(p.dtype).reshape(-1, H, d // H)  # (S, H, dh)
    g_dot_out = (per_sequence * out.to(p.dtype).reshape(-1, H, d // H)).sum(-1)  # (S, H)
    grad_hidden, grad_scores = [], []
    for t in _token_chunks(N, d):
        g = per_sequence[seg[t]]  # (n, H, dh)
        pt = p[t]
        grad_hidden.append((pt.unsqueeze(-1) * g).reshape(-1, d).to(hidden.dtype))
        g_dot_x = (_heads(hidden[t].unsqueeze(0), H, pt.unsqueeze(0))[0] * g).sum(-1)
        grad_scores.append(torch.where(pt > 0, pt * (g_dot_x - g_dot_out[seg[t]]), 0.0))
    return torch.cat(grad_hidden), torch.cat(grad_scores).to(scores.dtype)
