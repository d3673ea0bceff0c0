"""One tolerance table for every comparison against the oracle (relative to the oracle cast to the dtype)."""

import torch

# Mean-type results (sums and divisions) per dtype. Selections (max, cls, last) are exact.
REDUCTION = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
EXACT = dict(rtol=0.0, atol=0.0)


def for_mode(mode: str, dtype: torch.dtype) -> dict:
    """assert_close keyword arguments for one mode's output in ``dtype``."""
    return REDUCTION[dtype] if mode in ("mean", "mean_sqrt_len", "weighted_mean") else EXACT
