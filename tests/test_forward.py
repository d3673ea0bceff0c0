"""Forward results of every mode, dtype, mask layout, shape and stride pattern against the oracle."""

import numpy as np
import oracle
import pytest
import torch
from helpers import MASK_KINDS, kernel_config, make_mask, np_mask, to_numpy
from tolerances import for_mode

import fastpool

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SINGLE_MODES = ("mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean")


def check_against_oracle(hidden, mask, modes, out):
    """out (B, len(modes) * d) from fastpool against the oracle, mode by mode."""
    d = hidden.shape[2]
    h, m = to_numpy(hidden), np_mask(mask)
    for i, mode in enumerate(modes):
        expected = torch.from_numpy(oracle.pool(h, m, mode)).to(hidden.dtype)
        got = out[:, i * d : (i + 1) * d].cpu()
        torch.testing.assert_close(got, expected, equal_nan=True, **for_mode(mode, hidden.dtype))


ALL_MODES = ("max", "last", "weighted_mean", "mean_sqrt_len", "mean", "cls")


def oracle_cases():
    """(backend, kernel config, dtype, mask kind, modes): every layer of the matrix, none skipped.

    The eager backend and the kernels with small blocks (several feature blocks and token blocks
    per row) see every dtype x mask x mode; the T-split and the launcher's default blocks see every
    mask with the fused modes and the loop-carrying single modes.
    """
    single = [(m,) for m in SINGLE_MODES] + [ALL_MODES]
    for dtype in DTYPES:
        for mask_kind in MASK_KINDS:
            for modes in single:
                yield "torch", "default", dtype, mask_kind, modes
                yield "triton", "small-blocks", dtype, mask_kind, modes
    for dtype in (torch.float32, torch.bfloat16):
        for mask_kind in MASK_KINDS:
            for modes in [("mean",), ("max",), ("weighted_mean",), ALL_MODES]:
                yield "triton", "split-T", dtype, mask_kind, modes
    for dtype in DTYPES:
        for mask_kind in ("none", "holes"):
            yield "triton", "default", dtype, mask_kind, ALL_MODES


@pytest.mark.parametrize(
    "backend_name,config,dtype,mask_kind,modes",
    [pytest.param(*case, id="-".join([case[0], case[1], str(case[2])[6:], case[3], "+".join(case[4])]))
     for case in oracle_cases()],
)  # fmt: skip
def test_matches_oracle(device, backend_name, config, dtype, mask_kind, modes):
    gen = torch.Generator().manual_seed(sum(map(ord, f"{dtype}{mask_kind}{modes}")))
    B, T, d = 4, 19, 21
    hidden = torch.randn(B, T, d, generator=gen).to(dtype).to(device)
    mask = make_mask(mask_kind, B, T, gen)
    mask = None if mask is None else mask.to(device)
    with fastpool.use_backend(backend_name), kernel_config(config):
        out = fastpool.pool(hidden, mask, mode=list(modes))
    assert out.shape == (B, len(modes) * d) and out.dtype == dtype and out.device == hidden.device
    check_against_oracle(hidden, mask, modes, out)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1),
        (1, 1, 7),
        (2, 13, 1),
        (1, 31, 3),
        (7, 2, 5),
        (3, 17, 67),
        (0, 5, 4),
        (3, 0, 4),
        (3, 5, 0),
        (0, 0, 0),
    ],
    ids=str,
)
def test_shapes_including_empty_dimensions(backend, device, shape):
    gen = torch.Generator().manual_seed(2)
    B, T, d = shape
    hidden = torch.randn(B, T, d, generator=gen).to(device)
    mask = make_mask("empty-row", B, T, gen).to(device)
    modes = ["mean", "max", "cls", "last"]
    with kernel_config("small-blocks" if backend == "triton" else "default"):
        out = fastpool.pool(hidden, mask, mode=modes)
        _, index = fastpool.max_pool(hidden, mask, return_indices=True)
    assert out.shape == (B, 4 * d)
    check_against_oracle(hidden, mask, modes, out)
    assert torch.equal(
        index.cpu(), torch.from_numpy(oracle.max_with_index(to_numpy(hidden), np_mask(mask))[1])
    )
    if T == 0:
        assert torch.count_nonzero(out) == 0 and bool((index == -1).all())


