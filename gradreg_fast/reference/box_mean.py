import torch
import torch.nn.functional as F


def box_mean(volume: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Reference for :func:`gradreg_fast.box_mean`: per pass, the sum over the 3x3x3 window (a convolution with
    zero padding) divided by the number of window voxels inside the volume (the same convolution of ones)."""
    return _passes(volume, passes, adjoint=False)


def box_mean_adjoint(volume: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """The adjoint (transpose) of :func:`box_mean`: per pass, each value divided by its window's in-volume count,
    then the same all-ones 3x3x3 convolution (symmetric, so its own transpose)."""
    return _passes(volume, passes, adjoint=True)


def _passes(volume: torch.Tensor, passes: int, adjoint: bool) -> torch.Tensor:
    n, c, *spatial = volume.shape
    flat = volume.reshape(n * c, 1, *spatial)
    window = torch.ones(1, 1, 3, 3, 3, dtype=volume.dtype, device=volume.device)
    inside = F.conv3d(torch.ones_like(flat[:1]), window, padding=1)
    for _ in range(passes):
        flat = F.conv3d(flat / inside, window, padding=1) if adjoint else F.conv3d(flat, window, padding=1) / inside
    out = flat.reshape(volume.shape).contiguous()
    return out if passes else out.clone()  # a new, contiguous tensor also for no pass
