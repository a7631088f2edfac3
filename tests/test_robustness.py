"""Robustness and safety (issue 6): every bad input is refused with an InputError that names the
file, says what is wrong and what to do; GPU out-of-memory halves the batch; writes lose nothing.

One test per case. Files are written byte for byte (``raw_nifti``) so that headers nibabel would
refuse to write (NaN or singular affines, odd dims) can be tested too. Everything is tiny.
"""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_checkpoint, tiny_network

from napari_whatishealthy import cli
from napari_whatishealthy.core import output as output_mod
from napari_whatishealthy.core import volume as volume_mod
from napari_whatishealthy.core.counterfactual import (
    CounterfactualSettings,
    counterfactual,
    is_out_of_memory,
    iter_counterfactual,
)
from napari_whatishealthy.core.errors import InputError, WhatIsHealthyError
from napari_whatishealthy.core.model import ModelSpec, ScheduleSpec, build_model
from napari_whatishealthy.core.output import write_nifti
from napari_whatishealthy.core.pipeline import LocalizeSettings, localize
from napari_whatishealthy.core.preprocess import prepare
from napari_whatishealthy.core.volume import (
    DEFAULT_MAX_VOXELS,
    MAX_VOXELS_ENV,
    find_case_files,
    is_case_folder,
    load_nifti,
    load_volume,
    max_voxels_bound,
    save_on_source_grid,
)

SHAPE = (6, 7, 5)


def raw_nifti(path: Path, data, affine=None, dtype=None, shape=None, xyzt_units=None,
              pixdim4=None) -> Path:
    """A single-file NIfTI-1 written byte for byte: any affine (NaN, singular), dims, dtype."""
    data = np.asarray(data)
    dtype = np.dtype(dtype or data.dtype)
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(data.shape if shape is None else shape)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    header["qform_code"] = 0
    header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    header["vox_offset"] = 352
    if xyzt_units is not None:
        header["xyzt_units"] = xyzt_units
    if pixdim4 is not None:
        header["pixdim"][4] = pixdim4
    payload = header.binaryblock + b"\0" * 4 + data.astype(dtype).tobytes(order="F")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") if path.name.endswith(".gz") else open(path, "wb") as fh:
        fh.write(payload)
    return path


def brain(shape=SHAPE, seed=0, channels=None) -> np.ndarray:
    """A skull-stripped-like volume: zero background, positive brain in the middle."""
    rng = np.random.default_rng(seed)
    data = np.zeros((*shape, channels) if channels else shape, np.float32)
    inner = tuple(slice(1, s - 1) for s in shape)
    data[inner] = rng.uniform(50, 500, size=data[inner].shape)
    return data


def refused(path_or_inputs, match: str, name: str | Path | None = None, **kwargs) -> str:
    """load_volume refuses with an InputError naming the file (``name``) and saying ``match``."""
    with pytest.raises(InputError) as info:
        load_volume(path_or_inputs, **kwargs)
    message = str(info.value)
    named = name if name is not None else path_or_inputs
    assert Path(named).name in message, message
    assert match in message, message
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------
# 1. Bad inputs


