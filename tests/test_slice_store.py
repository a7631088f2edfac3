"""The on-disk slice store: same slices as the in-RAM path, reuse, rebuilds, refusals."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from napari_whatishealthy.core.data import build_slice_set, discover_cases
from napari_whatishealthy.core.slice_store import (
    INDEX_FILE,
    PARTS_DIR,
    Preprocessing,
    StoreError,
    _case_files,
    _prepare_parts,
    _stat_key,
    open_or_build,
    wait_for_store,
)

MODALITIES = ("flair", "t1", "t1ce", "t2")


def _open(folder, cases, size=16, **kw):
    logs: list[str] = []
    store = open_or_build(folder, cases, Preprocessing(size, MODALITIES), log=logs.append,
                          show_progress=False, **kw)
    return store, " | ".join(logs)


def test_store_holds_the_in_ram_slices_and_reads_rows_of_a_subset(synthetic_cases, tmp_path):
    cases = discover_cases(synthetic_cases)
    store, log = _open(tmp_path / "store", cases, workers=2)
    assert "building 4 cases" in log and "2 process(es)" in log
    ref = build_slice_set(cases, MODALITIES, 16)
    assert store.shape == ref.slices.shape and store.cases == ref.cases
    np.testing.assert_array_equal(store.load(), ref.slices)
    np.testing.assert_array_equal(store.labels, ref.labels)
    np.testing.assert_array_equal(store.case_of_slice, ref.case_of_slice)
    assert store.counts() == ref.counts()
    sub, ref_sub = store.subset(np.array([1, 3])), ref.subset(np.array([1, 3]))
    index = np.random.default_rng(0).integers(0, len(sub), 40)  # with repeats, unsorted
    np.testing.assert_array_equal(sub.read(index), ref_sub.slices[index])
    np.testing.assert_array_equal(sub.labels, ref_sub.labels)
    assert not (tmp_path / "store" / PARTS_DIR).exists()
    on_disk = np.load(tmp_path / "store" / "slices.npy", mmap_mode="r")  # a plain .npy file
    np.testing.assert_array_equal(on_disk, ref.slices)
    with pytest.raises(IndexError):
        sub.read([len(sub)])


def test_store_is_reused_and_rebuilt_only_for_what_changed(cases_copy, tmp_path):
    cases = discover_cases(cases_copy)
    folder = tmp_path / "store"
    first, _ = _open(folder, cases, workers=1)
    before = first.load()
    again, log = _open(folder, cases)
    assert log == ""  # reused: nothing built, nothing said

    flair = _case_files(cases[0], MODALITIES)["flair"]
    os.utime(flair, ns=(1, 1))  # touched, same content: still reused
    _, log = _open(folder, cases)
    assert log == ""

    seg = _case_files(cases[2], MODALITIES)["seg"]
    data = bytearray(seg.read_bytes())
    import nibabel as nib

    img = nib.load(seg)
    labels = np.asarray(img.dataobj)
    labels[...] = 0  # no lesion any more: every slice of this case becomes healthy
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), seg)
    assert seg.read_bytes() != bytes(data)
    changed, log = _open(folder, cases)
    assert "1 changed (" + cases[2].name in log and "building 4 cases" in log
    assert "3 of 4 cases already prepared, 1 to prepare" in log  # copied from the old store
    rows = changed.case_of_slice == 2
    assert (changed.labels[rows] == 0).all() and (first.labels[first.case_of_slice == 2] == 1).any()
    np.testing.assert_array_equal(changed.load()[~rows], before[first.case_of_slice != 2])

    fewer, log = _open(folder, cases[:3])
    assert "1 removed" in log and fewer.cases == [c.name for c in cases[:3]]


def test_other_preprocessing_is_refused_with_what_differs(synthetic_cases, tmp_path):
    cases = discover_cases(synthetic_cases)
    _open(tmp_path / "store", cases)
    with pytest.raises(StoreError, match=r"image_size: store 16, this run 32.*--rebuild-store"):
        _open(tmp_path / "store", cases, size=32)
    rebuilt, log = _open(tmp_path / "store", cases, size=32, rebuild=True)
    assert rebuilt.shape[-1] == 32 and "--rebuild-store" in log


def test_half_built_store_resumes_from_its_finished_cases(synthetic_cases, tmp_path):
    cases = discover_cases(synthetic_cases)
    folder = tmp_path / "store"
    prep = Preprocessing(16, MODALITIES)
    (folder / PARTS_DIR).mkdir(parents=True)
    done = [(i, c, folder / PARTS_DIR / f"{c.name}-{_stat_key(c, _case_files(c, MODALITIES), prep)}.npz")
            for i, c in enumerate(cases[:2])]
    list(_prepare_parts(done, prep, 1, False))  # an interrupted build: two cases done, no index
    assert not (folder / INDEX_FILE).exists()
    store, log = _open(folder, cases)
    assert "2 of 4 cases already prepared, 2 to prepare" in log
    np.testing.assert_array_equal(store.load(), build_slice_set(cases, MODALITIES, 16).slices)


def test_waiting_rank_opens_the_finished_store_and_refuses_other_preprocessing(
        synthetic_cases, tmp_path):
    cases = discover_cases(synthetic_cases)
    store, _ = _open(tmp_path / "store", cases)
    other = wait_for_store(tmp_path / "store", cases, Preprocessing(16, MODALITIES), poll_s=0.01)
    assert len(other) == len(store)
    with pytest.raises(StoreError, match="modalities"):
        wait_for_store(tmp_path / "store", cases, Preprocessing(16, ("flair",)), poll_s=0.01)


def test_case_without_segmentation_stops_the_build_with_its_name(cases_copy, tmp_path):
    cases = discover_cases(cases_copy)
    seg = _case_files(cases[1], MODALITIES)["seg"]
    shutil.move(seg, tmp_path / seg.name)
    with pytest.raises(Exception, match=f"{cases[1].name}.*no segmentation"):
        _open(tmp_path / "store", cases, workers=2)


def test_cli_prepare_then_train_reuses_the_store(synthetic_cases, tmp_path, capsys):
    from napari_whatishealthy.cli import main

    store = tmp_path / "store"
    rc = main(["prepare", str(synthetic_cases), "--store", str(store), "--size", "16",
               "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "slices of 4 cases" in out and f"--store {store}" in out
    built = (store / INDEX_FILE).stat().st_mtime_ns
    rc = main(["train", str(synthetic_cases), "--out", str(tmp_path / "run"), "--store",
               str(store), "--size", "16", "--steps", "1", "--batch", "2", "--channels", "8,16",
               "--attention", "0,1", "--amp", "off", "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "building" not in out
    assert (store / INDEX_FILE).stat().st_mtime_ns == built
    assert not (tmp_path / "run" / "slice_store").exists()
    rc = main(["prepare", str(synthetic_cases), "--store", str(store), "--size", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and "image_size: store 16, this run 32" in err and "--rebuild-store" in err
