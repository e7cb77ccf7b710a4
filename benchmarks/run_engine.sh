#!/usr/bin/env bash
# The deformable-engine figures of benchmarks/RESULTS.md (issue 11), in one run on one machine:
#   1. bench_peers.py: gradreg (defaults and --quick), ConvexAdam and ANTs SyN on the six same-subject validation
#      cases, the twelve inter-subject ones and the bundled pair (ANTs from its own venv: ANTS_PYTHON, default
#      /tmp/ants-env/bin/python; skipped if absent); then ConvexAdam and ANTs SyN again on the fixed image's own grid
#      (--peer-grid native: on the working grid the fixed image is zero where the moving one has content; ANTs there
#      only with NATIVE_ANTS=1, the default: it adds about 25 minutes);
#   2. the gradient-guidance ablation: alpha 0 against the default on 12 same-subject cases, the twelve inter-subject
#      ones and the pair (about 11 minutes in all on the 2-core machine);
#   3. bench_many_labels.py: wall time against core time of `gradreg register` with a 108-label atlas;
#   4. pair_starts.py: the bundled pair from ten other starting positions, gradreg against ConvexAdam (about 1 minute);
#   5. bench_peers.py --held-out: the fourteen held-out cases (validation.HELD_OUT, never used to choose anything),
#      the peers on both grids (about 6 minutes without ANTs);
#   6. bench_peers.py with elastix alone (its default affine + B-spline maps; ELASTIX_PYTHON, default
#      /tmp/elastix-env/bin/python; skipped if absent) on the cases of step 1, working grid (about 100 s a case).
# Outputs go to ${OUT:-out/engine}.
set -euo pipefail
cd "$(dirname "$0")/.."
export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_WAIT_POLICY=PASSIVE
out=${OUT:-out/engine}
mkdir -p "$out"
ants=${ANTS_PYTHON:-/tmp/ants-env/bin/python}
ants_args=()
if [ -x "$ants" ]; then ants_args=(--ants-python "$ants"); else echo "no ANTs python at $ants: SyN skipped"; fi
elastix=${ELASTIX_PYTHON:-/tmp/elastix-env/bin/python}
elastix_args=()
if [ -x "$elastix" ]; then elastix_args=(--elastix-python "$elastix"); else echo "no elastix python at $elastix: skipped"; fi
native_ants=()
if [ "${NATIVE_ANTS:-1}" = 1 ]; then native_ants=("${ants_args[@]}"); fi
date -u; uptime
python benchmarks/bench_peers.py --presets default,quick "${ants_args[@]}" --json "$out/peers.json" --markdown "$out/peers.md" | tee "$out/peers.log"
# The peers once more with both images on the fixed image's own grid (no padding to gradreg's working grid)
python benchmarks/bench_peers.py --skip-gradreg --peer-grid native "${native_ants[@]}" --json "$out/peers_native.json" --markdown "$out/peers_native.md" | tee "$out/peers_native.log"
python benchmarks/validation.py --extra 6 --compare '{"alpha": 0}' --json "$out/ablation_alpha.json" | tee "$out/ablation_alpha.log"
python benchmarks/bench_many_labels.py --labels 108 | tee "$out/many_labels.log"
python benchmarks/pair_starts.py --json "$out/pair_starts.json" --markdown "$out/pair_starts.md" | tee "$out/pair_starts.log"
python benchmarks/bench_peers.py --held-out "${ants_args[@]}" --json "$out/held_out.json" --markdown "$out/held_out.md" | tee "$out/held_out.log"
python benchmarks/bench_peers.py --held-out --skip-gradreg --peer-grid native "${native_ants[@]}" --json "$out/held_out_native.json" --markdown "$out/held_out_native.md" | tee "$out/held_out_native.log"
if [ ${#elastix_args[@]} -gt 0 ]; then
  python benchmarks/bench_peers.py --skip-gradreg --skip-convexadam "${elastix_args[@]}" --json "$out/elastix.json" --markdown "$out/elastix.md" | tee "$out/elastix.log"
fi
date -u; uptime
