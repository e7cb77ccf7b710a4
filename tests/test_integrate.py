"""integrate_velocity and compose against the plain-PyTorch references (the reference-warp chain, and
VoxelMorph's VecInt written with grid_sample), on every backend this machine runs: the CPU core (both ISA
copies), the CUDA sources compiled for the CPU (emulation), Triton's interpreter, and a GPU when there is
one."""

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
from gradreg_fast.ops.integrate import checkpoint_layout  # noqa: E402

# Odd sizes, size-1 axes, batch > 1.
SHAPES = [(2, 3, 7, 6, 9), (1, 3, 1, 5, 8), (3, 3, 4, 1, 3), (1, 3, 5, 7, 1)]
PADDINGS = ("zeros", "border")


def _velocity(shape, gen, noncontiguous=False, scale=2.0, dtype=torch.float64):
    # Large enough that the integrated field moves samples across voxels and out of the volume.
    return make_volume(shape, dtype, noncontiguous, gen, scale=scale * 2 ** 2)


def _assert_close(actual, expected, value=False):
    """Parity targets of the issue: value 1e-9, gradient 1e-7 relative (to the largest magnitude)."""
    rel = 1e-9 if value else 1e-7
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()) + 1e-18)


def _check(shape, steps, padding_mode, gen, noncontiguous=False, backend="cpu"):
    velocity = _velocity(shape, gen, noncontiguous)
    grad_output = make_volume(shape, torch.float64, False, gen)
    value, (grad,) = value_and_grads(
        lambda v: gradreg_fast.integrate_velocity(v, steps, padding_mode, backend=backend), (velocity,), grad_output)
    expected, (expected_grad,) = value_and_grads(
        lambda v: reference.integrate_velocity(v, steps, padding_mode), (velocity,), grad_output)
    _assert_close(value, expected, value=True)
    _assert_close(grad, expected_grad)


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("steps", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, steps, padding_mode, gen):
    _check(shape, steps, padding_mode, gen)


def test_non_contiguous_and_many_steps(gen):
    _check((2, 3, 5, 6, 7), 7, "zeros", gen, noncontiguous=True)
    _check((1, 3, 4, 5, 6), 12, "border", gen)


@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_equals_voxelmorph_vecint_with_grid_sample(padding_mode, gen):
    """Every size > 1: the chain of grid_sample(align_corners=True) calls VoxelMorph's VecInt makes."""
    velocity = _velocity((2, 3, 6, 7, 5), gen)
    value, (grad,) = value_and_grads(lambda v: gradreg_fast.integrate_velocity(v, 7, padding_mode), (velocity,))
    expected, (expected_grad,) = value_and_grads(
        lambda v: reference.integrate_velocity_grid_sample(v, 7, padding_mode), (velocity,))
    _assert_close(value, expected, value=True)
    _assert_close(grad, expected_grad)


def test_checkpoint_layout():
    assert checkpoint_layout(7) == (2, 3)  # u_2, u_4 and u_6 kept
    assert checkpoint_layout(1) == (1, 0)
    assert checkpoint_layout(0)[1] == 0
    for steps in range(0, 31):
        interval, count = checkpoint_layout(steps)
        assert count <= 3 and count * interval < max(steps, 1)


def test_value_without_gradient_equals_value_with_one(gen):
    velocity = _velocity((2, 3, 5, 6, 7), gen)
    with torch.no_grad():
        plain = gradreg_fast.integrate_velocity(velocity)
    assert torch.equal(plain, gradreg_fast.integrate_velocity(velocity.clone().requires_grad_()).detach())


@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_gradcheck(padding_mode, gen):
    velocity = make_volume((2, 3, 3, 4, 5), torch.float64, False, gen, scale=1.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: gradreg_fast.integrate_velocity(v, 3, padding_mode), (velocity,))


