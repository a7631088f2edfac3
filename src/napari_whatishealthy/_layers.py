"""NIfTI volumes <-> napari layers: geometry, metadata and the way back to the source grid.

No Qt here and no napari import at module level: the reader, the writer, the sample data and the
widget all go through these functions, so the three agree on one convention.

Geometry
--------
A volume is held in canonical RAS+ order ``[X, Y, Z]`` (``nib.as_closest_canonical``). Its napari
array is ``data.transpose(2, 1, 0)``: axes ``(S, A, R)``, so that the default 2D view of a napari
viewer shows axial slices with anterior up. World coordinates are RAS millimetres:
``scale = zooms[::-1]``, ``translate = canonical_affine[:3, 3][::-1]`` (and, for an oblique scan,
the full matrix as the layer's ``affine``).

Metadata (``layer.metadata``, all plain Python / numpy values that survive copying)
--------------------------------------------------------------------------------
``source_path``      the file this layer was read from (str)
``source_paths``     every image file of the case (list of str): never overwritten by a save
``source_affine``    the source file's own affine (4x4 float array)
``source_shape``     the source file's stored 3D shape
``source_header``    the source NIfTI header as bytes (``header.binaryblock``)
``source_header_class``  ``"Nifti1Header"`` or ``"Nifti2Header"``
``canonical_affine`` the RAS affine of the canonical array (4x4)
``modality``         ``flair``, ``t1``, ``t1ce``, ``t2``, ``seg`` or None
``case``             the case name (folder name or file stem)
``sample``           True for the bundled sample (saved files then default to the working folder)
Result layers of the widget add ``role`` (``healthy``, ``difference`` or ``mask``) and
``provenance``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .core.errors import InputError
from .core.output import source_grid_image, write_nifti
from .core.volume import (
    MODALITIES,
    Volume,
    canonical_to_source,
    find_case_files,
    is_nifti_path,
    load_nifti,
    load_volume,
    modality_from_name,
    nifti_stem,
)

UNITS = ("mm", "mm", "mm")
AXIS_LABELS = ("S", "A", "R")
SOURCE_KEYS = (
    "source_path",
    "source_paths",
    "source_affine",
    "source_shape",
    "source_header",
    "source_header_class",
    "canonical_affine",
    "modality",
    "case",
    "sample",
)

LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]

_REVERSE = np.eye(4)[[2, 1, 0, 3]]  # (x, y, z, 1) <-> (z, y, x, 1)


# ------------------------------------------------------------------------------------------------
# Geometry


def to_napari(canonical: np.ndarray) -> np.ndarray:
    """Canonical ``[X, Y, Z]`` -> napari ``(S, A, R)`` (a contiguous copy)."""
    return np.ascontiguousarray(np.asarray(canonical).transpose(2, 1, 0))


def from_napari(data: Any) -> np.ndarray:
    """napari ``(S, A, R)`` -> canonical ``[X, Y, Z]`` (a view where possible)."""
    array = np.asarray(data)
    if array.ndim != 3:
        raise InputError(
            f"expected a 3D layer, got {array.ndim} dimension(s) of shape {array.shape}"
        )
    return array.transpose(2, 1, 0)


def geometry_kwargs(canonical_affine: np.ndarray) -> dict[str, Any]:
    """napari layer keyword arguments placing a canonical array in RAS millimetres."""
    affine = np.asarray(canonical_affine, dtype=float)
    linear = affine[:3, :3]
    zooms = np.sqrt((linear**2).sum(axis=0))
    kwargs: dict[str, Any] = {"units": UNITS, "axis_labels": AXIS_LABELS}
    off_diagonal = linear - np.diag(np.diag(linear))
    if np.all(np.abs(off_diagonal) <= 1e-6 * zooms.max()) and np.all(np.diag(linear) > 0):
        kwargs["scale"] = tuple(float(z) for z in zooms[::-1])
        kwargs["translate"] = tuple(float(t) for t in affine[:3, 3][::-1])
    else:  # oblique: the whole matrix, in napari axis order
        kwargs["affine"] = _REVERSE @ affine @ _REVERSE
    return kwargs


def napari_to_ras_affine(
    scale: Any = None,
    translate: Any = None,
    rotate: Any = None,
    shear: Any = None,
    affine: Any = None,
) -> np.ndarray:
    """The RAS affine of the canonical array of a layer with this napari transform."""
    from napari.utils.transforms import Affine

    ndim = 3
    data2physical = Affine(
        scale=np.ones(ndim) if scale is None else np.asarray(scale, float),
        translate=np.zeros(ndim) if translate is None else np.asarray(translate, float),
        rotate=rotate,
        shear=shear,
        ndim=ndim,
    ).affine_matrix
    physical2world = np.eye(4) if affine is None else _as_matrix(affine)
    world = physical2world @ data2physical
    return _REVERSE @ world @ _REVERSE


def _as_matrix(affine: Any) -> np.ndarray:
    matrix = getattr(affine, "affine_matrix", affine)
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise InputError(f"only 3D layers can be saved as NIfTI (affine of shape {matrix.shape})")
    return matrix


# ------------------------------------------------------------------------------------------------
# Metadata


def header_bytes(header: nib.Nifti1Header) -> tuple[bytes, str]:
    return bytes(header.binaryblock), type(header).__name__


def header_from_metadata(metadata: dict[str, Any]) -> nib.Nifti1Header | None:
    block = metadata.get("source_header")
    if block is None:
        return None
    if isinstance(block, nib.Nifti1Header):
        return block.copy()
    nifti2 = metadata.get("source_header_class") == "Nifti2Header"
    cls = nib.Nifti2Header if nifti2 else nib.Nifti1Header
    return cls.from_fileobj(io.BytesIO(bytes(block)))


def volume_metadata(
    volume: Volume, source_path: Path, modality: str | None, sample: bool = False
) -> dict[str, Any]:
    block, cls = header_bytes(volume.source_header)
    return {
        "source_path": str(Path(source_path).resolve()),
        "source_paths": [str(Path(p).resolve()) for p in volume.source_paths],
        "source_affine": np.array(volume.source_affine, dtype=float),
        "source_shape": tuple(int(s) for s in volume.source_header.get_data_shape()[:3]),
        "source_header": block,
        "source_header_class": cls,
        "canonical_affine": np.array(volume.affine, dtype=float),
        "modality": modality,
        "case": volume.name,
        "sample": bool(sample),
    }


def source_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Only the keys that say where a layer came from (to copy onto derived layers)."""
    metadata = metadata or {}
    return {k: metadata[k] for k in SOURCE_KEYS if k in metadata}


