"""Batch invariance: a row's output bits and gradient bits depend only on its own real tokens.

Needle in a batch: one row (its real tokens, their order and their holes) is pooled alone, then
embedded at a random slot of a random batch: random other rows, random padding before and after it,
padding holding garbage (NaN, inf, huge values), a different thread count, packed among other
sequences instead of padded. Every output bit, max position (relative to the row's first real
token), hidden gradient bit and user-weight gradient bit must be equal (``torch.equal`` on the
bits; a NaN equals a NaN whatever its encoding). Also: mask=None versus an all-ones mask, and a
mode's bits alone versus inside a list of modes.

The tests take the backend from ``INVARIANT_BACKENDS`` (the backends that guarantee it).
"""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpool

INVARIANT_BACKENDS = ("torch",)

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MASK_DTYPES = (torch.bool, torch.int64, torch.float32)
GARBAGE = ("zeros", "randn", "nan", "inf", "-inf", "huge", "mixed")
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(x: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (floats as integers of their width), on the CPU. A NaN counts as
    one pattern: the guarantee is that NaN stays NaN, not which of the NaN encodings it is (ATen's
    vectorised and scalar float conversions encode a NaN differently)."""
    x = x.detach().cpu()
    if not x.is_floating_point():
        return x
    x = torch.where(torch.isnan(x), torch.full((), float("nan"), dtype=x.dtype), x)
    return x.view(_INT_OF_WIDTH[x.element_size()])


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    assert torch.equal(bits(got), bits(expected)), f"{what}: bits differ\n{got}\n{expected}"


@contextlib.contextmanager
def threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def garbage_like(shape, dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    """What padding holds: never read, whatever it is."""
    huge = torch.finfo(dtype).max
    f64 = torch.float64
    values = {
        "zeros": torch.zeros(shape, dtype=f64),
        "randn": torch.randn(shape, generator=gen, dtype=f64) * 100,
        "nan": torch.full(shape, float("nan"), dtype=f64),
        "inf": torch.full(shape, float("inf"), dtype=f64),
        "-inf": torch.full(shape, float("-inf"), dtype=f64),
        "huge": torch.full(shape, huge, dtype=f64),
    }
    if kind != "mixed":
        return values[kind].to(dtype)
    pick = torch.randint(0, 6, shape, generator=gen)
    stack = torch.stack([values[k] for k in ("zeros", "randn", "nan", "inf", "-inf", "huge")])
    return stack.gather(0, pick.unsqueeze(0)).squeeze(0).to(dtype)


def token_values(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Real tokens: random values with signed zeros, ties and now and then an inf or a NaN."""
    x = torch.randn(shape, generator=gen) * 4
    special = torch.rand(shape, generator=gen)
    x = torch.where(special < 0.05, torch.zeros(()), x)
    x = torch.where((special >= 0.05) & (special < 0.1), -torch.zeros(()), x)
    x = torch.where((special >= 0.1) & (special < 0.15), x.round(), x)  # ties
    x = torch.where((special >= 0.15) & (special < 0.152), torch.full((), float("inf")), x)
    x = torch.where((special >= 0.152) & (special < 0.154), torch.full((), float("nan")), x)
    return x.to(dtype)


@st.composite
def needles(draw, packed: bool = False):
    """A row to pool alone and a batch to hide it in (parameters; tensors are built from a seed)."""
    modes = draw(st.lists(st.sampled_from(fastpool.MODES), min_size=1, max_size=3, unique=True))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)),
        d=draw(st.sampled_from((1, 3, 8, 17))),
        span=draw(st.integers(1, 75)),  # from the first to the last real token: up to 3 lanes' chunks
        holes=not packed and draw(st.booleans()),
        modes=modes,
        user_weights="weighted_mean" in modes and draw(st.booleans()),
        normalize=draw(st.booleans()),
        B=draw(st.integers(1, 5)),
        slot_frac=draw(st.floats(0, 1, exclude_max=True)),
        before=0 if packed else draw(st.integers(0, 40)),
        after=draw(st.integers(0, 40)),
        garbage=draw(st.sampled_from(GARBAGE)),
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
        batch_threads=draw(st.sampled_from((1, 3))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_needle(p: dict, device: str):
    """(hidden (1, span, d), mask (1, span) bool or None, weights (1, span) or None, grad (1, n*d))."""
    gen = torch.Generator().manual_seed(p["seed"])
    span, d, dtype = p["span"], p["d"], p["dtype"]
    hidden = token_values((1, span, d), dtype, gen)
    mask = None
    if p["holes"]:
        mask = torch.rand(1, span, generator=gen) < 0.6
        mask[0, 0] = mask[0, -1] = True  # the span runs from the first to the last real token
    weights = torch.randn(1, span, generator=gen).to(dtype) if p["user_weights"] else None
    grad = torch.randn(1, len(p["modes"]) * d, generator=gen).to(dtype)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(hidden), move(mask), move(weights), move(grad)


def random_rows(B: int, T: int, d: int, dtype, gen: torch.Generator, garbage: str):
    """Other rows of a batch: random lengths and layouts (right, left, holes, empty)."""
    hidden = token_values((B, T, d), dtype, gen)
    layout = torch.randint(0, 4, (B,), generator=gen)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    pos = torch.arange(T)
    right = pos < lengths[:, None]
    left = pos >= (T - lengths)[:, None]
    holes = torch.rand(B, T, generator=gen) < 0.5
    mask = torch.stack([right, left, holes, torch.zeros(B, T, dtype=torch.bool)])[layout, torch.arange(B)]
    hidden = torch.where(mask[..., None], hidden, garbage_like((B, T, d), dtype, garbage, gen))
    return hidden, mask


def pool_with_grads(hidden, mask, weights, grad, modes, normalize, packed=None):
    """(out, max positions or None, hidden gradient, weights gradient or None)."""
    hidden = hidden.detach().requires_grad_()
    weights = None if weights is None else weights.detach().requires_grad_()
    kwargs = dict(mode=modes, normalize=normalize, weights=weights)
    if packed is not None:
        kwargs["cu_seqlens"] = packed
    out = fastpool.pool(hidden, mask, **kwargs)
    inputs = (hidden,) if weights is None else (hidden, weights)
    grads = torch.autograd.grad(out, inputs, grad)
    index = None
    if "max" in modes:
        kwargs = {} if packed is None else {"cu_seqlens": packed}
        _, index = fastpool.max_pool(hidden.detach(), mask, return_indices=True, **kwargs)
    return out, index, grads[0], (grads[1] if weights is not None else None)


def compare(alone, embedded, where: str):
    out, index, grad_h, grad_w = alone
    out_b, index_b, grad_h_b, grad_w_b = embedded
    assert_same_bits(out_b, out, f"{where}: output")
    if index is not None:
        assert torch.equal(index_b.cpu(), index.cpu()), f"{where}: max positions"
    assert_same_bits(grad_h_b, grad_h, f"{where}: gradient of hidden")
    if grad_w is not None:
        assert_same_bits(grad_w_b, grad_w, f"{where}: gradient of the weights")


@pytest.mark.parametrize("backend_name", INVARIANT_BACKENDS)
@SETTINGS
@given(p=needles())
def test_needle_in_a_padded_batch(backend_name, device, p):
    hidden1, mask1, weights1, grad1 = make_needle(p, device)
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    span, d, dtype, B = p["span"], p["d"], p["dtype"], p["B"]
    T = p["before"] + span + p["after"]
    slot = int(p["slot_frac"] * B)
    hidden, real = random_rows(B, T, d, dtype, gen, p["garbage"])
    own = slice(p["before"], p["before"] + span)
    needle_real = torch.ones(span, dtype=torch.bool) if mask1 is None else mask1[0].cpu()
    real[slot] = False
    real[slot, own] = needle_real
    hidden[slot] = garbage_like((T, d), dtype, p["garbage"], gen)
    hidden[slot, own] = torch.where(needle_real[:, None], hidden1[0].cpu(), hidden[slot, own])
    weights = grad = None
    if weights1 is not None:
        weights = garbage_like((B, T), dtype, p["garbage"], gen)
        weights = torch.where(real, torch.randn(B, T, generator=gen).to(dtype), weights)
        weights[slot, own] = torch.where(needle_real, weights1[0].cpu(), weights[slot, own])
    grad = torch.randn(B, grad1.shape[1], generator=gen).to(dtype)
    grad[slot] = grad1[0].cpu()
    mask = real.to(p["mask_dtype"])
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    with fastpool.use_backend(backend_name):
        with threads(4 - p["batch_threads"]):
            alone = pool_with_grads(hidden1, mask1, weights1, grad1, p["modes"], p["normalize"])
        with threads(p["batch_threads"]):
            out, index, grad_h, grad_w = pool_with_grads(
                move(hidden), move(mask), move(weights), move(grad), p["modes"], p["normalize"]
            )
    embedded = (
        out[slot : slot + 1],
        None
        if index is None
        else torch.where(index[slot : slot + 1] >= 0, index[slot : slot + 1] - p["before"], -1),
        grad_h[slot : slot + 1, own],
        None if grad_w is None else grad_w[slot : slot + 1, own],
    )
    compare(alone, embedded, f"slot {slot} of {B}, {p['before']} before, {p['after']} after")


@pytest.mark.parametrize("backend_name", INVARIANT_BACKENDS)
@SETTINGS
@given(p=needles(packed=True), others=st.lists(st.integers(0, 40), min_size=0, max_size=5))
def test_needle_in_a_packed_batch(backend_name, device, p, others):
    """The same row as one sequence of a packed batch: the bits of the row pooled alone (padded)."""
    hidden1, _, weights1, grad1 = make_needle(p, device)
    gen = torch.Generator().manual_seed(p["seed"] + 2)
    span, d, dtype = p["span"], p["d"], p["dtype"]
    slot = int(p["slot_frac"] * (len(others) + 1))
    lengths = [*others[:slot], span, *others[slot:]]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    N = int(cu[-1])
    start = int(cu[slot])
    own = slice(start, start + span)
    hidden = token_values((N, d), dtype, gen)
    hidden[own] = hidden1[0].cpu()
    weights = None
    if weights1 is not None:
        weights = torch.randn(N, generator=gen).to(dtype)
        weights[own] = weights1[0].cpu()
    grad = torch.randn(len(lengths), grad1.shape[1], generator=gen).to(dtype)
    grad[slot] = grad1[0].cpu()
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    with fastpool.use_backend(backend_name):
        with threads(4 - p["batch_threads"]):
            alone = pool_with_grads(hidden1, None, weights1, grad1, p["modes"], p["normalize"])
        with threads(p["batch_threads"]):
            out, index, grad_h, grad_w = pool_with_grads(
                move(hidden), None, move(weights), move(grad), p["modes"], p["normalize"], packed=move(cu)
            )
    embedded = (
        out[slot : slot + 1],
        None if index is None else index[slot : slot + 1] - start,
        grad_h[own].unsqueeze(0),
        None if grad_w is None else grad_w[own].unsqueeze(0),
    )
    compare(alone, embedded, f"sequence {slot} of {len(lengths)} (offset {start})")


@pytest.mark.parametrize("backend_name", INVARIANT_BACKENDS)
@SETTINGS
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 70), st.sampled_from((1, 5, 17))),
    modes=st.lists(st.sampled_from(fastpool.MODES), min_size=1, max_size=3, unique=True),
    mask_dtype=st.sampled_from(MASK_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_none_and_all_ones_give_the_same_bits(
    backend_name, device, dtype, shape, modes, mask_dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    hidden = token_values(shape, dtype, gen).to(device)
    grad = torch.randn(shape[0], len(modes) * shape[2], generator=gen).to(dtype).to(device)
    ones = torch.ones(shape[:2], dtype=mask_dtype, device=device)
    with fastpool.use_backend(backend_name):
        none = pool_with_grads(hidden, None, None, grad, modes, False)
        full = pool_with_grads(hidden, ones, None, grad, modes, False)
    compare(none, full, "mask=None vs all ones")


@pytest.mark.parametrize("backend_name", INVARIANT_BACKENDS)
@SETTINGS
@given(p=needles(), packed=st.booleans())
def test_a_mode_has_the_same_bits_alone_and_among_other_modes(backend_name, device, p, packed):
    hidden, mask, weights, _ = make_needle(p, device)
    B = p["B"]
    hidden = hidden.expand(B, -1, -1).contiguous()  # a few identical rows: also row-independent
    mask = None if mask is None or packed else mask.expand(B, -1).contiguous()
    weights = None if weights is None else weights.expand(B, -1).contiguous()
    kwargs = {}
    if packed:
        hidden = hidden.reshape(-1, p["d"])
        weights = None if weights is None else weights.reshape(-1)
        kwargs["cu_seqlens"] = torch.arange(0, B + 1, device=device) * p["span"]
    d = p["d"]
    with fastpool.use_backend(backend_name):
        together = fastpool.pool(hidden, mask, mode=p["modes"], weights=weights, **kwargs)
        for i, mode in enumerate(p["modes"]):
            alone = fastpool.pool(
                hidden, mask, mode=mode, weights=weights if mode == "weighted_mean" else None, **kwargs
            )
            assert_same_bits(together[:, i * d : (i + 1) * d], alone, f"{mode} in {p['modes']}")
        assert_same_bits(together[1:], together[:1].expand(B - 1, -1), "identical rows")
