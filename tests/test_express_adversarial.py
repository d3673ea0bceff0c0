"""Adversarial cases of repeated calls (fastpool.express): calls whose signature was remembered but whose
state, tensors or autograd context differ from the remembered call in something the key does not hold.

Each case either takes the general path (no express launch) or launches the same kernel with the same
arguments (the replaying launcher of ``tests/test_express.py`` checks every integer against the general
path's launch) and returns the same bits, metadata and errors as the general path.
"""

from __future__ import annotations

import contextlib
import gc
import threading

import pytest
import torch
from helpers import make_mask
from test_express import Replay, general, inputs

import fastpool
from fastpool import express, fast_launch, launch, launchers

FWD, BWD = "pool_forward_kernel", "pool_backward_kernel"


def _grad(seed: int, cols: int = 16, B: int = 3) -> torch.Tensor:
    return torch.randn(B, cols, generator=torch.Generator().manual_seed(100 + seed))


def train(device, seed=0, mode="mean", mask_dtype=torch.int64, **kw):
    """(out, hidden grad) of one training step on fresh inputs."""
    hidden, mask = inputs(device, mask_dtype=mask_dtype, seed=seed, grad=True, **kw)
    out = fastpool.pool(hidden, mask, mode)
    (grad,) = torch.autograd.grad(out, hidden, _grad(seed, out.shape[1], out.shape[0]).to(device))
    return out, grad


