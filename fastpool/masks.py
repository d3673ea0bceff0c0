"""How a mask of any dtype is read: the one definition both backends share.

A mask element is "real" when any bit other than a float's sign bit is set: integers and bools
by value, floats with -0.0 as zero and NaN and denormals as nonzero (whatever the flush-denormal
setting). The kernels test exactly these bits on an integer view of the mask; the eager backend
uses the same view.
"""

from __future__ import annotations

import torch

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def integer_view(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(view, bits): the mask reinterpreted as signed integers of its width (no copy), and the bits
    that make an element nonzero (all of them, or all but the sign bit for float masks)."""
    width = mask.element_size()
    view = mask if mask.dtype == _INT_OF_WIDTH[width] else mask.view(_INT_OF_WIDTH[width])
    if mask.dtype.is_floating_point:
        return view, (1 << (8 * width - 1)) - 1
    return view, -1


def real_tokens(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool: the real tokens of ``mask`` (``None`` stays ``None``: every token is real)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask
    # Integers by a conversion to bool (nonzero is True): 2-4x faster than ``!= 0`` on the CPU.
    if mask.dtype.is_floating_point:
        view, bits = integer_view(mask)
        return (view & bits).bool()
    return mask.bool()
