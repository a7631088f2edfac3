"""Nothing lost, ever (issue 17): output sets as one unit, inputs protected on every writing path,
signals and concurrent runs. Signals and concurrency run in real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_whatishealthy import cli
from napari_whatishealthy.core.errors import InputError
from napari_whatishealthy.core.output import (
    OutputSet,
    check_folder,
    check_target,
    clean_stale_temps,
    sha256_file,
    write_json,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def _default_sigint() -> None:
    """In the child: SIGINT as in a terminal. A shell runs background jobs with SIGINT ignored,
    and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".wih-" in p.name or p.name.endswith(".lock"))


def _set_is_whole(out: Path, case: str) -> bool:
    """Every output the provenance lists exists with the content it recorded."""
    prov = out / f"{case}_provenance.json"
    record = json.loads(prov.read_text())
    for key, digest in record["output_sha256"].items():
        path = Path(record["outputs"][key])
        if not path.exists() or sha256_file(path) != digest:
            return False
    return True


# ------------------------------------------------------------------------------------------------
# Sets: all or nothing, in order, under a lock


def _write_set(folder: Path, tag: str, overwrite: bool) -> list[Path]:
    with OutputSet(overwrite=overwrite) as outputs:
        for name in ("a.txt", "b.txt", "c.txt", "provenance.json"):
            outputs.stage(folder / name, lambda tmp: Path(tmp).write_text(tag))
        return outputs.commit()


def test_a_set_appears_whole_and_a_failure_leaves_the_previous_set(tmp_path):
    _write_set(tmp_path, "old", overwrite=False)
    with pytest.raises(RuntimeError), OutputSet(overwrite=True) as outputs:
        outputs.stage(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("new"))
        outputs.stage(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("new"))
        raise RuntimeError("the third output failed")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "a.txt": "old", "b.txt": "old", "c.txt": "old", "provenance.json": "old"}


def test_a_failed_rename_restores_the_files_already_replaced(tmp_path, monkeypatch):
    _write_set(tmp_path, "old", overwrite=False)
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        _write_set(tmp_path, "new", overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "a.txt": "old", "b.txt": "old", "c.txt": "old", "provenance.json": "old"}


_CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from napari_whatishealthy.core.output import OutputSet
    from napari_whatishealthy.core.errors import InputError
    folder, tag, overwrite, start = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
    while time.time() < start:
        time.sleep(0.001)
    try:
        with OutputSet(overwrite=overwrite) as out:
            for name in ("a.nii.gz", "b.nii.gz", "mask.nii.gz", "provenance.json"):
                out.stage(folder / name, lambda tmp: Path(tmp).write_text(tag * 2000))
            out.commit()
    except InputError as exc:
        print(exc)
        sys.exit(2)
""")


@pytest.mark.parametrize("overwrite", [False, True], ids=["refuse", "overwrite"])
def test_concurrent_writers_never_leave_a_mixed_or_missing_set(tmp_path, overwrite):
    """Defect 1: a concurrent run deleted the other run's outputs."""
    script = tmp_path / "writer.py"
    script.write_text(_CONCURRENT)
    for trial in range(2):
        folder = tmp_path / f"t{trial}"
        start = time.time() + 1.0
        procs = [subprocess.Popen([sys.executable, str(script), str(folder), tag, str(int(overwrite)),
                                   str(start)], env=_env(), stdout=subprocess.PIPE, text=True)
                 for tag in "ABCDEF"]
        codes = [p.wait(timeout=60) for p in procs]
        contents = {p.read_text() for p in folder.iterdir()}
        assert sorted(p.name for p in folder.iterdir()) == [
            "a.nii.gz", "b.nii.gz", "mask.nii.gz", "provenance.json"]  # no temp, no lock left
        assert len(contents) == 1  # all four from one writer
        winner = next(iter(contents))[0]
        if overwrite:
            assert codes == [0] * 6
        else:  # one wins, the others refuse, and the winner's files are there
            assert sorted(codes) == [0] + [2] * 5
            assert codes["ABCDEF".index(winner)] == 0


