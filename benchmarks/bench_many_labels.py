"""Wall time against core time of ``gradreg register`` with a label atlas of 100+ labels (issue 11's target:
wall <= 2x core).

The case: a 90x108x90 grid (2 mm) whose body (an ellipsoid) is cut into ``--labels`` Voronoi cells of random
seeds; the moving image is the same atlas shifted by (2, -3, 1) voxels, with other random intensities per label
(a CT-like and an MR-like rendering). The command line is run as a user would, in a fresh process, and the
timings come from the metrics.json it writes: ``registration_s`` (core: initial alignment, affine, deformable)
and ``total_s`` (everything from reading the files to the scored result), plus the process's own wall time.

Usage: python benchmarks/bench_many_labels.py [--labels 108] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_case(folder: Path, count: int, seed: int = 0) -> dict:
    import nibabel as nib
    from scipy import ndimage

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (90, 108, 90)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape) - 1) / 2
    body = sum(((grid[i] - centre[i]) / (0.45 * shape[i])) ** 2 for i in range(3)) <= 1
    seeds = np.argwhere(body)[rng.choice(int(body.sum()), count, replace=False)]
    seed_map = np.zeros(shape, np.int32)
    seed_map[tuple(seeds.T)] = np.arange(1, count + 1)
    is_seed = np.zeros(shape, bool)
    is_seed[tuple(seeds.T)] = True
    nearest = ndimage.distance_transform_edt(~is_seed, return_distances=False, return_indices=True)
    labels = np.where(body, seed_map[tuple(nearest)], 0).astype(np.int16)
    moving_labels = ndimage.shift(labels, (2, -3, 1), order=0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    files = {}
    for role, lab, ct in (("fixed", labels, False), ("moving", moving_labels, True)):
        tone = rng.uniform(0, 1, count + 1)
        tone[0] = 0
        image = tone[lab] * (400 if ct else 800) + rng.normal(0, 5, shape) + (-1000 if ct else 10) * (lab == 0)
        files[role] = folder / f"{role}.nii.gz"
        files[f"{role}_labels"] = folder / f"{role}_labels.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(files[role]))
        nib.save(nib.Nifti1Image(lab, affine), str(files[f"{role}_labels"]))
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=108)
    parser.add_argument("--out", default=None, help="keep the case and the result here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out or tmp)
        files = make_case(folder / "case", args.labels)
        command = [sys.executable, "-m", "gradreg_fast.cli", "register", "--fixed", str(files["fixed"]), "--moving",
                   str(files["moving"]), "--fixed-labels", str(files["fixed_labels"]), "--moving-labels",
                   str(files["moving_labels"]), "--out", str(folder / "result"), "--force", "--quiet", "--device", "cpu"]
        tick = time.perf_counter()
        subprocess.run(command, check=True)
        process = time.perf_counter() - tick
        timings = json.loads((folder / "result" / "metrics.json").read_text())["timings_s"]
    core, total = timings["registration_s"], timings["total_s"]
    print(json.dumps({"labels": args.labels, "core_s": round(core, 3), "total_s": round(total, 3),
                      "metrics_s": round(timings.get("metrics_s", float("nan")), 3),
                      "process_wall_s": round(process, 3), "total_over_core": round(total / core, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
