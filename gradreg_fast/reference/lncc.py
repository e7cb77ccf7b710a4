import torch
import torch.nn.functional as F


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a window^3 box around every voxel, zeros outside: conv3d with a ones kernel, padding
    window // 2, stride 1, as VoxelMorph's NCC computes it."""
    kernel = torch.ones((1, 1, window, window, window), dtype=x.dtype, device=x.device)
    return F.conv3d(x, kernel, stride=1, padding=window // 2)


def lncc_map(warped: torch.Tensor, fixed: torch.Tensor, window: int = 9, eps: float = 1e-5,
             convention: str = "voxelmorph", smooth_nr: float = 0.0) -> torch.Tensor:
    """Per-voxel local squared correlation ``cc`` (N, 1, D, H, W), in the formulas of each convention.

    ``fixed`` may have batch 1 against a larger batch of ``warped`` (broadcast, an atlas).
    """
    fixed = fixed.expand_as(warped)
    if convention == "voxelmorph":
        # VoxelMorph's torch NCC: I is the fixed image (y_true), J the warped one (y_pred).
        I, J = fixed, warped
        n = float(window ** 3)
        I_sum, J_sum = _box_sum(I, window), _box_sum(J, window)
        I2_sum, J2_sum, IJ_sum = _box_sum(I * I, window), _box_sum(J * J, window), _box_sum(I * J, window)
        u_I, u_J = I_sum / n, J_sum / n
        cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * n
        I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * n
        J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * n
        return cross * cross / (I_var * J_var + eps)
    # MONAI's LocalNormalizedCrossCorrelationLoss (rectangular kernel): target is the fixed image,
    # pred the warped one; the variances are clamped below at smooth_dr (= eps) with torch.max, and the
    # denominator is their bare product.
    t, p = fixed, warped
    kernel_vol = float(window ** 3)
    t_sum, p_sum = _box_sum(t, window), _box_sum(p, window)
    t2_sum, p2_sum, tp_sum = _box_sum(t * t, window), _box_sum(p * p, window), _box_sum(t * p, window)
    t_avg, p_avg = t_sum / kernel_vol, p_sum / kernel_vol
    cross = tp_sum - p_avg * t_sum
    floor = torch.as_tensor(eps, dtype=t2_sum.dtype, device=t2_sum.device)
    t_var = torch.max(t2_sum - t_avg * t_sum, floor)
    p_var = torch.max(p2_sum - p_avg * p_sum, floor)
    return (cross * cross + smooth_nr) / (t_var * p_var)


def lncc_loss(warped: torch.Tensor, fixed: torch.Tensor, window: int = 9, eps: float = 1e-5, reduction: str = "mean",
              convention: str = "voxelmorph", smooth_nr: float = 0.0) -> torch.Tensor:
    """Reference for :func:`gradreg_fast.lncc_loss`: ``-cc`` reduced (mean, sum) or per voxel ("none")."""
    neg = -lncc_map(warped, fixed, window, eps, convention, smooth_nr)
    if reduction == "mean":
        return neg.mean()
    if reduction == "sum":
        return neg.sum()
    return neg
