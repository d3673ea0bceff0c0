"""Attention pooling and global pooling of feature maps in the benchmark: inputs, the torch
formulations users write today, checks and byte counts.

* ``attention``: hidden (B, T, d) with a padding mask (bench/shapes.make_mask) and one score per
  token, (B, T) in hidden's dtype, fed to providers as an ``AttentionInputs`` in place of the
  mask. The eager idiom masks the scores with -inf, takes ``torch.softmax`` over T and sums the
  (B, T, d) product ``p[..., None] * hidden`` over T. Training passes differentiate both hidden
  and the scores (a learned scorer needs the latter).
* ``global_mean`` / ``global_max``: x (B, C, H, W), NCHW-contiguous or channels_last (the case's
  layout), no mask (providers get None). The eager idioms are ``nn.AdaptiveAvgPool2d(1)`` +
  flatten (ResNet's head) and ``x.flatten(2).amax(-1)``.

``torch.compile`` of those idioms is the "compile" provider. Checks: fastpool against a float64
reference, eager against the same reference (recorded), compile against eager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from shapes import ATTENTION_OPS, DTYPES, GLOBAL_OPS, Case, make_mask, seed_of

import fastpool


@dataclass(frozen=True)
class AttentionInputs:
    """What an attention case feeds every provider in place of the mask."""

    mask: torch.Tensor  # (B, T) int64, 1 = real token; every row has one
    scores: torch.Tensor  # (B, T) in hidden's dtype


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, AttentionInputs | None]:
    """Seeded randn inputs: (hidden, AttentionInputs) for attention, (x, None) for global pooling."""
    dtype = DTYPES[case.dtype]
    if case.op in GLOBAL_OPS:
        B, C, (H, W) = case.B, case.d, case.spatial
        gen = torch.Generator(device=device).manual_seed(seed_of("global", case.input_key))
        if case.layout == "channels_last":
            x = torch.randn((B, H, W, C), generator=gen, device=device, dtype=dtype).permute(0, 3, 1, 2)
        else:
            x = torch.randn((B, C, H, W), generator=gen, device=device, dtype=dtype)
        return x, None
    seed = seed_of("attention", case.B, case.T, case.d, case.dtype, case.padding, case.layout)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn((case.B, case.T, case.d), generator=gen, device=device, dtype=dtype)
    scores = 2 * torch.randn((case.B, case.T), generator=gen, device=device, dtype=dtype)
    mask = make_mask(case.B, case.T, case.padding, case.layout, seed).to(device)
    return hidden, AttentionInputs(mask, scores)


# --- The torch formulations ---------------------------------------------------------------------
def eager_attention(h: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
    p = torch.softmax(a.scores.masked_fill(a.mask == 0, float("-inf")), dim=1)
    return (p.unsqueeze(-1) * h).sum(1)


def eager_global_mean(x: torch.Tensor, _: None) -> torch.Tensor:
    return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)


def eager_global_max(x: torch.Tensor, _: None) -> torch.Tensor:
    return x.flatten(2).amax(-1)


EAGER = {"attention": eager_attention, "global_mean": eager_global_mean, "global_max": eager_global_max}


def fastpool_fn(op: str) -> Callable:
    if op in ATTENTION_OPS:
        return lambda h, a: fastpool.attention_pool(h, a.scores, a.mask)
    (mode,) = GLOBAL_OPS[op]
    return lambda x, _: fastpool.global_pool(x, mode)


# --- Timing, byte counts, padding ----------------------------------------------------------------
def timed_callable(pass_: str, fn: Callable, h: torch.Tensor, a: AttentionInputs, g: torch.Tensor):
    """run.timed_callable for attention: training passes take the gradients of hidden and scores."""
    if pass_ == "fwd":
        return lambda: fn(h, a)
    hg, sg = h.detach().requires_grad_(), a.scores.detach().requires_grad_()
    ag = AttentionInputs(a.mask, sg)
    if pass_ == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(hg, ag), (hg, sg), g)
    out = fn(hg, ag)
    return lambda: torch.autograd.grad(out, (hg, sg), g, retain_graph=True)


def padding_fraction(case: Case, inputs: AttentionInputs | None) -> float:
    return float((inputs.mask == 0).float().mean()) if case.op in ATTENTION_OPS else 0.0


def minimal_bytes(case: Case, inputs: AttentionInputs | None) -> int:
    """bench/traffic.py's minimal byte count of an attention or global pooling case."""
    from traffic import attention_minimal_bytes, global_minimal_bytes

    dtype = DTYPES[case.dtype]
    if case.op in GLOBAL_OPS:
        return global_minimal_bytes(case.pass_, case.B, case.d, case.T, dtype)
    return attention_minimal_bytes(case.pass_, case.B, case.T, case.d, dtype, inputs.mask)


