"""gradreg against ConvexAdam, ANTs SyN and elastix on every validation case, in one run, on one machine.

Cases: the six same-subject cases of benchmarks/validation.py (known deformation: endpoint error), its
twelve inter-subject cases and the bundled inter-subject CT/MR pair; with ``--held-out``, its fourteen held-out
cases instead (six same-subject, eight inter-subject: drawn like the others, never used to choose anything). Every method starts from the same place,
the centre-of-mass alignment of the body masks (:func:`gradreg_fast.body.moments_init`) on gradreg's working grid:

* gradreg: ``register()`` on the NIfTI files, its defaults (centre of mass, affine, deformable), and with
  ``--presets default,quick`` also its ``--quick`` preset;
* ConvexAdam: the ``convexadam`` package (PyPI; ``convex_adam_pt`` with its own defaults: MIND-SSC r=1 d=2,
  6-voxel grid, search half-width 4, lambda 1.25, 80 Adam steps on a 2-voxel grid, inverse consistency)
  on the two images after the centre-of-mass alignment, float32 on the CPU;
* ANTs SyN: ``antspyx`` (its own venv: it pins old numpy/scipy) with ``type_of_transform="SyN"`` (its
  affine stage, then SyN), Mattes mutual information, iterations 100/70/50, on the same images;
* elastix: ``itk-elastix`` (its own venv, like ANTs) with its default "affine" then "bspline" parameter maps
  (advanced Mattes mutual information, four resolutions, a B-spline grid of 10 mm at the finest), on the same
  images: the B-spline registration the issue measured on the pair.

Scoring is the same for all: each method's map from the fixed image's grid to the moving world is
composed with the centre-of-mass transform, the moving labels are sampled there (nearest) and scored with
:mod:`gradreg_fast.metrics` against the fixed labels (organs 1 spleen, 2 right kidney, 3 left kidney,
5 liver; on the inter-subject cases those both label maps hold: spleen and liver); the endpoint error
against the known answer over the fixed body mask; folding (% of voxels with det J <= 0) and SDlogJ of the deformable field inside the fixed field of view. Runtimes: *core* is
the registration alone (images in memory), *wall* the whole case (reading, registration, scoring).

Usage::

    pip install ".[peers]"                                   # convexadam
    python -m venv /tmp/ants-env && /tmp/ants-env/bin/pip install antspyx nibabel
    python -m venv /tmp/elastix-env && /tmp/elastix-env/bin/pip install itk-elastix nibabel
    python benchmarks/bench_peers.py --ants-python /tmp/ants-env/bin/python \
        --elastix-python /tmp/elastix-env/bin/python [--cases ...] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import validation  # noqa: E402

ANTS_SCRIPT = r"""
import json, sys, time
import numpy as np
import ants
fixed = ants.image_read(sys.argv[1]); moving = ants.image_read(sys.argv[2])
tick = time.perf_counter()
reg = ants.registration(fixed, moving, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes",
                        reg_iterations=(100, 70, 50), random_seed=1)
