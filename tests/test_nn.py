"""fastpool.nn.Pooling: the module equals the functional API (plus optional L2 normalisation)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_mask

import fastpool
from fastpool.nn import Pooling


@pytest.mark.parametrize("mode", ["mean", ["max", "cls"], ["last", "mean", "max", "cls"]], ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_pooling_module_matches_functional(backend, device, mode, normalize):
    gen = torch.Generator().manual_seed(31)
    hidden = torch.randn(4, 9, 6, generator=gen).to(device).requires_grad_()
    mask = make_mask("empty-row", 4, 9, gen).to(device)
    module = Pooling(mode, normalize=normalize)
    out = module(hidden, mask)
    expected = fastpool.pool(hidden, mask, mode=mode)
    if normalize:
        expected = F.normalize(expected, dim=-1)
        norms = out.norm(dim=-1)
        empty = ~mask.bool().any(1)
        assert torch.allclose(norms[~empty], torch.ones_like(norms[~empty]))
        assert torch.count_nonzero(out[empty]) == 0
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_pooling_module_has_no_parameters_and_validates_mode():
    module = Pooling(["mean", "max"], normalize=True)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    assert "mode=['mean', 'max']" in repr(module)
    with pytest.raises(ValueError, match="mode"):
        Pooling("median")
