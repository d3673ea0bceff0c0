"""The benchmark suite (bench/) end to end on CPU, on its tiny preset, plus its building blocks.

The end-to-end run is a subprocess with FASTPOOL_BACKEND=torch and no Triton interpreter, so it
takes seconds; it checks the JSONL rows (every column, plausible values), padded and packed, the
PNG and the README section report.py makes of them.
"""

from __future__ import annotations

import dataclasses
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
    "p80_ms", "wall_ms", "graph_ms", "gbps", "frac_roofline", "bytes", "backend", "timer",
    "matches_reference", "device",
    "torch", "triton", "fastpool", "date", "S", "N", "length_dist",
}  # fmt: skip
PACKED_PROVIDERS = {"fastpool", "index_add", "loop"}


@pytest.fixture(scope="module")
def bench_modules():
    """Import bench/'s modules the way `python bench/run.py` does (its folder on sys.path)."""
    sys.path.insert(0, str(BENCH))
    try:
        import checks
        import providers
        import report
        import shapes
        import traffic

        yield shapes, traffic, checks, providers, report
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTPOOL_BACKEND"] = "torch"
    # One thread: under `pytest -n 2` on 2 cores, torch's intra-op threads wait on each other for
    # whole scheduler slices (tiny ops then take ~10-100 ms each); the test checks rows, not speed.
    cmd = [sys.executable, str(BENCH / "run.py"), "--preset", "tiny", "--device", "cpu", "--threads", "1",
           "--out", str(out / "tiny.jsonl"), "--plot", str(out / "tiny.png")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "tiny.jsonl").read_text().splitlines()]
    return rows, out / "tiny.png", proc.stdout


def test_tiny_preset_rows(tiny_run, bench_modules):
    rows, _, stdout = tiny_run
    shapes, traffic, *_ = bench_modules
    assert rows, "no rows written"
    cases = shapes.PRESETS["tiny"].cases()
    packed_cases = [c for c in cases if c.packed is not None]
    assert packed_cases and len(packed_cases) < len(cases)
    # fastpool and eager on padded cases, fastpool, index_add and loop on packed; no roofline on CPU.
    assert len(rows) == 2 * (len(cases) - len(packed_cases)) + 3 * len(packed_cases)
    rows = [r for r in rows if r["layout"] != "packed"]  # packed rows: test_tiny_preset_packed_rows
    for row in rows:
        assert COLUMNS <= row.keys(), COLUMNS - row.keys()
        assert row["provider"] in ("fastpool", "eager")
        assert row["S"] is None and row["N"] is None and row["length_dist"] is None
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


def test_tiny_preset_packed_rows(tiny_run, bench_modules):
    rows, _, stdout = tiny_run
    shapes, traffic, *_ = bench_modules
    packed = [r for r in rows if r["layout"] == "packed"]
    cases = [c for c in shapes.PRESETS["tiny"].cases() if c.packed is not None]
    assert {(r["op"], r["pass"]) for r in packed} == {(c.op, c.pass_) for c in cases}
    assert {r["length_dist"] for r in packed} == {"uniform", "skewed"}
    by_case: dict[tuple, set] = {}
    for row in packed:
        assert COLUMNS <= row.keys(), COLUMNS - row.keys()
        assert row["op"] in shapes.PACKED_OPS and row["provider"] in PACKED_PROVIDERS
        assert row["matches_reference"] is True and row["pad_actual"] == 0.0 and row["padding"] == 0.0
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] < 10_000
        assert row["gbps"] > 0 and row["frac_roofline"] is None
        assert row["B"] == row["S"] and row["S"] <= row["N"] and row["T"] <= row["N"]
        by_case.setdefault((row["op"], row["pass"], row["S"], row["N"]), set()).add(row["provider"])
        # bytes: all N x d of hidden, int32 cu_seqlens, (S, d) output; backward adds the (N, d) grad.
        S, N, d = row["S"], row["N"], row["d"]
        fwd = N * d * 4 + (S + 1) * 4 + S * d * 4
        assert row["bytes"] == {"fwd": fwd, "bwd": fwd, "fwd+bwd": 2 * fwd}[row["pass"]]
    assert all(v == PACKED_PROVIDERS for v in by_case.values()), by_case
    assert "packed input" in stdout and "vs index_add" in stdout and "vs loop" in stdout  # its own table


