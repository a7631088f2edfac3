"""Volumes: NIfTI files and BraTS-layout case folders in canonical RAS, and back to the source grid.

Inside the tool every volume is held as ``[C, X, Y, Z]`` in canonical RAS+ (``nib.as_closest_canonical``),
with the source affine and header kept so that any output can be written voxel-for-voxel on the
grid of the file it came from.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from .errors import InputError

MODALITIES = ("flair", "t1", "t1ce", "t2")
# BraTS 2021 suffixes and the BraTS 2023 ones, mapped to one vocabulary.
_MODALITY_ALIASES = {
    "flair": "flair", "t2f": "flair", "t2flair": "flair",
    "t1": "t1", "t1n": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "seg": "seg", "mask": "seg", "label": "seg",
}
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SUFFIX_RE = re.compile(r"[_\-.]([A-Za-z0-9]+)$")


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


@dataclass
class Volume:
    """One case: modalities stacked as ``data[C, X, Y, Z]`` (float32, canonical RAS)."""

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

    def channel(self, modality: str) -> np.ndarray:
        return self.data[self.modalities.index(modality)]

    def select(self, modalities: tuple[str, ...] | list[str]) -> Volume:
        """The same case with its channels in the order a model expects."""
        missing = [m for m in modalities if m not in self.modalities]
        if missing:
            raise InputError(
                f"{self.name}: missing modality {', '.join(missing)}; this input has "
                f"{', '.join(self.modalities) or 'none'}. Provide the missing file(s) or use a "
                "model trained on the modalities you have."
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


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: the affine has non-finite values; fix the header (e.g. with fslorient)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise InputError(f"{path}: the affine is singular (zero voxel size?); fix the header")


def load_nifti(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read one 3D NIfTI into canonical RAS float32; return (array, source image)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image (found {type(img).__name__})")
    affine = img.affine
    _check_affine(path, affine)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
        shape = img.shape
    if len(shape) != 3:
        raise InputError(
            f"{path}: expected a 3D volume, found shape {shape}; split 4D series into 3D files "
            "(one per modality)"
        )
    if min(shape) < 2:
        raise InputError(f"{path}: a volume of shape {shape} is a 2D image; a 3D volume is needed")
    canonical = nib.as_closest_canonical(img)
    try:
        data = np.asarray(canonical.dataobj, dtype=np.float32)
    except Exception as exc:
        raise InputError(
            f"{path}: the image data cannot be read ({type(exc).__name__}: {exc}); the file is "
            "truncated, corrupt or has an unsupported data type"
        ) from exc
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path}: contains NaN or Inf voxels; replace them (e.g. with 0) first")
    return data, img


def find_case_files(folder: str | Path) -> dict[str, Path]:
    """Map modality (and ``seg``) to file for a BraTS-layout case folder."""
    folder = Path(folder)
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_nifti_path(path) or path.name.startswith("."):
            continue
        modality = modality_from_name(path)
        if modality is not None and modality not in files:
            files[modality] = path
    return files


def is_case_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(m in MODALITIES for m in find_case_files(folder))


def load_volume(
    inputs: str | Path | list[str | Path] | tuple[str | Path, ...],
    modalities: dict[str, str] | None = None,
    name: str | None = None,
) -> Volume:
    """Load a case folder, one NIfTI file, or several co-registered NIfTI files.

    ``modalities`` maps file paths to modality names where the file name does not say it.
    A segmentation file (``*_seg``) becomes ``Volume.segmentation``.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    explicit = {str(Path(k)): v for k, v in (modalities or {}).items()}
    files: dict[str, Path] = {}
    case_name = name
    for path in paths:
        if path.is_dir():
            found = find_case_files(path)
            if not any(m in MODALITIES for m in found):
                raise InputError(
                    f"{path}: no modality files found; a case folder holds "
                    "<case>_flair/_t1/_t1ce/_t2.nii.gz (and optionally <case>_seg.nii.gz)"
                )
            files.update(found)
            case_name = case_name or path.name
        else:
            modality = explicit.get(str(path)) or modality_from_name(path)
            if modality is None:
                if len(paths) == 1:
                    modality = "image"
                else:
                    raise InputError(
                        f"{path}: the modality is not in the file name; name it "
                        "<case>_flair.nii.gz (t1, t1ce, t2) or give it explicitly"
                    )
            if modality in files:
                raise InputError(f"{path}: modality {modality!r} given twice")
            files[modality] = path
            if case_name is None:
                stem = nifti_stem(path)
                match = _SUFFIX_RE.search(stem)
                case_name = stem[: match.start()] if match and modality_from_name(path) else stem
    image_keys = [m for m in MODALITIES if m in files] + [
        m for m in files if m not in MODALITIES and m != "seg"
    ]
    if not image_keys:
        raise InputError(f"{', '.join(map(str, paths))}: no image files (only a segmentation)")
    arrays = []
    reference_img = None
    reference_path = None
    for key in image_keys:
        data, img = load_nifti(files[key])
        if reference_img is None:
            reference_img, reference_path = img, files[key]
        else:
            _check_same_grid(reference_path, reference_img, files[key], img)
        arrays.append(data)
    assert reference_img is not None
    segmentation = None
    if "seg" in files:
        seg, seg_img = load_nifti(files["seg"])
        _check_same_grid(reference_path, reference_img, files["seg"], seg_img)
        segmentation = np.rint(seg).astype(np.int16)
    canonical_affine = nib.as_closest_canonical(reference_img).affine
    return Volume(
        data=np.stack(arrays),
        modalities=tuple(image_keys),
        affine=canonical_affine,
        source_affine=reference_img.affine.copy(),
        source_header=reference_img.header.copy(),
        source_paths=tuple(files[k] for k in image_keys),
        name=case_name or "case",
        segmentation=segmentation,
    )


