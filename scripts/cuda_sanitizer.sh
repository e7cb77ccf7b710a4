#!/usr/bin/env bash
# Runs every kernel of the CUDA core (forward and backward of each op, both warp backward paths,
# the fused MIND loss, float32 and float64) on small odd-sized inputs under NVIDIA's
# compute-sanitizer: memcheck (out-of-bounds and misaligned accesses), racecheck (shared-memory
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

script=$(mktemp --suffix=.py)
trap 'rm -f "$script"' EXIT
cat > "$script" <<'PY'
import torch

import gradreg_fast
from gradreg_fast import reference

assert torch.cuda.is_available(), "needs a CUDA device"
torch.manual_seed(0)


def grads(out, inputs):
    return torch.autograd.grad(out, inputs, torch.randn_like(out))


for dtype in (torch.float32, torch.float64):
    for shape in ((2, 3, 5, 4, 7), (1, 2, 1, 9, 37), (1, 1, 3, 5, 1)):
        n, c, d, h, w = shape
        vol = torch.randn(shape, dtype=dtype, device="cuda", requires_grad=True)
        grads(gradreg_fast.gradient_magnitude(vol, backend="cuda"), [vol])

        flow = (2.5 * torch.randn((n, 3, d, h, w), dtype=dtype, device="cuda")).requires_grad_()
        for mode in ("bilinear", "nearest"):
            for padding_mode in ("zeros", "border"):
                for deterministic in (False, True):
                    out = gradreg_fast.warp(vol, flow, mode, padding_mode, deterministic, backend="cuda")
                    grads(out, [vol, flow] if mode == "bilinear" else [vol])
                    grads(gradreg_fast.warp(vol, flow.detach(), mode, padding_mode, deterministic, backend="cuda"),
                          [vol])

        single = vol[:, :1].detach().clone().requires_grad_()
        fixed = torch.randn_like(single)
        for op in (gradreg_fast.mind_ssc, gradreg_fast.mind):
            for per_item in (False, True):
                grads(op(single, per_item=per_item, backend="cuda"), [single])
        grads(gradreg_fast.mind_ssc(single, radius=9, dilation=1, backend="cuda"), [single])  # wide halos
        for descriptor in ("ssc", "mind"):
            for penalty in ("l1", "l2"):
                loss = gradreg_fast.mind_loss(single, fixed, descriptor, penalty, backend="cuda")
                torch.autograd.grad(loss, single)
                expected = reference.mind_loss(single.detach(), fixed, descriptor, penalty)
                torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
torch.cuda.synchronize()
print("every CUDA kernel ran")
PY

for tool in "${tools[@]}"; do
  echo "== compute-sanitizer --tool $tool"
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" "$script"
done
echo "cuda_sanitizer.sh: no errors (${tools[*]})"