def test_stale_temporary_files_are_removed_but_a_live_runs_are_not(tmp_path):
    stale = tmp_path / ".case_mask.nii.gz.0123abcd.wih-tmp.nii.gz"
    stale.write_bytes(b"half a file")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    live = tmp_path / ".case_healthy.nii.gz.89abcdef.wih-tmp.nii.gz"
    live.write_bytes(b"being written")
    os.utime(live, (time.time() - 60, time.time() - 60))
    user = tmp_path / ".case_notes.txt"  # not ours: never touched
    user.write_text("mine")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(live)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        write_json({"x": 1}, tmp_path / "next.json")  # the next run into the folder
        assert not stale.exists()
        assert live.exists() and user.exists()
    finally:
        holder.kill()
        holder.wait()
    assert clean_stale_temps(tmp_path) == [live]  # its run is gone now


# ------------------------------------------------------------------------------------------------
# Signals, in a real CLI process


_SIGNAL_RUN = textwrap.dedent("""
    import os, signal, sys
    import nibabel as nib
    from napari_whatishealthy import cli
    sig, when = getattr(signal, sys.argv[1]), sys.argv[2]
    if when == "writing":  # the signal arrives while the second output is written
        real, calls = nib.save, []
        def save(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), sig)
            return real(*a, **k)
        nib.save = save
    else:  # ... or in the middle of the renames
        real, calls = os.replace, []
        def replace(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), sig)
            return real(*a, **k)
        os.replace = replace
    sys.exit(cli.main(sys.argv[3:]))
""")


@pytest.mark.parametrize(("sig", "when"), [("SIGTERM", "writing"), ("SIGINT", "renaming")])
def test_a_signal_leaves_one_whole_set_and_no_temporary_file(tmp_path, tiny_checkpoint, case_dirs,
                                                           sig, when):
    """Defects 3 and 6: Ctrl-C or SIGTERM while an --overwrite run writes its outputs."""
    out = tmp_path / "out"
    case = case_dirs[0]
    args = ["localize", str(case), "--out", str(out), "--model", str(tiny_checkpoint),
            "--no-progress"]
    assert cli.main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = tmp_path / "run.py"
    script.write_text(_SIGNAL_RUN)
    proc = subprocess.run([sys.executable, str(script), sig, when, *args, "--overwrite",
                           "--seed", "5"], env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_default_sigint)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == (143 if sig == "SIGTERM" else 130), proc.stderr
    assert ("terminated" if sig == "SIGTERM" else "interrupted") in proc.stderr
    assert _temps(out) == []
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys()
    if when == "writing":
        assert after == before  # the previous set, untouched
    else:  # the renames were not cut in half: the new set, whole
        assert after != before
    assert _set_is_whole(out, case.name)


# ------------------------------------------------------------------------------------------------
# Inputs protected on every writing path


def test_evaluate_json_never_replaces_an_input(capsys, tiny_checkpoint, cases_copy):
    """Defect 2: ``evaluate DATA --json DATA/Case/Case_flair.nii.gz --overwrite``."""
    case = sorted(p for p in cases_copy.iterdir() if p.is_dir())[0]
    flair = case / f"{case.name}_flair.nii.gz"
    link = cases_copy.parent / "report.json"
    link.symlink_to(flair)
    weights = tiny_checkpoint / "model.safetensors"
    before = {p: p.read_bytes() for p in (flair, weights)}
    for target in (flair, link, weights):
        code = cli.main(["evaluate", str(cases_copy), "--json", str(target), "--overwrite",
                         "--model", str(tiny_checkpoint), "--no-progress"])
        assert code == 2
        assert "refusing to overwrite an input file" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before


