"""Affine pre-alignment: body-mask moments, then an affine optimised on MIND-SSC, coarse to fine.

Two scans of different people whose world coordinates barely overlap cannot go straight to a
deformable step. First the centres of mass (and, optionally, the spreads) of their body masks are
matched in world space (:func:`moments_init`); the moving scan is resampled through that map onto the
working grid. Then an affine (12 parameters; or rotation + per-axis scale + translation; or a
translation) is optimised on the MIND-SSC loss with Adam on an image pyramid: the affine becomes a
displacement field on the grid, and :func:`gradreg_fast.warp` applies it, so the whole loop runs on the
fused ops.

Conventions: a "world transform" is a 4x4 matrix mapping a point of the fixed world to the moving
world (the direction images are sampled in). The optimised affine acts in the working grid's own frame,
in millimetres about the grid centre, which keeps translations and linear terms on comparable scales.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import mind_loss, mind_ssc, warp, warped_sq_diff
from ..body import BODY_THRESHOLD, axial_axis, body_mask, mask_moments, moments_init  # noqa: F401 (re-exported)
from ..io import Grid

# ----------------------------------------------------------------------------------------------- pyramid

def downsample(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Average over factor^3 blocks (N, C, D, H, W); trailing voxels of an axis not divisible by the factor are
    dropped (as ``avg_pool3d`` drops them).

    A power-of-two factor that divides every size halves the grid one axis at a time by adding neighbouring
    planes, rows and columns: the same averages as ``avg_pool3d`` (up to rounding), at about 2.5x its speed on
    the CPU for the engine's descriptor stacks, the largest volumes it averages."""
    if factor == 1:
        return volume
    if factor & (factor - 1) or volume.dim() != 5 or any(n % factor for n in volume.shape[2:]):
        return F.avg_pool3d(volume, factor, factor)
    while factor > 1:
        volume, factor = _halve(volume), factor // 2
    return volume


