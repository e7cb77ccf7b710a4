"""mind_loss and MINDLoss: the fused loss against the reference, reductions, gradients to either
image, dtypes and bad input."""

import numpy as np
import pytest
import torch
from conftest import make_volume, value_and_grads

import gradreg_fast
from gradreg_fast import reference

CHANNELS = {"ssc": 12, "mind": 6}
SHAPES = [(2, 1, 5, 4, 7), (1, 1, 1, 5, 6), (2, 1, 4, 1, 5), (1, 1, 3, 5, 1)]


def _pair(shape, dtype, noncontiguous, gen):
    return make_volume(shape, dtype, noncontiguous, gen), make_volume(shape, dtype, noncontiguous, gen)


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matches_reference(descriptor, penalty, reduction, shape, dtype, gen):
    # `fixed` needs no gradient and the reduction is a scalar: the fused op runs.
    warped, fixed = _pair(shape, dtype, dtype == torch.float64, gen)
    kwargs = dict(descriptor=descriptor, penalty=penalty, reduction=reduction)
    loss, (grad,) = value_and_grads(lambda w: gradreg_fast.mind_loss(w, fixed, backend="cpu", **kwargs), [warped])
    ref_loss, (ref_grad,) = value_and_grads(lambda w: reference.mind_loss(w, fixed, **kwargs), [warped])
    assert loss.shape == () and loss.dtype == dtype
    tight = dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10 if tight else 1e-5, atol=0 if tight else 1e-6)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8 if tight else 1e-4, atol=(1e-10 if tight else 1e-4) * scale)


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("per_item", [False, True])
@pytest.mark.parametrize("radius, dilation", [(None, None), (1, 2), (0, 1)])
def test_options_reach_the_descriptor(descriptor, per_item, radius, dilation, gen):
    # Items of very different scales, so that per_item changes the result.
    warped = torch.cat([make_volume((1, 1, 5, 6, 4), generator=gen), make_volume((1, 1, 5, 6, 4), generator=gen) * 300])
    fixed = torch.cat([make_volume((1, 1, 5, 6, 4), generator=gen), make_volume((1, 1, 5, 6, 4), generator=gen) * 300])
    kwargs = dict(descriptor=descriptor, radius=radius, dilation=dilation, per_item=per_item)
    loss, (grad,) = value_and_grads(lambda w: gradreg_fast.mind_loss(w, fixed, backend="cpu", **kwargs), [warped])
    ref_loss, (ref_grad,) = value_and_grads(lambda w: reference.mind_loss(w, fixed, **kwargs), [warped])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10 * ref_grad.abs().max().item())


