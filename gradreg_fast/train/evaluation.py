"""Validation measures of the trainer: label overlap and folding of a displacement field.

(Kept small and local to the trainer; the package's public evaluation metrics live elsewhere.)
"""

from __future__ import annotations

import torch

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


def jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of the transform x -> x + u(x), (N, 3, D, H, W) -> (N, D, H, W).

    Derivatives by ``torch.gradient``: central differences inside, one-sided at the edges (as
    ``numpy.gradient``); along an axis of size 1 the derivative is 0.
    """
    if flow.dim() != 5 or flow.shape[1] != 3:
        raise ValueError(f"`flow` must have shape (N, 3, D, H, W), got {tuple(flow.shape)}")
    flow = flow.double()
    derivatives = [torch.gradient(flow, dim=axis)[0] if flow.shape[axis] > 1 else torch.zeros_like(flow)
                   for axis in (2, 3, 4)]
    # jacobian[..., k, a] = d(x_k + u_k) / d x_a
    jacobian = torch.stack(derivatives, dim=-1).movedim(1, -2) + torch.eye(3, dtype=flow.dtype, device=flow.device)
    return torch.linalg.det(jacobian)


def folding_percentage(flow: torch.Tensor) -> torch.Tensor:
    """(N,) percentage of voxels whose Jacobian determinant is <= 0 (where the transform folds)."""
    return (jacobian_determinant(flow) <= 0).double().mean(dim=(1, 2, 3)) * 100
