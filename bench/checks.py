"""Correctness gate run before anything is timed: a wrong answer is never reported as a speedup.

Every provider's output is compared with the eager idiom (mean, max, mean+max). For cls and last
the eager idiom itself is wrong under left padding and holes (``h[:, 0]`` and ``h[b, count - 1]``
pick padding), so fastpool is compared with a correct gather of the first / last real token
instead, and the eager idiom's own correctness is only recorded (``matches_reference`` column).
torch.compile must reproduce the eager idiom it compiles, right or wrong. A mismatch raises
(sentence-transformers, a third-party layout, is dropped from the run with a loud note instead).

Packed cases: fastpool is compared with a float64 segment reduction of the offsets
(``packed_reference``), and every baseline (index_add, loop) with fastpool; gradients with the
exact mean gradient, or per-sequence sums of the gradient for max. Any mismatch raises.
"""

from __future__ import annotations

from collections.abc import Callable

import attention_global
import torch
from providers import EAGER, Provider, eager_max, eager_mean, segment_ids
from shapes import MODES_OF, OPS, PACKED_OPS, Case, PackedBatch, seed_of

HALF = (torch.float16, torch.bfloat16)


class MismatchError(AssertionError):
    """A provider disagreed with what it must reproduce."""


def tolerance(dtype: torch.dtype, mode: str) -> dict[str, float]:
    """Exact for selections (max, cls, last); loose for sums, whose order differs per provider.

    "grad-sum" compares gradients summed over T: in half precision the token holding the max gets
    bf16(g_mean / n + g_max), rounded at |g_max|'s scale, so allow a few ulps of |g| ~ 3.
    """
    if mode in ("max", "cls", "last"):
        return {"rtol": 0.0, "atol": 0.0}
    if dtype in HALF:
        return {"rtol": 2e-2, "atol": 6e-2 if mode == "grad-sum" else 1e-2}
    return {"rtol": 1e-4, "atol": 1e-4 if mode == "grad-sum" else 1e-5}


