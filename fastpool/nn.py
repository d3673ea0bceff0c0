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
