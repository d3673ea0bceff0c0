"""Regression tests of defects found by adversarial use (issue 12 items 1, 3 and 10).

Each test failed before its fix.
"""

import numpy as np
import pytest
import torch

import fastpool

ALL_MODES = ["mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_zero_gives_zeros_for_empty_rows_padded_and_packed(backend, dtype):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 6, 5, generator=g, dtype=dtype)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # an empty row
    out = fastpool.pool(hidden, mask, mode=ALL_MODES, normalize=True, eps=0.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # The non-empty rows are plain unit vectors.
    norms = torch.linalg.vector_norm(out[[0, 2]].double(), dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)
    cu = torch.tensor([0, 4, 4, 9])  # sequence 1 is empty
    packed = fastpool.pool(hidden.reshape(-1, 5)[:9], mode=ALL_MODES, cu_seqlens=cu, normalize=True, eps=0.0)
    assert torch.isfinite(packed).all()
    assert torch.equal(packed[1], torch.zeros_like(packed[1]))


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), -0.5])
def test_negative_or_nan_eps_is_a_clear_error(eps):
    hidden = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="eps"):
        fastpool.pool(hidden, normalize=True, eps=eps)


def test_non_number_eps_is_a_type_error():
    with pytest.raises(TypeError, match="eps"):
        fastpool.pool(torch.randn(2, 3, 4), normalize=True, eps="1e-6")


@pytest.mark.parametrize("eps", [np.float32(1e-6), np.float64(1e-6), np.int64(0)])
def test_numpy_scalar_eps_is_accepted(backend, eps):
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    out = fastpool.pool(hidden, normalize=True, eps=eps)
    assert torch.equal(out, fastpool.pool(hidden, normalize=True, eps=float(eps)))


@pytest.mark.parametrize("max_seqlen", [2**63, 2**64 + 5])
def test_max_seqlen_beyond_int64_under_compile_is_the_eager_result(backend, max_seqlen):
    """max_seqlen bounds the sequence lengths; one beyond int64 used to fail inside torch.compile."""
    hidden = torch.randn(10, 4, generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)

    def pool(h, c):
        return fastpool.pool(h, mode=["mean", "max"], cu_seqlens=c, max_seqlen=max_seqlen)

    want = pool(hidden, cu)
    torch._dynamo.reset()
    got = torch.compile(pool, fullgraph=True)(hidden, cu)
    assert torch.equal(got, want)
    assert torch.equal(want, fastpool.pool(hidden, mode=["mean", "max"], cu_seqlens=cu))


def _row_with_inf(T: int, d: int) -> torch.Tensor:
    hidden = torch.randn(1, T, d, generator=torch.Generator().manual_seed(3))
    hidden[0, 5, 1] = float("inf")  # a real token in the first T-split (rank offset 0)
    return hidden


def test_rank_weighted_mean_keeps_a_real_inf_in_a_long_split_row(backend):
    # T = 600 is split along T by the Triton launcher (B * feature blocks is far below the GPU).
    hidden = _row_with_inf(600, 3)
    out = fastpool.pool(hidden, mode=["weighted_mean", "mean"])
    assert out[0, 1] == float("inf") and out[0, 4] == float("inf")
    assert torch.isfinite(out[0, [0, 2, 3, 5]]).all()


def test_rank_weighted_mean_keeps_a_real_inf_in_a_long_packed_sequence(backend):
    hidden = _row_with_inf(600, 3)[0]
    cu = torch.tensor([0, 600])
    out = fastpool.pool(hidden, mode=["weighted_mean", "mean"], cu_seqlens=cu)
    assert out[0, 1] == float("inf") and out[0, 4] == float("inf")
    assert torch.isfinite(out[0, [0, 2, 3, 5]]).all()


# Issue 12 item 8: meta tensors give correctly shaped meta results; sparse input is a TypeError.