def warm(device, **kw):
    """Two steps: the general one (remembered), then an express forward with the general backward (its
    gradient signature remembered). The next step is express in both directions."""
    train(device, seed=0, **kw)
    train(device, seed=1, **kw)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bits and the same metadata a caller can see."""
    return (
        torch.equal(a, b)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.requires_grad == b.requires_grad
        and (a.grad_fn is None) == (b.grad_fn is None)
        and a.is_inference() == b.is_inference()
    )


def offload():
    """Saved-tensor hooks that keep a contiguous copy, as ``save_on_cpu`` does for CUDA tensors (for CPU
    tensors it keeps the tensor itself)."""
    return torch.autograd.graph.saved_tensors_hooks(
        lambda t: t.clone(memory_format=torch.contiguous_format), lambda t: t
    )


@pytest.fixture
def launch_hooks(replay, monkeypatch):
    """A switch for 'a launch hook is installed' (a profiler), read by express and by the general path."""
    state = {"idle": True}
    monkeypatch.setattr(fast_launch, "hooks_idle", lambda: state["idle"])
    monkeypatch.setattr(express, "hooks_idle", lambda: state["idle"])
    return state


@pytest.fixture
def replay_from_env(monkeypatch, device):
    """The replaying launcher with the backend chosen by FASTPOOL_BACKEND (no use_backend block)."""
    if device == "cuda":
        pytest.skip("the replaying launcher stands in for the compiled one the interpreter lacks")
    express.forget()
    monkeypatch.setenv("FASTPOOL_BACKEND", "triton")
    yield Replay(monkeypatch)
    express.forget()


# --- what the backward checks at backward time ---------------------------------------------------------


def test_backward_with_a_launch_hook_installed_takes_the_general_path(launch_hooks, replay, device):
    """A profiler's launch hook installed between forward and backward must see the backward launch:
    the general path launches plainly (hooks called); a direct launch would bypass them."""
    warm(device)
    hidden, mask = inputs(device, seed=2, grad=True)
    out = fastpool.mean_pool(hidden, mask)
    assert replay.express_launches[-1:] == [FWD]
    count = len(replay.express_launches)
    launch_hooks["idle"] = False
    (grad,) = torch.autograd.grad(out, hidden, _grad(2).to(device))
    assert replay.express_launches[count:] == []
    launch_hooks["idle"] = True
    assert torch.equal(grad, general(lambda: train(device, seed=2))[1])


def test_backward_under_a_config_override_takes_the_general_path(replay, device):
    warm(device)
    hidden, mask = inputs(device, seed=2, grad=True)
    out = fastpool.mean_pool(hidden, mask)
    count = len(replay.express_launches)
    with launch.config_override(block_t=4, block_d=8):
        (grad,) = torch.autograd.grad(out, hidden, _grad(2).to(device))
    assert replay.express_launches[count:] == []
    assert torch.equal(grad, general(lambda: train(device, seed=2))[1])


def test_saved_tensor_hooks_that_copy_the_mask_are_honoured(replay, device):
    """Offloading hooks (``save_on_cpu``) keep a copy of the mask: the caller may then reuse the mask's
    memory (the next batch) before the backward, which must read the saved copy, not the forward's
    pointer. (Reused memory would be an illegal access on a GPU; here a changed mask shows it.)"""
    warm(device)

    def step(seed):
        hidden, mask = inputs(device, seed=seed, grad=True)
        with offload():
            out = fastpool.mean_pool(hidden, mask)
        mask.fill_(1)  # the buffer reused for the next batch
        return torch.autograd.grad(out, hidden, _grad(seed).to(device))[0]

    reference = general(lambda: step(2))
    assert torch.equal(step(2), reference)


@pytest.mark.parametrize("hook", ["copy", "restride"])
def test_a_backward_learned_from_a_mask_given_back_by_a_hook_is_not_used_for_the_forward_mask(
    replay, device, hook
):
    """The forward's mask is expanded (stride 0 over rows, one row of memory). A copying hook gives it
    back contiguous; another gives back the same memory with other strides (the buffer the expanded
    mask was cut from: same values). The backward learned from what a hook gave back must not be
    replayed with the forward's mask (reading three rows where there may be one: out of bounds on a
    GPU)."""
    gen = torch.Generator().manual_seed(0)
    buffer = make_mask("holes", 1, 40, gen).to(torch.int64).to(device).repeat(3, 1)
    hooks = {
        "copy": offload,
        "restride": lambda: torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t.as_strided((3, 40), (40, 1))
        ),
    }[hook]

    def step(seed, hooked):
        hidden, _ = inputs(device, seed=seed, grad=True)
        mask = buffer[:1].expand(3, 40)
        with hooks() if hooked else contextlib.nullcontext():
            out = fastpool.mean_pool(hidden, mask)
        return out, torch.autograd.grad(out, hidden, _grad(seed).to(device))[0]

    step(0, False)  # general, remembered
    step(1, True)  # express forward, general backward on what the hook gave back
    for seed in (2, 3):
        out, grad = step(seed, False)
        ref_out, ref_grad = general(lambda seed=seed: step(seed, False))
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert replay.express_launches[-2:] == [FWD, BWD]


def test_backward_in_another_thread_gives_the_same_bits(replay, device):
    warm(device)
    hidden, mask = inputs(device, seed=2, grad=True)
    out = fastpool.mean_pool(hidden, mask)
    result = {}

    def backward():
        result["grad"] = torch.autograd.grad(out, hidden, _grad(2).to(device))[0]

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join()
    assert replay.express_launches[-2:] == [FWD, BWD]
    assert torch.equal(result["grad"], general(lambda: train(device, seed=2))[1])


def test_retain_graph_backward_twice_gives_the_same_bits_and_errors(replay, device):
    train(device, seed=0)  # general, remembered

    def twice(seed):
        hidden, mask = inputs(device, seed=seed, grad=True)
        out = fastpool.mean_pool(hidden, mask)
        g = _grad(seed).to(device)
        first = torch.autograd.grad(out, hidden, g, retain_graph=True)[0]
        second = torch.autograd.grad(out, hidden, g)[0]
        with pytest.raises(RuntimeError) as error:
            torch.autograd.grad(out, hidden, g)
        return first, second, str(error.value)

    first, second, message = twice(1)  # express forward; general backward, then the learned one
    assert replay.express_launches == [FWD, BWD]
    ref_first, ref_second, ref_message = general(lambda: twice(1))
    assert torch.equal(first, ref_first) and torch.equal(second, ref_second) and message == ref_message


def test_create_graph_backward_after_the_plan_is_learned_is_the_general_one(replay, device):
    warm(device)
    hidden, mask = inputs(device, seed=2, grad=True)
    out = fastpool.mean_pool(hidden, mask)
    g = _grad(2).to(device).requires_grad_()
    count = len(replay.express_launches)
    (grad,) = torch.autograd.grad(out, hidden, g, create_graph=True)
    assert replay.express_launches[count:] == [] and grad.requires_grad
    (gg,) = torch.autograd.grad(grad.sum(), g)  # the backward of the backward: a pooling of ones
    ref = general(
        lambda: torch.autograd.grad(fastpool.mean_pool(hidden, mask), hidden, g, create_graph=True)[0]
    )
    assert torch.equal(grad.detach(), ref.detach())
    assert torch.equal(gg, torch.autograd.grad(ref.sum(), g)[0])


def test_backward_after_the_caches_are_dropped(replay, device, monkeypatch):
    """express.forget(), the _LIMIT clear and the general path's own cache clears between a forward and
    its backward: the in-flight call keeps what it launches with."""
    monkeypatch.setattr(express, "_LIMIT", 1)
    warm(device)
    hidden, mask = inputs(device, seed=2, grad=True)
    out = fastpool.mean_pool(hidden, mask)
    express.forget()
    launchers._repeat_calls.clear()
    launchers._backward_calls.clear()
    gc.collect()
    (grad,) = torch.autograd.grad(out, hidden, _grad(2).to(device))
    assert replay.express_launches[-2:] == [FWD, BWD]
    ref_out, ref_grad = general(lambda: train(device, seed=2))
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    # Another signature evicts the first (_LIMIT 1): the first is then a first call again.
    fastpool.max_pool(hidden.detach(), mask)
    fastpool.max_pool(hidden.detach(), mask)
    count = len(replay.express_launches)
    assert torch.equal(train(device, seed=3)[1], general(lambda: train(device, seed=3))[1])
    assert replay.express_launches[count:] == [] and len(express._calls) == 1


def test_hidden_freed_before_backward(replay, device):
    warm(device)
    leaf, mask = inputs(device, seed=2, grad=True)
    hidden = leaf * 1  # a non-leaf nobody else holds
    out = fastpool.mean_pool(hidden, mask)
    del hidden
    gc.collect()
    (grad,) = torch.autograd.grad(out, leaf, _grad(2).to(device))
    assert replay.express_launches[-2:] == [FWD, BWD]
    assert torch.equal(grad, general(lambda: train(device, seed=2))[1])


def test_batched_gradients_fail_as_on_the_general_path(replay, device):
    """``is_grads_batched`` runs the backward under the legacy vmap (not a torch.func transform): the
    general backward cannot take batched tensors; the express one must fail the same way, not launch."""

    def batched(seed):
        hidden, mask = inputs(device, seed=seed, grad=True)
        out = fastpool.mean_pool(hidden, mask)
        with pytest.raises(RuntimeError) as error:
            torch.autograd.grad(out, hidden, torch.randn(2, 3, 16, device=device), is_grads_batched=True)
        return str(error.value)

    warm(device)
    count = len(replay.express_launches)
    assert batched(2) == general(lambda: batched(2))
    assert replay.express_launches[count:] == [FWD]


def test_a_vmapped_backward_of_an_express_forward_is_the_general_one(replay, device):
    """torch.func.vmap over autograd.grad (rows of a Jacobian) after a plain forward: the backward sees
    batched gradients, which have no data pointer; nothing may be learned or launched from them."""

    def rows(seed):
        hidden, mask = inputs(device, seed=seed, grad=True)
        out = fastpool.mean_pool(hidden, mask)
        vectors = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(seed)).to(device)
        return torch.func.vmap(lambda g: torch.autograd.grad(out, hidden, g, retain_graph=True)[0])(vectors)

    rows(0)
    assert torch.equal(rows(1), general(lambda: rows(1)))  # express forward, its first backward
    assert replay.express_launches == [FWD]
    warm(device)
    assert torch.equal(rows(2), general(lambda: rows(2)))  # with the plain gradient's plan learned
    assert replay.express_launches[-1:] == [FWD]


def test_checkpointed_recomputation_gives_the_same_gradient(replay, device):
    from torch.utils.checkpoint import checkpoint

    def step(seed, reentrant):
        hidden, mask = inputs(device, seed=seed, grad=True)
        out = checkpoint(fastpool.mean_pool, hidden * 2, mask, use_reentrant=reentrant)
        out.backward(_grad(seed).to(device))
        return hidden.grad

    for reentrant in (False, True):
        step(0, reentrant)
        step(1, reentrant)
        assert torch.equal(step(2, reentrant), general(lambda reentrant=reentrant: step(2, reentrant)))
    assert BWD in replay.express_launches


# --- what the forward checks at call time --------------------------------------------------------------


def test_auto_backend_on_cpu_tensors_is_the_eager_backend(replay_from_env, device, monkeypatch):
    """A signature remembered under FASTPOOL_BACKEND=triton: with the variable changed (or unset: auto,
    which picks the eager backend for CPU tensors) the call takes that backend, not the kernel."""
    hidden, mask = inputs(device)
    fastpool.mean_pool(hidden, mask)
    fastpool.mean_pool(hidden, mask)
    assert replay_from_env.express_launches == [FWD]
    for value in ("torch", "auto", None):
        if value is None:
            monkeypatch.delenv("FASTPOOL_BACKEND")
        else:
            monkeypatch.setenv("FASTPOOL_BACKEND", value)
        out = fastpool.mean_pool(hidden, mask)
        with fastpool.use_backend("torch"):
            assert torch.equal(out, fastpool.mean_pool(hidden, mask))
    assert replay_from_env.express_launches == [FWD]


def test_an_invalid_backend_variable_raises_as_on_the_general_path(replay_from_env, device, monkeypatch):
    hidden, mask = inputs(device)
    fastpool.mean_pool(hidden, mask)
    monkeypatch.setenv("FASTPOOL_BACKEND", "cuda")
    with pytest.raises(ValueError) as express_error:
        fastpool.mean_pool(hidden, mask)
    with pytest.raises(ValueError) as general_error:
        general(lambda: fastpool.mean_pool(hidden, mask))
    assert str(express_error.value) == str(general_error.value)
    assert replay_from_env.express_launches == []


def test_negative_view_masks_take_the_general_path_and_are_read_as_their_values(replay, device):
    """A float mask with the negative bit (``x.conj().imag``, ``torch._neg_view``) has the signature of a
    plain float mask; the general path resolves it (its nonzero pattern is that of its values)."""
    hidden, mask = inputs(device, mask_dtype=torch.float32)
    fastpool.mean_pool(hidden, mask)
    negative = torch._neg_view(mask)
    out = fastpool.mean_pool(hidden, negative)
    assert replay.express_launches == []
    assert same(out, general(lambda: fastpool.mean_pool(hidden, negative.resolve_neg())))


def test_negative_view_hidden_takes_the_general_path_and_is_read_as_its_values(replay, device):
    """hidden with the negative bit: its memory holds -x; express leaves it to the general path, which
    pools the values (a copy of that view only)."""
    hidden, mask = inputs(device)
    fastpool.mean_pool(hidden, mask)
    negative = torch._neg_view(hidden)
    out = fastpool.mean_pool(negative, mask)
    assert replay.express_launches == []
    assert same(out, general(lambda: fastpool.mean_pool(-hidden, mask)))
    assert not same(out, general(lambda: fastpool.mean_pool(hidden, mask)))


def test_inference_tensors_give_what_the_general_path_gives(replay, device):
    with torch.inference_mode():
        hidden, mask = inputs(device)
    fastpool.mean_pool(hidden, mask)
    out = fastpool.mean_pool(hidden, mask)
    assert replay.express_launches == [FWD]
    assert same(out, general(lambda: fastpool.mean_pool(hidden, mask)))


def test_an_inference_mask_in_a_training_call_fails_as_on_the_general_path(replay, device):
    warm(device)
    hidden, _ = inputs(device, seed=2, grad=True)
    with torch.inference_mode():
        _, mask = inputs(device, seed=2)
    with pytest.raises(RuntimeError) as express_error:
        fastpool.mean_pool(hidden, mask)
    with pytest.raises(RuntimeError) as general_error:
        general(lambda: fastpool.mean_pool(hidden, mask))
    assert str(express_error.value) == str(general_error.value)


def test_subclass_tensors_take_the_general_path(replay, device):
    hidden, mask = inputs(device, grad=True)
    fastpool.mean_pool(hidden, mask)
    parameter = torch.nn.Parameter(hidden.detach().clone())
    out = fastpool.mean_pool(parameter, mask)
    assert replay.express_launches == [] and all(type(k[1]) is torch.Size for k in express._calls)
    assert same(out, general(lambda: fastpool.mean_pool(parameter, mask)))


def test_a_mask_that_requires_grad(replay, device):
    def step(seed):
        hidden, mask = inputs(device, seed=seed, grad=True, mask_dtype=torch.float32)
        mask.requires_grad_()
        out = fastpool.mean_pool(hidden, mask)
        return out, *torch.autograd.grad(out, [hidden, mask], _grad(seed).to(device), allow_unused=True)

    step(0)
    step(1)
    out, grad, mask_grad = step(2)
    ref_out, ref_grad, ref_mask_grad = general(lambda: step(2))
    assert replay.express_launches[-2:] == [FWD, BWD]
    assert same(out, ref_out) and torch.equal(grad, ref_grad) and mask_grad is None and ref_mask_grad is None


def test_grad_mode_flips_between_calls(replay, device):
    """The signature's 'gradient wanted' flips with grad mode: each mode keeps its own remembered call."""
    hidden, mask = inputs(device, grad=True)
    with torch.no_grad():
        fastpool.mean_pool(hidden, mask)
    out = fastpool.mean_pool(hidden, mask)  # a first training call
    assert out.grad_fn is not None and replay.express_launches == []
    with torch.no_grad():
        inference = fastpool.mean_pool(hidden, mask)
    with torch.enable_grad():
        training = fastpool.mean_pool(hidden, mask)
    assert replay.express_launches == [FWD, FWD]
    assert inference.grad_fn is None and not inference.requires_grad
    assert training.grad_fn is not None and training.requires_grad
    assert torch.equal(inference, training)


