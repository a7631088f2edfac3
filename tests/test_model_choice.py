"""Model choice follows the input's modalities (bundled models stood in by tiny checkpoints)."""

from __future__ import annotations

import shutil

import pytest
from conftest import make_checkpoint, tiny_spec

from napari_whatishealthy import cli
from napari_whatishealthy.core import registry
from napari_whatishealthy.core.errors import InputError
from napari_whatishealthy.core.model_choice import choose_model

FOUR = ("flair", "t1", "t1ce", "t2")


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """A models folder holding a four-channel ``default`` and a one-channel ``flair`` model."""
    root = tmp_path / "models"
    make_checkpoint(root / "default", spec=tiny_spec(name="default"))
    make_checkpoint(root / "flair", seed=1, spec=tiny_spec(name="flair", modalities=("flair",)))
    monkeypatch.setattr(registry, "MODELS_DIR", root)
    registry.clear_model_cache()
    yield root
    registry.clear_model_cache()


def test_four_modalities_pick_the_four_channel_model(bundled):
    choice = choose_model(FOUR)
    assert choice.name == "default" and choice.folder == (bundled / "default").resolve()
    assert "automatic" in choice.reason
    # Order does not matter; a fifth, unknown channel is simply not used.
    assert choose_model(("t2", "t1ce", "flair", "t1", "dwi")).name == "default"


def test_a_lone_flair_picks_the_flair_model(bundled):
    choice = choose_model(("flair",))
    assert choice.name == "flair" and tuple(choice.spec.modalities) == ("flair",)
    # FLAIR plus T1 (no four-channel set): still the FLAIR model, and it says T1 is unused.
    choice = choose_model(("flair", "t1"))
    assert choice.name == "flair" and "not t1" in choice.reason


def test_an_unnamed_file_is_never_guessed(bundled):
    with pytest.raises(InputError, match="not in its name.*--modality"):
        choose_model(("image",))


def test_no_fitting_model_names_what_is_needed(bundled):
    with pytest.raises(InputError) as info:
        choose_model(("t1",))
    text = str(info.value)
    assert "no bundled model fits an input with t1" in text
    assert "default: flair, t1, t1ce, t2" in text and "flair: flair" in text
    assert "--modalities t1" in text


def test_a_named_model_is_checked_against_the_input(bundled):
    assert choose_model(FOUR, "flair").name == "flair"  # a subset is fine
    with pytest.raises(InputError, match=r"missing t1, t1ce, t2.*'flair' fits"):
        choose_model(("flair",), "default")


def test_localize_picks_by_files_and_asks_for_unnamed(bundled, capsys, case_dirs, tmp_path):
    case = case_dirs[0]
    flair = tmp_path / "in" / "patient7_flair.nii.gz"
    flair.parent.mkdir()
    shutil.copy(case / f"{case.name}_flair.nii.gz", flair)
    unnamed = tmp_path / "in2" / "scan.nii.gz"
    unnamed.parent.mkdir()
    shutil.copy(flair, unnamed)

    assert cli.main(["localize", str(case), str(flair), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith(f"{case.name}:") and "by model default (automatic" in line
               for line in lines)
    assert any(line.startswith("patient7:") and "by model flair (automatic" in line
               for line in lines)

    assert cli.main(["localize", str(unnamed), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "scan.nii.gz: the modality of the input is not in its name" in err
    assert not (tmp_path / "o2").exists()
    assert cli.main(["localize", str(unnamed), "--modality", "flair", "--out",
                     str(tmp_path / "o2"), "--no-progress"]) == 0
    assert "by model flair (automatic" in capsys.readouterr().out

    t1 = tmp_path / "in3" / "p_t1.nii.gz"
    t1.parent.mkdir()
    shutil.copy(case / f"{case.name}_t1.nii.gz", t1)
    assert cli.main(["localize", str(t1), "--out", str(tmp_path / "o3")]) == 2
    assert "no bundled model fits an input with t1" in capsys.readouterr().err