# --- Checks --------------------------------------------------------------------------------------
def reference(op: str, h: torch.Tensor, inputs: AttentionInputs | None) -> torch.Tensor:
    """The right answer in float64, cast to the input's dtype."""
    x = h.double()
    if op == "global_mean":
        out = x.flatten(2).mean(-1)
    elif op == "global_max":
        out = x.flatten(2).amax(-1)
    else:
        p = torch.softmax(inputs.scores.double().masked_fill(inputs.mask == 0, float("-inf")), dim=1)
        out = torch.einsum("bt,btd->bd", p, x)
    return out.to(h.dtype)


def check_forward(case: Case, providers: list, h: torch.Tensor, inputs) -> dict[str, bool]:
    """fastpool against the float64 reference (raises on a mismatch), eager against it (recorded),
    compile against eager (raises)."""
    from checks import MismatchError, mismatch

    op = case.op
    with torch.no_grad():
        ref = reference(op, h, inputs)
        eager_out = EAGER[op](h, inputs)
        matches: dict[str, bool] = {}
        for p in providers:
            if p.unavailable():
                continue
            out = p.first_call(lambda p=p: p.fn(op)(p.prepare(h), inputs))
            if out is None:
                continue
            matches[p.name] = mismatch(out, ref, op, p.name, modes=(_mode(op),)) is None
            target = ref if p.name == "fastpool" else eager_out
            error = mismatch(out, target, op, f"{p.name} vs reference", modes=(_mode(op),))
            if error and p.name != "eager":
                raise MismatchError(f"{case.label}: {error}")
    return matches


def _mode(op: str) -> str:
    return "max" if op == "global_max" else "mean"


def check_backward(case: Case, providers: list, h: torch.Tensor, inputs) -> None:
    """Gradients against the eager idiom's: whole for attention (hidden and scores) and the mean,
    summed over the spatial positions for the max (amax splits a tie's gradient, fastpool gives it
    to the first maximum), and fastpool's attention gradient exactly zero at padding."""
    from checks import MismatchError, grad_output, mismatch

    op = case.op
    g = grad_output(case, h)

    def grads_of(fn: Callable) -> tuple[torch.Tensor, ...]:
        hg = h.detach().requires_grad_()
        if op not in ATTENTION_OPS:
            return torch.autograd.grad(fn(hg, inputs), hg, g)
        sg = inputs.scores.detach().requires_grad_()
        return torch.autograd.grad(fn(hg, AttentionInputs(inputs.mask, sg)), (hg, sg), g)

    expected = grads_of(EAGER[op])
    for p in providers:
        if p.unavailable() or "fwd+bwd" not in p.passes or p.name == "eager":
            continue
        grads = p.first_call(lambda p=p: grads_of(p.fn(op)))
        if grads is None:
            continue
        error = None
        for name, got, want in zip(("hidden", "scores"), grads, expected, strict=False):
            if op == "global_max":
                got, want = got.float().flatten(2).sum(-1), want.float().flatten(2).sum(-1)
                error = error or mismatch(got, want, "mean", f"{p.name} grad summed", ("grad-sum",), h.dtype)
            else:
                error = error or mismatch(
                    got, want, "mean", f"{p.name} grad of {name}", ("grad-sum",), h.dtype
                )
        if error is None and p.name == "fastpool" and op in ATTENTION_OPS:
            pad = inputs.mask == 0
            if bool(grads[0][pad].ne(0).any()) or bool(grads[1][pad].ne(0).any()):
                error = "fastpool attention gradient nonzero at padding"
        if error:
            raise MismatchError(f"{case.label}: {error}")
