"""Triton warp: sample ``image`` at x + flow(x) (voxel units, channel k along spatial axis k),
trilinear or nearest, zeros or border padding, with the semantics of csrc/include/gradreg/warp.h
(grid_sample with align_corners=True; non-finite sample points give 0; border padding clips and
zeroes the flow gradient where it clipped, exactly at the border included; nearest rounds half to
even).

Backward:

* The flow gradient is a gather (each voxel reads its own 8 corners): deterministic.
* The image gradient is a scatter. By default it is ``tl.atomic_add`` into a zeroed buffer (fast,
  but float atomics make the last bits depend on the order threads arrive in).
* ``deterministic=True`` replaces the atomics by sort + segmented sum: every voxel emits its 8
  (destination, weight) pairs, corner-major so the stores are coalesced, with out-of-volume corners
  given a key past every destination; ``torch.sort(stable=True)`` orders them by destination (ties
  keep emission order), ``torch.searchsorted`` finds each destination's run, and one program per
  block of destinations and channel sums its runs in that fixed order. The result is bit-identical
  from run to run. It costs a sort of 8 N D H W int64 keys and about 40 bytes of scratch per
  (voxel, corner), all channel-independent, so it is shared by the C channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, check_voxels, volume_grid, voxel_coordinates, voxel_count

OP = "warp"
BLOCK = 256


@triton.jit
def _linear_axis(coord, n, BORDER: tl.constexpr):
    """One axis of a trilinear sample: (lo, frac, lo inside, lo + 1 inside, coordinate moves with flow)."""
    finite = tl.abs(coord) < float("inf")  # false for NaN too: never turn one into an index
    coord = tl.where(finite, coord, 0.0)
    if BORDER:
        # grid_sample's rule: a coordinate clipped onto the border, or exactly on it, has no gradient.
        moves = finite & (coord > 0.0) & (coord < n - 1)
        coord = tl.minimum(tl.maximum(coord, 0.0), n - 1)
    else:
        # Far outside every corner is outside anyway; clamping keeps the int32 cast defined.
        moves = finite
        coord = tl.minimum(tl.maximum(coord, -2.0), n + 1)
    lo_f = tl.floor(coord)
    lo = lo_f.to(tl.int32)
    frac = coord - lo_f
    lo_in = finite & (lo >= 0) & (lo < n)
    hi_in = finite & (lo >= -1) & (lo < n - 1)
    return lo, frac, lo_in, hi_in, moves


@triton.jit
def _corner(lo, frac, lo_in, hi_in, HIGH: tl.constexpr):
    """(index, weight, inside) of the low or high neighbour along one axis."""
    if HIGH:
        index = lo + 1
        weight = frac
        inside = hi_in
    else:
        index = lo
        weight = 1.0 - frac
        inside = lo_in
    return index, weight, inside


@triton.jit
def _trilinear(image_ptr, lz, fz, lz_in, hz_in, ly, fy, ly_in, hy_in, lx, fx, lx_in, hx_in, H, W, mask, zero,
               GRADIENT: tl.constexpr):
    """The trilinear sample of one channel (``image_ptr`` at its first voxel) at the points whose axes
    ``_linear_axis`` gave, and with GRADIENT its derivatives along z, y, x (each axis's own weight replaced
    by its sign). Corners outside the volume, and lanes outside ``mask``, contribute 0. Shared by warp,
    integrate and warped_sq_diff, so that all three sample alike."""
    value, dz, dy, dx = zero, zero, zero, zero
    for hz in tl.static_range(2):
        iz, wz, in_z = _corner(lz, fz, lz_in, hz_in, hz)
        for hy in tl.static_range(2):
            iy, wy, in_y = _corner(ly, fy, ly_in, hy_in, hy)
            for hx in tl.static_range(2):
                ix, wx, in_x = _corner(lx, fx, lx_in, hx_in, hx)
                inside = mask & in_z & in_y & in_x
                corner = tl.load(image_ptr + ((iz * H + iy) * W + ix), mask=inside, other=0.0)
                corner = tl.where(inside, corner, 0.0)
                value += wz * wy * wx * corner
                if GRADIENT:
                    dz += (2.0 * hz - 1.0) * wy * wx * corner
                    dy += wz * (2.0 * hy - 1.0) * wx * corner
                    dx += wz * wy * (2.0 * hx - 1.0) * corner
    return value, dz, dy, dx


@triton.jit
def _scatter_trilinear(grad_ptr, g, lz, fz, lz_in, hz_in, ly, fy, ly_in, hy_in, lx, fx, lx_in, hx_in, H, W, mask):
    """The adjoint of :func:`_trilinear`'s value: ``g`` times each corner's weight added (atomically) to the
    corners inside the volume of one channel's gradient (``grad_ptr`` at its first voxel)."""
    for hz in tl.static_range(2):
        iz, wz, in_z = _corner(lz, fz, lz_in, hz_in, hz)
        for hy in tl.static_range(2):
            iy, wy, in_y = _corner(ly, fy, ly_in, hy_in, hy)
            for hx in tl.static_range(2):
                ix, wx, in_x = _corner(lx, fx, lx_in, hx_in, hx)
                inside = mask & in_z & in_y & in_x
                tl.atomic_add(grad_ptr + ((iz * H + iy) * W + ix), wz * wy * wx * g, mask=inside, sem="relaxed")


