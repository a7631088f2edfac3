"""Volumes: NIfTI files and BraTS-layout case folders in canonical RAS, and back to the source grid.

Inside the tool every volume is held as ``[C, X, Y, Z]`` in canonical RAS+ (the orientation
``nib.as_closest_canonical`` gives), with the source affine and header kept so that any output can
be written voxel-for-voxel on the grid of the file it came from.

Loading is the boundary where bad input is stopped: every problem with a file becomes an
:class:`~napari_whatishealthy.core.errors.InputError` whose one-line message names the file, says
what is wrong and what to do (see ``docs/inputs.md``). The headers of all files of a case are
checked (type, shape, data type, affine, grid, size bound) before any voxel is read.

Writing goes through :mod:`.output` (temporary file and rename, never over an input, never over
an existing file without ``overwrite=True``).
"""

from __future__ import annotations

import gzip
import math
import os
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from .errors import InputError, WhatIsHealthyError

MODALITIES = ("flair", "t1", "t1ce", "t2")
# BraTS 2021 suffixes and the BraTS 2023 ones, mapped to one vocabulary.
_MODALITY_ALIASES = {
    "flair": "flair", "t2f": "flair", "t2flair": "flair",
    "t1": "t1", "t1n": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "seg": "seg", "mask": "seg", "label": "seg",
}
# In a case folder only these suffixes make a segmentation: ``*_mask`` / ``*_label`` files are
# what this tool (and others) write as results, and must never be taken for the ground truth.
_SEG_SUFFIXES = ("seg",)
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SUFFIX_RE = re.compile(r"[_\-.]([A-Za-z0-9]+)$")

#: Default bound on the voxels of one case's float32 ``[C, X, Y, Z]`` array (1 GiB); the pipeline
#: holds a few arrays of that size. Override with the environment variable below or the
#: ``max_voxels`` argument of :func:`load_volume` (``0`` or ``none``: no bound).
DEFAULT_MAX_VOXELS = 2**28
MAX_VOXELS_ENV = "WHATISHEALTHY_MAX_VOXELS"
#: What to do with NaN / infinite voxels: refuse the file (default) or replace them by 0.
NONFINITE_POLICIES = ("refuse", "zero")

_GZIP_MAGIC = b"\x1f\x8b"


def nifti_stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


def modality_from_name(path: str | Path) -> str | None:
    """The modality named by a file's suffix (``case_flair.nii.gz`` -> ``flair``), or None."""
    match = _SUFFIX_RE.search(nifti_stem(path))
    if match is None:
        return None
    return _MODALITY_ALIASES.get(match.group(1).lower())


def case_stem(path: str | Path) -> str:
    """A file's name without the NIfTI suffix and the modality suffix (``Case_flair.nii.gz`` ->
    ``Case``): the case it belongs to."""
    stem = nifti_stem(path)
    match = _SUFFIX_RE.search(stem)
    return stem[: match.start()] if match else stem


def canonical_modality(name: str) -> str:
    """A modality name in this project's vocabulary (``T2F`` -> ``flair``); unknown names are
    kept, lower-cased."""
    return _MODALITY_ALIASES.get(name.lower(), name.lower())


