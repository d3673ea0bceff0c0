"""Which Triton releases fastpool supports and what it does on each: the version check the Triton
backend makes on first use (``fastpool._triton_version``), the release tables that decide the launch
path (``fastpool.fast_launch``), and their agreement with pyproject.toml and the README.

Pure functions, with the installed version patched where it is read: nothing is installed. The
kernels themselves run on two releases in CI (``make test``: the pinned one and the newest).
"""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fastpool import _triton_version as tv
from fastpool import fast_launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text,want",
    [
        ("3.6.0", (3, 6)),
        ("3.10.2", (3, 10)),
        ("3.7.0+git1a2b3c4d", (3, 7)),
        ("3.4.0rc1", (3, 4)),
        (" 3.9.0", (3, 9)),
        ("4.0", (4, 0)),
        ("", None),
        ("unknown", None),
        ("3", None),
        ("v3.6.0", None),
    ],
)
def test_parse_version(text, want):
    assert tv.parse_version(text) == want


@pytest.mark.parametrize(
    "version", ["3.5.1", "3.5.0", "3.4.0", "3.3.1", "3.2.0", "3.0.0", "2.9.9", "3.1.0+git123", "unknown", ""]
)
def test_a_release_older_than_3_6_or_unreadable_is_refused_with_the_supported_range(version):
    reason = tv.unsupported_reason(version)
    assert reason is not None
    assert "triton>=3.6" in reason and "tested: 3.6 to 3.9" in reason and "torch>=2.10" in reason
    assert f"got triton {version}." in reason
    assert "FASTPOOL_BACKEND=torch" in reason  # the way out that needs no reinstall


@pytest.mark.parametrize("version", ["3.6.0", "3.7.0", "3.7.1", "3.8.0", "3.9.0", "3.9.1+gitabc"])
def test_every_tested_release_is_accepted_without_a_warning(version):
    assert tv.unsupported_reason(version) is None
    assert tv.untested_warning(version) is None


@pytest.mark.parametrize("version", ["3.10.0", "3.11.0+gitabcdef", "4.0.0"])
def test_a_release_newer_than_the_newest_tested_is_accepted_with_a_warning(version):
    assert tv.unsupported_reason(version) is None
    warning = tv.untested_warning(version)
    assert warning is not None and version in warning and "3.6 to 3.9" in warning
    assert "FASTPOOL_BACKEND=torch" in warning


@pytest.fixture
def installed(monkeypatch):
    """Set the version string the check reads from ``triton.__version__``; forget earlier checks."""
    import triton

    def install(version: str) -> None:
        monkeypatch.setattr(triton, "__version__", version)
        monkeypatch.setattr(tv, "_checked", None)

    yield install


def test_require_supported_triton_raises_on_every_call_for_a_too_old_release(installed):
    installed("3.5.1")
    for _ in range(2):  # a failure is not remembered as a pass
        with pytest.raises(RuntimeError, match=r"needs triton>=3\.6 .*got triton 3\.5\.1"):
            tv.require_supported_triton()


def test_require_supported_triton_warns_once_for_a_newer_release(installed):
    installed("3.10.0")
    with pytest.warns(RuntimeWarning, match=r"triton 3\.10\.0 is newer"):
        assert tv.require_supported_triton() == "3.10.0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tv.require_supported_triton() == "3.10.0"


