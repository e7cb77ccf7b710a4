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

import torch

from .. import box_mean, coupled_argmin, mind_cost_volume, mind_cost_volume_displacements, warp

COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # ConvexAdam's rising coupling weights (cost units per cell^2)


def cost_volume(fixed_features, moving_features, radius: int, smoothing: int = 2,
                backend: str | None = None) -> torch.Tensor:
    """(K, d, h, w) matching cost of every control point (the feature voxels) for each of the K = (2r+1)^3
    displacements of :func:`gradreg_fast.mind_cost_volume_displacements`, smoothed by ``smoothing`` 3x3x3
    box passes over the control grid (a point's cost then reflects its neighbourhood, as in ConvexAdam)."""
    cost = mind_cost_volume(fixed_features, moving_features, radius, backend=backend)
    return (box_mean(cost, smoothing, backend=backend) if smoothing else cost)[0]


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
        return box_mean(table[index].permute(0, 4, 1, 2, 3), backend=backend)

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
