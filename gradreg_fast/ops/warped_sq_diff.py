"""warped_sq_diff: registration (``torch.ops.gradreg.warped_sq_diff``), fake, autograd, dispatch."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from . import _common as c
from .warp import _launch_backward as _warp_backward
from .warp import _launch_forward as _warp_forward

OP = "warped_sq_diff"
_PADDINGS = ("zeros", "border")


def _check_weight_values(weight):
    # Inside the op, so that torch.compile traces no data-dependent branch. The minimum is NaN where any weight
    # is, and `>= 0` refuses it; one reduction, half the time of `(weight >= 0).all()` on the engine's masks.
    if weight is not None and not bool(weight.min() >= 0):
        raise ValueError(f"{OP}: `weight` must be non-negative (and not NaN) everywhere")


def _channels_last(volume: torch.Tensor) -> bool:
    """Whether ``volume`` is laid out channels-last (torch.channels_last_3d) and not also channels-first."""
    return volume.is_contiguous(memory_format=torch.channels_last_3d) and not volume.is_contiguous()


def _launch_forward(moving, fixed, flow, weight, padding_mode, need_flow, backend):
    _check_weight_values(weight)
    if backend == "reference":
        # The reference backward recomputes everything: no flow gradient stored.
        return reference.warped_sq_diff(moving, fixed, flow, weight, padding_mode), flow.new_empty(0)
    # A channels-last moving image keeps each corner's channels side by side: the CPU kernel then reads
    # them in order, with one set of corner weights for all channels (several times faster at C >= 8).
    interleaved = backend == "cpu" and moving.shape[1] > 1 and _channels_last(moving)
    layout = torch.channels_last_3d if interleaved else torch.contiguous_format
    moving, fixed = moving.contiguous(memory_format=layout), fixed.contiguous(memory_format=layout)
    flow = flow.contiguous()
    weight = weight.contiguous() if weight is not None else None
    padding = _PADDINGS.index(padding_mode)
    grad_flow = torch.empty_like(flow, memory_format=torch.contiguous_format) if need_flow else flow.new_empty(0)
    ptr = lambda t: t.data_ptr() if t is not None and t.numel() else 0  # noqa: E731
    n, ch, d, h, w = moving.shape
    if backend == "cpu":
        total = c.cpu_core().warped_sq_diff_forward(
            c.dtype_name(moving), moving.data_ptr(), fixed.data_ptr(), flow.data_ptr(), ptr(weight), ptr(grad_flow),
            n, ch, d, h, w, padding, interleaved, c.threads(moving.numel() + flow.numel()))
        return torch.tensor(total, dtype=moving.dtype), grad_flow
    if backend == "triton":
        from ..triton_kernels import warped_sq_diff as kernel

        return kernel.forward(moving, fixed, flow, weight, padding, need_flow)
    core = c.cuda_core()
    with torch.cuda.device(moving.device):
        nbytes = core.warped_sq_diff_workspace_bytes(n, d, h, w)
    scratch = c.workspace(moving, nbytes)
    total = moving.new_empty(())
    c.raise_cuda_error(OP, core.warped_sq_diff_forward(
        moving.dtype == torch.float64, moving.data_ptr(), fixed.data_ptr(), flow.data_ptr(), ptr(weight),
        ptr(grad_flow), total.data_ptr(), n, ch, d, h, w, padding, scratch.data_ptr(), nbytes, c.stream(moving)))
    return total, grad_flow


def _launch_backward(grad, saved_grad_flow, moving, fixed, flow, weight, padding_mode, need_moving, need_fixed,
                     need_flow, backend):
    if backend == "reference":
        fn = lambda m, f, u: reference.warped_sq_diff(m, f, u, weight, padding_mode)  # noqa: E731
        return tuple(c.reference_vjp(fn, [moving, fixed, flow], grad, [need_moving, need_fixed, need_flow]))
    grad_flow = grad * saved_grad_flow if need_flow and saved_grad_flow.numel() else None
    recompute_flow = need_flow and grad_flow is None
    grad_moving = grad_fixed = None
    if need_moving or need_fixed or recompute_flow:
        # The rare paths (moving or fixed needing a gradient, or a flow gradient the forward did not
        # store) go through warp's kernels: the upstream of the warped image is 2 w diff.
        warped = _warp_forward(moving, flow, "bilinear", padding_mode, backend)
        upstream = 2 * grad * (warped - fixed)
        if weight is not None:
            upstream = torch.where(weight != 0, weight * upstream, torch.zeros_like(upstream))
        grad_fixed = -upstream if need_fixed else None
        if need_moving or recompute_flow:
            grad_moving, recomputed = _warp_backward(upstream, moving, flow, "bilinear", padding_mode, True,
                                                     need_moving, recompute_flow, backend)
            grad_flow = recomputed if recompute_flow else grad_flow
    return grad_moving, grad_fixed, grad_flow


@torch.library.custom_op("gradreg::warped_sq_diff", mutates_args=())
def _warped_sq_diff_op(moving: torch.Tensor, fixed: torch.Tensor, flow: torch.Tensor, weight: Optional[torch.Tensor],
                       padding_mode: str, need_flow: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weighted sum, a 0-dim tensor; the flow gradient of that sum when need_flow, else empty)."""
    with c.on_device_of(moving):
        return _launch_forward(moving, fixed, flow, weight, padding_mode, need_flow, backend)


