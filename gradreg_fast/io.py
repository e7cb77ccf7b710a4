"""NIfTI in and out, in physical space.

Every volume is kept as its voxel array in NIfTI's own index order (i, j, k) together with its affine
(voxel index -> world millimetres, NIfTI's RAS+ world). Tensors use the same order: a (1, D, H, W) tensor
has D = i, H = j, W = k, so a flow channel k moves along index axis k, which is what
:func:`gradreg_fast.warp` expects, and a result is written back with the grid's affine unchanged.

Two scans are brought together by resampling both onto one :class:`Grid` through their affines (world
coordinates), never by array index: a RAS and an LPS scan of the same object come out aligned. The
default grid is the fixed image's own (its direction cosines and field of view) at a chosen spacing;
a size and spacing can be given instead. The working grid is then padded (or cropped) to multiples of
16 voxels per axis; :class:`Fit` records how to go back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ._atomic import atomic_output
from .body import moments_init

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CT_WINDOW = (-200.0, 300.0)  # HU; an abdominal soft-tissue window (fat, organs and vessels keep contrast)
MR_PERCENTILES = (0.5, 99.5)  # clip MR intensities to these percentiles before scaling to [0, 1]
CT_AIR_HU = -500.0  # a scan whose minimum is at or below this is taken for CT (air is about -1000 HU)
PAIR_MULTIPLE = 16  # load_pair's working grid: a multiple of 2**4 along each axis, for four halvings of a U-Net


class NiftiError(ValueError):
    """A file that cannot be used as a 3D NIfTI volume (corrupt, wrong dimensionality, bad affine)."""


@dataclass
class Scan:
    """A 3D volume as read: the voxel array (NIfTI index order) and its voxel -> world affine."""

    data: np.ndarray
    affine: np.ndarray
    path: str | None = None

    @property
    def spacing(self) -> np.ndarray:
        return voxel_sizes(self.affine)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each index axis: the norms of the affine's columns."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _nifti_suffix(path: str | os.PathLike) -> str | None:
    name = str(path).lower()
    return next((s for s in sorted(NIFTI_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def read_nifti(path: str | os.PathLike, what: str = "image") -> Scan:
    """Read a 3D NIfTI file (.nii or .nii.gz).

    A trailing 4th axis of length 1 is dropped (a common export artefact); a 2D image, a single-slice
    volume, a true 4D image, a corrupt file or a singular affine raise :class:`NiftiError` naming the
    file, and a missing file raises FileNotFoundError.

    Args:
        path: the file.
        what: how the file is named in error messages ("fixed image", "moving labels", ...).
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    if path.is_dir():
        raise NiftiError(f"{what}: expected a NIfTI file, got a directory: {path}")
    if _nifti_suffix(path) is None:
        raise NiftiError(f"{what}: expected a NIfTI file ending in .nii or .nii.gz, got {path.name!r}")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)  # the voxel data is only read here: a truncated file fails here
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel, gzip, zlib and EOF errors all mean the same to the user
        raise NiftiError(f"{what}: {path} is not a readable NIfTI file (corrupt or truncated?): "
                         f"{type(exc).__name__}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim < 3:
        raise NiftiError(f"{what}: {path} is a {data.ndim}D image of shape {data.shape}; a 3D volume is needed")
    if data.ndim > 3:
        raise NiftiError(f"{what}: {path} is a {data.ndim}D image of shape {data.shape} (a time series or "
                         "vector image?); a single 3D volume is needed")
    if min(data.shape) < 2:
        raise NiftiError(f"{what}: {path} has shape {data.shape}, a single slice (2D); a 3D volume is needed")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise NiftiError(f"{what}: {path} has voxel type {data.dtype}; real numbers are needed")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NiftiError(f"{what}: {path} has an invalid (singular or non-finite) affine:\n{affine}")
    if not np.all(np.isfinite(data)):
        raise NiftiError(f"{what}: {path} contains NaN or infinite voxel values")
    return Scan(np.asarray(data), affine, str(path))


# ----------------------------------------------------------------------------------------------- intensity

def guess_modality(data: np.ndarray) -> str:
    """"ct" when the volume reaches air in Hounsfield units (<= -500), else "mr" (non-finite voxels ignored)."""
    data = np.asarray(data)
    if data.size == 0:
        raise ValueError("`data` must not be empty")
    low = float(np.min(data))
    if not math.isfinite(low):  # the copy only where a no-data marker is present
        finite = data[np.isfinite(data)]
        low = float(np.min(finite)) if finite.size else math.inf
    return "ct" if low <= CT_AIR_HU else "mr"


def _check_range(value, name: str, unit: str) -> tuple:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be two numbers (low, high) in {unit}, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"`{name}` must be two finite numbers with low < high ({unit}), got {value!r}")
    return low, high


