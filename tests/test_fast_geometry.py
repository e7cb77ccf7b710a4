"""The fast geometry of the pipeline's set-up against the plain formulations it replaced.

body_mask (flat-array morphology, one labelling for the slice-wise hole filling) must give scipy's mask
voxel for voxel; mask_moments (index moments from projections) the argwhere formula up to float64
rounding; trilinear resampling (torch grid_sample) scipy's affine_transform within float32 round-off; and
the field-of-view box of pair_on_grid the box of a full nearest-neighbour resampling, exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from gradreg_fast import body, io

ROOT = Path(__file__).resolve().parents[1]
ABDOMEN = ROOT / "gradreg_fast" / "data" / "abdomen"
CASES = ROOT / "benchmarks" / ".cases"  # made by benchmarks/validation.py; used when present


# ----------------------------------------------------------------------------------------------- references

def reference_body_mask(image, affine, threshold=body.BODY_THRESHOLD):
    """body_mask as scipy's morphology, slice-by-slice hole filling and sum_labels compute it."""
    mask = np.asarray(image) > threshold
    if not mask.any():
        raise ValueError("body_mask: no voxel above the threshold; is the image empty?")
    opened = ndimage.binary_opening(mask)
    mask = opened if opened.any() else mask
    mask = ndimage.binary_closing(mask, iterations=2, border_value=0) | mask
    axis = body.axial_axis(affine)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)])
    mask = np.moveaxis(filled, 0, axis)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def reference_mask_moments(mask, affine):
    voxels = np.argwhere(mask).astype(np.float64)
    if len(voxels) == 0:
        raise ValueError("mask_moments: empty mask")
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    centre = world.mean(axis=0)
    return centre, np.cov((world - centre).T) if len(world) > 1 else np.zeros((3, 3))


def reference_fov_box(shape, affine, grid):
    fov = io.resample(np.ones(shape, np.uint8), grid, affine, order=0)
    return io._bounding_box(fov) if fov.any() else None


def random_affine(rng, spacing=(0.5, 3.0), rotate=True):
    affine = np.eye(4)
    linear = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix() if rotate else np.eye(3)
    affine[:3, :3] = linear * rng.uniform(*spacing, 3)
    affine[:3, 3] = rng.normal(size=3) * 20
    return affine


def real_scans():
    paths = [ABDOMEN / "ct.nii.gz", ABDOMEN / "mr.nii.gz"]
    if CASES.is_dir():
        paths += sorted(p for p in CASES.glob("*/*.nii.gz") if "label" not in p.name)
    for path in paths:
        scan = io.read_nifti(path)
        yield path, io.Scan(io.normalize_intensity(scan.data, "auto"), scan.affine)


# ----------------------------------------------------------------------------------------------- body mask

def test_body_mask_matches_scipy_on_real_scans():
    for path, scan in real_scans():
        # Each index axis in turn as the axial one: the slice-wise filling must follow it.
        for order in ([0, 1, 2, 3], [2, 0, 1, 3], [1, 2, 0, 3]):
            affine = scan.affine[:, order]
            assert np.array_equal(body.body_mask(scan.data, affine), reference_body_mask(scan.data, affine)), path


def test_body_mask_matches_scipy_on_random_blobs_and_noise():
    rng = np.random.default_rng(11)
    for trial in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 20, 3))
        if trial % 2:  # smooth blobs: holes, several parts, parts touching the border
            image = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2.5))
            image = (image - image.min()) / (np.ptp(image) + 1e-12)
            threshold = rng.uniform(0.2, 0.8)
        else:  # scattered voxels: the opening often removes everything
            image = (rng.random(shape) < rng.uniform(0.02, 0.9)).astype(np.float32)
            threshold = body.BODY_THRESHOLD
        affine = np.eye(4)[:, list(rng.permutation(3)) + [3]]
        try:
            expected = reference_body_mask(image, affine, threshold)
        except ValueError as error:
            with pytest.raises(ValueError, match=str(error).split(";")[0]):
                body.body_mask(image, affine, threshold)
            continue
        assert np.array_equal(body.body_mask(image, affine, threshold), expected), (trial, shape)


def test_body_mask_of_an_empty_image_still_refuses():
    with pytest.raises(ValueError, match="no voxel above the threshold"):
        body.body_mask(np.zeros((4, 5, 6)), np.eye(4))


