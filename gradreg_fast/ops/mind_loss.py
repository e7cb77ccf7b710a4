"""mind_loss / MINDLoss: the fused loss op (``torch.ops.gradreg.mind_loss``), fake, autograd, dispatch."""

from __future__ import annotations

import torch

from . import _common as c
from .mind import _FLAT, KINDS, _descriptor, check_descriptor_args, descriptor_backward, descriptor_forward

OP = "mind_loss"
_DEFAULTS = {"ssc": (2, 2), "mind": (1, 1)}  # radius, dilation
_PENALTIES = ("l1", "l2")
_REDUCTIONS = ("mean", "sum", "none")


def _penalty(out, target, squared, name, owns_target):
    """(sum |out - target| or its square, what the backward needs of the target).

    On the CPU (reached with a precomputed fixed descriptor, which must stay intact) one pass also forms
    the penalty's derivative w.r.t. ``out`` in a new buffer: all the backward needs.
    """
    if name == "cpu":
        derivative = torch.empty_like(target)
        total = c.cpu_core().penalty_derivative(c.dtype_name(out), out.data_ptr(), target.data_ptr(),
                                                derivative.data_ptr(), out.numel(), squared, c.threads(out.numel()))
        return torch.tensor(total, dtype=out.dtype), derivative
    if name == "cuda" and hasattr(c.cuda_core(), "penalty_sum"):
        core = c.cuda_core()
        total = out.new_empty(())
        nbytes = core.penalty_workspace_bytes(out.numel())
        scratch = c.workspace(out, nbytes)
        c.raise_cuda_error(OP, core.penalty_sum(out.dtype == torch.float64, out.data_ptr(), target.data_ptr(),
                                                out.numel(), squared, total.data_ptr(), scratch.data_ptr(), nbytes,
                                                c.stream(out)))
        return total, target if owns_target else target.clone()
    diff = out - target
    return (diff * diff if squared else diff.abs()).sum(), target if owns_target else target.clone()


def _cpu_penalty_against_fixed(out, fixed, derivative, kind, radius, dilation, per_item, squared):
    """The CPU core's penalty of ``out`` against the descriptor of ``fixed``, which it never stores: built in
    ``derivative`` and left there as the penalty's derivative, or (``derivative`` None: a value alone)
    streamed through a ring of planes."""
    n, _, d, h, w = fixed.shape
    fixed = fixed.contiguous()
    scratch_variance = fixed.new_empty(fixed.shape)
    scratch_flags = torch.empty(fixed.shape, dtype=torch.uint8)
    head = (c.dtype_name(fixed), fixed.data_ptr(), out.data_ptr())
    tail = (scratch_variance.data_ptr(), scratch_flags.data_ptr(), n, d, h, w, _FLAT[kind], radius, dilation,
            KINDS[kind][1], per_item, squared, c.threads(fixed.numel()))
    if derivative is None:
        total = c.cpu_core().descriptor_penalty_streamed(*head, *tail)
    else:
        total = c.cpu_core().descriptor_penalty(*head, derivative.data_ptr(), *tail)
    return torch.tensor(total, dtype=out.dtype)


