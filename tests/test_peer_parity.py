"""Parity with the MIND-SSC that registration projects ship: ``convexAdam.convex_adam_utils.MINDSSC`` from
the ``convexadam`` package on PyPI (TransMorph's and VoxelMorph++'s copies are the same code). The peer is
imported, never copied: descriptor values, and the MIND loss gradient (L1 and L2) through autograd of the
peer's descriptors, on random data, integer data with ties, a real CT and a batch, in float64."""

import numpy as np
import pytest
import torch
from conftest import make_volume

import gradreg_fast
from gradreg_fast.io import read_nifti

peer_utils = pytest.importorskip(
    "convexAdam.convex_adam_utils",
    reason="the peer package `convexadam` is not installed (pip install 'gradreg_fast[test]' installs it)")

DATA = gradreg_fast.__path__[0] + "/data/abdomen"


def peer_mind_ssc(vol, radius=2, dilation=2):
    """The peer's MINDSSC on the CPU. It builds its shift kernels with torch's default dtype, so that is
    set to the input's for the call (float64 here)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(vol.dtype)
    try:
        return peer_utils.MINDSSC(vol, radius, dilation, device="cpu")
    finally:
        torch.set_default_dtype(previous)


def peer_loss(warped, fixed, penalty, **kwargs):
    diff = peer_mind_ssc(warped, **kwargs) - peer_mind_ssc(fixed, **kwargs)
    return (diff * diff if penalty == "l2" else diff.abs()).mean()


def _ct_crop(corner, size):
    ct = read_nifti(f"{DATA}/ct.nii.gz").data
    z, y, x = corner
    crop = ct[z:z + size[0], y:y + size[1], x:x + size[2]]
    return torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float64))[None, None]


def _volumes(case, gen):
    """(warped, fixed) of a case, float64."""
    if case == "random":
        return make_volume((1, 1, 13, 10, 11), generator=gen), make_volume((1, 1, 13, 10, 11), generator=gen)
    if case == "integer ties":
        # Integer values: many voxels where two channels tie for the minimum.
        warped = torch.randint(0, 4, (1, 1, 14, 12, 13), generator=gen).double()
        return warped, torch.rand((1, 1, 14, 12, 13), generator=gen, dtype=torch.float64)
    if case == "ct":
        # Raw Hounsfield units (integers, so ties too), cropped to keep the test fast.
        return _ct_crop((40, 30, 4), (24, 22, 18)), _ct_crop((44, 36, 8), (24, 22, 18))
    if case == "batch":
        ct = _ct_crop((50, 40, 6), (12, 14, 10)) / 100.0
        warped = torch.cat([ct, make_volume((2, 1, 12, 14, 10), generator=gen)])
        return warped, torch.cat([make_volume((2, 1, 12, 14, 10), generator=gen), ct.flip(2)])
    raise ValueError(case)


CASES = ["random", "integer ties", "ct", "batch"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("radius, dilation", [(2, 2), (1, 3)])
def test_descriptor_values(case, radius, dilation, gen):
    for vol in _volumes(case, gen):
        expected = peer_mind_ssc(vol, radius, dilation)
        out = gradreg_fast.mind_ssc(vol, radius, dilation)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_descriptor_gradient(case, gen):
    vol, _ = _volumes(case, gen)
    leaf, peer_leaf = vol.clone().requires_grad_(), vol.clone().requires_grad_()
    out, expected = gradreg_fast.mind_ssc(leaf), peer_mind_ssc(peer_leaf)
    cotangent = make_volume(out.shape, generator=gen)
    (grad,) = torch.autograd.grad(out, leaf, cotangent)
    (expected_grad,) = torch.autograd.grad(expected, peer_leaf, cotangent)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12 * expected_grad.abs().max().item())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_loss_value_and_gradient(case, penalty, gen):
    warped, fixed = _volumes(case, gen)
    leaf, peer_leaf = warped.clone().requires_grad_(), warped.clone().requires_grad_()
    loss = gradreg_fast.MINDLoss(penalty=penalty)(leaf, fixed)
    expected = peer_loss(peer_leaf, fixed, penalty)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    (grad,) = torch.autograd.grad(loss, leaf)
    (expected_grad,) = torch.autograd.grad(expected, peer_leaf)
    # The target: the original's gradient to 1e-12 of its scale, ties included.
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12 * expected_grad.abs().max().item())


def test_atlas_broadcasting_like_the_peer(gen):
    warped = make_volume((3, 1, 10, 9, 8), generator=gen).requires_grad_()
    atlas = make_volume((1, 1, 10, 9, 8), generator=gen)
    peer_leaf = warped.detach().clone().requires_grad_()
    loss = gradreg_fast.MINDLoss(penalty="l2")(warped, atlas)
    expected = peer_loss(peer_leaf, atlas, "l2")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    (grad,), (expected_grad,) = torch.autograd.grad(loss, warped), torch.autograd.grad(expected, peer_leaf)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12 * expected_grad.abs().max().item())
