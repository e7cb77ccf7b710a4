"""Discrete search and coupled convex optimisation of a displacement field (ConvexAdam's first stage).

Siebert, Hansen and Heinrich, "Fast 3D registration with accurate optimisation and little learning for
Learn2Reg 2021": over a cost volume ``cost[k, p]`` (the descriptor mismatch of control point p moved by
the k-th integer displacement), alternate

1. ``u(p) = argmin_k cost[k, p] + lambda * |d_k - ubar(p)|^2`` (a per-point search, coupled to a smooth field),
2. ``ubar = box(u)`` (the smoothing of the field that the coupling follows),

with ``lambda`` rising, so that each point first takes its best match and then gives in to its neighbours.
No gradient is used, so the capture range is the whole search window (``radius`` control cells), not the
basin of a gradient descent. The optional inverse-consistency step symmetrises a forward and a backward
field (each the approximate inverse of the other), as ConvexAdam does.

Units: displacements here are in control cells (one cell = ``grid`` voxels of the image the descriptors
came from), channel k along spatial axis k, as :func:`gradreg_fast.warp` reads flows.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .. import coupled_argmin, mind_cost_volume, mind_cost_volume_displacements, warp

COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # ConvexAdam's rising coupling weights (cost units per cell^2)


def _sum3_axis(volume: torch.Tensor, axis: int, out: torch.Tensor | None = None,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of each voxel and its neighbours along ``axis`` (at least 2 long: the callers skip axes of one
    voxel) that lie inside the volume (a symmetric operator).

    pairs[i] = v[i] + v[i+1] once, then interior i adds v[i+1] to pairs[i-1] straight into the output: two
    passes over memory, which matters for the cost volume's hundreds of channels. ``out`` (the volume's shape,
    contiguous) and ``scratch`` (a flat buffer of at least the volume's size) let a caller reuse memory across
    calls instead of touching fresh pages each time."""
    n = volume.shape[axis]
    shape = list(volume.shape)
    shape[axis] = n - 1
    if scratch is None:
        pairs = volume.narrow(axis, 0, n - 1) + volume.narrow(axis, 1, n - 1)
    else:
        pairs = torch.add(volume.narrow(axis, 0, n - 1), volume.narrow(axis, 1, n - 1),
                          out=scratch[:math.prod(shape)].view(shape))
    total = torch.empty_like(volume) if out is None else out
    if n > 2:
        torch.add(pairs.narrow(axis, 0, n - 2), volume.narrow(axis, 2, n - 2), out=total.narrow(axis, 1, n - 2))
    total.narrow(axis, 0, 1).copy_(pairs.narrow(axis, 0, 1))
    total.narrow(axis, n - 1, 1).copy_(pairs.narrow(axis, n - 2, 1))
    return total


