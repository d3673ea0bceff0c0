"""``torch.nn`` modules over the pooling functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .functional import pool
from .modes import normalize_modes


class Pooling(torch.nn.Module):
    """Masked pooling of (B, T, d) hidden states to (B, n_modes * d) vectors.

    Parameters
    ----------
    mode : "mean", "max", "cls", "last" or a sequence of them (concatenated along d in that order,
        hidden read once).
    normalize : when True, L2-normalise each output row like ``torch.nn.functional.normalize``
        (``x / max(||x||, eps)``); an empty row stays zero.
    eps : the ``normalize`` floor.

    ``forward(hidden, mask=None)`` takes hidden (B, T, d) float16/bfloat16/float32/float64 and mask
    (B, T) of any real dtype (nonzero = real token) or None; semantics as ``fastpool.pool``.
    The module has no parameters.
    """

    def __init__(self, mode: str | Sequence[str] = "mean", normalize: bool = False, eps: float = 1e-12):
        super().__init__()
        self.modes = normalize_modes(mode)
        self.normalize = bool(normalize)
        self.eps = float(eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = pool(hidden, mask, mode=self.modes)
        if self.normalize:
            out = F.normalize(out, p=2.0, dim=-1, eps=self.eps)
        return out

    def extra_repr(self) -> str:
        return f"mode={list(self.modes)}, normalize={self.normalize}, eps={self.eps}"