def max_voxels_bound(max_voxels: int | None = None) -> int | None:
    """The voxel bound in force: ``max_voxels`` if given, else ``$WHATISHEALTHY_MAX_VOXELS``,
    else :data:`DEFAULT_MAX_VOXELS`; None means no bound (``0``, ``none`` or ``off``)."""
    if max_voxels is not None:
        value: object = max_voxels
    else:
        text = os.environ.get(MAX_VOXELS_ENV, "").strip().lower()
        if not text:
            return DEFAULT_MAX_VOXELS
        if text in ("0", "none", "off", "inf"):
            return None
        try:
            value = int(float(text)) if "e" in text else int(text.replace("_", ""))
        except ValueError:
            raise WhatIsHealthyError(
                f"{MAX_VOXELS_ENV}={text!r} is not a number; set it to a voxel count such as "
                f"{DEFAULT_MAX_VOXELS} (or 0 for no bound)"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise WhatIsHealthyError(f"the voxel bound must be an integer >= 0, got {value!r}")
    return int(value) or None


def _gib(voxels: int) -> str:
    """The size of ``voxels`` float32 values, in human units."""
    size = voxels * 4.0
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # unreachable


def _check_size(where: str, shape: tuple[int, ...], channels: int, bound: int | None) -> None:
    voxels = math.prod(int(s) for s in shape) * channels
    if bound is not None and voxels > bound:
        raise InputError(
            f"{where}: too large: {channels} channel(s) of {' x '.join(map(str, shape))} voxels "
            f"= {voxels:,} voxels, whose float32 working array alone needs about {_gib(voxels)}, "
            f"above the bound of {bound:,} voxels ({_gib(bound)}); crop or resample it, or raise "
            f"the bound with {MAX_VOXELS_ENV}=<voxels> if this machine has the memory"
        )


@dataclass
class Volume:
    """One case: modalities stacked as ``data[C, X, Y, Z]`` (float32, canonical RAS).

    ``extra["warnings"]`` (when present) lists what loading noticed but accepted (an all-zero
    volume, NaN voxels replaced by 0); front ends show these to the user.
    """

    data: np.ndarray
    modalities: tuple[str, ...]
    affine: np.ndarray  # canonical (RAS) voxel -> world mm
    source_affine: np.ndarray
    source_header: nib.Nifti1Header
    source_paths: tuple[Path, ...]
    name: str
    segmentation: np.ndarray | None = None  # [X, Y, Z] int16, canonical
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:])  # type: ignore[return-value]

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def warnings(self) -> list[str]:
        return list(self.extra.get("warnings", []))

    @property
    def input_paths(self) -> tuple[Path, ...]:
        """Every file this case was read from (images and segmentation): never an output."""
        seg = self.extra.get("seg_path")
        paths = tuple(dict.fromkeys(Path(p) for p in self.source_paths))
        return paths + ((Path(seg),) if seg is not None and Path(seg) not in paths else ())

    def channel(self, modality: str) -> np.ndarray:
        return self.data[self.modalities.index(modality)]

    def select(self, modalities: tuple[str, ...] | list[str]) -> Volume:
        """The same case with its channels in the order a model expects."""
        missing = [m for m in modalities if m not in self.modalities]
        if missing:
            where = self.name
            if self.source_paths:
                folder = Path(self.source_paths[0]).parent
                files = ", ".join(Path(p).name for p in self.source_paths)
                where = f"{folder / self.name} ({files})"
            raise InputError(
                f"{where}: missing modality {', '.join(missing)}; this input has "
                f"{', '.join(self.modalities) or 'none'}. Provide the missing file(s) (e.g. "
                f"{self.name}_{missing[0]}.nii.gz) or use a model trained on the modalities you "
                "have."
            )
        index = [self.modalities.index(m) for m in modalities]
        return Volume(
            data=self.data[index], modalities=tuple(modalities), affine=self.affine,
            source_affine=self.source_affine, source_header=self.source_header,
            source_paths=self.source_paths, name=self.name, segmentation=self.segmentation,
            extra=dict(self.extra),
        )

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """Map a canonical ``[X, Y, Z]`` array back onto the source file's voxel grid."""
        return canonical_to_source(array, self.source_affine)


def canonical_to_source(array: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(source_affine))
    return np.ascontiguousarray(apply_orientation(array, ornt))


# ------------------------------------------------------------------------------------------------
# One file: sniff the bytes, open the header, check it, then (and only then) read the voxels.


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _header_kind(head: bytes) -> str | None:
    """``nifti1``/``nifti2`` for a NIfTI header at the start of ``head``, ``truncated`` for the
    start of one, ``analyze`` for an Analyze 7.5 header, else None."""
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order) if len(head) >= 4 else -1
        if size == 348:
            if len(head) < 348:
                return "truncated"
            return "nifti1" if head[344:347] in (b"n+1", b"ni1") else "analyze"
        if size == 540:
            if len(head) < 540:
                return "truncated"
            return "nifti2" if head[4:7] in (b"n+2", b"ni2") else None
    return None


