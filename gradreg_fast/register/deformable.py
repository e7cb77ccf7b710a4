"""Deformable registration of one pair by instance optimisation: a discrete convex search, then Adam.

Two ways, both under the structure of eq. 2 of Xu et al. (an image similarity, a gradient-map
similarity weighted by alpha, and smoothness terms):

* :func:`optimize_field` (the default; no trained model needed) finds a displacement field in two
  stages, after ConvexAdam (Siebert, Hansen, Heinrich 2021): a coupled convex optimisation over a fused
  MIND-SSC cost volume (:mod:`.convex`, large capture range, no gradient), then an Adam refinement of a
  stationary velocity integrated by scaling and squaring (invertible maps). The paper's gradient guidance
  enters both: the MIND-SSC descriptors of the gradient-magnitude maps G(fixed), G(moving) (eq. 1,
  :func:`gradreg_fast.gradient_magnitude`) join the image descriptors with weight ``alpha``, in the cost
  volume and in the refinement's objective. One field serves both terms (a documented choice): two
  independent fields would not interact, so the gradient term could never guide the returned field,
  and eq. 2's two regularisers then fall on the same field and merge into one smoothness term.
* :func:`optimize_network` fine-tunes the dual-branch network (from a checkpoint, or freshly built) on
  the single pair with the project's :class:`gradreg_fast.losses.RegistrationLoss`.

Labels are never used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import box_mean, gradient_magnitude, integrate_velocity, mind_ssc, warped_sq_diff
from ..losses import flow_smoothness
from ..ops._common import check_number_argument
from .affine import coarse_box, downsample, record_step
from .convex import COUPLING, convex_field


@dataclass
class FieldSettings:
    """How :func:`optimize_field` runs: a discrete coupled convex search, then an Adam refinement.

    The defaults were chosen on the validation set of benchmarks/validation.py (six same-subject CT/MR-like
    cases with known deformations, built from the bundled scans, and inter-subject cases with a third
    person's CT; sweep 10 of benchmarks/results/engine_sweeps.md, confirmed on twelve inter-subject cases by
    sweep 12; ``cost_smoothing`` and ``smoothness`` chosen again by sweep 16, after ties in the first search
    stopped going to the corner displacement), never on the bundled pair, which
    benchmarks/RESULTS.md reports. Units: ``convex_grid`` and ``adam_grid`` in voxels of
    the working grid; ``search_radius`` in convex control cells; ``lr`` in Adam-grid voxels per step.
    """

    # descriptors (MIND-SSC of the images, and of their gradient-magnitude maps for alpha > 0)
    radius: int = 1  # MIND-SSC patch radius
    dilation: int = 2  # MIND-SSC neighbour distance
    alpha: float = 0.5  # weight of the gradient-map terms (eq. 2's alpha, abdomen preset); 0 switches them off
    channels: int | None = None  # principal components kept of the stacked (weighted) descriptors; None: all
    # stage 1: coupled convex optimisation over a cost volume
    convex_grid: int = 2  # control-point spacing of the discrete search
    search_radius: int = 2  # displacements of -r..r control cells per axis, (2r+1)^3 of them
    coupling: tuple = COUPLING
    cost_smoothing: int = 3  # 3x3x3 box passes over the cost volume (a point's cost reflects its neighbourhood)
    symmetric: bool = True  # inverse-consistent forward and backward searches
    ic_iterations: int = 5  # inverse-consistency iterations of the symmetric search
    # stage 2: Adam on a finer control grid, stationary velocity integrated by scaling and squaring
    adam_grid: int | tuple = 2  # one for every level, or one per level (coarse to fine)
    iterations: tuple = (15,)  # Adam steps of each level
    lr: float = 1.0
    warmup: int = 5  # steps over which the learning rate ramps up (Adam's first steps are the largest)
    smoothness: float = 2.0  # weight of the squared spatial gradient of the (smoothed) velocity on its own grid
    squarings: int = 3  # scaling-and-squaring steps (0: the velocity is used as a displacement)
    smoothing_passes: int = 2  # 3x3x3 box passes applied to the velocity parameters (a B-spline-like basis)
    # The Adam stage's objective also holds the inverse map exp(-v) to the images (fixed descriptors warped by it
    # against the moving ones): the map and its inverse are refined together (the convex stage's counterpart is
    # `symmetric`). Off by default: on the validation set it
    # lowers the same-subject endpoint error (2.34 against 2.43 mm) but loses inter-subject Dice (0.565 against
    # 0.586) at 1.2-1.5 times the work (engine_sweeps.md, sweep 12, the rows after the table).
    inverse_consistent: bool = False
    velocity_grid: int | None = 4  # the velocity's control grid (a multiple of each level's adam_grid; None: the
    # Adam grid): integrated there, its displacement upsampled to the Adam grid for the warp


@dataclass
class FieldResult:
    flow: torch.Tensor  # (1, 3, D, H, W) displacement, voxels of the full grid
    velocity: torch.Tensor  # (1, 3, d, h, w) the optimised (smoothed) velocity on its control grid
    losses: list = field(default_factory=list)  # the objective after every Adam step
    level_objectives: list = field(default_factory=list)  # (start, end) objective of every Adam level
    convex_flow: torch.Tensor | None = None  # (1, 3, D, H, W) the convex stage's field alone


def integrate(velocity: torch.Tensor, squarings: int, backend: str | None = None) -> torch.Tensor:
    """exp(velocity) by scaling and squaring: u <- u + u o (id + u), ``squarings`` times (0: the field itself).

    The fused :func:`gradreg_fast.integrate_velocity` with border padding (the field is extended flat
    beyond the grid), which keeps the result invertible up to discretisation.
    """
    return integrate_velocity(velocity, squarings, padding_mode="border", backend=backend)


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
        return downsample(flow, factor) * scale
    return F.interpolate(flow, size=shape, mode="trilinear", align_corners=False) * scale


def _permute_axes(volume: torch.Tensor, order) -> torch.Tensor:
    """(N, C, *spatial) with spatial axis i taken from the input's axis order[i], contiguous."""
    return volume.permute(0, 1, *(2 + axis for axis in order)).contiguous()


