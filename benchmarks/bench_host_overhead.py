"""Host cost of one op call, layer by layer: where the time of a small eager call goes.

On an H200 the kernels of a 144x144x128 volume take a few microseconds, and an eager call of the public
op costs far more on the host (benchmarks/gpu_benchmark.py: eager vs graph replay). This times, on a
tiny volume so that the kernel's own time does not count, each layer a call goes through:

  core      the compiled launcher called directly (pybind11 call + kernel launch)
  op        torch.ops.gradreg.<op> (torch.library custom-op dispatch around the launcher)
  public    gradreg_fast.<op> (argument checks, backend resolution, autograd wrapper)
  fwd_bwd   the public op forward and backward (torch.autograd.grad)
  torch     one torch.add of the same size, for scale

Usage: python benchmarks/bench_host_overhead.py [--device cuda|cpu] [--calls 2000]
"""

from __future__ import annotations

import argparse
import time

import torch

import gradreg_fast
from gradreg_fast.ops import _common as common


def per_call_us(fn, calls: int, device: torch.device) -> float:
    for _ in range(min(200, calls)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    device = torch.device(args.device)
    backend = "cuda" if device.type == "cuda" else "cpu"
    vol = torch.rand(1, 1, 4, 5, 6, device=device)
    flow = torch.rand(1, 3, 4, 5, 6, device=device)
    leaf = vol.clone().requires_grad_()

    def core_gradient_magnitude():
        out = torch.empty_like(vol)
        n, c, d, h, w = vol.shape
        if device.type == "cuda":
            common.cuda_core().gradient_magnitude_forward(False, vol.data_ptr(), out.data_ptr(), n * c, d, h, w, 1e-6,
                                                          common.stream(vol))
        else:
            common.cpu_core().gradient_magnitude_forward("float32", vol.data_ptr(), out.data_ptr(), n * c, d, h, w,
                                                         1e-6, 1)
        return out

    rows = [
        ("gradient_magnitude", "core", core_gradient_magnitude),
        ("gradient_magnitude", "op", lambda: torch.ops.gradreg.gradient_magnitude(vol, 1e-6, backend)),
        ("gradient_magnitude", "public", lambda: gradreg_fast.gradient_magnitude(vol)),
        ("gradient_magnitude", "fwd_bwd",
         lambda: torch.autograd.grad(gradreg_fast.gradient_magnitude(leaf).sum(), leaf)),
        ("warp", "public", lambda: gradreg_fast.warp(vol, flow)),
        ("mind_ssc", "public", lambda: gradreg_fast.mind_ssc(vol)),
        ("torch.add", "torch", lambda: vol + vol),
    ]
    print(f"host cost per call on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {args.calls} calls, 1x1x4x5x6 float32")
    print("| op | layer | us per call |")
    print("|---|---|---|")
    for op, layer, fn in rows:
        print(f"| {op} | {layer} | {per_call_us(fn, args.calls, device):.1f} |")


if __name__ == "__main__":
    main()