core = time.perf_counter() - tick
composed = ants.apply_transforms(fixed, moving, transformlist=reg["fwdtransforms"], compose=sys.argv[3] + "_")
field = ants.image_read(composed).numpy()  # (X, Y, Z, 3) physical (LPS) displacement
matrix = np.asarray(fixed.direction) * np.asarray(fixed.spacing)[None, :]
voxels = np.einsum("ij,...j->...i", np.linalg.inv(matrix), field)
np.save(sys.argv[3] + ".npy", np.moveaxis(voxels, -1, 0).astype(np.float32))
print(json.dumps({"core_s": core}))
"""

# The same output as ANTS_SCRIPT's: a (3, X, Y, Z) voxel displacement from the fixed grid into the moving image.
# ITK arrays are (Z, Y, X) with components along (x, y, z); the field is physical (LPS), as ANTs' is.
ELASTIX_SCRIPT = r"""
import json, sys, time
import numpy as np
import itk
fixed = itk.imread(sys.argv[1], itk.F); moving = itk.imread(sys.argv[2], itk.F)
itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(sys.argv[4]))  # its number_of_threads argument crashes
parameters = itk.ParameterObject.New()
parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
tick = time.perf_counter()
_, transform = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
core = time.perf_counter() - tick
field = itk.array_from_image(itk.transformix_deformation_field(moving, transform)).astype(np.float64)
matrix = np.asarray(fixed.GetDirection()) * np.asarray(fixed.GetSpacing())[None, :]
voxels = np.einsum("ij,...j->...i", np.linalg.inv(matrix), field)  # (Z, Y, X, 3), components along (x, y, z)
np.save(sys.argv[3] + ".npy", np.ascontiguousarray(voxels.transpose(3, 2, 1, 0)).astype(np.float32))
print(json.dumps({"core_s": core}))
"""


PEER_GRIDS = ("working", "native")  # --peer-grid


def prepare(files: dict, peer_grid: str = "working") -> dict:
    """Both images on one grid after the centre-of-mass alignment, as every peer gets them.

    ``peer_grid`` "working" is gradreg's working grid (``register.pipeline.working_fit``: the fixed grid
    padded by at least a voxel on each side of its thinnest axis and to multiples of 4, which hands every method
    the moving content just beyond a thin slab); "native" is the fixed image's own grid."""
    from gradreg_fast.body import moments_init
    from gradreg_fast.io import Grid, Scan, normalize_intensity, pair_on_grid, read_nifti
    from gradreg_fast.register.pipeline import Settings, working_fit

    fixed_raw, moving_raw = read_nifti(files["fixed"], "fixed"), read_nifti(files["moving"], "moving")
    fixed = Scan(normalize_intensity(fixed_raw.data, "auto"), fixed_raw.affine, fixed_raw.path)
    moving = Scan(normalize_intensity(moving_raw.data, "auto"), moving_raw.affine, moving_raw.path)
    tick = time.perf_counter()
    initial = moments_init(fixed, moving)
    init_s = time.perf_counter() - tick
    fixed_grid = Grid.of_scan(fixed)
    grid_fit = working_fit(fixed_grid, Settings()) if peer_grid == "working" else fixed_grid.fit(1, "pad")
    pair = pair_on_grid(fixed, moving, grid_fit=grid_fit, moving_to_fixed=initial)
    return {"fixed": pair["fixed"][0].numpy(), "moving": pair["moving"][0].numpy(), "box": pair["fixed_fov"],
            "grid_fit": grid_fit, "initial": initial, "init_s": init_s,
            "fixed_labels": read_nifti(files["fixed_labels"], "fixed labels"),
            "moving_labels": read_nifti(files["moving_labels"], "moving labels")}


def score(prep: dict, flow: np.ndarray, files: dict) -> dict:
    """Dice, endpoint error and regularity of a voxel flow (3, D, H, W) on the working grid (after the
    centre-of-mass alignment), composed and sampled as gradreg's pipeline does it."""
    import torch

    from gradreg_fast import metrics
    from gradreg_fast.io import keep_labels
    from gradreg_fast.register.pipeline import _sample, _scan_coords, _world_displacement

    grid_fit = prep["grid_fit"]
    out_grid = grid_fit.original
    flow_out = grid_fit.to_original(flow, fill="edge")
    ids = sorted(files.get("organs", validation.ORGANS))
    fixed_seg, moving_seg = prep["fixed_labels"], prep["moving_labels"]
    fixed_labels = _sample(keep_labels(fixed_seg.data, ids), _scan_coords(fixed_seg.affine, np.eye(4), out_grid), 0, 0)
    warped = _sample(keep_labels(moving_seg.data, ids),
                     _scan_coords(moving_seg.affine, prep["initial"], out_grid, flow_out), 0, 0)
    table = metrics.label_metrics(fixed_labels, warped, out_grid.spacing, ids)
    dice = [v["dice"] for v in table.values() if not math.isnan(v["dice"])]
    box = (slice(None), slice(None)) + tuple(prep["box"])
    field = torch.from_numpy(np.ascontiguousarray(flow)).float().unsqueeze(0)[box]
    displacement = _world_displacement(prep["initial"], out_grid, flow_out)
    return {"dice": float(np.mean(dice)), **validation.endpoint_error(displacement, files, fixed_labels),
            "folding_percent": metrics.folding_percent(field), "sd_log_jacobian": metrics.sd_log_jacobian(field)}