def _permute_field(field: torch.Tensor, order, inverse) -> torch.Tensor:
    """A displacement field computed in the axis order ``order`` back in the original order: the
    spatial axes move back, and component j (along original axis j) is the one along order's axis."""
    return _permute_axes(field, inverse)[:, list(inverse)].contiguous()


def _levels(settings: FieldSettings) -> list:
    """[(Adam grid, steps)] of every Adam level."""
    steps = tuple(settings.iterations) if isinstance(settings.iterations, (tuple, list)) else (settings.iterations,)
    if not steps or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in steps):
        raise ValueError(f"FieldSettings: `iterations` must be a tuple of step counts >= 0, got {settings.iterations!r}")
    grids = settings.adam_grid if isinstance(settings.adam_grid, (tuple, list)) else (settings.adam_grid,) * len(steps)
    if len(grids) != len(steps) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grids):
        raise ValueError(f"FieldSettings: `adam_grid` must be one integer >= 1 or one per level ({len(steps)}), "
                         f"got {settings.adam_grid!r}")
    return list(zip(grids, steps))


def check_field_settings(settings: FieldSettings) -> list:
    """Refuse values no grid can run (a ValueError naming the field); the Adam levels of :func:`_levels`
    otherwise. :func:`_check_settings` adds what depends on the grid."""
    if not isinstance(settings, FieldSettings):
        raise ValueError(f"`field` must be a FieldSettings, got {settings!r}")
    if settings.channels is not None and (isinstance(settings.channels, bool) or not isinstance(settings.channels, int)
                                          or settings.channels < 1):
        raise ValueError(f"FieldSettings: `channels` must be an integer >= 1 or None, got {settings.channels!r}")
    for name in ("radius", "dilation", "convex_grid", "search_radius", "warmup", "ic_iterations", "cost_smoothing"):
        value = getattr(settings, name)
        low = 0 if name in ("search_radius", "warmup", "ic_iterations", "cost_smoothing") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"FieldSettings: `{name}` must be an integer >= {low}, got {value!r}")
    for name in ("symmetric", "inverse_consistent"):
        if not isinstance(getattr(settings, name), bool):
            raise ValueError(f"FieldSettings: `{name}` must be True or False, got {getattr(settings, name)!r}")
    for name in ("alpha", "lr", "smoothness"):
        check_number_argument("FieldSettings", name, getattr(settings, name))
    levels = _levels(settings)
    if settings.velocity_grid is not None:
        if isinstance(settings.velocity_grid, bool) or not isinstance(settings.velocity_grid, int) \
                or settings.velocity_grid < 1 or any(settings.velocity_grid % grid for grid, _ in levels):
            raise ValueError(f"FieldSettings: `velocity_grid` must be None or a multiple (>= 1) of every adam_grid, "
                             f"got {settings.velocity_grid!r}")
    return levels


