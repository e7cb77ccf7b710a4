"""gradreg_fast.io: physical-space resampling, grids, normalisation, NIfTI reading/writing and refusals."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from gradreg_fast import io

RNG = np.random.default_rng(7)


def save(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float)), str(path))
    return path


def ras_affine(spacing=(2.0, 3.0, 2.5), origin=(-40.0, 12.5, 7.0)):
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = origin
    return affine


def as_lps_copy(data, affine, world_shift=(0.0, 0.0, 0.0)):
    """The same object stored in LPS order (first two axes reversed), moved by ``world_shift`` mm."""
    n = data.shape
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, n[0] - 1
    flip[1, 1], flip[1, 3] = -1, n[1] - 1
    lps = affine @ flip  # LPS voxel v holds what RAS voxel flip @ v held
    lps[:3, 3] += world_shift
    return np.ascontiguousarray(data[::-1, ::-1, :]), lps


@pytest.mark.parametrize("fixed_is_lps", [False, True])
def test_ras_lps_flip_and_shift_resample_in_physical_space(tmp_path, fixed_is_lps):
    """An LPS copy of a RAS scan, shifted by whole voxels in world space, lands exactly where it should."""
    shape, spacing = (21, 17, 11), np.array([2.0, 3.0, 2.5])
    image = RNG.random(shape).astype(np.float32) * 800 + 10  # MR-like, no air: normalised by percentiles
    labels = RNG.integers(0, 4, size=shape).astype(np.uint8)
    affine = ras_affine(spacing)
    shift_voxels = np.array([2, -1, 3])
    image_lps, lps = as_lps_copy(image, affine, world_shift=shift_voxels * spacing)
    labels_lps, _ = as_lps_copy(labels, affine)
    assert nib.aff2axcodes(lps) == ("L", "P", "S") and nib.aff2axcodes(affine) == ("R", "A", "S")
    ras_files = (save(tmp_path / "ras.nii.gz", image, affine), save(tmp_path / "ras_seg.nii.gz", labels, affine))
    lps_files = (save(tmp_path / "lps.nii.gz", image_lps, lps), save(tmp_path / "lps_seg.nii.gz", labels_lps, lps))
    fixed, moving = (lps_files, ras_files) if fixed_is_lps else (ras_files, lps_files)
    pair = io.load_pair(fixed[0], moving[0], fixed[1], moving[1], details=True)

    # Whatever the grid's orientation, the fixed image and labels come back as the fixed file's voxels ...
    fit = pair["fit"]
    fixed_back = fit.to_original(pair["fixed"][0].numpy())
    fixed_labels_back = fit.to_original(pair["fixed_labels"][0].numpy())
    normalised = io.normalize_intensity(image, "mr")
    assert np.allclose(fixed_back, normalised[::-1, ::-1] if fixed_is_lps else normalised, atol=1e-6)
    assert np.array_equal(fixed_labels_back, labels[::-1, ::-1] if fixed_is_lps else labels)

    # ... and the moving scan is the fixed one moved by the world shift (+shift if the moving copy is the
    # shifted one, -shift otherwise), compared on the voxels where both are defined.
    moving_back = fit.to_original(pair["moving"][0].numpy())
    moving_labels_back = fit.to_original(pair["moving_labels"][0].numpy())
    world_shift = shift_voxels * spacing * (-1 if fixed_is_lps else 1)
    grid_shift = np.linalg.inv(fit.original.affine[:3, :3]) @ world_shift  # in fixed-grid voxels
    assert np.allclose(grid_shift, np.round(grid_shift))
    step = np.round(grid_shift).astype(int)
    src = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(step, shape))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(step, shape))
    fixed_ref = normalised[::-1, ::-1] if fixed_is_lps else normalised
    labels_ref = labels[::-1, ::-1] if fixed_is_lps else labels
    # moving(x) = object(x - shift): moving voxel v + step shows fixed voxel v
    assert np.allclose(moving_back[dst], fixed_ref[src], atol=1e-5)
    assert np.array_equal(moving_labels_back[dst], labels_ref[src])
    # and outside the moving field of view (whole voxels away) there is nothing
    outside = np.ones(shape, bool)
    outside[dst] = False
    assert outside.any() and np.all(moving_back[outside] == 0) and np.all(moving_labels_back[outside] == 0)


def test_load_pair_contract(tmp_path):
    shape = (30, 20, 9)
    ct = RNG.normal(40, 30, size=shape)
    ct[:3] = -1000  # air: guessed as CT
    fixed = save(tmp_path / "f.nii.gz", RNG.random(shape).astype(np.float32) * 300, ras_affine())
    moving = save(tmp_path / "m.nii", ct.astype(np.int16), ras_affine())
    seg = save(tmp_path / "s.nii.gz", RNG.integers(0, 6, size=shape).astype(np.uint8), ras_affine())
    pair = io.load_pair(fixed, moving, seg, seg, label_ids=[1, 5])
    assert set(pair) == {"fixed", "moving", "fixed_labels", "moving_labels", "affine"}
    for key in ("fixed", "moving"):
        t = pair[key]
        assert t.dtype == torch.float32 and t.dim() == 4 and t.shape[0] == 1
        assert all(n % 16 == 0 for n in t.shape[1:])
        assert 0 <= float(t.min()) and float(t.max()) <= 1
    for key in ("fixed_labels", "moving_labels"):
        assert pair[key].dtype == torch.int64 and pair[key].shape == pair["fixed"].shape
        assert set(torch.unique(pair[key]).tolist()) == {0, 1, 5}
    assert pair["affine"].shape == (4, 4) and pair["affine"].dtype == torch.float64
    without = io.load_pair(fixed, moving)
    assert without["fixed_labels"] is None and without["moving_labels"] is None


def test_grid_spacing_size_and_centre():
    scan = io.Scan(np.zeros((40, 30, 10), np.float32), ras_affine((1.0, 1.0, 3.0)))
    grid = io.Grid.of_scan(scan, spacing=2.0)
    assert grid.shape == (20, 15, 15)
    assert np.allclose(grid.spacing, 2.0)
    assert np.allclose(grid.center_world, io.Grid(scan.data.shape, scan.affine).center_world)
    sized = io.Grid.of_scan(scan, spacing=(1.5, 1.5, 1.5), size=(8, 9, 10))
    assert sized.shape == (8, 9, 10) and np.allclose(sized.center_world, grid.center_world)
    with pytest.raises(ValueError, match="spacing"):
        io.Grid.of_scan(scan, spacing=0)


@pytest.mark.parametrize("how", ["pad", "crop"])
def test_fit_to_multiple_and_inverse(how):
    affine = ras_affine()
    data = RNG.random((37, 18, 20)).astype(np.float32)
    scan = io.Scan(data, affine)
    grid = io.Grid(data.shape, affine)
    fit = grid.fit(16, how)
    assert all(n % 16 == 0 for n in fit.grid.shape)
    direct = io.resample(scan, grid)
    assert np.array_equal(direct, data)  # the volume's own grid: every voxel on itself, exactly
    via_fit = fit.to_original(io.resample(scan, fit.grid))
    # onto another grid the trilinear path (grid_sample, float32) lands within its documented ~1e-5
    if how == "pad":
        assert fit.grid.shape == (48, 32, 32)
        assert np.allclose(via_fit, direct, rtol=0, atol=1e-5)  # padding then cropping back gives the voxels
    else:
        assert fit.grid.shape == (32, 16, 16)
        box = fit.original_box
        inside = tuple(slice(o + s.start, o + s.stop) for o, s in zip(fit.offset, box))
        assert np.allclose(via_fit[inside], direct[inside], rtol=0, atol=1e-5)
        outside = np.ones(data.shape, bool)
        outside[inside] = False
        assert np.all(via_fit[outside] == 0)  # what cropping removed comes back as the fill value
        assert np.all(fit.to_original(np.ones(fit.grid.shape), fill="edge") == 1)
    with pytest.raises(ValueError, match="how"):
        grid.fit(16, "squash")


def test_fit_to_a_multiple_per_axis():
    grid = io.Grid((37, 18, 20), ras_affine())
    fit = grid.fit((4, 4, 16), "pad")
    assert fit.grid.shape == (40, 20, 32) and fit.offset == (-1, -1, -6)
    assert fit.grid.shape == tuple(grid.fit(m, "pad").grid.shape[axis] for axis, m in enumerate((4, 4, 16)))
    for bad in ((4, 16), (4, 0, 16), (4, 4.0, 16), (True, 4, 4), 0):
        with pytest.raises(ValueError, match="multiple"):
            grid.fit(bad, "pad")


def test_fit_with_a_margin_pads_at_least_that_much_on_each_side():
    grid = io.Grid((37, 18, 20), ras_affine())
    fit = grid.fit(4, "pad", margin=(0, 0, 1))
    assert fit.grid.shape == (40, 20, 24) and fit.offset == (-1, -1, -2)  # 20 + 2 rounded up to 24, centred
    assert grid.fit(4, "pad", margin=(0, 0, 2)).grid.shape == (40, 20, 24)
    assert grid.fit(4, "pad", margin=(0, 0, 3)).grid.shape == (40, 20, 28)
    assert grid.fit(4, "pad", margin=1).grid.shape == (40, 20, 24)
    assert grid.fit(4, "pad", margin=0).grid.shape == grid.fit(4, "pad").grid.shape
    with pytest.raises(ValueError, match="margin"):
        grid.fit(4, "crop", margin=1)
    for bad in ((0, 1), -1, (0, 0, 1.5), True):
        with pytest.raises(ValueError, match="margin"):
            grid.fit(4, "pad", margin=bad)


def test_resample_nearest_keeps_border_voxels():
    """Round-off must never drop the last voxel of a label map (nearest sampling of voxel extents)."""
    labels = np.ones((5, 4, 3), np.int64)
    affine = ras_affine((0.7, 1.3, 2.1), (1e-7, -3.3, 0.1))
    grid = io.Grid(labels.shape, affine @ np.diag([1, 1, 1, 1.0]))
    out = io.resample(io.Scan(labels, affine), grid, order=0, world_transform=np.eye(4) + 1e-9)
    assert np.all(out == 1)


def test_resample_onto_the_volumes_own_grid_is_a_copy():
    """The shortcut for a grid that is the volume's own: the same values, a new array, the documented dtypes;
    a grid of the same shape elsewhere, or a world transform, still resamples."""
    affine = ras_affine((0.7, 1.3, 2.1), (4.0, -3.3, 0.1))
    labels = RNG.integers(0, 5, (6, 5, 4)).astype(np.int16)
    image = RNG.random((6, 5, 4))  # float64 in, float32 out
    grid = io.Grid(labels.shape, affine)
    same = io.resample(io.Scan(labels, affine), grid, order=0)
    assert same.dtype == np.int16 and np.array_equal(same, labels) and not np.shares_memory(same, labels)
    out = io.resample(io.Scan(image, affine), grid)
    assert out.dtype == np.float32 and np.array_equal(out, image.astype(np.float32))
    shifted = affine.copy()
    shifted[:3, 3] += shifted[:3, 0]  # one voxel along the first axis
    moved = io.resample(io.Scan(labels, affine), io.Grid(labels.shape, shifted), order=0)
    assert np.array_equal(moved[:-1], labels[1:]) and np.all(moved[-1] == 0)
    transform = np.eye(4)
    transform[:3, 3] = shifted[:3, 0]
    assert np.array_equal(io.resample(io.Scan(labels, affine), grid, order=0, world_transform=transform), moved)
    # labels stored big-endian and in Fortran order (as a NIfTI may hold them) come back in native byte order and C
    # order, as scipy's path gives them
    swapped = io.resample(io.Scan(np.asfortranarray(labels.astype(">i2")), affine), grid, order=0)
    assert swapped.dtype == np.dtype("=i2") and swapped.flags.c_contiguous and np.array_equal(swapped, labels)
    # a higher spline order smooths even on the volume's own grid: no shortcut there
    from scipy import ndimage

    cubic = io.resample(io.Scan(image, affine), grid, order=3)
    expected = ndimage.affine_transform(image.astype(np.float32), np.eye(3), output_shape=image.shape, order=3,
                                        mode="grid-constant", prefilter=False)
    np.testing.assert_allclose(cubic, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(cubic, image, atol=1e-3)


@pytest.mark.parametrize("shape", [(9, 12, 10), (2, 5, 7), (1, 6, 7)])
@pytest.mark.parametrize("cval", [0.0, -1024.0])
def test_sample_trilinear_is_scipys_map_coordinates(shape, cval):
    """grid_sample in place of map_coordinates(order=1, grid-constant): the same values within float32 rounding,
    points beyond the volume (fading to cval over the last voxel, then cval) included; an axis of one voxel goes to
    scipy itself."""
    from scipy import ndimage

    data = RNG.random(shape).astype(np.float32) * 100
    coords = RNG.uniform(-2.5, np.asarray(shape)[:, None, None] + 1.5, (3, 13, 17))
    expected = ndimage.map_coordinates(data, coords, order=1, mode="grid-constant", cval=cval, prefilter=False)
    out = io.sample_trilinear(data, coords, cval)
    assert out.shape == (13, 17) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5 * (100 + abs(cval)))
    outside = np.any((coords <= -1) | (coords >= np.asarray(shape)[:, None, None]), axis=0)
    assert outside.any() and np.all(out[outside] == np.float32(cval))


def test_sample_trilinear_in_several_blocks_and_threads():
    """More points than one grid_sample call takes (io._TRILINEAR_BLOCK), an odd count split over the threads: every
    point still lands where map_coordinates puts it, in order."""
    from scipy import ndimage

    data = RNG.random((7, 9, 8)).astype(np.float32)
    count = io._TRILINEAR_BLOCK + 12345
    coords = RNG.uniform(-1.0, 8.0, (3, count, 1))
    expected = ndimage.map_coordinates(data, coords, order=1, mode="grid-constant", cval=0.0, prefilter=False)
    threads = torch.get_num_threads()
    try:
        for count_threads in (1, 3):
            torch.set_num_threads(count_threads)
            np.testing.assert_allclose(io.sample_trilinear(data, coords), expected, rtol=0, atol=2e-6)
    finally:
        torch.set_num_threads(threads)


def test_normalize_intensity():
    ct = np.array([[[-1000.0, -200.0, 50.0, 300.0, 1200.0]]])
    assert np.allclose(io.normalize_intensity(ct, "ct"), [[[0, 0, 0.5, 1, 1]]])
    assert io.guess_modality(ct) == "ct"
    mr = RNG.random((10, 10, 10)) * 700
    out = io.normalize_intensity(mr, "auto")
    assert io.guess_modality(mr) == "mr"
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    low, high = np.percentile(mr, io.MR_PERCENTILES)
    inside = (mr > low) & (mr < high)
    assert np.allclose(out[inside], (mr[inside] - low) / (high - low), atol=1e-6)
    assert np.all(io.normalize_intensity(np.full((3, 3, 3), 5.0), "mr") == 0)
    with pytest.raises(ValueError, match="modality"):
        io.normalize_intensity(mr, "pet")


def test_normalize_intensity_takes_other_windows_and_names_a_bad_one():
    ct = np.array([[[-1000.0, -100.0, 50.0, 200.0, 1200.0]]])
    assert np.allclose(io.normalize_intensity(ct, "ct", ct_window=(-100, 200)), [[[0, 0, 0.5, 1, 1]]])
    mr = RNG.random((9, 8, 7)) * 700 + 3
    out = io.normalize_intensity(mr, "mr", mr_percentiles=(2, 98))
    low, high = np.percentile(mr, (2, 98))
    inside = (mr > low) & (mr < high)
    assert np.allclose(out[inside], (mr[inside] - low) / (high - low), atol=1e-6)
    assert (out[mr <= low] == 0).all() and (out[mr >= high] == 1).all()
    for name, value in (("ct_window", (300, -200)), ("ct_window", (0, float("nan"))), ("ct_window", (1,)),
                        ("ct_window", "wide"), ("mr_percentiles", (-1, 99)), ("mr_percentiles", (5, 101)),
                        ("mr_percentiles", (50, 50))):
        with pytest.raises(ValueError, match=name):
            io.normalize_intensity(ct, "ct", **{name: value})


def test_write_nifti_roundtrip_atomic_and_protective(tmp_path):
    affine = ras_affine()
    data = RNG.random((6, 5, 4)).astype(np.float32)
    source = save(tmp_path / "input.nii.gz", data, affine)
    out = io.write_nifti(tmp_path / "sub" / "out.nii.gz", data, affine, inputs=[source])
    image = nib.load(str(out))
    assert np.allclose(image.affine, affine) and np.array_equal(np.asarray(image.dataobj), data)
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    assert sorted(os.listdir(out.parent)) == ["out.nii.gz"]  # no temp file left behind
    with pytest.raises(FileExistsError, match="already exists"):
        io.write_nifti(out, data, affine)
    io.write_nifti(out, data * 2, affine, force=True)
    assert np.allclose(np.asarray(nib.load(str(out)).dataobj), data * 2)
    with pytest.raises(FileExistsError, match="one of the inputs"):
        io.write_nifti(source, data, affine, inputs=[source], force=True)
    assert np.array_equal(np.asarray(nib.load(str(source)).dataobj), data)


def test_write_displacement_is_a_vector_image(tmp_path):
    grid = io.Grid((4, 3, 2), ras_affine())
    field = RNG.random((4, 3, 2, 3)).astype(np.float32)
    path = io.write_displacement(tmp_path / "flow.nii.gz", field, grid)
    image = nib.load(str(path))
    assert image.shape == (4, 3, 2, 1, 3)
    assert image.header.get_intent()[0] == "vector"
    assert np.allclose(image.affine, grid.affine)
    assert np.allclose(np.asarray(image.dataobj)[:, :, :, 0, :], field)
    voxels = RNG.random((3, 4, 3, 2))
    mm = io.voxel_flow_to_world_mm(voxels, grid)
    assert np.allclose(mm[..., 0], voxels[0] * 2.0) and np.allclose(mm[..., 1], voxels[1] * 3.0)


def test_refuses_bad_files(tmp_path):
    good = save(tmp_path / "good.nii.gz", RNG.random((5, 5, 5)).astype(np.float32), ras_affine())
    with pytest.raises(FileNotFoundError, match="not found"):
        io.read_nifti(tmp_path / "missing.nii.gz", "fixed image")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a NIfTI file at all" * 10)
    with pytest.raises(io.NiftiError, match="not a readable NIfTI"):
        io.read_nifti(junk)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(io.NiftiError, match="not a readable NIfTI"):
        io.read_nifti(truncated)
    raw = tmp_path / "raw.nii"  # uncompressed, cut in the voxel data
    save(raw, RNG.random((8, 8, 8)).astype(np.float32), ras_affine())
    raw.write_bytes(raw.read_bytes()[:600])
    with pytest.raises(io.NiftiError, match="not a readable NIfTI"):
        io.read_nifti(raw)
    with pytest.raises(io.NiftiError, match="2D"):
        io.read_nifti(save(tmp_path / "flat.nii.gz", np.ones((5, 6), np.float32), np.eye(4)))
    with pytest.raises(io.NiftiError, match="single slice"):
        io.read_nifti(save(tmp_path / "slice.nii.gz", np.ones((5, 6, 1), np.float32), np.eye(4)))
    with pytest.raises(io.NiftiError, match="4D"):
        io.read_nifti(save(tmp_path / "series.nii.gz", np.ones((5, 6, 7, 2), np.float32), np.eye(4)))
    squeezed = io.read_nifti(save(tmp_path / "one.nii.gz", np.ones((5, 6, 7, 1), np.float32), np.eye(4)))
    assert squeezed.data.shape == (5, 6, 7)
    with pytest.raises(io.NiftiError, match=r"\.nii or \.nii\.gz"):
        io.read_nifti(good.rename(tmp_path / "good.img"))
    nan = RNG.random((4, 4, 4)).astype(np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(io.NiftiError, match="NaN"):
        io.read_nifti(save(tmp_path / "nan.nii.gz", nan, np.eye(4)))
    gz = tmp_path / "empty.nii.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b"")
    with pytest.raises(io.NiftiError):
        io.read_nifti(gz)


def test_labels_must_share_the_image_grid(tmp_path):
    image = save(tmp_path / "i.nii.gz", RNG.random((6, 6, 6)).astype(np.float32), ras_affine())
    other = save(tmp_path / "l.nii.gz", np.ones((6, 6, 5), np.uint8), ras_affine())
    with pytest.raises(io.NiftiError, match="image's grid"):
        io.load_pair(image, image, fixed_labels=other)


def test_overview_reorients_to_ras_with_matching_spacing():
    from gradreg_fast import viz

    shuffled = np.array([[0, 0, 2.5, 0], [-3.0, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])
    assert nib.aff2axcodes(shuffled) == ("P", "S", "R")
    volume = RNG.random((4, 5, 6))
    ras, spacing = viz.to_ras(volume, shuffled)
    assert ras.shape == (6, 4, 5) and np.allclose(spacing, [2.5, 3.0, 1.5])
    # RAS voxel (x, y, z) is input voxel (3 - y, z, x): axis 0 pointed posterior, so it is reversed
    assert ras[1, 0, 2] == volume[3, 2, 1] and ras[5, 3, 4] == volume[0, 4, 5]


def test_load_pair_centre_of_mass_init(tmp_path):
    """Two bodies 60 mm apart: no overlap as they are, the same voxels after matching centres of mass."""
    shape, affine = (30, 30, 20), ras_affine((3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    world = np.indices(shape) * 3.0
    body = ((world[0] - 45) / 30) ** 2 + ((world[1] - 45) / 24) ** 2 + ((world[2] - 30) / 20) ** 2 <= 1
    image = np.where(body, 200.0, 0.0).astype(np.float32)
    moved = affine.copy()
    moved[:3, 3] += (60.0, 0.0, 0.0)
    fixed = save(tmp_path / "f.nii.gz", image, affine)
    moving = save(tmp_path / "m.nii.gz", image, moved)
    seg_f = save(tmp_path / "sf.nii.gz", body.astype(np.uint8), affine)
    seg_m = save(tmp_path / "sm.nii.gz", body.astype(np.uint8), moved)
    plain = io.load_pair(fixed, moving, seg_f, seg_m)
    aligned = io.load_pair(fixed, moving, seg_f, seg_m, init="com")
    overlap = lambda p: int(((p["fixed_labels"] == 1) & (p["moving_labels"] == 1)).sum())  # noqa: E731
    assert overlap(plain) < 0.5 * int(body.sum())
    assert torch.equal(aligned["fixed_labels"], aligned["moving_labels"])
    with pytest.raises(ValueError, match="init"):
        io.load_pair(fixed, moving, init="moments")


@pytest.mark.parametrize("value", [1e20, np.nan, np.inf, 2.5])
def test_keep_labels_refuses_what_is_not_a_label_id_instead_of_wrapping_it(value):
    labels = np.zeros((3, 4, 5))
    labels[1, 1, 1] = 2.0004  # float round-off of a writer: kept as 2
    labels[2, 2, 2] = value
    with pytest.raises(io.NiftiError, match="fixed labels: a label map must hold whole numbers"):
        io.keep_labels(labels, None, "fixed labels")
    labels[2, 2, 2] = 7
    assert io.keep_labels(labels)[1, 1, 1] == 2 and io.keep_labels(labels, [7])[1, 1, 1] == 0
    with pytest.raises(io.NiftiError, match="within int64"):
        io.keep_labels(np.full((2, 2, 2), np.iinfo(np.uint64).max, np.uint64))
    for keep in (1, [1.5], ["2"]):
        with pytest.raises(ValueError, match="`keep`"):
            io.keep_labels(labels, keep)


def test_non_finite_voxels_are_left_out_and_become_background():
    mr = RNG.random((6, 5, 4)) * 700 + 5
    holes = mr.copy()
    holes[0, 0, :2] = np.nan
    holes[1, 1, 1] = np.inf
    out = io.normalize_intensity(holes, "auto")
    assert io.guess_modality(holes) == "mr" and np.isfinite(out).all()
    known = np.isfinite(holes)
    low, high = np.percentile(mr[known], io.MR_PERCENTILES)
    inside = known & (mr > low) & (mr < high)
    np.testing.assert_allclose(out[inside], (mr[inside] - low) / (high - low), atol=1e-6)
    assert (out[~known] == 0).all()
    ct = np.full((4, 4, 4), -1000.0)
    ct[1:3, 1:3, 1:3] = 50.0
    ct[0, 0, 0] = np.nan
    assert io.guess_modality(ct) == "ct"
    out = io.normalize_intensity(ct, "auto")
    assert out[0, 0, 0] == 0 and out[1, 1, 1] == pytest.approx(0.5)
    assert (io.normalize_intensity(np.full((2, 2, 2), np.nan), "mr") == 0).all()
    with pytest.raises(ValueError, match="`data` must not be empty"):
        io.normalize_intensity(np.zeros((0, 3, 3)))


def test_write_nifti_stores_int64_and_bool_maps(tmp_path):
    affine = ras_affine()
    labels = np.zeros((4, 5, 3), np.int64)
    labels[1, 2, 1] = 300
    path = io.write_nifti(tmp_path / "labels.nii.gz", labels, affine)
    back = io.read_nifti(path, "labels")
    assert np.array_equal(back.data, labels) and np.asarray(back.data).dtype == np.int16
    wide = labels * 1000
    assert np.asarray(io.read_nifti(io.write_nifti(tmp_path / "w.nii", wide, affine), "w").data).dtype == np.int32
    mask = io.write_nifti(tmp_path / "mask.nii.gz", labels > 0, affine)
    assert np.array_equal(io.read_nifti(mask, "mask").data, (labels > 0).astype(np.uint8))
    with pytest.raises(ValueError, match="beyond int32"):
        io.write_nifti(tmp_path / "huge.nii.gz", labels * 2 ** 40, affine)
    assert not (tmp_path / "huge.nii.gz").exists()


@pytest.mark.parametrize("shape, affine, message", [
    ((4, 4), np.eye(4), "`shape` must be 3 positive integers"), ((0, 4, 4), np.eye(4), "`shape`"),
    ((-3, 4, 4), np.eye(4), "`shape`"), ((2.5, 4, 4), np.eye(4), "`shape`"),
    ((4, 4, 4), np.eye(3), "4x4"), ((4, 4, 4), np.full((4, 4), np.nan), "4x4"),
    ((4, 4, 4), np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
])
def test_a_grid_that_cannot_hold_voxels_is_refused(shape, affine, message):
    with pytest.raises(ValueError, match=message):
        io.Grid(shape, affine)


def test_resample_names_what_it_cannot_use():
    scan = io.Scan(RNG.random((5, 6, 7)).astype(np.float32), ras_affine())
    grid = io.Grid((4, 4, 4), ras_affine())
    for kwargs, message in (({"order": 7}, "spline order"), ({"world_transform": np.zeros((4, 4))}, "world_transform"),
                            ({"world_transform": np.full((4, 4), np.nan)}, "world_transform")):
        with pytest.raises(ValueError, match=message):
            io.resample(scan, grid, **kwargs)
    for data in (np.zeros((5, 6)), np.zeros((0, 6, 7))):
        with pytest.raises(ValueError, match="3D and not empty"):
            io.resample(data, grid, ras_affine())
    with pytest.raises(ValueError, match="singular"):
        io.resample(scan.data, grid, np.diag([1.0, 1.0, 0.0, 1.0]))
    for size in (np.nan, 2.5, (4, 4), 0):
        with pytest.raises(ValueError, match="`size`"):
            io.Grid.of_scan(scan, size=size)
    with pytest.raises(ValueError, match="`spacing` must be one value or 3"):
        io.Grid.of_scan(scan, spacing=(1.0, 2.0))
