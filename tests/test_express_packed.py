"""CPU packed inference calls served by ``fastpool.express_packed``: the same bits as the general path
(and as the padded path on the same sequences), the general path for everything it does not serve,
and the general path's errors for every input it rejects."""

import numpy as np
import oracle
import pytest
import torch
from helpers import assert_clear_error, to_numpy
from tolerances import for_mode

import fastpool
from fastpool import eager_packed, express_packed, ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LENGTHS = [3, 0, 11, 1, 0, 6, 2]


def offsets(lengths, dtype=torch.int32):
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=dtype)


def hard_values(N: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with -0.0, +0.0, NaN and +-inf sprinkled in (sign of zero and NaN bits are
    what the maxima canonicalise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, 12, (N, d), generator=gen)
    x = torch.where(pick == 0, -0.0, x)
    x = torch.where(pick == 1, 0.0, x)
    x = torch.where(pick == 2, float("nan"), x)
    x = torch.where(pick == 3, -float("inf"), x)
    x = torch.where(pick == 4, float("inf"), x)
    x[:, 0] = -0.0  # a column of zeros only: its max must be +0.0
    return x.to(dtype)


def right_padded(hidden: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed sequences as a (S, T, d) batch padded with NaN, and its mask."""
    lengths = cu.diff().tolist()
    S, T, d = len(lengths), max(max(lengths), 1), hidden.shape[1]
    padded = torch.full((S, T, d), float("nan"), dtype=hidden.dtype)
    mask = torch.zeros(S, T, dtype=torch.bool)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        padded[s, : b - a], mask[s, : b - a] = hidden[a:b], True
    return padded, mask


def general(hidden: torch.Tensor, cu: torch.Tensor, mode: str) -> torch.Tensor:
    """The general path's multi-mode arithmetic (``assemble_modes``), which the express path skips:
    the mode's block of a two-mode call."""
    other = "cls" if mode != "cls" else "last"
    out = eager_packed.pool_forward(hidden, cu, [mode, other], need_indices=False)[0]
    return out[:, : hidden.shape[1]]


@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("mode", ["mean", "max"])
def test_express_gives_the_general_and_padded_bits(mode, dtype, offset_dtype):
    cu = offsets(LENGTHS, offset_dtype)
    N, d = int(cu[-1]), 13
    hidden = hard_values(N, d, dtype, seed=7)
    with torch.no_grad():
        served = express_packed.pool(hidden, cu, None, mode)
        assert served is not None
        out = fastpool.pool(hidden, mode=mode, cu_seqlens=cu)
        padded = fastpool.pool(*right_padded(hidden, cu), mode=mode)
    assert served.dtype == dtype and served.shape == (len(LENGTHS), d)
    assert torch.equal(served.view(torch.uint8), out.view(torch.uint8))  # bits, NaN included
    assert torch.equal(served.view(torch.uint8), general(hidden, cu, mode).view(torch.uint8))
    if mode == "max":  # canonical maxima: the very bits
        assert torch.equal(served.view(torch.uint8), padded.view(torch.uint8))
    else:  # the same values; a NaN's payload may differ (the padded float16 path sets its low bits)
        torch.testing.assert_close(served, padded, rtol=0, atol=0, equal_nan=True)
    # Canonical values: +0.0 for an all-zero column, empty sequences 0.
    assert not torch.signbit(served[served == 0]).any()
    assert served[1].eq(0).all() and served[4].eq(0).all()
    finite = torch.from_numpy(np.isfinite(to_numpy(served)))
    want = torch.from_numpy(oracle.packed_pool(to_numpy(hidden), cu.numpy(), mode)).to(dtype)
    torch.testing.assert_close(served[finite], want[finite], **for_mode(mode, dtype))


def test_express_reads_strided_hidden_and_keeps_batch_invariance():
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(40, 2 * 9, generator=gen, dtype=torch.bfloat16)
    hidden = wide[:, ::2]  # strided columns: no copy asked of the caller
    cu = offsets([5, 9, 0, 26])
    alone = offsets([9])
    with torch.no_grad():
        for mode in ("mean", "max"):
            out = fastpool.pool(hidden, mode=mode, cu_seqlens=cu)
            assert torch.equal(out, fastpool.pool(hidden.contiguous(), mode=mode, cu_seqlens=cu))
            # The second sequence alone, in a batch of one: the same bits.
            one = fastpool.pool(hidden[5:14], mode=mode, cu_seqlens=alone)
            assert torch.equal(out[1], one[0])


@pytest.fixture
def general_path_marked(monkeypatch):
    """ops.packed_pool_forward raising a marker: a call that reaches the general path says so."""

    class GeneralPath(Exception):
        pass

    def marked(*args, **kwargs):
        raise GeneralPath

    monkeypatch.setattr(ops, "packed_pool_forward", marked)
    return GeneralPath


def test_inference_calls_skip_the_general_path(general_path_marked):
    cu = offsets(LENGTHS, torch.int64)
    hidden = torch.randn(int(cu[-1]), 5, requires_grad=True)
    with torch.no_grad():
        for mode in ("mean", "max"):
            fastpool.pool(hidden, mode=mode, cu_seqlens=cu, max_seqlen=11)
            fastpool.pool(hidden.detach(), mode=[mode], cu_seqlens=cu)
    fastpool.mean_pool(hidden.detach(), cu_seqlens=cu)
    fastpool.max_pool(hidden.detach(), cu_seqlens=cu)


def test_every_other_call_takes_the_general_path(general_path_marked):
    cu = offsets(LENGTHS)
    N = int(cu[-1])
    hidden = torch.randn(N, 5)
    nested = torch.nested.nested_tensor_from_jagged(hidden, cu.long())
    calls = {
        "gradient": lambda: fastpool.pool(hidden.clone().requires_grad_(), mode="mean", cu_seqlens=cu),
        "indices": lambda: fastpool.max_pool(hidden, cu_seqlens=cu, return_indices=True),
        "normalize": lambda: fastpool.pool(hidden, mode="mean", cu_seqlens=cu, normalize=True),
        "two modes": lambda: fastpool.pool(hidden, mode=["mean", "max"], cu_seqlens=cu),
        "cls": lambda: fastpool.pool(hidden, mode="cls", cu_seqlens=cu),
        "weights": lambda: fastpool.pool(hidden, mode="weighted_mean", cu_seqlens=cu, weights=torch.ones(N)),
        "(1, N, d)": lambda: fastpool.pool(hidden[None], mode="mean", cu_seqlens=cu),
        "nested": lambda: fastpool.pool(nested, mode="mean"),
        "negative view": lambda: fastpool.pool(torch._neg_view(hidden), mode="max", cu_seqlens=cu),
        "no sequences": lambda: fastpool.pool(hidden[:0], mode="mean", cu_seqlens=offsets([])),
        "no tokens": lambda: fastpool.pool(hidden[:0], mode="mean", cu_seqlens=offsets([0, 0])),
        "strided offsets": lambda: fastpool.pool(
            hidden, mode="mean", cu_seqlens=torch.stack([cu, cu], 1)[:, 0]
        ),
        "triton asked for": lambda: _under_triton(hidden, cu),
        "vmap": lambda: torch.func.vmap(lambda h: fastpool.pool(h, mode="mean", cu_seqlens=cu))(hidden[None]),
    }
    for name, call in calls.items():
        with pytest.raises(general_path_marked):
            call()
            pytest.fail(f"{name}: served by the express path")


def _under_triton(hidden, cu):
    with fastpool.use_backend("triton"):
        return fastpool.pool(hidden, mode="mean", cu_seqlens=cu)


def test_rejected_inputs_get_the_general_path_errors():
    cu = offsets(LENGTHS)
    N = int(cu[-1])
    hidden = torch.randn(N, 4)

    def call(h=hidden, c=cu, **kw):
        return lambda: fastpool.pool(h, mode="mean", cu_seqlens=c, **kw)

    assert_clear_error("cu_seqlens", ValueError, call(c=cu + 1))
    assert_clear_error("cu_seqlens", ValueError, call(c=torch.cat([cu[:-1], cu[-1:] + 1])))
    assert_clear_error("cu_seqlens", ValueError, call(c=torch.tensor([0, 5, 3, N], dtype=torch.int32)))
    assert_clear_error("cu_seqlens", TypeError, call(c=cu.float()))
    assert_clear_error("cu_seqlens", ValueError, call(c=cu[None]))
    assert_clear_error("hidden", TypeError, call(h=hidden.to(torch.int32)))
    assert_clear_error("hidden", ValueError, call(h=hidden[:, :, None]))
    assert_clear_error("max_seqlen", TypeError, call(max_seqlen=True))
    assert_clear_error("max_seqlen", TypeError, call(max_seqlen=3.0))
    assert_clear_error("max_seqlen", ValueError, call(max_seqlen=-1))
    assert_clear_error("mask", ValueError, call(mask=torch.ones(N, dtype=torch.bool)))
    # int32 offsets whose difference overflows int32 still read as decreasing.
    big = torch.tensor([0, 2**31 - 1, -(2**31), N], dtype=torch.int32)
    assert_clear_error("cu_seqlens", ValueError, call(c=big))


def test_mean_divides_by_exact_lengths_past_float32_integers():
    # Offsets above 2**24 are not float32 integers: the lengths are subtracted as integers first.
    N = 2**24 + 2
    hidden = torch.ones(1, 1).expand(N, 1)  # no memory for N tokens
    cu = torch.tensor([0, 2**24 + 1, N])
    with torch.no_grad():
        served = express_packed.pool(hidden, cu, None, "mean")
        general_mean = eager_packed.pool_forward(hidden, cu, ["mean", "cls"], need_indices=False)[0][:, :1]
    assert served.tolist() == [[1.0], [1.0]]
    assert torch.equal(served, general_mean)


def test_strided_nested_hidden_with_offsets_gets_the_general_error():
    nested = torch.nested.nested_tensor([torch.randn(3), torch.randn(4)])
    for mode in ("mean", "max"):
        call = lambda m=mode: fastpool.pool(nested, mode=m, cu_seqlens=offsets([4, 6]))  # noqa: E731
        with pytest.raises(ValueError, match="^hidden: expected a nested tensor with layout torch.jagged"):
            call()
