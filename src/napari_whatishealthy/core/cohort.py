"""A cohort to review: its cases, where each case's outputs are, which are done, and running the
ones that are not. Qt-free: the widget's cohort panel steps through it; runs go through the same
:class:`~.session.LocalizeSession` and :func:`~.results.write_outputs` as ``whatishealthy
localize``, so a case finished here is the same set of files the CLI writes.

Two kinds of folder open as a cohort:

* a folder of cases (BraTS-layout case folders, or NIfTI files named ``<case>_<modality>``):
  outputs go to a sibling folder ``<folder>-whatishealthy`` (never inside the inputs' folder);
* a ``localize`` output folder (``<case>_provenance.json`` beside ``<case>_mask.nii.gz``...):
  the cases are read back from each provenance's ``inputs``; a case whose inputs have moved is
  still listed, with its outputs only.

A painted mask is kept as ``<case>_mask-edited.nii.gz`` next to the outputs: the model's own
mask stays as it was written, and no input is ever written over.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cases import Case, collect_cases
from .errors import InputError
from .results import output_paths

__all__ = ["Cohort", "CohortCase", "open_cohort", "output_folder_for", "run_case"]

OUTPUT_SUFFIX = "-whatishealthy"
EDITED = "mask-edited"


@dataclass
class CohortCase:
    """One case of a cohort: its inputs (None when only outputs are known) and outputs."""

    name: str
    case: Case | None
    outputs: dict[str, Path]
    provenance: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        """Whether the model's outputs are all there (a run finished for this case)."""
        return all(self.outputs[k].exists() for k in ("difference", "mask", "provenance"))

    @property
    def edited_mask(self) -> Path:
        """Where the painted mask is kept (beside the outputs)."""
        return self.outputs["mask"].with_name(f"{self.name}_{EDITED}.nii.gz")

    @property
    def input_paths(self) -> list[Path]:
        return list(self.case.paths) if self.case is not None else []

    def status(self) -> str:
        if self.case is None and not self.done:
            return "inputs missing"
        if not self.done:
            return "not run"
        return "edited" if self.edited_mask.exists() else "done"


@dataclass
class Cohort:
    folder: Path  # what was opened
    out_dir: Path  # where outputs are (and are written)
    cases: list[CohortCase] = field(default_factory=list)

    def todo(self) -> list[CohortCase]:
        """The cases that can run and have no outputs yet."""
        return [c for c in self.cases if not c.done and c.case is not None]

    def refresh(self) -> None:
        """Re-read the provenance of cases finished since the cohort was opened."""
        for entry in self.cases:
            if entry.provenance is None and entry.outputs["provenance"].exists():
                entry.provenance = _read_json(entry.outputs["provenance"])


def output_folder_for(folder: str | Path) -> Path:
    """The default output folder of a folder of cases: a sibling, never inside it."""
    folder = Path(folder).resolve()
    return folder.with_name(folder.name + OUTPUT_SUFFIX)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_output_folder(folder: Path) -> bool:
    return any(folder.glob("*_provenance.json"))


def open_cohort(folder: str | Path, out_dir: str | Path | None = None) -> Cohort:
    """The cohort in ``folder`` (a folder of cases or a ``localize`` output folder).

    ``out_dir``: where outputs are written for a folder of cases (default
    :func:`output_folder_for`); refused when it is inside the inputs' folder.
    """
    from .output import check_outside

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; open a folder of cases or a localize output "
                         "folder")
    if _is_output_folder(folder):
        return _from_outputs(folder)
    out = Path(out_dir) if out_dir is not None else output_folder_for(folder)
    check_outside(out, folder, option="the output folder")
    cases = collect_cases([folder])
    if not cases:
        raise InputError(f"{folder}: no cases found")
    entries = []
    for case in cases:
        paths = output_paths(out, case.name)
        entries.append(CohortCase(case.name, case, paths, _read_json(paths["provenance"])))
    return Cohort(folder, out, entries)


def _from_outputs(folder: Path) -> Cohort:
    from .volume import is_case_folder

    entries = []
    for record_path in sorted(folder.glob("*_provenance.json")):
        name = record_path.name[: -len("_provenance.json")]
        record = _read_json(record_path)
        inputs = [Path(p) for p in (record or {}).get("inputs", [])]
        case = None
        if inputs and all(p.exists() for p in inputs):
            parents = {p.parent for p in inputs}
            # The whole case folder when the inputs came from one: its ground truth comes too.
            where = list(parents) if len(parents) == 1 and is_case_folder(inputs[0].parent) \
                else inputs
            try:
                found = collect_cases(where)
            except InputError:
                found = []
            if len(found) == 1:
                case = found[0]
                case.name = name
        entries.append(CohortCase(name, case, output_paths(folder, name), record))
    return Cohort(folder, folder, entries)


def run_case(
    cohort: Cohort, entry: CohortCase, model: str | Path = "auto", device: str = "auto",
    **overrides: Any,
) -> Generator[Any, None, dict[str, Path]]:
    """Localize one case as ``whatishealthy localize`` does (yielding its progress) and write its
    outputs to the cohort's output folder; returns the paths written."""
    from .cases import choose_for_case
    from .results import write_outputs
    from .session import LocalizeSession

    if entry.case is None:
        raise InputError(f"{entry.name}: its input files are not found; it cannot be run")
    choice = choose_for_case(entry.case, model)
    session = LocalizeSession.load(choice.folder, device)
    settings = session.settings(device=device, **overrides)
    volume = entry.case.load(session.spec)
    result = yield from session.iter_localize(volume.data, settings,
                                              inputs=volume.source_paths)
    model_files = [p for p in Path(session.folder).iterdir() if p.is_file()]
    paths = write_outputs(result, volume, cohort.out_dir, case=entry.name, inputs=model_files)
    entry.outputs.update(paths)
    entry.provenance = _read_json(paths["provenance"])
    return paths
