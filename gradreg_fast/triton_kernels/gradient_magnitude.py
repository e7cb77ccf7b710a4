"""Triton gradient magnitude G(V) = sqrt(gz^2 + gy^2 + gx^2 + eps), g_a = V(x + e_a) - V(x - e_a)
with replicate edges (csrc/include/gradreg/gradient_magnitude.h), forward and backward.

The backward is the gather form of the header's ``grad_mag_backward``: each voxel sums the terms
of the (at most three per axis) voxels whose central difference reads it, so it needs no atomics
and is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, check_voxels, volume_grid, voxel_coordinates

OP = "gradient_magnitude"
BLOCK = 256


@triton.jit
def _sqrt(x):
    # tl.sqrt is the approximate square root for float32; sqrt_rn is the IEEE one the CPU core uses.
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _central_difference(v_ptr, p, c, n, stride, mask):
    """v[p + e] - v[p - e] along one axis (coordinate c of n, element stride), replicate edges."""
    forward = tl.where(c < n - 1, stride, 0)
    back = tl.where(c > 0, stride, 0)
    return tl.load(v_ptr + (p + forward), mask=mask, other=0.0) - tl.load(v_ptr + (p - back), mask=mask, other=0.0)


@triton.jit
def _forward_kernel(vol_ptr, eps_ptr, out_ptr, D, H, W, blocks_per_volume, BLOCK: tl.constexpr):
    volume, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    base = volume * D * H * W
    v = vol_ptr + base
    gz = _central_difference(v, p, z, D, H * W, mask)
    gy = _central_difference(v, p, y, H, W, mask)
    gx = _central_difference(v, p, x, W, 1, mask)
    eps = tl.load(eps_ptr)
    tl.store(out_ptr + base + p, _sqrt(gz * gz + gy * gy + gx * gx + eps), mask=mask)


@triton.jit
def _scale(go_ptr, out_ptr, p, mask):
    """grad_out / out at p, 0 where out == 0 (eps = 0 on a flat patch: the zero subgradient)."""
    out = tl.load(out_ptr + p, mask=mask, other=1.0)
    go = tl.load(go_ptr + p, mask=mask, other=0.0)
    positive = out > 0.0
    return tl.where(positive, go / tl.where(positive, out, 1.0), 0.0)


@triton.jit
def _backward_axis(v_ptr, go_ptr, out_ptr, q, c, n, s, mask):
    """d(loss)/dV[q] through the differences along one axis (coordinate c of n, stride s)."""
    vq = tl.load(v_ptr + q, mask=mask, other=0.0)
    # q - s reads q as its forward neighbour; its backward neighbour is q - 2s, or q - s itself at the edge.
    has_prev = mask & (c >= 1)
    prev = q - s
    prev_back = tl.where(c - 1 > 0, s, 0)
    acc = tl.where(has_prev, _scale(go_ptr, out_ptr, prev, has_prev)
                   * (vq - tl.load(v_ptr + (prev - prev_back), mask=has_prev, other=0.0)), 0.0)
    # q + s reads q as its backward neighbour.
    has_next = mask & (c <= n - 2)
    nxt = q + s
    next_forward = tl.where(c + 1 < n - 1, s, 0)
    acc -= tl.where(has_next, _scale(go_ptr, out_ptr, nxt, has_next)
                    * (tl.load(v_ptr + (nxt + next_forward), mask=has_next, other=0.0) - vq), 0.0)
    # An edge voxel is its own missing neighbour: + at the far edge, - at the near edge (both: 0).
    self_term = _scale(go_ptr, out_ptr, q, mask) * _central_difference(v_ptr, q, c, n, s, mask)
    acc += tl.where(c == n - 1, self_term, 0.0)
    acc -= tl.where(c == 0, self_term, 0.0)
    return acc


@triton.jit
def _backward_kernel(go_ptr, vol_ptr, out_ptr, grad_ptr, D, H, W, blocks_per_volume, BLOCK: tl.constexpr):
    volume, q, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    base = volume * D * H * W
    v, go, out = vol_ptr + base, go_ptr + base, out_ptr + base
    grad = _backward_axis(v, go, out, q, z, D, H * W, mask)
    grad += _backward_axis(v, go, out, q, y, H, W, mask)
    grad += _backward_axis(v, go, out, q, x, W, 1, mask)
    tl.store(grad_ptr + base + q, grad, mask=mask)


def forward(vol: torch.Tensor, eps: float) -> torch.Tensor:
    """G(vol) of a contiguous (N, C, D, H, W) float32/float64 tensor."""
    n, c, d, h, w = vol.shape
    voxels = check_voxels(OP, (d, h, w))
    grid, blocks = volume_grid(OP, voxels, n * c, BLOCK)
    out = torch.empty_like(vol)
    # eps travels as a tensor of vol's dtype: a float argument would be rounded to float32.
    eps_t = torch.full((1,), eps, dtype=vol.dtype, device=vol.device)
    _forward_kernel[grid](vol, eps_t, out, d, h, w, blocks, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return out


def backward(grad_out: torch.Tensor, vol: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(vol) from grad_out = d(loss)/d(out) and the forward's out (all contiguous, same shape)."""
    n, c, d, h, w = vol.shape
    voxels = check_voxels(OP, (d, h, w))
    grid, blocks = volume_grid(OP, voxels, n * c, BLOCK)
    grad_vol = torch.empty_like(vol)
    _backward_kernel[grid](grad_out, vol, out, grad_vol, d, h, w, blocks, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return grad_vol
