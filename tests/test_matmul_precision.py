"""Issue 12 item 5: PyTorch's new matmul precision API must not make fastpool raise.

Setting ``torch.backends.cuda.matmul.fp32_precision`` makes the legacy
``torch.get_float32_matmul_precision()`` raise; the eager mean, mean_sqrt_len, weighted_mean and the
user-weight gradient (both backends) used to query it.
"""

import contextlib

import oracle
import pytest
import torch
from tolerances import for_mode

import fastpool


@contextlib.contextmanager
def new_precision_api():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def test_the_new_api_makes_the_legacy_query_raise():
    # The premise of this file: if torch stops raising here, the tests below lose their point.
    with new_precision_api(), pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()


@pytest.mark.parametrize("mode", ["mean", "mean_sqrt_len", "weighted_mean"])
def test_forward_and_weights_gradient_under_the_new_api(backend, mode):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 7, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :2] = False
    weights = torch.rand(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    user = weights if mode == "weighted_mean" else None
    grad_out = torch.arange(3 * 8, dtype=torch.float64).reshape(3, 8) / 7
    with new_precision_api():
        out = fastpool.pool(hidden, mask, mode=mode, weights=user)
        if user is not None:
            (out * grad_out).sum().backward()
    w = None if user is None else weights.detach().numpy()
    expected = oracle.pool(hidden.numpy(), mask.numpy(), mode, weights=w)
    torch.testing.assert_close(out, torch.from_numpy(expected), **for_mode(mode, torch.float64))
    if user is not None:
        want = oracle.weights_grad(hidden.numpy(), mask.numpy(), w, grad_out.numpy())
        torch.testing.assert_close(weights.grad, torch.from_numpy(want), **for_mode(mode, torch.float64))