def _meta(*shape, dtype=torch.float32, requires_grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("mode", [*ALL_MODES, ALL_MODES])
@pytest.mark.parametrize("normalize", [False, True])
def test_meta_input_gives_meta_results_and_gradients(backend, mode, normalize):
    hidden = _meta(3, 7, 5, dtype=torch.bfloat16, requires_grad=True)
    mask = _meta(3, 7, dtype=torch.int64)
    out = fastpool.pool(hidden, mask, mode=mode, normalize=normalize)
    n = len(mode) if isinstance(mode, list) else 1
    assert out.device.type == "meta" and out.shape == (3, n * 5) and out.dtype == torch.bfloat16
    out.sum().backward()
    assert hidden.grad.device.type == "meta" and hidden.grad.shape == (3, 7, 5)
    assert hidden.grad.dtype == torch.bfloat16


def test_meta_max_indices_and_user_weights(backend):
    hidden = _meta(2, 6, 4)
    values, index = fastpool.max_pool(hidden, _meta(2, 6, dtype=torch.bool), return_indices=True)
    assert (values.shape, index.shape, index.dtype, index.device.type) == (
        (2, 4),
        (2, 4),
        torch.int64,
        "meta",
    )
    weights = _meta(2, 6, requires_grad=True)
    out = fastpool.weighted_mean_pool(hidden.requires_grad_(), None, weights)
    assert out.shape == (2, 4) and out.device.type == "meta"
    out.sum().backward()
    assert weights.grad.shape == (2, 6) and weights.grad.device.type == "meta"


@pytest.mark.parametrize("max_seqlen", [None, 5])
def test_meta_packed_input_with_meta_offsets(backend, max_seqlen):
    tokens = _meta(9, 4, requires_grad=True)
    cu = _meta(4, dtype=torch.int32)
    out = fastpool.pool(tokens, mode=["mean", "max"], cu_seqlens=cu, max_seqlen=max_seqlen, normalize=True)
    assert out.shape == (3, 8) and out.device.type == "meta"
    out.sum().backward()
    assert tokens.grad.shape == (9, 4) and tokens.grad.device.type == "meta"
    _, index = fastpool.max_pool(tokens[None], cu_seqlens=cu, return_indices=True)
    assert index.shape == (3, 4) and index.device.type == "meta"


def test_meta_results_match_the_shapes_of_real_results(backend):
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 1]])
    real = fastpool.pool(hidden, mask, mode=["max", "cls"], normalize=True)
    meta = fastpool.pool(hidden.to("meta"), mask.to("meta"), mode=["max", "cls"], normalize=True)
    assert (meta.shape, meta.dtype, meta.stride()) == (real.shape, real.dtype, real.stride())


def test_sparse_input_is_a_type_error_naming_the_argument():
    dense = torch.randn(2, 5, 3)
    mask = torch.ones(2, 5)
    for call, argument in [
        (lambda: fastpool.mean_pool(dense.to_sparse()), "hidden"),
        (lambda: fastpool.mean_pool(dense.to_sparse(2), mask), "hidden"),
        (lambda: fastpool.max_pool(dense, mask.to_sparse()), "mask"),
        (lambda: fastpool.max_pool(dense, mask.to_sparse_csr()), "mask"),
        (lambda: fastpool.weighted_mean_pool(dense, mask, mask.to_sparse()), "weights"),
        (lambda: fastpool.mean_pool(dense[0].to_sparse(), cu_seqlens=torch.tensor([0, 5])), "hidden"),
        (lambda: fastpool.mean_pool(dense[0], cu_seqlens=torch.tensor([0, 5]).to_sparse()), "cu_seqlens"),
        (
            lambda: fastpool.weighted_mean_pool(
                dense[0], weights=mask[0].to_sparse(), cu_seqlens=torch.tensor([0, 5])
            ),
            "weights",
        ),
    ]:
        with pytest.raises(TypeError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{argument}: expected a dense"), message
        assert "got layout torch.sparse" in message, message


# Issue 12 item 2: second-order gradients through normalize=True (the row norms depend on hidden).

SECOND_ORDER_MODES = ["mean", "max", "last", "weighted_mean"]


def _gradgradcheck(backend, f, inputs):
    # Under the Triton interpreter every forward is a slow kernel launch: check a random
    # projection of the second derivative there (fast_mode), the full one on eager.
    return torch.autograd.gradgradcheck(f, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("eps", [1e-12, 2.5], ids=["tiny-eps", "eps-between-the-norms"])
def test_gradgradcheck_through_normalize_padded(backend, eps):
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 5, 2, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)

    def f(h):
        return fastpool.pool(h, mask, mode=SECOND_ORDER_MODES, normalize=True, eps=eps)

    if eps > 1:  # the first row's norm is below eps, the second's above it
        norms = torch.linalg.vector_norm(fastpool.pool(hidden, mask, mode=SECOND_ORDER_MODES), dim=1)
        assert norms[0] < eps < norms[1] or norms[1] < eps < norms[0], norms
    assert _gradgradcheck(backend, f, (hidden,))


def test_gradgradcheck_through_normalize_packed(backend):
    g = torch.Generator().manual_seed(12)
    tokens = torch.randn(7, 3, generator=g, dtype=torch.float64).requires_grad_()
    cu = torch.tensor([0, 3, 3, 7])

    def f(x):
        return fastpool.pool(x, mode=["mean", "max", "cls"], cu_seqlens=cu, normalize=True)

    assert _gradgradcheck(backend, f, (tokens,))


def test_gradgradcheck_through_normalize_with_user_weights(backend):
    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    weights = torch.rand(2, 4, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]])

    def f(h, w):
        return fastpool.pool(h, mask, mode=["weighted_mean", "mean"], weights=w, normalize=True)

    assert _gradgradcheck(backend, f, (hidden, weights))


