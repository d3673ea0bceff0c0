"""torch.func transforms on both backends (issue 12 item 7): grad, vjp, jacrev, jvp, jacfwd, vmap (with and
without a mask, hidden or mask vmapped, padded and packed), per-sample gradients and a Hessian.

Derivatives are checked against tests/oracle.py: every mode but max is linear in hidden at a selection
fixed by the mask (its Jacobian-vector product is the oracle applied to the tangent), max's derivative
is the tangent at the oracle's argmax, and the oracle's pool_grad is the vector-Jacobian product; the
normalisation's derivative is composed in NumPy.
"""

import numpy as np
import oracle
import pytest
import torch
from helpers import kernel_config, make_mask, np_mask, to_numpy
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import fastpool
from fastpool import ops

MODES = ["mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean"]
EPS = 1e-12
TOL = dict(rtol=1e-10, atol=1e-10)


def _inputs(seed: int, B: int = 3, T: int = 5, d: int = 2, kind: str = "empty-row"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    return hidden, make_mask(kind, B, T, gen), gen


def _pool(hidden, mask, normalize, modes=MODES, weights=None):
    return fastpool.pool(hidden, mask, mode=modes, normalize=normalize, eps=EPS, weights=weights)


# --- the oracle's derivatives -------------------------------------------------------------------------


def oracle_out(h, mask, modes=MODES):
    return np.concatenate([oracle.pool(h, mask, m) for m in modes], axis=1)


def oracle_jvp(h, mask, t, modes=MODES):
    blocks = []
    for m in modes:
        if m == "max":
            _, index = oracle.max_with_index(h, mask)
            rows = np.arange(h.shape[0])[:, None]
            cols = np.arange(h.shape[2])[None, :]
            blocks.append(np.where(index >= 0, t[rows, np.maximum(index, 0), cols], 0.0))
        else:
            blocks.append(oracle.pool(t, mask, m))
    return np.concatenate(blocks, axis=1)


def oracle_vjp(h, mask, g, modes=MODES):
    d = h.shape[2]
    return sum(oracle.pool_grad(h, mask, m, g[:, i * d : (i + 1) * d]) for i, m in enumerate(modes))


def normalized(v):
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(n, EPS), n


def normalize_jvp(v, v_dot):
    y, n = normalized(v)
    return np.where(
        n > EPS, (v_dot - y * (y * v_dot).sum(1, keepdims=True)) / np.maximum(n, EPS), v_dot / EPS
    )


def normalize_vjp(v, g):
    return normalize_jvp(v, g)  # the Jacobian of v / ||v|| is symmetric


def expected_vjp(h, mask, g, normalize, modes=MODES):
    if normalize:
        g = normalize_vjp(oracle_out(h, mask, modes), g)
    return oracle_vjp(h, mask, g, modes)


def expected_jvp(h, mask, t, normalize, modes=MODES):
    v_dot = oracle_jvp(h, mask, t, modes)
    return normalize_jvp(oracle_out(h, mask, modes), v_dot) if normalize else v_dot


# Jacobians vmap over every output (or input) element: under the Triton interpreter each folded launch
# costs in proportion to its rows, so they use fewer modes (the single-vector tests cover all of them).
FEW_MODES = ["max", "weighted_mean", "last"]


def _close(got, want):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), **TOL)


# --- reverse mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_grad_and_vjp(backend, normalize, masked):
    hidden, mask, gen = _inputs(1)
    mask = mask if masked else None
    g = torch.randn(3, 2 * len(MODES), generator=gen, dtype=torch.float64)
    got = grad(lambda h: (_pool(h, mask, normalize) * g).sum())(hidden)
    want = expected_vjp(to_numpy(hidden), np_mask(mask), to_numpy(g), normalize)
    _close(got, want)
    out, vjp_fn = vjp(lambda h: _pool(h, mask, normalize), hidden)
    _close(vjp_fn(g)[0], want)
    want_out = oracle_out(to_numpy(hidden), np_mask(mask))
    _close(out, normalized(want_out)[0] if normalize else want_out)