# ----------------------------------------------------------------------------------------------- moments

def test_mask_moments_match_the_voxel_list_formula():
    rng = np.random.default_rng(3)
    for trial in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 25, 3))
        mask = rng.random(shape) < rng.uniform(0.001, 0.9)
        if not mask.any():
            continue
        affine = np.eye(4)
        affine[:3] = rng.normal(size=(3, 4)) * [1, 1, 1, 50]
        centre, cov = body.mask_moments(mask, affine)
        expected_centre, expected_cov = reference_mask_moments(mask, affine)
        scale = max(1.0, float(np.abs(expected_cov).max()))
        assert np.allclose(centre, expected_centre, rtol=1e-12, atol=1e-9)
        assert np.allclose(cov, expected_cov, rtol=1e-10, atol=1e-11 * scale)


def test_mask_moments_of_one_voxel_an_integer_mask_and_an_empty_mask():
    affine = np.diag([2.0, -3.0, 1.5, 1.0])
    affine[:3, 3] = (10, 20, -5)
    mask = np.zeros((5, 6, 7), bool)
    mask[3, 1, 4] = True
    centre, cov = body.mask_moments(mask, affine)
    assert np.allclose(centre, [16.0, 17.0, 1.0]) and np.array_equal(cov, np.zeros((3, 3)))
    labels = np.zeros((5, 6, 7), np.int64)
    labels[1:4, 2:5, 0:3] = 7
    for got, want in zip(body.mask_moments(labels, affine), reference_mask_moments(labels, affine)):
        assert np.allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="mask_moments: empty mask"):
        body.mask_moments(np.zeros((3, 3, 3), bool), affine)


