"""The loss of eq. 2 and the flow regulariser."""

from __future__ import annotations

import pytest
import torch

import gradreg_fast
from gradreg_fast.losses import PRESETS, RegistrationLoss, flow_smoothness
from gradreg_fast.models import build_model

TINY = {"enc": (4, 8, 8, 8), "dec": 8, "refine": (8,)}


def _smoothness_reference(flow):
    """Forward differences with explicit slicing, one mean per axis, summed, / 3."""
    dz = flow[:, :, 1:] - flow[:, :, :-1]
    dy = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    dx = flow[..., 1:] - flow[..., :-1]
    return sum(d.pow(2).mean() for d in (dz, dy, dx) if d.numel()) / 3


@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 4), (1, 3, 1, 6, 9), (3, 3, 2, 2, 2)])
def test_flow_smoothness_matches_reference(shape, gen):
    flow = torch.randn(shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(flow_smoothness(flow), _smoothness_reference(flow))


def test_flow_smoothness_noncontiguous_and_gradcheck(gen):
    base = torch.randn((2, 6, 3, 4, 5), generator=gen, dtype=torch.float64)
    flow = base[:, ::2]  # 3 channels, non-contiguous
    assert not flow.is_contiguous()
    torch.testing.assert_close(flow_smoothness(flow), _smoothness_reference(flow.contiguous()))
    leaf = flow.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(flow_smoothness, (leaf,))


def test_flow_smoothness_of_simple_fields():
    # A translation has no spatial gradient; a linear ramp u = a*z has (a^2 along z) / 3.
    assert flow_smoothness(torch.full((1, 3, 4, 5, 6), 2.5)) == 0
    ramp = torch.zeros((1, 3, 6, 4, 4), dtype=torch.float64)
    ramp[:, 0] = 0.3 * torch.arange(6, dtype=torch.float64).reshape(6, 1, 1)
    torch.testing.assert_close(flow_smoothness(ramp), torch.tensor(0.09 / 3 / 3, dtype=torch.float64))


def test_flow_smoothness_bad_input():
    with pytest.raises(ValueError, match=r"`flow` must have shape \(N, 3, D, H, W\)"):
        flow_smoothness(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(TypeError, match="`flow` must be a torch.Tensor"):
        flow_smoothness([1.0, 2.0])


def _output(name, gen, shape=(2, 1, 12, 10, 9)):
    model = build_model(name, **TINY)
    with torch.no_grad():  # flows of a few voxels, so that every term is away from its trivial value
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    moving, fixed = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    return model, model(moving, fixed), moving, fixed


@pytest.mark.parametrize("name", ["gated", "average"])
def test_dual_branch_loss_is_eq2(name, gen):
    alpha, beta, gamma = 0.7, 0.2, 1.3
    _, out, moving, fixed = _output(name, gen)
    loss, terms = RegistrationLoss(alpha=alpha, beta=beta, gamma=gamma)(out, moving, fixed)
    g = gradreg_fast.gradient_magnitude
    isim = gradreg_fast.mind_loss(gradreg_fast.warp(moving, out.flow), fixed)
    gsim = gradreg_fast.mind_loss(gradreg_fast.warp(g(moving), out.flow_gradient), g(fixed))
    igreg, greg = flow_smoothness(out.flow), flow_smoothness(out.flow_gradient)
    expected = (isim + alpha * gsim) + (gamma * igreg + beta * greg)
    torch.testing.assert_close(loss, expected)
    assert set(terms) == {"isim", "gsim", "igreg", "greg"}
    for key, value in {"isim": isim, "gsim": gsim, "igreg": igreg, "greg": greg}.items():
        torch.testing.assert_close(terms[key], value.detach())
        assert not terms[key].requires_grad and terms[key] > 0


@pytest.mark.parametrize("name", ["vm", "vm_concat"])
def test_voxelmorph_loss_has_image_terms_only(name, gen):
    _, out, moving, fixed = _output(name, gen)
    loss, terms = RegistrationLoss(alpha=0.7, beta=0.2, gamma=1.3)(out, moving, fixed)
    isim = gradreg_fast.mind_loss(out.warped, fixed)
    torch.testing.assert_close(loss, isim + 1.3 * flow_smoothness(out.flow))
    assert set(terms) == {"isim", "igreg"}


def test_loss_uses_descriptor_and_penalty(gen):
    _, out, moving, fixed = _output("vm", gen)
    loss, terms = RegistrationLoss(gamma=0.0, descriptor="mind", penalty="l2")(out, moving, fixed)
    torch.testing.assert_close(loss, gradreg_fast.mind_loss(out.warped, fixed, descriptor="mind", penalty="l2"))
    assert terms["igreg"] > 0  # computed and reported even at weight 0


def test_loss_backpropagates_to_every_parameter(gen):
    model, out, moving, fixed = _output("gated", gen)
    loss, _ = RegistrationLoss(preset="pig_kidney")(out, moving, fixed)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_presets_and_overrides():
    assert PRESETS["pig_kidney"] == {"alpha": 0.4, "beta": 0.3, "gamma": 0.8}
    assert PRESETS["abdomen"] == {"alpha": 0.5, "beta": 0.5, "gamma": 1.0}
    pig = RegistrationLoss(preset="pig_kidney")
    assert (pig.alpha, pig.beta, pig.gamma) == (0.4, 0.3, 0.8)
    default = RegistrationLoss()
    assert (default.alpha, default.beta, default.gamma) == (0.5, 0.5, 1.0)
    mixed = RegistrationLoss(preset="pig_kidney", beta=0.0)
    assert (mixed.alpha, mixed.beta, mixed.gamma) == (0.4, 0.0, 0.8)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": -0.1}, "`alpha` must be a finite number >= 0"),
    ({"beta": float("nan")}, "`beta` must be a finite number >= 0"),
    ({"gamma": "1"}, "`gamma` must be a finite number >= 0"),
    ({"preset": "brain"}, "`preset` must be None or one of"),
    ({"descriptor": "ncc"}, "`descriptor` must be 'ssc' or 'mind'"),
    ({"penalty": "l3"}, "`penalty` must be 'l1' or 'l2'"),
])
def test_bad_loss_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RegistrationLoss(**kwargs)


def test_loss_weights_take_numpy_numbers_and_refuse_huge_ints():
    import numpy as np

    loss = RegistrationLoss(alpha=np.float32(0.25), beta=np.int64(1), gamma=np.float64(2.0))
    assert (loss.alpha, loss.beta, loss.gamma) == (0.25, 1.0, 2.0)
    with pytest.raises(ValueError, match="`alpha` must be a finite number >= 0"):
        RegistrationLoss(alpha=10 ** 400)


def test_bad_flows_and_outputs_are_named():
    with pytest.raises(ValueError, match="floating-point"):
        flow_smoothness(torch.zeros(1, 3, 4, 4, 4, dtype=torch.int64))
    for shape in ((0, 3, 4, 4, 4), (1, 3, 0, 4, 4)):
        with pytest.raises(ValueError, match="not be empty"):
            flow_smoothness(torch.zeros(shape))
    flow = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(TypeError, match="RegistrationOutput"):
        RegistrationLoss()(flow, flow[:, :1], flow[:, :1])
