"""box_mean (fused CPU core) against the PyTorch the engine used before it and against avg_pool3d, on the CPU.

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_box_mean.py [--repeats 15] [--threads 1,2]

The engine's three uses, at the sizes of its validation cases (the bundled MR's working grid, and the largest,
inter-ac):

* the cost volume's smoothing: 125 displacements over the 2-voxel control grid, two passes, forward only;
* the convex search's field smoothing: 3 channels on the same grid, one pass, forward only;
* the Adam stage's velocity: 3 channels on the 4-voxel grid, two passes, forward and backward.

Implementations, checked against each other first:

* fused: ``gradreg_fast.box_mean(v, passes, backend="cpu")``;
* torch separable: the engine's former code, a 3-voxel sum along each axis by two adds of shifted views into
  the output, the edges copied, divided by the per-axis counts, in an autograd.Function whose backward is the
  same sum of the gradient divided by the counts (the exact adjoint);
* torch separable, in place (forward only): what the engine ran on its cost volume just before box_mean, the same
  sums into two buffers reused across passes, a cache-sized group of channels at a time;
* avg_pool3d: ``F.avg_pool3d(v, 3, 1, 1, count_include_pad=False)`` per pass (the same means: the in-volume part
  of a 3x3x3 window is a box).

Time: the median and the minimum of ``--repeats`` calls after one warm-up call, for each thread count.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from bench_coupled_argmin import timings_ms  # the same timing procedure (median and minimum after a warm-up)

import gradreg_fast

CASES = [  # (what, shape, passes, backward)
    ("cost volume, bundled MR", (1, 125, 16, 46, 60), 2, False),
    ("cost volume, inter-ac", (1, 125, 16, 86, 86), 2, False),
    ("convex field, inter-ac", (1, 3, 16, 86, 86), 1, False),
    ("velocity, inter-ac", (1, 3, 8, 43, 43), 2, True),
]
SEED = 1234


def _sum3(volume: torch.Tensor, axis: int, out: torch.Tensor | None = None,
          scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Each voxel plus its in-volume neighbours along ``axis`` (at least 2 long), into ``out`` when given, with the
    pairwise sums in ``scratch`` (a flat buffer at least the volume's size) when given."""
    n = volume.shape[axis]
    if scratch is None:
        pairs = volume.narrow(axis, 0, n - 1) + volume.narrow(axis, 1, n - 1)
    else:
        shape = list(volume.shape)
        shape[axis] = n - 1
        pairs = torch.add(volume.narrow(axis, 0, n - 1), volume.narrow(axis, 1, n - 1),
                          out=scratch[:torch.Size(shape).numel()].view(shape))
    total = torch.empty_like(volume) if out is None else out
    if n > 2:
        torch.add(pairs.narrow(axis, 0, n - 2), volume.narrow(axis, 2, n - 2), out=total.narrow(axis, 1, n - 2))
    total.narrow(axis, 0, 1).copy_(pairs.narrow(axis, 0, 1))
    total.narrow(axis, n - 1, 1).copy_(pairs.narrow(axis, n - 2, 1))
    return total


def _counts(volume: torch.Tensor, axis: int) -> torch.Tensor:
    n = volume.shape[axis]
    counts = torch.full((n,), 3.0, dtype=volume.dtype)
    counts[0] = counts[-1] = 2.0
    shape = [1] * volume.dim()
    shape[axis] = n
    return counts.view(shape)


class _MeanAlongAxis(torch.autograd.Function):
    """The engine's former autograd.Function: forward S v / c, backward S (g / c) (S is symmetric)."""

    @staticmethod
    def forward(ctx, volume, axis):
        ctx.axis = axis
        return _sum3(volume, axis).div_(_counts(volume, axis))

    @staticmethod
    def backward(ctx, grad):
        return _sum3(grad / _counts(grad, ctx.axis), ctx.axis), None


def torch_separable(volume: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        for axis in (2, 3, 4):
            if volume.shape[axis] > 1:
                volume = _MeanAlongAxis.apply(volume, axis)
    return volume


def torch_separable_in_place(volume: torch.Tensor, passes: int, chunk_bytes: int = 8 << 20) -> torch.Tensor:
    """The engine's cost-volume path just before box_mean (no autograd): the same sums written into two buffers
    reused for every pass, a cache-sized group of channels at a time."""
    volume = volume.clone()  # it overwrites its input
    plane = volume[0, 0].numel()
    chunk = max(1, chunk_bytes // (plane * volume.element_size()))
    spare = torch.empty_like(volume)
    scratch = torch.empty(volume.shape[0] * min(chunk, volume.shape[1]) * plane, dtype=volume.dtype)
    swapped = False
    for start in range(0, volume.shape[1], chunk):
        group, other, swapped = volume[:, start:start + chunk], spare[:, start:start + chunk], False
        for _ in range(passes):
            for axis in (2, 3, 4):
                if group.shape[axis] > 1:
                    _sum3(group, axis, out=other, scratch=scratch).div_(_counts(group, axis))
                    group, other, swapped = other, group, not swapped
    return spare if swapped else volume


def avg_pool(volume: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        volume = F.avg_pool3d(volume, 3, 1, 1, count_include_pad=False)
    return volume


IMPLS = {
    "fused": lambda v, p: gradreg_fast.box_mean(v, p, backend="cpu"),
    "torch separable": torch_separable,
    "torch separable, in place": torch_separable_in_place,  # forward only (writes through out=)
    "avg_pool3d": avg_pool,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", default=os.environ.get("BENCH_THREADS", "1,2"))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(SEED)
    print("| case | shape | passes | pass | threads | implementation | median (ms) | min (ms) | vs fused |")
    print("|---|---|---|---|---|---|---|---|---|")
    for what, shape, passes, backward in CASES:
        volume = torch.rand(shape, generator=gen)
        grad = torch.rand(shape, generator=gen)
        expected = IMPLS["fused"](volume, passes)
        impls = {name: impl for name, impl in IMPLS.items() if not (backward and name.endswith("in place"))}
        for name, impl in impls.items():
            torch.testing.assert_close(impl(volume, passes), expected, rtol=1e-5, atol=1e-6, msg=name)

        def run(impl):
            if not backward:
                return lambda: impl(volume, passes)
            leaf = volume.clone().requires_grad_()
            return lambda: torch.autograd.grad(impl(leaf, passes), leaf, grad)

        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            fused = None
            for name, impl in impls.items():
                median, best = timings_ms(run(impl), args.repeats)
                fused = median if fused is None else fused
                print(f"| {what} | {'x'.join(map(str, shape))} | {passes} | {'fwd+bwd' if backward else 'fwd'} | "
                      f"{threads} | {name} | {median:.2f} | {best:.2f} | {median / fused:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
