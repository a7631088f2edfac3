"""Preprocessing and its inverse: normalisation, square crop, resize, slice selection."""

from __future__ import annotations

import numpy as np
import pytest

from napari_whatishealthy.core.errors import InputError
from napari_whatishealthy.core.preprocess import (
    BACKGROUND,
    denormalise,
    normalise,
    prepare,
    to_volume,
)


def _volume(shape=(24, 24, 6), box=((4, 12), (6, 14)), z=(1, 5), channels=2, seed=0):
    rng = np.random.default_rng(seed)
    data = np.zeros((channels, *shape), np.float32)
    (x0, x1), (y0, y1) = box
    data[:, x0:x1, y0:y1, z[0]:z[1]] = rng.uniform(10, 100, size=(channels, x1 - x0, y1 - y0,
                                                                   z[1] - z[0]))
    return data


def test_identity_when_the_box_is_the_model_size():
    data = _volume()  # brain footprint 8 x 8 + 2 * 4 margin = 16 = model size: no resampling
    prepared = prepare(data, 16)
    assert prepared.box == (0, 2, 16, 16)
    assert list(prepared.slice_index) == [1, 2, 3, 4]
    assert prepared.slices.shape == (4, 2, 16, 16)
    for k, z in enumerate(prepared.slice_index):
        assert np.array_equal(prepared.slices[k], prepared.normalised[:, 0:16, 2:18, z])
    back = to_volume(prepared, prepared.slices, fill=-7.0)
    assert np.array_equal(back[:, 0:16, 2:18, 1:5], prepared.normalised[:, 0:16, 2:18, 1:5])
    # Outside the box and on skipped slices: the fill value.
    assert np.all(back[:, 16:] == -7.0) and np.all(back[:, :, :2] == -7.0)
    assert np.all(back[..., 0] == -7.0) and np.all(back[..., 5] == -7.0)


def test_placement_of_a_single_voxel():
    data = _volume()
    data[:, 9, 7, 3] = 1000.0
    prepared = prepare(data, 16)
    x0, y0, _, _ = prepared.box
    k = list(prepared.slice_index).index(3)
    peak = np.unravel_index(np.argmax(prepared.slices[k, 0]), (16, 16))
    assert peak == (9 - x0, 7 - y0)
    marker = np.zeros_like(prepared.slices)
    marker[k, :, 9 - x0, 7 - y0] = 1.0
    back = to_volume(prepared, marker)
    assert back[0, 9, 7, 3] == 1.0 and back.sum() == 2.0  # one voxel per channel


def test_box_leaving_the_volume_is_padded_with_background():
    data = _volume(shape=(20, 24, 4), box=((0, 8), (10, 18)), z=(0, 4))
    prepared = prepare(data, 16)
    x0, y0, side, _ = prepared.box
    assert x0 < 0 and side == 16
    # The padded part of each slice is background (-1) and maps back nowhere.
    assert np.all(prepared.slices[:, :, : -x0] == BACKGROUND)
    back = to_volume(prepared, prepared.slices)
    assert back.shape == (2, 20, 24, 4)
    assert np.array_equal(back[:, 0 : x0 + side, y0 : y0 + side],
                          prepared.normalised[:, 0 : x0 + side, y0 : y0 + side])


def test_resampled_round_trip_is_close_and_in_place():
    # A smooth brain bigger than the model size: down- then up-sampling loses little.
    x, y = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    disc = ((x - 24) ** 2 + (y - 22) ** 2) < 18**2
    smooth = 50 + 20 * np.sin(x / 9.0) * np.cos(y / 11.0)
    data = np.zeros((1, 48, 48, 3), np.float32)
    data[0, ..., 1] = np.where(disc, smooth, 0)
    prepared = prepare(data, 16)
    assert prepared.box[2] > 16 and list(prepared.slice_index) == [1]
    back = to_volume(prepared, prepared.slices)
    inner = ((x - 24) ** 2 + (y - 22) ** 2) < 13**2
    err = np.abs(back[0, ..., 1] - prepared.normalised[0, ..., 1])[inner]
    assert err.mean() < 0.02
    # A change made in model space comes back where it was made.
    change = np.zeros_like(prepared.slices)
    change[0, 0, 4:7, 10:13] = 1.0
    moved = to_volume(prepared, change)[0, ..., 1]
    cx = (moved.sum(axis=1) * np.arange(48)).sum() / moved.sum()
    cy = (moved.sum(axis=0) * np.arange(48)).sum() / moved.sum()
    side = prepared.box[2]
    ex = prepared.box[0] + (5 + 0.5) * side / 16 - 0.5
    ey = prepared.box[1] + (11 + 0.5) * side / 16 - 0.5
    assert abs(cx - ex) <= 0.5 and abs(cy - ey) <= 0.5


def test_normalisation_maps_the_brain_p99_to_one_and_back():
    data = _volume(channels=3)
    brain = np.any(data != 0, axis=0)
    norm, scales = normalise(data, brain)
    for c in range(3):
        assert np.percentile(norm[c][brain], 99) == pytest.approx(1.0, abs=1e-5)
        assert np.all(norm[c][~brain] == BACKGROUND)
    assert np.allclose(denormalise(norm, scales), data, rtol=1e-5, atol=1e-4)


def test_slices_without_brain_are_skipped_and_empty_volume_is_fine():
    data = _volume(z=(2, 3))
    prepared = prepare(data, 16)
    assert list(prepared.slice_index) == [2]
    empty = prepare(np.zeros((2, 10, 10, 4), np.float32), 16)
    assert empty.slices.shape == (0, 2, 16, 16)
    assert np.all(to_volume(empty, empty.slices) == 0)


def test_a_channel_empty_inside_the_brain_is_refused():
    data = _volume()
    data[1] = 0
    data[1, 0, 0, 0] = 0  # channel 1 zero where channel 0 has brain
    with pytest.raises(InputError, match="channel 1"):
        prepare(data, 16)


@pytest.mark.parametrize("where", ["inside", "leaving the volume", "scattered slices"])
def test_model_slices_are_the_normalised_crop_resized(where):
    """The model input, read straight from the volume into the slice-first layout, equals the
    plain recipe: crop every slice to the box (padding outside), normalise, resize."""
    from napari_whatishealthy.core.preprocess import _crop, _resize, normalise_with

    rng = np.random.default_rng(3)
    data = np.zeros((2, 40, 36, 12), np.float32)
    data[:, 6:30, 8:28, 1:11] = rng.uniform(0, 500, (2, 24, 20, 10))
    data[0, 10, 10, 5] = 1e12  # clipped to the normalised limit
    if where == "leaving the volume":
        data = np.ascontiguousarray(data[:, 4:, :30])  # the square box now leaves the volume
    prepared = prepare(data, 16)
    if where == "scattered slices":
        prepared = prepared.restrict(prepared.slice_index[[0, 3, 4, 8]])
    x0, y0, side, _ = prepared.box
    if where == "leaving the volume":
        assert x0 < 0 or y0 < 0 or x0 + side > data.shape[1] or y0 + side > data.shape[2]
    index = prepared.slice_index
    crop = _crop(data[..., index], x0, y0, side, 0.0)
    brain = _crop(prepared.brain[None, ..., index], x0, y0, side, False)[0]
    expected = _resize(normalise_with(crop, brain, prepared.scale).transpose(3, 0, 1, 2), 16)
    np.testing.assert_array_equal(prepared.slices, expected)
