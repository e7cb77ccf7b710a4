"""mind_cost_volume on every backend against the plain-PyTorch reference.

* CPU core (both ISA copies): forward and both gradients on fresh random inputs (odd sizes, size-1
  axes, batch > 1, C = 1 and 12, grid 1 to 3 with partial blocks, spacing 1 and 2, radius 0 to 4,
  non-contiguous inputs, poisoned output buffers), gradcheck in float64, argument errors,
  torch.compile(fullgraph=True) and opcheck.
* CUDA sources compiled for the CPU against csrc/cuda/emulation.cuh (as tests/test_cuda.py does), at
  the core level with poisoned buffers.
* Triton kernels under TRITON_INTERPRET=1 in a subprocess (as tests/test_triton.py does, for the same
  reason: the interpreter must be chosen before triton is imported).
* On a GPU (skipped without one): the CUDA and compiled Triton backends.
"""

if __name__ == "__main__":  # the Triton check subprocess: the interpreter must be on before triton is imported
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import (GPU_BACKENDS, cuda_core_fixture, make_volume, requires_cuda,  # noqa: E402
                      run_under_triton_interpreter, value_and_grads)

import gradreg_fast  # noqa: E402
from gradreg_fast import reference  # noqa: E402


# (shape, radius, spacing, grid): odd sizes, size-1 axes, batch 2, C = 1 and 12, partial blocks, and
# reaches s * r larger than an axis (every sample of some displacements outside the volume).
CASES = [
    ((2, 3, 5, 4, 7), 1, 1, 1),
    ((1, 12, 7, 5, 9), 2, 2, 3),
    ((1, 1, 1, 5, 3), 2, 1, 2),
    ((2, 2, 4, 1, 6), 1, 2, 2),
    ((1, 2, 3, 3, 1), 0, 1, 1),
    ((2, 1, 6, 7, 5), 4, 1, 3),
    ((1, 12, 5, 6, 11), 4, 2, 2),
    ((1, 3, 9, 2, 17), 1, 1, 3),
]


def _tolerances(dtype, expected):
    scale = max(expected.abs().max().item(), 1.0)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=2e-6 * scale)
    return dict(rtol=1e-12, atol=1e-13 * scale)


def _inputs(shape, dtype, noncontiguous, gen):
    fixed = make_volume(shape, dtype, noncontiguous, gen)
    moving = make_volume(shape, dtype, noncontiguous, gen)
    return fixed, moving


