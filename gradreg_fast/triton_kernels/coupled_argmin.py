"""Triton coupled_argmin (csrc/include/gradreg/coupled_argmin.h): at every point, the displacement k of
a cost volume that minimises ``C[n, k, p] + coupling * |d_k - field[n, :, p]|^2``.

A program takes ``BLOCK`` consecutive points of one item and loops over the K displacements, keeping
each lane's best value and index in registers: every step loads one coalesced row of the cost volume
(mirrored: channel K-1-k read at the clamped point p + d_k, still contiguous along x away from the
borders). The coupled cost is rounded term by term (LAUNCH_OPTIONS: no FMA), as the reference rounds it,
so near-equal costs order the same way. A NaN coupled cost counts as +inf; of equal coupled costs the
displacement nearest the field wins, then the lower k (strict comparisons against a best that starts at
(+inf, +inf) with index 0).

Displacement k is (dz, dy, dx) with dx fastest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, check_voxels, volume_grid, voxel_coordinates, voxel_count

OP = "coupled_argmin"
BLOCK = 256


@triton.jit
def _clamp(i, n):
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _kernel(cost_ptr, field_ptr, coupling_ptr, index_ptr, D, H, W, K, radius, blocks_per_volume,
            MIRRORED: tl.constexpr, BLOCK: tl.constexpr):
    n, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    voxels = voxel_count(D, H, W)
    u = field_ptr + n * 3 * voxels + p
    uz = tl.load(u, mask=mask, other=0.0)
    uy = tl.load(u + voxels, mask=mask, other=0.0)
    ux = tl.load(u + 2 * voxels, mask=mask, other=0.0)
    dtype = uz.dtype
    coupling = tl.load(coupling_ptr)
    best = tl.full((BLOCK,), float("inf"), dtype)
    nearest = tl.full((BLOCK,), float("inf"), dtype)
    arg = tl.zeros((BLOCK,), dtype=tl.int32)  # K <= 65^3 fits; widened to int64 at the store
    side = 2 * radius + 1
    for k in range(0, K):
        dz = k // (side * side) - radius
        dy = (k // side) % side - radius
        dx = k % side - radius
        if MIRRORED:
            q = (_clamp(z + dz, D) * H + _clamp(y + dy, H)) * W + _clamp(x + dx, W)
            c = tl.load(cost_ptr + (n * K + (K - 1 - k)) * voxels + q, mask=mask, other=0.0)
        else:
            c = tl.load(cost_ptr + (n * K + k) * voxels + p, mask=mask, other=0.0)
        ez = dz.to(dtype) - uz
        ey = dy.to(dtype) - uy
        ex = dx.to(dtype) - ux
        distance = ez * ez + ey * ey + ex * ex
        value = c + coupling * distance
        value = tl.where(value != value, float("inf"), value)
        better = (value < best) | ((value == best) & (distance < nearest))
        best = tl.where(better, value, best)
        nearest = tl.where(better, distance, nearest)
        arg = tl.where(better, k, arg)
    tl.store(index_ptr + n * voxels + p, arg.to(tl.int64), mask=mask)


def forward(cost: torch.Tensor, field: torch.Tensor, coupling: float, radius: int, mirrored: bool) -> torch.Tensor:
    """(N, D, H, W) int64 indices for a contiguous (N, (2r+1)^3, D, H, W) cost volume and (N, 3, D, H, W)
    field of one float32/float64 dtype and device."""
    n, k, d, h, w = cost.shape
    voxels = check_voxels(OP, (d, h, w))
    grid, blocks = volume_grid(OP, voxels, n, BLOCK)
    index = torch.empty((n, d, h, w), dtype=torch.int64, device=cost.device)
    # coupling travels as a tensor of the costs' dtype: a float argument would be rounded to float32.
    coupling_t = torch.full((1,), coupling, dtype=cost.dtype, device=cost.device)
    _kernel[grid](cost, field, coupling_t, index, d, h, w, k, radius, blocks, MIRRORED=bool(mirrored), BLOCK=BLOCK,
                  **LAUNCH_OPTIONS)
    return index
