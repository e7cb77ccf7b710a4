"""torch.func through every public op: reverse mode (grad, vjp, jacrev) and vmap give the reference's
results; forward mode (jvp, forward_ad, jacfwd) and double backward raise an error that names the op,
never a silent zero."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import make_volume

import gradreg_fast
from gradreg_fast import reference

SHAPE = (2, 1, 5, 4, 6)


def _cases(gen, noncontiguous=False):
    """name -> (fused fn, reference fn), each a function of one volume of SHAPE."""
    fixed = make_volume(SHAPE, torch.float64, False, gen)
    flow = make_volume((2, 3, *SHAPE[2:]), torch.float64, noncontiguous, gen, scale=1.5)
    image = make_volume((2, 2, *SHAPE[2:]), torch.float64, False, gen)
    return {
        "gradient_magnitude": (gradreg_fast.gradient_magnitude, reference.gradient_magnitude),
        "warp image": (lambda v: gradreg_fast.warp(v, flow), lambda v: reference.warp(v, flow)),
        "warp flow": (lambda f: gradreg_fast.warp(image, f.expand(2, 3, *SHAPE[2:]) * 1.5),
                      lambda f: reference.warp(image, f.expand(2, 3, *SHAPE[2:]) * 1.5)),
        "mind_ssc": (gradreg_fast.mind_ssc, reference.mind_ssc),
        "mind": (lambda v: gradreg_fast.mind(v, 2, 1), lambda v: reference.mind(v, 2, 1)),
        "mind_loss": (lambda v: gradreg_fast.mind_loss(v, fixed), lambda v: reference.mind_loss(v, fixed)),
        "mind_loss l2 sum": (lambda v: gradreg_fast.mind_loss(v, fixed, penalty="l2", reduction="sum"),
                             lambda v: reference.mind_loss(v, fixed, penalty="l2", reduction="sum")),
        "mind_loss none": (lambda v: gradreg_fast.mind_loss(v, fixed, reduction="none"),
                           lambda v: reference.mind_loss(v, fixed, reduction="none")),
        "mind_loss fixed_descriptor": (
            lambda v: gradreg_fast.mind_loss(v, fixed_descriptor=reference.mind_ssc(fixed)),
            lambda v: reference.mind_loss(v, fixed)),
        "mind_loss atlas": (lambda v: gradreg_fast.mind_loss(v, fixed[:1], penalty="l2"),
                            lambda v: (reference.mind_ssc(v) - reference.mind_ssc(fixed[:1])).square().mean()),
    }


NAMES = list(_cases(torch.Generator().manual_seed(0)))


def _scalar(fn, weights):
    """A scalar of ``fn``'s output that weights every element differently (so a wrong layout shows)."""
    return lambda v: (fn(v) * weights).sum() if weights is not None else fn(v)


def _input(gen, name, noncontiguous=False):
    if name == "warp flow":
        return make_volume((1, 3, *SHAPE[2:]), torch.float64, noncontiguous, gen)
    return make_volume(SHAPE, torch.float64, noncontiguous, gen)


def _weights(fn, x, gen):
    out = fn(x)
    return None if out.dim() == 0 else make_volume(out.shape, torch.float64, False, gen)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11 * max(b.abs().max().item(), 1e-300))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_grad(name, noncontiguous, gen):
    fn, ref = _cases(gen, noncontiguous)[name]
    x = _input(gen, name, noncontiguous)
    weights = _weights(ref, x, gen)
    _close(torch.func.grad(_scalar(fn, weights))(x), torch.func.grad(_scalar(ref, weights))(x))
    grad, value = torch.func.grad_and_value(_scalar(fn, weights))(x)
    _close(grad, torch.func.grad(_scalar(ref, weights))(x))
    _close(value, _scalar(ref, weights)(x))


@pytest.mark.parametrize("name", NAMES)
def test_vjp(name, gen):
    fn, ref = _cases(gen)[name]
    x = _input(gen, name)
    out, vjp = torch.func.vjp(fn, x)
    ref_out, ref_vjp = torch.func.vjp(ref, x)
    _close(out, ref_out)
    cotangent = make_volume(out.shape, torch.float64, False, gen) if out.dim() else torch.tensor(1.7, dtype=out.dtype)
    _close(vjp(cotangent)[0], ref_vjp(cotangent)[0])


