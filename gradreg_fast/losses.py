"""The training loss of Xu et al. (ICASSP 2021), eq. 2, over the package's fused MIND loss.

    L = (L_isim + alpha * L_gsim) + (gamma * L_igreg + beta * L_greg)

    L_isim  = sim(warp(moving, phi_ig), fixed)          L_igreg = reg(phi_ig)
    L_gsim  = sim(warp(G(moving), phi_g), G(fixed))     L_greg  = reg(phi_g)

``sim`` is :func:`gradreg_fast.mind_loss` (MIND-SSC with an L1 penalty by default), ``reg`` is
:func:`flow_smoothness` and ``G`` is :func:`gradreg_fast.gradient_magnitude`. For the VoxelMorph
baselines (no gradient branch) only the image terms remain: L = L_isim + gamma * L_igreg.
"""

from __future__ import annotations


import torch
from torch import nn

from .ops import gradient_magnitude, mind_loss

PRESETS = {
    # alpha, beta, gamma of the paper's two data sets.
    "pig_kidney": {"alpha": 0.4, "beta": 0.3, "gamma": 0.8},
    "abdomen": {"alpha": 0.5, "beta": 0.5, "gamma": 1.0},
}
DEFAULT_PRESET = "abdomen"


def flow_smoothness(flow: torch.Tensor) -> torch.Tensor:
    """Mean squared spatial gradient of a displacement field (VoxelMorph's ``Grad('l2')``).

    Stencil: forward differences ``u(x + e_a) - u(x)`` along each spatial axis a, taken only between
    voxels inside the volume (no padding). The squared differences are averaged over all channels,
    batch items and valid positions of each axis separately, and the three axis means are summed and
    divided by 3. An axis of size 1 has no differences and contributes 0.

    Args:
        flow: (N, 3, D, H, W) displacement.

    Returns:
        A scalar tensor, differentiable w.r.t. ``flow``.
    """
    if not isinstance(flow, torch.Tensor):
        raise TypeError(f"flow_smoothness: `flow` must be a torch.Tensor, got {type(flow).__name__}")
    if flow.dim() != 5 or flow.shape[1] != 3 or flow.numel() == 0:
        raise ValueError(f"flow_smoothness: `flow` must have shape (N, 3, D, H, W) and not be empty, got "
                         f"{tuple(flow.shape)}")
    if not flow.is_floating_point():
        raise ValueError(f"flow_smoothness: `flow` must be a floating-point tensor, got {flow.dtype}")
    total = flow.new_zeros(())
    for axis in (2, 3, 4):
        if flow.shape[axis] > 1:
            total = total + flow.diff(dim=axis).square().mean()
    return total / 3


def _weight(name: str, value) -> float:
    from .ops._common import check_number_argument

    return check_number_argument("RegistrationLoss", name, value)


class RegistrationLoss(nn.Module):
    """Eq. 2 of the paper; ``loss, terms = loss_fn(output, moving, fixed)``.

    The weights come from the arguments; those left as None come from ``preset`` ("abdomen":
    alpha=0.5, beta=0.5, gamma=1; "pig_kidney": alpha=0.4, beta=0.3, gamma=0.8), and with no preset
    from "abdomen".

    Args:
        alpha: weight of L_gsim. beta: weight of L_greg. gamma: weight of L_igreg.
        preset: None, "abdomen" or "pig_kidney".
        descriptor, penalty: passed to :func:`gradreg_fast.mind_loss` ("ssc"/"mind", "l1"/"l2").

    Returns of forward:
        ``loss``: the weighted total (a scalar with autograd), and ``terms``: the unweighted terms as
        detached scalar tensors, "isim" and "igreg", plus "gsim" and "greg" when the model has a
        gradient branch (VoxelMorph has none, and its loss is L_isim + gamma * L_igreg).
    """

    def __init__(self, alpha: float | None = None, beta: float | None = None, gamma: float | None = None,
                 preset: str | None = None, descriptor: str = "ssc", penalty: str = "l1"):
        super().__init__()
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"RegistrationLoss: `preset` must be None or one of {tuple(PRESETS)}, got {preset!r}")
        defaults = PRESETS[preset or DEFAULT_PRESET]
        given = {"alpha": alpha, "beta": beta, "gamma": gamma}
        weights = {k: _weight(k, defaults[k] if v is None else v) for k, v in given.items()}
        self.alpha, self.beta, self.gamma = weights["alpha"], weights["beta"], weights["gamma"]
        # Checked here, not at the first forward, so that a bad configuration fails before training.
        if descriptor not in ("ssc", "mind"):
            raise ValueError(f"RegistrationLoss: `descriptor` must be 'ssc' or 'mind', got {descriptor!r}")
        if penalty not in ("l1", "l2"):
            raise ValueError(f"RegistrationLoss: `penalty` must be 'l1' or 'l2', got {penalty!r}")
        self.descriptor, self.penalty = descriptor, penalty

    def similarity(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mind_loss(warped, target, descriptor=self.descriptor, penalty=self.penalty)

    def forward(self, output, moving: torch.Tensor, fixed: torch.Tensor):
        # ``moving`` is not needed: the output already holds its warped image and gradient map.
        if not all(hasattr(output, name) for name in ("warped", "flow", "flow_gradient")):
            raise TypeError("RegistrationLoss: `output` must be a model's RegistrationOutput (with warped, flow, "
                            f"flow_gradient, ...), got {type(output).__name__}")
        isim = self.similarity(output.warped, fixed)
        igreg = flow_smoothness(output.flow)
        total = isim + self.gamma * igreg
        terms = {"isim": isim.detach(), "igreg": igreg.detach()}
        if output.flow_gradient is not None:
            fixed_gradient = output.fixed_gradient if output.fixed_gradient is not None else gradient_magnitude(fixed)
            gsim = self.similarity(output.warped_gradient, fixed_gradient)
            greg = flow_smoothness(output.flow_gradient)
            total = total + self.alpha * gsim + self.beta * greg
            terms.update(gsim=gsim.detach(), greg=greg.detach())
        return total, terms

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, descriptor={self.descriptor!r}, "
                f"penalty={self.penalty!r}")
