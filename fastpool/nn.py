"""``torch.nn`` modules over the pooling functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .functional import pool
from .modes import normalize_modes


class Pooling(torch.nn.Module):
    """Masked pooling of (B, T, d) hidden states to (B, n_modes * d) vectors.

    Parameters
    ----------
    mode : "mean", "max", "cls", "last" or a sequence of them (concatenated along d in that order,
        hidden read once).
    normalize : when True, L2-normalise each output row like ``torch.nn.functional.normalize``
        (``x / max(||x||, eps)``); an empty row stays zero. Fused into the kernel's epilogue where
        a row fits one program (see ``fastpool.pool``).
    eps : the ``normalize`` floor.

    ``forward(hidden, mask=None, **packed)`` takes hidden (B, T, d) float16/bfloat16/float32/float64
    and mask (B, T) of any real dtype (nonzero = real token) or None; semantics as ``fastpool.pool``.
    ``packed`` may hold ``cu_seqlens``, ``max_seqlen`` and ``weights`` (see ``fastpool.pool``).
    The module has no parameters.
    """

    def __init__(self, mode: str | Sequence[str] = "mean", normalize: bool = False, eps: float = 1e-12):
        super().__init__()
        self.modes = normalize_modes(mode)
        self.normalize = bool(normalize)
        self.eps = float(eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, **packed) -> torch.Tensor:
        return pool(hidden, mask, mode=self.modes, normalize=self.normalize, eps=self.eps, **packed)

    def extra_repr(self) -> str:
        return f"mode={list(self.modes)}, normalize={self.normalize}, eps={self.eps}"


class AttentionPooling(torch.nn.Module):
    """Learned attention pooling: ``nn.Linear(d, heads)`` scores each token, ``fastpool.attention_pool``
    weighs the real tokens with a softmax of those scores.

    Parameters
    ----------
    d : feature size of hidden; must be divisible by ``heads``.
    heads : number of heads, each pooling its own d/heads consecutive features.

    ``forward(hidden, mask=None)``: hidden (B, T, d), mask (B, T) (nonzero = real) or None -> (B, d).
    """

    def __init__(self, d: int, heads: int = 1, device=None, dtype=None):
        super().__init__()
        if heads < 1 or d % heads != 0:
            raise ValueError(f"heads: expected a positive divisor of d = {d}, got {heads}")
        self.d, self.heads = int(d), int(heads)
        self.scorer = torch.nn.Linear(d, heads, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        from .attention import attention_pool

        return attention_pool(hidden, self.scorer(hidden), mask)

    def extra_repr(self) -> str:
        return f"d={self.d}, heads={self.heads}"


class GlobalPooling(torch.nn.Module):
    """Global average and/or max pooling of feature maps: ``fastpool.global_pool(x, mode)``.

    ``forward(x)``: x (B, C, *spatial) with 1 to 3 spatial dims, any memory format -> (B, C), or
    (B, len(mode) * C) for a sequence of modes ("mean", "max"). The module has no parameters.
    """

    def __init__(self, mode: str | Sequence[str] = "mean"):
        super().__init__()
        from .global_pool import _validate_modes

        self.modes = _validate_modes(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .global_pool import global_pool

        return global_pool(x, self.modes)

    def extra_repr(self) -> str:
        return f"mode={list(self.modes)}"