@torch.library.custom_op("gradreg::mind_loss", mutates_args=())
def _mind_loss_op(warped: torch.Tensor, fixed: torch.Tensor | None, fixed_descriptor: torch.Tensor | None, kind: str,
                  radius: int, dilation: int, squared: bool, per_item: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of penalties, warped descriptor, its variance, its flags, fixed descriptor).

    ``fixed_descriptor``, when given, is used instead of computing the descriptor of ``fixed``. On the
    CPU the last output holds the penalty's derivative instead of the fixed descriptor (see
    :func:`_penalty`): the backward needs nothing else, and the l1 case could not recover the sign later.
    (Outputs never alias inputs, as custom ops require: a given descriptor is copied, not returned.)
    """
    with c.on_device_of(warped):
        name = c.resolve(backend, warped, "mind")
        out, variance, flags = descriptor_forward(warped, kind, radius, dilation, per_item, backend)
        out = out.contiguous()
        if name == "cpu" and fixed_descriptor is None:
            derivative = torch.empty_like(out)
            total = _cpu_penalty_against_fixed(out, fixed, derivative, kind, radius, dilation, per_item, squared)
            return total, out, variance, flags, derivative
        owns_target = fixed_descriptor is None
        if owns_target:
            target = descriptor_forward(fixed, kind, radius, dilation, per_item, backend)[0].contiguous()
        else:
            target = fixed_descriptor.contiguous()
        total, target = _penalty(out, target, squared, name, owns_target)
        return total, out, variance, flags, target


@_mind_loss_op.register_fake
def _(warped, fixed, fixed_descriptor, kind, radius, dilation, squared, per_item, backend):
    n, _, d, h, w = warped.shape
    k = len(KINDS[kind][0])
    return (warped.new_empty(()), warped.new_empty((n, k, d, h, w)), warped.new_empty((n, 1, d, h, w)),
            warped.new_empty((n, 1, d, h, w), dtype=torch.uint8), warped.new_empty((n, k, d, h, w)))


@torch.library.custom_op("gradreg::mind_loss_backward", mutates_args=())
def _mind_loss_backward_op(grad_sum: torch.Tensor, out: torch.Tensor, warped: torch.Tensor, variance: torch.Tensor,
                           flags: torch.Tensor, target: torch.Tensor, kind: str, radius: int, dilation: int,
                           squared: bool, per_item: bool, backend: str) -> torch.Tensor:
    # The penalty's derivative is formed per voxel inside the kernel: no descriptor-sized gradient exists.
    with c.on_device_of(warped):
        return descriptor_backward(grad_sum, out, warped, variance, flags, kind, radius, dilation, per_item,
                                   backend, target=target, squared=squared)


@_mind_loss_backward_op.register_fake
def _(grad_sum, out, warped, variance, flags, target, kind, radius, dilation, squared, per_item, backend):
    return warped.new_empty(warped.shape)


@torch.library.custom_op("gradreg::mind_loss_value", mutates_args=())
def _mind_loss_value_op(warped: torch.Tensor, fixed: torch.Tensor, kind: str, radius: int, dilation: int,
                        squared: bool, per_item: bool, backend: str) -> torch.Tensor:
    """The sum of penalties alone, when no gradient is needed (no autograd formula on purpose).

    On the CPU only the warped descriptor is stored: the fixed image's descriptor planes stream through
    a ring of a few planes (its box sums are computed twice, for m and to compare)."""
    with c.on_device_of(warped):
        name = c.resolve(backend, warped, "mind")
        out = descriptor_forward(warped, kind, radius, dilation, per_item, backend)[0].contiguous()
        if name == "cpu":
            return _cpu_penalty_against_fixed(out, fixed, None, kind, radius, dilation, per_item, squared)
        target = descriptor_forward(fixed, kind, radius, dilation, per_item, backend)[0].contiguous()
        return _penalty(out, target, squared, name, True)[0]


@_mind_loss_value_op.register_fake
def _(warped, fixed, kind, radius, dilation, squared, per_item, backend):
    return warped.new_empty(())


def _setup_context(ctx, inputs, output):
    warped, fixed, fixed_descriptor, kind, radius, dilation, squared, per_item, backend = inputs
    _, out, variance, flags, target = output
    ctx.mark_non_differentiable(out, variance, flags, target)
    # Otherwise autograd hands the backward zero-filled gradients of the two descriptor-sized
    # auxiliary outputs: 2 x 12 floats per voxel allocated for nothing.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(warped, out, variance, flags, target)
    ctx.args = (kind, radius, dilation, squared, per_item, backend)


def _backward(ctx, grad_sum, *_):
    if grad_sum is None:
        return (None,) * 9
    warped, out, variance, flags, target = ctx.saved_tensors
    grad = _mind_loss_backward(grad_sum, out, warped, variance, flags, target, *ctx.args)
    return (grad,) + (None,) * 8


_mind_loss_op.register_autograd(_backward, setup_context=_setup_context)
_mind_loss = c.functorch_ready(_mind_loss_op, OP, _setup_context, _backward)
_mind_loss_backward = c.functorch_ready(_mind_loss_backward_op, OP)
# The value path has no gradient; the wrapper still refuses forward-mode AD instead of a zero tangent.
_mind_loss_value = c.functorch_ready(_mind_loss_value_op, OP)


def mind_loss(warped: torch.Tensor, fixed: torch.Tensor | None = None, descriptor: str = "ssc", penalty: str = "l1",
              radius: int | None = None, dilation: int | None = None, reduction: str = "mean",
              per_item: bool = False, backend: str | None = None,
              fixed_descriptor: torch.Tensor | None = None) -> torch.Tensor:
    """MIND similarity loss: the penalty between the descriptors of ``warped`` and ``fixed``.

    ``mean(|mind_ssc(warped) - mind_ssc(fixed)|)`` with the defaults; ``penalty="l2"`` squares instead
    (TransMorph's choice). When ``fixed`` needs no gradient and ``reduction`` is "mean" or "sum", one fused
    op computes it: the fixed descriptor is computed without autograd, and the backward forms the
    penalty's derivative per voxel inside the descriptor kernel, so no descriptor-sized gradient is
    ever allocated. On the CPU the fixed descriptor is never stored: with a gradient to ``warped`` it is
    built in the buffer of the penalty's derivative; without one (``torch.no_grad()``, or ``warped``
    not requiring grad) its planes stream through a small ring and only the warped descriptor exists.
    Otherwise both descriptors go through :func:`mind_ssc` / :func:`mind` with autograd.

    Args:
        warped, fixed: (N, 1, D, H, W) and (M, 1, D, H, W) on one device, with M == N, or one of N and M
            equal to 1 (an atlas against a batch: its descriptor broadcasts, as the original's does). Their
            dtypes may differ (autocast): both are computed in the wider one, float16/bfloat16 in float32,
            and the loss has the wider dtype.
        descriptor: ``"ssc"`` (MIND-SSC, 12 channels; radius 2, dilation 2 by default) or ``"mind"``
            (six-neighbourhood MIND, 6 channels; radius 1, dilation 1 by default).
        penalty: ``"l1"`` or ``"l2"``.
        reduction: ``"mean"`` (over every element), ``"sum"``, or ``"none"``: the (N, K, D, H, W) map.
        per_item: see :func:`gradreg_fast.mind_ssc`.
        fixed_descriptor: instead of ``fixed``, its descriptor, (M, K, D, H, W) without gradient, as
            ``mind_ssc(fixed, radius, dilation, per_item)`` (or ``mind(...)``) returns it with the same
            settings. It is exact, not an approximation (the descriptor of ``fixed`` does not depend on
            ``warped``), and saves one descriptor per call when ``fixed`` stays the same across calls
            (instance optimisation, an atlas). Give ``fixed`` or ``fixed_descriptor``, not both.

    Returns:
        A scalar, or the (max(N, M), K, D, H, W) map for ``reduction="none"``.
    """
    _check_options(descriptor, penalty, reduction, radius, dilation, per_item, backend)
    if (fixed is None) == (fixed_descriptor is None):
        raise ValueError(f"{OP}: give `fixed` or `fixed_descriptor`, exactly one of them")
    radius = _DEFAULTS[descriptor][0] if radius is None else radius
    dilation = _DEFAULTS[descriptor][1] if dilation is None else dilation
    radius, dilation = check_descriptor_args(OP, "warped", warped, radius, dilation)
    if fixed is not None:
        check_descriptor_args(OP, "fixed", fixed, radius, dilation)
        _check_pair(("warped", "fixed"), warped, fixed)
        other = fixed
    else:
        c.check_volume(OP, "fixed_descriptor", fixed_descriptor, channels=len(KINDS[descriptor][0]))
        _check_pair(("warped", "fixed_descriptor"), warped, fixed_descriptor)
        if fixed_descriptor.requires_grad:
            raise ValueError(f"{OP}: `fixed_descriptor` must not require grad (compute it under torch.no_grad() "
                             "or .detach() it); pass `fixed` to get a gradient w.r.t. the fixed image")
        other = fixed_descriptor
    backend = c.backend_for(backend, warped, "mind")
    # Mixed precision (a network's bfloat16/float16 output against a float32 image under autocast): both
    # are computed in the wider dtype, float16/bfloat16 in float32, and the loss comes in the wider dtype.
    result_dtype = torch.promote_types(warped.dtype, other.dtype)
    dtype = c.compute_dtype(warped.new_empty((), dtype=result_dtype))
    settings = (descriptor, radius, dilation, penalty == "l2", bool(per_item), backend)  # per_item: _check_options
    # Autocast would otherwise run the composed path's arithmetic (and the reference's) in low precision.
    with c.without_autocast(warped.device):
        loss = _loss(warped.to(dtype), None if fixed is None else fixed.to(dtype),
                     None if fixed_descriptor is None else fixed_descriptor.to(dtype), reduction, *settings)
    return loss.to(result_dtype)


def _check_options(descriptor, penalty, reduction, radius, dilation, per_item, backend) -> None:
    """The options that need no volume: by the function at each call and by :class:`MINDLoss` when built."""
    if descriptor not in KINDS:
        raise ValueError(f"{OP}: `descriptor` must be one of {tuple(KINDS)}, got {descriptor!r}")
    if penalty not in _PENALTIES:
        raise ValueError(f"{OP}: `penalty` must be one of {_PENALTIES}, got {penalty!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{OP}: `reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
    if radius is not None:
        c.check_int_argument(OP, "radius", radius, 0, c.MAX_RADIUS)
    if dilation is not None:
        c.check_int_argument(OP, "dilation", dilation, 1, c.MAX_DILATION)
    c.check_bool_argument(OP, "per_item", per_item)
    c.check_backend(backend)


def _check_pair(names, warped, other):
    """Same device and spatial shape; batch sizes equal, or one of them 1 (an atlas), as torch broadcasts."""
    if warped.device != other.device:
        raise ValueError(f"{OP}: `{names[0]}` is on {warped.device} but `{names[1]}` is on {other.device}")
    n, m = warped.shape[0], other.shape[0]
    if warped.shape[2:] != other.shape[2:] or not (n == m or n == 1 or m == 1):
        raise ValueError(
            f"{OP}: `{names[0]}` and `{names[1]}` must have the same batch and spatial shapes (or a batch of 1 "
            f"against any batch), got {tuple(warped.shape)} and {tuple(other.shape)}"
        )


def _loss(warped, fixed, fixed_descriptor, reduction, descriptor, radius, dilation, squared, per_item, backend):
    """mind_loss on checked arguments of one compute dtype."""
    desc = lambda v: _descriptor(v, descriptor, radius, dilation, per_item, backend)[0]  # noqa: E731
    n = max(warped.shape[0], (fixed if fixed is not None else fixed_descriptor).shape[0])
    if fixed is not None and fixed.shape[0] < n and not fixed.requires_grad:
        # An atlas against a batch: its descriptor once (m from the atlas alone, as when the original's
        # descriptors broadcast), then the fused path with that descriptor for every item.
        with torch.no_grad():
            fixed, fixed_descriptor = None, desc(fixed)
    if fixed_descriptor is not None and fixed_descriptor.shape[0] < n:
        fixed_descriptor = fixed_descriptor.expand(n, *fixed_descriptor.shape[1:])
    composed = (reduction == "none" or (fixed is not None and fixed.requires_grad) or warped.shape[0] < n)
    if composed:
        diff = desc(warped) - (desc(fixed) if fixed is not None else fixed_descriptor)
        loss = diff * diff if squared else diff.abs()
        return loss if reduction == "none" else loss.mean() if reduction == "mean" else loss.sum()
    if fixed is not None and not (torch.is_grad_enabled() and warped.requires_grad):
        # Only the value is needed (validation, metrics): no descriptor-sized buffer beyond the warped one.
        total = _mind_loss_value(warped, fixed, descriptor, radius, dilation, squared, per_item, backend)
    else:
        total = _mind_loss(warped, None if fixed is None else fixed.detach(), fixed_descriptor, descriptor, radius,
                           dilation, squared, per_item, backend)[0]
    if reduction == "mean":
        total = total / (warped.numel() * len(KINDS[descriptor][0]))
    return total


def _one_of(name, value, **aliases):
    given = {k: v for k, v in ({name: value} | aliases).items() if v is not None}
    if len(given) > 1:
        raise TypeError(f"MINDLoss.forward: {' and '.join(f'`{k}`' for k in given)} name the same argument; "
                        "give one of them")
    return next(iter(given.values()), None)


class MINDLoss(torch.nn.Module):
    """Module form of :func:`mind_loss`, a drop-in for MONAI/VoxelMorph/TransMorph similarity losses.

    The default penalty is L1 (``mean |D(warped) - D(fixed)|``). TransMorph's MIND loss squares the
    difference: to reproduce it, ``MINDLoss(penalty="l2")``.

    Example::

        loss_fn = MINDLoss()                           # MIND-SSC, L1, mean
        loss = loss_fn(warped, fixed)                  # (N, 1, D, H, W) each
        loss = loss_fn(y_pred=warped, y_true=fixed)    # VoxelMorph / TransMorph keywords
        loss = loss_fn(input=warped, target=fixed)     # MONAI keywords
    """

    def __init__(self, descriptor: str = "ssc", penalty: str = "l1", radius: int | None = None,
                 dilation: int | None = None, reduction: str = "mean", per_item: bool = False,
                 backend: str | None = None):
        super().__init__()
        _check_options(descriptor, penalty, reduction, radius, dilation, per_item, backend)  # refused when built
        self.descriptor, self.penalty, self.radius, self.dilation = descriptor, penalty, radius, dilation
        self.reduction, self.per_item, self.backend = reduction, per_item, backend

    def forward(self, warped: torch.Tensor | None = None, fixed: torch.Tensor | None = None,
                fixed_descriptor: torch.Tensor | None = None, *, y_pred: torch.Tensor | None = None,
                y_true: torch.Tensor | None = None, input: torch.Tensor | None = None,  # noqa: A002
                target: torch.Tensor | None = None) -> torch.Tensor:
        """``loss_fn(warped, fixed)``, or with the keywords of the ecosystems it replaces a loss of:
        ``y_pred=, y_true=`` (VoxelMorph, TransMorph) or ``input=, target=`` (MONAI)."""
        warped = _one_of("warped", warped, y_pred=y_pred, input=input)
        fixed = _one_of("fixed", fixed, y_true=y_true, target=target)
        if warped is None:
            raise TypeError("MINDLoss.forward: the warped image is missing (positional, or `warped=`, `y_pred=` "
                            "or `input=`)")
        return mind_loss(warped, fixed, self.descriptor, self.penalty, self.radius, self.dilation, self.reduction,
                         self.per_item, self.backend, fixed_descriptor=fixed_descriptor)

    def extra_repr(self) -> str:
        return (f"descriptor={self.descriptor!r}, penalty={self.penalty!r}, radius={self.radius}, "
                f"dilation={self.dilation}, reduction={self.reduction!r}")