@triton.jit
def _nearest_axis(coord, n, BORDER: tl.constexpr):
    """(index of the nearest voxel, inside); rounds half to even like grid_sample (nearbyint)."""
    finite = tl.abs(coord) < float("inf")
    coord = tl.where(finite, coord, 0.0)
    if BORDER:
        coord = tl.minimum(tl.maximum(coord, 0.0), n - 1)
    coord = tl.minimum(tl.maximum(coord, -2.0), n + 1)  # outside stays outside; keeps the cast defined
    lo_f = tl.floor(coord)
    rest = coord - lo_f
    lo_is_odd = (lo_f - 2.0 * tl.floor(0.5 * lo_f)) == 1.0
    round_up = (rest > 0.5) | ((rest == 0.5) & lo_is_odd)
    index = lo_f.to(tl.int32) + tl.where(round_up, 1, 0)
    return index, finite & (index >= 0) & (index < n)


@triton.jit
def _sample_points(flow_ptr, item, p, z, y, x, mask, DHW):
    """The three sample coordinates x + flow(x) of this program's voxels."""
    flow = flow_ptr + item * 3 * DHW
    cz = z + tl.load(flow + p, mask=mask, other=0.0)
    cy = y + tl.load(flow + DHW + p, mask=mask, other=0.0)
    cx = x + tl.load(flow + 2 * DHW + p, mask=mask, other=0.0)
    return cz, cy, cx


@triton.jit
def _forward_kernel(image_ptr, flow_ptr, out_ptr, C, D, H, W, blocks_per_item, NEAREST: tl.constexpr,
                    BORDER: tl.constexpr, BLOCK: tl.constexpr):
    item, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    cz, cy, cx = _sample_points(flow_ptr, item, p, z, y, x, mask, DHW)
    if NEAREST:
        iz, in_z = _nearest_axis(cz, D, BORDER)
        iy, in_y = _nearest_axis(cy, H, BORDER)
        ix, in_x = _nearest_axis(cx, W, BORDER)
        inside = mask & in_z & in_y & in_x
        source = (iz * H + iy) * W + ix
        for c in range(C):
            offset = (item * C + c) * DHW
            value = tl.load(image_ptr + offset + source, mask=inside, other=0.0)
            tl.store(out_ptr + offset + p, value, mask=mask)
    else:
        # Distinct names for the unused results: Triton treats `_` as a variable, and one `_` holding a
        # mask here and a value in the loop below is a type change it refuses to compile.
        lz, fz, lz_in, hz_in, _moves_z = _linear_axis(cz, D, BORDER)
        ly, fy, ly_in, hy_in, _moves_y = _linear_axis(cy, H, BORDER)
        lx, fx, lx_in, hx_in, _moves_x = _linear_axis(cx, W, BORDER)
        zero = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
        for c in range(C):
            offset = (item * C + c) * DHW
            acc, _dz, _dy, _dx = _trilinear(image_ptr + offset, lz, fz, lz_in, hz_in, ly, fy, ly_in, hy_in, lx, fx, lx_in,
                                      hx_in, H, W, mask, zero, False)
            tl.store(out_ptr + offset + p, acc, mask=mask)


