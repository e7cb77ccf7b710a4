"""warped_sq_diff: the fused weighted squared difference of a warped image, against the reference (the
reference warp, then a square and a sum) on fresh random inputs, with its gradients w.r.t. the flow,
the fixed and the moving image; determinism, both CPU kernel copies, bad input, torch.compile."""

import importlib
import sys

import pytest
import torch
from conftest import GPU_BACKENDS, cuda_core_fixture, make_volume, requires_cuda, value_and_grads

import gradreg_fast
from gradreg_fast import reference

core = importlib.import_module("gradreg_fast._C")

# Odd sizes, axes of size 1, batches > 1, C in {1, 5, 24}.
SHAPES = [(2, 5, 7, 6, 9), (1, 1, 1, 8, 5), (1, 24, 4, 5, 6), (3, 1, 5, 1, 4), (2, 5, 3, 4, 1)]


def _inputs(shape, dtype, gen, noncontiguous=False, weighted=True, flow_scale=2.5):
    """Moving, fixed, a flow of a few voxels (many samples fall outside the volume) and a weight that is
    0 on about a third of the voxels (a field-of-view mask) and positive elsewhere."""
    n, _, d, h, w = shape
    moving = make_volume(shape, dtype, noncontiguous, gen)
    fixed = make_volume(shape, dtype, noncontiguous, gen)
    flow = make_volume((n, 3, d, h, w), dtype, noncontiguous, gen, scale=flow_scale)
    weight = None
    if weighted:
        mask = torch.rand((n, 1, d, h, w), generator=gen) > 0.35
        weight = (mask * (0.5 + torch.rand((n, 1, d, h, w), generator=gen))).to(dtype)
    return moving, fixed, flow, weight


def _tolerances(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)


