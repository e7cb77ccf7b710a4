"""integrate_velocity (``torch.ops.gradreg.integrate``), fake, autograd, dispatch; compose."""

from __future__ import annotations

import torch

from .. import reference
from . import _common as c
from .warp import warp

OP = "integrate_velocity"
KERNEL = "integrate"  # the name the backends know the kernels by
PADDINGS = ("zeros", "border")
MAX_STEPS = 30


# The forward keeps at most this many intermediate fields for the backward: with 7 steps u_2, u_4 and
# u_6, so that no field is recomputed by more than one squaring step (3 steps in all instead of 21),
# for three fields of memory.
MAX_CHECKPOINTS = 3


def checkpoint_layout(steps: int) -> tuple[int, int]:
    """(interval, count): the forward keeps u_k for k = interval, 2 interval, ... < steps."""
    interval = max(1, -(-steps // (MAX_CHECKPOINTS + 1)))
    return interval, (max(steps - 1, 0)) // interval


def _launch_forward(velocity, steps, padding_mode, keep_checkpoints, backend):
    interval, count = checkpoint_layout(steps)
    if backend == "reference":
        return reference.integrate_velocity(velocity, steps, padding_mode), velocity.new_empty(0)
    velocity = velocity.contiguous()
    padding = PADDINGS.index(padding_mode)
    count = count if keep_checkpoints else 0
    if backend == "triton":
        from ..triton_kernels import integrate as kernel

        return kernel.forward(velocity, steps, padding, interval, count)
    n, _, d, h, w = velocity.shape
    out = torch.empty_like(velocity)
    scratch = torch.empty_like(velocity)  # with `out` (and the checkpoints), all the forward needs
    checkpoints = velocity.new_empty((count, *velocity.shape)) if count else velocity.new_empty(0)
    ptr = checkpoints.data_ptr() if count else 0
    if backend == "cpu":
        c.cpu_core().integrate_forward(c.dtype_name(velocity), velocity.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                                       ptr, interval, n, d, h, w, steps, padding, c.threads(velocity.numel()))
    else:
        c.raise_cuda_error(OP, c.cuda_core().integrate_forward(
            velocity.dtype == torch.float64, velocity.data_ptr(), out.data_ptr(), scratch.data_ptr(), ptr, interval,
            n, d, h, w, steps, padding, c.stream(velocity)))
    return out, checkpoints


def _launch_backward(grad_out, velocity, checkpoints, steps, padding_mode, backend):
    if backend == "reference":
        fn = lambda v: reference.integrate_velocity(v, steps, padding_mode)  # noqa: E731
        return c.reference_vjp(fn, [velocity], grad_out, [True])[0]
    velocity, grad_out = velocity.contiguous(), grad_out.contiguous()
    padding = PADDINGS.index(padding_mode)
    interval, _ = checkpoint_layout(steps)
    if backend == "triton":
        from ..triton_kernels import integrate as kernel

        return kernel.backward(grad_out, velocity, checkpoints, steps, padding, interval)
    n, _, d, h, w = velocity.shape
    grad = torch.empty_like(velocity)
    # Two fields for recomputing the intermediate fields, one for the gradient's ping-pong (the CPU core
    # scatters into it directly; the GPU kernels with atomics).
    scratch = velocity.new_empty((3, *velocity.shape))
    ptr = checkpoints.data_ptr() if checkpoints.numel() else 0
    if backend == "cpu":
        c.cpu_core().integrate_backward(c.dtype_name(velocity), velocity.data_ptr(), ptr, interval,
                                        grad_out.data_ptr(), grad.data_ptr(), scratch.data_ptr(), n, d, h, w, steps,
                                        padding, c.threads(velocity.numel()))
    else:
        c.raise_cuda_error(OP, c.cuda_core().integrate_backward(
            velocity.dtype == torch.float64, velocity.data_ptr(), ptr, interval, grad_out.data_ptr(), grad.data_ptr(),
            scratch.data_ptr(), n, d, h, w, steps, padding, c.stream(velocity)))
    return grad


@torch.library.custom_op("gradreg::integrate", mutates_args=())
def _integrate_op(velocity: torch.Tensor, steps: int, padding_mode: str, keep_checkpoints: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the displacement, the checkpoint fields the backward starts its recomputations from, or empty)."""
    with c.on_device_of(velocity):
        return _launch_forward(velocity, steps, padding_mode, keep_checkpoints, backend)


@_integrate_op.register_fake
def _(velocity, steps, padding_mode, keep_checkpoints, backend):
    count = checkpoint_layout(steps)[1] if keep_checkpoints and backend != "reference" else 0
    return velocity.new_empty(velocity.shape), (velocity.new_empty((count, *velocity.shape)) if count
                                                else velocity.new_empty(0))


@torch.library.custom_op("gradreg::integrate_backward", mutates_args=())
def _integrate_backward_op(grad_out: torch.Tensor, velocity: torch.Tensor, checkpoints: torch.Tensor, steps: int,
                           padding_mode: str, backend: str) -> torch.Tensor:
    with c.on_device_of(velocity):
        return _launch_backward(grad_out, velocity, checkpoints, steps, padding_mode, backend)


@_integrate_backward_op.register_fake
def _(grad_out, velocity, checkpoints, steps, padding_mode, backend):
    return velocity.new_empty(velocity.shape)


def _setup_context(ctx, inputs, output):
    velocity, steps, padding_mode, keep_checkpoints, backend = inputs
    _, checkpoints = output
    ctx.mark_non_differentiable(checkpoints)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(velocity, checkpoints)
    ctx.args = (steps, padding_mode, backend)


def _backward(ctx, grad_out, _):
    if grad_out is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    velocity, checkpoints = ctx.saved_tensors
    return _integrate_backward(grad_out, velocity, checkpoints, *ctx.args), None, None, None, None


_integrate_op.register_autograd(_backward, setup_context=_setup_context)
_integrate = c.functorch_ready(_integrate_op, OP, _setup_context, _backward)
_integrate_backward = c.functorch_ready(_integrate_backward_op, OP)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7, padding_mode: str = "zeros",
                       backend: str | None = None) -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring, one fused op: VoxelMorph's ``VecInt``.

    ``u = velocity / 2**steps``, then ``steps`` times ``u = u + warp(u, u)``: each step composes the field
    with itself (see :func:`compose`). The sampling is :func:`gradreg_fast.warp`'s (trilinear, voxel units,
    channel k along spatial axis k in (D, H, W) order; zeros or border padding), which equals VoxelMorph's
    ``SpatialTransformer`` (``grid_sample(align_corners=True)``) when every spatial size is > 1.

    Memory: the chain is never stored. When a gradient is wanted, the forward keeps at most three
    intermediate fields as checkpoints (u_2, u_4 and u_6 for 7 steps); the backward recomputes every
    other step's input from the nearest stored field below it (3 extra squaring steps for 7, against 21
    from the velocity alone), holding two fields for that and the running gradient (two fields). On the
    CPU each backward step scatters straight into the gradient, slab by slab (slabs twice as thick as
    the largest displacement, every other one at a time, so no two threads write one voxel): no
    per-thread copy, and the same bits whatever the thread count.

    Args:
        velocity: (N, 3, D, H, W) in voxels, float32 or float64 (float16/bfloat16 computed in float32).
        steps: int >= 0 (0 returns the velocity itself), at most 30.
        padding_mode: ``"zeros"`` (VoxelMorph's) or ``"border"``.
        backend: see :func:`gradreg_fast.gradient_magnitude`.

    Returns:
        (N, 3, D, H, W) displacement field, in ``velocity``'s dtype.
    """
    c.check_volume(OP, "velocity", velocity, channels=3)
    steps = c.check_int_argument(OP, "steps", steps, 0, MAX_STEPS)
    if padding_mode not in PADDINGS:
        raise ValueError(f"{OP}: `padding_mode` must be one of {PADDINGS}, got {padding_mode!r}")
    backend = c.backend_for(backend, velocity, KERNEL)
    dtype, result_dtype = c.compute_dtype(velocity), velocity.dtype
    with c.without_autocast(velocity.device):
        velocity = velocity.to(dtype)
        keep = torch.is_grad_enabled() and velocity.requires_grad
        out, _ = _integrate(velocity, steps, padding_mode, keep, backend)
    return out.to(result_dtype)


def compose(flow_a: torch.Tensor, flow_b: torch.Tensor, padding_mode: str = "zeros",
            backend: str | None = None) -> torch.Tensor:
    """The displacement of "warp by ``flow_a``, then by ``flow_b``": ``flow_b + warp(flow_a, flow_b)``.

    ``warp(warp(image, flow_a), flow_b)`` samples ``image`` at ``x + flow_b(x) + flow_a(x + flow_b(x))``,
    which is ``warp(image, compose(flow_a, flow_b))`` up to the interpolation of ``flow_a``. One
    scaling-and-squaring step is ``compose(u, u)``. Differentiable in both fields (through
    :func:`gradreg_fast.warp`).

    Args:
        flow_a, flow_b: (N, 3, D, H, W) displacements in voxels, same shape, dtype and device.
        padding_mode: ``"zeros"`` or ``"border"``, for sampling ``flow_a``.
    """
    c.check_volume("compose", "flow_a", flow_a, channels=3)
    c.check_volume("compose", "flow_b", flow_b, channels=3)
    c.check_same("compose", ("flow_a", "flow_b"), flow_a, flow_b)
    return flow_b + warp(flow_a, flow_b, "bilinear", padding_mode, backend=backend)
