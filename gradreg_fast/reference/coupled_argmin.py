import itertools

import torch


def coupled_argmin(cost: torch.Tensor, field: torch.Tensor, coupling: float, mirrored: bool = False) -> torch.Tensor:
    """Reference for :func:`gradreg_fast.coupled_argmin`: the coupled costs of every displacement
    materialised, NaN made +inf; of the displacements at their minimum, ``argmin`` of the distance to
    ``field`` (ties: the first)."""
    n, k, d, h, w = cost.shape
    radius = (round(k ** (1 / 3)) - 1) // 2
    steps = range(-radius, radius + 1)
    table = torch.tensor(list(itertools.product(steps, repeat=3)), dtype=cost.dtype, device=cost.device)  # dx fastest
    if mirrored:
        z, y, x = (torch.arange(size, device=cost.device) for size in (d, h, w))
        planes = []
        for index, (dz, dy, dx) in enumerate(itertools.product(steps, repeat=3)):
            source = cost[:, k - 1 - index]
            source = source[:, (z + dz).clamp(0, d - 1)][:, :, (y + dy).clamp(0, h - 1)][:, :, :, (x + dx).clamp(0, w - 1)]
            planes.append(source)
        cost = torch.stack(planes, 1)
    distance = ((table.view(1, k, 3, 1, 1, 1) - field.unsqueeze(1)) ** 2).sum(2)
    coupled = cost + coupling * distance
    inf = torch.full_like(coupled, float("inf"))
    coupled = torch.where(torch.isnan(coupled), inf, coupled)
    at_minimum = coupled == coupled.amin(1, keepdim=True)
    return torch.where(at_minimum & ~torch.isnan(distance), distance, inf).argmin(1)
