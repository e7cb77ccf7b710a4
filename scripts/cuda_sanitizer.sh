#!/usr/bin/env bash
# Runs every kernel of the CUDA core (scripts/kernel_workout.py: forward and backward of every op, every
# mode and flag, float32 and float64) on small odd-sized inputs under NVIDIA's compute-sanitizer: memcheck (out-of-bounds and misaligned accesses), racecheck (shared-memory
# hazards) and synccheck (invalid barriers). Exits non-zero on the first error reported.
#
# Usage: scripts/cuda_sanitizer.sh [TOOL ...]        (default: memcheck racecheck synccheck)
# Env:   PYTHON (default python3), COMPUTE_SANITIZER (default: on PATH, else /usr/local/cuda/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
PYTHON=${PYTHON:-python3}
if [ ! -x "$SANITIZER" ]; then
  echo "cuda_sanitizer.sh: compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2
  exit 2
fi
tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(memcheck racecheck synccheck)

for tool in "${tools[@]}"; do
  echo "== compute-sanitizer --tool $tool"
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" \
    scripts/kernel_workout.py --device cuda --backend cuda
done
echo "cuda_sanitizer.sh: no errors (${tools[*]})"
