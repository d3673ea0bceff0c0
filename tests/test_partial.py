"""Partial pooling states (fastpool.pool_partial / merge / PoolState.finish) on both backends: against
the oracle and one-shot pooling, the bit-identical aligned case, gradients, empty chunks, errors."""

import oracle
import pytest
import torch
from helpers import assert_clear_error, make_mask, np_mask, to_numpy
from tolerances import REDUCTION, for_mode

import fastpool
from fastpool import launch

ALL_MODES = ("max", "last", "weighted_mean", "mean_sqrt_len", "mean", "cls")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Interpreter-sized shapes crossing several kernel chunks (8 positions), feature blocks (4) and, with
# "split", a row spread over one program per chunk whose partials the last program folds.
CONFIGS = {
    "small": dict(chunk=8, lanes=4, block_d=4, scan_block=8, block_t=4),
    "split": dict(chunk=8, lanes=4, block_d=4, scan_block=8, block_t=4, chunks_per_program=1),
}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads and zero signs included)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def pieces(hidden, mask, modes, cuts, weights=None):
    """The states of hidden[:, a:b] for consecutive (a, b) in cuts, with global starts."""
    states = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        m = None if mask is None else mask[:, a:b]
        w = None if weights is None else weights[:, a:b]
        states.append(fastpool.pool_partial(hidden[:, a:b], m, list(modes), weights=w, start=a))
    return states


def check_oracle(hidden, mask, modes, out, weights=None):
    d = hidden.shape[2]
    h, m, w = to_numpy(hidden), np_mask(mask), to_numpy(weights)
    for i, mode in enumerate(modes):
        expected = torch.from_numpy(oracle.pool(h, m, mode, w)).to(hidden.dtype)
        got = out[:, i * d : (i + 1) * d].detach().cpu()
        torch.testing.assert_close(got, expected, equal_nan=True, **for_mode(mode, hidden.dtype))


def cases():
    for dtype in DTYPES:
        for mask_kind in ("none", "right", "left", "holes", "empty-row"):
            yield "torch", "small", dtype, mask_kind
            if dtype == torch.float32 or mask_kind == "holes":
                yield "triton", "small", dtype, mask_kind
    yield "triton", "split", torch.float32, "left"


@pytest.mark.parametrize(
    "backend_name,config,dtype,mask_kind",
    [pytest.param(*c, id=f"{c[0]}-{c[1]}-{str(c[2])[6:]}-{c[3]}") for c in cases()],
)
def test_merged_states_match_oracle_and_one_shot(device, backend_name, config, dtype, mask_kind):
    """Cuts crossing the kernel's chunks, an empty chunk, rows without real token in a chunk."""
    gen = torch.Generator().manual_seed(sum(map(ord, f"{dtype}{mask_kind}{config}")))
    B, T, d = 3, 21, 5
    hidden = torch.randn(B, T, d, generator=gen).to(dtype).to(device)
    mask = make_mask(mask_kind, B, T, gen)
    mask = None if mask is None else mask.to(device)
    cuts = [0, 5, 5, 14, 21]
    with fastpool.use_backend(backend_name), launch.config_override(**CONFIGS[config]):
        state = fastpool.merge(pieces(hidden, mask, ALL_MODES, cuts))
        out, index = state.finish(return_indices=True)
        one_shot = fastpool.pool(hidden, mask, list(ALL_MODES))
    assert out.shape == (B, len(ALL_MODES) * d) and out.dtype == dtype
    check_oracle(hidden, mask, ALL_MODES, out)
    _, want_index = oracle.max_with_index(to_numpy(hidden), np_mask(mask))
    assert torch.equal(index.cpu(), torch.from_numpy(want_index))
    for i, mode in enumerate(ALL_MODES):
        block = slice(i * d, (i + 1) * d)
        torch.testing.assert_close(out[:, block], one_shot[:, block], equal_nan=True, **for_mode(mode, dtype))