def test_report_handles_packed_and_older_rows(tiny_run, bench_modules):
    rows, _, _ = tiny_run
    *_, report = bench_modules
    markdown = report.section(rows, "tiny.jsonl")
    assert "| packed_mean | fwd | fp32 | 3/17x16 | uniform <= 7 |" in markdown
    assert "vs index_add (" in markdown and "vs loop (" in markdown  # geometric means
    # Results written before the packed columns existed still render (read with .get).
    old = [{k: v for k, v in r.items() if k not in ("S", "N", "length_dist")} for r in rows]
    old = [r for r in old if r["layout"] != "packed"]
    assert "| mean | fwd | fp32 | 2x16x32 | 0% |" in report.section(old, "old.jsonl")


def test_tiny_preset_plot(tiny_run):
    _, png, _ = tiny_run
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_masks_are_deterministic_and_padded_as_asked(bench_modules):
    shapes, *_ = bench_modules
    for layout in shapes.LAYOUTS:
        a = shapes.make_mask(64, 256, 0.5, layout, seed=3)
        assert torch.equal(a, shapes.make_mask(64, 256, 0.5, layout, seed=3))
        assert abs(float((a == 0).float().mean()) - 0.5) < 0.1
        assert bool((a.sum(1) >= 1).all())  # every row keeps a real token
    left = shapes.make_mask(8, 32, 0.25, "left", seed=0)
    assert bool((left[:, -1] == 1).all())  # left padding: real tokens end the row
    assert bool((shapes.make_mask(4, 16, 0.0, "holes", seed=0) == 1).all())


def test_packed_lengths_are_deterministic_and_distributed_as_asked(bench_modules):
    shapes, *_ = bench_modules
    u = shapes.uniform(500, 256, 8)
    lengths = u.lengths()
    assert torch.equal(lengths, shapes.uniform(500, 256, 8).lengths()) and lengths.shape == (500,)
    assert int(lengths.min()) >= 128 and int(lengths.max()) <= 256 and u.N == int(lengths.sum())
    assert torch.equal(lengths, shapes.uniform(500, 256, 1024).lengths())  # d does not change them
    sk = shapes.skewed(1002, 8192, 8, n_long=2)
    lengths = sk.lengths()
    assert int((lengths == 8192).sum()) == 2 and sk.max_len == 8192
    short = lengths[lengths != 8192]
    assert int(short.min()) >= 64 and int(short.max()) <= 256
    case = shapes.PackedBlock("t", (sk,), ("bfloat16",), ("packed_mean",), ("fwd",)).cases()[0]
    hidden, pk = shapes.make_inputs(case, torch.device("cpu"))
    assert hidden.shape == (sk.N, 8) and hidden.dtype == torch.bfloat16
    assert pk.cu_seqlens.dtype == torch.int32 and pk.S == 1002 and pk.max_seqlen == 8192
    assert torch.equal(pk.cu_seqlens.diff().long(), lengths)
    with pytest.raises(ValueError):
        shapes.PackedBlock("t", (sk,), ("bfloat16",), ("mean",), ("fwd",)).cases()


def test_traffic_counts_real_tokens_only(bench_modules):
    _, traffic, *_ = bench_modules
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
    # Packed: every token of hidden (N x d), cu_seqlens, the (S, d) output; argmax is not counted.
    fwd = traffic.packed_minimal_bytes("packed_max", "fwd", 100, 3, 16, torch.bfloat16, 16)
    assert fwd == 100 * 16 * es + 16 + 3 * 16 * es
    bwd = traffic.packed_minimal_bytes("packed_mean", "bwd", 100, 3, 16, torch.bfloat16, 16)
    assert bwd == 100 * 16 * es + 3 * 16 * es + 16
    with pytest.raises(ValueError):
        traffic.packed_minimal_bytes("mean", "fwd", 100, 3, 16, torch.bfloat16, 16)


def test_gpu_preset_grid_is_sized_for_minutes(bench_modules):
    shapes, _, _, providers, _ = bench_modules
    cases = shapes.PRESETS["gpu"].cases()
    assert 60 <= len(cases) <= 200
    assert len(shapes.serving_shapes()) == 55
    assert {d for _, _, d in shapes.serving_shapes()} == {384, 768, 1024, 4096}
    keys = {(c.op, c.pass_, c.B, c.T, c.d, c.dtype, c.padding, c.layout, c.packed) for c in cases}
    assert ("mean", "fwd", 64, 512, 1024, "bfloat16", 0.5, "right", None) in keys  # the shape
    assert len(keys) == len(cases)  # overlapping blocks are measured once
    # Packed: realistic batches (0.15M-1M tokens, at most 2 GiB of bf16), both distributions, both ops.
    packed = [c for c in cases if c.packed is not None]
    assert {c.packed.dist for c in packed} == {"uniform", "skewed"} and {c.d for c in packed} >= {1024, 4096}
    assert {c.op for c in packed} == set(shapes.PACKED_OPS) and {c.pass_ for c in packed} == set(
        shapes.PASSES
    )
    assert all(150_000 <= c.packed.N <= 1_000_000 and c.packed.N * c.d <= 2**30 for c in packed)
    loop = providers.LoopProvider(torch.device("cpu"))
    assert any(loop.skip(c) for c in packed) and any(loop.skip(c) is None for c in packed)
    assert all(loop.skip(c) for c in cases if c.packed is None)  # the loop takes packed input only
    quick = [c for c in shapes.PRESETS["gpu-quick"].cases() if c.packed is not None]
    assert {c.packed.dist for c in quick} == {"uniform", "skewed"}


