"""weighted_mean with user-given (B, T) token weights: forward, gradients to hidden and to the weights."""

import oracle
import pytest
import torch
from helpers import MASK_KINDS, kernel_config, make_mask, np_mask, to_numpy
from tolerances import REDUCTION

import fastpool

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def make_weights(B, T, gen, dtype=torch.float32):
    """Positive weights (row sums far from 0, so the comparison measures rounding, not cancellation)."""
    return (torch.rand(B, T, generator=gen) + 0.25).to(dtype)


def expected(hidden, mask, weights, modes, grad_out):
    """(out, grad of hidden, grad of weights) from the oracle, float64."""
    d = hidden.shape[2]
    h, m, w, g = to_numpy(hidden), np_mask(mask), to_numpy(weights), to_numpy(grad_out)
    outs, grad_h = [], 0.0
    for i, mode in enumerate(modes):
        outs.append(torch.from_numpy(oracle.pool(h, m, mode, w)))
        grad_h = grad_h + oracle.pool_grad(h, m, mode, g[:, i * d : (i + 1) * d], w)
    col = modes.index("weighted_mean") * d
    grad_w = oracle.weights_grad(h, m, w, g[:, col : col + d])
    return torch.cat(outs, 1), torch.from_numpy(grad_h), torch.from_numpy(grad_w)


def cases():
    for dtype in DTYPES:
        for mask_kind in MASK_KINDS:
            yield "torch", "default", dtype, mask_kind
            yield "triton", "small-blocks", dtype, mask_kind
    for mask_kind in MASK_KINDS:
        yield "triton", "split-T", torch.float32, mask_kind
        yield "triton", "default", torch.bfloat16, mask_kind


@pytest.mark.parametrize(
    "backend_name,config,dtype,mask_kind",
    [pytest.param(*c, id=f"{c[0]}-{c[1]}-{str(c[2])[6:]}-{c[3]}") for c in cases()],
)
def test_forward_and_gradients_match_oracle(device, backend_name, config, dtype, mask_kind):
    gen = torch.Generator().manual_seed(sum(map(ord, f"{dtype}{mask_kind}{config}")))
    B, T, d = 4, 13, 19
    modes = ("max", "weighted_mean", "mean")
    hidden = torch.randn(B, T, d, generator=gen).to(dtype).to(device).requires_grad_()
    weights = make_weights(B, T, gen, dtype).to(device).requires_grad_()
    mask = make_mask(mask_kind, B, T, gen)
    mask = None if mask is None else mask.to(device)
    grad_out = torch.randn(B, len(modes) * d, generator=gen).to(dtype).to(device)
    with fastpool.use_backend(backend_name), kernel_config(config):
        out = fastpool.pool(hidden, mask, mode=list(modes), weights=weights)
        grad_h, grad_w = torch.autograd.grad(out, (hidden, weights), grad_out)
    want_out, want_h, want_w = expected(hidden, mask, weights, modes, grad_out)
    tol = REDUCTION[dtype]
    torch.testing.assert_close(out.cpu(), want_out.to(dtype), **tol)
    torch.testing.assert_close(grad_h.cpu(), want_h.to(dtype), **tol)
    assert grad_w.dtype == dtype and grad_w.shape == (B, T)
    # The weights' gradient is a difference of dot products over d: its error scales with their size.
    scale = float(want_w.abs().max()) + 1.0
    torch.testing.assert_close(grad_w.cpu(), want_w.to(dtype), rtol=tol["rtol"], atol=tol["atol"] * scale)
    if mask is not None:
        padding = ~mask.bool()
        assert torch.count_nonzero(grad_h[padding]) == 0 and torch.count_nonzero(grad_w[padding]) == 0


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_gradcheck_float64_hidden_and_weights(device, backend_name):
    gen = torch.Generator().manual_seed(31)
    hidden = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weights = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], device=device)
    with (
        fastpool.use_backend(backend_name),
        kernel_config("small-blocks" if backend_name == "triton" else "default"),
    ):
        assert torch.autograd.gradcheck(
            lambda h, w: fastpool.pool(h, mask, mode=["weighted_mean", "max"], weights=w),
            (hidden, weights), eps=1e-6, atol=1e-7, fast_mode=True,
        )  # fmt: skip


def test_garbage_weights_at_padding_and_zero_sum_rows(backend, device):
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32, device=device).view(2, 4, 3).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0]], device=device)
    nan = float("nan")
    # Row 0: weights 2, -1, (NaN padding), 3; row 1: weights summing to exactly 0 over real tokens.
    weights = torch.tensor([[2.0, -1.0, nan, 3.0], [1.5, -1.5, float("inf"), nan]], device=device)
    weights.requires_grad_()
    with kernel_config("split-T" if backend == "triton" else "default"):
        out = fastpool.weighted_mean_pool(hidden, mask, weights)
        grad_h, grad_w = torch.autograd.grad(out.sum(), (hidden, weights))
    h = hidden.detach()
    row0 = (2 * h[0, 0] - h[0, 1] + 3 * h[0, 3]) / 4
    torch.testing.assert_close(out[0], row0)
    assert out[1].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    assert grad_h[0, :, 0].tolist() == [0.5, -0.25, 0.0, 0.75]
    assert torch.count_nonzero(grad_h[1]) == 0 and torch.count_nonzero(grad_w[1]) == 0
    want_w0 = [float((h[0, t] - row0).sum()) / 4 if t != 2 else 0.0 for t in range(4)]
    torch.testing.assert_close(grad_w[0].cpu(), torch.tensor(want_w0))


def test_strided_weights_and_hidden(backend, device):
    gen = torch.Generator().manual_seed(32)
    hidden = torch.randn(3, 8, 10, generator=gen).to(device).transpose(1, 2)  # (3, 10, 8)
    weights = make_weights(10, 3, gen).to(device).t()  # (3, 10), batch-minor
    mask = make_mask("holes", 3, 10, gen).to(device)
    with kernel_config("small-blocks" if backend == "triton" else "default"):
        out = fastpool.weighted_mean_pool(hidden, mask, weights)
    want = oracle.pool(to_numpy(hidden), np_mask(mask), "weighted_mean", to_numpy(weights))
    torch.testing.assert_close(out.cpu(), torch.from_numpy(want).float())


def test_only_the_weights_require_grad(backend, device):
    gen = torch.Generator().manual_seed(33)
    hidden = torch.randn(2, 5, 3, generator=gen).to(device)
    weights = make_weights(2, 5, gen).to(device).requires_grad_()
    with kernel_config("small-blocks" if backend == "triton" else "default"):
        out = fastpool.pool(hidden, None, mode="weighted_mean", weights=weights)
    assert out.requires_grad
    (grad_w,) = torch.autograd.grad(out.sum(), weights)
    want = oracle.weights_grad(to_numpy(hidden), None, to_numpy(weights), torch.ones(2, 3).double().numpy())
    torch.testing.assert_close(grad_w.cpu(), torch.from_numpy(want).float())


def test_position_weights_are_the_default(backend, device):
    gen = torch.Generator().manual_seed(34)
    hidden = torch.randn(2, 6, 4, generator=gen).to(device)
    mask = make_mask("left", 2, 6, gen).to(device)
    ranks = (torch.cumsum(mask.long(), 1) * mask).float()
    with kernel_config("small-blocks" if backend == "triton" else "default"):
        by_position = fastpool.weighted_mean_pool(hidden, mask)
        by_rank = fastpool.weighted_mean_pool(hidden, mask, ranks)
    torch.testing.assert_close(by_position, by_rank)
