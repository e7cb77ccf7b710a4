"""Synthetic multimodal image pairs with known correspondence, for training and testing without data.

One pair, from a seed:

1. Anatomy: a body (a noisy ellipsoid, label 1) holding ``num_organs`` organs (randomly placed,
   sized, rotated ellipsoids with noisy boundaries, labels 2..num_organs+1; later ones cover earlier
   ones), on the fixed grid.
2. Deformation: a smooth random velocity field v, exponentiated by scaling and squaring into a
   diffeomorphic displacement exp(v). The moving side shows the anatomy deformed by it,
   ``moving(y) = anatomy(y + exp(v)(y))``, and the returned ``displacement`` is exp(-v), its inverse:
   the flow a perfect registration network predicts, ``warp(moving, displacement) ~ fixed`` (in the
   convention of :func:`gradreg_fast.warp`).
3. Rendering: the moving side CT-like, the fixed side MR-like. Each modality gives each label its own
   intensity: evenly spread levels in one fixed random order per modality (a tissue looks alike in
   every pair, up to a small jitter), chosen so that the CT-to-MR mapping is not monotonic (no
   global intensity transform aligns them; MIND-like measures do). Both get a faint smooth texture
   that moves with the anatomy, a Gaussian partial-volume blur and Gaussian noise; the MR side also a
   smooth multiplicative bias field. Values are clipped to [0, 1].

Everything else is drawn from one ``torch.Generator`` seeded with ``seed``, so a pair is a pure
function of its arguments. Sizes are free (each axis >= 1); anatomy and deformation are defined relative to
the volume, so a seed gives the same scene at any resolution.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..ops import warp

_TISSUE_SEED = 20210606  # fixes each modality's intensity order of the labels, for every pair
_SQUARINGS = 7  # scaling-and-squaring steps: velocity / 128 is well below a voxel for any sane size


def _check_args(shape, num_organs, displacement, control_points, noise, bias, blur) -> tuple[int, ...]:
    """``shape`` as a tuple, after checking every generator argument."""
    if (isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"`shape` must be 3 positive ints (D, H, W), got {shape!r}")
    if isinstance(num_organs, bool) or not isinstance(num_organs, int) or not 2 <= num_organs <= 32:
        raise ValueError(f"`num_organs` must be an int in [2, 32] (two at least, for a non-monotonic "
                         f"intensity mapping), got {num_organs!r}")
    if not _finite(displacement) or not 0 <= displacement < 0.5:
        raise ValueError(f"`displacement` must be a fraction in [0, 0.5) of each axis' length, got {displacement!r}")
    if isinstance(control_points, bool) or not isinstance(control_points, int) or control_points < 2:
        raise ValueError(f"`control_points` must be an int >= 2, got {control_points!r}")
    for name, value in (("noise", noise), ("bias", bias), ("blur", blur)):
        if not _finite(value) or value < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return tuple(shape)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _gaussian_blur(vol: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, D, H, W), ``sigma`` in voxels, replicate edges."""
    if sigma <= 0:
        return vol
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=vol.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).tolist()
    for axis in (2, 3, 4):
        pad = [0] * 6
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = radius  # F.pad lists the last axis first
        padded = F.pad(vol, pad, mode="replicate")
        # A sum of shifted copies: several times faster than a grouped conv3d on CPU for these few taps.
        size = vol.shape[axis]
        vol = sum(weight * padded.narrow(axis, offset, size) for offset, weight in enumerate(kernel))
    return vol


def _smooth_noise(gen: torch.Generator, channels: int, shape, points: int, sigma: float) -> torch.Tensor:
    """(1, channels, *shape) random field, max |value| 1 per channel, varying on about 1/points of the
    volume: white noise on a coarse grid of ``points`` per axis, blurred there, upsampled trilinearly."""
    coarse = [min(points, s) for s in shape]
    field = _gaussian_blur(torch.randn((1, channels, *coarse), generator=gen), sigma)
    field = F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)
    return field / field.abs().amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)


def _uniform(gen: torch.Generator, low: float, high: float, size=()) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=gen)


def _anatomy(gen: torch.Generator, shape, num_organs: int) -> torch.Tensor:
    """(1, 1, D, H, W) int64 label map: 0 background, 1 body, 2.. organs."""
    axes = [torch.linspace(-1.0, 1.0, s) if s > 1 else torch.zeros(1) for s in shape]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, D, H, W) in [-1, 1]
    boundary_noise = _smooth_noise(gen, num_organs + 1, shape, points=8, sigma=1.0)[0]

    body_axes = _uniform(gen, 0.8, 0.95, 3).reshape(3, 1, 1, 1)
    body_radius = (points / body_axes).square().sum(0).sqrt() + 0.08 * boundary_noise[0]
    labels = (body_radius < 1).long()
    inside = body_radius < 0.95  # organs keep a rim of body tissue around them
    for organ in range(num_organs):
        centre = (_uniform(gen, -0.45, 0.45, 3) * body_axes.flatten()).reshape(3, 1, 1, 1)
        semi_axes = _uniform(gen, 0.2, 0.4, 3).reshape(3, 1, 1, 1)
        rotation, _ = torch.linalg.qr(torch.randn((3, 3), generator=gen))
        local = torch.einsum("ij,jdhw->idhw", rotation, points - centre)
        radius = (local / semi_axes).square().sum(0).sqrt() + 0.15 * boundary_noise[organ + 1]
        labels[(radius < 1) & inside] = organ + 2
    return labels[None, None]


def _exponential(velocity: torch.Tensor) -> torch.Tensor:
    """exp(velocity) by scaling and squaring: a diffeomorphic displacement in voxels."""
    disp = velocity / 2**_SQUARINGS
    for _ in range(_SQUARINGS):
        disp = disp + warp(disp, disp, padding_mode="border")
    return disp


