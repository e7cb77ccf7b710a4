"""Register one pair of NIfTI files end to end, evaluate it, and write the results.

Stages (each timed):

1. read both scans, normalise intensities per modality, choose the working grid (the fixed image's,
   padded as :func:`working_fit` says);
2. initial alignment: centres of mass of the body masks (:func:`gradreg_fast.body.moments_init`);
3. affine: optimised on MIND-SSC, coarse to fine (:func:`affine.optimize_affine`); the moving scan is
   then resampled once from its own voxels through initial alignment and affine together;
4. deformable: a displacement field (default) or the dual-branch network, instance-optimised on the
   pair, coarse to fine (:mod:`.deformable`).

Everything is applied in one go at the end: for each output voxel the moving scan's voxel coordinate
is composed from the grids, the world transform and the field, and the moving image (original
intensities, trilinear) and labels (nearest) are sampled there once. Labels only ever enter the
evaluation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .. import metrics
from .._atomic import INCOMPLETE_MARKER, FileSet, atomic_write
from ..ops._common import check_number_argument
from ..io import (CT_WINDOW, MR_PERCENTILES, Fit, Grid, Scan, _bounding_box, available_memory, check_output_path,
                  check_same_space, check_writable_dir, keep_labels, normalize_intensity, pair_on_grid, read_nifti,
                  resample, sample_trilinear, write_displacement, write_nifti)
from .affine import MODELS as AFFINE_MODELS
from .affine import OBJECTIVES as AFFINE_OBJECTIVES
from .affine import moments_init, optimize_affine
from .deformable import FieldSettings, check_field_settings, optimize_field, optimize_network

OUTPUT_FILES = ("warped.nii.gz", "warped_labels.nii.gz", "flow.nii.gz", "metrics.json", "overview.png")
STAGES = ("before", "initial", "affine", "after")


@dataclass
class Settings:
    """Everything that shapes a registration (stored in metrics.json)."""

    spacing: float | None = None  # mm; None: the fixed image's own
    size: tuple | None = None  # working grid voxels (one count: a cube; or three); None: the fixed field of view
    fit: str = "pad"  # "pad" or "crop" to the multiples of working_multiples (see working_fit)
    slab_margin: int = 1  # voxels the field engine's working grid adds at least on each side of the thinnest axis
    fixed_modality: str = "auto"
    moving_modality: str = "auto"
    # Intensity normalisation (io.normalize_intensity); no other window or percentile pair tried beat these on the
    # validation cases (sweep 14, engine_sweeps.md).
    ct_window: tuple = CT_WINDOW  # HU, clipped and scaled to [0, 1]
    mr_percentiles: tuple = MR_PERCENTILES  # of each MR volume, clipped and scaled to [0, 1]
    init: str = "com"  # "com" (centres of mass of the body masks), "com_scale" (plus in-plane spread), "none"
    affine_model: str = "affine"  # "affine", "rigid_scale", "translation" or "none"
    affine_levels: tuple = (4, 2)
    affine_iterations: tuple = (5, 5)
    affine_objective: str = "descriptors"  # see optimize_affine: "descriptors" (warped once-per-level MIND) or "mind"
    # Weight of optimize_affine's pull of the linear part toward a rotation: 10 all but locks scale and shear,
    # which the inter-subject validation cases' thin slabs cannot pin down (sweep 10, engine_sweeps.md).
    affine_rigidity: float = 10.0
    method: str = "field"  # "field" or "network"
    field: FieldSettings = field(default_factory=FieldSettings)
    network: str = "gated"  # the model built when method="network" and no checkpoint is given
    network_levels: tuple = (2, 1)
    network_iterations: tuple = (100, 50)
    network_lr: float = 1e-4
    checkpoint: str | None = None


def working_multiples(shape, settings: Settings) -> tuple:
    """What each axis of the working grid is padded (or cropped) to a multiple of: 16 everywhere for the network
    (four stride-2 levels), 4 for the field engine (its velocity grid)."""
    if settings.method != "field":
        return (16, 16, 16)
    return (4, 4, 4)


def working_fit(grid: Grid, settings: Settings) -> Fit:
    """The working grid of a registration whose output grid is ``grid``: :func:`working_multiples`, and for the
    field engine (with ``fit`` "pad") at least ``slab_margin`` voxels added on each side of the thinnest axis
    first.

    That margin holds the moving content just beyond a thin slab of thick slices (the MR cases' 20 slices of 3 mm),
    where organs move in and out of the fixed field of view. One voxel (rounded up to the multiple: 20 slices become
    24) keeps the validation Dice of the earlier 12 (benchmarks/results/engine_sweeps.md, sweep 17: margins of 1 to 6
    voxels differ by less than their paired standard errors on the 18 choosing and the 14 held-out cases, while no
    margin loses 0.02), at three quarters of the voxels. Margins along the other axes changed nothing (sweep 8g)."""
    margins = (0, 0, 0)
    if settings.method == "field" and settings.fit == "pad":
        thinnest = min(range(3), key=lambda axis: (grid.shape[axis], axis))
        margins = tuple(settings.slab_margin if axis == thinnest else 0 for axis in range(3))
    return grid.fit(working_multiples(grid.shape, settings), settings.fit, margins)


def quick_settings() -> Settings:
    """About 1.35 times faster than the defaults (benchmarks/RESULTS.md, 2026-12-02 03:41): no gradient-map terms, a
    one-way search of +-1 cell, 20 Adam steps at lr 1.0.

    On the validation set it keeps the defaults' Dice on the same-subject cases (0.940 against 0.937) and loses
    on the twelve inter-subject ones (0.570 against 0.584) and the bundled pair (0.613 against 0.624;
    benchmarks/RESULTS.md, 2026-12-02 03:41), and its capture range is +-2 voxels: where the affine stage leaves
    larger differences (the two-organ phantom of tests/test_register.py) it falls well short of the defaults
    (Dice 0.68 against 0.87).
    """
    settings = Settings(affine_iterations=(5, 5), network_iterations=(10, 5))
    settings.field = FieldSettings(alpha=0.0, search_radius=1, symmetric=False, iterations=(20,), lr=1.0)
    return settings


def thorough_settings() -> Settings:
    """More iterations than the defaults: the affine stage 40 + 40, the Adam refinement 100 steps.

    Not more accurate on the validation set (benchmarks/results/engine_sweeps.md, after sweep 10): the same-subject
    Dice rises a little (0.943 against 0.938) but the inter-subject Dice falls (0.465 against 0.614: between two
    people's thin slabs the long affine run rotates and shifts away, the rigidity holding only its scale, and
    longer Adam runs follow noise), and so does the phantom's (0.67 against 0.87). Kept for studying convergence,
    not as a better default."""
    settings = Settings(affine_iterations=(40, 40))
    settings.field.iterations = (100,)
    return settings


@dataclass
class Result:
    """What :func:`register` returns: transforms, fields, resampled volumes and metrics."""

    grid: Grid  # the working grid (see working_fit)
    fit: Fit  # working grid <-> output grid (the fixed image's at the chosen spacing)
    initial: np.ndarray  # world transform fixed -> moving of the initial alignment
    affine: np.ndarray  # world transform fixed -> moving after the affine stage
    flow: torch.Tensor  # (1, 3, D, H, W) deformable field on the working grid, voxels
    displacement_mm: np.ndarray  # (d, h, w, 3) full transform on the output grid, world mm
    fixed: np.ndarray  # fixed image, normalised, output grid
    moving_initial: np.ndarray  # moving image, normalised, initial alignment only, output grid
    moving_affine: np.ndarray  # moving image, normalised, after the affine stage, output grid
    warped: np.ndarray  # moving image, normalised, fully registered, output grid
    warped_original: np.ndarray  # moving image in its original intensities, fully registered
    fixed_labels: np.ndarray | None
    warped_labels: np.ndarray | None
    label_maps: dict  # stage -> moving labels on the output grid ("before", "initial", "affine", "after");
    # metrics["stages"]["before"] is scored where the moving labels lie, beyond the output grid (see register)
    metrics: dict
    timings: dict


def resolve_device(device: str | torch.device | None, backend: str | None = None) -> torch.device:
    """"auto"/None -> CUDA when available, else CPU; anything else must be a usable CPU or CUDA device, and
    ``backend`` (None: the global default, :func:`gradreg_fast.set_backend`) must be able to run on it: both
    are checked here, before any work, with a ValueError that names them."""
    from .. import _backend

    if device in (None, "auto"):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {str(device)!r}: the package's ops run on 'cpu' and 'cuda' devices only")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are present")
    name = _backend.get_backend() if backend is None else _backend._validate_name(backend, "backend")
    if name not in ("auto", "reference"):
        why = _backend.problem(name, device, "warp")
        if why:
            raise ValueError(f"backend {name!r} cannot run on device {str(device)!r}: {why}")
    return device


def _lattice_map(matrix: np.ndarray, shape, flow: np.ndarray | None = None,
                 flow_matrix: np.ndarray | None = None) -> np.ndarray:
    """(3, *shape) float64: ``matrix`` (4x4) applied to the voxel indices of a grid of ``shape``, plus the linear
    part of ``flow_matrix`` (default ``matrix``) applied to the voxel field ``flow`` (3, *shape) when given: for
    ``flow_matrix == matrix``, the map of the displaced voxels.

    The lattice of indices is never stored: each channel is a broadcast sum of per-axis ramps, one pass over the
    volume, and the field adds one matrix product (on torch's threads). Every stage of the evaluation needs such a
    map; storing indices and world points for each took 0.03-0.04 s more on a 1-million-voxel grid in a fresh
    process (the first touch of each new ~20 MB array's pages)."""
    matrix = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64))
    ramps = [torch.arange(n, dtype=torch.float64) for n in shape]
    out = torch.empty((3, *shape), dtype=torch.float64)
    if flow is not None:
        linear = matrix if flow_matrix is None else torch.from_numpy(np.ascontiguousarray(flow_matrix,
                                                                                          dtype=np.float64))
        moved = torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float64)).reshape(3, -1)
        torch.mm(linear[:3, :3], moved, out=out.view(3, -1))
    for c in range(3):
        plane = ((matrix[c, 0] * ramps[0]).view(-1, 1) + (matrix[c, 1] * ramps[1] + matrix[c, 3]).view(1, -1))
        ramp = matrix[c, 2] * ramps[2]
        if flow is None:
            torch.add(plane.unsqueeze(-1), ramp, out=out[c])
        else:
            out[c] += plane.unsqueeze(-1)
            out[c] += ramp
    return out.numpy()


