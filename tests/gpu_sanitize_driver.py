"""Drive every kernel path on a CUDA device, for compute-sanitizer (memcheck, racecheck).

Not a pytest module: ``compute-sanitizer --tool memcheck python tests/gpu_sanitize_driver.py``.
Covers every dtype, mask layout and dtype, fused and single modes, forced and heuristic T-splits,
strided inputs, empty dimensions and empty rows, forward and backward. Exits non-zero on a wrong
result (against the eager backend), prints OK otherwise.
"""

import argparse
import sys

import torch

import fastpool
from fastpool import launchers

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
        results = []
        for backend, override in (("torch", {}), ("triton", {}), ("triton", {"n_splits": 3})):
            with fastpool.use_backend(backend), launchers.config_override(**override):
                out = fastpool.pool(hidden, mask, mode=modes)
                grad = torch.autograd.grad(out, hidden, torch.ones_like(out))[0] if out.numel() else None
            results.append((out, grad))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        tol = {"rtol": 2e-2, "atol": 2e-2}
        for out, grad in results[1:]:
            torch.testing.assert_close(out, results[0][0], **tol)
            if grad is not None:
                torch.testing.assert_close(grad, results[0][1], **tol)
        checked += 1
    print(f"OK {checked} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
