"""Triton lncc_loss, with the per-voxel math of csrc/include/gradreg/lncc.h (VoxelMorph's or MONAI's
formulas on the five window sums; the coefficients d(-cc)/dS that the backward window-sums again).

The window sums are three separable passes (x, y, z) between two buffers of five channels per item, as
the CUDA core does; the loss is the sum of the per-voxel map (torch's reduction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, axis_line, check_voxels, volume_grid, voxel_coordinates, voxel_count

OP = "lncc_loss"
BLOCK = 256


@triton.jit
def _products_kernel(warped_ptr, fixed_ptr, fixed_batch_stride, out_ptr, D, H, W, blocks_per_item,
                     BLOCK: tl.constexpr):
    item, p, _, _, _, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    i = tl.load(fixed_ptr + item * fixed_batch_stride + p, mask=mask, other=0.0)
    j = tl.load(warped_ptr + item * DHW + p, mask=mask, other=0.0)
    out = out_ptr + item * 5 * DHW + p
    tl.store(out, i, mask=mask)
    tl.store(out + DHW, j, mask=mask)
    tl.store(out + 2 * DHW, i * i, mask=mask)
    tl.store(out + 3 * DHW, j * j, mask=mask)
    tl.store(out + 4 * DHW, i * j, mask=mask)


@triton.jit
def _box_axis_kernel(in_ptr, out_ptr, D, H, W, R, blocks_per_volume, AXIS: tl.constexpr, BLOCK: tl.constexpr):
    """out = in summed over [-R, R] along AXIS (0 z, 1 y, 2 x), zeros outside."""
    volume, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    coord, size, stride = axis_line(z, y, x, D, H, W, AXIS)
    base = in_ptr + volume * DHW
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for k in range(-R, R + 1):
        c = coord + k
        inside = mask & (c >= 0) & (c < size)
        acc += tl.load(base + p + k * stride, mask=inside, other=0.0)
    tl.store(out_ptr + volume * DHW + p, acc, mask=mask)


@triton.jit
def _finish_kernel(sums_ptr, constants_ptr, map_ptr, coef_ptr, D, H, W, blocks_per_item, MONAI: tl.constexpr,
                   COUNT: tl.constexpr, BLOCK: tl.constexpr):
    item, p, _, _, _, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    n = tl.load(constants_ptr)
    eps = tl.load(constants_ptr + 1)
    smooth_nr = tl.load(constants_ptr + 2)
    sums = sums_ptr + item * 5 * DHW + p
    s_i = tl.load(sums, mask=mask, other=0.0)
    s_j = tl.load(sums + DHW, mask=mask, other=0.0)
    s_ii = tl.load(sums + 2 * DHW, mask=mask, other=0.0)
    s_jj = tl.load(sums + 3 * DHW, mask=mask, other=0.0)
    s_ij = tl.load(sums + 4 * DHW, mask=mask, other=0.0)
    one = tl.full([BLOCK], 1.0, dtype=s_i.dtype)
    if MONAI:
        avg_i = s_i / n
        avg_j = s_j / n
        cross = s_ij - avg_j * s_i
        raw_i = s_ii - avg_i * s_i
        raw_j = s_jj - avg_j * s_j
        var_i = tl.where(raw_i < eps, eps, raw_i)  # a NaN stays a NaN, as torch.max
        var_j = tl.where(raw_j < eps, eps, raw_j)
        # d(floored variance)/d(variance): torch.max passes half of the gradient on a tie
        floor_i = tl.where(raw_i > eps, one, tl.where(raw_i == eps, 0.5 * one, 0.0 * one))
        floor_j = tl.where(raw_j > eps, one, tl.where(raw_j == eps, 0.5 * one, 0.0 * one))
        num = cross * cross + smooth_nr
        den = var_i * var_j
    else:
        u_i = s_i / n
        u_j = s_j / n
        cross = s_ij - u_j * s_i - u_i * s_j + u_i * u_j * n
        var_i = s_ii - 2.0 * u_i * s_i + u_i * u_i * n
        var_j = s_jj - 2.0 * u_j * s_j + u_j * u_j * n
        num = cross * cross
        den = var_i * var_j + eps
        floor_i = one
        floor_j = one
    cc = num / den
    tl.store(map_ptr + item * DHW + p, -cc, mask=mask)
    if COUNT > 0:
        d_cross = -2.0 * cross / den
        d_var_i = cc * var_j / den * floor_i
        d_var_j = cc * var_i / den * floor_j
        coef = coef_ptr + item * COUNT * DHW + p
        tl.store(coef, -(d_cross * s_i + 2.0 * d_var_j * s_j) / n, mask=mask)
        tl.store(coef + DHW, d_var_j, mask=mask)
        tl.store(coef + 2 * DHW, d_cross, mask=mask)
        if COUNT == 5:
            tl.store(coef + 3 * DHW, -(d_cross * s_j + 2.0 * d_var_i * s_i) / n, mask=mask)
            tl.store(coef + 4 * DHW, d_var_i, mask=mask)


@triton.jit
def _scale_kernel(coef_ptr, grad_ptr, out_ptr, COUNT, D, H, W, blocks_per_volume, GRAD_IS_MAP: tl.constexpr,
                  BLOCK: tl.constexpr):
    volume, p, _, _, _, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    if GRAD_IS_MAP:
        g = tl.load(grad_ptr + (volume // COUNT) * DHW + p, mask=mask, other=0.0)
    else:
        g = tl.load(grad_ptr)
    value = tl.load(coef_ptr + volume * DHW + p, mask=mask, other=0.0)
    tl.store(out_ptr + volume * DHW + p, value * g, mask=mask)


@triton.jit
def _combine_kernel(box_ptr, warped_ptr, fixed_ptr, fixed_batch_stride, grad_warped_ptr, grad_fixed_ptr, COUNT, D, H,
                    W, blocks_per_item, NEED_WARPED: tl.constexpr, NEED_FIXED: tl.constexpr, BLOCK: tl.constexpr):
    item, p, _, _, _, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    box = box_ptr + item * COUNT * DHW + p
    i = tl.load(fixed_ptr + item * fixed_batch_stride + p, mask=mask, other=0.0)
    j = tl.load(warped_ptr + item * DHW + p, mask=mask, other=0.0)
    b_ij = tl.load(box + 2 * DHW, mask=mask, other=0.0)
    if NEED_WARPED:
        b_j = tl.load(box, mask=mask, other=0.0)
        b_jj = tl.load(box + DHW, mask=mask, other=0.0)
        tl.store(grad_warped_ptr + item * DHW + p, b_j + 2.0 * j * b_jj + i * b_ij, mask=mask)
    if NEED_FIXED:
        b_i = tl.load(box + 3 * DHW, mask=mask, other=0.0)
        b_ii = tl.load(box + 4 * DHW, mask=mask, other=0.0)
        tl.store(grad_fixed_ptr + item * DHW + p, b_i + 2.0 * i * b_ii + j * b_ij, mask=mask)


def _window_sums(a: torch.Tensor, b: torch.Tensor, volumes: int, spatial, r: int) -> torch.Tensor:
    """Window sums of the ``volumes`` volumes in ``a``, through ``b``; returns the buffer holding them."""
    d, h, w = spatial
    grid, blocks = volume_grid(OP, d * h * w, volumes, BLOCK)
    for axis, (src, dst) in zip((2, 1, 0), ((a, b), (b, a), (a, b))):
        _box_axis_kernel[grid](src, dst, d, h, w, r, blocks, AXIS=axis, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return b


def _fixed_batch_stride(fixed):
    return 0 if fixed.shape[0] == 1 else fixed[0].numel()


def forward(warped, fixed, window, eps, smooth_nr, monai, per_voxel, coefficient_count):
    """(sum of -cc or the per-voxel map, coefficients or empty) of contiguous (N, 1, D, H, W) inputs."""
    n, _, d, h, w = warped.shape
    voxels = check_voxels(OP, (d, h, w))
    a = warped.new_empty((n, 5, d, h, w))
    b = torch.empty_like(a)
    grid, blocks = volume_grid(OP, voxels, n, BLOCK)
    _products_kernel[grid](warped, fixed, _fixed_batch_stride(fixed), a, d, h, w, blocks, BLOCK=BLOCK,
                           **LAUNCH_OPTIONS)
    sums = _window_sums(a, b, 5 * n, (d, h, w), window // 2)
    # Filled on the device, not copied from the host: a host-to-device copy cannot be captured in a CUDA
    # graph (gpu_benchmark.py found this op the one Triton path that could not be). A tensor rather than
    # scalar arguments: Triton passes Python floats as float32, and the float64 path needs them exact.
    constants = warped.new_empty(3)
    constants[0], constants[1], constants[2] = float(window) ** 3, eps, smooth_nr
    loss_map = warped.new_empty((n, 1, d, h, w))
    coefficients = warped.new_empty((n, coefficient_count, d, h, w)) if coefficient_count else warped.new_empty(0)
    _finish_kernel[grid](sums, constants, loss_map, coefficients if coefficient_count else loss_map, d, h, w, blocks,
                         MONAI=bool(monai), COUNT=coefficient_count, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return (loss_map if per_voxel else loss_map.sum()), coefficients


def backward(grad, coefficients, warped, fixed, window, need_warped, need_fixed):
    """(grad_warped or None, grad_fixed per item or None); ``grad`` is a scalar or the per-voxel map."""
    n, _, d, h, w = warped.shape
    voxels = check_voxels(OP, (d, h, w))
    count = coefficients.shape[1]
    a = torch.empty_like(coefficients)
    b = torch.empty_like(coefficients)
    grid, blocks = volume_grid(OP, voxels, n * count, BLOCK)
    _scale_kernel[grid](coefficients, grad, a, count, d, h, w, blocks, GRAD_IS_MAP=grad.dim() > 0, BLOCK=BLOCK,
                        **LAUNCH_OPTIONS)
    box = _window_sums(a, b, n * count, (d, h, w), window // 2)
    grad_warped = torch.empty_like(warped) if need_warped else None
    grad_fixed = warped.new_empty((n, 1, d, h, w)) if need_fixed else None
    grid, blocks = volume_grid(OP, voxels, n, BLOCK)
    _combine_kernel[grid](box, warped, fixed, _fixed_batch_stride(fixed),
                          grad_warped if need_warped else warped, grad_fixed if need_fixed else warped, count, d, h,
                          w, blocks, NEED_WARPED=bool(need_warped), NEED_FIXED=bool(need_fixed), BLOCK=BLOCK,
                          **LAUNCH_OPTIONS)
    return grad_warped, grad_fixed