def protected_paths(metadata: dict[str, Any] | None) -> tuple[Path, ...]:
    metadata = metadata or {}
    paths = list(metadata.get("source_paths") or [])
    if metadata.get("source_path"):
        paths.append(metadata["source_path"])
    return tuple(Path(p) for p in paths)


# ------------------------------------------------------------------------------------------------
# Reading


def _contrast_limits(data: np.ndarray) -> tuple[float, float]:
    values = data[data != 0]
    if values.size == 0:
        return 0.0, 1.0
    low = float(min(0.0, values.min()))
    high = float(np.percentile(values, 99.5))
    return (low, high) if high > low else (low, low + 1.0)


def _labels_dtype(labels: np.ndarray) -> np.ndarray:
    if labels.size and labels.min() >= 0 and labels.max() <= 255:
        return labels.astype(np.uint8)
    return labels.astype(np.int32)


def volume_layers(
    volume: Volume, sample: bool = False, single_file: bool = False
) -> list[LayerDataTuple]:
    """One Image layer per modality (named by modality, or the file stem for one plain file) and
    the segmentation as a Labels layer."""
    layers: list[LayerDataTuple] = []
    geometry = geometry_kwargs(volume.affine)
    for index, modality in enumerate(volume.modalities):
        path = volume.source_paths[index]
        known = modality if modality in MODALITIES else None
        name = nifti_stem(path) if single_file else (modality if known else nifti_stem(path))
        data = to_napari(volume.data[index])
        kwargs = {
            "name": name,
            "metadata": volume_metadata(volume, path, known, sample),
            "colormap": "gray",
            "contrast_limits": _contrast_limits(data),
            # A case folder opens with its first modality on top and the others hidden.
            "visible": single_file or index == 0,
            **geometry,
        }
        layers.append((data, kwargs, "image"))
    if volume.segmentation is not None:
        seg_path = volume.extra.get("seg_path", volume.source_paths[0])
        layers.append(
            (
                to_napari(_labels_dtype(volume.segmentation)),
                {
                    "name": "seg",
                    "metadata": volume_metadata(volume, seg_path, "seg", sample),
                    "opacity": 0.5,
                    **geometry,
                },
                "labels",
            )
        )
    return layers


