"""lncc_loss / LNCCLoss against the plain-PyTorch reference (VoxelMorph's and MONAI's formulas with conv3d
box sums), on every backend this machine runs: the CPU core (both ISA copies), the CUDA sources compiled for
the CPU (emulation), Triton's interpreter, and a GPU when there is one."""

from __future__ import annotations

if __name__ == "__main__":  # the Triton check subprocess: the interpreter must be on before triton is imported
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import (GPU_BACKENDS, cuda_core_fixture, make_volume, poisoned, requires_cuda,  # noqa: E402
                      run_under_triton_interpreter, value_and_grads)

import gradreg_fast  # noqa: E402
from gradreg_fast import reference  # noqa: E402

# Odd sizes, size-1 axes, batch > 1, windows larger than an axis.
CASES = [((2, 1, 7, 6, 9), 3), ((1, 1, 1, 5, 8), 3), ((3, 1, 4, 1, 3), 5), ((1, 1, 5, 7, 1), 1),
         ((2, 1, 6, 5, 11), 9)]
CONVENTIONS = ("voxelmorph", "monai")
REDUCTIONS = ("mean", "sum", "none")


def _pair(shape, gen, noncontiguous=False, dtype=torch.float64):
    warped = make_volume(shape, dtype, noncontiguous, gen)
    # Correlated with warped, so that cc spans (0, 1) rather than sitting near 0.
    fixed = (0.7 * warped.detach() + 0.5 * make_volume(shape, dtype, False, gen)).contiguous()
    if noncontiguous:
        fixed = fixed.transpose(3, 4).contiguous().transpose(3, 4)
    return warped, fixed


def _assert_close(actual, expected, value=False):
    """Parity targets of the issue: value 1e-9, gradient 1e-7 relative (to the largest magnitude)."""
    rel = 1e-9 if value else 1e-7
    # (the floor: window 1 gives cc = 0 up to rounding, 1e-27 against an exact 0)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()) + 1e-18)


def _check_against_reference(shape, window, convention, reduction, gen, noncontiguous=False, backend="cpu",
                             fixed_grad=True):
    warped, fixed = _pair(shape, gen, noncontiguous)
    smooth_nr = 0.3 if convention == "monai" else 0.0
    grad_output = make_volume(shape, torch.float64, False, gen) if reduction == "none" else None

    def fused(w, f):
        return gradreg_fast.lncc_loss(w, f, window, 1e-5, reduction, convention, smooth_nr, backend=backend)

    def naive(w, f):
        return reference.lncc_loss(w, f, window, 1e-5, reduction, convention, smooth_nr)

    inputs = (warped, fixed) if fixed_grad else (warped,)
    wrap = (lambda fn: fn) if fixed_grad else (lambda fn: (lambda w: fn(w, fixed)))
    value, grads = value_and_grads(wrap(fused), inputs, grad_output)
    expected, expected_grads = value_and_grads(wrap(naive), inputs, grad_output)
    _assert_close(value, expected, value=True)
    for grad, expected_grad in zip(grads, expected_grads):
        _assert_close(grad, expected_grad)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,window", CASES)
def test_matches_reference(shape, window, convention, reduction, gen):
    _check_against_reference(shape, window, convention, reduction, gen)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_non_contiguous_inputs_and_warped_gradient_only(convention, gen):
    _check_against_reference((2, 1, 5, 6, 7), 3, convention, "mean", gen, noncontiguous=True)
    _check_against_reference((2, 1, 5, 6, 7), 5, convention, "sum", gen, fixed_grad=False)


def test_default_window_is_voxelmorphs_nine(gen):
    warped, fixed = _pair((1, 1, 10, 11, 12), gen)
    _assert_close(gradreg_fast.lncc_loss(warped, fixed), reference.lncc_loss(warped, fixed, 9), value=True)
    _assert_close(gradreg_fast.LNCCLoss()(warped, fixed), reference.lncc_loss(warped, fixed, 9), value=True)


def test_voxelmorph_formula_written_out(gen):
    """The reference itself against VoxelMorph's NCC as that code reads (one conv3d per product)."""
    warped, fixed = _pair((2, 1, 6, 7, 8), gen)
    filt = torch.ones((1, 1, 5, 5, 5), dtype=torch.float64)
    conv = lambda x: torch.nn.functional.conv3d(x, filt, stride=1, padding=2)  # noqa: E731
    I, J = fixed, warped
    I_sum, J_sum, I2_sum, J2_sum, IJ_sum = conv(I), conv(J), conv(I * I), conv(J * J), conv(I * J)
    win_size = 125.0
    u_I, u_J = I_sum / win_size, J_sum / win_size
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * win_size
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * win_size
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * win_size
    expected = -torch.mean(cross * cross / (I_var * J_var + 1e-5))
    _assert_close(gradreg_fast.lncc_loss(warped, fixed, 5), expected, value=True)


