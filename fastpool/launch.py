"""What the Triton launchers share: block-size rules, the fixed chunking, workspaces and small helpers.

The padded launchers (``fastpool.launchers``), the packed ones (``fastpool.packed_launchers``) and the
other op families import from here; nothing here imports triton at module level, so
``import fastpool`` works without it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
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
# spills a few bytes outside the token loops; with 128 every variant fits without spilling and keeps
# 4 programs of 128 threads per multiprocessor, except the mix that keeps four accumulators (max
# with positions and a weighted sum, besides the sum), which needs up to 192 (strided hidden), and
# packed max with positions, whose int64 offsets need 139 on sm_80 (at 128 ptxas keeps an 8-byte
# stack frame): 3 programs per multiprocessor there.
FORWARD_MAX_REGISTERS = 128
FORWARD_MAX_REGISTERS_PACKED_POSITIONS = 160
FORWARD_MAX_REGISTERS_FOUR_ACCUMULATORS = 255


def forward_max_registers(track_positions: bool, do_weighted: bool, packed: bool) -> int:
    """The forward kernel's register cap for a mode mix (see FORWARD_MAX_REGISTERS)."""
    if track_positions and do_weighted:
        return FORWARD_MAX_REGISTERS_FOUR_ACCUMULATORS
    return FORWARD_MAX_REGISTERS_PACKED_POSITIONS if track_positions and packed else FORWARD_MAX_REGISTERS


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


