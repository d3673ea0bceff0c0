"""Adversarial tests of the eager ("torch") backend's CPU fast paths: each one against the general
path it shortcuts (bit for bit where the code promises the same bits) and against the oracle.

The fast paths: the lean cls / last selection (``eager.select_rows``), the values-only 16-bit max and
mean + max (``eager_max.padded_sum_and_max``, float32-widened masking), the embedding_bag sums
(``eager_sums._bag_padded_sum`` / ``_bag_sum`` / ``_bag_sum_widened``), the attention pooling
without a masked copy (``eager_attention``), the host reads of packed offsets (``packed``,
``eager_packed``) and the slim autograd path (``ops._slim_path``). Inputs a demanding user may
pass: strided, expanded, transposed and sliced tensors, every mask dtype (with -0.0 and NaN),
NaN / inf / -0.0 in real tokens and in padding, empty rows and sequences, thread counts.
"""

import contextlib
import re

import oracle
import pytest
import torch
from helpers import assert_clear_error, np_mask, to_numpy
from test_batch_invariance import assert_same_bits
from tolerances import EXACT, for_mode

import fastpool
from fastpool import eager, eager_max, eager_sums, packed

pytestmark = pytest.mark.usefixtures("cpu_torch_backend")

NAN, INF = float("nan"), float("inf")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MASK_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32,
)  # fmt: skip
LAYOUTS = ("right", "left", "holes", "empty-row", "full")


