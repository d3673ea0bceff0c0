"""fastpool.attention_pool and fastpool.nn.AttentionPooling against the float64 oracle, on both backends."""

import contextlib

import oracle
import pytest
import torch
from helpers import make_mask, to_numpy
from tolerances import REDUCTION
from torch._dynamo.testing import CompileCounter

import fastpool
from fastpool import attention_launchers


@contextlib.contextmanager
def small_blocks(block_t=4, block_d=2):
    """Blocks small enough that interpreter shapes cross several token and feature blocks."""
    saved = dict(attention_launchers.OVERRIDE)
    attention_launchers.OVERRIDE.update(block_t=block_t, block_d=block_d)
    try:
        yield
    finally:
        attention_launchers.OVERRIDE.clear()
        attention_launchers.OVERRIDE.update(saved)


@pytest.fixture(autouse=True)
def _small():
    with small_blocks():
        yield


def expected(hidden, scores, mask):
    s3 = scores if scores.dim() == 3 else scores.unsqueeze(-1)
    ref = oracle.attention(to_numpy(hidden), to_numpy(s3), to_numpy(mask))
    return torch.from_numpy(ref).to(hidden.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_kind", ["none", "empty-row"])
@pytest.mark.parametrize("heads", [0, 3])
def test_matches_oracle(device, backend, dtype, mask_kind, heads):
    gen = torch.Generator().manual_seed(1)
    B, T, d = 3, 9, 6
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    scores = (3 * torch.randn(B, T, *((heads,) if heads else ()), generator=gen)).to(dtype)
    mask = make_mask(mask_kind, B, T, gen)
    out = fastpool.attention_pool(
        hidden.to(device), scores.to(device), None if mask is None else mask.to(device)
    )
    assert out.shape == (B, d) and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), expected(hidden, scores, mask), **REDUCTION[dtype])


def test_strided_inputs_and_float_mask(device, backend):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 11, 8, generator=gen)
    hidden = base.transpose(0, 1)[:, ::2].transpose(0, 1)  # (2, 6, 8) non-contiguous
    hidden = torch.randn(8, 6, 3, generator=gen).permute(2, 1, 0)  # (3, 6, 8) transposed
    scores = torch.randn(3, 2, 6, generator=gen).transpose(1, 2)  # (3, 6, 2) strided
    mask = (torch.rand(3, 6, generator=gen) < 0.7).float()
    mask[0, 0] = -0.0  # -0.0 is padding, as in every mode
    out = fastpool.attention_pool(hidden.to(device), scores.to(device), mask.to(device))
    torch.testing.assert_close(out.cpu(), expected(hidden, scores, mask), **REDUCTION[torch.float32])


