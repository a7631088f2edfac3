"""The napari reader and writer: geometry in RAS mm, metadata, and masks back on the source grid."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti as _write

from napari_whatishealthy._layers import default_mask_path, napari_to_ras_affine
from napari_whatishealthy._reader import napari_get_reader
from napari_whatishealthy._writer import layer_meta, write_labels
from napari_whatishealthy.core.errors import InputError

PLUGIN = "napari-whatishealthy"
SHAPE = (12, 10, 8)  # stored i, j, k
MARKER = (2, 7, 5)  # one bright voxel, off every symmetry axis


def _lps_affine() -> np.ndarray:
    """Stored LPS-like: i runs to the left, j to posterior, k superior; anisotropic voxels."""
    affine = np.diag([-1.5, -2.0, 3.0, 1.0])
    affine[:3, 3] = [40.0, 25.0, -10.0]
    return affine


@pytest.fixture
def lps_case(tmp_path) -> Path:
    """A BraTS-layout case stored in LPS order with a marker voxel and a segmentation."""
    folder = tmp_path / "Case_01"
    folder.mkdir()
    rng = np.random.default_rng(0)
    brain = np.zeros(SHAPE)
    brain[2:10, 2:9, 1:7] = 1
    brain[MARKER] = 1
    for modality in ("flair", "t1", "t1ce", "t2"):
        image = (rng.uniform(100, 200, SHAPE) * brain).astype(np.int16)
        image[MARKER] = 1000
        _write(folder / f"Case_01_{modality}.nii.gz", image, _lps_affine())
    seg = np.zeros(SHAPE, np.uint8)
    seg[3:6, 3:5, 2:4] = 2
    seg[MARKER] = 1
    _write(folder / "Case_01_seg.nii.gz", seg, _lps_affine(), np.uint8)
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_get_reader_accepts_only_ours(tmp_path, lps_case):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert napari_get_reader(str(text)) is None
    assert napari_get_reader(str(empty)) is None
    assert napari_get_reader(str(tmp_path / "missing.nii.gz")) is None
    assert napari_get_reader(str(tmp_path / "volume.gz")) is None
    assert napari_get_reader(12345) is None  # never raises, whatever it is given
    assert callable(napari_get_reader(str(lps_case)))
    assert callable(napari_get_reader(str(lps_case / "Case_01_flair.nii.gz")))
    assert callable(napari_get_reader([str(lps_case / "Case_01_t1.nii.gz"),
                                       str(lps_case / "Case_01_t2.nii.gz")]))
    assert napari_get_reader([str(lps_case / "Case_01_t1.nii.gz"), str(text)]) is None


def test_broken_file_of_our_format_raises_a_clear_error(tmp_path):
    broken = tmp_path / "broken_flair.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file at all")
    reader = napari_get_reader(str(broken))
    assert reader is not None
    with pytest.raises(InputError, match="broken_flair.nii.gz"):
        reader(str(broken))


def test_case_folder_layers_and_metadata(lps_case):
    layers = napari_get_reader(str(lps_case))(str(lps_case))
    names = [kwargs["name"] for _, kwargs, _ in layers]
    kinds = [kind for _, _, kind in layers]
    assert names == ["flair", "t1", "t1ce", "t2", "seg"]
    assert kinds == ["image"] * 4 + ["labels"]
    data, kwargs, _ = layers[0]
    # canonical RAS (12, 10, 8) -> napari (S, A, R) = (8, 10, 12)
    assert data.shape == (8, 10, 12)
    assert kwargs["scale"] == pytest.approx((3.0, 2.0, 1.5))
    assert kwargs["units"] == ("mm", "mm", "mm")
    meta = kwargs["metadata"]
    assert meta["modality"] == "flair"
    assert Path(meta["source_path"]).name == "Case_01_flair.nii.gz"
    assert len(meta["source_paths"]) == 4
    np.testing.assert_allclose(meta["source_affine"], _lps_affine())
    header = nib.Nifti1Header(binaryblock=meta["source_header"])
    assert header.get_data_shape() == SHAPE
    seg_data, seg_kwargs, _ = layers[-1]
    assert seg_data.dtype == np.uint8 and set(np.unique(seg_data)) == {0, 1, 2}
    assert Path(seg_kwargs["metadata"]["source_path"]).name == "Case_01_seg.nii.gz"


def test_reader_geometry_on_an_lps_file(make_napari_viewer, lps_case):
    """The marker voxel lands at the RAS millimetre position its source affine gives it."""
    viewer = make_napari_viewer()
    path = lps_case / "Case_01_flair.nii.gz"
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert len(layers) == 1
    layer = layers[0]
    assert layer.name == "Case_01_flair"
    index = np.unravel_index(np.argmax(layer.data), layer.data.shape)
    world = np.asarray(layer.data_to_world(index))  # napari world: (S, A, R) mm
    expected_ras = (_lps_affine() @ np.array([*MARKER, 1.0]))[:3]
    np.testing.assert_allclose(world[::-1], expected_ras, atol=1e-6)
    # The world axes really are R, A, S: the first stored axis (L) runs against napari's last.
    assert tuple(layer.axis_labels) == ("S", "A", "R")


def test_reader_geometry_on_an_oblique_file(make_napari_viewer, tmp_path):
    theta = np.deg2rad(10)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                         [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.2, 2.5])
    affine[:3, 3] = [-5.0, 3.0, 7.0]
    data = np.zeros(SHAPE, np.int16)
    data[MARKER] = 500
    path = _write(tmp_path / "oblique_t1.nii.gz", data, affine)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    index = np.unravel_index(np.argmax(layer.data), layer.data.shape)
    world = np.asarray(layer.data_to_world(index))
    np.testing.assert_allclose(world[::-1], (affine @ np.array([*MARKER, 1.0]))[:3], atol=1e-6)


def test_writer_round_trip_onto_the_source_grid(make_napari_viewer, lps_case, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(lps_case), plugin=PLUGIN)
    seg = viewer.layers["seg"]
    before = _digest(lps_case)
    out = tmp_path / "out" / "Case_01_mask.nii.gz"
    written = seg.save(str(out), plugin=PLUGIN)
    assert [Path(p) for p in written] == [out]
    img = nib.load(str(out))
    source = nib.load(str(lps_case / "Case_01_seg.nii.gz"))
    np.testing.assert_allclose(img.affine, source.affine)
    assert img.shape == source.shape
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(source.dataobj))
    assert _digest(lps_case) == before


def test_writer_is_chosen_by_extension(make_napari_viewer, lps_case, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(lps_case), plugin=PLUGIN)
    out = tmp_path / "mask.nii"
    viewer.layers["seg"].save(str(out))  # no plugin named: napari finds ours for .nii
    assert nib.load(str(out)).shape == SHAPE


def test_writer_never_overwrites_a_source(make_napari_viewer, lps_case):
    viewer = make_napari_viewer()
    viewer.open(str(lps_case), plugin=PLUGIN)
    before = _digest(lps_case)
    seg = viewer.layers["seg"]
    for target in ("Case_01_seg.nii.gz", "Case_01_flair.nii.gz"):
        with pytest.raises(InputError, match="refusing to overwrite"):
            write_labels(str(lps_case / target), seg.data, layer_meta(seg))
    assert _digest(lps_case) == before


def test_writer_refuses_a_mask_off_the_source_grid(lps_case, tmp_path):
    layers = napari_get_reader(str(lps_case))(str(lps_case))
    _, kwargs, _ = layers[-1]
    with pytest.raises(InputError, match="does not match the grid"):
        write_labels(str(tmp_path / "m.nii.gz"), np.zeros((3, 3, 3), np.uint8), kwargs)


def test_writer_without_source_metadata_uses_the_layer_geometry(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = np.zeros((5, 6, 7), np.uint8)  # (S, A, R)
    data[1, 2, 3] = 3
    layer = viewer.add_labels(data, scale=(2.0, 1.5, 1.0), translate=(-4.0, 10.0, 20.0))
    out = tmp_path / "plain"
    (path,) = write_labels(str(out), layer.data, layer_meta(layer))
    assert path.endswith("plain.nii.gz")
    img = nib.load(path)
    assert img.shape == (7, 6, 5)
    voxel = np.argwhere(np.asarray(img.dataobj) == 3)[0]
    world = (img.affine @ np.array([*voxel, 1.0]))[:3]
    np.testing.assert_allclose(world[::-1], layer.data_to_world((1, 2, 3)), atol=1e-6)
    # The same transform through the helper, rotation included.
    ras = napari_to_ras_affine(scale=(2, 1.5, 1), translate=(-4, 10, 20))
    np.testing.assert_allclose(ras, img.affine)


def test_writer_refuses_values_that_do_not_fit_uint8(tmp_path):
    data = np.zeros((3, 3, 3), np.int32)
    data[0, 0, 0] = 300
    with pytest.raises(InputError, match="uint8"):
        write_labels(str(tmp_path / "m.nii.gz"), data, {"metadata": {}})


def test_default_mask_path_is_next_to_the_source(lps_case):
    layers = napari_get_reader(str(lps_case))(str(lps_case))
    meta = layers[0][1]["metadata"]
    path = default_mask_path(meta, "flair mask")
    assert path.name == "Case_01_flair_mask.nii.gz"
    assert path.parent.resolve() == lps_case.resolve()
    assert path.resolve() not in {Path(p).resolve() for p in meta["source_paths"]}


def test_saved_mask_does_not_replace_the_segmentation_of_the_case(lps_case, tmp_path):
    """A `<case>_flair_mask.nii.gz` saved into the case folder is not read as its `seg`."""
    layers = napari_get_reader(str(lps_case))(str(lps_case))
    seg_data, seg_kwargs, _ = layers[-1]
    write_labels(str(lps_case / "Case_01_flair_mask.nii.gz"), np.zeros_like(seg_data), seg_kwargs)
    again = napari_get_reader(str(lps_case))(str(lps_case))
    assert Path(again[-1][1]["metadata"]["source_path"]).name == "Case_01_seg.nii.gz"
    np.testing.assert_array_equal(again[-1][0], seg_data)
