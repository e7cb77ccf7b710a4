"""The VoxelMorph U-Net (Balakrishnan et al., IEEE TMI 2019) that predicts a displacement field."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 4  # stride-2 encoder convs, hence upsamplings; inputs are padded to a multiple of 2**LEVELS


def _positive_ints(name: str, value, length: int | None = None) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints, or a clear error."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"`{name}` must be a sequence of positive ints, got {value!r}")
    items = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ValueError(f"`{name}` must contain positive ints only, got {value!r}")
    if length is not None and len(items) != length:
        raise ValueError(f"`{name}` must have {length} entries, got {len(items)}: {value!r}")
    return items


def decoder_widths(dec) -> tuple[int, ...]:
    """One width per decoder level: an int is used at every level."""
    if isinstance(dec, int) and not isinstance(dec, bool):
        if dec <= 0:
            raise ValueError(f"`dec` must be a positive int or {LEVELS} positive ints, got {dec!r}")
        return (dec,) * LEVELS
    return _positive_ints("dec", dec, LEVELS)


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class UNet3D(nn.Module):
    """Image pair (or any stack of channels) -> dense displacement field.

    Layout: four 3x3x3 stride-2 convs (widths ``enc``) down to 1/16 resolution; four decoder levels,
    each a 3x3x3 conv (width ``dec``), a nearest x2 upsampling and a concatenation with the encoder
    feature (or, at the last level, the input) of the same resolution; the refinement convs
    (widths ``refine``) at full resolution; and a 3x3x3 flow head with weights drawn from N(0, 1e-5)
    and zero bias, so that training starts from a near-identity transform. Every conv but the head
    is followed by LeakyReLU(0.2). With the defaults this is VoxelMorph-2 without its extra conv at
    1/2 resolution.

    Any spatial size works: the input is zero-padded at the far end of each axis up to a multiple of
    16 and the flow is cropped back.

    Returns (N, 3, D, H, W) displacements in voxels, channel k along spatial axis k (D, H, W).
    """

    def __init__(self, in_channels: int, enc: Sequence[int] = (16, 32, 32, 32), dec=32,
                 refine: Sequence[int] = (16, 16)):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(f"`in_channels` must be a positive int, got {in_channels!r}")
        enc = _positive_ints("enc", enc, LEVELS)
        dec = decoder_widths(dec)
        refine = _positive_ints("refine", refine)

        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in enc:
            self.encoder.append(_conv_block(channels, width, stride=2))
            channels = width
        # Skip features from the deepest-but-one encoder level up to the input itself.
        skips = tuple(reversed((in_channels,) + enc[:-1]))
        self.decoder = nn.ModuleList()
        for width, skip in zip(dec, skips):
            self.decoder.append(_conv_block(channels, width))
            channels = width + skip
        self.refine = nn.Sequential(*[_conv_block(c_in, c_out) for c_in, c_out in zip((channels,) + refine, refine)])
        channels = refine[-1] if refine else channels
        self.flow_head = nn.Conv3d(channels, 3, 3, padding=1)
        nn.init.normal_(self.flow_head.weight, std=1e-5)
        nn.init.zeros_(self.flow_head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        multiple = 2**LEVELS
        pad = [(-s) % multiple for s in size]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        features = [x]
        for block in self.encoder:
            features.append(block(features[-1]))
        y = features.pop()
        for block in self.decoder:
            y = F.interpolate(block(y), scale_factor=2, mode="nearest")
            y = torch.cat([y, features.pop()], dim=1)
        flow = self.flow_head(self.refine(y))
        return flow[:, :, : size[0], : size[1], : size[2]]
