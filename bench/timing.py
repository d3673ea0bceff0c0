"""Timers and the measured rooflines.

CUDA: every case is timed three ways, side by side (``measure_views``):
- ``median_ms``: per call, L2 flushed before each call, then the device synchronised, then timed
  with events around the call. The device is idle when the start event is recorded, so the host
  work of the call (Python, launches) is inside the measurement: unlike ``triton.testing.do_bench``,
  whose flush kernel keeps the device busy while the host prepares the next call, the flush here
  cannot hide host time.
- ``wall_ms``: back-to-back calls timed by the host clock between two synchronisations, host
  included, L2 warm (what a serving loop sees).
- ``graph_ms``: the call replayed as a CUDA graph (no host work), when it can be captured.
CPU: the providers of a case timed in alternation (``measure_interleaved``; on one intra-op thread
in the thread's CPU time), or one callable with a ``torch.utils.benchmark.Timer`` (``measure``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# Roofline buffers: far larger than any L2 (50 MB on H100, 60 MB on H200) so DRAM is what is measured.
ROOFLINE_BYTES = 2 * 2**30
# Written before each flushed timing: larger than the L2 of any current GPU.
FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    """Median and 20th / 80th percentiles of one callable's time, in milliseconds; on CUDA also the
    wall-clock and CUDA-graph medians (None where not measured)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str
    wall_ms: float | None = None
    graph_ms: float | None = None


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    quick: bool = False,
    min_run_time: float = 0.2,
    cudagraph: bool = False,
) -> Timing:
    """Time ``fn`` on ``device``. Grad mode is the caller's (wrap in torch.no_grad for forwards).

    CUDA: ``measure_views`` (host-inclusive flushed events, wall clock, and the CUDA graph when
    ``cudagraph`` is set and ``fn`` can be captured). CPU: a ``torch.utils.benchmark.Timer`` with all
    of torch's threads, as a user's process would run.
    """
    if device.type == "cuda":
        return measure_views(fn, quick=quick, cudagraph=cudagraph)

    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time / 4 if quick else min_run_time)
    p20, p80 = np.percentile(np.asarray(m.times) * 1e3, [20, 80])
    return Timing(float(m.median * 1e3), float(p20), float(p80), timer="torch.utils.benchmark")


def measure_interleaved(
    fns: dict[str, Callable[[], object]], *, quick: bool = False, min_run_time: float = 0.2
) -> dict[str, Timing]:
    """CPU: time several callables (the providers of one case) in alternation, so that a change in
    the machine's load (other processes on a shared CPU) hits them alike and their ratios stay
    put. Each callable runs ``rounds`` blocks of about ``min_run_time / rounds`` seconds, the blocks
    of all callables interleaved; median and 20th / 80th percentiles are over its blocks' per-call
    times. On one intra-op thread the clock is the thread's CPU time, else wall time. Grad mode is
    the caller's.
    """
    # One intra-op thread runs every op on the calling thread: its CPU time is the op's time without
    # the time other processes held the core (what a shared CPU adds). With more threads a blocked
    # sibling stalls each parallel region, so only wall time is meaningful there.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    rounds = 4 if quick else 10
    block_s = (min_run_time / 4 if quick else min_run_time) / rounds
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        fn()  # warm-up: allocator, caches, lazy initialisation
        start = clock()
        fn()
        once = max(clock() - start, 1e-6)
        calls[name] = max(1, int(block_s / once))
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            for _ in range(calls[name]):
                fn()
            per_call[name].append((clock() - start) / calls[name] * 1e3)
    out = {}
    for name, times in per_call.items():
        median, p20, p80 = np.percentile(np.asarray(times), [50, 20, 80])
        timer = "interleaved thread_time" if clock is time.thread_time else "interleaved wall"
        out[name] = Timing(float(median), float(p20), float(p80), timer=timer)
    return out


def measure_views(fn: Callable[[], object], *, quick: bool = False, cudagraph: bool = True) -> Timing:
    """The three CUDA views of one call (module docstring): flushed host-inclusive events, wall clock,
    CUDA graph."""
    reps = 25 if quick else 100
    for _ in range(3):
        fn()  # compile, allocate, warm the caches of the launch path
    torch.cuda.synchronize()
    flushed = np.asarray(flushed_event_times(fn, reps))
    wall = wall_clock_times(fn, 5 if quick else 15, 10)
    graph = None
    if cudagraph:
        try:
            import triton.testing

            graph = float(triton.testing.do_bench_cudagraph(fn, rep=reps, quantiles=[0.5])[0])
        except Exception:  # noqa: BLE001 - capture of some callables (autograd, compile) may fail
            torch.cuda.synchronize()
    p20, p50, p80 = np.percentile(flushed, [20, 50, 80])
    return Timing(float(p50), float(p20), float(p80), "events+sync", float(np.median(wall)), graph)


def flushed_event_times(fn: Callable[[], object], reps: int) -> list[float]:
    """ms per call: flush L2, synchronise, then events around the call. The start event is recorded on
    an idle device, so the call's host time counts."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def wall_clock_times(fn: Callable[[], object], samples: int, calls: int) -> list[float]:
    """ms per call of ``calls`` back-to-back calls between two synchronisations (host included)."""
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1e3 / calls)
    return times


def measure_rooflines(device: torch.device, quick: bool = False) -> dict[str, tuple[Timing, int]]:
    """Measure copy, read-only and write-only bandwidth on ``device``: {name: (timing, bytes moved)}.

    copy counts the bytes read plus written (``dst.copy_(src)``); read is the faster of ``sum`` and
    ``amax`` over a bf16 tensor (both stream it once); write is ``fill_``. CUDA only: on CPU the
    suite reports no roofline.
    """
    if device.type != "cuda":
        return {}
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    out = _stream_timings(device, max(ROOFLINE_BYTES, 4 * l2), quick)
    torch.cuda.empty_cache()
    return out


def _stream_timings(device: torch.device, n_bytes: int, quick: bool) -> dict[str, tuple[Timing, int]]:
    # Its own scope, so the two buffers are freed on return, before the pooling grid allocates.
    src = torch.randn(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    reads = [
        measure(lambda: src.sum(), device, quick=quick),
        measure(lambda: src.amax(), device, quick=quick),
    ]
    return {
        "copy": (measure(lambda: dst.copy_(src), device, quick=quick), 2 * n_bytes),
        "read": (min(reads, key=lambda t: t.median_ms), n_bytes),
        "fill": (measure(lambda: dst.fill_(1.0), device, quick=quick), n_bytes),
    }
