"""mind_cost_volume: registration (``torch.ops.gradreg.mind_cost_volume``), fake, autograd, dispatch."""

from __future__ import annotations

import operator

import torch

from .. import reference
from . import _common as c

OP = "mind_cost_volume"
# The name the backend rule looks kernels up by: triton_kernels/cost_volume.py and the cores'
# cost_volume_forward / cost_volume_backward.
KERNELS = "cost_volume"
# (2 * 32 + 1)^3 = 274625 displacements: far beyond any search a registration runs, and small enough
# that every channel index and the per-row work of the kernels stay well inside their integer types.
MAX_RADIUS = 32
# The largest displacement s * r, in voxels.
MAX_REACH = 4096
# Block sizes past this would only make one control point of any real volume.
MAX_GRID = 4096


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{OP}: `{name}` must be an integer, got {value!r}")
    try:
        value = operator.index(value)  # int, numpy integers, 0-d integer tensors; not floats
    except TypeError:
        raise TypeError(f"{OP}: `{name}` must be an integer, got {type(value).__name__} {value!r}") from None
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{OP}: `{name}` must be {bound}, got {value}")
    return value


def _check_geometry(radius, spacing, grid) -> tuple[int, int, int]:
    radius = _check_int("radius", radius, 0, MAX_RADIUS)
    spacing = _check_int("spacing", spacing, 1, MAX_REACH)
    grid = _check_int("grid", grid, 1, MAX_GRID)
    if spacing * radius > MAX_REACH:
        raise ValueError(
            f"{OP}: the largest displacement `spacing` * `radius` must be at most {MAX_REACH} voxels, got "
            f"{spacing} * {radius} = {spacing * radius}"
        )
    return radius, spacing, grid


def displacement_count(radius: int) -> int:
    return (2 * radius + 1) ** 3


