"""Packed (variable-length) input at the public boundary: validation and nested-tensor unwrapping.

A packed batch is S sequences stored back to back as hidden (N, d), with ``cu_seqlens`` (S + 1,)
int32/int64 offsets (the flash-attention convention): sequence s is ``hidden[cu[s]:cu[s + 1]]``.
Every token is real (there is no padding), empty sequences are allowed. A ``torch.nested`` tensor
with the jagged layout, (S, j, d), is the same thing: its ``values()`` and ``offsets()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch._C import _functorch

from . import transforms
from .limits import FLOAT_DTYPES, MAX_BATCH, MAX_SEQUENCE_LENGTH

OFFSET_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class PackedInput:
    """A validated packed batch: hidden (N, d), cu_seqlens (S + 1,) contiguous, weights (N,) or None,
    max_seqlen (-1 when unknown; a bound on the segment lengths otherwise), and whether the offsets'
    values still have to be checked (under torch.compile, where they can only be read inside the op)."""

    hidden: torch.Tensor
    cu_seqlens: torch.Tensor
    weights: torch.Tensor | None
    max_seqlen: int
    check_offsets: bool


def check_dense(argument: str, tensor: torch.Tensor) -> None:
    """TypeError naming ``argument`` unless ``tensor`` is dense (sparse layouts have no strides to
    hand the kernels and no eager path)."""
    if tensor.layout != torch.strided:
        raise TypeError(f"{argument}: expected a dense (strided) tensor, got layout {tensor.layout}")


def resolve_negative(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` itself, or a copy with its negative bit resolved. ``x.conj().imag`` and
    ``torch._neg_view`` are views whose memory holds -x, and the kernels read memory as it is: only
    such a view is copied (the eager ops would resolve it anyway). Not while compiling: the compiled
    graph hands the ops plain tensors (and ``is_neg`` does not trace)."""
    if tensor is None or torch.compiler.is_compiling() or not tensor.is_neg():
        return tensor
    return tensor.resolve_neg()


