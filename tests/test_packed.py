"""Packed (variable-length) batches: cu_seqlens and nested jagged tensors, forward and backward."""

import numpy as np
import oracle
import pytest
import torch
import triton
import triton.language as tl
from fastpool.kernels.mask_scan import packed_program
from helpers import assert_clear_error, to_numpy
from tolerances import REDUCTION, for_mode
from torch._dynamo.testing import CompileCounter

import fastpool
from fastpool import launch, packed_launchers

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ALL_MODES = ("max", "last", "weighted_mean", "mean_sqrt_len", "mean", "cls")
# "one-chunk": the launcher's own sizes; every test sequence fits one chunk (a single launch).
# "chunked": chunks of 4 tokens and small blocks, so long sequences are split and folded.
PACKED_CONFIGS = {"one-chunk": {}, "chunked": dict(block_t=4, block_d=16, chunk=4, lanes=2)}
LENGTHS = {
    "mixed": [3, 0, 11, 1, 0, 6],
    "one": [9],
    "empty-first-last": [0, 5, 0],
    "all-empty": [0, 0],
    "skewed": [1, 1, 17, 1, 2],
}


def offsets(lengths, dtype=torch.int32):
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=dtype)


def config(name):
    return launch.config_override(**PACKED_CONFIGS[name])


def cases():
    """Every dtype x length pattern with all modes fused, on both backends and both launch shapes;
    each mode alone on every length pattern in float32 and bfloat16."""
    for dtype in DTYPES:
        for lengths in LENGTHS:
            yield "torch", "one-chunk", dtype, lengths, ALL_MODES
            yield "triton", "chunked", dtype, lengths, ALL_MODES
            yield "triton", "one-chunk", dtype, lengths, ALL_MODES
    for dtype in (torch.float32, torch.bfloat16):
        for lengths in LENGTHS:
            for mode in ALL_MODES:
                yield "torch", "one-chunk", dtype, lengths, (mode,)
                yield "triton", "chunked", dtype, lengths, (mode,)


@pytest.mark.parametrize(
    "backend_name,config_name,dtype,lengths,modes",
    [pytest.param(*c, id=f"{c[0]}-{c[1]}-{str(c[2])[6:]}-{c[3]}-{'+'.join(c[4])}") for c in cases()],
)
def test_forward_and_backward_match_oracle(device, backend_name, config_name, dtype, lengths, modes):
    gen = torch.Generator().manual_seed(sum(map(ord, f"{dtype}{lengths}{modes}")))
    cu = offsets(LENGTHS[lengths]).to(device)
    N, d = int(cu[-1]), 19
    hidden = torch.randn(N, d, generator=gen).to(dtype).to(device).requires_grad_()
    grad_out = torch.randn(len(LENGTHS[lengths]), len(modes) * d, generator=gen).to(dtype).to(device)
    with fastpool.use_backend(backend_name), config(config_name):
        out = fastpool.pool(hidden, mode=list(modes), cu_seqlens=cu)
        (grad,) = torch.autograd.grad(out, hidden, grad_out)
    assert out.shape == (len(LENGTHS[lengths]), len(modes) * d) and out.dtype == dtype
    h, c, g = to_numpy(hidden), cu.cpu().numpy(), to_numpy(grad_out)
    want_grad = np.zeros((N, d))
    for i, mode in enumerate(modes):
        want = torch.from_numpy(oracle.packed_pool(h, c, mode)).to(dtype)
        torch.testing.assert_close(out[:, i * d : (i + 1) * d].cpu(), want, **for_mode(mode, dtype))
        want_grad += oracle.packed_pool_grad(h, c, mode, g[:, i * d : (i + 1) * d])
    assert grad.shape == hidden.shape and grad.dtype == dtype
    torch.testing.assert_close(grad.cpu(), torch.from_numpy(want_grad).to(dtype), **REDUCTION[dtype])


