"""A Dataset over folders of NIfTI image pairs.

Layout, one folder per case (the case name is the folder name)::

    <root>/<case>/fixed.nii.gz           required
    <root>/<case>/moving.nii.gz          required
    <root>/<case>/fixed_labels.nii.gz    optional (integer label map on the fixed image's grid)
    <root>/<case>/moving_labels.nii.gz   optional

``.nii`` works in place of ``.nii.gz``. Folders whose names start with "." are ignored; any other
folder must hold a case. Loading, resampling onto one physical grid and intensity normalisation are
:func:`gradreg_fast.io.load_pair`'s job; this class only finds the files.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

ROLES = ("fixed", "moving", "fixed_labels", "moving_labels")


def _find(case: Path, role: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        path = case / f"{role}{suffix}"
        if path.is_file():
            return path
    return None


class NiftiPairs(Dataset):
    """Cases of ``root`` in sorted order; item i is ``load_pair(...)``'s dict plus "case" (the folder
    name). Label entries are present only where the case has label files, so that the default
    collate works on uniform folders. Batches of more than one pair need cases of one size.

    Args:
        root: the folder holding one sub-folder per case.
        require_labels: raise at construction unless every case has both label files (validation
            needs them).
    """

    def __init__(self, root, require_labels: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"NiftiPairs: `root` {str(self.root)!r} is not a directory")
        self.cases: list[tuple[str, dict[str, Path | None]]] = []
        for case in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = {role: _find(case, role) for role in ROLES}
            missing = [role for role in ROLES[:2] if files[role] is None]
            if require_labels:
                missing += [role for role in ROLES[2:] if files[role] is None]
            if missing:
                raise FileNotFoundError(
                    f"NiftiPairs: case folder {str(case)!r} has no {', '.join(m + '.nii[.gz]' for m in missing)}")
            self.cases.append((case.name, files))
        if not self.cases:
            raise FileNotFoundError(f"NiftiPairs: no case folders in {str(self.root)!r} (expected "
                                    f"<root>/<case>/fixed.nii.gz and moving.nii.gz)")

    def __len__(self) -> int:
        return len(self.cases)

    def check(self, batch_size: int = 1) -> None:
        """Read every case's headers once (not its voxels), so that a trainer fails before its first step, not
        when a bad case is drawn: an unreadable or non-3D file, a label map off its image's grid, and, for
        batches of more than one pair, cases whose working grids (:func:`gradreg_fast.io.load_pair`'s: the
        fixed image's grid padded to multiples of 16) differ. Each raises a ValueError naming the case."""
        import nibabel as nib
        import numpy as np

        from ..io import PAIR_MULTIPLE, Grid, same_grid

        grids = {}
        for name, files in self.cases:
            headers = {}
            for role, path in files.items():
                if path is None:
                    continue
                try:
                    image = nib.load(str(path))
                    shape, affine = tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64)
                except Exception as exc:  # noqa: BLE001  nibabel's errors have no common base
                    raise ValueError(f"NiftiPairs: case {name!r}: {path} is not a readable NIfTI ({exc})") from None
                if len(shape) < 3 or any(n != 1 for n in shape[3:]):
                    raise ValueError(f"NiftiPairs: case {name!r}: {path} is not a 3D volume (shape {shape})")
                headers[role] = shape[:3], affine
            for image_role in ("fixed", "moving"):
                if f"{image_role}_labels" in headers:
                    (shape, affine), (label_shape, label_affine) = headers[image_role], headers[f"{image_role}_labels"]
                    if not same_grid(shape, affine, label_shape, label_affine):  # as load_pair checks the volumes
                        raise ValueError(f"NiftiPairs: case {name!r}: {image_role}_labels do not lie on the "
                                         f"{image_role} image's grid (shape {label_shape} vs {shape})")
            grids[name] = Grid(*headers["fixed"]).fit(PAIR_MULTIPLE).grid.shape  # load_pair's default
        if batch_size > 1 and len(set(grids.values())) > 1:
            sizes = ", ".join(f"{name} {shape}" for name, shape in grids.items())
            raise ValueError(f"NiftiPairs: batches of {batch_size} pairs need cases of one working-grid size, got "
                             f"{sizes}")

    def __getitem__(self, index: int) -> dict:
        from ..io import load_pair  # imported on use: reading NIfTI is only needed for this dataset

        name, files = self.cases[index]
        pair = load_pair(files["fixed"], files["moving"], fixed_labels=files["fixed_labels"],
                         moving_labels=files["moving_labels"])
        item = {key: value for key, value in pair.items() if value is not None}
        item["case"] = name
        return item