def aligned_cases():
    # (mask kind, config, cuts): state boundaries at multiples of the chunk (8) from every row's first
    # real token, each state after the first holding at most one chunk (an empty one included).
    yield "none", "small", [0, 16, 24, 24, 29]
    yield "right", "split", [0, 8, 16, 24, 29]
    yield "shifted", "small", [0, 11, 19, 27, 29]  # every row's first real token at 3
    yield "holes", "split", [0, 16, 24, 29]


@pytest.mark.parametrize(
    "mask_kind,config,cuts", list(aligned_cases()), ids=[f"{c[0]}-{c[1]}" for c in aligned_cases()]
)
def test_aligned_states_give_one_shot_bits(device, mask_kind, config, cuts):
    gen = torch.Generator().manual_seed(len(cuts))
    B, T, d = 2, 29, 5
    hidden = torch.randn(B, T, d, generator=gen).to(device)
    hidden[1, 20] = float("inf")  # a non-finite sum must not break the fold's bits either
    weights = (torch.rand(B, T, generator=gen) + 0.25).to(device)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "right":
        mask = torch.arange(T)[None, :] < torch.tensor([[29], [9]])
    elif mask_kind == "shifted":
        mask = (torch.arange(T)[None, :] >= 3) & (torch.rand(B, T, generator=gen) < 0.8)
        mask[:, 3] = True
    else:
        mask = torch.rand(B, T, generator=gen) < 0.6
        mask[:, 0] = True
    mask = None if mask is None else mask.to(device)
    with fastpool.use_backend("triton"), launch.config_override(**CONFIGS[config]):
        for weights_arg, normalize in ((None, False), (weights, True)):
            modes = ALL_MODES if weights_arg is None else ("weighted_mean", "max", "mean")
            state = fastpool.merge(pieces(hidden, mask, modes, cuts, weights_arg))
            got = state.finish(normalize=normalize)
            want = fastpool.pool(hidden, mask, list(modes), weights=weights_arg, normalize=normalize)
            assert same_bits(got, want), (weights_arg is None, normalize)
            if weights_arg is None:  # the rank-weighted mean alone (its fold needs the sum)
                state = fastpool.merge(pieces(hidden, mask, ["weighted_mean"], cuts))
                assert same_bits(state.finish(), fastpool.pool(hidden, mask, "weighted_mean"))


def test_aligned_states_at_the_default_chunk_give_one_shot_bits(device):
    """The launcher's own chunk (256) and blocks: 256-token pieces after a first piece of 512."""
    gen = torch.Generator().manual_seed(5)
    B, T, d = 2, 700, 3
    hidden = torch.randn(B, T, d, generator=gen).to(device)
    mask = (torch.arange(T)[None, :] < torch.tensor([[700], [600]])).to(device)
    modes = ["mean", "weighted_mean", "max"]
    with fastpool.use_backend("triton"):
        state = fastpool.merge(pieces(hidden, mask, modes, [0, 512, 700]))
        assert same_bits(state.finish(), fastpool.pool(hidden, mask, modes))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_state_finishes_to_one_shot_bits(device, backend_name, dtype):
    """A single state of the whole sequence is the one-shot fold: the same bits on each backend."""
    gen = torch.Generator().manual_seed(7)
    B, T, d = 2, 13, 5
    hidden = torch.randn(B, T, d, generator=gen).to(dtype).to(device)
    mask = make_mask("holes", B, T, gen).to(device)
    with fastpool.use_backend(backend_name), launch.config_override(**CONFIGS["small"]):
        for normalize in (False, True):
            got = fastpool.pool_partial(hidden, mask, list(ALL_MODES)).finish(normalize=normalize)
            assert same_bits(got, fastpool.pool(hidden, mask, list(ALL_MODES), normalize=normalize))


