"""Context-parallel pooling: the sequence axis sharded over the ranks of a torch.distributed group.

Rank r of ``group`` holds the r-th consecutive shard (B, t_r, d) of the sequence axis (t_r may differ
between ranks, 0 included). ``pool`` computes each rank's partial state (``fastpool.partial``), gathers
the small fixed-size states of every rank (``all_gather``: B * (n_slots * d + 1) floats and
B * (3 + d) integers per rank, never hidden), and folds them in rank order on every rank: every rank
gets the same result, with the same bits, equal to pooling the whole sequence on one device (within
the dtype's tolerance; max values and indices, cls and last exactly; max indices are global
positions). Nothing relies on the order of a collective's reduction.

Backward: every rank holds all the states and the whole fold, so the gradient of its own state, and
from it of its own shard, is computed locally for ONE copy of the loss: the backward assumes every
rank back-propagates the same gradient of the replicated output (every rank computes the same loss,
or the output is a replicated DTensor). No communication in backward in any mode; max, cls and last
give a gradient only on the rank that owns the chosen token.

A ``DTensor`` sharded on the sequence dimension (``Shard(1)``) of a 1-D ``DeviceMesh`` is accepted as
hidden (mask and weights: None or DTensors with the same sharding); the result is a replicated
DTensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .backend import resolve_backend
from .functional import _validate, _validate_weights
from .limits import FLOAT_DTYPES
from .modes import MODES, normalize_modes
from .packed import resolve_negatives
from .partial import PoolState, _check_normalize, merge, pool_partial

_BACKEND_CODES = {"torch": 0, "triton": 1}


class _GatherStates(torch.autograd.Function):
    """all_gather of one (B, F) tensor per rank; the backward of rank r is the gradient of its own
    copy only (no communication: every rank back-propagates the same replicated loss)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, rank: int, world: int):
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.contiguous(), group=group)
        ctx.rank = rank
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads):
        return grads[ctx.rank], None, None, None


def _modes_code(modes: tuple[str, ...]) -> int:
    code = 0
    for name in modes:
        code = code * 8 + MODES.index(name) + 1
    return code


def _check_same(meta: torch.Tensor, rank: int) -> None:
    """Every rank must pool the same batch the same way; meta (world, 6) gathered from all ranks.
    Every rank sees the same table, so every rank raises the same error (no rank is left waiting)."""
    names = ("batch size B", "d", "dtype", "modes", "user weights", "backend")
    columns = (0, 2, 3, 4, 5, 6)
    for name, col in zip(names, columns, strict=True):
        values = meta[:, col].tolist()
        if len(set(values)) > 1:
            raise ValueError(
                f"hidden: expected every rank of the group to pool the same {name}, got per-rank values "
                f"{values} (this is rank {rank})"
            )


def _group_info(group) -> tuple[object, int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "group: expected an initialized torch.distributed process group "
            "(torch.distributed.init_process_group), got none"
        )
    group = dist.group.WORLD if group is None else group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _pack(state: PoolState) -> tuple[torch.Tensor, torch.Tensor]:
    """(floats (B, n_slots * d [+ 1]), integers (B, 3 [+ d])): a state as two fixed-size tensors."""
    floats = state.values
    if state.has_weights:
        floats = torch.cat([floats, state.weight_sum.unsqueeze(1)], dim=1)
    ints = [state.count.unsqueeze(1), state.first.unsqueeze(1), state.last.unsqueeze(1)]
    if state.max_index is not None:
        ints.append(state.max_index)
    return floats, torch.cat(ints, dim=1)


def _unpack(
    template: PoolState, floats: torch.Tensor, ints: torch.Tensor, span: tuple[int, int]
) -> PoolState:
    width = template.values.shape[1]
    return PoolState(
        template.modes, template.has_weights, template.dtype, template.backend, floats[:, :width],
        floats[:, width] if template.has_weights else None, ints[:, 0], ints[:, 1], ints[:, 2],
        ints[:, 3:] if template.max_index is not None else None, span,
    )  # fmt: skip


def pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str | Sequence[str] = "mean",
    *,
    group=None,
    weights: torch.Tensor | None = None,
    normalize: bool = False,
    eps: float = 1e-12,
    return_indices: bool = False,
):
    """Pool a sequence sharded over the ranks of ``group`` (context parallelism).

    Parameters
    ----------
    hidden : Tensor (B, t_r, d): this rank's consecutive shard of the sequence axis (rank order is
        token order; t_r may differ between ranks and be 0). Or a DTensor (B, T, d) with placement
        ``Shard(1)`` on a 1-D DeviceMesh (then ``group`` is the mesh's).
    mask : Tensor (B, t_r) (nonzero = real token) or None; a DTensor sharded like hidden with a
        DTensor hidden.
    mode, weights, normalize, eps : as ``fastpool.pool`` (weights: this rank's (B, t_r) shard).
    group : a torch.distributed ProcessGroup, or None for the default group.
    return_indices : also return the (B, d) int64 global positions of the maxima ("max" needed).

    Returns
    -------
    Tensor (B, n_modes * d) in hidden's dtype, the same on every rank (a replicated DTensor for a
    DTensor hidden), or (values, indices) with ``return_indices``. Differentiable with respect to
    this rank's hidden (and weights), for one copy of a loss that every rank computes alike.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(hidden, DTensor):
        return _pool_dtensor(hidden, mask, mode, weights, normalize, eps, return_indices)
    for name, value in (("mask", mask), ("weights", weights)):
        if isinstance(value, DTensor):
            raise TypeError(f"{name}: expected a plain tensor with a plain tensor hidden, got a DTensor")
    _check_normalize(normalize, eps)
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices: expected a bool, got {type(return_indices).__name__}")
    modes = normalize_modes(mode)
    if return_indices and "max" not in modes:
        raise ValueError(f"return_indices: expected mode 'max' among the modes, got {list(modes)}")
    _validate(hidden, mask)
    _validate_weights(hidden, weights, modes)
    hidden, mask, weights = resolve_negatives(hidden, mask, weights)
    group, rank, world = _group_info(group)
    B, t, d = hidden.shape
    backend = resolve_backend(hidden.device)
    meta = torch.tensor(
        [B, t, d, FLOAT_DTYPES.index(hidden.dtype), _modes_code(modes), int(weights is not None),
         _BACKEND_CODES[backend]], dtype=torch.int64, device=hidden.device,
    )  # fmt: skip
    table = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(table, meta, group=group)
    table = torch.stack(table).cpu()
    _check_same(table, rank)
    lengths = table[:, 1].tolist()
    starts = [sum(lengths[:r]) for r in range(world)]
    state = pool_partial(hidden, mask, modes, weights=weights, start=starts[rank])
    if B == 0:
        states = [state]
    else:
        floats, ints = _pack(state)
        all_floats = _GatherStates.apply(floats, group, rank, world)
        all_ints = [torch.empty_like(ints) for _ in range(world)]
        dist.all_gather(all_ints, ints, group=group)
        spans = [(starts[r], starts[r] + lengths[r]) for r in range(world)]
        states = [_unpack(state, all_floats[r], all_ints[r], spans[r]) for r in range(world)]
    return merge(states).finish(normalize, eps, return_indices)


def _local(name: str, value, hidden) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    if value is None:
        return None
    if not isinstance(value, DTensor):
        raise TypeError(f"{name}: expected None or a DTensor sharded like hidden, got {type(value).__name__}")
    if value.device_mesh != hidden.device_mesh or tuple(value.placements) != tuple(hidden.placements):
        raise ValueError(
            f"{name}: expected a DTensor on hidden's mesh with placements {tuple(hidden.placements)}, got "
            f"placements {tuple(value.placements)}"
        )
    return value.to_local()


def _pool_dtensor(hidden, mask, mode, weights, normalize, eps, return_indices):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = hidden.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"hidden: expected a DTensor on a 1-D DeviceMesh, got a {mesh.ndim}-D mesh")
    if tuple(hidden.placements) != (Shard(1),):
        raise ValueError(
            f"hidden: expected a DTensor sharded on the sequence dimension, placements (Shard(dim=1),), got "
            f"{tuple(hidden.placements)}"
        )
    result = pool(
        hidden.to_local(), _local("mask", mask, hidden), mode, group=mesh.get_group(),
        weights=_local("weights", weights, hidden), normalize=normalize, eps=eps,
        return_indices=return_indices,
    )  # fmt: skip

    def replicated(t: torch.Tensor) -> DTensor:
        return DTensor.from_local(t, mesh, [Replicate()], run_check=False)

    if return_indices:
        return replicated(result[0]), replicated(result[1])
    return replicated(result)
