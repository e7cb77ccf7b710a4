"""torch.compile(fullgraph=True) through every op, forward and backward, and torch.library.opcheck of
the registered custom ops (schema, fake tensors, autograd registration, AOT dispatch)."""

import pytest
import torch
from conftest import make_volume, value_and_grads
from torch._dynamo.testing import CompileCounterWithBackend

import gradreg_fast


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Parametrized tests reuse one code object; a clean cache keeps each compilation independent.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check_compiled(fn, inputs, grad_output=None, backend="aot_eager", dynamic=None, more_inputs=()):
    """Compile ``fn`` in one graph, then compare its value and gradients with eager on every input set."""
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic)
    for args in (inputs, *more_inputs):
        expected, expected_grads = value_and_grads(fn, args, grad_output)
        out, grads = value_and_grads(compiled, args, grad_output)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1  # one graph, no recompilation
    return counter


def test_gradient_magnitude_inductor(gen):
    vol = make_volume((1, 2, 5, 4, 6), torch.float64, True, gen)
    grad_out = make_volume(vol.shape, torch.float64, False, gen)
    counter = _check_compiled(lambda v: gradreg_fast.gradient_magnitude(v, 1e-3, backend="cpu"), [vol], grad_out,
                              backend="inductor")
    assert counter.op_count >= 1


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_warp(mode, padding_mode, gen):
    image = make_volume((2, 2, 5, 4, 6), torch.float64, False, gen)
    flow = make_volume((2, 3, 5, 4, 6), torch.float64, True, gen, scale=2.0)
    grad_out = make_volume(image.shape, torch.float64, False, gen)
    _check_compiled(lambda i, f: gradreg_fast.warp(i, f, mode, padding_mode, backend="cpu"), [image, flow], grad_out)


def test_warp_dynamic_shapes(gen):
    def inputs(shape):
        return [make_volume(shape, torch.float64, False, gen), make_volume((shape[0], 3, *shape[2:]), torch.float64,
                                                                           False, gen, scale=2.0)]

    # No size of 1: dynamo specialises those, which would recompile for a legitimate reason.
    fn = lambda i, f: gradreg_fast.warp(i, f, backend="cpu").square().sum()  # noqa: E731
    _check_compiled(fn, inputs((2, 2, 5, 4, 6)), dynamic=True, more_inputs=[inputs((3, 3, 3, 7, 5))])


@pytest.mark.parametrize("op, channels", [(gradreg_fast.mind_ssc, 12), (gradreg_fast.mind, 6)])
def test_descriptors(op, channels, gen):
    vol = make_volume((2, 1, 5, 4, 6), torch.float64, True, gen)
    grad_out = make_volume((2, channels, 5, 4, 6), torch.float64, False, gen)
    _check_compiled(lambda v: op(v, backend="cpu"), [vol], grad_out)


@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mind_loss_fused(descriptor, penalty, reduction, gen):
    warped = make_volume((2, 1, 5, 4, 6), torch.float64, False, gen)
    fixed = make_volume((2, 1, 5, 4, 6), torch.float64, False, gen)

    def loss(w):
        return gradreg_fast.mind_loss(w, fixed, descriptor, penalty, reduction=reduction, backend="cpu")

    _check_compiled(loss, [warped])


def test_mind_loss_composed_paths(gen):
    warped = make_volume((2, 1, 5, 4, 6), torch.float64, False, gen)
    fixed = make_volume((2, 1, 5, 4, 6), torch.float64, False, gen)
    both = lambda w, f: gradreg_fast.mind_loss(w, f, penalty="l2", backend="cpu")  # noqa: E731
    _check_compiled(both, [warped, fixed])
    torch._dynamo.reset()
    per_element = lambda w: gradreg_fast.mind_loss(w, fixed, reduction="none", backend="cpu")  # noqa: E731
    _check_compiled(per_element, [warped], make_volume((2, 12, 5, 4, 6), torch.float64, False, gen))


