#!/usr/bin/env bash
# The one GPU script: the GPU test suite, then the benchmarks. Logs and results go to $OUT
# (default ./gpu_out). Run from the repository root on a GPU machine:
#   OUT=/tmp/out bash tools/gpu_check.sh [pytest args...]
# Env: SECTIONS (bench sections, default all), BENCH_ARGS (e.g. --sweep), SKIP_TESTS=1, SKIP_BENCH=1,
# SHARD=i/n (no pytest args: the i-th of n round-robin groups of the test files, so that each part
# stays under a 10-minute limit: the whole suite takes longer than that on a cold H200),
# FP8_CHECK=1 (also run tools/fp8_gpu_check.py: the fp8 GEMMs against float64 references, timed),
# FP8_TIMEOUT / TEST_TIMEOUT / BENCH_TIMEOUT (seconds per step, so that one call's steps fit its limit;
# a step cut short still leaves its log).
# The 20 slowest tests are listed at the end of tests.log (to balance the shards).
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__); print(jax.devices())"
} 2>&1 | tee "$OUT/device.txt"
rc=0
if [ -n "$FP8_CHECK" ]; then
  timeout ${FP8_TIMEOUT:-0} python3 tools/fp8_gpu_check.py ${FP8_ARGS:-} 2>&1 | tee "$OUT/fp8_check.log" | tail -40 || rc=1
fi
if [ -n "$SHARD" ] && [ $# -eq 0 ]; then
  set -- $(find tests -name 'test_*.py' | sort | awk -v i="${SHARD%/*}" -v n="${SHARD#*/}" '(NR - 1) % n == i - 1')
  echo "shard $SHARD: $*"
fi
if [ -z "$SKIP_TESTS" ]; then
  timeout ${TEST_TIMEOUT:-0} python3 -m pytest -q -rf -p no:cacheprovider --maxfail=25 --durations=20 "${@:-tests/}" 2>&1 | tee "$OUT/tests.log" | tail -25
  rc=$(( rc | PIPESTATUS[0] ))
fi
if [ -z "$SKIP_BENCH" ]; then
  sections=${SECTIONS:-}
  timeout ${BENCH_TIMEOUT:-0} python3 -m jaxquant.bench ${sections:+--sections "$sections"} --out "$OUT" $BENCH_ARGS 2>&1 | tee "$OUT/bench.log" | tail -60
fi
exit $rc
