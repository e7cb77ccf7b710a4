#!/usr/bin/env bash
# Every GPU check of gradreg_fast in one run, for a session that is lent a GPU machine (H100/H200 class):
#
#   1. build the package against the machine's own torch: pip install --no-build-isolation -e .
#   2. the tests that need a CUDA device (marked `gpu`, or skipped without CUDA)
#   3. one training step of the dual-branch network on CUDA (benchmarks/bench_train_step.py)
#   4. scripts/cuda_sanitizer.sh memcheck on its small odd-sized cases
#   5. benchmarks/gpu_benchmark.py --fast (the main size, real timings)
#
# Everything goes to $OUT (or ./out/device): summary.txt (the one text to read: each step PASS/FAIL
# with the tail of its log), and one log per step, benchmark.json. The steps share a time budget of
# DEVICE_CHECK_SECONDS (default 470 s, inside 8 minutes); a step gets what is left of it, so a slow
# step cannot push the run past the budget (the later steps are then reported as skipped).
# DEVICE_CHECK_SKIP leaves steps out by their log's name (see step below).
#
# Python packages that the GPU machine's image lacks (nibabel) come from wheels carried along: run
# scripts/prepare_device_wheels.sh here first, then call the device tool with carry [".whl"] and
#     bash scripts/device_check.sh
# Without a CUDA device (or without nvcc, torch or nibabel) it stops before building, with a message
# and exit status 2. Exit status 1: a step failed. See benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/out/device}
BUDGET=${DEVICE_CHECK_SECONDS:-470}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failures=()

say() { echo "$*" | tee -a "$SUMMARY"; }
stop() {
  say "device_check: $*"
  exit 2
}

# step NAME CAP_SECONDS LOG COMMAND...: runs COMMAND with its output in $OUT/LOG, limited to CAP_SECONDS
# or to what is left of the budget, and records PASS/FAIL with the log's tail in the summary.
# DEVICE_CHECK_SKIP: logs (without .log) of steps to leave out, e.g. "train_step sanitizer" for a rerun
# inside what is left of a lease after the whole script passed them; they are reported as skipped.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  if [[ " ${DEVICE_CHECK_SKIP:-} " == *" ${log%.log} "* ]]; then
    say "SKIP  $name: left out (DEVICE_CHECK_SKIP)"
    return 0
  fi
  local left=$((BUDGET - SECONDS - 5))
  ((left < cap)) && cap=$left
  if ((cap < 15)); then
    say "SKIP  $name: the ${BUDGET} s budget is spent"
    failures+=("$name (not run)")
    return 1
  fi
  local start=$SECONDS rc
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$log" 2>&1
  rc=$?
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    say "PASS  $name (${took} s)"
  else
    local why="exit $rc"
    ((rc == 124 || rc == 137)) && why="stopped at its ${cap} s limit"
    say "FAIL  $name ($why, ${took} s): $log"
    failures+=("$name")
  fi
  tail -n "${SUMMARY_TAIL_LINES:-20}" "$OUT/$log" | sed 's/^/      /' >> "$SUMMARY"
  return $rc
}

say "gradreg_fast device check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET} s, output in $OUT"
say "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git here)')"

# Carried wheels first (see scripts/prepare_device_wheels.sh): installed beside the image's packages.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || stop "the carried wheels in .whl/ did not install"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  say "carried wheels: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
fi

# What the checks need, before anything is built.
command -v "$PYTHON" > /dev/null || stop "no $PYTHON on this machine (set PYTHON=...)"
torch_line=$("$PYTHON" -c "import torch; print(torch.__version__, 'CUDA build', torch.version.cuda)" 2>&1) \
  || stop "torch does not import with $PYTHON: $torch_line"
say "python: $("$PYTHON" --version 2>&1); torch $torch_line"
if ! gpu=$("$PYTHON" -c "
import sys, torch
if not torch.cuda.is_available():
    sys.exit('torch sees no CUDA device')
print(torch.cuda.get_device_name(0), 'compute capability', '.'.join(map(str, torch.cuda.get_device_capability(0))))
" 2>&1); then
  stop "no GPU: ${gpu##*$'\n'}. This script runs on a lent GPU machine (the device tool's run); nothing was built."
fi
say "GPU: $gpu"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
[ -x "$NVCC" ] || stop "nvcc not found (on PATH or /usr/local/cuda/bin): the CUDA core cannot be built"
export PATH="$(dirname "$NVCC"):$PATH"
say "nvcc: $("$NVCC" --version | tail -n 1)"
"$PYTHON" -c "import nibabel" 2> /dev/null \
  || stop "nibabel does not import: run scripts/prepare_device_wheels.sh here and carry .whl"

# 1. Build. Everything after it needs the CUDA core, so a failed build ends the run.
if ! step "build (pip install --no-build-isolation -e .)" 240 build.log \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .; then
  say "device_check: the build failed; nothing else was run"
  exit 1
fi
step "CUDA core loads and accepts the device" 30 build_probe.log "$PYTHON" -c "
import gradreg_fast._cuda as core
problem = core.device_check(0)
assert not problem, problem
print('gradreg_fast._cuda', core.__file__, 'ok on device 0')
" || { say "device_check: the CUDA core does not run here; nothing else was run"; exit 1; }

# 2. The tests that need a CUDA device: marked `gpu`, or skipped where no CUDA device is (the
# test_cuda.py and test_triton.py GPU tests carry only the skip). The sanitizer test is step 4's.
plugin_dir=$(mktemp -d)
trap 'rm -rf "$plugin_dir"' EXIT
cat > "$plugin_dir/gradreg_gpu_tests.py" << 'PY'
def _needs_cuda(item):
    if item.get_closest_marker("gpu") is not None:
        return True
    return any("CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if _needs_cuda(item) and "compute_sanitizer" not in item.name]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
PY
# Eight workers where pytest-xdist is there (the image has it): serially the Triton tests' compiles took the
# whole 180 s on an H200. -v: the log names each test as it ends, so a run cut short still says which failed.
parallel=()
"$PYTHON" -c "import xdist" 2> /dev/null && parallel=(-n 8)
PYTHONPATH="$plugin_dir${PYTHONPATH:+:$PYTHONPATH}" step "GPU tests (pytest: marked gpu or skipped without CUDA)" \
  180 gpu_tests.log "$PYTHON" -m pytest -v -rfEs --tb=short --durations=10 -p no:cacheprovider -p gradreg_gpu_tests \
  "${parallel[@]}" tests

# 3. One training step of the dual-branch network (fused ops vs the reference ops).
step "training step of DualBranchNet on CUDA (1x1x144x144x128)" 120 train_step.log \
  "$PYTHON" benchmarks/bench_train_step.py --device cuda --shape 144,144,128 --steps 2 --warmup 1

# 4. compute-sanitizer memcheck over every CUDA kernel on small odd-sized cases.
step "compute-sanitizer memcheck (scripts/cuda_sanitizer.sh)" 150 sanitizer.log \
  env PYTHON="$PYTHON" bash scripts/cuda_sanitizer.sh memcheck

# 5. The GPU benchmark, fast mode: the main size, real timings, the targets.
step "GPU benchmark (benchmarks/gpu_benchmark.py --fast)" 200 benchmark.log \
  "$PYTHON" benchmarks/gpu_benchmark.py --fast --no-build --json "$OUT/benchmark.json"

say ""
if ((${#failures[@]})); then
  say "device_check: ${#failures[@]} step(s) failed or were not run: ${failures[*]} (${SECONDS} s)"
  exit 1
fi
say "device_check: every step passed (${SECONDS} s)"
