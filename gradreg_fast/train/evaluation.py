"""Validation measures of the trainer: label overlap and folding of a displacement field, batched.

Folding is :mod:`gradreg_fast.metrics`' own, item by item; Dice is a batched torch form for label maps already on
the training device.
"""

from __future__ import annotations

import math

import torch

from ..metrics import folding_percent
from ..ops import warp


def warp_labels(labels: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Integer label map (N, 1, D, H, W) warped by ``flow`` with nearest-neighbour sampling."""
    return warp(labels.to(flow.dtype), flow, mode="nearest").round().long()


def mean_dice(warped_labels: torch.Tensor, fixed_labels: torch.Tensor) -> torch.Tensor:
    """(N,) mean Dice over the labels > 0 present in either map of each item (NaN where none is).

    Args:
        warped_labels, fixed_labels: (N, 1, D, H, W) integer tensors with values >= 0, same shape.
    """
    if warped_labels.shape != fixed_labels.shape:
        raise ValueError(f"label maps must have the same shape, got {tuple(warped_labels.shape)} and "
                         f"{tuple(fixed_labels.shape)}")
    scores = []
    for a, b in zip(warped_labels.flatten(1), fixed_labels.flatten(1)):
        if a.min() < 0 or b.min() < 0:
            raise ValueError("label maps must hold labels >= 0")
        count = int(max(a.max(), b.max())) + 1
        overlap = torch.bincount(a[a == b], minlength=count).double()
        sizes = torch.bincount(a, minlength=count).double() + torch.bincount(b, minlength=count).double()
        present = sizes > 0
        present[0] = False
        scores.append((2 * overlap[present] / sizes[present]).mean() if present.any() else torch.tensor(float("nan")))
    return torch.stack(scores)


def folding_percentage(flow: torch.Tensor) -> torch.Tensor:
    """(N,) percentage of voxels whose Jacobian determinant is <= 0 (where the transform folds); NaN for an item
    whose flow holds NaN or inf (a NaN determinant is not <= 0, so it would read as no folding).

    Each item goes through :func:`gradreg_fast.metrics.folding_percent` on the CPU, so training validation and
    the package's reported folding share one Jacobian.

    Args:
        flow: (N, 3, D, H, W) displacement in voxels, at least 2 voxels along each spatial axis.
    """
    if flow.dim() != 5 or flow.shape[1] != 3:
        raise ValueError(f"`flow` must have shape (N, 3, D, H, W), got {tuple(flow.shape)}")
    flow = flow.detach().cpu()
    values = [folding_percent(item) if torch.isfinite(item).all() else math.nan for item in flow]
    return torch.tensor(values, dtype=torch.float64)