def test_mind_loss_with_fixed_descriptor_and_value_only(gen):
    warped = make_volume((2, 1, 5, 4, 6), torch.float64, True, gen)
    fixed = make_volume((2, 1, 5, 4, 6), torch.float64, False, gen)
    descriptor = gradreg_fast.mind_ssc(fixed)
    cached = lambda w: gradreg_fast.mind_loss(w, fixed_descriptor=descriptor, backend="cpu")  # noqa: E731
    _check_compiled(cached, [warped])
    torch._dynamo.reset()
    # Under no_grad: the value-only op, in one graph too.
    expected = gradreg_fast.mind_loss(warped, fixed, backend="cpu")
    counter = CompileCounterWithBackend("aot_eager")
    value = torch.compile(lambda w: gradreg_fast.mind_loss(w, fixed, backend="cpu"), backend=counter, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(value(warped), expected, rtol=1e-12, atol=0)
    assert counter.frame_count == 1


def test_mind_loss_module_dynamic_shapes(gen):
    loss_fn = gradreg_fast.MINDLoss(backend="cpu")

    def inputs(shape):
        return [make_volume(shape, torch.float64, False, gen), make_volume(shape, torch.float64, False, gen)]

    _check_compiled(lambda w, f: loss_fn(w, f.detach()), inputs((2, 1, 5, 4, 6)), dynamic=True,
                    more_inputs=[inputs((3, 1, 4, 6, 3))])


@pytest.mark.parametrize("warped_batch, fixed_batch", [(3, 1), (1, 2)])
def test_mind_loss_atlas_broadcasting_with_keywords(warped_batch, fixed_batch, gen):
    loss_fn = gradreg_fast.MINDLoss(penalty="l2", backend="cpu")
    warped = make_volume((warped_batch, 1, 5, 4, 6), torch.float64, False, gen)
    atlas = make_volume((fixed_batch, 1, 5, 4, 6), torch.float64, False, gen)
    _check_compiled(lambda w: loss_fn(y_pred=w, y_true=atlas), [warped])


def test_mind_loss_under_autocast(gen):
    # bfloat16 warped image against a float32 fixed one inside the compiled region, as in AMP training.
    loss_fn = gradreg_fast.MINDLoss(backend="cpu")
    fixed = make_volume((2, 1, 5, 4, 6), torch.float32, False, gen)

    def fn(w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(w.to(torch.bfloat16), fixed)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    warped = make_volume((2, 1, 5, 4, 6), torch.float32, False, gen)
    out, (grad,) = value_and_grads(compiled, [warped])
    expected, (expected_grad,) = value_and_grads(fn, [warped])
    assert out.dtype == torch.float32 and counter.frame_count == 1
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_registered_ops_exist():
    for name in ("gradient_magnitude", "gradient_magnitude_backward", "warp", "warp_backward", "mind_descriptor",
                 "mind_descriptor_backward", "mind_loss", "mind_loss_backward"):
        assert hasattr(torch.ops.gradreg, name), name


def _opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert all(result == "SUCCESS" for result in results.values()), results


def test_opcheck_gradient_magnitude(gen):
    vol = make_volume((1, 2, 3, 4, 5), torch.float64, False, gen).requires_grad_()
    _opcheck(torch.ops.gradreg.gradient_magnitude.default, (vol, 1e-6, "cpu"))
    out = gradreg_fast.gradient_magnitude(vol.detach(), backend="cpu")
    _opcheck(torch.ops.gradreg.gradient_magnitude_backward.default, (torch.ones_like(out), vol.detach(), out, 1e-6,
                                                                      "cpu"))


def _warp_args(gen):
    image = make_volume((2, 2, 3, 4, 5), torch.float64, False, gen).requires_grad_()
    flow = make_volume((2, 3, 3, 4, 5), torch.float64, False, gen, scale=2.0).requires_grad_()
    return image, flow, make_volume(image.shape, torch.float64, False, gen)


@pytest.mark.parametrize("mode, padding_mode", [("bilinear", "zeros"), ("nearest", "border")])
def test_opcheck_warp(mode, padding_mode, gen):
    image, flow, _ = _warp_args(gen)
    _opcheck(torch.ops.gradreg.warp.default, (image, flow, mode, padding_mode, True, "cpu"))


@pytest.mark.parametrize("need_image, need_flow", [(True, True), (True, False), (False, True)])
def test_opcheck_warp_backward_bilinear(need_image, need_flow, gen):
    image, flow, grad_out = _warp_args(gen)
    _opcheck(torch.ops.gradreg.warp_backward.default,
             (grad_out, image.detach(), flow.detach(), "bilinear", "border", True, need_image, need_flow, "cpu"))


def test_opcheck_warp_backward_nearest(gen):
    # The nearest image gradient runs the reference through autograd inside the op.
    image, flow, grad_out = _warp_args(gen)
    _opcheck(torch.ops.gradreg.warp_backward.default,
             (grad_out, image.detach(), flow.detach(), "nearest", "zeros", True, True, False, "cpu"))


MIND_KINDS = pytest.mark.parametrize("kind, radius, dilation", [("ssc", 2, 2), ("mind", 1, 1)])


def _mind_args(gen):
    vol = make_volume((2, 1, 3, 4, 5), torch.float64, False, gen).requires_grad_()
    return vol, make_volume((2, 1, 3, 4, 5), torch.float64, False, gen)


@MIND_KINDS
def test_opcheck_mind_descriptor(kind, radius, dilation, gen):
    vol, _ = _mind_args(gen)
    _opcheck(torch.ops.gradreg.mind_descriptor.default, (vol, kind, radius, dilation, False, "cpu"))


@MIND_KINDS
def test_opcheck_mind_descriptor_backward(kind, radius, dilation, gen):
    vol, _ = _mind_args(gen)
    out, variance, flags = torch.ops.gradreg.mind_descriptor(vol.detach(), kind, radius, dilation, False, "cpu")
    grad_out = make_volume(out.shape, torch.float64, False, gen)
    _opcheck(torch.ops.gradreg.mind_descriptor_backward.default,
             (grad_out, out, vol.detach(), variance, flags, kind, radius, dilation, False, "cpu"))


@MIND_KINDS
def test_opcheck_mind_loss(kind, radius, dilation, gen):
    vol, fixed = _mind_args(gen)
    _opcheck(torch.ops.gradreg.mind_loss.default, (vol, fixed, None, kind, radius, dilation, True, False, "cpu"))
    # With a precomputed fixed descriptor instead of the fixed image.
    descriptor = torch.ops.gradreg.mind_descriptor(fixed, kind, radius, dilation, False, "cpu")[0]
    _opcheck(torch.ops.gradreg.mind_loss.default, (vol, None, descriptor, kind, radius, dilation, False, False, "cpu"))


@MIND_KINDS
def test_opcheck_mind_loss_value(kind, radius, dilation, gen):
    vol, fixed = _mind_args(gen)
    _opcheck(torch.ops.gradreg.mind_loss_value.default, (vol.detach(), fixed, kind, radius, dilation, True, False,
                                                          "cpu"))


@MIND_KINDS
def test_opcheck_mind_loss_backward(kind, radius, dilation, gen):
    vol, fixed = _mind_args(gen)
    _, out, variance, flags, target = torch.ops.gradreg.mind_loss(vol.detach(), fixed, None, kind, radius, dilation,
                                                                   False, True, "cpu")
    _opcheck(torch.ops.gradreg.mind_loss_backward.default,
             (torch.tensor(0.5, dtype=torch.float64), out, vol.detach(), variance, flags, target, kind, radius,
              dilation, False, True, "cpu"))
