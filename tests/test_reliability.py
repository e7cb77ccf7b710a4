"""Reliability of the registration pipeline and the command line (issue 13): consistent output sets,
right and bounded metrics, early one-line refusals, clean interruption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gradreg_fast import cli
from gradreg_fast.register.pipeline import quick_settings, register

from test_cli import FAST, strict_json, write_case


def quick():
    settings = quick_settings()
    settings.affine_iterations = (3, 3)
    settings.field.iterations = (3, 3, 1)
    return settings


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("case"))


def test_background_is_never_scored_without_a_label_list(case):
    result = register(case["fixed"], case["moving"], case["fixed_labels"], case["moving_labels"], quick(),
                      device="cpu", progress=False)
    for stage, report in result.metrics["stages"].items():
        assert sorted(report["labels"]) == ["1", "2"], stage
        dice = [v["dice"] for v in report["labels"].values()]
        assert report["mean_dice"] == pytest.approx(np.mean(dice)), stage


def covering_scores(case, spacing_mm, labels):
    """The "before" stage the slow way: both label maps sampled on a grid of the fixed scan's orientation
    and ``spacing_mm`` that covers both scans, then scored over that whole volume."""
    from scipy import ndimage

    from gradreg_fast import metrics

    fixed, moving = nib.load(str(case["fixed_labels"])), nib.load(str(case["moving_labels"]))
    direction = fixed.affine[:3, :3] / np.linalg.norm(fixed.affine[:3, :3], axis=0)
    lattice = np.eye(4)
    lattice[:3, :3] = direction * spacing_mm
    lattice[:3, 3] = fixed.affine[:3, 3]
    corners = []
    for image in (fixed, moving):
        n = np.asarray(image.shape) - 1
        box = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], float)
        corners.append(nib.affines.apply_affine(np.linalg.inv(lattice) @ image.affine, box))
    corners = np.concatenate(corners)
    low, high = np.floor(corners.min(0)) - 2, np.ceil(corners.max(0)) + 2
    shift = np.eye(4)
    shift[:3, 3] = low
    cover = lattice @ shift
    shape = tuple((high - low + 1).astype(int))
    maps = []
    for image in (fixed, moving):
        to_voxels = np.linalg.inv(image.affine) @ cover
        maps.append(ndimage.affine_transform(np.asarray(image.dataobj).astype(np.int64), to_voxels[:3, :3],
                                             to_voxels[:3, 3], output_shape=shape, order=0, mode="grid-constant"))
    return metrics.label_metrics(maps[0], maps[1], [spacing_mm] * 3, labels)


@pytest.mark.parametrize("shift_mm", [(6.0, -4.0, 3.0), (1000.0, 0.0, 0.0)])
def test_before_stage_equals_the_covering_grid_computation(tmp_path, shift_mm):
    case = write_case(tmp_path / "case", shift_mm=shift_mm)
    result = register(case["fixed"], case["moving"], case["fixed_labels"], case["moving_labels"], quick(),
                      device="cpu", progress=False)
    expected = covering_scores(case, 3.0, [1, 2])
    got = result.metrics["stages"]["before"]["labels"]
    for label in (1, 2):
        for key in ("dice", "asd", "hd95"):
            assert got[str(label)][key] == pytest.approx(expected[label][key], rel=1e-9), (label, key)
    if shift_mm[0] > 500:
        assert got["1"]["dice"] == 0 and got["1"]["asd"] > 900
    # The other stages are scored on the output grid: the same numbers as the whole-volume metrics.
    from gradreg_fast import metrics

    for stage in ("initial", "affine", "after"):
        whole = metrics.label_metrics(result.fixed_labels, result.label_maps[stage], 3.0, [1, 2])
        for label in (1, 2):
            for key in ("dice", "asd", "hd95"):
                assert result.metrics["stages"][stage]["labels"][str(label)][key] == pytest.approx(
                    whole[label][key], rel=1e-9, nan_ok=True)


def test_before_stage_memory_does_not_grow_with_the_world_offset(tmp_path):
    """A moving scan 1 m or 1000 km away: the same numpy memory as a near one, a right answer, no error."""
    import tracemalloc

    peaks, before = {}, {}
    for shift in [(6.0, -4.0, 3.0), (1000.0, 0.0, 0.0), (0.0, 1e6, -1e6)]:
        case = write_case(tmp_path / str(len(peaks)), shift_mm=shift)
        tracemalloc.start()
        try:
            result = register(case["fixed"], case["moving"], case["fixed_labels"], case["moving_labels"], quick(),
                              device="cpu", progress=False)
            peaks[shift] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        before[shift] = result.metrics["stages"]["before"]
        assert result.metrics["stages"]["initial"]["mean_dice"] > 0.5  # centres of mass bring it back
    near = peaks[(6.0, -4.0, 3.0)]
    assert max(peaks.values()) < 1.3 * near, peaks
    assert before[(1000.0, 0.0, 0.0)]["mean_dice"] == 0.0
    assert 980 < before[(1000.0, 0.0, 0.0)]["mean_asd"] < 1010
    assert before[(0.0, 1e6, -1e6)]["mean_asd"] == pytest.approx(np.sqrt(2) * 1e6, rel=1e-3)
