"""Gradient magnitude and warp: fused CPU core vs the naive eager code vs torch.compile of it
(and, for warp, F.grid_sample), forward and forward+backward, at three volume sizes."""

import pytest

from cases import IMPLS, PASSES, SIZES, Case


@pytest.mark.parametrize("impl", IMPLS["gradient_magnitude"])
@pytest.mark.parametrize("pass_", PASSES["gradient_magnitude"])
@pytest.mark.parametrize("size", SIZES)
def test_gradient_magnitude(time_case, size, pass_, impl):
    time_case(Case("gradient_magnitude", impl, pass_, size))


@pytest.mark.parametrize("impl", IMPLS["warp"])
@pytest.mark.parametrize("pass_", PASSES["warp"])
@pytest.mark.parametrize("size", SIZES)
def test_warp(time_case, size, pass_, impl):
    time_case(Case("warp", impl, pass_, size))
