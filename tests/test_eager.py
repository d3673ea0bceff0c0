"""The eager ("torch") backend's own machinery: long rows (several lanes' chunks, rotated lanes,
several max blocks) against the oracle, the max position search at block edges, the values-only
max, the summation primitives, and thread-count independence at sizes where ATen goes parallel."""

import contextlib

import oracle
import pytest
import torch
from helpers import np_mask, to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_batch_invariance import assert_same_bits
from tolerances import for_mode

import fastpool
from fastpool import eager, eager_packed, eager_sums

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LAYOUTS = ("none", "ones", "right", "left", "holes", "empty-row")


def make_mask(layout: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor | None:
    if layout == "none":
        return None
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    pos = torch.arange(T)
    mask = {
        "ones": torch.ones(B, T, dtype=torch.bool),
        "right": pos < lengths[:, None],
        "left": pos >= (T - lengths)[:, None],
        "holes": torch.rand(B, T, generator=gen) < 0.5,
        "empty-row": torch.rand(B, T, generator=gen) < 0.8,
    }[layout]
    if layout == "empty-row":
        mask[B // 2] = False
    return mask


def assert_matches_oracle(got: torch.Tensor, expected, mode: str, dtype: torch.dtype) -> None:
    expected = torch.from_numpy(expected).to(dtype)
    torch.testing.assert_close(got.cpu(), expected, **for_mode(mode, dtype))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 200),
    d=st.sampled_from((1, 5, 17)),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    mode=st.sampled_from(fastpool.MODES),
    user_weights=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_long_rows_match_the_oracle(device, B, T, d, dtype, layout, mode, user_weights, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, d, generator=gen) * 3).round(decimals=1).to(dtype).to(device)  # ties
    mask = make_mask(layout, B, T, gen)
    mask = None if mask is None else mask.to(device)
    weights = None
    if mode == "weighted_mean" and user_weights:
        weights = (torch.rand(B, T, generator=gen) + 0.5).to(dtype).to(device)
    grad = torch.randn(B, d, generator=gen).to(dtype).to(device)
    h = hidden.clone().requires_grad_()
    with fastpool.use_backend("torch"):
        out = fastpool.pool(h, mask, mode=mode, weights=weights)
        (grad_h,) = torch.autograd.grad(out, h, grad)
        if mode == "max":
            _, index = fastpool.max_pool(hidden, mask, return_indices=True)
    np_h, np_m, np_w = to_numpy(hidden), np_mask(mask), to_numpy(weights)
    assert_matches_oracle(out, oracle.pool(np_h, np_m, mode, np_w), mode, dtype)
    expected_grad = oracle.pool_grad(np_h, np_m, mode, to_numpy(grad), np_w)
    assert_matches_oracle(grad_h, expected_grad, "mean" if mode == "max" else mode, dtype)
    if mode == "max":
        assert torch.equal(index.cpu(), torch.from_numpy(oracle.max_with_index(np_h, np_m)[1]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 150), min_size=1, max_size=6),
    d=st.sampled_from((1, 5, 17)),
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(fastpool.MODES),
    user_weights=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_long_packed_sequences_match_the_oracle(device, lengths, d, dtype, mode, user_weights, seed):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(device)
    N = int(cu[-1])
    hidden = (torch.randn(N, d, generator=gen) * 3).round(decimals=1).to(dtype).to(device)
    weights = None
    if mode == "weighted_mean" and user_weights:
        weights = (torch.rand(N, generator=gen) + 0.5).to(dtype).to(device)
    with fastpool.use_backend("torch"):
        out = fastpool.pool(hidden, mode=mode, weights=weights, cu_seqlens=cu)
        if mode == "max":
            _, index = fastpool.max_pool(hidden, return_indices=True, cu_seqlens=cu)
    np_h, np_cu = to_numpy(hidden), cu.cpu().numpy()
    assert_matches_oracle(out, oracle.packed_pool(np_h, np_cu, mode, to_numpy(weights)), mode, dtype)
    if mode == "max":
        assert torch.equal(index.cpu(), torch.from_numpy(oracle.packed_max_index(np_h, np_cu)))


