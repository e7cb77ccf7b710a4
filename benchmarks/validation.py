"""The validation set on which the registration defaults are chosen: real scans with a known answer.

Same-subject cases (:data:`SAME_SUBJECT`), built from the bundled real scans
(gradreg_fast/data/abdomen, TotalSegmentator reference images):

* the *fixed* image is the base scan (MR or CT) deformed by a known random smooth field ``u`` (world mm);
  for a CT base it is also given an MR-like contrast by a non-monotonic intensity remap;
* the *moving* image is the base scan in its own geometry, given a CT-like contrast by a non-monotonic
  remap when the base is the MR, and a small rigid offset ``O`` in its NIfTI header (the voxels are not
  touched).

So every case plays a CT (moving) against an MR-like fixed image, as the pipeline expects, and the true
map from a fixed world point x to the moving world is ``O(x + u(x))``. The labels travel the same way
(nearest neighbour). Measures: endpoint error (mm) of the registration's world displacement against
the truth, over the fixed body mask and over the organs, and organ Dice of the warped labels.

Inter-subject cases (:data:`INTER_SUBJECT`; Dice only, no known answer): three real people, A (the bundled
CT), B (the bundled MR) and C (a third CT, TotalSegmentator's DICOM example, benchmarks/data/ts_dicom_ct). Each
registers one person's CT to another person's MR (B), or to another person's CT given an MR-like contrast by the
same kind of non-monotonic remap, or B's MR given a CT-like contrast to C's CT given an MR-like one. Four pairs
(C to B, C to A, A to C, B to C), three cases each: the replicates start from another position (a random rigid
offset in the moving header: up to 4 degrees about and 8 mm along each axis) and, where a side is remapped, with
another contrast, since one registration between two people swings with the affine stage's outcome. Only the organs both label maps hold are scored (C's 40 mm slab holds the spleen and
the liver). None of them is the bundled pair (A's CT to B's MR), which the package reports.

The bundled inter-subject CT/MR pair is the last case (``bundled``): Dice only, no known answer. It is reported,
never used to choose defaults (:data:`CHOOSING` names the cases that choose them).

Usage (also imported by bench_peers.py and the tests):

    python benchmarks/validation.py [--cases c0,c1,...] [--extra N] [--compare '{"alpha": 0}'] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ORGANS = {1: "spleen", 2: "right kidney", 3: "left kidney", 5: "liver"}
CASE_DIR = ROOT / "benchmarks" / ".cases"  # generated, git-ignored


@dataclass(frozen=True)
class CaseSpec:
    name: str
    base: str  # "mr" or "ct": the bundled scan the case is built from
    seed: int
    amplitude_mm: float  # the largest displacement of the known deformation
    smoothness_mm: float  # Gaussian width of the deformation (its spatial scale)


SAME_SUBJECT = (
    CaseSpec("mr-a", "mr", 11, 10.0, 18.0),
    CaseSpec("ct-a", "ct", 12, 10.0, 18.0),
    CaseSpec("mr-b", "mr", 13, 12.5, 15.0),
    CaseSpec("ct-b", "ct", 14, 12.5, 15.0),
    CaseSpec("mr-c", "mr", 15, 15.0, 22.0),
    CaseSpec("ct-c", "ct", 16, 15.0, 22.0),
)


@dataclass(frozen=True)
class InterSpec:
    name: str
    moving_subject: str  # subject_scan key: "ct-a", "ct-c", or "mr-b" (then given a CT-like contrast)
    fixed_subject: str  # "mr-b" (the bundled MR) or a CT ("ct-a", "ct-c") given an MR-like contrast
    seed: int  # of the contrast remaps, their noise and the offset
    offset: bool = False  # a random rigid offset in the moving scan's header (up to 4 degrees and 8 mm per axis)


INTER_SUBJECT = (
    InterSpec("inter-cb", "ct-c", "mr-b", 21),
    InterSpec("inter-ca", "ct-c", "ct-a", 22),
    InterSpec("inter-ac", "ct-a", "ct-c", 23),
    # Sweep 12: the three pairs again from other starting positions (a rigid offset in the moving header) and,
    # where a side is remapped, other contrasts; and the bundled MR given a CT-like contrast against the third
    # subject. The single cases above
    # swing with the affine stage's outcome (inter-ac 0.40-0.81 in sweep 10); replicates average that out.
    InterSpec("inter-cb-2", "ct-c", "mr-b", 31, offset=True),
    InterSpec("inter-cb-3", "ct-c", "mr-b", 32, offset=True),
    InterSpec("inter-ca-2", "ct-c", "ct-a", 33, offset=True),
    InterSpec("inter-ca-3", "ct-c", "ct-a", 34, offset=True),
    InterSpec("inter-ac-2", "ct-a", "ct-c", 35, offset=True),
    InterSpec("inter-ac-3", "ct-a", "ct-c", 36, offset=True),
    InterSpec("inter-bc", "mr-b", "ct-c", 37),
    InterSpec("inter-bc-2", "mr-b", "ct-c", 38, offset=True),
    InterSpec("inter-bc-3", "mr-b", "ct-c", 39, offset=True),
)

# The bundled pair itself from other starting positions: a random rigid offset (up to 4 degrees and 8 mm per axis) in
# the CT's header, as the offset inter-subject cases have. Never choosing (they are the reported case): they say how
# much of the pair's one Dice figure is its starting position (benchmarks/pair_starts.py).
PAIR_STARTS = tuple(InterSpec(f"bundled-s{i}", "ct-a", "mr-b", 200 + i, offset=True) for i in range(1, 11))

# Held out (2026-12-01, after the defaults were fixed): the same recipes with seeds that no sweep, ablation or test ran,
# never used to choose anything. bench_peers.py --held-out compares gradreg with the peers on them, out of the sample
# that chose gradreg's defaults (the peers run at their own defaults everywhere). They draw new deformations, contrasts
# and starting positions from the same scans and people as the choosing cases: not new subjects.
HELD_OUT_SAME = tuple(CaseSpec(f"{base}-h{i}", base, 300 + i, 10.0 + i, 15.0 + 1.4 * i)
                      for i, base in enumerate(("mr", "ct", "mr", "ct", "mr", "ct"), start=1))
HELD_OUT_INTER = tuple(InterSpec(f"{pair.name}-h{i}", pair.moving_subject, pair.fixed_subject, 400 + 2 * k + i,
                                 offset=True)
                       for k, pair in enumerate(spec for spec in INTER_SUBJECT if not spec.offset)  # the four pairs
                       for i in (1, 2))
HELD_OUT = tuple(spec.name for spec in HELD_OUT_SAME + HELD_OUT_INTER)

# The cases that choose the defaults (benchmarks/sweep.py, column "mean of choosing": (2 x the same-subject
# mean + the inter-subject mean) / 3, which is the plain mean of sweep 10's nine cases): every validation case
# but the bundled pair.
CHOOSING = tuple(spec.name for spec in SAME_SUBJECT + INTER_SUBJECT)
SAME_NAMES = frozenset(spec.name for spec in SAME_SUBJECT)
INTER_NAMES = frozenset(spec.name for spec in INTER_SUBJECT)


def choosing_mean(dice: dict) -> float:
    """The figure the defaults are chosen by, from {case name: Dice} of choosing cases: (2 x the mean of the
    same-subject cases + the mean of the inter-subject cases) / 3, or the mean of the one group present. With
    six same-subject and three inter-subject cases (sweeps 10 and 11) it is their plain mean; the weights stay
    when the inter-subject group grows (sweep 12)."""
    unknown = sorted(set(dice) - SAME_NAMES - INTER_NAMES)
    if unknown or not dice:
        raise ValueError(f"choosing_mean takes the Dice of choosing cases only, got {sorted(dice)}")
    same = [v for n, v in dice.items() if n in SAME_NAMES]
    inter = [v for n, v in dice.items() if n in INTER_NAMES]
    if same and inter:
        return float((2.0 * np.mean(same) + np.mean(inter)) / 3.0)
    return float(np.mean(same or inter))


def extra_cases(count: int) -> tuple:
    """More same-subject cases of the same recipe with other seeds: for ablations that need more pairs
    than the six that chose the defaults (never used to choose them)."""
    return tuple(CaseSpec(f"{'mr' if i % 2 == 0 else 'ct'}-x{i}", "mr" if i % 2 == 0 else "ct", 100 + i,
                          10.0 + 5.0 * ((i * 7) % 11) / 10.0, 15.0 + 7.0 * ((i * 3) % 5) / 4.0)
                 for i in range(count))


def data_dir() -> Path:
    from gradreg_fast.cli import demo_data_dir

    return demo_data_dir()


def bundled_files() -> dict:
    folder = data_dir()
    return {"fixed": folder / "mr.nii.gz", "moving": folder / "ct.nii.gz",
            "fixed_labels": folder / "mr_labels.nii.gz", "moving_labels": folder / "ct_labels.nii.gz",
            "truth": None, "organs": ORGANS}


THIRD_SUBJECT = ROOT / "benchmarks" / "data" / "ts_dicom_ct"


def subject_scan(key: str) -> tuple:
    """(scan, labels) paths of a subject's scan: "ct-a", "mr-b" (the bundled pair) or "ct-c" (the third subject)."""
    if key == "ct-c":
        return THIRD_SUBJECT / "ct.nii.gz", THIRD_SUBJECT / "ct_labels.nii.gz"
    name = {"ct-a": "ct", "mr-b": "mr"}[key]
    return data_dir() / f"{name}.nii.gz", data_dir() / f"{name}_labels.nii.gz"


