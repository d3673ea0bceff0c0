"""Launch a ``@triton.jit`` kernel through its compiled launcher, without ``JITFunction.run`` per call.

``kernel[grid](*args)`` binds and specialises every argument, computes a cache key and builds launch
metadata on every call: at serving shapes that host work costs more than the kernel. A
``KernelLauncher`` does that once per *launch key* — a tuple the caller builds from exactly what
Triton specialises on for its arguments (dtypes, 16-byte alignment of the tensors, the value of each
integer argument that is not ``do_not_specialize``: equal to 1, divisible by 16, wider than 32 bits)
— and afterwards calls the compiled kernel's own launcher with the same arguments.

The fast path is used only where it is known to be equivalent to the plain launch: a real Triton
JIT function (not the interpreter), Triton's launcher with the call signature this module expects
(checked once per kernel, see ``_launcher_usable``), constexpr parameters after all the others, and
no launch hooks installed (profilers). Anywhere else every call takes the plain ``kernel[grid](...)``
path; ``tests/test_fast_launch.py`` checks both paths launch the same compiled kernel.
"""

from __future__ import annotations

import os

_DISABLED = os.environ.get("FASTPOOL_PLAIN_LAUNCH", "0").strip().lower() in ("1", "true", "on", "yes")


def specialization(value: int) -> int:
    """What Triton specialises on for an integer argument: 1 (the value 1), 16 (divisible by 16), 0
    (neither), plus 2 when it needs 64 bits. One small int for a launch key."""
    wide = 2 if not -(2**31) <= value < 2**31 else 0
    if value == 1:
        return 1 + wide
    return (16 if value % 16 == 0 else 0) + wide


def aligned(tensor) -> bool:
    """Whether a tensor's data pointer is 16-byte aligned (Triton specialises pointers on it)."""
    return tensor.data_ptr() % 16 == 0


class KernelLauncher:
    """Launches one kernel: plainly the first time for each launch key, then straight through the
    compiled kernel's launcher."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._plans: dict = {}
        self._checked: bool | None = None

    def __call__(self, key, grid: tuple[int, int, int], args: tuple, constexprs: dict, options: dict) -> None:
        """Launch ``kernel[grid](*args, **constexprs, **options)``; grid has three dimensions.

        args: every non-constexpr argument, in the kernel's parameter order; constexprs: the
        constexpr parameters by name; options: launch options (num_warps, maxnreg). ``key`` must
        determine Triton's specialisation of ``args`` and the values of ``constexprs`` and
        ``options``; None disables the fast path for this call.
        """
        plan = self._plans.get(key) if key is not None else None
        if plan is not None and _hooks_idle():
            launch, head, tail, driver = plan
            stream = driver.get_current_stream(driver.get_current_device())
            launch(grid[0], grid[1], grid[2], stream, *head, *args, *tail)
            return
        compiled = self.kernel[grid](*args, **constexprs, **options)
        if key is not None and self._usable(compiled):
            tail = tuple(constexprs[p.name] for p in self.kernel.params if p.is_constexpr)
            self._plans[key] = (*_launch_entry(compiled), tail, _driver())

    def _usable(self, compiled) -> bool:
        if self._checked is None:
            self._checked = _launcher_usable(self.kernel, compiled)
        return self._checked

    def clear(self) -> None:
        """Forget the cached plans (tests)."""
        self._plans.clear()


def _launch_entry(compiled) -> tuple:
    """(launch, head): call ``launch(gx, gy, gz, stream, *head, *args)`` to launch ``compiled``.

    The compiled kernel's launcher object (``compiled.run``) allocates scratch buffers in Python
    before calling its C ``launch``; when the kernel needs none, that C function is called directly
    with the arguments the launcher object would pass. Otherwise through the launcher object.
    """
    runner = compiled.run
    no_launch_metadata = (compiled.packed_metadata, None, None, None)  # metadata, hooks: none installed
    direct = all(hasattr(runner, name) for name in ("launch", "launch_cooperative_grid", "launch_pdl"))
    scratch = (getattr(runner, "global_scratch_size", 1), getattr(runner, "profile_scratch_size", 1))
    if direct and scratch == (0, 0):
        head = (compiled.function, runner.launch_cooperative_grid, runner.launch_pdl, None, None)
        return runner.launch, (*head, *no_launch_metadata)
    return runner, (compiled.function, *no_launch_metadata)


def _driver():
    from triton.runtime.driver import driver

    return driver.active


_knobs = None


def _hooks_idle() -> bool:
    """No launch hook is installed (profilers install them; then every call takes the plain path)."""
    global _knobs
    if _knobs is None:
        from triton import knobs

        _knobs = knobs
    runtime = _knobs.runtime
    return _chain_empty(runtime.launch_enter_hook) and _chain_empty(runtime.launch_exit_hook)


def _chain_empty(hook) -> bool:
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


def _launcher_usable(kernel, compiled) -> bool:
    """Whether this Triton exposes what the fast path calls, in the shape it expects."""
    return not _DISABLED and kernel_supported(kernel) and compiled_supported(compiled)


def kernel_supported(kernel) -> bool:
    """A JIT function (not the interpreter's) whose constexpr parameters all come after the others, so
    the launcher's argument list is the ordinary arguments followed by the constexprs."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    if not isinstance(kernel, JITFunction):
        return False
    params = getattr(kernel, "params", None)
    if not params or not all(hasattr(p, "is_constexpr") and hasattr(p, "name") for p in params):
        return False
    flags = [bool(p.is_constexpr) for p in params]
    return not (True in flags and False in flags[flags.index(True) :])


def compiled_supported(compiled) -> bool:
    """What ``kernel[grid](...)`` returned is a compiled kernel with the launcher, function handle and
    packed metadata the fast path passes on."""
    try:
        from triton.compiler.compiler import CompiledKernel
    except ImportError:
        return False
    return isinstance(compiled, CompiledKernel) and all(
        hasattr(compiled, name) for name in ("run", "function", "packed_metadata")
    )
