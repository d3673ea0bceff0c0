"""Batch invariance: a row's output bits and gradient bits depend only on its own real tokens.

Needle in a batch: one row (its real tokens, their order and their holes) is pooled alone, then
embedded at a random slot of a random batch: random other rows, random padding before and after it,
padding holding garbage (NaN, inf, huge values), a different thread count, packed among other
sequences instead of padded. Every output bit, max position (relative to the row's first real
token), hidden gradient bit and user-weight gradient bit must be equal (``torch.equal`` on the
bits; a NaN equals a NaN whatever its encoding). Also: mask=None versus an all-ones mask, and a
mode's bits alone versus inside a list of modes.

Every check runs on both backends, each at its own scale (``SCALES``). On the "triton" backend
(the real kernels; under the Triton interpreter on CPU) the two calls compared share the summation
order (``launch.config_override`` of chunk, lanes and feature block: small values, so that
interpreter-sized rows span several chunks, lanes and feature blocks) and each call draws its own
parallelism: a simulated multiprocessor count (what ``forward_grid`` sizes the grid from), chunks
per program, token blocks of the backward, the mask-scan block. That is what another batch or
another GPU changes.
"""

import contextlib
import os
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpool
from fastpool import launch, launchers


@dataclass(frozen=True)
class Scale:
    """How many cases a backend's tests draw, and how large. The Triton interpreter runs each kernel
    program in Python (~25 ms per chunk of a row), so its cases are fewer and smaller; they still span
    several chunks, lanes and programs per row (see ``orders``)."""

    examples: int
    span: int  # tokens from a needle's first to its last real token
    pad: int  # padding before and after it
    rows: int  # rows of a padded batch (the needle's included)
    others: int  # other sequences of a packed batch
    length: int  # their lengths
    T: int  # positions of the mask=None vs all-ones rows


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SCALES = {
    "torch": Scale(examples=30, span=75, pad=40, rows=5, others=5, length=40, T=70),
    "triton": Scale(examples=6, span=32, pad=8, rows=3, others=3, length=12, T=32)
    if INTERPRETED
    else Scale(examples=30, span=75, pad=40, rows=5, others=5, length=40, T=70),
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MASK_DTYPES = (torch.bool, torch.int64, torch.float32)
GARBAGE = ("zeros", "randn", "nan", "inf", "-inf", "huge", "mixed")


def settings_for(backend_name: str):
    return settings(
        max_examples=SCALES[backend_name].examples,
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


@st.composite
def orders(draw) -> dict:
    """The Triton kernels' summation order, shared by the two calls compared: lanes per chunk, chunk
    length (a power of two, at least the lanes) and feature block (None: the dtype's own)."""
    lanes = draw(st.sampled_from((2, 4, 8)))
    chunk = draw(st.sampled_from((8, 16)))
    return dict(lanes=lanes, chunk=chunk, block_d=draw(st.sampled_from((None, None, 8))))


# The parallelism of one Triton call (None: the launcher's own choice): the multiprocessor count
# forward_grid sizes the grid from, chunks per program (1: every chunk its own program, partials
# folded by the last program of the row; 1 << 20: one program per row), the backward's token block
# and the mask scan's block.
GRIDS = st.fixed_dictionaries(
    dict(
        sms=st.sampled_from((1, 2, 16, launch.DEFAULT_SM_COUNT, 10**6)),
        chunks_per_program=st.sampled_from((None, None, 1, 2, 3, 1 << 20)),
        block_t=st.sampled_from((None, 4)),
        scan_block=st.sampled_from((None, 4, 16)),
    )
)


@contextlib.contextmanager
def simulated_sm_count(n: int):
    """forward_grid sees a device with n multiprocessors (the interpreter's default is
    ``launch.DEFAULT_SM_COUNT``; a GPU's is its own)."""
    with mock.patch.object(launchers, "sm_count", lambda device: n):
        yield


@contextlib.contextmanager
def threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def call_setup(backend_name: str, n_threads: int, order: dict, grid: dict):
    """What may differ between two calls compared, per backend: the eager backend's intra-op thread
    count; the Triton launches' parallelism (``grid``, see ``GRIDS``) under a summation order both
    calls share (``order``, see ``orders``). The Triton kernels use no CPU thread pool (under the
    interpreter more threads would only oversubscribe the cores)."""
    if backend_name != "triton":
        with threads(n_threads):
            yield
        return
    fields = {k: v for k, v in {**order, **grid}.items() if v is not None and k != "sms"}
    with launch.config_override(**fields), simulated_sm_count(grid["sms"]):
        yield


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
def needles(draw, scale: Scale, packed: bool = False):
    """A row to pool alone and a batch to hide it in (parameters; tensors are built from a seed)."""
    modes = draw(st.lists(st.sampled_from(fastpool.MODES), min_size=1, max_size=3, unique=True))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)),
        d=draw(st.sampled_from((1, 3, 8, 17))),
        span=draw(st.integers(1, scale.span)),  # from the first to the last real token
        holes=not packed and draw(st.booleans()),
        modes=modes,
        user_weights="weighted_mean" in modes and draw(st.booleans()),
        normalize=draw(st.booleans()),
        B=draw(st.integers(1, scale.rows)),
        slot_frac=draw(st.floats(0, 1, exclude_max=True)),
        before=0 if packed else draw(st.integers(0, scale.pad)),
        after=draw(st.integers(0, scale.pad)),
        garbage=draw(st.sampled_from(GARBAGE)),
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
        batch_threads=draw(st.sampled_from((1, 3))),
        order=draw(orders()),
        grid_alone=draw(GRIDS),
        grid_batch=draw(GRIDS),
        seed=draw(st.integers(0, 2**31 - 1)),
        # Packed: the lengths of the other sequences, and max_seqlen (None, or the longest plus
        # hint: on CUDA it decides whether the grid has window programs for long segments; on CPU
        # the offsets are checked and the real longest is used).
        others=draw(st.lists(st.integers(0, scale.length), max_size=scale.others)) if packed else None,
        hint=draw(st.sampled_from((None, 0, 7))) if packed else None,
    )


