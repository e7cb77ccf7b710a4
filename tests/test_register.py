"""Registration: known deformations and affines are recovered; the pipeline's outputs are consistent."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import gradreg_fast as g
from gradreg_fast import metrics
from gradreg_fast.io import Grid, Scan
from gradreg_fast.register import (FieldSettings, Settings, body_mask, integrate, moments_init, optimize_affine,
                                   optimize_field, optimize_network, quick_settings, register, save_result)
from gradreg_fast.register.affine import affine_flow


def smooth_texture(shape, sigma, seed):
    noise = np.random.default_rng(seed).standard_normal(shape)
    field = ndimage.gaussian_filter(noise, sigma)
    return (field - field.min()) / (field.max() - field.min())


def smooth_displacement(shape, amplitude, sigma, seed):
    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(3)])
    return torch.from_numpy(field / np.abs(field).max() * amplitude).float().unsqueeze(0)


def inverse_flow(flow, iterations=30):
    """phi with x + phi(x) = the inverse of x -> x + flow(x): fixed point of phi = -flow(x + phi)."""
    phi = -flow.clone()
    for _ in range(iterations):
        phi = -g.warp(flow, phi, padding_mode="border")
    return phi


def test_field_registration_recovers_a_known_deformation_across_modalities():
    torch.manual_seed(0)
    shape = (32, 32, 32)
    fixed = torch.from_numpy(smooth_texture(shape, 2.5, seed=1)).float()[None, None]
    truth = smooth_displacement(shape, amplitude=4.0, sigma=5, seed=2)  # voxels
    moving = 1.0 - g.warp(fixed, truth, padding_mode="border")  # inverted contrast: a second "modality"
    expected = inverse_flow(truth)  # warp(moving, expected) == 1 - fixed
    settings = FieldSettings(convex_grid=2, search_radius=3, iterations=(30, 15), adam_grid=(2, 1))
    result = optimize_field(fixed, moving, settings)
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3  # away from the zero padding at the borders
    error_before = expected[inner].norm(dim=1).mean()
    error_after = (result.flow - expected)[inner].norm(dim=1).mean()
    assert result.flow.shape == (1, 3) + shape
    assert error_after < 0.5 * error_before, (float(error_before), float(error_after))
    assert result.losses[-1] < result.losses[0]
    assert metrics.folding_percent(result.flow) == 0.0  # scaling and squaring keeps it invertible


def test_field_registration_in_a_reordered_axis_layout():
    # The shortest axis is last here, so optimize_field works internally on the reversed layout
    # (16, 24, 32) and must hand the flow back in the caller's axis and component order.
    torch.manual_seed(0)
    shape = (32, 24, 16)
    fixed = torch.from_numpy(smooth_texture(shape, 2.0, seed=3)).float()[None, None]
    truth = smooth_displacement(shape, amplitude=3.0, sigma=4, seed=4)
    moving = 1.0 - g.warp(fixed, truth, padding_mode="border")
    # The optimiser settings pinned (the defaults' of when this was written): this checks the axis layout,
    # not the defaults, which are chosen for the validation set's single 15-step level.
    settings = FieldSettings(convex_grid=2, search_radius=3, iterations=(30, 15), adam_grid=(2, 1), lr=0.5,
                             smoothness=1.5, squarings=4)
    result = optimize_field(fixed, moving, settings)
    expected = inverse_flow(truth)
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    assert result.flow.shape == (1, 3) + shape
    assert (result.flow - expected)[inner].norm(dim=1).mean() < 0.5 * expected[inner].norm(dim=1).mean()
    # The same optimisation run by hand on the reversed layout (where no reordering happens), then
    # reversed back, gives the same flow.
    short = FieldSettings(convex_grid=2, search_radius=2, iterations=(3,), adam_grid=1)
    reverse = lambda t: t.permute(0, 1, 4, 3, 2).contiguous()  # noqa: E731
    by_hand = optimize_field(reverse(fixed), reverse(moving), short).flow
    by_hand = reverse(by_hand)[:, [2, 1, 0]]
    torch.testing.assert_close(optimize_field(fixed, moving, short).flow, by_hand, rtol=0, atol=1e-4)


@pytest.mark.parametrize("objective", ["descriptors", "mind"])
def test_affine_registration_recovers_a_known_affine(objective):
    shape, spacing = (32, 32, 32), np.array([2.0, 2.0, 3.0])
    fixed = torch.from_numpy(smooth_texture(shape, 3.0, seed=4)).float()[None, None]
    matrix = torch.tensor([[1.06, 0.02, 0.0], [0.0, 0.95, 0.03], [0.0, 0.0, 1.04]])
    shift = torch.tensor([4.0, -3.0, 5.0])  # mm
    moving = g.warp(fixed, affine_flow(matrix, shift, shape, spacing), padding_mode="border")
    inner = (slice(4, 28),) * 3  # the moving image's border repeats edge values: leave it out of the loss
    result = optimize_affine(fixed, moving, spacing, levels=(2, 1), iterations=(80, 40), lr_shift=1.0, loss_box=inner,
                             objective=objective)
    inverse = torch.linalg.inv(matrix)
    expected = affine_flow(inverse, -inverse @ shift, shape, spacing)
    found = result.voxel_flow(shape, spacing)
    error_before = expected.norm(dim=1).mean()
    error_after = (found - expected).norm(dim=1).mean()
    assert error_after < 0.1 * error_before, (float(error_before), float(error_after))
    assert np.allclose(result.matrix, inverse.numpy(), atol=0.02)
    assert np.allclose(result.shift, (-inverse @ shift).numpy(), atol=0.3)


def test_affine_refuses_an_unknown_objective():
    fixed = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="objective"):
        optimize_affine(fixed, fixed.clone(), np.ones(3), levels=(1,), iterations=(1,), objective="ssd")


def test_rigidity_penalty_is_zero_for_rotations_and_grows_with_scale_and_shear(gen):
    from gradreg_fast.register.affine import rigidity_penalty

    for _ in range(5):
        skew = torch.randn(3, 3, generator=gen, dtype=torch.float64)
        rotation = torch.linalg.matrix_exp(skew - skew.T)
        assert float(rigidity_penalty(rotation)) < 1e-20
        # scale s along one axis: (s^2 - 1)^2, whatever the rotation
        scaled = rotation @ torch.diag(torch.tensor([1.1, 1.0, 1.0], dtype=torch.float64))
        assert abs(float(rigidity_penalty(scaled)) - (1.1 ** 2 - 1) ** 2) < 1e-12
    shear = torch.eye(3, dtype=torch.float64)
    shear[0, 1] = 0.1
    assert float(rigidity_penalty(shear)) > 1e-4
    matrix = (torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, generator=gen, dtype=torch.float64))
    assert torch.autograd.gradcheck(rigidity_penalty, (matrix.requires_grad_(True),))


def test_affine_rigidity_keeps_a_rotation_and_frees_nothing_else():
    """With a large rigidity the known affine's scales are refused (the linear part stays a rotation) while a
    rigid motion is still recovered; rigidity 0 is the free affine (test above)."""
    shape, spacing = (32, 32, 32), np.array([2.0, 2.0, 3.0])
    fixed = torch.from_numpy(smooth_texture(shape, 3.0, seed=4)).float()[None, None]
    inner = (slice(4, 28),) * 3
    scaled = torch.tensor([[1.08, 0.0, 0.0], [0.0, 0.93, 0.0], [0.0, 0.0, 1.0]])
    moving = g.warp(fixed, affine_flow(scaled, torch.zeros(3), shape, spacing), padding_mode="border")
    free = optimize_affine(fixed, moving, spacing, levels=(2, 1), iterations=(40, 20), loss_box=inner)
    held = optimize_affine(fixed, moving, spacing, levels=(2, 1), iterations=(40, 20), loss_box=inner, rigidity=100.0)
    assert np.abs(np.linalg.svd(free.matrix, compute_uv=False) - 1).max() > 0.04  # the free affine scales
    assert np.abs(np.linalg.svd(held.matrix, compute_uv=False) - 1).max() < 0.01  # the held one does not
    angle = np.deg2rad(4.0)
    rotation = torch.tensor([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]],
                            dtype=torch.float32)
    shift = torch.tensor([3.0, -2.0, 4.0])
    moving = g.warp(fixed, affine_flow(rotation, shift, shape, spacing), padding_mode="border")
    result = optimize_affine(fixed, moving, spacing, levels=(2, 1), iterations=(80, 40), lr_shift=1.0, loss_box=inner,
                             rigidity=10.0)
    inverse = torch.linalg.inv(rotation)
    assert np.allclose(result.matrix, inverse.numpy(), atol=0.02)
    assert np.allclose(result.shift, (-inverse @ shift).numpy(), atol=0.3)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "1"])
def test_affine_refuses_a_bad_rigidity(value):
    fixed = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="rigidity"):
        optimize_affine(fixed, fixed.clone(), np.ones(3), levels=(1,), iterations=(1,), rigidity=value)


def test_affine_world_transform_matches_the_voxel_flow():
    grid = Grid((16, 12, 8), np.array([[0, -2.0, 0, 10], [3.0, 0, 0, -5], [0, 0, 1.5, 2], [0, 0, 0, 1]]))
    from gradreg_fast.register.affine import AffineResult

    result = AffineResult(np.array([[1.05, 0.1, 0.0], [0.0, 0.9, 0.02], [0.01, 0.0, 1.1]]), np.array([2.0, -1.0, 3.0]),
                          [])
    flow = result.voxel_flow(grid.shape, grid.spacing, dtype=torch.float64)[0].numpy()
    voxels = np.indices(grid.shape).reshape(3, -1)
    world = grid.affine[:3, :3] @ voxels + grid.affine[:3, 3:4]
    moved = result.world_transform(grid)
    by_world = moved[:3, :3] @ world + moved[:3, 3:4]
    by_flow = grid.affine[:3, :3] @ (voxels + flow.reshape(3, -1)) + grid.affine[:3, 3:4]
    assert np.allclose(by_world, by_flow, atol=1e-9)


def ellipsoid_scan(shape, affine, centre_mm, radii_mm, inside=1.0, outside=0.0):
    world = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(shape).astype(float)) + affine[:3, 3].reshape(
        3, 1, 1, 1)
    r = sum(((world[i] - centre_mm[i]) / radii_mm[i]) ** 2 for i in range(3))
    return np.where(r <= 1, inside, outside).astype(np.float32), world


def test_moments_init_matches_body_centres_across_orientations():
    ras = np.diag([2.0, 2.0, 2.5, 1.0])
    ras[:3, 3] = (-30, -40, 0)
    lps = np.diag([-3.0, -3.0, 2.0, 1.0])
    lps[:3, 3] = (60, 50, -20)
    fixed, _ = ellipsoid_scan((40, 40, 24), ras, (8.0, -2.0, 30.0), (20, 15, 12))
    moving, _ = ellipsoid_scan((40, 36, 30), lps, (10.0, 3.0, 14.0), (20, 15, 12))
    transform = moments_init(Scan(fixed, ras), Scan(moving, lps))
    assert np.allclose(transform[:3, :3], np.eye(3))
    assert np.allclose(transform[:3, 3], [2.0, 5.0, -16.0], atol=0.6)


def test_body_mask_fills_holes_slice_by_slice():
    image, _ = ellipsoid_scan((30, 30, 12), np.eye(4), (15, 15, 6), (12, 10, 20))  # cut open at top and bottom
    image[10:20, 12:18, :] = 0  # a "lung" running through every slice
    mask = body_mask(image, np.eye(4))
    assert mask[15, 15, 6] and mask[12, 14, 0]
    assert not mask[1, 1, 6]


def test_integrate_is_invertible_where_the_raw_field_folds():
    shape = (32, 8, 8)
    x0 = torch.arange(32, dtype=torch.float32).view(32, 1, 1).expand(shape)
    velocity = torch.zeros((1, 3) + shape)
    velocity[0, 0] = 8.0 * torch.sin(2 * np.pi * x0 / 32)  # derivative down to -1.57: the raw field folds
    assert metrics.folding_percent(velocity) > 0
    flow = integrate(velocity, 7)
    assert metrics.folding_percent(flow) == 0.0
    assert torch.allclose(integrate(velocity * 1e-3, 6), velocity * 1e-3, atol=1e-5)
    assert torch.equal(integrate(velocity, 0), velocity)


def test_network_instance_optimisation_trains_the_model():
    fixed = torch.from_numpy(smooth_texture((16, 16, 16), 2.0, seed=5)).float()[None, None]
    moving = g.warp(fixed, smooth_displacement((16, 16, 16), 1.5, 3, seed=6))
    flow = optimize_network(fixed, moving, name="gated", levels=(1,), iterations=(2,), lr=1e-3)
    assert flow.shape == (1, 3, 16, 16, 16) and torch.isfinite(flow).all()
    assert flow.abs().max() > 0  # the fused flow's zero-initialised output layer has been trained


# ----------------------------------------------------------------------------------------------- pipeline

def phantom(path_image, path_labels, shape, affine, centre, organs, ct: bool):
    """An ellipsoidal body with spherical organs, sampled in world space (CT in HU, or MR-like)."""
    body, world = ellipsoid_scan(shape, affine, centre, (62, 48, 36))
    labels = np.zeros(shape, np.uint8)
    for label, (offset, radius) in organs.items():
        r = np.sqrt(sum((world[i] - centre[i] - offset[i]) ** 2 for i in range(3)))
        labels[(r <= radius) & (body > 0)] = label
    texture = smooth_texture(shape, 1.5, seed=9)
    if ct:
        image = np.where(body > 0, 40.0, -1000.0) + 60 * (labels == 1) - 120 * (labels == 2) + 30 * texture
    else:
        image = np.where(body > 0, 300.0, 5.0) - 180 * (labels == 1) + 250 * (labels == 2) + 50 * texture
    nib.save(nib.Nifti1Image(image.astype(np.int16 if ct else np.float32), affine), str(path_image))
    nib.save(nib.Nifti1Image(labels, affine), str(path_labels))


def phantom_pair(folder) -> dict:
    """The two-organ phantom pair, written to ``folder``. Fixed: MR-like, LPS. Moving: CT-like, RAS, another
    body position and slightly different organs (benchmarks/sweep.py uses it as a capture-range check)."""
    lps = np.diag([-3.0, -3.0, 3.0, 1.0])
    lps[:3, 3] = (60.0, 50.0, -40.0)
    ras = np.diag([3.0, 3.0, 3.0, 1.0])
    ras[:3, 3] = (-70.0, -40.0, -10.0)
    files = {k: folder / f"{k}.nii.gz" for k in ("fixed", "fixed_labels", "moving", "moving_labels")}
    phantom(files["fixed"], files["fixed_labels"], (48, 40, 30), lps, (0.0, 0.0, 0.0),
            {1: ((-25, 0, 0), 18), 2: ((25, 5, 0), 15)}, ct=False)
    phantom(files["moving"], files["moving_labels"], (52, 44, 34), ras, (12.0, 20.0, 30.0),
            {1: ((-19, 5, 3), 20), 2: ((30, 0, -3), 13)}, ct=True)
    return files


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory):
    return phantom_pair(tmp_path_factory.mktemp("pair"))


def test_pipeline_registers_and_writes_consistent_outputs(synthetic_pair, tmp_path):
    files = synthetic_pair
    settings = Settings()  # the defaults, as `gradreg register` runs them
    result = register(files["fixed"], files["moving"], files["fixed_labels"], files["moving_labels"], settings,
                      label_names={1: "a", 2: "b"}, device="cpu", progress=False)
    stages = result.metrics["stages"]
    assert stages["before"]["mean_dice"] < 0.1  # the bodies are ~40 mm apart in world space
    assert stages["initial"]["mean_dice"] > 0.4  # centres of mass bring them together ...
    assert stages["after"]["mean_dice"] > stages["initial"]["mean_dice"] + 0.15  # ... the deformation does the rest
    assert stages["after"]["mean_asd"] < 0.5 * stages["initial"]["mean_asd"] < stages["before"]["mean_asd"]
    assert result.metrics["folding_percent"] == 0.0

    paths = save_result(result, tmp_path / "out", inputs=list(files.values()))
    assert set(p.name for p in paths.values()) == {"warped.nii.gz", "warped_labels.nii.gz", "flow.nii.gz",
                                                   "metrics.json", "overview.png"}
    fixed = nib.load(str(files["fixed"]))
    warped = nib.load(str(paths["warped.nii.gz"]))
    warped_labels = nib.load(str(paths["warped_labels.nii.gz"]))
    flow = nib.load(str(paths["flow.nii.gz"]))
    for image in (warped, warped_labels, flow):  # they open aligned with the fixed image
        assert image.shape[:3] == fixed.shape and np.allclose(image.affine, fixed.affine)
    assert flow.shape == fixed.shape + (1, 3)
    # The written field is the whole transform: sampling the moving labels at x + u(x) gives the warped labels.
    moving_labels = nib.load(str(files["moving_labels"]))
    u = np.asarray(flow.dataobj, dtype=np.float64)[:, :, :, 0, :]
    index = np.indices(fixed.shape).astype(float)
    world = np.einsum("ij,j...->...i", fixed.affine[:3, :3], index) + fixed.affine[:3, 3]
    target = np.linalg.inv(moving_labels.affine)
    coords = np.einsum("ij,...j->i...", target[:3, :3], world + u) + target[:3, 3].reshape(3, 1, 1, 1)
    resampled = ndimage.map_coordinates(np.asarray(moving_labels.dataobj), coords, order=0, mode="grid-constant")
    agreement = (resampled == np.asarray(warped_labels.dataobj)).mean()
    assert agreement > 0.999
    report = json.loads(paths["metrics.json"].read_text())
    assert report["stages"]["after"]["labels"]["1"]["name"] == "a"
    assert report["runtime_s"] > 0 and "folding_percent" in report


def test_the_intensity_windows_of_the_settings_reach_the_images(synthetic_pair):
    files = synthetic_pair
    runs = {}
    for window in ((-200.0, 300.0), (-100.0, 50.0)):
        settings = Settings(ct_window=window, affine_model="none")
        settings.field.iterations = (0,)
        runs[window] = register(files["fixed"], files["moving"], settings=settings, device="cpu", progress=False)
    # the phantom CT's body is 40 HU, its organs 100 and -80 HU: a window of -100..50 clips the first organ to the
    # body's level, so the normalised moving image (and what the engine saw) must differ
    narrow, wide = runs[(-100.0, 50.0)], runs[(-200.0, 300.0)]
    assert narrow.metrics["settings"]["ct_window"] == [-100.0, 50.0]
    assert not np.array_equal(narrow.warped, wide.warped)
    with pytest.raises(ValueError, match="mr_percentiles"):
        register(files["fixed"], files["moving"], settings=Settings(mr_percentiles=(90, 10)), device="cpu",
                 progress=False)


def test_sampling_at_voxel_coordinates_is_scipys_nearest_or_trilinear():
    from gradreg_fast.register.pipeline import _sample

    rng = np.random.default_rng(8)
    labels = rng.integers(0, 5, (9, 7, 5)).astype(np.uint8)
    image = rng.normal(size=(9, 7, 5)).astype(np.float32)
    voxels = rng.uniform(-1.5, np.array([10, 8, 6])[:, None, None], (3, 6, 11))  # some outside the volume
    nearest = _sample(labels, voxels, 0, 0)
    assert nearest.dtype == np.uint8
    np.testing.assert_array_equal(nearest, ndimage.map_coordinates(labels, voxels, order=0, mode="grid-constant"))
    np.testing.assert_allclose(_sample(image, voxels, 1, -7.0),
                               ndimage.map_coordinates(image, voxels, order=1, mode="grid-constant", cval=-7.0),
                               rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="order"):
        _sample(image, voxels, 3, 0.0)


@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 6, 4), (4, 1, 1)])
def test_stage_coordinates_equal_the_explicit_maps(shape):
    """The evaluation's voxel coordinates and world displacement, built from per-axis ramps, against the maps
    written out: indices (plus the field) through the grid's affine, the world transform and the scan's inverse."""
    from gradreg_fast.io import Grid
    from gradreg_fast.register.pipeline import _scan_coords, _world_displacement

    rng = np.random.default_rng(sum(shape))

    def random_affine():
        matrix = np.eye(4)
        matrix[:3, :3] = np.diag(rng.uniform(0.5, 3.0, 3)) + rng.normal(0, 0.2, (3, 3))
        matrix[:3, 3] = rng.uniform(-50, 50, 3)
        return matrix

    grid, scan_affine, transform = Grid(shape, random_affine()), random_affine(), random_affine()
    flow = rng.normal(0, 2, (3, *shape)).astype(np.float32)
    index = np.indices(shape, dtype=np.float64)

    def through(matrix, points):
        return np.einsum("ij,j...->i...", matrix[:3, :3], points) + matrix[:3, 3].reshape(3, 1, 1, 1)

    world = through(grid.affine, index)
    moved_world = through(transform, through(grid.affine, index + flow))
    inverse = np.linalg.inv(scan_affine)
    np.testing.assert_allclose(_scan_coords(scan_affine, transform, grid), through(inverse, through(transform, world)),
                               rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(_scan_coords(scan_affine, transform, grid, flow), through(inverse, moved_world),
                               rtol=1e-12, atol=1e-9)
    displacement = _world_displacement(transform, grid, flow)
    assert displacement.shape == (*shape, 3) and displacement.dtype == np.float64
    np.testing.assert_allclose(displacement, np.moveaxis(moved_world - world, 0, -1), rtol=1e-12, atol=1e-9)
    # a non-contiguous field (a view of a larger one) is read as its values
    wide = rng.normal(0, 2, (3, *shape[:2], 2 * shape[2])).astype(np.float32)
    np.testing.assert_array_equal(_scan_coords(scan_affine, transform, grid, wide[..., ::2]),
                                  _scan_coords(scan_affine, transform, grid, np.ascontiguousarray(wide[..., ::2])))


@pytest.mark.parametrize("names, message", [({1.5: "a"}, "whole numbers"), ({"1": "a"}, "whole-number"),
                                            ([1, 2], "must map label ids to names"), ({2 ** 70: "x"}, "whole-number"),
                                            ({0: "background"}, "positive"), ({1: "a", 1.0000001: "b"}, "twice")])
def test_bad_label_names_are_refused_before_anything_is_read(names, message, tmp_path):
    missing = tmp_path / "missing.nii.gz"  # never read: the names are checked first
    with pytest.raises(ValueError, match="`label_names`") as refused:
        register(missing, missing, label_names=names, device="cpu", progress=False)
    assert message in str(refused.value)


@pytest.mark.parametrize("field, value, message", [
    ("affine_levels", (0, 0), "affine_levels"), ("affine_levels", (-2, 2), "affine_levels"),
    ("affine_iterations", (1.5, 2), "affine_iterations"), ("affine_iterations", (-1, 2), "affine_iterations"),
    ("affine_iterations", (5,), "one entry per level"), ("network_levels", (0, 1), "network_levels"),
    ("network_iterations", (-1, 1), "network_iterations"), ("network_lr", 0.0, "network_lr"),
    ("affine_rigidity", float("nan"), "affine_rigidity"), ("field", None, "`field`"), ("fit", "wrap", "`fit`"),
    ("spacing", (1.0, 2.0), "spacing"), ("size", (4, 4), "size"), ("init", "centre", "`init`"),
])
def test_settings_that_cannot_run_are_refused_before_anything_is_read(field, value, message, tmp_path):
    settings = Settings()
    setattr(settings, field, value)
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(ValueError, match=message):
        register(missing, missing, settings=settings, device="cpu", progress=False)


def test_a_velocity_grid_of_zero_is_refused():
    from gradreg_fast.register.deformable import check_field_settings

    with pytest.raises(ValueError, match="velocity_grid"):
        check_field_settings(FieldSettings(velocity_grid=0))


def test_resize_flow_keeps_the_physical_displacement():
    from gradreg_fast.register.deformable import resize_flow

    coarse = torch.full((1, 3, 4, 5, 2), 1.5)
    coarse[:, 2] = -0.5
    fine = resize_flow(coarse, (8, 10, 4))  # voxels half the size: twice the voxel count
    assert fine.shape == (1, 3, 8, 10, 4)
    assert torch.allclose(fine[:, :2], torch.tensor(3.0)) and torch.allclose(fine[:, 2], torch.tensor(-1.0))
    assert torch.allclose(resize_flow(fine, (4, 5, 2)), coarse)  # block averages back down
    ramp = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 3, 8, 10, 4).contiguous()
    assert torch.allclose(resize_flow(ramp, (4, 5, 2))[0, 0, :, 0, 0], torch.tensor([0.25, 1.25, 2.25, 3.25]))


def test_working_grid():
    """The field engine pads to multiples of 4 (its velocity grid) after adding ``slab_margin`` voxels on each side
    of the thinnest axis (a thin slab needs the moving content just beyond it); the network needs multiples of 16
    and no margin."""
    from gradreg_fast.io import Grid
    from gradreg_fast.register.pipeline import Settings, check_settings, working_fit

    def shape(size, **settings):
        return working_fit(Grid(size, np.eye(4)), Settings(**settings)).grid.shape

    assert shape((117, 91, 20)) == (120, 92, 24)  # 20 + 2 * 1, then a multiple of 4
    assert shape((20, 91, 117)) == (24, 92, 120)
    assert shape((122, 101, 30)) == (124, 104, 32)
    assert shape((64, 64, 64)) == (68, 64, 64)  # a tie: the first axis
    assert shape((117, 91, 20), slab_margin=0) == (120, 92, 20)
    assert shape((117, 91, 20), slab_margin=6) == (120, 92, 32)
    assert shape((117, 91, 20), fit="crop") == (116, 88, 20)
    assert shape((117, 91, 20), method="network") == (128, 96, 32)
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="slab_margin"):
            check_settings(Settings(slab_margin=bad))


def test_inputs_read_together_fail_on_the_first_bad_file_in_order(synthetic_pair, tmp_path):
    """The four files are read on threads: a failure still names the first bad file in the order fixed image,
    moving image, fixed labels, moving labels, whichever thread finished first."""
    from gradreg_fast.io import NiftiError
    from gradreg_fast.register.pipeline import _read_inputs

    files = synthetic_pair
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(Path(files["moving_labels"]).read_bytes()[:200])
    missing = tmp_path / "missing.nii.gz"
    scans = _read_inputs(((files["fixed"], "fixed image"), (files["moving"], "moving image"), (None, "fixed labels"),
                          (files["moving_labels"], "moving labels")))
    assert scans[2] is None and scans[0].path == str(files["fixed"]) and scans[3].path == str(files["moving_labels"])
    with pytest.raises(FileNotFoundError, match="moving image"):
        _read_inputs(((files["fixed"], "fixed image"), (missing, "moving image"), (corrupt, "fixed labels")))
    with pytest.raises(NiftiError, match="fixed labels"):
        _read_inputs(((files["fixed"], "fixed image"), (files["moving"], "moving image"), (corrupt, "fixed labels"),
                      (missing, "moving labels")))


@pytest.mark.parametrize("preset", ["default", "quick"])
def test_an_image_registered_to_itself_does_not_move(tmp_path, preset):
    # A uniform background (air clipped by the CT window, or a blank scan) has the same cost for every
    # displacement: the search must keep such points where they are, not send them to its first candidate.
    z, y, x = np.mgrid[:40, :36, :24]
    body = ((z - 20) / 12.0) ** 2 + ((y - 18) / 10.0) ** 2 + ((x - 12) / 8.0) ** 2 < 1
    organ = ((z - 24) / 4.0) ** 2 + ((y - 15) / 4.0) ** 2 + ((x - 12) / 3.0) ** 2 < 1
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for name, volume in (("blob", 100.0 * body + 50.0 * organ), ("blank", np.zeros((20, 20, 16)))):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), path)
        settings = quick_settings() if preset == "quick" else Settings()
        settings.init, settings.affine_model = "none", "none"
        result = register(path, path, settings=settings, device="cpu", progress=False)
        assert torch.count_nonzero(result.flow) == 0, name


def _blob_files(folder):
    z, y, x = np.mgrid[:24, :20, :16]
    body = ((z - 12) / 8.0) ** 2 + ((y - 10) / 7.0) ** 2 + ((x - 8) / 6.0) ** 2 < 1
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    image, labels = folder / "image.nii.gz", folder / "labels.nii.gz"
    nib.save(nib.Nifti1Image((100.0 * body).astype(np.float32), affine), image)
    nib.save(nib.Nifti1Image(body.astype(np.int16), affine), labels)
    return image, labels, affine, body


def test_save_result_never_overwrites_the_registrations_inputs(tmp_path):
    image, _, _, _ = _blob_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    fixed = out / "warped.nii.gz"  # the fixed image lives where an output would go
    fixed.write_bytes(image.read_bytes())
    before = fixed.read_bytes()
    result = register(fixed, image, settings=quick_settings(), device="cpu", progress=False)
    for force in (False, True):  # no `inputs` given: the paths the result records are protected all the same
        with pytest.raises(FileExistsError, match="one of the inputs"):
            save_result(result, out, force=force, figure=False)
    assert fixed.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["warped.nii.gz"]


def test_label_ids_beyond_int32_are_refused_before_the_work(tmp_path, monkeypatch):
    image, _, affine, body = _blob_files(tmp_path)
    big = tmp_path / "big_labels.nii.gz"
    nib.save(nib.Nifti1Image(body.astype(np.int64) * 2 ** 40, affine, dtype=np.int64), big)
    small = tmp_path / "labels.nii.gz"

    def no_work(*args, **kwargs):
        raise AssertionError("the registration started")

    monkeypatch.setattr("gradreg_fast.register.pipeline.optimize_affine", no_work)
    with pytest.raises(ValueError, match=r"moving labels .*big_labels.*beyond int32"):
        register(image, image, small, big, settings=quick_settings(), device="cpu", progress=False)


def test_a_blank_image_is_named(tmp_path):
    image, _, affine, _ = _blob_files(tmp_path)
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 16), np.float32), affine), blank)
    for fixed, moving, name in ((image, blank, "moving"), (blank, image, "fixed")):
        with pytest.raises(ValueError, match=f"the {name} image .*blank.nii.gz.*no voxel above the threshold"):
            register(fixed, moving, settings=quick_settings(), device="cpu", progress=False)