def _sniff(path: Path) -> tuple[bytes, bool, int]:
    """Refuse with a precise reason what nibabel would only call 'cannot work out file type';
    returns (the header bytes, whether gzip-compressed, the file size)."""

    def unreadable(reason: str, todo: str = "re-export or re-download the file") -> InputError:
        return InputError(f"{path}: not a readable NIfTI file: {reason}; {todo}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(540)
    except OSError as exc:
        raise InputError(
            f"{path}: cannot be read ({exc.strerror or _detail(exc)}); check the path and its "
            "permissions"
        ) from exc
    if size == 0:
        raise unreadable("the file is empty (0 bytes)")
    compressed = head[:2] == _GZIP_MAGIC
    named_gz = path.name.lower().endswith(".gz")
    if named_gz and not compressed:
        if _header_kind(head) in ("nifti1", "nifti2"):
            raise unreadable("an uncompressed NIfTI file named .gz", "rename it to .nii")
        raise unreadable("not a gzip file although its name ends in .gz, nor a NIfTI image",
                         "give a NIfTI file (.nii or .nii.gz)")
    if compressed:
        try:
            with gzip.open(path, "rb") as gz:
                head = gz.read(540)
        except (OSError, EOFError, zlib.error) as exc:
            raise unreadable(f"the gzip data is truncated or corrupt ({_detail(exc)})") from exc
    kind = _header_kind(head)
    if kind == "truncated":
        raise unreadable("the NIfTI header is truncated")
    if kind == "analyze":
        raise unreadable("an Analyze 7.5 header, not NIfTI", "convert it to NIfTI (.nii.gz)")
    if kind is None:
        what = "gzip-compressed data without a NIfTI header" if compressed else (
            "no NIfTI-1 or NIfTI-2 header found")
        raise unreadable(what, "give a NIfTI image (.nii or .nii.gz), converting other formats "
                               "first (e.g. DICOM with dcm2niix)")
    if compressed and not named_gz and is_nifti_path(path):
        raise unreadable("a gzip-compressed NIfTI named .nii", "rename it to .nii.gz")
    return head, compressed, size


def _raw_header(head: bytes) -> nib.Nifti1Header:
    """The header as stored (nibabel's loader would quietly repair some fields)."""
    little = int.from_bytes(head[:4], "little") in (348, 540)
    order = "<" if little else ">"
    dt = (nib.nifti2.header_dtype if int.from_bytes(head[:4], "little" if little else "big") == 540
          else nib.nifti1.header_dtype).newbyteorder(order)
    cls = nib.Nifti2Header if dt.itemsize == 540 else nib.Nifti1Header
    return cls(binaryblock=head[: dt.itemsize], endianness=order, check=False)


def _data_length(path: Path, compressed: bool, size: int, expected: int) -> int:
    """Bytes of the (decompressed) file: the gzip trailer's size, checked by decompressing
    only when it disagrees with ``expected`` (it is the size modulo 2**32, of the last member)."""
    if not compressed:
        return size
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        stored = int.from_bytes(fh.read(4), "little")
    if stored == expected % 2**32:
        return expected
    total = 0
    try:
        with gzip.open(path, "rb") as gz:
            while block := gz.read(1 << 22):
                total += len(block)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: not a readable NIfTI file: the gzip data is truncated or "
                         f"corrupt ({_detail(exc)}); re-export or re-download the file") from exc
    return total


def _check_raw_header(path: Path, head: bytes) -> None:
    """The header's dimension count, voxel offset and voxel sizes, as stored."""
    header = _raw_header(head)
    nifti2 = isinstance(header, nib.Nifti2Header)
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise InputError(f"{path}: the header's dim[0] is {dim[0]}, but a NIfTI image has 1 to 7 "
                         "dimensions; the header is corrupt: re-export the image")
    shape = dim[1: dim[0] + 1]
    if any(d < 1 for d in shape):
        raise InputError(f"{path}: holds no voxels (shape {tuple(shape)}); the file is empty or "
                         "its header is wrong")
    offset = float(header["vox_offset"])
    minimum = 544 if nifti2 else 352
    if not math.isfinite(offset) or offset < minimum:
        raise InputError(f"{path}: the header's vox_offset is {offset:g}, inside the {minimum}-byte "
                         "header, so the voxels would be read from the header itself; the header "
                         "is corrupt: re-export the image")
    pixdim = [float(p) for p in header["pixdim"][1: 1 + min(3, dim[0])]]
    if any(not math.isfinite(p) or p == 0 for p in pixdim):
        raise InputError(f"{path}: the header's voxel size (pixdim) is {tuple(pixdim)}, with a zero "
                         "or non-finite entry; fix the header's pixdim")


def _check_data_length(path: Path, img: nib.Nifti1Image) -> None:
    """The bytes that the header's dims x datatype claim against the file's length (a lying
    header would otherwise read the wrong bytes, or stop half way)."""
    header = img.header
    shape = [int(d) for d in header["dim"][1: int(header["dim"][0]) + 1]]
    offset = getattr(img.dataobj, "offset", None)  # the loaded header's vox_offset is reset
    if offset is None:
        return
    offset = int(offset)
    expected = offset + math.prod(shape) * np.dtype(header.get_data_dtype()).itemsize
    size = path.stat().st_size
    with open(path, "rb") as fh:
        compressed = fh.read(2) == _GZIP_MAGIC
    actual = _data_length(path, compressed, size, expected)
    if actual != expected:
        claim = f"{tuple(shape)} voxels of {header.get_data_dtype()}"
        how = "truncated, or" if actual < expected else "longer than that:"
        raise InputError(
            f"{path}: the header describes {claim} from byte {offset} ({expected:,} bytes in "
            f"all), but the file holds {actual:,} bytes: it is {how} its dims or datatype are "
            "wrong; re-export or re-download it"
        )


