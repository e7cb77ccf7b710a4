import itertools

import torch
import torch.nn.functional as F


def mind_cost_volume(fixed_desc: torch.Tensor, moving_desc: torch.Tensor, radius: int, spacing: int = 1,
                     grid: int = 1) -> torch.Tensor:
    """Reference for :func:`gradreg_fast.mind_cost_volume`: the moving descriptor padded with zeros, one
    shifted copy per displacement, squared differences summed over channels, then averaged over each
    control point's block of voxels (the last blocks may be partial)."""
    n, _, d, h, w = fixed_desc.shape
    reach = spacing * radius
    padded = F.pad(moving_desc, (reach,) * 6)  # zeros
    costs = []
    # dz outermost, dx innermost: the channel order of the op.
    for dz, dy, dx in itertools.product(range(-radius, radius + 1), repeat=3):
        z0, y0, x0 = reach + spacing * dz, reach + spacing * dy, reach + spacing * dx
        shifted = padded[:, :, z0:z0 + d, y0:y0 + h, x0:x0 + w]
        costs.append(((fixed_desc - shifted) ** 2).sum(dim=1, keepdim=True))
    per_voxel = torch.cat(costs, dim=1)  # (N, K, D, H, W)
    return _block_mean(per_voxel, grid)


def _block_mean(values: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean of ``values`` over each grid x grid x grid block, counting only the voxels that exist."""
    n, k, d, h, w = values.shape
    dq, hq, wq = (-(-size // grid) for size in (d, h, w))
    # Along an axis with one control point the block is the whole axis: no padding up to a grid that may be far
    # larger than the volume (grid 4096 on a few voxels would pad to 4096**3).
    bd, bh, bw = (grid if count > 1 else size for count, size in ((dq, d), (hq, h), (wq, w)))
    pad = (0, wq * bw - w, 0, hq * bh - h, 0, dq * bd - d)
    sums = F.pad(values, pad).reshape(n, k, dq, bd, hq, bh, wq, bw).sum(dim=(3, 5, 7))
    ones = torch.ones((1, 1, d, h, w), dtype=values.dtype, device=values.device)
    counts = F.pad(ones, pad).reshape(1, 1, dq, bd, hq, bh, wq, bw).sum(dim=(3, 5, 7))
    return sums / counts


def mind_cost_volume_displacements(radius: int, spacing: int = 1, dtype=torch.float32, device=None) -> torch.Tensor:
    """(K, 3) displacements in voxels, (D, H, W) order, of the reference's channels."""
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=3))
    return torch.tensor(offsets, dtype=dtype, device=device) * spacing