@triton.jit
def _backward_kernel(grad_out_ptr, image_ptr, flow_ptr, grad_image_ptr, grad_flow_ptr, C, D, H, W, blocks_per_item,
                     BORDER: tl.constexpr, ATOMIC_IMAGE: tl.constexpr, NEED_FLOW: tl.constexpr,
                     BLOCK: tl.constexpr):
    item, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    cz, cy, cx = _sample_points(flow_ptr, item, p, z, y, x, mask, DHW)
    lz, fz, lz_in, hz_in, moves_z = _linear_axis(cz, D, BORDER)
    ly, fy, ly_in, hy_in, moves_y = _linear_axis(cy, H, BORDER)
    lx, fx, lx_in, hx_in, moves_x = _linear_axis(cx, W, BORDER)
    zero = tl.zeros([BLOCK], dtype=grad_out_ptr.dtype.element_ty)
    grad_z, grad_y, grad_x = zero, zero, zero
    for c in range(C):
        offset = (item * C + c) * DHW
        g = tl.load(grad_out_ptr + offset + p, mask=mask, other=0.0)
        if ATOMIC_IMAGE:
            _scatter_trilinear(grad_image_ptr + offset, g, lz, fz, lz_in, hz_in, ly, fy, ly_in, hy_in, lx, fx, lx_in,
                               hx_in, H, W, mask)
        if NEED_FLOW:
            # d(sample)/d(coordinate) of this channel
            _, dz, dy, dx = _trilinear(image_ptr + offset, lz, fz, lz_in, hz_in, ly, fy, ly_in, hy_in, lx, fx, lx_in,
                                       hx_in, H, W, mask, zero, True)
            grad_z += g * dz
            grad_y += g * dy
            grad_x += g * dx
    if NEED_FLOW:
        flow_grad = grad_flow_ptr + item * 3 * DHW
        tl.store(flow_grad + p, tl.where(moves_z, grad_z, 0.0), mask=mask)
        tl.store(flow_grad + DHW + p, tl.where(moves_y, grad_y, 0.0), mask=mask)
        tl.store(flow_grad + 2 * DHW + p, tl.where(moves_x, grad_x, 0.0), mask=mask)