def test_a_wrong_provider_is_caught(bench_modules):
    shapes, _, checks, *_ = bench_modules

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


def test_a_wrong_packed_provider_is_caught(bench_modules):
    shapes, _, checks, providers, _ = bench_modules
    cpu = torch.device("cpu")
    case = shapes.PackedBlock(
        "t", (shapes.skewed(6, 40, 8, 1, (2, 5)),), ("bfloat16",), ("packed_max",), ("fwd",)
    )
    case = case.cases()[0]
    hidden, pk = shapes.make_inputs(case, cpu)
    good = [providers.FastpoolProvider(cpu), providers.IndexAddProvider(cpu), providers.LoopProvider(cpu)]
    with fastpool.use_backend("torch"):
        assert checks.check_forward(case, good, hidden, pk) == dict.fromkeys(PACKED_PROVIDERS, True)
        checks.check_backward(case, good, hidden, pk)
        mean_case = dataclasses.replace(case, op="packed_mean")
        assert all(checks.check_forward(mean_case, good, hidden, pk).values())
        checks.check_backward(mean_case, good, hidden, pk)

        class OffByOne(providers.IndexAddProvider):
            def fn(self, op):  # every boundary one token early
                def shifted(h, p):
                    cu = p.cu_seqlens.clone()
                    cu[1:-1] -= 1
                    return providers.loop_max(h, shapes.PackedBatch(cu, p.max_seqlen))

                return shifted

        with pytest.raises(checks.MismatchError, match="index_add vs fastpool"):
            checks.check_forward(case, [good[0], OffByOne(cpu)], hidden, pk)


def test_attention_and_global_pooling_cases(bench_modules):
    shapes, traffic, checks, providers, _ = bench_modules
    import attention_global

    cpu = torch.device("cpu")
    for preset in ("default", "gpu-quick", "gpu"):
        ops = {c.op for c in shapes.PRESETS[preset].cases()}
        assert {"attention", "global_mean", "global_max"} <= ops, preset
    cases = shapes.FeatureBlock("t", ((2, 5, 3, 4),), ("float32",), ("global_max",), ("fwd+bwd",)).cases()
    assert [c.layout for c in cases] == ["nchw", "channels_last"] and cases[0].spatial == (3, 4)
    x, none = shapes.make_inputs(cases[1], cpu)
    assert none is None and x.shape == (2, 5, 3, 4) and x.is_contiguous(memory_format=torch.channels_last)
    assert traffic.global_minimal_bytes("fwd+bwd", 2, 5, 12, torch.float32) == 2 * (2 * 5 * 12 + 2 * 5) * 4
    att = shapes.Case("t", "attention", "fwd+bwd", 3, 8, 4, "float32", 0.5, "right")
    hidden, inputs = shapes.make_inputs(att, cpu)
    assert inputs.scores.shape == (3, 8) and inputs.mask.shape == (3, 8)
    real = int(inputs.mask.sum())
    fwd = real * 5 * 4 + 3 * 8 * 8 + 3 * 4 * 4  # real tokens and scores, int64 mask, output
    assert traffic.attention_minimal_bytes("fwd", 3, 8, 4, torch.float32, inputs.mask) == fwd
    good = [providers.FastpoolProvider(cpu), providers.EagerProvider(cpu)]
    with fastpool.use_backend("torch"):
        for case, h, extra in [(att, hidden, inputs), (cases[0], *shapes.make_inputs(cases[0], cpu))]:
            assert checks.check_forward(case, good, h, extra) == {"fastpool": True, "eager": True}
            checks.check_backward(case, good, h, extra)

        class Broken(providers.FastpoolProvider):
            def fn(self, op):  # ignores the mask
                return lambda h, a: fastpool.attention_pool(h, a.scores)

        with pytest.raises(checks.MismatchError):
            checks.check_forward(att, [Broken(cpu)], hidden, inputs)
    assert attention_global.padding_fraction(att, inputs) == float((inputs.mask == 0).float().mean())
