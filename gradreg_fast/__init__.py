"""gradreg_fast: fused kernels for multimodal deformable registration, and the gradient-guided
dual-branch network of Xu et al. (ICASSP 2021) on top."""

from ._backend import get_backend, set_backend
from .ops import (MINDLoss, gradient_magnitude, mind, mind_cost_volume, mind_cost_volume_displacements, mind_loss,
                  mind_ssc, warp)

__version__ = "0.1.0"
__all__ = ["gradient_magnitude", "warp", "mind", "mind_ssc", "mind_loss", "MINDLoss", "set_backend", "get_backend",
           "mind_cost_volume", "mind_cost_volume_displacements"]
