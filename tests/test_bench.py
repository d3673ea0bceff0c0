"""The benchmark suite (bench/) end to end on CPU, on its tiny preset, plus its building blocks.

The end-to-end run is a subprocess with FASTPOOL_BACKEND=torch and no Triton interpreter, so it
takes seconds; it checks the JSONL rows (every column, plausible values) and the PNG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastpool

BENCH = Path(__file__).resolve().parents[1] / "bench"
COLUMNS = {
    "op", "pass", "dtype", "B", "T", "d", "padding", "layout", "provider", "median_ms", "p20_ms",
    "p80_ms", "gbps", "frac_roofline", "bytes", "backend", "timer", "matches_reference", "device",
    "torch", "triton", "fastpool", "date",
}  # fmt: skip


@pytest.fixture(scope="module")
def bench_modules():
    """Import bench/'s modules the way `python bench/run.py` does (its folder on sys.path)."""
    sys.path.insert(0, str(BENCH))
    try:
        import checks
        import shapes
        import traffic

        yield shapes, traffic, checks
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTPOOL_BACKEND"] = "torch"
    cmd = [sys.executable, str(BENCH / "run.py"), "--preset", "tiny", "--device", "cpu",
           "--out", str(out / "tiny.jsonl"), "--plot", str(out / "tiny.png")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "tiny.jsonl").read_text().splitlines()]
    return rows, out / "tiny.png", proc.stdout


def test_tiny_preset_rows(tiny_run, bench_modules):
    rows, _, stdout = tiny_run
    shapes, traffic, _ = bench_modules
    assert rows, "no rows written"
    cases = shapes.PRESETS["tiny"].cases()
    assert len(rows) == 2 * len(cases)  # fastpool and eager, no roofline on CPU
    for row in rows:
        assert COLUMNS <= row.keys(), COLUMNS - row.keys()
        assert row["provider"] in ("fastpool", "eager")
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] < 10_000
        assert row["gbps"] > 0 and row["bytes"] > 0
        assert row["frac_roofline"] is None  # no roofline on CPU
        assert row["device"].startswith("CPU") and row["fastpool"] == fastpool.__version__
        if row["provider"] == "fastpool":
            assert row["backend"] == "torch" and row["matches_reference"] is True
    # Every case has both providers, and its bytes follow bench/traffic.py's formula.
    by_case = {}
    for row in rows:
        by_case.setdefault((row["op"], row["pass"], row["padding"], row["layout"]), set()).add(
            row["provider"]
        )
    assert all(v == {"fastpool", "eager"} for v in by_case.values())
    mean_fwd = next(r for r in rows if (r["op"], r["pass"], r["padding"]) == ("mean", "fwd", 0.0))
    B, T, d = mean_fwd["B"], mean_fwd["T"], mean_fwd["d"]
    assert mean_fwd["bytes"] == B * T * d * 4 + B * T * 8 + B * d * 4  # hidden + int64 mask + output
    assert "fastpool" in stdout and "vs eager" in stdout  # the terminal table


def test_tiny_preset_plot(tiny_run):
    _, png, _ = tiny_run
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_masks_are_deterministic_and_padded_as_asked(bench_modules):
    shapes, _, _ = bench_modules
    for layout in shapes.LAYOUTS:
        a = shapes.make_mask(64, 256, 0.5, layout, seed=3)
        assert torch.equal(a, shapes.make_mask(64, 256, 0.5, layout, seed=3))
        assert abs(float((a == 0).float().mean()) - 0.5) < 0.1
        assert bool((a.sum(1) >= 1).all())  # every row keeps a real token
    left = shapes.make_mask(8, 32, 0.25, "left", seed=0)
    assert bool((left[:, -1] == 1).all())  # left padding: real tokens end the row
    assert bool((shapes.make_mask(4, 16, 0.0, "holes", seed=0) == 1).all())


def test_traffic_counts_real_tokens_only(bench_modules):
    _, traffic, _ = bench_modules
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])
    es, mask_bytes = 2, 8 * 8
    fwd = traffic.minimal_bytes("mean", "fwd", 2, 4, 16, torch.bfloat16, mask)
    assert fwd == 4 * 16 * es + mask_bytes + 2 * 16 * es
    bwd = traffic.minimal_bytes("mean+max", "bwd", 2, 4, 16, torch.bfloat16, mask)
    assert bwd == 2 * 4 * 16 * es + 2 * 2 * 16 * es + mask_bytes
    assert traffic.minimal_bytes("mean", "fwd+bwd", 2, 4, 16, torch.bfloat16, mask) == fwd + bwd - 2 * 16 * es
    assert (
        traffic.minimal_bytes("last", "fwd", 2, 4, 16, torch.bfloat16, mask)
        == 2 * 16 * es + mask_bytes + 2 * 16 * es
    )


def test_gpu_preset_grid_is_sized_for_minutes(bench_modules):
    shapes, _, _ = bench_modules
    cases = shapes.PRESETS["gpu"].cases()
    assert 60 <= len(cases) <= 200
    assert len(shapes.serving_shapes()) == 55
    assert {d for _, _, d in shapes.serving_shapes()} == {384, 768, 1024, 4096}
    keys = {(c.op, c.pass_, c.B, c.T, c.d, c.dtype, c.padding, c.layout) for c in cases}
    assert ("mean", "fwd", 64, 512, 1024, "bfloat16", 0.5, "right") in keys  # the shape
    assert len(keys) == len(cases)  # overlapping blocks are measured once


def test_a_wrong_provider_is_caught(bench_modules):
    shapes, _, checks = bench_modules

    class Broken(checks.Provider):
        name = "fastpool"

        def fn(self, op):
            return lambda h, m: fastpool.last_token_pool(h, None)  # ignores the mask

    case = shapes.Case("t", "last", "fwd", 3, 8, 4, "float32", 0.5, "right")
    hidden, mask = shapes.make_inputs(case, torch.device("cpu"))
    with fastpool.use_backend("torch"), pytest.raises(checks.MismatchError):
        checks.check_forward(case, [Broken(torch.device("cpu"))], hidden, mask)
    # The eager cls idiom is wrong under left padding: recorded, not raised.
    case = shapes.Case("t", "cls", "fwd", 3, 8, 4, "float32", 0.5, "left")
    hidden, mask = shapes.make_inputs(case, torch.device("cpu"))
    eager = checks.EAGER  # the module checks imported from providers
    assert eager["cls"] is not None

    class Eager(checks.Provider):
        name = "eager"

        def fn(self, op):
            return eager[op]

    assert checks.check_forward(case, [Eager(torch.device("cpu"))], hidden, mask) == {"eager": False}