def test_defaults_are_mind_ssc_l1_mean(gen):
    warped, fixed = _pair((2, 1, 5, 4, 6), torch.float64, False, gen)
    expected = (gradreg_fast.mind_ssc(warped, 2, 2) - gradreg_fast.mind_ssc(fixed, 2, 2)).abs().mean()
    torch.testing.assert_close(gradreg_fast.mind_loss(warped, fixed, backend="cpu"), expected, rtol=1e-12, atol=0)
    expected = (gradreg_fast.mind(warped, 1, 1) - gradreg_fast.mind(fixed, 1, 1)).square().sum()
    torch.testing.assert_close(gradreg_fast.mind_loss(warped, fixed, "mind", "l2", reduction="sum", backend="cpu"),
                               expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_reductions_agree(descriptor, penalty, gen):
    warped, fixed = _pair((2, 1, 5, 4, 3), torch.float64, True, gen)
    kwargs = dict(descriptor=descriptor, penalty=penalty, backend="cpu")
    per_element = gradreg_fast.mind_loss(warped, fixed, reduction="none", **kwargs)
    assert per_element.shape == (2, CHANNELS[descriptor], 5, 4, 3)
    torch.testing.assert_close(per_element, reference.mind_loss(warped, fixed, descriptor, penalty, reduction="none"),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradreg_fast.mind_loss(warped, fixed, reduction="mean", **kwargs), per_element.mean(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(gradreg_fast.mind_loss(warped, fixed, reduction="sum", **kwargs), per_element.sum(),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_fused(descriptor, penalty, reduction, gen):
    warped, fixed = _pair((1, 1, 5, 4, 6), torch.float64, False, gen)
    warped.requires_grad_()

    def loss(w):
        return gradreg_fast.mind_loss(w, fixed, descriptor, penalty, reduction=reduction, backend="cpu")

    assert torch.autograd.gradcheck(loss, (warped,))


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_both_inputs(descriptor, penalty, reduction, gen):
    # `fixed` requires grad (or the reduction is "none"): the composed path, differentiable in both.
    warped, fixed = _pair((1, 1, 4, 3, 5), torch.float64, True, gen)
    warped.requires_grad_()
    fixed.requires_grad_()

    def loss(w, f):
        return gradreg_fast.mind_loss(w, f, descriptor, penalty, reduction=reduction, backend="cpu")

    assert torch.autograd.gradcheck(loss, (warped, fixed))


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
def test_fixed_gradient_matches_reference(descriptor, gen):
    warped, fixed = _pair((2, 1, 5, 4, 3), torch.float64, False, gen)
    fn = lambda w, f: gradreg_fast.mind_loss(w, f, descriptor, backend="cpu")  # noqa: E731
    ref = lambda w, f: reference.mind_loss(w, f, descriptor)  # noqa: E731
    loss, grads = value_and_grads(fn, [warped, fixed])
    ref_loss, ref_grads = value_and_grads(ref, [warped, fixed])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10 * ref_grad.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_gradient_to_fixed_when_it_does_not_require_it(reduction, gen):
    warped, fixed = _pair((1, 1, 4, 5, 3), torch.float64, False, gen)
    warped.requires_grad_()
    loss = gradreg_fast.mind_loss(warped, fixed, reduction=reduction, backend="cpu")
    loss.sum().backward()
    assert fixed.grad is None and not fixed.requires_grad
    assert warped.grad is not None and warped.grad.abs().sum() > 0


def test_fused_and_composed_paths_agree(gen):
    warped, fixed = _pair((2, 1, 5, 4, 6), torch.float64, False, gen)
    fused, (fused_grad,) = value_and_grads(lambda w: gradreg_fast.mind_loss(w, fixed, backend="cpu"), [warped])
    composed, (composed_grad, _) = value_and_grads(lambda w, f: gradreg_fast.mind_loss(w, f, backend="cpu"),
                                                   [warped, fixed])
    torch.testing.assert_close(fused, composed, rtol=1e-12, atol=0)
    torch.testing.assert_close(fused_grad, composed_grad, rtol=1e-10, atol=1e-14)


def test_identical_images_give_zero_loss(gen):
    vol = make_volume((1, 1, 5, 4, 6), generator=gen)
    for penalty in ("l1", "l2"):
        assert gradreg_fast.mind_loss(vol, vol.clone(), penalty=penalty, backend="cpu").item() == 0.0


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_functional(descriptor, reduction, gen):
    warped, fixed = _pair((2, 1, 4, 5, 3), torch.float32, False, gen)
    module = gradreg_fast.MINDLoss(descriptor, "l2", radius=1, dilation=2, reduction=reduction, per_item=True,
                                   backend="cpu")
    assert isinstance(module, torch.nn.Module) and "descriptor=" in repr(module)
    expected = gradreg_fast.mind_loss(warped, fixed, descriptor, "l2", 1, 2, reduction, True, "cpu")
    assert torch.equal(module(warped, fixed), expected)


def test_module_default_is_the_functional_default(gen):
    warped, fixed = _pair((1, 1, 4, 5, 3), torch.float64, False, gen)
    assert torch.equal(gradreg_fast.MINDLoss()(warped, fixed), gradreg_fast.mind_loss(warped, fixed))


def test_does_not_modify_inputs(gen):
    warped, fixed = _pair((1, 1, 4, 5, 3), torch.float32, True, gen)
    before = warped.clone(), fixed.clone()
    gradreg_fast.mind_loss(warped.requires_grad_(), fixed, backend="cpu").backward()
    assert torch.equal(warped.detach(), before[0]) and torch.equal(fixed, before[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype, gen):
    warped, fixed = _pair((1, 1, 5, 4, 6), dtype, False, gen)
    warped.requires_grad_()
    loss = gradreg_fast.mind_loss(warped, fixed, backend="cpu")
    assert loss.dtype == dtype
    loss32, (grad32,) = value_and_grads(lambda w: gradreg_fast.mind_loss(w, fixed.float(), backend="cpu"),
                                        [warped.detach().float()])
    torch.testing.assert_close(loss, loss32.to(dtype))
    loss.backward()
    assert warped.grad.dtype == dtype
    torch.testing.assert_close(warped.grad, grad32.to(dtype))


class TestBadInput:
    vol = torch.ones(1, 1, 4, 5, 6)

    def test_wrong_rank(self):
        with pytest.raises(ValueError, match="`warped` must have 5 dimensions"):
            gradreg_fast.mind_loss(self.vol[0], self.vol)
        with pytest.raises(ValueError, match="`fixed` must have 5 dimensions"):
            gradreg_fast.mind_loss(self.vol, self.vol[0])

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="`fixed` must be a floating-point tensor"):
            gradreg_fast.mind_loss(self.vol, self.vol.long())


    def test_different_devices(self):
        with pytest.raises(ValueError, match="`warped` is on cpu but `fixed` is on meta"):
            gradreg_fast.mind_loss(self.vol, self.vol.to("meta"))

    def test_empty(self):
        with pytest.raises(ValueError, match="`warped` must not be empty"):
            gradreg_fast.mind_loss(self.vol[..., :0], self.vol[..., :0])

    def test_more_than_one_channel(self):
        with pytest.raises(ValueError, match="`warped` must have 1 channel"):
            gradreg_fast.mind_loss(torch.ones(1, 2, 4, 5, 6), torch.ones(1, 2, 4, 5, 6))

    @pytest.mark.parametrize("shape, other_shape", [((1, 1, 4, 5, 6), (1, 1, 4, 5, 7)),
                                                    ((2, 1, 4, 5, 6), (3, 1, 4, 5, 6)),
                                                    ((2, 1, 4, 5, 6), (1, 1, 4, 6, 5))])
    def test_shape_mismatch(self, shape, other_shape):
        with pytest.raises(ValueError, match="`warped` and `fixed` must have the same batch and spatial shapes"):
            gradreg_fast.mind_loss(torch.ones(shape), torch.ones(other_shape))
        descriptor = gradreg_fast.mind_ssc(torch.ones(other_shape))
        with pytest.raises(ValueError, match="`warped` and `fixed_descriptor` must have the same batch and spatial"):
            gradreg_fast.mind_loss(torch.ones(shape), fixed_descriptor=descriptor)

    def test_bad_radius_and_dilation(self):
        with pytest.raises(ValueError, match="`radius` must be an int >= 0"):
            gradreg_fast.mind_loss(self.vol, self.vol, radius=-1)
        with pytest.raises(ValueError, match="`dilation` must be an int >= 1"):
            gradreg_fast.mind_loss(self.vol, self.vol, dilation=0)

    @pytest.mark.parametrize("argument, value", [("descriptor", "mind-ssc"), ("penalty", "l3"),
                                                 ("reduction", "max"), ("backend", "gpu")])
    def test_bad_strings(self, argument, value):
        with pytest.raises(ValueError, match=f"`{argument}` must be one of"):
            gradreg_fast.mind_loss(self.vol, self.vol, **{argument: value})

    @pytest.mark.parametrize("argument, value, message", [
        ("penalty", "huber", "`penalty` must be one of"), ("descriptor", "foo", "`descriptor` must be one of"),
        ("reduction", "max", "`reduction` must be one of"), ("radius", -1, "`radius` must be an int"),
        ("dilation", 0, "`dilation` must be an int"), ("per_item", "yes", "`per_item` must be a bool"),
        ("backend", "opencl", "`backend` must be one of")])
    def test_module_checks_when_built(self, argument, value, message):
        with pytest.raises((ValueError, TypeError), match=message):
            gradreg_fast.MINDLoss(**{argument: value})


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_item", [False, True])
def test_precomputed_fixed_descriptor_gives_the_same_loss(descriptor, penalty, reduction, per_item, gen):
    warped, fixed = _pair((2, 1, 5, 6, 7), torch.float64, False, gen)
    fn = gradreg_fast.mind_ssc if descriptor == "ssc" else gradreg_fast.mind
    fixed_descriptor = fn(fixed, per_item=per_item)
    kept = fixed_descriptor.clone()
    kwargs = dict(descriptor=descriptor, penalty=penalty, reduction=reduction, per_item=per_item, backend="cpu")
    grad_output = None if reduction != "none" else torch.rand((2, CHANNELS[descriptor], 5, 6, 7), generator=gen,
                                                               dtype=torch.float64)
    loss, (grad,) = value_and_grads(lambda w: gradreg_fast.mind_loss(w, fixed, **kwargs), [warped], grad_output)
    for _ in range(2):  # twice: the descriptor must survive the first call
        cached, (cached_grad,) = value_and_grads(
            lambda w: gradreg_fast.mind_loss(w, fixed_descriptor=fixed_descriptor, **kwargs), [warped], grad_output)
        torch.testing.assert_close(cached, loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(cached_grad, grad, rtol=1e-12, atol=0)
    assert torch.equal(fixed_descriptor, kept)


def test_backward_twice_with_retained_graph(gen):
    warped, fixed = _pair((1, 1, 6, 5, 7), torch.float64, False, gen)
    leaf = warped.clone().requires_grad_()
    loss = gradreg_fast.mind_loss(leaf, fixed, backend="cpu")
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (second,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(first, second) and first.abs().sum() > 0


def test_precomputed_fixed_descriptor_bad_input(gen):
    warped, fixed = _pair((1, 1, 5, 6, 7), torch.float32, False, gen)
    fixed_descriptor = gradreg_fast.mind_ssc(fixed)
    with pytest.raises(ValueError, match="exactly one of them"):
        gradreg_fast.mind_loss(warped, fixed, fixed_descriptor=fixed_descriptor)
    with pytest.raises(ValueError, match="exactly one of them"):
        gradreg_fast.mind_loss(warped)
    with pytest.raises(ValueError, match="`fixed_descriptor` must have 6 channel"):
        gradreg_fast.mind_loss(warped, descriptor="mind", fixed_descriptor=fixed_descriptor)
    with pytest.raises(ValueError, match="same batch and spatial shapes"):
        gradreg_fast.mind_loss(warped[:, :, 1:], fixed_descriptor=fixed_descriptor)
    with pytest.raises(ValueError, match="must not require grad"):
        gradreg_fast.mind_loss(warped, fixed_descriptor=fixed_descriptor.clone().requires_grad_())
    with pytest.raises(TypeError, match="`fixed_descriptor` must be a floating-point tensor"):
        gradreg_fast.mind_loss(warped, fixed_descriptor=fixed_descriptor.long())


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("per_item", [False, True])
@pytest.mark.parametrize("shape, radius, dilation", [((2, 1, 9, 6, 7), None, None), ((1, 1, 1, 5, 6), None, None),
                                                     ((1, 1, 12, 5, 4), 3, 2), ((2, 1, 3, 8, 5), 1, 3)])
def test_value_without_gradient_streams_the_fixed_descriptor(descriptor, penalty, per_item, shape, radius, dilation,
                                                             gen):
    # warped needs no gradient: the value-only op, whose fixed descriptor planes pass through a small
    # ring (sizes with fewer planes than the ring, dilations whose channels run far apart).
    warped, fixed = _pair(shape, torch.float64, True, gen)  # non-contiguous views
    kwargs = dict(descriptor=descriptor, penalty=penalty, per_item=per_item, radius=radius, dilation=dilation)
    expected = reference.mind_loss(warped, fixed, **kwargs)
    for reduction, scale in (("mean", 1.0), ("sum", expected.new_tensor(float(warped.numel()) * CHANNELS[descriptor]))):
        value = gradreg_fast.mind_loss(warped, fixed, reduction=reduction, backend="cpu", **kwargs)
        torch.testing.assert_close(value, expected * scale, rtol=1e-10, atol=0)
    with torch.no_grad():  # also under no_grad, with a warped image that requires grad
        value = gradreg_fast.mind_loss(warped.clone().requires_grad_(), fixed, backend="cpu", **kwargs)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    assert not value.requires_grad


@pytest.mark.parametrize("case", ["constant", "near_constant", "constant_item"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_images_give_finite_losses_on_every_cpu_path(case, dtype, gen):
    # The three CPU paths (with a gradient, value only, precomputed fixed descriptor) on images where
    # m is 0 or tiny: finite, and equal to the reference (which keeps the documented all-ones result).
    shape = (2, 1, 5, 6, 4)
    warped = make_volume(shape, dtype, False, gen)
    fixed = {"constant": torch.full(shape, 2.0, dtype=dtype),
             "near_constant": 2.0 + make_volume(shape, dtype, False, gen, scale=1e-3),
             "constant_item": torch.cat([torch.full((1, 1, 5, 6, 4), -1.0, dtype=dtype),
                                         make_volume((1, 1, 5, 6, 4), dtype, False, gen)])}[case]
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    for per_item in (False, True):
        expected = reference.mind_loss(warped, fixed, per_item=per_item)
        loss, (grad,) = value_and_grads(lambda w: gradreg_fast.mind_loss(w, fixed, per_item=per_item, backend="cpu"),
                                        [warped])
        value = gradreg_fast.mind_loss(warped, fixed, per_item=per_item, backend="cpu")
        cached = gradreg_fast.mind_loss(warped, fixed_descriptor=gradreg_fast.mind_ssc(fixed, per_item=per_item),
                                        per_item=per_item, backend="cpu")
        for result in (loss, value, cached):
            assert torch.isfinite(result)
            torch.testing.assert_close(result, expected, **tolerance)
        assert torch.isfinite(grad).all()
    # Both images constant: every descriptor value is 1, the loss 0, the gradient 0.
    flat = torch.full(shape, 0.5, dtype=dtype)
    loss, (grad,) = value_and_grads(lambda w: gradreg_fast.mind_loss(w, fixed * 0 + 3.0, backend="cpu"), [flat])
    assert loss == 0 and torch.equal(grad, torch.zeros_like(grad))


class TestRadiusAndDilation:
    """The integers that reach the kernels: numpy integers are taken, bools and floats refused, sizes whose
    boxes or offsets would overflow or exceed any volume refused before a kernel runs."""

    @pytest.mark.parametrize("to_int", [np.int64, np.int32, np.uint8])
    def test_numpy_integers(self, to_int, gen):
        warped, fixed = _pair((1, 1, 5, 6, 7), torch.float64, False, gen)
        expected = gradreg_fast.mind_loss(warped, fixed, radius=1, dilation=2, backend="cpu")
        for fn in (gradreg_fast.mind_loss, lambda w, f, **kw: gradreg_fast.MINDLoss(**kw)(w, f)):
            got = fn(warped, fixed, radius=to_int(1), dilation=to_int(2), backend="cpu")
            assert torch.equal(got, expected)
        descriptor = gradreg_fast.mind_ssc(warped, to_int(1), to_int(2))
        assert torch.equal(descriptor, gradreg_fast.mind_ssc(warped, 1, 2))

    @pytest.mark.parametrize("op", [gradreg_fast.mind_ssc, gradreg_fast.mind,
                                    lambda v, **kw: gradreg_fast.mind_loss(v, v, **kw)])
    @pytest.mark.parametrize("name, value", [("radius", True), ("radius", 2.0), ("radius", np.float64(1)),
                                             ("dilation", False), ("dilation", 1.0), ("dilation", "2")])
    def test_bools_and_floats_refused(self, op, name, value):
        with pytest.raises(ValueError, match=f"`{name}` must be an int"):
            op(torch.rand(1, 1, 4, 5, 6), **{name: value})

    @pytest.mark.parametrize("op", [gradreg_fast.mind_ssc, gradreg_fast.mind,
                                    lambda v, **kw: gradreg_fast.mind_loss(v, v, **kw)])
    @pytest.mark.parametrize("name, value", [("radius", 2**30), ("radius", 4097), ("dilation", 2**30),
                                             ("dilation", 2**62), ("dilation", np.int64(2**40))])
    def test_huge_values_refused_before_any_kernel(self, op, name, value, monkeypatch):
        # A kernel reached with these would size buffers or 32-bit indices from them.
        def no_kernel(*args, **kwargs):
            raise AssertionError("a kernel ran")

        monkeypatch.setattr(torch.ops.gradreg, "mind_descriptor", no_kernel, raising=False)
        with pytest.raises(ValueError, match=f"`{name}` must be an int >= [01] \\(and at most 4096\\)"):
            op(torch.rand(1, 1, 4, 5, 6), **{name: value})

    @pytest.mark.parametrize("kind", ["ssc", "mind"])
    @pytest.mark.parametrize("shape, dilation", [((1, 1, 5, 4, 6), 6), ((2, 1, 3, 1, 4), 40), ((1, 1, 1, 1, 1), 9),
                                                 ((1, 1, 7, 5, 6), 4096)])
    def test_dilation_beyond_the_volume(self, kind, shape, dilation, gen):
        # Every offset then lands on an edge voxel; the result is the reference's for that same dilation.
        vol = make_volume(shape, torch.float64, False, gen)
        fn, ref = (gradreg_fast.mind_ssc, reference.mind_ssc) if kind == "ssc" else (gradreg_fast.mind,
                                                                                      reference.mind)
        grad_out = make_volume((shape[0], CHANNELS[kind], *shape[2:]), torch.float64, False, gen)
        out, (grad,) = value_and_grads(lambda v: fn(v, 1, dilation, backend="cpu"), [vol], grad_out)
        small = min(dilation, 12)  # the reference pads by the dilation: keep its buffers small
        ref_out, (ref_grad,) = value_and_grads(lambda v: ref(v, 1, small), [vol], grad_out)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11)


def _peer_style_loss(warped, fixed, descriptor="ssc", penalty="l1", reduction="mean", **kwargs):
    """The loss as the originals write it: two descriptors through autograd, torch broadcasting between them."""
    fn = reference.mind_ssc if descriptor == "ssc" else reference.mind
    diff = fn(warped, **kwargs) - fn(fixed, **kwargs)
    loss = diff.square() if penalty == "l2" else diff.abs()
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


class TestMixedPrecision:
    """A network's low-precision output against a float32 image (autocast), and mixed dtypes generally."""

    @pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("penalty", ["l1", "l2"])
    def test_under_autocast_matches_float32(self, low, penalty, gen):
        fixed = make_volume((2, 1, 6, 5, 7), torch.float32, False, gen)
        net = torch.nn.Conv3d(1, 1, 3, padding=1)
        with torch.no_grad():  # drawn from the test's own generator, not the global one
            net.weight.copy_(make_volume(net.weight.shape, torch.float32, False, gen, scale=0.3))
            net.bias.fill_(0.1)
        moving = make_volume((2, 1, 6, 5, 7), torch.float32, False, gen)
        with torch.autocast("cpu", dtype=low):
            warped = net(moving)  # low precision, as a network's output under autocast
            assert warped.dtype == low
            loss = gradreg_fast.MINDLoss(penalty=penalty)(warped, fixed)
        assert loss.dtype == torch.float32
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        # The same math in float32 from the same low-precision values.
        leaf = warped.detach().float().requires_grad_()
        expected = _peer_style_loss(leaf, fixed, penalty=penalty)
        expected.backward()
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
        # The gradient that reached the network is the float32 one, cast to the output's dtype on the way.
        low_leaf = warped.detach().requires_grad_()
        with torch.autocast("cpu", dtype=low):
            gradreg_fast.MINDLoss(penalty=penalty)(low_leaf, fixed).backward()
        assert low_leaf.grad.dtype == low
        torch.testing.assert_close(low_leaf.grad, leaf.grad.to(low))
        assert all(torch.isfinite(g).all() for g in grads)
        # MIND ignores a constant shift of the image, so the bias gets no gradient; the weights do.
        assert grads[0].abs().sum() > 0

    @pytest.mark.parametrize("warped_dtype, fixed_dtype, result_dtype", [
        (torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.float16, torch.float32),
        (torch.float32, torch.float64, torch.float64), (torch.float64, torch.bfloat16, torch.float64),
        (torch.float16, torch.bfloat16, torch.float32)])
    @pytest.mark.parametrize("path", ["fused", "value", "fixed_descriptor", "none"])
    def test_computed_in_the_wider_dtype(self, warped_dtype, fixed_dtype, result_dtype, path, gen):
        warped = make_volume((1, 1, 5, 6, 4), warped_dtype, False, gen)
        fixed = make_volume((1, 1, 5, 6, 4), fixed_dtype, False, gen)
        wide = torch.promote_types(torch.promote_types(warped_dtype, fixed_dtype), torch.float32)
        if path == "fixed_descriptor":
            call = lambda w: gradreg_fast.mind_loss(w, fixed_descriptor=gradreg_fast.mind_ssc(fixed))  # noqa: E731
            expected_fixed = gradreg_fast.mind_ssc(fixed).to(wide)  # the descriptor as given, widened
            expected_fn = lambda w: (reference.mind_ssc(w.to(wide)) - expected_fixed).abs().mean()  # noqa: E731
            result_dtype = torch.promote_types(warped_dtype, expected_fixed.dtype if fixed_dtype == wide
                                               else gradreg_fast.mind_ssc(fixed).dtype)
        else:
            reduction = "none" if path == "none" else "mean"
            call = lambda w: gradreg_fast.mind_loss(w, fixed, reduction=reduction)  # noqa: E731
            expected_fn = lambda w: _peer_style_loss(w.to(wide), fixed.to(wide), reduction=reduction)  # noqa: E731
        leaf = warped.clone().requires_grad_(path != "value")
        loss = call(leaf)
        assert loss.dtype == result_dtype
        expected = expected_fn(warped.clone())
        tight = 1e-10 if wide == torch.float64 else 1e-5
        torch.testing.assert_close(loss, expected.to(result_dtype), rtol=tight, atol=tight)
        if path != "value":
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
            assert grad.dtype == warped_dtype


class TestAtlasBroadcasting:
    """A batch of warped images against one atlas (and one warped image against a batch), as the original
    broadcasts its two descriptors."""

    @pytest.mark.parametrize("descriptor", ["ssc", "mind"])
    @pytest.mark.parametrize("penalty", ["l1", "l2"])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("warped_batch, fixed_batch", [(3, 1), (1, 3)])
    @pytest.mark.parametrize("fixed_needs_grad", [False, True])
    def test_matches_the_broadcasting_original(self, descriptor, penalty, reduction, warped_batch, fixed_batch,
                                               fixed_needs_grad, gen):
        warped = make_volume((warped_batch, 1, 5, 6, 4), torch.float64, warped_batch > 1, gen)
        fixed = make_volume((fixed_batch, 1, 5, 6, 4), torch.float64, False, gen)
        kwargs = dict(descriptor=descriptor, penalty=penalty, reduction=reduction)
        grad_output = None if reduction != "none" else make_volume((3, CHANNELS[descriptor], 5, 6, 4),
                                                                   torch.float64, False, gen)
        inputs = [warped, fixed] if fixed_needs_grad else [warped]
        call = lambda w, f=fixed: gradreg_fast.mind_loss(w, f, backend="cpu", **kwargs)  # noqa: E731
        ref = lambda w, f=fixed: _peer_style_loss(w, f, **kwargs)  # noqa: E731
        loss, grads = value_and_grads(call, inputs, grad_output)
        ref_loss, ref_grads = value_and_grads(ref, inputs, grad_output)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11 * ref_grad.abs().max().item())
        with torch.no_grad():
            torch.testing.assert_close(call(warped), ref_loss, rtol=1e-12, atol=1e-14)

    @pytest.mark.parametrize("warped_batch, fixed_batch", [(3, 1), (1, 3), (2, 2)])
    @pytest.mark.parametrize("per_item", [False, True])
    def test_fixed_descriptor(self, warped_batch, fixed_batch, per_item, gen):
        warped = make_volume((warped_batch, 1, 4, 6, 5), torch.float64, False, gen)
        fixed = make_volume((fixed_batch, 1, 4, 6, 5), torch.float64, False, gen)
        descriptor = gradreg_fast.mind_ssc(fixed, per_item=per_item)
        loss, (grad,) = value_and_grads(
            lambda w: gradreg_fast.MINDLoss(penalty="l2", per_item=per_item)(w, fixed_descriptor=descriptor), [warped])
        ref_loss, (ref_grad,) = value_and_grads(
            lambda w: _peer_style_loss(w, fixed, penalty="l2", per_item=per_item), [warped])
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11 * ref_grad.abs().max().item())


class TestCallConventions:
    """MINDLoss takes the keyword names of the losses it replaces."""

    @pytest.fixture
    def pair(self, gen):
        return _pair((2, 1, 5, 4, 6), torch.float64, False, gen)

    @pytest.mark.parametrize("call", [
        lambda fn, w, f: fn(w, f),
        lambda fn, w, f: fn(warped=w, fixed=f),
        lambda fn, w, f: fn(y_pred=w, y_true=f),    # VoxelMorph, TransMorph
        lambda fn, w, f: fn(y_true=f, y_pred=w),
        lambda fn, w, f: fn(input=w, target=f),     # MONAI
        lambda fn, w, f: fn(w, target=f),
    ])
    def test_keywords(self, call, pair):
        warped, fixed = pair
        fn = gradreg_fast.MINDLoss(penalty="l2")
        loss, (grad,) = value_and_grads(lambda w: call(fn, w, fixed), [warped])
        ref_loss, (ref_grad,) = value_and_grads(lambda w: _peer_style_loss(w, fixed, penalty="l2"), [warped])
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11 * ref_grad.abs().max().item())

    def test_the_same_argument_twice(self, pair):
        warped, fixed = pair
        with pytest.raises(TypeError, match="`warped` and `y_pred` name the same argument"):
            gradreg_fast.MINDLoss()(warped, fixed, y_pred=warped)
        with pytest.raises(TypeError, match="`y_true` and `target` name the same argument"):
            gradreg_fast.MINDLoss()(input=warped, y_true=fixed, target=fixed)
        with pytest.raises(TypeError, match="the warped image is missing"):
            gradreg_fast.MINDLoss()(target=fixed)

    def test_default_is_l1_and_transmorph_is_l2(self, pair):
        warped, fixed = pair
        assert torch.equal(gradreg_fast.MINDLoss()(warped, fixed), gradreg_fast.MINDLoss(penalty="l1")(warped, fixed))
        torch.testing.assert_close(gradreg_fast.MINDLoss()(warped, fixed), _peer_style_loss(warped, fixed),
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(gradreg_fast.MINDLoss(penalty="l2")(warped, fixed),
                                   _peer_style_loss(warped, fixed, penalty="l2"), rtol=1e-12, atol=0)
