"""warp: the fused CPU core against the reference and grid_sample, gradients, determinism, bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_volume, non_contiguous_grad_output, value_and_grads

import gradreg_fast
from gradreg_fast import reference

MODES = ["bilinear", "nearest"]
PADDINGS = ["zeros", "border"]

SHAPES = [
    (2, 3, 5, 4, 7),  # batch and channels, odd sizes
    (1, 2, 1, 5, 3),  # D = 1
    (2, 1, 4, 1, 3),  # H = 1
    (1, 2, 3, 5, 1),  # W = 1
]


def _inputs(shape, dtype, noncontiguous, gen, flow_scale):
    image = make_volume(shape, dtype, noncontiguous, gen)
    # Up to ~flow_scale voxels in each direction: with the sizes above, many samples leave the volume.
    flow = make_volume((shape[0], 3, *shape[2:]), dtype, noncontiguous, gen, scale=flow_scale)
    return image, flow


def _grid_sample_warp(image, flow, mode, padding_mode):
    """warp's documented equivalent: grid_sample(align_corners=True) on identity + normalised flow."""
    spatial = image.shape[2:]
    base = torch.meshgrid(*(torch.arange(s, dtype=flow.dtype) for s in spatial), indexing="ij")
    normalised = [2 * (base[k] + flow[:, k]) / (spatial[k] - 1) - 1 for k in range(3)]  # D, H, W order
    grid = torch.stack(normalised[::-1], dim=-1)  # grid_sample wants (x, y, z) = (W, H, D)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_cpu_matches_reference(shape, dtype, noncontiguous, mode, padding_mode, gen):
    image, flow = _inputs(shape, dtype, noncontiguous, gen, flow_scale=2.5)
    grad_out = make_volume(shape, dtype, False, gen)
    fused = lambda i, f: gradreg_fast.warp(i, f, mode, padding_mode, backend="cpu")  # noqa: E731
    ref = lambda i, f: reference.warp(i, f, mode, padding_mode)  # noqa: E731
    out, (grad_image, grad_flow) = value_and_grads(fused, [image, flow], grad_out)
    ref_out, (ref_grad_image, ref_grad_flow) = value_and_grads(ref, [image, flow], grad_out)
    assert out.dtype == dtype and out.shape == shape
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad_image, ref_grad_image)
    torch.testing.assert_close(grad_flow, ref_grad_flow)  # zero for nearest


@pytest.mark.parametrize("grad_layout", ["expanded", "strided"])
@pytest.mark.parametrize("mode", MODES)
def test_backward_with_a_non_contiguous_grad_output(grad_layout, mode, gen):
    shape = (2, 3, 5, 4, 6)
    image, flow = _inputs(shape, torch.float64, False, gen, flow_scale=2.5)
    grad_out = non_contiguous_grad_output(shape, grad_layout, gen)
    _, grads = value_and_grads(lambda i, f: gradreg_fast.warp(i, f, mode, backend="cpu"), [image, flow], grad_out)
    _, ref_grads = value_and_grads(lambda i, f: reference.warp(i, f, mode), [image, flow], grad_out.contiguous())
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)


def test_samples_leave_the_volume(gen):
    # Guards the test above: its flows really do sample outside, where the padding modes differ.
    shape = SHAPES[0]
    image, flow = _inputs(shape, torch.float64, False, gen, flow_scale=2.5)
    zeros = gradreg_fast.warp(image, flow, padding_mode="zeros", backend="cpu")
    border = gradreg_fast.warp(image, flow, padding_mode="border", backend="cpu")
    assert (zeros - border).abs().amax() > 0.1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_matches_grid_sample(mode, padding_mode, gen):
    shape = (2, 3, 5, 6, 7)
    image, flow = _inputs(shape, torch.float64, True, gen, flow_scale=2.5)
    grad_out = make_volume(shape, torch.float64, False, gen)
    out, (grad_image, grad_flow) = value_and_grads(
        lambda i, f: gradreg_fast.warp(i, f, mode, padding_mode, backend="cpu"), [image, flow], grad_out
    )
    expected, (expected_grad_image, expected_grad_flow) = value_and_grads(
        lambda i, f: _grid_sample_warp(i, f, mode, padding_mode), [image, flow], grad_out
    )
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_image, expected_grad_image)
    if mode == "bilinear":  # grid_sample's nearest has no flow gradient either, but returns zeros
        torch.testing.assert_close(grad_flow, expected_grad_flow)
    else:
        assert torch.equal(grad_flow, torch.zeros_like(grad_flow))


