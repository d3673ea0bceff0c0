"""The launch fast path (fastpool.fast_launch): its keys cover what Triton specialises on, and it falls
back to the plain launch wherever Triton is not what it expects (the interpreter, unusual kernels).

The fast path itself runs against Triton's real JIT and launcher in the host-cost tool and on GPUs;
here every launch takes the plain path (the interpreter), which these tests check too.
"""

import pytest
import torch
from fastpool.kernels import pool_backward, pool_forward

import fastpool
from fastpool import fast_launch, launchers


def triton_specialization(value: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(CUDABackend(GPUTarget("cuda", 90, 32)), value, False, True, True)


@pytest.mark.parametrize(
    "value", [0, 1, 2, 3, 15, 16, 17, 32, 48, -1, -16, 2**31 - 1, 2**31, 2**31 + 16, 2**40, -(2**31)]
)
def test_integer_specialisation_keys_separate_what_triton_separates(value):
    """Two values with the same fastpool key get the same Triton specialisation."""
    others = [0, 1, 2, 16, 17, 2**31, 2**31 + 16, 2**40 + 3]
    for other in others:
        if fast_launch.specialization(other) == fast_launch.specialization(value):
            assert triton_specialization(other) == triton_specialization(value), (value, other)


def specialised_integers(kernel) -> set[str]:
    """Parameters Triton specialises on by value: not constexpr, not do_not_specialize, not pointers
    (nor the float normalize_eps, which Triton never specialises)."""
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):  # the interpreter's wrapper: rebuild the JIT function
        kernel = JITFunction(kernel.fn, do_not_specialize=kernel.kwargs["do_not_specialize"])
    return {
        p.name
        for p in kernel.params
        if not p.is_constexpr and not p.do_not_specialize and not p.name.endswith("_ptr")
    }


@pytest.mark.parametrize(
    "kernel,keyed",
    [
        (pool_forward.pool_forward_kernel, launchers.FORWARD_SPECIALIZED),
        (pool_backward.pool_backward_kernel, launchers.BACKWARD_SPECIALIZED),
    ],
    ids=["forward", "backward"],
)
def test_launch_keys_cover_every_specialised_integer(kernel, keyed):
    assert specialised_integers(kernel) == set(keyed)


def test_the_interpreter_takes_the_plain_path_and_caches_nothing(device):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 9, 5, generator=gen).to(device)
    launcher = launchers.forward_launcher()
    launcher.clear()
    with fastpool.use_backend("triton"):
        first = fastpool.mean_pool(hidden)
        second = fastpool.mean_pool(hidden)
    with fastpool.use_backend("torch"):
        want = fastpool.mean_pool(hidden)
    torch.testing.assert_close(first, want)
    assert torch.equal(first, second)
    if device == "cpu":
        assert launcher._plans == {}


def test_kernels_with_a_constexpr_before_an_ordinary_argument_are_not_fast_launched():
    from triton.runtime.jit import JITFunction

    def constexpr_last(x_ptr, n, BLOCK: "tl.constexpr"):  # noqa: F821
        pass

    def constexpr_first(x_ptr, BLOCK: "tl.constexpr", n):  # noqa: F821
        pass

    assert fast_launch.kernel_supported(JITFunction(constexpr_last))
    assert not fast_launch.kernel_supported(JITFunction(constexpr_first))
    assert not fast_launch.kernel_supported(object())
    assert not fast_launch.compiled_supported(object())


def test_launch_hooks_send_every_launch_down_the_plain_path():
    from triton import knobs

    assert fast_launch.hooks_idle()
    hook = lambda *args: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not fast_launch.hooks_idle()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert fast_launch.hooks_idle()


def test_the_installed_launcher_takes_data_pointers_as_integers():
    """fastpool.express passes every pointer argument as its data pointer (an int): the NVIDIA
    launcher's getPointer must accept a Python int as the address itself (it does in 3.2 to 3.9,
    in the generated C of driver.py up to 3.6 and in driver.c from 3.7)."""
    import pathlib

    import triton

    nvidia = pathlib.Path(triton.__file__).parent / "backends" / "nvidia"
    sources = [p.read_text() for p in (nvidia / "driver.c", nvidia / "driver.py") if p.exists()]
    call = "PyObject_CallMethodNoArgs(obj, data_ptr_str)"  # the tensor case, after the int case
    found = [s[max(0, s.index(call) - 500) : s.index(call)] for s in sources if call in s]
    assert found, "no pointer extraction in the NVIDIA launcher sources"
    assert "PyLong_Check(obj)" in found[0] and "PyLong_AsUnsignedLongLong(obj)" in found[0]
