"""Minimal DRAM traffic of each (op, pass): the byte count behind every GB/s the suite reports.

The counts follow the "Memory traffic:" lines of fastpool.launchers, minus implementation extras
(argmax and per-row stats, T-split partials), so that they are the least any implementation must
move and the same number divides every provider's time:

* forward, mean / max / mean+max: the real tokens of hidden (holes excluded), the mask once, and the
  (B, n_modes * d) output;
* forward, cls / last: one token per non-empty row, the mask once, the (B, d) output;
* backward: the whole (B, T, d) gradient written once (padding gets explicit zeros), grad_out and
  the mask read;
* fwd+bwd: the sum of both.

Packed ops (hidden (N, d) of S sequences, offsets cu_seqlens (S + 1,)) follow the same rules:

* forward: all N * d elements of hidden (every token is real), cu_seqlens once, the (S, d) output;
* backward: the (N, d) gradient written once, grad_out (S, d) and cu_seqlens read;
* fwd+bwd: the sum of both.

Neither kind counts max's argmax (4 bytes per output element, written by fastpool's forward for
its backward): like the T-split partials it is an implementation extra, which the baselines do not
write, and leaving it out keeps packed and padded max rows comparable.
"""

from __future__ import annotations

import torch
from shapes import OPS, PACKED_OPS

# Which measured roofline each pass is compared with: the forward (and fwd+bwd) mostly read, and
# a copy is the fastest way to read while writing something; backward is a pure write.
ROOFLINE_OF_PASS = {"fwd": "copy", "fwd+bwd": "copy", "bwd": "fill"}


def forward_bytes(op: str, B: int, T: int, d: int, dtype: torch.dtype, mask: torch.Tensor | None) -> int:
    """Least bytes a forward must move: hidden it has to read, the mask, and the output."""
    es = torch.empty((), dtype=dtype).element_size()
    n_modes = len(OPS[op])
    if mask is None:
        real_tokens, nonempty_rows, mask_bytes = B * T, B if T else 0, 0
    else:
        real = mask != 0
        real_tokens = int(real.sum())
        nonempty_rows = int(real.any(1).sum()) if T else 0
        mask_bytes = mask.numel() * mask.element_size()
    read_tokens = nonempty_rows if op in ("cls", "last") else real_tokens
    return read_tokens * d * es + mask_bytes + B * n_modes * d * es


def backward_bytes(op: str, B: int, T: int, d: int, dtype: torch.dtype, mask: torch.Tensor | None) -> int:
    """Least bytes a backward must move: write grad (B, T, d), read grad_out and the mask."""
    es = torch.empty((), dtype=dtype).element_size()
    mask_bytes = 0 if mask is None else mask.numel() * mask.element_size()
    return B * T * d * es + B * len(OPS[op]) * d * es + mask_bytes


def minimal_bytes(
    op: str, pass_: str, B: int, T: int, d: int, dtype: torch.dtype, mask: torch.Tensor | None
) -> int:
    """Documented minimal byte count of ``op`` for ``pass_`` ("fwd", "bwd" or "fwd+bwd")."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {tuple(OPS)}, got {op!r}")
    total = 0
    if pass_ in ("fwd", "fwd+bwd"):
        total += forward_bytes(op, B, T, d, dtype, mask)
    if pass_ in ("bwd", "fwd+bwd"):
        total += backward_bytes(op, B, T, d, dtype, mask)
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass: expected fwd, bwd or fwd+bwd, got {pass_!r}")
    return total


def packed_minimal_bytes(
    op: str, pass_: str, N: int, S: int, d: int, dtype: torch.dtype, offsets_bytes: int
) -> int:
    """Documented minimal byte count of the packed ``op`` for ``pass_`` (see the module docstring);
    ``offsets_bytes`` is the size of cu_seqlens ((S + 1) * 4 for int32)."""
    if op not in PACKED_OPS:
        raise ValueError(f"op: expected one of {tuple(PACKED_OPS)}, got {op!r}")
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass: expected fwd, bwd or fwd+bwd, got {pass_!r}")
    es = torch.empty((), dtype=dtype).element_size()
    out = S * len(PACKED_OPS[op]) * d * es
    total = 0
    if pass_ in ("fwd", "fwd+bwd"):
        total += N * d * es + offsets_bytes + out
    if pass_ in ("bwd", "fwd+bwd"):
        total += N * d * es + out + offsets_bytes
    return total


def gbps(n_bytes: int, ms: float) -> float:
    """GB/s (10**9 bytes per second) of moving ``n_bytes`` in ``ms`` milliseconds."""
    return n_bytes / (ms * 1e-3) / 1e9


# --- Attention pooling and global pooling (bench/attention_global.py) -----------------------------
def attention_minimal_bytes(
    pass_: str, B: int, T: int, d: int, dtype: torch.dtype, mask: torch.Tensor | None
) -> int:
    """Least bytes of attention pooling with one score per token (scores in hidden's dtype).

    Forward: the real tokens of hidden and their scores, the mask, the (B, d) output. Backward: the
    gradient needs every real token again (dscore_t = p_t (g . x_t - g . out)): the real tokens and
    scores, the mask, grad_out and the output read; the (B, T, d) and (B, T) gradients written.
    fastpool's per-row softmax statistics (2 floats a row) are not counted.
    """
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass: expected fwd, bwd or fwd+bwd, got {pass_!r}")
    es = torch.empty((), dtype=dtype).element_size()
    real = B * T if mask is None else int((mask != 0).sum())
    mask_bytes = 0 if mask is None else mask.numel() * mask.element_size()
    reads = real * (d + 1) * es + mask_bytes
    total = 0
    if pass_ in ("fwd", "fwd+bwd"):
        total += reads + B * d * es
    if pass_ in ("bwd", "fwd+bwd"):
        total += reads + 2 * B * d * es + B * T * (d + 1) * es
    return total


def global_minimal_bytes(pass_: str, B: int, C: int, S: int, dtype: torch.dtype) -> int:
    """Least bytes of global pooling of (B, C, S spatial positions): forward reads x once and writes
    (B, C); backward writes the gradient once and reads grad_out. The max's position is not counted."""
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass: expected fwd, bwd or fwd+bwd, got {pass_!r}")
    es = torch.empty((), dtype=dtype).element_size()
    one = (B * C * S + B * C) * es
    return one * (2 if pass_ == "fwd+bwd" else 1)