@pytest.mark.parametrize("name", ["gradient_magnitude", "warp flow", "mind_ssc", "mind_loss"])
def test_jacrev_on_a_tiny_volume(name, gen):
    # jacrev is vmap over vjp: every row of the Jacobian through the ops' backward.
    global SHAPE
    keep, SHAPE = SHAPE, (1, 1, 3, 2, 3)
    try:
        fn, ref = _cases(gen)[name]
        x = _input(gen, name)
        _close(torch.func.jacrev(fn)(x), torch.func.jacrev(ref)(x))
    finally:
        SHAPE = keep


@pytest.mark.parametrize("name", NAMES)
def test_vmap_is_one_call_per_slice(name, gen):
    # MIND's normalisation takes the mean over each call's whole batch: a slice is a call of its own.
    fn, ref = _cases(gen)[name]
    xs = torch.stack([_input(gen, name), _input(gen, name) * 3.0, _input(gen, name)], dim=1)
    out = torch.func.vmap(fn, in_dims=1)(xs)
    expected = torch.stack([ref(xs[:, i]) for i in range(xs.shape[1])])
    _close(out, expected)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_of_grad(name, gen):
    fn, ref = _cases(gen)[name]
    xs = torch.stack([_input(gen, name), _input(gen, name) * 0.5])
    weights = _weights(ref, xs[0], gen)
    out = torch.func.vmap(torch.func.grad(_scalar(fn, weights)))(xs)
    expected = torch.stack([torch.func.grad(_scalar(ref, weights))(x) for x in xs])
    _close(out, expected)


def _forward_mode_calls(fn, x, tangent):
    """Every way of asking for a forward-mode derivative."""
    def with_forward_ad(grad_enabled):
        with torch.set_grad_enabled(grad_enabled), fwAD.dual_level():
            return fwAD.unpack_dual(fn(fwAD.make_dual(x, tangent))).tangent

    return {
        "torch.func.jvp": lambda: torch.func.jvp(fn, (x,), (tangent,)),
        "forward_ad": lambda: with_forward_ad(True),
        "forward_ad under no_grad": lambda: with_forward_ad(False),
        "jacfwd": lambda: torch.func.jacfwd(fn)(x),
    }


OP_OF = {"gradient_magnitude": "gradient_magnitude", "warp image": "warp", "warp flow": "warp",
         "mind_ssc": "mind_ssc / mind", "mind": "mind_ssc / mind", "mind_loss": "mind_loss",
         "mind_loss l2 sum": "mind_loss", "mind_loss none": "mind_ssc / mind",
         "mind_loss fixed_descriptor": "mind_loss", "mind_loss atlas": "mind_loss"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["torch.func.jvp", "forward_ad", "forward_ad under no_grad", "jacfwd"])
def test_forward_mode_raises_instead_of_a_zero_tangent(name, how, gen):
    fn, _ = _cases(gen)[name]
    x = _input(gen, name)
    tangent = make_volume(x.shape, torch.float64, False, gen)
    with pytest.raises(NotImplementedError, match=f"gradreg_fast.{OP_OF[name]}: forward-mode AD .* is not "
                                                  "implemented; use reverse mode"):
        _forward_mode_calls(fn, x, tangent)[how]()


@pytest.mark.parametrize("name", NAMES)
def test_double_backward_raises(name, gen):
    fn, _ = _cases(gen)[name]
    x = _input(gen, name).requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.autograd.grad(grad.square().sum(), x)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.func.grad(lambda v: torch.func.grad(lambda u: fn(u).sum())(v).square().sum())(x.detach())


def test_module_under_torch_func(gen):
    # The functional training-step pattern: grad of a loss w.r.t. a network's parameters.
    net = torch.nn.Conv3d(1, 1, 3, padding=1).double()
    moving = make_volume(SHAPE, torch.float64, False, gen)
    fixed = make_volume(SHAPE, torch.float64, False, gen)
    params = dict(net.named_parameters())
    loss_fn = gradreg_fast.MINDLoss(penalty="l2")

    def loss(p):
        return loss_fn(y_pred=torch.func.functional_call(net, p, (moving,)), y_true=fixed)

    grads = torch.func.grad(loss)(params)
    loss(params).backward()
    for name, parameter in net.named_parameters():
        _close(grads[name], parameter.grad)