def _orientation_note(path: Path, header: nib.Nifti1Header) -> str | None:
    """One line when the header's qform and sform both apply and place the voxels differently
    (the sform is used, as nibabel and FSL do)."""
    try:
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        if qcode <= 0 or scode <= 0:
            return None
        q, s = header.get_qform(), header.get_sform()
    except Exception:  # noqa: BLE001 - an unusable qform is already refused as an affine
        return None
    corners = np.array([[0, 0, 0, 1], [*header.get_data_shape()[:3], 1]], dtype=float).T
    shift = float(np.abs((q - s) @ corners).max())
    if not math.isfinite(shift) or shift <= 0.01:
        return None
    return (f"{path}: the header's qform and sform disagree (by up to {shift:.2g} mm at a corner); "
            "the sform is used, as nibabel and FSL do: check the orientation of the results")


def _probe(path: Path) -> str:
    """``dir``, ``file`` or ``missing``; a path the system cannot even look up is refused."""
    try:
        if path.is_dir():
            return "dir"
        return "file" if path.exists() else "missing"
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a loop of links
        raise InputError(f"{str(path)!r}: not a usable path ({_detail(exc)})") from exc


def _open(path: Path) -> nib.Nifti1Image:
    """The image with its header checked for type; no voxels read yet."""
    kind = _probe(path)
    if kind == "missing":
        raise InputError(f"{path}: no such file")
    if kind == "dir":
        raise InputError(f"{path}: is a folder, not a NIfTI file")
    head, _, _ = _sniff(path)
    _check_raw_header(path, head)
    try:
        img = nib.load(str(path))
    except MemoryError as exc:
        raise InputError(f"{path}: not enough memory to open the file") from exc
    except Exception as exc:  # nibabel raises many types for broken headers
        raise InputError(
            f"{path}: not a readable NIfTI file ({_detail(exc)}); its header is invalid: "
            "re-export it, or repair the header"
        ) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(
            f"{path}: a {type(img).__name__}, not a single-file NIfTI image; convert it to "
            ".nii.gz first"
        )
    return img


def _time_hint(img: nib.Nifti1Image) -> str:
    try:
        unit = img.header.get_xyzt_units()[1]
        step = float(img.header["pixdim"][4])
    except Exception:
        return ""
    if unit in ("sec", "msec", "usec") and math.isfinite(step) and step > 0:
        return f", a time step of {step:g} {unit} in its header: a time series?"
    return ""


def _layout(
    path: Path, img: nib.Nifti1Image, names: tuple[str, ...] | None
) -> tuple[tuple[int, int, int], int]:
    """(spatial shape, number of volumes) of a file, or a refusal: 1D/2D images, empty images,
    4D images whose volumes are not named as modalities, images of 5 or more dimensions."""
    shape = tuple(int(s) for s in img.shape)
    if not shape or any(s <= 0 for s in shape):
        raise InputError(
            f"{path}: holds no voxels (shape {shape}); the file is empty or its header is wrong"
        )
    spatial = shape[:3]
    if len(spatial) < 3 or min(spatial) < 2:
        dims = sum(1 for s in spatial if s > 1)
        what = f"a {dims}D image" if dims else "a single voxel"
        raise InputError(
            f"{path}: {what} (shape {shape}); a 3D volume with at least 2 voxels along "
            "each axis is needed: give the whole scan, not a slice"
        )
    volumes = [s for s in shape[3:] if s != 1]
    if len(volumes) > 1:
        raise InputError(
            f"{path}: a {len(shape)}D image of shape {shape}; only 3D volumes (or 4D files with "
            "one volume per modality) are supported: split it into 3D files"
        )
    n = volumes[0] if volumes else 1
    given = len(names) if names is not None else 0
    if n == 1:
        if given > 1:
            raise InputError(
                f"{path}: {given} modality names ({', '.join(names or ())}) given for a 3D image "
                "that holds one volume; give one name per file"
            )
        return spatial, 1  # type: ignore[return-value]
    if given <= 1:
        raise InputError(
            f"{path}: a 4D image with {n} volumes (shape {shape}{_time_hint(img)}); if they are "
            "the modalities of one case, give their names in order (command line: --modality "
            "flair,t1,t1ce,t2; Python: modalities={path: 'flair,t1,t1ce,t2'}), otherwise split it "
            "into one 3D file per modality (e.g. fslsplit); time series are not supported"
        )
    if given != n:
        raise InputError(
            f"{path}: {given} modality names ({', '.join(names or ())}) given for a 4D image "
            f"with {n} volumes; give exactly one name per volume, in order"
        )
    return spatial, n  # type: ignore[return-value]


