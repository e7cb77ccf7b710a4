"""Naive references for the MIND and MIND-SSC descriptors.

Both descriptors are "self-similarity" descriptors built from a table of
offset pairs (a, b): channel k is the box mean, over a (2*radius+1)^3 patch
with replicate edges, of ``(I[clamp(x + dilation*a_k)] - I[clamp(x + dilation*b_k)])**2``.

The tables are built here from the descriptors' definitions, by a construction of their own, and not
taken from :mod:`gradreg_fast.ops.mind_tables` (the kernels' tables, which this module checks); a test
checks that both agree.
"""

import torch
import torch.nn.functional as F

# Unit steps (dz, dy, dx) by name.
_STEP = {"-z": (-1, 0, 0), "+z": (1, 0, 0), "-y": (0, -1, 0), "+y": (0, 1, 0), "-x": (0, 0, -1), "+x": (0, 0, 1)}
# The six-neighbourhood in ConvexAdam's order (its 3x3x3 kernel indices (0,1,1), (1,1,0), (1,0,1), (1,1,2),
# (2,1,1), (1,2,1)), which is also MIND's channel order.
_SIX = ("-z", "-x", "-y", "+x", "+z", "+y")
# MIND-SSC compares the neighbours two by two along different axes (squared distance 2): the 12 edges of
# the octahedron. The originals list them as (i, j), i > j over _SIX, row-major: their channel order
# before the final permutation, written out by name.
_ORIGINALS_CHANNELS = (("-x", "-z"), ("-y", "-z"), ("-y", "-x"), ("+x", "-z"), ("+x", "-y"), ("+z", "-x"),
                       ("+z", "-y"), ("+z", "+x"), ("+y", "-z"), ("+y", "-x"), ("+y", "+x"), ("+y", "+z"))
# Their final re-indexing (output channel k is channel _OUTPUT_ORDER[k] above), a literal in their code.
_OUTPUT_ORDER = (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)

SSC_PAIRS = tuple((_STEP[a], _STEP[b]) for a, b in (_ORIGINALS_CHANNELS[c] for c in _OUTPUT_ORDER))
# Where channels tie for the minimum, the originals' torch.min gives the gradient to the first of them in
# their pre-permutation order: the rank of output channel k is its position there.
SSC_TIE_RANKS = _OUTPUT_ORDER
MIND_PAIRS = tuple(((0, 0, 0), _STEP[name]) for name in _SIX)
_TIE_RANKS = {SSC_PAIRS: SSC_TIE_RANKS}


