"""Deformable registration of one pair by instance optimisation, coarse to fine.

Two ways, both under the structure of eq. 2 of Xu et al. (an image similarity, a gradient-map
similarity weighted by alpha, and smoothness terms):

* :func:`optimize_field` (the default; no trained model needed) optimises a displacement field
  directly. One field serves both similarity terms (a documented choice): the image term compares the
  warped moving image with the fixed one, the gradient term compares the warped gradient-magnitude map
  G(moving) with G(fixed) (G = :func:`gradreg_fast.gradient_magnitude`), both with the fused MIND-SSC
  loss (:func:`gradreg_fast.mind_loss`). With one field, eq. 2's two regularisers (on the image and the
  gradient branch's fields) fall on the same field and merge into one smoothness term. Two independent
  fields would not interact (each similarity term would only see its own field), so the gradient term
  could never guide the field that is returned.
* :func:`optimize_network` fine-tunes the dual-branch network (from a checkpoint, or freshly built) on
  the single pair with the project's :class:`gradreg_fast.losses.RegistrationLoss`.

The field is a stationary velocity on a coarse control grid, integrated by scaling and squaring (so it
stays invertible: no folding even where the anatomy of two people differs a lot) and upsampled
trilinearly to the images. Coarse to fine: each level has an image pyramid factor (block averages) and
a control-grid factor; the velocity is carried from level to level. Labels are never used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import gradient_magnitude, mind_loss, mind_ssc, warp
from ..losses import flow_smoothness
from .affine import coarse_box, downsample, record_step


@dataclass
class FieldSettings:
    """How :func:`optimize_field` runs.

    The defaults were chosen on the bundled CT/MR pair (3 mm, 128x96x32 working grid), measuring mean
    organ Dice. Two findings shaped them. MIND-SSC on a 1/4-scale image level (12 mm voxels, 8 slices)
    misled the field (the left kidney went astray), so the coarsest images are at 1/2 scale; the
    capture range comes from the field's own resolution instead: its control grid is at 1/8, then 1/4
    of the full grid's resolution on 1/2-scale images, then at 1/2 on full-resolution images. With
    this schedule the result hardly depended on the affine stage (Dice 0.708-0.715 after affines of
    20+20, 40+40 and 100+50 steps), where a full-resolution field from the start had swung between
    0.61 and 0.73. Smoothness 0.6 / 0.9 / 1.5 gave Dice 0.735 / 0.708 / 0.648 and SDlogJ 0.49 / 0.42 /
    0.34; 0.9 is the default, trading a little overlap for a more regular field. Those figures were
    taken with 40, 40, 20 steps (now :func:`gradreg_fast.register.thorough_settings`); the default
    15, 15, 3 steps give Dice 0.648 in about a third of the time (benchmarks/RESULTS.md).
    """

    levels: tuple = (2, 2, 1)  # image pyramid factor of each level, coarse to fine
    iterations: tuple = (15, 15, 3)  # Adam steps per level
    control: int | tuple = (4, 2, 2)  # the control grid is this many times coarser than the level's images
    # (one number for every level, or one per level)
    lr: float = 1.0  # control-grid voxels per Adam step
    alpha: float = 0.5  # weight of the gradient-map similarity (eq. 2, abdomen preset)
    smoothness: float = 0.9  # weight of flow_smoothness(velocity) (eq. 2's gamma + beta on one field)
    squarings: int = 6  # scaling-and-squaring steps (0: the velocity is used as a displacement)
    penalty: str = "l1"  # MIND-SSC penalty, "l1" or "l2"
    radius: int | None = None  # MIND-SSC patch radius (None: the op's default, 2)
    dilation: int | None = None  # MIND-SSC neighbour distance (None: the op's default, 2)


@dataclass
class FieldResult:
    flow: torch.Tensor  # (1, 3, D, H, W) displacement, voxels of the full grid
    velocity: torch.Tensor  # (1, 3, d, h, w) the optimised velocity on the last control grid
    losses: list = field(default_factory=list)


def integrate(velocity: torch.Tensor, squarings: int, backend: str | None = None) -> torch.Tensor:
    """exp(velocity) by scaling and squaring: u <- u + u o (id + u), ``squarings`` times (0: the field itself).

    Each squaring composes the map with itself through the fused warp (border padding: the field is
    extended flat beyond the grid), which keeps the result invertible up to discretisation.
    """
    flow = velocity / (2 ** squarings)
    for _ in range(squarings):
        flow = flow + warp(flow, flow, padding_mode="border", backend=backend)
    return flow


def resize_flow(flow: torch.Tensor, shape) -> torch.Tensor:
    """A voxel-unit field on a grid -> the same displacement on a grid of ``shape`` covering the same box.

    Downsampling by a whole factor averages blocks; anything else is trilinear (``align_corners=False``,
    the geometry of block averages). Displacements are rescaled to the new voxel size.
    """
    old, shape = tuple(flow.shape[2:]), tuple(shape)
    if old == shape:
        return flow
    scale = torch.tensor([n / o for n, o in zip(shape, old)], dtype=flow.dtype, device=flow.device).view(1, 3, 1, 1, 1)
    factor = old[0] // shape[0]
    if factor > 1 and all(o == n * factor for o, n in zip(old, shape)):
        return F.avg_pool3d(flow, factor, factor) * scale
    return F.interpolate(flow, size=shape, mode="trilinear", align_corners=False) * scale


def _permute_axes(volume: torch.Tensor, order) -> torch.Tensor:
    """(N, C, *spatial) with spatial axis i taken from the input's axis order[i], contiguous."""
    return volume.permute(0, 1, *(2 + axis for axis in order)).contiguous()