def test_merge_is_a_left_fold(backend, device):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 17, 4, generator=gen).to(device)
    with launch.config_override(**CONFIGS["small"]):
        a, b, c = pieces(hidden, None, ALL_MODES, [0, 6, 11, 17])
        left = fastpool.merge([fastpool.merge([a, b]), c]).finish()
        assert same_bits(fastpool.merge([a, b, c]).finish(), left)


@pytest.mark.parametrize(
    "backend_name,mask_kind",
    [("torch", "left"), ("torch", "holes"), ("torch", "empty-row"), ("triton", "holes")],
)
def test_gradients_match_oracle(device, backend_name, mask_kind):
    """Through merge and finish, to every chunk's hidden and user weights, normalised or not."""
    gen = torch.Generator().manual_seed(sum(map(ord, mask_kind)))
    B, T, d = 3, 17, 5
    hidden = torch.randn(B, T, d, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weights = (torch.rand(B, T, generator=gen, dtype=torch.float64) + 0.25).to(device).requires_grad_()
    mask = make_mask(mask_kind, B, T, gen).to(device)
    cuts = [0, 4, 4, 12, 17]
    h, m, w = to_numpy(hidden), np_mask(mask), to_numpy(weights)
    with fastpool.use_backend(backend_name), launch.config_override(**CONFIGS["small"]):
        for weights_arg, modes in ((None, ALL_MODES), (weights, ("weighted_mean", "cls", "max"))):
            grad_out = torch.randn(B, len(modes) * d, generator=gen, dtype=torch.float64).to(device)
            out = fastpool.merge(pieces(hidden, mask, modes, cuts, weights_arg)).finish()
            inputs = (hidden,) if weights_arg is None else (hidden, weights)
            grads = torch.autograd.grad(out, inputs, grad_out)
            g = to_numpy(grad_out)
            wn = None if weights_arg is None else w
            want = sum(
                oracle.pool_grad(h, m, mode, g[:, i * d : (i + 1) * d], wn) for i, mode in enumerate(modes)
            )
            torch.testing.assert_close(grads[0].cpu(), torch.from_numpy(want), **REDUCTION[torch.float64])
            if weights_arg is not None:
                want_w = oracle.weights_grad(h, m, w, g[:, :d])
                torch.testing.assert_close(
                    grads[1].cpu(), torch.from_numpy(want_w), **REDUCTION[torch.float64]
                )
        # normalised: against the one-shot gradient
        grad_out = torch.randn(B, len(ALL_MODES) * d, generator=gen, dtype=torch.float64).to(device)
        out = fastpool.merge(pieces(hidden, mask, ALL_MODES, cuts)).finish(normalize=True)
        got = torch.autograd.grad(out, hidden, grad_out)[0]
        want = torch.autograd.grad(
            fastpool.pool(hidden, mask, list(ALL_MODES), normalize=True), hidden, grad_out
        )[0]
        torch.testing.assert_close(got, want, **REDUCTION[torch.float64])


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_gradcheck_float64(device, backend_name):
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(1, 5, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weights = (torch.rand(1, 5, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    mask = torch.tensor([[1, 0, 1, 1, 1]], dtype=torch.bool, device=device)

    def pooled(h, w):
        with launch.config_override(chunk=4, lanes=4, block_d=2, scan_block=4, block_t=4):
            states = [
                fastpool.pool_partial(
                    h[:, a:b], mask[:, a:b], ["weighted_mean", "mean"], weights=w[:, a:b], start=a
                )
                for a, b in ((0, 2), (2, 5))
            ]
            return fastpool.merge(states).finish(normalize=True)

    with fastpool.use_backend(backend_name):
        assert torch.autograd.gradcheck(pooled, (hidden, weights), eps=1e-6, atol=1e-8)


def test_rank_weighted_gradient_through_the_shift(backend, device):
    """weighted_mean's later chunks get their ranks shifted by the tokens before them in merge."""
    hidden = torch.randn(1, 12, 2, dtype=torch.float64, device=device, requires_grad=True)
    with launch.config_override(**CONFIGS["small"]):
        out = fastpool.merge(pieces(hidden, None, ["weighted_mean"], [0, 3, 12])).finish()
        (grad,) = torch.autograd.grad(out.sum(), hidden)
    ranks = torch.arange(1, 13, dtype=torch.float64, device=device) / 78.0
    torch.testing.assert_close(grad, ranks.view(1, 12, 1).expand(1, 12, 2), **REDUCTION[torch.float64])


def test_per_row_starts_give_global_positions(backend, device):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 3, generator=gen).to(device)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool, device=device)
    start = torch.tensor([100, 7], dtype=torch.int64, device=device)
    state = fastpool.pool_partial(hidden, mask, ["max", "cls", "last"], start=start)
    assert state.first.tolist() == [101, -1] and state.last.tolist() == [104, -1] and state.span is None
    _, index = state.finish(return_indices=True)
    _, local = fastpool.max_pool(hidden, mask, return_indices=True)
    assert torch.equal(index, torch.where(local >= 0, local + start[:, None], -1))


def test_empty_chunks_and_empty_dimensions(backend, device):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, 3, generator=gen).to(device)
    mask = torch.zeros(2, 9, dtype=torch.bool, device=device)
    mask[0, 2:5] = True
    modes = list(ALL_MODES)
    empty = fastpool.pool_partial(hidden[:, :0], mask[:, :0], modes, start=0)
    padding_only = fastpool.pool_partial(hidden[:, 5:], mask[:, 5:], modes, start=5)
    assert empty.count.tolist() == [0, 0] and padding_only.count.tolist() == [0, 0]
    assert torch.equal(empty.finish(), torch.zeros(2, 6 * 3, device=device))
    state = fastpool.merge([empty, fastpool.pool_partial(hidden[:, :5], mask[:, :5], modes), padding_only])
    out, index = state.finish(return_indices=True)
    torch.testing.assert_close(out, fastpool.pool(hidden, mask, modes))
    assert index[1].tolist() == [-1, -1, -1] and torch.equal(out[1], torch.zeros(18, device=device))
    for shape in ((0, 4, 3), (2, 4, 0)):
        h = torch.randn(shape, device=device)
        out = fastpool.merge(
            [fastpool.pool_partial(h, None, modes), fastpool.pool_partial(h, None, modes, start=4)]
        )
        assert torch.equal(out.finish(), fastpool.pool(torch.cat([h, h], 1), None, modes))


def test_padding_never_reaches_a_state(backend, device):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 10, 3, generator=gen).to(device)
    mask = torch.rand(2, 10, generator=gen) < 0.5
    mask[:, 4] = True
    mask = mask.to(device)
    dirty = torch.where(mask.unsqueeze(-1), hidden, torch.tensor(float("nan"), device=device))
    with launch.config_override(**CONFIGS["small"]):
        clean_out = fastpool.merge(pieces(hidden, mask, ALL_MODES, [0, 3, 10])).finish()
        dirty_out = fastpool.merge(pieces(dirty, mask, ALL_MODES, [0, 3, 10])).finish()
    assert not dirty_out.isnan().any()
    if backend == "triton":
        assert same_bits(clean_out, dirty_out)  # the kernels never load padding
    else:
        torch.testing.assert_close(dirty_out, clean_out, **REDUCTION[torch.float32])