def _shift(vol: torch.Tensor, offset, dilation: int) -> torch.Tensor:
    """``vol[clamp(x + dilation * offset)]`` for every voxel x (replicate edges)."""
    d, h, w = vol.shape[2:]
    padded = F.pad(vol, (dilation,) * 6, mode="replicate")
    z, y, x = (dilation + dilation * o for o in offset)
    return padded[:, :, z : z + d, y : y + h, x : x + w]


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    if radius == 0:
        return x
    return F.avg_pool3d(F.pad(x, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1)


def _channel_minimum(patch, tie_ranks):
    """The minimum over channels, its gradient going to the lowest-ranked of equal channels: torch.min takes
    the first of equal values, so it runs over the channels sorted by rank."""
    scan_order = sorted(range(len(tie_ranks)), key=lambda k: tie_ranks[k])
    return patch[:, scan_order].min(dim=1, keepdim=True).values


def self_similarity(vol, pairs, radius, dilation, subtract_min, per_item=False, tie_ranks=None):
    """Shared reference pipeline of :func:`mind` and :func:`mind_ssc`.

    ``tie_ranks``: which of several equal channel minima takes the gradient (the lowest rank); by default
    the rank the descriptor's table defines (see :func:`mind_ssc`), else the table order.
    """
    pairs = tuple(pairs)
    if tie_ranks is None:
        tie_ranks = _TIE_RANKS.get(pairs, tuple(range(len(pairs))))
    patch = torch.cat(
        [_box_mean((_shift(vol, a, dilation) - _shift(vol, b, dilation)) ** 2, radius) for a, b in pairs], dim=1
    )
    if subtract_min:
        patch = patch - _channel_minimum(patch, tie_ranks)
    variance = patch.mean(dim=1, keepdim=True)
    dims = tuple(range(1, variance.dim())) if per_item else tuple(range(variance.dim()))
    m = variance.detach().mean(dim=dims, keepdim=True)
    clamped = torch.minimum(torch.maximum(variance, 0.001 * m), 1000 * m)
    # As the fused kernels: at least the smallest normal number. Only a constant volume has m = 0,
    # and then every patch distance is 0 too: dividing by 1 there gives the same value (1) and a
    # finite (zero) gradient instead of 0/0.
    tiny = torch.finfo(vol.dtype).tiny
    clamped = torch.where(clamped > 0, clamped.clamp_min(tiny), torch.ones_like(clamped))
    # Non-finite input makes m NaN or inf: then the whole descriptor (and its gradient) is NaN, as the
    # originals' clamp with NaN bounds gives. m - m is 0 for a finite m, NaN otherwise.
    clamped = clamped + (m - m)
    return torch.exp(-patch / clamped)


def mind_ssc(vol: torch.Tensor, radius: int = 2, dilation: int = 2, per_item: bool = False) -> torch.Tensor:
    """Reference MIND-SSC, (N, 1, D, H, W) -> (N, 12, D, H, W). See :func:`gradreg_fast.mind_ssc`."""
    return self_similarity(vol, SSC_PAIRS, radius, dilation, subtract_min=True, per_item=per_item)


def mind(vol: torch.Tensor, radius: int = 1, dilation: int = 1, per_item: bool = False) -> torch.Tensor:
    """Reference MIND with the six-neighbourhood, (N, 1, D, H, W) -> (N, 6, D, H, W)."""
    return self_similarity(vol, MIND_PAIRS, radius, dilation, subtract_min=False, per_item=per_item)


def mind_ssc_convexadam(img: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """The de-facto MIND-SSC of ConvexAdam / TransMorph / Learn2Reg baselines, rebuilt from its published
    description (shift kernels as conv3d, avg_pool3d, a global variance clamp taken with ``.item()``).

    Kept only to prove that :func:`mind_ssc` and the fused kernels reproduce it, and as the naive
    baseline of the benchmarks. It returns NaN on a constant volume, as the original does.
    """
    device, dtype = img.device, img.dtype
    six = torch.tensor([[c + 1 for c in _STEP[name]] for name in _SIX], dtype=torch.long, device=device)
    dist = ((six.unsqueeze(1) - six.unsqueeze(0)) ** 2).sum(-1)
    x, y = torch.meshgrid(torch.arange(6, device=device), torch.arange(6, device=device), indexing="ij")
    mask = (x > y).reshape(-1) & (dist == 2).reshape(-1)
    first = six.unsqueeze(1).repeat(1, 6, 1).reshape(-1, 3)[mask]
    second = six.unsqueeze(0).repeat(6, 1, 1).reshape(-1, 3)[mask]
    kernel1 = torch.zeros(12, 1, 3, 3, 3, dtype=dtype, device=device)
    kernel2 = torch.zeros(12, 1, 3, 3, 3, dtype=dtype, device=device)
    ar = torch.arange(12, device=device)
    kernel1.view(-1)[ar * 27 + first[:, 0] * 9 + first[:, 1] * 3 + first[:, 2]] = 1
    kernel2.view(-1)[ar * 27 + second[:, 0] * 9 + second[:, 1] * 3 + second[:, 2]] = 1
    padded = F.pad(img, (dilation,) * 6, mode="replicate")
    diff = F.conv3d(padded, kernel1, dilation=dilation) - F.conv3d(padded, kernel2, dilation=dilation)
    ssd = F.avg_pool3d(F.pad(diff**2, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1)
    out = ssd - ssd.min(dim=1, keepdim=True).values
    var = out.mean(dim=1, keepdim=True)
    m = var.mean().item()
    var = torch.clamp(var, m * 0.001, m * 1000)
    out = torch.exp(-out / var)
    return out[:, torch.tensor(_OUTPUT_ORDER, device=device)]
