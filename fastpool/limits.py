"""Accepted dtypes and size limits of the public API (shared by the padded and packed paths)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Mask dtypes whose zero is exactly the all-zero bit pattern up to the sign bit (what the kernels
# test). Float8 formats are excluded: in the "fnuz" ones the sign-bit pattern is NaN.
MASK_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, *FLOAT_DTYPES,
)  # fmt: skip
# The kernels index per-row statistics with 32-bit arithmetic.
MAX_BATCH = 2**30
# Positions are int32 inside the kernels, with room for one block past the end.
MAX_SEQUENCE_LENGTH = 2**31 - 2**20