def normalize_intensity(data: np.ndarray, modality: str = "auto", ct_window=CT_WINDOW,
                        mr_percentiles=MR_PERCENTILES) -> np.ndarray:
    """Scale a scan to [0, 1] per modality (float32).

    CT: clip to the HU window ``ct_window`` and scale it to [0, 1]. MR (arbitrary units): clip to the
    ``mr_percentiles`` percentiles of the volume and scale that range to [0, 1]. ``modality="auto"``
    uses :func:`guess_modality`. A constant volume becomes all zeros. Non-finite voxels (NaN or inf, which some
    resamplers write where they have no data) are left out of the percentiles and become 0, as air does.
    A window or percentile pair that is not two finite numbers with low < high (percentiles within 0..100)
    raises ValueError naming it.
    """
    ct_window = _check_range(ct_window, "ct_window", "HU")
    mr_percentiles = _check_range(mr_percentiles, "mr_percentiles", "percentiles")
    if not 0.0 <= mr_percentiles[0] < mr_percentiles[1] <= 100.0:
        raise ValueError(f"`mr_percentiles` must be two percentiles 0 <= low < high <= 100, got {mr_percentiles}")
    if modality == "auto":
        modality = guess_modality(data)
    data = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(data)
    everywhere = bool(finite.all())
    if modality == "ct":
        low, high = float(ct_window[0]), float(ct_window[1])
    elif modality == "mr":
        known = data if everywhere else data[finite]
        low, high = (float(v) for v in np.percentile(known, mr_percentiles)) if known.size else (0.0, 0.0)
    else:
        raise ValueError(f"`modality` must be 'ct', 'mr' or 'auto', got {modality!r}")
    if not high > low:
        return np.zeros(data.shape, dtype=np.float32)
    scaled = ((np.clip(data, low, high) - low) / (high - low)).astype(np.float32)
    return scaled if everywhere else np.where(finite, scaled, np.float32(0.0))


# ----------------------------------------------------------------------------------------------- grids

