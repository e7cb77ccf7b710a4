"""The validation set of benchmarks/validation.py: its known answer must be right, or every figure built on it
(endpoint errors, the choice of the engine defaults) would be wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def validation():
    spec = importlib.util.spec_from_file_location("gradreg_validation", ROOT / "benchmarks" / "validation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("base", ["mr", "ct"])
def test_the_truth_carries_the_moving_labels_onto_the_fixed_ones(validation, base, tmp_path):
    from gradreg_fast.io import read_nifti

    spec = validation.CaseSpec(f"t-{base}", base, seed=5, amplitude_mm=12.0, smoothness_mm=18.0)
    files = validation.make_case(spec, tmp_path)
    fixed_labels = read_nifti(files["fixed_labels"], "fixed labels")
    moving_labels = read_nifti(files["moving_labels"], "moving labels")
    truth = np.load(files["truth"])["displacement_mm"]
    shape = fixed_labels.data.shape
    points = np.einsum("ij,j...->i...", fixed_labels.affine[:3, :3], np.indices(shape, dtype=float)) \
        + fixed_labels.affine[:3, 3].reshape(3, 1, 1, 1)
    to_voxels = np.linalg.inv(moving_labels.affine)
    target = points + np.moveaxis(truth, -1, 0)
    voxels = np.einsum("ij,j...->i...", to_voxels[:3, :3], target) + to_voxels[:3, 3].reshape(3, 1, 1, 1)
    carried = ndimage.map_coordinates(np.asarray(moving_labels.data), voxels, order=0)
    identity = ndimage.map_coordinates(np.asarray(moving_labels.data), np.einsum(
        "ij,j...->i...", to_voxels[:3, :3], points) + to_voxels[:3, 3].reshape(3, 1, 1, 1), order=0)
    for organ in validation.ORGANS:
        a = fixed_labels.data == organ
        dice = lambda b: 2 * (a & b).sum() / (a.sum() + b.sum())  # noqa: E731
        assert dice(carried == organ) > 0.9, organ  # nearest neighbour twice: not exactly 1
        assert dice(identity == organ) < dice(carried == organ) - 0.02, organ  # the deformation is not trivial
    # the amplitude is the spec's (plus the rigid offset's motion), and the map does not fold
    assert 0.7 * spec.amplitude_mm <= float(np.load(files["truth"])["max_mm"]) <= spec.amplitude_mm + 1e-6


def test_the_second_contrast_is_not_a_monotonic_remap(validation, tmp_path):
    from gradreg_fast.io import read_nifti

    files = validation.make_case(validation.CaseSpec("t-mono", "mr", 7, 10.0, 18.0), tmp_path)
    base = read_nifti(validation.data_dir() / "mr.nii.gz", "base").data.astype(float)
    moving = read_nifti(files["moving"], "moving").data.astype(float)  # the remapped MR, undeformed
    tissue = base > np.percentile(base, 30)
    order = np.argsort(base[tissue])
    smoothed = ndimage.uniform_filter1d(moving[tissue][order], 501)
    steps = np.diff(smoothed[::500])
    assert (steps > 5).any() and (steps < -5).any()  # rises and falls along the base intensity
