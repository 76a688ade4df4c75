#!/usr/bin/env bash
# One bounded GPU check (H100/H200, ~8 minutes wall): build, info, CUDA tests, GPU benchmarks.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (run from anywhere; OUT defaults to ./gpu_out)
#
# Every stage has its own `timeout`, a failed stage never stops the next one, and everything lands
# in $OUT (at most 8 files, no subfolders): build.log, info.txt, pytest.log, bench.log,
# benchmarks.json, benchmarks.md, summary.txt. Budget (worst case ~8.7 min): build 180 s,
# info 30 s, tests 120 s, benchmarks 180 s (give the whole command a 600 s limit). Uses only
# what is installed (python3, torch, Triton, pytest; nothing is downloaded). Override the stage
# limits with T_BUILD/T_INFO/T_TEST/T_BENCH; FASTSTEAL_GIT_COMMIT names the commit when the
# checkout has no .git.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
T_BUILD="${T_BUILD:-180}"; T_INFO="${T_INFO:-30}"; T_TEST="${T_TEST:-120}"; T_BENCH="${T_BENCH:-180}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)

stage() {  # stage NAME LIMIT LOG CMD...
    local name=$1 limit=$2 log=$3; shift 3
    local t=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (TIMED OUT)"
    echo "=== $name: exit $rc$note after $(( $(date +%s) - t ))s" | tee -a "$SUMMARY"
    return 0
}

{
    echo "host: $(hostname) $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))" 2>&1
    echo "commit: ${FASTSTEAL_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
} >> "$SUMMARY" 2>&1

# (1) build the extension for sm_90 (the install never fails on a bad build: it warns and the
#     ops use Triton / reference; the log says which)
stage build "$T_BUILD" "$OUT/build.log" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
"$PY" -c "import faststeal._ext as e; print('faststeal._C:', 'loaded, CUDA kernels' if e.has_cuda_kernels() else ('loaded, CPU only' if e.C is not None else 'NOT loaded: ' + str(e.LOAD_ERROR)))" >> "$SUMMARY" 2>&1

# (2) versions, extension, backend per op
stage info "$T_INFO" "$OUT/info.txt" "$PY" -m faststeal info

# (3) the test suite (CUDA tests included), bounded per test and overall
# keep going after failures (every result is wanted); one line per test (-v) so a run cut by the
# stage limit still shows what passed; per-test limit and parallel workers where installed
TEST_ARGS=(-v --tb=short -rfE --durations=15 -m "not slow" -p no:cacheprovider tests/)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TEST_ARGS=(--timeout=60 "${TEST_ARGS[@]}"); fi
if "$PY" -c "import xdist" 2>/dev/null; then TEST_ARGS=(-n 6 --dist loadfile "${TEST_ARGS[@]}"); fi
stage tests "$T_TEST" "$OUT/pytest.log" "$PY" -m pytest "${TEST_ARGS[@]}"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -n 3 >> "$SUMMARY"
grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" | head -n 30 >> "$SUMMARY"

# (4) GPU benchmarks (soft deadline inside run_all; JSON/markdown rewritten after each section)
stage bench "$T_BENCH" "$OUT/bench.log" \
    "$PY" -m benchmarks.run_all --gpu-quick --deadline $(( T_BENCH - 25 )) --out "$OUT"
grep -A 40 "^## Targets" "$OUT/benchmarks.md" 2>/dev/null | head -n 30 >> "$SUMMARY"

echo "total: $(( $(date +%s) - T0 ))s" | tee -a "$SUMMARY"
ls -la "$OUT" >> "$SUMMARY"
exit 0