MASK_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)  # fmt: skip


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_mask_dtypes_nonzero_is_real(backend, device, mask_dtype):
    gen = torch.Generator().manual_seed(3)
    B, T, d = 4, 11, 9
    hidden = torch.randn(B, T, d, generator=gen).to(device)
    real = make_mask("holes", B, T, gen)
    if mask_dtype.is_floating_point:
        # Any nonzero value is real (NaN too); -0.0 is zero.
        values = torch.tensor([0.5, -2.0, float("nan"), 3.0])
        mask = torch.where(real, values[torch.arange(T) % 4], torch.tensor(-0.0)).to(mask_dtype)
    elif mask_dtype == torch.bool:
        mask = real
    else:
        mask = torch.where(real, torch.arange(T) % 3 + 1, 0).to(mask_dtype)
        if mask_dtype in (torch.int16, torch.int32, torch.int64):
            mask = torch.where(real, -mask, 0)  # negative values are nonzero too
    mask = mask.to(device)
    with kernel_config("small-blocks" if backend == "triton" else "default"):
        got = fastpool.pool(hidden, mask, mode=["mean", "max", "cls", "last"])
        expected = fastpool.pool(hidden, real.to(device), mode=["mean", "max", "cls", "last"])
    assert torch.equal(got, expected)
    check_against_oracle(hidden, real, ["mean", "max", "cls", "last"], got)


def strided_cases(device, gen):
    B, T, d = 3, 14, 21
    base = torch.randn(B, d, T, generator=gen).to(device)
    yield "transposed", base.transpose(1, 2), make_mask("holes", B, T, gen).to(device)
    wide = torch.randn(B, 2 * T, d + 3, generator=gen).to(device)
    wide_mask = make_mask("right", B, 2 * T, gen).to(device)
    yield "sliced", wide[:, ::2, 2:-1], wide_mask[:, ::2]
    row = make_mask("left", 1, T, gen).to(device)
    yield "expanded-mask", torch.randn(B, T, d, generator=gen).to(device), row.expand(B, T)
    batch_minor = torch.randn(T, B, d, generator=gen).to(device)
    yield "batch-minor", batch_minor.transpose(0, 1), make_mask("holes", T, B, gen).to(device).t()


def test_strided_inputs_are_not_copied_and_match(backend, device):
    gen = torch.Generator().manual_seed(4)
    for name, hidden, mask in strided_cases(device, gen):
        assert not hidden.is_contiguous() or not mask.is_contiguous(), name
        with kernel_config("small-blocks" if backend == "triton" else "default"):
            out = fastpool.pool(hidden, mask, mode=["mean", "max", "cls", "last"])
        check_against_oracle(hidden, mask, ["mean", "max", "cls", "last"], out)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), float("-inf"), 6.0e4])
@pytest.mark.parametrize("mask_kind", ["right", "left", "holes", "empty-row"])
def test_padding_content_never_reaches_the_result(backend, device, garbage, mask_kind):
    gen = torch.Generator().manual_seed(5)
    B, T, d = 4, 13, 10
    hidden = torch.randn(B, T, d, generator=gen, dtype=torch.float16).to(device)
    mask = make_mask(mask_kind, B, T, gen).to(device)
    dirty = torch.where(mask[..., None], hidden, torch.tensor(garbage, dtype=hidden.dtype, device=device))
    modes = ["mean", "max", "cls", "last"]
    with kernel_config("split-T" if backend == "triton" else "default"):
        clean_out = fastpool.pool(hidden, mask, mode=modes)
        dirty_out = fastpool.pool(dirty, mask, mode=modes)
    assert torch.isfinite(dirty_out).all()
    assert torch.equal(clean_out, dirty_out)


