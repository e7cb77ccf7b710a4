import torch

from .warp import warp


def warped_sq_diff(moving: torch.Tensor, fixed: torch.Tensor, flow: torch.Tensor, weight: torch.Tensor | None = None,
                   padding_mode: str = "border") -> torch.Tensor:
    """Reference for :func:`gradreg_fast.warped_sq_diff`: the reference warp, then a weighted squared difference.

    ``sum_{n,x} weight(n, x) * sum_c (warp(moving, flow)_c(x) - fixed_c(x))^2``. A voxel of weight 0 adds
    exactly 0 (and passes no gradient), even where the difference is not finite.
    """
    difference = warp(moving, flow, "bilinear", padding_mode) - fixed
    if weight is None:
        return difference.square().sum()
    # Masked before squaring: a where after it would still send 0 * inf = NaN back through a non-finite difference.
    difference = torch.where(weight != 0, difference, torch.zeros_like(difference))
    return (weight * difference.square().sum(1, keepdim=True)).sum()
