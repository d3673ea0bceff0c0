"""The body of one rank in tests/test_distributed.py (spawned processes, gloo on 127.0.0.1).

Each scenario builds the same full batch on every rank from a fixed seed, pools this rank's shard
with fastpool.distributed.pool and sends back (out, indices, gradients) for the parent to check.
"""

import datetime
import io
import os
import traceback

import torch
import torch.distributed as dist

ALL_MODES = ["max", "last", "weighted_mean", "mean_sqrt_len", "mean", "cls"]


def full_batch(scenario: str):
    """(hidden, mask, weights, modes, cuts, kwargs) of a scenario, identical on every rank."""
    gen = torch.Generator().manual_seed(sum(map(ord, scenario)))
    if scenario == "uneven-empty-shard":
        B, T, d = 3, 20, 4
        mask = torch.rand(B, T, generator=gen) < 0.6
        mask[1] = False
        mask[1, 12] = True  # a row whose only real token is on the last rank
        return (torch.randn(B, T, d, generator=gen, dtype=torch.float64), mask, None, ALL_MODES,
                [0, 7, 7, 20], dict(return_indices=True))  # fmt: skip
    if scenario == "even-left-padding-weights":
        B, T, d = 3, 18, 5
        lengths = torch.tensor([18, 9, 2])  # rows whose padding covers whole shards
        mask = torch.arange(T)[None, :] >= (T - lengths)[:, None]
        weights = torch.rand(B, T, generator=gen, dtype=torch.float64) + 0.25
        return (torch.randn(B, T, d, generator=gen, dtype=torch.float64), mask, weights,
                ["weighted_mean", "max", "mean"], [0, 6, 12, 18], dict(return_indices=True))  # fmt: skip
    if scenario == "normalize-right-padding-bf16":
        B, T, d = 2, 11, 6
        mask = torch.arange(T)[None, :] < torch.tensor([[11], [5]])
        return (torch.randn(B, T, d, generator=gen).to(torch.bfloat16), mask, None,
                ["mean", "cls", "last", "weighted_mean"], [0, 4, 8, 11], dict(normalize=True))  # fmt: skip
    raise ValueError(scenario)


def _shard_of(t: torch.Tensor | None, a: int, b: int):
    return None if t is None else t[:, a:b]


def run_scenario(scenario: str, rank: int) -> dict:
    import fastpool.distributed

    hidden, mask, weights, modes, cuts, kwargs = full_batch(scenario)
    a, b = cuts[rank], cuts[rank + 1]
    results = {}
    for backend in ("torch", "triton"):
        with fastpool.use_backend(backend):
            h = hidden[:, a:b].clone().requires_grad_()
            w = None if weights is None else weights[:, a:b].clone().requires_grad_()
            result = fastpool.distributed.pool(h, _shard_of(mask, a, b), modes, weights=w, **kwargs)
            out, index = result if kwargs.get("return_indices") else (result, None)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            inputs = (h,) if w is None else (h, w)
            grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
            results[backend] = dict(out=out.detach(), index=index, grads=[g.detach() for g in grads])
    return results


def run_dtensor(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastpool
    import fastpool.distributed

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 8, 3, generator=gen, dtype=torch.float64)  # shards of 3, 3, 2 tokens
    mask = torch.rand(2, 8, generator=gen) < 0.7
    results = {}
    for backend in ("torch", "triton"):
        with fastpool.use_backend(backend):
            dh = distribute_tensor(hidden, mesh, [Shard(1)]).requires_grad_()
            dm = distribute_tensor(mask, mesh, [Shard(1)])
            out, index = fastpool.distributed.pool(dh, dm, ["mean", "max"], return_indices=True)
            out.sum().backward()
            results[backend] = dict(
                out=out.to_local().detach(), index=index.to_local(),
                replicated=out.placements == (Replicate(),), grad=dh.grad.to_local(),
                grad_sharded=dh.grad.placements == (Shard(1),), local_width=dh.to_local().shape[1],
            )  # fmt: skip
    return results


def run_mismatch(rank: int) -> str:
    """Rank 1 pools a different batch size: every rank must raise the same clear error."""
    import fastpool.distributed

    hidden = torch.randn(3 if rank == 1 else 2, 4, 2)
    try:
        fastpool.distributed.pool(hidden)
    except ValueError as error:
        return str(error)
    return "no error"


def main(rank: int, world: int, init_file: str, queue) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )  # fmt: skip
        results = {
            scenario: run_scenario(scenario, rank)
            for scenario in (
                "uneven-empty-shard",
                "even-left-padding-weights",
                "normalize-right-padding-bf16",
            )
        }
        results["dtensor"] = run_dtensor(rank, world)
        results["mismatch"] = run_mismatch(rank)
        dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(results, buffer)  # by value: no shared memory outliving this process
        queue.put((rank, buffer.getvalue(), None))
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put((rank, None, traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()
        os._exit(0)  # no lingering gloo threads