def run_convexadam(prep: dict) -> tuple[np.ndarray, float]:
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    tick = time.perf_counter()
    disp = convex_adam_pt(torch.from_numpy(prep["fixed"]), torch.from_numpy(prep["moving"]),
                          device=torch.device("cpu"), dtype=torch.float32)
    core = time.perf_counter() - tick
    return np.moveaxis(np.asarray(disp, dtype=np.float32), -1, 0), core  # channel k along axis k, voxels


def _run_script(prep: dict, python: str, script: str, name: str, *extra: str) -> tuple[np.ndarray, float]:
    """Run a peer's script in its own venv's python on the prepared pair (written as NIfTI with the working
    grid's spacing): the (3, D, H, W) voxel flow it saves and its core seconds."""
    import nibabel as nib

    spacing = prep["grid_fit"].grid.spacing
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for image in ("fixed", "moving"):
            path = Path(tmp) / f"{image}.nii.gz"
            nib.save(nib.Nifti1Image(prep[image].astype(np.float32), np.diag([*spacing, 1.0])), str(path))
            paths.append(str(path))
        # In the temporary folder: transformix writes its deformationField.nii into the working directory.
        out = subprocess.run([python, "-c", script, *paths, str(Path(tmp) / "warp"), *extra], capture_output=True,
                             text=True, timeout=1800, cwd=tmp)
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed: {out.stderr.strip().splitlines()[-1:]}")
        core = json.loads(out.stdout.strip().splitlines()[-1])["core_s"]
        flow = np.load(Path(tmp) / "warp.npy")
        if flow.shape != (3,) + prep["fixed"].shape:
            raise RuntimeError(f"{name} returned a field of shape {flow.shape}, expected {(3,) + prep['fixed'].shape}")
        return flow, core


def run_ants(prep: dict, python: str) -> tuple[np.ndarray, float]:
    return _run_script(prep, python, ANTS_SCRIPT, "ANTs")


def run_elastix(prep: dict, python: str, threads: int) -> tuple[np.ndarray, float]:
    return _run_script(prep, python, ELASTIX_SCRIPT, "elastix", str(threads))


PRESETS = ("default", "quick", "thorough")


def run_gradreg(files: dict, preset: str = "default") -> dict:
    from gradreg_fast.register import Settings, quick_settings, thorough_settings

    settings = {"default": Settings, "quick": quick_settings, "thorough": thorough_settings}[preset]()
    row = validation.run_gradreg(files, settings)
    return {key: row[key] for key in ("dice", "epe_body_mm", "epe_organs_mm", "folding_percent", "sd_log_jacobian",
                                      "core_s", "wall_s") if key in row}


KEYS = ("dice", "epe_body_mm", "folding_percent", "sd_log_jacobian", "core_s", "wall_s")


REVERSED_PERCENT = 50.0


def reversed_map(row: dict) -> bool:
    """A map that folds most of the grid reverses orientation (a mirror): its determinants, clipped at 1e-9 before
    the log as everywhere (metrics.sd_log_jacobian), are nearly constant, so its SDlogJ says nothing about
    smoothness. Such rows show no SDlogJ and stay out of the SDlogJ means."""
    folding = row.get("folding_percent")
    return isinstance(folding, float) and math.isfinite(folding) and folding > REVERSED_PERCENT


def _shown(row: dict, key: str):
    value = row.get(key)
    if not isinstance(value, float) or not math.isfinite(value):
        return None
    if key == "sd_log_jacobian" and reversed_map(row):
        return None
    return value


