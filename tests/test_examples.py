"""The examples run, at a tiny size: examples/voxelmorph_mind.py trains voxelmorph's VxmPairwise with
MINDLoss as its similarity loss (voxelmorph is in the test extra; skipped where it is absent)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import make_volume

import gradreg_fast
from gradreg_fast import reference
from gradreg_fast.losses import flow_smoothness

vxm = pytest.importorskip("voxelmorph", reason="voxelmorph >= 0.3.4 is not installed (pip install "
                                               "'gradreg_fast[test]' installs it)")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_voxelmorph_example_trains(capsys):
    example = _load("voxelmorph_mind")
    result = example.main(["--steps", "3", "--spacing", "12", "--size", "16", "16", "16", "--features", "4",
                           "--lr", "1e-2", "--device", "cpu"])
    assert result["shape"] == (16, 16, 16)
    assert [row["step"] for row in result["history"]] == [0, 1, 2]
    assert all(math.isfinite(value) for row in result["history"] for value in row.values())
    # The network starts at (almost) the identity and moves once MINDLoss's gradient has reached it.
    assert result["history"][0]["smoothness"] < 1e-8 < result["history"][-1]["smoothness"]
    assert result["history"][0]["mind"] == pytest.approx(result["before"], rel=1e-5)
    assert "MIND loss unregistered" in capsys.readouterr().out


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_vxm_parameter_gradients_equal_those_of_the_composed_loss(penalty, gen):
    # The drop-in claim at one training step: every VxmPairwise parameter gets the gradient that the
    # originals' loss (two descriptors through autograd) gives it.
    torch.manual_seed(0)
    model = vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1, nb_features=(4, 4, 4, 4),
                                      integration_steps=3, flow_initializer=1e-2).double()
    moving = make_volume((2, 1, 16, 16, 16), torch.float64, False, gen)
    fixed = make_volume((2, 1, 16, 16, 16), torch.float64, False, gen)

    def grads(similarity):
        model.zero_grad()
        displacement, warped = model(moving, fixed, return_warped_source=True)
        (similarity(warped, fixed) + flow_smoothness(displacement)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    ours = grads(lambda w, f: gradreg_fast.MINDLoss(penalty=penalty)(y_pred=w, y_true=f))
    composed = grads(lambda w, f: reference.mind_loss(w, f, penalty=penalty))
    for name, expected in composed.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-8, atol=1e-11 * expected.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")
