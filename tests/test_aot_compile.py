"""Every kernel specialization the launchers can choose compiles for sm_80 and sm_90 without spills.

Runs without a GPU: ``triton.compile`` with ``GPUTarget`` in a subprocess without TRITON_INTERPRET.
"""

import os
import re
import subprocess
import sys

import torch

from fastpool import aot, launchers


def test_launcher_choices_are_all_enumerated():
    specs = {
        (s.kernel, s.label.split()[1], s.constexprs.get("BLOCK_T"), s.constexprs.get("BLOCK_D"))
        for s in aot.specializations()
    }
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    for dtype, name in names.items():
        size = torch.empty((), dtype=dtype).element_size()
        for B, T, d in [(1, 1, 1), (1, 100_000, 4096), (512, 128, 384), (3, 7, 4097)]:
            for needs_loop, with_max in [(True, False), (True, True), (False, False)]:
                cfg = launchers.forward_config(B, T, d, size, needs_loop, with_max, 132)
                assert ("pool_forward_kernel", name, cfg.block_t, cfg.block_d) in specs
                assert cfg.n_splits * cfg.tokens_per_split >= T and cfg.n_splits <= 65535
            bwd = launchers.backward_config(T, d, size)
            assert ("pool_backward_kernel", name, bwd.block_t, bwd.block_d) in specs


def test_small_batch_long_sequence_is_split_and_large_batch_is_not():
    long = launchers.forward_config(1, 32768, 4096, 2, True, False, 132)
    assert long.n_splits > 1 and long.tokens_per_split >= launchers.MIN_TOKENS_PER_SPLIT
    assert launchers.forward_config(512, 512, 1024, 2, True, False, 132).n_splits == 1
    assert launchers.forward_config(1, 32768, 4096, 2, False, False, 132).n_splits == 1


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
        r"fwd bf16 mask=i8 mean=1 max=0 weighted=0 user_weights=0 contiguous: "
        r"regs=\d+ stack=0 local=0 v_loads=[1-9]",
        result.stdout,
    )