@pytest.mark.parametrize("config_name", PACKED_CONFIGS)
def test_max_indices_are_global_token_indices(backend, device, config_name):
    gen = torch.Generator().manual_seed(41)
    lengths = LENGTHS["mixed"]
    cu = offsets(lengths, torch.int64).to(device)
    hidden = torch.randn(int(cu[-1]), 7, generator=gen).to(device)
    hidden[4, 2] = float("nan")  # sequence 2 starts at token 3
    with config(config_name):
        values, index = fastpool.max_pool(hidden, cu_seqlens=cu, return_indices=True)
    want = oracle.packed_max_index(to_numpy(hidden), cu.cpu().numpy())
    assert index.dtype == torch.int64 and index.cpu().tolist() == want.tolist()
    assert int(index[2, 2]) == 4 and torch.isnan(values[2, 2])
    assert index[1].tolist() == [-1] * 7 and values[1].tolist() == [0.0] * 7


@pytest.mark.parametrize("config_name", PACKED_CONFIGS)
def test_packed_equals_the_same_sequences_right_padded(backend, device, config_name):
    gen = torch.Generator().manual_seed(42)
    lengths = LENGTHS["skewed"] + LENGTHS["mixed"]
    cu = offsets(lengths).to(device)
    d = 21
    hidden = torch.randn(int(cu[-1]), d, generator=gen).to(device)
    weights = torch.rand(int(cu[-1]), generator=gen).to(device) + 0.5
    padded = torch.full((len(lengths), max(lengths), d), float("nan"), device=device)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool, device=device)
    padded_weights = torch.zeros(len(lengths), max(lengths), device=device)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        padded[s, : b - a], mask[s, : b - a], padded_weights[s, : b - a] = hidden[a:b], True, weights[a:b]
    for user_weights in (False, True):
        kwargs = {"weights": weights} if user_weights else {}
        padded_kwargs = {"weights": padded_weights} if user_weights else {}
        with config(config_name):
            packed_out = fastpool.pool(hidden, mode=list(ALL_MODES), cu_seqlens=cu, **kwargs)
        padded_out = fastpool.pool(padded, mask, mode=list(ALL_MODES), **padded_kwargs)
        for i, mode in enumerate(ALL_MODES):
            cols = slice(i * d, (i + 1) * d)
            torch.testing.assert_close(
                packed_out[:, cols], padded_out[:, cols], **for_mode(mode, torch.float32)
            )


