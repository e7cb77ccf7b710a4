"""gradient_magnitude: the fused CPU core against the reference, gradients, dtypes and bad input."""

import pytest
import torch
from conftest import make_volume, non_contiguous_grad_output, value_and_grads

import gradreg_fast
from gradreg_fast import reference

SHAPES = [
    (2, 3, 5, 4, 7),  # batch and channels, odd sizes
    (1, 2, 1, 5, 3),  # D = 1
    (1, 2, 4, 1, 3),  # H = 1
    (2, 1, 3, 5, 1),  # W = 1
    (1, 1, 2, 2, 2),  # every axis is only edges
]


def _close(actual, expected):
    # Defaults of assert_close: tight for float64, a few ulps for float32.
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_cpu_matches_reference(shape, dtype, noncontiguous, gen):
    vol = make_volume(shape, dtype, noncontiguous, gen)
    grad_out = make_volume(shape, dtype, False, gen)
    out, (grad,) = value_and_grads(lambda v: gradreg_fast.gradient_magnitude(v, backend="cpu"), [vol], grad_out)
    ref_out, (ref_grad,) = value_and_grads(reference.gradient_magnitude, [vol], grad_out)
    assert out.dtype == dtype and out.shape == shape
    _close(out, ref_out)
    _close(grad, ref_grad)


@pytest.mark.parametrize("grad_layout", ["expanded", "strided"])
def test_backward_with_a_non_contiguous_grad_output(grad_layout, gen):
    shape = (2, 3, 5, 4, 6)
    vol = make_volume(shape, torch.float64, False, gen)
    grad_out = non_contiguous_grad_output(shape, grad_layout, gen)
    _, (grad,) = value_and_grads(lambda v: gradreg_fast.gradient_magnitude(v, backend="cpu"), [vol], grad_out)
    _, (ref_grad,) = value_and_grads(reference.gradient_magnitude, [vol], grad_out.contiguous())
    torch.testing.assert_close(grad, ref_grad)


def test_backend_reference_is_the_reference(gen):
    vol = make_volume((1, 2, 3, 4, 5), generator=gen)
    assert torch.equal(gradreg_fast.gradient_magnitude(vol, 0.5, backend="reference"),
                       reference.gradient_magnitude(vol, 0.5))


def test_definition_on_a_linear_ramp():
    # V = 2z + 3y - x: every interior central difference (no /2) is (4, 6, -2); at an edge the voxel is
    # its own missing neighbour, so the difference halves. Independent of the reference.
    d, h, w = 4, 5, 6
    z, y, x = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in (d, h, w)), indexing="ij")
    vol = (2 * z + 3 * y - x)[None, None]
    eps = 0.25
    gz = torch.full((d, h, w), 4.0, dtype=torch.float64)
    gy = torch.full((d, h, w), 6.0, dtype=torch.float64)
    gx = torch.full((d, h, w), -2.0, dtype=torch.float64)
    gz[[0, -1]] /= 2
    gy[:, [0, -1]] /= 2
    gx[:, :, [0, -1]] /= 2
    expected = torch.sqrt(gz**2 + gy**2 + gx**2 + eps)[None, None]
    torch.testing.assert_close(gradreg_fast.gradient_magnitude(vol, eps, backend="cpu"), expected)


def test_axis_of_size_one_contributes_nothing(gen):
    vol = make_volume((1, 1, 1, 1, 6), generator=gen)
    eps = 1e-3
    diff = torch.empty_like(vol)
    diff[..., 1:-1] = vol[..., 2:] - vol[..., :-2]
    diff[..., 0] = vol[..., 1] - vol[..., 0]
    diff[..., -1] = vol[..., -1] - vol[..., -2]
    torch.testing.assert_close(gradreg_fast.gradient_magnitude(vol, eps, backend="cpu"), torch.sqrt(diff**2 + eps))