def _check_settings(settings: FieldSettings, shape) -> list:
    """:func:`check_field_settings`, and that every grid of the settings divides ``shape``."""
    levels = check_field_settings(settings)
    grids = [("convex_grid", settings.convex_grid)] + [("adam_grid", grid) for grid, _ in levels]
    if settings.velocity_grid is not None:
        grids.append(("velocity_grid", settings.velocity_grid))
    for name, grid in grids:
        if any(n % grid for n in shape):
            raise ValueError(f"grid {tuple(shape)} is not divisible by FieldSettings.{name} = {grid}")
    return levels


def _outside(loss_box, factor: int, shape) -> torch.Tensor | None:
    """(d, h, w) bool: the points of a ``factor``-coarser grid outside the fixed field of view."""
    if loss_box is None:
        return None
    inside = torch.zeros(shape, dtype=torch.bool)
    inside[coarse_box(loss_box, factor, shape, minimum=1)[2:]] = True
    return ~inside


class _Objective:
    """The Adam stage's objective for a velocity on its control grid: squared differences between the fixed
    descriptors and the moving ones warped on the Adam grid (summed over channels, averaged over the fixed
    field of view; the fused :func:`gradreg_fast.warped_sq_diff`, which never stores the warped descriptors),
    plus ``smoothness`` times the squared spatial gradient of the (smoothed) velocity on its control grid, in
    its own voxels (summed over the three axes, as ConvexAdam's diffusion term; on the control grid rather
    than upsampled to the Adam grid: the same energy up to the borders, at a fraction of the cost). The
    descriptors carry their term's weight (see :func:`_weighted`).

    With ``inverse_consistent`` the data term is the mean of that one and its mirror: the fixed descriptors warped
    by the inverse map exp(-v) against the moving ones, over the same voxels. Swapping the images and negating the
    velocity then gives the same objective."""

    def __init__(self, fixed_features, moving_features, box, settings: FieldSettings, backend):
        # Channels-last: the fused op's CPU kernel then samples all channels of a corner together.
        last = torch.channels_last_3d
        self.fixed = fixed_features.contiguous(memory_format=last)
        self.moving = moving_features.contiguous(memory_format=last)
        self.settings, self.backend = settings, backend
        self.shape = tuple(moving_features.shape[2:])
        self.inside = moving_features.new_zeros((1, 1) + self.shape)
        self.inside[box] = 1.0  # the fixed field of view
        self.count = float(self.inside.sum())

    def smoothed(self, parameters):
        return box_mean(parameters, self.settings.smoothing_passes, backend=self.backend)

    def __call__(self, parameters):
        velocity = self.smoothed(parameters)
        flow = resize_flow(integrate(velocity, self.settings.squarings, self.backend), self.shape)
        data = warped_sq_diff(self.moving, self.fixed, flow, self.inside, padding_mode="border",
                              backend=self.backend) / self.count
        if self.settings.inverse_consistent:
            inverse = resize_flow(integrate(-velocity, self.settings.squarings, self.backend), self.shape)
            data = 0.5 * (data + warped_sq_diff(self.fixed, self.moving, inverse, self.inside, padding_mode="border",
                                                backend=self.backend) / self.count)
        return data + 3.0 * self.settings.smoothness * flow_smoothness(velocity)


