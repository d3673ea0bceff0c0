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


def test_every_specialization_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastpool.aot", "--arch", "80", "90"],
        capture_output=True, text=True, env=env, timeout=1500,
    )  # fmt: skip
    summary = re.search(r"(\d+) compiled without spills, (\d+) failed", result.stdout)
    failures = [line for line in result.stdout.splitlines() if "stack=0 local=0" not in line][:20]
    assert summary, result.stdout[-3000:] + result.stderr[-3000:]
    assert int(summary.group(2)) == 0 and result.returncode == 0, "\n".join(failures)
    assert int(summary.group(1)) == 2 * len(aot.specializations())
    # The contiguous mean kernels must use 16-byte vector loads.
    assert re.search(
        r"fwd bf16 mask=i8 mean=1 max=0 pos=0 weighted=0 user_weights=0 contiguous: "
        r"regs=\d+ stack=0 local=0 v_loads=[1-9]",
        result.stdout,
    )


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
