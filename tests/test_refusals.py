"""No silent garbage, no tracebacks (issue 17, defects 4, 5, 7, 8): absurd settings, untrusted
model files and lying headers are refused with one line, before any computing."""

from __future__ import annotations

import shutil

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
    (["--lr", "nan"], "--lr must be a number in (0, 1]"),
    (["--lr", "-1"], "--lr must be a number in (0, 1]"),
    (["--seed", str(2**70)], "seed must be an integer in"),
    (["--label-dropout", "2"], "--label-dropout must be in [0, 1]"),
])
def test_absurd_training_options_are_one_line_errors(capsys, synthetic_cases, tmp_path, args,
                                                    match):
    code = cli.main(["train", str(synthetic_cases), "--out", str(tmp_path / "run"), "--steps",
                     "1", *args])
    assert match in _one_line_error(capsys, code)
    assert not (tmp_path / "run").exists()
