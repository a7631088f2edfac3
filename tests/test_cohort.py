"""A cohort to review (core.cohort): folders of cases and localize output folders, which cases
are done, running one the way `whatishealthy localize` does, and never writing near inputs."""

from __future__ import annotations

import shutil

import pytest

from napari_whatishealthy.core.cohort import open_cohort, output_folder_for, run_case
from napari_whatishealthy.core.errors import InputError
from napari_whatishealthy.core.steps import drain


def test_folder_of_cases_runs_into_a_sibling_output_folder(cases_copy, tiny_checkpoint):
    cohort = open_cohort(cases_copy)
    assert cohort.out_dir == output_folder_for(cases_copy)
    assert cohort.out_dir.parent == cases_copy.resolve().parent  # not inside the inputs
    names = [c.name for c in cohort.cases]
    assert len(names) >= 2 and [c.status() for c in cohort.cases] == ["not run"] * len(names)
    assert cohort.todo() == cohort.cases
    before = {p: p.stat().st_mtime_ns for p in cases_copy.rglob("*") if p.is_file()}

    first = cohort.cases[0]
    paths = drain(run_case(cohort, first, model=str(tiny_checkpoint), device="cpu"))
    assert first.done and first.status() == "done" and paths["mask"].exists()
    assert paths["mask"].parent == cohort.out_dir
    assert first.provenance["inputs"]  # read back from the written provenance
    assert cohort.todo() == cohort.cases[1:]
    after = {p: p.stat().st_mtime_ns for p in cases_copy.rglob("*") if p.is_file()}
    assert after == before  # nothing written among the inputs

    # The output folder opens as a cohort too: its cases come back from the provenance.
    again = open_cohort(cohort.out_dir)
    assert again.out_dir == cohort.out_dir
    assert [c.name for c in again.cases] == [first.name]
    assert again.cases[0].done and again.cases[0].case is not None
    assert sorted(map(str, again.cases[0].input_paths)) == sorted(
        map(str, (p.resolve() for p in first.input_paths)))

    # Inputs moved away: the case is still listed, with its outputs only.
    shutil.move(str(cases_copy), str(cases_copy.with_name("moved")))
    moved = open_cohort(cohort.out_dir)
    assert moved.cases[0].case is None and moved.cases[0].done and not moved.todo()


def test_output_folder_inside_the_inputs_is_refused(cases_copy):
    with pytest.raises(InputError, match="inside the input folder"):
        open_cohort(cases_copy, out_dir=cases_copy / "out")
    with pytest.raises(InputError, match="not a folder"):
        open_cohort(cases_copy / "nothing-here")
