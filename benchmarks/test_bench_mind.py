"""MIND-SSC and the MIND-SSC loss at the main volume: fused CPU core vs the naive ConvexAdam-style
code (conv3d, avg_pool3d, .item()) vs torch.compile of it (compiled as it is, with its graph break)."""

import pytest

from cases import IMPLS, PASSES, Case


@pytest.mark.parametrize("impl", IMPLS["mind_ssc"])
@pytest.mark.parametrize("pass_", PASSES["mind_ssc"])
def test_mind_ssc(time_case, pass_, impl):
    time_case(Case("mind_ssc", impl, pass_, "main"))


@pytest.mark.parametrize("impl", IMPLS["mind_loss"])
@pytest.mark.parametrize("pass_", PASSES["mind_loss"])
def test_mind_loss(time_case, pass_, impl):
    time_case(Case("mind_loss", impl, pass_, "main"))
