"""The Triton releases fastpool's kernels support, and the check the Triton backend makes before it
launches anything.

The range is what CI tests: the oldest release whose compiler and interpreter run every kernel, up
to the newest release at the time of writing (every Triton that a supported torch release pins lies
in it: see the README's compatibility table). ``pyproject.toml`` declares the same range. The torch
backend never needs triton, so ``import fastpool`` does not check anything: the check runs when the
Triton backend builds its first launcher.
"""

from __future__ import annotations

import re
import warnings

# Oldest supported release (major, minor): older interpreters and compilers lack what the kernels use.
OLDEST = (3, 3)
# Newest release tested in CI; newer ones are allowed with a warning (pip keeps to the declared range).
NEWEST_TESTED = (3, 9)
SUPPORTED = f">={OLDEST[0]}.{OLDEST[1]},<{NEWEST_TESTED[0]}.{NEWEST_TESTED[1] + 1}"

_checked: str | None = None


def parse_version(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as "3.6.0", "3.7.0+git1a2b3c4d" or "3.4.0rc1"; None
    when it does not start with two numbers."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def unsupported_reason(version: str) -> str | None:
    """Why fastpool's kernels cannot run on triton ``version``, or None when they can (a release newer
    than the newest tested is allowed: see ``untested_warning``)."""
    parsed = parse_version(version)
    if parsed is None or parsed < OLDEST:
        return (
            f"fastpool's Triton backend needs triton {SUPPORTED} (tested in CI), got triton {version}. "
            f"Install a supported release (pip install 'triton{SUPPORTED}', with a torch that allows it), "
            "or use the eager backend: FASTPOOL_BACKEND=torch or fastpool.use_backend('torch')."
        )
    return None


def untested_warning(version: str) -> str | None:
    """A warning for a release newer than the newest tested one, else None."""
    parsed = parse_version(version)
    if parsed is not None and parsed > NEWEST_TESTED:
        return (
            f"fastpool's kernels are tested with triton {SUPPORTED}; triton {version} is newer than the "
            "newest tested release. If a kernel fails, use FASTPOOL_BACKEND=torch and report it."
        )
    return None


def require_supported_triton() -> str:
    """Raise ``RuntimeError`` naming the supported range when the installed triton is too old; warn
    once when it is newer than the newest tested. Returns the installed version (checked once)."""
    global _checked
    if _checked is not None:
        return _checked
    import triton

    version = str(getattr(triton, "__version__", "unknown"))
    reason = unsupported_reason(version)
    if reason is not None:
        raise RuntimeError(reason)
    warning = untested_warning(version)
    if warning is not None:
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    _checked = version
    return version
