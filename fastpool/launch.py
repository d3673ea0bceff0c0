"""What the Triton launchers share: block-size rules, the fixed chunking, workspaces and small helpers.

The padded launchers (``fastpool.launchers``), the packed ones (``fastpool.packed_launchers``) and the
other op families import from here; nothing here imports triton at module level, so
``import fastpool`` works without it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .modes import MODES, mode_columns

# A row is cut into chunks of CHUNK positions from its first real token, and each chunk is summed in
# LANES lanes then reduced by a fixed tree; chunk sums are folded in order. Neither depends on the
# batch, the sequence length or the device: this is what makes a row's bits batch-invariant. A
# chunk is also the unit of parallelism of a long row: its partial results cost 4 bytes per feature
# (plus 8 with max) against CHUNK * 2 bytes per feature of bf16 input read, under 2.5% extra traffic.
CHUNK = 256
LANES = 8
# Feature block in bytes: one warp-wide row of 16-byte vectors (32 lanes x 16 B). Fixed per dtype
# so that the set of kernel specializations stays small enough to compile ahead of time in CI.
ROW_BYTES = 512
# Mask elements per load when a row's first real token is searched.
SCAN_BLOCK = 1024
NUM_WARPS = 4
# Software-pipelining depth of the forward loop over a chunk without holes.
NUM_STAGES = 4
# Register cap of the forward kernel. Without one, ptxas keeps some variants near 48 registers and
# spills a few bytes outside the token loops; with it every variant fits without spilling (the
# heaviest mix uses ~127), which still leaves 4 programs of 128 threads per multiprocessor.
FORWARD_MAX_REGISTERS = 128
# Programs wanted per multiprocessor to keep enough loads in flight on a memory-bound loop.
PROGRAMS_PER_SM = 4
# Backward: bytes of one output tile (BLOCK_T * BLOCK_D * element size).
TILE_BYTES = 8192
# When no GPU is there to ask (the interpreter), size grids as for an H100.
DEFAULT_SM_COUNT = 132
# CUDA grid dimension 0 holds at most 2**31 - 1 blocks, dimensions 1 and 2 at most 65535.
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535

_overrides: dict[str, int] = {}
OVERRIDABLE = (
    "block_d", "block_t", "num_warps", "chunk", "lanes", "chunks_per_program", "scan_block", "num_stages",
)  # fmt: skip


@contextlib.contextmanager
def config_override(**fields: int) -> Iterator[None]:
    """Force launch parameters (``OVERRIDABLE``) in the enclosed launches.

    For tests and tile sweeps: lets small interpreter shapes cross several feature blocks, chunks and
    programs per row. ``chunk`` and ``lanes`` change the summation order (a row's bits are then
    invariant under the overridden values); the others change only the parallelism.
    """
    unknown = set(fields) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"config_override: expected fields among {OVERRIDABLE}, got {sorted(unknown)}")
    saved = dict(_overrides)
    _overrides.update(fields)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def overridden(name: str, default: int) -> int:
    """The value of launch parameter ``name``: its override if any, else ``default``."""
    return _overrides.get(name, default) if _overrides else default


def has_overrides() -> bool:
    return bool(_overrides)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_columns(cols: dict[str, int]) -> tuple[int, ...]:
    """The kernels' col_* arguments (col_mean, col_max, col_first, col_last, col_sqrt, col_weighted)."""
    return tuple(cols[name] for name in MODES)


def feature_block(element_size: int) -> int:
    """BLOCK_D: features in one 512-byte row (256 for 2-byte dtypes, 128 for 4, 64 for 8)."""
    return ROW_BYTES // element_size


def token_block(element_size: int) -> int:
    """Backward BLOCK_T: tokens of one TILE_BYTES output tile (16 for every dtype)."""
    return TILE_BYTES // (feature_block(element_size) * element_size)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (DEFAULT_SM_COUNT for non-CUDA devices)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_acc_dtype(dtype: torch.dtype):
    """``acc_dtype`` as a Triton dtype (a kernel's ACC_DTYPE constexpr)."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


_placeholders: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
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


_counters: dict[tuple, torch.Tensor] = {}
_epoch = 0


def ticket_counters(device: torch.device, n: int) -> tuple[torch.Tensor, int]:
    """(counters, epoch): n int64 ticket counters of a split launch, from a buffer cached per device
    and stream, and this launch's epoch tag (see ``kernels.mask_scan.draw_ticket``).

    The kernels leave every counter of a completed row at 0, and ignore counts tagged with another
    epoch, so the buffer is zeroed once when it is allocated and never again: no memset per call.
    Keyed by the current stream, so launches on different streams never share counters.
    """
    global _epoch
    _epoch = _epoch % (2**31 - 1) + 1
    key = (device, torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else (device,)
    buffer = _counters.get(key)
    if buffer is None or buffer.numel() < n:
        size = max(n, 1024, 2 * (0 if buffer is None else buffer.numel()))
        buffer = torch.zeros(size, dtype=torch.int64, device=device)
        if type(buffer) is torch.Tensor:  # never cache a fake or functional tensor
            _counters[key] = buffer
    return buffer, _epoch


def on_device(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the current device and stream."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_feature_blocks(d: int, block_d: int) -> int:
    """cdiv(d, block_d), with a clear error when it exceeds the grid's limit."""
    blocks = triton_cdiv(d, block_d)
    if blocks > MAX_GRID_YZ:
        raise ValueError(f"hidden: d must be at most {MAX_GRID_YZ * block_d} for this dtype, got {d}")
    return blocks


