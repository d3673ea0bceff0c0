"""The triton ops torch.compile traces (fastpool.ops_triton): same results as the opaque custom ops, bit
for bit, when called eagerly (under the interpreter here); and, traced with real (not interpreted) Triton
kernels, forward and backward graphs that hold the kernel launches themselves (a subprocess with a stub
driver: tests/traced_graph_driver.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastpool import launch, ops_triton

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_LAUNCH = "higher_order.triton_kernel_wrapper_functional"


@pytest.fixture(scope="module")
def traced_graphs() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-P", os.path.join(HERE, "traced_graph_driver.py")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_traced_ops_are_off_under_the_interpreter_and_on_with_real_kernels(traced_graphs):
    # The interpreter's kernels cannot be traced: compiled code keeps the opaque ops here.
    assert not ops_triton.ENABLED
    assert traced_graphs["enabled"]


@pytest.mark.parametrize(
    "case, forward_launches, backward_launches",
    [("padded", 1, 1), ("weights_normalize", 1, 2), ("packed", 1, 1)],
)
def test_compiled_graphs_launch_the_kernels_themselves(
    traced_graphs, case, forward_launches, backward_launches
):
    forward, backward = traced_graphs[case]["graphs"]
    # One launch per pass (the user-weight gradient is a second kernel), and no opaque fastpool op.
    assert forward == {KERNEL_LAUNCH: forward_launches}
    assert backward == {KERNEL_LAUNCH: backward_launches}


def test_dynamic_shapes_trace_to_one_launch(traced_graphs):
    assert traced_graphs["inference_dynamic"]["graphs"] == [{KERNEL_LAUNCH: 1}]


def test_packed_offsets_that_need_a_value_check_stay_on_the_opaque_op(traced_graphs):
    assert traced_graphs["packed_checked"]["graphs"] == [{"fastpool.packed_pool_fwd": 1}]


def test_turning_the_traced_ops_off(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTPOOL_TRACED_OPS", "0")
    assert not ops_triton.enabled()
    monkeypatch.setenv("FASTPOOL_TRACED_OPS", "1")
    assert ops_triton.enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not ops_triton.enabled()


def _batch(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 37, 8, generator=gen).to(device, dtype)
    mask = (torch.rand(3, 37, generator=gen) > 0.3).long().to(device)
    mask[1] = 0  # an empty row
    weights = torch.rand(3, 37, generator=gen).to(device, dtype)
    return hidden, mask, weights


def _assert_same_forward(want, got, T: int, chunk: int) -> None:
    names = ("out", "argmax", "stats", "norms", "wsum", "wmean")
    for name, a, b in zip(names, want[:6], got[:6], strict=True):
        assert a.shape == b.shape and torch.equal(a, b), name
    # prefix: the real tokens before each chunk of a row; entries past a row's chunks are never read.
    first = want[2][1]
    n_chunks = torch.where(first >= 0, (T - first + chunk - 1) // chunk, 0)
    read = torch.arange(want[6].shape[1], device=first.device)[None, :] < n_chunks[:, None]
    assert want[6].shape == got[6].shape and torch.equal(want[6][read], got[6][read])


@pytest.mark.parametrize(
    "modes, with_weights",
    [("mean,max,weighted_mean", False), ("mean,max,weighted_mean", True), ("cls,last,mean_sqrt_len", False),
     ("weighted_mean", True)],
)  # fmt: skip
@pytest.mark.parametrize("normalize_eps", [-1.0, 1e-6])
def test_traced_forward_and_backward_give_the_opaque_ops_bits(device, modes, with_weights, normalize_eps):
    hidden, mask, weights = _batch(device)
    weights = weights if with_weights else None
    ops = torch.ops.fastpool
    # A small chunk: rows span several chunks (the traced grid gives every chunk its own program).
    with launch.config_override(chunk=8, lanes=2):
        args = (hidden, mask, weights, modes, "triton", normalize_eps, True, True)
        want = ops.pool_fwd(*args)
        got = ops.triton_pool_fwd(*args)
        _assert_same_forward(want, got, hidden.shape[1], 8)
        out, argmax, stats, _, wsum, wmean, prefix = want
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        bwd = (
            grad_out,
            mask,
            weights,
            argmax,
            stats,
            wsum,
            prefix,
            hidden.shape[1],
            hidden.dtype,
            modes,
            "triton",
        )
        assert torch.equal(ops.pool_bwd(*bwd), ops.triton_pool_bwd(*bwd))
        if with_weights:
            d = hidden.shape[2]
            col = modes.split(",").index("weighted_mean") * d
            wargs = (grad_out[:, col : col + d], hidden, mask, weights, wsum, wmean, False, "triton")
            assert torch.equal(ops.weights_bwd(*wargs), ops.triton_weights_bwd(*wargs))


@pytest.mark.parametrize("with_weights", [False, True])
def test_traced_packed_ops_give_the_opaque_ops_bits(device, with_weights):
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(41, 8, generator=gen).to(device)
    cu = torch.tensor([0, 3, 3, 30, 41], dtype=torch.int32, device=device)
    weights = torch.rand(41, generator=gen).to(device) if with_weights else None
    modes = "mean,max,weighted_mean,last"
    ops = torch.ops.fastpool
    with launch.config_override(chunk=8, lanes=2):
        args = (hidden, cu, weights, modes, "triton", -1.0, True, True)
        want = ops.packed_pool_fwd(*args, 27, False)
        got = ops.triton_packed_pool_fwd(*args, -1, False)
        for a, b in zip(want, got, strict=True):
            assert a.shape == b.shape and torch.equal(a, b)
        out, argmax, stats, _, wsum, wmean, _ = want
        grad_out = torch.randn(out.shape, generator=gen).to(device)
        bwd = (grad_out, cu, weights, argmax, stats, wsum, 41, hidden.dtype, modes, "triton", 27)
        assert torch.equal(ops.packed_pool_bwd(*bwd), ops.triton_packed_pool_bwd(*bwd))
        if with_weights:
            wargs = (grad_out[:, 16:24], hidden, cu, weights, wsum, wmean, True, "triton")
            assert torch.equal(ops.weights_bwd(*wargs), ops.triton_weights_bwd(*wargs))


def test_traced_packed_forward_refuses_to_skip_an_offsets_check(device):
    hidden = torch.randn(5, 4, device=device)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="cannot check offsets"):
        torch.ops.fastpool.triton_packed_pool_fwd(
            hidden, cu, None, "mean", "triton", -1.0, False, False, -1, True
        )


def test_the_traced_ops_pass_their_schema_and_autograd_registration_checks(device):
    hidden, mask, weights = _batch(device)
    hidden.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.fastpool.triton_pool_fwd, (hidden, mask, weights, "mean,weighted_mean", "triton", -1.0,
        True, True),
        test_utils=("test_schema", "test_autograd_registration"),
    )  # fmt: skip
