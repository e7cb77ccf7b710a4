"""mind_ssc and mind: registration (``torch.ops.gradreg.mind_descriptor``), fake, autograd, dispatch."""

from __future__ import annotations

import torch

from ..reference.mind import self_similarity
from . import _common as c
from .mind_tables import MIND_PAIRS, SSC_PAIRS, flat_pairs

OP = "mind"
KINDS = {"ssc": (SSC_PAIRS, True), "mind": (MIND_PAIRS, False)}  # pairs, subtract_min
_FLAT = {kind: list(flat_pairs(pairs)) for kind, (pairs, _) in KINDS.items()}


def channels(kind: str) -> int:
    return len(KINDS[kind][0])


def _reference(kind, radius, dilation, per_item):
    pairs, subtract_min = KINDS[kind]
    return lambda v: self_similarity(v, pairs, radius, dilation, subtract_min, per_item)


def descriptor_forward(vol, kind, radius, dilation, per_item, backend):
    """(descriptor, clamped variance, flag byte) of a contiguous-or-not (N, 1, D, H, W) volume."""
    name = c.resolve(backend, vol, OP)
    n, _, d, h, w = vol.shape
    if name == "reference":
        out = _reference(kind, radius, dilation, per_item)(vol)
        # The reference backward recomputes everything; these are placeholders of the real shapes.
        return out, vol.new_zeros((n, 1, d, h, w)), torch.zeros((n, 1, d, h, w), dtype=torch.uint8, device=vol.device)
    vol = vol.contiguous()
    pairs, subtract_min = KINDS[kind]
    if name == "triton":
        from ..triton_kernels import mind as kernel

        return kernel.descriptor_forward(vol, _FLAT[kind], radius, dilation, subtract_min, per_item)
    out = vol.new_empty((n, len(pairs), d, h, w))
    variance = vol.new_empty((n, 1, d, h, w))
    flags = torch.empty((n, 1, d, h, w), dtype=torch.uint8, device=vol.device)
    args = (out.data_ptr(), variance.data_ptr(), flags.data_ptr(), n, d, h, w, _FLAT[kind], radius, dilation,
            subtract_min, per_item)
    if name == "cpu":
        c.cpu_core().descriptor_forward(c.dtype_name(vol), vol.data_ptr(), *args, c.threads(vol.numel()))
    else:
        core = c.cuda_core()
        is_double = vol.dtype == torch.float64
        nbytes = core.descriptor_workspace_bytes(is_double, n, d, h, w, len(pairs), False)
        scratch = c.workspace(vol, nbytes)
        c.raise_cuda_error(OP, core.descriptor_forward(is_double, vol.data_ptr(), *args, scratch.data_ptr(), nbytes,
                                                       c.stream(vol)))
    return out, variance, flags


