#!/usr/bin/env python
"""CPU: the eager backend's two max paths side by side, forward only.

    python bench/eager_max_paths.py            # 1 thread, thread CPU time (as the default preset)

``fastpool.max_pool`` today always asks the eager backend for max positions (``ops`` cannot yet
say that neither indices nor a gradient are needed). ``eager.pool_forward(..., need_indices=False)``
is the values-only path ``ops`` will take for a no-grad forward without ``return_indices``. This
times both next to the eager idiom and ``torch.compile`` of it, on the default preset's shapes,
interleaved (``timing.measure_interleaved``), and prints one line per case.
"""

from __future__ import annotations

import argparse
import sys

import torch
from providers import EAGER
from shapes import CPU_SHAPES, uniform
from timing import measure_interleaved

from fastpool import eager, eager_packed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for B, T, d in CPU_SHAPES:
                h = torch.randn(B, T, d, generator=torch.Generator().manual_seed(0)).to(dtype)
                mask = torch.ones(B, T, dtype=torch.int64)
                for op, modes in (("max", ["max"]), ("mean+max", ["mean", "max"])):
                    report(f"{op} fwd {dtype} {B}x{T}x{d}", padded_case(h, mask, op, modes))
            for shape in (uniform(32, 128, 256), uniform(32, 256, 768)):
                lengths = shape.lengths()
                cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
                h = torch.randn(int(cu[-1]), shape.d, generator=torch.Generator().manual_seed(1)).to(dtype)
                report(f"packed_max fwd {dtype} {shape.label}", packed_case(h, cu, lengths))
    return 0


def padded_case(h: torch.Tensor, mask: torch.Tensor, op: str, modes: list[str]) -> dict:
    compiled = torch.compile(EAGER[op], dynamic=False)
    compiled(h, mask)
    return measure_interleaved({
        "values only": lambda: eager.pool_forward(h, mask, modes, need_indices=False),
        "with positions": lambda: eager.pool_forward(h, mask, modes),
        "eager idiom": lambda: EAGER[op](h, mask),
        "compile": lambda: compiled(h, mask),
    })  # fmt: skip


def packed_case(h: torch.Tensor, cu: torch.Tensor, lengths: torch.Tensor) -> dict:
    S, d = lengths.shape[0], h.shape[1]
    seg = torch.repeat_interleave(torch.arange(S), lengths, output_size=h.shape[0])
    return measure_interleaved({
        "values only": lambda: eager_packed.pool_forward(h, cu, ["max"], need_indices=False),
        "with positions": lambda: eager_packed.pool_forward(h, cu, ["max"]),
        "scatter_reduce": lambda: torch.zeros(S, d, dtype=h.dtype).scatter_reduce(
            0, seg[:, None].expand(-1, d), h, "amax", include_self=False
        ),
    })  # fmt: skip


def report(label: str, timings: dict) -> None:
    base = timings["values only"].median_ms
    cells = [f"{name} {t.median_ms:.3f} ms ({t.median_ms / base:.2f}x)" for name, t in timings.items()]
    print(f"{label}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