@pytest.mark.parametrize("normalize", [False, True])
def test_jacrev(backend, normalize):
    hidden, mask, _ = _inputs(2, B=2, T=4)
    jac = jacrev(lambda h: _pool(h, mask, normalize))(hidden)  # (B, n * d, B, T, d)
    assert jac.shape == (2, 12, 2, 4, 2)
    h, m = to_numpy(hidden), np_mask(mask)
    for b in range(2):
        for k in range(12):
            e = np.zeros((2, 12))
            e[b, k] = 1.0
            _close(jac[b, k], expected_vjp(h, m, e, normalize))


# --- forward mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_jvp(backend, normalize, masked):
    hidden, mask, gen = _inputs(3)
    mask = mask if masked else None
    tangent = torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
    out, out_dot = jvp(lambda h: _pool(h, mask, normalize), (hidden,), (tangent,))
    _close(out_dot, expected_jvp(to_numpy(hidden), np_mask(mask), to_numpy(tangent), normalize))


@pytest.mark.parametrize("normalize", [False, True])
def test_jacfwd_equals_jacrev(backend, normalize):
    hidden, mask, _ = _inputs(4, B=2, T=4)
    forward = jacfwd(lambda h: _pool(h, mask, normalize, FEW_MODES))(hidden)
    reverse = jacrev(lambda h: _pool(h, mask, normalize, FEW_MODES))(hidden)
    h, m = to_numpy(hidden), np_mask(mask)
    e = np.zeros(h.shape)
    e[1, 2, 0] = 1.0  # one column of the Jacobian against the oracle
    _close(forward[..., 1, 2, 0], expected_jvp(h, m, e, normalize, FEW_MODES))
    torch.testing.assert_close(forward, reverse, **TOL)


def test_forward_ad_on_dual_tensors(backend):
    import torch.autograd.forward_ad as fwAD

    hidden, mask, gen = _inputs(5)
    tangent = torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
    with fwAD.dual_level():
        out = _pool(fwAD.make_dual(hidden, tangent), mask, True)
        out_dot = fwAD.unpack_dual(out).tangent
    _close(out_dot, expected_jvp(to_numpy(hidden), np_mask(mask), to_numpy(tangent), True))


def test_hessian_of_a_normalized_loss(backend):
    hidden, mask, gen = _inputs(6, B=2, T=3)
    target = torch.randn(2, 2 * len(FEW_MODES), generator=gen, dtype=torch.float64)

    def loss(h):
        return ((_pool(h, mask, True, FEW_MODES) - target) ** 2).sum()

    hessian = jacfwd(jacrev(loss))(hidden)
    reverse_twice = jacrev(jacrev(loss))(hidden)
    torch.testing.assert_close(hessian, reverse_twice, **TOL)
    # The same second derivative from plain double backward (gradgradcheck-verified, test_defects).
    direction = torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
    _, hvp = torch.autograd.functional.hvp(loss, hidden, direction)
    torch.testing.assert_close(torch.einsum("abcdef,def->abc", hessian, direction), hvp, **TOL)


# --- vmap -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0), (1, 0)], ids=str)
def test_vmap(backend, normalize, in_dims):
    gen = torch.Generator().manual_seed(7)
    V, B, T, d = 3, 2, 4, 2
    hiddens = torch.randn(V, B, T, d, generator=gen, dtype=torch.float64)
    masks = torch.stack([make_mask("empty-row", B, T, gen) for _ in range(V)])
    hidden_arg = hiddens[0] if in_dims[0] is None else hiddens.movedim(0, in_dims[0])
    mask_arg = masks[0] if in_dims[1] is None else masks
    out = vmap(lambda h, m: _pool(h, m, normalize), in_dims=in_dims)(hidden_arg, mask_arg)
    assert out.shape == (V, B, 2 * len(MODES))
    for v in range(V):
        h = to_numpy(hiddens[0 if in_dims[0] is None else v])
        m = np_mask(masks[0 if in_dims[1] is None else v])
        want = oracle_out(h, m)
        _close(out[v], normalized(want)[0] if normalize else want)


