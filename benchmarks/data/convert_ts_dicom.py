"""Build benchmarks/data/ts_dicom_ct/ from TotalSegmentator's DICOM example CT and its segmentation.

Source: repository wasserth/TotalSegmentator (Apache-2.0), tests/reference_files/example_ct_dicom/ (20 axial
slices, 512 x 512, 0.977 x 0.977 mm, 2 mm apart) and tests/reference_files/example_seg_dicom.nii.gz (the
segmentation model's labels of that series, "total" task ids). A third subject beside the bundled pair's two:
the inter-subject validation cases of benchmarks/validation.py use it.

The CT is assembled in the label map's voxel order and affine (the label map's second axis runs against the
DICOM rows: checked here, the body mask of the CT must hold the labelled voxels), then both are reduced 3x in
plane to keep the files small: the CT by 3 x 3 block means (int16 HU), the labels by each block's centre
voxel (nearest neighbour; the same geometry as the means). Columns and rows 0 and 511 are cut so that 510 = 3 x 170.

Usage (needs pydicom; not part of the package or the tests):

    python benchmarks/data/convert_ts_dicom.py SOURCE_DIR OUT_DIR

SOURCE_DIR holds example_ct_dicom/ and example_seg_dicom.nii.gz.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from gradreg_fast.io import write_nifti

FACTOR, CROP = 3, 1


def load_series(folder: Path):
    import pydicom

    slices = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    if [float(v) for v in slices[0].ImageOrientationPatient] != [1, 0, 0, 0, 1, 0]:
        raise ValueError("expected axial slices with identity orientation")
    hu = np.stack([s.pixel_array.astype(np.float64) * float(s.RescaleSlope) + float(s.RescaleIntercept)
                   for s in slices], -1)  # (row, column, slice)
    origin = np.array([float(v) for v in slices[0].ImagePositionPatient])
    row_mm, column_mm = (float(v) for v in slices[0].PixelSpacing)
    slice_mm = float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2])
    lps = np.array([[column_mm, 0, 0, origin[0]], [0, row_mm, 0, origin[1]], [0, 0, slice_mm, origin[2]], [0, 0, 0, 1]])
    return np.transpose(hu, (1, 0, 2)), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # (column, row, slice), RAS


def main(source: Path, out: Path) -> None:
    hu, ct_affine = load_series(source / "example_ct_dicom")
    seg = nib.load(str(source / "example_seg_dicom.nii.gz"))
    labels = np.asarray(seg.dataobj).astype(np.uint8)
    index_map = np.linalg.inv(ct_affine) @ seg.affine  # label voxel -> CT voxel
    if not np.allclose(index_map, np.round(index_map)) or labels.shape != hu.shape:
        raise ValueError("the label map is not a permutation/flip of the CT's voxels")
    # Put the CT on the label map's voxels.
    coords = np.einsum("ij,j...->i...", index_map[:3, :3], np.indices(labels.shape)) \
        + index_map[:3, 3].reshape(3, 1, 1, 1)
    hu = hu[tuple(np.round(coords).astype(int))]
    inside = hu[labels > 0] > -300
    if inside.mean() < 0.95:
        raise ValueError(f"only {inside.mean():.1%} of the labelled voxels lie in the CT's body: misaligned")
    if hu.shape[0] != hu.shape[1]:
        raise ValueError(f"expected square slices, got {hu.shape[:2]}")
    size = (hu.shape[0] - 2 * CROP) // FACTOR
    cut = slice(CROP, CROP + FACTOR * size)
    hu, labels = hu[cut, cut], labels[cut, cut]
    hu_small = hu.reshape(size, FACTOR, size, FACTOR, -1).mean((1, 3))
    labels_small = labels[FACTOR // 2::FACTOR, FACTOR // 2::FACTOR]
    scale = np.diag([FACTOR, FACTOR, 1.0, 1.0])
    scale[:2, 3] = CROP + FACTOR // 2  # a block's centre voxel
    affine = seg.affine @ scale
    out.mkdir(parents=True, exist_ok=True)
    write_nifti(out / "ct.nii.gz", np.round(hu_small), affine, np.int16, force=True)
    write_nifti(out / "ct_labels.nii.gz", labels_small, affine, np.uint8, force=True)
    print(f"wrote {out}: {hu_small.shape}, spacing {np.sqrt((affine[:3, :3] ** 2).sum(0))}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