def test_require_supported_triton_passes_silently_on_a_tested_release(installed):
    installed("3.9.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tv.require_supported_triton() == "3.9.0"


def test_the_installed_triton_is_supported():
    """What CI runs on (either of its two releases) passes the check unchanged."""
    import triton

    assert tv.unsupported_reason(triton.__version__) is None
    assert tv.untested_warning(triton.__version__) is None


def test_pyproject_declares_the_supported_range():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    triton = re.findall(r"\"triton([^;\"]*)", deps)
    torch = re.findall(r"\"torch([^;\"]*)", deps)
    assert triton == [tv.REQUIREMENT]
    assert torch == [">=2.10"]  # torch 2.10 is the first release pinning a supported triton (3.6)


def readme_compatibility_rows() -> list[tuple[str, str, str]]:
    """(torch, triton, status) of the README's compatibility table."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| torch (\d+\.\d+[^|]*?) \| triton (\d+\.\d+)[^|]* \| ([^|]+?) \|$", text, re.M)
    assert len(rows) >= 10, rows
    return rows


def test_readme_compatibility_table_agrees_with_the_check():
    for torch_version, triton_version, status in readme_compatibility_rows():
        refused = tv.unsupported_reason(triton_version + ".0") is not None
        assert refused == status.startswith("not supported"), (torch_version, triton_version, status)
        if not refused:
            assert status.startswith("supported"), (torch_version, triton_version, status)
            assert tv.untested_warning(triton_version + ".0") is None
    pins = {triton for _, triton, _ in readme_compatibility_rows()}
    assert f"{tv.NEWEST_TESTED[0]}.{tv.NEWEST_TESTED[1]}" in pins


# The launch path of each release (fastpool.fast_launch): (launcher object, its C entry point).
LAUNCH_PATHS = {
    (3, 2): (False, False),
    (3, 3): (False, False),
    (3, 4): (True, False),
    (3, 5): (True, True),
    (3, 6): (True, True),
    (3, 7): (True, False),
    (3, 8): (True, False),
    (3, 9): (True, False),
    (3, 10): (False, False),
    (4, 0): (False, False),
}


@pytest.fixture
def release(monkeypatch):
    """Make fast_launch see another installed (major, minor), None for an unreadable version."""

    def install(value):
        monkeypatch.setattr(fast_launch, "_release", (0, 0) if value is None else value)

    yield install


class FakeRunner:
    """The launcher object of a compiled kernel, with the C entry point attributes 3.5 and 3.6 have."""

    def __init__(self, global_scratch: int = 0, profile_scratch: int = 0):
        self.launch = object()
        self.launch_cooperative_grid = False
        self.launch_pdl = False
        self.global_scratch_size = global_scratch
        self.profile_scratch_size = profile_scratch


class FakeCompiled:
    def __init__(self, runner):
        self.run = runner
        self.function = 1234
        self.packed_metadata = ("meta",)


@pytest.mark.parametrize("version", sorted(LAUNCH_PATHS), ids=lambda v: f"{v[0]}.{v[1]}")
def test_fast_launch_is_used_only_on_releases_whose_launcher_convention_was_checked(
    version, release, monkeypatch
):
    release(version)
    runner_ok, direct_ok = LAUNCH_PATHS[version]
    # Everything else about the kernel and the compiled kernel as the fast path wants it:
    monkeypatch.setattr(fast_launch, "kernel_supported", lambda kernel: True)
    monkeypatch.setattr(fast_launch, "compiled_supported", lambda compiled: True)
    monkeypatch.setattr(fast_launch, "_DISABLED", False)
    assert fast_launch._launcher_usable(object(), object()) is runner_ok
    runner = FakeRunner()
    launch, head = fast_launch._launch_entry(FakeCompiled(runner))
    if direct_ok:
        assert launch is runner.launch
        assert head == (1234, False, False, None, None, ("meta",), None, None, None)
    else:
        assert launch is runner
        assert head == (1234, ("meta",), None, None, None)


@pytest.mark.parametrize("scratch", [(64, 0), (0, 64)])
def test_kernels_that_need_scratch_launch_through_the_launcher_object(scratch, release):
    """The launcher object allocates scratch buffers in Python; the C entry point would not."""
    release((3, 6))
    runner = FakeRunner(*scratch)
    launch, _ = fast_launch._launch_entry(FakeCompiled(runner))
    assert launch is runner


def test_an_unreadable_triton_version_takes_the_plain_path(release, monkeypatch):
    release(None)
    monkeypatch.setattr(fast_launch, "kernel_supported", lambda kernel: True)
    monkeypatch.setattr(fast_launch, "compiled_supported", lambda compiled: True)
    assert fast_launch.installed_release() is None
    assert not fast_launch._launcher_usable(object(), object())


@pytest.mark.parametrize("text,want", [("3.7.1+gitabc", (3, 7)), ("3.9.0", (3, 9)), ("nightly", None)])
def test_installed_release_reads_triton_version(text, want, monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", text)
    monkeypatch.setattr(fast_launch, "_release", None)
    assert fast_launch.installed_release() == want


def test_too_old_triton_refuses_the_triton_backend_and_keeps_the_torch_backend():
    """End to end in a fresh process whose triton reports 3.5.0: every Triton op raises the check's
    error (again on a second call), the torch backend works, and importing fastpool checks nothing."""
    code = (
        "import triton\n"
        "triton.__version__ = '3.5.0'\n"
        "import torch, fastpool\n"
        "x = torch.randn(2, 5, 4)\n"
        "with fastpool.use_backend('torch'):\n"
        "    assert torch.allclose(fastpool.mean_pool(x), x.mean(1))\n"
        "calls = [lambda: fastpool.mean_pool(x), lambda: fastpool.mean_pool(x),\n"
        "         lambda: fastpool.attention_pool(x, torch.zeros(2, 5)),\n"
        "         lambda: fastpool.global_pool(x.transpose(1, 2))]\n"
        "with fastpool.use_backend('triton'):\n"
        "    for call in calls:\n"
        "        try:\n"
        "            call()\n"
        "            print('NO ERROR')\n"
        "        except RuntimeError as e:\n"
        "            print('ERR', e)\n"
        "with fastpool.use_backend('torch'):\n"
        "    assert torch.allclose(fastpool.mean_pool(x), x.mean(1))\n"
        "print('DONE')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    lines = result.stdout.splitlines()
    assert lines[-1:] == ["DONE"], result.stdout + result.stderr
    errors = [line for line in lines if line.startswith("ERR ")]
    assert len(errors) == 4, result.stdout
    for line in errors:
        assert "needs triton>=3.6 (tested: 3.6 to 3.9), got triton 3.5.0" in line, line