def _weighted(pairs):
    """[(fixed, moving, weight)] descriptor pairs -> one (fixed, moving) pair of stacked channels, each
    scaled by sqrt(weight): a sum of squared differences over the stack is then the weighted sum of the
    terms, and every stage (cost volume, warp) handles both terms in one call."""
    fixed = torch.cat([f * math.sqrt(w) for f, _, w in pairs], 1)
    moving = torch.cat([m * math.sqrt(w) for _, m, w in pairs], 1)
    return fixed, moving


def _principal(fixed: torch.Tensor, moving: torch.Tensor, channels: int | None):
    """A projection of descriptor stacks (N, C, ...) onto the ``channels`` leading principal axes of the joint
    channel covariance of ``fixed`` and ``moving`` (about their joint mean); None when ``channels`` keeps
    them all.

    A squared difference of two descriptors is a squared length, which an orthogonal projection can only
    shorten: keeping the axes of largest variance keeps most of every cost while the cost volume and the
    warps of the Adam stage handle fewer channels (MIND-SSC's channels are strongly correlated). The
    projection is linear, so it commutes with block averaging: one basis serves every grid."""
    count = fixed.shape[1]
    if channels is None or channels >= count:
        return None
    # The covariance from 2x block averages: 8 times fewer voxels, the same leading axes.
    sample = torch.cat([downsample(fixed, 2) if min(fixed.shape[2:]) >= 2 else fixed,
                        downsample(moving, 2) if min(moving.shape[2:]) >= 2 else moving], 0)
    sample = sample.transpose(0, 1).reshape(count, -1).double()
    centred = sample - sample.mean(1, keepdim=True)
    _, vectors = torch.linalg.eigh(centred @ centred.T)
    basis = vectors[:, -channels:].flip(1).T.to(fixed.dtype).contiguous()  # (channels, count), largest first

    def project(volume):
        n, _, *shape = volume.shape
        flat = volume.reshape(n, count, -1)
        return torch.stack([basis @ flat[i] for i in range(n)]).reshape(n, channels, *shape)

    return project


class _Features:
    """The weighted descriptor stacks of both images (see :func:`_weighted`), block-averaged to each grid the
    stages ask for, each grid computed once. Each descriptor is averaged before the stacking, so no
    full-resolution stack is ever formed."""

    def __init__(self, pairs, channels):
        self.pairs, self.cache = pairs, {}
        self.project = _principal(*_weighted(pairs), channels) if channels is not None else None

    def at(self, grid: int):
        if grid not in self.cache:
            fixed, moving = _weighted([(downsample(f, grid), downsample(m, grid), w) for f, m, w in self.pairs])
            if self.project is not None:
                fixed, moving = self.project(fixed), self.project(moving)
            self.cache[grid] = fixed, moving
        return self.cache[grid]


