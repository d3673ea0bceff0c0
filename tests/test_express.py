"""Repeated calls (fastpool.express): a signature seen before launches the same kernel with the same
arguments as the general path, as integers, and gets the same bits; anything the signature does not
cover sends the call down the general path.

Express launches need a compiled launcher (``fast_launch.KernelLauncher.plan``). Under the
interpreter there is none, so these tests install a replaying one: it records the general path's
launches (tensors) and, for an express launch (data pointers as integers), maps every integer back
to a tensor -- the general launch's own at that position when the pointer is the same (placeholders,
workspaces), else the tensor whose ``data_ptr`` the express path read (its inputs and fresh outputs)
viewed as the general launch's dtype -- checks shapes and non-pointer arguments against the general
launch, and launches the kernel plainly. Results are compared with the general path's with
``torch.equal``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_mask

import fastpool
from fastpool import express, fast_launch, launch

EPOCH = 25  # the forward kernel's epoch argument: per launch when rows are split


class Replay:
    """Fake compiled launchers for every launch key the general path has launched with."""

    def __init__(self, monkeypatch):
        self.general: dict = {}  # key -> (kernel, args, constexprs, options) of its latest plain launch
        self.pointers: dict[int, torch.Tensor] = {}
        self.express_launches: list[str] = []
        original_call = fast_launch.KernelLauncher.__call__
        original_data_ptr = torch.Tensor.data_ptr
        replay = self

        def call(launcher, key, grid, args, constexprs, options):
            if key is not None:
                replay.general[key] = (launcher.kernel, args, constexprs, options)
            return original_call(launcher, key, grid, args, constexprs, options)

        def plan(launcher, key):
            if key not in replay.general:
                return None
            kernel, _, constexprs, _ = replay.general[key]
            tail = tuple(constexprs[p.name] for p in _params(kernel) if p.is_constexpr)
            return replay.launcher(key, len(tail)), ("head",), tail, _Driver()

        def data_ptr(tensor):
            pointer = original_data_ptr(tensor)
            replay.pointers[pointer] = tensor
            return pointer

        monkeypatch.setattr(fast_launch.KernelLauncher, "__call__", call)
        monkeypatch.setattr(fast_launch.KernelLauncher, "plan", plan)
        monkeypatch.setattr(torch.Tensor, "data_ptr", data_ptr)
        monkeypatch.setattr(fast_launch, "hooks_idle", lambda: True)
        monkeypatch.setattr(express, "hooks_idle", lambda: True)

    def launcher(self, key, n_tail: int):
        def launch(gx, gy, gz, stream, head, *arguments):
            assert head == "head" and stream == 0
            kernel, general, constexprs, options = self.general[key]
            args = arguments[: len(arguments) - n_tail]
            assert len(args) == len(general)
            assert arguments[len(args) :] == tuple(
                constexprs[p.name] for p in _params(kernel) if p.is_constexpr
            )
            tensors = []
            for position, (mine, theirs) in enumerate(zip(args, general, strict=True)):
                if isinstance(theirs, torch.Tensor):
                    assert type(mine) is int, position
                    tensors.append(self._tensor(mine, theirs, position))
                elif kernel.__name__ == "pool_forward_kernel" and position == EPOCH:
                    assert type(mine) is int and mine > 0
                    tensors.append(mine)
                else:
                    assert mine == theirs and type(mine) is type(theirs), position
                    tensors.append(mine)
            self.express_launches.append(kernel.__name__)
            kernel[(gx, gy, gz)](*tensors, **constexprs, **options)

        return launch

    def _tensor(self, pointer: int, general: torch.Tensor, position: int) -> torch.Tensor:
        if pointer == general.data_ptr():
            return general
        tensor = self.pointers[pointer]
        if tensor.dtype != general.dtype:  # the mask's integer view
            assert tensor.element_size() == general.element_size(), position
            tensor = tensor.view(general.dtype)
        assert tensor.shape == general.shape and tensor.stride() == general.stride(), position
        return tensor


def _params(kernel):
    return getattr(kernel, "params", None) or _jit(kernel).params


def _jit(kernel):
    from triton.runtime.jit import JITFunction

    return JITFunction(kernel.fn, do_not_specialize=kernel.kwargs.get("do_not_specialize"))


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, index):
        return 0


def general(fn):
    """fn() on the general path (no repeated-call shortcut)."""
    saved = express.pool
    express.pool = lambda *args: None
    try:
        return fn()
    finally:
        express.pool = saved


def inputs(device, dtype=torch.float32, mask_dtype=torch.int64, B=3, T=40, d=16, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=gen, dtype=torch.float32).to(dtype).to(device)
    mask = make_mask("holes", B, T, gen).to(mask_dtype).to(device) if mask_dtype else None
    return hidden.requires_grad_(grad), mask


MODES = ["mean", "max", ["mean", "max"], "cls", "last", "mean_sqrt_len", "weighted_mean"]


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float16, None], ids=str)
def test_inference_repeats_launch_the_general_arguments(replay, device, mode, mask_dtype):
    hidden, mask = inputs(device, mask_dtype=mask_dtype)
    fastpool.pool(hidden, mask, mode)  # first call: general, remembered
    assert len(express._calls) == 1
    for seed in (1, 2):
        hidden, mask = inputs(device, mask_dtype=mask_dtype, seed=seed)
        out = fastpool.pool(hidden, mask, mode)
        assert torch.equal(out, general(lambda h=hidden, m=mask: fastpool.pool(h, m, mode)))
    assert replay.express_launches == ["pool_forward_kernel"] * 2


@pytest.mark.parametrize("mode", ["mean", "max", ["mean", "max"], "cls", "last", "mean_sqrt_len"], ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, None], ids=str)
def test_training_repeats_launch_forward_and_backward_with_the_general_arguments(
    replay, device, mode, mask_dtype
):
    def step(seed):
        hidden, mask = inputs(device, mask_dtype=mask_dtype, seed=seed, grad=True)
        g = torch.randn(
            3, 16 * (2 if isinstance(mode, list) else 1), generator=torch.Generator().manual_seed(seed)
        )
        out = fastpool.pool(hidden, mask, mode)
        (grad,) = torch.autograd.grad(out, hidden, g.to(device))
        return out, grad

    step(0)  # general forward and backward, remembered
    step(1)  # express forward, general backward (its gradient signature is new), remembered
    assert replay.express_launches == ["pool_forward_kernel"]
    for seed in (2, 3):
        out, grad = step(seed)
        ref_out, ref_grad = general(lambda s=seed: step(s))
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert (
        replay.express_launches
        == ["pool_forward_kernel"] + ["pool_forward_kernel", "pool_backward_kernel"] * 2
    )


def test_split_rows_draw_a_new_epoch_every_launch(replay, device):
    """One long row (few programs for the GPU, so the row is split over several, with tickets; test
    overrides would send the call down the general path): each express launch tags a new epoch."""
    hidden, mask = inputs(device, B=1, T=1100, d=8)
    fastpool.pool(hidden, mask, "mean")
    (call,) = express._calls.values()
    assert call.tickets and call.grid[2] > 1
    epochs = []
    for seed in (1, 2):
        hidden, mask = inputs(device, B=1, T=1100, d=8, seed=seed)
        out = fastpool.pool(hidden, mask, "mean")
        epochs.append(launch._epoch)
        assert torch.equal(out, general(lambda h=hidden, m=mask: fastpool.pool(h, m, "mean")))
    assert epochs[0] != epochs[1]


def test_what_the_signature_holds_keeps_calls_apart(replay, device):
    hidden, mask = inputs(device)
    fastpool.mean_pool(hidden, mask)
    # Other strides, dtype, mask dtype, shape, modes, grad: each its own first call.
    others = [
        (hidden.transpose(0, 1).contiguous().transpose(0, 1), mask),
        (hidden.double(), mask),
        (hidden, mask.to(torch.int32)),
        (hidden[:, :30], mask[:, :30]),
        (hidden, None),
    ]
    for h, m in others:
        fastpool.mean_pool(h, m)
    fastpool.max_pool(hidden, mask)
    fastpool.mean_pool(hidden.detach().requires_grad_(), mask)
    assert len(express._calls) == 1 + len(others) + 2
    assert replay.express_launches == []


def test_misaligned_data_takes_the_general_path(replay, device):
    hidden, mask = inputs(device)
    fastpool.mean_pool(hidden, mask)
    storage = torch.randn(3 * 40 * 16 + 1, device=device)
    shifted = storage[1:].view(3, 40, 16)  # same shape and strides, 4 bytes off
    out = fastpool.mean_pool(shifted, mask)
    assert replay.express_launches == []
    assert torch.equal(out, general(lambda: fastpool.mean_pool(shifted, mask)))


def test_backend_choice_overrides_and_hooks_are_read_every_call(replay, device, monkeypatch):
    hidden, mask = inputs(device)
    fastpool.mean_pool(hidden, mask)
    with fastpool.use_backend("torch"):
        fastpool.mean_pool(hidden, mask)
    with launch.config_override(chunk=16):
        fastpool.mean_pool(hidden, mask)
    monkeypatch.setattr(express, "hooks_idle", lambda: False)
    fastpool.mean_pool(hidden, mask)
    assert replay.express_launches == []


def test_no_grad_and_inference_mode_use_the_inference_signature(replay, device):
    hidden, mask = inputs(device, grad=True)
    with torch.no_grad():
        fastpool.mean_pool(hidden, mask)
        out = fastpool.mean_pool(hidden, mask)
    assert out.grad_fn is None and replay.express_launches == ["pool_forward_kernel"]
    with torch.inference_mode():
        out = fastpool.mean_pool(hidden, mask)
    assert out.is_inference()
    out = fastpool.mean_pool(hidden, mask)  # a gradient wanted: a new signature
    assert out.grad_fn is not None and len(replay.express_launches) == 2


def test_unseen_gradient_layouts_second_order_and_transforms_take_the_general_backward(replay, device):
    def step(grad_out, create_graph=False):
        hidden, mask = inputs(device, grad=True)
        out = fastpool.mean_pool(hidden, mask)
        return torch.autograd.grad(out, hidden, grad_out, create_graph=create_graph)[0]

    g = torch.randn(16, 3, device=device).t()  # strided gradient
    step(g)
    step(g)  # express forward, general backward learns the strided gradient's plan
    reference = general(lambda: step(g))
    assert torch.equal(step(g), reference)
    assert replay.express_launches[-2:] == ["pool_forward_kernel", "pool_backward_kernel"]
    contiguous = g.contiguous()
    count = len(replay.express_launches)
    assert torch.equal(step(contiguous), reference)  # another gradient signature: general backward
    assert replay.express_launches[count:] == ["pool_forward_kernel"]
    second = step(contiguous.requires_grad_(), create_graph=True)
    assert second.requires_grad and torch.equal(second.detach(), reference)


def test_mask_modified_in_place_before_backward_raises_as_on_the_general_path(replay, device):
    hidden, mask = inputs(device, grad=True)
    fastpool.mean_pool(hidden, mask)
    out = fastpool.mean_pool(hidden, mask)
    assert replay.express_launches == ["pool_forward_kernel"]
    mask[0, 0] = 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_inputs_the_general_path_rejects_are_still_rejected(replay, device):
    hidden, mask = inputs(device)
    fastpool.mean_pool(hidden, mask)
    with pytest.raises(TypeError):
        fastpool.mean_pool(hidden.numpy() if device == "cpu" else hidden.cpu().numpy(), mask)
    with pytest.raises(ValueError):
        fastpool.mean_pool(hidden, mask[:, :5])
    with pytest.raises((ValueError, RuntimeError)):
        fastpool.mean_pool(torch.nested.nested_tensor([hidden[0], hidden[1, :3]]), None)
    assert replay.express_launches == []


def test_without_a_compiled_launcher_nothing_is_remembered(device):
    if device == "cuda":
        pytest.skip("CUDA launches have a compiled launcher")
    express.forget()
    hidden, mask = inputs(device)
    with fastpool.use_backend("triton"):
        fastpool.mean_pool(hidden, mask)
        fastpool.mean_pool(hidden, mask)
    assert express._calls == {}


def test_compiled_launches_repeat_with_the_same_bits(device):
    """On a GPU the compiled launchers are real: repeated calls go through express and match."""
    if device != "cuda":
        pytest.skip("needs compiled launchers (a GPU)")
    express.forget()
    for mode in ("mean", "max", ["mean", "max"], "last"):
        hidden, mask = inputs(device, dtype=torch.bfloat16, B=8, T=300, d=256, grad=True)
        g = torch.randn(8, 256 * (2 if isinstance(mode, list) else 1), device=device, dtype=torch.bfloat16)
        results = []
        for _ in range(3):
            out = fastpool.pool(hidden, mask, mode)
            results.append((out, torch.autograd.grad(out, hidden, g)[0]))
        ref_out = general(lambda h=hidden, m=mask, o=mode: fastpool.pool(h, m, o))
        ref_grad = general(
            lambda h=hidden, m=mask, o=mode, w=g: torch.autograd.grad(fastpool.pool(h, m, o), h, w)[0]
        )
        for out, grad in results:
            assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert len(express._calls) == 4
    assert all(call.backward_plan is not None for call in express._calls.values())


def test_is_grads_batched_after_an_express_forward_is_the_same_clear_error(replay, device):
    hidden, mask = inputs(device, grad=True)
    g = torch.randn(3, 16, device=device)
    for _ in range(2):  # the general call, then an express one whose backward plan is learned
        torch.autograd.grad(fastpool.mean_pool(hidden, mask), hidden, g)
    out = fastpool.mean_pool(hidden, mask)
    assert replay.express_launches == ["pool_forward_kernel"] * 2
    with pytest.raises(RuntimeError, match="is_grads_batched"):
        torch.autograd.grad(out, hidden, torch.randn(2, 3, 16, device=device), is_grads_batched=True)