def test_float32_close_to_float64(gen):
    velocity = _velocity((2, 3, 8, 9, 10), gen)
    expected = gradreg_fast.integrate_velocity(velocity)
    torch.testing.assert_close(gradreg_fast.integrate_velocity(velocity.float()).double(), expected, rtol=1e-4,
                               atol=1e-4 * float(expected.abs().max()))
    low = gradreg_fast.integrate_velocity(velocity.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16


def test_torch_func_grad_and_forward_mode_error(gen):
    velocity = _velocity((1, 3, 4, 5, 6), gen)
    weights = make_volume(velocity.shape, torch.float64, False, gen)
    grad = torch.func.grad(lambda v: (gradreg_fast.integrate_velocity(v) * weights).sum())(velocity)
    expected = torch.func.grad(lambda v: (reference.integrate_velocity(v) * weights).sum())(velocity)
    _assert_close(grad, expected)
    with pytest.raises(NotImplementedError, match="integrate_velocity: forward-mode AD"):
        torch.func.jvp(gradreg_fast.integrate_velocity, (velocity,), (torch.ones_like(velocity),))


@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_compose(padding_mode, gen):
    a, b = _velocity((2, 3, 5, 6, 7), gen), _velocity((2, 3, 5, 6, 7), gen)
    value, grads = value_and_grads(lambda x, y: gradreg_fast.compose(x, y, padding_mode), (a, b))
    expected, expected_grads = value_and_grads(lambda x, y: reference.compose(x, y, padding_mode), (a, b))
    _assert_close(value, expected, value=True)
    for grad, expected_grad in zip(grads, expected_grads):
        _assert_close(grad, expected_grad)
    # One squaring step is compose(u, u); and the order: warping by compose(a, b) ~ warping by a, then by b.
    u = a / 8
    _assert_close(gradreg_fast.integrate_velocity(u * 2, 1, padding_mode), gradreg_fast.compose(u, u, padding_mode),
                  value=True)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(steps=-1), ValueError, "`steps` must be an int"),
    (dict(steps=31), ValueError, "`steps` must be an int"),
    (dict(steps=2.0), ValueError, "`steps` must be an int"),
    (dict(steps=True), ValueError, "`steps` must be an int"),
    (dict(padding_mode="reflection"), ValueError, "`padding_mode` must be one of"),
    (dict(backend="gpu"), ValueError, "`backend` must be one of"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        gradreg_fast.integrate_velocity(torch.rand(1, 3, 4, 5, 6), **kwargs)


@pytest.mark.parametrize("velocity,match", [
    (torch.rand(1, 2, 4, 5, 6), "`velocity` must have 3 channel"),
    (torch.rand(3, 4, 5, 6), "must have 5 dimensions"),
    (torch.ones(1, 3, 4, 5, 6, dtype=torch.int32), "must be a floating-point"),
    (torch.rand(1, 3, 4, 0, 6), "must not be empty"),
])
def test_bad_inputs(velocity, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gradreg_fast.integrate_velocity(velocity)


def test_compose_bad_inputs():
    with pytest.raises(ValueError, match="same shapes"):
        gradreg_fast.compose(torch.rand(1, 3, 4, 5, 6), torch.rand(1, 3, 4, 5, 7))
    with pytest.raises(ValueError, match="`flow_a` must have 3 channel"):
        gradreg_fast.compose(torch.rand(1, 1, 4, 5, 6), torch.rand(1, 3, 4, 5, 6))


# ---------------------------------------------------------------- the CPU core's two ISA copies

core = importlib.import_module("gradreg_fast._C")


@pytest.mark.parametrize("isa", core.available_isas())
def test_cpu_isa_copies(isa, gen):
    previous = core.cpu_isa()
    core.set_cpu_isa(isa)
    try:
        _check((2, 3, 5, 9, 37), 7, "zeros", gen)
        _check((1, 3, 3, 2, 17), 4, "border", gen)
    finally:
        core.set_cpu_isa(previous)


def test_threads_give_the_same_values(gen):
    velocity = _velocity((1, 3, 20, 30, 40), gen)
    previous = torch.get_num_threads()
    fn = lambda v: gradreg_fast.integrate_velocity(v)  # noqa: E731
    try:
        torch.set_num_threads(1)
        one = value_and_grads(fn, (velocity,), torch.ones_like(velocity))
        torch.set_num_threads(2)
        two = value_and_grads(fn, (velocity,), torch.ones_like(velocity))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(two[0], one[0])
    _assert_close(two[1][0], one[1][0])


# ---------------------------------------------------------------- the CUDA source, emulated on the CPU


# ---------------------------------------------------------------- torch.compile


def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    velocity = _velocity((2, 3, 5, 6, 7), gen)
    fn = lambda v: gradreg_fast.integrate_velocity(v, 7, backend="cpu")  # noqa: E731
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    expected, expected_grads = value_and_grads(fn, (velocity,), torch.ones_like(velocity))
    value, grads = value_and_grads(compiled, (velocity,), torch.ones_like(velocity))
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1


def test_opcheck(gen):
    velocity = _velocity((2, 3, 4, 5, 3), gen).requires_grad_()
    torch.library.opcheck(torch.ops.gradreg.integrate.default, (velocity, 7, "zeros", True, "cpu"))


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_matches_reference(backend, padding_mode, dtype, gen):
    for shape in SHAPES:
        velocity = _velocity(shape, gen).cuda()
        grad_output = torch.ones_like(velocity)
        value, (grad,) = value_and_grads(
            lambda v: gradreg_fast.integrate_velocity(v, 7, padding_mode, backend=backend), (velocity.to(dtype),),
            grad_output.to(dtype))
        expected, (expected_grad,) = value_and_grads(
            lambda v: reference.integrate_velocity(v, 7, padding_mode), (velocity,), grad_output)
        tol = 1e-9 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(value.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
        torch.testing.assert_close(grad.double(), expected_grad, rtol=tol, atol=tol * float(expected_grad.abs().max()))


# ---------------------------------------------------------------- the CUDA core (emulated on the CPU, or real)


cuda_core = cuda_core_fixture("integrate.cu", ("integrate_forward", "integrate_backward"), "_integrate_emulated")


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_core_matches_reference(cuda_core, padding_mode, dtype, gen):
    """The core's entry points against the reference (on the CPU), outputs, scratch and checkpoints poisoned."""
    module, device = cuda_core
    stream = torch.cuda.current_stream(device).cuda_stream if device == "cuda" else 0
    padding = PADDINGS.index(padding_mode)
    is_double = dtype == torch.float64
    tol = 1e-9 if is_double else 1e-4
    for shape in SHAPES:
        n, _, d, h, w = shape
        for steps in (0, 1, 3, 7):
            velocity = _velocity(shape, gen).to(dtype)
            velocity_d = velocity.to(device)
            interval, count = checkpoint_layout(steps)
            out, scratch = poisoned(shape, dtype).to(device), poisoned(shape, dtype).to(device)
            checkpoints = poisoned((max(count, 1), *shape), dtype).to(device)
            ckpt = checkpoints.data_ptr() if count else 0
            assert module.integrate_forward(is_double, velocity_d.data_ptr(), out.data_ptr(), scratch.data_ptr(), ckpt,
                                            interval, n, d, h, w, steps, padding, stream) == ""
            leaf = velocity.double().requires_grad_()
            expected = reference.integrate_velocity(leaf, steps, padding_mode)
            torch.testing.assert_close(out.cpu().double(), expected.detach(), rtol=tol,
                                       atol=tol * float(expected.detach().abs().max()))
            grad_output = make_volume(shape, torch.float64, False, gen)
            (expected_grad,) = torch.autograd.grad(expected, leaf, grad_output)
            grad, scratch = poisoned(shape, dtype).to(device), poisoned((3, *shape), dtype).to(device)
            grad_output_d = grad_output.to(dtype).to(device)
            assert module.integrate_backward(is_double, velocity_d.data_ptr(), ckpt, interval,
                                             grad_output_d.data_ptr(), grad.data_ptr(), scratch.data_ptr(),
                                             n, d, h, w, steps, padding, stream) == ""
            torch.testing.assert_close(grad.cpu().double(), expected_grad, rtol=tol,
                                       atol=tol * float(expected_grad.abs().max()))


def test_cuda_core_bad_arguments(cuda_core):
    module, device = cuda_core
    v = torch.rand(1, 3, 3, 4, 5, dtype=torch.float64, device=device)
    ptr = v.data_ptr()
    assert "`steps` must be in" in module.integrate_forward(True, ptr, ptr, ptr, 0, 1, 1, 3, 4, 5, 31, 0, 0)
    assert "`padding` must be" in module.integrate_forward(True, ptr, ptr, ptr, 0, 1, 1, 3, 4, 5, 7, 2, 0)
    assert "sizes must be >= 1" in module.integrate_forward(True, ptr, ptr, ptr, 0, 1, 1, 0, 4, 5, 7, 0, 0)
    assert "`interval` must be >= 1" in module.integrate_backward(True, ptr, ptr, 0, ptr, ptr, ptr, 1, 3, 4, 5, 7, 0,
                                                                  0)
    assert "must be device pointers" in module.integrate_backward(True, 0, 0, 1, ptr, ptr, ptr, 1, 3, 4, 5, 7, 0, 0)


# ---------------------------------------------------------------- Triton (interpreter on the CPU; compiled on a GPU)


def triton_checks(device: str) -> None:
    """Run in a subprocess (``python tests/test_integrate.py DEVICE``): TRITON_INTERPRET must be set before triton
    is imported, and setting it in the pytest process would leak into every later test."""
    gen = torch.Generator().manual_seed(14)
    for dtype in (torch.float64, torch.float32):
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        for padding_mode in PADDINGS:
            for shape, steps in (((2, 3, 4, 5, 6), 7), ((1, 3, 1, 4, 3), 3), ((1, 3, 3, 2, 4), 0)):
                velocity = _velocity(shape, gen, dtype=dtype).to(device)
                grad_output = make_volume(shape, dtype, False, gen).to(device)
                value, (grad,) = value_and_grads(
                    lambda v: gradreg_fast.integrate_velocity(v, steps, padding_mode, backend="triton"), (velocity,),
                    grad_output)
                expected, (expected_grad,) = value_and_grads(
                    lambda v: reference.integrate_velocity(v, steps, padding_mode), (velocity,), grad_output)
                for got, want in ((value, expected), (grad, expected_grad)):
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
