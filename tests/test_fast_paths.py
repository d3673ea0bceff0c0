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

import oracle
import pytest
import torch
from helpers import assert_clear_error, np_mask, to_numpy
from test_batch_invariance import assert_same_bits
from tolerances import EXACT, for_mode

import fastpool
from fastpool import eager, eager_attention, eager_max, eager_packed, eager_sums, packed

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
    return torch.where(real, values[torch.randint(0, 4, real.shape, generator=gen)], torch.zeros((), dtype=dtype))


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
    gen = torch.Generator().manual_seed(hash((name, layout)) % 2**31)
    B, T, d = 5, 9, 3
    real = make_real(layout, B, T, gen)
    mask = as_mask(real, mask_dtype, gen)
    base = torch.randn(B, T, d, generator=gen)
    base[0, :, 0] = -0.0  # signed zeros and NaN in real tokens are selected as they are
    base[1, :, 1] = NAN
    hidden = garbage_padding(base, real)
    expected_np = oracle.gather(to_numpy(hidden), (oracle.first_index if name == "cls" else oracle.last_index)(
        np_mask(mask), B, T))
    for what, h in layouts_of(hidden).items():
        general = eager.pool_forward(h, mask, [name])[0]
        call = fastpool.cls_pool if name == "cls" else fastpool.last_token_pool
        with torch.no_grad():
            got = call(h, mask)
        assert_same_bits(got, general, f"{name} {layout} {what}")
        assert got.is_contiguous() and got.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
        torch.testing.assert_close(got, torch.from_numpy(expected_np).float(), **EXACT, equal_nan=True)
        assert_same_bits(eager.select_rows(h, mask, name), general, f"select_rows {what}")


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
    for name, clean, got in zip(("out", "grad hidden", "grad scores", "2nd hidden", "2nd scores"), *results):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, clean, rtol=1e-12, atol=1e-12, msg=name)
    expected = oracle.attention(to_numpy(dirty), to_numpy(scores), np_mask(mask))
    torch.testing.assert_close(results[1][0], torch.from_numpy(expected), **for_mode("mean", torch.float64))