@pytest.mark.parametrize("config_name", PACKED_CONFIGS)
def test_user_weights_forward_and_gradients(backend, device, config_name):
    gen = torch.Generator().manual_seed(43)
    cu = offsets(LENGTHS["skewed"] + [0, 3]).to(device)
    N, d = int(cu[-1]), 11
    hidden = torch.randn(N, d, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weights = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.25).to(device).requires_grad_()
    grad_out = torch.randn(cu.shape[0] - 1, 2 * d, generator=gen, dtype=torch.float64).to(device)
    with config(config_name):
        out = fastpool.pool(hidden, mode=["weighted_mean", "mean"], cu_seqlens=cu, weights=weights)
        grad_h, grad_w = torch.autograd.grad(out, (hidden, weights), grad_out)
    h, c, w, g = to_numpy(hidden), cu.cpu().numpy(), to_numpy(weights), to_numpy(grad_out)
    torch.testing.assert_close(
        out[:, :d].cpu(), torch.from_numpy(oracle.packed_pool(h, c, "weighted_mean", w))
    )
    want_h = oracle.packed_pool_grad(h, c, "weighted_mean", g[:, :d], w)
    want_h += oracle.packed_pool_grad(h, c, "mean", g[:, d:])
    torch.testing.assert_close(grad_h.cpu(), torch.from_numpy(want_h))
    torch.testing.assert_close(grad_w.cpu(), torch.from_numpy(oracle.packed_weights_grad(h, c, w, g[:, :d])))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_gradcheck_float64(device, backend_name):
    gen = torch.Generator().manual_seed(44)
    cu = offsets([2, 0, 5, 1]).to(device)
    hidden = torch.randn(8, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weights = torch.randn(8, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    modes = ["mean", "max", "weighted_mean", "last", "cls", "mean_sqrt_len"]
    with fastpool.use_backend(backend_name), config("chunked" if backend_name == "triton" else "one-chunk"):
        assert torch.autograd.gradcheck(
            lambda h, w: fastpool.pool(h, mode=modes, cu_seqlens=cu, weights=w),
            (hidden, weights), eps=1e-6, atol=1e-7, fast_mode=True,
        )  # fmt: skip


def test_nested_jagged_tensor_input_and_gradient(backend, device):
    gen = torch.Generator().manual_seed(45)
    pieces = [torch.randn(n, 6, generator=gen).to(device) for n in (3, 1, 7)]
    nested = torch.nested.nested_tensor(pieces, layout=torch.jagged, requires_grad=True)
    out = fastpool.pool(nested, mode=["mean", "max", "last"])
    want = torch.stack([torch.cat([p.mean(0), p.max(0).values, p[-1]]) for p in pieces])
    torch.testing.assert_close(out, want)
    out.sum().backward()
    grads = nested.grad.unbind()
    for p, g in zip(pieces, grads, strict=True):
        onehot = torch.zeros_like(p)
        onehot.scatter_(0, p.argmax(0, keepdim=True), 1.0)
        onehot[-1] += 1.0
        torch.testing.assert_close(g, 1.0 / p.shape[0] + onehot)


def test_three_dimensional_single_row_and_int64_offsets(backend, device):
    gen = torch.Generator().manual_seed(46)
    hidden = torch.randn(1, 10, 4, generator=gen).to(device)
    cu = offsets([4, 6], torch.int64).to(device)
    out = fastpool.mean_pool(hidden, cu_seqlens=cu, max_seqlen=6)
    torch.testing.assert_close(out, torch.stack([hidden[0, :4].mean(0), hidden[0, 4:].mean(0)]))
    assert fastpool.cls_pool(hidden, cu_seqlens=cu).tolist() == hidden[0, [0, 4]].tolist()
    assert fastpool.last_token_pool(hidden, cu_seqlens=cu).tolist() == hidden[0, [3, 9]].tolist()


def test_empty_batch_and_zero_features(backend, device):
    empty = fastpool.pool(
        torch.randn(0, 5, device=device), mode=["mean", "max"], cu_seqlens=offsets([]).to(device)
    )
    assert empty.shape == (0, 10)
    hidden = torch.randn(4, 0, device=device, requires_grad=True)
    out = fastpool.pool(hidden, mode="max", cu_seqlens=offsets([1, 3]).to(device))
    assert out.shape == (2, 0)
    out.sum().backward()
    assert hidden.grad.shape == (4, 0)


H = torch.randn(6, 4)
CU = offsets([2, 4])
BAD_INPUTS = [
    ("cu_seqlens", ValueError, lambda: fastpool.mean_pool(H, cu_seqlens=torch.tensor([1, 6]))),
    ("cu_seqlens", ValueError, lambda: fastpool.mean_pool(H, cu_seqlens=torch.tensor([0, 5]))),
    ("cu_seqlens", ValueError, lambda: fastpool.mean_pool(H, cu_seqlens=torch.tensor([0, 4, 2, 6]))),
    (
        "cu_seqlens",
        ValueError,
        lambda: fastpool.mean_pool(H, cu_seqlens=torch.tensor([0, 9, 6]), max_seqlen=9),
    ),
    ("cu_seqlens", TypeError, lambda: fastpool.mean_pool(H, cu_seqlens=torch.tensor([0.0, 6.0]))),
    ("cu_seqlens", TypeError, lambda: fastpool.mean_pool(H, cu_seqlens=[0, 6])),
    ("cu_seqlens", ValueError, lambda: fastpool.mean_pool(H, cu_seqlens=torch.tensor([[0, 6]]))),
    ("cu_seqlens", ValueError, lambda: fastpool.mean_pool(H, cu_seqlens=torch.tensor([], dtype=torch.int32))),
    ("cu_seqlens", ValueError, lambda: fastpool.mean_pool(H, cu_seqlens=CU.to("meta"))),
    ("hidden", ValueError, lambda: fastpool.mean_pool(torch.randn(2, 3, 4), cu_seqlens=CU)),
    ("hidden", ValueError, lambda: fastpool.mean_pool(torch.randn(6), cu_seqlens=CU)),
    ("hidden", TypeError, lambda: fastpool.mean_pool(H.long(), cu_seqlens=CU)),
    ("mask", ValueError, lambda: fastpool.mean_pool(H, torch.ones(6), cu_seqlens=CU)),
    ("max_seqlen", ValueError, lambda: fastpool.mean_pool(H, cu_seqlens=CU, max_seqlen=-1)),
    (
        "cu_seqlens",
        ValueError,
        lambda: fastpool.mean_pool(H, cu_seqlens=torch.zeros(1).int().expand(2**30 + 1)),
    ),
    ("max_seqlen", TypeError, lambda: fastpool.mean_pool(H, cu_seqlens=CU, max_seqlen=True)),
    ("max_seqlen", TypeError, lambda: fastpool.mean_pool(H, cu_seqlens=CU, max_seqlen=4.0)),
    ("max_seqlen", ValueError, lambda: fastpool.mean_pool(H[None], max_seqlen=4)),
    ("weights", ValueError, lambda: fastpool.weighted_mean_pool(H, None, torch.ones(5), cu_seqlens=CU)),
    ("weights", TypeError, lambda: fastpool.weighted_mean_pool(H, None, torch.ones(6).long(), cu_seqlens=CU)),
    ("weights", ValueError, lambda: fastpool.pool(H, mode="mean", weights=torch.ones(6), cu_seqlens=CU)),
    (
        "cu_seqlens",
        ValueError,
        lambda: fastpool.mean_pool(torch.nested.nested_tensor([H], layout=torch.jagged), cu_seqlens=CU),
    ),
]


@pytest.mark.parametrize(
    "argument,error,call", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_INPUTS)]
)
def test_bad_packed_input_gets_a_clear_error(argument, error, call):
    assert_clear_error(argument, error, call)