def test_identity_and_integer_shift(gen):
    image = make_volume((1, 2, 4, 5, 6), generator=gen)
    zero = torch.zeros(1, 3, 4, 5, 6, dtype=torch.float64)
    for mode in MODES:
        assert torch.equal(gradreg_fast.warp(image, zero, mode, backend="cpu"), image)
    # Channel 2 moves along W: output x samples x + 1; the last column reads outside (zeros).
    shift = zero.clone()
    shift[:, 2] = 1.0
    out = gradreg_fast.warp(image, shift, backend="cpu")
    torch.testing.assert_close(out[..., :-1], image[..., 1:])
    assert torch.equal(out[..., -1], torch.zeros_like(out[..., -1]))


@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_far_outside_and_non_finite_flow(padding_mode, gen):
    image = make_volume((1, 2, 3, 4, 5), generator=gen)
    flow = torch.full((1, 3, 3, 4, 5), 1e12, dtype=torch.float64)
    flow[0, :, 1, 2, 3] = float("nan")
    flow[0, 1, 0, 0, 0] = float("-inf")
    flow.requires_grad_()
    out = gradreg_fast.warp(image, flow, padding_mode=padding_mode, backend="cpu")
    # Non-finite sample points give 0 in both modes.
    assert torch.equal(out[0, :, 1, 2, 3], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(out[0, :, 0, 0, 0], torch.zeros(2, dtype=torch.float64))
    rest = torch.ones(3, 4, 5, dtype=torch.bool)
    rest[1, 2, 3] = rest[0, 0, 0] = False
    if padding_mode == "zeros":
        expected = torch.zeros_like(out[0, :, rest])
    else:  # clipped to the far corner
        expected = image[0, :, -1:, -1:, -1:].reshape(2, 1).expand(-1, int(rest.sum()))
    assert torch.equal(out[0, :, rest], expected)
    out.sum().backward()
    assert torch.isfinite(flow.grad).all()
    assert torch.equal(flow.grad, torch.zeros_like(flow.grad))  # clipped or outside everywhere


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_non_finite_sample_points_give_zero_and_pass_no_gradient(backend, mode, padding_mode, gen):
    image = make_volume((2, 2, 3, 4, 5), generator=gen).requires_grad_()
    flow = make_volume((2, 3, 3, 4, 5), generator=gen, scale=2.0).detach()
    bad = ((0, 0, (1, 2, 3), float("nan")), (0, 1, (0, 0, 0), float("inf")), (1, 2, (2, 3, 4), float("-inf")))
    for n, k, point, value in bad:
        flow[(n, k) + point] = value
    flow.requires_grad_(mode == "bilinear")
    out = gradreg_fast.warp(image, flow, mode, padding_mode, backend=backend)
    for n, _, point, _ in bad:
        assert torch.equal(out[(n, slice(None)) + point], torch.zeros(2, dtype=torch.float64))
    out.sum().backward()
    if padding_mode == "border":  # every finite point samples inside: it passes a total weight of 1 to the image
        finite = torch.tensor([3 * 4 * 5 - 2, 3 * 4 * 5 - 1], dtype=torch.float64)
        torch.testing.assert_close(image.grad.sum((2, 3, 4)), finite.view(2, 1).expand(2, 2))
    if mode == "bilinear":
        assert torch.isfinite(flow.grad).all()
        for n, k, point, _ in bad:
            assert torch.equal(flow.grad[(n, slice(None)) + point], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_gradcheck(mode, padding_mode, gen):
    # Random sample points avoid the (measure-zero) kinks at integer coordinates and at the border.
    image, flow = _inputs((1, 2, 5, 4, 6), torch.float64, True, gen, flow_scale=2.0)
    image.requires_grad_()
    flow.requires_grad_(mode == "bilinear")  # nearest is piecewise constant in the flow: no gradient
    fn = lambda i, f: gradreg_fast.warp(i, f, mode, padding_mode, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (image, flow))


def test_nearest_gives_no_flow_gradient(gen):
    image, flow = _inputs((1, 1, 3, 4, 5), torch.float64, False, gen, flow_scale=1.0)
    flow.requires_grad_()
    image.requires_grad_()
    gradreg_fast.warp(image, flow, "nearest", backend="cpu").sum().backward()
    assert flow.grad is None
    assert image.grad is not None


def test_gradient_only_where_needed(gen):
    image, flow = _inputs((1, 2, 3, 4, 5), torch.float64, False, gen, flow_scale=1.0)
    flow.requires_grad_()
    gradreg_fast.warp(image, flow, backend="cpu").sum().backward()
    assert image.grad is None and flow.grad is not None
    expected = value_and_grads(lambda f: reference.warp(image, f).sum(), [flow])[1][0]
    torch.testing.assert_close(flow.grad, expected)


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_is_bit_identical_across_runs(deterministic, four_threads, gen):
    # The CPU backward is documented deterministic for either flag; many voxels scatter into the same
    # corners from different threads here (strong contraction of a small volume).
    image, flow = _inputs((2, 3, 9, 8, 7), torch.float32, False, gen, flow_scale=3.0)
    grad_out = make_volume(image.shape, torch.float32, False, gen)
    fn = lambda i, f: gradreg_fast.warp(i, f, deterministic=deterministic, backend="cpu")  # noqa: E731
    _, (first_image, first_flow) = value_and_grads(fn, [image, flow], grad_out)
    for _ in range(4):
        _, (grad_image, grad_flow) = value_and_grads(fn, [image, flow], grad_out)
        assert torch.equal(grad_image, first_image)
        assert torch.equal(grad_flow, first_flow)


def test_thread_count_does_not_change_the_result(gen):
    image, flow = _inputs((2, 3, 9, 8, 7), torch.float64, False, gen, flow_scale=3.0)
    grad_out = make_volume(image.shape, torch.float64, False, gen)
    fn = lambda i, f: gradreg_fast.warp(i, f, backend="cpu")  # noqa: E731
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            results.append(value_and_grads(fn, [image, flow], grad_out))
    finally:
        torch.set_num_threads(before)
    (out1, grads1), (out3, grads3) = results
    assert torch.equal(out1, out3)
    for a, b in zip(grads1, grads3):
        torch.testing.assert_close(a, b)


def _threads_run(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_is_bit_identical_for_1_2_and_8_threads(padding_mode, dtype, gen):
    # Large enough (> 32768 elements) for the core to use every thread it is given; flows that send many
    # samples into the same corners from far apart planes, and some outside the volume.
    shape = (2, 2, 21, 17, 23)
    image = make_volume(shape, dtype, False, gen)
    base = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=dtype) for s in shape[2:]), indexing="ij"))
    flow = (-0.6 * base + 3.0 * make_volume((2, 3, *shape[2:]), dtype, False, gen)).contiguous()
    grad_out = make_volume(shape, dtype, False, gen)
    fn = lambda i, f: gradreg_fast.warp(i, f, padding_mode=padding_mode, backend="cpu")  # noqa: E731
    results = [_threads_run(t, lambda: value_and_grads(fn, [image, flow], grad_out)) for t in (1, 2, 8)]
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        for a, b in zip(grads, results[0][1]):
            assert torch.equal(a, b)
    expected = value_and_grads(lambda i, f: reference.warp(i, f, padding_mode=padding_mode), [image, flow], grad_out)
    for a, b in zip(results[0][1], expected[1]):
        torch.testing.assert_close(a, b)