@pytest.mark.parametrize("shape", [(1, 2, 5, 4, 6), (2, 1, 1, 3, 4)])
def test_gradcheck(shape, gen):
    vol = make_volume(shape, torch.float64, True, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: gradreg_fast.gradient_magnitude(v, backend="cpu"), (vol,))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_eps_zero_on_flat_volume_has_zero_gradient(backend):
    # With eps = 0 a flat region has G = 0, where sqrt has no derivative: the documented subgradient is 0.
    vol = torch.ones(1, 1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    out = gradreg_fast.gradient_magnitude(vol, eps=0.0, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(vol.grad, torch.zeros_like(vol))


def test_eps_zero_backends_agree_where_flat_meets_texture(gen):
    vol = make_volume((2, 1, 5, 6, 7), generator=gen)
    vol[:, :, :3] = 0.5  # flat: G = 0 inside, > 0 where it meets the random half
    grad_output = make_volume((2, 1, 5, 6, 7), generator=gen)
    values = {}
    for backend in ("cpu", "reference"):
        x = vol.clone().requires_grad_()
        out = gradreg_fast.gradient_magnitude(x, eps=0.0, backend=backend)
        out.backward(grad_output)
        values[backend] = out.detach(), x.grad
    assert (values["reference"][0] == 0).any()
    for got, want in zip(values["cpu"], values["reference"]):
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want)


def test_does_not_modify_input(gen):
    vol = make_volume((1, 2, 4, 5, 3), torch.float32, True, gen)
    before = vol.clone()
    gradreg_fast.gradient_magnitude(vol, backend="cpu")
    assert torch.equal(vol, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype, gen):
    vol = make_volume((1, 2, 5, 4, 3), dtype, False, gen).requires_grad_()
    out = gradreg_fast.gradient_magnitude(vol, backend="cpu")
    assert out.dtype == dtype
    vol32 = vol.detach().float().requires_grad_()
    out32 = gradreg_fast.gradient_magnitude(vol32, backend="cpu")
    assert torch.equal(out, out32.to(dtype))
    grad_out = make_volume(out.shape, torch.float32, False, gen)
    out.backward(grad_out.to(dtype))
    out32.backward(grad_out.to(dtype).float())
    assert vol.grad.dtype == dtype
    torch.testing.assert_close(vol.grad, vol32.grad.to(dtype))


class TestBadInput:
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="`vol` must be a torch.Tensor"):
            gradreg_fast.gradient_magnitude([[1.0]])

    @pytest.mark.parametrize("shape", [(4, 5, 6), (1, 1, 1, 4, 5, 6)])
    def test_wrong_rank(self, shape):
        with pytest.raises(ValueError, match="`vol` must have 5 dimensions"):
            gradreg_fast.gradient_magnitude(torch.ones(shape))

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64]
                             + [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)])
    def test_non_floating_dtype(self, dtype):  # float8: a float the kernels do not take (would be read as float32)
        with pytest.raises(TypeError, match="`vol` must be a floating-point tensor"):
            gradreg_fast.gradient_magnitude(torch.ones(1, 1, 2, 2, 2, dtype=dtype))

    @pytest.mark.parametrize("shape", [(0, 1, 2, 2, 2), (1, 0, 2, 2, 2), (1, 1, 2, 0, 2)])
    def test_empty(self, shape):
        with pytest.raises(ValueError, match="`vol` must not be empty"):
            gradreg_fast.gradient_magnitude(torch.ones(shape))

    @pytest.mark.parametrize("eps", [-1e-6, float("nan"), float("inf"), None, "1", True])
    def test_bad_eps(self, eps):
        with pytest.raises(ValueError, match="`eps` must be a finite number >= 0"):
            gradreg_fast.gradient_magnitude(torch.ones(1, 1, 2, 2, 2), eps=eps)

    @pytest.mark.parametrize("backend", ["gpu", "CPU", ""])
    def test_bad_backend(self, backend):
        with pytest.raises(ValueError, match="`backend` must be one of"):
            gradreg_fast.gradient_magnitude(torch.ones(1, 1, 2, 2, 2), backend=backend)