def _scan_coords(scan_affine: np.ndarray, transform: np.ndarray, grid: Grid, flow: np.ndarray | None = None):
    """(3, *grid.shape) voxel coordinates in a scan of ``grid``'s voxels (displaced by the voxel field ``flow``)
    carried by the world transform ``transform`` (4x4, fixed to moving world)."""
    return _lattice_map(np.linalg.inv(scan_affine) @ transform @ grid.affine, grid.shape, flow)


def _world_displacement(transform: np.ndarray, grid: Grid, flow: np.ndarray) -> np.ndarray:
    """(*grid.shape, 3) float64 world displacement (mm) of ``grid``'s voxels: each voxel moved by the voxel field
    ``flow`` (3, *grid.shape) and then by the world transform ``transform``, minus where it lay."""
    to_world = transform @ grid.affine
    return np.moveaxis(_lattice_map(to_world - grid.affine, grid.shape, flow, to_world), 0, -1)


def _sample(scan_data: np.ndarray, coords: np.ndarray, order: int, cval: float):
    """Values of a volume at voxel coordinates (3, ...) (``order`` 1: trilinear, 0: nearest; ``cval`` outside).
    Trilinear runs on grid_sample (:func:`gradreg_fast.io.sample_trilinear`); nearest on scipy, whose rounding of
    a coordinate halfway between two voxels every label map of the package shares."""
    from concurrent.futures import ThreadPoolExecutor

    if order not in (0, 1):
        raise ValueError(f"`order` must be 0 (nearest) or 1 (trilinear), got {order!r}")
    if order == 1:
        return sample_trilinear(scan_data, coords, cval)
    out = np.empty(coords.shape[1:], scan_data.dtype)  # map_coordinates' own output type
    # map_coordinates uses one core and releases the GIL: slabs on torch's threads. Each voxel is
    # interpolated on its own, so the split changes no value.
    threads = max(1, torch.get_num_threads())
    bounds = np.linspace(0, len(out), min(len(out), 4 * threads) + 1).round().astype(int)

    def slab(k):
        ndimage.map_coordinates(scan_data, coords[:, bounds[k]:bounds[k + 1]], output=out[bounds[k]:bounds[k + 1]],
                                order=order, mode="grid-constant", cval=cval, prefilter=False)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(slab, range(len(bounds) - 1)))
    return out