def test_monai_floor_of_the_variances(gen):
    """Flat regions (variance under smooth_dr): the floor holds there and passes no gradient, as torch.max."""
    warped, fixed = _pair((2, 1, 6, 7, 8), gen)
    warped = warped.clone()
    warped[:, :, :3] = 0.25  # constant slab: zero local variance
    fixed = fixed.clone()
    fixed[:, :, 4:] = -1.0
    for backend in ("cpu", "reference"):
        def fused(w, f):
            return gradreg_fast.lncc_loss(w, f, 3, 1e-3, "mean", "monai", 1e-4, backend=backend)

        value, grads = value_and_grads(fused, (warped, fixed))
        expected, expected_grads = value_and_grads(
            lambda w, f: reference.lncc_loss(w, f, 3, 1e-3, "mean", "monai", 1e-4), (warped, fixed))
        _assert_close(value, expected, value=True)
        for grad, expected_grad in zip(grads, expected_grads):
            _assert_close(grad, expected_grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_atlas_broadcast(reduction, gen):
    warped = make_volume((3, 1, 5, 6, 7), torch.float64, False, gen)
    atlas = make_volume((1, 1, 5, 6, 7), torch.float64, False, gen)
    grad_output = make_volume((3, 1, 5, 6, 7), torch.float64, False, gen) if reduction == "none" else None
    for w, f in ((warped, atlas), (atlas, warped)):  # one atlas against N, and one warped against N fixed
        value, grads = value_and_grads(lambda a, b: gradreg_fast.lncc_loss(a, b, 3, reduction=reduction), (w, f),
                                       grad_output)
        expected, expected_grads = value_and_grads(
            lambda a, b: reference.lncc_loss(a.expand(3, -1, -1, -1, -1), b.expand(3, -1, -1, -1, -1), 3,
                                             reduction=reduction), (w, f), grad_output)
        _assert_close(value, expected, value=True)
        for grad, expected_grad in zip(grads, expected_grads):
            assert grad.shape == expected_grad.shape
            _assert_close(grad, expected_grad)


def test_mixed_precision_and_autocast(gen):
    warped, fixed = _pair((2, 1, 5, 6, 7), gen, dtype=torch.float32)
    low = warped.to(torch.bfloat16)
    expected = gradreg_fast.lncc_loss(low.float(), fixed, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gradreg_fast.lncc_loss(low, fixed, 3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    leaf = low.clone().requires_grad_()
    gradreg_fast.lncc_loss(leaf, fixed, 3).backward()
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad.float()).all()


def test_float32_close_to_float64(gen):
    warped, fixed = _pair((2, 1, 9, 10, 11), gen)
    expected, expected_grads = value_and_grads(lambda w, f: gradreg_fast.lncc_loss(w, f, 5), (warped, fixed))
    value, grads = value_and_grads(lambda w, f: gradreg_fast.lncc_loss(w, f, 5), (warped.float(), fixed.float()))
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-3, atol=1e-3 * float(expected_grad.abs().max()))


def test_value_without_gradient_equals_value_with_one(gen):
    warped, fixed = _pair((2, 1, 5, 6, 7), gen)
    with torch.no_grad():
        plain = gradreg_fast.lncc_loss(warped, fixed, 3)
    leaf = warped.clone().requires_grad_()
    assert torch.equal(plain, gradreg_fast.lncc_loss(leaf, fixed, 3).detach())


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(convention, reduction, gen):
    warped, fixed = _pair((2, 1, 4, 5, 3), gen)
    fn = lambda w, f: gradreg_fast.lncc_loss(w, f, 3, 1e-5, reduction, convention)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (warped.requires_grad_(), fixed.requires_grad_()))


def test_torch_func_grad_and_forward_mode_error(gen):
    warped, fixed = _pair((2, 1, 5, 4, 6), gen)
    grad = torch.func.grad(lambda w: gradreg_fast.lncc_loss(w, fixed, 3))(warped)
    expected = torch.func.grad(lambda w: reference.lncc_loss(w, fixed, 3))(warped)
    _assert_close(grad, expected)
    with pytest.raises(NotImplementedError, match="lncc_loss: forward-mode AD"):
        torch.func.jvp(lambda w: gradreg_fast.lncc_loss(w, fixed, 3), (warped,), (torch.ones_like(warped),))


