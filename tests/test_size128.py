"""`train --size 128` end to end: the store, the checkpoint's spec, localize and the widget."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_whatishealthy.cli import main
from napari_whatishealthy.core.model import load_checkpoint

SIZE = 128


@pytest.fixture(scope="module")
def run_128(synthetic_cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("size128") / "run"
    rc = main(["train", str(synthetic_cases), "--out", str(out), "--size", str(SIZE),
               "--steps", "2", "--batch", "2", "--channels", "8,16", "--attention", "0,1",
               "--log-every", "1", "--val-every", "2", "--checkpoint-every", "2",
               "--amp", "off", "--device", "cpu", "--workers", "1", "--no-progress"])
    assert rc == 0
    return out


def test_train_at_128_writes_a_128_model_and_says_so(run_128):
    spec = load_checkpoint(run_128 / "checkpoint").spec
    assert spec.image_size == SIZE
    assert spec.training["image_size"] == SIZE
    store = spec.training["slice_store"]
    assert store["slices"] > 0 and store["path"].endswith("slice_store")
    index = json.loads((run_128 / "slice_store" / "index.json").read_text())
    assert index["shape"][1:] == [4, SIZE, SIZE]
    assert index["preprocessing"]["image_size"] == SIZE


def test_localize_with_a_128_model_writes_outputs_on_the_input_grid(run_128, case_dirs,
                                                                      tmp_path, capsys):
    case = case_dirs[0]
    out = tmp_path / "loc"
    rc = main(["localize", str(case), "--out", str(out), "--model", str(run_128),
               "--steps", "1", "--noise", "0.2", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    mask = nib.load(out / f"{case.name}_mask.nii.gz")
    source = nib.load(next(case.glob("*_flair.nii.gz")))
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine)
    prov = json.loads((out / f"{case.name}_provenance.json").read_text())
    assert prov["model_image_size"] == SIZE and prov["slices_processed"] > 0


@pytest.mark.gui
def test_widget_runs_a_128_model(make_napari_viewer, qtbot, run_128, case_dirs):
    from napari_whatishealthy._widget import LocalizeWidget

    viewer = make_napari_viewer()
    viewer.open(str(case_dirs[0]), plugin="napari-whatishealthy")
    widget = LocalizeWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Lesion localization", area="right")
    widget.set_model(run_128 / "checkpoint")
    assert f"{SIZE}×{SIZE} slices" in widget.model_info.text()
    widget.steps.setValue(1)
    widget.run()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=120_000)
    assert widget.last_error is None, widget.last_error
    difference = viewer.layers["flair difference"]
    assert difference.data.shape == viewer.layers["flair"].data.shape
    assert difference.metadata["provenance"]["model_image_size"] == SIZE