def _halve(volume: torch.Tensor) -> torch.Tensor:
    """The mean of every 2x2x2 block of (N, C, D, H, W), each size even."""
    n, c, d, h, w = volume.shape
    pairs = volume.reshape(n, c, d // 2, 2, h, w)
    pairs = (pairs[:, :, :, 0] + pairs[:, :, :, 1]).view(n, c, d // 2, h // 2, 2, w)
    pairs = (pairs[:, :, :, :, 0] + pairs[:, :, :, :, 1]).view(n, c, d // 2, h // 2, w // 2, 2)
    return (pairs[..., 0] + pairs[..., 1]).mul_(0.125)


def record_step(loss: torch.Tensor, factor: int, losses: list | None, progress) -> None:
    """After an optimiser step at pyramid factor ``factor``: keep the loss value and advance the progress bar."""
    if losses is None and progress is None:
        return  # no .item(): it would wait for the device for nothing
    value = loss.item()
    if losses is not None:
        losses.append(value)
    if progress is not None:
        progress.update(1)
        progress.set_postfix(level=f"1/{factor}", loss=f"{value:.4f}")


def coarse_box(box, factor: int, coarse_shape, minimum: int = 8):
    """Slices of the full grid -> (N, C, ...) slices of the voxels covering them on a ``factor``-coarser grid.

    A box narrower than ``minimum`` voxels is widened about its centre (MIND-SSC's patches need room).
    ``None`` selects everything.
    """
    if box is None:
        return (slice(None),) * 5
    out = []
    for s, n in zip(box, coarse_shape):
        lo, hi = s.start // factor, -(-s.stop // factor)
        if hi - lo < min(minimum, n):
            lo = max(0, min((lo + hi) // 2 - minimum // 2, n - minimum))
            hi = min(n, lo + minimum)
        out.append(slice(lo, hi))
    return (slice(None), slice(None)) + tuple(out)


def centred_coordinates(shape, spacing, factor: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(3, d, h, w) positions in mm about the grid centre of the voxels of a grid downsampled by ``factor``.

    A voxel u of the ``factor``-times coarser grid is the mean of fine voxels factor*u .. factor*u +
    factor - 1, i.e. it sits at fine position factor*u + (factor - 1)/2.
    """
    axes = []
    for n, s in zip(shape, spacing):
        coarse = torch.arange(n // factor, device=device, dtype=torch.float64)
        fine = coarse * factor + (factor - 1) / 2.0
        axes.append(((fine - (n - 1) / 2.0) * float(s)).to(dtype))
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


@dataclass
class AffineResult:
    """An affine in the working grid frame: position p (mm about the grid centre) -> matrix @ p + shift."""

    matrix: np.ndarray  # (3, 3)
    shift: np.ndarray  # (3,) mm
    losses: list

    def voxel_flow(self, shape, spacing, factor: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
        return affine_flow(torch.as_tensor(self.matrix, dtype=dtype, device=device),
                           torch.as_tensor(self.shift, dtype=dtype, device=device), shape, spacing, factor)

    def world_transform(self, grid: Grid) -> np.ndarray:
        """The same map as a 4x4 on world points of ``grid`` (world -> world)."""
        centre = (np.asarray(grid.shape) - 1) / 2.0
        spacing = grid.spacing
        to_frame = np.eye(4)  # world -> mm about the centre, along the grid axes
        to_frame[:3, :3] = np.diag(spacing)
        to_frame[:3, 3] = -spacing * centre
        to_frame = to_frame @ np.linalg.inv(grid.affine)
        frame_map = np.eye(4)
        frame_map[:3, :3], frame_map[:3, 3] = self.matrix, self.shift
        return np.linalg.inv(to_frame) @ frame_map @ to_frame


def affine_flow(matrix: torch.Tensor, shift: torch.Tensor, shape, spacing, factor: int = 1,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """The displacement field (1, 3, d, h, w), in voxels of the ``factor``-coarser grid, of p -> matrix p + shift.

    ``positions``: :func:`centred_coordinates` of these arguments, when the caller keeps them across calls."""
    if positions is None:
        positions = centred_coordinates(shape, spacing, factor, matrix.device, matrix.dtype)
    moved = torch.einsum("ij,jdhw->idhw", matrix, positions) + shift.view(3, 1, 1, 1)
    step = torch.as_tensor(np.asarray(spacing, dtype=np.float64) * factor, dtype=matrix.dtype,
                           device=matrix.device).view(3, 1, 1, 1)
    return ((moved - positions) / step).unsqueeze(0)


MODELS = ("affine", "rigid_scale", "translation")


def _matrix(model: str, params: torch.Tensor) -> torch.Tensor:
    """The 3x3 linear part from the optimised parameters (9 numbers; zeros give the identity)."""
    eye = torch.eye(3, dtype=params.dtype, device=params.device)
    if model == "affine":
        return eye + params.view(3, 3)
    if model == "translation":
        return eye
    # rigid_scale: a rotation (exponential of a skew-symmetric matrix) times per-axis scales.
    wx, wy, wz, sx, sy, sz = params[:6]
    zero = params.new_zeros(())
    skew = torch.stack([torch.stack([zero, -wz, wy]), torch.stack([wz, zero, -wx]), torch.stack([-wy, wx, zero])])
    return torch.linalg.matrix_exp(skew) @ torch.diag(torch.exp(torch.stack([sx, sy, sz])))


OBJECTIVES = ("descriptors", "mind")


def rigidity_penalty(matrix: torch.Tensor) -> torch.Tensor:
    """||A^T A - I||_F^2 of a 3x3 linear part A: zero for a rotation, growing with scaling and shear (about
    4 sum_i (s_i - 1)^2 for singular values s_i near 1). Polynomial in A: no decomposition to differentiate."""
    eye = torch.eye(3, dtype=matrix.dtype, device=matrix.device)
    return ((matrix.T @ matrix - eye) ** 2).sum()


def optimize_affine(fixed: torch.Tensor, moving: torch.Tensor, spacing, levels=(4, 2), iterations=(40, 40),
                    model: str = "affine", lr_shift: float = 2.0, lr_matrix: float = 0.01, loss_box=None,
                    progress=None, backend: str | None = None, objective: str = "descriptors",
                    rigidity: float = 0.0) -> AffineResult:
    """Optimise an affine aligning ``moving`` to ``fixed`` (both (1, 1, D, H, W) on one grid) on MIND-SSC.

    Coarse to fine: at each pyramid ``levels`` factor the images are block-averaged, the affine becomes
    a displacement field on that grid and the fused warp applies it; Adam runs ``iterations`` steps per
    level, carrying the parameters to the next level.

    Args:
        spacing: the full grid's voxel size (mm) per axis.
        model: "affine" (12 parameters), "rigid_scale" (rotation, per-axis scale, translation: 9) or
            "translation" (3). The linear part is always built from 9 numbers (zeros: the identity);
            "rigid_scale" uses six of them (rotation vector, log scales).
        lr_shift: Adam step for the translation, mm; ``lr_matrix``: for the linear parameters.
        loss_box: slices of the full grid where the loss is measured (the fixed field of view), so that
            the empty padding around it does not pull the moving image.
        objective: ``"descriptors"`` (default): the mean squared difference of the MIND-SSC descriptors,
            those of the moving image computed once per level and warped at every step by the fused
            :func:`gradreg_fast.warped_sq_diff` (value and flow gradient in one pass, no warped image);
            ``"mind"``: :func:`gradreg_fast.mind_loss` (L1) of the warped image's descriptors, recomputed
            at every step (several times slower; the descriptors then follow the image's rotation and
            scale exactly).
        rigidity: weight of :func:`rigidity_penalty` of the linear part, added to the loss (and so to the
            recorded losses). Without it, long runs on two people's scans of different extents drift to
            degenerate maps (a slab stretched to fill the other's field of view: det A of 0.3 or 1.5 after
            40 + 40 steps on the inter-subject validation cases), since the similarity is only measured inside
            the fixed field of view. It holds the scales of "rigid_scale" too (to make that model rigid in
            effect); "translation" has nothing to hold. The pipeline's default (10) was chosen with the
            "descriptors" objective; "mind" has another loss scale.
    """
    if model not in MODELS:
        raise ValueError(f"`model` must be one of {MODELS}, got {model!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}")
    if len(levels) != len(iterations):
        raise ValueError("`levels` and `iterations` must have the same length")
    if isinstance(rigidity, bool) or not isinstance(rigidity, numbers.Real) or not 0 <= float(rigidity) < math.inf:
        raise ValueError(f"`rigidity` must be a finite number >= 0, got {rigidity!r}")
    rigidity = float(rigidity)
    if fixed.dim() != 5 or fixed.shape[:2] != (1, 1) or fixed.shape != moving.shape:
        raise ValueError(f"`fixed` and `moving` must both be (1, 1, D, H, W), got {tuple(fixed.shape)} and "
                         f"{tuple(moving.shape)}")
    shape = fixed.shape[2:]
    for factor in levels:
        if any(n % factor for n in shape):
            raise ValueError(f"grid {tuple(shape)} is not divisible by the pyramid factor {factor}")
    device, dtype = fixed.device, fixed.dtype
    params = torch.zeros(9, device=device, dtype=dtype, requires_grad=True)
    shift = torch.zeros(3, device=device, dtype=dtype, requires_grad=True)
    losses = []
    for factor, steps in zip(levels, iterations):
        fixed_level, moving_level = downsample(fixed, factor), downsample(moving, factor)
        box = coarse_box(loss_box, factor, fixed_level.shape[2:])
        groups = [{"params": [shift], "lr": lr_shift}]
        if model != "translation":
            groups.append({"params": [params], "lr": lr_matrix})
        optimizer = torch.optim.Adam(groups)
        positions = centred_coordinates(shape, spacing, factor, device, dtype)  # the same at every step
        with torch.no_grad():  # descriptors once per level
            if objective == "mind":
                fixed_descriptor = mind_ssc(fixed_level[box], backend=backend)
            else:
                # Channels-last: warped_sq_diff's CPU kernel then samples all channels of a corner together.
                last = torch.channels_last_3d
                fixed_descriptor = mind_ssc(fixed_level, backend=backend).contiguous(memory_format=last)
                moving_descriptor = mind_ssc(moving_level, backend=backend).contiguous(memory_format=last)
                inside = fixed_level.new_zeros((1, 1) + tuple(fixed_level.shape[2:]))
                inside[box] = 1.0
                scale = 1.0 / (float(inside.sum()) * fixed_descriptor.shape[1])
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            matrix = _matrix(model, params)
            flow = affine_flow(matrix, shift, shape, spacing, factor, positions)
            if objective == "mind":
                warped = warp(moving_level, flow, padding_mode="zeros", backend=backend)
                loss = mind_loss(warped[box], fixed_descriptor=fixed_descriptor, backend=backend)
            else:
                loss = scale * warped_sq_diff(moving_descriptor, fixed_descriptor, flow, inside,
                                              padding_mode="border", backend=backend)
            if rigidity > 0:
                loss = loss + rigidity * rigidity_penalty(matrix)
            loss.backward()
            optimizer.step()
            record_step(loss, factor, losses, progress)
    with torch.no_grad():
        matrix = _matrix(model, params)
    return AffineResult(matrix.cpu().double().numpy(), shift.detach().cpu().double().numpy(), losses)
