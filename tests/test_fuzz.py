"""Fuzz tests (hypothesis): random NIfTI files through the reader, preprocessing and localize.

Whatever the header (shape of 1 to 5 dims, zero-size, any affine including singular and NaN, data
types from bool to complex), the voxel values (NaN, Inf, huge) or the bytes (random, truncated,
flipped), nothing may escape but the project's own error type with a non-empty message; errors
of the reader name the file. Volumes that load go through ``preprocess.prepare`` without error,
and a few through the whole localize path with a tiny random-init model.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_network
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_whatishealthy.core.errors import InputError, WhatIsHealthyError
from napari_whatishealthy.core.model import ModelSpec, build_model
from napari_whatishealthy.core.pipeline import LocalizeSettings, localize
from napari_whatishealthy.core.preprocess import prepare
from napari_whatishealthy.core.volume import load_volume

# WHATISHEALTHY_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py fuzzes deeper (the default is quick).
EXAMPLES = int(os.environ.get("WHATISHEALTHY_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)

pytestmark = pytest.mark.filterwarnings("ignore:.*every voxel is zero:UserWarning")

DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "int64", "uint64", "float32", "float64",
          "complex64", "bool"]
SPECIAL = [0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e30, -1e30, 1e300, 5e-324, 3e38]


def nifti_bytes(data: np.ndarray, affine: np.ndarray, dims: tuple[int, ...] | None = None,
                sform: bool = True) -> bytes:
    """A single-file NIfTI-1 byte for byte, whatever nibabel would think of it."""
    header = nib.Nifti1Header()
    stored = data.astype(np.uint8) if data.dtype.kind == "b" else data
    header.set_data_dtype(stored.dtype)
    header.set_data_shape(data.shape if dims is None else dims)
    header["vox_offset"] = 352
    header["qform_code"] = 0
    header["sform_code"] = 1 if sform else 0
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    if not sform:
        header["pixdim"][1:4] = np.diag(affine)[:3]
    return header.binaryblock + b"\0" * 4 + stored.tobytes(order="F")


@st.composite
def affines(draw, valid_only: bool = False) -> np.ndarray:
    kinds = ["diag", "permuted"] + ([] if valid_only else ["random", "singular", "nan", "inf"])
    kind = draw(st.sampled_from(kinds))
    affine = np.eye(4)
    if kind == "diag":
        sizes = draw(st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3))
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
        affine[:3, :3] = np.diag(np.array(sizes) * np.array(signs))
    elif kind == "permuted":
        perm = draw(st.permutations([0, 1, 2]))
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
        affine[:3, :3] = np.eye(3)[list(perm)] * np.array(signs)
    elif kind == "random":
        affine[:3, :3] = draw(hnp.arrays(np.float64, (3, 3),
                                         elements=st.floats(-1e3, 1e3, allow_nan=False)))
    elif kind == "singular":
        affine[:3, :3] = np.diag([1.0, 0.0, 1.0])
    else:
        affine[draw(st.integers(0, 2)), draw(st.integers(0, 3))] = (
            np.nan if kind == "nan" else np.inf)
    affine[:3, 3] = draw(st.lists(st.floats(-1e4, 1e4), min_size=3, max_size=3))
    return affine


@st.composite
def shapes(draw) -> tuple[int, ...]:
    """Mostly volumes (3D, 4D, singleton axes), else anything of 1 to 5 dims, zero-size too."""
    kind = draw(st.sampled_from(["3d", "3d", "3d", "4d", "any"]))
    spatial = tuple(draw(st.lists(st.integers(2, 6), min_size=3, max_size=3)))
    if kind == "3d":
        return spatial + ((1,) if draw(st.booleans()) else ())
    if kind == "4d":
        return spatial + (draw(st.integers(2, 4)),)
    ndim = draw(st.integers(1, 5))
    return tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))


@st.composite
def volumes(draw) -> np.ndarray:
    shape = draw(shapes())
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    size = int(np.prod(shape))
    pattern = draw(st.sampled_from(["random", "zeros", "constant", "special"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if pattern == "zeros":
        values = np.zeros(size)
    elif pattern == "constant":
        values = np.full(size, draw(st.sampled_from([1.0, -3.0, 255.0])))
    else:
        values = rng.normal(100, 300, size)
        if pattern == "special" and size:
            picks = rng.integers(0, size, size=max(1, size // 10))
            values[picks] = rng.choice(SPECIAL, size=picks.size)
    if dtype.kind == "b":
        data = (values > 50).reshape(shape)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        clean = np.nan_to_num(values, nan=0.0, posinf=info.max, neginf=info.min)
        with np.errstate(all="ignore"):  # uint64's max is not a float64: the cast may wrap
            data = np.clip(clean, info.min, info.max).astype(dtype).reshape(shape)
    else:
        with np.errstate(all="ignore"):
            data = values.astype(dtype).reshape(shape)
    return data


def check_load(path: Path, **kwargs) -> None:
    """Load and prepare; only the project's errors, with a message naming the file, escape."""
    try:
        volume = load_volume(path, **kwargs)
    except WhatIsHealthyError as exc:
        message = str(exc)
        assert message.strip() and "\n" not in message, repr(message)
        if isinstance(exc, InputError):
            assert path.name in message, message
        event("refused: " + message.split(": ", 1)[-1][:30])
        return
    event("loaded")
    assert volume.data.dtype == np.float32 and volume.data.ndim == 4
    assert np.isfinite(volume.data).all()
    prepared = prepare(volume.data, 16)  # a loaded volume always prepares
    assert prepared.slices.shape[1:] == (volume.data.shape[0], 16, 16)
    assert np.isfinite(prepared.slices).all()


