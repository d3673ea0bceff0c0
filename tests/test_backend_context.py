"""``use_backend`` under threads, asyncio tasks, interleaved generators and torch.compile (issue 12 item 6).

The selection belongs to a thread and an asyncio task; each block removes its own entry, whatever
the order in which blocks exit; compiled code traces through the selection and re-traces when it
changes.
"""

import asyncio
import threading

import pytest
import torch

import fastpool
from fastpool.backend import requested_backend


def _selected_in(generator_exit_order: list[int]) -> list[str]:
    def block(name):
        with fastpool.use_backend(name):
            yield
            yield

    seen = []
    gens = [block("torch"), block("triton")]
    for g in gens:
        next(g)  # enter "torch", then "triton"
    seen.append(requested_backend())
    for i in generator_exit_order:
        for _ in gens[i]:  # exhaust: leaves the block
            pass
        seen.append(requested_backend())
    return seen


def test_generators_exiting_out_of_order_remove_their_own_entry(monkeypatch):
    monkeypatch.setenv("FASTPOOL_BACKEND", "auto")
    # The outer block ("torch") exits first: the inner one is still in force, then nothing.
    assert _selected_in([0, 1]) == ["triton", "triton", "auto"]
    assert _selected_in([1, 0]) == ["triton", "torch", "auto"]


def test_each_thread_sees_its_own_selection(monkeypatch):
    monkeypatch.setenv("FASTPOOL_BACKEND", "auto")
    entered = threading.Barrier(3)
    checked = threading.Barrier(3)
    seen = {}

    def worker(name):
        with fastpool.use_backend(name):
            entered.wait()
            seen[name] = requested_backend()
            checked.wait()  # the other thread is still inside its block
        seen[name + " after"] = requested_backend()

    def plain():
        entered.wait()
        seen["plain"] = requested_backend()
        checked.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("torch", "triton")]
    threads.append(threading.Thread(target=plain))
    with fastpool.use_backend("torch"):  # the main thread's selection reaches no other thread
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert requested_backend() == "torch"
    assert seen == {
        "torch": "torch", "triton": "triton", "plain": "auto", "torch after": "auto", "triton after": "auto",
    }  # fmt: skip
    assert requested_backend() == "auto"


def test_each_asyncio_task_sees_its_own_selection(monkeypatch):
    monkeypatch.setenv("FASTPOOL_BACKEND", "auto")

    async def task(name, enter_delay, exit_delay):
        await asyncio.sleep(enter_delay)
        with fastpool.use_backend(name):
            await asyncio.sleep(exit_delay)  # the other task enters and exits meanwhile
            inside = requested_backend()
        return inside, requested_backend()

    async def main():
        with fastpool.use_backend("torch"):
            tasks = (task("triton", 0, 0.05), task("torch", 0.01, 0.01), task("auto", 0.02, 0.06))
            results = await asyncio.gather(*tasks)
            return results, requested_backend()

    results, after = asyncio.run(main())
    # Each task inherits "torch" from main, overrides it, and is back to "torch" after its block.
    assert results == [("triton", "torch"), ("torch", "torch"), ("auto", "torch")]
    assert after == "torch"
    assert requested_backend() == "auto"


def test_exiting_in_another_thread_is_a_clear_error():
    manager = fastpool.use_backend("torch")
    manager.__enter__()
    errors = []

    def leave():
        try:
            manager.__exit__(None, None, None)
        except RuntimeError as error:
            errors.append(str(error))

    t = threading.Thread(target=leave)
    t.start()
    t.join(timeout=60)
    assert requested_backend() == "torch"  # still this thread's selection
    assert errors and errors[0].startswith("use_backend: expected")
    # The block's generator is finished: drop its entry from this thread by hand.
    from fastpool import backend

    backend._entries.set(())
    backend._selected.set("")


def _pool_sum(hidden):
    return fastpool.pool(hidden, mode=["mean", "max"]).sum()


def _record_backends(monkeypatch) -> list[str]:
    """The backend every pool_fwd call runs on (what a compiled graph's op received)."""
    from fastpool import ops

    calls = []
    implementation = ops.forward_impl

    def recording(hidden, mask, weights, modes, backend, *args, **kwargs):
        calls.append(backend)
        return implementation(hidden, mask, weights, modes, backend, *args, **kwargs)

    monkeypatch.setattr(ops, "forward_impl", recording)
    return calls


def test_compiled_code_follows_the_selection_of_each_call_thread_and_task(device, monkeypatch):
    monkeypatch.setenv("FASTPOOL_BACKEND", "torch")
    calls = _record_backends(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(_pool_sum, fullgraph=True, backend="aot_eager", dynamic=False)
    hidden = torch.randn(2, 5, 3, device=device)
    expected = _pool_sum(hidden)
    calls.clear()
    with fastpool.use_backend("triton"):
        torch.testing.assert_close(compiled(hidden), expected)
    torch.testing.assert_close(compiled(hidden), expected)  # a guard fails: re-traced for "torch"
    with fastpool.use_backend("triton"):
        compiled(hidden)  # the cached "triton" graph
    # Each call ran once (the traces themselves run fake tensors, not the implementation).
    assert calls == ["triton", "torch", "triton"]

    def in_thread():
        with fastpool.use_backend("triton"):
            compiled(hidden)
        compiled(hidden)

    calls.clear()
    with fastpool.use_backend("torch"):
        t = threading.Thread(target=in_thread)
        t.start()
        t.join(timeout=120)
    assert calls == ["triton", "torch"]

    async def run(name, delay):
        with fastpool.use_backend(name):
            await asyncio.sleep(delay)  # the other task enters its block meanwhile
            return compiled(hidden)

    async def main():
        # "triton" enters first and calls first, while "torch" (entered later) is still open.
        return await asyncio.gather(run("triton", 0.01), run("torch", 0.05))

    calls.clear()
    for result in asyncio.run(main()):
        torch.testing.assert_close(result, expected)
    assert calls == ["triton", "torch"]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_compiled_code_in_a_selection_calls_that_backend(device, backend_name, monkeypatch):
    calls = _record_backends(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(_pool_sum, fullgraph=True, backend="aot_eager")
    hidden = torch.randn(2, 5, 3, device=device)
    with fastpool.use_backend(backend_name):
        torch.testing.assert_close(compiled(hidden), _pool_sum(hidden))
    assert calls == [backend_name, backend_name]  # compiled, then eager


def _pool_sum_on(name):
    def f(hidden):
        with fastpool.use_backend(name):
            return fastpool.pool(hidden, mode=["mean", "max"]).sum()

    return f


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_a_block_inside_compiled_code_selects_the_backend_of_its_calls(device, backend_name, monkeypatch):
    calls = _record_backends(monkeypatch)
    torch._dynamo.reset()
    other = "torch" if backend_name == "triton" else "triton"
    compiled = torch.compile(_pool_sum_on(backend_name), fullgraph=True, backend="aot_eager")
    hidden = torch.randn(2, 5, 3, device=device)
    with fastpool.use_backend(other):
        torch.testing.assert_close(compiled(hidden), _pool_sum(hidden))
        assert requested_backend() == other  # the traced block left nothing behind
    assert calls == [backend_name, other]