def _check_affine(affine, what: str) -> np.ndarray:
    """A 4x4 float64 map with a finite, invertible linear part (bottom row 0 0 0 1), or a ValueError naming it."""
    try:
        affine = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a 4x4 matrix of numbers, got {affine!r}") from None
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or not np.allclose(affine[3], (0, 0, 0, 1)):
        raise ValueError(f"{what} must be a finite 4x4 affine with last row 0 0 0 1, got\n{affine}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12 * max(1.0, float(np.abs(affine[:3, :3]).max()) ** 3):
        raise ValueError(f"{what} is singular (a zero voxel size or a degenerate direction):\n{affine}")
    return affine


@dataclass(frozen=True, eq=False)  # arrays inside: compare grids with np.allclose, not ==
class Grid:
    """A voxel grid in physical space: ``shape`` (i, j, k) and the voxel -> world ``affine``."""

    shape: tuple
    affine: np.ndarray

    def __post_init__(self):
        shape = tuple(self.shape) if hasattr(self.shape, "__len__") else ()
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
            raise ValueError(f"Grid: `shape` must be 3 positive integers, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "affine", _check_affine(self.affine, "Grid: `affine`"))

    @property
    def spacing(self) -> np.ndarray:
        return voxel_sizes(self.affine)

    @property
    def center_world(self) -> np.ndarray:
        return self.affine[:3, :3] @ ((np.asarray(self.shape) - 1) / 2.0) + self.affine[:3, 3]

    @classmethod
    def of_scan(cls, scan: Scan, spacing=None, size=None) -> "Grid":
        """The scan's grid (its direction cosines), resampled to ``spacing`` (mm; one or three values).

        Without ``size`` the grid covers the scan's field of view; with ``size`` (three voxel counts)
        it is that size, centred on the scan's centre. Either way the centre stays put.
        """
        old = np.asarray(scan.data.shape, dtype=np.float64)
        old_spacing = scan.spacing
        from .metrics import check_spacing

        new_spacing = old_spacing if spacing is None else check_spacing(spacing)
        if size is None:
            voxels = np.maximum(1, np.round(old * old_spacing / new_spacing))
            if np.prod(voxels) > 2.0 ** 40:  # before the cast to int, which would wrap around
                raise ValueError(f"`spacing` {spacing!r} mm would give a grid of {voxels.tolist()} voxels, beyond any "
                                 f"memory; choose a coarser spacing")
            shape = voxels.astype(int)
        else:
            counts = np.asarray(size)
            if counts.size not in (1, 3) or not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 1):
                raise ValueError(f"`size` must be one or three positive voxel counts, got {size!r}")
            shape = np.broadcast_to(counts.astype(int), (3,)).copy()
        directions = scan.affine[:3, :3] / old_spacing
        linear = directions * new_spacing
        center = scan.affine[:3, :3] @ ((old - 1) / 2.0) + scan.affine[:3, 3]
        affine = np.eye(4)
        affine[:3, :3] = linear
        affine[:3, 3] = center - linear @ ((shape - 1) / 2.0)
        return cls(tuple(shape), affine)

    def fit(self, multiple=16, how: str = "pad", margin=0) -> "Fit":
        """A grid whose sizes are multiples of ``multiple`` (one int, or one per axis), by padding (or
        cropping) each axis evenly; padding adds at least ``margin`` voxels (one int, or one per axis) on
        each side first."""
        if how not in ("pad", "crop"):
            raise ValueError(f"`how` must be 'pad' or 'crop', got {how!r}")
        multiples = tuple(multiple) if isinstance(multiple, (tuple, list)) else (multiple,) * 3
        if len(multiples) != 3 or any(isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1
                                      for m in multiples):
            raise ValueError(f"`multiple` must be a positive int or three of them, got {multiple!r}")
        margins = tuple(margin) if isinstance(margin, (tuple, list)) else (margin,) * 3
        if len(margins) != 3 or any(isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0
                                    for m in margins):
            raise ValueError(f"`margin` must be a non-negative int or three of them, got {margin!r}")
        if how == "crop" and any(margins):
            raise ValueError("`margin` applies to padding only: pass how='pad' or margin=0")
        multiple = np.asarray(multiples, dtype=int)
        old = np.asarray(self.shape)
        if how == "pad":
            new = np.ceil((old + 2 * np.asarray(margins)) / multiple).astype(int) * multiple
        else:
            new = np.maximum(multiple, np.floor(old / multiple).astype(int) * multiple)
        # Offset of the new grid's voxel 0 in old voxel units: negative when padding.
        offset = (old - new) // 2 if how == "crop" else -((new - old) // 2)
        shift = np.eye(4)
        shift[:3, 3] = offset
        return Fit(original=self, grid=Grid(tuple(new), self.affine @ shift), offset=tuple(int(o) for o in offset))


@dataclass(frozen=True, eq=False)
class Fit:
    """A working grid cut from ``original`` by whole voxels: new voxel v is old voxel v + ``offset``.

    :meth:`to_original` is the inverse: it takes an array on ``grid`` back to ``original`` (cropping
    what padding added, filling what cropping removed).
    """

    original: Grid
    grid: Grid
    offset: tuple

    def _overlap(self):
        """Slices of the overlap, in the working grid and in the original grid."""
        work, orig = [], []
        for off, n_new, n_old in zip(self.offset, self.grid.shape, self.original.shape):
            lo, hi = max(0, off), min(n_old, off + n_new)
            orig.append(slice(lo, hi))
            work.append(slice(lo - off, hi - off))
        return tuple(work), tuple(orig)

    def to_original(self, array, fill: str | float = 0.0):
        """Array (..., D, H, W) on the working grid -> (..., d, h, w) on the original grid.

        ``fill``: a value for voxels outside the working grid, or "edge" to repeat the nearest ones.
        """
        work, orig = self._overlap()
        is_torch = isinstance(array, torch.Tensor)
        a = array.detach().cpu().numpy() if is_torch else np.asarray(array)
        lead = a.shape[:-3]
        out_shape = lead + self.original.shape
        inner = a[(Ellipsis,) + work]
        if all(s.start == 0 and s.stop == n for s, n in zip(orig, self.original.shape)):
            out = inner.copy()
        elif fill == "edge":
            pads = [(0, 0)] * len(lead) + [(s.start, n - s.stop) for s, n in zip(orig, self.original.shape)]
            out = np.pad(inner, pads, mode="edge")
        else:
            out = np.full(out_shape, fill, dtype=a.dtype)
            out[(Ellipsis,) + orig] = inner
        return torch.from_numpy(out) if is_torch else out

    @property
    def original_box(self) -> tuple:
        """Slices of the working grid that lie inside the original grid."""
        return self._overlap()[0]


# ----------------------------------------------------------------------------------------------- resampling

def resample(scan: Scan | np.ndarray, grid: Grid, affine: np.ndarray | None = None, order: int = 1,
             cval: float = 0.0, world_transform: np.ndarray | None = None) -> np.ndarray:
    """Sample a volume on ``grid`` through the affines (physical space).

    Grid voxel v takes the volume's value at world point ``world_transform @ (grid.affine @ v)``
    (``world_transform``: a 4x4 map from the grid's world to the volume's world; identity by default).
    ``order`` 1: trilinear (images), 0: nearest (labels). The volume is treated as ``cval`` beyond its
    voxels (scipy's "grid-constant" mode): nearest keeps every point within half a voxel of the volume,
    so round-off at the border never drops a voxel, and trilinear fades to ``cval`` over the last voxel.
    Trilinear runs on torch's threads, in float32 (within about 1e-5 of scipy on images in [0, 1]).
    """
    if isinstance(scan, Scan):
        data, affine = scan.data, scan.affine
    else:
        data = np.asarray(scan)
        if affine is None:
            raise ValueError("`affine` is required when `scan` is an array")
    if order in (0, 1) and world_transform is None and tuple(data.shape) == tuple(grid.shape) \
            and np.array_equal(affine, grid.affine):
        # The grid is the volume's own: every voxel lands on itself (the CLI's fixed image and labels); the
        # dtypes and layout scipy's path gives (native byte order, C order; float32 for trilinear). Higher orders
        # smooth even there.
        return np.array(data, dtype=data.dtype.newbyteorder("=") if order == 0 else np.float32, order="C")
    if isinstance(order, bool) or order not in range(6):
        raise ValueError(f"`order` must be a spline order 0..5 (0 nearest, 1 trilinear), got {order!r}")
    if data.ndim != 3 or data.size == 0:
        raise ValueError(f"the volume to resample must be 3D and not empty, got shape {tuple(data.shape)}")
    voxel_map = _voxel_map(_check_affine(affine, "`affine`"), grid, None if world_transform is None else
                           _check_affine(world_transform, "`world_transform`"))
    if order == 0:
        # Nearest neighbour without a float round trip: labels stay exact.
        return ndimage.affine_transform(data, voxel_map[:3, :3], voxel_map[:3, 3], output_shape=grid.shape,
                                        order=0, mode="grid-constant", cval=cval)
    data = np.asarray(data, dtype=np.float32)
    if order == 1 and data.ndim == 3 and min(data.shape) >= 2:
        return _trilinear(data, voxel_map, grid.shape, float(cval))
    return ndimage.affine_transform(data, voxel_map[:3, :3], voxel_map[:3, 3], output_shape=grid.shape,
                                    order=order, mode="grid-constant", cval=cval, prefilter=False)


def _voxel_map(affine: np.ndarray, grid: Grid, world_transform: np.ndarray | None = None) -> np.ndarray:
    """Grid voxel -> volume voxel (4x4), as :func:`resample` uses it."""
    transform = np.eye(4) if world_transform is None else np.asarray(world_transform, dtype=np.float64)
    return np.linalg.inv(affine) @ transform @ grid.affine


_TRILINEAR_BLOCK = 1 << 20  # output voxels per grid_sample call: bounds the coordinate arrays (~36 MB)


def _trilinear(data: np.ndarray, voxel_map: np.ndarray, shape: tuple, cval: float) -> np.ndarray:
    """scipy's ``affine_transform(data, order=1, mode="grid-constant", cval=cval, prefilter=False)``,
    by ``grid_sample``, which runs on torch's threads where scipy uses one (:func:`_sample_normalised`).
    The coordinates are formed in float64 (grid_sample's [-1, 1] normalisation folded into the map), a block
    of planes at a time, and rounded once to float32.
    """
    sizes = np.asarray(data.shape, dtype=np.float64)
    normalised = (2.0 / (sizes - 1.0))[:, None] * voxel_map[:3]
    normalised[:, 3] -= 1.0
    theta = torch.from_numpy(np.ascontiguousarray(normalised[::-1]))  # grid_sample takes (k, j, i) order
    depth, height, width = (int(n) for n in shape)
    j = torch.arange(height, dtype=torch.float64)[:, None, None]
    k = torch.arange(width, dtype=torch.float64)[None, :, None]
    plane = theta[:, 3] + j * theta[:, 1] + k * theta[:, 2]  # (H, W, 3): the i = 0 plane
    rows = max(1, _TRILINEAR_BLOCK // max(1, height * width))

    def blocks():
        for start in range(0, depth, rows):
            i = torch.arange(start, min(depth, start + rows), dtype=torch.float64)[:, None, None, None]
            yield (plane + i * theta[:, 0]).to(torch.float32).reshape(-1, 3)

    return _sample_normalised(data, cval, blocks(), depth * height * width).reshape(depth, height, width)


def _sample_normalised(data: np.ndarray, cval: float, blocks, count: int) -> np.ndarray:
    """The trilinear values (float32, flat) of a 3D volume at ``count`` points given in consecutive ``blocks``
    ((m, 3) float32 tensors in grid_sample's (k, j, i) order and [-1, 1] range), by ``grid_sample``.

    ``grid_sample`` with zero padding and ``align_corners=True`` is trilinear interpolation of a volume
    that is 0 beyond its voxel centres, the same as scipy's "grid-constant" mode with cval 0; sampling
    ``data - cval`` and adding cval back gives any other cval."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    source = torch.from_numpy(data if data.flags.writeable else data.copy())  # torch warns on read-only memory
    if cval != 0.0:
        source = source - cval
    out = np.empty(count, np.float32)
    threads = max(1, torch.get_num_threads())
    start = 0
    for points in blocks:
        size = len(points)
        # The 3D CPU kernel spreads its work over the batch only: one batch entry per thread (the last one
        # padded, cut off below).
        parts = min(threads, size)
        per = -(-size // parts)
        grid = torch.nn.functional.pad(points, (0, 0, 0, parts * per - size)).view(parts, 1, 1, per, 3)
        sampled = torch.nn.functional.grid_sample(source[None, None].expand(parts, -1, -1, -1, -1), grid,
                                                  mode="bilinear", padding_mode="zeros", align_corners=True)
        out[start:start + size] = sampled.reshape(-1)[:size].numpy()
        start += size
    if cval != 0.0:
        out += np.float32(cval)
    return out


def sample_trilinear(data: np.ndarray, coords: np.ndarray, cval: float = 0.0) -> np.ndarray:
    """Trilinear values (float32) of a 3D volume at voxel coordinates ``coords`` (3, ...): scipy's
    ``map_coordinates(data, coords, order=1, mode="grid-constant", cval=cval, prefilter=False)``, by
    ``grid_sample`` on torch's threads (as :func:`_trilinear`), ~1.5-2x faster on two cores. It samples
    ``data - cval`` in float32 and adds cval back: within float32 rounding of scipy relative to the range of
    ``data - cval`` (about 1e-5 for values in [0, 1] and cval 0; cval is meant to lie in the data's range, e.g.
    its minimum). Unlike scipy, a NaN or infinite coordinate gives cval, not NaN. A volume with an axis of one
    voxel goes to scipy."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3 or min(data.shape) < 2:
        out = np.empty(coords.shape[1:], np.float32)
        ndimage.map_coordinates(data, coords, output=out, order=1, mode="grid-constant", cval=cval, prefilter=False)
        return out
    scale = 2.0 / (np.asarray(data.shape, dtype=np.float64) - 1.0)
    flat = coords.reshape(3, -1)
    # grid_sample's [-1, 1] normalisation in float64, rounded once to float32; (k, j, i) order.
    blocks = (torch.from_numpy(flat[::-1, start:start + _TRILINEAR_BLOCK] * scale[::-1, None] - 1.0).T.to(torch.float32)
              for start in range(0, flat.shape[1], _TRILINEAR_BLOCK))
    return _sample_normalised(data, cval, blocks, flat.shape[1]).reshape(coords.shape[1:])


def keep_labels(labels, keep=None, what: str = "label map") -> np.ndarray:
    """Labels as int64, with ids not in ``keep`` (when given) set to background 0.

    ``labels``: an array, or a :class:`Scan` (its file is then named in the error for non-integer
    values); ``what`` names it in that error ("moving labels", ...).
    """
    if isinstance(labels, Scan):
        what = f"{what} ({labels.path})" if labels.path else what
        labels = labels.data
    from .metrics import label_ids, label_list

    if keep is not None:
        keep = label_list(keep, "`keep`")
    what = what if what == "label map" else f"{what}: a label map"
    try:
        labels = label_ids(labels, what).astype(np.int64)  # floats: whole numbers up to round-off
    except ValueError as exc:
        raise NiftiError(str(exc)) from None
    if keep is not None:
        labels = np.where(np.isin(labels, np.asarray(keep, dtype=np.int64)), labels, 0)
    return labels


def same_grid(shape, affine, other_shape, other_affine) -> bool:
    """Whether two volumes share one grid: the same shape, affines equal to 1e-3 (writers' round-off)."""
    return tuple(shape) == tuple(other_shape) and np.allclose(affine, other_affine, atol=1e-3)


def check_same_space(image: Scan, labels: Scan, what: str) -> None:
    """Labels must share the image's grid (shape and affine), as segmentations do."""
    if not same_grid(image.data.shape, image.affine, labels.data.shape, labels.affine):
        raise NiftiError(f"{what} ({labels.path}) do not lie on the image's grid: shape {labels.data.shape} vs "
                         f"{image.data.shape}, affines\n{labels.affine}\nvs\n{image.affine}")


def load_pair(fixed_path, moving_path, fixed_labels=None, moving_labels=None, *, spacing=None, size=None,
              multiple: int = PAIR_MULTIPLE, fit: str = "pad", fixed_modality: str = "auto",
              moving_modality: str = "auto", label_ids=None, init: str = "none",
              moving_to_fixed: np.ndarray | None = None, details: bool = False) -> dict:
    """Read a fixed and a moving scan (and optional label maps) onto one physical grid.

    The grid is the fixed image's at ``spacing`` (its own spacing by default), or ``size`` voxels at
    ``spacing`` centred on it, then padded (``fit="pad"``) or cropped (``fit="crop"``) to multiples of
    ``multiple``. Each image is normalised to [0, 1] per modality in its own grid, then resampled
    (trilinear; outside its field of view 0); labels are resampled nearest-neighbour.

    Args:
        label_ids: keep only these label ids (others become background 0); all by default.
        init: "none" (world coordinates as they are) or "com": first match the centres of mass of the
            two body masks (:func:`gradreg_fast.register.moments_init`), for scans of different people
            whose world coordinates do not line up.
        moving_to_fixed: or give that initial alignment yourself: a 4x4 map from the fixed world to
            the moving world; the moving image and labels are sampled through it.

        details: also return the objects below that a DataLoader cannot batch.

    Returns:
        dict with "fixed", "moving": float32 tensors (1, D, H, W) in [0, 1]; "fixed_labels",
        "moving_labels": int64 tensors (1, D, H, W) or None; "affine": the working grid's voxel -> world
        affine, a float64 (4, 4) tensor. With ``details``, also "grid": the working :class:`Grid`;
        "fit": the :class:`Fit` that maps working-grid arrays back to the output grid (the fixed
        image's at the chosen spacing); "fixed_fov": the slices of the working grid inside the fixed
        field of view; "fixed_scan", "moving_scan": the normalised native :class:`Scan` s.
    """
    fixed = read_nifti(fixed_path, "fixed image")
    moving = read_nifti(moving_path, "moving image")
    fixed_seg = read_nifti(fixed_labels, "fixed labels") if fixed_labels is not None else None
    moving_seg = read_nifti(moving_labels, "moving labels") if moving_labels is not None else None
    if fixed_seg is not None:
        check_same_space(fixed, fixed_seg, "fixed labels")
    if moving_seg is not None:
        check_same_space(moving, moving_seg, "moving labels")
    fixed = Scan(normalize_intensity(fixed.data, fixed_modality), fixed.affine, fixed.path)
    moving = Scan(normalize_intensity(moving.data, moving_modality), moving.affine, moving.path)
    if init not in ("none", "com"):
        raise ValueError(f"`init` must be 'none' or 'com', got {init!r}")
    if init == "com":
        if moving_to_fixed is not None:
            raise ValueError("give `init='com'` or `moving_to_fixed`, not both")
        moving_to_fixed = moments_init(fixed, moving)
    pair = pair_on_grid(fixed, moving, fixed_seg, moving_seg, spacing=spacing, size=size, multiple=multiple,
                        fit=fit, label_ids=label_ids, moving_to_fixed=moving_to_fixed)
    if details:
        return pair
    return {key: pair[key] for key in ("fixed", "moving", "fixed_labels", "moving_labels", "affine")}


def pair_on_grid(fixed: Scan, moving: Scan, fixed_labels: Scan | None = None, moving_labels: Scan | None = None, *,
                 spacing=None, size=None, multiple: int = PAIR_MULTIPLE, fit: str = "pad", label_ids=None,
                 moving_to_fixed: np.ndarray | None = None, grid_fit: Fit | None = None) -> dict:
    """:func:`load_pair` (with ``details``) for scans already read and normalised; ``grid_fit`` reuses a grid."""
    if grid_fit is None:
        grid_fit = Grid.of_scan(fixed, spacing=spacing, size=size).fit(multiple, fit)
    grid = grid_fit.grid

    def tensor(array, dtype):
        return torch.from_numpy(np.ascontiguousarray(array)).to(dtype).unsqueeze(0)

    def labels_on_grid(seg, transform):
        if seg is None:
            return None
        return tensor(resample(Scan(keep_labels(seg, label_ids, "labels"), seg.affine), grid, order=0,
                               world_transform=transform), torch.int64)

    fixed_fov = _field_of_view_box(fixed.data.shape, fixed.affine, grid)
    fixed_fov = fixed_fov if fixed_fov is not None else tuple(slice(0, n) for n in grid.shape)
    return {
        "fixed": tensor(np.clip(resample(fixed, grid, order=1), 0, 1), torch.float32),
        "moving": tensor(np.clip(resample(moving, grid, order=1, world_transform=moving_to_fixed), 0, 1),
                         torch.float32),
        "fixed_labels": labels_on_grid(fixed_labels, None),
        "moving_labels": labels_on_grid(moving_labels, moving_to_fixed),
        "affine": torch.from_numpy(grid.affine.copy()),
        "grid": grid,
        "fit": grid_fit,
        "fixed_fov": fixed_fov,
        "fixed_scan": fixed,
        "moving_scan": moving,
    }


def _bounding_box(mask: np.ndarray) -> tuple:
    slices = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slices)


def _field_of_view_box(shape: tuple, affine: np.ndarray, grid: Grid) -> tuple | None:
    """Bounding box (slices) of the grid voxels inside a volume's field of view, or None where none is.

    The same box as ``_bounding_box(resample(np.ones(shape, np.uint8), grid, affine, order=0))``, without
    sampling the whole grid. A grid voxel is inside when its nearest volume voxel is one of the volume's:
    scipy's test, repeated here with its arithmetic (the volume coordinate accumulated from the offset,
    then ``floor(c + 0.5)`` within ``[0, n - 1]`` on every axis), so ties at the half voxel fall the same
    way (tests/test_fast_geometry.py holds it to scipy's own box). The real-valued extent of the volume
    in grid indices bounds the search; along each grid axis the first and last slabs holding an inside
    voxel are then found from the two ends of that extent.
    """
    voxel_map = _voxel_map(affine, grid)
    linear, offset = voxel_map[:3, :3], voxel_map[:3, 3]
    sizes = np.asarray(shape, dtype=np.float64)
    grid_shape = np.asarray(grid.shape)
    try:
        inverse = np.linalg.inv(linear)
    except np.linalg.LinAlgError:
        inverse = None
    if inverse is None or not np.all(np.isfinite(inverse)) or np.linalg.cond(linear) > 1e8:
        fov = resample(np.ones(shape, np.uint8), grid, affine, order=0)
        return _bounding_box(fov) if fov.any() else None
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in sizes], indexing="ij")).reshape(3, -1)
    extent = inverse @ (corners - offset[:, None])
    # A voxel of margin on each side covers the round-off of the inverse and of scipy's coordinates.
    low, high = np.floor(extent.min(axis=1)) - 1, np.ceil(extent.max(axis=1)) + 1
    if np.any(low > grid_shape - 1) or np.any(high < 0):
        return None
    low, high = np.maximum(low, 0).astype(np.int64), np.minimum(high, grid_shape - 1).astype(np.int64)
    ranges = [np.arange(lo, hi + 1, dtype=np.float64) for lo, hi in zip(low, high)]

    def inside(block):
        """Which voxels of the block (one index array per axis) scipy's nearest sampling finds inside."""
        v0, v1, v2 = block[0][:, None, None], block[1][None, :, None], block[2][None, None, :]
        hit = np.ones((len(block[0]), len(block[1]), len(block[2])), dtype=bool)
        for h in range(3):
            nearest = np.floor((((offset[h] + v0 * linear[h, 0]) + v1 * linear[h, 1]) + v2 * linear[h, 2]) + 0.5)
            hit &= (nearest >= 0) & (nearest <= sizes[h] - 1)
        return hit

    def first_slab(axis, direction):
        """Index along ``axis`` of the first slab with an inside voxel, scanning in ``direction`` (1 or -1);
        None if there is none."""
        candidates = ranges[axis][::direction]
        done, width = 0, 1
        while done < len(candidates):
            chunk = candidates[done:done + width]
            block = [chunk if a == axis else ranges[a] for a in range(3)]
            hits = np.flatnonzero(inside(block).any(axis=tuple(a for a in range(3) if a != axis)))
            if hits.size:
                return int(chunk[hits[0]])
            done += len(chunk)
            width *= 2  # a rotated grid can start with a few empty slabs: look further each round
        return None

    box = []
    for axis in range(3):
        first = first_slab(axis, 1)
        if first is None:
            return None
        box.append(slice(first, first_slab(axis, -1) + 1))
    return tuple(box)


