"""Triton launchers for packed batches: (N, d) tokens cut into S segments by ``cu_seqlens``.

The forward and backward kernels are the padded ones run with ``PACKED`` (forward) or their packed
twin (backward). A program owns one chunk of one segment. When every segment fits in one chunk
(``max_seqlen`` known and small enough) program i is segment i: one launch, no host-device sync,
no preparation. Otherwise long segments are cut into chunks of ``chunk_len`` tokens so that a few
long segments among many short ones do not serialise the GPU: a small work list (segment of each
chunk, first chunk of each segment) is built on the device with a handful of (S,)-sized torch ops,
the grid is an upper bound on the number of chunks (spare programs exit), and the partials of
split segments are folded in chunk order by the combine kernel. No atomics, no sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import eager_packed
from .launchers import (
    MIN_TOKENS_PER_SPLIT,
    PROGRAMS_PER_SM,
    SCAN_BLOCK,
    _acc_dtype,
    _check_feature_blocks,
    _on_device,
    _overrides,
    _placeholder,
    feature_block,
    finish,
    forward_setup,
    forward_warps,
    kernel_columns,
    partial_buffers,
    sm_count,
    token_block,
    triton_cdiv,
)
from .modes import mode_columns

# CUDA grid dimension 0 holds at most this many blocks.
MAX_GRID_X = 2**31 - 1


@dataclass(frozen=True)
class ChunkPlan:
    """How a packed batch is cut into programs."""

    chunk_len: int  # tokens per chunk; 0 when every segment is one chunk
    programs: int  # grid size along axis 0 (an upper bound on the chunks when chunk_len > 0)
    chunk_seg: torch.Tensor | None  # (programs,) int32 segment of each chunk, S for spare programs
    chunk_start: torch.Tensor | None  # (S + 1,) int32 first chunk of each segment


def chunk_length(N: int, d: int, block_d: int, block_t: int, sms: int) -> int:
    """Tokens per chunk: enough chunks to give every multiprocessor PROGRAMS_PER_SM programs, but
    never fewer than MIN_TOKENS_PER_SPLIT tokens (a partial costs 12 bytes per feature)."""
    if "chunk_len" in _overrides:
        return _overrides["chunk_len"]
    per_feature_block = max(1, triton_cdiv(PROGRAMS_PER_SM * sms, triton_cdiv(max(d, 1), block_d)))
    length = max(MIN_TOKENS_PER_SPLIT, triton_cdiv(N, per_feature_block))
    return triton_cdiv(length, block_t) * block_t


def clamped_offsets(cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """(S + 1,) int64 offsets clamped into [0, N] and made non-decreasing: equal to cu_seqlens when
    it is well formed, and safe to hand to torch ops that trust their offsets when it is not."""
    return torch.cummax(cu_seqlens.long().clamp(0, N), 0).values


def chunk_plan(cu_seqlens: torch.Tensor, N: int, chunk_len: int, max_seqlen: int | None) -> ChunkPlan:
    """Build the work list of a packed launch on the device (no sync)."""
    S = cu_seqlens.shape[0] - 1
    if max_seqlen is not None and max_seqlen <= chunk_len:
        return ChunkPlan(0, S, None, None)
    # Clamped and made non-decreasing so malformed offsets still give at most N // chunk_len + S chunks.
    cu = clamped_offsets(cu_seqlens, N)
    lengths = cu[1:] - cu[:-1]
    chunks = torch.clamp((lengths + chunk_len - 1) // chunk_len, min=1)  # an empty segment still owns one
    programs = S + N // chunk_len
    chunk_start = torch.zeros(S + 1, dtype=torch.int64, device=cu.device)
    torch.cumsum(chunks, 0, out=chunk_start[1:])
    spare = (programs - chunk_start[S:]).clamp(min=0)
    owners = torch.arange(S + 1, dtype=torch.int32, device=cu.device)
    chunk_seg = torch.repeat_interleave(owners, torch.cat([chunks, spare]), output_size=programs)
    return ChunkPlan(chunk_len, programs, chunk_seg, chunk_start.to(torch.int32))


def _plan(cu_seqlens, N, d, element_size, second_accumulator, max_seqlen, device, min_block_d=0):
    block_d = max(feature_block(element_size), min_block_d)
    block_t = max(1, token_block(element_size, second_accumulator) * feature_block(element_size) // block_d)
    block_d = max(_overrides.get("block_d", block_d), min_block_d)
    block_t = _overrides.get("block_t", block_t)
    warps = _overrides.get("num_warps", forward_warps(block_d, element_size))
    length = chunk_length(N, d, block_d, block_t, sm_count(device))
    plan = chunk_plan(cu_seqlens, N, length, max_seqlen)
    if plan.programs > MAX_GRID_X:
        raise ValueError(f"cu_seqlens: expected at most {MAX_GRID_X} chunks, got {plan.programs}")
    return plan, block_t, block_d, warps


def _weights_args(weights, cu_seqlens, acc, device, N):
    if weights is None:
        return _placeholder(device, acc), _placeholder(device, acc), 0
    # segment_reduce trusts its offsets: give it clamped ones (equal to cu_seqlens when well formed).
    sums = eager_packed.segment_sums(weights.to(acc), clamped_offsets(cu_seqlens, N))
    return weights, sums, weights.stride(0)


def pool_forward(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    normalize_eps: float = -1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused pooling of a packed batch on the Triton kernels.

    hidden (N, d) fp16/bf16/fp32/fp64, any strides; cu_seqlens (S + 1,) int32/int64 offsets;
    weights (N,) float or None; max_seqlen: an upper bound on the segment lengths, or None;
    normalize_eps >= 0: L2-normalise each output row (as ``launchers.pool_forward``).
    Returns out (S, len(modes) * d) hidden dtype, argmax (S, d) int32 global token indices when
    "max" is among ``modes`` (else (S, 0)), stats (3, S) int32 (length, first, last; -1 if empty),
    norms (S,) ((0,) without normalisation).

    Memory traffic: reads every token of hidden once (``N * d * element_size`` bytes) and
    ``cu_seqlens``; writes ``S * len(modes) * d * element_size`` bytes plus argmax and stats.
    Segments split into several chunks add ``12 * d`` bytes per chunk written and read.
    """
    from .kernels.pool_forward import pool_combine_kernel, pool_forward_kernel

    N, d = hidden.shape
    S = cu_seqlens.shape[0] - 1
    device = hidden.device
    setup = forward_setup(hidden, S, d, modes, weights is not None, normalize_eps)
    if S == 0:
        return finish(setup, hidden.dtype, normalize_eps)
    if d == 0:
        setup.stats = eager_packed.packed_stats(cu_seqlens)
        return finish(setup, hidden.dtype, normalize_eps)
    out, argmax, stats, acc = setup.out, setup.argmax, setup.stats, setup.acc
    norm_arg = setup.norms if setup.whole_row is not None else _placeholder(device, acc)
    plan, block_t, block_d, warps = _plan(
        cu_seqlens,
        N,
        d,
        hidden.element_size(),
        setup.second_accumulator,
        max_seqlen,
        device,
        setup.whole_row or 0,
    )
    weights_arg, wsum, stride_wt = _weights_args(weights, cu_seqlens, acc, device, N)
    chunked = plan.chunk_len > 0
    partials = partial_buffers(setup, (plan.programs, d) if chunked else (), device)
    no_list = _placeholder(device, torch.int32)
    chunk_seg, chunk_start = (plan.chunk_seg, plan.chunk_start) if chunked else (no_list, no_list)
    argmax_arg = argmax if setup.do_max else stats
    n_dblocks = _check_feature_blocks(d, block_d)
    stride_ht, stride_hd = hidden.stride()
    flags = dict(
        DO_MEAN=setup.do_mean, DO_MAX=setup.do_max, DO_WEIGHTED=setup.do_weighted,
        HAS_WEIGHTS=setup.has_weights, PACKED=True, ACC_DTYPE=_acc_dtype(hidden.dtype), BLOCK_D=block_d,
        num_warps=warps,
    )  # fmt: skip
    with _on_device(device):
        pool_forward_kernel[(plan.programs, n_dblocks, 1)](
            hidden, stats, out, argmax_arg, stats, *partials, weights_arg, wsum,
            cu_seqlens, chunk_seg, chunk_start, norm_arg,
            S, N, d, 0, 1, plan.chunk_len,
            0, stride_ht, stride_hd, 0, 0, 0, stride_wt, out.stride(0),
            *setup.col_args, setup.fused_eps, -1,
            HAS_MASK=False, BLOCK_T=block_t, SCAN_BLOCK=SCAN_BLOCK, **flags,
        )  # fmt: skip
        if chunked:
            pool_combine_kernel[(S, n_dblocks)](
                hidden, out, argmax_arg, stats, *partials, wsum, chunk_start, norm_arg,
                S, d, 1, 0, stride_ht, stride_hd, out.stride(0), *setup.col_args, setup.fused_eps,
                **flags,
            )  # fmt: skip
    return finish(setup, hidden.dtype, normalize_eps)