def descriptor_backward(upstream, out, vol, variance, flags, kind, radius, dilation, per_item, backend,
                        target=None, squared=False):
    """d(loss)/d(vol). ``upstream`` is grad_out, or (with ``target``) the scalar upstream of the fused loss.

    ``target`` is the fixed image's descriptor (the penalty is formed per voxel in the kernel), except on
    the CPU, where it is the penalty's derivative that the fused loss's forward left in its place.
    """
    name = c.resolve(backend, vol, OP)
    if name == "cuda" and not hasattr(c.cuda_core(), "descriptor_backward"):
        name = "reference"
    if name == "reference":
        fn = _reference(kind, radius, dilation, per_item)
        if target is None:
            return c.reference_vjp(fn, [vol], upstream, [True])[0]

        def penalty_sum(v):
            diff = fn(v) - target
            return (diff * diff if squared else diff.abs()).sum()

        return c.reference_vjp(penalty_sum, [vol], upstream, [True])[0]
    vol, out = vol.contiguous(), out.contiguous()
    pairs, subtract_min = KINDS[kind]
    if name == "triton":
        from ..triton_kernels import mind as kernel

        if target is None:
            return kernel.descriptor_backward(upstream.contiguous(), out, vol, variance, flags, _FLAT[kind], radius,
                                              dilation, subtract_min)
        return kernel.descriptor_loss_backward(upstream, squared, target.contiguous(), out, vol, variance, flags,
                                               _FLAT[kind], radius, dilation, subtract_min)
    grad_vol = torch.empty_like(vol)
    n, _, d, h, w = vol.shape
    tail = (out.data_ptr(), vol.data_ptr(), variance.data_ptr(), flags.data_ptr(), grad_vol.data_ptr(), n, d, h, w,
            _FLAT[kind], radius, dilation, subtract_min)
    # Every temporary whose pointer is passed stays bound to a name until the kernel has run.
    if name == "cpu":
        # On the CPU the fused loss's forward stored the penalty's derivative in `target`'s place
        # (mind_loss.py), so its backward is the plain one with the upstream scalar as the scale.
        grad = (upstream if target is None else target).contiguous()
        scale = 1.0 if target is None else float(upstream)
        c.cpu_core().descriptor_backward(c.dtype_name(vol), grad.data_ptr(), scale, *tail, c.threads(vol.numel()))
        return grad_vol
    core, dtype = c.cuda_core(), vol.dtype == torch.float64
    nbytes = core.descriptor_workspace_bytes(dtype, n, d, h, w, len(pairs), True)
    scratch = c.workspace(vol, nbytes)
    extra = (scratch.data_ptr(), nbytes, c.stream(vol))
    if target is None:
        upstream = upstream.contiguous()
        result = core.descriptor_backward(dtype, upstream.data_ptr(), *tail, *extra)
    else:
        target = target.contiguous()
        scale_tensor = upstream.to(vol.dtype).contiguous()  # read on the device: no sync
        result = core.descriptor_loss_backward(dtype, scale_tensor.data_ptr(), squared, target.data_ptr(), *tail,
                                               *extra)
    c.raise_cuda_error(OP, result)
    return grad_vol