# --- layouts the key covers by strides alone ------------------------------------------------------------


def _layouts(device):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(3 * 40 * 16 + 8, generator=gen).to(device)
    row = make_mask("holes", 3, 40, gen).to(torch.int64).to(device)
    return {
        "offset-aligned": (base[4 : 4 + 3 * 40 * 16].view(3, 40, 16), row),
        "expanded-hidden": (base[: 40 * 16].view(1, 40, 16).expand(3, 40, 16), row),
        "overlapping-hidden": (base.as_strided((3, 40, 16), (16, 16, 1)), row),
        "expanded-mask": (base[: 3 * 40 * 16].view(3, 40, 16), row[:1].expand(3, 40)),
        "transposed-mask": (base[: 3 * 40 * 16].view(3, 40, 16), row.t().contiguous().t()),
        "feature-strided": (base[: 3 * 40 * 16].view(3, 16, 40).transpose(1, 2), row.bool()),
    }


@pytest.mark.parametrize(
    "layout",
    [
        "offset-aligned",
        "expanded-hidden",
        "overlapping-hidden",
        "expanded-mask",
        "transposed-mask",
        "feature-strided",
    ],
)
def test_layouts_repeat_with_the_same_bits(replay, device, layout):
    hidden, mask = _layouts(device)[layout]
    fastpool.pool(hidden, mask, ["mean", "max"])
    out = fastpool.pool(hidden, mask, ["mean", "max"])
    assert replay.express_launches == [FWD]
    assert same(out, general(lambda: fastpool.pool(hidden, mask, ["mean", "max"])))
    leaf = hidden.detach().requires_grad_()
    for _ in range(3):
        out = fastpool.pool(leaf, mask, ["mean", "max"])
        (grad,) = torch.autograd.grad(out, leaf, _grad(0, 32).to(device))
    assert replay.express_launches[-2:] == [FWD, BWD]
    ref = general(lambda: torch.autograd.grad(fastpool.pool(leaf, mask, ["mean", "max"]), leaf, _grad(0, 32)))
    assert torch.equal(grad, ref[0])


