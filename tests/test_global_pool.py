"""fastpool.global_pool against the float64 oracle and torch, on both backends, in every layout."""

import contextlib

import oracle
import pytest
import torch
from helpers import to_numpy
from tolerances import EXACT, REDUCTION
from torch._dynamo.testing import CompileCounter

import fastpool
from fastpool import global_pool_launchers

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed")
# Blocks and chunks small enough that interpreter shapes cross several channel blocks, loop
# iterations and spatial chunks (the chunk fold); "default" is the launcher's own choice.
CONFIGS = {"default": {}, "split": dict(block_c=2, block_s=4, chunk_len=8)}


@contextlib.contextmanager
def launch_config(name):
    saved = dict(global_pool_launchers.OVERRIDE)
    global_pool_launchers.OVERRIDE.update(CONFIGS[name])
    try:
        yield
    finally:
        global_pool_launchers.OVERRIDE.clear()
        global_pool_launchers.OVERRIDE.update(saved)


def feature_map(shape, layout, dtype, gen):
    """A (B, C, *spatial) tensor of ``shape`` in one memory layout (values from randn)."""
    spatial = len(shape) - 2
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":  # C is the unit-stride axis
        order = (0, *range(2, 2 + spatial), 1)
        base = torch.randn([shape[i] for i in order], generator=gen).to(dtype)
        return base.permute(0, spatial + 1, *range(1, spatial + 1))
    if layout == "sliced":  # every axis strided, spatial dims not mergeable
        base = torch.randn([shape[0], 2 * shape[1]] + [2 * n + 1 for n in shape[2:]], generator=gen).to(dtype)
        return base[(slice(None), slice(None, None, 2)) + tuple(slice(1, None, 2) for _ in shape[2:])]
    # transposed: spatial dims swapped in memory (the logical order is not the memory order)
    if spatial == 1:
        return torch.randn(shape[1], shape[0], shape[2], generator=gen).to(dtype).transpose(0, 1)
    base = torch.randn([*shape[:2], *reversed(shape[2:])], generator=gen).to(dtype)
    return base.transpose(2, -1)


def expected(x, modes):
    ref = [torch.from_numpy(oracle.global_pool(to_numpy(x), m)).to(x.dtype) for m in modes]
    return torch.cat(ref, dim=1)


def check_blocks(out, ref, modes, dtype):
    C = out.shape[1] // len(modes)
    for i, mode in enumerate(modes):
        tol = REDUCTION[dtype] if mode == "mean" else EXACT
        torch.testing.assert_close(out[:, i * C : (i + 1) * C], ref[:, i * C : (i + 1) * C], **tol)