def test_truncated_gzip_is_refused(tmp_path):
    good = raw_nifti(tmp_path / "good_flair.nii.gz", brain((30, 30, 20)))
    blob = good.read_bytes()
    in_header = tmp_path / "head_flair.nii.gz"
    in_header.write_bytes(blob[:40])
    in_data = tmp_path / "data_flair.nii.gz"
    in_data.write_bytes(blob[: len(blob) * 2 // 3])
    assert nib.load(str(in_data)).shape == (30, 30, 20)  # the header itself is intact
    refused(in_header, "truncated or corrupt")
    refused(in_data, "truncated or corrupt")


def test_corrupt_gzip_is_refused(tmp_path):
    path = tmp_path / "corrupt_flair.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)  # gzip magic, garbage stream
    refused(path, "gzip data is truncated or corrupt")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("text_flair.nii.gz", b"hello, not an image" * 30, "not a gzip file"),
        ("png_flair.nii", b"\x89PNG\r\n\x1a\n" + b"\0" * 600, "no NIfTI-1 or NIfTI-2 header"),
        ("gzip_text_flair.nii.gz", gzip.compress(b"not a NIfTI header " * 60),
         "gzip-compressed data without a NIfTI header"),
        ("empty_flair.nii.gz", b"", "empty"),
    ],
)
def test_non_nifti_file_with_a_nifti_name_is_refused(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    message = refused(path, match)
    assert "not a readable NIfTI file" in message


def test_misnamed_compression_says_how_to_rename(tmp_path):
    plain = raw_nifti(tmp_path / "a_flair.nii", brain())
    fake_gz = tmp_path / "plain_flair.nii.gz"
    fake_gz.write_bytes(plain.read_bytes())
    refused(fake_gz, "rename it to .nii")
    packed = tmp_path / "packed_flair.nii"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    refused(packed, "rename it to .nii.gz")


@pytest.mark.parametrize("shape", [(8, 8, 1), (8, 8), (1, 9, 9), (12,)], ids=str)
def test_2d_image_is_refused(tmp_path, shape):
    path = raw_nifti(tmp_path / "slice_flair.nii.gz", np.ones(shape, np.float32))
    refused(path, "D image")


def test_empty_shape_is_refused(tmp_path):
    path = raw_nifti(tmp_path / "void_flair.nii.gz", np.zeros((6, 0, 5), np.float32))
    refused(path, "holds no voxels")


def test_4d_without_names_is_refused_with_what_to_do(tmp_path):
    path = raw_nifti(tmp_path / "multi.nii.gz", brain(channels=4))
    message = refused(path, "4D image with 4 volumes")
    assert "--modality flair,t1,t1ce,t2" in message and "split" in message
    # A time series says so.
    series = raw_nifti(tmp_path / "bold.nii.gz", brain(channels=20), xyzt_units=2 | 8,
                       pixdim4=2.0)
    message = refused(series, "time series")
    assert "2 sec" in message


def test_4d_with_modality_names_is_read_channel_by_channel(tmp_path):
    data = brain(channels=4, seed=3)
    path = raw_nifti(tmp_path / "multi.nii.gz", data)
    vol = load_volume(path, modalities={str(path): "t2w,t1n,t2f,t1c"})  # BraTS 2023 names
    assert vol.modalities == ("flair", "t1", "t1ce", "t2")  # canonical order
    order = {"t2": 0, "t1": 1, "flair": 2, "t1ce": 3}
    for m, k in order.items():
        assert np.array_equal(vol.channel(m), data[..., k])
    assert vol.source_paths == (path,) * 4 and vol.name == "multi"
    # The NIfTI vector layout (X, Y, Z, 1, C) is the same thing.
    vec = raw_nifti(tmp_path / "vec.nii.gz", data[:, :, :, None, :])
    assert np.array_equal(load_volume(vec, modalities={str(vec): ("t2", "t1", "flair", "t1ce")})
                          .data, vol.data)


def test_4d_with_the_wrong_number_of_names_is_refused(tmp_path):
    path = raw_nifti(tmp_path / "multi.nii.gz", brain(channels=4))
    refused(path, "2 modality names", modalities={str(path): "flair,t1"})
    three_d = raw_nifti(tmp_path / "single.nii.gz", brain())
    refused(three_d, "one name per file", modalities={str(three_d): "flair,t1"})
    five_d = raw_nifti(tmp_path / "five.nii.gz", np.ones((4, 4, 4, 2, 3), np.float32))
    refused(five_d, "5D image", modalities={str(five_d): "flair,t1,t2"})


def test_4d_through_the_command_line(capsys, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    data = brain((14, 14, 6), channels=4)
    path = raw_nifti(tmp_path / "in" / "scan.nii.gz", data, affine=np.diag([6.0, 6, 6, 1]))
    out = tmp_path / "out"
    rc = cli.main(["localize", str(path), "--out", str(out), "--model", str(ckpt),
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "scan.nii.gz" in err and "--modality" in err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    rc = cli.main(["localize", str(path), "--out", str(out), "--model", str(ckpt),
                   "--device", "cpu", "--modality", "flair,t1,t1ce,t2", "--steps", "1"])
    assert rc == 0, capsys.readouterr().err
    mask = nib.load(str(out / "scan_mask.nii.gz"))
    assert mask.shape == (14, 14, 6)


def test_nan_and_inf_voxels_are_refused_by_default(tmp_path):
    data = brain()
    data[2, 2, 2] = np.nan
    data[3, 3, 3] = np.inf
    path = raw_nifti(tmp_path / "holes_flair.nii.gz", data)
    refused(path, "2 NaN or infinite voxel(s)")
    # float64 values beyond float32 would become inf: refused the same way.
    huge = brain().astype(np.float64)
    huge[2, 2, 2] = 1e300
    refused(raw_nifti(tmp_path / "huge_flair.nii.gz", huge), "1 NaN or infinite")
    with pytest.raises(InputError, match="holes_flair"):
        load_nifti(path)


def test_nan_voxels_can_be_replaced_by_zero_with_a_warning(tmp_path):
    data = brain()
    data[2, 2, 2] = np.nan
    path = raw_nifti(tmp_path / "holes_flair.nii.gz", data)
    with pytest.warns(UserWarning, match="replaced by 0"):
        vol = load_volume(path, nonfinite="zero")
    assert np.isfinite(vol.data).all() and vol.data[0, 2, 2, 2] == 0
    assert any("holes_flair.nii.gz" in w for w in vol.warnings)
    with pytest.raises(WhatIsHealthyError, match="nonfinite"):
        load_volume(path, nonfinite="ignore")


def test_all_zero_volume_gives_an_empty_mask_and_a_notice(tmp_path):
    path = raw_nifti(tmp_path / "blank_flair.nii.gz", np.zeros(SHAPE, np.int16))
    with pytest.warns(UserWarning, match="no brain"):
        vol = load_volume(path)
    assert any("blank_flair.nii.gz" in w and "empty" in w for w in vol.warnings)
    prepared = prepare(vol.data, 16)
    assert prepared.slices.shape == (0, 1, 16, 16) and prepared.slice_index.size == 0
    spec = ModelSpec(image_size=16, modalities=("flair",), network=tiny_network())
    torch.manual_seed(0)
    model = build_model(spec).eval()
    result = localize(model, spec, vol.data,
                      LocalizeSettings.from_spec(spec, steps=2, device="cpu"))
    assert result.mask.shape == SHAPE and result.mask.sum() == 0
    assert any("no brain" in w for w in result.warnings)


def test_one_all_zero_modality_is_refused(tmp_path):
    raw_nifti(tmp_path / "c_flair.nii.gz", brain())
    raw_nifti(tmp_path / "c_t1.nii.gz", np.zeros(SHAPE, np.float32))
    refused(tmp_path, "zero everywhere", name="c_t1.nii.gz")


def test_missing_modality_is_refused_naming_the_case(tmp_path):
    case = tmp_path / "Case_7"
    raw_nifti(case / "Case_7_flair.nii.gz", brain())
    vol = load_volume(case)
    with pytest.raises(InputError) as info:
        vol.select(("flair", "t1", "t1ce", "t2"))
    message = str(info.value)
    assert "Case_7_flair.nii.gz" in message and "missing modality t1, t1ce, t2" in message
    assert "Case_7_t1.nii.gz" in message  # what to provide


def test_modalities_on_different_grids_are_refused(tmp_path):
    raw_nifti(tmp_path / "a" / "c_flair.nii.gz", brain())
    raw_nifti(tmp_path / "a" / "c_t1.nii.gz", brain((6, 7, 6)))
    refused(tmp_path / "a", "co-registered", name="c_t1.nii.gz")
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    raw_nifti(tmp_path / "b" / "c_flair.nii.gz", brain())
    raw_nifti(tmp_path / "b" / "c_t1.nii.gz", brain(), affine=shifted)
    refused(tmp_path / "b", "affine differs", name="c_t1.nii.gz")
    raw_nifti(tmp_path / "b" / "c_seg.nii.gz", np.zeros((6, 7, 6), np.uint8))
    (tmp_path / "b" / "c_t1.nii.gz").unlink()
    refused(tmp_path / "b", "co-registered", name="c_seg.nii.gz")


@pytest.mark.parametrize(
    "affine, match",
    [
        (np.diag([1.0, np.nan, 1.0, 1.0]), "non-finite"),
        (np.diag([1.0, np.inf, 1.0, 1.0]), "non-finite"),
        (np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
        (np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),
    ],
    ids=["nan", "inf", "zero-voxel", "parallel-axes"],
)
def test_bad_affine_is_refused(tmp_path, affine, match):
    refused(raw_nifti(tmp_path / "bad_flair.nii.gz", brain(), affine=affine), match)


def test_tiny_but_valid_voxels_are_accepted(tmp_path):
    vol = load_volume(raw_nifti(tmp_path / "fine_flair.nii.gz", brain(),
                                affine=np.diag([1e-3, 1e-3, 1e-3, 1.0])))
    assert vol.zooms == pytest.approx((1e-3,) * 3)


@pytest.mark.parametrize(
    "dtype, match",
    [
        (np.complex64, "complex-valued"),
        (np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), "RGB"),
    ],
    ids=["complex", "rgb"],
)
def test_unsupported_data_type_is_refused(tmp_path, dtype, match):
    refused(raw_nifti(tmp_path / "odd_flair.nii.gz", np.zeros(SHAPE, dtype)), match)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int64, np.float64])
def test_real_data_types_are_accepted(tmp_path, dtype):
    data = (brain() / 10).astype(dtype)
    vol = load_volume(raw_nifti(tmp_path / "ok_flair.nii.gz", data))
    assert vol.data.dtype == np.float32 and np.array_equal(vol.data[0], data.astype(np.float32))


def test_nifti2_and_big_endian_files_are_read_and_written_back_in_kind(tmp_path):
    data = brain()
    nib.save(nib.Nifti2Image(data, np.diag([2.0, 2, 2, 1])), tmp_path / "n2_flair.nii.gz")
    big = nib.Nifti1Image(data, np.eye(4), header=nib.Nifti1Header(endianness=">"))
    nib.save(big, tmp_path / "be_flair.nii")
    for name in ("n2_flair.nii.gz", "be_flair.nii"):
        vol = load_volume(tmp_path / name)
        assert np.array_equal(vol.data[0], data)
        out = save_on_source_grid(vol.data[0], vol, tmp_path / "out" / name.replace("flair", "x"))
        back = nib.load(str(out))
        assert type(back) is type(nib.load(str(tmp_path / name)))
        assert np.array_equal(np.asarray(back.dataobj), data)


def test_too_large_is_refused_from_the_header_before_reading(tmp_path, monkeypatch):
    # The header claims 64^3 voxels but the data is cut short: reading would fail differently.
    full = raw_nifti(tmp_path / "full_flair.nii", np.ones((64, 64, 64), np.int16))
    cut = tmp_path / "big_flair.nii"
    cut.write_bytes(full.read_bytes()[:2000])
    monkeypatch.setenv(MAX_VOXELS_ENV, "100000")
    message = refused(cut, "too large")
    assert "262,144 voxels" in message and "100,000" in message and "KiB" in message
    assert MAX_VOXELS_ENV in message
    refused(cut, "too large", max_voxels=1000)
    monkeypatch.setenv(MAX_VOXELS_ENV, "0")  # no bound: now the truncation shows
    refused(cut, "truncated")
    # The bound counts every channel of the case.
    monkeypatch.setenv(MAX_VOXELS_ENV, str(2 * 6 * 7 * 5 - 1))
    case = tmp_path / "case"
    for m in ("flair", "t1"):
        raw_nifti(case / f"case_{m}.nii.gz", brain())
    message = refused(case, "2 channel(s)", name="case_flair.nii.gz")
    assert "case_t1.nii.gz" in message
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(WhatIsHealthyError, match=MAX_VOXELS_ENV):
        load_volume(case)
    monkeypatch.delenv(MAX_VOXELS_ENV)
    assert max_voxels_bound() == DEFAULT_MAX_VOXELS


def test_modality_given_twice_and_ambiguous_folders_are_refused(tmp_path):
    a = raw_nifti(tmp_path / "x" / "c_flair.nii.gz", brain())
    b = raw_nifti(tmp_path / "x" / "c_t2f.nii.gz", brain())  # BraTS 2023 name of FLAIR
    refused([a, b], "given twice", name=b)
    refused(tmp_path / "x", "two files for modality flair", name="x")
    assert is_case_folder(tmp_path / "x")  # the predicate never raises


def test_result_files_in_a_case_folder_are_not_taken_for_inputs(tmp_path):
    case = tmp_path / "Case_1"
    flair = raw_nifti(case / "Case_1_flair.nii.gz", brain())
    raw_nifti(case / "Case_1_flair_mask.nii.gz", np.ones(SHAPE, np.uint8))  # a saved result
    raw_nifti(case / "Case_1_healthy_flair.nii.gz", brain(seed=5))
    files = find_case_files(case)
    assert files == {"flair": flair}
    seg = raw_nifti(case / "Case_1_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    assert find_case_files(case)["seg"] == seg


def test_missing_file_folder_and_unreadable_inputs(tmp_path):
    refused(tmp_path / "nowhere_flair.nii.gz", "no such file")
    folder = tmp_path / "dir_flair.nii.gz"
    folder.mkdir()
    with pytest.raises(InputError, match="no modality files"):
        load_volume(folder)
    with pytest.raises(InputError, match="no input"):
        load_volume([])
    with pytest.raises(InputError, match="not a usable path"):
        load_volume(tmp_path / ("x" * 5000 + "_flair.nii.gz"))


def test_keyboard_interrupt_is_never_swallowed(tmp_path, monkeypatch):
    path = raw_nifti(tmp_path / "ok_flair.nii.gz", brain())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(volume_mod.nib, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_volume(path)


# ------------------------------------------------------------------------------------------------
# 2. GPU out of memory


class BatchLimited:
    """A per-sample deterministic predictor that runs out of memory above ``limit`` samples."""

    def __init__(self, limit: int | None, error=torch.OutOfMemoryError):
        self.limit, self.error, self.sizes = limit, error, []

    def __call__(self, x, t, labels):
        self.sizes.append(x.shape[0])
        if self.limit is not None and x.shape[0] > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        shift = (t.float() / 1000 + labels.float() / 7).reshape(-1, 1, 1, 1)
        return torch.tanh(x * 0.7 + shift)


def _slices(n=10):
    rng = np.random.default_rng(1)
    return rng.uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32)


SETTINGS = dict(steps=3, noise_level=0.3, guidance=2.0, device="cpu", amp=False)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError], ids=["oom", "runtime"])
def test_out_of_memory_halves_the_batch_and_gives_the_same_result(error):
    slices = _slices()
    normal = counterfactual(BatchLimited(None), slices,
                            CounterfactualSettings(batch_size=16, **SETTINGS),
                            schedule=ScheduleSpec())
    limited = BatchLimited(4, error)
    progress = []
    result = counterfactual(limited, slices, CounterfactualSettings(batch_size=16, **SETTINGS),
                            progress.append, schedule=ScheduleSpec())
    assert np.allclose(result, normal, atol=1e-6)
    assert max(limited.sizes) > 4 and 4 in limited.sizes  # failed big, then ran at <= 4
    steps = [p.step for p in progress]
    assert steps == sorted(steps) and progress[-1].step == progress[-1].total


def test_out_of_memory_with_one_slice_is_a_clear_error():
    gen = iter_counterfactual(BatchLimited(0), _slices(3),
                              CounterfactualSettings(batch_size=8, **SETTINGS),
                              schedule=ScheduleSpec())
    with pytest.raises(WhatIsHealthyError, match="out of memory on cpu even with one slice") as e:
        list(gen)
    assert "--device cpu" in str(e.value) and "started at 8" in str(e.value)


def test_other_errors_are_not_taken_for_out_of_memory():
    limited = BatchLimited(0, RuntimeError)
    limited.error = lambda msg: RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        counterfactual(limited, _slices(2), CounterfactualSettings(batch_size=2, **SETTINGS),
                       schedule=ScheduleSpec())
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("out of memory"))