@pytest.mark.parametrize("T", [15, 16, 17, 31, 33, 40])
def test_max_positions_at_block_edges_and_ties(device, T):
    """The position search looks in one block of 16 positions: ties across block edges, a max in
    the shorter last block, -inf rows whose padding is -inf too, NaN, signed zeros."""
    B, d = 7, 3
    hidden = torch.full((B, T, d), -5.0)
    mask = torch.ones(B, T, dtype=torch.bool)
    hidden[0, [T - 1, 3], 0] = 2.0  # tie: the first (3) wins
    hidden[0, T - 1, 1] = 9.0  # in the last block
    hidden[1, :, :] = float("-inf")  # all -inf, padding before them -inf too
    mask[1, : T // 2] = False
    hidden[2, T // 2 :, 0] = float("nan")
    hidden[2, 1, 0] = 100.0
    hidden[3, :, :] = 0.0
    hidden[3, 2:, 2] = -0.0
    hidden[3, 0, 2] = -0.0
    hidden[4, :, :] = 7.0  # padding ties with the max before the real tokens
    mask[4, :5] = False
    hidden[5] = torch.arange(T, dtype=torch.float32).flip(0)[:, None]
    mask[6] = False
    hidden, mask = hidden.to(device), mask.to(device)
    with fastpool.use_backend("torch"):
        values, index = fastpool.max_pool(hidden, mask, return_indices=True)
    expected_values, expected_index = oracle.max_with_index(to_numpy(hidden), np_mask(mask))
    assert torch.equal(index.cpu(), torch.from_numpy(expected_index))
    expected_values = torch.from_numpy(expected_values).float()
    assert torch.equal(values.cpu().isnan(), expected_values.isnan())
    assert torch.equal(values.cpu().nan_to_num(), expected_values.nan_to_num())  # -0.0 == +0.0 here
    assert not torch.signbit(values[3]).any()  # a zero max is +0.0, whatever the order of ties


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_only_max_has_the_bits_of_max_with_positions(device, dtype, layout):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, 70, 9, generator=gen).to(dtype)
    mask = make_mask(layout, 5, 70, gen)
    if mask is not None:
        hidden = torch.where(mask[..., None], hidden, torch.tensor(float("nan"), dtype=dtype))
        mask = mask.to(device)
    hidden = hidden.to(device)
    full, index, stats, _ = eager.pool_forward(hidden, mask, ["mean", "max"], need_indices=True)
    fast, no_index, stats2, _ = eager.pool_forward(hidden, mask, ["mean", "max"], need_indices=False)
    assert_same_bits(fast, full, "padded")
    assert index.shape == (5, 9) and no_index.shape == (5, 0) and torch.equal(stats, stats2)
    cu = torch.tensor([0, 0, 30, 31, 101], device=device)
    packed = torch.randn(101, 9, generator=gen).to(dtype).to(device)
    full, index, _, _ = eager_packed.pool_forward(packed, cu, ["max"], need_indices=True)
    fast, no_index, _, _ = eager_packed.pool_forward(packed, cu, ["max"], need_indices=False)
    assert_same_bits(fast, full, "packed")
    assert index.shape == (4, 9) and no_index.shape == (4, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bagged_padded_sums_have_the_bits_of_index_add(dtype, layout, monkeypatch):
    # Padded plain sums on the CPU go through embedding_bag (rows widened a few at a time into one
    # buffer): against index_add_ into a spare row, the documented sequential order, with groups of
    # 3 rows per buffer, NaN in the padding, empty rows; and the fallback for rows over the buffer.
    monkeypatch.setattr(eager_sums, "_BAG_CHUNK_BYTES", 3 * 40 * 6 * 4)
    gen = torch.Generator().manual_seed(31)
    B, T, d = 7, 40, 6
    hidden = (torch.randn(B, T, d, generator=gen) * 1e3).to(dtype)
    mask = make_mask(layout, B, T, gen)
    if mask is not None:
        hidden = torch.where(mask[..., None], hidden, torch.tensor(float("nan"), dtype=dtype))
    real = eager.real_tokens(mask)
    dest = torch.arange(B).unsqueeze(1).expand(B, T)
    if real is not None:
        dest = torch.where(real, dest, B)
    expected = torch.zeros(B + 1, d).index_add_(0, dest.reshape(-1), hidden.reshape(-1, d).float())[:B]
    first = torch.zeros(B, dtype=torch.int64)
    assert_same_bits(eager_sums.padded_sum(hidden, real, first, torch.float32), expected, layout)
    monkeypatch.setattr(eager_sums, "_BAG_CHUNK_BYTES", 16)  # a row is larger: index_add_ itself
    assert_same_bits(eager_sums.padded_sum(hidden, real, first, torch.float32), expected, layout)
    strided = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # float32: not read in place
    assert_same_bits(eager_sums.padded_sum(strided, real, first, torch.float32), expected, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("side", ["right", "left"])
def test_bag_sums_of_runs_have_the_bits_of_index_add(dtype, side, monkeypatch):
    # 16-bit rows of right / left padding: each row's run of real tokens widened alone, back to back
    # in a buffer of 50 tokens (runs that do not fit go to the next buffer), with empty rows first,
    # inside and last, NaN padding; against index_add_ into a spare row.
    monkeypatch.setattr(eager_sums, "_BAG_CHUNK_BYTES", 50 * 6 * 4)
    gen = torch.Generator().manual_seed(33)
    B, T, d = 9, 30, 6
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = lengths[4] = lengths[8] = 0
    lengths[1] = max(int(lengths[1]), 3)
    pos = torch.arange(T)
    real = pos < lengths[:, None] if side == "right" else pos >= (T - lengths)[:, None]
    hidden = torch.where(real[..., None], torch.randn(B, T, d, generator=gen) * 1e3, float("nan")).to(dtype)
    assert eager_sums.row_runs(real) is not None

    def expected_of(real):
        dest = torch.where(real, torch.arange(B).unsqueeze(1), B)
        return torch.zeros(B + 1, d).index_add_(0, dest.reshape(-1), hidden.reshape(-1, d).float())[:B]

    first = torch.zeros(B, dtype=torch.int64)
    assert_same_bits(eager_sums.padded_sum(hidden, real, first, torch.float32), expected_of(real), side)
    holes = real.clone()
    holes[1, real[1].nonzero()[1]] = False  # a hole inside row 1's run: whole rows instead
    assert eager_sums.row_runs(holes) is None
    assert_same_bits(eager_sums.padded_sum(hidden, holes, first, torch.float32), expected_of(holes), "holes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", ["row groups", "position chunks"])
def test_one_pass_sum_and_max_has_the_bits_of_two_passes(dtype, layout, groups, monkeypatch):
    # 16-bit mean + max on the CPU without positions: one widened pass for both (padded_sum_and_max),
    # against the sum and the max computed apart, with +inf and NaN in the padding. Row groups of 3
    # rows (B = 4: a full and a partial group); or rows too long for a group, then many small chunks
    # of positions (so that chunk edges, runs of full chunks and chunks with padding all occur).
    from fastpool import eager_max

    gen = torch.Generator().manual_seed(21)
    B, T, d = 4, 150, 9
    if groups == "row groups":
        monkeypatch.setattr(eager_sums, "_BAG_CHUNK_BYTES", 3 * T * d * 4)
    else:
        monkeypatch.setattr(eager_sums, "_BAG_CHUNK_BYTES", T * d * 4 - 1)
        monkeypatch.setattr(eager_max, "_CHUNK_BYTES", 4 * 16 * 9 * 4)  # 16 tokens of 4 rows per chunk
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    mask = make_mask(layout, B, T, gen)
    if mask is not None:
        # Per row: padding of a large finite value (wins unless masked), +inf, NaN, or a mix.
        kinds = torch.tensor([[100.0], [float("inf")], [float("nan")], [100.0]], dtype=dtype)
        filler = kinds.view(B, 1, 1).expand(B, T, 1).clone()
        filler[3, ::2] = float("inf")
        hidden = torch.where(mask[..., None], hidden, filler)
    real = eager.real_tokens(mask)
    count = torch.full((B,), T) if real is None else real.sum(1)
    first = torch.zeros(B, dtype=torch.int64) if real is None else real.view(torch.uint8).argmax(1)
    total, values = eager_max.padded_sum_and_max(hidden, real, count)
    assert_same_bits(total, eager_sums.padded_sum(hidden, real, first, torch.float32), layout)
    assert_same_bits(values, eager_max.padded_max(hidden, real, count, False)[0], layout)
    fused = eager.pool_forward(hidden, mask, ["mean", "max"], need_indices=False)[0]
    apart = eager.pool_forward(hidden, mask, ["mean", "max"], need_indices=True)[0]
    assert_same_bits(fused, apart, layout)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float16], ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["cls", "last"])
def test_lean_selection_has_the_bits_of_the_full_forward(device, name, layout, strided, mask_dtype):
    # The inference path of a lone cls / last (select_rows, no row statistics) against the forward
    # that keeps them for the backward: same bits, NaN padding ignored, zeros for an empty row,
    # never a view of hidden; and the public call takes that path (no gradient wanted).
    gen = torch.Generator().manual_seed(11)
    B, T, d = 6, 37, 8
    hidden = torch.randn(B, T, d, generator=gen)
    mask = make_mask(layout, B, T, gen)
    if mask is not None:
        hidden = torch.where(mask[..., None], hidden, torch.tensor(float("nan")))
        mask = mask.to(mask_dtype).to(device)
    hidden = hidden.to(device)
    if strided:  # (B * T, d) is not a view of this one: the advanced-indexing gather
        hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    full, _, stats, _ = eager.pool_forward(hidden, mask, [name], need_indices=False)
    lean = eager.select_rows(hidden, mask, name)
    assert_same_bits(lean, full, layout)
    assert lean.data_ptr() != hidden.data_ptr() and lean.is_contiguous()
    empty = stats[0] == 0
    assert bool((lean[empty] == 0).all()) and not bool(lean.isnan().any())
    public = (fastpool.cls_pool if name == "cls" else fastpool.last_token_pool)(hidden, mask)
    assert_same_bits(public, full, layout)


@pytest.mark.parametrize("name", ["cls", "last"])
def test_lean_selection_of_empty_shapes(device, name):
    for B, T in ((0, 5), (3, 0), (0, 0)):
        hidden = torch.randn(B, T, 4, device=device)
        mask = torch.ones(B, T, dtype=torch.int64, device=device)
        assert torch.equal(eager.select_rows(hidden, mask, name), torch.zeros(B, 4, device=device))


@contextlib.contextmanager
def threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_batches_give_the_same_bits_on_1_and_4_threads(device, dtype):
    """Shapes where ATen's reductions go parallel (>= 32768 elements): every bit of every row,
    forward and backward, equals the row pooled alone on 1 thread."""
    gen = torch.Generator().manual_seed(3)
    B, T, d = 12, 300, 48
    hidden = torch.randn(B, T, d, generator=gen).to(dtype).to(device)
    mask = torch.stack([make_mask(layout, 2, T, gen) for layout in LAYOUTS[1:] + ("ones",)]).flatten(0, 1)
    mask = mask.to(device)
    weights = (torch.rand(B, T, generator=gen) + 0.1).to(dtype).to(device)
    modes = list(fastpool.MODES)
    grad = torch.randn(B, len(modes) * d, generator=gen).to(dtype).to(device)

    def run(h, m, w, g):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fastpool.pool(h, m, mode=modes, weights=w, normalize=True)
        return (out, *torch.autograd.grad(out, (h, w), g))

    with fastpool.use_backend("torch"):
        with threads(4):
            batch = run(hidden, mask, weights, grad)
        with threads(1):
            single = run(hidden, mask, weights, grad)
            for b in (0, 5, B - 1):
                alone = run(hidden[b : b + 1], mask[b : b + 1], weights[b : b + 1], grad[b : b + 1])
                for got, expected in zip(batch, alone, strict=True):
                    assert_same_bits(got[b : b + 1], expected, f"row {b}")
    for got, expected in zip(batch, single, strict=True):
        assert_same_bits(got, expected, "4 threads vs 1")


def test_tree_sums_of_padded_rows_and_packed_segments_are_the_same_bits():
    gen = torch.Generator().manual_seed(9)
    values = torch.randn(40, generator=gen) * 1e3
    cu = torch.tensor([0, 3, 3, 20, 40])
    packed = eager_sums.segment_tree_sum(values, cu)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        for before, after in ((0, 0), (5, 0), (0, 37), (9, 4)):
            row = torch.full((1, before + (b - a) + after), float("nan"))
            real = torch.zeros_like(row, dtype=torch.bool)
            row[0, before : before + b - a] = values[a:b]
            real[0, before : before + b - a] = True
            first = torch.tensor([before])
            assert_same_bits(eager_sums.row_tree_sum(row, real, first), packed[s : s + 1], f"segment {s}")
    torch.testing.assert_close(
        packed.double(),
        torch.stack([values[a:b].double().sum() for a, b in zip(cu[:-1], cu[1:], strict=True)]),
    )


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100])
def test_tree_sum_is_a_sum(n):
    values = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(eager_sums.tree_sum(values), values.sum(1), rtol=1e-12, atol=1e-12)