def _counts(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """How many voxels :func:`_sum3_axis` adds at each position along ``axis`` (broadcastable to ``volume``)."""
    n = volume.shape[axis]
    counts = torch.full((n,), 3.0, dtype=volume.dtype, device=volume.device)
    counts[0] = counts[-1] = 2.0
    shape = [1] * volume.dim()
    shape[axis] = n
    return counts.view(shape)


class _Box3Axis(torch.autograd.Function):
    """The mean over the in-volume neighbours along one axis, B = S / c (S: :func:`_sum3_axis`, c: the
    counts). Its adjoint is S (g / c), since S is symmetric: the backward costs what the forward does, instead
    of autograd's slice-by-slice record (which dominated the Adam stage's time on the velocity's small grids)."""

    @staticmethod
    def forward(ctx, volume, axis):
        ctx.axis = axis
        return _sum3_axis(volume, axis).div_(_counts(volume, axis))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _sum3_axis(grad / _counts(grad, ctx.axis), ctx.axis), None


def box3(volume: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """3x3x3 mean over the voxels inside the volume (N, C, D, H, W), ``passes`` times.

    Separable, and borders average fewer voxels, so a constant stays constant and a field is not pulled
    towards zero at the edges. Differentiable (its exact adjoint, :class:`_Box3Axis`); much faster on the
    CPU than ``avg_pool3d`` for the hundreds of channels of a cost volume.
    """
    for _ in range(passes):
        for axis in (2, 3, 4):
            if volume.shape[axis] > 1:
                volume = _Box3Axis.apply(volume, axis)
    return volume


def _box3_consuming(volume: torch.Tensor, passes: int, chunk_bytes: int = 8 << 20) -> torch.Tensor:
    """:func:`box3` without autograd, for a contiguous volume the caller gives up (it is overwritten): the same
    values, with two buffers allocated once for all passes instead of two fresh ones per axis (the cost volume's
    hundreds of channels make page faults a large part of the time), and all passes run on a group of channels
    of about ``chunk_bytes`` before the next group, so each group stays in the cache while it is smoothed (about
    1.5x faster on the engine's cost volumes than whole-volume passes; smaller groups pay more in calls)."""
    plane = math.prod(volume.shape[2:])
    chunk = max(1, chunk_bytes // (plane * volume.element_size()))
    spare = torch.empty_like(volume)
    scratch = torch.empty(volume.shape[0] * min(chunk, volume.shape[1]) * plane, dtype=volume.dtype,
                          device=volume.device)
    swapped = False
    for start in range(0, volume.shape[1], chunk):
        group, other, swapped = volume[:, start:start + chunk], spare[:, start:start + chunk], False
        for _ in range(passes):
            for axis in (2, 3, 4):
                if volume.shape[axis] > 1:
                    _sum3_axis(group, axis, out=other, scratch=scratch).div_(_counts(group, axis))
                    group, other, swapped = other, group, not swapped
    # Every group took the same number of passes, so all their results lie in the same buffer.
    return spare if swapped else volume


def cost_volume(fixed_features, moving_features, radius: int, smoothing: int = 2,
                backend: str | None = None) -> torch.Tensor:
    """(K, d, h, w) matching cost of every control point (the feature voxels) for each of the K = (2r+1)^3
    displacements of :func:`gradreg_fast.mind_cost_volume_displacements`, smoothed by ``smoothing`` 3x3x3
    box passes over the control grid (a point's cost then reflects its neighbourhood, as in ConvexAdam)."""
    cost = mind_cost_volume(fixed_features, moving_features, radius, backend=backend)[0]
    if smoothing:
        volume = cost.unsqueeze(0)
        # The consuming form writes into buffers with out=, which autograd cannot record.
        cost = (box3(volume, smoothing) if volume.requires_grad else _box3_consuming(volume.contiguous(), smoothing))[0]
    return cost


def coupled_convex(cost: torch.Tensor, radius: int, coupling=COUPLING, mirrored: bool = False,
                   backend: str | None = None) -> torch.Tensor:
    """The coupled convex optimisation over a (K, d, h, w) cost volume: a (1, 3, d, h, w) field in cells.

    Each step is one pass of the fused :func:`gradreg_fast.coupled_argmin` over the volume; ``mirrored``
    reads the volume as the opposite search (see there).
    """
    table = mind_cost_volume_displacements(radius, dtype=cost.dtype, device=cost.device)  # (K, 3)
    volume = cost.unsqueeze(0)

    def search(field, weight):
        index = coupled_argmin(volume, field, weight, mirrored, backend=backend)  # (1, d, h, w)
        return box3(table[index].permute(0, 4, 1, 2, 3).contiguous())  # box3 runs ~2x faster on a contiguous field

    field = search(cost.new_zeros((1, 3, *cost.shape[1:])), 0.0)
    for weight in coupling:
        field = search(field, weight)
    return field


def inverse_consistent(forward: torch.Tensor, backward: torch.Tensor, iterations: int = 15,
                       backend: str | None = None):
    """Make two fields (fixed -> moving and moving -> fixed, one grid) approximate inverses of each other.

    Each iteration replaces each field by the mean of itself and the negated other one seen through it:
    u <- (u - v o (id + u)) / 2. At a fixed point u = -v o (id + u), i.e. (id + v) o (id + u) = id.
    """
    for _ in range(iterations):
        forward, backward = (0.5 * (forward - warp(backward, forward, padding_mode="border", backend=backend)),
                             0.5 * (backward - warp(forward, backward, padding_mode="border", backend=backend)))
    return forward, backward


def convex_field(fixed_features, moving_features, radius: int, outside=None, coupling=COUPLING,
                 symmetric: bool = True, ic_iterations: int = 15, cost_smoothing: int = 2,
                 backend: str | None = None) -> torch.Tensor:
    """The coupled convex field (1, 3, d, h, w), in control cells, of two feature volumes (1, C, d, h, w).

    ``outside``: a (d, h, w) bool mask of control points outside the fixed field of view; their cost is set
    to zero for every displacement, so that only the coupling decides their motion.

    With ``symmetric`` the search is also run from the moving side and both fields are made inverse
    consistent. That search needs no second cost volume: the moving -> fixed cost of displacement d at a
    point is the fixed -> moving cost of -d where d lands (the mirrored read of
    :func:`gradreg_fast.coupled_argmin`), taken before the ``outside`` mask (which belongs to the fixed side).
    """
    cost = cost_volume(fixed_features, moving_features, radius, cost_smoothing, backend=backend)
    backward = coupled_convex(cost, radius, coupling, mirrored=True, backend=backend) if symmetric else None
    if outside is not None:
        cost = cost.masked_fill_(outside.unsqueeze(0), 0.0)
    forward = coupled_convex(cost, radius, coupling, backend=backend)
    if not symmetric:
        return forward
    return inverse_consistent(forward, backward, ic_iterations, backend=backend)[0]
