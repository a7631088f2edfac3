"""The localize pipeline: settings, the mapping of model-space changes back to the volume,
thresholds and re-masking, previews, bad input, output files and provenance."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, tiny_spec
from scipy import ndimage

from napari_whatishealthy.core import pipeline
from napari_whatishealthy.core.counterfactual import Progress
from napari_whatishealthy.core.errors import InputError, WhatIsHealthyError
from napari_whatishealthy.core.pipeline import (
    LocalizeSettings,
    iter_localize,
    localize,
    parse_threshold,
    remask,
    threshold_region,
)
from napari_whatishealthy.core.registry import load_model_cached
from napari_whatishealthy.core.results import output_paths, write_outputs
from napari_whatishealthy.core.volume import load_volume


class ZeroEps(torch.nn.Module):
    """Predicts zero noise: DDIM inversion and decoding then return the input unchanged."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, labels):
        return torch.zeros_like(x)


def _box_volume(seed=0):
    """4 channels, brain 8 x 8 in-plane on z 1..4: its crop box is exactly 16 x 16 (no resize),
    at x 0..15, y 2..17."""
    rng = np.random.default_rng(seed)
    data = np.zeros((4, 24, 24, 6), np.float32)
    data[:, 4:12, 6:14, 1:5] = rng.uniform(100, 400, size=(4, 8, 8, 4))
    return data


def _fake_counterfactual(change):
    """A stand-in for iter_counterfactual: ``change(slices)`` gives the healthy slices."""
    calls = []

    def fake(model, slices, settings):
        calls.append(slices.shape)

        def gen():
            yield Progress(1, 1, "decode")
            return change(slices.copy())

        return gen()

    return fake, calls


# --------------------------------------------------------------------------------------------
# settings


def test_settings_from_spec_and_overrides():
    spec = tiny_spec()
    s = LocalizeSettings.from_spec(spec)
    assert (s.guidance, s.noise_level, s.steps) == (spec.inference.guidance, 0.2, 2)
    assert s.threshold == "auto" and s.min_component_voxels == 2
    s = LocalizeSettings.from_spec(spec, guidance=None, steps=5, threshold="0.3")
    assert s.steps == 5 and s.threshold == 0.3 and s.guidance == spec.inference.guidance
    assert s.target_label == spec.labels["healthy"]  # the diffusion part is in the same type
    with pytest.raises(WhatIsHealthyError, match="unknown setting"):
        LocalizeSettings.from_spec(spec, guidanse=2.0)
    with pytest.raises(WhatIsHealthyError, match="noise level"):
        LocalizeSettings.from_spec(spec, noise_level=1.5)
    with pytest.raises(WhatIsHealthyError, match="median_size"):
        LocalizeSettings.from_spec(spec, median_size=0)


@pytest.mark.parametrize("text, value", [("0.25", 0.25), ("AUTO", "auto"), (" otsu ", "otsu"),
                                         (0.1, 0.1), (0, 0.0), (None, None)])
def test_parse_threshold(text, value):
    assert parse_threshold(text) == value


@pytest.mark.parametrize("bad", ["abc", "-0.1", "nan", "inf", True])
def test_parse_threshold_refuses(bad):
    with pytest.raises(WhatIsHealthyError, match="threshold"):
        parse_threshold(bad)


# --------------------------------------------------------------------------------------------
# the mapping back to the volume


def test_a_model_that_changes_nothing_gives_the_input_back():
    spec = tiny_spec()
    data = _box_volume()
    settings = LocalizeSettings.from_spec(spec, dynamic_normalisation=False, threshold=0.01)
    result = localize(ZeroEps(spec), spec, data, settings)
    assert result.healthy.shape == data.shape and result.healthy.dtype == np.float32
    assert np.allclose(result.healthy, data, rtol=1e-5, atol=1e-3)
    assert result.difference.max() < 1e-5
    assert result.mask.dtype == np.uint8 and result.mask.sum() == 0
    assert list(result.processed_slices) == [1, 2, 3, 4]


