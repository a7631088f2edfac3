"""One NIfTI file: what it is (sniffed before nibabel parses it), its checks (header, data
length, dtype, affine, size bound), and its voxels in canonical RAS orientation. Every problem
is an ``InputError`` naming the file. :mod:`.volume` builds cases from these."""

from __future__ import annotations

import gzip
import math
import os
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    inv_ornt_aff,
    io_orientation,
)

from .errors import InputError, WhatIsHealthyError

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


#: Default bound on the voxels of one case's float32 ``[C, X, Y, Z]`` array (1 GiB); the pipeline
#: holds a few arrays of that size. Override with the environment variable below or the
#: ``max_voxels`` argument of :func:`load_volume` (``0`` or ``none``: no bound).
DEFAULT_MAX_VOXELS = 2**28
MAX_VOXELS_ENV = "WHATISHEALTHY_MAX_VOXELS"
#: What to do with NaN / infinite voxels: refuse the file (default) or replace them by 0.
NONFINITE_POLICIES = ("refuse", "zero")

_GZIP_MAGIC = b"\x1f\x8b"


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


def check_size(where: str, shape: tuple[int, ...], channels: int, bound: int | None) -> None:
    voxels = math.prod(int(s) for s in shape) * channels
    if bound is not None and voxels > bound:
        raise InputError(
            f"{where}: too large: {channels} channel(s) of {' x '.join(map(str, shape))} voxels "
            f"= {voxels:,} voxels, whose float32 working array alone needs about {_gib(voxels)}, "
            f"above the bound of {bound:,} voxels ({_gib(bound)}); crop or resample it, or raise "
            f"the bound with {MAX_VOXELS_ENV}=<voxels> if this machine has the memory"
        )


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


def orientation_note(path: Path, header: nib.Nifti1Header) -> str | None:
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


def probe_path(path: Path) -> str:
    """``dir``, ``file`` or ``missing``; a path the system cannot even look up is refused."""
    try:
        if path.is_dir():
            return "dir"
        return "file" if path.exists() else "missing"
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a loop of links
        raise InputError(f"{str(path)!r}: not a usable path ({_detail(exc)})") from exc


def _open(path: Path) -> nib.Nifti1Image:
    """The image with its header checked for type; no voxels read yet."""
    kind = probe_path(path)
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


def read_canonical(
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


def open_checked(
    path: Path, names: tuple[str, ...] | None, bound: int | None
) -> tuple[nib.Nifti1Image, tuple[int, int, int], int]:
    img = _open(path)
    spatial, n = _layout(path, img, names)
    _check_dtype(path, img)
    _check_affine(path, img.affine)
    check_size(str(path), spatial, n, bound)
    _check_data_length(path, img)
    return img, spatial, n


def check_policy(nonfinite: str) -> None:
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
    check_policy(nonfinite)
    path = Path(path)
    img, spatial, n = open_checked(path, None, max_voxels_bound(max_voxels))
    data, _ = read_canonical(path, img, spatial, n, nonfinite, [])
    return data[0], img


# ------------------------------------------------------------------------------------------------
# Cases: several files, one grid.
