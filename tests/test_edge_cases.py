"""Edge cases found in review: higher-order and forward-mode AD, exotic masks, signed zeros, limits."""

import pytest
import torch
from helpers import make_mask

import fastpool

MODES = ["mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean"]


def test_double_backward_matches_on_both_backends(device):
    gen = torch.Generator().manual_seed(41)
    hidden = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64).to(device)
    mask = make_mask("holes", 3, 7, gen).to(device)
    weight = torch.randn(3, 5 * len(MODES), generator=gen, dtype=torch.float64).to(device)
    results = {}
    for name in ("torch", "triton"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        with fastpool.use_backend(name):
            out = fastpool.pool(h, mask, mode=MODES)
            (grad,) = torch.autograd.grad((out * w).sum(), h, create_graph=True)
            assert grad.requires_grad, name
            (grad * grad).sum().backward()
        results[name] = (grad.detach(), w.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0])
    torch.testing.assert_close(results["triton"][1], results["torch"][1])


def test_forward_mode_ad_is_exact_on_both_backends(device):
    # The Triton backend goes through the Function's jvp rule (fastpool.transforms), the eager one
    # through its own ops; tests/test_torch_func.py checks every mode against the oracle.
    import torch.autograd.forward_ad as fwAD

    hidden = torch.randn(2, 4, 3, dtype=torch.float64, device=device)
    tangent = torch.ones_like(hidden)
    for name in ("torch", "triton"):
        with fwAD.dual_level(), fastpool.use_backend(name):
            out = fastpool.mean_pool(fwAD.make_dual(hidden, tangent))
            assert torch.equal(
                fwAD.unpack_dual(out).tangent, torch.ones(2, 3, dtype=torch.float64, device=device)
            ), name


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.complex64], ids=str)
def test_unsupported_mask_dtypes_are_rejected(dtype):
    with pytest.raises(TypeError, match="mask: expected"):
        fastpool.mean_pool(torch.randn(1, 4, 2), torch.ones(1, 4).to(dtype))


def test_denormal_float_masks_count_as_real_on_both_backends(backend, device):
    hidden = torch.arange(8, dtype=torch.float32, device=device).reshape(1, 4, 2)
    mask = torch.tensor([[0.0, 1e-45, -0.0, 2.0]], device=device)
    assert mask[0, 1].item() != 0  # a real denormal
    torch.set_flush_denormal(True)  # returns whether the CPU supports it, not the previous state
    try:
        out = fastpool.pool(hidden, mask, mode=["cls", "last", "mean"])
    finally:
        torch.set_flush_denormal(False)
    assert out.tolist() == [[2.0, 3.0, 6.0, 7.0, 4.0, 5.0]]


def test_signed_zero_ties_select_the_first_position(backend, device):
    # -0.0 == +0.0: the first wins (the sign of the returned zero is unspecified, see README).
    hidden = torch.tensor([[[-0.0], [0.0], [-1.0]], [[0.0], [-0.0], [-1.0]]], device=device)
    values, index = fastpool.max_pool(hidden, return_indices=True)
    assert index.flatten().tolist() == [0, 0]
    assert values.flatten().tolist() == [0.0, 0.0]


def test_feature_dimension_beyond_the_grid_limit_is_a_clear_error():
    d = 65535 * 64 + 1  # float64: 64 features per block
    hidden = torch.zeros(1, 1, d, dtype=torch.float64)
    with fastpool.use_backend("triton"), pytest.raises(ValueError, match="d must be at most"):
        fastpool.mean_pool(hidden)
    with fastpool.use_backend("torch"):
        assert fastpool.mean_pool(hidden).shape == (1, d)


def test_eager_mean_stays_float32_under_reduced_matmul_precision(device):
    gen = torch.Generator().manual_seed(42)
    hidden = torch.randn(4, 33, 17, generator=gen).to(device) * 1000 + 1
    mask = make_mask("holes", 4, 33, gen).to(device)
    exact = torch.where(mask[..., None], hidden.double(), 0).sum(1) / mask.sum(1, keepdim=True).double()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with fastpool.use_backend("torch"):
            got = fastpool.mean_pool(hidden, mask)
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-4)
