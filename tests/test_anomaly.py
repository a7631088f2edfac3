"""Difference maps, smoothing, thresholds and masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from napari_whatishealthy.core.anomaly import (
    contrast_signs,
    difference_maps,
    healthy_percentile_threshold,
    make_mask,
    median_smooth,
    otsu_threshold,
)
from napari_whatishealthy.core.errors import WhatIsHealthyError


def test_difference_maps_known_values() -> None:
    original = np.zeros((2, 3, 4), np.float32)  # channels first
    healthy = np.zeros_like(original)
    original[0, 1, 2] = 0.5
    healthy[1, 1, 2] = 0.25
    mean, per_channel = difference_maps(original, healthy, channel_axis=0)
    assert mean.shape == (3, 4) and per_channel.shape == (2, 3, 4)
    assert mean.dtype == np.float32
    assert mean[1, 2] == pytest.approx(0.375)
    assert per_channel[0, 1, 2] == 0.5 and per_channel[1, 1, 2] == 0.25
    assert mean.sum() == pytest.approx(0.375)
    # channel last gives the same map
    mean_last, _ = difference_maps(np.moveaxis(original, 0, -1), np.moveaxis(healthy, 0, -1), -1)
    np.testing.assert_array_equal(mean_last, mean)
    with pytest.raises(WhatIsHealthyError):
        difference_maps(original, healthy[:1], 0)


def test_lesion_contrast_counts_only_the_change_a_lesion_makes_in_each_modality() -> None:
    modalities = ("flair", "t1", "t1ce", "t2")
    signs = contrast_signs(modalities, "expected")
    np.testing.assert_array_equal(signs, [1, -1, 0, 1])  # FLAIR, T2 brighter; T1 darker
    assert not contrast_signs(modalities, "any").any()
    assert contrast_signs(("FLAIR", "dwi"), "expected").tolist() == [1, 0]  # unknown: either
    original = np.zeros((4, 2), np.float32)  # channels first; voxel 0 brighter, 1 darker
    original[:, 0], original[:, 1] = 0.4, -0.4
    healthy = np.zeros_like(original)
    mean, per = difference_maps(original, healthy, 0, signs=signs)
    # brighter counts on FLAIR, T1ce, T2; darker on T1 and T1ce.
    np.testing.assert_allclose(per[:, 0], [0.4, 0.0, 0.4, 0.4])
    np.testing.assert_allclose(per[:, 1], [0.0, 0.4, 0.4, 0.0])
    np.testing.assert_allclose(mean, [0.3, 0.2])
    plain, _ = difference_maps(original, healthy, 0, signs=contrast_signs(modalities, "any"))
    np.testing.assert_allclose(plain, [0.4, 0.4])  # the paper's |difference|
    last, _ = difference_maps(original.T, healthy.T, -1, signs=signs)  # channel last
    np.testing.assert_array_equal(last, mean)
    with pytest.raises(WhatIsHealthyError, match="one sign per channel"):
        difference_maps(original, healthy, 0, signs=signs[:2])
    with pytest.raises(WhatIsHealthyError, match="lesion_contrast must be one of"):
        contrast_signs(modalities, "bright")


def test_median_smooth_per_slice_and_3d() -> None:
    vol = np.zeros((9, 9, 5), np.float32)
    vol[4, 4, 2] = 1.0  # an isolated spike disappears
    vol[2:7, 2:7, :] += 2.0  # a plateau survives
    out = median_smooth(vol, 3, slice_axis=-1)
    assert out[4, 4, 2] == 2.0 and out[0, 0, 0] == 0.0
    # per slice: a spike spanning the slice axis is still removed in-plane only
    col = np.zeros((7, 7, 7), np.float32)
    col[3, 3, :] = 1.0
    assert median_smooth(col, 3, slice_axis=-1).max() == 0.0
    rng = np.random.default_rng(0)
    noisy = rng.random((8, 9, 6)).astype(np.float32)
    np.testing.assert_array_equal(median_smooth(noisy, 3, slice_axis=0),
                                  ndimage.median_filter(noisy, size=(1, 3, 3)))
    np.testing.assert_array_equal(median_smooth(noisy, 5, slice_axis=-1),
                                  ndimage.median_filter(noisy, size=(5, 5, 1)))
    np.testing.assert_array_equal(median_smooth(vol, 3, slice_axis=None),
                                  ndimage.median_filter(vol, size=3))
    np.testing.assert_array_equal(median_smooth(vol, 1), vol)


def test_make_mask_known_map() -> None:
    diff = np.zeros((10, 10, 10), np.float32)
    diff[2:5, 2:5, 2:5] = 0.8  # 27 voxels
    diff[8, 8, 8] = 0.9  # 1 voxel
    diff[0, 9, 0:3] = 0.7  # 3 voxels
    brain = np.ones_like(diff, dtype=bool)
    brain[0] = False
    mask = make_mask(diff, 0.5)
    assert mask.dtype == np.uint8 and mask.sum() == 31
    assert make_mask(diff, 0.8).sum() == 1  # strictly above
    assert make_mask(diff, 0.5, brain_mask=brain).sum() == 28
    assert make_mask(diff, 0.5, min_component_voxels=2).sum() == 30
    assert make_mask(diff, 0.5, min_component_voxels=4).sum() == 27
    assert make_mask(diff, 0.5, min_component_voxels=28).sum() == 0
    assert make_mask(diff, 2.0, min_component_voxels=5).sum() == 0
    # diagonal neighbours: separate under face connectivity, joined under full connectivity
    d2 = np.zeros((5, 5), np.float32)
    d2[1, 1] = d2[2, 2] = d2[3, 3] = 1.0
    assert make_mask(d2, 0.5, min_component_voxels=2).sum() == 0
    assert make_mask(d2, 0.5, min_component_voxels=2, connectivity=2).sum() == 3


def _reference_mask(diff, thr, brain, min_size, connectivity):
    above = diff > thr
    if brain is not None:
        above &= brain
    if min_size > 1:
        lab, _ = ndimage.label(above, ndimage.generate_binary_structure(diff.ndim, connectivity))
        sizes = np.bincount(lab.ravel())
        above = (sizes[lab] >= min_size) & (lab > 0)
    return above.astype(np.uint8)


@settings(max_examples=60, deadline=None)
@given(
    diff=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 6)),
                    elements=st.floats(0, 1, width=32)),
    thr=st.floats(0, 1),
    min_size=st.integers(0, 6),
    connectivity=st.integers(1, 3),
    use_brain=st.booleans(),
)
def test_make_mask_matches_reference(diff, thr, min_size, connectivity, use_brain) -> None:
    brain = (np.indices(diff.shape).sum(0) % 3 != 0) if use_brain else None
    got = make_mask(diff, thr, brain, min_size, connectivity)
    np.testing.assert_array_equal(got, _reference_mask(diff, thr, brain, min_size, connectivity))


def test_make_mask_does_not_touch_its_inputs() -> None:
    rng = np.random.default_rng(0)
    diff = rng.random((20, 20, 8)).astype(np.float32)
    brain = rng.random((20, 20, 8)) > 0.2
    d0, b0 = diff.copy(), brain.copy()
    make_mask(diff, 0.6, brain, 3)
    np.testing.assert_array_equal(diff, d0)
    np.testing.assert_array_equal(brain, b0)


def test_otsu_between_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.03, 5000), rng.normal(0.6, 0.05, 1000)])
    t = otsu_threshold(values)
    assert 0.1 < t < 0.6
    low_mode = np.arange(values.size) < 5000
    assert ((values > t) == ~low_mode).mean() > 0.999  # it separates the two modes
    skimage = pytest.importorskip("skimage.filters")
    assert t == pytest.approx(skimage.threshold_otsu(values), abs=1e-9)
    assert otsu_threshold(np.full(10, 0.3)) == 0.3
    with pytest.raises(WhatIsHealthyError):
        otsu_threshold(np.array([]))


def test_healthy_percentile_threshold() -> None:
    diff = np.concatenate([np.linspace(0, 1, 101), np.full(50, 5.0)])
    healthy = np.zeros(diff.shape, bool)
    healthy[:101] = True
    assert healthy_percentile_threshold(diff, healthy, 99) == pytest.approx(0.99)
    assert healthy_percentile_threshold(diff, healthy, 50) == pytest.approx(0.5)
    # at most (100 - p) % of the healthy region lies above it
    t = healthy_percentile_threshold(diff, healthy, 95)
    assert (diff[healthy] > t).mean() <= 0.05
    with pytest.raises(WhatIsHealthyError):
        healthy_percentile_threshold(diff, np.zeros(diff.shape, bool))


@pytest.mark.parametrize("shape,connectivity", [((30, 25), 1), ((30, 25), 2), ((12, 14, 10), 1),
                                                ((12, 14, 10), 2), ((12, 14, 10), 3)])
def test_component_labels_match_scipy(shape, connectivity):
    from scipy import ndimage

    from napari_whatishealthy.core.anomaly import label_components

    mask = np.random.default_rng(connectivity).random(shape) > 0.6
    sub = mask[1:, ::1][..., 1:]  # a non-contiguous view, as make_mask passes
    labels, count = label_components(sub, connectivity)
    ref, ref_count = ndimage.label(sub, ndimage.generate_binary_structure(sub.ndim, connectivity))
    assert count == ref_count and labels.shape == sub.shape
    # The same partition, up to the numbering of the components.
    pairs = set(zip(labels[sub].tolist(), ref[sub].tolist(), strict=True))
    assert len(pairs) == count and len({a for a, _ in pairs}) == count
    assert not labels[~sub].any()


def test_guided_filter_moves_a_blurred_edge_onto_the_guides_edge() -> None:
    from napari_whatishealthy.core.anomaly import guided_filter

    # A lesion occupying x >= 20 of each slice: the guide (the full-resolution image) has the
    # sharp edge, the map (upsampled from a coarse grid) a ramp 8 voxels wide around it.
    x = np.arange(40, dtype=np.float32)
    guide = np.broadcast_to((x >= 20).astype(np.float32)[:, None, None], (40, 30, 3)).copy()
    ramp = np.clip((x - 16) / 8, 0, 1).astype(np.float32)
    values = np.broadcast_to(ramp[:, None, None], (40, 30, 3)).copy()
    out = guided_filter(values, guide, radius=4, eps=1e-3)
    truth = guide > 0.5
    near = slice(16, 24)  # the ramp
    err_before = np.abs(values - truth)[near].mean()
    err_after = np.abs(out - truth)[near].mean()
    assert err_after < 0.8 * err_before
    # Thresholded at 0.5 the map now ends exactly where the image's edge is (the ramp lost
    # the edge voxel).
    assert not np.array_equal(values[:, 5, 0] > 0.5, truth[:, 5, 0])
    assert np.array_equal(out[:, 5, 0] > 0.5, truth[:, 5, 0])
    # Voxels just outside the edge fall, voxels just inside rise.
    assert out[18, 5, 0] < values[18, 5, 0] and out[21, 5, 0] > values[21, 5, 0]
    # Each slice is filtered on its own: a guide edge in one slice does not leak into another.
    guide[..., 1] = 0.0
    alone = guided_filter(values, guide, radius=4, eps=1e-3)
    assert np.allclose(alone[..., 0], out[..., 0]) and np.allclose(alone[..., 2], out[..., 2])


def test_guided_filter_flat_guide_is_a_box_mean_and_radius_0_a_copy() -> None:
    from scipy import ndimage

    from napari_whatishealthy.core.anomaly import guided_filter
    from napari_whatishealthy.core.errors import WhatIsHealthyError

    rng = np.random.default_rng(0)
    values = rng.random((12, 12, 2)).astype(np.float32)
    flat = np.zeros_like(values)
    out = guided_filter(values, flat, radius=1, eps=1e-3)
    box = ndimage.uniform_filter(ndimage.uniform_filter(values, (3, 3, 1)), (3, 3, 1))
    assert np.allclose(out, box, atol=1e-5)
    same = guided_filter(values, flat, radius=0, eps=1e-3)
    assert np.array_equal(same, values) and same is not values
    with pytest.raises(WhatIsHealthyError, match="differ"):
        guided_filter(values, flat[:-1], radius=1, eps=1e-3)


@pytest.mark.parametrize("workers", [2, 3, 16])
def test_the_filters_on_worker_threads_give_the_same_numbers(monkeypatch, workers) -> None:
    """median_smooth splits the slices and edge_guided the channels over threads (scipy releases
    the GIL): the result must be exactly the one-thread result, whatever the split."""
    from napari_whatishealthy.core import anomaly, runtime
    from napari_whatishealthy.core.anomaly import edge_guided

    rng = np.random.default_rng(1)
    vol = rng.random((4, 20, 18, 7)).astype(np.float32)  # [C, X, Y, n]: 7 slices, uneven splits
    guide = rng.random(vol.shape).astype(np.float32)
    one = (median_smooth(vol[0], 3, slice_axis=-1), median_smooth(vol[0], 3, slice_axis=0),
           edge_guided(vol, guide, 2))
    monkeypatch.setattr(anomaly, "worker_threads", lambda: workers)
    monkeypatch.setattr(runtime, "worker_threads", lambda: workers)
    parts = []
    real = ndimage.median_filter

    def spy(values, *args, **kwargs):
        parts.append(values.shape)
        return real(values, *args, **kwargs)

    monkeypatch.setattr(anomaly.ndimage, "median_filter", spy)
    many = (median_smooth(vol[0], 3, slice_axis=-1), median_smooth(vol[0], 3, slice_axis=0),
            edge_guided(vol, guide, 2))
    # The slices were split into one run per worker (which thread runs which is the pool's).
    assert len(parts) == min(workers, 7) + min(workers, 20)  # 7 slices on -1, 20 on axis 0
    assert sum(p[-1] for p in parts[:min(workers, 7)]) == 7
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(many[0], ndimage.median_filter(vol[0], size=(3, 3, 1)))