def output_shape(shape, radius: int, grid: int) -> tuple[int, ...]:
    n, _, d, h, w = shape
    return (n, displacement_count(radius), *(-(-size // grid) for size in (d, h, w)))


def _work(fixed: torch.Tensor, radius: int) -> int:
    return fixed.numel() * displacement_count(radius)


def _launch_forward(fixed, moving, radius, spacing, grid, backend):
    name = c.resolve(backend, fixed, KERNELS)
    if name == "reference":
        return reference.mind_cost_volume(fixed, moving, radius, spacing, grid)
    fixed, moving = fixed.contiguous(), moving.contiguous()
    if name == "triton":
        from ..triton_kernels import cost_volume as kernel

        return kernel.forward(fixed, moving, radius, spacing, grid)
    out = fixed.new_empty(output_shape(fixed.shape, radius, grid))
    n, ch, d, h, w = fixed.shape
    if name == "cpu":
        c.cpu_core().cost_volume_forward(
            c.dtype_name(fixed), fixed.data_ptr(), moving.data_ptr(), out.data_ptr(), n, ch, d, h, w, radius,
            spacing, grid, c.threads(_work(fixed, radius)),
        )
    else:
        err = c.cuda_core().cost_volume_forward(
            fixed.dtype == torch.float64, fixed.data_ptr(), moving.data_ptr(), out.data_ptr(), n, ch, d, h, w,
            radius, spacing, grid, c.stream(fixed),
        )
        c.raise_cuda_error(OP, err)
    return out


def _launch_backward(grad_out, fixed, moving, radius, spacing, grid, need_fixed, need_moving, backend):
    name = c.resolve(backend, fixed, KERNELS)
    if name == "cuda" and not hasattr(c.cuda_core(), "cost_volume_backward"):
        name = "reference"
    if name == "reference":
        fn = lambda f, m: reference.mind_cost_volume(f, m, radius, spacing, grid)  # noqa: E731
        return tuple(c.reference_vjp(fn, [fixed, moving], grad_out, [need_fixed, need_moving]))
    grad_out, fixed, moving = grad_out.contiguous(), fixed.contiguous(), moving.contiguous()
    if name == "triton":
        from ..triton_kernels import cost_volume as kernel

        return kernel.backward(grad_out, fixed, moving, radius, spacing, grid, need_fixed, need_moving)
    grad_fixed = torch.empty_like(fixed) if need_fixed else None
    grad_moving = torch.empty_like(moving) if need_moving else None
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    n, ch, d, h, w = fixed.shape
    if name == "cpu":
        c.cpu_core().cost_volume_backward(
            c.dtype_name(fixed), grad_out.data_ptr(), fixed.data_ptr(), moving.data_ptr(), ptr(grad_fixed),
            ptr(grad_moving), n, ch, d, h, w, radius, spacing, grid, c.threads(_work(fixed, radius)),
        )
    else:
        err = c.cuda_core().cost_volume_backward(
            fixed.dtype == torch.float64, grad_out.data_ptr(), fixed.data_ptr(), moving.data_ptr(), ptr(grad_fixed),
            ptr(grad_moving), n, ch, d, h, w, radius, spacing, grid, c.stream(fixed),
        )
        c.raise_cuda_error(OP, err)
    return grad_fixed, grad_moving


@torch.library.custom_op("gradreg::mind_cost_volume", mutates_args=())
def _cost_volume_op(fixed: torch.Tensor, moving: torch.Tensor, radius: int, spacing: int, grid: int,
                    backend: str) -> torch.Tensor:
    with c.on_device_of(fixed):
        return _launch_forward(fixed, moving, radius, spacing, grid, backend)


@_cost_volume_op.register_fake
def _(fixed, moving, radius, spacing, grid, backend):
    n, _, d, h, w = fixed.shape
    return fixed.new_empty((n, displacement_count(radius), (d + grid - 1) // grid, (h + grid - 1) // grid,
                            (w + grid - 1) // grid))


@torch.library.custom_op("gradreg::mind_cost_volume_backward", mutates_args=())
def _cost_volume_backward_op(grad_out: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, radius: int,
                             spacing: int, grid: int, need_fixed: bool, need_moving: bool,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with c.on_device_of(fixed):
        gf, gm = _launch_backward(grad_out, fixed, moving, radius, spacing, grid, need_fixed, need_moving, backend)
    # A custom op returns tensors, not None: an unneeded gradient comes back empty.
    return (gf if gf is not None else fixed.new_empty(0)), (gm if gm is not None else moving.new_empty(0))


@_cost_volume_backward_op.register_fake
def _(grad_out, fixed, moving, radius, spacing, grid, need_fixed, need_moving, backend):
    return (fixed.new_empty(fixed.shape if need_fixed else (0,)),
            moving.new_empty(moving.shape if need_moving else (0,)))


def _setup_context(ctx, inputs, output):
    fixed, moving, radius, spacing, grid, backend = inputs
    ctx.save_for_backward(fixed, moving)
    ctx.geometry, ctx.backend = (radius, spacing, grid), backend


def _backward(ctx, grad_out):
    fixed, moving = ctx.saved_tensors
    need_fixed, need_moving = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_fixed or need_moving):
        return None, None, None, None, None, None
    gf, gm = _cost_volume_backward(grad_out, fixed, moving, *ctx.geometry, need_fixed, need_moving, ctx.backend)
    return (gf if need_fixed else None), (gm if need_moving else None), None, None, None, None


_cost_volume_op.register_autograd(_backward, setup_context=_setup_context)
_cost_volume = c.functorch_ready(_cost_volume_op, OP, _setup_context, _backward)
_cost_volume_backward = c.functorch_ready(_cost_volume_backward_op, OP)


def mind_cost_volume(fixed_desc: torch.Tensor, moving_desc: torch.Tensor, radius: int, spacing: int = 1,
                     grid: int = 1, backend: str | None = None) -> torch.Tensor:
    """The cost of every integer displacement in a (2r+1)^3 window at each control point, fused: the
    discrete search step of deeds and ConvexAdam, without materialising shifted descriptors.

    ``cost[n, k, q] = (1 / |B(q)|) * sum_{x in B(q)} sum_c (fixed[n, c, x] - moving[n, c, x + s * d_k])^2``

    * ``B(q)`` is the ``grid`` x ``grid`` x ``grid`` block of voxels of control point ``q`` (block ``q``
      along an axis covers voxels ``[q * grid, (q + 1) * grid)``); the last block along an axis may be
      partial, and the mean is over the voxels that exist.
    * ``moving`` is zero outside the volume (as ConvexAdam's correlation pads with zeros).
    * ``d_k = (dz, dy, dx)`` with each component in ``[-radius, radius]``, along spatial axes (D, H, W)
      = (0, 1, 2) (the axis order of :func:`gradreg_fast.warp`'s flow channels), ordered with dx fastest:
      ``k = ((dz + r) * (2r + 1) + (dy + r)) * (2r + 1) + (dx + r)``; :func:`mind_cost_volume_displacements`
      gives them as a table. ``s`` is ``spacing``.

    Only the output is allocated (no shifted copies, no per-voxel costs). Differentiable w.r.t. both
    descriptors; the backward is a gather on every backend (deterministic, no atomics).

    Args:
        fixed_desc: (N, C, D, H, W) descriptor of the fixed image, any C >= 1, float32 or float64
            (float16/bfloat16 computed in float32 and cast back).
        moving_desc: the moving image's descriptor; same shape, dtype and device.
        radius: half-width r >= 0 of the search window, in steps (at most 32).
        spacing: step s >= 1 between displacements, in voxels (s * r at most 4096).
        grid: block size g >= 1 of the control grid, in voxels.
        backend: see :func:`gradreg_fast.gradient_magnitude`.

    Returns:
        (N, (2r+1)^3, ceil(D/g), ceil(H/g), ceil(W/g)) tensor of ``fixed_desc``'s dtype.
    """
    c.check_volume(OP, "fixed_desc", fixed_desc)
    c.check_volume(OP, "moving_desc", moving_desc)
    c.check_same(OP, ("fixed_desc", "moving_desc"), fixed_desc, moving_desc)
    radius, spacing, grid = _check_geometry(radius, spacing, grid)
    backend = c.check_backend(backend)
    dtype = c.compute_dtype(fixed_desc)
    out = _cost_volume(fixed_desc.to(dtype), moving_desc.to(dtype), radius, spacing, grid, backend)
    return out.to(fixed_desc.dtype)


def mind_cost_volume_displacements(radius: int, spacing: int = 1, dtype: torch.dtype = torch.float32,
                                   device: torch.device | str | None = None) -> torch.Tensor:
    """(K, 3) table of the displacement of each channel k of :func:`mind_cost_volume`, in voxels, in
    (D, H, W) axis order: row k is ``spacing * (dz, dy, dx)``."""
    radius, spacing, _ = _check_geometry(radius, spacing, 1)
    steps = torch.arange(-radius, radius + 1, device=device)
    dz, dy, dx = torch.meshgrid(steps, steps, steps, indexing="ij")  # dx varies fastest when flattened
    return (torch.stack((dz, dy, dx), dim=-1).reshape(-1, 3) * spacing).to(dtype)
