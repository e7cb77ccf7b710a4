"""warp: registration (``torch.ops.gradreg.warp``), fake, autograd, dispatch."""

from __future__ import annotations

import torch

from .. import reference
from . import _common as c

OP = "warp"
_MODES = ("bilinear", "nearest")
_PADDINGS = ("zeros", "border")


def _launch_forward(image, flow, mode, padding_mode, backend):
    name = c.resolve(backend, image, OP)
    if name == "reference":
        return reference.warp(image, flow, mode, padding_mode)
    image, flow = image.contiguous(), flow.contiguous()
    nearest, padding = mode == "nearest", _PADDINGS.index(padding_mode)
    if name == "triton":
        from ..triton_kernels import warp as kernel

        return kernel.forward(image, flow, nearest, padding)
    out = torch.empty_like(image)
    n, ch, d, h, w = image.shape
    if name == "cpu":
        c.cpu_core().warp_forward(
            c.dtype_name(image), image.data_ptr(), flow.data_ptr(), out.data_ptr(), n, ch, d, h, w, nearest, padding,
            c.threads(image.numel() + flow.numel()),
        )
    else:
        err = c.cuda_core().warp_forward(
            image.dtype == torch.float64, image.data_ptr(), flow.data_ptr(), out.data_ptr(), n, ch, d, h, w,
            nearest, padding, c.stream(image),
        )
        c.raise_cuda_error(OP, err)
    return out


def _launch_backward(grad_out, image, flow, mode, padding_mode, deterministic, need_image, need_flow, backend):
    name = c.resolve(backend, image, OP)
    if name == "cuda" and not hasattr(c.cuda_core(), "warp_backward"):
        name = "reference"
    if mode == "nearest":
        # Piecewise constant in the flow: no flow gradient. The image gradient is a plain scatter;
        # index_put_ with accumulate sums duplicates in a fixed order on every device.
        n, ch = image.shape[:2]
        idx, valid = reference.warp_nearest_source(flow, padding_mode)
        contributions = (grad_out.reshape(n, ch, -1) * valid.unsqueeze(1).to(grad_out.dtype))
        grad_image = torch.zeros_like(image).reshape(n, ch, -1)
        batch = torch.arange(n, device=image.device).view(n, 1, 1).expand(n, ch, idx.shape[1])
        channel = torch.arange(ch, device=image.device).view(1, ch, 1).expand(n, ch, idx.shape[1])
        grad_image.index_put_((batch, channel, idx.unsqueeze(1).expand(n, ch, -1)), contributions, accumulate=True)
        return grad_image.reshape(image.shape), None
    if name == "reference":
        fn = lambda i, f: reference.warp(i, f, mode, padding_mode)  # noqa: E731
        return tuple(c.reference_vjp(fn, [image, flow], grad_out, [need_image, need_flow]))
    grad_out, image, flow = grad_out.contiguous(), image.contiguous(), flow.contiguous()
    padding = _PADDINGS.index(padding_mode)
    if name == "triton":
        from ..triton_kernels import warp as kernel

        return kernel.backward(grad_out, image, flow, padding, need_image, need_flow, deterministic)
    grad_image = torch.empty_like(image) if need_image else None
    grad_flow = torch.empty_like(flow) if need_flow else None
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    n, ch, d, h, w = image.shape
    if name == "cpu":
        # One deterministic path: private per-thread accumulation, summed in thread order.
        c.cpu_core().warp_backward(
            c.dtype_name(image), grad_out.data_ptr(), image.data_ptr(), flow.data_ptr(), ptr(grad_image),
            ptr(grad_flow), n, ch, d, h, w, padding, c.threads(image.numel() + flow.numel()),
        )
    else:
        core = c.cuda_core()
        # Scratch only for the deterministic image gradient (sizing it asks CUB, on the current device).
        with torch.cuda.device(image.device):
            nbytes = core.warp_workspace_bytes(n, d, h, w, deterministic) if need_image else 0
        scratch = c.workspace(image, nbytes)
        err = core.warp_backward(
            image.dtype == torch.float64, grad_out.data_ptr(), image.data_ptr(), flow.data_ptr(), ptr(grad_image),
            ptr(grad_flow), n, ch, d, h, w, padding, deterministic, scratch.data_ptr(), nbytes, c.stream(image),
        )
        c.raise_cuda_error(OP, err)
    return grad_image, grad_flow


@torch.library.custom_op("gradreg::warp", mutates_args=())
def _warp_op(image: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str, deterministic: bool,
             backend: str) -> torch.Tensor:
    with c.on_device_of(image):
        return _launch_forward(image, flow, mode, padding_mode, backend)


