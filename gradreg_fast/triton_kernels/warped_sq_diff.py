"""Triton warped_sq_diff: ``sum_{n,x} w(n, x) sum_c (moving_c(x + flow(x)) - fixed_c(x))^2`` and, when
asked, its flow gradient ``2 w sum_c diff_c dM_c/du``, with warp's sampling (the axis and corner helpers
of :mod:`gradreg_fast.triton_kernels.warp`, so the semantics of csrc/include/gradreg/warped_sq_diff.h:
border padding zeroes the gradient where it clipped; a voxel of weight 0 adds 0 and gets a zero
gradient, even where its difference is not finite).

One program per block of voxels of one item: it samples the C channels once, writes the flow
gradient, and stores the block's sum (in float64) to its own slot; the slots are then added by
``torch.sum``, whose order is fixed for a given size, so the value is the same on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, check_voxels, volume_grid, voxel_coordinates, voxel_count
from .warp import _linear_axis, _sample_points, _trilinear

OP = "warped_sq_diff"
BLOCK = 256


@triton.jit
def _kernel(moving_ptr, fixed_ptr, flow_ptr, weight_ptr, grad_flow_ptr, partial_ptr, C, D, H, W, blocks_per_item,
            HAS_WEIGHT: tl.constexpr, NEED_FLOW: tl.constexpr, BORDER: tl.constexpr, BLOCK: tl.constexpr):
    item, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + item * DHW + p, mask=mask, other=0.0)
    else:
        weight = tl.where(mask, 1.0, 0.0).to(moving_ptr.dtype.element_ty)
    active = mask & (weight != 0.0)
    cz, cy, cx = _sample_points(flow_ptr, item, p, z, y, x, mask, DHW)
    lz, fz, lz_in, hz_in, moves_z = _linear_axis(cz, D, BORDER)
    ly, fy, ly_in, hy_in, moves_y = _linear_axis(cy, H, BORDER)
    lx, fx, lx_in, hx_in, moves_x = _linear_axis(cx, W, BORDER)
    zero = tl.zeros([BLOCK], dtype=moving_ptr.dtype.element_ty)
    total, grad_z, grad_y, grad_x = zero, zero, zero, zero
    for c in range(C):
        offset = (item * C + c) * DHW
        value, dz, dy, dx = _trilinear(moving_ptr + offset, lz, fz, lz_in, hz_in, ly, fy, ly_in, hy_in, lx, fx, lx_in,
                                       hx_in, H, W, active, zero, NEED_FLOW)
        diff = value - tl.load(fixed_ptr + offset + p, mask=active, other=0.0)
        diff = tl.where(active, diff, 0.0)
        total += diff * diff
        if NEED_FLOW:
            grad_z += diff * dz
            grad_y += diff * dy
            grad_x += diff * dx
    contribution = tl.where(active, weight * total, 0.0)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(contribution.to(tl.float64), axis=0))
    if NEED_FLOW:
        scale = 2.0 * weight
        flow_grad = grad_flow_ptr + item * 3 * DHW
        tl.store(flow_grad + p, tl.where(active & moves_z, scale * grad_z, 0.0), mask=mask)
        tl.store(flow_grad + DHW + p, tl.where(active & moves_y, scale * grad_y, 0.0), mask=mask)
        tl.store(flow_grad + 2 * DHW + p, tl.where(active & moves_x, scale * grad_x, 0.0), mask=mask)


def forward(moving: torch.Tensor, fixed: torch.Tensor, flow: torch.Tensor, weight: torch.Tensor | None, padding: int,
            need_flow: bool):
    """(the weighted sum as a 0-dim tensor, the flow gradient or an empty tensor); inputs contiguous."""
    n, c, d, h, w = moving.shape
    voxels = check_voxels(OP, (d, h, w))
    grid, blocks = volume_grid(OP, voxels, n, BLOCK)
    partials = torch.empty(grid[0], dtype=torch.float64, device=moving.device)
    grad_flow = torch.empty_like(flow) if need_flow else flow.new_empty(0)
    # Pointers a constexpr switch leaves unused still need a tensor of the right dtype.
    _kernel[grid](moving, fixed, flow, weight if weight is not None else moving, grad_flow if need_flow else flow,
                  partials, c, d, h, w, blocks, HAS_WEIGHT=weight is not None, NEED_FLOW=bool(need_flow),
                  BORDER=padding == 1, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return partials.sum().to(moving.dtype), grad_flow
