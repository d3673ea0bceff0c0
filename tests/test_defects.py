"""Regression tests of defects found by adversarial use (issue 12 items 1, 3 and 10).

Each test failed before its fix.
"""

import numpy as np
import pytest
import torch

import fastpool

ALL_MODES = ["mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_zero_gives_zeros_for_empty_rows_padded_and_packed(backend, dtype):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 6, 5, generator=g, dtype=dtype)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # an empty row
    out = fastpool.pool(hidden, mask, mode=ALL_MODES, normalize=True, eps=0.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # The non-empty rows are plain unit vectors.
    norms = torch.linalg.vector_norm(out[[0, 2]].double(), dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)
    cu = torch.tensor([0, 4, 4, 9])  # sequence 1 is empty
    packed = fastpool.pool(hidden.reshape(-1, 5)[:9], mode=ALL_MODES, cu_seqlens=cu, normalize=True, eps=0.0)
    assert torch.isfinite(packed).all()
    assert torch.equal(packed[1], torch.zeros_like(packed[1]))


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), -0.5])
def test_negative_or_nan_eps_is_a_clear_error(eps):
    hidden = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="eps"):
        fastpool.pool(hidden, normalize=True, eps=eps)


def test_non_number_eps_is_a_type_error():
    with pytest.raises(TypeError, match="eps"):
        fastpool.pool(torch.randn(2, 3, 4), normalize=True, eps="1e-6")


@pytest.mark.parametrize("eps", [np.float32(1e-6), np.float64(1e-6), np.int64(0)])
def test_numpy_scalar_eps_is_accepted(backend, eps):
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    out = fastpool.pool(hidden, normalize=True, eps=eps)
    assert torch.equal(out, fastpool.pool(hidden, normalize=True, eps=float(eps)))


def _row_with_inf(T: int, d: int) -> torch.Tensor:
    hidden = torch.randn(1, T, d, generator=torch.Generator().manual_seed(3))
    hidden[0, 5, 1] = float("inf")  # a real token in the first T-split (rank offset 0)
    return hidden


def test_rank_weighted_mean_keeps_a_real_inf_in_a_long_split_row(backend):
    # T = 600 is split along T by the Triton launcher (B * feature blocks is far below the GPU).
    hidden = _row_with_inf(600, 3)
    out = fastpool.pool(hidden, mode=["weighted_mean", "mean"])
    assert out[0, 1] == float("inf") and out[0, 4] == float("inf")
    assert torch.isfinite(out[0, [0, 2, 3, 5]]).all()


def test_rank_weighted_mean_keeps_a_real_inf_in_a_long_packed_sequence(backend):
    hidden = _row_with_inf(600, 3)[0]
    cu = torch.tensor([0, 600])
    out = fastpool.pool(hidden, mode=["weighted_mean", "mean"], cu_seqlens=cu)
    assert out[0, 1] == float("inf") and out[0, 4] == float("inf")
    assert torch.isfinite(out[0, [0, 2, 3, 5]]).all()
