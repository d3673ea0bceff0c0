#!/usr/bin/env bash
# One device session on a lent NVIDIA GPU, in one call: GPU test suite, compute-sanitizer,
# tile sweep, benchmark grid. Everything lands in $OUT (at most 8 files come back).
# Usage (repo root, on the GPU machine): OUT=/tmp/out bash bench/gpu_session.sh
set -u
OUT=${OUT:-/tmp/fastpool-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTPOOL_TEST_DEVICE=cuda
unset TRITON_INTERPRET
PY=${PY:-python3}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/session.log"; }

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >> "$OUT/session.log" 2>&1
# No network there: install without build isolation, fall back to a link for the package mapping.
$PY -m pip install -q --no-build-isolation --no-deps --no-index -e . >> "$OUT/session.log" 2>&1 \
  || ln -sfn ../kernels fastpool/kernels
$PY -c "import fastpool.kernels.pool_forward" >> "$OUT/session.log" 2>&1 || ln -sfn ../kernels fastpool/kernels

stamp "pytest on GPU"
timeout ${PYTEST_S:-100} $PY -m pytest -q -n 8 -p no:cacheprovider \
  --deselect tests/test_aot_compile.py::test_every_specialization_compiles_for_sm80_and_sm90_without_spills \
  > "$OUT/pytest-gpu.log" 2>&1
stamp "pytest rc=$? $(tail -1 "$OUT/pytest-gpu.log")"

stamp "compute-sanitizer memcheck"
timeout ${SANITIZE_S:-60} compute-sanitizer --tool memcheck --print-limit 20 $PY tests/gpu_sanitize_driver.py --quick \
  > "$OUT/sanitizer.log" 2>&1
stamp "memcheck rc=$? $(grep -E 'ERROR SUMMARY|^OK' "$OUT/sanitizer.log" | tr '\n' ' ')"
timeout ${RACE_S:-25} compute-sanitizer --tool racecheck --print-limit 20 $PY tests/gpu_sanitize_driver.py --tiny \
  >> "$OUT/sanitizer.log" 2>&1
stamp "racecheck rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|^OK' "$OUT/sanitizer.log" | tail -2 | tr '\n' ' ')"

stamp "tile sweep"
timeout ${SWEEP_S:-30} $PY bench/sweep_tiles.py > "$OUT/sweep.csv" 2>&1
stamp "sweep rc=$?"

stamp "benchmark grid"
# gpu-quick: ~1.5 min of padded cases, then the packed block (~20-30 s with its first Triton compiles).
PRESET=${PRESET:-gpu-quick}
timeout ${BENCH_S:-130} $PY bench/run.py --preset $PRESET --out "$OUT/bench-$PRESET.jsonl" --plot "$OUT/bench-$PRESET.png" \
  > "$OUT/bench-$PRESET.txt" 2>&1
stamp "bench rc=$?"