def _check_dtype(path: Path, img: nib.Nifti1Image) -> None:
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields:
        raise InputError(
            f"{path}: an RGB / structured image ({dtype}); a greyscale MR scan is needed: give "
            "the original scan, not a colour rendering"
        )
    if dtype.kind == "c":
        raise InputError(
            f"{path}: complex-valued voxels ({dtype}); give a real-valued (magnitude) image"
        )
    if dtype.kind not in "biuf":
        raise InputError(
            f"{path}: unsupported data type {dtype}; give an integer or floating-point image"
        )


def _check_affine(path: Path, affine: np.ndarray) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(
            f"{path}: the affine (voxel-to-world matrix) has non-finite values; fix the header's "
            "sform/qform (e.g. with fslorient or nibabel)"
        )
    linear = affine[:3, :3]
    zooms = np.sqrt((linear**2).sum(axis=0))
    if not np.all(zooms > 0):
        raise InputError(
            f"{path}: the affine is singular (voxel size {tuple(float(z) for z in zooms)} has a "
            "zero); fix the header's sform/qform or pixdim"
        )
    with np.errstate(all="ignore"):
        det = abs(float(np.linalg.det(linear / zooms)))  # 1 for orthogonal axes
    if not det > 1e-6:
        raise InputError(
            f"{path}: the affine is singular (its voxel axes are parallel); fix the header's "
            "sform/qform"
        )


