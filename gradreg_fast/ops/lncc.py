"""lncc_loss / LNCCLoss: registration (``torch.ops.gradreg.lncc``), fake, autograd, dispatch."""

from __future__ import annotations


import torch

from .. import reference
from . import _common as c

OP = "lncc_loss"
KERNEL = "lncc"  # the name the backends know the kernels by
REDUCTIONS = ("mean", "sum", "none")
CONVENTIONS = ("voxelmorph", "monai")
MAX_WINDOW = 4095


def _fixed_batch_stride(warped, fixed):
    """0 when one fixed image serves a batch (an atlas): the kernels read it once per item, never copied."""
    return 0 if fixed.shape[0] == 1 else fixed[0].numel()


def _launch_forward(warped, fixed, window, eps, smooth_nr, monai, per_voxel, coefficient_count, backend):
    n, _, d, h, w = warped.shape
    if backend == "reference":
        loss = reference.lncc_loss(warped, fixed, window, eps, "none", "monai" if monai else "voxelmorph", smooth_nr)
        # The reference backward recomputes everything: no coefficients.
        return (loss if per_voxel else loss.sum()), warped.new_empty(0)
    warped, fixed = warped.contiguous(), fixed.contiguous()
    if backend == "triton":
        from ..triton_kernels import lncc as kernel

        return kernel.forward(warped, fixed, window, eps, smooth_nr, monai, per_voxel, coefficient_count)
    loss_map = warped.new_empty((n, 1, d, h, w)) if per_voxel else None
    coefficients = warped.new_empty((n, coefficient_count, d, h, w)) if coefficient_count else warped.new_empty(0)
    ptr = lambda t: t.data_ptr() if t is not None and t.numel() else 0  # noqa: E731
    stride = _fixed_batch_stride(warped, fixed)
    if backend == "cpu":
        total = c.cpu_core().lncc_forward(
            c.dtype_name(warped), warped.data_ptr(), fixed.data_ptr(), stride, ptr(loss_map), ptr(coefficients),
            coefficient_count, n, d, h, w, window, eps, smooth_nr, monai, c.threads(warped.numel()))
        value = loss_map if per_voxel else torch.tensor(total, dtype=warped.dtype)
        return value, coefficients
    core = c.cuda_core()
    is_double = warped.dtype == torch.float64
    nbytes = core.lncc_workspace_bytes(is_double, n, d, h, w, False)
    scratch = c.workspace(warped, nbytes)
    total = warped.new_empty(())
    c.raise_cuda_error(OP, core.lncc_forward(
        is_double, warped.data_ptr(), fixed.data_ptr(), stride, ptr(loss_map), ptr(coefficients), coefficient_count,
        total.data_ptr(), n, d, h, w, window, eps, smooth_nr, monai, scratch.data_ptr(), nbytes, c.stream(warped)))
    return (loss_map if per_voxel else total), coefficients


def _launch_backward(grad, coefficients, warped, fixed, window, eps, smooth_nr, monai, per_voxel, need_warped,
                     need_fixed, backend):
    n, _, d, h, w = warped.shape
    if backend == "reference":
        convention = "monai" if monai else "voxelmorph"
        fn = lambda a, b: reference.lncc_loss(a, b, window, eps, "none" if per_voxel else "sum", convention,  # noqa: E731
                                              smooth_nr)
        return tuple(c.reference_vjp(fn, [warped, fixed], grad, [need_warped, need_fixed]))
    warped, fixed, grad = warped.contiguous(), fixed.contiguous(), grad.contiguous()
    count = coefficients.shape[1]
    if backend == "triton":
        from ..triton_kernels import lncc as kernel

        gw, gf = kernel.backward(grad, coefficients, warped, fixed, window, need_warped, need_fixed)
    else:
        gw = torch.empty_like(warped) if need_warped else None
        gf = warped.new_empty((n, 1, d, h, w)) if need_fixed else None
        ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
        stride = _fixed_batch_stride(warped, fixed)
        if backend == "cpu":
            grad_map, scale = (grad.data_ptr(), 0.0) if per_voxel else (0, float(grad))
            c.cpu_core().lncc_backward(
                c.dtype_name(warped), coefficients.data_ptr(), count, grad_map, scale, warped.data_ptr(),
                fixed.data_ptr(), stride, ptr(gw), ptr(gf), n, d, h, w, window, c.threads(warped.numel()))
        else:
            core = c.cuda_core()
            is_double = warped.dtype == torch.float64
            nbytes = core.lncc_workspace_bytes(is_double, n, d, h, w, True)
            scratch = c.workspace(warped, nbytes)
            c.raise_cuda_error(OP, core.lncc_backward(
                is_double, coefficients.data_ptr(), count, grad.data_ptr(), per_voxel, warped.data_ptr(),
                fixed.data_ptr(), stride, ptr(gw), ptr(gf), n, d, h, w, window, scratch.data_ptr(), nbytes,
                c.stream(warped)))
    if gf is not None and fixed.shape[0] < n:
        gf = gf.sum(0, keepdim=True)  # the atlas served every item
    return gw, gf