def test_hessian_vector_product_through_normalize_matches_f_normalize(backend):
    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) < 0.7
    target = torch.randn(4, 10, generator=g, dtype=torch.float64)
    direction = torch.randn_like(hidden)

    def loss(h, fused):
        if fused:
            out = fastpool.pool(h, mask, mode=["mean", "max"], normalize=True)
        else:
            out = torch.nn.functional.normalize(fastpool.pool(h, mask, mode=["mean", "max"]), dim=-1)
        return ((out - target) ** 2).sum()

    hvps = []
    for fused in (True, False):
        _, hvp = torch.autograd.functional.hvp(lambda h, fused=fused: loss(h, fused), hidden, direction)
        hvps.append(hvp)
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-9, atol=1e-12)


def _negative_view(x: torch.Tensor) -> torch.Tensor:
    """A view of -x with the negative bit (memory holds x), as ``(x * 1j).conj().imag``... gives."""
    view = torch._neg_view(x)
    assert view.is_neg() and view.data_ptr() == x.data_ptr()
    return view


def test_negative_bit_views_are_pooled_as_their_values_on_every_entry_point(backend):
    """``x.conj().imag`` and ``torch._neg_view`` are float views whose memory holds -x: the Triton kernels
    read memory as it is, so every entry point resolves them (found by the express review: the Triton
    backend pooled x instead of -x)."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 7, 8, generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.7
    weights = torch.rand(3, 7, generator=g) + 0.5
    fmask = mask.float()
    modes = ["mean", "max", "weighted_mean"]
    assert torch.equal(
        fastpool.pool(_negative_view(hidden), _negative_view(fmask), modes, weights=_negative_view(weights)),
        fastpool.pool(-hidden, fmask, modes, weights=-weights),
    )
    cu = torch.tensor([0, 4, 4, 12])
    tokens = hidden.reshape(-1, 8)[:12]
    assert torch.equal(
        fastpool.pool(_negative_view(tokens), mode=["mean", "max"], cu_seqlens=cu),
        fastpool.pool(-tokens, mode=["mean", "max"], cu_seqlens=cu),
    )
    scores = torch.randn(3, 7, generator=g)
    assert torch.equal(
        fastpool.attention_pool(_negative_view(hidden), _negative_view(scores), mask),
        fastpool.attention_pool(-hidden, -scores, mask),
    )
    maps = torch.randn(2, 4, 3, 3, generator=g)
    assert torch.equal(
        fastpool.global_pool(_negative_view(maps), ["mean", "max"]),
        fastpool.global_pool(-maps, ["mean", "max"]),
    )
    state = fastpool.pool_partial(_negative_view(hidden), mask, ["mean", "max"]).finish()
    assert torch.equal(state, fastpool.pool_partial(-hidden, mask, ["mean", "max"]).finish())
    # Gradients flow through the resolved copy to the view's base.
    leaf = hidden.clone().requires_grad_()
    fastpool.mean_pool(_negative_view(leaf), mask).sum().backward()
    plain = hidden.clone().requires_grad_()
    fastpool.mean_pool(-plain, mask).sum().backward()
    assert torch.equal(leaf.grad, plain.grad)


def test_is_grads_batched_is_a_clear_error(backend):
    """``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward under the legacy vmap (a
    gradient without storage): a clear error instead of "Cannot access data pointer" (Triton) or a
    missing batching rule (eager), and torch.func.vmap over autograd.grad as the way out."""
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    grads = torch.randn(3, 2, 4)
    for mode in ("mean", ["mean", "max"], "cls", "last"):
        out = fastpool.pool(hidden, mask, mode if isinstance(mode, list) else [mode])
        with pytest.raises(RuntimeError, match="is_grads_batched"):
            torch.autograd.grad(out, hidden, grads.repeat(1, 1, out.shape[1] // 4), is_grads_batched=True)
    out = fastpool.mean_pool(hidden, mask)
    batched = torch.func.vmap(lambda g: torch.autograd.grad(out, hidden, g, retain_graph=True)[0])(grads)
    for i in range(3):
        torch.testing.assert_close(
            batched[i], torch.autograd.grad(out, hidden, grads[i], retain_graph=True)[0]
        )
