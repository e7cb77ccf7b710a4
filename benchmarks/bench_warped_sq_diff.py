"""warped_sq_diff (fused) against what the refinement stage did before it, on the CPU (issue 11).

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_warped_sq_diff.py [--repeats 15] [--threads 1,2]

One Adam step's data term, forward plus backward w.r.t. the flow (the gradient read back), at the
engine's size (1 x 24 x 16 x 48 x 64, MIND descriptors at the refinement resolution) and a larger one
(1 x 12 x 64 x 64 x 64), with a 0/1 field-of-view weight (a centred box, as the engine's mask):

* fused: ``gradreg_fast.warped_sq_diff(moving, fixed, flow, weight)`` (CPU core): one pass, no warped
  image, the backward scales the stored flow gradient.
* fused, channels-last: the same call with ``moving`` and ``fixed`` in ``torch.channels_last_3d`` (the
  engine's layout: the kernel samples all channels of a corner together).
* unfused: ``gradreg_fast.warp(moving, flow, padding_mode="border")`` (CPU core), then
  ``(weight * (warped - fixed).square().sum(1, keepdim=True)).sum()`` and autograd (warp's CPU backward).

Time: the median and the minimum of ``--repeats`` calls after one warm-up call, for each torch thread
count in ``--threads``; the two results are checked against each other first. The load average is
printed with the figures: on a shared machine the minimum is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import gradreg_fast

SHAPES = [(1, 24, 16, 48, 64), (1, 12, 64, 64, 64)]
SEED = 1234


def make_inputs(shape):
    gen = torch.Generator().manual_seed(SEED)
    n, ch, d, h, w = shape
    fixed = torch.randn(shape, generator=gen)
    moving = torch.randn(shape, generator=gen)
    # A smooth flow of a few voxels: random values on a coarse grid, upsampled.
    coarse = torch.randn((n, 3, 4, 4, 4), generator=gen) * 3.0
    flow = torch.nn.functional.interpolate(coarse, size=(d, h, w), mode="trilinear", align_corners=True)
    weight = torch.zeros((n, 1, d, h, w))
    weight[:, :, d // 8: d - d // 8, h // 8: h - h // 8, w // 8: w - w // 8] = 1.0
    return moving, fixed, flow.contiguous(), weight


def fused(moving, fixed, flow, weight):
    leaf = flow.detach().requires_grad_()
    value = gradreg_fast.warped_sq_diff(moving, fixed, leaf, weight, "border", backend="cpu")
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def unfused(moving, fixed, flow, weight):
    leaf = flow.detach().requires_grad_()
    warped = gradreg_fast.warp(moving, leaf, padding_mode="border", backend="cpu")
    value = (weight * (warped - fixed).square().sum(1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def fused_forward(moving, fixed, flow, weight):
    return gradreg_fast.warped_sq_diff(moving, fixed, flow, weight, "border", backend="cpu")


def unfused_forward(moving, fixed, flow, weight):
    warped = gradreg_fast.warp(moving, flow, padding_mode="border", backend="cpu")
    return (weight * (warped - fixed).square().sum(1, keepdim=True)).sum()


def timings_ms(fn, args, repeats):
    """(median, minimum) in milliseconds."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", default=os.environ.get("BENCH_THREADS", "1,2"),
                        help="comma-separated torch thread counts")
    args = parser.parse_args()
    print(f"ISA {gradreg_fast._C.cpu_isa()}, load average {os.getloadavg()[0]:.2f}; ms as median (min)")
    for shape in SHAPES:
        inputs = make_inputs(shape)
        (v1, g1), (v2, g2) = fused(*inputs), unfused(*inputs)
        torch.testing.assert_close(v1, v2, rtol=1e-4, atol=0)
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-4 * g2.abs().max().item())
        last = tuple(t.contiguous(memory_format=torch.channels_last_3d) for t in inputs[:2]) + inputs[2:]
        v3, g3 = fused(*last)
        torch.testing.assert_close(v3, v1, rtol=1e-5, atol=0)
        torch.testing.assert_close(g3, g1, rtol=1e-4, atol=1e-4 * g1.abs().max().item())
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            with torch.no_grad():
                fwd = [timings_ms(f, x, args.repeats) for f, x in
                       ((fused_forward, inputs), (unfused_forward, inputs), (fused_forward, last))]
            both = [timings_ms(f, x, args.repeats) for f, x in ((fused, inputs), (unfused, inputs), (fused, last))]
            label = "x".join(map(str, shape))
            print(f"{label:>14} t={threads}  fwd+bwd: fused {both[0][0]:7.2f} ({both[0][1]:7.2f})  channels-last "
                  f"{both[2][0]:7.2f} ({both[2][1]:7.2f})  unfused {both[1][0]:7.2f} ({both[1][1]:7.2f})  "
                  f"x{both[1][1] / both[0][1]:.2f} / x{both[1][1] / both[2][1]:.2f}   fwd: fused "
                  f"{fwd[0][0]:7.2f} ({fwd[0][1]:7.2f})  channels-last {fwd[2][0]:7.2f} ({fwd[2][1]:7.2f})  unfused "
                  f"{fwd[1][0]:7.2f} ({fwd[1][1]:7.2f})  x{fwd[1][1] / fwd[0][1]:.2f} / x{fwd[1][1] / fwd[2][1]:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