def test_vmap_without_mask_and_max_indices(backend):
    gen = torch.Generator().manual_seed(8)
    hiddens = torch.randn(4, 2, 5, 3, generator=gen, dtype=torch.float64)
    values, index = vmap(lambda h: fastpool.max_pool(h, return_indices=True))(hiddens)
    for v in range(4):
        want_values, want_index = oracle.max_with_index(to_numpy(hiddens[v]), None)
        _close(values[v], want_values)
        assert index[v].tolist() == want_index.tolist()


def test_per_sample_gradients(backend):
    # vmap(grad(...)): the common per-example-gradient idiom, mask vmapped too.
    gen = torch.Generator().manual_seed(9)
    hiddens = torch.randn(3, 1, 4, 2, generator=gen, dtype=torch.float64)
    masks = torch.stack([make_mask("holes", 1, 4, gen) for _ in range(3)])
    g = torch.randn(1, 2 * len(MODES), generator=gen, dtype=torch.float64)
    grads = vmap(grad(lambda h, m: (_pool(h, m, True) * g).sum()))(hiddens, masks)
    for v in range(3):
        want = expected_vjp(to_numpy(hiddens[v]), np_mask(masks[v]), to_numpy(g), True)
        _close(grads[v], want)


def test_per_sample_gradients_of_rank_weights_over_several_chunks(backend):
    # With a mask, the Triton backward of rank-weighted mean reads the real tokens before each chunk that
    # the forward saved (prefix, rows x chunks): vmap folds it into the batch and back, in the forward and
    # in the backward. Chunks of 8 tokens make T = 19 three chunks.
    gen = torch.Generator().manual_seed(15)
    V, B, T = 3, 2, 19
    hiddens = torch.randn(V, B, T, 2, generator=gen, dtype=torch.float64)
    masks = torch.stack([make_mask("holes", B, T, gen) for _ in range(V)])
    g = torch.randn(B, 4, generator=gen, dtype=torch.float64)
    modes = ["weighted_mean", "max"]

    def loss(h, m):
        return (_pool(h, m, False, modes) * g).sum()

    with kernel_config("split-T"):
        if backend == "triton":
            prefix = ops.forward_impl(
                hiddens[0], masks[0], None, "weighted_mean", backend, -1.0, False, True
            )[6]
            assert prefix.shape == (B, 3)
        grads = vmap(grad(loss))(hiddens, masks)
        shared_mask = vmap(grad(loss), in_dims=(0, None))(hiddens, masks[0])
    for v in range(V):
        h = to_numpy(hiddens[v])
        _close(grads[v], expected_vjp(h, np_mask(masks[v]), to_numpy(g), False, modes))
        _close(shared_mask[v], expected_vjp(h, np_mask(masks[0]), to_numpy(g), False, modes))


# --- user weights -----------------------------------------------------------------------------------


def test_reverse_mode_through_user_weights(backend):
    hidden, mask, gen = _inputs(10, kind="holes")
    weights = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.5
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    modes = ["weighted_mean", "max"]

    def loss(h, w):
        return (_pool(h, mask, False, modes, w) * g).sum()

    grad_h, grad_w = grad(loss, argnums=(0, 1))(hidden, weights)
    h, m, w = to_numpy(hidden), np_mask(mask), to_numpy(weights)
    want_h = oracle.pool_grad(h, m, "weighted_mean", to_numpy(g[:, :2]), w) + oracle.pool_grad(
        h, m, "max", to_numpy(g[:, 2:])
    )
    _close(grad_h, want_h)
    _close(grad_w, oracle.weights_grad(h, m, w, to_numpy(g[:, :2])))
    jac_w = jacrev(lambda w: _pool(hidden, mask, False, modes, w))(weights)  # (B, 4, B, T)
    e = np.zeros((3, 4))
    e[1, 0] = 1.0
    _close(jac_w[1, 0], oracle.weights_grad(h, m, w, e[:, :2]))
    per_row = vmap(lambda h, w: _pool(h[None], None, False, modes, w[None])[0])(hidden, weights)
    _close(per_row[:, :2], oracle.pool(h, None, "weighted_mean", w))