def _levels(gen: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CT and MR intensities of labels 1..count: evenly spread slots in (0.15, 0.95), in one random order
    per modality. The orders are the same for every pair (as a tissue looks alike from patient to
    patient) and make the CT -> MR mapping non-monotonic; each pair jitters the levels a little."""
    tissues = torch.Generator().manual_seed(_TISSUE_SEED + count)
    ct_order = torch.randperm(count, generator=tissues)
    mr_order = torch.randperm(count, generator=tissues)
    if torch.equal(mr_order, ct_order) or torch.equal(mr_order, count - 1 - ct_order):
        mr_order[[0, 1]] = mr_order[[1, 0]]  # with count >= 3 a swap breaks monotonicity

    def to_levels(order):
        slot = (order.double() + _uniform(gen, 0.25, 0.75, count).double()) / count
        return (0.15 + 0.8 * slot).float()

    zero = torch.zeros(1)
    return torch.cat([zero, to_levels(ct_order)]), torch.cat([zero, to_levels(mr_order)])


def _render(labels, texture, levels, blur, noise, gen, bias_field=None) -> torch.Tensor:
    image = levels[labels] + 0.04 * texture * (labels > 0)
    image = _gaussian_blur(image, blur)
    if bias_field is not None:
        image = image * bias_field
    image = image + noise * torch.randn(image.shape, generator=gen)
    return image.clamp(0.0, 1.0)


def make_pair(seed: int, shape: Sequence[int] = (64, 64, 64), num_organs: int = 5, displacement: float = 0.08,
              control_points: int = 6, noise: float = 0.02, bias: float = 0.3,
              blur: float = 0.4) -> dict[str, torch.Tensor]:
    """One synthetic CT (moving) / MR (fixed) pair; see the module docstring for how it is made.

    Args:
        seed: int >= 0; the pair is a deterministic function of all arguments.
        shape: (D, H, W), each >= 1.
        num_organs: organs inside the body (2..32).
        displacement: largest velocity along each axis, as a fraction of that axis' length (the
            displacement of exp(v) is of the same order).
        control_points: random velocity vectors per axis before smoothing and upsampling: 2 gives a
            nearly affine deformation, more give more local ones.
        noise: standard deviation of the additive Gaussian noise (intensities are in [0, 1]).
        bias: strength of the MR bias field: a factor exp(bias * b) with a smooth b in [-1, 1].
        blur: sigma, in voxels, of the partial-volume blur.

    Returns:
        A dict of CPU tensors: "fixed", "moving": (1, D, H, W) float32 in [0, 1];
        "fixed_labels", "moving_labels": (1, D, H, W) int64; "displacement": (3, D, H, W) float32, the
        ground-truth moving-to-fixed flow in voxels (channels along D, H, W).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {seed!r}")
    shape = _check_args(shape, num_organs, displacement, control_points, noise, bias, blur)
    gen = torch.Generator().manual_seed(seed)

    fixed_labels = _anatomy(gen, shape, num_organs)
    extent = torch.tensor([s - 1 for s in shape], dtype=torch.float32).reshape(1, 3, 1, 1, 1)
    velocity = _smooth_noise(gen, 3, shape, points=control_points, sigma=1.0) * (displacement * extent)
    to_moving, to_fixed = _exponential(velocity), _exponential(-velocity)
    moving_labels = warp(fixed_labels.float(), to_moving, mode="nearest", padding_mode="border").round().long()
    texture = _smooth_noise(gen, 1, shape, points=16, sigma=0.7)
    moving_texture = warp(texture, to_moving, padding_mode="border")

    ct_levels, mr_levels = _levels(gen, num_organs + 1)
    bias_field = torch.exp(bias * _smooth_noise(gen, 1, shape, points=4, sigma=1.0))
    moving = _render(moving_labels, moving_texture, ct_levels, blur, noise, gen)
    fixed = _render(fixed_labels, texture, mr_levels, blur, noise, gen, bias_field)
    return {"fixed": fixed[0], "moving": moving[0], "fixed_labels": fixed_labels[0],
            "moving_labels": moving_labels[0], "displacement": to_fixed[0]}


_GENERATOR_DEFAULTS = {name: p.default for name, p in inspect.signature(make_pair).parameters.items()
                       if name not in ("seed", "shape")}


def item_seed(seed: int, index: int) -> int:
    """Independent seeds for (dataset seed, item index) pairs, via numpy's SeedSequence."""
    return int(np.random.SeedSequence((seed, index)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class SyntheticPairs(Dataset):
    """``length`` pairs of :func:`make_pair`; item i is generated on access from (seed, i).

    Two datasets with different ``seed`` share no pair, so one seed can train and another validate.
    The items are :func:`make_pair`'s dicts; the default collate stacks them into (B, 1, D, H, W).
    """

    def __init__(self, length: int, shape: Sequence[int] = (64, 64, 64), seed: int = 0, **kwargs):
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"`length` must be a positive int, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be an int >= 0, got {seed!r}")
        unknown = set(kwargs) - set(_GENERATOR_DEFAULTS)
        if unknown:
            raise TypeError(f"SyntheticPairs: unknown generator argument(s) {sorted(unknown)}; "
                            f"known: {sorted(_GENERATOR_DEFAULTS)}")
        self.kwargs = {**_GENERATOR_DEFAULTS, **kwargs}
        self.shape = _check_args(shape, **self.kwargs)  # fail here, not in a loader worker
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} pairs")
        return make_pair(item_seed(self.seed, index % self.length), self.shape, **self.kwargs)
