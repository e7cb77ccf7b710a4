"""Scoring of many labels: ``metrics.label_metrics`` by box distance transforms (the default) against KD-trees
alone, and ``metrics.jacobian_determinant`` in the CPU core against the numpy expression, on the 108-label atlas
of bench_many_labels.py.

Two stages of that atlas are scored against it: the moving atlas as generated (shifted by 2-3 voxels, as before
any alignment) and the atlas carried by a smooth random field of up to ~3 voxels (nearest neighbour, as a
registration's warped labels). Each figure is the median of ``--repeats`` calls, each preparing the moving map's
surfaces anew as ``gradreg register`` does for every stage (the fixed map prepared once, its KD-trees built
beforehand, which favours the trees); the two paths' tables are checked equal to
1e-12 and the two determinants bit for bit before anything is timed. The core's determinants are timed through
the public function, its input checks included.

Usage: python benchmarks/bench_label_metrics.py [--labels 108] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_time(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _smoothly_moved(labels: np.ndarray, rng) -> tuple:
    """``labels`` carried by a smooth random field (voxels), nearest neighbour; and the field."""
    from scipy import ndimage

    field = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, labels.shape), 6) for _ in range(3)])
    field *= 3.0 / np.abs(field).max()
    coords = np.indices(labels.shape).astype(np.float64) + field
    return ndimage.map_coordinates(labels, coords, order=0, mode="nearest"), field


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=108)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import nibabel as nib
    from bench_many_labels import make_case

    from gradreg_fast import metrics

    with tempfile.TemporaryDirectory() as tmp:
        files = make_case(Path(tmp), args.labels)
        fixed = np.asarray(nib.load(str(files["fixed_labels"])).dataobj)
        shifted = np.asarray(nib.load(str(files["moving_labels"])).dataobj)
    moved, field = _smoothly_moved(fixed, np.random.default_rng(1))
    labels = sorted(set(np.unique(fixed).tolist()) - {0})
    spacing = np.array([2.0, 2.0, 2.0])
    surfaces = metrics.LabelSurfaces(fixed, labels)
    for k in range(1, len(labels) + 1):
        surfaces.tree(k, spacing)
    print(f"{len(labels)} labels on a {fixed.shape} grid, {args.repeats} calls each, median (s)")
    print(f"{'stage':<34} {'KD-trees alone':>15} {'default':>9} {'speed-up':>9}")
    for name, other in (("shifted by (2, -3, 1) voxels", shifted), ("smooth field, up to 3 voxels", moved)):
        def score():
            return metrics.label_metrics(surfaces, metrics.LabelSurfaces(other, labels), spacing)

        default = score()
        limit, metrics.BOX_VOXELS_PER_POINT = metrics.BOX_VOXELS_PER_POINT, 0
        try:
            trees = score()
            trees_s = _median_time(score, args.repeats)
        finally:
            metrics.BOX_VOXELS_PER_POINT = limit
        for label in labels:
            for key in ("dice", "asd", "hd95"):
                a, b = default[label][key], trees[label][key]
                if not (a == b or (np.isnan(a) and np.isnan(b)) or abs(a - b) <= 1e-12 * max(abs(a), abs(b))):
                    raise SystemExit(f"label {label} {key}: {a} by default, {b} by the trees")
        default_s = _median_time(score, args.repeats)
        print(f"{name:<34} {trees_s:>15.4f} {default_s:>9.4f} {trees_s / default_s:>8.2f}x")
    numpy_det = metrics._jacobian_determinant_numpy(field)
    if not np.array_equal(metrics.jacobian_determinant(field), numpy_det):
        raise SystemExit("the CPU core's Jacobian determinants differ from numpy's")
    numpy_s = _median_time(lambda: metrics._jacobian_determinant_numpy(field), args.repeats)
    core_s = _median_time(lambda: metrics.jacobian_determinant(field), args.repeats)
    print(f"{'Jacobian determinant of the field':<34} {'numpy':>15} {'core':>9}")
    print(f"{'':<34} {numpy_s:>15.4f} {core_s:>9.4f} {numpy_s / core_s:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