def test_per_sample_gradients_through_user_weights(backend):
    # vmap folds the Triton forward's weight sums (rows,) and un-rounded weighted means (rows, d) into
    # the batch and back; grad takes both gradients per sample.
    gen = torch.Generator().manual_seed(16)
    V, B, T = 3, 2, 5
    hiddens = torch.randn(V, B, T, 2, generator=gen, dtype=torch.float64)
    weights = torch.rand(V, B, T, generator=gen, dtype=torch.float64) + 0.5
    mask = make_mask("holes", B, T, gen)
    g = torch.randn(B, 4, generator=gen, dtype=torch.float64)
    modes = ["weighted_mean", "max"]

    def loss(h, w):
        return (_pool(h, mask, False, modes, w) * g).sum()

    grad_h, grad_w = vmap(grad(loss, argnums=(0, 1)))(hiddens, weights)
    m, gw, gm = np_mask(mask), to_numpy(g[:, :2]), to_numpy(g[:, 2:])
    for v in range(V):
        h, w = to_numpy(hiddens[v]), to_numpy(weights[v])
        _close(grad_h[v], oracle.pool_grad(h, m, "weighted_mean", gw, w) + oracle.pool_grad(h, m, "max", gm))
        _close(grad_w[v], oracle.weights_grad(h, m, w, gw))