def _lattice_box(grid: Grid, scan_shape, scan_affine, index_box) -> tuple:
    """(origin, shape): the voxels of ``grid``'s lattice (extended beyond the grid) that nearest-neighbour
    sampling can map into the scan voxels ``index_box`` (slices), plus one voxel all round."""
    low = np.array([s.start for s in index_box], float) - 0.5
    high = np.array([s.stop - 1 for s in index_box], float) + 0.5
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    to_lattice = np.linalg.inv(grid.affine) @ scan_affine
    lattice = corners @ to_lattice[:3, :3].T + to_lattice[:3, 3]
    origin = np.floor(lattice.min(axis=0)).astype(np.int64) - 1
    top = np.ceil(lattice.max(axis=0)).astype(np.int64) + 1
    return origin, tuple(int(n) for n in top - origin + 1)


def _score_before(fixed_surfaces, moving_ids: np.ndarray, moving_affine: np.ndarray, out_grid: Grid, limit: int,
                  names: dict, progress) -> dict:
    """The "before" stage: identity in world space, the moving labels placed on the fixed output grid's
    lattice beside (not inside) the fixed labels, over the box they occupy there.

    Nothing is allocated for the space between the two scans, wherever they lie in the world; a
    moving label box larger than ``limit`` voxels is not scored (NaN, with the reason in "skipped").
    """
    present = moving_ids != 0
    if not present.any():
        box = (np.zeros(3, np.int64), (1, 1, 1))
    else:
        box = _lattice_box(out_grid, moving_ids.shape, moving_affine, _bounding_box(present))
    origin, shape = box
    if math.prod(shape) > limit:
        labels = fixed_surfaces.labels.tolist()
        if progress is not None:
            progress.update(len(labels))
        report = _stage_report({k: {"dice": math.nan, "asd": math.nan, "hd95": math.nan} for k in labels}, names)
        report["skipped"] = (f"the moving labels span {'x'.join(map(str, shape))} voxels on the fixed grid, more "
                             f"than the working grid's {limit}: not scored")
        return report
    shift = np.eye(4)
    shift[:3, 3] = origin
    placed = resample(Scan(moving_ids, moving_affine), Grid(shape, out_grid.affine @ shift), order=0)
    moving = metrics.LabelSurfaces(placed, fixed_surfaces.labels, origin)
    return _stage_report(metrics.label_metrics(fixed_surfaces, moving, out_grid.spacing, progress=progress), names)


