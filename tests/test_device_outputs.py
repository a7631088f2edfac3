"""The torch path of the volume outputs (core.device_outputs, used where the network runs on
CUDA) against the numpy path, run here on the CPU: the same median filter, erosion, difference,
healthy image and mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_whatishealthy import sample_case_path
from napari_whatishealthy.core import device_outputs, pipeline
from napari_whatishealthy.core.anomaly import contrast_signs, erode_mask, make_mask, median_smooth
from napari_whatishealthy.core.device_outputs import (
    DeviceOutputs,
    erode_mask_torch,
    median_smooth_torch,
)
from napari_whatishealthy.core.pipeline import LocalizeSettings, localize
from napari_whatishealthy.core.preprocess import prepare
from napari_whatishealthy.core.registry import load_model_cached
from napari_whatishealthy.core.volume import load_volume


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 9])
def test_median_matches_scipy_including_even_sizes_and_wide_borders(size):
    rng = np.random.default_rng(size)
    # Few distinct values (ties) and a slice narrower than the window (reflected more than once).
    stack = rng.integers(0, 6, size=(7, 9, 3)).astype(np.float32)
    narrow = rng.normal(size=(3, 4, 2)).astype(np.float32)
    for values in (stack, narrow):
        expected = median_smooth(values, size, slice_axis=-1)
        got = median_smooth_torch(torch.from_numpy(values).permute(2, 0, 1), size)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("voxels", [0, 1, 2, 4])
def test_erosion_matches_scipy(voxels):
    rng = np.random.default_rng(voxels)
    blob = np.zeros((14, 12, 9), bool)
    blob[2:13, 1:11, 1:9] = rng.random((11, 10, 8)) > 0.1  # holes, and touching the border
    for mask in (blob, blob[..., 3:4]):  # one slice thick: the border erodes it all
        got = erode_mask_torch(torch.from_numpy(np.ascontiguousarray(mask)), voxels).numpy()
        np.testing.assert_array_equal(got, erode_mask(mask, voxels))


def _sample_and_counterfactual():
    """The bundled sample case (four modalities) and a stand-in counterfactual of its slices:
    a smooth bright region removed in a band of slices, plus small noise everywhere."""
    data = load_volume(sample_case_path()).select(("flair", "t1", "t1ce", "t2")).data
    prepared = prepare(data, 64)
    slices = prepared.slices
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    bump = np.exp(-((yy - 30) ** 2 + (xx - 36) ** 2) / 40.0).astype(np.float32)
    healthy = slices + 0.02 * rng.standard_normal(slices.shape).astype(np.float32)
    band = slice(len(slices) // 3, len(slices) // 3 + 8)
    healthy[band] -= 0.6 * bump
    return data, prepared, healthy


@pytest.mark.parametrize(("z_slices", "radius", "contrast"),
                         [("all", 0, "any"), ("scattered", 0, "any"), ("all", 8, "any"),
                          ("scattered", 4, "any"), ("all", 8, "expected"),
                          ("scattered", 0, "expected")])
def test_device_outputs_agree_with_the_numpy_path_on_the_sample(z_slices, radius, contrast):
    data, prepared, healthy = _sample_and_counterfactual()
    sub, healthy_sub = prepared, healthy
    if z_slices == "scattered":  # a preview of three slices that are not neighbours
        keep = np.zeros(len(prepared.slice_index), bool)
        keep[[5, len(keep) // 3 + 2, len(keep) - 4]] = True
        sub = prepared.restrict(prepared.slice_index[keep])
        healthy_sub = healthy[keep]
    scored = pipeline._scored_region(prepared.brain, sub.slice_index, 4)
    signs = contrast_signs(("flair", "t1", "t1ce", "t2"), contrast)
    host = pipeline._volume_outputs(data, prepared, sub, healthy_sub, 3, scored, radius, signs)
    torch_path = DeviceOutputs(data, prepared, sub, 3, 4, "cpu", radius, signs)(healthy_sub)
    # The guided filter's box sums are float32 running sums in scipy and window means in
    # torch: equal to rounding, a little more of it than the plain path.
    tol = dict(rtol=1e-5, atol=1e-6) if radius == 0 else dict(rtol=1e-4, atol=2e-5)
    for name, a, b in zip(("difference", "per channel", "healthy"), torch_path, host, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, err_msg=name, **tol)
    difference = host[0]
    assert difference.max() > 0.2  # the removed region is there to be masked
    masks = [make_mask(d, 0.2, brain_mask=prepared.brain, min_component_voxels=20)
             for d in (torch_path[0], difference)]
    assert masks[1].sum() > 20
    assert np.array_equal(masks[0], masks[1])
    assert not np.shares_memory(torch_path[2], data)
    np.testing.assert_array_equal(
        np.delete(torch_path[2], sub.slice_index, axis=3),
        np.delete(data, sub.slice_index, axis=3))  # unprocessed slices are the input itself


def test_localize_with_device_outputs_on_the_cpu_equals_the_numpy_run(tiny_checkpoint, case_dirs,
                                                                     monkeypatch):
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    data = load_volume(case_dirs[1]).select(spec.modalities).data
    settings = LocalizeSettings.from_spec(spec, edge_erosion=1, noise_levels=(0.2, 0.4),
                                          edge_guide_radius=2)
    host = localize(model, spec, data, settings)
    monkeypatch.setattr(device_outputs, "use_device_outputs", lambda device: True)
    on_device = localize(model, spec, data, settings)
    assert host.provenance["seconds_by_stage"]["outputs_on"] == "host"
    assert on_device.provenance["seconds_by_stage"]["outputs_on"] == "cpu"
    for name in ("difference", "difference_per_channel", "healthy", "uncertainty"):
        np.testing.assert_allclose(getattr(on_device, name), getattr(host, name),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    assert host.mask.any()
    assert np.array_equal(on_device.mask, host.mask)


def test_device_outputs_fall_back_to_the_host_when_the_device_is_out_of_memory(
        tiny_checkpoint, case_dirs, monkeypatch):
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    data = load_volume(case_dirs[1]).select(spec.modalities).data
    host = localize(model, spec, data)

    def out_of_memory(self, healthy_s):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(device_outputs, "use_device_outputs", lambda device: True)
    monkeypatch.setattr(device_outputs.DeviceOutputs, "__call__", out_of_memory)
    fallen_back = localize(model, spec, data)
    assert fallen_back.provenance["seconds_by_stage"]["outputs_on"] == "host"
    np.testing.assert_array_equal(fallen_back.difference, host.difference)
    assert np.array_equal(fallen_back.mask, host.mask)


def test_only_cuda_runs_compute_outputs_on_the_device():
    assert device_outputs.use_device_outputs("cuda:0")
    assert not device_outputs.use_device_outputs("cpu")
