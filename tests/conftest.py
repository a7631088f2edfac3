"""Shared fixtures: a tiny random-init checkpoint and tiny synthetic BraTS-like cases.

Everything is small enough for a 2-core CPU: the model is ~60 k parameters at 16 x 16, the
cases are 40 x 40 x 26 voxels (synthetic at 6 mm). Session-scoped fixtures are read-only: a test
that changes files copies them first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_whatishealthy.core.model import ModelSpec, NetworkSpec, build_model, save_checkpoint

torch.set_num_threads(1)

TINY_SIZE = 16


def tiny_network() -> NetworkSpec:
    return NetworkSpec(channels=(8, 16), attention_levels=(False, True), norm_num_groups=8,
                       num_head_channels=8, label_embedding_dim=8)


def tiny_spec(**changes) -> ModelSpec:
    spec = ModelSpec(image_size=TINY_SIZE, network=tiny_network(), name="tiny-test")
    spec.inference.steps = 2
    spec.inference.noise_level = 0.2
    spec.inference.min_component_voxels = 2
    for key, value in changes.items():
        setattr(spec, key, value)
    return spec


def make_checkpoint(directory: Path, seed: int = 0, spec: ModelSpec | None = None) -> Path:
    """A random tiny model that does change its input.

    MONAI zero-initialises the UNet's last layer, so a fresh model predicts no noise at all;
    every weight is nudged here, except the null label's context token, which stays zero.
    """
    torch.manual_seed(seed)
    model = build_model(spec or tiny_spec())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        model.label_embedding.weight[model.null_label].zero_()
    return save_checkpoint(model, directory)


@pytest.fixture(scope="session", autouse=True)
def openvino_cache_in_tmp(tmp_path_factory):
    """Networks converted for OpenVINO are kept in this session's folder, never the user's
    cache (subprocesses inherit the variable)."""
    folder = tmp_path_factory.mktemp("openvino-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WHATISHEALTHY_OPENVINO_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-init tiny checkpoint folder (spec.json + model.safetensors)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def synthetic_cases(tmp_path_factory) -> Path:
    """Four tiny synthetic cases (seed 3): two typical, one subtle, one healthy control."""
    from napari_whatishealthy.core.synthetic import synthesise

    root = tmp_path_factory.mktemp("cases") / "cases"
    synthesise(root, 4, seed=3, voxel_size=6.0, healthy_fraction=0.25)
    return root


@pytest.fixture(scope="session")
def case_dirs(synthetic_cases) -> list[Path]:
    return sorted(p for p in synthetic_cases.iterdir() if p.is_dir())


@pytest.fixture
def lesion_case(case_dirs) -> Path:
    """A case of the synthetic set (``case_dirs``) whose segmentation holds a lesion."""
    from napari_whatishealthy.core.volume import load_volume

    for case in case_dirs:
        if (load_volume(case).segmentation > 0).any():
            return case
    pytest.skip("no lesion case in the synthetic set")


@pytest.fixture
def cases_copy(synthetic_cases, tmp_path) -> Path:
    """A private copy of the synthetic cases, for tests that write next to them."""
    dest = tmp_path / "cases"
    shutil.copytree(synthetic_cases, dest)
    return dest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.int16) -> Path:
    """Write ``data`` as NIfTI with ``affine`` in both qform and sform (code 1), as scanners and
    BraTS do; the on-disk type is ``dtype``."""
    import nibabel as nib

    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_data_dtype(dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.fixture(autouse=True)
def plugin_settings_in_tmp(tmp_path, monkeypatch):
    """napari's plugin settings (the widget's saved device, model and folders) live in this
    test's folder: never the user's, never carried from one test to the next."""
    try:
        from napari import settings as napari_settings
    except ImportError:  # the core alone
        yield None
        return
    napari_settings._clear_plugin_settings_cache()
    monkeypatch.setattr(napari_settings, "_CFG_PATH", str(tmp_path / "napari-settings.yaml"))
    yield tmp_path / "napari-whatishealthy.yaml"
    napari_settings._clear_plugin_settings_cache()
