"""Every kernel specialization the launchers can choose compiles for sm_80 and sm_90 without spills.

Runs without a GPU: ``triton.compile`` with ``GPUTarget`` in a subprocess without TRITON_INTERPRET.
"""

import os
import re
import subprocess
import sys

from fastpool import aot, launch, launchers


def test_launcher_choices_are_all_enumerated():
    """Every block size the launchers pick for a dtype is compiled ahead of time (they are fixed per
    dtype: the grid spreads rows over programs, the kernels' constexprs do not change)."""
    specs = {(s.kernel, s.label.split()[1], s.constexprs.get("BLOCK_D")) for s in aot.specializations()}
    for name, size in aot.HIDDEN_DTYPES.items():
        assert ("pool_forward_kernel", name, launch.feature_block(size)) in specs
        assert ("pool_backward_kernel", name, launch.feature_block(size)) in specs
        assert ("packed_backward_kernel", name, launch.feature_block(size)) in specs
        assert ("weights_backward_kernel", name, launch.feature_block(size)) in specs
    for spec in aot.specializations():
        if spec.kernel == "pool_forward_kernel":
            assert spec.constexprs["CHUNK"] == launch.CHUNK and spec.constexprs["LANES"] == launch.LANES


def test_small_batch_long_sequence_is_spread_over_programs_and_large_batch_is_not():
    long = launchers.forward_grid(1, 32768, 16, 132)
    assert long.programs_per_row > 1 and long.chunks_per_program * long.programs_per_row >= long.n_slots
    assert launchers.forward_grid(512, 512, 4, 132).programs_per_row == 1
    # The chunks (a constant length, so their number per row) never depend on the batch or the device:
    # only the programs per row do.
    grids = [launchers.forward_grid(B, 4096, 4, sms) for B in (1, 64) for sms in (1, 132)]
    assert {grid.n_slots for grid in grids} == {4096 // launch.CHUNK}
    assert len({grid.programs_per_row for grid in grids}) > 1


def test_every_specialization_compiles_for_sm80_and_sm90_without_spills(request):
    """Every specialization, or with pytest's --pairwise (CI's run on the newest triton) a subset in
    which every pair of label values and arch occurs."""
    pairwise = request.config.getoption("pairwise")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastpool.aot", "--arch", "80", "90", *(["--pairwise"] if pairwise else [])],
        capture_output=True, text=True, env=env, timeout=1500,
    )  # fmt: skip
    summary = re.search(r"(\d+) compiled without spills, (\d+) failed", result.stdout)
    failures = [line for line in result.stdout.splitlines() if "local=0 spill_ops=0" not in line][:20]
    assert summary, result.stdout[-3000:] + result.stderr[-3000:]
    assert int(summary.group(2)) == 0 and result.returncode == 0, "\n".join(failures)
    assert int(summary.group(1)) == len(aot.compile_jobs([80, 90], pairwise))
    # The contiguous mean kernels must use 16-byte vector loads.
    assert pairwise or re.search(
        r"fwd bf16 mask=i8 mean=1 max=0 pos=0 weighted=0 user_weights=0 contiguous: "
        r"regs=\d+ stack=0 local=0 spill_ops=0 v_loads=[1-9]",
        result.stdout,
    )


def test_pairwise_cover_keeps_every_pair_of_values():
    cases = [{"dtype": dt, "mask": m, "mode": mo} for dt in "abcd" for m in "uvwxyz" for mo in "1234567"]
    chosen = [cases[i] for i in aot.pairwise_cover(cases)]
    for k1, k2 in (("dtype", "mask"), ("dtype", "mode"), ("mask", "mode")):
        assert {(c[k1], c[k2]) for c in chosen} == {(c[k1], c[k2]) for c in cases}
    assert len(chosen) < len(cases) // 3  # 42 pairs of mask x mode bound it from below
    assert aot.pairwise_cover([]) == [] and aot.pairwise_cover([{"a": 1}]) == [0]


def test_the_pairwise_compile_subset_covers_every_kernel_arch_and_label_value():
    full, subset = aot.compile_jobs([80, 90]), aot.compile_jobs([80, 90], pairwise=True)
    assert set(subset) <= set(full) and len(subset) < len(full) // 3
    values = lambda jobs: {(k, v) for job in jobs for k, v in aot.label_parameters(*job).items()}  # noqa: E731
    assert values(subset) == values(full)


def test_the_dense_token_loop_issues_async_copies():
    """A chunk without holes runs a software-pipelined loop: its hidden loads are cp.async copies
    (LDGSTS) that never wait on the mask; the loop with holes keeps predicated vector loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastpool.aot", "--arch", "90", "--sass"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_90 fwd bf16")]
    assert len(lines) == len(aot.SASS_REPORT), result.stdout[-2000:] + result.stderr[-2000:]
    for line in lines:
        assert "LDGSTS.E.BYPASS.128" in line and "LDG.E.128" in line, line


def test_a_register_cap_that_forces_spills_is_reported_as_spills():
    """The spill check reads the code: loads and stores to the stack (LDL/STL) under a register cap
    too small for the kernel, none without it (a stack frame alone is a call frame, not a spill)."""
    code = (
        "import dataclasses\n"
        "from fastpool import aot\n"
        "label = 'fwd fp32 mask=i8 mean=1 max=1 pos=1 weighted=1 user_weights=1 contiguous'\n"
        "spec = next(s for s in aot.specializations() if s.label == label)\n"
        "for cap in (None, 32):\n"
        "    r = aot.compile_one(dataclasses.replace(spec, maxnreg=cap), 80)\n"
        "    print(cap, r['reg'], r['stack'], r['local'], r['spill_ops'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert set(lines) == {"None", "32"}, result.stdout + result.stderr[-3000:]
    regs, stack, local, spill_ops = map(int, lines["None"].split())
    assert local == 0 and spill_ops == 0
    regs, stack, local, spill_ops = map(int, lines["32"].split())
    assert regs <= 32 and stack > 0 and spill_ops > 0
