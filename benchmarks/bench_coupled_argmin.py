"""coupled_argmin (fused) against the PyTorch expression the engine used before it, on the CPU.

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_coupled_argmin.py [--repeats 15] [--threads 1,2]

One search step of the coupled convex optimisation (ConvexAdam) at the engine's size (125 displacements,
radius 2, over 16 x 56 x 64 control points) and at ConvexAdam's search width (radius 4, 729 displacements,
over 16 x 28 x 32 points):

* fused: ``gradreg_fast.coupled_argmin(cost, field, w)`` (CPU core), and its mirrored read (the opposite
  search, what the symmetric engine runs instead of a second cost volume);
* torch: the engine's former step, ``addmm(by_point + w |d|^2, field, d^T, alpha=-2w).argmin(1)`` over the
  (points, K) matrix (the transposed copy made once beforehand, not timed), as ConvexAdam writes it.

Time: the median and the minimum of ``--repeats`` calls after one warm-up call, for each thread count; the
results are checked against each other first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import gradreg_fast

CASES = [(2, (16, 56, 64)), (4, (16, 28, 32))]
SEED = 1234


def make_inputs(radius, points):
    gen = torch.Generator().manual_seed(SEED)
    k = (2 * radius + 1) ** 3
    cost = torch.rand((1, k, *points), generator=gen)
    field = torch.randn((1, 3, *points), generator=gen) * radius / 2
    return cost, field


def torch_step(by_point, table, norms, field, weight):
    return torch.addmm(by_point + weight * norms, field.reshape(3, -1).T, table.T, alpha=-2.0 * weight).argmin(1)


def timings_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", default=os.environ.get("BENCH_THREADS", "1,2"))
    args = parser.parse_args()
    weight = 0.1
    print(f"ISA {gradreg_fast._C.cpu_isa()}, load average {os.getloadavg()[0]:.2f}; ms as median (min)")
    for radius, points in CASES:
        cost, field = make_inputs(radius, points)
        table = gradreg_fast.mind_cost_volume_displacements(radius)
        by_point = cost[0].reshape(cost.shape[1], -1).T.contiguous()
        norms = (table * table).sum(1)
        fused = gradreg_fast.coupled_argmin(cost, field, weight, backend="cpu").flatten()
        expected = torch_step(by_point, table, norms, field, weight)
        agreement = (fused == expected).float().mean().item()  # float32 rounding may swap near-ties
        assert agreement > 0.999, agreement
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            a = timings_ms(lambda: gradreg_fast.coupled_argmin(cost, field, weight, backend="cpu"), args.repeats)
            b = timings_ms(lambda: gradreg_fast.coupled_argmin(cost, field, weight, True, backend="cpu"), args.repeats)
            c = timings_ms(lambda: torch_step(by_point, table, norms, field, weight), args.repeats)
            label = f"r={radius} K={cost.shape[1]} " + "x".join(map(str, points))
            print(f"{label:>22} t={threads}  fused {a[0]:7.2f} ({a[1]:7.2f})  mirrored {b[0]:7.2f} ({b[1]:7.2f})  "
                  f"torch {c[0]:7.2f} ({c[1]:7.2f})  x{c[1] / a[1]:.2f}  (agreement {agreement:.5f})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