@triton.jit
def _corner_pairs_kernel(flow_ptr, key_ptr, weight_ptr, D, H, W, total_voxels: tl.int64, blocks_per_item,
                         BORDER: tl.constexpr, BLOCK: tl.constexpr):
    """Entry corner * total_voxels + source: the destination voxel (over the batch) and trilinear weight
    of one corner of one source voxel; corners outside the volume get the key total_voxels."""
    item, p, z, y, x, mask = voxel_coordinates(tl.program_id(0), blocks_per_item, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    cz, cy, cx = _sample_points(flow_ptr, item, p, z, y, x, mask, DHW)
    lz, fz, lz_in, hz_in, _ = _linear_axis(cz, D, BORDER)
    ly, fy, ly_in, hy_in, _ = _linear_axis(cy, H, BORDER)
    lx, fx, lx_in, hx_in, _ = _linear_axis(cx, W, BORDER)
    source = item * DHW + p
    for hz in tl.static_range(2):
        iz, wz, in_z = _corner(lz, fz, lz_in, hz_in, hz)
        for hy in tl.static_range(2):
            iy, wy, in_y = _corner(ly, fy, ly_in, hy_in, hy)
            for hx in tl.static_range(2):
                ix, wx, in_x = _corner(lx, fx, lx_in, hx_in, hx)
                inside = in_z & in_y & in_x
                destination = tl.where(inside, item * DHW + ((iz * H + iy) * W + ix), total_voxels)
                entry = (hz * 4 + hy * 2 + hx) * total_voxels + source
                tl.store(key_ptr + entry, destination, mask=mask)
                tl.store(weight_ptr + entry, wz * wy * wx, mask=mask)


@triton.jit
def _segment_sum_kernel(grad_out_ptr, order_ptr, weight_ptr, run_start_ptr, grad_image_ptr, C, D, H, W,
                        total_voxels: tl.int64, blocks_per_volume, BLOCK: tl.constexpr):
    """grad_image[n, c, q] = sum over the sorted entries whose destination is (n, q), in sorted order."""
    volume, q, _, _, _, mask = voxel_coordinates(tl.program_id(0), blocks_per_volume, D, H, W, BLOCK)
    DHW = voxel_count(D, H, W)
    item = volume // C
    destination = item * DHW + q
    start = tl.load(run_start_ptr + destination, mask=mask, other=0)
    end = tl.load(run_start_ptr + destination + 1, mask=mask, other=0)
    longest = tl.max(end - start, axis=0)
    grad_out = grad_out_ptr + volume * DHW - item * DHW  # indexed by source over the batch
    acc = tl.zeros([BLOCK], dtype=grad_image_ptr.dtype.element_ty)
    for j in range(0, longest):
        position = start + j
        valid = position < end
        entry = tl.load(order_ptr + position, mask=valid, other=0)
        weight = tl.load(weight_ptr + entry, mask=valid, other=0.0)
        g = tl.load(grad_out + entry % total_voxels, mask=valid, other=0.0)
        acc += tl.where(valid, weight * g, 0.0)
    tl.store(grad_image_ptr + volume * DHW + q, acc, mask=mask)


def forward(image: torch.Tensor, flow: torch.Tensor, nearest: bool, padding: int) -> torch.Tensor:
    """Warp contiguous ``image`` (N, C, D, H, W) by contiguous ``flow`` (N, 3, D, H, W); padding 0 zeros, 1 border."""
    n, c, d, h, w = image.shape
    voxels = check_voxels(OP, (d, h, w))
    grid, blocks = volume_grid(OP, voxels, n, BLOCK)
    out = torch.empty_like(image)
    _forward_kernel[grid](image, flow, out, c, d, h, w, blocks, NEAREST=bool(nearest), BORDER=padding == 1,
                          BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return out


def _image_gradient_sorted(grad_out: torch.Tensor, flow: torch.Tensor, border: bool) -> torch.Tensor:
    """The deterministic image gradient: sort the (destination, weight) pairs, then sum each run in order."""
    n, c, d, h, w = grad_out.shape
    voxels = d * h * w
    total = n * voxels
    keys = torch.empty(8 * total, dtype=torch.int64, device=grad_out.device)
    weights = torch.empty(8 * total, dtype=grad_out.dtype, device=grad_out.device)
    grid, blocks = volume_grid(OP, voxels, n, BLOCK)
    _corner_pairs_kernel[grid](flow, keys, weights, d, h, w, total, blocks, BORDER=border, BLOCK=BLOCK,
                               **LAUNCH_OPTIONS)
    sorted_keys, order = torch.sort(keys, stable=True)
    del keys
    # run_start[q] is the first sorted entry with destination >= q; the entries of q end at run_start[q + 1].
    run_start = torch.searchsorted(sorted_keys, torch.arange(total + 1, dtype=torch.int64, device=grad_out.device))
    del sorted_keys
    grad_image = torch.empty_like(grad_out)
    grid, blocks = volume_grid(OP, voxels, n * c, BLOCK)
    _segment_sum_kernel[grid](grad_out, order, weights, run_start, grad_image, c, d, h, w, total, blocks, BLOCK=BLOCK,
                              **LAUNCH_OPTIONS)
    return grad_image


def backward(grad_out: torch.Tensor, image: torch.Tensor, flow: torch.Tensor, padding: int, need_image: bool,
             need_flow: bool, deterministic: bool):
    """(grad_image or None, grad_flow or None) of the trilinear warp; inputs contiguous."""
    n, c, d, h, w = image.shape
    voxels = check_voxels(OP, (d, h, w))
    border = padding == 1
    atomic_image = need_image and not deterministic
    grad_image = torch.zeros_like(image) if atomic_image else None  # atomics accumulate: must start at 0
    grad_flow = torch.empty_like(flow) if need_flow else None
    if atomic_image or need_flow:
        grid, blocks = volume_grid(OP, voxels, n, BLOCK)
        # Pointers a constexpr switch leaves unused still need a tensor of the right dtype.
        _backward_kernel[grid](grad_out, image, flow, grad_image if atomic_image else image,
                               grad_flow if need_flow else flow, c, d, h, w, blocks, BORDER=border,
                               ATOMIC_IMAGE=atomic_image, NEED_FLOW=bool(need_flow), BLOCK=BLOCK, **LAUNCH_OPTIONS)
    if need_image and deterministic:
        grad_image = _image_gradient_sorted(grad_out, flow, border)
    return grad_image, grad_flow
