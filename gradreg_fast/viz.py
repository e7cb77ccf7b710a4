"""The overview figure of a registration: fixed, moving, warped, a checkerboard and label contours in
three planes.

Volumes are arrays on one grid (NIfTI index order) with that grid's affine. For display they are
reoriented to the closest RAS+ axes, so axial, coronal and sagittal views come out upright whatever the
scan's orientation; axial and coronal views use the radiological convention (patient right on the
left), and pixel aspect follows the voxel spacing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._atomic import atomic_output

CONTOUR_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#ffff33", "#a65628", "#f781bf")


def to_ras(volume: np.ndarray, affine: np.ndarray):
    """(volume reoriented to the closest RAS+ axes, its voxel spacing in that order)."""
    import nibabel as nib

    orientation = nib.orientations.io_orientation(affine)  # row i: (output axis of input axis i, flip)
    reoriented = nib.orientations.apply_orientation(volume, orientation)
    spacing = np.empty(3)
    spacing[orientation[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    return reoriented, spacing


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """A 2D checkerboard of two images of one shape, ``tiles`` squares along the longer side."""
    step = max(1, max(a.shape) // tiles)
    rows, cols = np.indices(a.shape)
    return np.where(((rows // step) + (cols // step)) % 2 == 0, a, b)


def _planes(volume: np.ndarray, centre, spacing):
    """Axial, coronal and sagittal slices through ``centre``, each (image rows x cols, aspect)."""
    i, j, k = centre
    return [
        (volume[:, :, k].T, spacing[1] / spacing[0]),  # axial: rows = A, cols = R
        (volume[:, j, :].T, spacing[2] / spacing[0]),  # coronal: rows = S, cols = R
        (volume[i, :, :].T, spacing[2] / spacing[1]),  # sagittal: rows = S, cols = A
    ]


def label_centre(labels: np.ndarray | None, shape) -> tuple:
    """Voxel through which to cut: the centre of mass of the labels, else the volume's centre."""
    if labels is not None and np.any(labels > 0):
        return tuple(int(round(c)) for c in np.argwhere(labels > 0).mean(axis=0))
    return tuple(n // 2 for n in shape)


def overview(path, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, grid, fixed_labels=None,
             warped_labels=None, label_names: dict | None = None, title: str | None = None) -> Path:
    """Write the overview PNG (atomically) and return its path.

    Args:
        fixed, moving, warped: 3D arrays on ``grid`` (a :class:`gradreg_fast.io.Grid`), intensities in [0, 1].
        fixed_labels, warped_labels: optional 3D label maps on the grid; drawn as contours on the fixed
            image (fixed solid, warped dashed).
        label_names: {id: name} for the legend.
    """
    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    volumes = {name: to_ras(np.asarray(v, dtype=np.float32), grid.affine)[0]
               for name, v in (("fixed", fixed), ("moving", moving), ("warped", warped))}
    spacing = to_ras(np.asarray(fixed), grid.affine)[1]
    labels = {}
    if fixed_labels is not None and warped_labels is not None:
        labels = {"fixed": to_ras(np.asarray(fixed_labels), grid.affine)[0],
                  "warped": to_ras(np.asarray(warped_labels), grid.affine)[0]}
    centre = label_centre(labels.get("fixed"), volumes["fixed"].shape)
    ids = sorted({int(v) for m in labels.values() for v in np.unique(m)} - {0})

    columns = ["fixed", "moving (initial alignment)", "warped", "checkerboard fixed / warped", "labels on fixed"]
    planes = ["axial", "coronal", "sagittal"]
    extent = np.asarray(volumes["fixed"].shape) * spacing  # mm along R, A, S
    ratios = [max(0.2, extent[1] / extent[0]), max(0.2, extent[2] / extent[0]), max(0.2, extent[2] / extent[1])]
    width = 3.2
    fig = Figure(figsize=(width * len(columns), width * sum(ratios) + (1.2 if ids else 0.6)))
    axes = fig.subplots(len(planes), len(columns), squeeze=False, gridspec_kw={"height_ratios": ratios})
    cut = {name: _planes(v, centre, spacing) for name, v in volumes.items()}
    cut_labels = {name: _planes(v, centre, spacing) for name, v in labels.items()}
    for row, plane in enumerate(planes):
        fixed_slice, aspect = cut["fixed"][row]
        images = [fixed_slice, cut["moving"][row][0], cut["warped"][row][0],
                  checkerboard(fixed_slice, cut["warped"][row][0]), fixed_slice]
        for col, image in enumerate(images):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", origin="lower", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
            ax.set_anchor("C")
            if col == len(columns) - 1:
                for n, label in enumerate(ids):
                    colour = CONTOUR_COLOURS[n % len(CONTOUR_COLOURS)]
                    for name, style in (("fixed", "solid"), ("warped", "dashed")):
                        mask = (cut_labels[name][row][0] == label).astype(float)
                        if mask.any() and not mask.all():
                            ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.0, linestyles=style)
            if row < 2:
                ax.invert_xaxis()  # radiological: patient right on the left
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
        axes[row, 0].set_ylabel(plane, fontsize=9)
    if ids:
        names = label_names or {}
        handles = [Line2D([], [], color=CONTOUR_COLOURS[n % len(CONTOUR_COLOURS)], label=names.get(label, str(label)))
                   for n, label in enumerate(ids)]
        handles += [Line2D([], [], color="k", linestyle="solid", label="fixed labels"),
                    Line2D([], [], color="k", linestyle="dashed", label="warped labels")]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if ids else 0, 1, 0.95 if title else 1))
    with atomic_output(path, ".png") as temp:
        fig.savefig(temp, dpi=100)
    return path
