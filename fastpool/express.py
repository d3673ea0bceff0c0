"""Repeated calls: a padded pooling call whose signature has been validated and planned before.

Serving loops and training steps call fastpool with the same shapes, strides, dtypes and modes again
and again. The first call of a signature takes the general path (validation, backend choice, launch
planning; Triton's own launch the first time). ``learn`` then records an ``ExpressCall`` for it when
that launch can be repeated as it is: the Triton backend, the call's device current, a compiled
launcher to call directly (``fastpool.fast_launch``), and one output to return (no user weights, no
normalisation, no returned indices). A later call with the same signature (``pool``) checks only
what the signature does not hold -- the backend selection, grad mode, torch.func / forward-mode AD /
compile state, test overrides and launch hooks, the current device and stream, negative bits of
hidden and the mask, 16-byte alignment of the data pointers -- then allocates its output and launches,
passing the data pointers as integers. Anything else, and every first call, returns None and the
caller takes the general path.

The signature key holds everything the general path validates and plans on: modes, and for hidden
and the mask their shape, strides, dtype, device and layout, plus whether a gradient is wanted. A
training call goes through ``ExpressPoolFunction``, whose backward launches the backward kernel the
same way once the general backward has run for that gradient's signature (when it reads the forward's
own mask, with no launch hook or override installed), and otherwise *is* the general slim backward
(``ops.SlimPoolFunction``). Same kernels, same arguments, same bits as the general path
(``tests/test_express.py`` compares the argument lists and replays them).

Host cost (``../shared/tools/hostcost``, 64x512x1024 bf16, int64 mask): see bench/NOTES.md v2.2.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from . import launchers, ops
from .backend import requested_backend
from .fast_launch import aligned, hooks_idle
from .launch import cuda_index, empty, has_overrides, next_epoch, placeholder

_Tensor = torch.Tensor
_is_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_LIMIT = 256
_calls: dict[tuple, ExpressCall] = {}
# Whether a CPU signature was ever remembered: only where a compiled launcher takes CPU tensors (the
# host-cost harness's stub driver).
_cpu_signatures = False


def _signature(hidden: torch.Tensor, mask: torch.Tensor | None, modes: str) -> tuple:
    """The key of a call: hidden's and the mask's shape, strides, dtype, device and layout, the modes
    and whether a gradient is wanted (raises RuntimeError where strides do not exist: nested)."""
    wants = hidden.requires_grad and _is_grad_enabled()
    head = (modes, hidden.shape, hidden.stride(), hidden.dtype, hidden.device, hidden.layout, wants)
    if mask is None:
        return head
    return (*head, mask.shape, mask.stride(), mask.dtype, mask.device, mask.layout)


def _general_state(hidden: torch.Tensor) -> bool:
    """Whether this call must take the general path whatever its signature: the torch backend chosen
    (or auto, for a CPU tensor), a torch.func transform, forward-mode AD, test overrides or launch
    hooks (compiling: tested first)."""
    backend = requested_backend()
    return (
        backend == "torch"
        or (backend == "auto" and not hidden.is_cuda)
        or _functorch_active()
        or forward_ad._current_level >= 0
        or has_overrides()
        or not hooks_idle()
    )


def pool(hidden: object, mask: object, modes: str) -> torch.Tensor | None:
    """``fastpool.pool(hidden, mask, modes)`` for a repeated signature: out (B, n_modes * d) in
    hidden's dtype, or None when the call must take the general path.

    hidden (B, T, d) and mask (B, T) or None, any dtypes and strides the general path accepts; modes
    comma-separated. No user weights, normalisation or returned indices (the caller checks)."""
    if type(hidden) is not _Tensor or (mask is not None and type(mask) is not _Tensor):
        return None
    # Compiling first: torch.compile must neither trace the key nor guard on this module's state. CPU
    # tensors have no compiled launcher (outside the host-cost harness).
    if _is_compiling() or not (hidden.is_cuda or _cpu_signatures):
        return None
    try:
        call = _calls.get(_signature(hidden, mask, modes))
    except RuntimeError:  # no strides (nested): the general path says why
        return None
    # A tensor with the negative bit (x.conj().imag) has the signature of a plain one, but its memory
    # holds -x: the general path resolves it (packed.resolve_negative).
    if call is None or _general_state(hidden) or hidden.is_neg() or (mask is not None and mask.is_neg()):
        return None
    hidden_ptr = hidden.data_ptr()
    mask_ptr = call.no_mask if mask is None else mask.data_ptr()
    if (hidden_ptr | mask_ptr) & 15 or not call.on_current_stream():
        return None
    if call.training:
        return _apply(hidden, mask, call, hidden_ptr, mask_ptr)
    return call.forward(hidden, hidden_ptr, mask_ptr)[0]


def learn(hidden: torch.Tensor, mask: torch.Tensor | None, modes: str) -> None:
    """After a general call with these arguments on the Triton backend: remember its signature when
    the launch it planned can be repeated by ``pool``."""
    if _is_compiling() or type(hidden) is not _Tensor or (mask is not None and type(mask) is not _Tensor):
        return
    signature = _signature(hidden, mask, modes)
    if signature in _calls:  # remembered already; this call missed for a reason of its own
        return
    if _general_state(hidden) or not aligned(hidden) or (mask is not None and not aligned(mask)):
        return
    index = cuda_index(hidden.device)
    if index is not None and index != torch.cuda.current_device():
        return
    wants = signature[6]
    repeat = launchers.repeat_call(
        hidden, mask, modes, track_positions=wants, lean=not wants, for_backward=wants
    )
    if repeat is None:
        return
    plan = launchers.forward_launcher().plan(repeat.key)
    if plan is None:
        return
    global _cpu_signatures
    if len(_calls) >= _LIMIT:
        _calls.clear()
    _calls[signature] = ExpressCall(repeat, plan, modes, hidden.shape[1], wants, mask)
    _cpu_signatures = _cpu_signatures or not hidden.is_cuda


def forget() -> None:
    """Drop every remembered signature (tests)."""
    global _cpu_signatures
    _calls.clear()
    _cpu_signatures = False


def _pointer(value):
    return value.data_ptr() if isinstance(value, torch.Tensor) else value


class ExpressCall:
    """One remembered signature: the general path's ``launchers.RepeatCall`` (which keeps its
    workspaces and placeholders alive), its compiled launcher, the forward's argument list as
    integers around the per-call entries, and the backward's once a backward has run."""

    __slots__ = (
        "repeat", "launch", "head", "device", "index", "stream", "driver", "grid", "shape", "argmax_shape",
        "stats_shape", "no_mask", "rest", "tickets", "training", "spec", "T", "dtype", "backward_plan",
        "empty_int", "empty_acc", "mask_layout",
    )  # fmt: skip

    def __init__(self, repeat, plan, modes: str, T: int, training: bool, mask):
        launch, head, tail, driver = plan
        self.repeat, self.launch, self.head, self.driver = repeat, launch, head, driver
        self.device, self.grid, self.training = repeat.device, repeat.grid, training
        self.index = driver.get_current_device()
        self.stream = driver.get_current_stream(self.index)
        self.shape, self.argmax_shape, self.stats_shape = tuple(repeat.shape), repeat.argmax_shape, None
        if training:
            self.stats_shape = tuple(repeat.stats.shape)
        self.no_mask = repeat.stats.data_ptr()  # never read without a mask (HAS_MASK is a constexpr)
        self.tickets = repeat.tickets
        # Arguments 5 to 24, then 26 on (epoch, argument 25, is per call when rows are split; the
        # normalisation floor, argument 40, is -1.0: off), then the constexprs.
        parts = repeat.parts
        if repeat.plan.has_weights:  # not remembered by learn (user weights take the general path)
            raise ValueError("ExpressCall: user weights take the general path")
        middle, after, rest = parts
        self.rest = (
            tuple(map(_pointer, middle[1:])),
            (*map(_pointer, after), -1.0, *map(_pointer, rest), *tail),
        )
        self.spec = (modes, "triton", -1.0, True, True)  # what the slim backward reads (ops._slim_path)
        self.T, self.dtype = T, repeat.dtype
        self.backward_plan = None
        self.empty_int = empty(self.device, torch.int32)
        self.empty_acc = empty(self.device, repeat.plan.acc)
        # What the backward's direct launch reads the mask as (its pointer is the forward's).
        self.mask_layout = None if mask is None else (mask.stride(), mask.dtype)

    def on_current_stream(self) -> bool:
        """Whether the current device and stream are those the signature was planned on (workspaces
        are per stream; the launch goes to the current stream)."""
        driver = self.driver
        index = driver.get_current_device()
        return index == self.index and driver.get_current_stream(index) == self.stream

    def forward(self, hidden: torch.Tensor, hidden_ptr: int, mask_ptr: int) -> tuple:
        """(out, argmax or None, stats or None): one launch; argmax and stats are allocated only for a
        training call (an inference call's statistics go to the stream's workspace)."""
        # Sizes as separate ints (see launchers.RepeatCall.launch).
        out = hidden.new_empty(*self.shape)
        argmax = stats = None
        placeholder_int = self.no_mask
        if self.training:
            stats = torch.empty(*self.stats_shape, dtype=torch.int32, device=self.device)
            stats_ptr = stats.data_ptr()
            if self.argmax_shape is not None:
                argmax = torch.empty(*self.argmax_shape, dtype=torch.int32, device=self.device)
        else:
            stats_ptr = placeholder_int  # the workspace statistics of the first call
        argmax_ptr = placeholder_int if argmax is None else argmax.data_ptr()
        middle, rest = self.rest
        grid = self.grid
        self.launch(
            grid[0], grid[1], grid[2], self.stream, *self.head, hidden_ptr, mask_ptr, out.data_ptr(),
            argmax_ptr, stats_ptr, *middle, next_epoch() if self.tickets else 1, *rest,
        )  # fmt: skip
        return out, argmax, stats