def _remap(t: np.ndarray, rng, low: float, high: float, keep_air: float) -> np.ndarray:
    """A non-monotonic piecewise-linear intensity map of t in [0, 1] onto [low, high].

    Air (t near 0) keeps the value ``keep_air`` so that both scans still show the same body outline; the
    tissue range gets random levels, with at least one reversal so that no monotonic map relates them.
    """
    knots = np.array([0.0, 0.03, 0.1, 0.3, 0.5, 0.7, 1.0])
    while True:
        levels = rng.uniform(low + 0.15 * (high - low), high, size=len(knots) - 2)
        if np.any(np.diff(levels) < -0.15 * (high - low)):
            break
    values = np.concatenate([[keep_air, keep_air], levels])
    return np.interp(t, knots, values)


def _mr_like_from_ct(hounsfield: np.ndarray, rng) -> np.ndarray:
    """An MR-like contrast for a CT (HU): a random non-monotonic remap of its normalised values onto 0..900,
    air (HU <= -500) at 0, plus a little noise, clipped at 0."""
    from gradreg_fast.io import normalize_intensity

    mr_like = _remap(normalize_intensity(hounsfield, "ct").astype(np.float64), rng, 0.0, 900.0, keep_air=0.0)
    mr_like[hounsfield <= -500] = 0.0
    return np.clip(mr_like + rng.normal(0, 6.0, hounsfield.shape), 0, None)


