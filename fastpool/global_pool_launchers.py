"""The "triton" backend of global pooling: layout analysis, block sizes, chunking, allocation, grids.

No copy of x: its spatial dims are merged where memory allows (contiguous NCHW and channels_last
become one strided spatial axis) and every stride goes to the kernels as it is.

Tile orientation: the kernels load (BLOCK_C, BLOCK_S) tiles and reduce along S. When S is the
unit-stride axis (contiguous NCHW) BLOCK_S is the wide side (a 512-byte row of one channel, or
the whole spatial extent when shorter, several channels per tile); when C is (channels_last),
BLOCK_C is the wide side and a tile holds a few spatial positions of 512 bytes of channels.
Either way a warp reads contiguous bytes and every element of x is read once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .eager import accumulation_dtype
from .eager_global_pool import grad_strides

# Bytes of x one program loads per loop iteration; the max path keeps a value and a position per
# lane next to the sum, so it takes half the tile (as the pooling kernels).
TILE_BYTES = 8192
TILE_BYTES_WITH_MAX = 4096
# The unit-stride side of a tile: one warp-wide row of 16-byte vectors.
ROW_BYTES = 512
# Bytes of x one program reads in all (its chunk of the spatial extent). Longer extents are split
# into chunks of this size, folded in order by the combine kernel: enough programs for a small
# batch of large maps, at 12 bytes of partials per channel and chunk (< 0.1% of the chunk).
CHUNK_BYTES = 65536
NUM_WARPS = 4
COMBINE_BLOCK_C = 128
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1
# Test hook: {"block_c": .., "block_s": .., "chunk_len": ..} forces sizes (small ones under the interpreter).
OVERRIDE: dict[str, int] = {}


@dataclass(frozen=True)
class GlobalConfig:
    """Block sizes and chunking of one launch. Depends on C, S, the dtype and the layout only."""

    block_c: int
    block_s: int
    chunk_len: int
    n_chunks: int
    s_fast: bool  # S is the unit-stride (or smaller-stride) axis: NCHW orientation


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def merge_spatial(sizes: Sequence[int], strides: Sequence[int]) -> tuple[list[int], list[int]]:
    """The spatial dims as (sizes, strides) with size-1 dims dropped and neighbours merged where
    one stride steps over the other (``stride[i] == size[i+1] * stride[i+1]``). Logical order is
    kept, so a merged index is still the row-major spatial index. At least one dim, at most three."""
    merged: list[list[int]] = []
    for n, st in zip(sizes, strides, strict=True):
        if n == 1:
            continue
        if merged and merged[-1][1] == n * st:
            merged[-1] = [merged[-1][0] * n, st]
        else:
            merged.append([n, st])
    if not merged:
        merged = [[1, 0]]
    return [m[0] for m in merged], [m[1] for m in merged]


def s_is_fast(C: int, S: int, stride_c: int, inner_stride: int) -> bool:
    """Whether S (its innermost merged dim) is the faster axis in memory than C."""
    if S == 1:
        return False
    if C == 1:
        return True
    return abs(inner_stride) <= abs(stride_c)


def config(C: int, S: int, element_size: int, s_fast: bool, with_max: bool) -> GlobalConfig:
    """Block sizes and chunks for ``C`` channels of ``S`` spatial positions (see the module doc)."""
    tile = (TILE_BYTES_WITH_MAX if with_max else TILE_BYTES) // element_size
    row = ROW_BYTES // element_size
    if s_fast:
        block_s = min(_pow2(S), row)
        block_c = min(_pow2(C), max(1, tile // block_s))
    else:
        block_c = min(_pow2(C), row)
        block_s = min(_pow2(S), max(1, tile // block_c))
    block_c = OVERRIDE.get("block_c", block_c)
    block_s = OVERRIDE.get("block_s", block_s)
    chunk_len = OVERRIDE.get("chunk_len", CHUNK_BYTES // (block_c * element_size))
    chunk_len = max(block_s, chunk_len // block_s * block_s)
    if cdiv(S, chunk_len) > MAX_GRID_Y:
        chunk_len = cdiv(cdiv(S, MAX_GRID_Y), block_s) * block_s
    return GlobalConfig(block_c, block_s, chunk_len, cdiv(max(S, 1), chunk_len), s_fast)


def _acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _layout(shape: Sequence[int], strides: Sequence[int]) -> tuple[int, int, list[int], list[int]]:
    """(C, S, merged spatial sizes, their strides) of a (B, C, *spatial) tensor."""
    C = shape[1]
    sizes, sstrides = merge_spatial(shape[2:], strides[2:])
    return C, math.prod(shape[2:]), sizes, sstrides


def _grid_rows(B: int, n_cblocks: int) -> int:
    rows = B * n_cblocks
    if rows > MAX_GRID_X:
        raise ValueError(f"x: at most {MAX_GRID_X} (sample, channel block) pairs, got B={B} x {n_cblocks}")
    return rows


def global_pool_forward(x: torch.Tensor, modes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean and/or max of x (B, C, *spatial), float16/bfloat16/float32/float64, any strides.

    Returns out (B, len(modes) * C) in x's dtype (blocks in ``modes`` order) and argmax (B, C)
    int32 (the logical spatial index of the first maximum; (B, 0) without "max"). Sums in float32
    (float64 for float64); S = 0 gives NaN (mean, as torch) and index -1.

    Memory traffic: reads B*C*S elements of x once; writes B*len(modes)*C outputs and 4*B*C bytes
    of argmax (with max). Split extents add 4 (mean) + 8 (max) bytes per channel and chunk, written
    and read once.
    """
    from .kernels.global_pool import global_pool_combine_kernel, global_pool_forward_kernel

    B = x.shape[0]
    do_mean, do_max = "mean" in modes, "max" in modes
    C, S, sizes, sstrides = _layout(x.shape, x.stride())
    out = x.new_empty((B, len(modes) * C))
    argmax = torch.empty((B, C if do_max else 0), dtype=torch.int32, device=x.device)
    if out.numel() == 0:
        return out, argmax
    if S == 0:
        out.fill_(math.nan)
        return out, argmax.fill_(-1)
    cfg = config(C, S, x.element_size(), s_is_fast(C, S, x.stride(1), sstrides[-1]), do_max)
    n_cblocks = cdiv(C, cfg.block_c)
    ndim = len(sizes)
    sizes3, strides3 = sizes + [1] * (3 - ndim), sstrides + [0] * (3 - ndim)
    acc = accumulation_dtype(x.dtype)
    col_mean = modes.index("mean") * C if do_mean else 0
    col_max = modes.index("max") * C if do_max else 0
    split = cfg.n_chunks > 1

    def part(needed: bool, dtype: torch.dtype) -> torch.Tensor:
        shape = (B, cfg.n_chunks, C) if split and needed else (1,)
        return torch.empty(shape, dtype=dtype, device=x.device)

    part_sum, part_max, part_pos = part(do_mean, acc), part(do_max, acc), part(do_max, torch.int32)
    argmax_arg = argmax if do_max else part_pos
    with on_device(x.device):
        global_pool_forward_kernel[(_grid_rows(B, n_cblocks), cfg.n_chunks)](
            x, out, argmax_arg, part_sum, part_max, part_pos,
            C, S, sizes3[1], sizes3[2], cfg.chunk_len, cfg.n_chunks, n_cblocks,
            x.stride(0), x.stride(1), *strides3,
            out.stride(0), argmax_arg.stride(0), col_mean, col_max,
            DO_MEAN=do_mean, DO_MAX=do_max, NDIM=ndim, ACC_DTYPE=_acc(x.dtype),
            BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, num_warps=NUM_WARPS,
        )  # fmt: skip
        if split:
            combine_blocks = cdiv(C, COMBINE_BLOCK_C)
            global_pool_combine_kernel[(_grid_rows(B, combine_blocks),)](
                out, argmax_arg, part_sum, part_max, part_pos, C, S, cfg.n_chunks, combine_blocks,
                out.stride(0), argmax_arg.stride(0), col_mean, col_max,
                DO_MEAN=do_mean, DO_MAX=do_max, ACC_DTYPE=_acc(x.dtype), BLOCK_C=COMBINE_BLOCK_C,
                num_warps=NUM_WARPS,
            )  # fmt: skip
    return out, argmax