def test_lane_sums_keep_float32_accuracy_over_long_rows(device):
    """A long row of bf16 values summed in float32 lanes: close to the float64 sum."""
    gen = torch.Generator().manual_seed(2)
    hidden = (torch.rand(2, 5000, 3, generator=gen) + 1).to(torch.bfloat16).to(device)
    first = torch.zeros(2, dtype=torch.long, device=device)
    total = eager_sums.padded_lane_sum(hidden, None, first, torch.float32)
    expected = hidden.double().sum(1)
    torch.testing.assert_close(total.double(), expected, rtol=1e-6, atol=0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    span=st.integers(1, 100),
    holes=st.booleans(),
    before=st.integers(0, 40),
    after=st.integers(0, 40),
    B=st.integers(1, 4),
    weighted=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_lane_sums_are_batch_invariant(span, holes, before, after, B, weighted, dtype, seed):
    """The sums used off the CPU (index_add_ uses atomics there), run here on CPU tensors: a row's
    lane sum has the same bits alone, in a padded batch (any padding, NaN in it) and packed."""
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    d = 5
    row = torch.randn(span, d, generator=gen).to(dtype)
    own = torch.rand(span, generator=gen) < 0.6 if holes else torch.ones(span, dtype=torch.bool)
    own[0] = own[-1] = True
    w_row = torch.rand(span, generator=gen).to(acc) * own if weighted else None
    T = before + span + after
    slot = B - 1
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    real = torch.rand(B, T, generator=gen) < 0.5
    real[slot] = False
    real[slot, before : before + span] = own
    hidden[slot] = float("nan")
    hidden[slot, before : before + span] = row
    weights = None
    if weighted:
        weights = (torch.rand(B, T, generator=gen).to(acc)) * real
        weights[slot, before : before + span] = w_row
    first = torch.where(real.any(1), real.view(torch.uint8).argmax(1), 0)
    batch = eager_sums.padded_lane_sum(hidden, real, first, acc, weights)
    alone = eager_sums.padded_lane_sum(
        row[None], own[None], torch.zeros(1, dtype=torch.long), acc, None if w_row is None else w_row[None]
    )
    assert_same_bits(batch[slot : slot + 1], alone, "padded")
    if not holes:
        packed = torch.cat([torch.randn(7, d, generator=gen).to(dtype), row])
        w_packed = None if w_row is None else torch.cat([torch.rand(7, generator=gen).to(acc), w_row])
        got = eager_sums.segment_lane_sum(packed, torch.tensor([0, 7]), [7, span], acc, w_packed)
        assert_same_bits(got[1:], alone, "packed")
    expected = (row.double() * (own if w_row is None else w_row).double()[:, None]).sum(0)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(alone[0].double(), expected, rtol=tolerance, atol=10 * tolerance)


@pytest.mark.parametrize(
    "modes", [["mean"], ["cls"], ["max", "last"], list(fastpool.MODES)], ids=lambda m: "+".join(m)
)
def test_the_backward_is_differentiable(device, modes):
    """create_graph=True runs the eager backward under autograd: every path of it must be
    differentiable (the bit-select fast path is not, so it steps aside)."""
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(3, 7, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    mask = (torch.rand(3, 7, generator=gen) < 0.6).to(device)
    with fastpool.use_backend("torch"):
        assert torch.autograd.gradgradcheck(lambda x: fastpool.pool(x, mask, mode=modes), (hidden,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "modes", [["mean"], ["max"], ["mean", "max"], ["mean_sqrt_len", "weighted_mean"], ["max", "mean"]]
)
def test_lean_inference_has_the_bits_of_the_full_forward(device, dtype, layout, modes):
    # An inference call (lean: only out is read) keeps only the counts of the row statistics on the CPU.
    gen = torch.Generator().manual_seed(41)
    B, T, d = 5, 33, 7
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    mask = make_mask(layout, B, T, gen)
    if mask is not None:
        hidden = torch.where(mask[..., None], hidden, torch.tensor(float("nan"), dtype=dtype))
        mask = mask.to(device)
    hidden = hidden.to(device)
    for eps in (-1.0, 1e-12):
        full = eager.pool_forward(hidden, mask, modes, normalize_eps=eps, need_indices=False)
        lean = eager.pool_forward(hidden, mask, modes, normalize_eps=eps, need_indices=False, lean=True)
        assert_same_bits(lean[0], full[0], layout)
        assert torch.equal(lean[2][0], full[2][0].to(lean[2].dtype))  # the counts