def correct_reference(op: str, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The right answer: the eager mean / max idioms, and a real gather for cls / last."""
    B, T, _ = h.shape
    positions = torch.arange(T, device=h.device)
    real = mask != 0
    rows = torch.arange(B, device=h.device)
    pieces = []
    for mode in OPS[op]:
        if mode == "mean":
            pieces.append(eager_mean(h, mask))
        elif mode == "max":
            pieces.append(eager_max(h, mask))
        elif mode == "cls":
            pieces.append(h[rows, torch.where(real, positions, T).amin(1)])
        else:
            pieces.append(h[rows, torch.where(real, positions, -1).amax(1)])
    return torch.cat(pieces, dim=1)


def mismatch(
    actual: torch.Tensor,
    expected: torch.Tensor,
    op: str,
    what: str,
    modes: tuple[str, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> str | None:
    """None when ``actual`` matches ``expected`` block by block (one (B, d) block per mode of op;
    ``modes`` overrides the tolerance of each block, ``dtype`` the precision it is judged by)."""
    if actual.shape != expected.shape:
        return f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    n = len(MODES_OF[op])
    for mode, a, e in zip(modes or MODES_OF[op], actual.chunk(n, 1), expected.chunk(n, 1), strict=True):
        try:
            torch.testing.assert_close(a, e, **tolerance(dtype or actual.dtype, mode))
        except AssertionError as exc:
            return f"{what} ({mode} block): {exc}"
    return None


def check_forward(
    case: Case, providers: list[Provider], h: torch.Tensor, mask: torch.Tensor
) -> dict[str, bool]:
    """Check every provider's forward; returns {provider: matches the correct reference}."""
    if case.op in attention_global.EAGER:
        return attention_global.check_forward(case, providers, h, mask)
    if case.packed is not None:
        return check_packed_forward(case, providers, h, mask)
    op = case.op
    with torch.no_grad():
        eager_out = EAGER[op](h, mask)
        reference = correct_reference(op, h, mask)
        matches: dict[str, bool] = {}
        for p in providers:
            if p.unavailable():
                continue
            out = p.first_call(lambda p=p: p.fn(op)(p.prepare(h), mask))
            if out is None:
                continue
            out = p.canonical(op, out)
            matches[p.name] = mismatch(out, reference, op, p.name) is None
            # What each provider must reproduce: fastpool the right answer; compile the idiom it
            # compiles; sentence-transformers the idiom for mean / max (its cls is position 0 too).
            if p.name == "fastpool":
                target = reference
            elif p.name == "compile" or op not in ("cls", "last"):
                target = eager_out
            else:
                continue
            error = mismatch(
                out, target, op, f"{p.name} vs {'reference' if target is reference else 'eager'}"
            )
            if error and p.name == "sentence-transformers":
                # Third-party output whose layout may change between versions: drop it, loudly,
                # rather than end a long GPU run; a wrong fastpool or compile result still raises.
                p.disable(f"MISMATCH on {case.label}: {error}")
                del matches[p.name]
            elif error:
                raise MismatchError(f"{case.label}: {error}")
    return matches


def check_backward(case: Case, providers: list[Provider], h: torch.Tensor, mask: torch.Tensor) -> None:
    """Check gradients against the eager idiom's: whole for mean, summed over T otherwise.

    Summing over T makes the check blind to which of two tied maxima gets the gradient (CUDA's
    max does not promise the first), and to eager cls / last picking the wrong token; fastpool's
    gradient must also be exactly zero at every padding position.
    """
    if case.op in attention_global.EAGER:
        attention_global.check_backward(case, providers, h, mask)
        return
    if case.packed is not None:
        check_packed_backward(case, providers, h, mask)
        return
    op = case.op
    g = grad_output(case, h)

    def grad_of(fn: Callable) -> torch.Tensor:
        hg = h.detach().requires_grad_()
        (grad,) = torch.autograd.grad(fn(hg, mask), hg, g)
        return grad

    expected = grad_of(EAGER[op])
    for p in providers:
        if p.unavailable() or "fwd+bwd" not in p.passes or p.name == "eager":
            continue
        grad = p.first_call(lambda p=p: grad_of(p.fn(op)))
        if grad is None:
            continue
        if op == "mean":
            error = mismatch(grad, expected, "mean", f"{p.name} grad")
        else:
            error = mismatch(
                grad.float().sum(1),
                expected.float().sum(1),
                "mean",
                f"{p.name} grad summed over T",
                modes=("grad-sum",),
                dtype=grad.dtype,
            )
        if error is None and p.name == "fastpool":
            leaked = grad.masked_select((mask == 0)[..., None]).abs()
            if leaked.numel() and float(leaked.max()) != 0.0:
                error = f"fastpool grad nonzero at padding (max {float(leaked.max())})"
        if error:
            raise MismatchError(f"{case.label}: {error}")


def grad_output(case: Case, h: torch.Tensor) -> torch.Tensor:
    """A fixed random grad_out (B or S, n_modes * d): a gradient of ones could hide a layout bug."""
    gen = torch.Generator(device=h.device).manual_seed(seed_of("grad", case.op, case.input_key))
    shape = (case.B, len(MODES_OF[case.op]) * case.d)
    return torch.randn(shape, generator=gen, device=h.device, dtype=h.dtype)


# --- Packed input ---------------------------------------------------------------------------------
REFERENCE_CHUNK = 2**24  # elements of hidden converted to float64 at a time (128 MiB)


def packed_reference(op: str, h: torch.Tensor, pk: PackedBatch) -> torch.Tensor:
    """The right answer for a packed op: every sequence's mean / max in float64, token chunk by
    token chunk (bounded memory on GB-sized inputs), cast to hidden's dtype once."""
    N, d = h.shape
    lengths, seg = segment_ids(pk, N)
    (mode,) = PACKED_OPS[op]
    acc = torch.zeros((pk.S, d), dtype=torch.float64, device=h.device)
    if mode == "max":
        acc.fill_(float("-inf"))
    step = max(1, REFERENCE_CHUNK // max(d, 1))
    for start in range(0, N, step):
        x, s = h[start : start + step].double(), seg[start : start + step]
        if mode == "mean":
            acc.index_add_(0, s, x)
        else:
            acc.scatter_reduce_(0, s[:, None].expand(-1, d), x, "amax")
    if mode == "mean":
        acc /= lengths.clamp(min=1)[:, None]
    else:
        acc[lengths == 0] = 0.0
    return acc.to(h.dtype)


def check_packed_forward(
    case: Case, providers: list[Provider], h: torch.Tensor, pk: PackedBatch
) -> dict[str, bool]:
    """fastpool against the float64 reference, then every other provider against fastpool."""
    op = case.op
    with torch.no_grad():
        reference = packed_reference(op, h, pk)
        outputs: dict[str, torch.Tensor] = {}
        for p in providers:
            if p.unavailable():
                continue
            out = p.first_call(lambda p=p: p.fn(op)(p.prepare(h), pk))
            if out is not None:
                outputs[p.name] = p.canonical(op, out)
        if "fastpool" not in outputs:
            raise MismatchError(f"{case.label}: fastpool is the reference of packed cases; it did not run")
        matches = {}
        for name, out in outputs.items():
            error = mismatch(out, reference, op, f"{name} vs float64 reference")
            matches[name] = error is None
            if name != "fastpool":  # a baseline must give fastpool's answer (its own code is under test)
                error = mismatch(out, outputs["fastpool"], op, f"{name} vs fastpool")
            if error:
                raise MismatchError(f"{case.label}: {error}")
    return matches


def check_packed_backward(case: Case, providers: list[Provider], h: torch.Tensor, pk: PackedBatch) -> None:
    """Gradients: mean against the exact g[s] / len(s) on every token of sequence s; max summed per
    sequence against g (blind to which tied maximum gets it: index_add's backward splits it among
    ties), and fastpool's max gradient must sit on one maximal token per sequence and feature."""
    op = case.op
    (mode,) = PACKED_OPS[op]
    g = grad_output(case, h)
    lengths, seg = segment_ids(pk, h.shape[0])

    def grad_of(fn: Callable) -> torch.Tensor:
        hg = h.detach().requires_grad_()
        (grad,) = torch.autograd.grad(fn(hg, pk), hg, g)
        return grad

    expected = None
    if mode == "mean":
        expected = (g.float() / lengths.clamp(min=1)[:, None])[seg].to(h.dtype)
    for p in providers:
        if p.unavailable() or "fwd+bwd" not in p.passes:
            continue
        grad = p.first_call(lambda p=p: grad_of(p.fn(op)))
        if grad is None:
            continue
        if expected is not None:
            error = mismatch(grad, expected, "mean", f"{p.name} grad")
        else:
            sums = torch.zeros((pk.S, h.shape[1]), dtype=torch.float32, device=h.device)
            sums.index_add_(0, seg, grad.float())
            error = mismatch(
                sums, g.float(), "mean", f"{p.name} grad summed per sequence", modes=("grad-sum",),
                dtype=grad.dtype,
            )  # fmt: skip
        if error is None and p.name == "fastpool" and mode == "max":
            nonzero = grad != 0
            hits = int(nonzero.sum())
            on_max = bool((h[nonzero] == packed_reference(op, h, pk)[seg][nonzero]).all())
            if hits != int((g[lengths > 0] != 0).sum()) or not on_max:
                error = f"fastpool max grad: {hits} nonzero entries, all on a maximum: {on_max}"
        if error:
            raise MismatchError(f"{case.label}: {error}")
