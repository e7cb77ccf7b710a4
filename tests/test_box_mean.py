"""box_mean: the fused CPU core against the reference (values, gradients of first and second order, every
layout and size that has edges), its definition independent of the reference, bad input, torch.compile and
opcheck, the CUDA core (emulated on the CPU, or on a GPU) and the Triton kernels (interpreter on the CPU, or a
GPU). Triton runs in a subprocess: the interpreter must be chosen before triton is imported."""

if __name__ == "__main__":  # the Triton check subprocess
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import (GPU_BACKENDS, cuda_core_fixture, make_volume, non_contiguous_grad_output,  # noqa: E402
                      poisoned, requires_cuda, run_under_triton_interpreter, value_and_grads)

import gradreg_fast  # noqa: E402
from gradreg_fast import reference  # noqa: E402

SHAPES = [
    (2, 3, 5, 4, 7),  # batch and channels, odd sizes
    (1, 2, 1, 5, 3),  # D = 1
    (1, 2, 4, 1, 3),  # H = 1
    (2, 1, 3, 5, 1),  # W = 1
    (1, 1, 2, 2, 2),  # every voxel on an edge
    (1, 1, 1, 1, 1),  # nothing to average
    (1, 20, 3, 4, 5),  # many channels: the core's one-channel-per-thread path
]
PASSES = [0, 1, 2, 3]


