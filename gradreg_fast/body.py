"""Body masks of normalised scans and the centre-of-mass (moments) alignment of two scans.

Apart from the registration package because :func:`gradreg_fast.io.load_pair` uses the same initial
alignment, and the registration package imports io: a module of its own keeps the imports one-way.
A "scan" here is anything with ``data`` (a 3D array) and ``affine`` (voxel -> world, 4x4), such as
:class:`gradreg_fast.io.Scan`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_THRESHOLD = 0.05  # on intensities normalised to [0, 1]: above the air/background level of CT and MR


def axial_axis(affine: np.ndarray) -> int:
    """The index axis closest to the world's superior-inferior direction."""
    directions = np.abs(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))
    return int(np.argmax(directions[2]))


def body_mask(image: np.ndarray, affine: np.ndarray, threshold: float = BODY_THRESHOLD) -> np.ndarray:
    """The body in a normalised scan: threshold, close, fill holes per axial slice, keep the largest part.

    Slice-wise filling is needed because a body cut by the field of view is open at the top and bottom,
    so 3D hole filling would leave the lungs and bowel gas out.
    """
    mask = np.asarray(image) > threshold
    if not mask.any():
        raise ValueError("body_mask: no voxel above the threshold; is the image empty?")
    opened = ndimage.binary_opening(mask)  # drops isolated noise voxels and thin lines (table, wires)
    mask = opened if opened.any() else mask
    # Closing bridges small gaps in the skin line; or-ing keeps border voxels that its erosion removes.
    mask = ndimage.binary_closing(mask, iterations=2, border_value=0) | mask
    axis = axial_axis(affine)
    moved = np.moveaxis(mask, axis, 0)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
    mask = np.moveaxis(filled, 0, axis)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def mask_moments(mask: np.ndarray, affine: np.ndarray):
    """(centre of mass, covariance) of a mask in world millimetres."""
    voxels = np.argwhere(mask).astype(np.float64)
    if len(voxels) == 0:
        raise ValueError("mask_moments: empty mask")
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    centre = world.mean(axis=0)
    return centre, np.cov((world - centre).T) if len(world) > 1 else np.zeros((3, 3))


def moments_init(fixed, moving, scale: bool = False) -> np.ndarray:
    """World transform (fixed -> moving) matching the centres of mass of the body masks.

    With ``scale``, also match the body's spread (standard deviation) along the world left-right and
    anterior-posterior axes, one factor each. The superior-inferior spread is not used: it mostly
    measures the field of view, which differs between scans.
    """
    fixed_centre, fixed_cov = mask_moments(body_mask(fixed.data, fixed.affine), fixed.affine)
    moving_centre, moving_cov = mask_moments(body_mask(moving.data, moving.affine), moving.affine)
    linear = np.eye(3)
    if scale:
        ratio = np.sqrt(np.clip(np.diag(moving_cov), 1e-6, None) / np.clip(np.diag(fixed_cov), 1e-6, None))
        linear = np.diag([ratio[0], ratio[1], 1.0])
    transform = np.eye(4)
    transform[:3, :3] = linear
    transform[:3, 3] = moving_centre - linear @ fixed_centre
    return transform
