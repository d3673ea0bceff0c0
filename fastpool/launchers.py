"""The "triton" backend: launchers that normalise strides, allocate, pick block sizes and build grids.

Kernels live in ``fastpool.kernels``; this module imports them lazily so ``import fastpool`` works
without triton. Nothing here copies hidden: every stride is passed to the kernels as it is, and the
mask is reinterpreted (``Tensor.view(dtype)``, no copy) as an integer of its own width.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from . import eager
from .masks import integer_view, real_tokens
from .modes import MODES, mode_columns

# A T-split program must stream at least this many tokens: its partial results cost
# 12 bytes per feature (float32 sum, max, int32 position) written and read once, against
# 2 * MIN_TOKENS_PER_SPLIT bytes per feature of bf16 input it reads, i.e. under 2.5% extra traffic.
MIN_TOKENS_PER_SPLIT = 256
# Programs wanted per multiprocessor to keep enough loads in flight on a memory-bound loop.
PROGRAMS_PER_SM = 4
# Bytes of hidden one program loads per loop iteration (BLOCK_T * BLOCK_D * element size). The max
# path keeps a value and an int32 position per lane, so it takes half the tile to stay near 90
# registers a thread (cuobjdump -res-usage, sm_90, bf16): 5+ programs per multiprocessor.
TILE_BYTES = 8192
TILE_BYTES_WITH_MAX = 4096
# Feature block in bytes: one warp-wide row of 16-byte vectors (32 lanes x 16 B). Fixed per dtype
# so that the set of kernel specializations stays small enough to compile ahead of time in CI.
ROW_BYTES = 512
SCAN_BLOCK = 1024
NUM_WARPS = 4
# L2 normalisation is fused into the forward epilogue when one program can hold a whole output row:
# the feature block widens to cover d up to this many bytes (2048 features in 16-bit dtypes, 1024
# in float32), with BLOCK_T shrunk to keep the tile size and warps scaled with the block. Wider
# rows, and float64, are pooled first and normalised by torch (one more small pass over the
# (B, n * d) output).
MAX_NORMALIZED_ROW_BYTES = 4096
# When no GPU is there to ask (the interpreter), size grids as for an H100.
DEFAULT_SM_COUNT = 132


def kernel_columns(cols: dict[str, int]) -> tuple[int, ...]:
    """The kernels' col_* arguments (col_mean, col_max, col_first, col_last, col_sqrt, col_weighted)."""
    return tuple(cols[name] for name in MODES)


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and grid split of one forward or backward launch."""

    block_t: int
    block_d: int
    scan_block: int = SCAN_BLOCK
    num_warps: int = NUM_WARPS
    n_splits: int = 1
    tokens_per_split: int = 0


_overrides: dict[str, int] = {}


@contextlib.contextmanager
def config_override(**fields: int) -> Iterator[None]:
    """Force LaunchConfig fields (block_t, block_d, scan_block, num_warps, n_splits) in the enclosed launches.

    For tests: lets small interpreter shapes cross several blocks and T-splits.
    """
    saved = dict(_overrides)
    _overrides.update(fields)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def feature_block(element_size: int) -> int:
    """BLOCK_D: features in one 512-byte row (256 for 2-byte dtypes, 128 for 4, 64 for 8)."""
    return ROW_BYTES // element_size


def token_block(element_size: int, second_accumulator: bool = False) -> int:
    """BLOCK_T: 16 tokens (8 KB tiles), 8 when the forward keeps a second accumulator tile (max, weighted).

    The backward tile is the plain one: ``token_block(element_size)``.
    """
    tile = TILE_BYTES_WITH_MAX if second_accumulator else TILE_BYTES
    return tile // (feature_block(element_size) * element_size)


def normalized_block_d(d: int, element_size: int) -> int | None:
    """BLOCK_D that puts a whole row of d features in one program (for the fused normalisation),
    or None when that row would exceed MAX_NORMALIZED_ROW_BYTES or the dtype is float64 (whose
    square root and division would need a stack frame in the epilogue)."""
    if element_size >= 8:
        return None
    block = max(feature_block(element_size), 1 << max(0, d - 1).bit_length())
    return block if block * element_size <= MAX_NORMALIZED_ROW_BYTES else None


def forward_warps(block_d: int, element_size: int) -> int:
    """Warps of a forward program: NUM_WARPS for the standard feature block, scaled with a widened
    one (up to 16) so each thread keeps the same number of features in registers."""
    return NUM_WARPS * max(1, min(4, block_d // feature_block(element_size)))


def forward_config(
    B: int, T: int, d: int, element_size: int, needs_loop: bool, second_accumulator: bool, sm_count: int,
    min_block_d: int = 0,
) -> LaunchConfig:  # fmt: skip
    """Block sizes and T-split for the forward kernel (see ``_forward_config``); cached per shape.

    ``min_block_d``: a lower bound on BLOCK_D (a whole row, for the fused normalisation).
    """
    key = (B, T, d, element_size, needs_loop, second_accumulator, sm_count, min_block_d)
    if _overrides:
        return _forward_config(*key, tuple(_overrides.items()))
    return _cached_forward_config(*key)


@functools.lru_cache(maxsize=4096)
def _cached_forward_config(*key) -> LaunchConfig:
    return _forward_config(*key, ())


def _forward_config(
    B: int, T: int, d: int, element_size: int, needs_loop: bool, second_accumulator: bool, sm_count: int,
    min_block_d: int, overrides: tuple,
) -> LaunchConfig:  # fmt: skip
    """Pick block sizes and the T-split for the forward kernel.

    The op is memory-bound: the goal is every real token read once with enough programs in flight.
    A (row, feature block) grid gives B * cdiv(d, BLOCK_D) programs; below PROGRAMS_PER_SM per
    multiprocessor the loop over T is split so a small batch with long sequences still fills the
    GPU, never into ranges shorter than MIN_TOKENS_PER_SPLIT.
    """
    block_d = max(feature_block(element_size), min_block_d)
    block_t = token_block(element_size, second_accumulator)
    block_t = max(1, block_t * feature_block(element_size) // block_d)  # the same tile size in bytes
    n_splits = 1
    programs = B * triton_cdiv(d, block_d)
    target = PROGRAMS_PER_SM * sm_count
    if needs_loop and 0 < programs < target:
        n_splits = max(1, min(triton_cdiv(target, programs), T // MIN_TOKENS_PER_SPLIT))
    config = LaunchConfig(
        block_t=block_t, block_d=block_d, n_splits=n_splits, num_warps=forward_warps(block_d, element_size)
    )
    fields = LaunchConfig.__dataclass_fields__
    config = replace(config, **{k: v for k, v in overrides if k in fields})
    config = replace(config, block_d=max(config.block_d, min_block_d))
    per_split = triton_cdiv(max(T, 1), config.n_splits)
    per_split = triton_cdiv(per_split, config.block_t) * config.block_t
    return replace(config, n_splits=triton_cdiv(max(T, 1), per_split), tokens_per_split=per_split)


def backward_config(T: int, d: int, element_size: int) -> LaunchConfig:
    """Block sizes for the backward kernel: one (BLOCK_T, BLOCK_D) output tile per program."""
    config = LaunchConfig(block_t=token_block(element_size), block_d=feature_block(element_size))
    return replace(
        config, **{k: v for k, v in _overrides.items() if k in ("block_t", "block_d", "num_warps")}
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (DEFAULT_SM_COUNT for non-CUDA devices)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _acc_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


_placeholders: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached one-element tensor for pointer arguments a specialization never touches.

    Saves an allocation per unused workspace on every launch (host time matters at serving shapes).
    """
    key = (device, dtype)
    tensor = _placeholders.get(key)
    if tensor is None:
        tensor = torch.empty(1, dtype=dtype, device=device)
        if type(tensor) is torch.Tensor:  # never cache a fake or functional tensor
            _placeholders[key] = tensor
    return tensor