def test_a_mask_sharing_memory_with_another_layout_is_its_own_signature(replay, device):
    """Same pointer, other strides (a mask over one row's memory): the strides are in the key."""
    hidden, mask = _layouts(device)["expanded-mask"]
    fastpool.mean_pool(hidden, mask)
    full = mask[:1].expand(3, 40).clone()
    out = fastpool.mean_pool(hidden, full)
    assert replay.express_launches == []
    assert torch.equal(out, general(lambda: fastpool.mean_pool(hidden, full)))


# --- empty dimensions and long rows -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 5, 8), (2, 5, 0)], ids=str)
@pytest.mark.parametrize("mode", ["mean", "max"])
def test_empty_dimensions(replay, device, shape, mode):
    B, T, d = shape

    def step():
        hidden = torch.randn(B, T, d, device=device, requires_grad=True)
        mask = torch.ones(B, T, dtype=torch.int64, device=device)
        out = fastpool.pool(hidden, mask, mode)
        with torch.no_grad():
            inference = fastpool.pool(hidden, mask, mode)
        (grad,) = torch.autograd.grad(out, hidden, torch.randn(B, d, device=device))
        return out, inference, grad

    results = [step() for _ in range(3)]
    ref = general(step)
    for result in results:
        assert all(same(a, b) for a, b in zip(result, ref, strict=True))
    # A general path without a repeatable launch (no row or no feature) is never remembered.
    assert bool(express._calls) == (B > 0 and d > 0)
    assert set(replay.express_launches) <= {FWD}


