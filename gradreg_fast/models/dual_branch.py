"""The gradient-guided dual-branch network of Xu et al. (ICASSP 2021) and its VoxelMorph baselines.

Every gradient map is :func:`gradreg_fast.gradient_magnitude` and every warp :func:`gradreg_fast.warp`,
so the models run on whichever backend those ops select (see :func:`gradreg_fast.set_backend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..ops import gradient_magnitude, warp
from .unet import UNet3D, decoder_widths

FUSIONS = ("gated", "average")


class RegistrationOutput(NamedTuple):
    """What a forward pass returns; everything the loss and an inspection need, nothing recomputed.

    flow: the final displacement (the fused phi_ig of the dual-branch net), (N, 3, D, H, W) in voxels.
    flow_image: the image branch's phi_i (for VoxelMorph, the same tensor as ``flow``).
    flow_gradient: the gradient branch's phi_g, or None for VoxelMorph.
    warped: ``moving`` warped by ``flow``.
    warped_gradient: G(moving) warped by phi_g, or None for VoxelMorph.
    fixed_gradient: G(fixed) when the model computed it (dual-branch, VM(concat)), else None.
    gates: concat(p_i, p_g), (N, 6, D, H, W) in (0, 1), for gated fusion only, else None.
    """

    flow: torch.Tensor
    flow_image: torch.Tensor
    flow_gradient: Optional[torch.Tensor]
    warped: torch.Tensor
    warped_gradient: Optional[torch.Tensor]
    fixed_gradient: Optional[torch.Tensor]
    gates: Optional[torch.Tensor]


def _check_pair(moving, fixed, weight: torch.Tensor) -> None:
    for name, t in (("moving", moving), ("fixed", fixed)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5 or t.shape[1] != 1:
            raise ValueError(f"`{name}` must have shape (N, 1, D, H, W), got {tuple(t.shape)}")
        if t.device != weight.device:
            raise ValueError(f"`{name}` is on {t.device} but the network is on {weight.device}")
    if moving.shape != fixed.shape:
        raise ValueError(f"`moving` and `fixed` must have the same shape, got {tuple(moving.shape)} and "
                         f"{tuple(fixed.shape)}")
    if moving.dtype != fixed.dtype:
        raise ValueError(f"`moving` and `fixed` must have the same dtype, got {moving.dtype} and {fixed.dtype}")
    # Under autocast the convs cast their inputs themselves; otherwise the images must match the weights.
    if moving.dtype != weight.dtype and not torch.is_autocast_enabled(moving.device.type):
        raise ValueError(f"the images are {moving.dtype} but the network's weights are {weight.dtype}: convert "
                         f"one to the other (e.g. model.double(), or the images .float())")


def _unet_config(enc, dec, refine) -> dict:
    """The branch widths as plain lists and ints, so that configs survive YAML and weights_only loading."""
    dec = decoder_widths(dec)
    return {"enc": [int(v) for v in enc], "dec": dec[0] if len(set(dec)) == 1 else list(dec),
            "refine": [int(v) for v in refine]}


class VoxelMorph(nn.Module):
    """VoxelMorph baseline: one U-Net on concat(moving, fixed), or with ``concat_gradients=True`` on
    concat(moving, fixed, G(moving), G(fixed)) ("VM(concat)")."""

    def __init__(self, concat_gradients: bool = False, enc: Sequence[int] = (16, 32, 32, 32), dec=32,
                 refine: Sequence[int] = (16, 16)):
        super().__init__()
        self.concat_gradients = bool(concat_gradients)
        self.unet = UNet3D(4 if self.concat_gradients else 2, enc, dec, refine)
        self.config = {"name": "vm_concat" if self.concat_gradients else "vm", **_unet_config(enc, dec, refine)}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        _check_pair(moving, fixed, self.unet.flow_head.weight)
        fixed_gradient = None
        if self.concat_gradients:
            fixed_gradient = gradient_magnitude(fixed)
            inputs = torch.cat([moving, fixed, gradient_magnitude(moving), fixed_gradient], dim=1)
        else:
            inputs = torch.cat([moving, fixed], dim=1)
        # Under autocast the convs give float16; the displacement is kept in the images' precision.
        flow = self.unet(inputs).to(moving.dtype)
        return RegistrationOutput(flow=flow, flow_image=flow, flow_gradient=None, warped=warp(moving, flow),
                                  warped_gradient=None, fixed_gradient=fixed_gradient, gates=None)


class DualBranchNet(nn.Module):
    """Image branch on concat(moving, fixed) -> phi_i; gradient branch on concat(G(moving), G(fixed))
    -> phi_g; the two fused into phi_ig, which warps the moving image (phi_g warps G(moving)).

    ``fusion="gated"`` (the paper's adaptive gradient guidance):

    1. a 3x3x3 conv with 6 output channels and a sigmoid over concat(phi_i, phi_g),
    2. split into two 3-channel gates p_i, p_g,
    3. phi~i = p_i * phi_i and phi~g = p_g * phi_g,
    4. a 1x1x1 conv of concat(phi~i, phi~g) to 3 channels: phi_ig.

    The gate conv's bias starts at zero (gates 0.5 while the branch flows are near zero) and the 1x1x1
    conv starts as [I | I] with zero bias, so that a fresh gated net computes exactly the average
    fusion and does not start from a random constant shift. ``fusion="average"``: phi_ig =
    (phi_i + phi_g) / 2.
    """

    def __init__(self, fusion: str = "gated", enc: Sequence[int] = (16, 32, 32, 32), dec=32,
                 refine: Sequence[int] = (16, 16)):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"`fusion` must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.image_branch = UNet3D(2, enc, dec, refine)
        self.gradient_branch = UNet3D(2, enc, dec, refine)
        if fusion == "gated":
            self.gate = nn.Conv3d(6, 6, 3, padding=1)
            nn.init.zeros_(self.gate.bias)
            self.merge = nn.Conv3d(6, 3, 1)
            with torch.no_grad():
                self.merge.weight.zero_()
                for k in range(3):
                    self.merge.weight[k, k] = 1.0
                    self.merge.weight[k, 3 + k] = 1.0
                self.merge.bias.zero_()
        self.config = {"name": fusion, **_unet_config(enc, dec, refine)}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        _check_pair(moving, fixed, self.image_branch.flow_head.weight)
        moving_gradient, fixed_gradient = gradient_magnitude(moving), gradient_magnitude(fixed)
        flow_image = self.image_branch(torch.cat([moving, fixed], dim=1)).to(moving.dtype)
        flow_gradient = self.gradient_branch(torch.cat([moving_gradient, fixed_gradient], dim=1)).to(moving.dtype)
        gates = None
        if self.fusion == "gated":
            gates = torch.sigmoid(self.gate(torch.cat([flow_image, flow_gradient], dim=1)))
            gate_image, gate_gradient = gates.split(3, dim=1)
            flow = self.merge(torch.cat([gate_image * flow_image, gate_gradient * flow_gradient], dim=1))
            flow = flow.to(moving.dtype)
        else:
            flow = (flow_image + flow_gradient) / 2
        return RegistrationOutput(flow=flow, flow_image=flow_image, flow_gradient=flow_gradient,
                                  warped=warp(moving, flow), warped_gradient=warp(moving_gradient, flow_gradient),
                                  fixed_gradient=fixed_gradient, gates=gates)


MODELS = ("vm", "vm_concat", "average", "gated")


def build_model(name: str, **cfg) -> nn.Module:
    """A model by name: "vm", "vm_concat", "average" or "gated"; ``cfg`` holds ``enc``, ``dec``, ``refine``.

    ``build_model(**model.config)`` rebuilds any model of this module.
    """
    if name in ("vm", "vm_concat"):
        return VoxelMorph(concat_gradients=name == "vm_concat", **cfg)
    if name in FUSIONS:
        return DualBranchNet(fusion=name, **cfg)
    raise ValueError(f"model name must be one of {MODELS}, got {name!r}")