def _check_against_reference(backend, shape, radius, spacing, grid, dtype, noncontiguous, gen, device="cpu"):
    fixed, moving = (t.to(device) for t in _inputs(shape, dtype, noncontiguous, gen))
    what = f"{backend} {shape} r={radius} s={spacing} g={grid} {dtype} noncontiguous={noncontiguous}"
    fn = lambda f, m: gradreg_fast.mind_cost_volume(f, m, radius, spacing, grid, backend=backend)  # noqa: E731
    out = fn(fixed, moving)
    expected = reference.mind_cost_volume(fixed.double(), moving.double(), radius, spacing, grid)
    n, _, d, h, w = shape
    assert out.shape == (n, (2 * radius + 1) ** 3, -(-d // grid), -(-h // grid), -(-w // grid)), what
    assert out.dtype == dtype and out.device == fixed.device, what
    torch.testing.assert_close(out.double(), expected, **_tolerances(dtype, expected), msg=lambda m: f"{what}: {m}")

    grad_out = make_volume(out.shape, dtype, False, gen).to(device)
    _, grads = value_and_grads(fn, [fixed, moving], grad_out)
    _, expected_grads = value_and_grads(lambda f, m: reference.mind_cost_volume(f, m, radius, spacing, grid),
                                        [fixed.double(), moving.double()], grad_out.double())
    for name, grad, expected_grad in zip(("fixed", "moving"), grads, expected_grads):
        assert grad.dtype == dtype, what
        torch.testing.assert_close(grad.double(), expected_grad, **_tolerances(dtype, expected_grad),
                                   msg=lambda m: f"{what} grad {name}: {m}")


# --------------------------------------------------------------------------------------------- CPU core


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("shape, radius, spacing, grid", CASES)
def test_cpu_matches_reference(shape, radius, spacing, grid, dtype, noncontiguous, gen):
    _check_against_reference("cpu", shape, radius, spacing, grid, dtype, noncontiguous, gen)


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_cpu_larger_volume(grid, gen):
    # Rows long enough for the vector loops' main bodies and enough tasks for every thread.
    _check_against_reference("cpu", (1, 4, 10, 13, 37), 2, 1, grid, torch.float32, False, gen)


@pytest.mark.parametrize("shape, grid", [((2, 1, 1, 4, 3), 4096), ((1, 2, 3, 7, 5), 6)])
def test_a_grid_beyond_the_volume_is_one_block_along_that_axis(shape, grid, gen):
    # The reference once padded every axis up to the grid (4096**3 voxels here: an allocation error).
    _check_against_reference("cpu", shape, 1, 2, grid, torch.float64, False, gen)
    fixed, moving = _inputs(shape, torch.float64, False, gen)
    whole = ((fixed - moving) ** 2).sum(dim=1).mean(dim=(1, 2, 3)) if grid >= max(shape[2:]) else None
    if whole is not None:  # the zero displacement of one block over the whole volume: the plain mean
        centre = reference.mind_cost_volume(fixed, moving, 1, 2, grid)[:, 13].flatten()
        torch.testing.assert_close(centre, whole)


def test_reference_backend_is_the_reference(gen):
    fixed, moving = _inputs((1, 2, 4, 3, 5), torch.float64, False, gen)
    torch.testing.assert_close(gradreg_fast.mind_cost_volume(fixed, moving, 1, backend="reference"),
                               reference.mind_cost_volume(fixed, moving, 1), rtol=0, atol=0)


def test_low_precision_is_computed_in_float32(gen):
    fixed, moving = _inputs((1, 3, 4, 5, 6), torch.float32, False, gen)
    expected = gradreg_fast.mind_cost_volume(fixed, moving, 1, 2, 2, backend="cpu")
    for dtype in (torch.float16, torch.bfloat16):
        out = gradreg_fast.mind_cost_volume(fixed.to(dtype), moving.to(dtype), 1, 2, 2, backend="cpu")
        assert out.dtype == dtype
        ref = gradreg_fast.mind_cost_volume(fixed.to(dtype).float(), moving.to(dtype).float(), 1, 2, 2,
                                            backend="cpu")
        torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_core_writes_every_output_element(gen):
    """The core fills poisoned output and gradient buffers completely (no buffer is assumed zero)."""
    core = gradreg_fast._backend.cpu_core()
    for shape, radius, spacing, grid in CASES[:4]:
        fixed, moving = _inputs(shape, torch.float64, False, gen)
        n, c, d, h, w = shape
        out = torch.full((n, (2 * radius + 1) ** 3, -(-d // grid), -(-h // grid), -(-w // grid)), float("nan"),
                         dtype=torch.float64)
        core.cost_volume_forward("float64", fixed.data_ptr(), moving.data_ptr(), out.data_ptr(), n, c, d, h, w,
                                 radius, spacing, grid, 2)
        expected = reference.mind_cost_volume(fixed, moving, radius, spacing, grid)
        torch.testing.assert_close(out, expected)
        grad_out = make_volume(out.shape, torch.float64, False, gen)
        _, expected_grads = value_and_grads(lambda f, m: reference.mind_cost_volume(f, m, radius, spacing, grid),
                                            [fixed, moving], grad_out)
        for want_fixed, want_moving in ((True, True), (True, False), (False, True)):
            grads = [torch.full(shape, float("nan"), dtype=torch.float64) if want else None
                     for want in (want_fixed, want_moving)]
            core.cost_volume_backward("float64", grad_out.data_ptr(), fixed.data_ptr(), moving.data_ptr(),
                                      *(g.data_ptr() if g is not None else 0 for g in grads), n, c, d, h, w, radius,
                                      spacing, grid, 2)
            for grad, expected_grad in zip(grads, expected_grads):
                if grad is not None:
                    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("layout", ["expanded", "strided"])
def test_non_contiguous_grad_output(layout, gen):
    fixed, moving = _inputs((2, 2, 4, 5, 3), torch.float64, True, gen)
    out_shape = (2, 27, 2, 3, 2)
    grad_out = (torch.ones((), dtype=torch.float64).expand(out_shape) if layout == "expanded"
                else make_volume(out_shape, torch.float64, True, gen))
    fn = lambda f, m: gradreg_fast.mind_cost_volume(f, m, 1, 1, 2, backend="cpu")  # noqa: E731
    _, grads = value_and_grads(fn, [fixed, moving], grad_out)
    _, expected = value_and_grads(lambda f, m: reference.mind_cost_volume(f, m, 1, 1, 2), [fixed, moving], grad_out)
    for grad, expected_grad in zip(grads, expected):
        torch.testing.assert_close(grad, expected_grad)


def test_one_input_needing_a_gradient(gen):
    fixed, moving = _inputs((1, 3, 4, 5, 6), torch.float64, False, gen)
    grad_out = make_volume((1, 27, 4, 5, 6), torch.float64, False, gen)
    for which in (0, 1):
        leaves = [fixed.clone(), moving.clone()]
        leaves[which].requires_grad_()
        (grad,) = torch.autograd.grad(gradreg_fast.mind_cost_volume(*leaves, 1, backend="cpu"), leaves[which],
                                      grad_out)
        ref_leaves = [fixed.clone(), moving.clone()]
        ref_leaves[which].requires_grad_()
        (expected,) = torch.autograd.grad(reference.mind_cost_volume(*ref_leaves, 1), ref_leaves[which], grad_out)
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("radius, spacing, grid", [(1, 1, 1), (1, 2, 2), (2, 1, 3)])
def test_gradcheck(radius, spacing, grid, gen):
    fixed, moving = (t.requires_grad_() for t in _inputs((2, 2, 3, 4, 5), torch.float64, True, gen))
    fn = lambda f, m: gradreg_fast.mind_cost_volume(f, m, radius, spacing, grid, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (fixed, moving))


def test_torch_func_grad_vmap_and_forward_mode_error(gen):
    fixed = make_volume((2, 3, 5, 4, 6), generator=gen)
    moving = make_volume((2, 3, 5, 4, 6), generator=gen)
    weights = make_volume((2, 27, 3, 2, 3), generator=gen)
    for fused, naive in ((lambda f: gradreg_fast.mind_cost_volume(f, moving, 1, 1, 2),
                          lambda f: reference.mind_cost_volume(f, moving, 1, 1, 2)),
                         (lambda m: gradreg_fast.mind_cost_volume(fixed, m, 1, 1, 2),
                          lambda m: reference.mind_cost_volume(fixed, m, 1, 1, 2))):
        grad = torch.func.grad(lambda x: (fused(x) * weights).sum())(fixed)
        expected = torch.func.grad(lambda x: (naive(x) * weights).sum())(fixed)
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
        # vmap over a leading axis of stacked batches
        torch.testing.assert_close(torch.func.vmap(fused)(torch.stack([fixed, moving])),
                                   torch.stack([naive(fixed), naive(moving)]), rtol=1e-10, atol=1e-12)
        with pytest.raises(NotImplementedError, match="mind_cost_volume: forward-mode AD"):
            torch.func.jvp(fused, (fixed,), (torch.ones_like(fixed),))


def test_minimum_at_the_true_displacement(gen):
    """Independent of the reference: a moving descriptor that is the fixed one moved by e has zero cost
    at the channel whose displacement (from mind_cost_volume_displacements) is e, at interior points."""
    radius, spacing = 2, 2
    fixed = make_volume((1, 12, 16, 15, 17), torch.float64, False, gen)
    table = gradreg_fast.mind_cost_volume_displacements(radius, spacing, dtype=torch.int64)
    for e in ((2, -4, 0), (-2, 0, 4), (4, 2, -2)):
        moving = torch.roll(fixed, shifts=e, dims=(2, 3, 4))  # moving(y) = fixed(y - e)
        cost = gradreg_fast.mind_cost_volume(fixed, moving, radius, spacing, backend="cpu")
        interior = cost[0, :, 4:-4, 4:-4, 4:-4]
        best = interior.argmin(dim=0)
        k = int(((table == torch.tensor(e)).all(dim=1)).nonzero())
        assert (best == k).all(), e
        assert interior[k].abs().max() == 0


def test_displacement_table(gen):
    table = gradreg_fast.mind_cost_volume_displacements(2, 3, dtype=torch.float64)
    assert table.shape == (125, 3) and table.dtype == torch.float64
    torch.testing.assert_close(table, reference.mind_cost_volume_displacements(2, 3, dtype=torch.float64))
    # k = ((dz + r) * 5 + (dy + r)) * 5 + (dx + r), in steps of 3 voxels
    assert table[0].tolist() == [-6, -6, -6] and table[-1].tolist() == [6, 6, 6]
    assert table[1].tolist() == [-6, -6, -3] and table[5].tolist() == [-6, -3, -6] and table[25].tolist() == [-3, -6,
                                                                                                              -6]
    assert gradreg_fast.mind_cost_volume_displacements(0).tolist() == [[0.0, 0.0, 0.0]]


def test_geometry_accepts_numpy_integers(gen):
    fixed, moving = _inputs((1, 2, 4, 3, 5), torch.float64, False, gen)
    out = gradreg_fast.mind_cost_volume(fixed, moving, np.int64(1), np.int32(2), np.int16(2), backend="cpu")
    torch.testing.assert_close(out, reference.mind_cost_volume(fixed, moving, 1, 2, 2))


def test_bad_arguments(gen):
    fixed, moving = _inputs((1, 2, 4, 3, 5), torch.float64, False, gen)
    op = gradreg_fast.mind_cost_volume
    cases = [
        (lambda: op(fixed[0], moving[0], 1), ValueError, "`fixed_desc` must have 5 dimensions"),
        (lambda: op(fixed, moving[0], 1), ValueError, "`moving_desc` must have 5 dimensions"),
        (lambda: op(fixed, moving.float(), 1), TypeError, "use one dtype"),
        (lambda: op(fixed, moving.to("meta"), 1), ValueError, "is on"),
        (lambda: op(fixed, moving[:, :1], 1), ValueError, "same shapes"),
        (lambda: op(fixed, moving[..., :4], 1), ValueError, "same shapes"),
        (lambda: op(fixed.long(), moving.long(), 1), TypeError, "floating-point"),
        (lambda: op(fixed[:, :0], moving[:, :0], 1), ValueError, "must not be empty"),
        (lambda: op(fixed.numpy(), moving, 1), TypeError, "must be a torch.Tensor"),
        (lambda: op(fixed, moving, -1), ValueError, "`radius` must be in \\[0, 32\\]"),
        (lambda: op(fixed, moving, 33), ValueError, "`radius` must be in \\[0, 32\\]"),
        (lambda: op(fixed, moving, 1.0), TypeError, "`radius` must be an integer"),
        (lambda: op(fixed, moving, True), TypeError, "`radius` must be an integer"),
        (lambda: op(fixed, moving, 1, 0), ValueError, "`spacing` must be in \\[1, 4096\\]"),
        (lambda: op(fixed, moving, 0, 2 ** 31), ValueError, "`spacing` must be in \\[1, 4096\\]"),
        (lambda: op(fixed, moving, 1, 1.5), TypeError, "`spacing` must be an integer"),
        (lambda: op(fixed, moving, 32, 200), ValueError, "at most 4096 voxels"),
        (lambda: op(fixed, moving, 1, 1, 0), ValueError, "`grid` must be in"),
        (lambda: op(fixed, moving, 1, 1, "2"), TypeError, "`grid` must be an integer"),
        (lambda: op(fixed, moving, 1, backend="gpu"), ValueError, "`backend` must be one of"),
        (lambda: gradreg_fast.mind_cost_volume_displacements(-2), ValueError, "`radius`"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("shape, radius, spacing, grid", [((2, 5, 6, 7, 37), 2, 1, 1), ((1, 12, 7, 9, 21), 1, 2, 3)])
def test_both_isa_copies(isa, shape, radius, spacing, grid, gen):
    _check_against_reference("cpu", shape, radius, spacing, grid, torch.float32, False, gen)


# ------------------------------------------------------------------------------- torch.compile and opcheck


def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    fixed, moving = _inputs((2, 3, 5, 4, 6), torch.float64, True, gen)
    grad_out = make_volume((2, 27, 3, 2, 3), torch.float64, False, gen)

    def fn(f, m):
        return gradreg_fast.mind_cost_volume(f, m, 1, 1, 2, backend="cpu")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    expected, expected_grads = value_and_grads(fn, [fixed, moving], grad_out)
    out, grads = value_and_grads(compiled, [fixed, moving], grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_opcheck(gen):
    fixed, moving = (t.requires_grad_() for t in _inputs((2, 2, 3, 4, 5), torch.float64, False, gen))
    results = torch.library.opcheck(torch.ops.gradreg.mind_cost_volume.default, (fixed, moving, 1, 2, 2, "cpu"))
    assert all(result == "SUCCESS" for result in results.values()), results
    grad_out = make_volume((2, 27, 2, 2, 3), torch.float64, False, gen)
    for need_fixed, need_moving in ((True, True), (False, True)):
        results = torch.library.opcheck(torch.ops.gradreg.mind_cost_volume_backward.default,
                                        (grad_out, fixed.detach(), moving.detach(), 1, 2, 2, need_fixed,
                                         need_moving, "cpu"))
        assert all(result == "SUCCESS" for result in results.values()), results


# ---------------------------------------------------------------- the CUDA core (emulated on the CPU, or real)

CORE_CASES = [
    ((2, 3, 5, 4, 7), 1, 1, 1),
    ((1, 2, 7, 5, 9), 2, 2, 3),
    ((1, 1, 1, 5, 3), 2, 1, 2),
    ((2, 2, 4, 1, 6), 1, 2, 2),
    ((1, 3, 3, 3, 1), 0, 1, 1),
]


def _check_core(module, device, shape, radius, spacing, grid, dtype, gen):
    """The core's entry points against the reference, with outputs poisoned (NaN) before each call."""
    n, c, d, h, w = shape
    fixed, moving = (t.to(device) for t in _inputs(shape, dtype, False, gen))
    stream = torch.cuda.current_stream(device).cuda_stream if torch.device(device).type == "cuda" else 0
    is_double = dtype == torch.float64
    out = torch.full((n, (2 * radius + 1) ** 3, -(-d // grid), -(-h // grid), -(-w // grid)), float("nan"),
                     dtype=dtype, device=device)
    err = module.cost_volume_forward(is_double, fixed.data_ptr(), moving.data_ptr(), out.data_ptr(), n, c, d, h, w,
                                     radius, spacing, grid, stream)
    assert err == "", err
    expected = reference.mind_cost_volume(fixed, moving, radius, spacing, grid)
    torch.testing.assert_close(out, expected, **_tolerances(dtype, expected))
    grad_out = make_volume(out.shape, dtype, False, gen).to(device)
    _, expected_grads = value_and_grads(lambda f, m: reference.mind_cost_volume(f, m, radius, spacing, grid),
                                        [fixed, moving], grad_out)
    for want_fixed, want_moving in ((True, True), (True, False), (False, True)):
        grads = [torch.full(shape, float("nan"), dtype=dtype, device=device) if want else None
                 for want in (want_fixed, want_moving)]
        err = module.cost_volume_backward(is_double, grad_out.data_ptr(), fixed.data_ptr(), moving.data_ptr(),
                                          *(g.data_ptr() if g is not None else 0 for g in grads), n, c, d, h, w,
                                          radius, spacing, grid, stream)
        assert err == "", err
        for grad, expected_grad in zip(grads, expected_grads):
            if grad is not None:
                torch.testing.assert_close(grad, expected_grad, **_tolerances(dtype, expected_grad))


def _check_core_bad_arguments(module, device):
    vol = torch.randn(1, 1, 3, 4, 5, device=device)
    out = torch.empty(1, 27, 3, 4, 5, device=device)
    p = vol.data_ptr()
    assert "radius" in module.cost_volume_forward(False, p, p, out.data_ptr(), 1, 1, 3, 4, 5, 33, 1, 1, 0)
    assert "radius" in module.cost_volume_forward(False, p, p, out.data_ptr(), 1, 1, 3, 4, 5, -1, 1, 1, 0)
    assert "spacing" in module.cost_volume_forward(False, p, p, out.data_ptr(), 1, 1, 3, 4, 5, 1, 0, 1, 0)
    assert "4096" in module.cost_volume_forward(False, p, p, out.data_ptr(), 1, 1, 3, 4, 5, 32, 129, 1, 0)
    assert "grid" in module.cost_volume_forward(False, p, p, out.data_ptr(), 1, 1, 3, 4, 5, 1, 1, 0, 0)
    assert "sizes" in module.cost_volume_forward(False, p, p, out.data_ptr(), 1, 0, 3, 4, 5, 1, 1, 1, 0)
    assert "sizes" in module.cost_volume_forward(False, p, p, out.data_ptr(), 2**40, 1, 2**20, 4, 5, 1, 1, 1, 0)
    assert "pointers" in module.cost_volume_forward(False, 0, p, out.data_ptr(), 1, 1, 3, 4, 5, 1, 1, 1, 0)
    assert "pointers" in module.cost_volume_backward(False, 0, p, p, p, 0, 1, 1, 3, 4, 5, 1, 1, 1, 0)


GPU_CORE_CASES = [((1, 12, 22, 16, 6), 4, 1, 1)]  # ConvexAdam's search radius, MIND-SSC's 12 channels

cuda_core = cuda_core_fixture("cost_volume.cu", ("cost_volume_forward", "cost_volume_backward"),
                              "_cost_volume_emulated")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_core(cuda_core, dtype, gen):
    module, device = cuda_core
    for shape, radius, spacing, grid in CORE_CASES + (GPU_CORE_CASES if device == "cuda" else []):
        _check_core(module, device, shape, radius, spacing, grid, dtype, gen)


def test_cuda_core_bad_arguments(cuda_core):
    _check_core_bad_arguments(*cuda_core)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, radius, spacing, grid", CASES)
def test_gpu_matches_reference(backend, shape, radius, spacing, grid, dtype, gen):
    _check_against_reference(backend, shape, radius, spacing, grid, dtype, dtype == torch.float64, gen, "cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_gradcheck(backend, gen):
    fixed, moving = (t.cuda().requires_grad_() for t in _inputs((2, 2, 3, 4, 5), torch.float64, False, gen))
    fn = lambda f, m: gradreg_fast.mind_cost_volume(f, m, 1, 2, 2, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (fixed, moving))


# ---------------------------------------------------------------- Triton (interpreter on the CPU, or a GPU)

# (shape, radius, spacing, grid, dtype): the interpreter is slow, so one dtype per case (float64 cases
# non-contiguous).
TRITON_CASES = [
    ((2, 3, 5, 4, 7), 1, 1, 1, torch.float32),
    ((1, 12, 4, 3, 5), 1, 2, 3, torch.float64),
    ((1, 1, 1, 5, 3), 2, 1, 2, torch.float32),
    ((2, 2, 4, 1, 6), 1, 2, 2, torch.float64),
    ((1, 2, 3, 3, 1), 0, 1, 1, torch.float32),
]


def triton_checks(device):
    """Run in a subprocess (see the module docstring); raises on the first mismatch."""
    gen = torch.Generator().manual_seed(11)
    for shape, radius, spacing, grid, dtype in TRITON_CASES:
        _check_against_reference("triton", shape, radius, spacing, grid, dtype, dtype == torch.float64, gen, device)
    fixed, moving = (t.to(device).requires_grad_() for t in _inputs((1, 2, 3, 2, 4), torch.float64, False, gen))
    fn = lambda f, m: gradreg_fast.mind_cost_volume(f, m, 1, 1, 2, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (fixed, moving), fast_mode=True)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_on_cpu():
    run_under_triton_interpreter(__file__, "cpu")


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: no OpenMP team per small torch op
    triton_checks(sys.argv[1])
