"""Test setup: pick the device and turn on the Triton interpreter before triton is imported.

With an NVIDIA GPU (``/dev/nvidiactl``) the suite runs on CUDA tensors and compiled kernels; else
on CPU tensors, with the "triton" backend running the same kernels under ``TRITON_INTERPRET=1``.
``FASTPOOL_TEST_DEVICE=cpu|cuda`` forces the choice.
"""

import os

DEVICE = os.environ.get("FASTPOOL_TEST_DEVICE") or ("cuda" if os.path.exists("/dev/nvidiactl") else "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import fastpool  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER") and DEVICE == "cpu":
    # One intra-op thread per xdist worker: the suite's tensors are tiny, and workers already
    # occupy the cores; oversubscribed thread pools make each small op ~1000x slower.
    torch.set_num_threads(1)

BACKENDS = ("torch", "triton")


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastpool.use_backend(request.param):
        yield request.param


# CI's second run, on the newest triton release (Makefile: test-newest), selects with --pairwise to fit
# the CI budget: the "triton" backend's cases only (the eager backend never runs triton), and of each
# parametrized test with at least PAIRWISE_MIN of them a subset in which every pair of parameter values
# that occurs in the test occurs in a chosen case (fastpool.aot.pairwise_cover: every dtype with every
# mask kind, mode and kernel config...); tests/test_aot_compile.py then compiles a pairwise subset too.
PAIRWISE_MIN = 4


def pytest_addoption(parser):
    parser.addoption(
        "--pairwise", action="store_true",
        help="triton-backend cases only, and a pairwise-covering subset of each parametrized test",
    )  # fmt: skip


def _backend_of(item) -> str | None:
    params = item.callspec.params
    return params.get("backend", params.get("backend_name"))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("pairwise"):
        return
    from fastpool.aot import pairwise_cover

    groups: dict[str, list] = {}
    for item in items:
        if getattr(item, "callspec", None) is not None and _backend_of(item) != "torch":
            groups.setdefault(item.nodeid.split("[", 1)[0], []).append(item)
    kept = {id(item) for item in items if getattr(item, "callspec", None) is None}
    for group in groups.values():
        if len(group) < PAIRWISE_MIN:
            kept.update(id(item) for item in group)
            continue
        cases = [{k: repr(v) for k, v in item.callspec.params.items()} for item in group]
        kept.update(id(group[i]) for i in pairwise_cover(cases))
    deselected = [item for item in items if id(item) not in kept]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if id(item) in kept]


@pytest.fixture
def replay(monkeypatch, device):
    """A replaying stand-in for the compiled launcher the interpreter lacks (``tests/test_express.py``'s
    ``Replay``), on the triton backend, with no remembered signature before or after."""
    if device == "cuda":
        pytest.skip("the replaying launcher stands in for the compiled one the interpreter lacks")
    from test_express import Replay

    from fastpool import express

    express.forget()
    with fastpool.use_backend("triton"):
        yield Replay(monkeypatch)
    express.forget()