def case_files(folder: str | Path) -> dict[str, Path]:
    """Modality -> file for a BraTS-layout folder (only ``*_seg`` files count as ground truth,
    so a saved ``*_mask`` beside the inputs is never mistaken for it)."""
    return find_case_files(Path(folder))


def read_case_folder(folder: str | Path, sample: bool = False) -> list[LayerDataTuple]:
    folder = Path(folder)
    files = case_files(folder)
    images = [files[m] for m in MODALITIES if m in files]
    if not images:
        raise InputError(
            f"{folder}: no modality files found; a case folder holds "
            "<case>_flair/_t1/_t1ce/_t2.nii.gz"
        )
    inputs = images + ([files["seg"]] if "seg" in files else [])
    volume = load_volume(inputs, name=folder.name)
    if "seg" in files:
        volume.extra["seg_path"] = files["seg"]
    return volume_layers(volume, sample=sample)


def read_nifti_file(path: str | Path) -> list[LayerDataTuple]:
    path = Path(path)
    if modality_from_name(path) == "seg":
        data, img = load_nifti(path)
        canonical_affine = nib.as_closest_canonical(img).affine
        volume = Volume(
            data=np.zeros((0,) + data.shape, np.float32), modalities=(), affine=canonical_affine,
            source_affine=img.affine.copy(), source_header=img.header.copy(),
            source_paths=(path,), name=nifti_stem(path),
        )
        return [
            (
                to_napari(_labels_dtype(np.rint(data))),
                {
                    "name": nifti_stem(path),
                    "metadata": volume_metadata(volume, path, "seg"),
                    "opacity": 0.5,
                    **geometry_kwargs(canonical_affine),
                },
                "labels",
            )
        ]
    volume = load_volume([path])
    return volume_layers(volume, single_file=True)


def read_paths(paths: list[str | Path]) -> list[LayerDataTuple]:
    layers: list[LayerDataTuple] = []
    for path in paths:
        path = Path(path)
        layers.extend(read_case_folder(path) if path.is_dir() else read_nifti_file(path))
    return layers


# ------------------------------------------------------------------------------------------------
# Writing


def labels_to_uint8(data: Any) -> np.ndarray:
    array = np.asarray(data)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.mod(array, 1) == 0):
            raise InputError(f"a mask must hold whole numbers, found {array.dtype} values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(
            f"mask values {int(array.min())}..{int(array.max())} do not fit uint8 (0..255); "
            "relabel the layer first"
        )
    return array.astype(np.uint8)


def nifti_output_path(path: str | Path) -> Path:
    path = Path(path)
    return path if is_nifti_path(path) else path.with_name(path.name + ".nii.gz")


