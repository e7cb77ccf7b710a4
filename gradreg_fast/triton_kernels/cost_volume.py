"""Triton MIND cost volume (csrc/include/gradreg/cost_volume.h), forward and backward.

Both kernels work on tiles of ``K_TILE`` displacements x a block of lanes:

* Forward: a program takes ``K_TILE`` displacements x ``Q_TILE`` control points of one item; each
  fixed value is loaded once per tile and compared with ``K_TILE`` moving samples, so the tile reuses
  it from registers instead of reloading it per displacement.
* Backward: a program takes ``BLOCK`` voxels of one (item, channel) volume and gathers over the
  displacements ``K_TILE`` at a time (the fixed voxel x from its own control point and the moving
  sample x + s d_k; the moving voxel y from the source x = y - s d_k, where it exists). No atomics, so
  the backward is deterministic.

Displacement k is (dz, dy, dx) with dx fastest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INT32_LIMIT, LAUNCH_OPTIONS, check_voxels

OP = "mind_cost_volume"
K_TILE = 16
Q_TILE = 64
BLOCK = 64


@triton.jit
def _displacement(k, radius, spacing):
    side = 2 * radius + 1
    return ((k // (side * side) - radius) * spacing, ((k // side) % side - radius) * spacing,
            (k % side - radius) * spacing)


@triton.jit
def _block_voxels(qz, qy, qx, D, H, W, grid):
    """The number of voxels of control point q's block (the last block along an axis may be partial)."""
    bz = tl.minimum(D, qz * grid + grid) - qz * grid
    by = tl.minimum(H, qy * grid + grid) - qy * grid
    bx = tl.minimum(W, qx * grid + grid) - qx * grid
    # At least 1: lanes past the end (masked) would otherwise divide by zero or less.
    return tl.maximum(bz * by * bx, 1)


