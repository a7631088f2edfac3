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

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    io_orientation,
    ornt_transform,
)

from .errors import InputError
from .nifti import (  # the file-level reader; its public names are re-exported here
    DEFAULT_MAX_VOXELS,
    MAX_VOXELS_ENV,
    NONFINITE_POLICIES,
    check_policy,
    check_size,
    is_nifti_path,
    load_nifti,
    max_voxels_bound,
    nifti_stem,
    open_checked,
    orientation_note,
    probe_path,
    read_canonical,
)

__all__ = [
    "DEFAULT_MAX_VOXELS", "MAX_VOXELS_ENV", "MODALITIES", "NONFINITE_POLICIES", "Volume",
    "canonical_modality", "canonical_to_source", "case_stem", "find_case_files",
    "is_case_folder", "is_nifti_path", "load_nifti", "load_volume", "max_voxels_bound",
    "modality_from_name", "nifti_stem", "on_source_grid", "save_on_source_grid",
]

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
_SUFFIX_RE = re.compile(r"[_\-.]([A-Za-z0-9]+)$")

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
    check_policy(nonfinite)
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
        img, spatial, n = open_checked(path, names, bound)
        if opened:
            _check_same_grid(opened[0][0], opened[0][1], opened[0][2], path, img, spatial)
        opened.append((path, img, spatial, names))
    ref_path, ref_img, ref_spatial, _ = opened[0]
    channels = sum(len(names) for *_, names in opened)
    if len(opened) > 1:
        files = ", ".join(p.name for p, *_ in opened)
        check_size(f"{ref_path.parent} ({files})", ref_spatial, channels, bound)
    seg_img = None
    if seg_path is not None:
        seg_img, seg_spatial, _ = open_checked(seg_path, None, bound)
        _check_same_grid(ref_path, ref_img, ref_spatial, seg_path, seg_img, seg_spatial)

    notes: list[str] = [n for path, img, *_ in opened
                        if (n := orientation_note(path, img.header)) is not None]
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
            if probe_path(path) == "dir":
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
        block, affine = read_canonical(path, img, spatial, len(names), nonfinite, notes)
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
    seg, _ = read_canonical(seg_path, seg_img, ref_spatial, 1, nonfinite, notes)
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
