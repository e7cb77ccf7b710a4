"""Data sets: synthetic multimodal pairs with known correspondence, and folders of NIfTI pairs."""

from .nifti import NiftiPairs
from .synthetic import SyntheticPairs, make_pair

__all__ = ["SyntheticPairs", "make_pair", "NiftiPairs"]
