"""Registration networks: the gradient-guided dual-branch net (Xu et al., ICASSP 2021) and VoxelMorph."""

from .dual_branch import MODELS, DualBranchNet, RegistrationOutput, VoxelMorph, build_model
from .unet import UNet3D

__all__ = ["DualBranchNet", "VoxelMorph", "UNet3D", "RegistrationOutput", "build_model", "MODELS"]
