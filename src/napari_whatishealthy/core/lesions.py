"""What a reader of a lesion map looks at: one row per lesion, and the histogram of the map.

:func:`lesion_table` lists the connected components of a mask (cc3d's labelling and statistics)
with their volume, the difference (and uncertainty) inside them, their centroid and the slices
they span; :func:`write_lesion_csv` writes it. :func:`difference_histogram` is the histogram of
the brain's difference values with the thresholds a user compares (current, the model's
recommended, Otsu). Qt-free: the widget shows these, the CLI could write them.

Arrays may be in any axis order as long as they share it; ``slice_axis`` names the axis whose
index is "the slice" (0 for napari's ``(S, A, R)`` layers, 2 for the core's ``[X, Y, Z]``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .anomaly import bounding_box, otsu_threshold
from .errors import InputError

__all__ = [
    "Lesion",
    "DifferenceHistogram",
    "lesion_table",
    "lesion_features",
    "write_lesion_csv",
    "difference_histogram",
]

# Faces only: the same components as the mask's minimum-size filter (anomaly.make_mask).
CONNECTIVITY = 6


@dataclass(frozen=True)
class Lesion:
    """One connected component of a mask. ``centroid`` is in array indices (the arrays' axis
    order); ``centroid_mm`` in world millimetres when an affine was given (else NaN)."""

    label: int
    voxels: int
    volume_ml: float
    max_difference: float
    mean_difference: float
    mean_uncertainty: float  # NaN without an uncertainty map
    centroid: tuple[float, float, float]
    centroid_mm: tuple[float, float, float]
    first_slice: int
    last_slice: int


def _check_same_shape(name: str, array: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if array is not None and tuple(np.shape(array)) != shape:
        raise InputError(
            f"the {name} map {tuple(np.shape(array))} is not on the mask's grid {shape}"
        )


def _checked_mask(mask: np.ndarray, difference: np.ndarray, uncertainty: np.ndarray | None,
                  slice_axis: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(f"a lesion table needs a 3D mask, got {mask.ndim}D")
    shape = tuple(mask.shape)
    _check_same_shape("difference", difference, shape)
    _check_same_shape("uncertainty", uncertainty, shape)
    if not 0 <= slice_axis < 3:
        raise InputError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
    return mask


def _checked_affine(affine: np.ndarray | None) -> np.ndarray | None:
    matrix = None if affine is None else np.asarray(affine, dtype=float)
    if matrix is not None and matrix.shape != (4, 4):
        raise InputError(f"the affine must be 4 x 4, got {matrix.shape}")
    return matrix


def lesion_table(
    mask: np.ndarray,
    difference: np.ndarray,
    voxel_volume_mm3: float,
    uncertainty: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    slice_axis: int = 0,
) -> list[Lesion]:
    """The lesions of ``mask`` (voxels > 0, face-connected), largest first.

    ``voxel_volume_mm3``: the volume of one voxel; ``affine``: the 4 x 4 matrix from array
    indices to world millimetres (for ``centroid_mm``). Only the bounding box of the mask is
    labelled, so a small lesion load costs little on a large volume.
    """
    import cc3d

    mask = _checked_mask(mask, difference, uncertainty, slice_axis)
    foreground = mask > 0
    box = bounding_box(foreground)
    if box is None:
        return []
    offset = np.array([s.start for s in box], dtype=float)
    labels = cc3d.connected_components(
        np.ascontiguousarray(foreground[box]), connectivity=CONNECTIVITY
    )
    stats = cc3d.statistics(labels)
    counts = np.asarray(stats["voxel_counts"])
    n = counts.size - 1  # label 0 is the background
    if n <= 0:
        return []
    fg = labels > 0
    ids = labels[fg]
    diff = np.asarray(difference)[box][fg].astype(np.float64)
    sums = np.bincount(ids, weights=diff, minlength=n + 1)
    maxima = np.full(n + 1, -np.inf)
    np.maximum.at(maxima, ids, diff)
    unc_sums = None
    if uncertainty is not None:
        unc = np.asarray(uncertainty)[box][fg].astype(np.float64)
        unc_sums = np.bincount(ids, weights=unc, minlength=n + 1)
    centroids = np.asarray(stats["centroids"], dtype=float) + offset
    boxes = stats["bounding_boxes"]
    matrix = _checked_affine(affine)
    voxel_ml = float(voxel_volume_mm3) / 1000.0
    lesions: list[Lesion] = []
    for label in range(1, n + 1):
        count = int(counts[label])
        if count == 0:
            continue
        centroid = tuple(float(c) for c in centroids[label])
        if matrix is not None:
            world = matrix @ np.array([*centroid, 1.0])
            centroid_mm = tuple(float(w) for w in world[:3])
        else:
            centroid_mm = (float("nan"),) * 3
        span = boxes[label][slice_axis]
        first = int(span.start + offset[slice_axis])
        last = int(span.stop + offset[slice_axis]) - 1
        lesions.append(
            Lesion(
                label=0,
                voxels=count,
                volume_ml=count * voxel_ml,
                max_difference=float(maxima[label]),
                mean_difference=float(sums[label] / count),
                mean_uncertainty=(float(unc_sums[label] / count) if unc_sums is not None
                                  else float("nan")),
                centroid=centroid,  # type: ignore[arg-type]
                centroid_mm=centroid_mm,  # type: ignore[arg-type]
                first_slice=first,
                last_slice=last,
            )
        )
    lesions.sort(key=lambda lesion: (-lesion.voxels, lesion.centroid))
    return [_relabel(lesion, i + 1) for i, lesion in enumerate(lesions)]


def _relabel(lesion: Lesion, label: int) -> Lesion:
    values = asdict(lesion)
    values["label"] = label
    return Lesion(**values)


COLUMNS = (
    "lesion", "voxels", "volume_ml", "max_difference", "mean_difference", "mean_uncertainty",
    "centroid_0", "centroid_1", "centroid_2", "centroid_mm_0", "centroid_mm_1", "centroid_mm_2",
    "first_slice", "last_slice",
)


def lesion_features(lesions: Sequence[Lesion]) -> dict[str, np.ndarray]:
    """The table as columns (napari layer ``features`` / a pandas DataFrame / the CSV)."""
    columns: dict[str, list[float]] = {name: [] for name in COLUMNS}
    for lesion in lesions:
        row = _row(lesion)
        for name in COLUMNS:
            columns[name].append(row[name])
    return {
        name: np.asarray(values, dtype=np.int64 if name in _INTEGER else np.float64)
        for name, values in columns.items()
    }


_INTEGER = {"lesion", "voxels", "first_slice", "last_slice"}


def _row(lesion: Lesion) -> dict[str, float]:
    row: dict[str, float] = {}
    for f in fields(Lesion):
        value = getattr(lesion, f.name)
        if f.name == "label":
            row["lesion"] = value
        elif isinstance(value, tuple):
            for i, v in enumerate(value):
                row[f"{f.name}_{i}"] = v
        else:
            row[f.name] = value
    return row


def write_lesion_csv(
    lesions: Sequence[Lesion], path: str | Path, axis_names: Sequence[str] | None = None,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Write the table as CSV (one row per lesion; NaN cells empty), replacing an earlier table
    but never one of ``inputs`` (see :mod:`.output`). ``axis_names`` rename the centroid columns
    (``("S", "A", "R")`` gives ``centroid_S``, ``centroid_mm_S``...)."""
    from .output import write_file

    path = Path(path)
    header = list(COLUMNS)
    if axis_names is not None:
        if len(axis_names) != 3:
            raise InputError(f"three axis names are needed, got {list(axis_names)}")
        for i, axis in enumerate(axis_names):
            header[header.index(f"centroid_{i}")] = f"centroid_{axis}"
            header[header.index(f"centroid_mm_{i}")] = f"centroid_mm_{axis}"

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for lesion in lesions:
                row = _row(lesion)
                writer.writerow([_cell(row[name]) for name in COLUMNS])

    return write_file(path, write, inputs, overwrite=True)