def test_nested_weights_must_share_hidden_offsets():
    pieces = [torch.randn(n, 3) for n in (2, 3)]
    nested = torch.nested.nested_tensor(pieces, layout=torch.jagged)
    other = torch.nested.nested_tensor([torch.rand(3), torch.rand(2)], layout=torch.jagged)
    with pytest.raises(ValueError, match="^weights: expected a nested tensor with hidden's offsets"):
        fastpool.weighted_mean_pool(nested, None, other)
    same = torch.nested.nested_tensor_from_jagged(torch.rand(5) + 0.5, nested.offsets())
    out = fastpool.weighted_mean_pool(nested, None, same)
    w = same.values()
    want = torch.stack(
        [(w[:2, None] * pieces[0]).sum(0) / w[:2].sum(), (w[2:, None] * pieces[1]).sum(0) / w[2:].sum()]
    )
    torch.testing.assert_close(out, want)


def test_strided_offsets(backend, device):
    gen = torch.Generator().manual_seed(49)
    hidden = torch.randn(10, 4, generator=gen).to(device)
    cu = torch.tensor([[0, 9], [3, 9], [3, 9], [7, 9], [10, 9]], dtype=torch.int32, device=device)[:, 0]
    with config("chunked"):
        out = fastpool.pool(hidden, mode=["mean", "max", "last"], cu_seqlens=cu)
    want = fastpool.pool(hidden, mode=["mean", "max", "last"], cu_seqlens=cu.contiguous())
    torch.testing.assert_close(out, want)