def _check_same_grid(ref_path: Path, ref: nib.Nifti1Image, path: Path, img: nib.Nifti1Image) -> None:
    if ref.shape[:3] != img.shape[:3]:
        raise InputError(
            f"{path}: shape {img.shape[:3]} differs from {ref_path.name} {ref.shape[:3]}; "
            "the modalities must be co-registered on one grid (resample them first)"
        )
    if not np.allclose(ref.affine, img.affine, atol=1e-3):
        raise InputError(
            f"{path}: affine differs from {ref_path.name}; the modalities must be co-registered "
            "on one grid (resample them first)"
        )


def save_on_source_grid(
    array: np.ndarray,
    volume: Volume,
    path: str | Path,
    dtype: type | np.dtype = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write a canonical ``[X, Y, Z]`` array on the source grid, atomically, never over an input."""
    path = Path(path)
    if array.shape != volume.shape:
        raise InputError(f"{path}: array shape {array.shape} does not match the volume {volume.shape}")
    data = volume.to_source(np.asarray(array)).astype(dtype)
    header = volume.source_header.copy()
    img = nib.Nifti1Image(data, volume.source_affine, header)
    img.set_data_dtype(dtype)
    if np.issubdtype(np.dtype(dtype), np.integer):
        img.header.set_slope_inter(1, 0)
    img.header["descrip"] = b"napari-whatishealthy"
    return write_nifti_atomic(img, path, protected=volume.source_paths, overwrite=overwrite)


def write_nifti_atomic(
    img: nib.Nifti1Image,
    path: str | Path,
    protected: tuple[Path, ...] = (),
    overwrite: bool = False,
) -> Path:
    """Save through a temporary file in the same folder and rename: no half-written outputs."""
    path = Path(path)
    if not is_nifti_path(path):
        raise InputError(f"{path}: output must end in .nii.gz or .nii")
    target = path.resolve()
    for source in protected:
        if Path(source).exists() and target == Path(source).resolve():
            raise InputError(f"{path}: refusing to overwrite an input file; choose another name")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists; pass --overwrite or choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