def _cell(value: float) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if not np.isfinite(value):
        return ""
    return f"{float(value):.6g}"


@dataclass(frozen=True)
class DifferenceHistogram:
    """Counts of the brain's difference values in ``edges`` bins, and the thresholds to mark."""

    counts: np.ndarray
    edges: np.ndarray
    recommended: float
    otsu: float | None  # None when the brain holds no values


def difference_histogram(
    difference: np.ndarray,
    brain: np.ndarray | None,
    recommended: float,
    bins: int = 128,
    top: float | None = None,
) -> DifferenceHistogram:
    """The histogram of ``difference`` inside ``brain`` (all voxels without one) from 0 to
    ``top`` (default: the largest value), with the model's recommended and Otsu's threshold.

    Values above ``top`` are counted in the last bin, so the counts add up to the brain's size.
    """
    difference = np.asarray(difference)
    if brain is not None:
        _check_same_shape("brain", brain, tuple(difference.shape))
        values = difference[np.asarray(brain, dtype=bool)]
    else:
        values = difference.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        edges = np.linspace(0.0, max(float(top or 0.0), 1e-3), bins + 1)
        return DifferenceHistogram(np.zeros(bins, np.int64), edges, float(recommended), None)
    high = float(values.max()) if top is None else float(top)
    high = max(high, float(recommended), 1e-6)
    clipped = np.clip(values, 0.0, high)
    counts, edges = np.histogram(clipped, bins=int(bins), range=(0.0, high))
    return DifferenceHistogram(counts.astype(np.int64), edges, float(recommended),
                               float(otsu_threshold(values)))
