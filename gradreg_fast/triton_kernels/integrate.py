"""Triton integrate_velocity (scaling and squaring), with the semantics of csrc/include/gradreg/integrate.h
and the sampling of :mod:`gradreg_fast.triton_kernels.warp`: one program per block of voxels per step, the
step loop and the checkpoints (u_k for k = interval, 2 interval, ... < steps) in Python, as the CUDA core's
host code. The backward's scatter is ``tl.atomic_add`` into a zeroed buffer (last bits vary from run to run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, check_voxels, volume_grid, voxel_coordinates, voxel_count
from .warp import _linear_axis, _sample_points, _scatter_trilinear, _trilinear

OP = "integrate_velocity"
BLOCK = 256


@triton.jit
def _step_kernel(u_ptr, next_ptr, D, H, W, blocks_per_item, BORDER: tl.constexpr, BLOCK: tl.constexpr):
    """next = u + u sampled at x + u(x), three channels."""
    item, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    cz, cy, cx = _sample_points(u_ptr, item, p, z, y, x, mask, DHW)
    lz, fz, lz_in, hz_in, _ = _linear_axis(cz, D, BORDER)
    ly, fy, ly_in, hy_in, _ = _linear_axis(cy, H, BORDER)
    lx, fx, lx_in, hx_in, _ = _linear_axis(cx, W, BORDER)
    zero = tl.zeros([BLOCK], dtype=next_ptr.dtype.element_ty)
    for c in tl.static_range(3):
        offset = (item * 3 + c) * DHW
        acc = tl.load(u_ptr + offset + p, mask=mask, other=0.0)
        sample, _, _, _ = _trilinear(u_ptr + offset, lz, fz, lz_in, hz_in, ly, fy, ly_in, hy_in, lx, fx, lx_in, hx_in,
                                     H, W, mask, zero, False)
        tl.store(next_ptr + offset + p, acc + sample, mask=mask)


@triton.jit
def _grad_kernel(u_ptr, g_ptr, dst_ptr, D, H, W, blocks_per_item, BORDER: tl.constexpr, BLOCK: tl.constexpr):
    """dst (zeroed) += this step's d/du from G: the scatter onto the corners, and the direct part at p."""
    item, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    cz, cy, cx = _sample_points(u_ptr, item, p, z, y, x, mask, DHW)
    lz, fz, lz_in, hz_in, moves_z = _linear_axis(cz, D, BORDER)
    ly, fy, ly_in, hy_in, moves_y = _linear_axis(cy, H, BORDER)
    lx, fx, lx_in, hx_in, moves_x = _linear_axis(cx, W, BORDER)
    zero = tl.zeros([BLOCK], dtype=dst_ptr.dtype.element_ty)
    grad_z, grad_y, grad_x = zero, zero, zero
    for c in tl.static_range(3):
        offset = (item * 3 + c) * DHW
        g = tl.load(g_ptr + offset + p, mask=mask, other=0.0)
        _scatter_trilinear(dst_ptr + offset, g, lz, fz, lz_in, hz_in, ly, fy, ly_in, hy_in, lx, fx, lx_in, hx_in, H, W,
                           mask)
        _, dz, dy, dx = _trilinear(u_ptr + offset, lz, fz, lz_in, hz_in, ly, fy, ly_in, hy_in, lx, fx, lx_in, hx_in,
                                   H, W, mask, zero, True)
        grad_z += g * dz
        grad_y += g * dy
        grad_x += g * dx
    base = dst_ptr + item * 3 * DHW + p
    g_base = g_ptr + item * 3 * DHW + p
    tl.atomic_add(base, tl.load(g_base, mask=mask, other=0.0) + tl.where(moves_z, grad_z, 0.0), mask=mask,
                  sem="relaxed")
    tl.atomic_add(base + DHW, tl.load(g_base + DHW, mask=mask, other=0.0) + tl.where(moves_y, grad_y, 0.0),
                  mask=mask, sem="relaxed")
    tl.atomic_add(base + 2 * DHW, tl.load(g_base + 2 * DHW, mask=mask, other=0.0) + tl.where(moves_x, grad_x, 0.0),
                  mask=mask, sem="relaxed")


def _step(u, out, border):
    n, _, d, h, w = u.shape
    grid, blocks = volume_grid(OP, d * h * w, n, BLOCK)
    _step_kernel[grid](u, out, d, h, w, blocks, BORDER=border, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return out


def forward(velocity, steps, padding, interval, count):
    """(the integrated field, the checkpoints u_interval, u_2interval, ... (``count`` of them) or empty)."""
    check_voxels(OP, tuple(velocity.shape[2:]))
    border = padding == 1
    checkpoints = velocity.new_empty((count, *velocity.shape)) if count else velocity.new_empty(0)
    u = velocity / (2 ** steps)  # a power of two: exact
    for k in range(1, steps + 1):
        keep = k < steps and count and k % interval == 0
        # A fresh buffer per step: the previous one is released as soon as it has been read (on the GPU
        # the caching allocator hands it back for the step after).
        u = _step(u, checkpoints[k // interval - 1] if keep else torch.empty_like(velocity), border)
    return (u if steps else u.clone()), checkpoints


def backward(grad_out, velocity, checkpoints, steps, padding, interval):
    check_voxels(OP, tuple(velocity.shape[2:]))
    n, _, d, h, w = velocity.shape
    border = padding == 1
    grid, blocks = volume_grid(OP, d * h * w, n, BLOCK)
    g = grad_out
    for k in range(steps - 1, -1, -1):
        nearest = (k // interval) * interval if checkpoints.numel() else 0
        u = velocity / (2 ** steps) if nearest == 0 else checkpoints[nearest // interval - 1]
        for _ in range(nearest, k):
            u = _step(u, torch.empty_like(velocity), border)
        dst = torch.zeros_like(velocity)  # the atomics accumulate
        _grad_kernel[grid](u, g, dst, d, h, w, blocks, BORDER=border, BLOCK=BLOCK, **LAUNCH_OPTIONS)
        g = dst
    return g / (2 ** steps)
