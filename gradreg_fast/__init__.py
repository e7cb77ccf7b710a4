"""gradreg_fast: fused kernels for multimodal deformable registration, and the gradient-guided
dual-branch network of Xu et al. (ICASSP 2021) on top."""

from ._backend import cpu_core as _cpu_core
from ._backend import get_backend, set_backend
from .ops import (MINDLoss, gradient_magnitude, mind, mind_cost_volume, mind_cost_volume_displacements, mind_loss,
                  mind_ssc, warp)
from .ops import LNCCLoss, compose, integrate_velocity, lncc_loss
from .ops import box_mean, coupled_argmin, warped_sq_diff

# The compiled CPU core is imported now (None where it is missing: the ops then fall back to the
# reference), so that `gradreg_fast._C.cpu_isa()` works after a plain `import gradreg_fast`.
_cpu_core()

__version__ = "0.1.0"
__all__ = ["gradient_magnitude", "warp", "mind", "mind_ssc", "mind_loss", "MINDLoss", "set_backend", "get_backend",
           "mind_cost_volume", "mind_cost_volume_displacements", "lncc_loss", "LNCCLoss", "integrate_velocity",
           "compose", "warped_sq_diff", "coupled_argmin", "box_mean"]