def test_offsets_are_checked_under_torch_compile(device):
    compiled = torch.compile(
        lambda h, cu: fastpool.mean_pool(h, cu_seqlens=cu), fullgraph=True, backend="eager"
    )
    hidden = torch.randn(7, 3, device=device)
    with fastpool.use_backend("torch"):
        torch.testing.assert_close(
            compiled(hidden, offsets([3, 4]).to(device)),
            fastpool.mean_pool(hidden, cu_seqlens=offsets([3, 4]).to(device)),
        )
        with pytest.raises(ValueError, match="^cu_seqlens: expected"):
            compiled(hidden, torch.tensor([2, 5, 7], dtype=torch.int32, device=device))


def test_unchecked_user_weight_sums_never_read_past_the_weights(device):
    hidden = torch.ones(7, 3, device=device)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32, device=device)  # ends past N = 7
    results = []
    for tail in (0.0, 1e6):
        buffer = torch.full((16,), tail, device=device)
        buffer[:7] = 1.0
        out, *_ = packed_launchers.pool_forward(hidden, cu, "weighted_mean", buffer[:7], 4)
        results.append(out)
    torch.testing.assert_close(results[0], results[1])


@triton.jit
def program_probe(cu_ptr, out_ptr, S, N, search_steps, CHUNK: tl.constexpr):
    q = tl.program_id(0)
    seg, k, begin, end = packed_program(cu_ptr, q, S, N, search_steps, CHUNK)
    t_begin = begin + k * CHUNK
    owns = (k < tl.cdiv(end - begin, CHUNK)) & ((k >= 1) | (q < S))
    tl.store(out_ptr + q * 2, tl.where(owns, t_begin, 0))
    tl.store(out_ptr + q * 2 + 1, tl.where(owns, t_begin + tl.minimum(CHUNK, end - t_begin), 0))