def resolve_negatives(
    hidden: torch.Tensor, mask: torch.Tensor | None, other: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``resolve_negative`` of a call's three tensor arguments, with one compile test for the three
    (a small call's host cost)."""
    if torch.compiler.is_compiling():
        return hidden, mask, other
    if hidden.is_neg() or (mask is not None and mask.is_neg()) or (other is not None and other.is_neg()):
        return resolve_negative(hidden), resolve_negative(mask), resolve_negative(other)
    return hidden, mask, other


def _beyond(size: int | torch.SymInt, limit: int) -> bool:
    if isinstance(size, int):
        return size > limit
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(size > limit)


def check_size_limits(rows: int | torch.SymInt, length: int | torch.SymInt, packed: bool) -> None:
    """ValueError unless rows (B, or S sequences when packed) and length (T, or N tokens) fit the
    kernels' 32-bit indexing.

    A symbolic size (torch.export / torch.compile with dynamic dimensions) is rejected only when
    provably beyond its limit, so the check never becomes a shape guard that narrows the traced
    range; the custom ops repeat it on the concrete sizes when they run (``fastpool.ops``).
    Under torch.compile (whose tracer would guard on any comparison) only the ops check.
    """
    if torch.compiler.is_compiling():
        return
    if packed:
        if _beyond(length, MAX_SEQUENCE_LENGTH):
            raise ValueError(f"hidden: N must be at most {MAX_SEQUENCE_LENGTH} tokens, got {length}")
        if _beyond(rows, MAX_BATCH - 1):
            raise ValueError(f"cu_seqlens: expected fewer than {MAX_BATCH} sequences, got {rows}")
        return
    if _beyond(rows, MAX_BATCH - 1):
        raise ValueError(f"hidden: B must be below {MAX_BATCH}, got {rows}")
    if _beyond(length, MAX_SEQUENCE_LENGTH):
        raise ValueError(f"hidden: T must be at most {MAX_SEQUENCE_LENGTH}, got {length}")


def _unwrap_nested(hidden: torch.Tensor, cu_seqlens: object) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    if hidden.layout != torch.jagged:
        raise ValueError(f"hidden: expected a nested tensor with layout torch.jagged, got {hidden.layout}")
    if cu_seqlens is not None:
        raise ValueError(
            "cu_seqlens: expected None with a nested hidden (it carries its offsets), got a tensor"
        )
    if hidden.dim() != 3 or hidden._ragged_idx != 1:
        raise ValueError(f"hidden: expected a nested tensor of shape (S, j, d), got {hidden.shape}")
    if hidden._lengths is not None:
        raise ValueError(
            "hidden: expected a contiguous nested tensor (offsets only), got one with holes (lengths)"
        )
    return hidden.values(), hidden.offsets(), hidden._maybe_max_seqlen


def _unwrap_weights(
    weights: object, N: int, device: torch.device, cu_seqlens: torch.Tensor, trusted: bool
) -> torch.Tensor | None:
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor) and weights.is_nested:
        offsets = weights.offsets()
        same = offsets is cu_seqlens or (
            offsets.shape == cu_seqlens.shape and (trusted or bool(torch.equal(offsets, cu_seqlens)))
        )
        if not same:
            raise ValueError("weights: expected a nested tensor with hidden's offsets, got other offsets")
        weights = weights.values()
    if not isinstance(weights, torch.Tensor):
        raise TypeError(
            f"weights: expected a torch.Tensor of shape (N,) or None, got {type(weights).__name__}"
        )
    if weights.layout is not torch.strided:
        check_dense("weights", weights)
    if weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weights: expected dtype float16, bfloat16, float32 or float64, got {weights.dtype}")
    if weights.dim() == 2 and weights.shape[0] == 1:
        weights = weights[0]
    if tuple(weights.shape) != (N,):
        raise ValueError(
            f"weights: expected shape (N,) = ({N},) for a packed batch, got {tuple(weights.shape)}"
        )
    if weights.device != device:
        raise ValueError(f"weights: expected device {device} (hidden's device), got {weights.device}")
    return weights


def host_offsets(cu_seqlens: torch.Tensor) -> np.ndarray | None:
    """The offsets' values as a NumPy array sharing their memory (no copy, a microsecond) when they
    are a plain CPU tensor; None for any other device, meta / fake tensors and torch.func wrappers
    (whose values cannot be read that way)."""
    if (
        not cu_seqlens.is_cpu
        or type(cu_seqlens) is not torch.Tensor
        or _functorch.is_functorch_wrapped_tensor(cu_seqlens)
    ):
        return None
    return cu_seqlens.numpy()  # integers never require grad


def check_offsets(cu_seqlens: torch.Tensor, N: int) -> int:
    """Raise ValueError unless cu_seqlens starts at 0, ends at N and never decreases; return the
    longest segment. Reads the offsets on the host: in place on the CPU, one device-to-host copy
    elsewhere; the checks are a few NumPy operations whatever S."""
    cu = host_offsets(cu_seqlens)
    if cu is None:
        cu = cu_seqlens.detach().to("cpu").numpy()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {int(cu[0])}")
    if int(cu[-1]) != N:
        raise ValueError(
            f"cu_seqlens: expected cu_seqlens[-1] == N == {N} (tokens in hidden), got {int(cu[-1])}"
        )
    if cu.shape[0] == 1:
        return 0
    # int64: a difference of two int32 offsets can overflow int32 when they are malformed. (Not
    # np.diff: a Python function, a sizeable share of a small call's host cost.)
    lengths = np.subtract(cu[1:], cu[:-1], dtype=np.int64)
    if lengths.min() < 0:
        i = int(np.argmax(lengths < 0))
        raise ValueError(
            f"cu_seqlens: expected non-decreasing offsets, got cu_seqlens[{i + 1}] = {int(cu[i + 1])} "
            f"< cu_seqlens[{i}] = {int(cu[i])}"
        )
    return int(lengths.max())


def validate_packed(
    hidden: object,
    mask: object,
    cu_seqlens: object,
    max_seqlen: object,
    weights: object,
    backend: str,
) -> PackedInput:
    """Check a packed batch and bring it to (N, d) / (S + 1,) / (N,) views (no copies).

    The offsets' values are checked on the host (one sync) unless ``max_seqlen`` is given for a
    CUDA tensor on the Triton backend, which then runs without any host-device sync; there the
    kernels clamp every offset into [0, N] so malformed offsets can never read or write out of
    bounds, but the result is unspecified (gradient rows of tokens no sequence covers are not
    written). Under torch.compile and torch.func transforms the check runs inside the op, on the
    real offsets.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor of shape (N, d), got {type(hidden).__name__}")
    nested_max = None
    if hidden.is_nested:
        hidden, cu_seqlens, nested_max = _unwrap_nested(hidden, cu_seqlens)
    # Inline tests on the common path (host cost); the helpers raise, or handle symbolic sizes.
    if hidden.layout is not torch.strided:
        check_dense("hidden", hidden)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden: expected dtype float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() == 3 and hidden.shape[0] == 1:
        hidden = hidden[0]
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden: expected (N, d) or (1, N, d) with cu_seqlens, got shape {tuple(hidden.shape)}"
        )
    N = hidden.shape[0]
    if mask is not None:
        raise ValueError(
            "mask: expected None for packed input (cu_seqlens or a nested tensor: no padding), got a mask"
        )
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            f"cu_seqlens: expected a torch.Tensor of shape (S + 1,), got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.layout is not torch.strided:
        check_dense("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in OFFSET_DTYPES:
        raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens: expected shape (S + 1,) with S >= 0, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(
            f"cu_seqlens: expected device {hidden.device} (hidden's device), got {cu_seqlens.device}"
        )
    S = cu_seqlens.shape[0] - 1
    # Under torch.compile / torch.export only the op checks the (maybe symbolic) sizes.
    if not torch.compiler.is_compiling() and (
        type(S) is not int or type(N) is not int or S >= MAX_BATCH or N > MAX_SEQUENCE_LENGTH
    ):
        check_size_limits(S, N, packed=True)
    # The kernels read the offsets with unit stride; a copy costs S + 1 integers at most.
    cu_seqlens = cu_seqlens.contiguous()
    if max_seqlen is None:
        max_seqlen = nested_max
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(f"max_seqlen: expected a Python int or None, got {max_seqlen!r}")
        if max_seqlen < 0:
            raise ValueError(f"max_seqlen: expected a non-negative int, got {max_seqlen}")
        # No sequence is longer than N <= MAX_SEQUENCE_LENGTH: a larger bound says no more, and the
        # custom ops take it as an int64 (2**63 would not convert under torch.compile).
        max_seqlen = min(max_seqlen, MAX_SEQUENCE_LENGTH)
    trusted = max_seqlen is not None and hidden.device.type == "cuda" and backend == "triton"
    weights = _unwrap_weights(weights, N, hidden.device, cu_seqlens, trusted)
    check = not trusted
    # Meta tensors hold no values: only shapes come out (the custom op's fake kernel).
    if hidden.is_meta:
        check = False
    # Under torch.compile and torch.func (vmapped offsets hold no readable values) the op checks.
    if check and not torch.compiler.is_compiling() and not transforms.active():
        max_seqlen = check_offsets(cu_seqlens, N)  # the real longest: a better launch hint
        check = False
    hidden, weights = resolve_negative(hidden), resolve_negative(weights)
    return PackedInput(hidden, cu_seqlens, weights, -1 if max_seqlen is None else max_seqlen, check)