def test_a_model_space_change_lands_in_place(monkeypatch):
    spec = tiny_spec()
    data = _box_volume()

    def change(healthy):  # lower channel 0 by 0.5 (normalised) in a 4 x 4 patch of z = 3
        healthy[2, 0, 5:9, 5:9] -= 0.5  # slices are z = 1, 2, 3, 4
        return healthy

    fake, _ = _fake_counterfactual(change)
    monkeypatch.setattr(pipeline, "iter_counterfactual", fake)
    settings = LocalizeSettings.from_spec(spec, median_size=1, min_component_voxels=0,
                                          threshold=0.1)
    gen = iter_localize(None, spec, data, settings)
    assert next(gen) == Progress(1, 1, "decode")
    with pytest.raises(StopIteration) as stop:
        next(gen)
    result = stop.value.value
    # Box origin (0, 2): model pixel (5..8, 5..8) is volume voxel (5..8, 7..10).
    expected = np.zeros(data.shape[1:], bool)
    expected[5:9, 7:11, 3] = True
    assert np.allclose(result.difference[expected], 0.5 / 4)  # mean over 4 channels
    assert np.all(result.difference[~expected] == 0)
    assert np.allclose(result.difference_per_channel[0][expected], 0.5)
    assert np.all(result.difference_per_channel[1:] == 0)
    assert np.array_equal(result.mask.astype(bool), expected)
    # Healthy: the input minus the change, in input units (normalised d -> d * p99 / 2).
    scale0 = np.percentile(data[0][data[0] > 0], 99)
    assert np.allclose(result.healthy[0][expected], data[0][expected] - 0.5 * scale0 / 2,
                       rtol=1e-5)
    untouched = ~expected
    assert np.array_equal(result.healthy[0][untouched], data[0][untouched])
    assert np.array_equal(result.healthy[1:], data[1:])
    assert result.provenance["threshold_used"] == 0.1

    # The threshold means the same thing in remask: 0.125 is above 0.1, below 0.2.
    assert remask(result, 0.2).sum() == 0
    assert remask(result, 0.1).sum() == 16
    assert remask(result, 0.1, min_component_voxels=17).sum() == 0
    assert remask(result, "auto").sum() == (16 if spec.inference.threshold < 0.125 else 0)
    assert result.mask.sum() == 16  # remask does not change the result


def test_changes_outside_the_brain_leave_no_difference(monkeypatch):
    spec = tiny_spec()
    data = _box_volume()

    def change(healthy):  # model pixel (1, 1) of z = 2 is voxel (1, 3): background
        healthy[1, :, 0:3, 0:3] += 0.8
        return healthy

    fake, _ = _fake_counterfactual(change)
    monkeypatch.setattr(pipeline, "iter_counterfactual", fake)
    settings = LocalizeSettings.from_spec(spec, median_size=1, min_component_voxels=0,
                                          threshold=0.5)
    result = localize(None, spec, data, settings)
    # Background voxels are zero in the difference: resize bleed there is no anomaly.
    assert result.difference[0:3, 2:5, 2].max() == 0.0
    assert result.difference_per_channel[:, ~result.brain].max() == 0.0
    assert result.mask.sum() == 0
    assert remask(result, 0.5, brain_only=False).sum() == 0
    # The healthy image keeps the background as it was.
    assert np.array_equal(result.healthy[:, ~result.brain], data[:, ~result.brain])


def test_z_slices_restrict_the_work(monkeypatch):
    spec = tiny_spec()
    data = _box_volume()
    fake, calls = _fake_counterfactual(lambda h: h - 0.3)
    monkeypatch.setattr(pipeline, "iter_counterfactual", fake)
    settings = LocalizeSettings.from_spec(spec, median_size=1, min_component_voxels=0)
    result = localize(None, spec, data, settings, z_slices=[3, 5])  # 5 holds no brain
    assert calls == [(1, 4, TINY_SIZE, TINY_SIZE)]
    assert list(result.processed_slices) == [3]
    assert result.difference[..., 3].max() == pytest.approx(0.3)
    others = [0, 1, 2, 4, 5]
    assert np.all(result.difference[..., others] == 0)
    assert np.array_equal(result.healthy[..., others], data[..., others])
    with pytest.raises(WhatIsHealthyError, match="outside the volume"):
        localize(None, spec, data, settings, z_slices=[6])


