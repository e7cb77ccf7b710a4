"""The deformable engine: box smoothing, coupled convex optimisation, inverse consistency, the Adam
refinement's convergence, and the whole engine on a known deformation and on the bundled real pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import gradreg_fast as g
from gradreg_fast import metrics
from gradreg_fast.register import FieldSettings, Settings, optimize_field, register
from gradreg_fast.register.convex import convex_field, coupled_convex, inverse_consistent


def smooth(shape, sigma, seed, amplitude=1.0):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return torch.from_numpy(field / np.abs(field).max() * amplitude).float()


@pytest.mark.parametrize("shape", [(1, 1, 4, 8, 2), (2, 3, 8, 4, 12), (1, 12, 16, 8, 4)])
def test_downsample_is_the_block_mean(shape, gen):
    from gradreg_fast.register.affine import downsample

    volume = torch.randn(shape, generator=gen, dtype=torch.float64)
    factors = [f for f in (2, 4) if all(n % f == 0 for n in shape[2:])]
    for factor in factors:
        expected = F.avg_pool3d(volume, factor, factor)
        torch.testing.assert_close(downsample(volume, factor), expected, rtol=1e-12, atol=1e-12)
        # a non-contiguous input, and the gradient (the adjoint spreads each block's weight / factor^3)
        strided = volume.contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(downsample(strided, factor), expected, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda v: downsample(v, factor), (volume[:1, :1].clone().requires_grad_(),))
    assert downsample(volume, 1) is volume
    # an axis not divisible by the factor: its trailing voxels are dropped, as avg_pool3d drops them
    odd = volume[:, :, :3]
    torch.testing.assert_close(downsample(odd, 2), F.avg_pool3d(odd, 2, 2), rtol=1e-12, atol=1e-12)


def test_cost_volume_smoothing_with_and_without_autograd(gen):
    from gradreg_fast.register.convex import cost_volume

    fixed = torch.randn(1, 4, 6, 5, 7, generator=gen, dtype=torch.float64)
    moving = torch.randn(1, 4, 6, 5, 7, generator=gen, dtype=torch.float64)
    plain = cost_volume(fixed, moving, 1)
    leaf = moving.clone().requires_grad_()
    tracked = cost_volume(fixed, leaf, 1)  # autograd recorded through the cost volume and its smoothing
    torch.testing.assert_close(tracked.detach(), plain, rtol=1e-12, atol=1e-12)
    from gradreg_fast import reference

    expected = reference.box_mean(reference.mind_cost_volume(fixed, moving, 1), 2)[0]  # two box passes of the costs
    torch.testing.assert_close(plain, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(tracked.sum(), leaf)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_coupled_convex_follows_the_cost_minima_and_smooths_outliers(gen):
    radius, shape = 2, (6, 7, 5)
    table = g.mind_cost_volume_displacements(radius, dtype=torch.float64)  # (K, 3)
    truth = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    # a cost that is a quadratic bowl about the true displacement, plus noise, at every point ...
    cost = ((table - truth) ** 2).sum(1).view(-1, 1, 1, 1).expand(-1, *shape).clone()
    cost += 0.1 * torch.rand(cost.shape, generator=gen, dtype=torch.float64)
    # ... except one point, whose own minimum lies far away: the coupling pulls it back to its neighbours
    cost[:, 3, 3, 2] = ((table - torch.tensor([-2.0, 2.0, 2.0], dtype=torch.float64)) ** 2).sum(1) * 0.05
    field = coupled_convex(cost, radius)
    assert field.shape == (1, 3) + shape
    torch.testing.assert_close(field[0, :, 3, 3, 2], truth, rtol=0, atol=0.35)
    assert (field[0] - truth.view(3, 1, 1, 1)).abs().mean() < 0.1


def test_convex_field_recovers_a_shift_of_the_features(gen):
    features = torch.rand((1, 6, 20, 18, 16), generator=gen, dtype=torch.float64)
    features = g.box_mean(features)  # some spatial coherence, as pooled descriptors have
    shift = (2, -1, 1)  # cells: moving(x + shift) = fixed(x) (away from the borders, which roll wraps)
    moving = torch.roll(features, shifts=shift, dims=(2, 3, 4))
    field = convex_field(features, moving, radius=3, symmetric=False)
    inner = field[0, :, 6:-6, 6:-6, 6:-6]
    torch.testing.assert_close(inner, torch.tensor(shift, dtype=torch.float64).view(3, 1, 1, 1).expand_as(inner),
                               rtol=0, atol=0.05)
    symmetric = convex_field(features, moving, radius=3, symmetric=True)[0, :, 6:-6, 6:-6, 6:-6]
    assert (symmetric - torch.tensor(shift, dtype=torch.float64).view(3, 1, 1, 1)).abs().mean() < 0.15


def test_inverse_consistency_makes_the_two_fields_inverse():
    shape = (16, 14, 12)
    forward = torch.stack([smooth(shape, 3, s, 2.0) for s in (1, 2, 3)])[None]
    backward = -forward + 0.5 * torch.stack([smooth(shape, 3, s, 1.0) for s in (4, 5, 6)])[None]

    def residual(u, v):  # (id + v) o (id + u) - id = u + v o (id + u)
        return (u + g.warp(v, u, padding_mode="border"))[..., 3:-3, 3:-3, 3:-3].norm(dim=1).mean()

    before = residual(forward, backward)
    u, v = inverse_consistent(forward, backward, iterations=15)
    assert residual(u, v) < 0.2 * before
    assert residual(v, u) < 0.2 * before


def _known_pair(shape, amplitude, seed):
    fixed = smooth(shape, 2.0, seed)[None, None]
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    truth = torch.stack([smooth(shape, 5, seed + s, amplitude) for s in (1, 2, 3)])[None]
    moving = 1.0 - g.warp(fixed, truth, padding_mode="border")  # inverted contrast: a second "modality"
    phi = -truth.clone()  # the inverse map: x + phi(x) undoes x -> x + truth(x)
    for _ in range(30):
        phi = -g.warp(truth, phi, padding_mode="border")
    return fixed, moving, phi


@pytest.mark.parametrize("alpha, inverse_consistent", [(0.0, False), (0.5, False), (0.5, True)])
def test_engine_recovers_a_known_deformation_and_each_level_ends_lower(alpha, inverse_consistent):
    shape = (32, 32, 24)
    fixed, moving, expected = _known_pair(shape, amplitude=5.0, seed=10)
    # A two-level schedule with its optimiser settings pinned (the defaults of when this was written), not the
    # single-level defaults chosen on the validation set.
    settings = FieldSettings(alpha=alpha, convex_grid=2, search_radius=4, symmetric=True, iterations=(20, 10),
                             adam_grid=(4, 2), lr=0.5, smoothness=1.5, squarings=4,
                             inverse_consistent=inverse_consistent)
    result = optimize_field(fixed, moving, settings)
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    error_before = expected[inner].norm(dim=1).mean()
    error_convex = (result.convex_flow - expected)[inner].norm(dim=1).mean()
    error_after = (result.flow - expected)[inner].norm(dim=1).mean()
    assert error_convex < 0.7 * error_before, (float(error_before), float(error_convex))
    assert error_after < 0.4 * error_before, (float(error_before), float(error_after))
    assert len(result.level_objectives) == 2
    for start, end in result.level_objectives:
        assert end < start
    assert metrics.folding_percent(result.flow) == 0.0


def test_engine_in_a_reordered_axis_layout_equals_the_work_done_by_hand():
    shape = (32, 24, 16)  # shortest axis last: the engine works on the reversed layout internally
    fixed, moving, _ = _known_pair(shape, amplitude=3.0, seed=20)
    settings = FieldSettings(convex_grid=4, search_radius=2, iterations=(3,))
    reverse = lambda t: t.permute(0, 1, 4, 3, 2).contiguous()  # noqa: E731
    by_hand = optimize_field(reverse(fixed), reverse(moving), settings)
    result = optimize_field(fixed, moving, settings)
    torch.testing.assert_close(result.flow, reverse(by_hand.flow)[:, [2, 1, 0]], rtol=0, atol=1e-4)
    torch.testing.assert_close(result.convex_flow, reverse(by_hand.convex_flow)[:, [2, 1, 0]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, value", [("convex_grid", 0), ("search_radius", -1), ("adam_grid", 1.5),
                                         ("lr", float("nan")), ("smoothness", -1.0), ("iterations", (5, -1)),
                                         ("convex_grid", 5), ("adam_grid", (2, 1)), ("inverse_consistent", 1),
                                         ("symmetric", "yes")])
def test_engine_refuses_bad_settings(name, value):
    fixed = torch.rand(1, 1, 16, 16, 8)
    with pytest.raises(ValueError, match=name):
        optimize_field(fixed, fixed.clone(), FieldSettings(**{name: value}))


def test_inverse_consistent_objective_is_symmetric_in_the_images(gen):
    """With ``inverse_consistent`` the Adam objective holds the map and its inverse alike: swapping the images and
    negating the velocity gives the same value, bit for bit; without it the objective is one-sided. Its second
    data term is the fixed descriptors warped by exp(-v), the inverse map, against the moving ones."""
    from gradreg_fast.register.deformable import _Objective, integrate, resize_flow

    shape = (12, 10, 8)
    fixed, moving = torch.rand((2, 1, 6) + shape, generator=gen)
    velocity = torch.randn((1, 3) + tuple(n // 2 for n in shape), generator=gen) * 0.7
    box = (slice(None), slice(None), slice(1, 11), slice(0, 9), slice(2, 8))
    for both_ways in (True, False):
        settings = FieldSettings(inverse_consistent=both_ways, velocity_grid=None)
        forward = _Objective(fixed, moving, box, settings, None)(velocity)
        swapped = _Objective(moving, fixed, box, settings, None)(-velocity)
        assert torch.equal(forward, swapped) == both_ways, (float(forward), float(swapped))
    # The data terms alone, the mirror one computed here from the ops.
    one_way = FieldSettings(velocity_grid=None, smoothness=0.0)
    both = FieldSettings(velocity_grid=None, smoothness=0.0, inverse_consistent=True)
    smoothed = g.box_mean(velocity, both.smoothing_passes)
    inverse = resize_flow(integrate(-smoothed, both.squarings), shape)
    inside = torch.zeros((1, 1) + shape)
    inside[box] = 1.0
    mirror = g.warped_sq_diff(fixed, moving, inverse, inside, padding_mode="border") / inside.sum()
    expected = 0.5 * (_Objective(fixed, moving, box, one_way, None)(velocity) + mirror)
    torch.testing.assert_close(_Objective(fixed, moving, box, both, None)(velocity), expected)
    assert FieldSettings().inverse_consistent is False  # off by default


def test_bundled_pair_objective_falls_at_every_level_and_dice_rises():
    from gradreg_fast.cli import DEMO_LABELS, demo_data_dir

    folder = demo_data_dir()
    result = register(folder / "mr.nii.gz", folder / "ct.nii.gz", folder / "mr_labels.nii.gz",
                      folder / "ct_labels.nii.gz", Settings(), label_names=DEMO_LABELS, device="cpu", progress=False)
    stages = result.metrics["stages"]
    objectives = result.metrics["deformable_objectives"]
    assert objectives and all(end < start for start, end in objectives)
    assert stages["after"]["mean_dice"] > stages["affine"]["mean_dice"] + 0.05
    assert result.metrics["folding_percent"] < 0.1


def test_principal_axes_keep_the_leading_variance_and_never_lengthen_a_difference(gen):
    from gradreg_fast.register.deformable import _principal

    base = torch.randn((1, 3, 6, 5, 4), generator=gen, dtype=torch.float64)
    mixing = torch.randn((8, 3), generator=gen, dtype=torch.float64)
    fixed = torch.einsum("kc,ncdhw->nkdhw", mixing, base)  # 8 channels spanning 3 directions
    moving = fixed + 0.01 * torch.randn(fixed.shape, generator=gen, dtype=torch.float64)
    assert _principal(fixed, moving, None) is None and _principal(fixed, moving, 8) is None  # all kept
    project = _principal(fixed, moving, 3)
    small_f, small_m = project(fixed), project(moving)
    assert small_f.shape == (1, 3, 6, 5, 4)
    full = (fixed - moving).square().sum(1)
    kept = (small_f - small_m).square().sum(1)
    assert bool((kept <= full * (1 + 1e-9)).all())
    # three components hold every direction of the data, so distances between points of that span stay
    rolled = fixed.roll(1, 2)
    project = _principal(fixed, rolled, 3)
    torch.testing.assert_close((project(fixed) - project(rolled)).square().sum(1), (fixed - rolled).square().sum(1),
                               rtol=1e-9, atol=1e-9)
    # linear: it commutes with the block averaging the stages apply (one basis for every grid)
    from gradreg_fast.register.affine import downsample

    even = torch.randn((1, 8, 4, 6, 4), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(project(downsample(even, 2)), downsample(project(even), 2), rtol=1e-12, atol=1e-12)