def test_second_order_through_user_weights_without_a_graph(backend):
    # The hidden gradient J^T g depends on the weights; a second backward without a graph takes its
    # weights gradient through the weights_bwd implementation (the Triton kernel, applied to the
    # direction u, with u's weighted mean from the forward kernel) and J u through the forward.
    hidden, mask, gen = _inputs(17, kind="holes")
    weights = (torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    u = torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
    m, w = np_mask(mask), to_numpy(weights)
    want_w = oracle.weights_grad(to_numpy(u), m, w, to_numpy(g[:, :2]))
    for g_needs_grad in (False, True):
        g_arg = g.clone().requires_grad_(g_needs_grad)
        h_arg = hidden.clone().requires_grad_()
        out = _pool(h_arg, mask, False, ["weighted_mean", "mean"], weights)
        (grad_h,) = torch.autograd.grad((out * g_arg).sum(), h_arg, create_graph=True)
        inputs = (weights, g_arg) if g_needs_grad else (weights,)
        grads = torch.autograd.grad((grad_h * u).sum(), inputs)
        _close(grads[0], want_w)
        if g_needs_grad:
            uu = to_numpy(u)
            want_g = np.concatenate([oracle.pool(uu, m, "weighted_mean", w), oracle.pool(uu, m, "mean")], 1)
            _close(grads[1], want_g)


def test_forward_mode_through_user_weights_is_one_clear_error(backend):
    hidden, mask, gen = _inputs(11)
    weights = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    with pytest.raises(NotImplementedError) as info:
        jvp(
            lambda w: _pool(hidden, mask, False, ["weighted_mean"], w),
            (weights,),
            (torch.ones_like(weights),),
        )
    message = str(info.value)
    assert message.startswith("fastpool:") and "torch.func.jvp" in message and "weights" in message


# --- packed batches -------------------------------------------------------------------------------


def _packed_and_padded(seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = [2, 0, 4]
    tokens = torch.randn(sum(lengths), 2, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 2, 2, 6])
    padded = torch.zeros(3, 4, 2, dtype=torch.float64)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for s, (a, n) in enumerate(zip(cu[:-1].tolist(), lengths, strict=True)):
        padded[s, :n] = tokens[a : a + n]
        mask[s, :n] = True
    return tokens, cu, padded, mask, gen


def _packed_pool(tokens, cu, normalize):
    return fastpool.pool(tokens, mode=MODES, cu_seqlens=cu, normalize=normalize, eps=EPS)


@pytest.mark.parametrize("normalize", [False, True])
def test_packed_transforms_match_the_padded_oracle(backend, normalize):
    tokens, cu, padded, mask, gen = _packed_and_padded(12)
    h, m = to_numpy(padded), np_mask(mask)
    g = torch.randn(3, 2 * len(MODES), generator=gen, dtype=torch.float64)
    got = grad(lambda x: (_packed_pool(x, cu, normalize) * g).sum())(tokens)
    want = expected_vjp(h, m, to_numpy(g), normalize)[mask.numpy()]  # the real tokens, in order
    _close(got, want)
    tangent = torch.randn(tokens.shape, generator=gen, dtype=torch.float64)
    t = np.zeros(h.shape)
    t[mask.numpy()] = to_numpy(tangent)
    _, out_dot = jvp(lambda x: _packed_pool(x, cu, normalize), (tokens,), (tangent,))
    _close(out_dot, expected_jvp(h, m, t, normalize))

    def few(x):
        return fastpool.pool(x, mode=FEW_MODES, cu_seqlens=cu, normalize=normalize, eps=EPS)

    torch.testing.assert_close(jacrev(few)(tokens), jacfwd(few)(tokens), **TOL)


@pytest.mark.parametrize("offsets_vmapped", [False, True])
def test_packed_vmap(backend, offsets_vmapped):
    tokens, cu, _, _, gen = _packed_and_padded(13)
    batch = torch.randn(3, *tokens.shape, generator=gen, dtype=torch.float64)
    offsets = (
        torch.stack([cu, torch.tensor([0, 6, 6, 6]), torch.tensor([0, 1, 3, 6])]) if offsets_vmapped else cu
    )

    def f(x, c):
        values, index = fastpool.max_pool(x, cu_seqlens=c, return_indices=True)
        return fastpool.pool(x, mode=["mean", "last"], cu_seqlens=c, normalize=True, eps=EPS), values, index

    out, values, index = vmap(f, in_dims=(0, 0 if offsets_vmapped else None))(batch, offsets)
    for v in range(3):
        c = (offsets[v] if offsets_vmapped else cu).numpy()
        x = to_numpy(batch[v])
        want = np.concatenate([oracle.packed_pool(x, c, m) for m in ("mean", "last")], axis=1)
        _close(out[v], normalized(want)[0])
        _close(values[v], oracle.packed_pool(x, c, "max"))
        assert index[v].tolist() == oracle.packed_max_index(x, c).tolist()


@pytest.mark.parametrize("offsets_vmapped", [False, True])
def test_packed_per_sample_gradients(backend, offsets_vmapped):
    tokens, cu, _, _, gen = _packed_and_padded(14)
    batch = torch.randn(2, *tokens.shape, generator=gen, dtype=torch.float64)
    offsets = torch.stack([cu, torch.tensor([0, 1, 5, 6])]) if offsets_vmapped else cu
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)

    def loss(x, c):
        return (fastpool.pool(x, mode=["max", "weighted_mean"], cu_seqlens=c) * g).sum()

    grads = vmap(grad(loss), in_dims=(0, 0 if offsets_vmapped else None))(batch, offsets)
    for v in range(2):
        c = (offsets[v] if offsets_vmapped else cu).numpy()
        x = to_numpy(batch[v])
        want = oracle.packed_pool_grad(x, c, "max", to_numpy(g[:, :2]))
        want = want + oracle.packed_pool_grad(x, c, "weighted_mean", to_numpy(g[:, 2:]))
        _close(grads[v], want)
