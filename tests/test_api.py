"""Input validation, backend selection and import behaviour of the public API."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_clear_error

import fastpool
from fastpool import eager, launchers

H = torch.randn(2, 3, 4)
M = torch.ones(2, 3, dtype=torch.bool)

BAD_INPUTS = [
    ("hidden", TypeError, lambda: fastpool.mean_pool([[1.0]])),
    ("hidden", TypeError, lambda: fastpool.mean_pool(None)),
    ("hidden", ValueError, lambda: fastpool.mean_pool(torch.randn(3, 4))),
    ("hidden", ValueError, lambda: fastpool.max_pool(torch.randn(1, 2, 3, 4))),
    ("hidden", TypeError, lambda: fastpool.cls_pool(torch.ones(2, 3, 4, dtype=torch.int64))),
    ("hidden", TypeError, lambda: fastpool.mean_pool(torch.randn(2, 3, 4, dtype=torch.complex64))),
    ("mask", TypeError, lambda: fastpool.mean_pool(H, [[1, 1, 1], [1, 1, 1]])),
    ("mask", ValueError, lambda: fastpool.mean_pool(H, torch.ones(2, 4))),
    ("mask", ValueError, lambda: fastpool.last_token_pool(H, torch.ones(3, 2))),
    ("mask", ValueError, lambda: fastpool.mean_pool(H, torch.ones(2, 3, 1))),
    ("mask", TypeError, lambda: fastpool.max_pool(H, torch.ones(2, 3, dtype=torch.complex64))),
    ("mask", ValueError, lambda: fastpool.mean_pool(H, torch.ones(2, 3, device="meta"))),
    ("mode", ValueError, lambda: fastpool.pool(H, M, mode="median")),
    ("mode", ValueError, lambda: fastpool.pool(H, M, mode=["mean", "sum"])),
    ("mode", ValueError, lambda: fastpool.pool(H, M, mode=[])),
    ("mode", ValueError, lambda: fastpool.pool(H, M, mode=["mean", "mean"])),
    ("mode", TypeError, lambda: fastpool.pool(H, M, mode=3)),
    ("mode", TypeError, lambda: fastpool.pool(H, M, mode=["mean", 1])),
    ("weights", ValueError, lambda: fastpool.pool(H, M, mode="mean", weights=torch.ones(2, 3))),
    ("weights", TypeError, lambda: fastpool.weighted_mean_pool(H, M, [[1.0] * 3] * 2)),
    ("weights", TypeError, lambda: fastpool.weighted_mean_pool(H, M, torch.ones(2, 3, dtype=torch.int64))),
    ("weights", ValueError, lambda: fastpool.weighted_mean_pool(H, M, torch.ones(2, 4))),
    ("weights", ValueError, lambda: fastpool.weighted_mean_pool(H, M, torch.ones(2, 3, 1))),
    ("weights", ValueError, lambda: fastpool.weighted_mean_pool(H, M, torch.ones(2, 3, device="meta"))),
]


@pytest.mark.parametrize(
    "argument,error,call", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_gets_a_clear_error(argument, error, call):
    assert_clear_error(argument, error, call)


def test_error_names_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*got \(2, 4\)"):
        fastpool.mean_pool(H, torch.ones(2, 4))
    with pytest.raises(TypeError, match="torch.int64"):
        fastpool.mean_pool(torch.ones(2, 3, 4, dtype=torch.int64))


def test_backend_env_var_is_read_at_call_time(monkeypatch):
    calls = []
    real = eager.pool_forward
    monkeypatch.setattr(eager, "pool_forward", lambda *a, **k: calls.append("torch") or real(*a, **k))
    real_launch = launchers.pool_forward
    monkeypatch.setattr(
        launchers, "pool_forward", lambda *a, **k: calls.append("triton") or real_launch(*a, **k)
    )
    monkeypatch.setenv("FASTPOOL_BACKEND", "torch")
    fastpool.mean_pool(H)
    monkeypatch.setenv("FASTPOOL_BACKEND", "triton")
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreter or H.is_cuda:
        fastpool.mean_pool(H)
        assert calls == ["torch", "triton"]
    monkeypatch.setenv("FASTPOOL_BACKEND", "auto")
    fastpool.mean_pool(H)  # CPU tensor: auto means eager
    assert calls[-1] == "torch"
    monkeypatch.setenv("FASTPOOL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTPOOL_BACKEND"):
        fastpool.mean_pool(H)


def test_use_backend_context_manager_overrides_env(monkeypatch):
    monkeypatch.setenv("FASTPOOL_BACKEND", "triton")
    with fastpool.use_backend("torch"):
        assert fastpool.backend.resolve_backend(torch.device("cpu")) == "torch"
        with fastpool.use_backend("auto"):
            assert fastpool.backend.resolve_backend(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="use_backend"):
        with fastpool.use_backend("fast"):
            pass


def run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_triton_backend_on_cpu_without_interpreter_raises_clearly():
    result = run_python(
        "import torch, fastpool\n"
        "try:\n"
        "    fastpool.mean_pool(torch.randn(2, 3, 4))\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n",
        FASTPOOL_BACKEND="triton",
    )
    assert "ERR" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr


def test_import_and_cpu_pooling_work_without_triton():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, fastpool\n"
        "out = fastpool.pool(torch.ones(2, 3, 4), torch.ones(2, 3), mode=['mean', 'max', 'cls', 'last'])\n"
        "assert out.shape == (2, 16) and bool((out == 1).all())\n"
        "assert 'triton' not in sys.modules\n"
        "print('OK')\n"
    )
    result = run_python(code)
    assert result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_public_names():
    names = ("pool", "mean_pool", "max_pool", "cls_pool", "last_token_pool", "weighted_mean_pool")
    for name in (*names, "use_backend", "MODES"):
        assert hasattr(fastpool, name)
    assert fastpool.MODES == ("mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean")
