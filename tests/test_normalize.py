"""L2 normalisation of the pooled rows (``pool(..., normalize=True)``, ``nn.Pooling(normalize=True)``).

Fused into the forward kernel: the last feature block of a row to finish normalises the whole row
from its un-rounded values, at any width and in every dtype; against the oracle, forward and
backward, padded and packed.
"""

import numpy as np
import oracle
import pytest
import torch
from helpers import kernel_config, make_mask, np_mask, to_numpy
from tolerances import REDUCTION
from torch._dynamo.testing import CompileCounter

import fastpool
from fastpool import launch

MODES = ("max", "last", "weighted_mean", "mean_sqrt_len", "mean", "cls")


def oracle_normalized(hidden, mask, modes, eps, grad_out):
    """(y, grad of hidden) in float64: y = v / max(||v||, eps) over the concatenated modes."""
    h, m, g = to_numpy(hidden), np_mask(mask), to_numpy(grad_out)
    d = h.shape[2]
    v = np.concatenate([oracle.pool(h, m, mode) for mode in modes], axis=1)
    norms = np.sqrt((v * v).sum(1, keepdims=True))
    y = v / np.maximum(norms, eps)
    dv = np.where(
        norms > eps, (g - y * (y * g).sum(1, keepdims=True)) / np.where(norms > eps, norms, 1), g / eps
    )
    grad = sum(oracle.pool_grad(h, m, mode, dv[:, i * d : (i + 1) * d]) for i, mode in enumerate(modes))
    return torch.from_numpy(y), torch.from_numpy(grad)


# d = 21 fits one feature block; 300 and the wide rows span several, gathered by the row's last one.
WIDE = {torch.bfloat16: 2100, torch.float16: 2100, torch.float32: 1100, torch.float64: 600}


def cases():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for width in ("fits", "widened", "too-wide"):
            for backend_name, config in (("torch", "default"), ("triton", "default"), ("triton", "split-T")):
                if config == "split-T" and width == "too-wide":
                    continue  # "widened" already spreads rows over feature blocks and chunks
                yield backend_name, config, dtype, width


@pytest.mark.parametrize(
    "backend_name,config,dtype,width",
    [pytest.param(*c, id=f"{c[0]}-{c[1]}-{str(c[2])[6:]}-{c[3]}") for c in cases()],
)
def test_matches_oracle_forward_and_backward(device, backend_name, config, dtype, width):
    gen = torch.Generator().manual_seed(sum(map(ord, f"{dtype}{width}{config}")))
    d = {"fits": 21, "widened": 300, "too-wide": WIDE[dtype]}[width]
    B, T = 3, 6
    hidden = torch.randn(B, T, d, generator=gen).to(dtype).to(device).requires_grad_()
    mask = make_mask("empty-row", B, T, gen).to(device)
    grad_out = torch.randn(B, len(MODES) * d, generator=gen).to(dtype).to(device)
    overrides = (
        {"chunks_per_program": 1, "chunk": 2, "lanes": 2, "scan_block": 8} if config == "split-T" else {}
    )
    with fastpool.use_backend(backend_name), launch.config_override(**overrides):
        out = fastpool.pool(hidden, mask, mode=list(MODES), normalize=True)
        (grad,) = torch.autograd.grad(out, hidden, grad_out)
    want, want_grad = oracle_normalized(hidden, mask, MODES, 1e-12, grad_out)
    tol = REDUCTION[dtype]
    torch.testing.assert_close(out.cpu(), want.to(dtype), **tol)
    torch.testing.assert_close(grad.cpu(), want_grad.to(dtype), **tol)
    assert torch.count_nonzero(out[B // 2]) == 0  # the empty row stays zero
    norms = out.double().norm(dim=1)
    torch.testing.assert_close(norms[norms > 0].cpu(), torch.ones_like(norms[norms > 0]).cpu(), **tol)


def test_rows_wider_than_a_feature_block_are_normalised_in_the_same_launch(device):
    """A row spread over several feature blocks: the last block to finish normalises it (one launch)."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 5, 70, generator=gen).to(device)
    with fastpool.use_backend("triton"), launch.config_override(block_d=16):
        out = fastpool.pool(hidden, mode=["mean", "max"], normalize=True)
    want = torch.nn.functional.normalize(fastpool.pool(hidden.double(), mode=["mean", "max"]), dim=-1)
    torch.testing.assert_close(out.double().cpu(), want.cpu(), **REDUCTION[torch.float32])


def test_eps_floor_and_gradient_below_it(backend, device):
    hidden = torch.tensor(
        [[[0.3, 0.4], [0.0, 0.0]], [[3.0, 4.0], [3.0, 4.0]]], device=device, requires_grad=True
    )
    mask = torch.tensor([[1, 0], [1, 1]], device=device)
    out = fastpool.pool(hidden, mask, mode="mean", normalize=True, eps=1.0)
    # Row 0 has norm 0.5 < eps: divided by eps (unchanged); row 1 is a unit vector.
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.4], [0.6, 0.8]], device=device))
    (grad,) = torch.autograd.grad(out[0].sum(), hidden)
    assert grad[0, 0].tolist() == [1.0, 1.0] and torch.count_nonzero(grad[0, 1]) == 0


def test_module_normalizes_padded_and_packed(backend, device):
    gen = torch.Generator().manual_seed(51)
    module = fastpool.nn.Pooling(["mean", "max"], normalize=True)
    hidden = torch.randn(2, 5, 8, generator=gen).to(device)
    mask = make_mask("right", 2, 5, gen).to(device)
    with kernel_config("small-blocks" if backend == "triton" else "default"):
        out = module(hidden, mask)
    ref = torch.nn.functional.normalize(fastpool.pool(hidden, mask, mode=["mean", "max"]), dim=-1)
    torch.testing.assert_close(out, ref)
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32, device=device)
    tokens = torch.randn(7, 8, generator=gen).to(device)
    packed = module(tokens, cu_seqlens=cu, max_seqlen=5)
    ref = torch.nn.functional.normalize(fastpool.pool(tokens, mode=["mean", "max"], cu_seqlens=cu), dim=-1)
    torch.testing.assert_close(packed, ref)
    assert packed[1].tolist() == [0.0] * 16


@pytest.mark.parametrize("argument,value,error", [("normalize", 1, TypeError), ("eps", -1.0, ValueError)])
def test_bad_normalize_arguments(argument, value, error):
    with pytest.raises(error, match=f"^{argument}: expected .* got"):
        fastpool.pool(torch.randn(2, 3, 4), **{"normalize": True, argument: value})


def normalized_loss(hidden, mask):
    out = fastpool.pool(hidden, mask, mode=["mean", "max", "cls"], normalize=True)
    return (out * torch.arange(out.shape[1], device=out.device)).sum()


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fullgraph_compile(device, backend_name):
    counter = CompileCounter()
    compiled = torch.compile(normalized_loss, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(52)
    with fastpool.use_backend(backend_name):
        for B, T in [(2, 5), (3, 7), (4, 9)]:
            hidden = torch.randn(B, T, 6, generator=gen).to(device).requires_grad_()
            mask = make_mask("holes", B, T, gen).to(device)
            loss = compiled(hidden, mask)
            ref = normalized_loss(hidden, mask)
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(torch.autograd.grad(loss, hidden), torch.autograd.grad(ref, hidden))
    assert counter.frame_count <= 2