_sm_counts: dict[torch.device, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (DEFAULT_SM_COUNT for non-CUDA devices); cached per device."""
    count = _sm_counts.get(device)
    if count is None:
        if device.type != "cuda":
            count = DEFAULT_SM_COUNT
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
            count = torch.cuda.get_device_properties(index).multi_processor_count
        _sm_counts[device] = count
    return count


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_acc_dtype(dtype: torch.dtype):
    """``acc_dtype`` as a Triton dtype (a kernel's ACC_DTYPE constexpr)."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


_placeholders: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


_fresh = False


@contextlib.contextmanager
def fresh_buffers() -> Iterator[None]:
    """Within this block placeholders and shared empties are new tensors: a launch traced by
    torch.compile (``fastpool.ops_triton``) must not capture a cached real tensor."""
    global _fresh
    previous, _fresh = _fresh, True
    try:
        yield
    finally:
        _fresh = previous


def placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached one-element tensor for pointer arguments a specialization never touches.

    Saves an allocation per unused workspace on every launch (host time matters at serving shapes).
    """
    key = (device, dtype)
    tensor = None if _fresh else _placeholders.get(key)
    if tensor is None:
        tensor = torch.empty(1, dtype=dtype, device=device)
        if type(tensor) is torch.Tensor:  # never cache a fake or functional tensor
            _placeholders[key] = tensor
    return tensor


_workspaces: dict[tuple, torch.Tensor] = {}
_epoch = 0


_device_kinds: dict[torch.device, tuple[bool, int | None]] = {}


def cuda_index(device: torch.device) -> int | None:
    """The CUDA device index of ``device`` (the current device for a bare "cuda"), None when it is not a
    CUDA device. Cached per device: ``device.type`` builds a string on every access (~3k instructions)."""
    kind = _device_kinds.get(device)
    if kind is None:
        kind = _device_kinds[device] = (device.type == "cuda", device.index)
    is_cuda, index = kind
    if not is_cuda:
        return None
    return index if index is not None else torch.cuda.current_device()


def stream_key(device: torch.device) -> tuple:
    """(device,) or (device, current raw stream) for CUDA: what per-stream caches are keyed by."""
    index = cuda_index(device)
    if index is None:
        return (device,)
    return (device, torch._C._cuda_getCurrentRawStream(index))


def workspace(
    device: torch.device, role: str, dtype: torch.dtype, numel: int, fresh: bool = False
) -> torch.Tensor:
    """A cached buffer of at least ``numel`` elements for one role in a launch (partial results, the
    rows to normalise, outputs nobody reads), per device and stream.

    Kernels on one stream run in order, so a launch may reuse what the previous one left: no
    allocation per call. Kernels read the buffer through its pointer only, so it is passed whole
    (never sliced). It grows by doubling; an old buffer still in use by queued kernels is released to
    the caching allocator, which reuses memory in stream order. ``fresh``: a new buffer (traced
    launches, see ``fastpool.ops_triton``: a compiled graph allocates its own).
    """
    if fresh:
        return torch.empty((numel,), dtype=dtype, device=device)
    key = (*stream_key(device), role, dtype)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < numel:
        size = max(numel, 1024, 2 * (0 if buffer is None else buffer.numel()))
        # Counters start at 0 (see ticket_counters); the others are written before they are read.
        buffer = torch.zeros(size, dtype=dtype, device=device)
        if type(buffer) is not torch.Tensor:  # never cache a fake or functional tensor
            return buffer
        _workspaces[key] = buffer
    return buffer


def ticket_counters(device: torch.device, n: int, fresh: bool = False) -> tuple[torch.Tensor, int]:
    """(counters, epoch): n int64 ticket counters of a split launch, from a buffer cached per device
    and stream, and this launch's epoch tag (see ``kernels.mask_scan.draw_ticket``).

    The kernels leave every counter of a completed row at 0, and ignore counts tagged with another
    epoch, so the buffer is zeroed once when it is allocated and never again: no memset per call.
    Keyed by the current stream, so launches on different streams never share counters. ``fresh``:
    new zeroed counters and epoch 1 (a traced launch: the graph allocates them per call).
    """
    if fresh:
        return torch.zeros((n,), dtype=torch.int64, device=device), 1
    return workspace(device, "tickets", torch.int64, n), next_epoch()


def next_epoch() -> int:
    """A new launch's ticket tag (1 ... 2**31 - 1, cycling)."""
    global _epoch
    _epoch = _epoch % (2**31 - 1) + 1
    return _epoch


def needs_device_switch(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device other than the current one (Triton launches on the current
    device and stream, so the launch must run under ``torch.cuda.device(device)``)."""
    index = cuda_index(device)
    return index is not None and index != torch.cuda.current_device()


def launch_on(device: torch.device, launcher, key, grid: tuple, args: tuple, constexprs: dict, options: dict):
    """``launcher(key, grid, args, constexprs, options)`` with ``device`` current (switching only when
    it is not: no context manager on the common path)."""
    if needs_device_switch(device):
        with torch.cuda.device(device):
            launcher(key, grid, args, constexprs, options)
    else:
        launcher(key, grid, args, constexprs, options)


def check_feature_blocks(d: int, block_d: int) -> int:
    """cdiv(d, block_d), with a clear error when it exceeds the grid's limit."""
    blocks = triton_cdiv(d, block_d)
    if blocks > MAX_GRID_YZ:
        raise ValueError(f"hidden: d must be at most {MAX_GRID_YZ * block_d} for this dtype, got {d}")
    return blocks


@dataclass(frozen=True, eq=False)
class ForwardPlan:
    """Everything about a forward launch that depends only on the call's signature (modes, dtypes,
    flags), computed once per signature: the mode columns, constexprs and launch options. Compared by
    identity: the cached instance stands for its signature in launch keys."""

    n_modes: int
    col_args: tuple[int, ...]  # the kernel's col_* arguments, in units of d (multiplied per call)
    do_mean: bool
    do_max: bool
    track_positions: bool
    do_weighted: bool
    has_weights: bool
    normalize: bool
    store_wmean: bool  # the un-rounded weighted mean, for the user weights' gradient
    store_prefix: bool  # real tokens before each chunk, for the rank-weighted backward with a mask
    acc: torch.dtype
    block_d: int
    constexprs: dict
    options: dict

    @property
    def per_call_outputs_only(self) -> bool:
        """Whether a launch returns nothing but out, argmax and stats (no user-weight sums, norms or
        rank prefix): what ``launchers.RepeatCall`` can repeat for a training call."""
        return not (self.has_weights or self.normalize or self.store_wmean or self.store_prefix)

    def ticket_count(self, rows: int, n_dblocks: int, split: bool) -> int:
        """Counters a launch needs: one per (row, feature block) when rows are split, one per row
        when the normalisation gathers a row's feature blocks, 0 when neither."""
        if self.normalize:
            return rows * n_dblocks + rows
        return rows * n_dblocks if split else 0


def forward_plan(
    modes: str, dtype: torch.dtype, has_mask: bool, has_weights: bool, normalize: bool, track_positions: bool,
    for_backward: bool, packed: bool,
) -> ForwardPlan:  # fmt: skip
    """The cached ``ForwardPlan`` of a call signature (``modes`` comma-separated)."""
    key = (modes, dtype, has_mask, has_weights, normalize, track_positions, for_backward, packed)
    if _overrides:
        return _forward_plan(*key)
    return _cached_forward_plan(*key)


@functools.lru_cache(maxsize=1024)
def _cached_forward_plan(*key) -> ForwardPlan:
    return _forward_plan(*key)


def _forward_plan(modes, dtype, has_mask, has_weights, normalize, track_positions, for_backward, packed):
    names = modes.split(",")
    cols = mode_columns(names, 1)
    do_weighted = cols["weighted_mean"] >= 0
    do_max = cols["max"] >= 0
    size = torch.empty((), dtype=dtype).element_size()
    block_d = overridden("block_d", feature_block(size))
    do_mean = cols["mean"] >= 0 or cols["mean_sqrt_len"] >= 0 or (do_weighted and not has_weights)
    track = do_max and track_positions
    constexprs = dict(
        HAS_MASK=has_mask, DO_MEAN=do_mean, DO_MAX=do_max, TRACK_POS=track, DO_WEIGHTED=do_weighted,
        HAS_WEIGHTS=has_weights, PACKED=packed, ACC_DTYPE=triton_acc_dtype(dtype),
        LANES=overridden("lanes", LANES), BLOCK_D=block_d, CHUNK=overridden("chunk", CHUNK),
        SCAN_BLOCK=overridden("scan_block", SCAN_BLOCK), NUM_STAGES=overridden("num_stages", NUM_STAGES),
        STATE=False,  # the pooled outputs (fastpool.partial launches the state-output variant)
    )  # fmt: skip
    return ForwardPlan(
        n_modes=len(names),
        col_args=kernel_columns(cols),
        do_mean=do_mean,
        do_max=do_max,
        track_positions=track,
        do_weighted=do_weighted,
        has_weights=has_weights,
        normalize=normalize,
        store_wmean=for_backward and has_weights,
        store_prefix=for_backward and do_weighted and not has_weights and has_mask and not packed,
        acc=acc_dtype(dtype),
        block_d=block_d,
        constexprs=constexprs,
        options=dict(
            num_warps=overridden("num_warps", NUM_WARPS),
            maxnreg=forward_max_registers(track, do_weighted, packed),
        ),
    )


class ForwardOutputs:
    """The tensors one forward launch writes: (out, argmax, stats, norms, wsum, wmean) sized for ``rows``
    rows of d features, plus the row buffer of the normalisation; empty where the plan needs none.

    ``lean``: the caller reads only ``out`` (and ``argmax`` when positions are tracked): the other
    outputs live in the stream's workspace and the empty ones are shared, so an inference call
    allocates one tensor (two with indices). ``share_empty``: only the absent outputs are shared
    (the autograd fast path; a custom op returns fresh tensors).
    """

    __slots__ = ("out", "argmax", "stats", "norms", "wsum", "wmean", "rowbuf")

    def __init__(
        self, plan: ForwardPlan, rows: int, d: int, dtype: torch.dtype, device: torch.device,
        lean: bool = False,
        share_empty: bool = False, traced: bool = False,
    ):  # fmt: skip
        acc = plan.acc
        n_cols = plan.n_modes * d
        share_empty = share_empty or lean

        def output(needed: bool, shape: tuple, absent: tuple, out_dtype: torch.dtype) -> torch.Tensor:
            # Absent outputs are zero-size; shared where no custom op returns them (a fresh one each).
            if not needed and share_empty:
                return empty(device, out_dtype)
            return torch.empty(shape if needed else absent, dtype=out_dtype, device=device)

        self.out = torch.empty((rows, n_cols), dtype=dtype, device=device)
        self.rowbuf = workspace(device, "rowbuf", acc, rows * n_cols, traced) if plan.normalize else None
        self.argmax = output(plan.track_positions, (rows, d), (rows, 0), torch.int32)
        if lean:
            self.stats = workspace(device, "stats", torch.int32, 3 * rows)
            self.norms = workspace(device, "norms", acc, rows) if plan.normalize else empty(device, acc)
            self.wsum = workspace(device, "wsum", acc, rows) if plan.has_weights else empty(device, acc)
            self.wmean = empty(device, acc)
            return
        self.stats = torch.empty((3, rows), dtype=torch.int32, device=device)
        self.norms = output(plan.normalize, (rows,), (0,), acc)
        self.wsum = output(plan.has_weights, (rows,), (0,), acc)
        self.wmean = output(plan.store_wmean, (rows, d), (0, d), acc)

    def result(self, prefix: torch.Tensor) -> tuple:
        """The forward's (out, argmax, stats, norms, wsum, wmean, prefix)."""
        return self.out, self.argmax, self.stats, self.norms, self.wsum, self.wmean, prefix


_empties: dict[tuple, torch.Tensor] = {}


def empty(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A shared zero-size tensor (a lean call's outputs that the caller never reads)."""
    key = (device, dtype)
    tensor = None if _fresh else _empties.get(key)
    if tensor is None:
        tensor = torch.empty(0, dtype=dtype, device=device)
        if type(tensor) is torch.Tensor:
            _empties[key] = tensor
    return tensor


def partial_buffers(
    plan: ForwardPlan, slots: int, d: int, n_dblocks: int, device: torch.device, traced: bool = False
) -> tuple:
    """(part_sum, part_wsum, part_max, part_pos, part_stats, part_wt): the workspace of a launch whose
    rows are split over programs, with ``slots`` chunk slots; placeholders where a mode does not need
    one, all placeholders for ``slots == 0`` (no row is split). From the stream's workspace: a split
    launch allocates nothing."""
    acc = plan.acc

    def buffer(needed: bool, role: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return (
            workspace(device, role, dtype, numel, traced) if needed and slots else placeholder(device, dtype)
        )

    return (
        buffer(plan.do_mean, "part_sum", slots * d, acc),
        buffer(plan.do_weighted, "part_wsum", slots * d, acc),
        buffer(plan.do_max, "part_max", slots * d, acc),
        buffer(plan.track_positions, "part_pos", slots * d, torch.int32),
        buffer(True, "part_stats", slots * n_dblocks * 3, torch.int32),
        buffer(plan.has_weights, "part_wt", slots * n_dblocks, acc),
    )