def test_moments_init_on_the_abdomen_pair_matches_the_reference():
    (_, ct), (_, mr) = list(real_scans())[:2]
    expected = np.eye(4)
    ct_centre, _ = reference_mask_moments(reference_body_mask(ct.data, ct.affine), ct.affine)
    mr_centre, _ = reference_mask_moments(reference_body_mask(mr.data, mr.affine), mr.affine)
    expected[:3, 3] = mr_centre - ct_centre
    assert np.allclose(body.moments_init(ct, mr), expected, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("threads", [1, 3])
def test_trilinear_resample_matches_scipy(threads):
    rng = np.random.default_rng(5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the rows are split into one batch entry per thread
    try:
        for trial in range(60):
            shape = tuple(int(n) for n in rng.integers(2, 30, 3))
            data = rng.random(shape)
            if trial % 2:
                data = ndimage.gaussian_filter(data, 1.0)
            data = ((data - data.min()) / np.ptp(data)).astype(np.float32)
            scan = io.Scan(data, random_affine(rng, rotate=trial % 3 != 0))
            if trial % 3 == 0:  # the pipeline's grid: the scan's own, padded past the volume
                grid = io.Grid.of_scan(scan).fit(16, "pad").grid
            elif trial % 3 == 1:  # finer or coarser, larger or smaller than the volume
                grid = io.Grid.of_scan(scan, spacing=rng.uniform(0.4, 3.0),
                                       size=tuple(int(n) for n in rng.integers(1, 50, 3)))
            else:  # any grid, rotated against the volume
                grid = io.Grid(tuple(int(n) for n in rng.integers(1, 40, 3)), random_affine(rng))
            transform = None if trial % 2 else np.linalg.inv(random_affine(rng, (0.8, 1.2))) @ random_affine(
                rng, (0.8, 1.2))
            if transform is not None:
                transform[:3, 3] = rng.normal(size=3) * 3
            cval = (0.0, 0.25, -1.5)[trial % 3]
            got = io.resample(scan, grid, order=1, cval=cval, world_transform=transform)
            voxel_map = io._voxel_map(scan.affine, grid, transform)
            expected = ndimage.affine_transform(data, voxel_map[:3, :3], voxel_map[:3, 3], output_shape=grid.shape,
                                                order=1, mode="grid-constant", cval=cval, prefilter=False)
            assert got.dtype == np.float32 and got.shape == grid.shape
            assert np.abs(got - expected).max() < 2e-5, trial
    finally:
        torch.set_num_threads(before)


def test_trilinear_resample_of_a_thin_volume_and_a_float64_array():
    rng = np.random.default_rng(9)
    affine = random_affine(rng)
    grid = io.Grid((6, 5, 4), affine)
    for shape in [(1, 5, 4), (6, 5, 4)]:  # a single slice goes to scipy (no normalisation over one voxel)
        data = rng.random(shape)
        got = io.resample(data, grid, affine, order=1, cval=0.5)
        expected = ndimage.affine_transform(data.astype(np.float32), np.eye(3), np.zeros(3), output_shape=grid.shape,
                                            order=1, mode="grid-constant", cval=0.5, prefilter=False)
        assert got.dtype == np.float32 and np.abs(got - expected).max() < 1e-5


def test_field_of_view_box_is_the_box_of_the_resampled_ones():
    rng = np.random.default_rng(13)
    empty = 0
    for trial in range(900):
        shape = tuple(int(n) for n in rng.integers(2, 30, 3))
        kind = trial % 6
        if kind in (0, 1):  # the pipeline's grids: the scan's own or resampled, padded or cropped
            affine = random_affine(rng, rotate=kind == 1)
            spacing = None if kind == 0 else float(rng.choice([0.25, 0.5, 1.0, 1.5, 2.0, 3.0]) * rng.uniform(0.5, 3))
            scan = io.Scan(np.zeros(shape), affine)
            grid = io.Grid.of_scan(scan, spacing=spacing).fit(16, ("pad", "crop")[trial % 2]).grid
        elif kind == 2:
            affine = random_affine(rng)
            grid = io.Grid.of_scan(io.Scan(np.zeros(shape), affine), spacing=float(rng.choice([0.5, 1.0, 1.5, 2.0])),
                                   size=tuple(int(n) for n in rng.integers(1, 40, 3)))
        elif kind == 3:  # unrelated grids, often missing the volume altogether
            affine = random_affine(rng)
            grid = io.Grid(tuple(int(n) for n in rng.integers(1, 40, 3)), random_affine(rng, (0.3, 5.0)))
        elif kind == 4:  # grid points half a voxel outside, give or take the round-off of the voxel map
            affine = random_affine(rng)
            voxel_map = np.diag(list(rng.choice([0.25, 0.5, 1.0, 1.5, 2.0], 3)) + [1.0])
            voxel_map[:3, 3] = rng.integers(-12, 12, 3) / 4
            grid = io.Grid(tuple(int(n) for n in rng.integers(1, 40, 3)), affine @ voxel_map)
        else:  # dyadic spacings and origins: grid points exactly half a voxel outside
            affine = np.diag(list(rng.choice([0.5, 1.0, 2.0], 3)) + [1.0])
            affine[:3, 3] = rng.integers(-20, 20, 3) / 4
            grid_affine = np.diag(list(rng.choice([0.25, 0.5, 1.0, 1.5, 2.0], 3)) + [1.0])
            grid_affine[:3, 3] = rng.integers(-20, 20, 3) / 4
            grid = io.Grid(tuple(int(n) for n in rng.integers(1, 40, 3)), grid_affine)
        expected = reference_fov_box(shape, affine, grid)
        empty += expected is None
        assert io._field_of_view_box(shape, affine, grid) == expected, (trial, kind)
    assert 0 < empty < 450  # both outcomes were tried


def test_pair_on_grid_keeps_its_outputs():
    (_, ct), (_, mr) = list(real_scans())[:2]
    init = body.moments_init(ct, mr)
    fit = io.Grid.of_scan(ct).fit(16, "pad")
    pair = io.pair_on_grid(ct, mr, grid_fit=fit, moving_to_fixed=init)
    assert pair["fixed_fov"] == reference_fov_box(ct.data.shape, ct.affine, fit.grid)
    for key, scan, transform in (("fixed", ct, None), ("moving", mr, init)):
        voxel_map = io._voxel_map(scan.affine, fit.grid, transform)
        expected = np.clip(ndimage.affine_transform(scan.data, voxel_map[:3, :3], voxel_map[:3, 3],
                                                    output_shape=fit.grid.shape, order=1, mode="grid-constant",
                                                    prefilter=False), 0, 1)
        assert pair[key].dtype == torch.float32 and pair[key].shape == (1,) + fit.grid.shape
        assert np.abs(pair[key][0].numpy() - expected).max() < 2e-5