@FUZZ
@given(data=volumes(), affine=affines(), gz=st.booleans(), sform=st.booleans(),
       named=st.booleans(), nonfinite=st.sampled_from(["refuse", "zero"]))
def test_random_headers_shapes_dtypes_and_values(data, affine, gz, sform, named, nonfinite):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("case.nii.gz" if gz else "case.nii")
        blob = nifti_bytes(data, affine, sform=sform)
        path.write_bytes(gzip.compress(blob, compresslevel=1) if gz else blob)
        kwargs: dict = {"nonfinite": nonfinite}
        if named and data.ndim == 4 and 1 < data.shape[3] <= 4:  # 4D: name the volumes
            kwargs["modalities"] = {str(path): ("flair", "t1", "t1ce", "t2")[: data.shape[3]]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # NaN replaced, all-zero volume
            check_load(path, **kwargs)


@FUZZ
@given(data=volumes(), dims=st.lists(st.integers(-3, 2**20), min_size=1, max_size=7))
def test_headers_that_lie_about_the_shape(data, dims):
    """The header's dims do not match the bytes that follow (short files, huge claims)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "liar_t1.nii.gz"
        try:
            blob = nifti_bytes(data, np.eye(4), dims=tuple(dims))
        except Exception:  # nibabel refuses to even set such dims: set them raw
            blob = bytearray(nifti_bytes(data, np.eye(4)))
            dim = np.zeros(8, dtype="<i2")
            dim[0] = len(dims)
            dim[1: 1 + len(dims)] = np.clip(dims, -(2**15), 2**15 - 1)
            blob[40:56] = dim.tobytes()
            blob = bytes(blob)
        path.write_bytes(gzip.compress(blob, compresslevel=1))
        check_load(path)


@FUZZ
@given(data=volumes(), flips=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)),
                                      min_size=1, max_size=8))
def test_flipped_header_bytes(data, flips):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flipped_t2.nii"
        blob = bytearray(nifti_bytes(data, np.diag([2.0, 2.0, 2.0, 1.0])))
        for offset, value in flips:
            blob[offset] = value
        path.write_bytes(bytes(blob))
        check_load(path)


@FUZZ
@given(content=st.binary(max_size=2000), name=st.sampled_from(
    ["x_flair.nii", "x_flair.nii.gz", "x.nii.gz", "x.nii"]))
def test_random_bytes_with_a_nifti_name(content, name):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        check_load(path)


@FUZZ
@given(data=volumes(), cut=st.floats(0.02, 0.999), gz=st.booleans())
def test_truncated_files(data, cut, gz):
    blob = nifti_bytes(data, np.eye(4))
    if gz:
        blob = gzip.compress(blob, compresslevel=1)
    assume(len(blob) > 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("cut_flair.nii.gz" if gz else "cut_flair.nii")
        path.write_bytes(blob[: int(cut * (len(blob) - 1))])
        check_load(path)


# ------------------------------------------------------------------------------------------------
# The localize path


@pytest.fixture(scope="module")
def tiny_flair_model():
    spec = ModelSpec(image_size=16, modalities=("flair",), network=tiny_network(),
                     name="fuzz")
    torch.manual_seed(0)
    return build_model(spec).eval(), spec


@settings(max_examples=max(12, EXAMPLES // 8), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(2, 12), st.integers(2, 12), st.integers(2, 6)),
    pattern=st.sampled_from(["brain", "zeros", "constant", "negative", "spikes", "speck"]),
    affine=affines(valid_only=True),
    seed=st.integers(0, 1000),
)
def test_localize_never_crashes(tiny_flair_model, shape, pattern, affine, seed):
    model, spec = tiny_flair_model
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.float32)
    if pattern == "brain":
        data[1:, 1:, :] = rng.uniform(10, 1000, size=data[1:, 1:, :].shape)
    elif pattern == "constant":
        data[:] = 7.0
    elif pattern == "negative":
        data[:] = rng.uniform(-100, -1, size=shape)
    elif pattern == "spikes":
        data[:] = rng.uniform(0, 1, size=shape)
        data.flat[rng.integers(0, data.size)] = 3e38
    elif pattern == "speck":
        data[tuple(rng.integers(0, s) for s in shape)] = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case_flair.nii.gz"
        path.write_bytes(gzip.compress(nifti_bytes(data, affine), compresslevel=1))
        try:
            volume = load_volume(path).select(spec.modalities)
        except WhatIsHealthyError as exc:
            assert str(exc).strip() and path.name in str(exc)
            event("refused")
            return
        event(f"localized {pattern}")
        result = localize(model, spec, volume.data,
                          LocalizeSettings.from_spec(spec, steps=2, device="cpu"))
        assert result.mask.shape == volume.shape and result.mask.dtype == np.uint8
        assert np.isfinite(result.difference).all() and np.isfinite(result.healthy).all()
        if not volume.data.any():
            assert result.mask.sum() == 0 and result.warnings