def _tolerances(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def _check_against_reference(backend, shape, passes, dtype, noncontiguous, gen, device="cpu"):
    volume = make_volume(shape, dtype, noncontiguous, gen).to(device)
    grad_out = make_volume(shape, dtype, False, gen).to(device)
    what = f"{backend} {shape} passes={passes} {dtype} noncontiguous={noncontiguous}"
    out, (grad,) = value_and_grads(lambda v: gradreg_fast.box_mean(v, passes, backend=backend), [volume], grad_out)
    expected, (expected_grad,) = value_and_grads(lambda v: reference.box_mean(v, passes), [volume.double()],
                                                 grad_out.double())
    assert out.shape == shape and out.dtype == dtype and out.device == volume.device, what
    torch.testing.assert_close(out.double(), expected, **_tolerances(dtype), msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(grad.double(), expected_grad, **_tolerances(dtype), msg=lambda m: f"{what} grad: {m}")


# --------------------------------------------------------------------------------------------- CPU core

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_cpu_matches_reference(shape, passes, dtype, noncontiguous, gen):
    _check_against_reference("cpu", shape, passes, dtype, noncontiguous, gen)


@pytest.mark.parametrize("shape, passes", [((1, 3, 16, 40, 60), 2), ((2, 24, 8, 16, 12), 2), ((1, 1, 128, 128, 128), 2),
                                           ((1, 3, 128, 128, 43), 1), ((1, 1, 1, 1500, 1450), 1)])
def test_cpu_large_volumes_on_every_thread_and_alone(shape, passes, gen):
    """Volumes above the one-thread size of the ops, in each layout of the core's work (whole channels per thread:
    many channels, or a small volume; every thread on each stage: a large volume of few channels, with an even and
    an odd number of stages, and a single plane), and the same bits on one thread, forward and backward."""
    _check_against_reference("cpu", shape, passes, torch.float32, False, gen)
    volume = make_volume(shape, torch.float32, False, gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            leaf = volume.clone().requires_grad_()
            out = gradreg_fast.box_mean(leaf, passes, backend="cpu")
            (grad,) = torch.autograd.grad(out, leaf, volume)
            results.append((out, grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_core_writes_every_output_element(gen):
    """Poisoned (NaN) outputs come back complete from the core's entry point, forward and adjoint."""
    core = gradreg_fast._backend.cpu_core()
    for shape in SHAPES:
        volume = make_volume(shape, torch.float64, False, gen)
        n, c, d, h, w = shape
        for passes in PASSES:
            for adjoint in (False, True):
                out = poisoned(shape)
                core.box_mean_forward("float64", volume.data_ptr(), out.data_ptr(), n * c, d, h, w, passes, adjoint,
                                      2)
                if adjoint:
                    expected = torch.func.vjp(lambda v: reference.box_mean(v, passes), torch.zeros_like(volume))[1](
                        volume)[0]
                else:
                    expected = reference.box_mean(volume, passes)
                torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_definition_by_hand():
    """Independent of the reference: one pass on a 1 x 1 x 3 x 1 x 4 volume, every window written out."""
    v = torch.tensor([[1.0, 2.0, 4.0, 8.0], [16.0, 32.0, 64.0, 128.0], [3.0, 5.0, 7.0, 11.0]], dtype=torch.float64)
    rows = [v[0:2], v[0:3], v[1:3]]  # the rows each D position averages
    expected = torch.empty_like(v)
    for z in range(3):
        for x in range(4):
            window = rows[z][:, max(x - 1, 0):x + 2]
            expected[z, x] = window.sum() / window.numel()
    out = gradreg_fast.box_mean(v.view(1, 1, 3, 1, 4), backend="cpu").view(3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=0)


def test_a_constant_stays_constant_and_the_adjoint_keeps_the_total(gen):
    const = torch.full((2, 3, 6, 5, 7), 2.5, dtype=torch.float64)
    assert torch.equal(gradreg_fast.box_mean(const, 3, backend="cpu"), const)
    # B 1 = 1, so <B^T w, 1> = <w, B 1> = <w, 1>: the adjoint spreads each weight without losing any.
    volume = make_volume((1, 2, 6, 5, 7), torch.float64, False, gen).requires_grad_()
    weights = make_volume((1, 2, 6, 5, 7), torch.float64, False, gen)
    (grad,) = torch.autograd.grad((gradreg_fast.box_mean(volume, 2, backend="cpu") * weights).sum(), volume)
    torch.testing.assert_close(grad.sum(), weights.sum(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grad, weights)  # spread, not passed through


@pytest.mark.parametrize("grad_layout", ["expanded", "strided"])
def test_backward_with_a_non_contiguous_grad_output(grad_layout, gen):
    shape = (2, 3, 5, 4, 6)
    volume = make_volume(shape, torch.float64, False, gen)
    grad_out = non_contiguous_grad_output(shape, grad_layout, gen)
    _, (grad,) = value_and_grads(lambda v: gradreg_fast.box_mean(v, 2, backend="cpu"), [volume], grad_out)
    _, (expected,) = value_and_grads(lambda v: reference.box_mean(v, 2), [volume], grad_out.contiguous())
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("shape", [(1, 2, 5, 4, 6), (2, 1, 1, 3, 4)])
@pytest.mark.parametrize("passes", [1, 2])
def test_gradcheck_and_gradgradcheck(shape, passes, gen):
    volume = make_volume(shape, torch.float64, True, gen).requires_grad_()
    fn = lambda v: gradreg_fast.box_mean(v, passes, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (volume,))
    assert torch.autograd.gradgradcheck(fn, (volume,))


def test_backend_reference_is_the_reference(gen):
    volume = make_volume((1, 2, 3, 4, 5), generator=gen)
    assert torch.equal(gradreg_fast.box_mean(volume, 2, backend="reference"), reference.box_mean(volume, 2))


@pytest.mark.parametrize("shape", SHAPES[:5])
def test_reference_adjoint_is_the_transpose_of_the_reference(shape, gen):
    """<B x, y> = <x, B^T y> for the reference's written-out adjoint (what the reference backend's backward runs),
    and it equals the vector-Jacobian product of the reference mean."""
    x, y = make_volume(shape, torch.float64, False, gen), make_volume(shape, torch.float64, False, gen)
    for passes in PASSES:
        adjoint = reference.box_mean_adjoint(y, passes)
        torch.testing.assert_close((reference.box_mean(x, passes) * y).sum(), (x * adjoint).sum(), rtol=1e-12,
                                   atol=1e-12)
        vjp = torch.func.vjp(lambda v: reference.box_mean(v, passes), x)[1](y)[0]
        torch.testing.assert_close(adjoint, vjp, rtol=1e-12, atol=1e-12)


def test_does_not_modify_input_and_returns_a_new_tensor(gen):
    volume = make_volume((1, 2, 4, 5, 3), torch.float32, True, gen)
    before = volume.clone()
    for passes in (0, 2):
        out = gradreg_fast.box_mean(volume, passes, backend="cpu")
        assert not out._is_view() and out.data_ptr() != volume.data_ptr()
    assert torch.equal(volume, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype, gen):
    volume = make_volume((1, 2, 5, 4, 3), dtype, False, gen).requires_grad_()
    out = gradreg_fast.box_mean(volume, 2, backend="cpu")
    assert out.dtype == dtype
    assert torch.equal(out, gradreg_fast.box_mean(volume.detach().float(), 2, backend="cpu").to(dtype))
    out.sum().backward()
    assert volume.grad.dtype == dtype


@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 37), (1, 12, 7, 9, 21)])
def test_both_isa_copies(isa, shape, gen):
    _check_against_reference("cpu", shape, 2, torch.float32, False, gen)


class TestBadInput:
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="`volume` must be a torch.Tensor"):
            gradreg_fast.box_mean([[1.0]])

    @pytest.mark.parametrize("shape", [(4, 5, 6), (1, 1, 1, 4, 5, 6)])
    def test_wrong_rank(self, shape):
        with pytest.raises(ValueError, match="`volume` must have 5 dimensions"):
            gradreg_fast.box_mean(torch.ones(shape))

    @pytest.mark.parametrize("dtype", [torch.int32, torch.bool] + [getattr(torch, name) for name in
                                                                   ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)])
    def test_unsupported_dtype(self, dtype):
        with pytest.raises(TypeError, match="`volume` must be a floating-point tensor"):
            gradreg_fast.box_mean(torch.ones(1, 1, 2, 2, 2, dtype=dtype))

    def test_empty(self):
        with pytest.raises(ValueError, match="`volume` must not be empty"):
            gradreg_fast.box_mean(torch.ones(1, 0, 2, 2, 2))

    @pytest.mark.parametrize("passes", [-1, 1.5, True, "2", 1 << 20])
    def test_bad_passes(self, passes):
        with pytest.raises(ValueError, match="`passes` must be an int >= 0"):
            gradreg_fast.box_mean(torch.ones(1, 1, 2, 2, 2), passes)

    def test_bad_backend(self):
        with pytest.raises(ValueError, match="`backend` must be one of"):
            gradreg_fast.box_mean(torch.ones(1, 1, 2, 2, 2), backend="gpu")

    def test_core_refuses_bad_sizes(self):
        core = gradreg_fast._backend.cpu_core()
        volume = torch.ones(8)
        with pytest.raises(ValueError, match="sizes must be >= 1"):
            core.box_mean_forward("float32", volume.data_ptr(), volume.data_ptr(), 1, 0, 2, 2, 1, False, 1)
        with pytest.raises(ValueError, match="dtype"):
            core.box_mean_forward("int32", volume.data_ptr(), volume.data_ptr(), 1, 2, 2, 2, 1, False, 1)


# ------------------------------------------------------------------------------- torch.compile and opcheck

def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    volume = make_volume((2, 3, 5, 4, 6), torch.float64, True, gen)
    grad_out = make_volume((2, 3, 5, 4, 6), torch.float64, False, gen)

    def fn(v):
        return gradreg_fast.box_mean(v, 2, backend="cpu") * 2

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    expected, expected_grads = value_and_grads(fn, [volume], grad_out)
    out, grads = value_and_grads(compiled, [volume], grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend, gen):
    """The op against its fake implementation (layouts included: a channels-last input, no pass), its autograd
    registration and schema, for the mean and the adjoint."""
    plain = make_volume((2, 2, 3, 4, 5), torch.float64, False, gen)
    for volume in (plain, plain.contiguous(memory_format=torch.channels_last_3d)):
        for passes in (0, 2):
            for adjoint in (False, True):
                results = torch.library.opcheck(torch.ops.gradreg.box_mean.default,
                                                (volume.detach().requires_grad_(), passes, adjoint, backend))
                assert all(result == "SUCCESS" for result in results.values()), (passes, adjoint, results)


def test_compile_with_inductor_on_a_channels_last_input(gen):
    """Inductor relies on the fake implementation's layout: the reference backend (the fallback without a compiled
    core) and the CPU core both return what it promises, also for no pass."""
    torch._dynamo.reset()
    volume = make_volume((1, 3, 4, 5, 6), torch.float32, False, gen).contiguous(memory_format=torch.channels_last_3d)
    for backend in ("cpu", "reference"):
        for passes in (0, 1):
            compiled = torch.compile(lambda v: gradreg_fast.box_mean(v, passes, backend=backend) * 2, fullgraph=True)
            torch.testing.assert_close(compiled(volume), reference.box_mean(volume, passes) * 2)
            torch._dynamo.reset()


# ---------------------------------------------------------------- the CUDA core (emulated on the CPU, or real)

def _check_core(module, device, shape, passes, dtype, gen):
    """The core's entry point against the reference, forward and adjoint, outputs poisoned before each call."""
    n, c, d, h, w = shape
    volume = make_volume(shape, dtype, False, gen).to(device)
    stream = torch.cuda.current_stream(device).cuda_stream if torch.device(device).type == "cuda" else 0
    is_double = dtype == torch.float64
    nbytes = module.box_mean_workspace_bytes(is_double, n * c, d, h, w)
    assert nbytes == volume.numel() * volume.element_size()
    workspace = torch.full((nbytes,), 255, dtype=torch.uint8, device=device)
    for adjoint in (False, True):
        out = torch.full(shape, float("nan"), dtype=dtype, device=device)
        err = module.box_mean_forward(is_double, volume.data_ptr(), out.data_ptr(), n * c, d, h, w, passes, adjoint,
                                      workspace.data_ptr(), nbytes, stream)
        assert err == "", err
        if adjoint:
            expected = torch.func.vjp(lambda v: reference.box_mean(v, passes), torch.zeros_like(volume))[1](volume)[0]
        else:
            expected = reference.box_mean(volume, passes)
        torch.testing.assert_close(out, expected, **_tolerances(dtype))


def _check_core_bad_arguments(module, device):
    volume = torch.randn(1, 1, 3, 4, 5, device=device)
    out = torch.empty_like(volume)
    p, o = volume.data_ptr(), out.data_ptr()
    assert "sizes" in module.box_mean_forward(False, p, o, 1, 0, 4, 5, 1, False, 0, 0, 0)
    assert "passes" in module.box_mean_forward(False, p, o, 1, 3, 4, 5, -1, False, 0, 0, 0)
    assert "pointers" in module.box_mean_forward(False, 0, o, 1, 3, 4, 5, 1, False, 0, 0, 0)
    assert "workspace" in module.box_mean_forward(False, p, o, 1, 3, 4, 5, 2, False, 0, 0, 0)
    assert "workspace" in module.box_mean_forward(False, p, o, 1, 3, 4, 5, 1, False, p, 10, 0)
    with pytest.raises(ValueError):
        module.box_mean_workspace_bytes(False, 1, 0, 4, 5)


CORE_CASES = [((2, 3, 5, 4, 7), 1), ((1, 2, 1, 5, 3), 2), ((2, 1, 3, 5, 1), 3), ((1, 1, 1, 1, 1), 2),
              ((1, 2, 6, 7, 40), 0), ((1, 2, 2, 2, 2), 2)]
GPU_CORE_CASES = [((1, 125, 16, 46, 60), 2)]  # a cost volume's size: many blocks per stage

cuda_core = cuda_core_fixture("box_mean.cu", ("box_mean_forward", "box_mean_workspace_bytes"), "_box_mean_emulated")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_core(cuda_core, dtype, gen):
    module, device = cuda_core
    for shape, passes in CORE_CASES + (GPU_CORE_CASES if device == "cuda" else []):
        _check_core(module, device, shape, passes, dtype, gen)


def test_cuda_core_bad_arguments(cuda_core):
    _check_core_bad_arguments(*cuda_core)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_matches_reference(backend, shape, dtype, gen):
    for passes in PASSES:
        _check_against_reference(backend, shape, passes, dtype, dtype == torch.float64, gen, "cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_gradcheck(backend, gen):
    volume = make_volume((2, 2, 3, 4, 5), torch.float64, False, gen).cuda().requires_grad_()
    fn = lambda v: gradreg_fast.box_mean(v, 2, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (volume,))
    assert torch.autograd.gradgradcheck(fn, (volume,))


# ---------------------------------------------------------------- Triton (interpreter on the CPU, or a GPU)

def triton_checks(device):
    """Run in a subprocess (see the module docstring); raises on the first mismatch. The kernels round as the
    CPU core does, so on the CPU their results are compared bit for bit too."""
    gen = torch.Generator().manual_seed(5)
    for shape in SHAPES[:6]:
        for passes, dtype in ((0, torch.float32), (1, torch.float64), (2, torch.float32), (3, torch.float64)):
            _check_against_reference("triton", shape, passes, dtype, dtype == torch.float64, gen, device)
            volume = make_volume(shape, dtype, False, gen).to(device)
            if device == "cpu":
                assert torch.equal(gradreg_fast.box_mean(volume, passes, backend="triton"),
                                   gradreg_fast.box_mean(volume, passes, backend="cpu")), (shape, passes, dtype)
    volume = make_volume((1, 2, 3, 2, 4), torch.float64, False, gen).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: gradreg_fast.box_mean(v, 2, backend="triton"), (volume,),
                                    fast_mode=True)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_on_cpu():
    run_under_triton_interpreter(__file__, "cpu")


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: no OpenMP team per small torch op
    triton_checks(sys.argv[1])
