"""Backend selection: ``FASTPOOL_BACKEND`` (read at every call) and the ``use_backend`` context manager."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
# A plain module-level stack rather than a ContextVar: torch.compile traces through backend
# selection (it becomes a guard on this list), and it cannot trace ContextVar.get.
_override_stack: list[str] = []


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

    Takes precedence over the ``FASTPOOL_BACKEND`` environment variable and nests. The setting is
    process-wide (not per thread).
    """
    _override_stack.append(_check(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override_stack.pop()


def requested_backend() -> str:
    """The backend asked for now: the innermost ``use_backend``, else ``FASTPOOL_BACKEND``, else auto."""
    if _override_stack:
        return _override_stack[-1]
    return _check(os.environ.get("FASTPOOL_BACKEND", "auto").strip().lower() or "auto", "FASTPOOL_BACKEND")


def triton_interpreter_enabled() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``), so kernels accept CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_cuda_devices: dict[torch.device, bool] = {}


def _is_cuda(device: torch.device) -> bool:
    # Cached per device: ``device.type`` builds a new string on every access.
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
        if not _is_cuda(device) and not triton_interpreter_enabled():
            raise RuntimeError(
                f"fastpool backend 'triton' got {device.type} tensors: Triton kernels run on CUDA "
                "tensors, or on CPU tensors under the Triton interpreter, which needs TRITON_INTERPRET=1 "
                "set before triton is imported. Use FASTPOOL_BACKEND=torch (or auto) for CPU."
            )
    return name


def triton_available() -> bool:
    """Whether triton is installed (fastpool itself imports without it)."""
    return _TRITON_FOUND