@pytest.mark.parametrize(
    "lengths,chunk",
    [([0, 1, 9, 0, 4, 13], 4), ([5, 0, 17, 1, 1, 2, 0], 4), ([3, 3, 3], 8), ([40], 4), ([0, 0], 2)],
)
def test_packed_programs_cover_every_token_once(device, lengths, chunk):
    """Segment programs take each segment's first chunk, window programs every later chunk, once."""
    cu = offsets(lengths).to(device)
    N, S = sum(lengths), len(lengths)
    programs = S + -(-N // chunk)
    out = torch.empty(programs * 2, dtype=torch.int32, device=device)
    program_probe[(programs,)](cu, out, S, N, packed_launchers.search_steps(S), CHUNK=chunk)
    ranges = sorted((a, b) for a, b in out.view(-1, 2).tolist() if b > a)
    starts = [
        c + k * chunk
        for s, c in enumerate(offsets(lengths).tolist()[:-1])
        for k in range(-(-lengths[s] // chunk))
    ]
    assert [a for a, _ in ranges] == sorted(starts)
    assert all(b - a <= chunk for a, b in ranges) and sum(b - a for a, b in ranges) == N


def test_packed_programs_have_no_int32_overflow_near_the_token_limit(device):
    N = fastpool.functional.MAX_SEQUENCE_LENGTH
    cu = torch.tensor([0, 2_145_000_000, 2_145_000_100, N], dtype=torch.int64, device=device)
    chunk = 2**20
    # The window programs around the three segments' boundaries and the last one.
    windows = [2_145_000_000 // chunk - 1, 2_145_000_000 // chunk, 2_145_000_100 // chunk, (N - 1) // chunk]
    out = torch.empty(2, dtype=torch.int32, device=device)
    for p in windows:
        probe_one[(1,)](cu, out, 3 + p, 3, N, 2, CHUNK=chunk)
        a, b = out.tolist()
        assert 0 <= a <= b <= N and b - a <= chunk


@triton.jit
def probe_one(cu_ptr, out_ptr, q, S, N, search_steps, CHUNK: tl.constexpr):
    seg, k, begin, end = packed_program(cu_ptr, q, S, N, search_steps, CHUNK)
    t_begin = begin + k * CHUNK
    owns = (k < tl.cdiv(end - begin, CHUNK)) & (k >= 1)
    tl.store(out_ptr, tl.where(owns, t_begin, 0))
    tl.store(out_ptr + 1, tl.where(owns, t_begin + tl.minimum(CHUNK, end - t_begin), 0))


def test_double_backward_ignores_nan_padding_with_user_weights(backend, device):
    gen = torch.Generator().manual_seed(50)
    hidden = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64).to(device)
    hidden[0, 3] = float("nan")
    hidden.requires_grad_()
    weights = (torch.rand(2, 4, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], device=device)
    out = fastpool.pool(hidden, mask, mode="weighted_mean", weights=weights)
    grad_h, grad_w = torch.autograd.grad((out**2).sum(), (hidden, weights), create_graph=True)
    (grad_h.sum() + grad_w.sum()).backward()
    assert torch.isfinite(hidden.grad[~torch.isnan(hidden)]).all() and torch.isfinite(weights.grad).all()
    assert torch.count_nonzero(hidden.grad[0, 3]) == 0 and weights.grad[0, 3] == 0


def test_malformed_offsets_on_the_unchecked_path_stay_in_bounds_and_poison_nothing(device):
    """The kernels clamp offsets themselves: called without validation, they never leave hidden (the
    interpreter would crash on an out-of-bounds access), and a row they could not complete leaves no
    ticket behind that would change a later, well-formed launch."""
    gen = torch.Generator().manual_seed(61)
    hidden = torch.randn(10, 4, generator=gen).to(device)
    cu = torch.tensor([0, 50, 3, -7, 10], dtype=torch.int32, device=device)
    good = offsets([10, 0, 0, 0]).to(device)
    with launch.config_override(**PACKED_CONFIGS["chunked"]):
        out, argmax, stats, *_ = packed_launchers.pool_forward(hidden, cu, "mean,max,last", None, None)
        assert out.shape == (4, 12) and argmax.shape == (4, 4) and stats.shape == (3, 4)
        after = packed_launchers.pool_forward(hidden, good, "mean,max,last", None, None)[0]
    with fastpool.use_backend("torch"):
        want = fastpool.pool(hidden, mode=["mean", "max", "last"], cu_seqlens=good)
    torch.testing.assert_close(after.cpu(), want.cpu())


def test_a_packed_forward_is_one_launch_and_skips_windows_when_every_segment_fits(device):
    assert packed_launchers.packed_programs(5, 1000, None) == (5 + -(-1000 // launch.CHUNK), launch.CHUNK)
    assert packed_launchers.packed_programs(5, 1000, launch.CHUNK) == (5, launch.CHUNK)
    assert packed_launchers.packed_programs(5, 1000, launch.CHUNK + 1)[0] > 5


def test_a_max_seqlen_that_lies_still_pools_every_token(device):
    """max_seqlen is only a launch hint: a longer segment is pooled whole by its own program."""
    gen = torch.Generator().manual_seed(60)
    hidden = torch.randn(23, 5, generator=gen).to(device)
    cu = offsets([3, 17, 3]).to(device)
    with launch.config_override(chunk=4, lanes=2):
        got = packed_launchers.pool_forward(hidden, cu, "mean,max", None, 4)[0]
    with fastpool.use_backend("torch"):
        want = fastpool.pool(hidden, mode=["mean", "max"], cu_seqlens=cu)
    torch.testing.assert_close(got.cpu(), want.cpu())


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["positions", "user-weights"])
def test_opcheck(device, backend_name, with_weights):
    gen = torch.Generator().manual_seed(47)
    cu = offsets([2, 0, 5]).to(device)
    hidden = torch.randn(7, 5, generator=gen).to(device).requires_grad_()
    weights = (torch.rand(7, generator=gen) + 0.5).to(device) if with_weights else None
    modes = "max,weighted_mean,cls,mean"
    with config("chunked" if backend_name == "triton" else "one-chunk"):
        eps = 1e-12 if with_weights else -1.0
        args = (hidden, cu, weights, modes, backend_name, eps, True, True, -1, with_weights)
        torch.library.opcheck(torch.ops.fastpool.packed_pool_fwd.default, args)
        out, argmax, stats, _, wsum, *_ = torch.ops.fastpool.packed_pool_fwd(hidden.detach(), *args[1:])
        bwd = (
            torch.randn_like(out),
            cu,
            weights,
            argmax,
            stats,
            wsum,
            7,
            hidden.dtype,
            modes,
            backend_name,
            -1,
        )
        torch.library.opcheck(torch.ops.fastpool.packed_pool_bwd.default, bwd)


def packed_loss(hidden, cu_seqlens, weights):
    out = fastpool.pool(
        hidden, mode=["mean", "max", "weighted_mean", "last"], cu_seqlens=cu_seqlens, weights=weights
    )
    return (out * out).sum()


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fullgraph_compile_matches_eager_without_recompiling_per_shape(device, backend_name):
    counter = CompileCounter()
    compiled = torch.compile(packed_loss, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(48)
    with fastpool.use_backend(backend_name), config("chunked" if backend_name == "triton" else "one-chunk"):
        for lengths in ([2, 3], [1, 0, 5], [5, 2, 2, 1]):
            cu = offsets(lengths).to(device)
            hidden = torch.randn(sum(lengths), 6, generator=gen).to(device).requires_grad_()
            weights = (torch.rand(sum(lengths), generator=gen) + 0.5).to(device).requires_grad_()
            loss = compiled(hidden, cu, weights)
            grads = torch.autograd.grad(loss, (hidden, weights))
            ref = packed_loss(hidden, cu, weights)
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(grads, torch.autograd.grad(ref, (hidden, weights)))
    assert counter.frame_count <= 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk_bytes", [64, 700, 2**21])
def test_eager_packed_mean_has_the_padded_bits_across_widening_chunks(monkeypatch, dtype, chunk_bytes):
    """The CPU bag sums (embedding_bag; 16-bit input widened in chunks, a segment that spans chunks
    carried over as its running sum) give the padded path's bits (index_add_, token order)."""
    from fastpool import eager_sums

    monkeypatch.setattr(eager_sums, "_BAG_CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(7)
    lengths = [0, 37, 1, 0, 64, 5, 90, 0]
    cu = offsets(lengths)
    d = 13
    scale = torch.exp(3 * torch.randn(int(cu[-1]), 1, generator=gen))
    hidden = (torch.randn(int(cu[-1]), d, generator=gen) * scale).to(dtype)
    hidden[40, 3] = float("nan")
    padded = torch.full((len(lengths), max(lengths), d), float("inf"), dtype=dtype)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        padded[s, : b - a], mask[s, : b - a] = hidden[a:b], True
    with fastpool.use_backend("torch"):
        for tokens in (hidden, hidden.t().contiguous().t()):  # contiguous and strided rows
            packed_out = fastpool.mean_pool(tokens, cu_seqlens=cu)
            assert torch.equal(packed_out.isnan(), fastpool.mean_pool(padded, mask).isnan())
            assert torch.equal(packed_out.nan_to_num(), fastpool.mean_pool(padded, mask).nan_to_num())
            seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            total = torch.zeros(len(lengths), d).index_add_(0, seg, hidden.float())
            expected = (total / torch.tensor(lengths).clamp(min=1).float().unsqueeze(1)).to(dtype)
            assert torch.equal(packed_out.nan_to_num(), expected.nan_to_num())
