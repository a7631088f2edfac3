"""The bundled default model: ships in the package, loads safely, fits the sample, runs the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_whatishealthy import cli
from napari_whatishealthy._sample_data import sample_case_path
from napari_whatishealthy.core import registry
from napari_whatishealthy.core.model import SPEC_FILE, WEIGHTS_FILE, count_parameters
from napari_whatishealthy.core.pipeline import LocalizeSettings, localize
from napari_whatishealthy.core.volume import load_volume

MAX_BYTES = 20 * 1024 * 1024


def _bundled(name: str):
    """(folder, model, spec, sha256) of a bundled model, loaded on the CPU."""
    torch.set_num_threads(1)
    path = registry.resolve_model(name)
    model, spec, digest = registry.load_model_cached(path, "cpu")
    return path, model, spec, digest


@pytest.fixture(scope="module")
def default_model():
    return _bundled("default")


def test_default_model_is_bundled_small_and_safe(default_model):
    path, model, spec, digest = default_model
    assert "default" in registry.bundled_models()
    assert (path / WEIGHTS_FILE).stat().st_size <= MAX_BYTES
    # Loaded from safetensors: the file starts with a little-endian header length, not a pickle.
    assert (path / WEIGHTS_FILE).read_bytes()[:1] != b"\x80"
    assert spec.modalities == ("flair", "t1", "t1ce", "t2")
    assert spec.image_size == 64
    assert count_parameters(model) == sum(
        int(np.prod(s)) for s in _safetensors_shapes(path / WEIGHTS_FILE)
    )
    assert len(digest) == 64
    # The card's claims about the training record come from the spec itself.
    record = json.loads((path / SPEC_FILE).read_text())["training"]
    assert record["steps"] > 0 and record["cases"]["train"] > 0


def _safetensors_shapes(path):
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    return [v["shape"] for k, v in header.items() if k != "__metadata__"]


def test_default_model_finds_the_sample_lesion_on_its_slice(default_model):
    """On the lesion's central slice, the difference is higher inside the lesion than outside."""
    _, model, spec, _ = default_model
    volume = load_volume(sample_case_path()).select(spec.modalities)
    truth = volume.segmentation > 0
    z = int(np.argmax(truth.sum(axis=(0, 1))))
    settings = LocalizeSettings.from_spec(spec, device="cpu")
    result = localize(model, spec, volume.data, settings, z_slices=[z])
    diff = result.difference[..., z]
    lesion, brain = truth[..., z], result.brain[..., z]
    assert diff[lesion].mean() > 2 * diff[brain & ~lesion].mean()
    assert result.mask[..., z][lesion].mean() > 0.3


def test_headless_demo_writes_outputs_and_figure(tmp_path):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--headless", "--out", str(out), "--steps", "2", "--no-progress"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert any(n.endswith("_mask.nii.gz") for n in names)
    assert any(n.endswith("_healthy.nii.gz") for n in names)
    assert any(n.endswith(".png") for n in names)
    assert any(n.endswith("_provenance.json") for n in names)


@pytest.fixture(scope="module")
def flair_model():
    return _bundled("flair")


def test_flair_model_is_bundled_and_chosen_for_a_lone_flair(flair_model):
    from napari_whatishealthy.core.model_choice import choose_model

    path, model, spec, _ = flair_model
    assert (path / WEIGHTS_FILE).stat().st_size <= MAX_BYTES
    assert (path / WEIGHTS_FILE).read_bytes()[:1] != b"\x80"
    assert spec.modalities == ("flair",) and spec.image_size == 64
    assert choose_model(("flair",)).folder == path
    assert choose_model(("flair", "t1", "t1ce", "t2")).name == "default"
    record = json.loads((path / SPEC_FILE).read_text())["training"]
    assert record["steps"] > 0 and record["cases"]["train"] > 0


def test_flair_model_finds_the_sample_lesion_from_flair_alone(flair_model):
    _, model, spec, _ = flair_model
    volume = load_volume(sample_case_path()).select(spec.modalities)
    assert volume.data.shape[0] == 1
    truth = volume.segmentation > 0
    z = int(np.argmax(truth.sum(axis=(0, 1))))
    result = localize(model, spec, volume.data, LocalizeSettings.from_spec(spec, device="cpu"),
                      z_slices=[z])
    diff = result.difference[..., z]
    lesion, brain = truth[..., z], result.brain[..., z]
    assert diff[lesion].mean() > 2 * diff[brain & ~lesion].mean()
    assert result.mask[..., z][lesion].mean() > 0.3