def test_module_keywords():
    gen = torch.Generator().manual_seed(3)
    warped, fixed = _pair((1, 1, 5, 6, 7), gen)
    loss_fn = gradreg_fast.LNCCLoss(window=3)
    expected = loss_fn(warped, fixed)
    assert torch.equal(loss_fn(y_pred=warped, y_true=fixed), expected)
    assert torch.equal(loss_fn(input=warped, target=fixed), expected)
    assert torch.equal(loss_fn(warped=warped, fixed=fixed), expected)
    with pytest.raises(TypeError, match="name the same argument"):
        loss_fn(warped, y_pred=warped, y_true=fixed)
    with pytest.raises(TypeError, match="give the warped image"):
        loss_fn(y_true=fixed)
    monai = gradreg_fast.LNCCLoss(window=3, convention="monai")
    _assert_close(monai(input=warped, target=fixed), reference.lncc_loss(warped, fixed, 3, convention="monai"),
                  value=True)
    assert "convention='monai'" in repr(monai)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window=4), ValueError, "`window` must be odd"),
    (dict(window=0), ValueError, "`window` must be an int"),
    (dict(window=True), ValueError, "`window` must be an int"),
    (dict(window=3.0), ValueError, "`window` must be an int"),
    (dict(reduction="avg"), ValueError, "`reduction` must be one of"),
    (dict(convention="ants"), ValueError, "`convention` must be one of"),
    (dict(eps=-1.0), ValueError, "`eps` must be a finite number"),
    (dict(eps=float("nan")), ValueError, "`eps` must be a finite number"),
    (dict(eps=0.0, convention="monai"), ValueError, "`eps` must be a finite number > 0"),
    (dict(smooth_nr=0.1), ValueError, "`smooth_nr` is MONAI's option"),
    (dict(backend="gpu"), ValueError, "`backend` must be one of"),
])
def test_bad_arguments(kwargs, error, match):
    warped = torch.rand(1, 1, 4, 5, 6)
    with pytest.raises(error, match=match):
        gradreg_fast.lncc_loss(warped, warped + 1, **kwargs)


