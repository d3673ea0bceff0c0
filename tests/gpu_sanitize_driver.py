"""Drive every kernel path on a CUDA device, for compute-sanitizer (memcheck, racecheck).

Not a pytest module: ``compute-sanitizer --tool memcheck python tests/gpu_sanitize_driver.py``.
Covers every dtype, mask layout and dtype, fused and single modes, user weights (with their gradient),
rows held by one program and rows spread over programs (the in-launch ticket fold), the
normalisation epilogue over several feature blocks, inference calls (values-only max, outputs in
the workspace), strided inputs, empty dimensions and empty rows, forward and backward (the rank
prefixes of weighted_mean with a mask); packed batches (segment programs only, and window programs
for long segments, with and without the max_seqlen hint, empty and long sequences) and malformed
offsets on the unchecked path (must stay in bounds); repeated calls (``fastpool.express``). Exits
non-zero on a wrong result (against the eager backend), prints OK otherwise.
"""

import argparse
import sys

import torch

import fastpool
from fastpool import launch, packed_launchers

DEVICE = "cuda"


def cases(quick: bool, tiny: bool):
    dtypes = (
        [torch.bfloat16] if (quick or tiny) else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    )
    shapes = [(3, 37, 300), (1, 2048, 520), (0, 4, 8), (2, 0, 8), (2, 5, 0), (1, 1, 1)]
    layouts = ["none", "right", "left", "holes", "empty"]
    mode_sets = (
        ["mean"], ["max"], ["cls", "last"], ["weighted_mean"],
        ["last", "max", "mean_sqrt_len", "weighted_mean", "mean", "cls"],
    )  # fmt: skip
    if tiny:
        shapes, layouts, mode_sets = shapes[:2], ["right", "holes", "empty"], mode_sets[-1:]
    for dtype in dtypes:
        for shape in shapes:
            for layout in layouts:
                for modes in mode_sets:
                    yield dtype, shape, layout, modes


def make(dtype, shape, layout, gen):
    B, T, d = shape
    hidden = (
        torch.randn(B, d, T, generator=gen).to(dtype).transpose(1, 2).to(DEVICE)
        if B == 3
        else (torch.randn(B, T, d, generator=gen).to(dtype).to(DEVICE))
    )
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    pos = torch.arange(T)
    mask = {
        "none": None,
        "right": pos[None] < lengths[:, None],
        "left": pos[None] >= (T - lengths)[:, None],
        "holes": torch.rand(B, T, generator=gen) < 0.5,
        "empty": torch.zeros(B, T, dtype=torch.int64),
    }[layout]
    return hidden, None if mask is None else mask.to(DEVICE)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="bf16 only")
    parser.add_argument("--tiny", action="store_true", help="bf16, two shapes, fused modes only")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for dtype, shape, layout, modes in cases(args.quick, args.tiny):
        hidden, mask = make(dtype, shape, layout, gen)
        hidden.requires_grad_()
        weights = None
        if "weighted_mean" in modes and layout == "holes":
            weights = (torch.rand(shape[:2], generator=gen) + 0.5).to(dtype).to(DEVICE).requires_grad_()
        normalize = len(modes) > 1
        inputs = (hidden,) if weights is None else (hidden, weights)
        results = []
        for backend, override in (("torch", {}), ("triton", {}), ("triton", {"chunks_per_program": 1})):
            with fastpool.use_backend(backend), launch.config_override(**override):
                out = fastpool.pool(hidden, mask, mode=modes, weights=weights, normalize=normalize)
                grads = torch.autograd.grad(out, inputs, torch.ones_like(out)) if out.numel() else None
                with torch.no_grad():
                    inference = fastpool.pool(hidden, mask, mode=modes, weights=weights, normalize=normalize)
            results.append((out, grads, inference))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        tol = {"rtol": 2e-2, "atol": 2e-2}
        for out, grads, inference in results[1:]:
            torch.testing.assert_close(out, results[0][0], **tol)
            torch.testing.assert_close(inference, out, rtol=0, atol=0)
            if grads is not None:
                torch.testing.assert_close(grads, results[0][1], **tol)
        checked += 1
    checked += packed_cases(args.quick or args.tiny, gen)
    checked += repeated_cases(args.quick or args.tiny, gen)
    print(f"OK {checked} cases")
    return 0