class ExpressPoolFunction(torch.autograd.Function):
    """The training call of a remembered signature: forward ``ExpressCall.forward``; backward one
    direct launch when the gradient's signature has been seen, else the general slim backward."""

    @staticmethod
    def forward(ctx, hidden, mask, call, hidden_ptr, mask_ptr):
        out, argmax, stats = call.forward(hidden, hidden_ptr, mask_ptr)
        ctx.save_for_backward(mask)
        ctx.express = (call, argmax, stats, mask_ptr)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ops.check_not_legacy_batched(grad_out)
        (mask,) = ctx.saved_tensors
        call, argmax, stats, mask_ptr = ctx.express
        plan = call.backward_plan
        # A direct launch (or learning one) only for a first-order backward (no graph, no torch.func:
        # batched gradients have no data pointer) on the forward's device and stream, without launch
        # hooks or overrides, that reads the forward's own mask: saved-tensor hooks (offloading) may
        # give back a copy, with memory and strides of its own.
        direct = (
            not _is_grad_enabled()
            and not _functorch_active()
            and call.on_current_stream()
            and (
                mask is None
                or (mask.data_ptr() == mask_ptr and (mask.stride(), mask.dtype) == call.mask_layout)
            )
            and not has_overrides()
            and hooks_idle()
        )
        if (
            direct
            and plan is not None
            and grad_out.dtype is plan.grad_dtype
            and grad_out.stride() == plan.grad_strides
        ):
            grad_ptr = grad_out.data_ptr()
            if not grad_ptr & 15:
                return plan.run(call, grad_out, grad_ptr, mask_ptr, argmax, stats), None, None, None, None
        grad = _general_backward(ctx, call, mask, argmax, stats, grad_out)
        if direct and plan is None:
            call.backward_plan = BackwardPlan.learn(call, grad_out, mask, stats)
        return grad, None, None, None, None