@_warp_op.register_fake
def _(image, flow, mode, padding_mode, deterministic, backend):
    return image.new_empty(image.shape)


@torch.library.custom_op("gradreg::warp_backward", mutates_args=())
def _warp_backward_op(grad_out: torch.Tensor, image: torch.Tensor, flow: torch.Tensor, mode: str,
                      padding_mode: str, deterministic: bool, need_image: bool, need_flow: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with c.on_device_of(image):
        gi, gf = _launch_backward(grad_out, image, flow, mode, padding_mode, deterministic, need_image,
                                  need_flow, backend)
    # A custom op returns tensors, not None: an unneeded gradient comes back empty.
    return (gi if gi is not None else image.new_empty(0)), (gf if gf is not None else flow.new_empty(0))


@_warp_backward_op.register_fake
def _(grad_out, image, flow, mode, padding_mode, deterministic, need_image, need_flow, backend):
    return (image.new_empty(image.shape if need_image else (0,)), flow.new_empty(flow.shape if need_flow else (0,)))


def _setup_context(ctx, inputs, output):
    image, flow, mode, padding_mode, deterministic, backend = inputs
    ctx.save_for_backward(image, flow)
    ctx.mode, ctx.padding_mode, ctx.deterministic, ctx.backend = mode, padding_mode, deterministic, backend


def _backward(ctx, grad_out):
    image, flow = ctx.saved_tensors
    need_image, need_flow = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.mode != "nearest"
    if not (need_image or need_flow):
        return None, None, None, None, None, None
    gi, gf = _warp_backward(grad_out, image, flow, ctx.mode, ctx.padding_mode, ctx.deterministic, need_image,
                               need_flow, ctx.backend)
    return (gi if need_image else None), (gf if need_flow else None), None, None, None, None


_warp_op.register_autograd(_backward, setup_context=_setup_context)
_warp = c.functorch_ready(_warp_op, OP, _setup_context, _backward)
_warp_backward = c.functorch_ready(_warp_backward_op, OP)


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
         deterministic: bool = False, backend: str | None = None) -> torch.Tensor:
    """Warp ``image`` by a dense displacement field, fused trilinear (or nearest) sampling.

    Output voxel ``x`` takes the value of ``image`` at ``x + flow[:, :, x]``, in voxel units; channel k of
    ``flow`` moves along spatial axis k in (D, H, W) order (the VoxelMorph/MONAI convention). This equals
    ``F.grid_sample(image, grid, mode, padding_mode, align_corners=True)`` with ``grid`` the identity plus
    ``flow`` normalised to [-1, 1] and reversed to (x, y, z) order, whenever every spatial size is > 1; for
    an axis of size 1 (where that normalisation divides by zero) the voxel-space rule above still holds.

    Args:
        image: (N, C, D, H, W), float32 or float64 (float16/bfloat16 computed in float32).
        flow: (N, 3, D, H, W) displacement in voxels, same dtype, device, batch and spatial shape.
        mode: ``"bilinear"`` (trilinear; differentiable in image and flow) or ``"nearest"`` (round half to
            even, for label maps; no gradient w.r.t. the flow).
        padding_mode: ``"zeros"`` (outside samples are 0) or ``"border"`` (coordinates clipped to the volume;
            the flow gradient is 0 where clipped, as in grid_sample). Non-finite sample points give 0.
        deterministic: make the backward bit-identical from run to run. The CPU backward always is (private
            per-thread accumulation, summed in a fixed order); on CUDA it selects a gather-based image
            gradient instead of atomics.
        backend: see :func:`gradreg_fast.gradient_magnitude`.

    Returns:
        (N, C, D, H, W) warped image.
    """
    c.check_volume(OP, "image", image)
    c.check_volume(OP, "flow", flow, channels=3)
    c.check_same(OP, ("image", "flow"), image, flow, spatial_only=True)
    if mode not in _MODES:
        raise ValueError(f"{OP}: `mode` must be one of {_MODES}, got {mode!r}")
    if padding_mode not in _PADDINGS:
        raise ValueError(f"{OP}: `padding_mode` must be one of {_PADDINGS}, got {padding_mode!r}")
    backend = c.backend_for(backend, image, OP)
    dtype = c.compute_dtype(image)
    deterministic = c.check_bool_argument(OP, "deterministic", deterministic)
    out = _warp(image.to(dtype), flow.to(dtype), mode, padding_mode, deterministic, backend)
    return out.to(image.dtype)
