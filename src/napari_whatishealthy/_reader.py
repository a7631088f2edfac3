"""napari reader: NIfTI files (``*.nii``, ``*.nii.gz``) and BraTS-layout case folders.

``napari_get_reader`` answers quickly and never raises: it returns None for anything that is not
ours (napari then asks other readers). For a file or folder that *is* ours but broken, the reader
function raises an :class:`~napari_whatishealthy.core.errors.InputError` whose message says what is
wrong; napari shows it as a notification.

Layers: one Image per modality (named ``flair``, ``t1``, ``t1ce``, ``t2`` for a case folder; the
file stem for a single file), the segmentation as a Labels layer (``seg``), all in RAS
millimetres. See :mod:`napari_whatishealthy._layers` for the geometry and the metadata kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._layers import LayerDataTuple, read_paths
from .core.volume import is_case_folder, is_nifti_path

ReaderFunction = Callable[[Any], list[LayerDataTuple]]


def _is_ours(path: Any) -> bool:
    try:
        p = Path(path)
        if p.is_dir():
            return is_case_folder(p)
        return is_nifti_path(p) and p.is_file()
    except Exception:
        return False


def napari_get_reader(path: str | list[str]) -> ReaderFunction | None:
    """The reader function for ``path`` (or a list of paths), or None if it is not ours."""
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(_is_ours(p) for p in paths):
        return None
    return read


def read(path: str | list[str]) -> list[LayerDataTuple]:
    """Layer data tuples for a NIfTI file, a case folder, or a list of them."""
    from ._writer import prefer_this_writer

    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    layers = read_paths(paths)
    prefer_this_writer()  # File > Save Selected Layers then defaults to NIfTI (see _writer)
    return layers