@pytest.mark.parametrize("warped,fixed,match", [
    (torch.rand(1, 2, 4, 5, 6), torch.rand(1, 2, 4, 5, 6), "`warped` must have 1 channel"),
    (torch.rand(1, 1, 4, 5, 6), torch.rand(1, 1, 4, 5, 7), "same spatial shape"),
    (torch.rand(2, 1, 4, 5, 6), torch.rand(3, 1, 4, 5, 6), "equal batch sizes"),
    (torch.rand(1, 4, 5, 6), torch.rand(1, 4, 5, 6), "must have 5 dimensions"),
    (torch.ones(1, 1, 4, 5, 6, dtype=torch.int64), torch.rand(1, 1, 4, 5, 6), "must be a floating-point"),
    (torch.rand(1, 1, 0, 5, 6), torch.rand(1, 1, 0, 5, 6), "must not be empty"),
])
def test_bad_inputs(warped, fixed, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gradreg_fast.lncc_loss(warped, fixed)


# ---------------------------------------------------------------- the CPU core's two ISA copies

core = importlib.import_module("gradreg_fast._C")


@pytest.mark.parametrize("isa", core.available_isas())
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_cpu_isa_copies(isa, convention, gen):
    previous = core.cpu_isa()
    core.set_cpu_isa(isa)
    try:
        # W = 37 (vector body plus a remainder), several bands of rows, batch 2.
        _check_against_reference((2, 1, 6, 13, 37), 5, convention, "none", gen)
        _check_against_reference((1, 1, 3, 2, 17), 3, convention, "mean", gen)
    finally:
        core.set_cpu_isa(previous)


def test_threads_give_the_same_values(gen):
    """A large-enough volume runs on several threads (bands of rows); the result is the one-thread one."""
    warped, fixed = _pair((1, 1, 20, 40, 48), gen)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = value_and_grads(lambda w, f: gradreg_fast.lncc_loss(w, f, 5, reduction="sum"), (warped, fixed))
        torch.set_num_threads(2)
        two = value_and_grads(lambda w, f: gradreg_fast.lncc_loss(w, f, 5, reduction="sum"), (warped, fixed))
    finally:
        torch.set_num_threads(previous)
    _assert_close(two[0], one[0], value=True)
    for a, b in zip(two[1], one[1]):
        _assert_close(a, b)


# ---------------------------------------------------------------- torch.compile


def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    warped, fixed = _pair((2, 1, 5, 6, 7), gen)
    fn = lambda w, f: gradreg_fast.lncc_loss(w, f, 3, backend="cpu")  # noqa: E731
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    expected, expected_grads = value_and_grads(fn, (warped, fixed))
    value, grads = value_and_grads(compiled, (warped, fixed))
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1


def test_opcheck(gen):
    warped, fixed = _pair((2, 1, 4, 5, 3), gen)
    ops = torch.ops.gradreg
    torch.library.opcheck(ops.lncc.default, (warped.requires_grad_(), fixed, 3, 1e-5, 0.0, False, False, 3, "cpu"))


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_matches_reference(backend, convention, dtype, gen):
    for shape, window in CASES:
        warped, fixed = (t.cuda().to(dtype) for t in _pair(shape, gen))
        fn = lambda w, f: gradreg_fast.lncc_loss(w, f, window, reduction="none", convention=convention,  # noqa
                                                 backend=backend)
        value, grads = value_and_grads(fn, (warped, fixed), torch.ones_like(warped))
        expected, expected_grads = value_and_grads(
            lambda w, f: reference.lncc_loss(w, f, window, reduction="none", convention=convention),
            (warped.double(), fixed.double()), torch.ones_like(warped, dtype=torch.float64))
        tol = 1e-9 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(value.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad.double(), expected_grad, rtol=tol,
                                       atol=tol * float(expected_grad.abs().max()))


# ---------------------------------------------------------------- the CUDA core (emulated on the CPU, or real)


# The window-1 case of CASES has an exact answer of 0 that fused products used to miss (H200, 2026-11-30): the
# emulated source is also built with FMA contraction, as nvcc builds it.
cuda_core = cuda_core_fixture("lncc.cu", ("lncc_forward", "lncc_backward", "lncc_workspace_bytes"), "_lncc_emulated",
                              contract=True)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_core_matches_reference(cuda_core, convention, dtype, gen):
    """The core's entry points against the reference (on the CPU), outputs and workspace poisoned first."""
    module, device = cuda_core
    stream = torch.cuda.current_stream(device).cuda_stream if device == "cuda" else 0
    smooth_nr = 0.2 if convention == "monai" else 0.0
    for (n, c, d, h, w), window in CASES:
        for atlas in (False, True):
            warped = make_volume((n, c, d, h, w), dtype, False, gen)
            fixed = make_volume((1 if atlas else n, c, d, h, w), dtype, False, gen)
            warped_d, fixed_d = warped.to(device), fixed.to(device)
            stride = 0 if atlas else d * h * w
            is_double = dtype == torch.float64
            nbytes = module.lncc_workspace_bytes(is_double, n, d, h, w, False)
            workspace = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=device)  # NaN bytes
            loss_map = poisoned(warped.shape, dtype).to(device)
            coefficients = poisoned((n, 5, d, h, w), dtype).to(device)
            total = poisoned((), dtype).to(device)
            err = module.lncc_forward(is_double, warped_d.data_ptr(), fixed_d.data_ptr(), stride, loss_map.data_ptr(),
                                      coefficients.data_ptr(), 5, total.data_ptr(), n, d, h, w, window, 1e-5,
                                      smooth_nr, convention == "monai", workspace.data_ptr(), nbytes, stream)
            assert err == ""
            leaves = warped.double().requires_grad_(), fixed.double().expand(n, -1, -1, -1, -1).clone().requires_grad_()
            expected = reference.lncc_loss(*leaves, window, 1e-5, "none", convention, smooth_nr)
            tol = dict(rtol=1e-9, atol=1e-12) if is_double else dict(rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(loss_map.cpu().double(), expected.detach(), **tol)
            torch.testing.assert_close(total.cpu().double(), expected.detach().sum(), **tol)
            grad_output = make_volume(warped.shape, torch.float64, False, gen)
            expected_grads = torch.autograd.grad(expected, leaves, grad_output, retain_graph=True)
            for grad_is_map in (True, False):
                grad = (grad_output.to(dtype) if grad_is_map else torch.tensor(1.5, dtype=dtype)).to(device)
                expected_w, expected_f = (expected_grads if grad_is_map else
                                          torch.autograd.grad(expected.sum() * 1.5, leaves, retain_graph=True))
                gw, gf = poisoned(warped.shape, dtype).to(device), poisoned(warped.shape, dtype).to(device)
                err = module.lncc_backward(is_double, coefficients.data_ptr(), 5, grad.data_ptr(), grad_is_map,
                                           warped_d.data_ptr(), fixed_d.data_ptr(), stride, gw.data_ptr(),
                                           gf.data_ptr(), n, d, h, w, window, workspace.data_ptr(), nbytes, stream)
                assert err == ""
                for got, want in ((gw, expected_w), (gf, expected_f)):
                    scale = float(want.abs().max())
                    torch.testing.assert_close(got.cpu().double(), want, rtol=tol["rtol"],
                                               atol=tol["rtol"] * scale + 1e-15)


def test_cuda_core_bad_arguments(cuda_core):
    module, device = cuda_core
    x = torch.rand(1, 1, 3, 4, 5, dtype=torch.float64, device=device)
    nbytes = module.lncc_workspace_bytes(True, 1, 3, 4, 5, False)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
    total = torch.empty((), dtype=torch.float64, device=device)
    args = (True, x.data_ptr(), x.data_ptr(), 60, 0, 0, 0, total.data_ptr(), 1, 3, 4, 5)
    assert "`window` must be odd" in module.lncc_forward(*args, 4, 1e-5, 0.0, False, workspace.data_ptr(), nbytes, 0)
    assert "the workspace has" in module.lncc_forward(*args, 3, 1e-5, 0.0, False, workspace.data_ptr(), 8, 0)
    assert "sizes must be >= 1" in module.lncc_forward(True, x.data_ptr(), x.data_ptr(), 60, 0, 0, 0,
                                                       total.data_ptr(), 1, 0, 4, 5, 3, 1e-5, 0.0, False,
                                                       workspace.data_ptr(), nbytes, 0)
    assert "coefficient_count" in module.lncc_backward(True, x.data_ptr(), 4, total.data_ptr(), False, x.data_ptr(),
                                                       x.data_ptr(), 60, x.data_ptr(), 0, 1, 3, 4, 5, 3,
                                                       workspace.data_ptr(), nbytes, 0)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        module.lncc_workspace_bytes(True, 1, -3, 4, 5, False)


# ---------------------------------------------------------------- Triton (interpreter on the CPU; compiled on a GPU)


def triton_checks(device: str) -> None:
    """Run in a subprocess (``python tests/test_lncc.py DEVICE``): TRITON_INTERPRET must be set before triton is
    imported, and setting it in the pytest process would leak into every later test."""
    gen = torch.Generator().manual_seed(14)
    for dtype in (torch.float64, torch.float32):
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        for convention in CONVENTIONS:
            for reduction in ("mean", "none"):
                for (n, c, d, h, w), atlas in (((2, 1, 4, 5, 6), True), ((1, 1, 1, 4, 3), False)):
                    warped = make_volume((n, c, d, h, w), dtype, False, gen).to(device)
                    fixed = make_volume((1 if atlas else n, c, d, h, w), dtype, False, gen).to(device)
                    grad_output = make_volume((n, 1, d, h, w), dtype, False, gen).to(device) \
                        if reduction == "none" else None
                    fused = lambda a, b: gradreg_fast.lncc_loss(a, b, 3, 1e-5, reduction, convention,  # noqa: E731
                                                                0.1 if convention == "monai" else 0.0, "triton")
                    naive = lambda a, b: reference.lncc_loss(a, b.expand(n, -1, -1, -1, -1), 3, 1e-5,  # noqa: E731
                                                             reduction, convention,
                                                             0.1 if convention == "monai" else 0.0)
                    value, grads = value_and_grads(fused, (warped, fixed), grad_output)
                    expected, expected_grads = value_and_grads(naive, (warped, fixed), grad_output)
                    for got, want in ((value, expected), *zip(grads, expected_grads)):
                        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()) + 1e-12)


def test_triton_interpreter_on_cpu():
    run_under_triton_interpreter(__file__, "cpu")


@pytest.mark.gpu
@requires_cuda
def test_triton_compiled_on_cuda():
    pytest.importorskip("triton")
    triton_checks("cuda")


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)  # tiny tensors: no OpenMP team per small op
    triton_checks(sys.argv[1])


@pytest.mark.parametrize("kwargs, message", [({"window": 4}, "`window` must be odd"), ({"window": 0}, "`window`"),
                                             ({"eps": float("nan")}, "`eps` must be a finite number"),
                                             ({"reduction": "max"}, "`reduction` must be one of"),
                                             ({"convention": "ants"}, "`convention` must be one of"),
                                             ({"smooth_nr": 0.1}, "`smooth_nr` is MONAI's option"),
                                             ({"backend": "opencl"}, "`backend` must be one of")])
def test_module_refuses_bad_options_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradreg_fast.LNCCLoss(**kwargs)