def _ct_like_from_mr(data: np.ndarray, rng) -> np.ndarray:
    """A CT-like contrast for an MR: a random non-monotonic remap of its normalised values onto -180..280 HU, air at
    -1000, plus a little noise."""
    from gradreg_fast.io import normalize_intensity

    t = normalize_intensity(data, "mr").astype(np.float64)
    return _remap(t, rng, -180.0, 280.0, keep_air=-1000.0) + rng.normal(0, 8.0, data.shape)


def _smooth_field(shape, spacing, spec: CaseSpec, rng) -> np.ndarray:
    """(3, *shape) smooth random displacement in world mm along the grid axes, max norm = the amplitude,
    scaled down until x -> x + u(x) keeps det J >= 0.5 (invertible, no folding)."""
    from scipy import ndimage

    sigma = [spec.smoothness_mm / s for s in spacing]
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect") for _ in range(3)])
    field *= spec.amplitude_mm / np.sqrt((field ** 2).sum(0)).max()
    while True:
        grads = [np.gradient(field[a], *spacing) for a in range(3)]
        jac = np.array([[grads[a][b] + (a == b) for b in range(3)] for a in range(3)])
        det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
        if det.min() >= 0.5:
            return field
        field *= 0.9


def _rigid(rng, affine: np.ndarray, shape, degrees: float = 4.0, shift_mm: float = 8.0) -> np.ndarray:
    """A random rigid world transform about the centre of a scan (``affine``, ``shape``): a rotation of up to
    ``degrees`` about each axis, then a shift of up to ``shift_mm`` along each."""
    from scipy.spatial.transform import Rotation

    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    rotation = Rotation.from_rotvec(np.deg2rad(rng.uniform(-degrees, degrees, 3))).as_matrix()
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre - rotation @ centre + rng.uniform(-shift_mm, shift_mm, 3)
    return out


# Bumped whenever a case's recipe changes (the remaps, the deformation, the offset): files written by another recipe,
# spec or base scan are written again rather than reused (see _reusable).
RECIPE = 2


def _stamp(spec, bases) -> str:
    """What a case's files are made from: the recipe, the spec's fields and the base files' sizes."""
    from dataclasses import asdict

    return json.dumps({"recipe": RECIPE, "spec": asdict(spec),
                       "bases": {Path(p).name: Path(p).stat().st_size for p in bases}}, sort_keys=True)