_PEAK_RSS_SCRIPT = """
import resource, sys, torch, gradreg_fast
torch.set_num_threads(int(sys.argv[1]))
shape = (1, 4, 48, 48, 48)
image = torch.rand(shape, dtype=torch.float64, requires_grad=True)
flow = (2 * torch.rand(1, 3, *shape[2:], dtype=torch.float64) - 1).requires_grad_()
grad_out = torch.rand(shape, dtype=torch.float64)
small = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
gradreg_fast.warp(small, torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64), backend="cpu").sum().backward()  # start-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gradreg_fast.warp(image, flow, backend="cpu").backward(grad_out)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_backward_scratch_does_not_grow_with_the_thread_count():
    # The image gradient used to be scattered into one private copy of the image per extra thread
    # (63 copies at 64 threads). Growth of the peak RSS over one forward and backward, in KiB, at 1 and
    # 16 threads: the difference must stay far below one image (1 x 4 x 48^3 float64 = 3456 KiB).
    import subprocess
    import sys

    growth = []
    for threads in (1, 16):
        proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(threads)], capture_output=True, text=True,
                              timeout=300, env={**__import__("os").environ, "MALLOC_ARENA_MAX": "2"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        growth.append(int(proc.stdout.split()[-1]))
    image_kib = 4 * 48**3 * 8 // 1024
    assert growth[1] - growth[0] < image_kib // 4, growth


def test_does_not_modify_inputs(gen):
    image, flow = _inputs((1, 2, 4, 5, 3), torch.float32, True, gen, flow_scale=2.0)
    before = image.clone(), flow.clone()
    gradreg_fast.warp(image, flow, backend="cpu")
    assert torch.equal(image, before[0]) and torch.equal(flow, before[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_is_computed_in_float32(dtype, mode, gen):
    image, flow = _inputs((1, 2, 5, 4, 3), dtype, False, gen, flow_scale=1.5)
    out = gradreg_fast.warp(image, flow, mode, backend="cpu")
    assert out.dtype == dtype
    assert torch.equal(out, gradreg_fast.warp(image.float(), flow.float(), mode, backend="cpu").to(dtype))
    image.requires_grad_()
    flow.requires_grad_()
    out = gradreg_fast.warp(image, flow, mode, backend="cpu")
    out.backward(torch.ones_like(out))
    assert image.grad.dtype == dtype
    grad32 = value_and_grads(lambda i: gradreg_fast.warp(i, flow.detach().float(), mode, backend="cpu"),
                             [image.detach().float()], torch.ones(out.shape))[1][0]
    torch.testing.assert_close(image.grad, grad32.to(dtype))


class TestBadInput:
    image = torch.ones(1, 2, 3, 4, 5)
    flow = torch.zeros(1, 3, 3, 4, 5)

    def test_wrong_rank(self):
        with pytest.raises(ValueError, match="`image` must have 5 dimensions"):
            gradreg_fast.warp(self.image[0], self.flow)
        with pytest.raises(ValueError, match="`flow` must have 5 dimensions"):
            gradreg_fast.warp(self.image, self.flow[0])

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="`image` must be a floating-point tensor"):
            gradreg_fast.warp(self.image.long(), self.flow)
        with pytest.raises(TypeError, match="`flow` must be a floating-point tensor"):
            gradreg_fast.warp(self.image, self.flow.int())

    def test_different_dtypes(self):
        with pytest.raises(TypeError, match="`image` is torch.float32 but `flow` is torch.float64"):
            gradreg_fast.warp(self.image, self.flow.double())

    def test_different_devices(self):
        # 'meta' stands in for a second device on a machine without a GPU.
        with pytest.raises(ValueError, match="`image` is on cpu but `flow` is on meta"):
            gradreg_fast.warp(self.image, self.flow.to("meta"))

    def test_empty(self):
        with pytest.raises(ValueError, match="`image` must not be empty"):
            gradreg_fast.warp(self.image[:, :0], self.flow)
        with pytest.raises(ValueError, match="`image` must not be empty"):
            gradreg_fast.warp(self.image[:, :, :0], self.flow[:, :, :0])

    @pytest.mark.parametrize("channels", [1, 2, 4])
    def test_flow_channels(self, channels):
        with pytest.raises(ValueError, match="`flow` must have 3 channel"):
            gradreg_fast.warp(self.image, torch.zeros(1, channels, 3, 4, 5))

    @pytest.mark.parametrize("flow_shape", [(2, 3, 3, 4, 5), (1, 3, 4, 4, 5), (1, 3, 3, 4, 6)])
    def test_batch_or_spatial_mismatch(self, flow_shape):
        with pytest.raises(ValueError, match="`image` and `flow` must have the same batch and spatial shapes"):
            gradreg_fast.warp(self.image, torch.zeros(flow_shape))

    def test_bad_mode(self):
        with pytest.raises(ValueError, match="`mode` must be one of"):
            gradreg_fast.warp(self.image, self.flow, mode="bicubic")

    def test_bad_padding(self):
        with pytest.raises(ValueError, match="`padding_mode` must be one of"):
            gradreg_fast.warp(self.image, self.flow, padding_mode="reflection")

    def test_bad_backend(self):
        with pytest.raises(ValueError, match="`backend` must be one of"):
            gradreg_fast.warp(self.image, self.flow, backend="openmp")
