"""The fastpool:: custom ops under torch.library.opcheck and torch.compile(fullgraph=True)."""

import os

import pytest
import torch
from helpers import kernel_config, make_mask
from torch._dynamo.testing import CompileCounter

import fastpool

ALL_MODES = ["mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean"]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize(
    "modes,normalize_eps",
    [
        ("mean", -1.0), ("max", -1.0), ("cls,last", -1.0), ("last,max,mean_sqrt_len,mean,cls", -1.0),
        ("weighted_mean,max", -1.0), ("last,max,mean_sqrt_len,mean,cls", 1e-12), ("mean", 0.5),
    ],
)  # fmt: skip
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_opcheck(device, backend_name, modes, normalize_eps, with_mask):
    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(3, 7, 5, generator=gen).to(device).requires_grad_()
    mask = make_mask("holes", 3, 7, gen).to(device) if with_mask else None
    with kernel_config("small-blocks" if backend_name == "triton" else "default"):
        # Without positions (no indices, no gradient wanted): values only, no autograd.
        no_positions = (hidden.detach(), mask, None, modes, backend_name, normalize_eps, False, False)
        torch.library.opcheck(torch.ops.fastpool.pool_fwd.default, no_positions)
        fwd_args = (hidden, mask, None, modes, backend_name, normalize_eps, True, True)
        torch.library.opcheck(torch.ops.fastpool.pool_fwd.default, fwd_args)
        out, argmax, stats, _, wsum, _, prefix = torch.ops.fastpool.pool_fwd(hidden.detach(), *fwd_args[1:])
        grad_out = torch.randn_like(out)
        torch.library.opcheck(
            torch.ops.fastpool.pool_bwd.default,
            (grad_out, mask, None, argmax, stats, wsum, prefix, 7, hidden.dtype, modes, backend_name),
        )


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_opcheck_with_user_weights(device, backend_name):
    gen = torch.Generator().manual_seed(24)
    hidden = torch.randn(3, 7, 5, generator=gen).to(device).requires_grad_()
    weights = torch.rand(3, 7, generator=gen).to(device).requires_grad_()
    mask = make_mask("holes", 3, 7, gen).to(device)
    modes = "max,weighted_mean"
    with kernel_config("small-blocks" if backend_name == "triton" else "default"):
        fwd_args = (hidden, mask, weights, modes, backend_name, 1e-12, True, True)
        torch.library.opcheck(torch.ops.fastpool.pool_fwd.default, fwd_args)
        constants = (hidden.detach(), mask, weights.detach(), *fwd_args[3:])
        out, argmax, stats, _, wsum, wmean, prefix = torch.ops.fastpool.pool_fwd(*constants)
        grad_out = torch.randn_like(out)
        torch.library.opcheck(
            torch.ops.fastpool.pool_bwd.default,
            (
                grad_out,
                mask,
                weights.detach(),
                argmax,
                stats,
                wsum,
                prefix,
                7,
                hidden.dtype,
                modes,
                backend_name,
            ),
        )
        torch.library.opcheck(
            torch.ops.fastpool.weights_bwd.default,
            (grad_out[:, 5:], hidden.detach(), mask, weights.detach(), wsum, wmean, False, backend_name),
        )


def pool_loss(hidden, mask):
    out = fastpool.pool(hidden, mask, mode=ALL_MODES)
    return (out * out).sum()


def check_compiled_matches_eager(compiled, hidden, mask):
    loss = compiled(hidden, mask)
    (grad,) = torch.autograd.grad(loss, hidden)
    ref_loss = pool_loss(hidden, mask)
    (ref_grad,) = torch.autograd.grad(ref_loss, hidden)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fullgraph_compile_matches_eager_without_recompiling_per_shape(device, backend_name):
    counter = CompileCounter()
    compiled = torch.compile(pool_loss, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(22)
    with (
        fastpool.use_backend(backend_name),
        kernel_config("small-blocks" if backend_name == "triton" else "default"),
    ):
        for B, T in [(2, 5), (3, 7), (4, 9), (5, 12)]:
            hidden = torch.randn(B, T, 6, generator=gen).to(device).requires_grad_()
            mask = make_mask("holes", B, T, gen).to(device)
            check_compiled_matches_eager(compiled, hidden, mask)
    # One static graph for the first shape, one dynamic graph for all the others.
    assert counter.frame_count <= 2


def test_inductor_fullgraph_compile(device):
    compiled = torch.compile(pool_loss, fullgraph=True)
    gen = torch.Generator().manual_seed(23)
    hidden = torch.randn(3, 6, 4, generator=gen).to(device).requires_grad_()
    mask = make_mask("right", 3, 6, gen).to(device)
    with fastpool.use_backend("torch"):
        check_compiled_matches_eager(compiled, hidden, mask)


def weighted_loss(hidden, mask, weights):
    out = fastpool.pool(hidden, mask, mode=["mean", "weighted_mean"], weights=weights)
    return (out * out).sum()


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fullgraph_compile_with_user_weights(device, backend_name):
    counter = CompileCounter()
    compiled = torch.compile(weighted_loss, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(25)
    with (
        fastpool.use_backend(backend_name),
        kernel_config("small-blocks" if backend_name == "triton" else "default"),
    ):
        for B, T in [(2, 5), (3, 7), (4, 9)]:
            hidden = torch.randn(B, T, 6, generator=gen).to(device).requires_grad_()
            weights = torch.rand(B, T, generator=gen).to(device).requires_grad_()
            mask = make_mask("holes", B, T, gen).to(device)
            loss = compiled(hidden, mask, weights)
            grads = torch.autograd.grad(loss, (hidden, weights))
            ref = weighted_loss(hidden, mask, weights)
            ref_grads = torch.autograd.grad(ref, (hidden, weights))
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(grads, ref_grads)
    assert counter.frame_count <= 2


_FRESH_PROCESS_COMPILE = """
import contextlib, os, sys
import torch
import fastpool
from torch._dynamo.testing import CompileCounter

counts = []
triton_runs = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
for backend in (None, "triton" if triton_runs else None):
    counter = CompileCounter()
    f = torch.compile(lambda h, m: fastpool.mean_pool(h, m) * 1, fullgraph=True, backend=counter)
    with fastpool.use_backend(backend) if backend else contextlib.nullcontext():
        for _ in range(3):
            device = sys.argv[1]
            f(torch.randn(2, 5, 4, device=device), torch.ones(2, 5, dtype=torch.bool, device=device))
    counts.append(counter.frame_count)
print(counts)
"""


def test_a_fresh_process_compiles_once_whatever_selects_the_backend(device):
    """fastpool's own caches (backend names from FASTPOOL_BACKEND, device kinds) are filled by the first
    traced call: read while compiling they made torch.compile guard on them and recompile once."""
    import subprocess
    import sys

    env = {**os.environ, "FASTPOOL_BACKEND": "torch"}
    result = subprocess.run(
        [sys.executable, "-P", "-c", _FRESH_PROCESS_COMPILE, device], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[1, 1]"
