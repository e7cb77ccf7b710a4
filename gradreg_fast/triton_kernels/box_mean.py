"""Triton 3x3x3 in-volume mean (csrc/include/gradreg/box_mean.h), and its adjoint: one launch per 1D stage (the
axes longer than one voxel, D, H, W, ``passes`` times; reversed for the adjoint), each program writing its own
``BLOCK`` voxels from their neighbours along the stage's axis (no atomics)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, axis_line, check_voxels, volume_grid, voxel_coordinates

OP = "box_mean"
BLOCK = 256


@triton.jit
def _div(x, y):
    # float32 `/` is an approximate division on the GPU; div_rn is the IEEE one the CPU and CUDA cores use.
    if x.dtype == tl.float32:
        return tl.math.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _count(c, n):
    """Voxels of the 1D window at coordinate c of an axis of n (box_count)."""
    return tl.where(n == 1, 1.0, tl.where((c == 0) | (c == n - 1), 2.0, 3.0))


@triton.jit
def _stage_kernel(in_ptr, out_ptr, D, H, W, blocks_per_volume, AXIS: tl.constexpr, ADJOINT: tl.constexpr,
                  BLOCK: tl.constexpr):
    volume, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    base = volume * D * H * W
    c, n, s = axis_line(z, y, x, D, H, W, AXIS)
    has_left = mask & (c > 0)
    has_right = mask & (c < n - 1)
    centre = tl.load(in_ptr + base + p, mask=mask, other=0.0)
    left = tl.load(in_ptr + base + p - s, mask=has_left, other=0.0)
    right = tl.load(in_ptr + base + p + s, mask=has_right, other=0.0)
    if ADJOINT:  # each neighbour's value over that neighbour's own count, then the same sums
        left = _div(left, _count(c - 1, n).to(centre.dtype))
        right = _div(right, _count(c + 1, n).to(centre.dtype))
        centre = _div(centre, _count(c, n).to(centre.dtype))
    inner = (left + centre) + right
    edge = tl.where(c == 0, centre, left) + tl.where(c == 0, right, centre)  # the two voxels, in axis order
    if not ADJOINT:
        inner = _div(inner, tl.full(centre.shape, 3.0, centre.dtype))
        edge = _div(edge, tl.full(centre.shape, 2.0, centre.dtype))
    value = tl.where(n == 1, centre, tl.where((c == 0) | (c == n - 1), edge, inner))
    tl.store(out_ptr + base + p, value, mask=mask)


def forward(volume: torch.Tensor, passes: int, adjoint: bool) -> torch.Tensor:
    """The mean (or its adjoint) of a contiguous (N, C, D, H, W) float32/float64 tensor, ``passes`` times."""
    n, c, d, h, w = volume.shape
    voxels = check_voxels(OP, (d, h, w))
    grid, blocks = volume_grid(OP, voxels, n * c, BLOCK)
    axes = [axis for _ in range(passes) for axis, size in enumerate((d, h, w)) if size > 1]
    if adjoint:
        axes.reverse()
    source = volume
    for axis in axes:
        target = torch.empty_like(volume)
        _stage_kernel[grid](source, target, d, h, w, blocks, AXIS=axis, ADJOINT=adjoint, BLOCK=BLOCK, **LAUNCH_OPTIONS)
        source = target
    return source.clone() if source is volume else source
