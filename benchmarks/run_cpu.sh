#!/usr/bin/env bash
# Every CPU benchmark, then one summary with the targets. From the repository root:
#
#   bash benchmarks/run_cpu.sh [OUT_DIR]          # default OUT_DIR: out/bench-cpu (git-ignored)
#   BENCH_QUICK=1 bash benchmarks/run_cpu.sh      # dry run on tiny volumes (checks the scripts only)
#
# Writes OUT_DIR/timings.json (pytest-benchmark), OUT_DIR/peak_memory.json and OUT_DIR/summary.txt.
# Run it on an otherwise idle machine: the figures are only comparable within one run.
set -euo pipefail

cd "$(dirname "$0")/.."
out_dir=${1:-out/bench-cpu}
mkdir -p "$out_dir"

# glibc hands large freed blocks back to the OS by default, and naive PyTorch code then spends much
# of its time in page faults; these keep freed memory for reuse (read by glibc at process start).
export MALLOC_MMAP_THRESHOLD_=1073741824
export MALLOC_TRIM_THRESHOLD_=4294967296
export BENCH_THREADS=${BENCH_THREADS:-2}
export OMP_NUM_THREADS=$BENCH_THREADS
# Import gradreg_fast from this checkout, as `python -m pytest` does for the timings.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$out_dir/timings.json" --benchmark-disable-gc \
    --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name
python benchmarks/peak_memory.py --out "$out_dir/peak_memory.json"
echo
python benchmarks/summarize.py "$out_dir/timings.json" "$out_dir/peak_memory.json" --out "$out_dir/summary.txt"