def packed_cases(quick: bool, gen: torch.Generator) -> int:
    """Packed batches on every path, compared with the eager backend; malformed offsets unchecked."""
    length_sets = ([0, 5, 0, 300, 1, 2000, 0], [7], [0, 0], [1] * 500 + [3000])
    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    modes = ["last", "max", "mean_sqrt_len", "weighted_mean", "mean", "cls"]
    checked = 0
    for dtype in dtypes:
        for lengths in length_sets:
            cu = torch.tensor(
                [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE
            )
            N, d = int(cu[-1]), 264
            hidden = torch.randn(N, d, generator=gen).to(dtype).to(DEVICE).requires_grad_()
            weights = (torch.rand(N, generator=gen) + 0.5).to(dtype).to(DEVICE).requires_grad_()
            results = []
            runs = (("torch", {}, None), ("triton", {}, max(lengths)), ("triton", {}, None))
            for backend, override, hint in runs:
                with fastpool.use_backend(backend), launch.config_override(**override):
                    out = fastpool.pool(
                        hidden, mode=modes, cu_seqlens=cu, max_seqlen=hint, weights=weights, normalize=True
                    )
                    grad = (
                        torch.autograd.grad(out, (hidden, weights), torch.ones_like(out))
                        if out.numel()
                        else None
                    )
                results.append((out, grad))
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            for out, grad in results[1:]:
                torch.testing.assert_close(out, results[0][0], rtol=2e-2, atol=2e-2)
                if grad is not None:
                    torch.testing.assert_close(grad, results[0][1], rtol=2e-2, atol=2e-2)
            checked += 1
    # Malformed offsets straight into the launchers (what an unchecked max_seqlen call could pass).
    hidden = torch.randn(100, 264, device=DEVICE)
    bad = torch.tensor([0, 5000, 30, -9, 2**30, 100, 7], dtype=torch.int32, device=DEVICE)
    joined = ",".join(modes)
    for hint in (None, 10):
        out, argmax, stats, *_ = packed_launchers.pool_forward(
            hidden, bad, joined, None, hint, -1.0, True, True
        )
        packed_launchers.pool_backward(torch.ones_like(out), bad, argmax, stats, 100, hidden.dtype, joined)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return checked + 1


def repeated_cases(few: bool, gen: torch.Generator) -> int:
    """Repeated calls (``fastpool.express``: integer pointers straight to the compiled launcher): the same
    signature three times, training and inference, each result equal to the first (general) call's bits;
    a backward whose mask comes back from saved-tensor hooks (offloading) as a copy."""
    from fastpool import express

    express.forget()
    shapes = [(3, 37, 300), (1, 2048, 520)]
    mode_sets = (["mean"], ["max"], ["mean", "max"], ["last"]) if few else (
        ["mean"], ["max"], ["mean", "max"], ["cls"], ["last"], ["mean_sqrt_len"], ["weighted_mean"],
    )  # fmt: skip
    checked = 0
    for shape in shapes:
        for layout in ("none", "right", "holes"):
            for modes in mode_sets:
                hidden, mask = make(torch.bfloat16, shape, layout, gen)
                hidden.requires_grad_()
                g = torch.randn(shape[0], len(modes) * shape[2], generator=gen).to(torch.bfloat16).to(DEVICE)
                with fastpool.use_backend("triton"):
                    runs = []
                    for _ in range(3):
                        out = fastpool.pool(hidden, mask, mode=modes)
                        grad = torch.autograd.grad(out, hidden, g)[0] if out.numel() else None
                        with torch.no_grad():
                            inference = fastpool.pool(hidden, mask, mode=modes)
                        runs.append((out, grad, inference))
                    with torch.autograd.graph.save_on_cpu():
                        out = fastpool.pool(hidden, mask, mode=modes)
                    hooked = torch.autograd.grad(out, hidden, g)[0] if out.numel() else None
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                first = runs[0]
                for out, grad, inference in runs[1:]:
                    assert torch.equal(out, first[0]) and torch.equal(inference, first[2])
                    assert grad is None or torch.equal(grad, first[1])
                assert hooked is None or torch.equal(hooked, first[1])
                checked += 1
    # Compiled launchers exist on a GPU only (the interpreter has none: every call is general there).
    assert express._calls or DEVICE != "cuda", "no repeated call took the express path"
    return checked


if __name__ == "__main__":
    sys.exit(main())
