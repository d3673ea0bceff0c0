"""Launch-parameter sweep of the forward and backward kernels on one large shape (GPU only).

Times fastpool with launch parameters other than the defaults (pipelining depth, warps, programs
per row, lanes; backward tiles), side by side with the defaults, so they are chosen from
measurements: ``python bench/sweep_tiles.py``. Prints one CSV line per (pass, op, config) with the
median time and GB/s. (``lanes`` changes the summation order, i.e. the bits; the others do not.)
"""

import argparse
import functools

import torch
import triton.testing

import fastpool
from fastpool import launch

FWD_CONFIGS = [
    dict(), dict(num_stages=2), dict(num_stages=3), dict(num_stages=6), dict(num_warps=8),
    dict(lanes=16), dict(lanes=16, num_warps=8), dict(chunks_per_program=1), dict(chunks_per_program=4),
]  # fmt: skip
BWD_CONFIGS = [
    dict(),
    dict(block_t=8),
    dict(block_t=32),
    dict(block_t=32, num_warps=8),
    dict(block_t=64, num_warps=8),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 4096, 4096])
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    B, T, d = args.shape
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(B, T, d, device="cuda", dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.int64, device="cuda")
    grad_out = torch.randn(B, d, device="cuda", dtype=dtype)
    size = hidden.numel() * hidden.element_size()
    print(f"# {torch.cuda.get_device_name()} shape={args.shape} {args.dtype} bytes={size}")
    print("pass,op,config,median_ms,GBps")
    for op in ("mean", "max"):
        for cfg in FWD_CONFIGS:
            with launch.config_override(**cfg), torch.no_grad():
                run = functools.partial(fastpool.pool, hidden, mask, mode=op)
                ms = triton.testing.do_bench(run, warmup=10, rep=50)
            print(f"fwd,{op},{cfg or 'heuristic'},{ms:.4f},{size / ms / 1e6:.0f}".replace(", ", ";"))
    for op in ("mean", "max"):
        _, argmax, stats, _, wsum, _, prefix = torch.ops.fastpool.pool_fwd(
            hidden, mask, None, op, "triton", -1.0, True, True
        )
        for cfg in BWD_CONFIGS:
            with launch.config_override(**cfg):
                run = functools.partial(
                    torch.ops.fastpool.pool_bwd,
                    grad_out,
                    mask,
                    None,
                    argmax,
                    stats,
                    wsum,
                    prefix,
                    T,
                    dtype,
                    op,
                    "triton",
                )
                ms = triton.testing.do_bench(run, warmup=10, rep=50)
            print(f"bwd,{op},{cfg or 'heuristic'},{ms:.4f},{size / ms / 1e6:.0f}".replace(", ", ";"))


if __name__ == "__main__":
    main()