def _read(
    path: Path,
    img: nib.Nifti1Image,
    spatial: tuple[int, int, int],
    n: int,
    nonfinite: str,
    notes: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Voxels as canonical float32 ``[n, X, Y, Z]`` and the canonical affine."""
    voxels = math.prod(spatial) * n
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float64 beyond float32 -> inf
            raw = np.asarray(img.dataobj, dtype=np.float32)
        raw = raw.reshape(*spatial, n)
    except MemoryError as exc:
        raise InputError(
            f"{path}: not enough memory to read {voxels:,} voxels (about {_gib(voxels)} as "
            "float32); free memory, or crop or resample the image"
        ) from exc
    except Exception as exc:  # truncated gzip (EOFError), short file (OSError), zlib.error, ...
        raise InputError(
            f"{path}: the image data cannot be read ({_detail(exc)}): the file is truncated or "
            "corrupt; re-export or re-download it"
        ) from exc
    ornt = io_orientation(img.affine)
    data = np.ascontiguousarray(np.moveaxis(apply_orientation(raw, ornt), -1, 0))
    del raw
    canonical_affine = img.affine @ inv_ornt_aff(ornt, spatial)
    bad = ~np.isfinite(data)
    if bad.any():
        count = int(bad.sum())
        if nonfinite == "zero":
            data[bad] = 0.0
            note = f"{path}: {count:,} NaN or infinite voxel(s) replaced by 0"
            notes.append(note)
            warnings.warn(note, UserWarning, stacklevel=3)
        else:
            raise InputError(
                f"{path}: {count:,} NaN or infinite voxel(s) (values beyond float32 count as "
                "infinite); replace them, e.g. by 0 (fslmaths IN -nan OUT), or load with "
                "nonfinite='zero' to have them set to 0"
            )
    return data, canonical_affine


def _open_checked(
    path: Path, names: tuple[str, ...] | None, bound: int | None
) -> tuple[nib.Nifti1Image, tuple[int, int, int], int]:
    img = _open(path)
    spatial, n = _layout(path, img, names)
    _check_dtype(path, img)
    _check_affine(path, img.affine)
    _check_size(str(path), spatial, n, bound)
    _check_data_length(path, img)
    return img, spatial, n


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise WhatIsHealthyError(
            f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}"
        )


def load_nifti(
    path: str | Path, *, nonfinite: str = "refuse", max_voxels: int | None = None
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read one 3D NIfTI into canonical RAS float32; return (array, source image).

    Every problem becomes an :class:`InputError` naming the file (see :func:`load_volume`).
    """
    _check_policy(nonfinite)
    path = Path(path)
    img, spatial, n = _open_checked(path, None, max_voxels_bound(max_voxels))
    data, _ = _read(path, img, spatial, n, nonfinite, [])
    return data[0], img


# ------------------------------------------------------------------------------------------------
# Cases: several files, one grid.


def _case_candidates(folder: Path) -> dict[str, list[tuple[Path, str]]]:
    """Modality -> [(file, case prefix)] for the NIfTI files of a folder (never raises)."""
    candidates: dict[str, list[tuple[Path, str]]] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return candidates
    for path in entries:
        if not is_nifti_path(path) or path.name.startswith("."):
            continue
        stem = nifti_stem(path)
        match = _SUFFIX_RE.search(stem)
        if match is None:
            continue
        suffix = match.group(1).lower()
        modality = _MODALITY_ALIASES.get(suffix)
        if modality is None or (modality == "seg" and suffix not in _SEG_SUFFIXES):
            continue
        try:
            if not path.is_file():
                continue
        except OSError:
            continue
        candidates.setdefault(modality, []).append((path, stem[: match.start()]))
    return candidates


def find_case_files(folder: str | Path) -> dict[str, Path]:
    """Map modality (and ``seg``) to file for a BraTS-layout case folder.

    Suffixes of BraTS 2021 (``_flair``, ``_t1``, ``_t1ce``, ``_t2``, ``_seg``) and BraTS 2023
    (``-t2f``, ``-t1n``, ``-t1c``, ``-t2w``, ``-seg``) are recognised; only ``seg`` makes a
    segmentation (``*_mask`` files are results, never ground truth). Where a modality has several
    files, the one whose prefix is the folder's name (else the prefix most files share, e.g. not
    ``<case>_healthy_flair``) wins; a tie is refused as ambiguous.
    """
    folder = Path(folder)
    candidates = _case_candidates(folder)
    counts = Counter(prefix for found in candidates.values() for _, prefix in found)

    def rank(item: tuple[Path, str]) -> tuple[bool, int, int]:
        return item[1] != folder.name, -counts[item[1]], len(item[1])

    files: dict[str, Path] = {}
    for modality, found in candidates.items():
        found = sorted(found, key=rank)
        if len(found) > 1 and rank(found[0]) == rank(found[1]):
            raise InputError(
                f"{folder}: two files for modality {modality}: {found[0][0].name} and "
                f"{found[1][0].name}; keep one of them in the case folder"
            )
        files[modality] = found[0][0]
    return files


def is_case_folder(folder: str | Path) -> bool:
    """A folder holding at least one modality file (never raises)."""
    folder = Path(folder)
    try:
        is_dir = folder.is_dir()
    except OSError:
        return False
    return is_dir and any(m in MODALITIES for m in _case_candidates(folder))


def _parse_names(path: Path, value: object) -> tuple[str, ...]:
    """Modality names given for a file: ``"flair"``, ``"flair,t1,t1ce,t2"`` or a sequence."""
    if isinstance(value, str):
        raw = [v for v in re.split(r"[,\s]+", value.strip()) if v]
    elif isinstance(value, list | tuple):
        raw = [str(v).strip() for v in value]
    else:
        raw = []
    names = tuple(_MODALITY_ALIASES.get(v.lower(), v.lower()) for v in raw)
    if not names or any(not n for n in names):
        raise InputError(f"{path}: no modality name given ({value!r}); give e.g. 'flair'")
    if len(set(names)) != len(names):
        raise InputError(f"{path}: a modality is named twice in {', '.join(names)}")
    if "seg" in names and len(names) > 1:
        raise InputError(f"{path}: a segmentation cannot be one volume of a 4D image; give it as "
                         "its own 3D file")
    return names


def load_volume(
    inputs: str | Path | list[str | Path] | tuple[str | Path, ...],
    modalities: dict[str, str | tuple[str, ...] | list[str]] | None = None,
    name: str | None = None,
    *,
    nonfinite: str = "refuse",
    max_voxels: int | None = None,
) -> Volume:
    """Load a case folder, one NIfTI file, or several co-registered NIfTI files.

    ``modalities`` maps file paths to modality names where the file name does not say it; a 4D
    file whose volumes are the modalities of one case is read when its names are given in order
    (``"flair,t1,t1ce,t2"`` or a tuple), and refused otherwise. A segmentation file (``*_seg``)
    becomes ``Volume.segmentation``.

    Every problem becomes an :class:`InputError` naming the file: unreadable, truncated or
    non-NIfTI files, 1D/2D or unnamed 4D images, complex or RGB voxels, a non-finite or singular
    affine, modalities on different grids, a modality given twice, more than ``max_voxels``
    voxels (default ``$WHATISHEALTHY_MAX_VOXELS`` or :data:`DEFAULT_MAX_VOXELS`; checked from
    the headers before any voxel is read), NaN or infinite voxels (``nonfinite="zero"`` replaces
    them by 0 with a warning instead), and a modality that is zero everywhere while others are
    not. An all-zero case is accepted with a warning in ``Volume.extra["warnings"]`` (nothing to
    localize: the pipeline returns an empty mask).
    """
    _check_policy(nonfinite)
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("no input given; give a case folder or NIfTI file(s)")
    bound = max_voxels_bound(max_voxels)
    explicit = {str(Path(k)): _parse_names(Path(k), v) for k, v in (modalities or {}).items()}
    found = _CaseFiles()
    case_name = found.gather(paths, explicit, name)
    images, seg_path = found.images, found.seg_path
    order = [m for m in MODALITIES if m in found.seen] + [
        m for _, names in images for m in names if m not in MODALITIES
    ]
    # The first modality's file is the reference grid and header (FLAIR where there is one).
    images.sort(key=lambda item: min(order.index(m) for m in item[1]))

    # Every header first: nothing is read from a case that would be refused.
    opened = []
    for path, names in images:
        img, spatial, n = _open_checked(path, names, bound)
        if opened:
            _check_same_grid(opened[0][0], opened[0][1], opened[0][2], path, img, spatial)
        opened.append((path, img, spatial, names))
    ref_path, ref_img, ref_spatial, _ = opened[0]
    channels = sum(len(names) for *_, names in opened)
    if len(opened) > 1:
        files = ", ".join(p.name for p, *_ in opened)
        _check_size(f"{ref_path.parent} ({files})", ref_spatial, channels, bound)
    seg_img = None
    if seg_path is not None:
        seg_img, seg_spatial, _ = _open_checked(seg_path, None, bound)
        _check_same_grid(ref_path, ref_img, ref_spatial, seg_path, seg_img, seg_spatial)

    notes: list[str] = [n for path, img, *_ in opened
                        if (n := _orientation_note(path, img.header)) is not None]
    data, source_of, canonical_affine = _read_channels(opened, order, nonfinite, notes)
    _check_nonzero(data, order, source_of, [p for p, _ in images], notes)
    segmentation = None
    if seg_path is not None and seg_img is not None:
        segmentation = _read_segmentation(seg_path, seg_img, ref_spatial, nonfinite, notes)

    extra: dict = {"warnings": notes}
    if seg_path is not None:
        extra["seg_path"] = seg_path
    return Volume(
        data=data,
        modalities=tuple(order),
        affine=canonical_affine,
        source_affine=ref_img.affine.copy(),
        source_header=ref_img.header.copy(),
        source_paths=tuple(source_of[m] for m in order),
        name=case_name or "case",
        segmentation=segmentation,
        extra=extra,
    )


class _CaseFiles:
    """The image files of one case and their modalities, each file and modality once."""

    def __init__(self) -> None:
        self.images: list[tuple[Path, tuple[str, ...]]] = []
        self.seg_path: Path | None = None
        self.seen: dict[str, Path] = {}
        self._files: dict[tuple[int, int], Path] = {}

    def gather(self, paths: list[Path], explicit: dict[str, tuple[str, ...]],
               name: str | None) -> str | None:
        """Add every input (case folders and files); returns the case's name."""
        case_name = name
        for path in paths:
            if _probe(path) == "dir":
                found = find_case_files(path)
                if not any(m in MODALITIES for m in found):
                    raise InputError(
                        f"{path}: no modality files found; a case folder holds "
                        "<case>_flair/_t1/_t1ce/_t2.nii.gz (BraTS 2023: -t2f/-t1n/-t1c/-t2w) "
                        "and optionally <case>_seg.nii.gz"
                    )
                for m in (*MODALITIES, "seg"):
                    if m in found:
                        self.add(found[m], (m,))
                case_name = case_name or path.name
                continue
            named = modality_from_name(path)
            names = explicit.get(str(path))
            if names is None:
                if named is not None:
                    names = (named,)
                elif len(paths) == 1:
                    names = ("image",)
                else:
                    raise InputError(
                        f"{path}: the modality is not in the file name; name it "
                        "<case>_flair.nii.gz (t1, t1ce, t2) or give it explicitly"
                    )
            self.add(path, names)
            if case_name is None:
                case_name = case_stem(path) if named else nifti_stem(path)
        if not self.images:
            raise InputError(
                f"{', '.join(map(str, paths))}: no image files (only a segmentation); give the "
                "modality files too"
            )
        return case_name

    def add(self, path: Path, names: tuple[str, ...]) -> None:
        try:
            st = path.stat()
        except OSError:
            st = None  # missing or unreadable: refused with its own message when opened
        if st is not None:
            other = self._files.setdefault((st.st_dev, st.st_ino), path)
            if other != path:
                raise InputError(
                    f"{path}: is the same file as {other} (a link or another name for it); one "
                    f"file cannot be two modalities ({', '.join(names)} and "
                    f"{', '.join(m for m, p in self.seen.items() if p == other)}): give each "
                    "modality its own scan"
                )
        for m in names:
            if m in self.seen:
                also = "" if self.seen[m] == path else f" (also by {self.seen[m]})"
                raise InputError(
                    f"{path}: modality {m!r} given twice{also}; give one file per modality"
                )
            self.seen[m] = path
        if names == ("seg",):
            self.seg_path = path
        else:
            self.images.append((path, names))


def _read_channels(opened: list, order: list[str], nonfinite: str, notes: list[str]
                   ) -> tuple[np.ndarray, dict[str, Path], np.ndarray]:
    """The canonical ``[C, X, Y, Z]`` array in ``order``, each modality's file, the affine."""
    data: np.ndarray | None = None
    source_of: dict[str, Path] = {}
    canonical_affine = None
    for path, img, spatial, names in opened:
        block, affine = _read(path, img, spatial, len(names), nonfinite, notes)
        if data is None:  # canonical shape: the stored one, axes permuted
            data = np.empty((len(order), *block.shape[1:]), dtype=np.float32)
            canonical_affine = affine
        for i, m in enumerate(names):
            data[order.index(m)] = block[i]
            source_of[m] = path
        del block
    assert data is not None and canonical_affine is not None
    return data, source_of, canonical_affine


def _check_nonzero(data: np.ndarray, order: list[str], source_of: dict[str, Path],
                   files: list[Path], notes: list[str]) -> None:
    """An all-zero case is a warning; one all-zero modality beside others is an error."""
    nonzero = [bool(np.any(data[c])) for c in range(len(order))]
    if not any(nonzero):
        listed = ", ".join(str(p) for p in files)
        note = (f"{listed}: every voxel is zero, so there is no brain to analyse (brain = "
                "non-zero voxels); the mask will be empty")
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=3)
    elif not all(nonzero):
        empty = order[nonzero.index(False)]
        full = [m for m, z in zip(order, nonzero, strict=True) if z]
        raise InputError(
            f"{source_of[empty]}: modality {empty} is zero everywhere while {', '.join(full)} "
            f"hold(s) an image; check that the right file was given for {empty}"
        )


