"""The Triton releases fastpool's kernels support, and the check the Triton backend makes before it
launches anything.

Supported: triton 3.6 and newer, the releases pinned by torch 2.10 and later (the README's
compatibility table says which torch pins which triton). Tested: 3.6 up to ``NEWEST_TESTED``; CI runs
the pinned release (the Makefile's ``TRITON_SPEC``) and the newest one (``TRITON_NEWEST_SPEC``). A
release newer than the newest tested one is allowed with a warning: pyproject.toml declares no
upper bound, since one would make pip downgrade torch when a new torch pins a new triton.

The torch backend never needs triton, so ``import fastpool`` checks nothing: ``fastpool.kernels``
runs the check when it is first imported, i.e. when the Triton backend is first used.
"""

from __future__ import annotations

import re
import warnings

# Oldest supported release (major, minor). Triton 3.2 to 3.5 generate PTX that ptxas rejects for the
# forward kernels ("Internal Triton PTX codegen error"; 3.3 to 3.5: "Arguments mismatch for instruction
# 'st'" where the int64 atomic_cas of the row tickets is broadcast through shared memory), although
# their interpreters run the kernels.
OLDEST = (3, 6)
# Newest release tested (CI's second triton); newer ones run with a warning.
NEWEST_TESTED = (3, 9)
# The requirement pyproject.toml declares (tests/test_triton_version.py checks they agree).
REQUIREMENT = f">={OLDEST[0]}.{OLDEST[1]}"
TESTED = f"{OLDEST[0]}.{OLDEST[1]} to {NEWEST_TESTED[0]}.{NEWEST_TESTED[1]}"

_checked: str | None = None


def parse_version(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as "3.6.0", "3.7.0+git1a2b3c4d" or "3.4.0rc1"; None
    when it does not start with two numbers."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def unsupported_reason(version: str) -> str | None:
    """Why fastpool's kernels cannot run on triton ``version`` (a version string), or None when they
    can (a release newer than the newest tested is allowed: see ``untested_warning``)."""
    parsed = parse_version(version)
    if parsed is None or parsed < OLDEST:
        return (
            f"fastpool's Triton backend needs triton{REQUIREMENT} (tested: {TESTED}), got triton {version}. "
            f"Install a supported release (pip install 'triton{REQUIREMENT}' with a torch that pins one: "
            "torch>=2.10), or use the eager backend: FASTPOOL_BACKEND=torch or fastpool.use_backend('torch')."
        )
    return None


def untested_warning(version: str) -> str | None:
    """The warning for a triton ``version`` newer than the newest tested release, else None."""
    parsed = parse_version(version)
    if parsed is not None and parsed > NEWEST_TESTED:
        return (
            f"fastpool's kernels are tested with triton {TESTED}; triton {version} is newer. If a kernel "
            "fails or a result looks wrong, use FASTPOOL_BACKEND=torch and report it."
        )
    return None


def require_supported_triton() -> str:
    """Raise ``RuntimeError`` naming the supported releases when the installed triton is too old; warn
    (``RuntimeWarning``, once) when it is newer than the newest tested. Returns the installed
    version string. Passes are remembered; a failure is raised again on every call."""
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
