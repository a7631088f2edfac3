"""Volumes: canonical orientation on load, outputs back on the source grid, safe writes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti as _write

from napari_whatishealthy.core import volume as volume_mod
from napari_whatishealthy.core.errors import InputError
from napari_whatishealthy.core.volume import load_volume, save_on_source_grid

# Stored LPS-like (x and y flipped) with a shifted origin, anisotropic voxels.
LPS_AFFINE = np.array([
    [-2.0, 0.0, 0.0, 31.0],
    [0.0, -2.0, 0.0, -17.5],
    [0.0, 0.0, 3.0, 4.25],
    [0.0, 0.0, 0.0, 1.0],
])
# Axes permuted as well (stored y, z, x): canonical loading must transpose.
PERMUTED_AFFINE = np.array([
    [0.0, 0.0, 1.5, -20.0],
    [-2.0, 0.0, 0.0, 12.0],
    [0.0, 3.0, 0.0, -7.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _stored(shape=(7, 9, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 1000, size=shape).astype(np.int16)


@pytest.mark.parametrize("affine", [LPS_AFFINE, PERMUTED_AFFINE], ids=["lps", "permuted"])
def test_canonical_load_keeps_world_coordinates(tmp_path, affine):
    stored = _stored()
    path = _write(tmp_path / "case_flair.nii.gz", stored, affine)
    vol = load_volume(path)
    assert vol.modalities == ("flair",) and vol.name == "case"
    assert np.allclose(vol.source_affine, affine)
    # Canonical RAS: a diagonal affine with positive voxel sizes.
    assert np.all(np.diag(vol.affine)[:3] > 0)
    assert np.allclose(vol.affine[:3, :3] - np.diag(np.diag(vol.affine)[:3]), 0)
    # Every canonical voxel holds the stored voxel at the same world position.
    inv_src = np.linalg.inv(affine)
    for idx in [(0, 0, 0), (1, 2, 3), tuple(s - 1 for s in vol.shape)]:
        world = vol.affine @ np.array([*idx, 1.0])
        src = np.rint(inv_src @ world).astype(int)[:3]
        assert vol.data[(0, *idx)] == stored[tuple(src)]


@pytest.mark.parametrize("affine", [LPS_AFFINE, PERMUTED_AFFINE], ids=["lps", "permuted"])
def test_mask_written_back_lands_on_the_source_grid(tmp_path, affine):
    stored = _stored(seed=1)
    path = _write(tmp_path / "case_flair.nii.gz", stored, affine)
    vol = load_volume(path)
    cut = float(np.median(stored))
    mask = (vol.data[0] > cut).astype(np.uint8)  # computed in canonical space
    out = save_on_source_grid(mask, vol, tmp_path / "out" / "case_mask.nii.gz", dtype=np.uint8)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    assert img.shape == stored.shape
    assert np.array_equal(img.affine, nib.load(str(path)).affine)
    assert np.allclose(img.get_qform(), affine) and np.allclose(img.get_sform(), affine)
    back = np.asarray(img.dataobj)
    assert back.dtype == np.uint8
    assert np.array_equal(back, (stored > cut).astype(np.uint8))  # voxel for voxel

    # A float map goes back exactly too.
    fmap = save_on_source_grid(vol.data[0] / 7.0, vol, tmp_path / "out" / "case_map.nii.gz")
    fimg = nib.load(str(fmap))
    assert fimg.get_data_dtype() == np.float32
    assert np.allclose(np.asarray(fimg.dataobj), stored / 7.0, rtol=1e-6)


def test_refuses_to_write_over_an_input(tmp_path):
    path = _write(tmp_path / "case_flair.nii.gz", _stored(), LPS_AFFINE)
    before = path.read_bytes()
    vol = load_volume(path)
    with pytest.raises(InputError, match="input file"):
        save_on_source_grid(vol.data[0], vol, path, overwrite=True)
    # Also through another spelling of the same path.
    with pytest.raises(InputError, match="input file"):
        save_on_source_grid(vol.data[0], vol, tmp_path / "." / "case_flair.nii.gz",
                            overwrite=True)
    assert path.read_bytes() == before


def test_existing_output_needs_overwrite(tmp_path):
    vol = load_volume(_write(tmp_path / "case_flair.nii.gz", _stored(), LPS_AFFINE))
    target = tmp_path / "case_mask.nii.gz"
    save_on_source_grid(np.zeros(vol.shape), vol, target, dtype=np.uint8)
    with pytest.raises(InputError, match="already exists"):
        save_on_source_grid(np.ones(vol.shape), vol, target, dtype=np.uint8)
    assert np.asarray(nib.load(str(target)).dataobj).max() == 0
    save_on_source_grid(np.ones(vol.shape), vol, target, dtype=np.uint8, overwrite=True)
    assert np.asarray(nib.load(str(target)).dataobj).min() == 1


def test_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    vol = load_volume(_write(tmp_path / "in" / "case_flair.nii.gz", _stored(), LPS_AFFINE))
    out_dir = tmp_path / "out"
    save_on_source_grid(vol.data[0], vol, out_dir / "ok.nii.gz")
    assert [p.name for p in out_dir.iterdir()] == ["ok.nii.gz"]

    real_save = nib.save

    def failing_save(img, filename):  # writes part of the file, then the disk "fills up"
        real_save(img, filename)
        with open(filename, "r+b") as fh:
            fh.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volume_mod.nib, "save", failing_save)
    with pytest.raises(InputError, match="broken.nii.gz: could not be written"):
        save_on_source_grid(vol.data[0], vol, out_dir / "broken.nii.gz")
    assert [p.name for p in out_dir.iterdir()] == ["ok.nii.gz"]


def test_case_folder_loads_all_modalities_and_segmentation(case_dirs):
    vol = load_volume(case_dirs[0])
    assert vol.modalities == ("flair", "t1", "t1ce", "t2")
    assert vol.name == case_dirs[0].name
    assert vol.data.shape == (4, 40, 40, 26) and vol.data.dtype == np.float32
    assert vol.segmentation is not None and vol.segmentation.shape == vol.shape
    assert set(np.unique(vol.segmentation)) <= {0, 1, 2, 4}
    # Synthetic cases are stored as BraTS stores them (x, y flipped); loading undoes that.
    assert np.all(np.diag(vol.affine)[:3] > 0)
    assert np.all(np.diag(vol.source_affine)[:2] < 0)
    # Selecting reorders channels.
    sub = vol.select(("t2", "flair"))
    assert np.array_equal(sub.data[1], vol.data[0])
    with pytest.raises(InputError, match="missing modality"):
        load_volume(case_dirs[0] / f"{case_dirs[0].name}_flair.nii.gz").select(("flair", "t1"))


def test_modalities_on_different_grids_are_refused(tmp_path):
    _write(tmp_path / "c_flair.nii.gz", _stored(), LPS_AFFINE)
    shifted = LPS_AFFINE.copy()
    shifted[0, 3] += 2.0
    _write(tmp_path / "c_t1.nii.gz", _stored(), shifted)
    with pytest.raises(InputError, match="co-registered"):
        load_volume(tmp_path)
    _write(tmp_path / "c_t1.nii.gz", _stored(shape=(7, 9, 6)), LPS_AFFINE)
    with pytest.raises(InputError, match="shape"):
        load_volume(tmp_path)


def test_broken_files_are_refused_with_the_file_name(tmp_path):
    good = _write(tmp_path / "good_flair.nii.gz", _stored(), LPS_AFFINE)
    truncated = tmp_path / "trunc_flair.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    fake = tmp_path / "fake_flair.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not a nifti file at all" * 20))
    # Truncated after the header: the voxels are what fails to read.
    big = _write(tmp_path / "big_flair.nii.gz", _stored(shape=(40, 40, 30)), LPS_AFFINE)
    cut = tmp_path / "cut_flair.nii.gz"
    cut.write_bytes(big.read_bytes()[: int(big.stat().st_size * 0.6)])
    assert nib.load(str(cut)).shape == (40, 40, 30)  # the header is intact
    for path in (truncated, fake, cut, tmp_path / "missing_flair.nii.gz"):
        with pytest.raises(InputError, match=path.name):
            load_volume(path)
    with pytest.raises(InputError, match="truncated"):
        load_volume(cut)
