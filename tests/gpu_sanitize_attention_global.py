"""Drive the attention pooling and global pooling kernels on a CUDA device, for compute-sanitizer.

Not a pytest module: ``compute-sanitizer --tool memcheck python tests/gpu_sanitize_attention_global.py``
(``--device cpu`` with ``TRITON_INTERPRET=1`` runs it under the interpreter). Attention: dtypes, heads,
masks (none, holes, an empty row), strided hidden and scores, packed batches with empty and long
sequences and with malformed offsets on the unchecked path (must stay in bounds). Global pooling:
1-D/2-D/3-D maps in NCHW, channels_last, sliced and permuted layouts, forced chunking, 1 x 1 maps,
empty dims. Forward and backward, compared with the eager backend; exits non-zero on a mismatch.
"""

import argparse
import sys

import torch

import fastpool
from fastpool import attention_launchers, global_pool_launchers

TOL = {"rtol": 2e-2, "atol": 2e-2}


def _both_backends(fn, *tensors):
    """fn(*tensors) and its gradients on the torch and triton backends."""
    results = []
    for backend in ("torch", "triton"):
        with fastpool.use_backend(backend):
            inputs = [t.detach().requires_grad_() for t in tensors]
            out = fn(*inputs)
            grads = torch.autograd.grad(out, inputs, torch.ones_like(out)) if out.numel() else ()
        results.append((out, grads))
    return results


def _check(results) -> None:
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, **TOL)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TOL)


def attention_cases(device: str, quick: bool, gen: torch.Generator) -> int:
    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    checked = 0
    for dtype in dtypes:
        for B, T, d, heads in [(3, 37, 264, 1), (2, 300, 512, 4), (1, 1, 8, 8), (0, 5, 8, 2), (2, 0, 8, 2)]:
            hidden = torch.randn(B, d, T, generator=gen).to(dtype).to(device).transpose(1, 2)  # strided
            scores = torch.randn(B, heads, T, generator=gen).to(dtype).to(device).transpose(1, 2)
            mask = (torch.rand(B, T, generator=gen) < 0.6).to(device)
            if B:
                mask[0] = False
            for m in (None, mask):
                _check(_both_backends(lambda h, s, m=m: fastpool.attention_pool(h, s, m), hidden, scores))
                checked += 1
        for lengths in ([0, 5, 0, 300, 1, 2000, 0], [7], [0, 0]):
            cu = torch.tensor(
                [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device
            )
            N = int(cu[-1])
            hidden = torch.randn(N, 264, generator=gen).to(dtype).to(device)
            scores = torch.randn(N, 2, generator=gen).to(dtype).to(device)
            for hint in (None, max(lengths)):

                def run(h, s, cu=cu, hint=hint):
                    return fastpool.attention_pool(h, s, cu_seqlens=cu, max_seqlen=hint)

                _check(_both_backends(run, hidden, scores))
                checked += 1
    # Malformed offsets straight into the launchers (what an unchecked max_seqlen call could pass).
    hidden, scores = torch.randn(100, 264, device=device), torch.randn(100, 2, device=device)
    bad = torch.tensor([0, 5000, 30, -9, 2**30, 100, 7], dtype=torch.int32, device=device)
    out, m, total = attention_launchers.attention_pool_forward(hidden, scores, None, bad)
    attention_launchers.attention_pool_backward(
        torch.ones_like(out), hidden, scores, None, out, m, total, bad, 100
    )
    return checked + 1


def feature_map(shape, layout, dtype, device, gen):
    x = torch.randn(shape, generator=gen).to(dtype).to(device)
    if layout == "channels_last":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "sliced":
        big = (
            torch.randn([shape[0], 2 * shape[1], *(2 * n for n in shape[2:])], generator=gen)
            .to(dtype)
            .to(device)
        )
        return big[(slice(None), slice(None, None, 2), *(slice(None, None, 2) for _ in shape[2:]))]
    if layout == "permuted" and len(shape) > 3:
        return x.transpose(2, -1).contiguous().transpose(2, -1)
    return x


def global_cases(device: str, quick: bool, gen: torch.Generator) -> int:
    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    shapes = [
        (4, 96, 7, 7),
        (2, 64, 56, 56),
        (3, 300, 37),
        (2, 8, 3, 5, 7),
        (5, 33, 1, 1),
        (0, 4, 3, 3),
        (2, 0, 3),
    ]
    checked = 0
    for dtype in dtypes:
        for shape in shapes:
            for layout in ("contiguous", "channels_last", "sliced", "permuted"):
                x = feature_map(shape, layout, dtype, device, gen)
                for override in ({}, {"chunk_len": 16}):
                    global_pool_launchers.OVERRIDE.clear()
                    global_pool_launchers.OVERRIDE.update(override)
                    _check(_both_backends(lambda t: fastpool.global_pool(t, ["mean", "max"]), x))
                    checked += 1
    global_pool_launchers.OVERRIDE.clear()
    return checked


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="bf16 only")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    checked = attention_cases(args.device, args.quick, gen) + global_cases(args.device, args.quick, gen)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"OK {checked} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