def _stage_report(per_label: dict, names: dict) -> dict:
    table = {str(k): {"name": names.get(k, str(k)), **v} for k, v in per_label.items()}

    def mean(key):
        values = [v[key] for v in per_label.values() if not math.isnan(v[key])]
        return float(np.mean(values)) if values else math.nan

    return {"labels": table, "mean_dice": mean("dice"), "mean_asd": mean("asd"), "mean_hd95": mean("hd95")}


BYTES_PER_VOXEL = 1024  # peak memory per working-grid voxel, rounded up from the bundled pair's (~900 B)


def check_memory(grid_fit: Fit, available: int | None = None) -> None:
    """Refuse, before any work, a working grid whose registration would not fit in the available memory
    (a fine --spacing or a large --size): a one-line MemoryError saying what would be needed."""
    voxels = max(math.prod(grid_fit.grid.shape), math.prod(grid_fit.original.shape))
    needed = voxels * BYTES_PER_VOXEL
    available = available_memory() if available is None else available
    if available is not None and needed > available:
        raise MemoryError(f"the working grid of {'x'.join(map(str, grid_fit.grid.shape))} voxels would need about "
                          f"{needed / 2**30:.3g} GiB, more than the {available / 2**30:.3g} GiB available: choose a "
                          f"coarser --spacing or a smaller --size")


_STARTED = set()


def _start_ops(device: torch.device, backend) -> None:
    """Call each fused op once on a tiny volume, once per process, device and backend.

    The first call of any torch.library custom op in a process imports torch._dynamo (about 1 s on a
    2-core CPU); doing it here keeps that one-time cost out of the registration's own runtime, and
    reports it apart (``timings["startup_s"]``).
    """
    from .. import gradient_magnitude, mind_loss, warp

    key = (str(device), backend)
    if key in _STARTED:
        return
    vol = torch.rand(1, 1, 8, 8, 8, device=device, requires_grad=True)
    flow = torch.zeros(1, 3, 8, 8, 8, device=device)
    (mind_loss(warp(vol, flow, backend=backend), vol.detach(), backend=backend)
     + gradient_magnitude(vol, backend=backend).mean()).backward()
    _STARTED.add(key)


def _counts(value, name: str, low: int) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"Settings: `{name}` must be a tuple of integers >= {low}, got {value!r}")
    value = tuple(value)
    if not value or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low for v in value):
        raise ValueError(f"Settings: `{name}` must be a tuple of integers >= {low}, got {value!r}")
    return value


