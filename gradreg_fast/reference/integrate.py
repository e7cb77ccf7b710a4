import torch
import torch.nn.functional as F

from .warp import warp


def integrate_velocity(velocity: torch.Tensor, steps: int = 7, padding_mode: str = "zeros") -> torch.Tensor:
    """Reference for :func:`gradreg_fast.integrate_velocity`: scaling and squaring as VoxelMorph's VecInt,
    ``u = v / 2**steps`` then ``steps`` times ``u = u + warp(u, u)``, with the reference warp (voxel
    units, channel k along spatial axis k)."""
    u = velocity / (2 ** steps)
    for _ in range(steps):
        u = u + warp(u, u, "bilinear", padding_mode)
    return u


def compose(flow_a: torch.Tensor, flow_b: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Reference for :func:`gradreg_fast.compose`: ``flow_b + warp(flow_a, flow_b)``."""
    return flow_b + warp(flow_a, flow_b, "bilinear", padding_mode)


def integrate_velocity_grid_sample(velocity: torch.Tensor, steps: int = 7, padding_mode: str = "zeros") -> torch.Tensor:
    """The same chain as VoxelMorph writes it: a SpatialTransformer (identity grid plus the flow, normalised
    to [-1, 1], channels reversed to x, y, z, then ``grid_sample(align_corners=True)``) at every step.
    Every spatial size must be > 1 (grid_sample's normalisation divides by size - 1)."""
    n, _, *spatial = velocity.shape
    identity = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=velocity.dtype, device=velocity.device)
                                            for s in spatial], indexing="ij")).unsqueeze(0)
    scale = torch.tensor([2.0 / (s - 1) for s in spatial], dtype=velocity.dtype,
                         device=velocity.device).view(1, 3, 1, 1, 1)

    def transformer(src, flow):
        locs = (identity + flow) * scale - 1.0
        grid = locs.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
        return F.grid_sample(src, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)

    u = velocity / (2 ** steps)
    for _ in range(steps):
        u = u + transformer(u, u)
    return u