# ----------------------------------------------------------------------------------------------- memory

def available_memory() -> int | None:
    """Bytes this process can still allocate: the system's available memory (Linux MemAvailable), capped
    by the cgroup v2 limit of a container; None where neither can be read."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = max(0, int(limit) - used)
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


# ----------------------------------------------------------------------------------------------- writing

def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_path(path, inputs=(), force: bool = False, what: str = "output") -> Path:
    """Refuse an output that is one of the inputs, or that exists without ``force``."""
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise FileExistsError(f"{what} {path} is one of the inputs; outputs never overwrite inputs")
    if path.exists() and not force:
        raise FileExistsError(f"{what} {path} already exists; use --force (force=True) to replace it")
    return path


def check_writable_dir(folder, what: str = "output directory") -> Path:
    """Refuse, before any work, a folder that cannot be created or written to (read-only, a file in the
    way): a one-line PermissionError or FileExistsError. A file is created and removed to find out, as
    permission bits alone say nothing for root or on read-only mounts."""
    import tempfile

    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        if existing.is_symlink():  # exists() follows links: one that points nowhere cannot become the folder
            raise FileExistsError(f"{what} {folder}: {existing} is a symbolic link to a path that does not exist "
                                  f"({os.readlink(existing)})")
        existing = existing.parent
    if not existing.is_dir():
        raise FileExistsError(f"{what} {folder}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".gradreg-write-test.", dir=existing)
    except OSError as exc:
        raise PermissionError(f"{what} {folder} cannot be written to ({existing}: {exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return folder


def _nifti_storable(array: np.ndarray) -> np.ndarray:
    """bool and 64-bit integers (the package's own label maps are int64), which NIfTI-1 writers refuse without an
    explicit type: stored as uint8, or as the smallest of int16 / int32 that holds every value."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for kind in (np.int16, np.int32):
            if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
                return array.astype(kind)
        raise ValueError(f"`array` holds integers beyond int32 ({low}..{high}), which NIfTI-1 cannot store "
                         "portably; pass dtype= to choose a type")
    return array


def write_nifti(path, array, affine: np.ndarray, dtype=None, intent: str | None = None, description: str = "",
                inputs=(), force: bool = False) -> Path:
    """Write ``array`` (i, j, k[, ...]) with ``affine`` as NIfTI, atomically (temp file + os.replace).

    The qform and sform both carry the affine (code 1, scanner), so viewers place it where the grid is.
    Refuses to overwrite one of ``inputs``, or an existing file unless ``force``.
    """
    import nibabel as nib

    path = check_output_path(path, inputs, force)
    suffix = _nifti_suffix(path)
    if suffix is None:
        raise ValueError(f"output {path} must end in .nii or .nii.gz")
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    if dtype is None:
        array = _nifti_storable(array)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if intent is not None:
        image.header.set_intent(intent)
    if description:
        image.header["descrip"] = description.encode()[:79]
    with atomic_output(path, suffix) as temp:
        nib.save(image, temp)
    return path


def voxel_flow_to_world_mm(flow: torch.Tensor | np.ndarray, grid: Grid) -> np.ndarray:
    """A (3, D, H, W) displacement in voxels of ``grid`` -> (D, H, W, 3) in world millimetres."""
    if isinstance(flow, torch.Tensor):
        flow = flow.detach().cpu().numpy()
    flow = np.asarray(flow, dtype=np.float64)
    return np.einsum("ck,k...->...c", grid.affine[:3, :3], flow).astype(np.float32)


def write_displacement(path, displacement_mm: np.ndarray, grid: Grid, **kwargs) -> Path:
    """Write a (D, H, W, 3) world-millimetre displacement field as a NIfTI vector image (X, Y, Z, 1, 3).

    Convention (also stored in the header description): the fixed-grid voxel at world point x maps to
    the moving world point ``x + u(x)``; components are along the NIfTI world axes (RAS+). ITK and ANTs
    store displacement vectors in LPS: negate the first two components to use the field there.
    """
    displacement_mm = np.asarray(displacement_mm, dtype=np.float32)
    if displacement_mm.shape != tuple(grid.shape) + (3,):
        raise ValueError(f"`displacement_mm` must have shape {tuple(grid.shape) + (3,)}, got {displacement_mm.shape}")
    return write_nifti(path, displacement_mm[:, :, :, None, :], grid.affine, intent="vector",
                       description="u(x) mm RAS: fixed x -> moving x+u", **kwargs)