def test_a_prepared_volume_is_reused_and_checked(tiny_checkpoint, case_dirs):
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    data = load_volume(case_dirs[0]).select(spec.modalities).data
    prepared = pipeline.prepare_input(data, spec)
    assert prepared._slices is None  # nothing sliced until a run needs it
    fresh = localize(model, spec, data, z_slices=[12])
    again = localize(model, spec, data, z_slices=[12], prepared=prepared)
    np.testing.assert_allclose(again.difference, fresh.difference, atol=1e-6)
    np.testing.assert_array_equal(again.mask, fresh.mask)
    # A one-slice preview made only that slice; the whole volume is sliced on the full run.
    assert prepared._slices is None
    full = localize(model, spec, data, prepared=prepared)
    assert prepared._slices is not None and len(prepared._slices) == len(full.processed_slices)
    # The preview equals the full run on its slice (up to the batch's float rounding) ...
    np.testing.assert_allclose(fresh.difference[..., 12], full.difference[..., 12], atol=1e-4)
    # ... and leaves every other slice exactly as the input.
    others = np.delete(np.arange(data.shape[3]), 12)
    assert np.array_equal(fresh.healthy[..., others], data[..., others])
    with pytest.raises(WhatIsHealthyError, match="another array"):
        localize(model, spec, data.copy(), prepared=prepared)
    with pytest.raises(WhatIsHealthyError, match="does not belong"):
        localize(model, spec, data[..., :-1].copy(), prepared=prepared)


def test_threshold_region_works_in_any_axis_order(monkeypatch):
    spec = tiny_spec()
    data = _box_volume()

    def change(healthy):
        healthy[:, :, 5:9, 5:10] -= 0.5  # volume x 5..8, y 7..11: inside the brain
        healthy[:, :, 10, 10] -= 0.9  # one voxel per slice, a column of 4: under 5 voxels
        return healthy

    fake, _ = _fake_counterfactual(change)
    monkeypatch.setattr(pipeline, "iter_counterfactual", fake)
    result = localize(None, spec, data, LocalizeSettings.from_spec(
        spec, median_size=1, min_component_voxels=5, threshold=0.2))
    # The brain's box (x 4..11, y 6..13) on the processed slices (z 1..4), in [X, Y, Z].
    assert result.mask_region == (slice(4, 12), slice(6, 14), slice(1, 5))
    # A viewer's own [Z, Y, X] copies, thresholded in that order with the region reversed, give
    # the transposed mask: the core never needs to know the viewer's axis order.
    difference_zyx = np.ascontiguousarray(result.difference.transpose(2, 1, 0))
    brain_zyx = np.ascontiguousarray(result.brain.transpose(2, 1, 0))
    for threshold in (0.1, 0.3, 0.6):
        xyz = remask(result, threshold)
        zyx = threshold_region(difference_zyx, threshold, result.mask_region[::-1], brain_zyx, 5)
        assert zyx.flags.c_contiguous and zyx.shape == xyz.shape[::-1]
        assert np.array_equal(zyx, xyz.transpose(2, 1, 0))
    assert remask(result, 0.3).sum() == 4 * 20  # the 4 x 5 patch on each of the 4 brain slices
    assert remask(result, 0.3, min_component_voxels=0).sum() == 4 * 20 + 4
    assert remask(result, 0.95).sum() == 0
    # Nothing outside the region is ever set, whatever the map holds there.
    outside = threshold_region(np.ones((4, 4, 4), np.float32), 0.5,
                               (slice(1, 3), slice(None), slice(0, 2)))
    assert outside.sum() == 2 * 4 * 2 and outside[1:3, :, 0:2].all()


def test_scattered_slices_map_back_like_a_whole_run(monkeypatch):
    # Slices 1 and 3 are not consecutive: they take the index-array path, the whole run (1..4)
    # the basic-slice path; both must put every value in the same place.
    spec = tiny_spec()
    data = _box_volume()
    # A change that depends on each slice's own content only (not on its place in the batch).
    fake, _ = _fake_counterfactual(lambda h: h - 0.3 * (h > 0.2) * h)
    monkeypatch.setattr(pipeline, "iter_counterfactual", fake)
    settings = LocalizeSettings.from_spec(spec, median_size=3, min_component_voxels=0)
    whole = localize(None, spec, data, settings)
    scattered = localize(None, spec, data, settings, z_slices=[1, 3])
    assert list(scattered.processed_slices) == [1, 3]
    assert whole.difference[..., [1, 3]].max() > 0.05  # there is something to map back
    for z in (1, 3):
        np.testing.assert_allclose(scattered.difference[..., z], whole.difference[..., z],
                                   atol=1e-6)
        np.testing.assert_allclose(scattered.healthy[..., z], whole.healthy[..., z], rtol=1e-6)
        np.testing.assert_allclose(scattered.difference_per_channel[..., z],
                                   whole.difference_per_channel[..., z], atol=1e-6)
    for z in (0, 2, 4, 5):
        assert not scattered.difference[..., z].any()
        assert np.array_equal(scattered.healthy[..., z], data[..., z])


