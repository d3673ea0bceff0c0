"""fastpool.distributed.pool on 3 processes (gloo on 127.0.0.1, spawned here, every wait bounded):
uneven shards with an empty one, even shards, left/right padding and holes across shard boundaries,
every mode, user weights, normalisation, gradients, the same bits on every rank, the DTensor path."""

import io
import multiprocessing
import os
import queue as queue_module

import distributed_worker
import oracle
import pytest
import torch
from filelock import FileLock
from helpers import np_mask, to_numpy
from tolerances import REDUCTION, for_mode

import fastpool

WORLD = 3
TIMEOUT_S = 600


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def spawn_ranks(init_file: str) -> dict:
    """{rank: results} from one spawned run of every scenario on WORLD processes."""
    ctx = multiprocessing.get_context("spawn")
    results_queue = ctx.Queue()
    processes = [
        ctx.Process(target=distributed_worker.main, args=(r, WORLD, init_file, results_queue), daemon=True)
        for r in range(WORLD)
    ]
    for p in processes:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(WORLD):
            rank, result, error = results_queue.get(timeout=TIMEOUT_S)
            if error:
                errors.append(f"rank {rank}:\n{error}")
            results[rank] = None if result is None else torch.load(io.BytesIO(result), weights_only=False)
    except queue_module.Empty:
        errors.append(f"no result within {TIMEOUT_S} s from ranks {sorted(set(range(WORLD)) - set(results))}")
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert not errors, "\n".join(errors)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The ranks' results, spawned once per test session: xdist workers share them through a file."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required")
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's directory, shared by its workers
    data = root / "fastpool-distributed-results.pt"
    with FileLock(str(root / "fastpool-distributed.lock")):
        if data.is_file():
            return torch.load(data, weights_only=False)
        store = root / "fastpool-distributed-store"
        store.unlink(missing_ok=True)
        results = spawn_ranks(str(store))
        torch.save(results, data)
        return results


def expected(scenario: str, backend: str):
    """(out, index or None, grads of the whole batch) of one-shot pooling on one device."""
    hidden, mask, weights, modes, _, kwargs = distributed_worker.full_batch(scenario)
    h = hidden.clone().requires_grad_()
    w = None if weights is None else weights.clone().requires_grad_()
    with fastpool.use_backend(backend):
        out = fastpool.pool(h, mask, modes, weights=w, normalize=kwargs.get("normalize", False))
        index = (
            fastpool.max_pool(hidden, mask, return_indices=True)[1] if kwargs.get("return_indices") else None
        )
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (h,) if w is None else (h, w), grad_out.to(out.dtype))
    return out.detach(), index, grads


SCENARIOS = ("uneven-empty-shard", "even-left-padding-weights", "normalize-right-padding-bf16")


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rank_gets_the_one_device_result_with_the_same_bits(ranks, scenario, backend_name):
    hidden, mask, weights, modes, cuts, kwargs = distributed_worker.full_batch(scenario)
    outs = [ranks[r][scenario][backend_name]["out"] for r in range(WORLD)]
    for r in range(1, WORLD):
        assert same_bits(outs[r], outs[0]), f"rank {r} differs from rank 0"
    want, want_index, _ = expected(scenario, backend_name)
    d = hidden.shape[2]
    for i, mode in enumerate(modes):
        block = slice(i * d, (i + 1) * d)
        torch.testing.assert_close(outs[0][:, block], want[:, block], **for_mode(mode, hidden.dtype))
    if not kwargs.get("normalize"):
        h, m, w = to_numpy(hidden), np_mask(mask), to_numpy(weights)
        for i, mode in enumerate(modes):
            oracle_out = torch.from_numpy(oracle.pool(h, m, mode, w)).to(hidden.dtype)
            torch.testing.assert_close(
                outs[0][:, i * d : (i + 1) * d], oracle_out, **for_mode(mode, hidden.dtype)
            )
    if want_index is not None:
        for r in range(WORLD):
            assert torch.equal(ranks[r][scenario][backend_name]["index"], want_index)  # global positions


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_rank_gets_the_gradient_of_its_own_shard_once(ranks, scenario, backend_name):
    hidden, mask, weights, modes, cuts, _ = distributed_worker.full_batch(scenario)
    _, _, want = expected(scenario, backend_name)
    tol = REDUCTION[hidden.dtype]
    for k, full in enumerate(want):
        got = torch.cat([ranks[r][scenario][backend_name]["grads"][k] for r in range(WORLD)], dim=1)
        assert got.shape == full.shape
        torch.testing.assert_close(got, full, **tol)


def test_max_cls_last_gradients_reach_only_the_owning_rank(ranks):
    """Scenario 1, row 1: its only real token is on rank 2; ranks 0 and 1 get exactly zero there."""
    for backend_name in ("torch", "triton"):
        for r in (0, 1):
            grad = ranks[r]["uneven-empty-shard"][backend_name]["grads"][0]
            assert torch.equal(grad[1], torch.zeros_like(grad[1]))
        assert ranks[2]["uneven-empty-shard"][backend_name]["grads"][0][1].abs().sum() > 0


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_dtensor_sharded_on_the_sequence_gives_a_replicated_dtensor(ranks, backend_name):
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 8, 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 8, generator=gen) < 0.7
    h = hidden.clone().requires_grad_()
    with fastpool.use_backend(backend_name):
        want = fastpool.pool(h, mask, ["mean", "max"])
        want_index = fastpool.max_pool(hidden, mask, return_indices=True)[1]
    (want_grad,) = torch.autograd.grad(want.sum(), h)
    widths = [ranks[r]["dtensor"][backend_name]["local_width"] for r in range(WORLD)]
    assert widths == [3, 3, 2]
    for r in range(WORLD):
        res = ranks[r]["dtensor"][backend_name]
        assert res["replicated"] and res["grad_sharded"]
        assert same_bits(res["out"], ranks[0]["dtensor"][backend_name]["out"])
        torch.testing.assert_close(res["out"], want, **REDUCTION[torch.float64])
        assert torch.equal(res["index"], want_index)
    grad = torch.cat([ranks[r]["dtensor"][backend_name]["grad"] for r in range(WORLD)], dim=1)
    torch.testing.assert_close(grad, want_grad, **REDUCTION[torch.float64])


def test_mismatched_ranks_all_get_the_same_clear_error(ranks):
    messages = [ranks[r]["mismatch"] for r in range(WORLD)]
    assert all(m.endswith(f"(this is rank {r})") for r, m in enumerate(messages)), messages
    messages = [m.rsplit(" (this is rank", 1)[0] for m in messages]
    assert len(set(messages)) == 1 and messages[0].startswith("hidden: expected every rank"), messages
    assert "batch size" in messages[0] and "[2, 3, 2]" in messages[0]


def test_without_a_process_group_the_error_is_clear():
    import fastpool.distributed

    with pytest.raises(RuntimeError, match="^group: expected an initialized torch.distributed"):
        fastpool.distributed.pool(torch.randn(1, 2, 3))