# CUDA grid dimensions 1 and 2 hold at most this many blocks.
MAX_GRID_YZ = 65535


def _on_device(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the current device and stream."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_feature_blocks(d: int, block_d: int) -> int:
    blocks = triton_cdiv(d, block_d)
    if blocks > MAX_GRID_YZ:
        raise ValueError(f"hidden: d must be at most {MAX_GRID_YZ * block_d} for this dtype, got {d}")
    return blocks


def _user_weights(
    weights: torch.Tensor | None, mask: torch.Tensor | None, acc: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(weights, their (B,) sums over real tokens, stride_wb, stride_wt), or placeholders without weights."""
    if weights is None:
        return _placeholder(device, acc), _placeholder(device, acc), 0, 0
    # The same row sums as the eager backend (one small (B, T) reduction), so both divide alike.
    _, sums = eager.user_weights(weights, real_tokens(mask), acc)
    return weights, sums, *weights.stride()


@dataclass
class ForwardSetup:
    """What a forward launch (padded or packed) decides before choosing its grid: the mode flags,
    the outputs, and whether the normalisation is fused (one program per row) or left to torch."""

    col_args: tuple[int, ...]
    do_mean: bool
    do_max: bool
    do_weighted: bool
    has_weights: bool
    acc: torch.dtype
    out: torch.Tensor
    argmax: torch.Tensor
    stats: torch.Tensor
    norms: torch.Tensor
    whole_row: int | None  # BLOCK_D holding a whole row when the normalisation is fused
    fused_eps: float  # the kernels' normalize_eps: -1 unless fused

    @property
    def second_accumulator(self) -> bool:
        return self.do_max or self.do_weighted


def forward_setup(
    hidden: torch.Tensor, rows: int, d: int, modes: Sequence[str], has_weights: bool, normalize_eps: float
) -> ForwardSetup:
    """Mode flags and outputs of a forward over ``rows`` rows of d features."""
    device = hidden.device
    cols = mode_columns(modes, d)
    do_weighted = cols["weighted_mean"] >= 0
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    normalize = normalize_eps >= 0
    whole_row = normalized_block_d(d, hidden.element_size()) if normalize and d > 0 else None
    return ForwardSetup(
        col_args=kernel_columns(cols),
        # The rank-weighted path keeps the plain sum too: the T-split fold shifts ranks with it.
        do_mean=cols["mean"] >= 0 or cols["mean_sqrt_len"] >= 0 or (do_weighted and not has_weights),
        do_max=cols["max"] >= 0,
        do_weighted=do_weighted,
        has_weights=has_weights,
        acc=acc,
        out=torch.empty((rows, len(modes) * d), dtype=hidden.dtype, device=device),
        argmax=torch.empty((rows, d if cols["max"] >= 0 else 0), dtype=torch.int32, device=device),
        stats=torch.empty((3, rows), dtype=torch.int32, device=device),
        norms=torch.zeros((rows if normalize else 0,), dtype=acc, device=device),
        whole_row=whole_row,
        fused_eps=normalize_eps if whole_row is not None else -1.0,
    )


def partial_buffers(setup: ForwardSetup, parts: tuple[int, ...], device: torch.device) -> tuple:
    """(part_sum, part_max, part_pos, part_stats, part_wsum) for ``parts`` = (..., d) partials;
    placeholders where a mode does not need them, all placeholders for ``parts=()`` (no split)."""
    acc = setup.acc
    if not parts:
        return (
            *([_placeholder(device, acc)] * 2),
            *([_placeholder(device, torch.int32)] * 2),
            _placeholder(device, acc),
        )

    def buffer(needed: bool, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(parts, dtype=dtype, device=device) if needed else _placeholder(device, dtype)

    part_stats = torch.empty((*parts[:-1], 3), dtype=torch.int32, device=device)
    return (
        buffer(setup.do_mean, acc), buffer(setup.do_max, acc), buffer(setup.do_max, torch.int32), part_stats,
        buffer(setup.do_weighted, acc),
    )  # fmt: skip


def finish(setup: ForwardSetup, dtype: torch.dtype, normalize_eps: float) -> tuple:
    """The forward's outputs, normalised by torch when the kernels did not (rows wider than a program)."""
    out, norms = setup.out, setup.norms
    if normalize_eps >= 0 and setup.whole_row is None and out.numel():
        out, norms = eager.finish_rows([out], dtype, normalize_eps)
    return out, setup.argmax, setup.stats, norms


def pool_forward(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
    normalize_eps: float = -1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused masked pooling forward on the Triton kernels.

    hidden (B, T, d) fp16/bf16/fp32/fp64, any strides; mask (B, T) any dtype, any strides, or None;
    weights (B, T) float, any strides, or None (weighted_mean's user weights); normalize_eps >= 0:
    L2-normalise each output row (fused in the epilogue when ``normalized_block_d`` allows).
    Returns out (B, len(modes) * d) hidden dtype, argmax (B, d) int32 when "max" is among ``modes``
    (else (B, 0)), stats (3, B) int32 (count, first, last; -1 when a row is empty), norms (B,) acc
    dtype (the rows' norms before normalisation; (0,) without).

    Memory traffic: reads the real-token span of every row of hidden once, i.e.
    ``sum_b (real tokens of row b, holes excluded) * d * element_size`` bytes, plus the mask
    (``B * T * mask element size`` per feature block, L2-resident), plus 2 * d elements per row for
    cls/last gathers; writes ``B * len(modes) * d * element_size`` bytes, ``4 * B * d`` for argmax and
    ``12 * B`` for stats. T-split launches add ``12 * B * n_splits * d`` bytes written and read.
    User weights add their real-token elements (read once per feature block, L2-resident).
    """
    from .kernels.pool_forward import pool_combine_kernel, pool_forward_kernel

    B, T, d = hidden.shape
    device = hidden.device
    setup = forward_setup(hidden, B, d, modes, weights is not None, normalize_eps)
    if B == 0:
        return finish(setup, hidden.dtype, normalize_eps)
    if d == 0:
        # Nothing to pool, but backward still needs the per-row sizes.
        setup.stats = eager.row_stats(real_tokens(mask), B, T, device)
        return finish(setup, hidden.dtype, normalize_eps)
    out, argmax, stats, acc = setup.out, setup.argmax, setup.stats, setup.acc
    # The weighted sum adds a second accumulator tile: it takes the smaller tile, like the max.
    needs_loop = setup.do_mean or setup.second_accumulator
    config = forward_config(
        B,
        T,
        d,
        hidden.element_size(),
        needs_loop,
        setup.second_accumulator,
        sm_count(device),
        setup.whole_row or 0,
    )
    if mask is None:
        mask_view, mask_bits, stride_mb, stride_mt = stats, -1, 0, 0
    else:
        mask_view, mask_bits = integer_view(mask)
        stride_mb, stride_mt = mask_view.stride()
    weights_arg, wsum, stride_wb, stride_wt = _user_weights(weights, mask, acc, device)
    norm_arg = setup.norms if setup.whole_row is not None else _placeholder(device, acc)
    split = config.n_splits > 1
    partials = partial_buffers(setup, (B, config.n_splits, d) if split else (), device)
    argmax_arg = argmax if setup.do_max else stats
    flags = dict(
        DO_MEAN=setup.do_mean, DO_MAX=setup.do_max, DO_WEIGHTED=setup.do_weighted,
        HAS_WEIGHTS=setup.has_weights, PACKED=False, ACC_DTYPE=_acc_dtype(hidden.dtype),
        BLOCK_D=config.block_d, num_warps=config.num_warps,
    )  # fmt: skip
    n_dblocks = _check_feature_blocks(d, config.block_d)
    grid = (B, n_dblocks, config.n_splits)
    with _on_device(device):
        pool_forward_kernel[grid](
            hidden, mask_view, out, argmax_arg, stats, *partials, weights_arg, wsum,
            stats, stats, stats,  # packed-only work list: unused
            norm_arg,
            B, T, d, config.tokens_per_split, config.n_splits, 0,
            *hidden.stride(), stride_mb, stride_mt, stride_wb, stride_wt, out.stride(0),
            *setup.col_args, setup.fused_eps, mask_bits,
            HAS_MASK=mask is not None, BLOCK_T=config.block_t, SCAN_BLOCK=config.scan_block, **flags,
        )  # fmt: skip
        if split:
            pool_combine_kernel[(B, n_dblocks)](
                hidden, out, argmax_arg, stats, *partials, wsum, stats, norm_arg,
                B, d, config.n_splits, *hidden.stride(), out.stride(0), *setup.col_args, setup.fused_eps,
                **flags,
            )  # fmt: skip
    return finish(setup, hidden.dtype, normalize_eps)


def pool_backward(
    grad_out: torch.Tensor,
    mask: torch.Tensor | None,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of hidden (B, T, d) in ``dtype`` from grad_out (B, len(modes) * d), any strides.

    Uses what forward saved: argmax (B, d) int32 and stats (3, B) int32, plus the mask itself.
    Memory traffic: writes ``B * T * d * element_size`` bytes (each element exactly once, no memset);
    reads grad_out (``B * len(modes) * d`` elements), argmax (``4 * B * d`` bytes) and the mask.
    """
    from .kernels.pool_backward import pool_backward_kernel

    B = stats.shape[1]
    d = grad_out.shape[1] // len(modes)
    grad = torch.empty((B, T, d), dtype=dtype, device=grad_out.device)
    if grad.numel() == 0:
        return grad
    cols = mode_columns(modes, d)
    col_args = kernel_columns(cols)
    config = backward_config(T, d, grad.element_size())
    if mask is None:
        mask_view, mask_bits, stride_mb, stride_mt = stats, -1, 0, 0
    else:
        mask_view, mask_bits = integer_view(mask)
        stride_mb, stride_mt = mask_view.stride()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights_arg, wsum, stride_wb, stride_wt = _user_weights(weights, mask, acc, grad.device)
    if cols["weighted_mean"] >= 0 and mask is not None and weights is None:
        # A tiny pre-pass over the mask only: the rank of each real token, 0 at padding.
        ranks = eager.token_ranks(real_tokens(mask), B, T, grad.device).to(torch.int32).contiguous()
    else:
        ranks = _placeholder(grad.device, torch.int32)
    n_tblocks = triton_cdiv(T, config.block_t)
    grid = (B * n_tblocks, _check_feature_blocks(d, config.block_d))
    with _on_device(grad.device):
        pool_backward_kernel[grid](
            grad_out, mask_view, argmax if cols["max"] >= 0 else stats, stats, ranks, weights_arg, wsum, grad,
            B, T, d, n_tblocks, *grad_out.stride(), stride_mb, stride_mt, stride_wb, stride_wt,
            *grad.stride(),
            *col_args,
            mask_bits,
            HAS_MASK=mask is not None, HAS_WEIGHTS=weights is not None, ACC_DTYPE=_acc_dtype(grad.dtype),
            BLOCK_T=config.block_t, BLOCK_D=config.block_d, num_warps=config.num_warps,
        )  # fmt: skip
    return grad
