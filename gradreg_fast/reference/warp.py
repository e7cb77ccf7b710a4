import torch


def _corner_weights(coord: torch.Tensor, size: int, padding_mode: str):
    """Floor index, fractional weight and finiteness along one axis.

    Border padding clips the coordinate, with a zero gradient on and beyond the border, as
    grid_sample (torch.clamp would pass the gradient at the bounds themselves). A non-finite
    coordinate samples nothing.
    """
    finite = torch.isfinite(coord)
    coord = torch.where(finite, coord, torch.full_like(coord, -2.0))
    if padding_mode == "border":
        inside = (coord > 0) & (coord < size - 1)
        coord = torch.where(inside, coord, coord.detach().clamp(0, size - 1))
    else:  # far outside every corner is outside: bounding the coordinate keeps the weights finite
        near = (coord >= -2) & (coord <= size + 1)
        coord = torch.where(near, coord, coord.detach().clamp(-2, size + 1))
    lo = torch.floor(coord.detach())
    frac = coord - lo
    lo = lo.long()
    hi = lo + 1
    return lo, hi, frac, finite


def nearest_source(flow: torch.Tensor, padding_mode: str):
    """For mode="nearest": the flat source index of each output voxel and whether it is inside,
    each (N, D*H*W). Rounds half to even, as grid_sample does."""
    n, _, *spatial = flow.shape
    base = torch.meshgrid(*[torch.arange(s, device=flow.device, dtype=flow.dtype) for s in spatial], indexing="ij")
    strides = (spatial[1] * spatial[2], spatial[2], 1)
    idx = torch.zeros((n, *spatial), dtype=torch.long, device=flow.device)
    valid = torch.ones((n, *spatial), dtype=torch.bool, device=flow.device)
    for k in range(3):
        coord = base[k].unsqueeze(0) + flow[:, k]
        valid &= torch.isfinite(coord)  # before the border clamp, which would make +-inf finite
        if padding_mode == "border":
            coord = coord.clamp(0, spatial[k] - 1)
        r = torch.round(torch.nan_to_num(coord, nan=-1.0).clamp(-1, spatial[k])).long()
        valid &= (r >= 0) & (r < spatial[k])
        idx += r.clamp(0, spatial[k] - 1) * strides[k]
    return idx.reshape(n, -1), valid.reshape(n, -1)


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Reference for :func:`gradreg_fast.warp`, written as an explicit 8-corner gather.

    The sample point of output voxel p is ``p + flow[:, :, p]`` in voxel units
    (channel k along spatial axis k, D/H/W order).  This equals ``grid_sample``
    with ``align_corners=True`` whenever every spatial size is > 1; it is also
    defined for sizes of 1, where ``grid_sample``'s normalisation is not.
    """
    n, c, *spatial = image.shape
    base = torch.meshgrid(*[torch.arange(s, device=image.device, dtype=flow.dtype) for s in spatial], indexing="ij")
    coords = [base[k].unsqueeze(0) + flow[:, k] for k in range(3)]  # each (N, D, H, W)
    flat = image.reshape(n, c, -1)
    strides = (spatial[1] * spatial[2], spatial[2], 1)

    if mode == "nearest":
        idx, valid = nearest_source(flow, padding_mode)
        out = torch.gather(flat, 2, idx.unsqueeze(1).expand(n, c, -1))
        return (out * valid.unsqueeze(1).to(out.dtype)).reshape(image.shape)

    axes = [_corner_weights(coords[k], spatial[k], padding_mode) for k in range(3)]
    out = torch.zeros_like(image).reshape(n, c, -1)
    for corner in range(8):
        weight = torch.ones_like(coords[0])
        idx = torch.zeros_like(coords[0], dtype=torch.long)
        valid = torch.ones_like(coords[0], dtype=torch.bool)
        for k in range(3):
            lo, hi, frac, finite = axes[k]
            valid &= finite
            use_hi = (corner >> (2 - k)) & 1
            i = hi if use_hi else lo
            weight = weight * (frac if use_hi else 1 - frac)
            valid &= (i >= 0) & (i < spatial[k])
            idx = idx + i.clamp(0, spatial[k] - 1) * strides[k]
        values = torch.gather(flat, 2, idx.reshape(n, 1, -1).expand(n, c, -1))
        out = out + values * (weight * valid.to(weight.dtype)).reshape(n, 1, -1)
    return out.reshape(image.shape)