@pytest.fixture
def cpu_torch_backend():
    with fastpool.use_backend("torch"):
        yield


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_real(layout: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) bool real tokens of one padding layout."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    pos = torch.arange(T)
    if layout == "right":
        return pos < lengths[:, None]
    if layout == "left":
        return pos >= (T - lengths)[:, None]
    if layout == "full":
        return torch.ones(B, T, dtype=torch.bool)
    real = torch.rand(B, T, generator=gen) < 0.5
    if layout == "empty-row":
        real[B // 2] = False
    return real


def as_mask(real: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """real in ``dtype``, with the odd values that mean the same thing: -0.0 (padding) in float
    masks, NaN, negative and large values (real tokens)."""
    if dtype == torch.bool:
        return real.clone()
    if dtype.is_floating_point:
        values = torch.tensor([1.0, NAN, -3.0, 0.5], dtype=dtype)
        pick = values[torch.randint(0, 4, real.shape, generator=gen)]
        return torch.where(real, pick, torch.tensor(-0.0, dtype=dtype))
    values = torch.tensor([1, -1, 7, 100] if dtype != torch.uint8 else [1, 255, 7, 100], dtype=dtype)
    pick = values[torch.randint(0, 4, real.shape, generator=gen)]
    return torch.where(real, pick, torch.zeros((), dtype=dtype))


def garbage_padding(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """hidden with NaN, +inf, -inf and a huge value cycling through its padding."""
    fill = torch.tensor([NAN, INF, -INF, 6e4], dtype=hidden.dtype)
    B, T, d = hidden.shape
    filler = fill[torch.arange(B * T * d) % 4].view(B, T, d)
    return torch.where(real.unsqueeze(-1), hidden, filler)


def layouts_of(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same (B, T, d) values through different memory layouts (all views of a larger buffer)."""
    B, T, d = hidden.shape
    wide = torch.full((B, T + 3, 2 * d), NAN, dtype=hidden.dtype)
    wide[:, 1 : T + 1, ::2] = hidden
    time_major = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    feature_major = hidden.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    return {
        "contiguous": hidden.contiguous(),
        "sliced-strided": wide[:, 1 : T + 1, ::2],
        "time-major": time_major,
        "feature-major": feature_major,
    }


# --- 1. cls / last without gradient: eager.select_rows -------------------------------------------


@pytest.mark.parametrize("name", ["cls", "last"])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_selection_fast_path_has_the_bits_of_the_full_forward(name, mask_dtype, layout):
    gen = torch.Generator().manual_seed(len(name) * 10 + len(layout))
    B, T, d = 5, 9, 3
    real = make_real(layout, B, T, gen)
    mask = as_mask(real, mask_dtype, gen)
    base = torch.randn(B, T, d, generator=gen)
    base[0, :, 0] = -0.0  # signed zeros and NaN in real tokens are selected as they are
    base[1, :, 1] = NAN
    hidden = garbage_padding(base, real)
    index = (oracle.first_index if name == "cls" else oracle.last_index)(np_mask(mask), B, T)
    expected_np = oracle.gather(to_numpy(hidden), index)
    for what, h in layouts_of(hidden).items():
        general = eager.pool_forward(h, mask, [name])[0]
        call = fastpool.cls_pool if name == "cls" else fastpool.last_token_pool
        with torch.no_grad():
            got = call(h, mask)
        assert_same_bits(got, general, f"{name} {layout} {what}")
        assert got.is_contiguous() and got.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
        torch.testing.assert_close(got, torch.from_numpy(expected_np).float(), **EXACT, equal_nan=True)
        assert_same_bits(eager.select_rows(h, mask, name), general, f"select_rows {what}")


# --- 1a. a mask without padding: the mask-free paths -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_a_mask_without_padding_has_the_bits_of_no_mask(dtype, mask_dtype):
    # Every token real (odd nonzero values, NaN in float masks): the eager forward drops the mask,
    # the same bits as mask=None for every mode, inference and training; one padded token (holding
    # NaN) keeps the masked paths and the oracle's values.
    gen = torch.Generator().manual_seed(5)
    B, T, d = 3, 40, 6
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    mask = as_mask(torch.ones(B, T, dtype=torch.bool), mask_dtype, gen)
    for modes in [[m] for m in MODES] + [["mean", "max"], ["max", "last", "mean_sqrt_len"]]:
        with torch.no_grad():
            unmasked = fastpool.pool(hidden, None, modes)
            assert_same_bits(fastpool.pool(hidden, mask, modes), unmasked, f"{modes}")
        x, y = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        grad_out = torch.randn(B, d * len(modes), generator=gen).to(dtype)
        (gx,) = torch.autograd.grad(fastpool.pool(x, mask, modes), x, grad_out)
        (gy,) = torch.autograd.grad(fastpool.pool(y, None, modes), y, grad_out)
        assert_same_bits(gx, gy, f"{modes} grad")
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, 17] = False
    one_padded = as_mask(real, mask_dtype, gen)
    dirty = garbage_padding(hidden, real)
    for name in ("mean", "max"):
        expected = oracle.pool(to_numpy(dirty), np_mask(one_padded), name)
        got = fastpool.pool(dirty, one_padded, name)
        torch.testing.assert_close(got.double(), torch.from_numpy(expected), **for_mode(name, dtype))


# --- 1b. cls / last with a gradient: ops.SelectFunction ------------------------------------------


@pytest.mark.parametrize("name", ["cls", "last"])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_selection_training_path_has_the_bits_of_the_general_function(name, mask_dtype, layout):
    # A training call of a lone cls / last keeps only the selected positions (SelectFunction): its
    # output, gradient and second-order gradient are the general Function's (row statistics and
    # pool_backward) bit for bit, and the oracle's; garbage padding never leaks into the gradient.
    gen = torch.Generator().manual_seed(len(name) * 7 + len(layout))
    B, T, d = 5, 9, 3
    real = make_real(layout, B, T, gen)
    mask = as_mask(real, mask_dtype, gen)
    hidden = garbage_padding(torch.randn(B, T, d, generator=gen), real)
    grad_out = torch.randn(B, d, generator=gen)
    expected_grad = oracle.pool_grad(to_numpy(hidden), np_mask(mask), name, to_numpy(grad_out))
    call = fastpool.cls_pool if name == "cls" else fastpool.last_token_pool
    for what, h in layouts_of(hidden).items():
        x = h.detach().requires_grad_()
        out = call(x, mask)
        assert type(out.grad_fn).__name__ == "SelectFunctionBackward", what
        g = grad_out.clone().requires_grad_()
        (grad,) = torch.autograd.grad(out, x, g, create_graph=True)
        y = h.detach().requires_grad_()
        general = fastpool.ops.PoolFunction.apply(y, mask, None, name, "torch", -1.0, True, True)[0]
        (general_grad,) = torch.autograd.grad(general, y, g, create_graph=True)
        assert_same_bits(out.detach(), general.detach(), f"out {what}")
        assert_same_bits(grad.detach(), general_grad.detach(), f"grad {what}")
        torch.testing.assert_close(grad.detach().double(), torch.from_numpy(expected_grad), **EXACT)
        # Second order: the gradient of sum(grad * v) with respect to grad_out gathers v at the
        # selected tokens.
        v = torch.randn(B, T, d, generator=gen)
        (second,) = torch.autograd.grad((grad * v).sum(), g)
        (general_second,) = torch.autograd.grad((general_grad * v).sum(), g)
        assert_same_bits(second, general_second, f"second order {what}")


@pytest.mark.parametrize("name", ["cls", "last"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.uint8, torch.float32], ids=str)
def test_selection_reads_the_edge_column_of_many_rows(name, mask_dtype):
    # More rows than a mask column is listed for (eager._LISTED_ROWS): the column is counted instead.
    # Every row real at the selected end, then one row padded there; a denormal or NaN float mask
    # value is a real token, -0.0 padding (masks.real_tokens).
    B, T, d = eager._LISTED_ROWS + 6, 4, 2
    edge = 0 if name == "cls" else T - 1
    gen = torch.Generator().manual_seed(B)
    hidden = torch.randn(B, T, d, generator=gen)
    call = fastpool.cls_pool if name == "cls" else fastpool.last_token_pool
    for padded_row in (None, 0, B - 1, B // 2):
        real = torch.ones(B, T, dtype=torch.bool)
        if padded_row is not None:
            real[padded_row, edge] = False
        mask = as_mask(real, mask_dtype, gen)
        if mask_dtype.is_floating_point:
            mask[1, edge] = 1e-45  # a denormal: real whatever the flush-denormal setting
        dirty = garbage_padding(hidden, real)
        expected = oracle.pool(to_numpy(dirty), np_mask(mask), name)
        x = dirty.clone().requires_grad_()
        for got in (call(dirty, mask), call(x, mask)):
            torch.testing.assert_close(got.detach().double(), torch.from_numpy(expected), **EXACT)
        grad_out = torch.randn(B, d, generator=gen)
        (grad,) = torch.autograd.grad(call(x, mask), x, grad_out)
        want = oracle.pool_grad(to_numpy(dirty), np_mask(mask), name, to_numpy(grad_out))
        torch.testing.assert_close(grad.double(), torch.from_numpy(want), **EXACT)


# --- 4. attention pooling: one weighted sum over hidden as it is ----------------------------------


def _attention_grads(hidden, scores, mask, create_graph: bool):
    hidden = hidden.clone().requires_grad_()
    scores = scores.clone().requires_grad_()
    out = fastpool.attention_pool(hidden, scores, mask)
    grads = torch.autograd.grad((out * out).sum(), (hidden, scores), create_graph=create_graph)
    return out, hidden, scores, grads


@pytest.mark.parametrize("filler", [NAN, INF, -INF, 1e30])
def test_attention_second_order_ignores_garbage_padding(filler):
    # create_graph=True differentiates the eager backward: its g . x over hidden as it is must not let
    # NaN / inf of the padding (times a zero gradient) into the second-order gradients. Found: NaN in
    # every real token's second-order gradient (hidden and scores) with NaN or inf padding.
    gen = torch.Generator().manual_seed(3)
    B, T, d, H = 3, 6, 4, 2
    hidden = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    scores = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    scores[0, 1, 0] = -INF  # a real token of weight 0 in one head
    dirty = torch.where(mask[..., None], hidden, torch.tensor(filler, dtype=torch.float64))
    results = []
    for h in (hidden, dirty):
        out, leaf_h, leaf_s, (gh, gs) = _attention_grads(h, scores, mask, create_graph=True)
        second = torch.autograd.grad(gh.sum() + (gs * gs).sum(), (leaf_h, leaf_s))
        results.append((out, gh, gs, *second))
    names = ("out", "grad hidden", "grad scores", "2nd hidden", "2nd scores")
    for name, clean, got in zip(names, *results, strict=True):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, clean, rtol=1e-12, atol=1e-12, msg=name)
    expected = oracle.attention(to_numpy(dirty), to_numpy(scores), np_mask(mask))
    torch.testing.assert_close(results[1][0], torch.from_numpy(expected), **for_mode("mean", torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_keeps_its_precision_under_autocast(dtype):
    # The eager weighted sum and g . x are matmuls: CPU autocast ran them in bfloat16 (found: an error
    # of 1.5e-3 at 2x50x8 float32, where the result is documented as computed in float32). Same bits
    # with and without autocast, forward and backward.
    gen = torch.Generator().manual_seed(6)
    B, T, d, H = 2, 50, 8, 2
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    scores = torch.randn(B, T, H, generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.7
    expected = _attention_grads(hidden, scores, mask, create_graph=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _attention_grads(hidden, scores, mask, create_graph=False)
    assert_same_bits(got[0], expected[0], "out")
    for name, a, b in zip(("grad hidden", "grad scores"), got[3], expected[3], strict=True):
        assert_same_bits(a, b, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_attention_garbage_padding_and_empty_rows(dtype):
    # Padding (finite, NaN, inf) never shows in the bits; an empty row and an all -inf head are +0.0;
    # a row pooled alone has the bits it has in the batch.
    gen = torch.Generator().manual_seed(4)
    B, T, d, H = 4, 9, 6, 3
    hidden = (torch.randn(B, T, d, generator=gen) - 3).to(dtype)
    scores = torch.randn(B, T, H, generator=gen)
    real = torch.rand(B, T, generator=gen) < 0.6
    real[2], real[0] = False, True
    scores[1, :, 1] = -INF
    clean = fastpool.attention_pool(torch.where(real[..., None], hidden, 0), scores, real)
    for filler in (-5.0, NAN, INF):
        dirty = torch.where(real[..., None], hidden, torch.tensor(filler, dtype=dtype))
        out = fastpool.attention_pool(dirty, scores, real)
        assert_same_bits(out, clean, f"filler {filler}")
        for b in range(B):
            assert_same_bits(fastpool.attention_pool(dirty[b : b + 1], scores[b : b + 1], real[b : b + 1])[0],
                             out[b], f"row {b}")  # fmt: skip
    assert torch.equal(clean[2].view(-1).float().abs().sum(), torch.tensor(0.0))
    assert not torch.signbit(clean[2]).any() and not torch.signbit(clean[1, 2:4]).any()
    expected = oracle.attention(to_numpy(hidden), to_numpy(scores), np_mask(real))
    torch.testing.assert_close(clean, torch.from_numpy(expected).to(dtype), **for_mode("mean", dtype))


# --- 2. 16-bit max and mean + max without positions --------------------------------------------


MAX_MODES = (["max"], ["mean", "max"], ["max", "mean_sqrt_len"], ["mean", "max", "mean_sqrt_len"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_only_max_has_the_bits_of_the_general_path(dtype, layout, monkeypatch):
    # Many small chunks (chunk edges, full runs, chunks with padding), NaN / -inf / -0.0 in real
    # tokens, NaN / +inf / -inf / huge values in the padding, three memory layouts, float and bool
    # masks, 1 and 3 threads: the values-only paths give the bits of the forward with positions.
    monkeypatch.setattr(eager_max, "_CHUNK_BYTES", 4 * 16 * 5 * 4)
    gen = torch.Generator().manual_seed(len(layout))
    B, T, d = 4, 37, 5
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    hidden[0, 3, :] = NAN
    hidden[1, :, 0] = -0.0
    hidden[2, :, 2] = -INF
    real = make_real(layout, B, T, gen)
    dirty = garbage_padding(hidden, real)
    for what, h in layouts_of(dirty).items():
        if what == "sliced-strided":
            continue  # its NaN border is not padding of the mask below
        for mask in (real, as_mask(real, torch.float16, gen), None if layout == "full" else real):
            for modes in MAX_MODES:
                expected = eager.pool_forward(h, mask, modes, need_indices=True)[0]
                for n in (1, 3):
                    with threads(n), torch.no_grad():
                        got = fastpool.pool(h, mask, mode=modes)
                    assert_same_bits(got, expected, f"{what} {modes} threads={n}")
        values, _ = oracle.max_with_index(to_numpy(dirty), np_mask(real))
        got = fastpool.max_pool(h, real)
        torch.testing.assert_close(got, torch.from_numpy(values).to(dtype), **EXACT, equal_nan=True)


_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# Odd NaNs (negative, with a payload) and the default NaN, as the integers of their bits.
_ODD_NANS = {
    torch.float32: ([-4194303, 0x7F800001, 0x7FC00123], 0x7FC00000),
    torch.float16: ([-511, 0x7C01, 0x7E05], 0x7E00),
    torch.bfloat16: ([-63, 0x7F81, 0x7FC3], 0x7FC0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_maxima_are_canonical_on_every_cpu_path(dtype):
    # A zero maximum is +0.0 whatever mix of -0.0 and +0.0 the segment holds, a NaN maximum the
    # default NaN whatever sign and payload its NaNs carry: padded and packed, values only and with
    # positions; also eager_max.canonical_ where the sum overflows (float16 at 6e4).
    ints, default = _ODD_NANS[dtype]
    T, d = 5, 4
    hidden = torch.full((3, T, d), -1.0, dtype=dtype)
    hidden[0, 1:3] = -0.0
    hidden[0, 3, :2] = 0.0
    bits = hidden.view(_INT_OF[dtype])
    bits[1, 0, :3] = torch.tensor(ints, dtype=_INT_OF[dtype])
    hidden[2] = 6e4
    bits[2, 4, 0] = ints[0]
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[0, 0] = False
    cu = torch.tensor([0, 4, 9, 14])
    packed_hidden = torch.cat([hidden[0, 1:], hidden[1], hidden[2]])
    results = {
        "padded values": fastpool.max_pool(hidden, mask),
        "padded positions": fastpool.max_pool(hidden, mask, return_indices=True)[0],
        "packed values": fastpool.max_pool(packed_hidden, cu_seqlens=cu),
        "packed positions": fastpool.max_pool(packed_hidden, cu_seqlens=cu, return_indices=True)[0],
    }
    for what, out in results.items():
        got = out.view(_INT_OF[dtype])
        assert torch.equal(got[0], torch.tensor([0, 0, 0, 0], dtype=got.dtype)), what  # +0.0
        assert torch.equal(got[1, :3], torch.full((3,), default, dtype=got.dtype)), what
        assert got[2, 0] == default and bool((out[2, 1:] == 6e4).all()), what
    values = hidden[2].clone()
    assert eager_max.canonical_(values) is values
    assert values.view(_INT_OF[dtype])[4, 0] == default and bool((values[:4] == 6e4).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_range_max_has_the_bits_of_the_general_path(dtype, layout, monkeypatch):
    # One amax per row over its run of real tokens (right / left padding; holes fall back to the
    # masked pass): the bits of the forward with positions, NaN / -inf / -0.0 in real tokens, garbage
    # padding, empty rows, every memory layout; and the oracle's values.
    monkeypatch.setattr(eager_max, "_ROW_RANGE_BYTES", 0)
    gen = torch.Generator().manual_seed(3 + len(layout))
    B, T, d = 5, 23, 4
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    hidden[0, :, 0] = NAN
    hidden[1, :, 1] = -0.0
    hidden[2, :, 2] = -INF
    real = make_real(layout, B, T, gen)
    if layout in ("right", "left"):
        real[3] = False  # an empty row among runs
    dirty = garbage_padding(hidden, real)
    values, _ = oracle.max_with_index(to_numpy(dirty), np_mask(real))
    for what, h in layouts_of(dirty).items():
        if what == "sliced-strided":
            continue  # its NaN border is not padding of the mask
        expected = eager.pool_forward(h, real, ["max"], need_indices=True)[0]
        with torch.no_grad():
            got = fastpool.max_pool(h, as_mask(real, torch.int64, gen))
        assert_same_bits(got, expected, f"{layout} {what}")
        torch.testing.assert_close(got, torch.from_numpy(values).to(dtype), **EXACT, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["full", "one-pad", "dense-holes", "empty-row"])
def test_scatter_max_has_the_bits_of_the_general_path(dtype, layout, monkeypatch):
    # The values-only max by one scatter_reduce into rows, padding into a spare row: taken for
    # 16-bit input and for few padded tokens; NaN / -inf / -0.0 in real tokens, garbage padding, an
    # empty row, the layouts whose (B, T) dims are one strided axis. The bits of the forward with
    # positions, the oracle's values, and no other max path runs.
    gen = torch.Generator().manual_seed(11 + len(layout))
    B, T, d = 9, 24, 6
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    hidden[0, :, 0] = NAN
    hidden[1, :, 1] = -0.0
    hidden[1, 5, 1] = 0.0
    hidden[2, :, 2] = -INF
    real = torch.ones(B, T, dtype=torch.bool)
    if layout == "one-pad":
        real[torch.arange(B), torch.randint(0, T, (B,), generator=gen)] = False
    elif layout == "dense-holes":
        real[:, ::12] = False  # 1/12 padding, in holes
    elif layout == "empty-row":
        real[3] = False  # 1/9 of the tokens: float32 still takes the scatter
    dirty = garbage_padding(hidden, real)
    values, _ = oracle.max_with_index(to_numpy(dirty), np_mask(real))
    for what, h in layouts_of(dirty).items():
        expected = eager.pool_forward(h, real, ["max"], need_indices=True)[0]
        viewable = what in ("contiguous", "feature-major")
        with monkeypatch.context() as patch:
            if viewable:
                for other in ("_row_range_max", "_maxima"):
                    patch.setattr(eager_max, other, lambda *a, **k: pytest.fail("not the scatter"))
            for mask in (real, as_mask(real, torch.float32, gen)):
                with torch.no_grad():
                    got = fastpool.max_pool(h, mask)
                assert_same_bits(got, expected, f"{layout} {what}")
        torch.testing.assert_close(got, torch.from_numpy(values).to(dtype), **EXACT, equal_nan=True)
    assert not torch.signbit(got[1, 1]) and got[1, 1] == 0


def _first_max_per_segment(hidden: torch.Tensor, cu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.max over each segment alone (first maximum, first NaN), global indices; 0 / -1 when empty."""
    S, d = len(cu) - 1, hidden.shape[1]
    values, index = torch.zeros((S, d), dtype=hidden.dtype), torch.full((S, d), -1)
    for s in range(S):
        if cu[s + 1] > cu[s]:
            top = hidden[cu[s] : cu[s + 1]].max(0)
            values[s], index[s] = top.values, top.indices + cu[s]
    return values, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_max_positions_are_the_first_maximum_of_each_segment(dtype):
    # The window search (eager_max._first_in_window): segments shorter than the 16-token window
    # (it then sees other segments' tokens), at the end of the tokens (the window slides back),
    # empty ones, ties, NaN, +-inf and segments of -inf only (tied with the masked neighbours).
    gen = torch.Generator().manual_seed(7)
    for trial in range(300):
        N, S, d = (
            int(torch.randint(1, 70, (1,), generator=gen)),
            int(torch.randint(1, 9, (1,), generator=gen)),
            3,
        )
        cu = [0, *sorted(torch.randint(0, N + 1, (S - 1,), generator=gen).tolist()), N]
        if trial % 3 == 1:  # every segment at least a window long: no masking, windows slide back
            lengths = torch.randint(16, 40, (S,), generator=gen)
            cu, N = [0, *lengths.cumsum(0).tolist()], int(lengths.sum())
        hidden = torch.randint(-2, 3, (N, d), generator=gen).to(dtype)
        draw = torch.rand(N, d, generator=gen)
        hidden[draw < 0.08] = NAN
        hidden[(draw >= 0.08) & (draw < 0.2)] = -INF
        hidden[(draw >= 0.2) & (draw < 0.25)] = INF
        if trial % 4 == 0:
            hidden[: N // 2] = -INF
        want_values, want_index = _first_max_per_segment(hidden, cu)
        values, index = eager_max.segment_max(hidden, torch.tensor(cu), need_indices=True)
        assert torch.equal(index.long(), want_index), f"trial {trial}: N={N} cu={cu}"
        torch.testing.assert_close(values, want_values, **EXACT, equal_nan=True)


# --- 3. sums by embedding_bag -------------------------------------------------------------------


def _index_add_rows(tokens: torch.Tensor, dest: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.zeros(rows, tokens.shape[-1]).index_add_(0, dest, tokens.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_bytes", [16, 3 * 4 * 4, 2**21])
def test_bag_sums_have_the_bits_of_index_add(dtype, chunk_bytes, monkeypatch):
    # Packed: empty sequences first, between and last, a segment carried across many tiny chunks,
    # -0.0 tokens (a running sum from +0.0 is never -0.0), int32 / int64 and strided offsets.
    # Padded: float masks with -0.0, a transposed mask, empty rows, mask None. 1 and 3 threads.
    # 2**21 bytes: 16-bit packed tokens fit one chunk (one widening copy, no carried sums).
    monkeypatch.setattr(eager_sums, "_BAG_CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(chunk_bytes)
    cu = torch.tensor([0, 0, 1, 1, 5, 9, 9, 10, 17, 17])
    N, d = 17, 4
    hidden = (torch.randn(N, d, generator=gen) * 100).to(dtype)
    hidden[0], hidden[9] = -0.0, -0.0
    expected = _index_add_rows(hidden, torch.repeat_interleave(torch.arange(9), cu.diff()), 9)
    spaced = torch.stack([cu, torch.full_like(cu, 99)], 1).view(-1)[::2]  # a non-contiguous view
    for offsets in (cu, cu.int(), spaced, spaced.int()):
        for n in (1, 3):
            with threads(n):
                assert_same_bits(eager_sums.segment_sum(hidden, offsets, torch.float32), expected, "packed")
                out = fastpool.mean_pool(hidden, cu_seqlens=offsets)
            counts = cu.diff().clamp(min=1).unsqueeze(1).float()
            assert_same_bits(out, (expected / counts).to(dtype), f"mean {offsets.dtype}")
    strided = hidden.t().contiguous().t()
    assert_same_bits(eager_sums.segment_sum(strided, cu, torch.float32), expected, "strided packed")

    B, T = 5, 13
    padded = (torch.randn(B, T, d, generator=gen) * 100).to(dtype)
    padded[0] = -0.0
    real = torch.rand(B, T, generator=gen) < 0.3
    real[1], real[0, :2] = False, True
    dest = torch.where(real, torch.arange(B)[:, None], B).reshape(-1)
    expected = _index_add_rows(padded.reshape(-1, d), dest, B + 1)[:B]
    every = _index_add_rows(padded.reshape(-1, d), torch.arange(B).repeat_interleave(T), B)
    first = torch.zeros(B, dtype=torch.int64)
    for mask, want in ((real, expected), (real.t().contiguous().t(), expected), (None, every)):
        for n in (1, 3):
            with threads(n):
                assert_same_bits(eager_sums.padded_sum(padded, mask, first, torch.float32), want, "padded")
    float_mask = torch.where(real, torch.tensor(NAN), torch.tensor(-0.0))
    got = fastpool.pool(padded, float_mask, mode="mean_sqrt_len")
    count = real.sum(1, keepdim=True).clamp(min=1).float()
    assert_same_bits(got, (expected / count.sqrt()).to(dtype), "mean_sqrt_len, float mask")


# --- 5. packed offsets read on the host --------------------------------------------------------


@pytest.mark.parametrize(
    "offsets, message",
    [
        ([1, 3], "cu_seqlens[0] == 0"),
        ([0, 2], "cu_seqlens[-1] == N"),
        ([0, 3, 1, 3], "non-decreasing"),
        ([0, 2**31 - 1, 3], "non-decreasing"),
        ([0, -5, 3], "non-decreasing"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_malformed_offsets_are_rejected_in_place(offsets, message, dtype):
    cu = torch.tensor([v for o in offsets for v in (o, 7)], dtype=dtype)[::2]  # a strided view
    assert_clear_error("cu_seqlens", ValueError, lambda: fastpool.pool(torch.randn(3, 2), cu_seqlens=cu))
    with pytest.raises(ValueError, match=re.escape(message)):
        packed.check_offsets(cu, 3)


# --- 6. the slim autograd path and the general backward -----------------------------------------

MODES = ("mean", "max", "cls", "last", "weighted_mean", "mean_sqrt_len")


class Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("variant", ["plain", "subclass", "mask-requires-grad"])
def test_slim_training_path_matches_the_general_backward(dtype, variant):
    # Two backward passes (retain_graph), create_graph=True (the general backward) and the no-grad
    # forward all give the bits of eager.pool_forward / pool_backward, NaN padding and an empty row.
    gen = torch.Generator().manual_seed(2)
    B, T, d = 3, 7, 4
    real = torch.rand(B, T, generator=gen) < 0.6
    real[1] = False
    mask = real.float().requires_grad_() if variant == "mask-requires-grad" else real
    hidden = torch.where(real[..., None], torch.randn(B, T, d, generator=gen).to(dtype), NAN)
    for modes in [[m] for m in MODES] + [["mean", "max", "last"]]:
        grad_out = torch.randn(B, d * len(modes), generator=gen).to(dtype)
        x = hidden.clone().requires_grad_()
        out = fastpool.pool(x.as_subclass(Subclass) if variant == "subclass" else x, mask, mode=modes)
        first = torch.autograd.grad(out, x, grad_out, retain_graph=True)[0]
        second = torch.autograd.grad(out, x, grad_out, retain_graph=True)[0]
        graph = torch.autograd.grad(out, x, grad_out, create_graph=True)[0]
        with torch.no_grad():
            lean = fastpool.pool(x, mask, mode=modes)
        expected, argmax, stats, _ = eager.pool_forward(hidden, mask, modes)
        grad = eager.pool_backward(grad_out, mask, argmax, stats, T, dtype, modes)
        for what, got, want in (("out", out, expected), ("no_grad", lean, expected), ("grad", first, grad),
                                ("retained", second, grad), ("create_graph", graph, grad)):  # fmt: skip
            assert_same_bits(got.detach().as_subclass(torch.Tensor), want, f"{modes} {what}")
        assert torch.isfinite(first).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("hidden_grad", [True, False])
def test_user_weight_gradients_against_the_oracle(dtype, hidden_grad):
    gen = torch.Generator().manual_seed(7)
    B, T, d = 3, 7, 4
    real = torch.rand(B, T, generator=gen) < 0.6
    real[1] = False
    hidden = torch.where(real[..., None], torch.randn(B, T, d, generator=gen, dtype=torch.float64), INF)
    weights = torch.where(real, torch.randn(B, T, generator=gen, dtype=torch.float64), NAN)
    grad_out = torch.randn(B, d, generator=gen, dtype=torch.float64).to(dtype)
    x = hidden.to(dtype).clone().requires_grad_(hidden_grad)
    w = weights.to(dtype).clone().requires_grad_()
    out = fastpool.weighted_mean_pool(x, real, w)
    first = torch.autograd.grad(out, w, grad_out, retain_graph=True)[0]
    again = torch.autograd.grad(out, w, grad_out)[0]
    assert_same_bits(again, first, "retain_graph")
    expected = oracle.weights_grad(to_numpy(x), np_mask(real), to_numpy(w), to_numpy(grad_out))
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2}[dtype]
    torch.testing.assert_close(first.double(), torch.from_numpy(expected), rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", MODES + ("mean,max",))
def test_torch_func_and_forward_ad_over_the_fast_paths(mode):
    # vmap(grad) per-sample gradients equal the slim path's one by one; vmap forward equals the lean
    # forward; forward-mode AD (dual tensors, which the eager ops handle themselves) equals jvp.
    import torch.autograd.forward_ad as fwad
    from torch.func import grad, jvp, vmap

    modes = mode.split(",")
    gen = torch.Generator().manual_seed(9)
    B, T, d = 3, 6, 4
    real = torch.rand(B, T, generator=gen) < 0.6
    real[1], real[0, 0] = False, False
    batch = torch.where(real[..., None], torch.randn(2, B, T, d, generator=gen), NAN)
    tangent = torch.randn(B, T, d, generator=gen)

    def loss(x):
        return fastpool.pool(x, real, mode=modes).square().sum()

    per_sample = vmap(grad(loss))(batch)
    forward = vmap(lambda x: fastpool.pool(x, real, mode=modes))(batch)
    for i in range(2):
        x = batch[i].clone().requires_grad_()
        assert_same_bits(per_sample[i], torch.autograd.grad(loss(x), x)[0], "vmap(grad)")
        with torch.no_grad():
            assert_same_bits(forward[i], fastpool.pool(batch[i], real, mode=modes), "vmap")
    with fwad.dual_level():
        dual = fastpool.pool(fwad.make_dual(batch[0], tangent), real, mode=modes)
        got = fwad.unpack_dual(dual).tangent
    expected = jvp(lambda x: fastpool.pool(x, real, mode=modes), (batch[0],), (tangent,))[1]
    assert torch.isfinite(expected).all()
    assert_same_bits(got, expected, "forward AD")


@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 0, 3), (2, 4, 0), (1, 1, 1), (2, 1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_and_unit_dimensions_on_every_path(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    hidden = torch.randn(shape, generator=gen).to(dtype)
    masks = (None, torch.ones(shape[:2], dtype=torch.bool), torch.zeros(shape[:2], dtype=torch.int8))
    for mask in masks:
        for modes in [[m] for m in MODES] + [["mean", "max"], ["max", "mean_sqrt_len"]]:
            with torch.no_grad():
                lean = fastpool.pool(hidden, mask, mode=modes)
            x = hidden.clone().requires_grad_()
            out = fastpool.pool(x, mask, mode=modes)
            out.sum().backward()
            assert_same_bits(lean, out.detach(), f"{modes}")
            assert x.grad.shape == hidden.shape and torch.isfinite(x.grad).all()
            if mask is not None and not mask.any():
                assert not lean.any() and not torch.signbit(lean).any()


@pytest.mark.parametrize("name", ["cls", "last"])
def test_selection_of_expanded_and_inference_tensors(name):
    # Stride-0 batch and time dimensions, a hidden that requires grad under no_grad, inference mode.
    gen = torch.Generator().manual_seed(11)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    call = fastpool.cls_pool if name == "cls" else fastpool.last_token_pool
    for hidden in (torch.randn(1, 4, 3, generator=gen).expand(3, 4, 3), torch.randn(3).expand(3, 4, 3)):
        expected = eager.pool_forward(hidden, mask, [name])[0]
        with torch.no_grad():
            assert_same_bits(call(hidden.clone().requires_grad_(), mask), expected, "no_grad")
            assert_same_bits(call(hidden, mask), expected, "expanded")
        with torch.inference_mode():
            assert_same_bits(call(hidden, mask), expected, "inference_mode")


def test_cpu_paths_ignore_the_default_device():
    # torch.set_default_device (here a meta default) must not reach the CPU paths' own tensors:
    # the same bits, forward and backward, padded and packed.
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 6, 4, generator=gen).to(torch.bfloat16)
    real = torch.rand(3, 6, generator=gen) > 0.3
    tokens = torch.randn(10, 4, generator=gen)
    cu = torch.tensor([0, 4, 4, 10])
    cases = [
        (hidden, {"mask": real}),
        (hidden, {}),
        (tokens, {"cu_seqlens": cu}),
        (tokens.bfloat16(), {"cu_seqlens": cu}),
    ]

    def run(x, kwargs, mode, train):
        x = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = fastpool.pool(x, mode=mode, **kwargs)
        if not train:
            return (out,)
        out.backward(torch.ones_like(out))
        return out, x.grad

    for x, kwargs in cases:
        for mode in ("mean", "max", "cls", "weighted_mean", ["mean", "max"]):
            for train in (False, True):
                want = run(x, kwargs, mode, train)
                with torch.device("meta"):
                    got = run(x, kwargs, mode, train)
                for a, b in zip(got, want, strict=True):
                    assert a.device.type == "cpu"
                    assert_same_bits(a, b, f"{sorted(kwargs)} {mode} train={train}")