def test_state_parts(device):
    hidden = torch.arange(12, dtype=torch.float32, device=device).view(1, 4, 3)
    state = fastpool.pool_partial(hidden, None, ["mean", "cls"], start=10)
    assert torch.equal(state.part("sum"), hidden.sum(1)) and torch.equal(state.part("first"), hidden[:, 0])
    assert state.part("max") is None and state.span == (10, 14) and state.d == 3 and state.batch_size == 1
    assert "PoolState" in repr(state)


def _bad_calls(device):
    h = torch.randn(2, 4, 3, device=device)
    s = fastpool.pool_partial(h, None, ["mean"])
    later = fastpool.pool_partial(h, None, ["mean"], start=4)
    return [
        ("start", TypeError, lambda: fastpool.pool_partial(h, None, "mean", start=1.5)),
        ("start", ValueError, lambda: fastpool.pool_partial(h, None, "mean", start=-1)),
        (
            "start",
            ValueError,
            lambda: fastpool.pool_partial(h, None, "mean", start=torch.zeros(3, dtype=torch.int64)),
        ),
        ("start", TypeError, lambda: fastpool.pool_partial(h, None, "mean", start=torch.zeros(2))),
        ("start", ValueError, lambda: fastpool.pool_partial(h, None, "mean", start=torch.tensor([0, -2]))),
        ("hidden", ValueError, lambda: fastpool.pool_partial(h[0], None, "mean")),
        ("mode", ValueError, lambda: fastpool.pool_partial(h, None, "median")),
        ("weights", ValueError, lambda: fastpool.pool_partial(h, None, "mean", weights=torch.ones(2, 4))),
        ("states", ValueError, lambda: fastpool.merge([])),
        ("states", TypeError, lambda: fastpool.merge(s)),
        ("states", TypeError, lambda: fastpool.merge([s, h])),
        ("states", ValueError, lambda: fastpool.merge([s, fastpool.pool_partial(h, None, ["max"], start=4)])),
        (
            "states",
            ValueError,
            lambda: fastpool.merge([s, fastpool.pool_partial(h[:1], None, ["mean"], start=4)]),
        ),
        ("states", ValueError, lambda: fastpool.merge([later, s])),
        ("states", ValueError, lambda: fastpool.merge([s, s])),
        ("return_indices", ValueError, lambda: s.finish(return_indices=True)),
        ("normalize", TypeError, lambda: s.finish(normalize=1)),
        ("eps", ValueError, lambda: s.finish(normalize=True, eps=-1.0)),
        ("name", ValueError, lambda: s.part("median")),
    ]