def table(rows: dict) -> str:
    lines = ["| case | method | Dice | EPE body (mm) | folding % | SDlogJ | core (s) | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    reversed_rows = []
    for case, methods in rows.items():
        for method, row in methods.items():
            cells = ["-" if value is None else f"{value:.3f}" for value in (_shown(row, k) for k in KEYS)]
            if reversed_map(row):
                cells[KEYS.index("sd_log_jacobian")] = "reversed"
                reversed_rows.append(f"{case} ({method})")
            lines.append(f"| {case} | {method} | " + " | ".join(cells) + " |")
    groups = (("same-subject", validation.SAME_NAMES), ("inter-subject", validation.INTER_NAMES),
              ("held-out same-subject", {spec.name for spec in validation.HELD_OUT_SAME}),
              ("held-out inter-subject", {spec.name for spec in validation.HELD_OUT_INTER}))
    for group, names in groups:
        cases = [c for c in rows if c in names]
        for method in dict.fromkeys(m for c in cases for m in rows[c]):
            values = [rows[c][method] for c in cases if method in rows[c]]
            cells = []
            for k in KEYS:
                shown = [value for value in (_shown(v, k) for v in values) if value is not None]
                cells.append(f"{np.mean(shown):.3f}" + (f" ({len(shown)})" if len(shown) < len(values) else "")
                             if shown else "-")
            lines.append(f"| mean of {len(values)} {group} | {method} | " + " | ".join(cells) + " |")
    if reversed_rows:
        lines.append("")
        lines.append(f"*reversed*: folding over {REVERSED_PERCENT:.0f} % of the grid, a map that reverses orientation "
                     f"({', '.join(reversed_rows)}); its SDlogJ (near 0 once the determinants are clipped) is not "
                     f"shown and a mean over fewer cases gives their count in brackets.")
    return "\n".join(lines)


def report(rows: dict, text: str, json_path: str | None, markdown_path: str | None) -> None:
    """Print the table; write the raw rows and the table where asked."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(text + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=None, help="comma-separated (default: every case of validation.py)")
    parser.add_argument("--held-out", action="store_true",
                        help="the held-out cases (validation.HELD_OUT: never used to choose anything) instead")
    parser.add_argument("--ants-python", default=None, help="the python of a venv with antspyx (skipped without)")
    parser.add_argument("--elastix-python", default=None,
                        help="the python of a venv with itk-elastix (skipped without)")
    parser.add_argument("--skip-convexadam", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", default="default",
                        help=f"comma-separated gradreg presets to run, from {PRESETS} (default: default)")
    parser.add_argument("--peer-grid", choices=sorted(PEER_GRIDS), default="working",
                        help="the peers' input grid: gradreg's working grid (the default; see prepare) or the fixed "
                             "image's own grid")
    parser.add_argument("--skip-gradreg", action="store_true")
    parser.add_argument("--no-warmup", action="store_true",
                        help="time the first case cold (by default each in-process method registers the first case "
                             "once, untimed, before anything is timed)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None, help="write the table here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.held_out and args.cases:
        parser.error("give --cases or --held-out, not both")
    cases = validation.all_cases(validation.HELD_OUT if args.held_out else args.cases.split(",") if args.cases else None)
    if not args.no_warmup:
        # The first registration in a process pays once for lazy imports, the allocator's first blocks and the
        # thread pool's start (about 0.05 s for gradreg, more for ConvexAdam): warm every in-process method up on
        # the first case, untimed, so that no case's figure carries it. ANTs runs in its own process per case.
        first = next(iter(cases.values()))
        for preset in ([] if args.skip_gradreg else args.presets.split(",")):
            run_gradreg(first, preset)
        if not args.skip_convexadam:
            run_convexadam(prepare(first, args.peer_grid))
        print("warm-up done (first case registered once by each in-process method, untimed)", flush=True)
    rows = {}
    for name, files in cases.items():
        rows[name] = {}
        for preset in ([] if args.skip_gradreg else args.presets.split(",")):
            method = "gradreg" if preset == "default" else f"gradreg --{preset}"
            rows[name][method] = run_gradreg(files, preset)
            print(name, method, rows[name][method], flush=True)
        peers = []
        if not args.skip_convexadam:
            peers.append(("ConvexAdam", run_convexadam))
        if args.ants_python:
            peers.append(("ANTs SyN", lambda prep: run_ants(prep, args.ants_python)))
        if args.elastix_python:
            peers.append(("elastix B-spline", lambda prep: run_elastix(prep, args.elastix_python, args.threads)))
        if peers:  # read, normalise and align once per case; every peer's wall time includes it
            tick = time.perf_counter()
            prep = prepare(files, args.peer_grid)
            prepare_s = time.perf_counter() - tick
        for method, run in peers:
            tick = time.perf_counter()
            flow, core = run(prep)
            row = score(prep, flow, files)
            row["core_s"] = core + prep["init_s"]
            row["wall_s"] = prepare_s + time.perf_counter() - tick
            rows[name][method] = row
            print(name, method, row, flush=True)
    report(rows, table(rows), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