def pool_backward(
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    argmax: torch.Tensor,
    stats: torch.Tensor,
    N: int,
    dtype: torch.dtype,
    modes: Sequence[str],
    weights: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Gradient of a packed hidden (N, d) in ``dtype`` from grad_out (S, len(modes) * d), any strides.

    Memory traffic: writes ``N * d * element_size`` bytes (each element once, no memset); reads
    grad_out, argmax and stats (per segment, L2-resident) and the user weights if any.
    """
    from .kernels.pool_backward import packed_backward_kernel

    S = stats.shape[1]
    d = grad_out.shape[1] // len(modes)
    device = grad_out.device
    grad = torch.empty((N, d), dtype=dtype, device=device)
    if grad.numel() == 0:
        return grad
    if S == 0:
        return grad.zero_()  # no segment covers a token
    cols = mode_columns(modes, d)
    plan, block_t, block_d, warps = _plan(cu_seqlens, N, d, grad.element_size(), False, max_seqlen, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights_arg, wsum, stride_wt = _weights_args(weights, cu_seqlens, acc, device, N)
    if plan.chunk_len > 0:
        chunk_seg, chunk_start = plan.chunk_seg, plan.chunk_start
    else:
        chunk_seg = chunk_start = _placeholder(device, torch.int32)
    with _on_device(device):
        packed_backward_kernel[(plan.programs, _check_feature_blocks(d, block_d))](
            grad_out, cu_seqlens, chunk_seg, chunk_start, argmax if cols["max"] >= 0 else stats, stats,
            weights_arg, wsum, grad,
            S, N, d, plan.chunk_len, *grad_out.stride(), stride_wt, *grad.stride(),
            *kernel_columns(cols),
            HAS_WEIGHTS=weights is not None, ACC_DTYPE=_acc_dtype(dtype), BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=warps,
        )  # fmt: skip
    return grad
