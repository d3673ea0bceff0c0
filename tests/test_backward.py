"""Gradients of every mode against the oracle, gradcheck in float64, and padding isolation."""

import oracle
import pytest
import torch
from helpers import MASK_KINDS, kernel_config, make_mask, np_mask, to_numpy
from tolerances import REDUCTION

import fastpool

ALL_MODES = ("mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean")


def oracle_grad(hidden, mask, modes, grad_out):
    d = hidden.shape[2]
    h, m, g = to_numpy(hidden), np_mask(mask), to_numpy(grad_out)
    total = 0.0
    for i, mode in enumerate(modes):
        total = total + oracle.pool_grad(h, m, mode, g[:, i * d : (i + 1) * d])
    return torch.from_numpy(total)


FUSED = ("last", "max", "mean_sqrt_len", "weighted_mean", "cls", "mean")


def grad_cases():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for mask_kind in MASK_KINDS:
            for modes in [(m,) for m in ALL_MODES] + [FUSED]:
                yield "torch", dtype, mask_kind, modes
                if dtype in (torch.float32, torch.bfloat16) or modes == FUSED:
                    yield "triton", dtype, mask_kind, modes


@pytest.mark.parametrize(
    "backend_name,dtype,mask_kind,modes",
    [pytest.param(*c, id=f"{c[0]}-{str(c[1])[6:]}-{c[2]}-{'+'.join(c[3])}") for c in grad_cases()],
)
def test_grad_matches_oracle(device, backend_name, dtype, mask_kind, modes):
    gen = torch.Generator().manual_seed(sum(map(ord, f"{dtype}{mask_kind}{modes}")))
    B, T, d = 4, 11, 19
    hidden = torch.randn(B, T, d, generator=gen).to(dtype).to(device).requires_grad_()
    mask = make_mask(mask_kind, B, T, gen)
    mask = None if mask is None else mask.to(device)
    grad_out = torch.randn(B, len(modes) * d, generator=gen).to(dtype).to(device)
    with (
        fastpool.use_backend(backend_name),
        kernel_config("small-blocks" if backend_name == "triton" else "default"),
    ):
        out = fastpool.pool(hidden, mask, mode=list(modes))
        (grad,) = torch.autograd.grad(out, hidden, grad_out)
    assert grad.shape == hidden.shape and grad.dtype == dtype
    expected = oracle_grad(hidden, mask, modes, grad_out).to(dtype)
    torch.testing.assert_close(grad.cpu(), expected, **REDUCTION[dtype])
    if mask is not None:
        assert torch.count_nonzero(grad[~mask.bool()]) == 0, "padding received gradient"


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("modes", [[m] for m in ALL_MODES] + [list(ALL_MODES)], ids="+".join)
def test_gradcheck_float64(device, backend_name, modes):
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], device=device)
    with (
        fastpool.use_backend(backend_name),
        kernel_config("small-blocks" if backend_name == "triton" else "default"),
    ):
        # fast_mode checks a random projection of the Jacobian: far fewer interpreter launches.
        assert torch.autograd.gradcheck(
            lambda h: fastpool.pool(h, mask, mode=modes), (hidden,), eps=1e-6, atol=1e-8, fast_mode=True
        )


def test_max_gradient_goes_to_the_first_of_equal_maxima(backend, device):
    hidden = torch.tensor([[[1.0], [3.0], [3.0], [3.0]]], device=device, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1]], device=device)
    fastpool.max_pool(hidden, mask).sum().backward()
    assert hidden.grad.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]


def test_empty_rows_and_garbage_padding_pass_zero_gradient(backend, device):
    hidden = torch.full((2, 5, 3), float("nan"), device=device)
    hidden[0, :2] = 1.0
    hidden.requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], device=device)
    with kernel_config("split-T" if backend == "triton" else "default"):
        out = fastpool.pool(hidden, mask, mode=["mean", "max", "cls", "last"])
        out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all()
    assert torch.isfinite(hidden.grad).all()
    assert torch.count_nonzero(hidden.grad[0, 2:]) == 0 and torch.count_nonzero(hidden.grad[1]) == 0
    # row 0: mean share 1/2 to both tokens, max/cls to token 0, last to token 1.
    assert hidden.grad[0, 0].tolist() == [2.5] * 3 and hidden.grad[0, 1].tolist() == [1.5] * 3


def test_grad_of_strided_hidden_and_non_contiguous_grad_out(backend, device):
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(3, 7, 9, generator=gen).to(device)
    hidden = base.transpose(1, 2).requires_grad_()  # (3, 9, 7), feature stride != 1
    mask = make_mask("holes", 3, 9, gen).to(device)
    grad_out = torch.randn(3, 2 * 7 * 2, generator=gen).to(device)[:, ::2]
    with kernel_config("small-blocks" if backend == "triton" else "default"):
        out = fastpool.pool(hidden, mask, mode=["mean", "max"])
        (grad,) = torch.autograd.grad(out, hidden, grad_out)
    torch.testing.assert_close(grad.cpu(), oracle_grad(hidden, mask, ("mean", "max"), grad_out).float())


def test_requires_grad_false_builds_no_graph(backend, device):
    hidden = torch.randn(2, 3, 4, device=device)
    assert not fastpool.mean_pool(hidden).requires_grad
