"""gradient_magnitude: registration (``torch.ops.gradreg.gradient_magnitude``), fake, autograd, dispatch."""

from __future__ import annotations

import torch

from .. import reference
from . import _common as c

OP = "gradient_magnitude"


def _launch_forward(vol: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    name = c.resolve(backend, vol, OP)
    if name == "reference":
        return reference.gradient_magnitude(vol, eps)
    vol = vol.contiguous()
    if name == "triton":
        from ..triton_kernels import gradient_magnitude as kernel

        return kernel.forward(vol, eps)
    out = torch.empty_like(vol)  # every element is written by the kernel
    n, ch, d, h, w = vol.shape
    if name == "cpu":
        c.cpu_core().gradient_magnitude_forward(
            c.dtype_name(vol), vol.data_ptr(), out.data_ptr(), n * ch, d, h, w, eps, c.threads(vol.numel())
        )
    else:
        err = c.cuda_core().gradient_magnitude_forward(
            vol.dtype == torch.float64, vol.data_ptr(), out.data_ptr(), n * ch, d, h, w, eps, c.stream(vol)
        )
        c.raise_cuda_error(OP, err)
    return out


def _launch_backward(grad_out, vol, out, eps, backend):
    name = c.resolve(backend, vol, OP)
    if name == "cuda" and not hasattr(c.cuda_core(), "gradient_magnitude_backward"):
        name = "reference"
    if name == "reference":
        return c.reference_vjp(lambda v: reference.gradient_magnitude(v, eps), [vol], grad_out, [True])[0]
    grad_out, vol, out = grad_out.contiguous(), vol.contiguous(), out.contiguous()
    if name == "triton":
        from ..triton_kernels import gradient_magnitude as kernel

        return kernel.backward(grad_out, vol, out)
    grad_vol = torch.empty_like(vol)
    n, ch, d, h, w = vol.shape
    if name == "cpu":
        c.cpu_core().gradient_magnitude_backward(
            c.dtype_name(vol), grad_out.data_ptr(), vol.data_ptr(), out.data_ptr(), grad_vol.data_ptr(),
            n * ch, d, h, w, c.threads(vol.numel()),
        )
    else:
        err = c.cuda_core().gradient_magnitude_backward(
            vol.dtype == torch.float64, grad_out.data_ptr(), vol.data_ptr(), out.data_ptr(), grad_vol.data_ptr(),
            n * ch, d, h, w, c.stream(vol),
        )
        c.raise_cuda_error(OP, err)
    return grad_vol


@torch.library.custom_op("gradreg::gradient_magnitude", mutates_args=())
def _gradient_magnitude_op(vol: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    with c.on_device_of(vol):
        return _launch_forward(vol, eps, backend)


@_gradient_magnitude_op.register_fake
def _(vol, eps, backend):
    return vol.new_empty(vol.shape)


@torch.library.custom_op("gradreg::gradient_magnitude_backward", mutates_args=())
def _gradient_magnitude_backward_op(
    grad_out: torch.Tensor, vol: torch.Tensor, out: torch.Tensor, eps: float, backend: str
) -> torch.Tensor:
    with c.on_device_of(vol):
        return _launch_backward(grad_out, vol, out, eps, backend)


@_gradient_magnitude_backward_op.register_fake
def _(grad_out, vol, out, eps, backend):
    return vol.new_empty(vol.shape)


def _setup_context(ctx, inputs, output):
    vol, eps, backend = inputs
    ctx.save_for_backward(vol, output)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad_out):
    vol, out = ctx.saved_tensors
    return _gradient_magnitude_backward(grad_out, vol, out, ctx.eps, ctx.backend), None, None


_gradient_magnitude_op.register_autograd(_backward, setup_context=_setup_context)
_gradient_magnitude = c.functorch_ready(_gradient_magnitude_op, OP, _setup_context, _backward)
_gradient_magnitude_backward = c.functorch_ready(_gradient_magnitude_backward_op, OP)


def gradient_magnitude(vol: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """Gradient-magnitude map of eq. 1 of Xu et al. (ICASSP 2021), per channel.

    ``G(V)(x) = sqrt(gz**2 + gy**2 + gx**2 + eps)`` with ``g_a(x) = V(x + e_a) - V(x - e_a)``: a central
    difference **without** the division by 2, along D, H and W. At the edges of the volume the missing
    neighbour is the edge voxel itself (replicate padding), so an axis of size 1 contributes 0.

    Args:
        vol: (N, C, D, H, W) float32 or float64; float16/bfloat16 are computed in float32 and cast back.
            Any strides.
        eps: added under the square root (>= 0). It keeps the gradient finite where the image is flat;
            with ``eps=0`` the gradient there is taken as 0.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``, or None for the global
            setting (:func:`gradreg_fast.set_backend`, ``GRADREG_BACKEND``).

    Returns:
        (N, C, D, H, W) tensor of ``vol``'s dtype, differentiable w.r.t. ``vol``.
    """
    c.check_volume(OP, "vol", vol)
    eps = c.check_number_argument(OP, "eps", eps)
    backend = c.backend_for(backend, vol, OP)
    work = vol.to(c.compute_dtype(vol))
    return _gradient_magnitude(work, eps, backend).to(vol.dtype)