@torch.library.custom_op("gradreg::lncc", mutates_args=())
def _lncc_op(warped: torch.Tensor, fixed: torch.Tensor, window: int, eps: float, smooth_nr: float, monai: bool,
             per_voxel: bool, coefficient_count: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -cc, or the per-voxel -cc map; the coefficients the backward box-filters, or empty).

    ``coefficient_count``: 0 (no gradient wanted: nothing stored), 3 (warped) or 5 (warped and fixed).
    """
    with c.on_device_of(warped):
        return _launch_forward(warped, fixed, window, eps, smooth_nr, monai, per_voxel, coefficient_count, backend)


@_lncc_op.register_fake
def _(warped, fixed, window, eps, smooth_nr, monai, per_voxel, coefficient_count, backend):
    n, _, d, h, w = warped.shape
    value = warped.new_empty((n, 1, d, h, w)) if per_voxel else warped.new_empty(())
    stored = coefficient_count if backend != "reference" else 0
    return value, (warped.new_empty((n, stored, d, h, w)) if stored else warped.new_empty(0))


@torch.library.custom_op("gradreg::lncc_backward", mutates_args=())
def _lncc_backward_op(grad: torch.Tensor, coefficients: torch.Tensor, warped: torch.Tensor, fixed: torch.Tensor,
                      window: int, eps: float, smooth_nr: float, monai: bool, per_voxel: bool, need_warped: bool,
                      need_fixed: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with c.on_device_of(warped):
        gw, gf = _launch_backward(grad, coefficients, warped, fixed, window, eps, smooth_nr, monai, per_voxel,
                                  need_warped, need_fixed, backend)
    return (gw if gw is not None else warped.new_empty(0)), (gf if gf is not None else fixed.new_empty(0))


@_lncc_backward_op.register_fake
def _(grad, coefficients, warped, fixed, window, eps, smooth_nr, monai, per_voxel, need_warped, need_fixed, backend):
    return (warped.new_empty(warped.shape if need_warped else (0,)),
            fixed.new_empty(fixed.shape if need_fixed else (0,)))


def _setup_context(ctx, inputs, output):
    warped, fixed, window, eps, smooth_nr, monai, per_voxel, coefficient_count, backend = inputs
    _, coefficients = output
    ctx.mark_non_differentiable(coefficients)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(warped, fixed, coefficients)
    ctx.args = (window, eps, smooth_nr, monai, per_voxel)
    ctx.backend = backend


def _backward(ctx, grad, _):
    need_warped, need_fixed = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not (need_warped or need_fixed):
        return (None,) * 9
    warped, fixed, coefficients = ctx.saved_tensors
    if ctx.backend != "reference" and coefficients.numel() and need_fixed and coefficients.shape[1] < 5:
        raise RuntimeError(f"{OP}: the forward stored no coefficients for `fixed`'s gradient (it did not require "
                           "grad when the loss was computed)")
    gw, gf = _lncc_backward(grad, coefficients, warped, fixed, *ctx.args, need_warped, need_fixed, ctx.backend)
    return (gw if need_warped else None), (gf if need_fixed else None), *(None,) * 7


_lncc_op.register_autograd(_backward, setup_context=_setup_context)
_lncc = c.functorch_ready(_lncc_op, OP, _setup_context, _backward)
_lncc_backward = c.functorch_ready(_lncc_backward_op, OP)


def _needs_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def _check_options(window, eps, reduction, convention, smooth_nr, backend) -> tuple:
    """(window, eps, smooth_nr) checked, with the other options: by the function at each call and by
    :class:`LNCCLoss` when it is built."""
    window = c.check_int_argument(OP, "window", window, 1, MAX_WINDOW)
    if window % 2 == 0:
        raise ValueError(f"{OP}: `window` must be odd (the box is centred on each voxel), got {window}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"{OP}: `convention` must be one of {CONVENTIONS}, got {convention!r}")
    monai = convention == "monai"
    eps = c.check_number_argument(OP, "eps", eps, allow_zero=not monai)
    smooth_nr = c.check_number_argument(OP, "smooth_nr", smooth_nr)
    if smooth_nr and not monai:
        raise ValueError(f"{OP}: `smooth_nr` is MONAI's option; with convention='voxelmorph' it must be 0")
    c.check_backend(backend)
    return window, eps, smooth_nr


def lncc_loss(warped: torch.Tensor, fixed: torch.Tensor, window: int = 9, eps: float = 1e-5, reduction: str = "mean",
              convention: str = "voxelmorph", smooth_nr: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """Local normalised cross-correlation loss, ``-mean(cc)`` over every voxel, fused.

    ``convention="voxelmorph"`` (default) is exactly VoxelMorph's torch ``NCC`` loss (I = ``fixed``,
    J = ``warped``, n = window^3): window sums S by zero-padded convolution with a window^3 box (padding
    window // 2, stride 1); ``u = S / n``; ``cross = S_IJ - u_J S_I - u_I S_J + u_I u_J n``;
    ``var_I = S_II - 2 u_I S_I + u_I u_I n`` (``var_J`` likewise); ``cc = cross^2 / (var_I var_J + eps)``.

    ``convention="monai"`` is MONAI's ``LocalNormalizedCrossCorrelationLoss`` (rectangular kernel of size
    ``window``; ``eps`` plays its ``smooth_dr``): the same zero padding ((window - 1) // 2, so the same
    window sums), ``cross = S_tp - (S_p / n) S_t``, ``var = max(S_tt - (S_t / n) S_t, eps)`` for target
    and prediction (a floor; where it holds the variance has no gradient, and half of one on a tie, as
    ``torch.max``), ``cc = (cross^2 + smooth_nr) / (var_t var_p)`` with nothing added to that denominator
    (as in MONAI's current source; some earlier releases also added ``smooth_dr`` there), and the same sign and
    reductions (``-cc``). Its default window is 3 (pass ``window=3``); its ``smooth_nr`` default is 0.

    The kernel streams a separable window sum of the five products through a few planes, never storing
    the sums. With a gradient wanted, the forward also stores the three per-voxel coefficients
    d(-cc)/d(S_J, S_JJ, S_IJ) (five with ``fixed``'s gradient), and the backward is one more separable window
    sum of those, scaled by the upstream gradient: nothing is recomputed.

    Args:
        warped: (N, 1, D, H, W), float32 or float64 (float16/bfloat16 computed in float32).
        fixed: (N, 1, D, H, W) or (1, 1, D, H, W) (one image, an atlas, against every item), same device;
            gets a gradient when it requires one. A different floating dtype is allowed (mixed precision):
            both are computed in the wider one, float16/bfloat16 in float32, and the loss has that dtype.
        window: odd int >= 1, the box edge in voxels.
        eps: VoxelMorph's ``eps`` / MONAI's ``smooth_dr``, finite, >= 0 (> 0 for "monai").
        reduction: ``"mean"`` (over N*D*H*W), ``"sum"``, or ``"none"``: the (N, 1, D, H, W) map of ``-cc``.
        convention: ``"voxelmorph"`` or ``"monai"``.
        smooth_nr: MONAI's ``smooth_nr`` ("monai" only; must be 0 for "voxelmorph").
        backend: see :func:`gradreg_fast.gradient_magnitude`.

    Returns:
        A scalar, or the (N, 1, D, H, W) map for ``reduction="none"``.
    """
    for name, t in (("warped", warped), ("fixed", fixed)):
        c.check_volume(OP, name, t, channels=1)
    if warped.device != fixed.device:
        raise ValueError(f"{OP}: `warped` is on {warped.device} but `fixed` is on {fixed.device}")
    n, m = warped.shape[0], fixed.shape[0]
    if warped.shape[2:] != fixed.shape[2:] or not (n == m or n == 1 or m == 1):
        raise ValueError(f"{OP}: `warped` and `fixed` must have the same spatial shape and equal batch sizes (or "
                         f"one of them 1), got {tuple(warped.shape)} and {tuple(fixed.shape)}")
    window, eps, smooth_nr = _check_options(window, eps, reduction, convention, smooth_nr, backend)
    monai = convention == "monai"
    backend = c.backend_for(backend, warped, KERNEL)
    result_dtype = torch.promote_types(warped.dtype, fixed.dtype)
    dtype = c.compute_dtype(warped.new_empty((), dtype=result_dtype))
    with c.without_autocast(warped.device):
        warped, fixed = warped.to(dtype), fixed.to(dtype)
        if n < m:  # one warped image against a batch of fixed ones: autograd sums the copies' gradients
            warped = warped.expand(m, *warped.shape[1:]).contiguous()
        need_warped, need_fixed = _needs_grad(warped), _needs_grad(fixed)
        count = 5 if need_fixed else 3 if need_warped else 0
        value, _ = _lncc(warped, fixed, window, eps, smooth_nr, monai, reduction == "none", count, backend)
        if reduction == "mean":
            value = value / warped.numel()
    return value.to(result_dtype)


def _one_of(name, value, **aliases):
    given = {k: v for k, v in ({name: value} | aliases).items() if v is not None}
    if len(given) > 1:
        raise TypeError(f"LNCCLoss.forward: {' and '.join(f'`{k}`' for k in given)} name the same argument; "
                        "give one of them")
    return next(iter(given.values()), None)


class LNCCLoss(torch.nn.Module):
    """Local normalised cross-correlation loss, module form of :func:`lncc_loss`: a drop-in for
    VoxelMorph's ``NCC`` (default) and MONAI's ``LocalNormalizedCrossCorrelationLoss``
    (``convention="monai"``).

    Args:
        window: odd box edge in voxels (VoxelMorph: 9; MONAI's ``kernel_size``: 3).
        eps: VoxelMorph's ``eps`` / MONAI's ``smooth_dr``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        convention: ``"voxelmorph"`` or ``"monai"``.
        smooth_nr: MONAI's ``smooth_nr`` (``"monai"`` only).
        backend: see :func:`gradreg_fast.gradient_magnitude`.

    Shapes:
        - warped (``y_pred`` / ``input``): (N, 1, D, H, W).
        - fixed (``y_true`` / ``target``): (N, 1, D, H, W), or (1, 1, D, H, W) for one atlas.
        - output: scalar for ``"mean"``/``"sum"``; (N, 1, D, H, W) for ``"none"``.

    Example::

        loss_fn = LNCCLoss()                          # VoxelMorph NCC, window 9
        loss = loss_fn(warped, fixed)
        loss = loss_fn(y_pred=warped, y_true=fixed)   # VoxelMorph / TransMorph keywords
        loss = LNCCLoss(window=3, convention="monai")(input=warped, target=fixed)   # MONAI
    """

    def __init__(self, window: int = 9, eps: float = 1e-5, reduction: str = "mean", convention: str = "voxelmorph",
                 smooth_nr: float = 0.0, backend: str | None = None):
        super().__init__()
        _check_options(window, eps, reduction, convention, smooth_nr, backend)  # refused when built, not at a call
        self.window, self.eps, self.reduction, self.convention = window, eps, reduction, convention
        self.smooth_nr, self.backend = smooth_nr, backend

    def forward(self, warped: torch.Tensor | None = None, fixed: torch.Tensor | None = None, *,
                y_pred: torch.Tensor | None = None, y_true: torch.Tensor | None = None,
                input: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:  # noqa: A002
        """``loss_fn(warped, fixed)``, or ``y_pred=, y_true=`` (VoxelMorph, TransMorph) or ``input=, target=``
        (MONAI)."""
        warped = _one_of("warped", warped, y_pred=y_pred, input=input)
        fixed = _one_of("fixed", fixed, y_true=y_true, target=target)
        if warped is None or fixed is None:
            raise TypeError("LNCCLoss.forward: give the warped image (positional, `warped=`, `y_pred=` or `input=`) "
                            "and the fixed one (positional, `fixed=`, `y_true=` or `target=`)")
        return lncc_loss(warped, fixed, self.window, self.eps, self.reduction, self.convention, self.smooth_nr,
                         self.backend)

    def extra_repr(self) -> str:
        return (f"window={self.window}, eps={self.eps}, reduction={self.reduction!r}, "
                f"convention={self.convention!r}")
