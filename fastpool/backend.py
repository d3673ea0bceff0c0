"""Backend selection: ``FASTPOOL_BACKEND`` (read at every call) and the ``use_backend`` context manager."""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")


class _Entry:
    """One active ``use_backend`` block; compared by identity, so each block removes its own."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


# The selection is per thread and per asyncio task (contextvars): the enclosing use_backend
# blocks of the current context, innermost last, and the innermost one's name ("" when none).
_entries: contextvars.ContextVar[tuple[_Entry, ...]] = contextvars.ContextVar("fastpool_backend_entries")
_selected: contextvars.ContextVar[str] = contextvars.ContextVar("fastpool_backend")


class _Selection:
    # torch.compile cannot trace ContextVar.get, but it reads a property implemented in C on a
    # plain object and guards on the value, evaluating the guard in the calling thread and task.
    # So compiled code traces through the selection and re-traces when it changes. The property
    # calls ``_selected.get(self)``: ``self`` is what an unset variable returns.
    __slots__ = ()
    name = property(_selected.get)


_SELECTION = _Selection()
# Blocks entered inside code that torch.compile traces, where contextvars can be neither read nor set:
# the tracer follows this stack instead (its pushes and pops cancel out), so a compiled graph keeps
# the selection its own code makes. Outside tracing it is always empty.
_traced_entries: list[str] = []


# Looked up once without importing triton, so ``import fastpool`` stays cheap and triton-free.
def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


_TRITON_FOUND = _find_triton()


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed fastpool calls on backend ``name`` ("auto", "triton" or "torch").

    Takes precedence over the ``FASTPOOL_BACKEND`` environment variable and nests. The selection
    belongs to the current thread and asyncio task (a ``contextvars`` context): other threads and
    tasks keep their own, a new thread starts without one, and a task inherits the selection in
    force where it was created. Each block removes its own entry when it exits, so blocks may
    exit in any order (interleaved generators, tasks); a block must exit in the thread and task
    it was entered in (``RuntimeError`` otherwise). Compiled code traces through the selection in
    force when it is called (and is re-traced when it changes); a block inside compiled code selects
    the backend of the calls it encloses.
    """
    if torch.compiler.is_compiling():
        _traced_entries.append(_check(name, "use_backend(name)"))
        try:
            yield
        finally:
            _traced_entries.pop()
        return
    entry = _Entry(_check(name, "use_backend(name)"))
    _entries.set((*_entries.get(()), entry))
    _selected.set(entry.name)
    try:
        yield
    finally:
        entries = _entries.get(())
        if not any(e is entry for e in entries):
            raise RuntimeError(
                f"use_backend: expected to exit in the thread and asyncio task that entered "
                f"use_backend({entry.name!r}), got an exit from another context"
            )
        remaining = tuple(e for e in entries if e is not entry)
        _entries.set(remaining)
        _selected.set(remaining[-1].name if remaining else "")


def requested_backend() -> str:
    """The backend asked for now: the innermost ``use_backend`` of this thread and task, else
    ``FASTPOOL_BACKEND``, else auto."""
    if _traced_entries:
        return _traced_entries[-1]
    name = _SELECTION.name
    if isinstance(name, str) and name:
        return name
    if _ENVIRON_DATA is None or torch.compiler.is_compiling():
        return _from_environment(os.environ.get("FASTPOOL_BACKEND", "auto"))
    # os.environ's own dict, read directly: Mapping.get raises and catches a KeyError when the variable
    # is unset, a sizeable share of a small call's host cost.
    raw = _ENVIRON_DATA.get(_ENVIRON_KEY)
    return "auto" if raw is None else _from_environment(raw)


_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENVIRON_KEY = os.environ.encodekey("FASTPOOL_BACKEND") if hasattr(os.environ, "encodekey") else None
if _ENVIRON_KEY is None:
    _ENVIRON_DATA = None
_environment_names: dict = {}


def _from_environment(raw) -> str:
    """The checked backend name of FASTPOOL_BACKEND's raw value (cached per value; not while compiling:
    torch.compile would guard on the cache's contents, which its first call fills, and recompile)."""
    compiling = torch.compiler.is_compiling()
    name = None if compiling else _environment_names.get(raw)
    if name is None:
        text = raw if isinstance(raw, str) else os.environ.decodevalue(raw)
        name = _check(text.strip().lower() or "auto", "FASTPOOL_BACKEND")
        if not compiling:
            _environment_names[raw] = name
    return name


def triton_interpreter_enabled() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``), so kernels accept CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_cuda_devices: dict[torch.device, bool] = {}


def _is_cuda(device: torch.device) -> bool:
    # Cached per device: ``device.type`` builds a new string on every access. Not while compiling (a
    # guard on the cache, which the first traced call fills, would recompile once).
    if torch.compiler.is_compiling():
        return device.type == "cuda"
    is_cuda = _cuda_devices.get(device)
    if is_cuda is None:
        is_cuda = _cuda_devices[device] = device.type == "cuda"
    return is_cuda


def resolve_backend(device: torch.device) -> str:
    """The concrete backend ("triton" or "torch") for tensors on ``device``.

    ``auto`` picks Triton for CUDA tensors and eager PyTorch otherwise. An explicit ``triton`` on a
    non-CUDA tensor needs the Triton interpreter and raises ``RuntimeError`` without it.
    """
    name = requested_backend()
    if name == "auto":
        return "triton" if _is_cuda(device) and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("fastpool backend 'triton' was requested but triton is not installed")
        # Meta tensors never reach a kernel (only the ops' fake kernels): no interpreter needed. The
        # device's type string is built only on this rare path.
        if not _is_cuda(device) and not triton_interpreter_enabled() and device.type != "meta":
            raise RuntimeError(
                f"fastpool backend 'triton' got {device.type} tensors: Triton kernels run on CUDA "
                "tensors, or on CPU tensors under the Triton interpreter, which needs TRITON_INTERPRET=1 "
                "set before triton is imported. Use FASTPOOL_BACKEND=torch (or auto) for CPU."
            )
    return name


def triton_available() -> bool:
    """Whether triton is installed (fastpool itself imports without it)."""
    return _TRITON_FOUND