def _reusable(folder: Path, written, stamp: str) -> bool:
    """Whether every file of a case is there and was made by this recipe from this spec (its spec.json)."""
    record = folder / "spec.json"
    return all(Path(p).exists() for p in written) and record.exists() and record.read_text() == stamp


def _record(folder: Path, stamp: str) -> None:
    """Write spec.json last and atomically: a run killed before it leaves files that the next run writes again."""
    tmp = folder / f".spec.json.{os.getpid()}.tmp"
    tmp.write_text(stamp)
    os.replace(tmp, folder / "spec.json")


def make_case(spec: CaseSpec, out_dir: Path = CASE_DIR) -> dict:
    """Write the case's NIfTI files and its truth (once; later calls reuse them while the recipe, the spec and the
    base scans stay the same) and return their paths."""
    from scipy import ndimage

    from gradreg_fast.io import read_nifti, write_nifti

    folder = Path(out_dir) / spec.name
    files = {"fixed": folder / "fixed.nii.gz", "moving": folder / "moving.nii.gz",
             "fixed_labels": folder / "fixed_labels.nii.gz", "moving_labels": folder / "moving_labels.nii.gz",
             "truth": folder / "truth.npz"}
    src = data_dir()
    stamp = _stamp(spec, [src / f"{spec.base}.nii.gz", src / f"{spec.base}_labels.nii.gz"])
    if _reusable(folder, files.values(), stamp):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    scan = read_nifti(src / f"{spec.base}.nii.gz", "base scan")
    labels = read_nifti(src / f"{spec.base}_labels.nii.gz", "base labels")
    data, affine = np.asarray(scan.data, dtype=np.float64), scan.affine
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    shape = data.shape

    u_axes = _smooth_field(shape, spacing, spec, rng)  # mm along the voxel axes
    u_voxels = u_axes / spacing.reshape(3, 1, 1, 1)
    coords = np.indices(shape, dtype=np.float64) + u_voxels
    direction = affine[:3, :3] / spacing  # unit grid axes in world
    u_world = np.einsum("ij,j...->i...", direction, u_axes)

    if spec.base == "mr":
        fixed_data = ndimage.map_coordinates(data, coords, order=1, mode="nearest")
        moving_data = _ct_like_from_mr(data, rng)
    else:
        fixed_data = ndimage.map_coordinates(_mr_like_from_ct(data, rng), coords, order=1, mode="nearest")
        moving_data = data
    fixed_labels = ndimage.map_coordinates(np.asarray(labels.data), coords, order=0, mode="nearest")

    offset = _rigid(rng, affine, shape)
    points = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(shape, dtype=np.float64)) \
        + affine[:3, 3].reshape(3, 1, 1, 1)
    deformed = points + u_world
    truth = np.einsum("ij,j...->i...", offset[:3, :3], deformed) + offset[:3, 3].reshape(3, 1, 1, 1) - points

    # Atomic writes (gradreg_fast.io.write_nifti): a killed or concurrent run never leaves or reads a half file.
    write_nifti(files["fixed"], fixed_data, affine, np.float32, force=True)
    write_nifti(files["fixed_labels"], fixed_labels, affine, np.uint8, force=True)
    write_nifti(files["moving"], moving_data, offset @ affine, np.float32, force=True)
    write_nifti(files["moving_labels"], labels.data, offset @ affine, np.uint8, force=True)
    np.savez_compressed(files["truth"], displacement_mm=np.moveaxis(truth, 0, -1).astype(np.float32),
                        max_mm=float(np.sqrt((u_world ** 2).sum(0)).max()))
    _record(folder, stamp)
    return files