def _read_segmentation(seg_path: Path, seg_img: Any, ref_spatial: Any, nonfinite: str,
                       notes: list[str]) -> np.ndarray:
    seg, _ = _read(seg_path, seg_img, ref_spatial, 1, nonfinite, notes)
    seg = np.rint(seg[0])
    info = np.iinfo(np.int16)
    if seg.size and (seg.min() < info.min or seg.max() > info.max):
        raise InputError(
            f"{seg_path}: segmentation labels {seg.min():g}..{seg.max():g} do not fit int16; "
            "a segmentation holds small integer labels (BraTS: 0, 1, 2, 3/4)"
        )
    return seg.astype(np.int16)


def _check_same_grid(
    ref_path: Path,
    ref: nib.Nifti1Image,
    ref_shape: tuple[int, ...],
    path: Path,
    img: nib.Nifti1Image,
    shape: tuple[int, ...],
) -> None:
    if tuple(ref_shape[:3]) != tuple(shape[:3]):
        raise InputError(
            f"{path}: shape {tuple(shape[:3])} differs from {ref_path.name} "
            f"{tuple(ref_shape[:3])}; the modalities must be co-registered on one grid (resample "
            "them first)"
        )
    if not np.allclose(ref.affine, img.affine, atol=1e-3):
        raise InputError(
            f"{path}: affine differs from {ref_path.name}; the modalities must be co-registered "
            "on one grid (resample them first)"
        )


# ------------------------------------------------------------------------------------------------
# Writing: never over an input, never over an existing file unless asked, never half a file.


def on_source_grid(array: np.ndarray, volume: Volume, dtype: type | np.dtype = np.float32
                   ) -> nib.Nifti1Image:
    """A canonical ``[X, Y, Z]`` array as a NIfTI image on the volume's source grid."""
    from .output import source_grid_image

    if array.shape != volume.shape:
        raise InputError(f"array shape {array.shape} does not match the volume {volume.shape}")
    stored = volume.to_source(np.asarray(array))
    return source_grid_image(stored, volume.source_affine, volume.source_header, dtype)


def save_on_source_grid(
    array: np.ndarray,
    volume: Volume,
    path: str | Path,
    dtype: type | np.dtype = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write a canonical ``[X, Y, Z]`` array on the source grid, atomically, never over an input
    (see :mod:`.output`)."""
    from .output import write_nifti

    return write_nifti(on_source_grid(array, volume, dtype), path, volume.input_paths, overwrite)
