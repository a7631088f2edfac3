"""Cases from what a user names: case folders, folders of case folders, or NIfTI files grouped
by their names, and the model each case (or a whole dataset) is run with. Nothing here reads
the images; :meth:`Case.load` does, once the model is known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .model import ModelSpec

__all__ = ["Case", "case_name_from_files", "choose_for_case", "choose_for_folders",
           "collect_cases"]


@dataclass
class Case:
    """One case: its name, its files and, for a file whose name does not say it, its modality."""

    name: str
    paths: list[Path]
    modalities: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None  # the case folder, when given as one

    def available(self) -> tuple[str, ...]:
        """The modalities the case provides, from its file names (or the given modality),
        without reading the images; ``("image",)`` for a lone file whose modality is unknown."""
        from .model_choice import UNKNOWN_MODALITY
        from .volume import find_case_files, modality_from_name

        if self.folder is not None:
            return tuple(m for m in find_case_files(self.folder) if m != "seg")
        found: list[str] = []
        for path in self.paths:
            given = self.modalities.get(str(path))
            if given:
                found.extend(m.strip() for m in given.split(","))
            else:
                found.append(modality_from_name(path) or UNKNOWN_MODALITY)
        return tuple(dict.fromkeys(m for m in found if m != "seg"))

    def load(self, spec: ModelSpec) -> Any:
        """The case's :class:`~.volume.Volume` with the model's channels, in its order."""
        from .volume import load_volume

        volume = load_volume(self.paths, modalities=self.modalities, name=self.name)
        return volume.select(spec.modalities)

    def grid_voxels(self) -> int:
        """Voxels of the case's source grid, from the first file's header (0 if unreadable:
        the loader then says why)."""
        import nibabel as nib

        try:
            return math.prod(int(n) for n in nib.load(str(self.paths[0])).shape[:3])
        except Exception:  # noqa: BLE001 - reading the image later gives the one-line reason
            return 0


def collect_cases(inputs: Sequence[str | Path], modality: str | None = None) -> list[Case]:
    """Inputs -> cases: case folders, folders of case folders, or NIfTI files grouped by case
    (``<case>_<modality>.nii.gz``). ``modality``: that of a file whose name does not say it."""
    from .data import discover_cases
    from .volume import (
        canonical_modality,
        case_stem,
        find_case_files,
        is_case_folder,
        is_nifti_path,
        modality_from_name,
        nifti_stem,
    )

    if modality is not None:
        modality = canonical_modality(modality)
    cases: list[Case] = []
    grouped: dict[tuple[Path, str], Case] = {}
    for text in inputs:
        path = Path(text)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir():
            folders = [path] if is_case_folder(path) else discover_cases(path)
            for folder in folders:
                files = find_case_files(folder)
                cases.append(Case(folder.name, list(files.values()), folder=folder))
            continue
        if not is_nifti_path(path):
            raise InputError(f"{path}: not a NIfTI file name (.nii or .nii.gz); give NIfTI files "
                             "or a case folder")
        named = modality_from_name(path)
        if modality is not None and named is not None and named != modality:
            raise InputError(f"{path}: its name says {named}, but --modality says {modality}; "
                             "rename the file or leave out --modality")
        if named is None:
            # A lone unnamed file: its modality is settled once the model is known.
            given = {} if modality is None else {str(path): modality}
            cases.append(Case(nifti_stem(path), [path], given))
            continue
        name = case_stem(path)
        key = (path.resolve().parent, name)
        if key not in grouped:
            grouped[key] = Case(name, [])
            cases.append(grouped[key])
        grouped[key].paths.append(path)
    seen: set[str] = set()
    for case in cases:
        if case.name in seen:
            raise InputError(f"two inputs are both case {case.name!r}; their outputs would "
                             "collide: run them into separate --out folders")
        seen.add(case.name)
    return cases


def choose_for_case(case: Case, requested: str | Path) -> Any:
    """The :class:`~.model_choice.ModelChoice` for one case; errors name the case's files."""
    from .model_choice import choose_model

    try:
        return choose_model(case.available(), requested)
    except InputError as exc:
        where = case.folder or case.paths[0]
        raise InputError(f"{where}: {exc}") from None


def choose_for_folders(folders: Sequence[Path], requested: str | Path) -> Any:
    """The model for a dataset (``evaluate``): one that every case folder's modalities fit."""
    from .model_choice import choose_model
    from .volume import find_case_files

    common: list[str] | None = None
    for folder in folders:
        have = [m for m in find_case_files(folder) if m != "seg"]
        common = have if common is None else [m for m in common if m in have]
    return choose_model(common or (), requested)


def case_name_from_files(folder: Path) -> str | None:
    """``Sample`` for a folder holding ``Sample_flair.nii.gz`` ... (None: use the folder name)."""
    from .volume import case_stem, find_case_files, nifti_stem

    files = find_case_files(folder)
    if not files:
        return None
    first = next(iter(files.values()))
    name = case_stem(first)
    return name if name != nifti_stem(first) else None
