"""No silent garbage, no tracebacks (issue 17, defects 4, 5, 7, 8): absurd settings, untrusted
model files and lying headers are refused with one line, before any computing."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_checkpoint

from napari_whatishealthy import cli
from napari_whatishealthy.core.errors import WhatIsHealthyError
from napari_whatishealthy.core.model import load_checkpoint, save_checkpoint
from napari_whatishealthy.core.pipeline import LocalizeSettings, localize
from napari_whatishealthy.core.volume import load_volume


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Defect 4: silent all-NaN results


def test_weights_with_nan_are_refused_before_running(tiny_checkpoint, case_dirs, tmp_path):
    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_checkpoint, folder)
    model = load_checkpoint(folder)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_checkpoint(model, folder)
    model = load_checkpoint(folder)
    spec = model.spec
    volume = load_volume(case_dirs[0]).select(spec.modalities)
    with pytest.raises(WhatIsHealthyError, match="NaN or infinite weights"):
        localize(model, spec, volume.data, model_path=folder)


def test_an_overflowing_counterfactual_stops_with_the_cause(tmp_path, case_dirs):
    """Finite weights that overflow (as w = 1e308 did): the run stops, no empty mask."""
    folder = make_checkpoint(tmp_path / "huge")
    model = load_checkpoint(folder)
    spec = model.spec
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1e20)
    volume = load_volume(case_dirs[0]).select(spec.modalities)
    settings = LocalizeSettings.from_spec(spec, amp=False)
    with pytest.raises(WhatIsHealthyError, match="NaN or infinite values: the settings overflow"):
        localize(model, spec, volume.data, settings)


@pytest.mark.parametrize(("args", "match"), [
    (["--guidance", "1e308"], "guidance must be a number in"),
    (["--guidance", "nan"], "guidance must be a number in"),
    (["--median-size", "100000"], "median_size must be an integer in"),
    (["--seed", str(2**70)], "seed must be an integer in"),
    (["--seed", "-1"], "seed must be an integer in"),
    (["--steps", "100000"], "steps must be an integer in"),
    (["--batch-size", "10000000"], "batch_size must be an integer in"),
])
def test_absurd_localize_settings_are_one_line_errors(capsys, tiny_checkpoint, case_dirs, tmp_path,
                                                     args, match):
    code = cli.main(["localize", str(case_dirs[0]), "--out", str(tmp_path / "o"), "--model",
                     str(tiny_checkpoint), "--no-progress", *args])
    assert match in _one_line_error(capsys, code)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize(("args", "match"), [
    (["--lr", "nan"], "--lr must be a number in [0, 1]"),
    (["--lr", "-1"], "--lr must be a number in [0, 1]"),
    (["--seed", str(2**70)], "seed must be an integer in"),
    (["--label-dropout", "2"], "--label-dropout must be in [0, 1]"),
])
def test_absurd_training_options_are_one_line_errors(capsys, synthetic_cases, tmp_path, args,
                                                    match):
    code = cli.main(["train", str(synthetic_cases), "--out", str(tmp_path / "run"), "--steps",
                     "1", *args])
    assert match in _one_line_error(capsys, code)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Defects 5 and 7: untrusted model files


def _edited(tiny_checkpoint, tmp_path, edit) -> str:
    folder = tmp_path / "edited"
    shutil.copytree(tiny_checkpoint, folder)
    spec = json.loads((folder / "spec.json").read_text())
    edit(spec)
    text = spec if isinstance(spec, str) else json.dumps(spec)
    (folder / "spec.json").write_text(text)
    return str(folder)


def _set(path: str, value):
    def edit(spec):
        *parents, last = path.split(".")
        for key in parents:
            spec = spec[key]
        spec[last] = value
    return edit


@pytest.mark.parametrize(("edit", "match"), [
    (_set("schedule.beta_schedule", "quadratic"), "beta_schedule must be one of"),
    (_set("network.channels", "8,16"), "network.channels must be a list"),
    (_set("network.channels", [8, 12]), "norm_num_groups 8 must divide"),
    (_set("network.channels", [4096, 4096, 4096]), "network.channels must be an integer in"),
    (lambda spec: spec["network"].update(channels=[1024] * 4, attention_levels=[False] * 4),
     "parameters, more than"),
    (_set("labels", {"healthy": 0, "unhealthy": 1}), "labels must name exactly"),
    (_set("labels", ["healthy", "unhealthy", "null"]), "labels must name exactly"),
    (_set("schedule.timestep_stride", 0), "timestep_stride must be an integer in"),
    (_set("image_size", 10**6), "image_size must be an integer in"),
    (_set("inference.guidance", 1e308), "guidance must be a number in"),
    (_set("inference.median_size", 100000), "median_size must be an integer in"),
    (_set("network", "deep"), "malformed"),
    (lambda spec: spec.update(description="[" * 100000 + "]" * 100000), None),
])
def test_malformed_spec_values_are_one_line_errors(capsys, tiny_checkpoint, case_dirs, tmp_path,
                                                   edit, match):
    folder = _edited(tiny_checkpoint, tmp_path, edit)
    if match is None:  # deep nesting: the spec file itself is nested 100000 levels
        (Path(folder) / "spec.json").write_text("[" * 100000 + "]" * 100000)
        match = "nested too deeply|must be a JSON object"
    code = cli.main(["localize", str(case_dirs[0]), "--out", str(tmp_path / "o"), "--model",
                     folder, "--no-progress"])
    line = _one_line_error(capsys, code)
    assert re.search(match, line), line


def test_weight_shapes_are_checked_before_the_network_is_built(tiny_checkpoint, tmp_path,
                                                              monkeypatch):
    """Defect 5: a spec whose network does not fit the weights never allocates it."""
    from napari_whatishealthy.core import model as model_mod
    from napari_whatishealthy.core.model import CheckpointError

    folder = _edited(tiny_checkpoint, tmp_path, _set("network.channels", [16, 32]))
    built = []
    real = model_mod.ConditionalUNet.__init__

    def spy(self, spec):
        built.append(next(iter(torch.empty(0).device.type for _ in [0])))
        real(self, spec)

    monkeypatch.setattr(model_mod.ConditionalUNet, "__init__", spy)
    with pytest.raises(CheckpointError, match=r"do not match the spec.*of another shape"):
        load_checkpoint(folder)
    assert built == ["meta"]  # only the shape check's meta-device build, no real one


@pytest.mark.parametrize("kind", ["pickle", "truncated"])
def test_resume_from_a_bad_state_is_one_line(capsys, synthetic_cases, tmp_path, kind):
    out = tmp_path / "run"
    out.mkdir()
    state = out / "train_state.pt"
    if kind == "pickle":
        import pickle

        state.write_bytes(pickle.dumps({"model": object()}))
    else:
        torch.save({"step": 1, "model": {}}, state)
        state.write_bytes(state.read_bytes()[:40])
    code = cli.main(["train", str(synthetic_cases), "--out", str(out), "--resume", "--steps", "1",
                     "--size", "16", "--channels", "8,16", "--attention", "0,1", "--batch", "2",
                     "--no-progress"])
    assert "not a training state this run can resume" in _one_line_error(capsys, code)


def test_a_volume_larger_than_the_memory_is_refused_with_the_estimate(capsys, tiny_checkpoint,
                                                                     case_dirs, tmp_path,
                                                                     monkeypatch):
    from napari_whatishealthy.core import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 2**20)
    code = cli.main(["localize", str(case_dirs[0]), "--out", str(tmp_path / "o"), "--model",
                     str(tiny_checkpoint), "--no-progress"])
    line = _one_line_error(capsys, code)
    assert "needs about" in line and "GiB are available" in line


# ------------------------------------------------------------------------------------------------
# Defect 8: lying headers


def _lying(path: Path, change) -> Path:
    """A valid NIfTI (int16, qform = sform), then its stored header edited by ``change``."""
    data = (np.arange(6 * 7 * 5).reshape(6, 7, 5) % 50 + 1).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_qform(img.affine, 1)
    img.header.set_sform(img.affine, 1)
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    change(header)
    raw[:348] = header.binaryblock
    path.write_bytes(bytes(raw))
    return path


def _shifted_qform(header):
    header.set_qform(np.array([[2, 0, 0, 10], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1.0]]), 1)


@pytest.mark.parametrize(("change", "match"), [
    (lambda h: h.__setitem__("vox_offset", 0), "vox_offset is 0, inside the 352-byte header"),
    (lambda h: h.set_data_dtype(np.float32), "file holds 772 bytes: it is truncated, or its dims"),
    (lambda h: h["dim"].__setitem__(3, 3), "it is longer than that: its dims or datatype"),
    (lambda h: h["pixdim"].__setitem__(2, 0), "voxel size \\(pixdim\\) is \\(2.0, 0.0, 2.0\\)"),
    (lambda h: h["dim"].__setitem__(0, 9), "dim\\[0\\] is 9, but a NIfTI image has 1 to 7"),
])
def test_lying_headers_are_refused(tmp_path, change, match):
    path = _lying(tmp_path / "case_flair.nii", change)
    with pytest.raises(WhatIsHealthyError, match=match):
        load_volume(path)


def test_qform_sform_disagreement_is_one_warning_line(capsys, tmp_path):
    from conftest import tiny_spec

    flair_model = make_checkpoint(tmp_path / "flair-model", spec=tiny_spec(modalities=("flair",)))
    (tmp_path / "in").mkdir()
    path = _lying(tmp_path / "in" / "case_flair.nii", _shifted_qform)
    volume = load_volume(path)
    assert len(volume.warnings) == 1 and "qform and sform disagree" in volume.warnings[0]
    code = cli.main(["localize", str(path), "--out", str(tmp_path / "o"), "--model",
                     str(flair_model), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if "qform" in line]
    assert len(lines) == 1 and lines[0].startswith("case: warning: ")
    assert "UserWarning" not in err


def test_one_file_cannot_be_two_modalities(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    flair = _lying(case / "case_flair.nii", lambda h: None)
    (case / "case_t1.nii").symlink_to(flair)
    with pytest.raises(WhatIsHealthyError, match="is the same file as .*one file cannot be two"):
        load_volume(case)
    (case / "case_t1.nii").unlink()
    os.link(flair, case / "case_t1.nii")  # a hard link: the same scan under two names
    with pytest.raises(WhatIsHealthyError, match="same file"):
        load_volume([flair, case / "case_t1.nii"])


def test_modality_option_that_contradicts_the_file_name_is_refused(capsys, tiny_checkpoint,
                                                                  case_dirs, tmp_path):
    flair = next(case_dirs[0].glob("*_flair.nii.gz"))
    code = cli.main(["localize", str(flair), "--modality", "t1", "--out", str(tmp_path / "o"),
                     "--model", str(tiny_checkpoint), "--no-progress"])
    assert "its name says flair, but --modality says t1" in _one_line_error(capsys, code)


def test_training_without_a_validation_case_says_so():
    """Defect 10: `train` with one case ran with no validation and no warning."""
    from napari_whatishealthy.core.trainer import split_cases

    said: list[str] = []
    train, val = split_cases(1, 0.2, 0, said.append)
    assert len(train) == 1 and len(val) == 0
    assert len(said) == 1 and "none for validation" in said[0]
    said.clear()
    split_cases(8, 0.2, 0, said.append)
    assert said == []