SHAPES = {1: (2, 5, 11), 2: (3, 6, 5, 7), 3: (2, 3, 3, 2, 5)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_oracle_in_every_layout(device, backend, dtype, layout):
    gen = torch.Generator().manual_seed(1)
    modes = ["mean", "max"]
    for shape in SHAPES.values():
        x = feature_map(shape, layout, dtype, gen)
        assert x.shape == shape
        out = fastpool.global_pool(x.to(device), modes)
        assert out.shape == (shape[0], 2 * shape[1]) and out.dtype == dtype
        check_blocks(out.cpu(), expected(x, modes), modes, dtype)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_split_and_blocked_launches_match_oracle_with_gradients(device, config, layout):
    gen = torch.Generator().manual_seed(2)
    modes = ["max", "mean"]
    with fastpool.use_backend("triton"), launch_config(config):
        for shape in [(2, 5, 19), (2, 3, 5, 5), (1, 3, 2, 3, 3)]:
            x = feature_map(shape, layout, torch.float32, gen).to(device)
            xg = x.detach().requires_grad_()
            out = fastpool.global_pool(xg, modes)
            check_blocks(out.detach().cpu(), expected(x.cpu(), modes), modes, torch.float32)
            g = torch.randn(out.shape, generator=gen).to(device)
            (grad,) = torch.autograd.grad(out, xg, g)
            ref = oracle.global_pool_grad(to_numpy(x), modes, to_numpy(g))
            torch.testing.assert_close(grad.cpu().double(), torch.from_numpy(ref), **REDUCTION[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_matches_oracle_and_keeps_memory_format(device, backend, dtype):
    gen = torch.Generator().manual_seed(3)
    for layout, fmt in [("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)]:
        for modes in (["mean"], ["max"], ["mean", "max"]):
            x = feature_map((2, 4, 3, 5), layout, dtype, gen).to(device).requires_grad_()
            out = fastpool.global_pool(x, modes)
            g = torch.randn(out.shape, generator=gen).to(dtype).to(device)
            (grad,) = torch.autograd.grad(out, x, g)
            assert grad.dtype == dtype and grad.is_contiguous(memory_format=fmt)
            ref = torch.from_numpy(oracle.global_pool_grad(to_numpy(x), modes, to_numpy(g))).to(dtype)
            torch.testing.assert_close(grad.cpu(), ref, **REDUCTION[dtype])


def test_equals_torch_formulations(device, backend):
    gen = torch.Generator().manual_seed(4)
    x2 = torch.randn(3, 8, 7, 7, generator=gen).to(device)
    torch.testing.assert_close(fastpool.global_pool(x2), torch.nn.AdaptiveAvgPool2d((1, 1))(x2).flatten(1))
    torch.testing.assert_close(fastpool.global_pool(x2), x2.flatten(2).mean(-1))
    assert torch.equal(fastpool.global_pool(x2, "max"), x2.flatten(2).amax(-1))
    assert torch.equal(fastpool.global_pool(x2, "max"), torch.nn.AdaptiveMaxPool2d(1)(x2).flatten(1))
    x1 = torch.randn(2, 5, 9, generator=gen).to(device)
    torch.testing.assert_close(fastpool.global_pool(x1), torch.nn.AdaptiveAvgPool1d(1)(x1).flatten(1))
    x3 = torch.randn(2, 3, 4, 3, 5, generator=gen).to(device).to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(fastpool.global_pool(x3), torch.nn.AdaptiveAvgPool3d(1)(x3).flatten(1))
    both = fastpool.global_pool(x2, ("max", "mean"))
    assert torch.equal(both[:, :8], x2.flatten(2).amax(-1))
    torch.testing.assert_close(both[:, 8:], x2.flatten(2).mean(-1))


def test_fp16_mean_accumulates_in_float32(device, backend):
    # 64 x 64 values of 1000: a float16 running sum would overflow at 65504.
    x = torch.full((1, 2, 64, 64), 1000.0, dtype=torch.float16, device=device)
    x[0, 1] = 0.1
    out = fastpool.global_pool(x)
    assert out[0, 0].item() == 1000.0
    assert out[0, 1].item() == torch.tensor(0.1, dtype=torch.float16).item()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN under the interpreter
def test_nan_and_inf_propagate_as_in_torch(device, backend):
    x = torch.randn(2, 4, 3, 3)
    x[0, 0, 1, 2] = float("nan")
    x[0, 0, 2, 0] = float("nan")
    x[0, 1, 0, 1] = float("inf")
    x[0, 2, 1, 1] = float("inf")
    x[0, 2, 2, 2] = -float("inf")
    x[1, 3] = -float("inf")
    xd = x.to(device).requires_grad_()
    out = fastpool.global_pool(xd, ["mean", "max"])
    ref = torch.cat([x.flatten(2).mean(-1), x.flatten(2).amax(-1)], 1)
    torch.testing.assert_close(out.detach().cpu(), ref, equal_nan=True)
    assert torch.isnan(out[0, 4]) and out[0, 5] == float("inf") and out[1, 7] == -float("inf")
    (grad,) = torch.autograd.grad(out[:, 4:].sum(), xd)
    grad = grad.cpu()
    assert grad[0, 0, 1, 2] == 1 and grad[0, 0].sum() == 1  # the first NaN takes the max's gradient
    assert grad[1, 3, 0, 0] == 1 and grad[1, 3].sum() == 1  # all -inf: the first position


def test_max_gradient_goes_to_the_first_of_tied_maxima(device, backend):
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 1, 3] = x[0, 0, 3, 0] = 5.0
    x[0, 1] = 2.0  # every position ties
    for fmt in (torch.contiguous_format, torch.channels_last):
        xd = x.clone().to(device).to(memory_format=fmt).requires_grad_()
        (grad,) = torch.autograd.grad(fastpool.global_pool(xd, "max").sum(), xd)
        ref = torch.from_numpy(oracle.global_pool_grad(x.numpy(), ["max"], torch.ones(1, 2).numpy()))
        assert torch.equal(grad.cpu().double(), ref)
        assert grad[0, 0, 1, 3] == 1 and grad[0, 1, 0, 0] == 1


def test_empty_dimensions(device, backend):
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (0, 0, 5)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        out = fastpool.global_pool(x, ["mean", "max"])
        assert out.shape == (shape[0], 2 * shape[1])
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.shape == x.shape
    x = torch.randn(2, 3, 0, 4, device=device, requires_grad=True)
    out = fastpool.global_pool(x)
    assert out.shape == (2, 3) and torch.isnan(out).all()  # as x.flatten(2).mean(-1)
    assert torch.isnan(x.detach().flatten(2).mean(-1)).all()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape
    with pytest.raises(ValueError, match="x: mode 'max' needs at least one spatial position"):
        fastpool.global_pool(x, "max")


def test_batch_invariance(device, backend):
    gen = torch.Generator().manual_seed(5)
    for layout in ("contiguous", "channels_last"):
        x = feature_map((6, 5, 9, 9), layout, torch.bfloat16, gen).to(device)
        full = fastpool.global_pool(x, ["mean", "max"])
        for rows in (slice(2, 3), slice(1, 5)):
            assert torch.equal(full[rows], fastpool.global_pool(x[rows], ["mean", "max"]))


def test_split_launch_is_batch_invariant_and_deterministic(device):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 21, generator=gen).to(device)
    with fastpool.use_backend("triton"), launch_config("split"):
        full = fastpool.global_pool(x)
        assert torch.equal(full, fastpool.global_pool(x))
        assert torch.equal(full[1:2], fastpool.global_pool(x[1:2]))


@pytest.mark.parametrize("modes", [["mean"], ["max"], ["max", "mean"]], ids=",".join)
def test_gradcheck_float64(device, backend, modes):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 2, 3, generator=gen, dtype=torch.float64).to(device)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: fastpool.global_pool(t, modes), (x,), fast_mode=backend == "triton"
    )


def test_double_backward(device, backend):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    pool = lambda t: fastpool.global_pool(t, ["mean", "max"])  # noqa: E731
    assert torch.autograd.gradgradcheck(pool, (x,), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("modes", ["mean", "max,mean"])
def test_opcheck(device, backend_name, modes):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 5, generator=gen).to(device).to(memory_format=torch.channels_last)
    args = (x.requires_grad_(), modes, backend_name)
    torch.library.opcheck(torch.ops.fastpool.global_pool_fwd.default, args)
    out, argmax = torch.ops.fastpool.global_pool_fwd(x.detach(), modes, backend_name)
    bwd = (torch.randn_like(out), argmax, list(x.shape), list(x.stride()), x.dtype, modes, backend_name)
    torch.library.opcheck(torch.ops.fastpool.global_pool_bwd.default, bwd)


def global_loss(x):
    return fastpool.global_pool(x, ["mean", "max"]).square().sum()


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fullgraph_compile_matches_eager(device, backend_name):
    counter = CompileCounter()
    compiled = torch.compile(global_loss, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(10)
    with fastpool.use_backend(backend_name):
        for shape in [(2, 3, 4, 5), (3, 5, 6, 2), (4, 2, 3, 3)]:
            x = torch.randn(shape, generator=gen).to(device).to(memory_format=torch.channels_last)
            x.requires_grad_()
            loss = compiled(x)
            (grad,) = torch.autograd.grad(loss, x)
            ref = global_loss(x)
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(grad, torch.autograd.grad(ref, x)[0])
            assert grad.is_contiguous(memory_format=torch.channels_last)
    assert counter.frame_count <= 2


@pytest.mark.parametrize(
    "x,mode,error,message",
    [
        ([1.0], "mean", TypeError, "x: expected a torch.Tensor"),
        (torch.zeros(2, 3), "mean", ValueError, "x: expected 3, 4 or 5 dimensions"),
        (torch.zeros(2, 3, 1, 1, 1, 1), "mean", ValueError, "x: expected 3, 4 or 5 dimensions"),
        (torch.zeros(2, 3, 4, dtype=torch.int64), "mean", TypeError, "x: expected dtype float16"),
        (torch.zeros(2, 3, 4), "sum", ValueError, "mode: expected 'mean' or 'max', got 'sum'"),
        (torch.zeros(2, 3, 4), "cls", ValueError, "mode: expected 'mean' or 'max'"),
        (torch.zeros(2, 3, 4), ["mean", "mean"], ValueError, "mode: expected each mode at most once"),
        (torch.zeros(2, 3, 4), [], ValueError, "mode: expected 'mean', 'max' or a sequence"),
        (torch.zeros(2, 3, 4), 3, TypeError, "mode: expected 'mean', 'max' or a sequence"),
    ],
)
def test_bad_input_names_the_argument(x, mode, error, message):
    with pytest.raises(error) as info:
        fastpool.global_pool(x, mode)
    assert str(info.value).startswith(message), str(info.value)


def test_global_pooling_module(device, backend):
    x = torch.randn(2, 4, 3, 3, device=device)
    module = fastpool.nn.GlobalPooling(["mean", "max"])
    assert torch.equal(module(x), fastpool.global_pool(x, ["mean", "max"]))
    assert list(module.parameters()) == [] and "mean" in repr(module)


def test_full_tiles_the_launcher_picks_are_compiled_ahead_of_time():
    from fastpool import aot

    specs = {
        (s.kernel, s.label.split()[1], s.constexprs.get("BLOCK_C"), s.constexprs.get("BLOCK_S"))
        for s in aot.global_pool_specializations()
    }
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    for dtype, name in names.items():
        size = torch.empty((), dtype=dtype).element_size()
        for C, S in [(2048, 49 * 64), (512, 112 * 112)]:  # channel and spatial extents past a full tile
            for s_fast in (True, False):
                for with_max in (False, True):
                    cfg = global_pool_launchers.config(C, S, size, s_fast, with_max)
                    assert ("global_pool_forward_kernel", name, cfg.block_c, cfg.block_s) in specs
                    assert cfg.n_chunks * cfg.chunk_len >= S and cfg.chunk_len % cfg.block_s == 0
                bwd = global_pool_launchers.config(C, S, size, s_fast, False)
                assert ("global_pool_backward_kernel", name, bwd.block_c, bwd.block_s) in specs
    assert global_pool_launchers.config(8, 2**30, 2, True, False).n_chunks <= 65535