@_warped_sq_diff_op.register_fake
def _(moving, fixed, flow, weight, padding_mode, need_flow, backend):
    stored = need_flow and backend != "reference"
    return moving.new_empty(()), flow.new_empty(flow.shape if stored else (0,))


@torch.library.custom_op("gradreg::warped_sq_diff_backward", mutates_args=())
def _warped_sq_diff_backward_op(grad: torch.Tensor, saved_grad_flow: torch.Tensor, moving: torch.Tensor,
                                fixed: torch.Tensor, flow: torch.Tensor, weight: Optional[torch.Tensor],
                                padding_mode: str, need_moving: bool, need_fixed: bool, need_flow: bool,
                                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with c.on_device_of(moving):
        gm, gx, gu = _launch_backward(grad, saved_grad_flow, moving, fixed, flow, weight, padding_mode, need_moving,
                                      need_fixed, need_flow, backend)
    # A custom op returns tensors, not None: an unneeded gradient comes back empty.
    return tuple(g if g is not None else moving.new_empty(0) for g in (gm, gx, gu))


@_warped_sq_diff_backward_op.register_fake
def _(grad, saved_grad_flow, moving, fixed, flow, weight, padding_mode, need_moving, need_fixed, need_flow, backend):
    return (moving.new_empty(moving.shape if need_moving else (0,)),
            fixed.new_empty(fixed.shape if need_fixed else (0,)), flow.new_empty(flow.shape if need_flow else (0,)))


def _setup_context(ctx, inputs, output):
    moving, fixed, flow, weight, padding_mode, need_flow, backend = inputs
    _, saved_grad_flow = output
    ctx.mark_non_differentiable(saved_grad_flow)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(moving, fixed, flow, weight, saved_grad_flow)
    ctx.padding_mode, ctx.backend = padding_mode, backend


def _backward(ctx, grad, _):
    need_moving, need_fixed, need_flow = ctx.needs_input_grad[:3]
    if grad is None or not (need_moving or need_fixed or need_flow):
        return (None,) * 7
    moving, fixed, flow, weight, saved_grad_flow = ctx.saved_tensors
    gm, gx, gu = _warped_sq_diff_backward(grad, saved_grad_flow, moving, fixed, flow, weight, ctx.padding_mode,
                                          need_moving, need_fixed, need_flow, ctx.backend)
    return (gm if need_moving else None), (gx if need_fixed else None), (gu if need_flow else None), *(None,) * 4


_warped_sq_diff_op.register_autograd(_backward, setup_context=_setup_context)
_warped_sq_diff = c.functorch_ready(_warped_sq_diff_op, OP, _setup_context, _backward)
_warped_sq_diff_backward = c.functorch_ready(_warped_sq_diff_backward_op, OP)


def warped_sq_diff(moving: torch.Tensor, fixed: torch.Tensor, flow: torch.Tensor, weight: torch.Tensor | None = None,
                   padding_mode: str = "border", backend: str | None = None) -> torch.Tensor:
    """Weighted sum of squared differences between ``fixed`` and ``moving`` warped by ``flow``, fused.

    ``sum_{n,x} weight(n, x) * sum_c (moving_c(x + flow(x)) - fixed_c(x))^2``, where ``moving`` is sampled
    exactly as :func:`gradreg_fast.warp` samples it (trilinear, voxel units, channel k of ``flow`` along
    spatial axis k). No warped image is stored: one pass gives the value and, when ``flow`` requires grad,
    the flow gradient ``2 w sum_c diff_c dM_c/du`` of every voxel, kept for the backward, which only
    scales it by the upstream gradient. The value is the same for every thread count (per-row partial
    sums added in row order).

    Args:
        moving: (N, C, D, H, W), float32 or float64 (float16/bfloat16 computed in float32); any strides.
            On the CPU, ``moving`` in ``torch.channels_last_3d`` (``fixed`` is then read that way too) takes
            a kernel that reads each corner's channels together: several times faster for many channels
            (the engine's descriptors); the value differs only by the rounding of the channel sum order.
            Its gradient (a scatter) goes through warp's backward kernels.
        fixed: same shape, dtype and device as ``moving``. Its gradient is ``-2 w diff``.
        flow: (N, 3, D, H, W) displacement in voxels, same dtype and device.
        weight: optional (N, 1, D, H, W) non-negative voxel weights (a mask of the fixed field of view),
            same dtype and device; None means all ones. A voxel of weight 0 adds exactly 0 and passes no
            gradient, even where its difference is not finite. ``weight`` is a constant: no gradient flows
            to it, and one that requires grad is refused (pass ``weight.detach()``).
        padding_mode: ``"border"`` (default; coordinates clipped to the volume, zero flow gradient where
            clipped) or ``"zeros"``, as in :func:`gradreg_fast.warp`.
        backend: see :func:`gradreg_fast.gradient_magnitude`.

    Returns:
        A 0-dim tensor (divide by the weight sum for a mean).
    """
    c.check_volume(OP, "moving", moving)
    c.check_volume(OP, "fixed", fixed)
    c.check_volume(OP, "flow", flow, channels=3)
    c.check_same(OP, ("moving", "fixed"), moving, fixed)
    c.check_same(OP, ("moving", "flow"), moving, flow, spatial_only=True)
    if weight is not None:
        c.check_volume(OP, "weight", weight, channels=1)
        c.check_same(OP, ("moving", "weight"), moving, weight, spatial_only=True)
        if torch.is_grad_enabled() and weight.requires_grad:
            raise ValueError(f"{OP}: `weight` is a constant (no gradient flows to it) but requires grad; "
                             "pass weight.detach()")
    if padding_mode not in _PADDINGS:
        raise ValueError(f"{OP}: `padding_mode` must be one of {_PADDINGS}, got {padding_mode!r}")
    backend = c.backend_for(backend, moving, OP)
    result_dtype, dtype = moving.dtype, c.compute_dtype(moving)
    with c.without_autocast(moving.device):
        moving, fixed, flow = moving.to(dtype), fixed.to(dtype), flow.to(dtype)
        weight = weight.to(dtype) if weight is not None else None
        need_flow = torch.is_grad_enabled() and flow.requires_grad
        value, _ = _warped_sq_diff(moving, fixed, flow, weight, padding_mode, need_flow, backend)
    return value.to(result_dtype)