@st.composite
def all_ones_cases(draw, scale: Scale):
    """A batch without padding, pooled with mask=None and with an all-ones mask."""
    return dict(
        dtype=draw(st.sampled_from(DTYPES)),
        shape=(
            draw(st.integers(1, scale.rows)),
            draw(st.integers(1, scale.T)),
            draw(st.sampled_from((1, 5, 17))),
        ),
        modes=draw(st.lists(st.sampled_from(fastpool.MODES), min_size=1, max_size=3, unique=True)),
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
        order=draw(orders()),
        grids=(draw(GRIDS), draw(GRIDS)),
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


def pool_with_grads(hidden, mask, weights, grad, modes, normalize, packed=None, max_seqlen=None):
    """(out, max positions or None, hidden gradient, weights gradient or None, inference out).

    The inference output is the same call without autograd (the lean launch path; max without
    positions): its bits must be the output's."""
    kwargs = dict(mode=modes, normalize=normalize, weights=weights)
    if packed is not None:
        kwargs.update(cu_seqlens=packed, max_seqlen=max_seqlen)
    with torch.no_grad():
        inference = fastpool.pool(hidden, mask, **kwargs)
    hidden = hidden.detach().requires_grad_()
    weights = None if weights is None else weights.detach().requires_grad_()
    kwargs["weights"] = weights
    out = fastpool.pool(hidden, mask, **kwargs)
    inputs = (hidden,) if weights is None else (hidden, weights)
    grads = torch.autograd.grad(out, inputs, grad)
    index = None
    if "max" in modes:
        kwargs = {} if packed is None else {"cu_seqlens": packed, "max_seqlen": max_seqlen}
        _, index = fastpool.max_pool(hidden.detach(), mask, return_indices=True, **kwargs)
    return out, index, grads[0], (grads[1] if weights is not None else None), inference


def compare(alone, embedded, where: str):
    out, index, grad_h, grad_w, _ = alone
    out_b, index_b, grad_h_b, grad_w_b, inference_b = embedded
    assert_same_bits(out_b, out, f"{where}: output")
    assert_same_bits(inference_b, out, f"{where}: output without autograd")
    if index is not None:
        assert torch.equal(index_b.cpu(), index.cpu()), f"{where}: max positions"
    assert_same_bits(grad_h_b, grad_h, f"{where}: gradient of hidden")
    if grad_w is not None:
        assert_same_bits(grad_w_b, grad_w, f"{where}: gradient of the weights")


def check_needle_in_a_padded_batch(backend_name, device, p):
    """The row at a random slot of a random padded batch: the bits of the row pooled alone."""
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
        with call_setup(backend_name, 4 - p["batch_threads"], p["order"], p["grid_alone"]):
            alone = pool_with_grads(hidden1, mask1, weights1, grad1, p["modes"], p["normalize"])
        with call_setup(backend_name, p["batch_threads"], p["order"], p["grid_batch"]):
            out, index, grad_h, grad_w, inference = pool_with_grads(
                move(hidden), move(mask), move(weights), move(grad), p["modes"], p["normalize"]
            )
    embedded = (
        out[slot : slot + 1],
        None
        if index is None
        else torch.where(index[slot : slot + 1] >= 0, index[slot : slot + 1] - p["before"], -1),
        grad_h[slot : slot + 1, own],
        None if grad_w is None else grad_w[slot : slot + 1, own],
        inference[slot : slot + 1],
    )
    compare(alone, embedded, f"slot {slot} of {B}, {p['before']} before, {p['after']} after")


def check_needle_in_a_packed_batch(backend_name, device, p):
    """The same row as one sequence of a packed batch: the bits of the row pooled alone (padded)."""
    others, hint = p["others"], p["hint"]
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
    max_seqlen = None if hint is None else max(lengths) + hint
    with fastpool.use_backend(backend_name):
        with call_setup(backend_name, 4 - p["batch_threads"], p["order"], p["grid_alone"]):
            alone = pool_with_grads(hidden1, None, weights1, grad1, p["modes"], p["normalize"])
        with call_setup(backend_name, p["batch_threads"], p["order"], p["grid_batch"]):
            out, index, grad_h, grad_w, inference = pool_with_grads(
                move(hidden),
                None,
                move(weights),
                move(grad),
                p["modes"],
                p["normalize"],
                move(cu),
                max_seqlen,
            )
    embedded = (
        out[slot : slot + 1],
        None if index is None else index[slot : slot + 1] - start,
        grad_h[own].unsqueeze(0),
        None if grad_w is None else grad_w[own].unsqueeze(0),
        inference[slot : slot + 1],
    )
    compare(alone, embedded, f"sequence {slot} of {len(lengths)} (offset {start})")


def check_mask_none_and_all_ones(backend_name, device, p):
    dtype, shape, modes, order, grids = p["dtype"], p["shape"], p["modes"], p["order"], p["grids"]
    mask_dtype, seed = p["mask_dtype"], p["seed"]
    gen = torch.Generator().manual_seed(seed)
    hidden = token_values(shape, dtype, gen).to(device)
    grad = torch.randn(shape[0], len(modes) * shape[2], generator=gen).to(dtype).to(device)
    ones = torch.ones(shape[:2], dtype=mask_dtype, device=device)
    with fastpool.use_backend(backend_name):
        with call_setup(backend_name, 1, order, grids[0]):
            none = pool_with_grads(hidden, None, None, grad, modes, False)
        with call_setup(backend_name, 3, order, grids[1]):
            full = pool_with_grads(hidden, ones, None, grad, modes, False)
    compare(none, full, "mask=None vs all ones")


def check_modes_alone_and_together(backend_name, device, p, packed):
    """Each mode's columns of a multi-mode call: the bits of the mode pooled alone."""
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
        with call_setup(backend_name, 1, p["order"], p["grid_batch"]):
            together = fastpool.pool(hidden, mask, mode=p["modes"], weights=weights, **kwargs)
        for i, mode in enumerate(p["modes"]):
            with call_setup(backend_name, 3, p["order"], p["grid_alone"]):
                alone = fastpool.pool(
                    hidden, mask, mode=mode, weights=weights if mode == "weighted_mean" else None, **kwargs
                )
            assert_same_bits(together[:, i * d : (i + 1) * d], alone, f"{mode} in {p['modes']}")
        assert_same_bits(together[1:], together[:1].expand(B - 1, -1), "identical rows")


# The tests, one per check and backend: each backend draws its cases at its own scale (SCALES).
TORCH, TRITON = SCALES["torch"], SCALES["triton"]


@settings_for("torch")
@given(p=needles(TORCH))
def test_needle_in_a_padded_batch_torch(device, p):
    check_needle_in_a_padded_batch("torch", device, p)


@settings_for("triton")
@given(p=needles(TRITON))
def test_needle_in_a_padded_batch_triton(device, p):
    check_needle_in_a_padded_batch("triton", device, p)


@settings_for("torch")
@given(p=needles(TORCH, packed=True))
def test_needle_in_a_packed_batch_torch(device, p):
    check_needle_in_a_packed_batch("torch", device, p)


@settings_for("triton")
@given(p=needles(TRITON, packed=True))
def test_needle_in_a_packed_batch_triton(device, p):
    check_needle_in_a_packed_batch("triton", device, p)


@settings_for("torch")
@given(p=all_ones_cases(TORCH))
def test_mask_none_and_all_ones_give_the_same_bits_torch(device, p):
    check_mask_none_and_all_ones("torch", device, p)


@settings_for("triton")
@given(p=all_ones_cases(TRITON))
def test_mask_none_and_all_ones_give_the_same_bits_triton(device, p):
    check_mask_none_and_all_ones("triton", device, p)


@settings_for("torch")
@given(p=needles(TORCH), packed=st.booleans())
def test_a_mode_has_the_same_bits_alone_and_among_other_modes_torch(device, p, packed):
    check_modes_alone_and_together("torch", device, p, packed)


@settings_for("triton")
@given(p=needles(TRITON), packed=st.booleans())
def test_a_mode_has_the_same_bits_alone_and_among_other_modes_triton(device, p, packed):
    check_modes_alone_and_together("triton", device, p, packed)


# Rows split differently by the grid: (modes, user weights, normalize, multiprocessor counts of the
# call with the row alone and of the call with the batch of BATCH_ROWS rows).
GRID_CASES = (
    (["mean", "max", "weighted_mean"], False, False, (launch.DEFAULT_SM_COUNT, 1)),
    (["weighted_mean", "cls", "last", "mean_sqrt_len"], True, True, (1, 10**6)),
)
BATCH_ROWS = 4


@pytest.mark.parametrize("case", GRID_CASES, ids=lambda case: ",".join(case[0]))
def test_triton_bits_do_not_depend_on_the_multiprocessor_count(device, case):
    """A row of several chunks pooled alone and inside a batch on simulated GPUs with different
    multiprocessor counts, so that forward_grid spreads it over a different number of programs (one
    program folding every chunk in registers, or partials folded by the last program of the row):
    the same bits, forward and backward."""
    modes, user_weights, normalize, (sms_alone, sms_batch) = case
    gen = torch.Generator().manual_seed(11)
    span, d, before, after, chunk = 37, 5, 6, 3, 8
    T = before + span + after
    hidden, real = random_rows(BATCH_ROWS, T, d, torch.float32, gen, "nan")
    own = slice(before, before + span)
    real[2] = False
    real[2, own] = torch.rand(span, generator=gen) < 0.7
    real[2, before] = real[2, before + span - 1] = True
    hidden[2, own] = token_values((span, d), torch.float32, gen)
    weights = torch.randn(BATCH_ROWS, T, generator=gen) if user_weights else None
    grad = torch.randn(BATCH_ROWS, len(modes) * d, generator=gen)
    # The programs per row forward_grid picks for each call: they must differ for the test to mean anything.
    n_slots = -(-T // chunk)
    with launch.config_override(chunk=chunk):
        alone_programs = launchers.forward_grid(1, span, 1, sms_alone).programs_per_row
        batch_programs = launchers.forward_grid(BATCH_ROWS, T, 1, sms_batch).programs_per_row
    assert alone_programs != batch_programs and n_slots > 1
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    order = dict(chunk=chunk, lanes=4, block_d=None)
    grid = dict(chunks_per_program=None, block_t=None, scan_block=None)
    with fastpool.use_backend("triton"):
        with call_setup("triton", 1, order, dict(grid, sms=sms_alone)):
            row_weights = None if weights is None else weights[2:3, own]
            alone = pool_with_grads(
                move(hidden[2:3, own]),
                move(real[2:3, own]),
                move(row_weights),
                move(grad[2:3]),
                modes,
                normalize,
            )
        with call_setup("triton", 1, order, dict(grid, sms=sms_batch)):
            out, index, grad_h, grad_w, inference = pool_with_grads(
                move(hidden), move(real), move(weights), move(grad), modes, normalize
            )
    embedded = (
        out[2:3],
        None if index is None else torch.where(index[2:3] >= 0, index[2:3] - before, -1),
        grad_h[2:3, own],
        None if grad_w is None else grad_w[2:3, own],
        inference[2:3],
    )
    compare(alone, embedded, f"{alone_programs} vs {batch_programs} programs per row")


@pytest.mark.parametrize("backend_name", sorted(SCALES))
def test_normalized_gradient_of_a_wide_row_does_not_depend_on_threads(backend_name, device):
    """normalize=True over a row of 100000 outputs: its gradient needs the dot product of the output
    row with the incoming gradient. ATen's sum of a single row that long is split over the intra-op
    threads (its order changes with the thread count); the rows of a batch are not."""
    gen = torch.Generator().manual_seed(5)
    modes, d = ["mean", "max", "cls", "last"], 25000
    hidden = torch.randn(2, 3, d, generator=gen).to(device)
    grad = torch.randn(2, len(modes) * d, generator=gen).to(device)
    # One feature block per 8192 features: few interpreted programs (the same block for both calls).
    blocks = launch.config_override(block_d=8192) if backend_name == "triton" else contextlib.nullcontext()
    with fastpool.use_backend(backend_name), blocks:
        with threads(3):
            alone = pool_with_grads(hidden[:1], None, None, grad[:1], modes, True)
        with threads(1):
            together = pool_with_grads(hidden, None, None, grad, modes, True)
    compare(
        alone, tuple(None if t is None else t[:1] for t in together), "a row alone (3 threads) vs in a batch"
    )
