"""Launch a ``@triton.jit`` kernel through its compiled launcher, without ``JITFunction.run`` per call.

``kernel[grid](*args)`` binds and specialises every argument, computes a cache key and builds launch
metadata on every call: at serving shapes that host work costs more than the kernel. A
``KernelLauncher`` does that once per *launch key* — a tuple the caller builds from exactly what
Triton specialises on for its arguments (dtypes, 16-byte alignment of the tensors, the value of each
integer argument that is not ``do_not_specialize``: equal to 1, divisible by 16, wider than 32 bits)
— and afterwards calls the compiled kernel's own launcher with the same arguments.

The fast path is used only where it is known to be equivalent to the plain launch: a real Triton
JIT function (not the interpreter), a Triton release whose launcher calling convention this module
was checked against (``RUNNER_RELEASES``, ``DIRECT_ENTRY_RELEASES``; checked once per kernel, see
``_launcher_usable``), constexpr parameters after all the others, and no launch hooks installed
(profilers). Anywhere else every call takes the plain ``kernel[grid](...)`` path;
``tests/test_fast_launch.py`` checks the installed release's launcher against these conventions.
"""

from __future__ import annotations

import os

from ._triton_version import parse_version

_DISABLED = os.environ.get("FASTPOOL_PLAIN_LAUNCH", "0").strip().lower() in ("1", "true", "on", "yes")

# Calling conventions, read from each release's triton/runtime/jit.py (JITFunction.run) and
# triton/backends/nvidia/driver.py (CudaLauncher.__call__) in the 3.2.0, 3.3.1, 3.4.0, 3.5.1, 3.6.0,
# 3.7.1, 3.8.0 and 3.9.0 wheels; other releases take the plain path until they are checked and added
# here (tests/test_triton_version.py holds the decisions).
# - Launcher object (``compiled.run``), 3.4 to 3.9: run(gx, gy, gz, stream, function, packed_metadata,
#   launch_metadata, enter_hook, exit_hook, *every argument, constexprs included), the hooks read from
#   ``triton.knobs`` (3.2 passes only the non-constexpr arguments, 3.2 and 3.3 keep the hooks on
#   CompiledKernel).
RUNNER_RELEASES = ((3, 4), (3, 9))
# - Its C entry point (``compiled.run.launch``), 3.5 and 3.6: launch(gx, gy, gz, stream, function,
#   cooperative, pdl, global_scratch, profile_scratch, packed_metadata, launch_metadata, enter_hook,
#   exit_hook, *arguments). 3.4 passes no profile scratch; 3.7 and later pass the metadata and hooks
#   first, then the scratch buffers, argument annotations, the kernel signature and the arguments as
#   one tuple (3.9 may append sanitizer arguments): those launch through the launcher object.
DIRECT_ENTRY_RELEASES = ((3, 5), (3, 6))
# - Pointer arguments: a tensor (the launcher calls its ``data_ptr()`` and checks the address with
#   ``cuPointerGetAttribute``) or the address itself as a Python int (taken as it is), in every release
#   from 3.2 to 3.9; ``fastpool.express`` passes ints (tests/test_fast_launch.py reads the installed
#   launcher's source for it).


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
        if plan is not None and hooks_idle():
            launch, head, tail, driver = plan
            stream = driver.get_current_stream(driver.get_current_device())
            launch(grid[0], grid[1], grid[2], stream, *head, *args, *tail)
            return
        compiled = self.kernel[grid](*args, **constexprs, **options)
        if key is not None and self._usable(compiled):
            tail = tuple(constexprs[p.name] for p in self.kernel.params if p.is_constexpr)
            self._plans[key] = (*_launch_entry(compiled), tail, _driver())

    def plan(self, key):
        """(launch, head, tail, driver): how a launch with ``key`` goes straight to the compiled
        launcher, ``launch(gx, gy, gz, stream, *head, *args, *tail)`` with every pointer argument a
        tensor or its data pointer as an int; None until a first launch with that key took the plain
        path and its launcher passed the checks (see the module docstring)."""
        return self._plans.get(key)

    def _usable(self, compiled) -> bool:
        if self._checked is None:
            self._checked = _launcher_usable(self.kernel, compiled)
        return self._checked

    def clear(self) -> None:
        """Forget the cached plans (tests)."""
        self._plans.clear()


class TracedLauncher:
    """Launches through ``torch.library.wrap_triton``: inside a ``triton_op`` traced by torch.compile the
    launch is recorded in the graph (Inductor launches the kernel itself); called eagerly it launches
    plainly. Same call signature as ``KernelLauncher`` (the key is ignored). Launch options other than
    num_warps (maxnreg) are not passed: torch.compile does not forward them."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, key, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
        from torch.library import wrap_triton

        wrap_triton(self.kernel)[grid](*args, **constexprs, num_warps=options["num_warps"])


def _launch_entry(compiled) -> tuple:
    """(launch, head): call ``launch(gx, gy, gz, stream, *head, *args)`` to launch ``compiled``.

    The compiled kernel's launcher object (``compiled.run``) allocates scratch buffers in Python
    before calling its C ``launch``; when the kernel needs none, that C function is called directly
    with the arguments the launcher object would pass. Otherwise through the launcher object.
    """
    runner = compiled.run
    no_launch_metadata = (compiled.packed_metadata, None, None, None)  # metadata, hooks: none installed
    direct = _release_in(*DIRECT_ENTRY_RELEASES) and all(
        hasattr(runner, name) for name in ("launch", "launch_cooperative_grid", "launch_pdl")
    )
    scratch = (getattr(runner, "global_scratch_size", 1), getattr(runner, "profile_scratch_size", 1))
    if direct and scratch == (0, 0):
        head = (compiled.function, runner.launch_cooperative_grid, runner.launch_pdl, None, None)
        return runner.launch, (*head, *no_launch_metadata)
    return runner, (compiled.function, *no_launch_metadata)


def _driver():
    from triton.runtime.driver import driver

    return driver.active


_knobs = None
_hook_chain = None  # triton.knobs.HookChain, the hooks' container (set with _knobs)


def hooks_idle() -> bool:
    """No launch hook is installed (profilers install them; then every call takes the plain path)."""
    global _knobs, _hook_chain
    if _knobs is None:
        try:
            from triton import knobs
        except ImportError:  # before 3.4 the hooks live elsewhere: the fast path is not used there
            return False
        _knobs, _hook_chain = knobs, getattr(knobs, "HookChain", None)
    runtime = _knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    # The common case first (two empty HookChains), in few instructions: this runs on every launch.
    if type(enter) is _hook_chain and type(leave) is _hook_chain and not enter.calls and not leave.calls:
        return True
    return _chain_empty(enter) and _chain_empty(leave)


def _chain_empty(hook) -> bool:
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


def _launcher_usable(kernel, compiled) -> bool:
    """Whether this Triton exposes what the fast path calls, in the shape it expects."""
    return (
        not _DISABLED
        and _release_in(*RUNNER_RELEASES)
        and kernel_supported(kernel)
        and compiled_supported(compiled)
    )


_release: tuple[int, int] | None = None


def installed_release() -> tuple[int, int] | None:
    """(major, minor) of the installed triton, None when it cannot be read."""
    global _release
    if _release is None:
        import triton

        _release = parse_version(str(getattr(triton, "__version__", ""))) or (0, 0)
    return None if _release == (0, 0) else _release


def _release_in(oldest: tuple[int, int], newest: tuple[int, int]) -> bool:
    release = installed_release()
    return release is not None and oldest <= release <= newest


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
