"""The dual-branch network and the VoxelMorph baselines: shapes, fusion rules, gradients, configs."""

from __future__ import annotations

import pytest
import torch

import gradreg_fast
from gradreg_fast.models import MODELS, DualBranchNet, UNet3D, VoxelMorph, build_model

TINY = {"enc": (4, 8, 8, 8), "dec": 8, "refine": (8,)}


def _pair(gen, shape=(2, 1, 19, 16, 11)):
    return torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)


@pytest.fixture(autouse=True)
def _seeded_init():
    """Layer initialisation draws from the global RNG: seed it, so that no test depends on what ran before."""
    torch.manual_seed(0)


def _perturb(model, gen, scale=0.05):
    """Move every weight away from its initial value, so that flows are not near zero."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_for_odd_sizes(name, gen):
    model = build_model(name, **TINY)
    moving, fixed = _pair(gen)
    out = model(moving, fixed)
    assert out.flow.shape == (2, 3, 19, 16, 11)
    assert out.flow_image.shape == out.flow.shape
    assert out.warped.shape == moving.shape
    if name in ("vm", "vm_concat"):
        assert out.flow_gradient is None and out.warped_gradient is None and out.gates is None
        assert out.flow_image is out.flow
    else:
        assert out.flow_gradient.shape == out.flow.shape
        assert out.warped_gradient.shape == moving.shape
        assert (out.gates is None) == (name == "average")
    for t in out:
        assert t is None or torch.isfinite(t).all()


def test_size_one_axis_and_single_item(gen):
    model = build_model("gated", **TINY)
    moving, fixed = _pair(gen, (1, 1, 1, 9, 20))
    out = model(moving, fixed)
    assert out.flow.shape == (1, 3, 1, 9, 20)


def test_fresh_flows_are_near_identity(gen):
    moving, fixed = _pair(gen)
    for name in MODELS:
        out = build_model(name, **TINY)(moving, fixed)
        assert out.flow.abs().max() < 1e-2, name


def test_non_multiple_of_16_sizes_are_padded_then_cropped(gen):
    """A size that is not a multiple of 16 is zero-padded at the far end of each axis and the flow is
    cropped back: the same as running the padded input and cropping."""
    unet = UNet3D(2, **TINY)
    _perturb(unet, gen)
    x = torch.rand((1, 2, 17, 13, 16), generator=gen)
    padded = torch.zeros((1, 2, 32, 16, 16))
    padded[:, :, :17, :13, :16] = x
    torch.testing.assert_close(unet(x), unet(padded)[:, :, :17, :13, :16])


def test_gated_fusion_follows_the_paper(gen):
    model = DualBranchNet("gated", **TINY)
    _perturb(model, gen)
    moving, fixed = _pair(gen)
    out = model(moving, fixed)
    # (1) 6-channel conv + sigmoid over concat(phi_i, phi_g), (2) split, (3) gate, (4) 1x1x1 conv.
    gates = torch.sigmoid(model.gate(torch.cat([out.flow_image, out.flow_gradient], 1)))
    torch.testing.assert_close(out.gates, gates)
    expected = model.merge(torch.cat([gates[:, :3] * out.flow_image, gates[:, 3:] * out.flow_gradient], 1))
    torch.testing.assert_close(out.flow, expected)
    assert model.gate.kernel_size == (3, 3, 3) and model.gate.out_channels == 6
    assert model.merge.kernel_size == (1, 1, 1) and model.merge.out_channels == 3
    # Branch inputs: the images, and their gradient maps through the package's op.
    torch.testing.assert_close(out.flow_image, model.image_branch(torch.cat([moving, fixed], 1)))
    grads = torch.cat([gradreg_fast.gradient_magnitude(moving), gradreg_fast.gradient_magnitude(fixed)], 1)
    torch.testing.assert_close(out.flow_gradient, model.gradient_branch(grads))
    # phi_ig warps the image, phi_g warps G(moving).
    torch.testing.assert_close(out.warped, gradreg_fast.warp(moving, out.flow))
    torch.testing.assert_close(out.warped_gradient,
                               gradreg_fast.warp(gradreg_fast.gradient_magnitude(moving), out.flow_gradient))
    torch.testing.assert_close(out.fixed_gradient, gradreg_fast.gradient_magnitude(fixed))


def test_gates_are_in_open_unit_interval(gen):
    model = DualBranchNet("gated", **TINY)
    _perturb(model, gen)
    out = model(*_pair(gen))
    assert out.flow.abs().max() > 0.5  # flows of voxels, not the near-zero ones of a fresh net
    assert out.gates.shape == (2, 6, 19, 16, 11)
    assert (out.gates > 0).all() and (out.gates < 1).all()
    assert out.gates.std() > 0  # not a constant: the gates depend on the flows


def test_fresh_gated_net_equals_average_fusion(gen):
    gated = DualBranchNet("gated", **TINY)
    average = DualBranchNet("average", **TINY)
    average.load_state_dict(gated.state_dict(), strict=False)
    moving, fixed = _pair(gen)
    out_gated, out_average = gated(moving, fixed), average(moving, fixed)
    torch.testing.assert_close(out_gated.flow_image, out_average.flow_image)
    # Gates are sigmoid(conv(tiny flows)) = 0.5 + O(1e-5): the merge [I | I] gives the average.
    torch.testing.assert_close(out_gated.flow, out_average.flow, rtol=1e-3, atol=1e-9)


def test_average_fusion(gen):
    model = DualBranchNet("average", **TINY)
    _perturb(model, gen)
    out = model(*_pair(gen))
    torch.testing.assert_close(out.flow, (out.flow_image + out.flow_gradient) / 2)


def test_vm_concat_input_is_images_and_gradient_maps(gen):
    model = VoxelMorph(concat_gradients=True, **TINY)
    _perturb(model, gen)
    moving, fixed = _pair(gen)
    inputs = torch.cat([moving, fixed, gradreg_fast.gradient_magnitude(moving),
                        gradreg_fast.gradient_magnitude(fixed)], 1)
    torch.testing.assert_close(model(moving, fixed).flow, model.unet(inputs))
    assert model.unet.encoder[0][0].in_channels == 4
    assert VoxelMorph(**TINY).unet.encoder[0][0].in_channels == 2


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name, gen):
    model = build_model(name, **TINY)
    _perturb(model, gen)
    moving, fixed = _pair(gen, (1, 1, 16, 12, 10))
    out = model(moving, fixed)
    loss = out.warped.square().mean() + out.flow.square().mean()
    if out.warped_gradient is not None:
        loss = loss + out.warped_gradient.square().mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_gradcheck_through_gated_fusion_float64(gen):
    """Gradient of the whole forward w.r.t. the inputs, in float64, through the fused ops."""
    model = DualBranchNet("gated", enc=(2, 2, 2, 2), dec=2, refine=()).double()
    _perturb(model, gen, scale=0.3)
    moving = torch.rand((1, 1, 4, 5, 3), dtype=torch.float64, generator=gen, requires_grad=True)
    fixed = torch.rand((1, 1, 4, 5, 3), dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(m, f):
        out = model(m, f)
        return out.warped, out.warped_gradient

    assert torch.autograd.gradcheck(fn, (moving, fixed), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_config_rebuilds_the_model(name):
    model = build_model(name, enc=(4, 8, 8, 6), dec=(8, 8, 6, 6), refine=(5, 3))
    rebuilt = build_model(**model.config)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # same parameter names and shapes
    assert model.config["name"] == name


def test_defaults_are_voxelmorph_widths():
    unet = DualBranchNet().image_branch
    assert [block[0].out_channels for block in unet.encoder] == [16, 32, 32, 32]
    assert all(block[0].stride == (2, 2, 2) and block[0].kernel_size == (3, 3, 3) for block in unet.encoder)
    assert [block[0].out_channels for block in unet.decoder] == [32, 32, 32, 32]
    assert [block[0].out_channels for block in unet.refine] == [16, 16]
    assert unet.flow_head.out_channels == 3
    assert unet.flow_head.weight.std() < 1e-4 and unet.flow_head.bias.abs().max() == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"enc": (4, 8, 8)}, "`enc` must have 4 entries"),
    ({"enc": (4, 8, 0, 8)}, "`enc` must contain positive ints"),
    ({"dec": 0}, "`dec` must be a positive int"),
    ({"dec": (8, 8)}, "`dec` must have 4 entries"),
    ({"refine": "16"}, "`refine` must be a sequence"),
])
def test_bad_widths_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build_model("gated", **kwargs)


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="model name must be one of"):
        build_model("transmorph")
    with pytest.raises(ValueError, match="`fusion` must be one of"):
        DualBranchNet(fusion="max")
    model = build_model("vm", **TINY)
    with pytest.raises(ValueError, match="`moving` must have shape"):
        model(torch.rand(1, 2, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        model(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))


@pytest.mark.parametrize("name", ["vm", "vm_concat", "gated", "average"])
def test_images_must_match_the_network_dtype_and_each_other(name):
    model = build_model(name, enc=(4, 4, 4, 4), dec=4, refine=())
    x = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="the images are torch.float64 but the network's weights are torch.float32"):
        model(x.double(), x.double())
    with pytest.raises(ValueError, match="same dtype"):
        model(x, x.double())
    assert model.double()(x.double(), x.double()).flow.dtype == torch.float64
