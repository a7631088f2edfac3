"""Every `whatishealthy` subcommand on tiny data, and its errors: one line, exit 2, no files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_checkpoint, tiny_spec

from napari_whatishealthy import cli
from napari_whatishealthy.core import registry
from napari_whatishealthy.core.errors import WhatIsHealthyError
from napari_whatishealthy.core.model import load_checkpoint

OUTPUT_SUFFIXES = ("_healthy.nii.gz", "_difference.nii.gz", "_mask.nii.gz", "_provenance.json")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, command: str, match: str = "") -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"whatishealthy {command}: error: "), err
    assert "Traceback" not in err
    assert match in lines[0], err


def outputs_of(case: str, out: Path) -> list[Path]:
    return [out / f"{case}{s}" for s in OUTPUT_SUFFIXES]


# --------------------------------------------------------------------------------------------
# synth and train


def test_synth_writes_cases_and_refuses_to_overwrite(capsys, tmp_path):
    out = tmp_path / "synth"
    rc, stdout, _ = run(capsys, "synth", out, "--cases", 2, "--seed", 5, "--voxel-size", 6,
                        "--healthy-fraction", 0.5)
    assert rc == 0 and "wrote 2 cases" in stdout
    manifest = json.loads((out / "cases.json").read_text())
    assert sorted(c["kind"] for c in manifest["cases"]) == ["healthy", "typical"]
    for case in manifest["cases"]:
        names = sorted(p.name for p in (out / case["name"]).iterdir())
        assert names == [f"{case['name']}_{m}.nii.gz" for m in
                         ("flair", "seg", "t1", "t1ce", "t2")]
    rc, _, err = run(capsys, "synth", out, "--cases", 2, "--seed", 5, "--voxel-size", 6)
    assert_one_line_error(rc, err, "synth", "already exists")
    rc, _, err = run(capsys, "synth", out, "--cases", 0)
    assert_one_line_error(rc, err, "synth", "--cases")


def test_train_writes_a_loadable_checkpoint_usable_by_localize(capsys, synthetic_cases,
                                                               case_dirs, tmp_path):
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", synthetic_cases, "--out", out, "--size", 16, "--steps", 3,
                     "--batch", 4, "--channels", "8,16", "--attention", "0,1", "--log-every", 1,
                     "--amp", "off", "--no-progress")
    assert rc == 0, err
    model = load_checkpoint(out / "checkpoint")
    assert model.spec.training["steps"] == 3
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    rc, _, err = run(capsys, "train", synthetic_cases, "--out", out, "--size", 16, "--steps", 3)
    assert_one_line_error(rc, err, "train", "--resume")
    # The training folder itself is accepted as --model.
    rc, _, err = run(capsys, "localize", case_dirs[0], "--out", tmp_path / "loc", "--model", out,
                     "--steps", 1, "--no-progress")
    assert rc == 0, err


def test_train_init_from_continues_from_the_given_weights(capsys, synthetic_cases, tmp_path):
    from safetensors.torch import load_file

    tiny = ["--size", 16, "--batch", 4, "--channels", "8,16", "--attention", "0,1", "--amp", "off",
            "--no-progress", "--log-every", 1]
    # (seed 1: other random initial weights than the runs below)
    rc, _, err = run(capsys, "train", synthetic_cases, "--out", tmp_path / "a", "--steps", 3,
                     "--seed", 1, *tiny)
    assert rc == 0, err
    start = tmp_path / "a" / "checkpoint"
    # With a negligible lr the weights cannot move: the result is the starting model ...
    rc, _, err = run(capsys, "train", synthetic_cases, "--out", tmp_path / "b", "--steps", 2,
                     "--lr", 1e-12, "--init-from", start, *tiny)
    assert rc == 0, err
    a, b = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)
    record = load_checkpoint(tmp_path / "b" / "checkpoint").spec.training
    assert record["init_from"]["steps"] == 3 and record["total_steps"] == 5
    # ... while the same run without --init-from starts from random weights.
    rc, _, err = run(capsys, "train", synthetic_cases, "--out", tmp_path / "c", "--steps", 2,
                     "--lr", 1e-12, *tiny)
    assert rc == 0, err
    c = load_file(str(tmp_path / "c" / "checkpoint" / "model.safetensors"))
    assert not all(torch.allclose(a[k], c[k], rtol=0, atol=1e-3) for k in a)


def test_train_init_from_a_model_that_does_not_fit_says_what_differs(capsys, synthetic_cases,
                                                                     tmp_path):
    rc, _, err = run(capsys, "train", synthetic_cases, "--out", tmp_path / "x", "--steps", 1,
                     "--init-from", "flair", "--size", 16, "--no-progress")
    assert_one_line_error(rc, err, "train", "modalities flair (this run: flair,t1,t1ce,t2)")
    assert "size 64 (this run: 16)" in err
    rc, _, err = run(capsys, "train", synthetic_cases, "--out", tmp_path / "y", "--steps", 1,
                     "--init-from", tmp_path / "nothing", "--no-progress")
    assert_one_line_error(rc, err, "train", "no such model")


# --------------------------------------------------------------------------------------------
# localize


def test_localize_over_several_noise_levels_writes_the_uncertainty(capsys, tiny_checkpoint,
                                                                    case_dirs, tmp_path):
    case = case_dirs[0]
    out = tmp_path / "out"
    rc, _, err = run(capsys, "localize", case, "--out", out, "--model", tiny_checkpoint,
                     "--noise-levels", "0.2,0.3", "--no-progress")
    assert rc == 0, err
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([p.name for p in outputs_of(case.name, out)]
                             + [f"{case.name}_uncertainty.nii.gz"])
    prov = json.loads((out / f"{case.name}_provenance.json").read_text())
    assert prov["settings"]["noise_levels"] == [0.2, 0.3]
    assert "uncertainty" in prov["output_sha256"]
    rc, _, err = run(capsys, "localize", case, "--out", tmp_path / "x", "--model",
                     tiny_checkpoint, "--noise-levels", "0.2,abc")
    assert rc == 2 and "--noise-levels" in err


def test_localize_lesion_contrast_option_reaches_the_run(capsys, tiny_checkpoint, case_dirs,
                                                          tmp_path):
    case = case_dirs[0]
    sums = {}
    for choice in ("any", "expected"):
        out = tmp_path / choice
        rc, _, err = run(capsys, "localize", case, "--out", out, "--model", tiny_checkpoint,
                         "--lesion-contrast", choice, "--no-progress")
        assert rc == 0, err
        prov = json.loads((out / f"{case.name}_provenance.json").read_text())
        assert prov["settings"]["lesion_contrast"] == choice
        sums[choice] = float(np.asarray(nib.load(out / f"{case.name}_difference.nii.gz")
                                        .dataobj).sum())
    assert 0 < sums["expected"] < sums["any"]  # one direction of the change per modality
    rc, _, err = run(capsys, "localize", case, "--out", tmp_path / "x", "--model",
                     tiny_checkpoint, "--lesion-contrast", "brighter")
    assert rc == 2 and "--lesion-contrast" in err


def test_localize_a_case_folder(capsys, tiny_checkpoint, case_dirs, tmp_path):
    case = case_dirs[0]
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "localize", case, "--out", out, "--model", tiny_checkpoint,
                          "--threshold", "0.01", "--seed", 3)
    assert rc == 0, err
    assert "flagged at threshold 0.01" in stdout
    assert sorted(out.iterdir()) == sorted(outputs_of(case.name, out))
    flair = nib.load(str(case / f"{case.name}_flair.nii.gz"))
    mask = nib.load(str(out / f"{case.name}_mask.nii.gz"))
    assert mask.get_data_dtype() == np.uint8
    assert mask.shape == flair.shape and np.array_equal(mask.affine, flair.affine)
    healthy = nib.load(str(out / f"{case.name}_healthy.nii.gz"))
    assert healthy.get_data_dtype() == np.float32 and healthy.shape == flair.shape
    prov = json.loads((out / f"{case.name}_provenance.json").read_text())
    assert prov["settings"]["threshold"] == 0.01 and prov["settings"]["seed"] == 3
    assert prov["model"]["path"] == str(tiny_checkpoint.resolve())
    assert len(prov["model"]["sha256"]) == 64

    before = {p: p.read_bytes() for p in out.iterdir()}
    rc, _, err = run(capsys, "localize", case, "--out", out, "--model", tiny_checkpoint)
    assert_one_line_error(rc, err, "localize", "already exists")
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    rc, _, err = run(capsys, "localize", case, "--out", out, "--model", tiny_checkpoint,
                     "--overwrite", "--all-channels", "--no-progress")
    assert rc == 0, err
    assert (out / f"{case.name}_healthy_t1ce.nii.gz").exists()


def test_localize_several_inputs(capsys, tiny_checkpoint, synthetic_cases, case_dirs, tmp_path):
    out = tmp_path / "all"
    rc, stdout, err = run(capsys, "localize", synthetic_cases, "--out", out, "--model",
                          tiny_checkpoint, "--no-progress")
    assert rc == 0, err
    for case in case_dirs:
        assert all(p.exists() for p in outputs_of(case.name, out))
    assert len(stdout.strip().splitlines()) == len(case_dirs)
    # NIfTI files of one case are grouped into that case; two cases from loose files.
    files = [case_dirs[1] / f"{case_dirs[1].name}_{m}.nii.gz" for m in ("t2", "flair", "t1",
                                                                           "t1ce")]
    out2 = tmp_path / "files"
    rc, stdout, err = run(capsys, "localize", *files, case_dirs[2], "--out", out2, "--model",
                          tiny_checkpoint, "--no-progress")
    assert rc == 0, err
    assert sorted(p.name for p in out2.glob("*_mask.nii.gz")) == [
        f"{case_dirs[1].name}_mask.nii.gz", f"{case_dirs[2].name}_mask.nii.gz"]


def test_localize_unnamed_single_file_with_modality(capsys, case_dirs, tmp_path):
    one_channel = make_checkpoint(tmp_path / "flair-only",
                                  spec=tiny_spec(modalities=("flair",)))
    four_channel = make_checkpoint(tmp_path / "four")
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(case_dirs[0] / f"{case_dirs[0].name}_flair.nii.gz", scan)
    rc, _, err = run(capsys, "localize", scan, "--out", tmp_path / "o1", "--model", four_channel)
    assert_one_line_error(rc, err, "localize", "modality")
    rc, _, err = run(capsys, "localize", scan, "--out", tmp_path / "o1", "--model", four_channel,
                     "--modality", "flair")
    assert_one_line_error(rc, err, "localize", "(missing t1, t1ce, t2)")
    assert not (tmp_path / "o1").exists()
    # Even a one-channel model does not guess the modality of an unnamed file.
    rc, _, err = run(capsys, "localize", scan, "--out", tmp_path / "o1", "--model", one_channel)
    assert_one_line_error(rc, err, "localize", "--modality flair")
    out = tmp_path / "o2"
    rc, stdout, err = run(capsys, "localize", scan, "--out", out, "--model", one_channel,
                          "--no-progress", "--modality", "FLAIR")
    assert rc == 0, err
    assert (out / "scan_mask.nii.gz").exists()
    assert "by model tiny-test (chosen by you)" in stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["MISSING"], "no such file"),
        (["CASE", "--model", "/nonexistent/model"], "no such model"),
        (["CASE", "--threshold", "abc"], "threshold"),
        (["CASE", "--noise", "2"], "noise level"),
        (["CASE", "--steps", "0"], "steps"),
        (["CASE", "--device", "quantum"], "device"),
        (["CASE", "--guidance", "x"], "invalid float"),
        (["NOTNIFTI"], "not a NIfTI file name"),
        (["BROKEN"], "not a readable NIfTI"),
    ],
)
def test_localize_errors_are_one_line(capsys, tiny_checkpoint, case_dirs, tmp_path, args, match):
    notnifti = tmp_path / "notes.txt"
    notnifti.write_text("hello")
    broken = tmp_path / "broken_flair.nii.gz"
    broken.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    subst = {"MISSING": str(tmp_path / "missing"), "CASE": str(case_dirs[0]),
             "NOTNIFTI": str(notnifti), "BROKEN": str(broken)}
    argv = [subst.get(a, a) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(tiny_checkpoint)]
    out = tmp_path / "out"
    if args[0] == "BROKEN":  # a single-channel model, so that loading is what fails
        argv[argv.index("--model") + 1] = str(
            make_checkpoint(tmp_path / "flair-only", spec=tiny_spec(modalities=("flair",))))
    rc, _, err = run(capsys, "localize", *argv, "--out", out)
    assert_one_line_error(rc, err, "localize", match)
    assert not out.exists() or not any(out.iterdir())


def test_localize_refuses_to_write_into_the_case_folder(capsys, tiny_checkpoint, cases_copy):
    case = sorted(p for p in cases_copy.iterdir() if p.is_dir())[0]
    before = sorted(case.iterdir())
    rc, _, err = run(capsys, "localize", case, "--out", case, "--model", tiny_checkpoint)
    assert_one_line_error(rc, err, "localize", "holds the input files")
    assert sorted(case.iterdir()) == before


def test_a_bad_second_case_leaves_no_partial_files(capsys, tiny_checkpoint, cases_copy,
                                                   tmp_path):
    cases = sorted(p for p in cases_copy.iterdir() if p.is_dir())
    t1 = cases[1] / f"{cases[1].name}_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:200])  # truncated gzip
    out = tmp_path / "out"
    rc, _, err = run(capsys, "localize", cases[0], cases[1], "--out", out, "--model",
                     tiny_checkpoint, "--no-progress")
    assert_one_line_error(rc, err, "localize", t1.name)
    assert sorted(out.iterdir()) == sorted(outputs_of(cases[0].name, out))  # whole files only


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "napari_whatishealthy.cli", "localize", str(tmp_path / "nope"),
         "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"whatishealthy localize: error: {tmp_path / 'nope'}: no such file or folder"]
    proc = subprocess.run([sys.executable, "-m", "napari_whatishealthy.cli", "localize"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "required" in proc.stderr


# --------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_json(capsys, tiny_checkpoint, synthetic_cases, case_dirs, tmp_path):
    report_path = tmp_path / "report.json"
    rc, stdout, err = run(capsys, "evaluate", synthetic_cases, "--model", tiny_checkpoint,
                          "--json", report_path, "--no-progress")
    assert rc == 0, err
    assert "flair_baseline" in stdout and "optimistic (oracle)" in stdout
    report = json.loads(report_path.read_text())
    assert len(report["cases"]) == len(case_dirs)
    assert report["model"]["sha256"] and report["calibration"] is None
    for method in ("counterfactual", "flair_baseline"):
        thresholds = report["thresholds"][method]
        assert set(thresholds) == {"default", "calibrated", "oracle"}
        assert "oracle" in thresholds["oracle"]["label"]
        assert "EVALUATED" in thresholds["calibrated"]["label"]
        pooled = report["pooled"][method]
        assert {"all", "typical", "subtle", "healthy"} <= set(pooled)
        assert 0 <= pooled["all"]["auroc"] <= 1 and 0 <= pooled["all"]["auprc"] <= 1
        assert set(pooled["all"]["dice"]) == {"default", "calibrated", "oracle"}
        assert pooled["healthy"]["dice"]["default"] is None  # no lesion: no Dice
        assert report["healthy_controls"]["flagged_fraction"][method]["default"] is not None
    assert report["thresholds"]["counterfactual"]["default"]["value"] == \
        tiny_spec().inference.threshold
    # The oracle threshold is the best of the three on the evaluated set (before components).
    for case in report["cases"]:
        assert case["kind"] in ("typical", "subtle", "healthy")
    # The baseline table (printed by default): the model beside the FLAIR baseline, one row per
    # kind of case and one per case, best-threshold columns labelled as such.
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert "FLAIR Dice (best threshold)" in table[0] and "model Dice (best threshold)" in table[0]
    names = [line.split("|")[1].strip() for line in table[1:]]
    assert names[: len(report["pooled"]["counterfactual"])] == [
        f"{g} ({v['cases']})" for g, v in report["pooled"]["counterfactual"].items()]
    assert names[len(report["pooled"]["counterfactual"]):] == [c["name"] for c in report["cases"]]
    assert "best threshold = the one threshold of best pooled Dice" in stdout
    # Predicted / true volume: the default mask's voxels over the lesion's, per case and pooled.
    lesion_cases = [c for c in report["cases"] if c["lesion_voxels"]]
    for case in lesion_cases:
        entry = case["counterfactual"]
        expected = entry["flagged_fraction"]["default"] * case["brain_voxels"] / case["lesion_voxels"]
        assert entry["volume_ratio"]["default"] == pytest.approx(expected)
    pooled = report["pooled"]["counterfactual"]["all"]
    predicted = sum(c["counterfactual"]["volume_ratio"]["default"] * c["lesion_voxels"]
                    for c in lesion_cases)
    assert pooled["volume_ratio"]["default"] == pytest.approx(predicted / pooled["lesion_voxels"])
    rc, stdout, err = run(capsys, "evaluate", synthetic_cases, "--model", tiny_checkpoint,
                          "--baseline", "none", "--no-progress", "--cases", 1)
    assert rc == 0 and "FLAIR Dice (best threshold)" not in stdout
    rc, _, err = run(capsys, "evaluate", synthetic_cases, "--model", tiny_checkpoint, "--json",
                     report_path)
    assert_one_line_error(rc, err, "evaluate", "already exists")


def test_evaluate_with_a_calibration_set(capsys, tiny_checkpoint, synthetic_cases, tmp_path):
    calib = tmp_path / "calib"
    cases = sorted(p for p in synthetic_cases.iterdir() if p.is_dir())
    for case in cases[:2]:
        shutil.copytree(case, calib / case.name)
    report_path = tmp_path / "r.json"
    rc, _, err = run(capsys, "evaluate", synthetic_cases, "--model", tiny_checkpoint,
                     "--calibration", calib, "--cases", 3, "--json", report_path,
                     "--no-progress")
    assert rc == 0, err
    report = json.loads(report_path.read_text())
    assert len(report["cases"]) == 3
    assert "calibration set" in report["thresholds"]["counterfactual"]["calibrated"]["label"]
    rc, _, err = run(capsys, "evaluate", synthetic_cases, "--model", tiny_checkpoint,
                     "--calibration", synthetic_cases)
    assert_one_line_error(rc, err, "evaluate", "calibration set is the evaluated set")
    rc, _, err = run(capsys, "evaluate", tmp_path / "nowhere", "--model", tiny_checkpoint)
    assert_one_line_error(rc, err, "evaluate", "no such folder")


def test_evaluate_every_kth_slice_scores_the_same_voxels(capsys, tiny_checkpoint, case_dirs,
                                                         synthetic_cases, tmp_path):
    from napari_whatishealthy.core.evaluate import score_case
    from napari_whatishealthy.core.pipeline import LocalizeSettings, prepare_input
    from napari_whatishealthy.core.registry import load_model_cached
    from napari_whatishealthy.core.volume import load_volume

    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    volume = load_volume(case_dirs[0])
    settings = LocalizeSettings.from_spec(spec, device="cpu")
    every = score_case(volume, model, spec, settings)
    half = score_case(volume, model, spec, settings, z_stride=2)
    kept = prepare_input(volume.select(spec.modalities).data, spec).slice_index[::2]
    brain_z = np.zeros(volume.shape, bool)
    brain_z[..., kept] = True
    full_brain = np.zeros(volume.shape, bool)
    full_brain[every.box] = every.brain
    assert half.brain.sum() == (full_brain & brain_z).sum() < every.brain.sum()
    # The same voxels get the same scores (each slice's counterfactual is independent).
    in_half = brain_z[every.box][every.brain]
    np.testing.assert_allclose(half.scores["counterfactual"], every.scores["counterfactual"][in_half],
                               atol=1e-4)
    with pytest.raises(WhatIsHealthyError, match="stride"):
        score_case(volume, model, spec, settings, z_stride=0)
    report_path = tmp_path / "r.json"
    rc, _, err = run(capsys, "evaluate", synthetic_cases, "--model", tiny_checkpoint, "--cases", 2,
                     "--z-stride", 3, "--json", report_path, "--no-progress")
    assert rc == 0, err
    assert json.loads(report_path.read_text())["z_stride"] == 3
    rc, _, err = run(capsys, "evaluate", synthetic_cases, "--model", tiny_checkpoint,
                     "--z-stride", 0)
    assert_one_line_error(rc, err, "evaluate", "--z-stride must be at least 1")


# --------------------------------------------------------------------------------------------
# demo


def test_demo_headless(capsys, tiny_checkpoint, case_dirs, tmp_path):
    out = tmp_path / "demo"
    for _ in range(2):  # a second run replaces the demo's own outputs
        rc, stdout, err = run(capsys, "demo", "--headless", "--out", out, "--model",
                              tiny_checkpoint, "--sample", case_dirs[0], "--no-progress")
        assert rc == 0, err
    figure = out / f"{case_dirs[0].name}_figure.png"
    assert figure.exists() and str(figure) in stdout
    from PIL import Image

    with Image.open(figure) as img:
        assert img.format == "PNG" and img.width > 5 * 100 and img.height > 3 * 100
    assert all(p.exists() for p in outputs_of(case_dirs[0].name, out))


def test_demo_without_bundled_model_fails_clearly(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "MODELS_DIR", tmp_path / "no-models")
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "demo", "--headless", "--out", tmp_path / "demo")
    assert_one_line_error(rc, err, "demo", "default model is not bundled")
    assert not (tmp_path / "demo").exists()


@pytest.mark.gui
@pytest.mark.skipif(
    not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
         or os.environ.get("QT_QPA_PLATFORM")),
    reason="needs a display (run under xvfb-run, as `make test` does)",
)
def test_demo_opens_napari_with_the_sample_and_the_widget(monkeypatch, tiny_checkpoint):
    napari = pytest.importorskip("napari")
    viewers = []
    real_viewer = napari.Viewer

    def hidden_viewer(*args, **kwargs):
        viewers.append(real_viewer(*args, show=False, **kwargs))
        return viewers[-1]

    monkeypatch.setattr(napari, "Viewer", hidden_viewer)
    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    try:
        assert cli.main(["demo", "--model", str(tiny_checkpoint)]) == 0
        viewer = viewers[0]
        names = [layer.name for layer in viewer.layers]
        assert any("flair" in n.lower() for n in names), names
        docks = viewer.window.dock_widgets
        # Docked as the Plugins menu docks it (the manifest's widget, under napari's name).
        from napari_whatishealthy._widget import LocalizeWidget

        assert any(isinstance(w, LocalizeWidget) for w in docks.values()), list(docks)
    finally:
        for viewer in viewers:
            viewer.close()