# ------------------------------------------------------------------------------------------------
# 3. No data loss


@pytest.fixture
def small_volume(tmp_path):
    path = raw_nifti(tmp_path / "in" / "case_flair.nii.gz", brain())
    return load_volume(path)


def _img():
    return nib.Nifti1Image(np.ones(SHAPE, np.float32), np.eye(4))


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_interrupted_save_leaves_no_temporary_file_and_no_target(tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    out.mkdir()
    real_save = nib.save

    def failing_save(img, filename):  # half a file, then the failure
        real_save(img, filename)
        with open(filename, "r+b") as fh:
            fh.truncate(60)
        raise error

    # A full disk becomes a one-line error naming the target (not the temporary file).
    expected = InputError if isinstance(error, OSError) else type(error)
    monkeypatch.setattr(volume_mod.nib, "save", failing_save)
    with pytest.raises(expected) as info:
        write_nifti(_img(), out / "new_mask.nii.gz")
    if expected is InputError:
        assert "new_mask.nii.gz: could not be written (No space left on device)" in str(info.value)
        assert "wih-tmp" not in str(info.value)
    assert list(out.iterdir()) == []
    # An existing output being replaced survives intact.
    monkeypatch.setattr(volume_mod.nib, "save", real_save)
    write_nifti(_img(), out / "kept.nii.gz")
    before = (out / "kept.nii.gz").read_bytes()
    monkeypatch.setattr(volume_mod.nib, "save", failing_save)
    with pytest.raises(expected):
        write_nifti(_img(), out / "kept.nii.gz", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["kept.nii.gz"]
    assert (out / "kept.nii.gz").read_bytes() == before


def test_never_writes_over_an_input(tmp_path, small_volume):
    source = small_volume.source_paths[0]
    before = source.read_bytes()
    link = tmp_path / "link_mask.nii.gz"
    link.symlink_to(source)
    hard = tmp_path / "hard_mask.nii.gz"
    os.link(source, hard)
    for target in (source, tmp_path / "in" / ".." / "in" / "case_flair.nii.gz", link, hard):
        with pytest.raises(InputError, match="refusing to overwrite an input") as info:
            save_on_source_grid(small_volume.data[0], small_volume, target, overwrite=True)
        assert Path(target).name in str(info.value)
    assert source.read_bytes() == before


def test_segmentation_of_the_case_is_protected_too(tmp_path):
    case = tmp_path / "c"
    raw_nifti(case / "c_flair.nii.gz", brain())
    seg = raw_nifti(case / "c_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    vol = load_volume(case)
    assert seg in vol.input_paths
    with pytest.raises(InputError, match="c_seg.nii.gz: refusing to overwrite an input"):
        save_on_source_grid(np.zeros(vol.shape), vol, seg, dtype=np.uint8, overwrite=True)


def test_existing_output_is_not_overwritten_without_overwrite(tmp_path, small_volume):
    target = tmp_path / "out" / "case_mask.nii.gz"
    save_on_source_grid(np.zeros(small_volume.shape), small_volume, target, dtype=np.uint8)
    before = target.read_bytes()
    with pytest.raises(InputError, match="case_mask.nii.gz: already exists; pass --overwrite"):
        save_on_source_grid(np.ones(small_volume.shape), small_volume, target, dtype=np.uint8)
    assert target.read_bytes() == before
    save_on_source_grid(np.ones(small_volume.shape), small_volume, target, dtype=np.uint8,
                        overwrite=True)
    assert target.read_bytes() != before
    folder = tmp_path / "out" / "folder.nii.gz"
    folder.mkdir()
    with pytest.raises(InputError, match="folder.nii.gz: is a folder"):
        write_nifti(_img(), folder, overwrite=True)


def test_outputs_get_normal_permissions(tmp_path):
    path = write_nifti(_img(), tmp_path / "perm.nii.gz")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & stat.S_IRUSR and mode & stat.S_IWUSR
    assert mode == 0o666 & ~output_mod.current_umask()  # not mkstemp's private 0600