def _check_against_reference(shape, dtype, padding_mode, weighted, gen, noncontiguous=False, backend="cpu"):
    moving, fixed, flow, weight = _inputs(shape, dtype, gen, noncontiguous, weighted)
    fused = lambda m, f, u: gradreg_fast.warped_sq_diff(m, f, u, weight, padding_mode, backend=backend)  # noqa: E731
    value, grads = value_and_grads(fused, [moving, fixed, flow])
    wide = [t.double() for t in (moving, fixed, flow)]
    ref_weight = weight.double() if weight is not None else None
    ref = lambda m, f, u: reference.warped_sq_diff(m, f, u, ref_weight, padding_mode)  # noqa: E731
    ref_value, ref_grads = value_and_grads(ref, wide)
    assert value.dtype == dtype and value.dim() == 0
    tol = _tolerances(dtype)
    torch.testing.assert_close(value.double(), ref_value, **tol)
    for grad, ref_grad in zip(grads, ref_grads):
        scale = max(ref_grad.abs().max().item(), 1.0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=tol["rtol"], atol=tol["atol"] * scale)
    # The flow alone (the engine's case): the stored gradient, scaled by a non-unit upstream.
    leaf = flow.detach().requires_grad_()
    (grad_flow,) = torch.autograd.grad(3.5 * fused(moving, fixed, leaf), leaf)
    torch.testing.assert_close(grad_flow.double(), 3.5 * ref_grads[2], rtol=tol["rtol"],
                               atol=tol["atol"] * max(ref_grads[2].abs().max().item(), 1.0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(shape, dtype, padding_mode, weighted, gen):
    _check_against_reference(shape, dtype, padding_mode, weighted, gen)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_non_contiguous_inputs(padding_mode, gen):
    _check_against_reference((2, 5, 5, 6, 7), torch.float64, padding_mode, True, gen, noncontiguous=True)


# Channels-last inputs take the CPU kernel that reads each corner's channels together (eight partial
# channel sums): C below, at and above the 8 lanes, with a remainder, odd sizes, axes of size 1, batch > 1.
LAST_SHAPES = [(2, 24, 5, 7, 9), (1, 11, 4, 1, 6), (3, 8, 3, 4, 1), (1, 2, 1, 5, 7), (2, 17, 6, 3, 5)]


def _channels_last(volume):
    last = volume.contiguous(memory_format=torch.channels_last_3d)
    assert volume.shape[1] == 1 or not last.is_contiguous()
    return last


@pytest.mark.parametrize("shape", LAST_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("weighted", [False, True])
def test_channels_last_matches_reference(shape, dtype, padding_mode, weighted, gen):
    moving, fixed, flow, weight = _inputs(shape, dtype, gen, weighted=weighted)
    ref_weight = weight.double() if weight is not None else None
    ref = lambda m, f, u: reference.warped_sq_diff(m, f, u, ref_weight, padding_mode)  # noqa: E731
    ref_value, ref_grads = value_and_grads(ref, [t.double() for t in (moving, fixed, flow)])
    tol = _tolerances(dtype)
    # Both channels-last; and moving alone (fixed is then read channels-last too).
    for fixed_in in (_channels_last(fixed), fixed):
        fused = lambda m, f, u: gradreg_fast.warped_sq_diff(m, f, u, weight, padding_mode, backend="cpu")  # noqa: E731
        value, grads = value_and_grads(fused, [_channels_last(moving), fixed_in, flow])
        torch.testing.assert_close(value.double(), ref_value, **tol)
        for grad, ref_grad in zip(grads, ref_grads):
            scale = max(ref_grad.abs().max().item(), 1.0)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=tol["rtol"], atol=tol["atol"] * scale)
        leaf = flow.detach().requires_grad_()  # the flow alone: the gradient the forward stored
        (grad_flow,) = torch.autograd.grad(-2.0 * fused(_channels_last(moving), fixed_in, leaf), leaf)
        torch.testing.assert_close(grad_flow.double(), -2.0 * ref_grads[2], rtol=tol["rtol"],
                                   atol=tol["atol"] * max(ref_grads[2].abs().max().item(), 1.0))


def test_channels_last_agrees_with_channels_first(gen):
    # The engine's case: 24 channels, a smooth flow of several voxels; float32 differs only by the order
    # of the channel sum.
    moving, fixed, _, weight = _inputs((1, 24, 12, 14, 16), torch.float32, gen)
    flow = torch.nn.functional.interpolate(4 * torch.randn((1, 3, 3, 3, 4), generator=gen), size=(12, 14, 16),
                                           mode="trilinear").requires_grad_()
    first = value_and_grads(lambda u: gradreg_fast.warped_sq_diff(moving, fixed, u, weight, backend="cpu"), [flow])
    last = value_and_grads(lambda u: gradreg_fast.warped_sq_diff(_channels_last(moving), _channels_last(fixed), u,
                                                                 weight, backend="cpu"), [flow])
    torch.testing.assert_close(last[0], first[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(last[1][0], first[1][0], rtol=1e-4, atol=1e-4 * first[1][0].abs().max().item())


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_channels_last_gradcheck(padding_mode, gen):
    moving, fixed, flow, weight = _inputs((2, 9, 3, 4, 5), torch.float64, gen, flow_scale=1.5)
    fn = lambda m, f, u: gradreg_fast.warped_sq_diff(_channels_last(m), f, u, weight, padding_mode,  # noqa: E731
                                                     backend="cpu")
    leaves = [t.detach().requires_grad_() for t in (moving, fixed, flow)]
    assert torch.autograd.gradcheck(fn, leaves)
    leaves = [t.detach().requires_grad_(i == 2) for i, t in enumerate((moving, fixed, flow))]
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_reference_backend_through_the_op(padding_mode, gen):
    _check_against_reference((2, 3, 4, 5, 6), torch.float64, padding_mode, True, gen, backend="reference")


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_gradcheck(padding_mode, gen):
    moving, fixed, flow, weight = _inputs((2, 3, 3, 4, 5), torch.float64, gen, flow_scale=1.5)
    fn = lambda m, f, u: gradreg_fast.warped_sq_diff(m, f, u, weight, padding_mode, backend="cpu")  # noqa: E731
    leaves = [t.detach().requires_grad_() for t in (moving, fixed, flow)]
    assert torch.autograd.gradcheck(fn, leaves)
    # Each input alone (the backward takes a different path when the flow is the only one).
    for k in range(3):
        leaves = [t.detach().requires_grad_(i == k) for i, t in enumerate((moving, fixed, flow))]
        assert torch.autograd.gradcheck(fn, leaves)


def test_torch_func_grad(gen):
    moving, fixed, flow, weight = _inputs((2, 4, 3, 5, 6), torch.float64, gen)
    fused = torch.func.grad(lambda u: gradreg_fast.warped_sq_diff(moving, fixed, u, weight, backend="cpu"))(flow)
    leaf = flow.clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference.warped_sq_diff(moving, fixed, leaf, weight, "border"), leaf)
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_zero_weight_voxels_add_nothing_even_when_not_finite(backend, gen):
    moving, fixed, flow, weight = _inputs((1, 3, 4, 5, 6), torch.float64, gen)
    fixed = fixed.clone()
    outside = (weight == 0).expand_as(fixed)
    assert outside.any()
    fixed[outside] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=fixed.dtype).repeat(
        int(outside.sum()) // 3 + 1)[:int(outside.sum())]
    leaves = [t.detach().clone().requires_grad_() for t in (moving, fixed, flow)]
    value = gradreg_fast.warped_sq_diff(leaves[0], leaves[1], leaves[2], weight, backend=backend)
    grads = torch.autograd.grad(value, leaves)
    clean = [t.detach().clone().requires_grad_() for t in (moving, torch.where(outside, 0.0, fixed), flow)]
    expected = reference.warped_sq_diff(clean[0], clean[1], clean[2], weight, "border")
    expected_grads = torch.autograd.grad(expected, clean)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (grads[2][(weight == 0).expand_as(grads[2])] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_for_every_thread_count(dtype, gen):
    # 8 * 16^3 elements: above the size where the core starts threads.
    moving, fixed, flow, weight = _inputs((1, 8, 16, 16, 16), dtype, gen)
    previous = torch.get_num_threads()
    results = []
    try:
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            m, f = moving.contiguous(memory_format=layout), fixed.contiguous(memory_format=layout)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results.append(value_and_grads(
                    lambda u: gradreg_fast.warped_sq_diff(m, f, u, weight, backend="cpu"), [flow]))
    finally:
        torch.set_num_threads(previous)
    (v1, (g1,)), (v2, (g2,)), (v3, (g3,)), (v4, (g4,)) = results
    assert torch.equal(v1, v2) and torch.equal(g1, g2)
    assert torch.equal(v3, v4) and torch.equal(g3, g4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_cpu_kernel_copies(isa, dtype, gen):
    _check_against_reference((2, 24, 5, 7, 9), dtype, "border", True, gen)
    test_channels_last_matches_reference((2, 24, 5, 7, 9), dtype, "border", True, gen)
    _check_against_reference((1, 5, 3, 1, 17), dtype, "zeros", False, gen)


def test_half_precision_is_computed_in_float32(gen):
    moving, fixed, flow, weight = _inputs((1, 3, 4, 5, 6), torch.float32, gen)
    half = [t.to(torch.bfloat16) for t in (moving, fixed, flow, weight)]
    value = gradreg_fast.warped_sq_diff(*half, backend="cpu")
    expected = reference.warped_sq_diff(*[t.double() for t in half], "border")
    assert value.dtype == torch.bfloat16
    torch.testing.assert_close(value.double(), expected, rtol=1e-2, atol=0)


def test_bad_input(gen):
    moving, fixed, flow, weight = _inputs((1, 3, 4, 5, 6), torch.float64, gen)
    fn = gradreg_fast.warped_sq_diff
    with pytest.raises(ValueError, match="`moving` must have 5 dimensions"):
        fn(moving[0], fixed, flow)
    with pytest.raises(ValueError, match="`flow` must have 3 channel"):
        fn(moving, fixed, flow[:, :2])
    with pytest.raises(TypeError, match="`moving` is torch.float64 but `fixed` is torch.float32"):
        fn(moving, fixed.float(), flow)
    with pytest.raises(TypeError, match="`moving` is torch.float64 but `flow` is torch.float32"):
        fn(moving, fixed, flow.float())
    with pytest.raises(TypeError, match="`fixed` must be a floating-point tensor"):
        fn(moving, fixed.long(), flow)
    with pytest.raises(ValueError, match="`moving` and `fixed` must have the same shapes"):
        fn(moving, fixed[:, :2], flow)
    with pytest.raises(ValueError, match="`moving` and `flow` must have the same batch and spatial shapes"):
        fn(moving, fixed, flow[..., :4])
    with pytest.raises(ValueError, match="`padding_mode` must be one of"):
        fn(moving, fixed, flow, padding_mode="reflection")
    with pytest.raises(ValueError, match="`weight` must have 1 channel"):
        fn(moving, fixed, flow, weight.expand(1, 3, 4, 5, 6))
    with pytest.raises(ValueError, match="`moving` and `weight` must have the same batch and spatial shapes"):
        fn(moving, fixed, flow, weight[..., 1:])
    with pytest.raises(TypeError, match="`moving` is torch.float64 but `weight` is torch.float32"):
        fn(moving, fixed, flow, weight.float())
    for backend in ("cpu", "reference"):
        negative = weight.clone()
        negative[0, 0, 1, 2, 3] = -0.5
        with pytest.raises(ValueError, match="`weight` must be non-negative"):
            fn(moving, fixed, flow, negative, backend=backend)
        negative[0, 0, 1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="`weight` must be non-negative"):
            fn(moving, fixed, flow, negative, backend=backend)
    with pytest.raises(ValueError, match="`weight` is a constant"):
        fn(moving, fixed, flow, weight.clone().requires_grad_())
    with pytest.raises(ValueError, match="`backend` must be one of"):
        fn(moving, fixed, flow, backend="fortran")


def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    moving, fixed, flow, weight = _inputs((2, 5, 4, 5, 6), torch.float64, gen)
    fn = lambda m, f, u: gradreg_fast.warped_sq_diff(m, f, u, weight, backend="cpu") / weight.sum()  # noqa: E731
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    expected, expected_grads = value_and_grads(fn, (moving, fixed, flow))
    value, grads = value_and_grads(compiled, (moving, fixed, flow))
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1


def test_opcheck(gen):
    moving, fixed, flow, weight = _inputs((2, 3, 4, 5, 3), torch.float64, gen)
    torch.library.opcheck(torch.ops.gradreg.warped_sq_diff.default,
                          (moving, fixed, flow.requires_grad_(), weight, "border", True, "cpu"))


def test_flow_gradient_not_stored_by_the_forward_is_recomputed(gen):
    # The op called with need_flow=False (nothing stored) while the flow requires grad: the backward
    # forms the flow gradient through warp's kernels instead.
    moving, fixed, flow, weight = _inputs((2, 3, 4, 5, 6), torch.float64, gen)
    leaf = flow.detach().requires_grad_()
    value, stored = torch.ops.gradreg.warped_sq_diff(moving, fixed, leaf, weight, "zeros", False, "cpu")
    assert stored.numel() == 0
    (grad,) = torch.autograd.grad(2.0 * value, leaf)
    ref_leaf = flow.detach().requires_grad_()
    expected_value = reference.warped_sq_diff(moving, fixed, ref_leaf, weight, "zeros")
    (expected,) = torch.autograd.grad(2.0 * expected_value, ref_leaf)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- the CUDA core (emulated on the CPU, or real)


cuda_core = cuda_core_fixture("warped_sq_diff.cu", ("warped_sq_diff_forward", "warped_sq_diff_workspace_bytes"),
                              "_warped_sq_diff_emulated")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_cuda_core_matches_reference(cuda_core, dtype, padding_mode, gen):
    """The core's entry point against the reference (on the CPU), its outputs and workspace poisoned first."""
    module, device = cuda_core
    stream = torch.cuda.current_stream(device).cuda_stream if device == "cuda" else 0
    # Emulated grids are capped at 3 blocks of 256 threads: 2 x 7 x 9 x 13 voxels make every thread stride.
    for shape, weighted in (((2, 5, 7, 9, 13), True), ((1, 24, 3, 1, 5), False)):
        moving, fixed, flow, weight = _inputs(shape, dtype, gen)
        weight = weight if weighted else None
        on_device = [t.to(device) if t is not None else None for t in (moving, fixed, flow, weight)]
        n, ch, d, h, w = shape
        total = torch.full((), float("nan"), dtype=dtype, device=device)
        grad_flow = torch.full_like(on_device[2], float("nan"))
        nbytes = module.warped_sq_diff_workspace_bytes(n, d, h, w)
        scratch = torch.full((nbytes,), 255, dtype=torch.uint8, device=device)
        for with_grad in (False, True):
            err = module.warped_sq_diff_forward(
                dtype == torch.float64, on_device[0].data_ptr(), on_device[1].data_ptr(), on_device[2].data_ptr(),
                on_device[3].data_ptr() if weight is not None else 0, grad_flow.data_ptr() if with_grad else 0,
                total.data_ptr(), n, ch, d, h, w, ("zeros", "border").index(padding_mode), scratch.data_ptr(),
                nbytes, stream)
            assert err == ""
            leaf = flow.double().requires_grad_()
            ref_weight = weight.double() if weight is not None else None
            expected = reference.warped_sq_diff(moving.double(), fixed.double(), leaf, ref_weight, padding_mode)
            (expected_grad,) = torch.autograd.grad(expected, leaf)
            tol = _tolerances(dtype)
            torch.testing.assert_close(total.cpu().double(), expected.detach(), **tol)
        torch.testing.assert_close(grad_flow.cpu().double(), expected_grad, rtol=tol["rtol"],
                                   atol=tol["atol"] * max(expected_grad.abs().max().item(), 1.0))
    pointers = [t.data_ptr() for t in on_device[:3]]
    err = module.warped_sq_diff_forward(True, *pointers, 0, 0, total.data_ptr(), n, ch, d, h, w, 2,
                                        scratch.data_ptr(), nbytes, stream)
    assert "`padding` must be 0 (zeros) or 1 (border)" in err
    err = module.warped_sq_diff_forward(True, *pointers, 0, 0, total.data_ptr(), n, ch, d, h, w, 1,
                                        scratch.data_ptr(), 8, stream)
    assert "the workspace has 8 bytes" in err


# ---------------------------------------------------------------- Triton, interpreted on the CPU


def _triton_interpreted_check():
    """Run by the subprocess below, with TRITON_INTERPRET=1 set before triton is imported (it must be on
    when the kernels are defined; set in the pytest process it would leak into later tests)."""
    gen = torch.Generator().manual_seed(20261130)
    for shape, dtype in (((2, 5, 5, 6, 7), torch.float64), ((1, 24, 3, 1, 5), torch.float32),
                         ((2, 1, 1, 9, 4), torch.float64)):
        for padding_mode in ("zeros", "border"):
            for weighted in (True, False):
                _check_against_reference(shape, dtype, padding_mode, weighted, gen, noncontiguous=True,
                                         backend="triton")


@pytest.mark.slow
def test_triton_interpreted_matches_reference():
    from conftest import run_under_triton_interpreter

    proc = run_under_triton_interpreter(__file__, "triton")
    assert "triton check passed" in proc.stdout


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_gpu_matches_reference(backend, padding_mode, gen):
    for shape, dtype in (((2, 24, 7, 9, 13), torch.float32), ((1, 5, 4, 1, 6), torch.float64)):
        moving, fixed, flow, weight = (t.cuda() for t in _inputs(shape, dtype, gen))
        def fused(m, f, u):
            return gradreg_fast.warped_sq_diff(m, f, u, weight, padding_mode, backend=backend)

        value, grads = value_and_grads(fused, [moving, fixed, flow])
        ref = lambda m, f, u: reference.warped_sq_diff(m, f, u, weight.double(), padding_mode)  # noqa: E731
        ref_value, ref_grads = value_and_grads(ref, [t.double() for t in (moving, fixed, flow)])
        tol = _tolerances(dtype)
        torch.testing.assert_close(value.double(), ref_value, **tol)
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad.double(), ref_grad, rtol=tol["rtol"],
                                       atol=tol["atol"] * max(ref_grad.abs().max().item(), 1.0))
        again = gradreg_fast.warped_sq_diff(moving, fixed, flow, weight, padding_mode, backend=backend)
        assert torch.equal(again, value)


if __name__ == "__main__" and sys.argv[1:] == ["triton"]:
    _triton_interpreted_check()
    print("triton check passed")


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_non_finite_flow_samples_nothing(padding_mode, layout, gen):
    # As warp: a non-finite sample point reads 0 and passes no flow gradient; the rest is unchanged.
    moving, fixed, flow, weight = _inputs((1, 4, 3, 5, 6), torch.float64, gen)
    moving = moving.contiguous(memory_format=layout)
    flow = flow.clone()
    flow[0, 0, 1, 2, 3], flow[0, 1, 2, 4, 0], flow[0, 2, 0, 0, 5] = float("nan"), float("inf"), -float("inf")
    weight = torch.ones_like(weight)
    value, (grad,) = value_and_grads(
        lambda u: gradreg_fast.warped_sq_diff(moving, fixed, u, weight, padding_mode, backend="cpu"), [flow])
    expected, (expected_grad,) = value_and_grads(
        lambda u: reference.warped_sq_diff(moving, fixed, u, weight, padding_mode), [flow])
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)
