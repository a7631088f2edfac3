"""The bundled sample case: small enough to ship, a visible lesion, loads like the reader."""

from __future__ import annotations

import json

import numpy as np

from napari_whatishealthy import sample_case_path
from napari_whatishealthy._sample_data import make_sample_data
from napari_whatishealthy.core.volume import load_volume

PLUGIN = "napari-whatishealthy"


def test_sample_files_are_small_and_complete():
    folder = sample_case_path()
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".nii.gz"))
    assert names == [f"Sample_{m}.nii.gz" for m in ("flair", "seg", "t1", "t1ce", "t2")]
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size < 6_000_000
    info = json.loads((folder / "sample.json").read_text())
    assert info["voxel_size_mm"] == 2.0 and info["lesion_voxels"] > 1000


def test_sample_data_layers():
    layers = make_sample_data()
    assert [kind for _, _, kind in layers] == ["image"] * 4 + ["labels"]
    assert [kw["name"] for _, kw, _ in layers] == ["flair", "t1", "t1ce", "t2", "seg"]
    for data, kwargs, _ in layers:
        assert data.shape == (78, 120, 120)
        assert kwargs["scale"] == (2.0, 2.0, 2.0)
        assert kwargs["metadata"]["sample"] is True
    seg = layers[-1][0]
    assert np.count_nonzero(seg) > 1000
    # The same voxels as the core's loader gives, in napari order.
    volume = load_volume(sample_case_path())
    np.testing.assert_array_equal(layers[0][0], volume.data[0].transpose(2, 1, 0))


def test_sample_opens_in_a_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "sample_case")
    assert [layer.name for layer in layers] == ["flair", "t1", "t1ce", "t2", "seg"]
    assert type(viewer.layers["seg"]).__name__ == "Labels"
    assert tuple(str(u) for u in viewer.layers["flair"].units) == ("millimeter",) * 3


def test_flair_only_sample_is_a_lone_named_file(make_napari_viewer):
    from napari_whatishealthy._sample_data import make_flair_sample_data

    layers = make_flair_sample_data()
    assert [(kw["name"], kind) for _, kw, kind in layers] == [("Sample_flair", "image"),
                                                               ("seg", "labels")]
    assert layers[0][1]["metadata"]["modality"] == "flair"
    full = make_sample_data()
    np.testing.assert_array_equal(layers[0][0], full[0][0])  # the same FLAIR voxels
    viewer = make_napari_viewer()
    opened = viewer.open_sample(PLUGIN, "sample_flair")
    assert [layer.name for layer in opened] == ["Sample_flair", "seg"]