def test_otsu_threshold_is_per_volume(monkeypatch):
    spec = tiny_spec()
    data = _box_volume()

    def change(healthy):
        healthy[:, :, 5:9, 5:9] -= 0.6
        return healthy

    fake, _ = _fake_counterfactual(change)
    monkeypatch.setattr(pipeline, "iter_counterfactual", fake)
    result = localize(None, spec, data, LocalizeSettings.from_spec(
        spec, median_size=1, min_component_voxels=0, threshold="otsu"))
    assert 0 <= result.threshold_used < 0.6
    assert result.mask.sum() == 4 * 16


# --------------------------------------------------------------------------------------------
# the real network, end to end


def test_real_tiny_model_end_to_end(tiny_checkpoint, case_dirs):
    model, spec, digest = load_model_cached(tiny_checkpoint, "cpu")
    volume = load_volume(case_dirs[0]).select(spec.modalities)
    steps: list[Progress] = []
    result = localize(model, spec, volume.data, progress_callback=steps.append,
                      model_path=tiny_checkpoint, model_hash=digest,
                      inputs=volume.source_paths)
    assert [p.phase for p in steps] == ["invert", "invert", "decode", "decode"]
    assert steps[-1].step == steps[-1].total == 4
    assert result.healthy.shape == volume.data.shape
    assert result.difference.shape == result.mask.shape == result.brain.shape == volume.shape
    assert result.difference.dtype == np.float32 and result.mask.dtype == np.uint8
    assert np.isfinite(result.healthy).all() and result.difference.min() >= 0
    assert result.difference[result.brain].max() > 0  # the model changed something
    assert not np.array_equal(result.healthy, volume.data)
    assert not result.mask[~result.brain].any()
    assert result.threshold_used == spec.inference.threshold
    prov = result.provenance
    assert prov["model"]["sha256"] == digest
    assert prov["model"]["path"] == str(tiny_checkpoint.resolve())
    assert prov["settings"]["steps"] == 2 and prov["device"] == "cpu"
    assert {"torch", "monai", "numpy", "napari-whatishealthy"} <= set(prov["versions"])
    assert len(prov["inputs"]) == 4
    json.dumps(prov)  # JSON-able as it is


def test_preview_of_one_slice_and_cancel(tiny_checkpoint, case_dirs):
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    volume = load_volume(case_dirs[0]).select(spec.modalities)
    result = localize(model, spec, volume.data, z_slices=[12])
    assert list(result.processed_slices) == [12]
    assert np.all(np.delete(result.difference, 12, axis=2) == 0)
    gen = iter_localize(model, spec, volume.data)
    assert next(gen).step == 1
    gen.close()  # cancel between steps: nothing raises
    with pytest.raises(StopIteration):
        next(gen)