def optimize_field(fixed: torch.Tensor, moving: torch.Tensor, settings: FieldSettings | None = None,
                   loss_box=None, progress=None, backend: str | None = None) -> FieldResult:
    """Register ``moving`` onto ``fixed`` ((1, 1, D, H, W) each, one grid) with a displacement field.

    1. Descriptors: MIND-SSC of both images and, with ``alpha`` > 0, of their gradient-magnitude maps
       G (eq. 1 of Xu et al.; the paper's gradient guidance): computed once, at full resolution.
    2. Coupled convex optimisation (:mod:`.convex`): the descriptors are block-averaged onto a control grid
       of ``convex_grid`` voxels, a cost volume over (2 * search_radius + 1)^3 displacements is formed with
       the fused :func:`gradreg_fast.mind_cost_volume` (image cost + alpha * gradient-map cost), and the
       field is found by the alternating search/smoothing with rising coupling; inverse consistent with
       ``symmetric``. No gradient: the capture range is the search window.
    3. Adam refinement on an ``adam_grid`` control grid: a stationary velocity (initialised with the convex
       field), smoothed by box passes, integrated by scaling and squaring (so the map stays invertible),
       warps the block-averaged moving descriptors with the fused warp; the objective is
       :class:`_Objective`. The learning rate decays (cosine) to zero over each level, and a level returns
       the best velocity it saw, so its objective never ends above where it started.

    Args:
        loss_box: slices of the full grid where the similarity is measured (the fixed field of view), so that
            zero padding outside it does not pull the field; the smoothness covers the whole grid.
        progress: a tqdm-like object, updated once per Adam step.

    Returns:
        :class:`FieldResult` with the full-resolution displacement (voxels of the full grid).
    """
    settings = settings or FieldSettings()
    if fixed.dim() != 5 or fixed.shape[:2] != (1, 1) or fixed.shape != moving.shape:
        raise ValueError(f"`fixed` and `moving` must both be (1, 1, D, H, W), got {tuple(fixed.shape)} and "
                         f"{tuple(moving.shape)}")
    shape = tuple(fixed.shape[2:])
    levels = _check_settings(settings, shape)
    # Every term treats the three axes alike, so the work may run in any axis order; the fused kernels
    # vectorise along the last axis and pay a fixed cost per row, so the longest axis goes last.
    order = tuple(sorted(range(3), key=lambda axis: (shape[axis], axis)))
    if shape[order[2]] > shape[2]:
        box = None if loss_box is None else tuple(loss_box[axis] for axis in order)
        result = optimize_field(_permute_axes(fixed, order), _permute_axes(moving, order), settings, box, progress,
                                backend)
        inverse = tuple(order.index(axis) for axis in range(3))
        return FieldResult(_permute_field(result.flow, order, inverse), _permute_field(result.velocity, order, inverse),
                           result.losses, result.level_objectives, _permute_field(result.convex_flow, order, inverse))

    mind = {"radius": settings.radius, "dilation": settings.dilation}
    with torch.no_grad():
        features = [(mind_ssc(fixed, backend=backend, **mind), mind_ssc(moving, backend=backend, **mind), 1.0)]
        if settings.alpha > 0:
            features.append((mind_ssc(gradient_magnitude(fixed, backend=backend), backend=backend, **mind),
                             mind_ssc(gradient_magnitude(moving, backend=backend), backend=backend, **mind),
                             float(settings.alpha)))

        descriptors = _Features(features, settings.channels)
        del features

        # 1. coupled convex optimisation on the convex control grid
        g = settings.convex_grid
        outside = _outside(loss_box, g, tuple(n // g for n in shape))
        if outside is not None:
            outside = outside.to(fixed.device)
        cells = convex_field(*descriptors.at(g), settings.search_radius,
                             outside, settings.coupling, settings.symmetric, settings.ic_iterations,
                             settings.cost_smoothing, backend=backend)
        convex_flow = resize_flow(cells, shape)  # control-grid voxels (cells) -> voxels of the full grid

        parameters = convex_flow
    losses, level_objectives = [], []
    for grid, steps in levels:
        # 2. Adam on this level's grid, from the previous level's velocity
        level_shape = tuple(n // grid for n in shape)
        velocity_grid = settings.velocity_grid or grid
        box = coarse_box(loss_box, grid, level_shape, minimum=1)
        with torch.no_grad():
            objective = _Objective(*descriptors.at(grid), box, settings, backend)
        parameters = resize_flow(parameters.detach(), tuple(n // velocity_grid for n in shape)).requires_grad_(True)
        optimizer = torch.optim.Adam([parameters], lr=settings.lr)
        warm, total = max(settings.warmup, 1), max(steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (
            1.0 + math.cos(math.pi * min(i, total) / total)))
        best_value, best, start = math.inf, parameters.detach().clone(), None
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = objective(parameters)  # of the parameters before this step
            value = loss.item()
            start = value if start is None else start
            if value < best_value:
                best_value, best = value, parameters.detach().clone()
            loss.backward()
            optimizer.step()
            schedule.step()
            record_step(loss, grid, losses, progress)
        with torch.no_grad():
            value = objective(parameters).item()
        start = value if start is None else start
        if value < best_value:
            best_value, best = value, parameters.detach().clone()
        parameters = best
        level_objectives.append((start, best_value))
    with torch.no_grad():
        velocity = objective.smoothed(parameters)
        flow = resize_flow(integrate(velocity, settings.squarings, backend), shape)
    return FieldResult(flow, velocity, losses, level_objectives, convex_flow)


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