@dataclass
class ForwardSetup:
    """What a forward launch (padded or packed) decides before choosing its grid: the mode flags,
    block sizes and the outputs."""

    col_args: tuple[int, ...]
    do_mean: bool
    do_max: bool
    track_positions: bool
    do_weighted: bool
    has_weights: bool
    acc: torch.dtype
    out: torch.Tensor
    argmax: torch.Tensor
    stats: torch.Tensor
    norms: torch.Tensor
    rowbuf: torch.Tensor  # (rows, n_modes * d) acc dtype: un-rounded rows to normalise ((0, 0) without)
    wsum: torch.Tensor
    wmean: torch.Tensor
    block_d: int
    num_warps: int
    normalize_eps: float  # < 0: no normalisation

    def ticket_count(self, rows: int, n_dblocks: int, split: bool) -> int:
        """Counters a launch needs: one per (row, feature block) when rows are split, one per row
        when the normalisation gathers a row's feature blocks, 0 when neither."""
        return (rows * n_dblocks if split or self.normalize_eps >= 0 else 0) + (
            rows if self.normalize_eps >= 0 else 0
        )


def forward_setup(
    hidden: torch.Tensor,
    rows: int,
    d: int,
    modes: Sequence[str],
    has_weights: bool,
    normalize_eps: float,
    track_positions: bool,
    store_wmean: bool,
) -> ForwardSetup:
    """Mode flags, block sizes and outputs of a forward over ``rows`` rows of d features."""
    device = hidden.device
    cols = mode_columns(modes, d)
    do_weighted = cols["weighted_mean"] >= 0
    do_max = cols["max"] >= 0
    acc = acc_dtype(hidden.dtype)
    normalize = normalize_eps >= 0
    size = hidden.element_size()
    store_wmean = store_wmean and has_weights
    n_cols = len(modes) * d
    return ForwardSetup(
        col_args=kernel_columns(cols),
        # The rank-weighted path keeps the plain sum too: the chunk fold shifts ranks with it.
        do_mean=cols["mean"] >= 0 or cols["mean_sqrt_len"] >= 0 or (do_weighted and not has_weights),
        do_max=do_max,
        track_positions=do_max and track_positions,
        do_weighted=do_weighted,
        has_weights=has_weights,
        acc=acc,
        out=torch.empty((rows, n_cols), dtype=hidden.dtype, device=device),
        argmax=torch.empty((rows, d if do_max and track_positions else 0), dtype=torch.int32, device=device),
        stats=torch.empty((3, rows), dtype=torch.int32, device=device),
        norms=torch.empty((rows if normalize else 0,), dtype=acc, device=device),
        rowbuf=torch.empty((rows, n_cols) if normalize else (0, 0), dtype=acc, device=device),
        wsum=torch.empty((rows if has_weights else 0,), dtype=acc, device=device),
        wmean=torch.empty((rows if store_wmean else 0, d), dtype=acc, device=device),
        block_d=overridden("block_d", feature_block(size)),
        num_warps=overridden("num_warps", NUM_WARPS),
        normalize_eps=normalize_eps,
    )


def partial_buffers(setup: ForwardSetup, slots: int, d: int, n_dblocks: int, device: torch.device) -> tuple:
    """(part_sum, part_wsum, part_max, part_pos, part_stats, part_wt): the workspace of a split launch
    with ``slots`` chunk slots; placeholders where a mode does not need one, all placeholders for
    ``slots == 0`` (no row is split)."""
    acc = setup.acc

    def buffer(needed: bool, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return (
            torch.empty(shape, dtype=dtype, device=device) if needed and slots else placeholder(device, dtype)
        )

    return (
        buffer(setup.do_mean, (slots, d), acc),
        buffer(setup.do_weighted, (slots, d), acc),
        buffer(setup.do_max, (slots, d), acc),
        buffer(setup.track_positions, (slots, d), torch.int32),
        buffer(True, (slots, n_dblocks, 3), torch.int32),
        buffer(setup.has_weights, (slots, n_dblocks), acc),
    )


def mode_flags(setup: ForwardSetup, hidden: torch.Tensor, packed: bool) -> dict:
    """The forward kernel's mode and layout constexprs."""
    return dict(
        DO_MEAN=setup.do_mean, DO_MAX=setup.do_max, TRACK_POS=setup.track_positions,
        DO_WEIGHTED=setup.do_weighted, HAS_WEIGHTS=setup.has_weights, PACKED=packed,
        ACC_DTYPE=triton_acc_dtype(hidden.dtype), BLOCK_D=setup.block_d, num_warps=setup.num_warps,
        maxnreg=FORWARD_MAX_REGISTERS,
    )  # fmt: skip


def outputs(setup: ForwardSetup, prefix: torch.Tensor) -> tuple:
    """The forward's (out, argmax, stats, norms, wsum, wmean, prefix)."""
    return setup.out, setup.argmax, setup.stats, setup.norms, setup.wsum, setup.wmean, prefix