def test_bad_input_is_refused_at_call_time(tiny_checkpoint):
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    data = _box_volume()
    with pytest.raises(InputError, match="expects 4 channel"):
        iter_localize(model, spec, data[:2])
    bad = data.copy()
    bad[0, 5, 7, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        iter_localize(model, spec, bad)
    with pytest.raises(InputError, match="shape"):
        iter_localize(model, spec, data[0])


def test_all_zero_volume_gives_an_empty_mask(tiny_checkpoint):
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    result = localize(model, spec, np.zeros((4, 12, 12, 5), np.float32))
    assert result.mask.sum() == 0 and result.processed_slices.size == 0
    assert np.all(result.healthy == 0)
    assert result.warnings and "no brain" in result.warnings[0]


# --------------------------------------------------------------------------------------------
# output files


def test_write_outputs_on_the_source_grid(tiny_checkpoint, case_dirs, tmp_path):
    model, spec, digest = load_model_cached(tiny_checkpoint, "cpu")
    volume = load_volume(case_dirs[0]).select(spec.modalities)
    result = localize(model, spec, volume.data, model_path=tiny_checkpoint, model_hash=digest,
                      inputs=volume.source_paths)
    paths = write_outputs(result, volume, tmp_path / "out", all_channels=True)
    assert set(paths) == {"healthy", "difference", "mask", "provenance", "healthy_flair",
                          "healthy_t1", "healthy_t1ce", "healthy_t2"}
    source = nib.load(str(volume.source_paths[0]))
    for key in ("healthy", "difference", "mask", "healthy_t2"):
        img = nib.load(str(paths[key]))
        assert img.shape == source.shape
        assert np.array_equal(img.affine, source.affine)
        assert img.get_data_dtype() == (np.uint8 if key == "mask" else np.float32)
    assert np.array_equal(np.asarray(nib.load(str(paths["healthy"])).dataobj),
                          np.asarray(nib.load(str(paths["healthy_flair"])).dataobj))
    # The healthy FLAIR equals the stored FLAIR where nothing changed (source grid, same voxels).
    stored = np.asarray(source.dataobj).astype(np.float32)
    healthy = np.asarray(nib.load(str(paths["healthy"])).dataobj)
    canonical_unchanged = result.difference_per_channel[0] == 0
    unchanged = volume.to_source(canonical_unchanged.astype(np.uint8)).astype(bool)
    assert unchanged.any() and np.array_equal(healthy[unchanged], stored[unchanged])
    prov = json.loads(paths["provenance"].read_text())
    assert prov["model"]["sha256"] == digest and prov["healthy_channel"] == "flair"
    assert prov["outputs"]["mask"] == str(paths["mask"].resolve())


def test_write_outputs_refuses_before_writing_and_cleans_up(tiny_checkpoint, case_dirs,
                                                            tmp_path, monkeypatch):
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    volume = load_volume(case_dirs[0]).select(spec.modalities)
    result = localize(model, spec, volume.data)
    out = tmp_path / "out"
    out.mkdir()
    paths = output_paths(out, volume.name)
    paths["mask"].write_text("an older result")
    with pytest.raises(InputError, match="already exists"):
        write_outputs(result, volume, out)
    assert sorted(p.name for p in out.iterdir()) == [paths["mask"].name]  # nothing new
    paths["mask"].unlink()

    import nibabel as nib

    real = nib.save
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(nib, "save", flaky)
    with pytest.raises(InputError, match="mask.nii.gz: could not be written"):
        write_outputs(result, volume, out)
    assert list(out.iterdir()) == []  # the two files already written were removed


def test_several_noise_levels_average_the_maps_and_write_their_spread(tiny_checkpoint, case_dirs,
                                                                     tmp_path):
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    volume = load_volume(case_dirs[0]).select(spec.modalities)
    one = {lv: localize(model, spec, volume.data, LocalizeSettings.from_spec(spec, noise_level=lv))
           for lv in (0.2, 0.4)}
    assert one[0.2].uncertainty is None
    steps = []
    both = localize(model, spec, volume.data,
                    LocalizeSettings.from_spec(spec, noise_levels=(0.2, 0.4)),
                    progress_callback=steps.append)
    np.testing.assert_allclose(both.difference, (one[0.2].difference + one[0.4].difference) / 2,
                               atol=1e-5)
    # The spread of two maps is half their distance; it is not zero where they disagree.
    np.testing.assert_allclose(both.uncertainty,
                               np.abs(one[0.2].difference - one[0.4].difference) / 2, atol=1e-5)
    assert both.uncertainty.max() > 0
    # Progress runs once over both counterfactuals and ends at its total.
    assert [p.step for p in steps] == list(range(1, len(steps) + 1))
    assert steps[-1].step == steps[-1].total
    paths = write_outputs(both, volume, tmp_path)
    assert paths["uncertainty"].name == f"{volume.name}_uncertainty.nii.gz"
    written = nib.load(paths["uncertainty"]).get_fdata()
    assert written.shape == volume.data.shape[1:] and written.max() > 0
    assert "uncertainty" not in write_outputs(one[0.2], volume, tmp_path / "single")
    with pytest.raises(WhatIsHealthyError, match="noise level must be in"):
        LocalizeSettings.from_spec(spec, noise_levels=(0.2, 1.5))
    with pytest.raises(WhatIsHealthyError, match="noise_levels must be a list of at most"):
        LocalizeSettings.from_spec(spec, noise_levels=(0.1,) * 6)


def test_edge_erosion_zeroes_the_brain_edge_and_nothing_else(tiny_checkpoint, case_dirs):
    from napari_whatishealthy.core.anomaly import erode_mask

    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    data = load_volume(case_dirs[1]).select(spec.modalities).data
    plain = localize(model, spec, data)
    eroded = localize(model, spec, data, LocalizeSettings.from_spec(spec, edge_erosion=1))
    inner = erode_mask(plain.brain, 1)
    edge = plain.brain & ~inner
    assert plain.difference[edge].max() > 0  # there was something on the edge to remove
    assert not eroded.difference[edge].any()
    np.testing.assert_allclose(eroded.difference[inner], plain.difference[inner], atol=1e-6)
    # A one-slice preview erodes only a slab, with the same result on its slice.
    z = int(plain.processed_slices[len(plain.processed_slices) // 2])
    preview = localize(model, spec, data, LocalizeSettings.from_spec(spec, edge_erosion=1),
                       z_slices=[z])
    np.testing.assert_allclose(preview.difference[..., z], eroded.difference[..., z], atol=1e-4)
    with pytest.raises(WhatIsHealthyError, match="edge_erosion"):
        LocalizeSettings.from_spec(spec, edge_erosion=-1)


def test_expected_lesion_contrast_keeps_only_each_modalitys_lesion_change(tiny_checkpoint,
                                                                          case_dirs):
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    data = load_volume(case_dirs[1]).select(spec.modalities).data

    def run(contrast):
        settings = LocalizeSettings.from_spec(spec, median_size=1, edge_erosion=0, seed=0,
                                              edge_guide_radius=0, lesion_contrast=contrast)
        return localize(model, spec, data, settings)

    plain, expected = run("any"), run("expected")
    np.testing.assert_array_equal(expected.healthy, plain.healthy)  # same counterfactual
    assert expected.provenance["settings"]["lesion_contrast"] == "expected"
    z = plain.processed_slices
    for c, name in enumerate(spec.modalities):
        a, e = plain.difference_per_channel[c][..., z], expected.difference_per_channel[c][..., z]
        if name == "t1ce":  # either way: unchanged
            np.testing.assert_allclose(e, a, atol=1e-6)
            continue
        # One direction of |difference| only: never more, and less where the other showed.
        assert (e <= a + 1e-6).all() and (e < a - 1e-3).any(), name
        # FLAIR and T2: where the counterfactual is clearly brighter than the input, nothing.
        brighter = (plain.healthy[c] - data[c])[..., z] * (1 if name != "t1" else -1) > 0
        strong = brighter & (a > 0.3 * a.max())
        if strong.any():
            assert e[strong].mean() < 0.5 * a[strong].mean(), name
    assert expected.difference.sum() < plain.difference.sum()
    with pytest.raises(WhatIsHealthyError, match="lesion_contrast"):
        LocalizeSettings.from_spec(spec, lesion_contrast="brighter")


def test_edge_guide_radius_puts_the_map_on_the_images_edges(tiny_checkpoint, case_dirs):
    from napari_whatishealthy.core.anomaly import EDGE_GUIDE_EPS, guided_filter
    from napari_whatishealthy.core.preprocess import normalise_with

    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    data = load_volume(case_dirs[1]).select(spec.modalities).data
    def run(radius, z_slices=None):
        settings = LocalizeSettings.from_spec(spec, median_size=1, edge_erosion=0, seed=0,
                                              edge_guide_radius=radius)
        return localize(model, spec, data, settings, z_slices=z_slices)

    plain, guided = run(0), run(2)
    z = plain.processed_slices
    brain = plain.brain[..., z]
    # The guided map is each channel's plain map filtered by that channel's own image.
    from napari_whatishealthy.core.preprocess import prepare

    prepared = prepare(data, spec.image_size)
    guide = normalise_with(data[..., z], brain, prepared.scale)
    expected = np.maximum(guided_filter(plain.difference_per_channel[..., z], guide, 2,
                                        EDGE_GUIDE_EPS, slice_axis=-1, channel_axis=0), 0)
    expected = expected.mean(axis=0)
    # Away from the brain's edge (where the pipeline filters the unmasked map) they agree.
    inner = ndimage.binary_erosion(brain, np.ones((9, 9, 1), bool))  # 2 x radius
    assert inner.sum() > 300
    np.testing.assert_allclose(guided.difference[..., z][inner], expected[inner], atol=2e-4)
    assert not np.allclose(guided.difference, plain.difference, atol=1e-3)
    assert not guided.difference[~plain.brain].any()  # still nothing outside the brain
    # A one-slice preview gives the same map on its slice (the filter is in-plane).
    zc = int(z[len(z) // 2])
    preview = run(2, z_slices=[zc])
    np.testing.assert_allclose(preview.difference[..., zc], guided.difference[..., zc], atol=1e-4)
    with pytest.raises(WhatIsHealthyError, match="edge_guide_radius"):
        LocalizeSettings.from_spec(spec, edge_guide_radius=-1)
