"""Registration metrics: overlap (Dice), surface distances in mm (ASD, HD95), and flow regularity.

Label maps are integer arrays (numpy or torch, any leading singleton dims are fine as long as both
maps have the same shape); surface distances use the physical ``spacing`` (mm per voxel along each
axis) and are exact Euclidean distances between surface voxels. :func:`surface_distances` computes
them with a distance transform over the whole volume (the reference); :func:`label_metrics` finds
the same distances label by label, over the box that holds the label's two surfaces (an exact distance
transform in the CPU core) or, where that box would be large for the surfaces it holds, by nearest-neighbour
search between the two surfaces; every label's surface comes from one pass over the map, so the cost
follows the labels' surfaces and boxes, not volume x labels.
Flows are displacement fields in voxels, (3, D, H, W) or (1, 3, D, H, W), channel k along spatial
axis k (the :func:`gradreg_fast.warp` convention).

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
        if array.dtype == torch.bfloat16:
            array = array.float()  # numpy has no bfloat16
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.size == 0:
        raise ValueError(f"`{name}` must not be empty")
    if array.ndim == 0:
        raise ValueError(f"`{name}` must be an array with at least one axis, got a single value")
    if np.iscomplexobj(array):
        raise ValueError(f"`{name}` must hold real numbers, got {array.dtype}")
    return array


LABEL_ROUNDING = 1e-3  # float label maps carry round-off from the tools that wrote them
_LARGEST_ID = 2 ** 53  # beyond it a float no longer holds every whole number


def label_ids(values, what: str = "`labels`") -> np.ndarray:
    """Label ids as an int64 array: integers, or floats within :data:`LABEL_ROUNDING` of whole numbers.

    Fractions, NaN, inf, ids beyond +-2**53 (or an unsigned id beyond int64) and anything that is not a
    number raise a ValueError that starts with ``what`` (the argument or file, as it should be named):
    a label is an identity, never something to round or wrap."""
    array = np.asarray(values)
    if array.dtype == np.bool_:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{what} must hold whole-number ids within int64, found {int(array.max())}")
        return array.astype(np.int64, copy=False)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} must hold whole-number label ids, got values of type {array.dtype}")
    finite = np.isfinite(array)
    rounded = np.rint(np.where(finite, array, 0.0))
    off = ~finite | (np.abs(rounded - array) > LABEL_ROUNDING) | (np.abs(rounded) > _LARGEST_ID)
    if off.any():
        raise ValueError(f"{what} must hold whole numbers (label ids up to 2**53), found "
                         f"{float(array[off].flat[0])!r}")
    return rounded.astype(np.int64)


def label_list(labels, what: str = "`labels`") -> list:
    """A sequence of label ids as a list of ints (see :func:`label_ids`); anything else is named."""
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
        raise ValueError(f"{what} must be a sequence of label ids, got {labels!r}")
    return label_ids(list(labels), what).reshape(-1).tolist()


def _label_map(array: np.ndarray, name: str) -> np.ndarray:
    """A label map as integers (integer maps as they are, no copy); see :func:`label_ids`."""
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint64:
        return array
    return label_ids(array, name)


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
    return label_list(labels)


def dice(a, b, labels=None) -> dict:
    """Dice 2|A∩B| / (|A| + |B|) per label id: {id: value}; NaN where the label is in neither map.

    ``labels``: ids to score; by default every non-zero id present in either map.
    """
    a, b = _pair(a, b)
    a, b = _label_map(a, "`a`"), _label_map(b, "`b`")
    scores = {}
    for label in _labels(a, b, labels):
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        scores[label] = 2.0 * int(np.logical_and(in_a, in_b).sum()) / total if total else math.nan
    return scores


def check_spacing(spacing, ndim: int = 3) -> np.ndarray:
    """Voxel sizes in mm as a float64 array of ``ndim`` (one value is every axis's); a ValueError naming
    ``spacing`` unless they are numbers in [1e-150, 1e100], one or one per axis (beyond those, squared
    distances overflow or vanish in float64)."""
    try:
        values = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"`spacing` must be numbers of mm, got {spacing!r}") from None
    if values.size not in (1, ndim):
        raise ValueError(f"`spacing` must be one value or {ndim} (one per axis), got {spacing!r}")
    spacing = np.broadcast_to(values.reshape(-1), (ndim,)).copy()
    if not np.all((spacing >= 1e-150) & (spacing <= 1e100)):
        raise ValueError(f"`spacing` must be positive voxel sizes in [1e-150, 1e100] mm, got {spacing.tolist()}")
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
    spacing = check_spacing(spacing, a.ndim)
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
    table = label_metrics(a, b, spacing, labels)
    return {label: {"asd": v["asd"], "hd95": v["hd95"]} for label, v in table.items()}


def _whole_offsets(values, name: str) -> np.ndarray:
    """Voxel offsets as int64: whole numbers only (a fractional offset would be truncated, not placed)."""
    try:
        offsets = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must hold whole voxel offsets, got {values!r}") from None
    if not np.all(np.isfinite(offsets)) or np.any(offsets != np.rint(offsets)):
        raise ValueError(f"`{name}` must hold whole voxel offsets, got {values!r}")
    if np.any(np.abs(offsets) > _LARGEST_ID):  # int64 would wrap, and float64 no longer holds every whole number
        raise ValueError(f"`{name}` must hold offsets of at most 2**53 voxels, got {values!r}")
    return offsets.astype(np.int64)


class LabelSurfaces:
    """One label map, prepared for scoring: per scored label its voxel count and its surface voxels.

    The surfaces of every label come from one pass over the map (a voxel of a scored label is on its
    surface when a face neighbour holds another id, or lies beyond the map), so the cost does not grow
    with the number of labels; preparing the fixed map once serves every stage it is scored against
    (its search trees too).

    Args:
        labels_map: integer label map (leading singleton dims are dropped).
        labels: the ids to score, without repeats.
        origin: where the map's voxel (0, 0, 0) lies on the lattice shared with the other map, in
            voxels (integers). Two maps with different origins and shapes are compared where they lie;
            beyond a map everything is background.
    """

    def __init__(self, labels_map, labels, origin=None, origin_name: str = "origin"):
        array = _label_map(_spatial(_numpy(labels_map, "labels_map")), "`labels_map`")
        self.shape = array.shape
        self.origin = np.zeros(array.ndim, np.int64) if origin is None else _whole_offsets(origin, origin_name)
        if self.origin.shape != (array.ndim,):
            raise ValueError(f"`{origin_name}` must hold {array.ndim} integers (one per axis of the map), got "
                             f"{origin!r}")
        self.labels = np.asarray(label_list(labels), dtype=np.int64)
        self.index = _label_index(array, self.labels)  # 0: not scored, k + 1: labels[k]
        count = len(self.labels) + 1
        self.counts = np.bincount(self.index.ravel(), minlength=count)
        self.on_surface = _boundary(self.index) & (self.index > 0)  # looked up for the voxels both maps share
        flat = np.flatnonzero(self.on_surface)
        owner = self.index.ravel()[flat]
        # A stable sort is one permutation whatever the algorithm; 16-bit keys get numpy's radix sort.
        order = np.argsort(owner.astype(np.uint16) if count <= 1 << 16 else owner, kind="stable")
        self._flat, self._owner = flat[order], owner[order]  # surface voxels grouped by index, in C order within
        self._starts = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=count))])
        self._points = np.stack(np.unravel_index(self._flat, self.shape), axis=1) + self.origin
        self._trees = {}

    def points(self, k: int) -> np.ndarray:
        """Surface voxels (lattice coordinates) of label ``labels[k - 1]``."""
        return self._points[self._starts[k]:self._starts[k + 1]]

    def tree(self, k: int, spacing: np.ndarray):
        """KD-tree over the surface of label ``labels[k - 1]`` in mm, kept: the fixed map's serve every stage."""
        from scipy.spatial import cKDTree

        key = (k, spacing.tobytes())
        tree = self._trees.get(key)
        if tree is None:
            # Sliding-midpoint splits and leaves of 32 build and search faster on these lattice surfaces than
            # the defaults (1.15-1.25x on a 108-label atlas); the distances found are the same.
            tree = self._trees[key] = cKDTree(self.points(k) * spacing, leafsize=32, balanced_tree=False)
        return tree


def _label_index(array: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """int32 map: k + 1 where the voxel holds labels[k], else 0."""
    if np.issubdtype(array.dtype, np.integer) and array.size:
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high < 1 << 22:  # a lookup table beats a binary search per voxel
            table = np.zeros(high + 1, np.int32)
            inside = (labels >= 0) & (labels <= high)
            table[labels[inside].astype(np.int64)] = np.flatnonzero(inside).astype(np.int32) + 1
            return table[array]
    if len(labels) == 0:
        return np.zeros(array.shape, np.int32)
    order = np.argsort(labels, kind="stable")
    position = np.clip(np.searchsorted(labels[order], array), 0, len(labels) - 1)
    return np.where(labels[order][position] == array, order[position] + 1, 0).astype(np.int32)


def _boundary(index: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of another index, or on the map's border."""
    edge = np.zeros(index.shape, bool)
    for axis in range(index.ndim):
        low = [slice(None)] * index.ndim
        high = [slice(None)] * index.ndim
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        differs = index[tuple(low)] != index[tuple(high)]
        edge[tuple(low)] |= differs
        edge[tuple(high)] |= differs
        low[axis], high[axis] = 0, -1
        edge[tuple(low)] = True
        edge[tuple(high)] = True
    return edge


def _overlap_counts(a: LabelSurfaces, b: LabelSurfaces) -> np.ndarray:
    """Per index, the voxels where both maps hold that scored label (0 where their boxes do not meet)."""
    low = np.maximum(a.origin, b.origin)
    high = np.minimum(a.origin + np.asarray(a.shape), b.origin + np.asarray(b.shape))
    count = len(a.labels) + 1
    if np.any(high <= low):
        return np.zeros(count, np.int64)
    crop_a = a.index[tuple(slice(lo - o, hi - o) for lo, hi, o in zip(low, high, a.origin))]
    crop_b = b.index[tuple(slice(lo - o, hi - o) for lo, hi, o in zip(low, high, b.origin))]
    return np.bincount(crop_a[crop_a == crop_b], minlength=count)


def _shared(a: LabelSurfaces, b: LabelSurfaces) -> np.ndarray:
    """Per surface voxel of ``a``: whether ``b`` has a surface voxel of the same label there (distance 0)."""
    if np.array_equal(a.origin, b.origin) and a.shape == b.shape:
        flat = a._flat
        return b.on_surface.ravel()[flat] & (b.index.ravel()[flat] == a._owner)
    local = a._points - b.origin
    inside = np.flatnonzero(np.all((local >= 0) & (local < np.asarray(b.shape)), axis=1))
    where = tuple(local[inside].T)
    shared = np.zeros(len(local), bool)
    shared[inside] = b.on_surface[where] & (b.index[where] == a._owner[inside])
    return shared


def _searches(a: LabelSurfaces, b: LabelSurfaces, out: np.ndarray) -> list:
    """(k, rows of a's surface voxels, a, b, out) per label with a search to do from ``a`` to ``b``.

    Voxels on both surfaces are at distance 0 exactly, as the search would find, and are left out: after
    a good alignment they are most of them (all of them when a stage leaves the labels where they were)."""
    rows = np.flatnonzero((np.diff(b._starts) > 0)[a._owner] & ~_shared(a, b))
    bounds = np.searchsorted(a._owner[rows], np.arange(len(a._starts)))  # owners are grouped in order
    return [(k, rows[bounds[k]:bounds[k + 1]], a, b, out) for k in range(1, len(a._starts) - 1)
            if bounds[k + 1] > bounds[k]]


# A label's distances come from an exact distance transform over the box that holds both its surfaces (the CPU
# core's label_surface_distances) when that box has at most this many voxels per surface point, and from search
# trees otherwise: two surfaces far apart (before any alignment) would make the box, not the surfaces, the cost.
# On the 2-core machine a transform took ~0.1 us per box voxel (both directions) and a search ~1.5 us per point
# (its tree included); on the stages of bench_many_labels.py's 108-label case any bound from 16 to 64 gave the
# same time, 1.5-2.4x faster than trees alone on the stages that move the labels.
BOX_VOXELS_PER_POINT = 32
# Each thread holds one box of float64 at a time, as large as the largest: larger labels' boxes go to the trees.
BOX_VOXELS_LIMIT = 1 << 21


def _label_boxes(s: LabelSurfaces) -> tuple:
    """(low, high) (count, ndim): per index the bounds of its surface voxels (inclusive; empty: +max, -max)."""
    counts = np.diff(s._starts)
    low = np.full((len(counts), len(s.shape)), np.iinfo(np.int64).max)
    high = np.full((len(counts), len(s.shape)), np.iinfo(np.int64).min)
    filled = np.flatnonzero(counts)
    if len(filled):  # the groups are contiguous and in order, so each filled start ends the previous group
        low[filled] = np.minimum.reduceat(s._points, s._starts[filled], axis=0)
        high[filled] = np.maximum.reduceat(s._points, s._starts[filled], axis=0)
    return low, high


def _as_3d(points: np.ndarray) -> np.ndarray:
    """(n, d) lattice points, d <= 3 -> (n, 3) int64, C order, the missing leading axes at 0."""
    if points.shape[1] < 3:
        points = np.pad(points, ((0, 0), (3 - points.shape[1], 0)))
    return np.ascontiguousarray(points, dtype=np.int64)


def _transform_labels(a: LabelSurfaces, b: LabelSurfaces, searches: list, spacing: np.ndarray, ab: np.ndarray,
                      ba: np.ndarray, workers: int) -> list:
    """Writes into ``ab`` and ``ba`` every distance of the labels among ``searches`` whose box is small (see
    BOX_VOXELS_PER_POINT), in both directions, with the CPU core; returns the searches of the other labels."""
    from ._backend import cpu_core

    transform = getattr(cpu_core(), "label_surface_distances", None)  # absent from a core built before it
    # Squared voxel sizes and squared box extents must be normal, finite doubles for the transform's arithmetic.
    if transform is None or not searches or len(a.shape) > 3 or not np.all((spacing > 1e-100) & (spacing < 1e100)):
        return searches
    ks = np.unique([task[0] for task in searches])
    (low_a, high_a), (low_b, high_b) = _label_boxes(a), _label_boxes(b)
    low = np.minimum(low_a[ks], low_b[ks])
    size = np.maximum(high_a[ks], high_b[ks]) - low + 1
    volume = np.prod(size.astype(np.float64), axis=1)
    small = (volume <= BOX_VOXELS_PER_POINT * (np.diff(a._starts)[ks] + np.diff(b._starts)[ks])) \
        & (volume <= BOX_VOXELS_LIMIT)
    if not small.any():
        return searches
    order = np.argsort(-volume[small], kind="stable")  # largest first, so that the threads finish together
    chosen = ks[small][order]
    boxes = np.ascontiguousarray(np.concatenate([_as_3d(low[small][order]), _as_3d(size[small][order])], axis=1))
    boxes[:, 3:6 - len(a.shape)] = 1  # the size of each padded axis (_as_3d pads with 0)
    points_a, points_b = _as_3d(a._points), _as_3d(b._points)
    starts_a = np.ascontiguousarray(a._starts, dtype=np.int64)
    starts_b = np.ascontiguousarray(b._starts, dtype=np.int64)
    chosen = np.ascontiguousarray(chosen, dtype=np.int64)
    full_spacing = [1.0] * (3 - len(a.shape)) + [float(v) for v in spacing]
    try:
        transform(points_a.ctypes.data, starts_a.ctypes.data, points_b.ctypes.data, starts_b.ctypes.data,
                  chosen.ctypes.data, boxes.ctypes.data, len(chosen), full_spacing, ab.ctypes.data, ba.ctypes.data,
                  max(1, workers))
    except MemoryError:  # its scratch (one box per thread) did not fit: the trees need none
        return searches
    done = set(chosen.tolist())
    return [task for task in searches if task[0] not in done]


def _percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (method "linear"), the same arithmetic bit for bit, without its ~0.1 ms
    per call (a registration scoring 108 labels makes 430 calls)."""
    n = len(values)
    virtual = (n - 1) * (q / 100)
    low = math.floor(virtual)
    if low >= n - 1:
        return float(values.max())
    part = np.partition(values, (low, low + 1))
    below, above, gamma = float(part[low]), float(part[low + 1]), virtual - low
    step = above - below
    return above - step * (1 - gamma) if gamma >= 0.5 else below + step * gamma


def label_metrics(a, b, spacing=1.0, labels=None, b_origin=None, progress=None, workers=None) -> dict:
    """{label: {"dice", "asd", "hd95"}}: all overlap and surface metrics per label.

    Exact, and independent of the volume's size: Dice from voxel counts, and surface distances
    between the two labels' surface voxels (the Euclidean distances of a distance transform of the whole
    volume, to rounding), label by label on ``workers`` threads: by an exact distance transform over the
    box holding both surfaces (the CPU core's ``label_surface_distances``), or, where that box holds more
    than ``BOX_VOXELS_PER_POINT`` voxels per surface point (two surfaces far apart) or more than
    ``BOX_VOXELS_LIMIT`` voxels, for maps of more than three axes, or when the core is missing, by
    nearest-neighbour search of the voxels on one surface and not the other (KD-trees).

    Args:
        a, b: label maps (arrays, tensors, or :class:`LabelSurfaces` prepared with the same labels).
        labels: ids to score; by default every non-zero id present in either map.
        b_origin: where ``b``'s voxel (0, 0, 0) lies in ``a``'s voxels; ``b`` may then have any shape,
            and the maps are compared where they lie (beyond a map: background). Default: ``a`` and
            ``b`` cover the same voxels and must have the same shape.
        progress: something with ``update(n)`` (a tqdm bar), advanced once per label.
        workers: threads for the transforms and the searches; default ``torch.get_num_threads()``.
    """
    prepared = isinstance(a, LabelSurfaces) and isinstance(b, LabelSurfaces)
    if not prepared:
        if b_origin is None:
            a, b = _pair(a, b)
        else:
            a, b = _numpy(a, "a"), _numpy(b, "b")
        a, b = _label_map(_spatial(a), "`a`"), _label_map(_spatial(b), "`b`")
        if a.ndim != b.ndim:
            raise ValueError(f"`a` and `b` must have the same number of spatial dims, got {a.shape} and {b.shape}")
        scored = np.asarray(list(dict.fromkeys(_labels(a, b, labels))), dtype=np.int64)
        a = LabelSurfaces(a, scored)
        b = LabelSurfaces(b, scored, b_origin, origin_name="b_origin")
    elif not np.array_equal(a.labels, b.labels):
        raise ValueError("`a` and `b` were prepared with different label lists")
    spacing = check_spacing(spacing, len(a.shape))
    workers = torch.get_num_threads() if workers is None else int(workers)
    overlap = _overlap_counts(a, b)
    ab, ba = np.zeros(len(a._points)), np.zeros(len(b._points))  # each surface voxel's distance to the other
    searches = _transform_labels(a, b, _searches(a, b, ab) + _searches(b, a, ba), spacing, ab, ba, workers)

    def search(task):
        k, rows, source, target, out = task
        out[rows] = target.tree(k, spacing).query(source._points[rows] * spacing)[0]

    # Largest first, so that the threads finish together; the trees build and search without the GIL.
    searches.sort(key=lambda task: -len(task[1]))
    if workers > 1 and len(searches) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(searches))) as pool:
            list(pool.map(search, searches))
    else:
        for task in searches:
            search(task)
    starts_a, starts_b = a._starts.tolist(), b._starts.tolist()
    counts_a, counts_b = a.counts.tolist(), b.counts.tolist()
    overlap = overlap.tolist()
    out = {}
    for k, label in enumerate(a.labels.tolist(), start=1):
        total = counts_a[k] + counts_b[k]
        entry = {"dice": 2.0 * overlap[k] / total if total else math.nan, "asd": math.nan, "hd95": math.nan}
        if starts_a[k + 1] > starts_a[k] and starts_b[k + 1] > starts_b[k]:
            pooled = np.concatenate([ab[starts_a[k]:starts_a[k + 1]], ba[starts_b[k]:starts_b[k + 1]]])
            entry["asd"], entry["hd95"] = float(pooled.mean()), _percentile(pooled, 95)
        out[int(label)] = entry
        if progress is not None:
            progress.update(1)
    return out


# ----------------------------------------------------------------------------------------------- regularity

def _flow(flow) -> np.ndarray:
    flow = _numpy(flow, "flow").astype(np.float64)
    if not np.isfinite(flow).all():  # a NaN determinant is not <= 0: it would count as no folding
        raise ValueError("`flow` holds non-finite values (NaN or inf): its Jacobian is undefined there")
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
    """det(I + ∇u) per voxel of the map x -> x + u(x) (central differences inside, one-sided at borders).

    In the CPU core (one pass, torch's threads; the same doubles as the numpy expression it falls back to)."""
    from ._backend import cpu_core

    flow = _flow(flow)
    kernel = getattr(cpu_core(), "jacobian_determinant", None)  # absent from a core built before it
    if kernel is None:
        return _jacobian_determinant_numpy(flow)
    flow = np.ascontiguousarray(flow)
    out = np.empty(flow.shape[1:])
    kernel(flow.ctypes.data, out.ctypes.data, *out.shape, max(1, torch.get_num_threads()))
    return out


def _jacobian_determinant_numpy(flow: np.ndarray) -> np.ndarray:
    """:func:`jacobian_determinant` of a checked (3, D, H, W) float64 flow in numpy (9 derivative volumes)."""
    jac = np.empty((3, 3) + flow.shape[1:])
    for i in range(3):
        for j, g in enumerate(np.gradient(flow[i], axis=(0, 1, 2))):
            jac[i, j] = g + (1.0 if i == j else 0.0)
    return (jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
            - jac[0, 1] * (jac[1, 0] * jac[2, 2] - jac[1, 2] * jac[2, 0])
            + jac[0, 2] * (jac[1, 0] * jac[2, 1] - jac[1, 1] * jac[2, 0]))


def folding_percent(flow, mask=None) -> float:
    """Percentage of voxels (inside ``mask`` if given) whose Jacobian determinant is <= 0."""
    return _folding(_determinants(flow, mask))


def sd_log_jacobian(flow, mask=None) -> float:
    """Standard deviation of log(det J) over voxels (inside ``mask`` if given); determinants are clipped at
    1e-9 first so that folded voxels count as a large deviation instead of NaN (the usual convention).

    Read it with the folding percentage: a map that reverses orientation almost everywhere (a mirror) has its
    determinants clipped to nearly one value, so its SDlogJ is near 0."""
    return _sd_log(_determinants(flow, mask))


def regularity(flow, mask=None) -> dict:
    """{"folding_percent", "sd_log_jacobian"} from one computation of the Jacobian determinants."""
    values = _determinants(flow, mask)
    return {"folding_percent": _folding(values), "sd_log_jacobian": _sd_log(values)}


def _determinants(flow, mask) -> np.ndarray:
    det = jacobian_determinant(flow)
    return det if mask is None else det[_mask(mask, det.shape)]


def _folding(values: np.ndarray) -> float:
    return 100.0 * float((values <= 0).mean()) if values.size else math.nan


def _sd_log(values: np.ndarray) -> float:
    return float(np.log(np.clip(values, 1e-9, None)).std()) if values.size else math.nan


def _mask(mask, shape) -> np.ndarray:
    mask = _spatial(_numpy(mask, "mask")).astype(bool)
    if mask.shape != tuple(shape):
        raise ValueError(f"`mask` must have the flow's spatial shape {tuple(shape)}, got {mask.shape}")
    return mask
