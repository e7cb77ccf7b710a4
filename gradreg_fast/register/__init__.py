"""Registration of one pair: initial alignment, affine, deformable instance optimisation, and the pipeline
that runs them on NIfTI files (:func:`register`)."""

from .affine import AffineResult, body_mask, moments_init, optimize_affine
from .deformable import FieldResult, FieldSettings, integrate, optimize_field, optimize_network
from .pipeline import Result, Settings, quick_settings, register, save_result, thorough_settings

__all__ = ["register", "save_result", "Settings", "Result", "FieldSettings", "FieldResult", "optimize_field",
           "optimize_network", "optimize_affine", "AffineResult", "moments_init", "body_mask", "integrate",
           "quick_settings", "thorough_settings"]