def check_settings(settings: Settings) -> None:
    """Refuse, before any file is read, pipeline settings that cannot run (a ValueError naming the field)."""
    if not isinstance(settings, Settings):
        raise ValueError(f"`settings` must be a gradreg_fast.register.Settings, got {settings!r}")
    choices = {"fit": ("pad", "crop"), "fixed_modality": ("auto", "ct", "mr"), "moving_modality": ("auto", "ct", "mr"),
               "init": ("com", "com_scale", "none"), "affine_model": AFFINE_MODELS + ("none",),
               "affine_objective": AFFINE_OBJECTIVES, "method": ("field", "network")}
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            raise ValueError(f"Settings: `{name}` must be one of {allowed}, got {getattr(settings, name)!r}")
    for levels, iterations in (("affine_levels", "affine_iterations"), ("network_levels", "network_iterations")):
        if len(_counts(getattr(settings, levels), levels, 1)) != len(_counts(getattr(settings, iterations),
                                                                               iterations, 0)):
            raise ValueError(f"Settings: `{levels}` and `{iterations}` must have one entry per level, got "
                             f"{getattr(settings, levels)!r} and {getattr(settings, iterations)!r}")
    check_number_argument("Settings", "affine_rigidity", settings.affine_rigidity)
    if isinstance(settings.slab_margin, bool) or not isinstance(settings.slab_margin, (int, np.integer)) \
            or settings.slab_margin < 0:
        raise ValueError(f"Settings: `slab_margin` must be an integer >= 0, got {settings.slab_margin!r}")
    check_number_argument("Settings", "network_lr", settings.network_lr, allow_zero=False)
    if settings.spacing is not None:
        metrics.check_spacing(settings.spacing)
    if settings.size is not None and len(_counts(settings.size, "size", 1)) not in (1, 3):
        raise ValueError(f"Settings: `size` must be None, or one (a cube) or three voxel counts, got "
                         f"{settings.size!r}")
    if settings.method == "field":
        check_field_settings(settings.field)


