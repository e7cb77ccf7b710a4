"""Triton MIND / MIND-SSC descriptors, forward and backward, with the math of
csrc/include/gradreg/mind.h and csrc/cpu/mind.cpp.

Forward, for K offset pairs (a_k, b_k) (a small int32 table on the device, 6 ints per channel, then K tie
ranks):

1. x pass: box sum along x of the squared differences (I[clamp(x + d a_k)] - I[clamp(x + d b_k)])^2,
   formed on the fly (never stored unfiltered);
2. y pass: box sum along y (replicate edges);
3. z pass fused with the per-voxel centring: box sum along z of all K channels of a voxel tile, scale
   to means, subtract the minimum over k (SSC), and write the channel mean (the local variance)
   and the argmin channel;
4. m = mean of the variance over the batch (or per item), a torch reduction on the device: no
   host sync;
5. finish: clamp the variance to [0.001 m, 1000 m] (and above the dtype's tiny), set flag bit 7
   where it was inside that range, out = exp(-centred / vc).

Backward: the per-voxel gradient w.r.t. the K box sums (patch distances recovered as
-vc * log(out), m held constant), then the adjoint of the separable box filter (z, y, then x fused
with d/dI of the squared difference: E_k = 2 (I[a] - I[b]) * grad), and finally the adjoint of
the clamped shifts as a *gather*: each voxel q sums E_k over the voxels p with clamp(p + d a_k) = q
(minus those with clamp(p + d b_k) = q). Along an axis that preimage is a single voxel except at
the volume's faces, where it is an interval of up to dilation + 1 voxels, so every program loops
over the largest interval of its block (1 away from the faces). No atomics anywhere: the backward
is deterministic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, axis_line, check_voxels, volume_grid, voxel_coordinates, voxel_count

OP = "mind"
BLOCK = 256  # voxels per program of the one-channel passes
TILE = 64  # voxels per program of the all-channel (next_power_of_2(K) x TILE) kernels
MAX_CHANNELS = 0x7F  # the argmin channel is stored in bits 0-6 of the flag byte


@triton.jit
def _clamp(i, n):
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _box_sum(src_ptr, p, c, n, stride, mask, R: tl.constexpr):
    """sum_{t=-R..R} src[clamp(c + t)] along one axis (coordinate c of n, element stride)."""
    acc = tl.zeros(p.shape, dtype=src_ptr.dtype.element_ty)
    for t in tl.static_range(2 * R + 1):
        acc += tl.load(src_ptr + (p + (_clamp(c + (t - R), n) - c) * stride), mask=mask, other=0.0)
    return acc


@triton.jit
def _box_sum_adjoint(src_ptr, p, c, n, stride, mask, R: tl.constexpr):
    """The adjoint of _box_sum: sum_i src[i] * #{t in [-R, R] : clamp(i + t) = c}, as a gather.

    Only i in [c - R, c + R] can reach c.
    """
    acc = tl.zeros(p.shape, dtype=src_ptr.dtype.element_ty)
    for t in tl.static_range(2 * R + 1):
        i = c + (t - R)
        # count = #{u in [-R, R] : clamp(i + u) = c}, an interval of u: inside the axis only u = R - t
        # (where i + u = c); the first voxel also takes every u below, the last every u above.
        first = tl.where(c == 0, -R, R - t)
        last = tl.where(c == n - 1, R, R - t)
        count = last - first + 1
        valid = mask & (i >= 0) & (i < n)
        value = tl.load(src_ptr + (p + (t - R) * stride), mask=valid, other=0.0)
        acc += tl.where(valid, count.to(acc.dtype) * value, 0.0)
    return acc


@triton.jit
def _load_offset(shift_ptr, dilation):
    """One offset (dz, dy, dx) of the pair table, in voxels."""
    return tl.load(shift_ptr + 0) * dilation, tl.load(shift_ptr + 1) * dilation, tl.load(shift_ptr + 2) * dilation


@triton.jit
def _shifted_index(z, y, x, dz, dy, dx, D, H, W):
    """Voxel index of clamp((z, y, x) + (dz, dy, dx)): replicate edges."""
    return (_clamp(z + dz, D) * H + _clamp(y + dy, H)) * W + _clamp(x + dx, W)


@triton.jit
def _box_x_squared_difference_kernel(vol_ptr, pair_ptr, dst_ptr, K, D, H, W, dilation, blocks_per_volume,
                                     R: tl.constexpr, BLOCK: tl.constexpr):
    volume, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    item = volume // K
    pair = pair_ptr + (volume % K) * 6
    az, ay, ax = _load_offset(pair, dilation)
    bz, by, bx = _load_offset(pair + 3, dilation)
    vol = vol_ptr + item * DHW
    acc = tl.zeros([BLOCK], dtype=dst_ptr.dtype.element_ty)
    for t in tl.static_range(2 * R + 1):
        xt = _clamp(x + (t - R), W)
        diff = tl.load(vol + _shifted_index(z, y, xt, az, ay, ax, D, H, W), mask=mask, other=0.0) \
            - tl.load(vol + _shifted_index(z, y, xt, bz, by, bx, D, H, W), mask=mask, other=0.0)
        acc += diff * diff
    tl.store(dst_ptr + volume * DHW + p, acc, mask=mask)


@triton.jit
def _box_sum_axis_kernel(src_ptr, dst_ptr, D, H, W, blocks_per_volume, AXIS: tl.constexpr, R: tl.constexpr,
                         BLOCK: tl.constexpr):
    volume, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    c, n, stride = axis_line(z, y, x, D, H, W, AXIS)
    base = volume * D * H * W
    tl.store(dst_ptr + base + p, _box_sum(src_ptr + base, p, c, n, stride, mask, R), mask=mask)


@triton.jit
def _box_adjoint_axis_kernel(src_ptr, dst_ptr, D, H, W, blocks_per_volume, AXIS: tl.constexpr, R: tl.constexpr,
                             BLOCK: tl.constexpr):
    volume, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    c, n, stride = axis_line(z, y, x, D, H, W, AXIS)
    base = volume * D * H * W
    tl.store(dst_ptr + base + p, _box_sum_adjoint(src_ptr + base, p, c, n, stride, mask, R), mask=mask)


@triton.jit
def _channel_tile(item, p, mask, D, H, W, K: tl.constexpr, KP: tl.constexpr):
    """Element offsets (KP, TILE) of channels 0..K-1 of item's voxels p, the tile's mask, and k (KP, 1).
    Voxels run along the last, fastest axis so that every channel row is a coalesced access."""
    k = tl.arange(0, KP)[:, None]
    DHW = voxel_count(D, H, W)
    offsets = item * K * DHW + k.to(tl.int64) * DHW + p[None, :]
    return offsets, (k < K) & mask[None, :], k


@triton.jit
def _center_kernel(box_ptr, centered_ptr, variance_ptr, flags_ptr, pair_ptr, D, H, W, blocks_per_item,
                   K: tl.constexpr, KP: tl.constexpr, R: tl.constexpr, SUBTRACT_MIN: tl.constexpr,
                   BLOCK: tl.constexpr):
    """z pass of the box filter on all K channels of a voxel tile, then the per-voxel centring.

    The argmin is, among the channels equal to the minimum, the one of lowest tie rank (the table's
    last K ints; see descriptor_center in gradreg/mind.h)."""
    item, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    offsets, tile_mask, k = _channel_tile(item, p, mask, D, H, W, K, KP)
    acc = tl.zeros([KP, BLOCK], dtype=centered_ptr.dtype.element_ty)
    for t in tl.static_range(2 * R + 1):
        shift = (_clamp(z + (t - R), D) - z) * (H * W)
        acc += tl.load(box_ptr + (offsets + shift[None, :]), mask=tile_mask, other=0.0)
    candidates = tl.where(tile_mask, acc, float("inf"))
    lowest = tl.min(candidates, axis=0)
    rank = tl.load(pair_ptr + 6 * K + k, mask=k < K, other=KP)
    argmin = tl.argmin(tl.where(candidates == lowest[None, :], rank, KP), axis=0)
    if SUBTRACT_MIN:  # from the sums, then scaled, as descriptor_center: the minimum channel is exactly 0
        acc = acc - lowest[None, :]
    values = acc * (1.0 / ((2 * R + 1) * (2 * R + 1) * (2 * R + 1)))
    variance = tl.sum(tl.where(tile_mask, values, 0.0), axis=0) / K
    tl.store(centered_ptr + offsets, values, mask=tile_mask)
    voxel = item * D * H * W + p
    tl.store(variance_ptr + voxel, variance, mask=mask)
    tl.store(flags_ptr + voxel, argmin.to(tl.uint8), mask=mask)


@triton.jit
def _finish_kernel(centered_ptr, out_ptr, variance_ptr, flags_ptr, mean_ptr, D, H, W, blocks_per_item,
                   K: tl.constexpr, KP: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr):
    """Clamp the variance to [0.001 m, 1000 m] (flag bit 7: it was inside), then out = exp(-centred / vc)."""
    item, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    offsets, tile_mask, _ = _channel_tile(item, p, mask, D, H, W, K, KP)
    voxel = item * D * H * W + p
    m = tl.load(mean_ptr + item)
    variance = tl.load(variance_ptr + voxel, mask=mask, other=1.0)
    low = 0.001 * m
    high = 1000.0 * m
    below = variance < low
    above = variance > high
    vc = tl.where(below, low, tl.where(above, high, variance))
    # tiny only matters on a constant volume (m = 0): exp(-0 / tiny) = 1 instead of 0 / 0. A non-finite
    # m (non-finite input) makes vc NaN, hence the whole descriptor (m - m: 0 or NaN), as in mind.h.
    vc = tl.where(vc > TINY, vc, TINY) + (m - m)
    flag = tl.load(flags_ptr + voxel, mask=mask, other=0).to(tl.int32)
    flag = flag | tl.where(below | above, 0, 0x80)
    tl.store(variance_ptr + voxel, vc, mask=mask)
    tl.store(flags_ptr + voxel, flag.to(tl.uint8), mask=mask)
    centered = tl.load(centered_ptr + offsets, mask=tile_mask, other=0.0)
    tl.store(out_ptr + offsets, tl.exp(-centered / vc[None, :]), mask=tile_mask)


@triton.jit
def _box_gradient_kernel(upstream_ptr, target_ptr, scale_ptr, out_ptr, variance_ptr, flags_ptr, grad_box_ptr, D, H,
                         W, blocks_per_item, K: tl.constexpr, KP: tl.constexpr, R: tl.constexpr,
                         SUBTRACT_MIN: tl.constexpr, FROM_PENALTY: tl.constexpr, SQUARED: tl.constexpr,
                         TINY: tl.constexpr, BLOCK: tl.constexpr):
    """d(loss)/d(box sum k) per voxel: descriptor_backward_voxel of the header on a (K, TILE) tile.

    The upstream gradient is a tensor, or (FROM_PENALTY) the derivative of the L1/L2 penalty against
    ``target`` times the scalar at ``scale_ptr``, formed here so no descriptor-sized gradient exists.
    """
    item, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    offsets, tile_mask, k = _channel_tile(item, p, mask, D, H, W, K, KP)
    voxel = item * D * H * W + p
    vc = tl.load(variance_ptr + voxel, mask=mask, other=1.0)
    flag = tl.load(flags_ptr + voxel, mask=mask, other=0).to(tl.int32)
    out = tl.load(out_ptr + offsets, mask=tile_mask, other=1.0)
    if FROM_PENALTY:
        scale = tl.load(scale_ptr)
        diff = out - tl.load(target_ptr + offsets, mask=tile_mask, other=1.0)
        if SQUARED:
            upstream = scale * 2.0 * diff
        else:
            upstream = tl.where(diff > 0.0, scale, tl.where(diff < 0.0, -scale, 0.0))
    else:
        upstream = tl.load(upstream_ptr + offsets, mask=tile_mask, other=0.0)
    t = upstream * out
    varies = (vc > TINY) | (vc != vc)  # false only where m = 0 (a constant volume): zeroed below; NaN stays
    vc_row = tl.where(varies, vc, 1.0)[None, :]
    grad = -t / vc_row
    # The patch distance is -vc * log(out); where out underflowed to 0, out * log(out) -> 0.
    positive = out > 0.0
    dvar = -tl.sum(tl.where(positive, t * tl.log(tl.where(positive, out, 1.0)) / vc_row, 0.0), axis=0)
    dvar = tl.where((flag & 0x80) != 0, dvar, 0.0)  # a clamped variance is constant
    grad = grad + (dvar / K)[None, :]
    if SUBTRACT_MIN:
        total = tl.sum(tl.where(tile_mask, grad, 0.0), axis=0)
        grad = tl.where(k == (flag & 0x7F)[None, :], grad - total[None, :], grad)
    grad = grad * (1.0 / ((2 * R + 1) * (2 * R + 1) * (2 * R + 1)))
    grad = tl.where(varies[None, :], grad, 0.0)  # constant volume: locally constant descriptor
    tl.store(grad_box_ptr + offsets, grad, mask=tile_mask)


@triton.jit
def _box_adjoint_x_kernel(src_ptr, vol_ptr, pair_ptr, dst_ptr, K, D, H, W, dilation, blocks_per_volume,
                          R: tl.constexpr, BLOCK: tl.constexpr):
    """E_k(p) = 2 (I[a_k(p)] - I[b_k(p)]) * (x-adjoint of the box filter of the gradient)(p)."""
    volume, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    base = volume * DHW
    grad = _box_sum_adjoint(src_ptr + base, p, x, W, 1, mask, R)
    vol = vol_ptr + (volume // K) * DHW
    pair = pair_ptr + (volume % K) * 6
    az, ay, ax = _load_offset(pair, dilation)
    bz, by, bx = _load_offset(pair + 3, dilation)
    diff = tl.load(vol + _shifted_index(z, y, x, az, ay, ax, D, H, W), mask=mask, other=0.0) \
        - tl.load(vol + _shifted_index(z, y, x, bz, by, bx, D, H, W), mask=mask, other=0.0)
    tl.store(dst_ptr + base + p, 2.0 * diff * grad, mask=mask)


@triton.jit
def _preimage(c, n, offset):
    """[first, last] of the coordinates i in [0, n) with clamp(i + offset) = c (empty when first > last)."""
    first = tl.where(c == 0, 0, tl.maximum(c - offset, 0))
    last = tl.where(c == n - 1, n - 1, tl.minimum(c - offset, n - 1))
    return first, last


@triton.jit
def _gather_shift_adjoint(e_ptr, shift_ptr, z, y, x, D, H, W, dilation, mask):
    """sum of e[p] over the voxels p with clamp(p + dilation * shift) = (z, y, x)."""
    dz, dy, dx = _load_offset(shift_ptr, dilation)
    z0, z1 = _preimage(z, D, dz)
    y0, y1 = _preimage(y, H, dy)
    x0, x1 = _preimage(x, W, dx)
    # Loop over the block's longest interval per axis: a single voxel unless the block touches a face.
    nz = tl.max(tl.where(mask, z1 - z0 + 1, 0), axis=0)
    ny = tl.max(tl.where(mask, y1 - y0 + 1, 0), axis=0)
    nx = tl.max(tl.where(mask, x1 - x0 + 1, 0), axis=0)
    acc = tl.zeros(z.shape, dtype=e_ptr.dtype.element_ty)
    for iz in range(0, nz):
        pz = z0 + iz
        in_z = mask & (pz <= z1)
        for iy in range(0, ny):
            py = y0 + iy
            in_zy = in_z & (py <= y1)
            for ix in range(0, nx):
                px = x0 + ix
                valid = in_zy & (px <= x1)
                acc += tl.load(e_ptr + ((pz * H + py) * W + px), mask=valid, other=0.0)
    return acc


@triton.jit
def _shift_adjoint_kernel(e_ptr, pair_ptr, grad_ptr, D, H, W, dilation, blocks_per_item, K: tl.constexpr,
                          BLOCK: tl.constexpr):
    """grad[q] = sum_k (sum_{p: a_k(p) = q} E_k[p] - sum_{p: b_k(p) = q} E_k[p]), a deterministic gather."""
    item, q, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    acc = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
    for k in tl.static_range(K):
        e = e_ptr + (item * K + k) * DHW
        acc += _gather_shift_adjoint(e, pair_ptr + 6 * k, z, y, x, D, H, W, dilation, mask)
        acc -= _gather_shift_adjoint(e, pair_ptr + 6 * k + 3, z, y, x, D, H, W, dilation, mask)
    tl.store(grad_ptr + item * DHW + q, acc, mask=mask)


@functools.lru_cache(maxsize=None)
def _pair_table(pairs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Cached per device: building it on every call would be a host-to-device copy each time.
    return torch.tensor(pairs, dtype=torch.int32, device=device)


def _channels(pairs) -> int:
    if len(pairs) == 0 or len(pairs) % 7 != 0:
        raise ValueError(f"gradreg_fast.{OP} (triton): `pairs` must hold 7 ints per channel (6 offsets, a tie "
                         f"rank), got {len(pairs)} ints")
    k = len(pairs) // 7
    if k > MAX_CHANNELS:
        raise ValueError(f"gradreg_fast.{OP} (triton): at most {MAX_CHANNELS} channels fit the flag byte, got {k}")
    if sorted(pairs[6 * k:]) != list(range(k)):
        raise ValueError(f"gradreg_fast.{OP} (triton): the tie ranks of `pairs` must be a permutation of 0..{k - 1}")
    return k


def _launch_setup(vol: torch.Tensor, pairs):
    n, _, d, h, w = vol.shape
    k = _channels(pairs)
    voxels = check_voxels(OP, (d, h, w))
    table = _pair_table(tuple(int(v) for v in pairs), vol.device)
    channel_grid = volume_grid(OP, voxels, n * k, BLOCK)
    tile_grid = volume_grid(OP, voxels, n, TILE)
    return (n, k, d, h, w), table, channel_grid, tile_grid


def descriptor_forward(vol: torch.Tensor, pairs, radius: int, dilation: int, subtract_min: bool, per_item: bool):
    """(out (N, K, D, H, W), clamped variance (N, 1, D, H, W), flags uint8 (N, 1, D, H, W)) of a contiguous
    (N, 1, D, H, W) volume. Flags: bits 0-6 the argmin channel, bit 7 set where the variance was not clamped."""
    (n, k, d, h, w), table, (grid, blocks), (tile_grid, tile_blocks) = _launch_setup(vol, pairs)
    box = vol.new_empty((n, k, d, h, w))
    out = vol.new_empty((n, k, d, h, w))
    variance = vol.new_empty((n, 1, d, h, w))
    flags = torch.empty((n, 1, d, h, w), dtype=torch.uint8, device=vol.device)
    _box_x_squared_difference_kernel[grid](vol, table, box, k, d, h, w, dilation, blocks, R=radius, BLOCK=BLOCK,
                                           **LAUNCH_OPTIONS)
    _box_sum_axis_kernel[grid](box, out, d, h, w, blocks, AXIS=1, R=radius, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    kp = triton.next_power_of_2(k)
    _center_kernel[tile_grid](out, box, variance, flags, table, d, h, w, tile_blocks, K=k, KP=kp, R=radius,
                              SUBTRACT_MIN=bool(subtract_min), BLOCK=TILE, **LAUNCH_OPTIONS)
    # m on the device (no .item()): per item, or over the batch and repeated per item.
    mean = variance.view(n, -1).mean(dim=1) if per_item else variance.mean().expand(n).contiguous()
    _finish_kernel[tile_grid](box, out, variance, flags, mean, d, h, w, tile_blocks, K=k, KP=kp,
                              TINY=torch.finfo(vol.dtype).tiny, BLOCK=TILE, **LAUNCH_OPTIONS)
    return out, variance, flags


def _descriptor_backward(upstream, target, scale, squared, out, vol, variance, flags, pairs, radius, dilation,
                         subtract_min):
    (n, k, d, h, w), table, (grid, blocks), (tile_grid, tile_blocks) = _launch_setup(vol, pairs)
    from_penalty = upstream is None
    grad_box = torch.empty_like(out)
    scratch = torch.empty_like(out)
    # Unused pointers (switched off by constexpr flags) still need a tensor of the right dtype.
    _box_gradient_kernel[tile_grid](out if from_penalty else upstream, target if from_penalty else out,
                                    scale if from_penalty else out, out, variance.contiguous(), flags.contiguous(),
                                    grad_box, d, h, w, tile_blocks, K=k, KP=triton.next_power_of_2(k), R=radius,
                                    SUBTRACT_MIN=bool(subtract_min), FROM_PENALTY=from_penalty,
                                    SQUARED=bool(squared), TINY=torch.finfo(vol.dtype).tiny, BLOCK=TILE,
                                    **LAUNCH_OPTIONS)
    _box_adjoint_axis_kernel[grid](grad_box, scratch, d, h, w, blocks, AXIS=0, R=radius, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    _box_adjoint_axis_kernel[grid](scratch, grad_box, d, h, w, blocks, AXIS=1, R=radius, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    _box_adjoint_x_kernel[grid](grad_box, vol, table, scratch, k, d, h, w, dilation, blocks, R=radius, BLOCK=BLOCK,
                                **LAUNCH_OPTIONS)
    grad_vol = torch.empty_like(vol)
    grid, blocks = volume_grid(OP, d * h * w, n, BLOCK)
    _shift_adjoint_kernel[grid](scratch, table, grad_vol, d, h, w, dilation, blocks, K=k, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return grad_vol


def descriptor_backward(grad_out, out, vol, variance, flags, pairs, radius, dilation, subtract_min):
    """d(loss)/d(vol) from grad_out = d(loss)/d(out) and the forward's (out, variance, flags); contiguous inputs."""
    return _descriptor_backward(grad_out, None, None, False, out, vol, variance, flags, pairs, radius, dilation,
                                subtract_min)


def descriptor_loss_backward(scale, squared, target, out, vol, variance, flags, pairs, radius, dilation,
                             subtract_min):
    """d(scale * sum penalty(out - target))/d(vol), penalty |.| (squared=False) or (.)^2, formed per voxel.

    ``scale`` is a tensor on the device (read there: no host sync)."""
    scale = scale.to(device=vol.device, dtype=vol.dtype).reshape(1)
    return _descriptor_backward(None, target, scale, squared, out, vol, variance, flags, pairs, radius, dilation,
                                subtract_min)