@pytest.mark.parametrize("heads", [1, 2])
def test_gradcheck_float64(device, backend, heads):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    scores = torch.randn(3, 5, heads, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    mask = make_mask("empty-row", 3, 5, gen).to(device)
    # fast_mode: random projections of the Jacobian, a few kernel calls (the interpreter is slow)
    assert torch.autograd.gradcheck(
        lambda h, s: fastpool.attention_pool(h, s, mask), (hidden, scores), fast_mode=backend == "triton"
    )


def test_gradient_of_two_dimensional_scores(device, backend):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    scores = torch.randn(2, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    out = fastpool.attention_pool(hidden, scores)
    gh, gs = torch.autograd.grad(out.square().sum(), (hidden, scores))
    ref = (torch.softmax(scores, 1)[..., None] * hidden).sum(1)
    rh, rs = torch.autograd.grad(ref.square().sum(), (hidden, scores))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close((gh, gs), (rh, rs))
    assert gs.shape == scores.shape


def test_padding_garbage_never_leaks(device, backend):
    gen = torch.Generator().manual_seed(5)
    B, T, d = 3, 10, 4
    hidden = torch.randn(B, T, d, generator=gen)
    scores = torch.randn(B, T, 2, generator=gen)
    mask = make_mask("right", B, T, gen)
    mask[2] = False  # an empty row
    hidden[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    scores[~mask] = torch.tensor([float("nan"), float("inf")])
    h = hidden.to(device).requires_grad_()
    s = scores.to(device).requires_grad_()
    out = fastpool.attention_pool(h, s, mask.to(device))
    gh, gs = torch.autograd.grad(out.sum(), (h, s))
    clean_h = torch.where(mask[..., None], hidden, 0.0)
    torch.testing.assert_close(out.cpu(), expected(clean_h, scores.nan_to_num(0, 0, 0), mask))
    assert torch.isfinite(gh).all() and torch.isfinite(gs).all()
    assert (gh.cpu()[~mask] == 0).all() and (gs.cpu()[~mask] == 0).all()
    assert (out.cpu()[2] == 0).all()


def test_neg_inf_and_large_scores(device, backend):
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    scores = torch.tensor(
        [[[1e30, -float("inf")], [1e30, -float("inf")], [-float("inf"), -float("inf")], [0.0, -float("inf")]],
         [[80000.0, 1.0], [80001.0, 2.0], [-float("inf"), 3.0], [79999.0, 4.0]]]
    )  # fmt: skip
    hidden[0, 2] = float("inf")  # a real token of weight 0: its value must not reach the output
    h = hidden.to(device).requires_grad_()
    s = scores.to(device).requires_grad_()
    out = fastpool.attention_pool(h, s)
    torch.testing.assert_close(out.cpu(), expected(hidden, scores, None))
    assert out.cpu()[0, 1] == 0  # head 1 of row 0: only -inf scores
    gh, gs = torch.autograd.grad(out.sum(), (h, s))
    assert torch.isfinite(gh).all() and torch.isfinite(gs).all()
    assert gs.cpu()[0, :, 1].eq(0).all() and gs.cpu()[0, 2, 0] == 0


def test_empty_dimensions(device, backend):
    for B, T, d in [(0, 3, 4), (2, 0, 4), (2, 3, 0)]:
        h = torch.randn(B, T, d, device=device, requires_grad=True)
        s = torch.randn(B, T, device=device, requires_grad=True)
        out = fastpool.attention_pool(h, s)
        assert out.shape == (B, d) and (out == 0).all() if T == 0 else out.shape == (B, d)
        gh, gs = torch.autograd.grad(out.sum(), (h, s), allow_unused=True)
        assert gh.shape == h.shape and (gs is None or (gs == 0).all())


def test_batch_invariance(device, backend):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(5, 9, 6, generator=gen).to(device)
    scores = torch.randn(5, 9, 3, generator=gen).to(device)
    mask = make_mask("holes", 5, 9, gen).to(device)
    full = fastpool.attention_pool(hidden, scores, mask)
    assert torch.equal(full[2:3], fastpool.attention_pool(hidden[2:3], scores[2:3], mask[2:3]))


@pytest.mark.parametrize(
    "make,arg,message",
    [
        (lambda h: (h, h[..., 0].long()), "scores", "dtype"),
        (lambda h: (h, h[:, :2, 0]), "scores", "(B, T)"),
        (lambda h: (h, torch.zeros(2, 5, 4)), "scores", "divides d = 6"),
        (lambda h: (h, torch.zeros(2, 5, 1, 1)), "scores", "2 or 3 dimensions"),
        (lambda h: (h, [1.0]), "scores", "torch.Tensor"),
        (lambda h: (h[0], h[0, :, 0]), "hidden", "3 dimensions"),
    ],
)
def test_bad_input_names_the_argument(make, arg, message):
    hidden, scores = make(torch.zeros(2, 5, 6))
    with pytest.raises((TypeError, ValueError), match=arg) as info:
        fastpool.attention_pool(hidden, scores)
    assert message in str(info.value)


def test_bad_mask_names_the_argument():
    with pytest.raises(ValueError, match="mask"):
        fastpool.attention_pool(torch.zeros(2, 5, 6), torch.zeros(2, 5), torch.ones(2, 4))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_opcheck(device, backend_name, with_mask):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 7, 4, generator=gen).to(device).requires_grad_()
    scores = torch.randn(3, 7, 2, generator=gen).to(device).requires_grad_()
    mask = make_mask("holes", 3, 7, gen).to(device) if with_mask else None
    args = (hidden, scores, mask, backend_name)
    torch.library.opcheck(torch.ops.fastpool.attention_pool_fwd.default, args)
    out, m, total = torch.ops.fastpool.attention_pool_fwd(
        hidden.detach(), scores.detach(), mask, backend_name
    )
    bwd_args = (torch.randn_like(out), hidden.detach(), scores.detach(), mask, out, m, total, backend_name)
    torch.library.opcheck(torch.ops.fastpool.attention_pool_bwd.default, bwd_args)


def attention_loss(hidden, scores, mask):
    return fastpool.attention_pool(hidden, scores, mask).square().sum()


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fullgraph_compile_matches_eager(device, backend_name):
    counter = CompileCounter()
    compiled = torch.compile(attention_loss, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(8)
    with fastpool.use_backend(backend_name):
        for B, T in [(2, 5), (3, 7), (4, 9)]:
            hidden = torch.randn(B, T, 4, generator=gen).to(device).requires_grad_()
            scores = torch.randn(B, T, 2, generator=gen).to(device).requires_grad_()
            mask = make_mask("holes", B, T, gen).to(device)
            loss = compiled(hidden, scores, mask)
            grads = torch.autograd.grad(loss, (hidden, scores))
            ref = attention_loss(hidden, scores, mask)
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(grads, torch.autograd.grad(ref, (hidden, scores)))
    assert counter.frame_count <= 2


def test_attention_pooling_module_trains(device, backend):
    torch.manual_seed(9)
    module = fastpool.nn.AttentionPooling(4, heads=2).to(device)
    hidden = torch.randn(3, 6, 4, device=device)
    mask = torch.ones(3, 6, dtype=torch.bool, device=device)
    mask[1, 3:] = False
    out = module(hidden, mask)
    torch.testing.assert_close(out, fastpool.attention_pool(hidden, module.scorer(hidden), mask))
    out.square().sum().backward()
    assert module.scorer.weight.grad is not None and module.scorer.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="heads"):
        fastpool.nn.AttentionPooling(5, heads=2)


def packed_batch(lengths, d, heads, dtype, gen):
    """(hidden (N, d), scores (N, H), cu_seqlens int32, and the same batch right-padded: hidden,
    scores, mask)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    N, T = int(cu[-1]), max(lengths)
    hidden = torch.randn(N, d, generator=gen).to(dtype)
    scores = (2 * torch.randn(N, heads, generator=gen)).to(dtype)
    padded = torch.zeros(len(lengths), T, d, dtype=dtype)
    padded_scores = torch.zeros(len(lengths), T, heads, dtype=dtype)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        padded[i, : b - a], padded_scores[i, : b - a], mask[i, : b - a] = hidden[a:b], scores[a:b], True
    return hidden, scores, cu, padded, padded_scores, mask


@pytest.mark.parametrize("heads", [1, 2])
def test_packed_matches_padded_with_gradients(device, backend, heads):
    gen = torch.Generator().manual_seed(11)
    hidden, scores, cu, padded, padded_scores, mask = packed_batch(
        [5, 0, 9, 1, 6], 6, heads, torch.float32, gen
    )
    h = hidden.to(device).requires_grad_()
    s = (scores[:, 0] if heads == 1 else scores).to(device).requires_grad_()  # (N,) for one head
    out = fastpool.attention_pool(h, s, cu_seqlens=cu.to(device))
    assert out.shape == (5, 6)
    torch.testing.assert_close(
        out.detach().cpu(), expected(padded, padded_scores, mask), **REDUCTION[torch.float32]
    )
    assert (out[1] == 0).all()  # the empty sequence
    g = torch.randn(out.shape, generator=gen).to(device)
    gh, gs = torch.autograd.grad(out, (h, s), g)
    ph, ps = padded.to(device).requires_grad_(), padded_scores.to(device).requires_grad_()
    rh, rs = torch.autograd.grad(fastpool.attention_pool(ph, ps, mask.to(device)), (ph, ps), g)
    torch.testing.assert_close(gh.cpu(), rh.cpu()[mask])
    torch.testing.assert_close(gs.cpu(), rs.cpu()[mask].reshape(gs.shape))


def test_packed_layouts_and_bounds(device, backend):
    gen = torch.Generator().manual_seed(12)
    hidden, scores, cu, padded, padded_scores, mask = packed_batch([4, 7, 3], 4, 2, torch.float32, gen)
    hidden, scores = hidden.to(device), scores.to(device)
    ref = fastpool.attention_pool(hidden, scores, cu_seqlens=cu.to(device))
    same = [
        fastpool.attention_pool(hidden[None], scores[None], cu_seqlens=cu.long().to(device), max_seqlen=7),
        fastpool.attention_pool(hidden, scores, cu_seqlens=cu.to(device), max_seqlen=9),
    ]
    nested = torch.nested.nested_tensor_from_jagged(hidden, cu.long().to(device))
    nested_scores = torch.nested.nested_tensor_from_jagged(scores, nested.offsets())
    same.append(fastpool.attention_pool(nested, nested_scores))
    same.append(fastpool.attention_pool(nested, scores))
    for out in same:
        assert torch.equal(out, ref)


def test_packed_gradcheck_float64(device, backend):
    gen = torch.Generator().manual_seed(13)
    hidden, scores, cu, *_ = packed_batch([3, 0, 4], 4, 2, torch.float64, gen)
    h, s, cu = hidden.to(device).requires_grad_(), scores.to(device).requires_grad_(), cu.to(device)
    assert torch.autograd.gradcheck(
        lambda a, b: fastpool.attention_pool(a, b, cu_seqlens=cu), (h, s), fast_mode=backend == "triton"
    )


@pytest.mark.parametrize(
    "kwargs,arg,message",
    [
        (dict(cu_seqlens=torch.tensor([0, 3, 7])), "scores", "(N,) or (N, H) with N = 7"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7]), mask=torch.ones(7)), "mask", "expected None for packed"),
        (dict(cu_seqlens=torch.tensor([0, 5, 4, 7])), "cu_seqlens", "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0.0, 7.0])), "cu_seqlens", "int32 or int64"),
        (dict(max_seqlen=4), "max_seqlen", "without cu_seqlens"),
    ],
)
def test_packed_bad_input_names_the_argument(kwargs, arg, message):
    hidden, scores = torch.zeros(7, 6), torch.zeros(7, 2)
    if "max_seqlen" in kwargs:
        hidden, scores = hidden[None], scores[None]
    if message.startswith("(N,)"):
        scores = torch.zeros(6, 2)
    with pytest.raises((TypeError, ValueError), match=arg) as info:
        fastpool.attention_pool(hidden, scores, **kwargs)
    assert message in str(info.value)


def test_packed_nested_scores_need_the_same_offsets():
    hidden = torch.nested.nested_tensor_from_jagged(torch.zeros(7, 4), torch.tensor([0, 3, 7]))
    scores = torch.nested.nested_tensor_from_jagged(torch.zeros(7), torch.tensor([0, 4, 7]))
    with pytest.raises(ValueError, match="scores: expected a jagged nested tensor with hidden's offsets"):
        fastpool.attention_pool(hidden, scores)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_packed_opcheck_and_compile(device, backend_name):
    gen = torch.Generator().manual_seed(14)
    hidden, scores, cu, *_ = packed_batch([3, 0, 5], 4, 2, torch.float32, gen)
    hidden, scores, cu = hidden.to(device), scores.to(device), cu.to(device)
    args = (hidden.requires_grad_(), scores.requires_grad_(), cu, 5, False, backend_name)
    torch.library.opcheck(torch.ops.fastpool.packed_attention_pool_fwd.default, args)
    out, m, total = torch.ops.fastpool.packed_attention_pool_fwd(
        hidden.detach(), scores.detach(), cu, 5, True, backend_name
    )
    bwd = (torch.randn_like(out), hidden.detach(), scores.detach(), cu, out, m, total, 5, backend_name)
    torch.library.opcheck(torch.ops.fastpool.packed_attention_pool_bwd.default, bwd)
    counter = CompileCounter()
    compiled = torch.compile(
        lambda h, s, c: fastpool.attention_pool(h, s, cu_seqlens=c).square().sum(),
        fullgraph=True,
        backend=counter,
    )
    with fastpool.use_backend(backend_name):
        loss = compiled(hidden, scores, cu)
        ref = fastpool.attention_pool(hidden, scores, cu_seqlens=cu).square().sum()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(
            torch.autograd.grad(loss, (hidden, scores)), torch.autograd.grad(ref, (hidden, scores))
        )
    assert counter.frame_count == 1


def test_double_backward(device, backend):
    gen = torch.Generator().manual_seed(15)
    hidden = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    scores = torch.randn(2, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    pool = lambda h, s: fastpool.attention_pool(h, s)  # noqa: E731
    assert torch.autograd.gradgradcheck(pool, (hidden, scores), fast_mode=backend == "triton")


def test_blocks_the_launcher_picks_are_compiled_ahead_of_time():
    from fastpool import aot

    attention_launchers.OVERRIDE.clear()  # the launcher's own blocks (the autouse fixture restores)
    specs = {
        (s.kernel, s.label.split()[1], s.constexprs["BLOCK_T"], s.constexprs["BLOCK_D"])
        for s in aot.attention_specializations()
    }
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    for dtype, name in names.items():
        size = torch.empty((), dtype=dtype).element_size()
        block_t, block_d = attention_launchers.block_sizes(1024, size)  # a head of 512 bytes or more
        assert block_d * size == attention_launchers.ROW_BYTES
        for kernel in ("attention_pool_forward_kernel", "attention_pool_backward_kernel"):
            assert (kernel, name, block_t, block_d) in specs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_eager_widens_16_bit_rows_a_group_at_a_time(dtype, monkeypatch):
    # 16-bit hidden is widened to float32 a few rows at a time (no float32 copy of the whole batch):
    # the same bits, forward and backward, as one group, with NaN padding and several heads.
    from fastpool import eager_attention

    gen = torch.Generator().manual_seed(12)
    B, T, d = 7, 30, 12
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    scores = torch.randn(B, T, 3, generator=gen)
    mask = make_mask("holes", B, T, gen)
    hidden = torch.where(mask[..., None], hidden, torch.tensor(float("nan"), dtype=dtype))
    grad = torch.randn(B, d, generator=gen).to(dtype)
    whole = eager_attention.attention_pool_forward(hidden, scores, mask)
    whole_grads = eager_attention.attention_pool_backward(grad, hidden, scores, mask, whole[0])
    monkeypatch.setattr(eager_attention, "_WIDEN_CHUNK_BYTES", 2 * T * d * 4)  # two rows per group
    assert len(eager_attention._row_groups(hidden, torch.float32)) == 4
    grouped = eager_attention.attention_pool_forward(hidden, scores, mask)
    grouped_grads = eager_attention.attention_pool_backward(grad, hidden, scores, mask, grouped[0])
    for got, expected in zip((*grouped, *grouped_grads), (*whole, *whole_grads), strict=True):
        assert torch.equal(got, expected)
    assert not torch.isnan(grouped[0]).any() and grouped_grads[0].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_packed_runs_in_token_chunks(dtype, monkeypatch):
    # The packed eager attention works on a few tokens at a time (no (N, d) float32 temporaries):
    # the same bits as one chunk, forward and backward, with empty sequences, sequences spanning
    # chunks, NaN in weight-0 tokens (a -inf score) and several heads.
    from fastpool import eager_attention

    gen = torch.Generator().manual_seed(13)
    cu = torch.tensor([0, 0, 5, 22, 22, 52, 53, 62])
    N, d = 62, 12
    hidden = torch.randn(N, d, generator=gen).to(dtype)
    scores = torch.randn(N, 3, generator=gen)
    scores[4, 1] = float("-inf")
    hidden[4, 4:8] = float("nan")
    grad = torch.randn(7, d, generator=gen).to(dtype)
    whole = eager_attention.packed_attention_pool_forward(hidden, scores, cu)
    whole_grads = eager_attention.packed_attention_pool_backward(grad, hidden, scores, cu, whole[0])
    monkeypatch.setattr(eager_attention, "_TOKEN_CHUNK_BYTES", 8 * d * 7)  # seven tokens per chunk
    assert len(eager_attention._token_chunks(N, d)) == 9
    chunked = eager_attention.packed_attention_pool_forward(hidden, scores, cu)
    chunked_grads = eager_attention.packed_attention_pool_backward(grad, hidden, scores, cu, chunked[0])
    for got, expected in zip((*chunked, *chunked_grads), (*whole, *whole_grads), strict=True):
        assert torch.equal(got, expected)
    assert not torch.isnan(chunked[0]).any() and not torch.isnan(chunked_grads[1]).any()