def write_mask(path: str | Path, data: Any, meta: dict[str, Any]) -> Path:
    """Write a napari Labels array as a uint8 NIfTI (see ``_writer.write_labels``)."""
    path = nifti_output_path(path)
    metadata = dict(meta.get("metadata") or {})
    canonical = labels_to_uint8(from_napari(data))
    if canonical.ndim != 3 or 0 in canonical.shape:
        raise InputError(f"{path}: the layer has shape {tuple(np.shape(data))}; only a non-empty "
                         "3D Labels layer can be saved as a NIfTI mask")
    protected = protected_paths(metadata)
    if metadata.get("source_affine") is not None and metadata.get("source_header") is not None:
        source_affine, header = _source_grid(path, metadata)
        stored = canonical_to_source(canonical, source_affine)
        stored_shape = metadata.get("source_shape") or header.get_data_shape()[:3]
        expected = tuple(int(s) for s in stored_shape)
        if stored.shape != expected:
            raise InputError(
                f"{path}: the layer (shape {tuple(np.shape(data))} in napari order) does not match "
                f"the grid of its source {metadata.get('source_path')} {expected}; it cannot be "
                "saved on the source grid"
            )
        img = source_grid_image(stored, source_affine, header, np.uint8,
                                "napari-whatishealthy mask")
    else:
        affine = napari_to_ras_affine(
            meta.get("scale"), meta.get("translate"), meta.get("rotate"), meta.get("shear"),
            meta.get("affine"),
        )
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError(f"{path}: the layer's scale or transform is zero or not a number "
                             f"(scale {tuple(meta.get('scale') or ())}); set a positive voxel "
                             "size before saving")
        img = nib.Nifti1Image(np.ascontiguousarray(canonical), affine)
        img.set_data_dtype(np.uint8)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        img.header["descrip"] = b"napari-whatishealthy mask"
    return write_nifti(img, path, protected, overwrite=True)


def _source_grid(path: Path, metadata: dict[str, Any]) -> tuple[np.ndarray, nib.Nifti1Header]:
    """The source affine and header a layer's metadata carries, or a one-line refusal."""
    try:
        source_affine = np.asarray(metadata["source_affine"], dtype=float)
        header = header_from_metadata(metadata)
        usable = (source_affine.shape == (4, 4) and np.all(np.isfinite(source_affine))
                  and abs(np.linalg.det(source_affine[:3, :3])) > 1e-12)
    except (ValueError, TypeError, KeyError, OverflowError, nib.spatialimages.HeaderDataError,
            nib.wrapstruct.WrapStructError) as exc:
        raise InputError(f"{path}: the layer's source metadata is not usable ({exc}); save it "
                         "from a layer this plugin opened, or remove its 'source_*' metadata") from None
    if not usable or header is None:
        raise InputError(f"{path}: the layer's source affine is not a finite, invertible 4x4 "
                         "matrix; save it from a layer this plugin opened, or remove its "
                         "'source_*' metadata")
    return source_affine, header


def default_mask_path(metadata: dict[str, Any] | None, layer_name: str) -> Path:
    """``<source stem>_mask.nii.gz`` next to the source image (the working folder for the
    bundled sample or a read-only folder); never the source itself."""
    metadata = metadata or {}
    source = metadata.get("source_path")
    stem = nifti_stem(source) if source else _safe_name(layer_name)
    folder = Path(source).parent if source else Path.cwd()
    if metadata.get("sample") or not os.access(folder, os.W_OK):
        folder = Path.cwd() if os.access(Path.cwd(), os.W_OK) else Path.home()
    stem = stem[: -len(" mask")] if stem.endswith(" mask") else stem
    candidate = folder / f"{stem}_mask.nii.gz"
    sources = {p.resolve() for p in protected_paths(metadata) if p.exists()}
    n = 2
    while candidate.resolve() in sources:
        candidate = folder / f"{stem}_mask-{n}.nii.gz"
        n += 1
    return candidate


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")
    return cleaned or "layer"
