"""Registration metrics: overlap (Dice), surface distances in mm (ASD, HD95), and flow regularity.

Label maps are integer arrays (numpy or torch, any leading singleton dims are fine as long as both
maps have the same shape); surface distances use the physical ``spacing`` (mm per voxel along each
axis) with scipy's exact Euclidean distance transform. Flows are displacement fields in voxels,
(3, D, H, W) or (1, 3, D, H, W), channel k along spatial axis k (the :func:`gradreg_fast.warp` convention).

Undefined values are NaN, never a made-up number: Dice when a label is absent from both maps, surface
distances when it is absent from either.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage


def _numpy(array, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.size == 0:
        raise ValueError(f"`{name}` must not be empty")
    return array


def _pair(a, b, names=("a", "b")):
    a, b = _numpy(a, names[0]), _numpy(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"`{names[0]}` and `{names[1]}` must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _spatial(mask: np.ndarray) -> np.ndarray:
    """Drop leading singleton dims down to 3D (a (1, D, H, W) map is one 3D volume)."""
    while mask.ndim > 3 and mask.shape[0] == 1:
        mask = mask[0]
    return mask


def _labels(a: np.ndarray, b: np.ndarray, labels) -> list:
    if labels is None:
        found = np.union1d(np.unique(a), np.unique(b))
        return [int(v) for v in found if v != 0]
    return [int(v) for v in labels]


def dice(a, b, labels=None) -> dict:
    """Dice 2|A∩B| / (|A| + |B|) per label id: {id: value}; NaN where the label is in neither map.

    ``labels``: ids to score; by default every non-zero id present in either map.
    """
    a, b = _pair(a, b)
    scores = {}
    for label in _labels(a, b, labels):
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        scores[label] = 2.0 * int(np.logical_and(in_a, in_b).sum()) / total if total else math.nan
    return scores


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)).copy()
    if not np.all(spacing > 0) or not np.all(np.isfinite(spacing)):
        raise ValueError(f"`spacing` must be positive and finite, got {spacing.tolist()}")
    return spacing


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a binary mask: those with a face neighbour outside it (the grid's border counts
    as outside)."""
    mask = np.asarray(mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def surface_distances(a, b, spacing=1.0):
    """Distances (mm) from each surface voxel of mask ``a`` to the surface of ``b``, and from ``b`` to ``a``.

    Returns (distances a->b, distances b->a) as 1D arrays, or (None, None) if either mask is empty.
    """
    a, b = _pair(a, b)
    a, b = _spatial(a).astype(bool), _spatial(b).astype(bool)
    spacing = _check_spacing(spacing, a.ndim)
    if not a.any() or not b.any():
        return None, None
    surface_a, surface_b = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    return to_b[surface_a], to_a[surface_b]


def average_surface_distance(a, b, spacing=1.0) -> float:
    """Average symmetric surface distance (mm): the mean over both surfaces' voxels of the distance to the
    other surface; NaN if either mask is empty."""
    ab, ba = surface_distances(a, b, spacing)
    if ab is None:
        return math.nan
    return float((ab.sum() + ba.sum()) / (len(ab) + len(ba)))


def hausdorff95(a, b, spacing=1.0) -> float:
    """95th percentile Hausdorff distance (mm): the 95th percentile of the pooled distances of both surfaces
    to the other (the MedPy definition); NaN if either mask is empty."""
    ab, ba = surface_distances(a, b, spacing)
    if ab is None:
        return math.nan
    return float(np.percentile(np.concatenate([ab, ba]), 95))


def surface_metrics(a, b, spacing=1.0, labels=None) -> dict:
    """{label: {"asd": mm, "hd95": mm}} for label maps ``a`` and ``b``."""
    a, b = _pair(a, b)
    out = {}
    for label in _labels(a, b, labels):
        ab, ba = surface_distances(a == label, b == label, spacing)
        if ab is None:
            out[label] = {"asd": math.nan, "hd95": math.nan}
        else:
            pooled = np.concatenate([ab, ba])
            out[label] = {"asd": float(pooled.mean()), "hd95": float(np.percentile(pooled, 95))}
    return out


def label_metrics(a, b, spacing=1.0, labels=None) -> dict:
    """{label: {"dice", "asd", "hd95"}}: all overlap and surface metrics per label."""
    a, b = _pair(a, b)
    overlap = dice(a, b, labels)
    surfaces = surface_metrics(a, b, spacing, list(overlap))
    return {label: {"dice": overlap[label], **surfaces[label]} for label in overlap}


# ----------------------------------------------------------------------------------------------- regularity

def _flow(flow) -> np.ndarray:
    flow = _numpy(flow, "flow").astype(np.float64)
    if flow.ndim == 5:
        if flow.shape[0] != 1:
            raise ValueError(f"`flow` must be (3, D, H, W) or (1, 3, D, H, W), got {flow.shape}")
        flow = flow[0]
    if flow.ndim != 4 or flow.shape[0] != 3:
        raise ValueError(f"`flow` must be (3, D, H, W) or (1, 3, D, H, W), got {flow.shape}")
    if min(flow.shape[1:]) < 2:
        raise ValueError(f"`flow` needs at least 2 voxels along each axis for derivatives, got {flow.shape}")
    return flow


def jacobian_determinant(flow) -> np.ndarray:
    """det(I + ∇u) per voxel of the map x -> x + u(x) (central differences inside, one-sided at borders)."""
    flow = _flow(flow)
    jac = np.empty((3, 3) + flow.shape[1:])
    for i in range(3):
        for j, g in enumerate(np.gradient(flow[i], axis=(0, 1, 2))):
            jac[i, j] = g + (1.0 if i == j else 0.0)
    return (jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
            - jac[0, 1] * (jac[1, 0] * jac[2, 2] - jac[1, 2] * jac[2, 0])
            + jac[0, 2] * (jac[1, 0] * jac[2, 1] - jac[1, 1] * jac[2, 0]))


def folding_percent(flow, mask=None) -> float:
    """Percentage of voxels (inside ``mask`` if given) whose Jacobian determinant is <= 0."""
    det = jacobian_determinant(flow)
    values = det if mask is None else det[_mask(mask, det.shape)]
    return 100.0 * float((values <= 0).mean()) if values.size else math.nan


def sd_log_jacobian(flow, mask=None) -> float:
    """Standard deviation of log(det J) over voxels (inside ``mask`` if given); determinants are clipped at
    1e-9 first so that folded voxels count as a large deviation instead of NaN (the usual convention)."""
    det = jacobian_determinant(flow)
    values = det if mask is None else det[_mask(mask, det.shape)]
    return float(np.log(np.clip(values, 1e-9, None)).std()) if values.size else math.nan


def _mask(mask, shape) -> np.ndarray:
    mask = _spatial(_numpy(mask, "mask")).astype(bool)
    if mask.shape != tuple(shape):
        raise ValueError(f"`mask` must have the flow's spatial shape {tuple(shape)}, got {mask.shape}")
    return mask
