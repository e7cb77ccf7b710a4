from .box_mean import box_mean
from .cost_volume import mind_cost_volume, mind_cost_volume_displacements
from .coupled_argmin import coupled_argmin
from .gradient_magnitude import gradient_magnitude
from .integrate import compose, integrate_velocity
from .lncc import LNCCLoss, lncc_loss
from .mind import mind, mind_ssc
from .mind_loss import MINDLoss, mind_loss
from .warp import warp
from .warped_sq_diff import warped_sq_diff

__all__ = ["box_mean", "gradient_magnitude", "warp", "mind", "mind_ssc", "mind_loss", "MINDLoss", "mind_cost_volume",
           "mind_cost_volume_displacements", "lncc_loss", "LNCCLoss", "integrate_velocity", "compose", "warped_sq_diff",
           "coupled_argmin"]
