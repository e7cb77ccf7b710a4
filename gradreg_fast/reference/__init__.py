"""Naive PyTorch references for every op.

These are written for clarity, not speed. They define the exact semantics
that the fused CPU, CUDA and Triton kernels are tested against, and they are
the fallback when no compiled core is available. They use only differentiable
torch operations, so autograd gives their backward.
"""

from .box_mean import box_mean, box_mean_adjoint
from .cost_volume import mind_cost_volume
from .coupled_argmin import coupled_argmin
from .cost_volume import mind_cost_volume_displacements
from .gradient_magnitude import gradient_magnitude
from .integrate import compose, integrate_velocity, integrate_velocity_grid_sample
from .lncc import lncc_loss, lncc_map
from .warp import nearest_source as warp_nearest_source
from .warp import warp
from .warped_sq_diff import warped_sq_diff
from .mind import mind, mind_ssc, mind_ssc_convexadam
from .mind_loss import mind_loss

__all__ = ["box_mean", "box_mean_adjoint", "lncc_loss", "lncc_map", "integrate_velocity", "integrate_velocity_grid_sample", "compose",
           "gradient_magnitude", "warp", "mind", "mind_ssc", "mind_ssc_convexadam", "mind_loss", "warp_nearest_source",
           "mind_cost_volume", "mind_cost_volume_displacements", "warped_sq_diff", "coupled_argmin"]