def test_split_rows_training(replay, device):
    """A long row over several programs (tickets): forward and backward repeat with a new epoch."""
    kw = dict(B=1, T=1100, d=8)
    train(device, seed=0, **kw)
    (call,) = express._calls.values()
    assert call.tickets, "this grid keeps every row in one program"
    train(device, seed=1, **kw)
    out, grad = train(device, seed=2, **kw)
    ref_out, ref_grad = general(lambda: train(device, seed=2, **kw))
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert replay.express_launches[-2:] == [FWD, BWD]


# --- torch.compile --------------------------------------------------------------------------------------


def test_compiled_calls_do_not_guard_on_express_state(device):
    """A compiled graph neither traces nor guards on what express remembered: a change of that state
    between calls recompiles nothing."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    express.forget()
    fn = torch.compile(lambda h, m: fastpool.mean_pool(h, m), backend=counter, fullgraph=True)
    hidden, mask = inputs(device)
    try:
        # Settle the backend module's own caches (its first traced calls fill them: a recompile each).
        fastpool.mean_pool(hidden, mask)
        for _ in range(3):
            fn(hidden, mask)
        settled = counter.frame_count
        express._cpu_signatures = not express._cpu_signatures
        express._calls[("sentinel",)] = None
        fn(hidden, mask)
    finally:
        express.forget()
        torch._dynamo.reset()
    assert counter.frame_count == settled