@torch.library.custom_op("gradreg::mind_descriptor", mutates_args=())
def _descriptor_op(vol: torch.Tensor, kind: str, radius: int, dilation: int, per_item: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with c.on_device_of(vol):
        return descriptor_forward(vol, kind, radius, dilation, per_item, backend)


@_descriptor_op.register_fake
def _(vol, kind, radius, dilation, per_item, backend):
    n, _, d, h, w = vol.shape
    return (vol.new_empty((n, channels(kind), d, h, w)), vol.new_empty((n, 1, d, h, w)),
            vol.new_empty((n, 1, d, h, w), dtype=torch.uint8))


@torch.library.custom_op("gradreg::mind_descriptor_backward", mutates_args=())
def _descriptor_backward_op(grad_out: torch.Tensor, out: torch.Tensor, vol: torch.Tensor, variance: torch.Tensor,
                            flags: torch.Tensor, kind: str, radius: int, dilation: int, per_item: bool,
                            backend: str) -> torch.Tensor:
    with c.on_device_of(vol):
        return descriptor_backward(grad_out, out, vol, variance, flags, kind, radius, dilation, per_item, backend)


@_descriptor_backward_op.register_fake
def _(grad_out, out, vol, variance, flags, kind, radius, dilation, per_item, backend):
    return vol.new_empty(vol.shape)


def _setup_context(ctx, inputs, output):
    vol, kind, radius, dilation, per_item, backend = inputs
    out, variance, flags = output
    ctx.mark_non_differentiable(variance, flags)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for variance and flags
    ctx.save_for_backward(vol, out, variance, flags)
    ctx.args = (kind, radius, dilation, per_item, backend)


def _backward(ctx, grad_out, _grad_variance, _grad_flags):
    vol, out, variance, flags = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    return _descriptor_backward(grad_out, out, vol, variance, flags, *ctx.args), None, None, None, None, None


_descriptor_op.register_autograd(_backward, setup_context=_setup_context)
# What the public functions call (see _common.functorch_ready), named by the kind of descriptor.
_descriptor = c.functorch_ready(_descriptor_op, "mind_ssc / mind", _setup_context, _backward)
_descriptor_backward = c.functorch_ready(_descriptor_backward_op, "mind_ssc / mind")


def check_descriptor_args(op, name, vol, radius, dilation):
    """(radius, dilation) as the kernels take them, after checking ``vol`` and both numbers."""
    c.check_volume(op, name, vol, channels=1)
    radius = c.check_int_argument(op, "radius", radius, 0, c.MAX_RADIUS)
    dilation = c.check_int_argument(op, "dilation", dilation, 1, c.MAX_DILATION)
    # With replicate edges, every offset of a dilation >= (longest axis - 1) lands on the edge voxel:
    # the result is exactly that of the smaller dilation, which keeps the kernels' padding small.
    longest = max(vol.shape[2:])
    if dilation >= longest:
        dilation = max(1, longest - 1)
    return radius, dilation


def _public_descriptor(op, kind, vol, radius, dilation, per_item, backend):
    radius, dilation = check_descriptor_args(op, "vol", vol, radius, dilation)
    backend = c.backend_for(backend, vol, OP)
    per_item = c.check_bool_argument(op, "per_item", per_item)
    out = _descriptor(vol.to(c.compute_dtype(vol)), kind, radius, dilation, per_item, backend)[0]
    return out.to(vol.dtype)


def mind_ssc(vol: torch.Tensor, radius: int = 2, dilation: int = 2, per_item: bool = False,
             backend: str | None = None) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013), fused, identical to the ConvexAdam/TransMorph one.

    Channel k is the (2*radius+1)^3 box mean (replicate edges) of the squared difference between the
    volume shifted by ``dilation*a_k`` and by ``dilation*b_k`` (replicate edges), for the 12 pairs of
    six-neighbourhood offsets at squared distance 2, in ConvexAdam's channel order. Then the per-voxel
    minimum over channels is subtracted, the result is divided by the per-voxel channel mean clamped to
    [0.001 m, 1000 m] (m: the mean of that channel mean over the whole batch, or per item with
    ``per_item=True``), and mapped through exp(-x). m is computed on the device (no host sync) and is
    treated as a constant by the backward, as in the ``.item()``-based original.

    Any size >= 1 per axis works: offsets and boxes that leave the volume read its edge voxels. A
    constant volume gives all ones (where the original divides 0 by 0).

    Args:
        vol: (N, 1, D, H, W) float32/float64 (float16/bfloat16 computed in float32).
        radius: box radius (>= 0). dilation: offset length in voxels (>= 1).
        per_item: take m per batch item instead of over the whole batch.
        backend: see :func:`gradreg_fast.gradient_magnitude`.

    Returns:
        (N, 12, D, H, W), values in (0, 1], differentiable w.r.t. ``vol``.
    """
    return _public_descriptor("mind_ssc", "ssc", vol, radius, dilation, per_item, backend)


def mind(vol: torch.Tensor, radius: int = 1, dilation: int = 1, per_item: bool = False,
         backend: str | None = None) -> torch.Tensor:
    """MIND descriptor (Heinrich et al., MedIA 2012, eq. 4) with the six-neighbourhood search region, fused.

    Channel r is ``exp(-Dp(I, x, x + dilation*r) / V(x))``: ``Dp`` the (2*radius+1)^3 box mean (replicate
    edges) of ``(I(y) - I(y + dilation*r))**2``, and ``V`` the mean of the 6 patch distances, clamped to
    [0.001 m, 1000 m] with m its mean over the batch (or per item), as for :func:`mind_ssc`, so that flat
    regions stay finite. Channel order: offsets -z, -x, -y, +x, +z, +y (ConvexAdam's six-neighbourhood).

    Returns:
        (N, 6, D, H, W), differentiable w.r.t. ``vol``.
    """
    return _public_descriptor("mind", "mind", vol, radius, dilation, per_item, backend)