@triton.jit
def _forward_kernel(fixed_ptr, moving_ptr, out_ptr, C, D, H, W, Dq, Hq, Wq, K, radius, spacing, grid, k_tiles,
                    q_tiles, K_TILE: tl.constexpr, Q_TILE: tl.constexpr):
    pid = tl.program_id(0)
    q_tile = pid % q_tiles
    k_tile = (pid // q_tiles) % k_tiles
    n = (pid // (q_tiles * k_tiles)).to(tl.int64)
    controls = Dq * Hq * Wq
    k = k_tile * K_TILE + tl.arange(0, K_TILE)[:, None]  # (K_TILE, 1)
    q = q_tile * Q_TILE + tl.arange(0, Q_TILE)[None, :]  # (1, Q_TILE)
    k_lane = k < K
    q_lane = q < controls
    qx = q % Wq
    qy = (q // Wq) % Hq
    qz = q // (Wq * Hq)
    oz, oy, ox = _displacement(k, radius, spacing)
    acc = tl.zeros((K_TILE, Q_TILE), dtype=fixed_ptr.dtype.element_ty)
    # A block offset at or past the volume's size is outside it for every control point: bounding the loops by
    # the size keeps a grid larger than the volume (allowed, up to 4096) from costing grid**3 masked steps.
    for bz in range(0, tl.minimum(grid, D)):
        z = qz * grid + bz
        zm = z + oz
        for by in range(0, tl.minimum(grid, H)):
            y = qy * grid + by
            ym = y + oy
            for bx in range(0, tl.minimum(grid, W)):
                x = qx * grid + bx
                xm = x + ox
                valid = q_lane & (z < D) & (y < H) & (x < W)
                inside = valid & k_lane & (zm >= 0) & (zm < D) & (ym >= 0) & (ym < H) & (xm >= 0) & (xm < W)
                p = (z * H + y) * W + x
                pm = (zm * H + ym) * W + xm
                for c in range(0, C):
                    base = (n * C + c) * D * H * W
                    f = tl.load(fixed_ptr + base + p, mask=valid, other=0.0)  # (1, Q_TILE), shared by the tile
                    m = tl.load(moving_ptr + base + pm, mask=inside, other=0.0)
                    d = f - m
                    acc += d * d
    count = _block_voxels(qz, qy, qx, D, H, W, grid)
    tl.store(out_ptr + (n * K + k) * controls + q, acc / count.to(acc.dtype), mask=k_lane & q_lane)


@triton.jit
def _backward_kernel(go_ptr, fixed_ptr, moving_ptr, grad_ptr, C, D, H, W, Dq, Hq, Wq, K, radius, spacing, grid,
                     blocks_per_volume, WRT_MOVING: tl.constexpr, K_TILE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    volume = (pid // blocks_per_volume).to(tl.int64)  # n * C + c
    n = volume // C
    p = (pid % blocks_per_volume) * BLOCK + tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
    lane = p < D * H * W
    x = p % W
    y = (p // W) % H
    z = p // (H * W)
    base = volume * D * H * W
    if WRT_MOVING:
        own = tl.load(moving_ptr + base + p, mask=lane, other=0.0)
        other_ptr = fixed_ptr + base
    else:
        own = tl.load(fixed_ptr + base + p, mask=lane, other=0.0)
        other_ptr = moving_ptr + base
    controls = Dq * Hq * Wq
    acc = tl.zeros((BLOCK,), dtype=own.dtype)
    for k0 in range(0, K, K_TILE):
        k = k0 + tl.arange(0, K_TILE)[:, None]  # (K_TILE, 1)
        oz, oy, ox = _displacement(k, radius, spacing)
        if WRT_MOVING:  # the source voxel that samples this one
            pz = z - oz
            py = y - oy
            px = x - ox
        else:
            pz = z + oz
            py = y + oy
            px = x + ox
        inside = lane & (k < K) & (pz >= 0) & (pz < D) & (py >= 0) & (py < H) & (px >= 0) & (px < W)
        other = tl.load(other_ptr + (pz * H + py) * W + px, mask=inside, other=0.0)
        if WRT_MOVING:  # the weight of the source voxel's control point; nothing where there is no source
            qz = pz // grid
            qy = py // grid
            qx = px // grid
            weighted = inside
        else:
            qz = z // grid
            qy = y // grid
            qx = x // grid
            weighted = lane & (k < K)
        go = tl.load(go_ptr + (n * K + k) * controls + (qz * Hq + qy) * Wq + qx, mask=weighted, other=0.0)
        w = go / _block_voxels(qz, qy, qx, D, H, W, grid).to(go.dtype)
        acc += tl.sum(tl.where(weighted, 2.0 * w * (own - other), 0.0), axis=0)
    tl.store(grad_ptr + base + p, acc[None, :], mask=lane)


def _launch_size(programs: int) -> tuple[int]:
    if programs > INT32_LIMIT:
        raise ValueError(
            f"gradreg_fast.{OP} (triton): {programs} programs are more than the {INT32_LIMIT} one launch allows; "
            "use the CUDA or CPU backend"
        )
    return (programs,)


def _sizes(fixed: torch.Tensor, radius: int, grid: int):
    n, c, d, h, w = fixed.shape
    check_voxels(OP, (d, h, w))
    k = (2 * radius + 1) ** 3
    return n, c, d, h, w, k, triton.cdiv(d, grid), triton.cdiv(h, grid), triton.cdiv(w, grid)


def forward(fixed: torch.Tensor, moving: torch.Tensor, radius: int, spacing: int, grid: int) -> torch.Tensor:
    """The cost volume of contiguous (N, C, D, H, W) float32/float64 descriptors of one device."""
    n, c, d, h, w, k, dq, hq, wq = _sizes(fixed, radius, grid)
    out = fixed.new_empty((n, k, dq, hq, wq))
    k_tiles, q_tiles = triton.cdiv(k, K_TILE), triton.cdiv(dq * hq * wq, Q_TILE)
    _forward_kernel[_launch_size(n * k_tiles * q_tiles)](
        fixed, moving, out, c, d, h, w, dq, hq, wq, k, radius, spacing, grid, k_tiles, q_tiles, K_TILE=K_TILE,
        Q_TILE=Q_TILE, **LAUNCH_OPTIONS)
    return out


def backward(grad_out: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, radius: int, spacing: int,
             grid: int, need_fixed: bool, need_moving: bool):
    """(grad_fixed, grad_moving), None where not needed; all inputs contiguous."""
    n, c, d, h, w, k, dq, hq, wq = _sizes(fixed, radius, grid)
    blocks = triton.cdiv(d * h * w, BLOCK)
    launch = _launch_size(n * c * blocks)
    grads = []
    for wrt_moving, need in ((False, need_fixed), (True, need_moving)):
        if not need:
            grads.append(None)
            continue
        grad = torch.empty_like(fixed)
        _backward_kernel[launch](grad_out, fixed, moving, grad, c, d, h, w, dq, hq, wq, k, radius, spacing, grid,
                                 blocks, WRT_MOVING=wrt_moving, K_TILE=K_TILE, BLOCK=BLOCK, **LAUNCH_OPTIONS)
        grads.append(grad)
    return tuple(grads)
