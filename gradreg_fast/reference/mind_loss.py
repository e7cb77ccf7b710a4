import torch

from .mind import mind, mind_ssc


def mind_loss(warped, fixed, descriptor="ssc", penalty="l1", radius=None, dilation=None, reduction="mean",
              per_item=False):
    """Reference for :func:`gradreg_fast.mind_loss`: descriptors of both images, then the penalty."""
    fn = mind_ssc if descriptor == "ssc" else mind
    kwargs = {}
    if radius is not None:
        kwargs["radius"] = radius
    if dilation is not None:
        kwargs["dilation"] = dilation
    diff = fn(warped, per_item=per_item, **kwargs) - fn(fixed, per_item=per_item, **kwargs)
    loss = diff.abs() if penalty == "l1" else diff * diff
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