def make_inter_case(spec: InterSpec, out_dir: Path = CASE_DIR) -> dict:
    """The files of an inter-subject case (written to ``out_dir`` where anything changes, once while the recipe,
    the spec and the base scans stay the same). Fixed: an MR as it
    is, or a CT given an MR-like contrast. Moving: a CT as it is, or an MR given a CT-like contrast; with
    ``offset``, a random rigid offset in its header and its labels' (the voxels untouched). Scored organs: those of
    :data:`ORGANS` present in both label maps."""
    import nibabel as nib

    from gradreg_fast.io import read_nifti, write_nifti

    moving, moving_labels = subject_scan(spec.moving_subject)
    fixed, fixed_labels = subject_scan(spec.fixed_subject)
    present = [set(np.unique(np.asarray(nib.load(str(path)).dataobj))) for path in (moving_labels, fixed_labels)]
    organs = {k: v for k, v in ORGANS.items() if k in present[0] and k in present[1]}
    if not organs:
        raise ValueError(f"case {spec.name}: no organ of {sorted(ORGANS)} is in both label maps")
    files = {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels,
             "truth": None, "organs": organs}
    folder = Path(out_dir) / spec.name
    if spec.fixed_subject.startswith("ct"):
        files["fixed"] = folder / "fixed.nii.gz"
    if spec.moving_subject.startswith("mr") or spec.offset:
        files["moving"] = folder / "moving.nii.gz"
    if spec.offset:
        files["moving_labels"] = folder / "moving_labels.nii.gz"
    written = [files[k] for k in ("fixed", "moving", "moving_labels") if Path(files[k]).parent == folder]
    if not written:
        return files
    stamp = _stamp(spec, [moving, moving_labels, fixed])
    if _reusable(folder, written, stamp):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    if spec.fixed_subject.startswith("ct"):
        scan = read_nifti(fixed, "base scan")
        write_nifti(files["fixed"], _mr_like_from_ct(np.asarray(scan.data, dtype=np.float64),
                                                     np.random.default_rng(spec.seed)), scan.affine, np.float32,
                    force=True)
    if files["moving"] != moving:
        rng = np.random.default_rng(spec.seed + 10_000)  # not the fixed side's stream
        scan, labels = read_nifti(moving, "base scan"), read_nifti(moving_labels, "base labels")
        data, affine = np.asarray(scan.data, dtype=np.float64), scan.affine
        if spec.moving_subject.startswith("mr"):
            data = _ct_like_from_mr(data, rng)
        if spec.offset:
            affine = _rigid(rng, affine, data.shape) @ affine
        write_nifti(files["moving"], data, affine, np.float32 if spec.moving_subject.startswith("mr") else np.int16,
                    force=True)
        if spec.offset:
            write_nifti(files["moving_labels"], labels.data, affine, np.uint8, force=True)
    _record(folder, stamp)
    return files


def all_cases(names=None, extra: int = 0) -> dict:
    """{name: files} for the same-subject cases, the inter-subject cases and ``bundled`` (all when ``names`` is
    None), plus ``extra`` cases of :func:`extra_cases` when asked for by name or when ``names`` is None, and the
    pair's other starts (:data:`PAIR_STARTS`) and the held-out cases (:data:`HELD_OUT`) only when asked for by
    name."""
    default = {spec.name: spec for spec in SAME_SUBJECT + INTER_SUBJECT + extra_cases(extra)}
    cases = {**default, **{spec.name: spec for spec in PAIR_STARTS + HELD_OUT_SAME + HELD_OUT_INTER}}
    chosen = list(default) + ["bundled"] if names is None else list(names)
    out = {}
    for name in chosen:
        if name == "bundled":
            out[name] = bundled_files()
        elif name in cases:
            spec = cases[name]
            out[name] = make_inter_case(spec) if isinstance(spec, InterSpec) else make_case(spec)
        else:
            raise ValueError(f"unknown case {name!r}; choose from {list(cases) + ['bundled']}")
    return out


def endpoint_error(displacement_mm: np.ndarray, files: dict, fixed_labels: np.ndarray | None) -> dict:
    """Mean / 95th-percentile endpoint error (mm) against the case's truth, over the fixed body mask and
    over the organs. ``displacement_mm`` is (d, h, w, 3) on the fixed image's grid (register()'s)."""
    from gradreg_fast.io import normalize_intensity, read_nifti
    from gradreg_fast.register.affine import body_mask

    if files.get("truth") is None:
        return {}
    truth = np.load(files["truth"])["displacement_mm"]
    if truth.shape != displacement_mm.shape:
        raise ValueError(f"truth {truth.shape} and displacement {displacement_mm.shape} are not on one grid")
    error = np.sqrt(((displacement_mm - truth) ** 2).sum(-1))
    fixed = read_nifti(files["fixed"], "fixed image")
    body = body_mask(normalize_intensity(fixed.data, "auto"), fixed.affine)
    out = {"epe_body_mm": float(error[body].mean()), "epe95_body_mm": float(np.percentile(error[body], 95)),
           "truth_max_mm": float(np.load(files["truth"])["max_mm"])}
    if fixed_labels is not None:
        organs = np.isin(fixed_labels, list(ORGANS))
        if organs.any():
            out["epe_organs_mm"] = float(error[organs].mean())
    return out