def _permute_field(field: torch.Tensor, order, inverse) -> torch.Tensor:
    """A displacement field computed in the axis order ``order`` back in the original order: the
    spatial axes move back, and component j (along original axis j) is the one along order's axis."""
    return _permute_axes(field, inverse)[:, list(inverse)].contiguous()


def _per_level(value, count: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * count
    if len(values) != count:
        raise ValueError(f"FieldSettings: `{name}` must be one number or one per level ({count}), got {value!r}")
    return values


def optimize_field(fixed: torch.Tensor, moving: torch.Tensor, settings: FieldSettings | None = None,
                   loss_box=None, progress=None, backend: str | None = None) -> FieldResult:
    """Instance-optimise a displacement field warping ``moving`` onto ``fixed`` ((1, 1, D, H, W) each).

    Each Adam step: integrate the control-grid velocity, upsample the displacement to the level's
    images, warp the moving image (and its gradient map) with the fused warp, and add the MIND-SSC
    terms and the smoothness of the velocity.

    Args:
        loss_box: slices of the full grid where the similarity is measured (the fixed field of view),
            so that zero padding outside it does not pull the field; the smoothness covers the whole grid.
        progress: a tqdm-like object, updated once per step.

    Returns:
        :class:`FieldResult` with the full-resolution displacement.
    """
    settings = settings or FieldSettings()
    if fixed.dim() == 5 and fixed.shape == moving.shape:
        # Every term of the loss treats the three axes alike, so the optimisation may run in any axis
        # order. The fused kernels vectorise along the last (contiguous) axis and pay a fixed cost per
        # row: with the longest axis last they run up to 2x faster on thick-slice grids (measured on
        # the bundled pair: 128x96x32 -> 32x96x128). The result comes back in the caller's order.
        order = tuple(sorted(range(3), key=lambda axis: (fixed.shape[2 + axis], axis)))
        if fixed.shape[2 + order[2]] > fixed.shape[4]:
            box = None if loss_box is None else tuple(loss_box[axis] for axis in order)
            result = optimize_field(_permute_axes(fixed, order), _permute_axes(moving, order), settings, box,
                                    progress, backend)
            inverse = tuple(order.index(axis) for axis in range(3))
            return FieldResult(_permute_field(result.flow, order, inverse), _permute_field(result.velocity, order,
                                                                                           inverse), result.losses)
    count = len(settings.levels)
    iterations = _per_level(settings.iterations, count, "iterations")
    controls = _per_level(settings.control, count, "control")
    if fixed.dim() != 5 or fixed.shape[:2] != (1, 1) or fixed.shape != moving.shape:
        raise ValueError(f"`fixed` and `moving` must both be (1, 1, D, H, W), got {tuple(fixed.shape)} and "
                         f"{tuple(moving.shape)}")
    shape = tuple(fixed.shape[2:])
    for factor, control in zip(settings.levels, controls):
        if any(n % (factor * control) for n in shape):
            raise ValueError(f"grid {shape} is not divisible by the pyramid factor {factor} times the control "
                             f"factor {control}")

    mind_settings = {"radius": settings.radius, "dilation": settings.dilation}
    mind_settings = {key: value for key, value in mind_settings.items() if value is not None}

    def descriptor(image):  # of a fixed image, once per level: the loss then skips it at every step
        with torch.no_grad():
            return mind_ssc(image, backend=backend, **mind_settings)

    def similarity(warped, target_descriptor):
        return mind_loss(warped, fixed_descriptor=target_descriptor, penalty=settings.penalty, backend=backend,
                         **mind_settings)

    velocity = torch.zeros((1, 3) + tuple(n // (settings.levels[0] * controls[0]) for n in shape),
                           dtype=fixed.dtype, device=fixed.device)
    losses = []
    for factor, steps, control in zip(settings.levels, iterations, controls):
        fixed_level, moving_level = downsample(fixed, factor), downsample(moving, factor)
        level_shape = tuple(fixed_level.shape[2:])
        box = coarse_box(loss_box, factor, level_shape)
        fixed_crop = descriptor(fixed_level[box])
        if settings.alpha > 0:
            moving_gradient = gradient_magnitude(moving_level, backend=backend)
            fixed_gradient = descriptor(gradient_magnitude(fixed_level, backend=backend)[box])
        velocity = resize_flow(velocity.detach(), tuple(n // control for n in level_shape)).requires_grad_(True)
        optimizer = torch.optim.Adam([velocity], lr=settings.lr)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            flow = resize_flow(integrate(velocity, settings.squarings, backend), level_shape)
            loss = similarity(warp(moving_level, flow, backend=backend)[box], fixed_crop)
            if settings.alpha > 0:
                warped_gradient = warp(moving_gradient, flow, backend=backend)[box]
                loss = loss + settings.alpha * similarity(warped_gradient, fixed_gradient)
            loss = loss + settings.smoothness * flow_smoothness(velocity)
            loss.backward()
            optimizer.step()
            record_step(loss, factor, losses, progress)
    velocity = velocity.detach()
    with torch.no_grad():
        flow = resize_flow(integrate(velocity, settings.squarings, backend), shape)
    return FieldResult(flow, velocity, losses)


def _crop_output(output, box):
    """A model output with every spatial tensor cut to ``box`` (so the loss sees only the fixed field of view)."""
    return output._replace(**{name: getattr(output, name)[box] for name in output._fields
                              if isinstance(getattr(output, name), torch.Tensor) and getattr(output, name).dim() == 5})


def optimize_network(fixed: torch.Tensor, moving: torch.Tensor, checkpoint=None, name: str = "gated",
                     levels=(2, 1), iterations=(100, 50), lr: float = 1e-4, loss_box=None, progress=None,
                     backend: str | None = None) -> torch.Tensor:
    """Instance optimisation of the dual-branch network on one pair; returns its (1, 3, D, H, W) flow.

    The network comes from ``checkpoint`` (:func:`gradreg_fast.train.load_checkpoint`) or is built fresh
    (:func:`gradreg_fast.models.build_model`, ``name``). Its weights are fine-tuned with Adam on eq. 2
    (:class:`gradreg_fast.losses.RegistrationLoss`, abdomen preset) for ``iterations`` steps per pyramid
    level: first on block-averaged images (``levels`` factors > 1), then at full resolution; the
    weights carry over between levels (the network is fully convolutional).
    """
    from .. import _backend
    from ..losses import RegistrationLoss

    if len(levels) != len(iterations):
        raise ValueError("`levels` and `iterations` must have the same length")
    if checkpoint is not None:
        from ..train import load_checkpoint

        model = load_checkpoint(checkpoint, map_location=fixed.device)[0]
    else:
        from ..models import build_model

        model = build_model(name)
    model = model.to(fixed.device).train()
    loss_fn = RegistrationLoss(preset="abdomen")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    previous = _backend._default_backend
    if backend is not None:
        _backend.set_backend(backend)  # the model calls the ops without a backend argument
    try:
        for factor, steps in zip(levels, iterations):
            fixed_level, moving_level = downsample(fixed, factor), downsample(moving, factor)
            box = coarse_box(loss_box, factor, fixed_level.shape[2:])
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                output = model(moving_level, fixed_level)
                loss, _ = loss_fn(_crop_output(output, box), moving_level[box], fixed_level[box])
                loss.backward()
                optimizer.step()
                record_step(loss, factor, None, progress)
        model.eval()
        with torch.no_grad():
            return model(moving, fixed).flow.detach()
    finally:
        _backend.set_backend(previous)
