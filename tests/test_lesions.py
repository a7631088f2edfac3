"""Per-lesion statistics and the difference histogram (core.lesions), checked against hand-made
masks whose answers are known."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_whatishealthy.core.errors import InputError
from napari_whatishealthy.core.lesions import (
    difference_histogram,
    lesion_features,
    lesion_table,
    write_lesion_csv,
)


def _two_lesions() -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((20, 30, 40), np.uint8)
    mask[2:6, 10:14, 10:15] = 1  # 4*4*5 = 80 voxels, slices 2..5
    mask[12:13, 20:22, 30:31] = 2  # 2 voxels, slice 12 (painted with another label)
    difference = np.zeros(mask.shape, np.float32)
    difference[2:6, 10:14, 10:15] = 0.5
    difference[3, 11, 12] = 2.0
    difference[12, 20:22, 30] = [0.3, 0.7]
    return mask, difference


def test_lesion_table_counts_volumes_and_values():
    mask, difference = _two_lesions()
    lesions = lesion_table(mask, difference, voxel_volume_mm3=2.0)
    assert [lesion.voxels for lesion in lesions] == [80, 2]  # largest first
    big, small = lesions
    assert big.label == 1 and small.label == 2
    assert big.volume_ml == pytest.approx(80 * 2.0 / 1000)
    assert big.max_difference == pytest.approx(2.0)
    assert big.mean_difference == pytest.approx((79 * 0.5 + 2.0) / 80)
    assert small.mean_difference == pytest.approx(0.5)
    assert small.max_difference == pytest.approx(0.7)
    assert big.centroid == pytest.approx((3.5, 11.5, 12.0))
    assert (big.first_slice, big.last_slice) == (2, 5)
    assert (small.first_slice, small.last_slice) == (12, 12)
    assert np.isnan(big.mean_uncertainty) and np.isnan(big.centroid_mm[0])


def test_corner_touching_voxels_are_separate_lesions():
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[1, 1, 1] = mask[2, 2, 2] = 1  # share only a corner: two lesions (faces connectivity)
    assert len(lesion_table(mask, np.ones(mask.shape), 1.0)) == 2


def test_uncertainty_affine_and_slice_axis():
    mask, difference = _two_lesions()
    uncertainty = np.where(mask > 0, 0.25, 9.0).astype(np.float32)
    affine = np.diag([2.0, 1.0, 0.5, 1.0])
    affine[:3, 3] = (10, 20, 30)
    lesions = lesion_table(mask, difference, 1.0, uncertainty=uncertainty, affine=affine,
                           slice_axis=2)
    big = lesions[0]
    assert big.mean_uncertainty == pytest.approx(0.25)  # only the lesion's voxels count
    assert big.centroid_mm == pytest.approx((10 + 2 * 3.5, 20 + 11.5, 30 + 0.5 * 12.0))
    assert (big.first_slice, big.last_slice) == (10, 14)


def test_empty_mask_and_bad_grids():
    assert lesion_table(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4)), 1.0) == []
    with pytest.raises(InputError, match="not on the mask's grid"):
        lesion_table(np.ones((4, 4, 4), np.uint8), np.zeros((4, 4, 5)), 1.0)


def test_features_and_csv_agree(tmp_path):
    mask, difference = _two_lesions()
    lesions = lesion_table(mask, difference, 1.0)
    features = lesion_features(lesions)
    assert list(features["voxels"]) == [80, 2]
    assert features["volume_ml"].dtype == np.float64
    path = write_lesion_csv(lesions, tmp_path / "lesions.csv", axis_names=("S", "A", "R"))
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["voxels"]) for r in rows] == [80, 2]
    assert float(rows[0]["centroid_S"]) == pytest.approx(3.5)
    assert rows[0]["mean_uncertainty"] == ""  # no uncertainty map: empty, not "nan"
    assert lesion_features([])["voxels"].shape == (0,)


def test_difference_histogram_counts_the_brain_and_marks_thresholds():
    rng = np.random.default_rng(0)
    difference = np.zeros((10, 10, 10), np.float32)
    brain = np.zeros(difference.shape, bool)
    brain[2:8, 2:8, 2:8] = True
    inside = brain.sum()
    low = rng.normal(0.05, 0.01, inside // 2)
    high = rng.normal(0.6, 0.05, inside - inside // 2)
    difference[brain] = np.concatenate([low, high])
    difference[0, 0, 0] = 50.0  # outside the brain: not counted
    hist = difference_histogram(difference, brain, recommended=0.2, bins=32)
    assert hist.counts.sum() == inside
    assert hist.edges[-1] < 1.0  # the range is the brain's, not the outlier's
    assert low.max() <= hist.otsu < high.min()  # separates the two populations
    assert hist.recommended == 0.2
    clipped = difference_histogram(difference, brain, recommended=0.2, bins=8, top=0.3)
    assert clipped.counts.sum() == inside and clipped.edges[-1] == pytest.approx(0.3)
    empty = difference_histogram(difference, np.zeros_like(brain), recommended=0.2)
    assert empty.otsu is None and empty.counts.sum() == 0