def test_localize_never_writes_over_the_model_or_through_a_link(capsys, tiny_checkpoint, cases_copy,
                                                               tmp_path):
    case = sorted(p for p in cases_copy.iterdir() if p.is_dir())[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{case.name}_mask.nii.gz").symlink_to(case / f"{case.name}_flair.nii.gz")
    code = cli.main(["localize", str(case), "--out", str(out), "--overwrite",
                     "--model", str(tiny_checkpoint), "--no-progress"])
    assert code == 2
    assert "mask.nii.gz: refusing to overwrite an input file" in capsys.readouterr().err


def test_another_runs_commit_backup_is_not_a_user_hard_link(tmp_path):
    """A run replacing a file keeps a ``.wih-old`` link to it for the milliseconds of its
    commit; a concurrent run checking the same target then must not refuse it as hard-linked
    (a six-writer --overwrite race exited 2 that way), while a user's second name still is."""
    from napari_whatishealthy.core.output import _temp_name

    target = tmp_path / "case_mask.nii.gz"
    target.write_text("an earlier result")
    backup = tmp_path / _temp_name(target, "old")
    os.link(target, backup)
    assert check_target(target, overwrite=True) == target
    os.link(target, tmp_path / "elsewhere.nii.gz")
    with pytest.raises(InputError, match="has 2 hard links"):  # the backup is not counted
        check_target(target, overwrite=True)


def test_checks_before_computing(tmp_path):
    """Defect 9: names too long, hard-linked outputs, unwritable folders: refused at once."""
    with pytest.raises(InputError, match="more than the 255"):
        check_target(tmp_path / ("x" * 250 + "_mask.nii.gz"))
    target = tmp_path / "case_mask.nii.gz"
    target.write_text("an earlier result")
    os.link(target, tmp_path / "elsewhere.nii.gz")
    with pytest.raises(InputError, match="has 2 hard links"):
        check_target(target, overwrite=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputError, match="is a file"):
        check_folder(blocker / "out")
    with pytest.raises(InputError, match="MiB free, the outputs need"):
        check_folder(tmp_path, need_bytes=2**62)


def test_localize_refuses_before_any_network_call(capsys, tiny_checkpoint, case_dirs, tmp_path,
                                                  monkeypatch):
    from napari_whatishealthy.core import pipeline

    def never(*args, **kwargs):
        raise AssertionError("the network ran before the refusal")

    monkeypatch.setattr(pipeline, "iter_localize", never)
    out = tmp_path / "out"
    out.mkdir()
    name = case_dirs[0].name
    (out / f"{name}_mask.nii.gz").write_text("x")
    os.link(out / f"{name}_mask.nii.gz", tmp_path / "other.nii.gz")
    base = ["localize", str(case_dirs[0]), "--model", str(tiny_checkpoint), "--no-progress"]
    assert cli.main([*base, "--out", str(out), "--overwrite"]) == 2
    assert "hard links" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main([*base, "--out", str(blocker / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_outputs_record_their_hashes_and_have_normal_modes(capsys, tiny_checkpoint, case_dirs,
                                                           tmp_path):
    """Defect 10: the provenance was written 0600."""
    out = tmp_path / "out"
    assert cli.main(["localize", str(case_dirs[0]), "--out", str(out), "--model",
                     str(tiny_checkpoint), "--no-progress"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert _set_is_whole(out, case_dirs[0].name)


def test_train_out_inside_the_data_folder_is_refused(capsys, cases_copy):
    code = cli.main(["train", str(cases_copy), "--out", str(cases_copy / "run"), "--steps", "1"])
    assert code == 2
    assert "is inside the input folder" in capsys.readouterr().err
    assert not (cases_copy / "run").exists()


def test_napari_writer_refuses_empty_layers_and_degenerate_scales(tmp_path):
    from napari_whatishealthy._layers import write_mask

    with pytest.raises(InputError, match="non-empty 3D"):
        write_mask(tmp_path / "empty.nii.gz", np.zeros((0, 0, 0), np.uint8), {})
    for scale in [(0, 1, 1), (np.nan, 1, 1)]:
        with pytest.raises(InputError, match="scale or transform is zero or not a number"):
            write_mask(tmp_path / "m.nii.gz", np.ones((2, 3, 4), np.uint8), {"scale": scale})
    garbage = {"metadata": {"source_affine": "not a matrix", "source_header": b"\x00" * 3}}
    with pytest.raises(InputError, match="source metadata is not usable|source affine"):
        write_mask(tmp_path / "m.nii.gz", np.ones((2, 3, 4), np.uint8), garbage)
    assert list(tmp_path.iterdir()) == []