def test_nan_in_a_real_token_propagates_like_torch_max(backend, device):
    hidden = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3).to(device)
    hidden[0, 2, 1] = float("nan")
    hidden[0, 4, 1] = float("nan")
    hidden[1, 5, 0] = float("nan")  # in the padding of row 1: ignored
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], device=device)
    values, index = fastpool.max_pool(hidden, mask, return_indices=True)
    assert torch.isnan(values[0, 1]) and index[0, 1] == 2
    assert not torch.isnan(values[1]).any() and index[1, 0] == 2
    assert torch.isnan(fastpool.mean_pool(hidden, mask)[0, 1])


def test_minus_inf_real_tokens_are_valid_maxima(backend, device):
    hidden = torch.full((1, 4, 2), float("-inf"), device=device)
    mask = torch.tensor([[0, 1, 1, 0]], device=device)
    values, index = fastpool.max_pool(hidden, mask, return_indices=True)
    assert torch.equal(index.cpu(), torch.tensor([[1, 1]]))
    assert bool((values == float("-inf")).all())


def test_fp16_mean_does_not_overflow(backend, device):
    hidden = torch.full((2, 64, 8), 6.0e4, dtype=torch.float16, device=device)
    mask = torch.ones(2, 64, dtype=torch.int64, device=device)
    mean = fastpool.mean_pool(hidden, mask)
    assert torch.equal(mean, torch.full_like(mean, 6.0e4))


def test_cls_and_last_follow_the_padding_side(backend, device):
    hidden = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1).to(device)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 1, 0]], device=device)
    assert fastpool.cls_pool(hidden, mask).flatten().tolist() == [2.0, 5.0]
    assert fastpool.last_token_pool(hidden, mask).flatten().tolist() == [4.0, 8.0]
    assert fastpool.cls_pool(hidden).flatten().tolist() == [0.0, 5.0]
    assert fastpool.last_token_pool(hidden).flatten().tolist() == [4.0, 9.0]


def test_inputs_are_not_modified(backend, device):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 9, 5, generator=gen).to(device).requires_grad_()
    mask = make_mask("holes", 3, 9, gen).float().to(device)
    before_h, before_m = hidden.detach().clone(), mask.clone()
    fastpool.pool(hidden, mask, mode=["mean", "max", "cls", "last"]).sum().backward()
    assert torch.equal(hidden.detach(), before_h) and torch.equal(mask, before_m)


def test_results_are_bitwise_deterministic(backend, device):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(4, 21, 17, generator=gen).to(device).requires_grad_()
    mask = make_mask("holes", 4, 21, gen).to(device)
    runs = []
    for _ in range(2):
        with kernel_config("split-T" if backend == "triton" else "default"):
            out = fastpool.pool(hidden, mask, mode=["mean", "max", "cls", "last"])
            (grad,) = torch.autograd.grad(out, hidden, torch.ones_like(out))
        runs.append((out, grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_backends_agree_bit_for_bit_on_selections(device):
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(5, 19, 23, generator=gen).to(torch.bfloat16).to(device)
    mask = make_mask("holes", 5, 19, gen).to(device)
    results = {}
    for name in ("torch", "triton"):
        with fastpool.use_backend(name), kernel_config("split-T" if name == "triton" else "default"):
            results[name] = (
                fastpool.pool(hidden, mask, mode=["max", "cls", "last"]),
                fastpool.max_pool(hidden, mask, return_indices=True)[1],
            )
    assert torch.equal(results["torch"][0], results["triton"][0])
    assert torch.equal(results["torch"][1], results["triton"][1])


def test_mean_has_documented_accumulation_precision(backend, device):
    # 1 + many tiny values: a bf16 accumulator would lose them all, float32 keeps them.
    T = 200
    hidden = torch.full((1, T, 4), 2.0**-9, dtype=torch.bfloat16, device=device)
    hidden[0, 0] = 1.0
    got = fastpool.mean_pool(hidden).float().cpu()
    expected = np.float32((1.0 + (T - 1) * 2.0**-9) / T)
    torch.testing.assert_close(got, torch.full((1, 4), float(expected)), rtol=1.6e-2, atol=0)