_apply = super(torch.autograd.Function, ExpressPoolFunction).apply


class _SlimContext:
    """What ``ops.SlimPoolFunction.backward`` reads from its ctx, for the general backward of an
    express call (second order, torch.func, a gradient signature not seen yet)."""

    def __init__(self, ctx, call: ExpressCall, mask, argmax, stats):
        self.needs_input_grad = (ctx.needs_input_grad[0], False, False)
        self.saved_tensors = (mask, None, None)
        argmax = call.empty_int if argmax is None else argmax
        self.kept = (argmax, stats, call.empty_acc, call.empty_acc, call.empty_int)
        self.spec, self.T, self.dtype = call.spec, call.T, call.dtype


def _general_backward(ctx, call: ExpressCall, mask, argmax, stats, grad_out) -> torch.Tensor | None:
    return ops.SlimPoolFunction.backward(_SlimContext(ctx, call, mask, argmax, stats), grad_out)[0]


class BackwardPlan:
    """The backward launch of an express signature for one gradient signature (dtype and strides of
    grad_out): ``launchers.BackwardCall``'s arguments as integers around the per-call entries."""

    __slots__ = (
        "grad_dtype", "grad_strides", "shape", "launch", "head", "grid", "tail", "has_max", "dummy", "kept",
    )  # fmt: skip

    @classmethod
    def learn(cls, call: ExpressCall, grad_out, mask, stats) -> BackwardPlan | None:
        """The plan of the backward the general path has just launched for ``grad_out``, when it has a
        compiled launcher to call directly; else None (every backward then takes the general path)."""
        if grad_out.data_ptr() & 15 or has_overrides() or not hooks_idle():
            return None
        repeat = launchers.backward_call(grad_out, mask, call.spec[0], stats.shape[1], call.T, call.dtype)
        if repeat is None or repeat.grid is None or not repeat.same_dtype:
            return None
        plan = repeat.launcher.plan(repeat.key)
        if plan is None:
            return None
        self = cls()
        launch, head, tail, _ = plan
        self.grad_dtype, self.grad_strides, self.shape = grad_out.dtype, grad_out.stride(), repeat.shape
        self.launch, self.head, self.grid = launch, head, repeat.grid
        self.tail = (*repeat.tail, *tail)
        self.has_max = repeat.slots["max"] >= 0
        # The acc-dtype placeholder the general backward passes for the weights and their sums, kept
        # alive here: only its address goes to the launches.
        self.kept = placeholder(repeat.device, call.repeat.plan.acc)
        self.dummy = self.kept.data_ptr()
        return self

    def run(self, call: ExpressCall, grad_out, grad_ptr: int, mask_ptr: int, argmax, stats) -> torch.Tensor:
        """The hidden gradient (B, T, d) in grad_out's dtype (= hidden's): one launch."""
        grad = grad_out.new_empty(*self.shape)
        stats_ptr = stats.data_ptr()
        dummy, grid = self.dummy, self.grid
        self.launch(
            grid[0], grid[1], grid[2], call.stream, *self.head, grad_ptr, mask_ptr,
            argmax.data_ptr() if self.has_max else stats_ptr, stats_ptr, stats_ptr, dummy, dummy,
            grad.data_ptr(), *self.tail,
        )  # fmt: skip
        return grad
