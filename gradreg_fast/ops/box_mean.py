"""box_mean: registration (``torch.ops.gradreg.box_mean``), fake, autograd, dispatch.

One op computes the mean and its adjoint (``adjoint``): the backward of either is the other, so gradients of
any order come from the same kernels."""

from __future__ import annotations

import torch

from .. import reference
from . import _common as c

OP = "box_mean"
MAX_PASSES = 1 << 16


def _launch(volume: torch.Tensor, passes: int, adjoint: bool, backend: str) -> torch.Tensor:
    if backend == "reference":
        return (reference.box_mean_adjoint if adjoint else reference.box_mean)(volume, passes)
    volume = volume.contiguous()
    if backend == "triton":
        from ..triton_kernels import box_mean as kernel

        return kernel.forward(volume, passes, adjoint)
    out = torch.empty_like(volume)  # every element is written by the kernel
    n, ch, d, h, w = volume.shape
    if backend == "cpu":
        c.cpu_core().box_mean_forward(c.dtype_name(volume), volume.data_ptr(), out.data_ptr(), n * ch, d, h, w, passes,
                                      adjoint, c.threads(volume.numel()))
        return out
    core = c.cuda_core()
    is_double = volume.dtype == torch.float64
    with torch.cuda.device(volume.device):
        nbytes = core.box_mean_workspace_bytes(is_double, n * ch, d, h, w)
    scratch = c.workspace(volume, nbytes)
    c.raise_cuda_error(OP, core.box_mean_forward(is_double, volume.data_ptr(), out.data_ptr(), n * ch, d, h, w, passes,
                                                 adjoint, scratch.data_ptr(), nbytes, c.stream(volume)))
    return out


@torch.library.custom_op("gradreg::box_mean", mutates_args=())
def _box_mean_op(volume: torch.Tensor, passes: int, adjoint: bool, backend: str) -> torch.Tensor:
    with c.on_device_of(volume):
        return _launch(volume, passes, adjoint, backend)


@_box_mean_op.register_fake
def _(volume, passes, adjoint, backend):
    return volume.new_empty(volume.shape)


def _setup_context(ctx, inputs, output):
    _, ctx.passes, ctx.adjoint, ctx.backend = inputs


def _backward(ctx, grad):
    return _box_mean(grad.contiguous(), ctx.passes, not ctx.adjoint, ctx.backend), None, None, None


_box_mean_op.register_autograd(_backward, setup_context=_setup_context)
_box_mean = c.functorch_ready(_box_mean_op, OP, _setup_context, _backward)


def box_mean(volume: torch.Tensor, passes: int = 1, backend: str | None = None) -> torch.Tensor:
    """The mean over the voxels of each 3x3x3 window that lie inside the volume, ``passes`` times, per channel.

    ``out(x) = sum_{y in W(x)} v(y) / |W(x)|`` with W(x) the voxels of the 3x3x3 box around x inside the volume:
    a border voxel averages fewer voxels (a constant stays constant, and a displacement field is not pulled
    towards zero at the edges, as zero padding would), and an axis of one voxel is left as it is. Separable: the
    window's in-volume part is a box, so each pass is a 3-voxel mean along D, then H, then W. Repeated passes
    approach a Gaussian (inside the volume, two are the 5-voxel triangle (1, 2, 3, 2, 1) / 9 per axis, a linear
    B-spline; three a quadratic one). The registration engine smooths its cost volume and its velocity with it.

    Args:
        volume: (N, C, D, H, W) float32 or float64; float16/bfloat16 are computed in float32 and cast back. Any
            strides.
        passes: how many times the mean is applied (>= 0; 0 returns a copy).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``, or None for the global setting
            (:func:`gradreg_fast.set_backend`, ``GRADREG_BACKEND``).

    Returns:
        (N, C, D, H, W) tensor of ``volume``'s dtype, differentiable w.r.t. ``volume`` (to any order: the backward
        is the exact adjoint, ``sum_{x: y in W(x)} g(x) / |W(x)|``).
    """
    c.check_volume(OP, "volume", volume)
    passes = c.check_int_argument(OP, "passes", passes, 0, MAX_PASSES)
    backend = c.backend_for(backend, volume, OP)
    work = volume.to(c.compute_dtype(volume))
    return _box_mean(work, passes, False, backend).to(volume.dtype)