def _check_label_names(label_names) -> dict:
    """{positive int id: name} from a mapping of whole-number ids (ints, numpy ints, whole floats) to names."""
    from collections.abc import Mapping

    if label_names is None:
        return {}
    if not isinstance(label_names, Mapping):
        raise ValueError(f"`label_names` must map label ids to names, like {{1: 'spleen'}}, got {label_names!r}")
    ids = metrics.label_list(list(label_names), "`label_names`' ids") if label_names else []
    if any(i <= 0 for i in ids):
        raise ValueError(f"`label_names`' ids must be positive (0 is background), got {sorted(label_names)}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"`label_names` names one id twice: {list(label_names)}")
    return {i: str(name) for i, name in zip(ids, label_names.values())}


def _read_inputs(files) -> list:
    """:func:`read_nifti` of every (path, what) in ``files`` (None for a path not given), on threads: gzip
    inflates without the GIL, and the files are independent. An error names the first failing file in the
    order given, as reading them one by one would."""
    from concurrent.futures import ThreadPoolExecutor

    def read(entry):
        path, what = entry
        return None if path is None else read_nifti(path, what)

    with ThreadPoolExecutor(max(1, min(len(files), torch.get_num_threads()))) as pool:
        return list(pool.map(read, files))


def register(fixed_path, moving_path, fixed_labels_path=None, moving_labels_path=None, settings: Settings | None = None,
             label_names: dict | None = None, device=None, backend: str | None = None, progress: bool = True) -> Result:
    """Register ``moving_path`` onto ``fixed_path`` (NIfTI files) and evaluate with the label maps if given.

    Args:
        label_names: {label id: name}; when given, only these ids are kept and scored (others are
            background), otherwise every non-zero id is scored.
        device: "auto" (default: CUDA if available), "cpu", "cuda", "cuda:1", ...
        backend: the ops' backend (see :func:`gradreg_fast.set_backend`); None: the default.
        progress: show tqdm progress bars.
    """
    from tqdm.auto import tqdm

    settings = settings or Settings()
    check_settings(settings)
    device = resolve_device(device, backend)
    label_names = _check_label_names(label_names)
    label_ids = sorted(label_names) or None
    timings = {}
    start = time.perf_counter()

    # 1. read, normalise, choose the grid
    fixed_raw, moving_raw, fixed_seg, moving_seg = _read_inputs(
        ((fixed_path, "fixed image"), (moving_path, "moving image"), (fixed_labels_path, "fixed labels"),
         (moving_labels_path, "moving labels")))
    if (fixed_seg is None) != (moving_seg is None):
        raise ValueError("give both --fixed-labels and --moving-labels, or neither")
    if fixed_seg is not None:
        check_same_space(fixed_raw, fixed_seg, "fixed labels")
        check_same_space(moving_raw, moving_seg, "moving labels")
        fixed_ids = _compact(keep_labels(fixed_seg, label_ids, "fixed labels"))  # non-integer maps fail here
        moving_ids = _compact(keep_labels(moving_seg, label_ids, "moving labels"))
        if moving_ids.dtype == np.int64:  # refused now rather than after the work, when the warped map is written
            raise ValueError(f"moving labels ({moving_labels_path}): label ids {moving_ids.min()}..{moving_ids.max()} "
                             "go beyond int32, the widest type the warped label map is written with; renumber them")
    windows = {"ct_window": settings.ct_window, "mr_percentiles": settings.mr_percentiles}
    fixed = Scan(normalize_intensity(fixed_raw.data, settings.fixed_modality, **windows), fixed_raw.affine,
                 fixed_raw.path)
    moving = Scan(normalize_intensity(moving_raw.data, settings.moving_modality, **windows), moving_raw.affine,
                  moving_raw.path)
    fixed_grid = Grid.of_scan(fixed, spacing=settings.spacing, size=settings.size)
    if min(fixed_grid.shape) < 2:  # the field's derivatives (folding, SDlogJ) need two voxels along each axis
        chosen = (f"the fixed image's {tuple(fixed.data.shape)} voxels" +
                  (f" at a spacing of {settings.spacing} mm" if settings.spacing is not None else "")
                  if settings.size is None else f"a size of {tuple(settings.size)}")
        raise ValueError(f"the output grid would be {fixed_grid.shape} voxels ({chosen}): registration needs at "
                         f"least 2 voxels along each axis; choose a finer --spacing or a larger --size")
    grid_fit = working_fit(fixed_grid, settings)
    out_grid = grid_fit.original
    check_memory(grid_fit)
    timings["load_s"] = time.perf_counter() - start

    # Scored first: it needs no registration, and a problem with the labels shows before the work starts.
    report, metrics_s = {}, 0.0
    if fixed_seg is not None:
        tick = time.perf_counter()
        scored = label_ids or sorted(({int(v) for v in np.unique(fixed_ids)} | {int(v) for v in np.unique(moving_ids)})
                                     - {0})
        fixed_labels = resample(Scan(fixed_ids, fixed_seg.affine), out_grid, order=0)
        fixed_surfaces = metrics.LabelSurfaces(fixed_labels, scored)
        with tqdm(total=len(scored), desc="metrics before", disable=not progress, leave=False) as bar:
            report["before"] = _score_before(fixed_surfaces, moving_ids, moving_seg.affine, out_grid,
                                             max(math.prod(grid_fit.grid.shape), math.prod(out_grid.shape)),
                                             label_names, bar)
        metrics_s += time.perf_counter() - tick
    tick = time.perf_counter()
    _start_ops(device, backend)
    timings["startup_s"] = time.perf_counter() - tick

    # 2. initial alignment
    tick = time.perf_counter()
    if settings.init == "none":  # check_settings has refused anything but "none", "com" and "com_scale"
        initial = np.eye(4)
    else:
        initial = moments_init(fixed, moving, scale=settings.init == "com_scale")
    timings["initial_s"] = time.perf_counter() - tick

    # 3. affine
    tick = time.perf_counter()
    pair = pair_on_grid(fixed, moving, grid_fit=grid_fit, moving_to_fixed=initial)
    grid, box = pair["grid"], pair["fixed_fov"]
    to_device = lambda t: t.unsqueeze(0).to(device)  # noqa: E731  (1, D, H, W) -> (1, 1, D, H, W)
    affine_world = initial
    if settings.affine_model != "none":
        steps = sum(settings.affine_iterations)
        with tqdm(total=steps, desc="affine", disable=not progress, leave=False) as bar:
            result = optimize_affine(to_device(pair["fixed"]), to_device(pair["moving"]), grid.spacing,
                                     settings.affine_levels, settings.affine_iterations, model=settings.affine_model,
                                     loss_box=box, progress=bar, backend=backend, objective=settings.affine_objective,
                                     rigidity=settings.affine_rigidity)
        affine_world = initial @ result.world_transform(grid)
    timings["affine_s"] = time.perf_counter() - tick

    # 4. deformable
    tick = time.perf_counter()
    # Only the moving image changes: resample it once more from its own voxels, through both transforms.
    fixed_t = to_device(pair["fixed"])
    moving_t = to_device(torch.from_numpy(np.clip(resample(moving, grid, order=1, world_transform=affine_world),
                                                  0, 1)).float().unsqueeze(0))
    objectives = []  # (start, end) of every Adam level of the field method
    if settings.method == "field":
        steps = sum(settings.field.iterations)
        with tqdm(total=steps, desc="deformable", disable=not progress, leave=False) as bar:
            field_result = optimize_field(fixed_t, moving_t, settings.field, loss_box=box, progress=bar,
                                          backend=backend)
            flow, objectives = field_result.flow, field_result.level_objectives
    else:  # "network" (check_settings has refused any other method)
        steps = sum(settings.network_iterations)
        with tqdm(total=steps, desc="network", disable=not progress, leave=False) as bar:
            flow = optimize_network(fixed_t, moving_t, checkpoint=settings.checkpoint, name=settings.network,
                                    levels=settings.network_levels, iterations=settings.network_iterations,
                                    lr=settings.network_lr, loss_box=box, progress=bar, backend=backend)
    flow = flow.detach().float().cpu()
    timings["deformable_s"] = time.perf_counter() - tick
    timings["registration_s"] = timings["initial_s"] + timings["affine_s"] + timings["deformable_s"]

    # 5. apply once on the output grid, evaluate
    tick = time.perf_counter()
    flow_out = grid_fit.to_original(flow[0].numpy(), fill="edge")
    displacement = _world_displacement(affine_world, out_grid, flow_out).astype(np.float32)
    background = float(moving_raw.data.min())
    transforms = {"before": np.eye(4), "initial": initial, "affine": affine_world, "after": affine_world}
    # Per stage, the moving scan's voxel coordinates serve its image, its original intensities (the same
    # affine) and its labels (when on exactly that affine): computed once, one stage at a time (24 bytes
    # per output voxel).
    same_affine = fixed_seg is not None and np.array_equal(moving_seg.affine, moving.affine)
    volumes = {"fixed": resample(fixed, out_grid)}
    label_maps = {}
    for stage, transform in transforms.items():
        moved = flow_out if stage == "after" else None
        coords = None if stage == "before" else _scan_coords(moving.affine, transform, out_grid, moved)
        if stage != "before":
            name = {"initial": "moving_initial", "affine": "moving_affine", "after": "warped"}[stage]
            volumes[name] = _sample(moving.data, coords, 1, 0.0)
        if stage == "after":
            volumes["warped_original"] = _sample(moving_raw.data, coords, 1, background)
        if fixed_seg is not None:
            label_coords = (coords if same_affine and coords is not None
                            else _scan_coords(moving_seg.affine, transform, out_grid, moved))
            label_maps[stage] = _sample(moving_ids, label_coords, 0, 0)
            del label_coords
        del coords
    warped_labels = None
    if fixed_seg is not None:
        warped_labels = label_maps["after"]
        metric_tick = time.perf_counter()
        # "before" was scored at the start, on the fixed lattice beyond the fixed grid where the moving
        # organs lie (before any alignment they may lie outside the fixed field of view, as in the demo).
        with tqdm(total=len(STAGES[1:]) * len(scored), desc="metrics", disable=not progress, leave=False) as bar:
            for stage in STAGES[1:]:
                moving_surfaces = metrics.LabelSurfaces(label_maps[stage], fixed_surfaces.labels)
                report[stage] = _stage_report(metrics.label_metrics(fixed_surfaces, moving_surfaces,
                                                                    out_grid.spacing, progress=bar), label_names)
        metrics_s += time.perf_counter() - metric_tick
        timings["metrics_s"] = metrics_s
    else:
        fixed_labels = None
    flow_box = flow[(slice(None), slice(None)) + box]
    regularity = metrics.regularity(flow_box)
    timings["evaluation_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - start
    summary = {
        "fixed": str(fixed_path), "moving": str(moving_path),
        "fixed_labels": None if fixed_labels_path is None else str(fixed_labels_path),
        "moving_labels": None if moving_labels_path is None else str(moving_labels_path),
        "device": str(device), "backend": backend or "default", "threads": torch.get_num_threads(),
        "grid": {"shape": list(out_grid.shape), "spacing_mm": out_grid.spacing.tolist(),
                 "affine": out_grid.affine.tolist(), "working_shape": list(grid.shape)},
        "initial_transform": initial.tolist(), "affine_transform": affine_world.tolist(),
        "stages": report, **regularity, "runtime_s": timings["registration_s"], "timings_s": timings,
        "deformable_objectives": [list(pair) for pair in objectives],
        "settings": _jsonable(asdict(settings)),
        "notes": ("stages: before = identity in world space (scored on the fixed grid's lattice extended to where "
                  "the moving labels lie), "
                  "initial = centre-of-mass alignment, affine = after the affine stage, after = affine + "
                  "deformable (scored on the fixed image's grid). ASD/HD95 in mm. Folding and SDlogJ of the "
                  "deformable field inside the fixed field of view."),
    }
    return Result(grid=grid, fit=grid_fit, initial=initial, affine=affine_world, flow=flow,
                  displacement_mm=displacement, fixed_labels=fixed_labels, warped_labels=warped_labels,
                  label_maps=label_maps, metrics=summary, timings=timings, **volumes)


def _jsonable(value):
    """NaN/inf -> None and tuples -> lists, so that metrics.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def _compact(labels: np.ndarray) -> np.ndarray:
    """Label ids in the smallest integer type that holds them (less memory to resample and score)."""
    return labels.astype(_label_dtype(labels), copy=False)


def _label_dtype(labels: np.ndarray):
    """The smallest common NIfTI integer type that holds every label id."""
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def output_paths(out_dir, with_labels: bool) -> dict:
    names = [n for n in OUTPUT_FILES if with_labels or n != "warped_labels.nii.gz"]
    return {name: Path(out_dir) / name for name in names}


def check_outputs(out_dir, inputs, with_labels: bool, force: bool) -> dict:
    """The output paths; refuses outputs that are inputs, that exist without ``force``, or a folder that
    an interrupted run left mid-change (without ``force``) or that cannot be written to."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output directory {out_dir} exists and is not a directory")
    if (out_dir / INCOMPLETE_MARKER).exists() and not force:
        raise FileExistsError(f"output directory {out_dir} holds the files of an interrupted run "
                              f"({INCOMPLETE_MARKER}); use --force (force=True) to replace them")
    paths = output_paths(out_dir, with_labels)
    for path in paths.values():
        check_output_path(path, inputs, force)
    check_writable_dir(out_dir)
    return paths


def previous_outputs(out_dir) -> set:
    """Names of the files that earlier runs of the package wrote into ``out_dir`` (and only those): the
    files its metrics.json names, those an interrupted run's marker names, and for a metrics.json of a
    version without a manifest, the package's own file names."""
    out_dir = Path(out_dir)
    names = set()
    for manifest, keys in ((out_dir / INCOMPLETE_MARKER, ("previous", "new")), (out_dir / "metrics.json", None)):
        try:
            content = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(content, dict):
            continue
        if keys is not None:
            names |= {n for key in keys for n in content.get(key, ()) if n in OUTPUT_FILES}
        elif isinstance(content.get("files"), dict):
            names |= {n for n in content["files"] if n in OUTPUT_FILES} | {"metrics.json"}
        elif "stages" in content and "settings" in content:  # written before metrics.json named its files
            names |= set(OUTPUT_FILES)
    return names


def write_json(path, payload) -> Path:
    """Strict JSON, written atomically."""
    path = Path(path)
    atomic_write(path, lambda f: f.write(_json_bytes(payload)))
    return path


def _json_bytes(payload) -> bytes:
    return (json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n").encode()


def save_result(result: Result, out_dir, inputs=(), force: bool = False, figure: bool = True) -> dict:
    """Write warped.nii.gz, warped_labels.nii.gz (with labels), flow.nii.gz, overview.png and metrics.json
    as one set (see :class:`gradreg_fast._atomic.FileSet`): metrics.json comes last and names every
    file of the run with its SHA-256 (``"files"``); with ``force`` the files of an earlier run in the
    folder are replaced as a whole, and those the new run does not write are removed. Other files in
    the folder are never touched, nor are the registration's own input files (those ``result.metrics``
    names) or any of ``inputs``, with or without ``force``. Returns {name: path}."""
    recorded = (result.metrics.get(key) for key in ("fixed", "moving", "fixed_labels", "moving_labels"))
    inputs = tuple(inputs) + tuple(path for path in recorded if path)
    paths = check_outputs(out_dir, inputs, result.warped_labels is not None, force)
    out_dir = Path(out_dir)
    files = FileSet(out_dir, previous=previous_outputs(out_dir), protect=inputs)
    if force:
        files.remove_stale_temporaries(OUTPUT_FILES)
    grid = result.fit.original
    try:
        write_nifti(files.stage("warped.nii.gz"), result.warped_original.astype(np.float32), grid.affine,
                    inputs=inputs, force=True, description="gradreg: moving warped onto fixed")
        if result.warped_labels is not None:
            labels = result.warped_labels
            write_nifti(files.stage("warped_labels.nii.gz"), labels, grid.affine, dtype=_label_dtype(labels),
                        inputs=inputs, force=True, description="gradreg: moving labels warped (nearest)")
        write_displacement(files.stage("flow.nii.gz"), result.displacement_mm, grid, inputs=inputs, force=True)
        if figure:
            from ..viz import overview

            names = {int(k): v["name"] for k, v in result.metrics["stages"].get("after", {}).get("labels", {}).items()}
            overview(files.stage("overview.png"), result.fixed, result.moving_initial, result.warped, grid,
                     fixed_labels=result.fixed_labels, warped_labels=result.warped_labels, label_names=names)
    except BaseException:
        files.discard()
        raise
    written = files.commit("metrics.json", lambda checksums: _json_bytes({**result.metrics, "files": checksums}))
    return {name: written[name] for name in paths if name in written}