@pytest.mark.parametrize("index", range(19))
def test_bad_input_gets_a_clear_error(device, index):
    argument, error, call = _bad_calls(device)[index]
    assert_clear_error(argument, error, call)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["ranks", "user-weights"])
def test_opcheck(device, backend_name, with_weights):
    """The partial ops' schemas, fake kernels and autograd registrations (torch.library.opcheck)."""
    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(2, 7, 5, generator=gen).to(device).requires_grad_()
    weights = (torch.rand(2, 7, generator=gen) + 0.25).to(device).requires_grad_() if with_weights else None
    mask = make_mask("holes", 2, 7, gen).to(device)
    modes = "max,weighted_mean,cls" if with_weights else "last,max,mean_sqrt_len,weighted_mean"
    with launch.config_override(**CONFIGS["small"]):
        fwd_args = (hidden, mask, weights, modes, backend_name, True)
        torch.library.opcheck(torch.ops.fastpool.partial_fwd.default, fwd_args)
        constants = (hidden.detach(), mask, None if weights is None else weights.detach(), *fwd_args[3:])
        values, argmax, stats, wsum, prefix = torch.ops.fastpool.partial_fwd(*constants)
        torch.library.opcheck(
            torch.ops.fastpool.partial_bwd.default,
            (torch.randn_like(values), mask, constants[2], argmax, stats, prefix, 7, hidden.dtype, modes,
             backend_name),
        )  # fmt: skip
        count = stats[0].to(torch.int64)
        for eps in (-1.0, 1e-12):
            finish_args = (
                values.requires_grad_(),
                count,
                wsum,
                modes,
                backend_name,
                hidden.dtype,
                with_weights,
                eps,
            )
            torch.library.opcheck(torch.ops.fastpool.partial_finish.default, finish_args)