def run_gradreg(files: dict, settings=None, progress: bool = False) -> dict:
    """register() on one case: Dice per stage, endpoint errors, regularity and runtimes."""
    from gradreg_fast.register import register

    result = register(files["fixed"], files["moving"], files["fixed_labels"], files["moving_labels"], settings,
                      label_names=files.get("organs", ORGANS), device="cpu", progress=progress)
    stages = result.metrics["stages"]
    return {
        "dice_initial": stages["initial"]["mean_dice"], "dice_affine": stages["affine"]["mean_dice"],
        "dice": stages["after"]["mean_dice"],
        **endpoint_error(result.displacement_mm, files, result.fixed_labels),
        "folding_percent": result.metrics["folding_percent"], "sd_log_jacobian": result.metrics["sd_log_jacobian"],
        "core_s": result.timings["registration_s"], "deformable_s": result.timings["deformable_s"],
        "wall_s": result.timings["total_s"],
    }


def summarize(rows: dict) -> str:
    keys = ("dice_initial", "dice_affine", "dice", "epe_body_mm", "epe_organs_mm", "folding_percent",
            "sd_log_jacobian", "core_s")
    lines = ["| case | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[k]:.3f}" if isinstance(row.get(k), float) and math.isfinite(row[k]) else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_with(overrides: dict):
    """The pipeline's default Settings with FieldSettings fields (or ``affine_model``, ``affine_iterations``,
    ``affine_objective``, ``affine_rigidity``, ``init``, ``ct_window``, ``mr_percentiles``) overridden."""
    from gradreg_fast.register import Settings

    settings = Settings()
    for key, value in overrides.items():
        if key == "affine_model":
            settings.affine_model = value
        elif key in ("affine_iterations", "ct_window", "mr_percentiles"):
            setattr(settings, key, tuple(value))
        elif key in ("affine_objective", "affine_rigidity", "init", "slab_margin"):
            setattr(settings, key, value)
        else:
            setattr(settings.field, key, tuple(value) if isinstance(value, list) else value)
    return settings


def paired(rows_a: dict, rows_b: dict, key: str) -> str:
    """Per-case differences b - a of ``key``: mean, standard error, and how many cases went each way."""
    diffs = np.array([rows_b[n][key] - rows_a[n][key] for n in rows_a if key in rows_a[n] and key in rows_b[n]])
    if len(diffs) == 0:
        return f"{key}: no cases"
    error = diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return (f"{key}: mean difference {diffs.mean():+.4f} (standard error {error:.4f}, {len(diffs)} cases; "
            f"{int((diffs > 0).sum())} up, {int((diffs < 0).sum())} down)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--extra", type=int, default=0, help="add this many extra same-subject cases (other seeds)")
    parser.add_argument("--compare", default=None,
                        help='JSON of FieldSettings overrides (e.g. \'{"alpha": 0}\'): run the defaults and the '
                             'overrides on every case and report the paired differences')
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = all_cases(args.cases.split(",") if args.cases else None, args.extra)
    variants = {"defaults": {}}
    if args.compare:
        variants[args.compare] = json.loads(args.compare)
    results = {}
    for label, overrides in variants.items():
        rows = results[label] = {}
        for name, files in cases.items():
            tick = time.perf_counter()
            rows[name] = run_gradreg(files, settings_with(overrides))
            print(f"[{label}] {name}: {json.dumps(rows[name])}  ({time.perf_counter() - tick:.1f} s)", flush=True)
        print(f"[{label}]")
        print(summarize(rows))
    if args.compare:
        base, other = results["defaults"], results[args.compare]
        same = [n for n in base if n != "bundled" and n not in INTER_NAMES]
        inter = [n for n in base if n in INTER_NAMES]
        for key in ("dice", "epe_body_mm", "sd_log_jacobian"):
            print(f"{args.compare} minus defaults, same-subject cases: "
                  + paired({n: base[n] for n in same}, {n: other[n] for n in same}, key))
        if inter:
            for key in ("dice", "sd_log_jacobian"):
                print(f"{args.compare} minus defaults, inter-subject cases: "
                      + paired({n: base[n] for n in inter}, {n: other[n] for n in inter}, key))
        if "bundled" in base:
            print(f"{args.compare} minus defaults, bundled pair: dice {other['bundled']['dice'] - base['bundled']['dice']:+.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