def global_pool_backward(
    grad_out: torch.Tensor,
    argmax: torch.Tensor,
    shape: Sequence[int],
    strides: Sequence[int],
    dtype: torch.dtype,
    modes: Sequence[str],
) -> torch.Tensor:
    """Gradient of x from grad_out (B, len(modes) * C), any strides.

    ``shape`` and ``strides`` are x's; the gradient is dense in x's memory order
    (``eager_global_pool.grad_strides``), in ``dtype``: grad_mean / S everywhere plus grad_max at
    the saved argmax (B, C) int32, summed in float32 (float64) and rounded once. x is not read.

    Memory traffic: writes B*C*S elements once (no memset); reads grad_out (B*len(modes)*C
    elements) and argmax (4*B*C bytes, with max).
    """
    from .kernels.global_pool import global_pool_backward_kernel

    grad = torch.empty_strided(
        tuple(shape), grad_strides(shape, strides), dtype=dtype, device=grad_out.device
    )
    if grad.numel() == 0:
        return grad
    B = shape[0]
    do_mean, do_max = "mean" in modes, "max" in modes
    C, S, sizes, sstrides = _layout(grad.shape, grad.stride())
    cfg = config(C, S, grad.element_size(), s_is_fast(C, S, grad.stride(1), sstrides[-1]), False)
    n_cblocks = cdiv(C, cfg.block_c)
    ndim = len(sizes)
    sizes3, strides3 = sizes + [1] * (3 - ndim), sstrides + [0] * (3 - ndim)
    col_mean = modes.index("mean") * C if do_mean else 0
    col_max = modes.index("max") * C if do_max else 0
    argmax_arg = argmax if do_max else torch.empty(1, dtype=torch.int32, device=grad.device)
    with on_device(grad.device):
        global_pool_backward_kernel[(_grid_rows(B, n_cblocks), cfg.n_chunks)](
            grad_out, argmax_arg, grad, C, S, sizes3[1], sizes3[2], cfg.chunk_len, n_cblocks,
            grad_out.stride(0), grad_out.stride(1), argmax_arg.stride(0),
            grad.stride(0), grad.stride(1), *strides3, col_mean, col_max,
            DO_MEAN=do_mean, DO_MAX=do_max, NDIM=ndim, ACC_DTYPE=_acc(dtype),
            BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, num_warps=NUM_WARPS,
        )  # fmt: skip
    return grad


def on_device(device: torch.device):
    """Make ``device`` current for the launch (Triton launches on the current device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
