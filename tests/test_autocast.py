"""Autocast (issue 12 item 4): the sums stay float32 under ``torch.autocast`` on every backend.

Autocast runs matmuls in bfloat16 / float16. The eager backend used a batched matrix-vector
product for its sums, so under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a float32 mean lost
small terms (1.001 -> 1.0), the rank weight 257 became 256, and a row with NaN padding crashed
("Index put requires the source and destination dtypes match"). The sums are now elementwise adds,
which autocast leaves alone: every result is bit for bit the one computed outside autocast.
"""

import pytest
import torch
from conftest import DEVICE
from test_batch_invariance import assert_same_bits

import fastpool

MODES = list(fastpool.MODES)


# CPU autocast lowers to bfloat16 only; CUDA autocast to bfloat16 and float16.
AUTOCAST_DTYPES = ("bfloat16", "float16") if DEVICE == "cuda" else ("bfloat16",)


@pytest.fixture(params=AUTOCAST_DTYPES)
def autocast(request, device):
    return torch.autocast(device_type=device, dtype=getattr(torch, request.param))


def test_float32_mean_keeps_small_terms(backend, device, autocast):
    hidden = torch.full((2, 40, 6), 1.001, device=device)
    mask = torch.ones(2, 40, dtype=torch.int64, device=device)
    mask[1, 25:] = 0
    with autocast:
        out = fastpool.pool(hidden, mask, mode=["mean", "mean_sqrt_len", "weighted_mean"])
    assert out.dtype == torch.float32
    expected = torch.tensor([1.001, 1.001 * 40**0.5, 1.001], device=device).repeat_interleave(6)
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=0)
    expected[6:12] = 1.001 * 25**0.5
    torch.testing.assert_close(out[1], expected, rtol=1e-6, atol=0)


def test_rank_weight_257_stays_257(backend, device, autocast):
    T = 300
    hidden = torch.zeros(1, T, 4, device=device)
    hidden[0, 256] = 1.0  # the 257th token: its weight is 257
    with autocast:
        out = fastpool.pool(hidden, torch.ones(1, T, device=device), mode="weighted_mean")
    expected = torch.tensor(257.0) / torch.tensor(T * (T + 1) / 2)
    assert torch.equal(out.cpu(), expected.expand(1, 4))


def test_nan_padding_does_not_crash(backend, device, autocast):
    hidden = torch.randn(3, 9, 5, device=device)
    mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    mask[0, 6:] = False
    hidden[0, 6:] = float("nan")
    with autocast:
        out = fastpool.pool(hidden, mask, mode=["mean", "weighted_mean"])
    assert torch.isfinite(out).all()
    expected = torch.where(mask[..., None], hidden.double(), 0).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out[:, :5].double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_results_and_gradients_are_the_bits_computed_outside_autocast(backend, device, autocast, normalize):
    gen = torch.Generator().manual_seed(12)
    hidden = torch.randn(3, 45, 7, generator=gen).to(device)
    mask = torch.rand(3, 45, generator=gen) < 0.7
    hidden = torch.where(mask[..., None], hidden, float("nan")).to(device)
    mask = mask.to(device)
    weights = (torch.rand(3, 45, generator=gen) + 0.1).to(device)
    grad = torch.randn(3, 7 * len(MODES), generator=gen).to(device)
    results = []
    for context in (torch.autocast(device_type=device, enabled=False), autocast):
        h = hidden.clone().requires_grad_()
        w = weights.clone().requires_grad_()
        with context:
            out = fastpool.pool(h, mask, mode=MODES, weights=w, normalize=normalize)
            grads = torch.autograd.grad(out, (h, w), grad)
        results.append((out, *grads))
    for name, plain, cast in zip(("output", "hidden gradient", "weights gradient"), *results, strict=True):
        assert_same_bits(cast, plain, name)
