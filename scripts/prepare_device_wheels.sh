#!/usr/bin/env bash
# Run here, before scripts/device_check.sh goes to a lent GPU machine: downloads into .whl/ the wheels
# of the Python packages that the machine's image lacks and the checks need (nibabel: gradreg_fast.io
# and the test modules import it; the image has torch, numpy, scipy, tqdm, matplotlib, pyyaml, pytest,
# pytest-benchmark and triton). .whl/ is kept out of git through .git/info/exclude, and travels with
# the run when the device tool is called with carry [".whl"]; device_check.sh installs what it finds.
#
# The image's Python is 3.12 (benchmarks/README.md). Pinned to the version this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(nibabel==5.4.2)
PYTHON=${PYTHON:-python3}

if [ -d .git/info ] && ! grep -qx '/.whl/' .git/info/exclude 2> /dev/null; then
  echo '/.whl/' >> .git/info/exclude
fi
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
echo "prepare_device_wheels.sh: in .whl/ (carry it): $(cd .whl && ls -- *.whl | tr '\n' ' ')"
du -sh .whl
