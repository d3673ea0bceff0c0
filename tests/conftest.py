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
