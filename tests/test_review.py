"""Reviewing lesions in napari (issue 15), in a real viewer under Xvfb with the widget docked as
the Plugins menu docks it (napari hands it proxies of the viewer and its layers)."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_whatishealthy.core import pipeline

pytestmark = pytest.mark.gui

PLUGIN = "napari-whatishealthy"
WIDGET = "Lesion localization"
RESULTS = ("flair healthy", "flair difference", "flair mask")
TIMEOUT_MS = 120_000


@pytest.fixture
def lesion_case(case_dirs) -> Path:
    from napari_whatishealthy.core.volume import load_volume

    for case in case_dirs:
        if (load_volume(case).segmentation > 0).any():
            return case
    pytest.skip("no lesion case in the synthetic set")


def docked(make_napari_viewer, case: Path, checkpoint: Path, show: bool = False):
    """The viewer with ``case`` open and the widget docked from the manifest."""
    viewer = make_napari_viewer(show=show)
    viewer.open(str(case), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.set_model(checkpoint)
    return viewer, widget


def run_to_end(qtbot, widget) -> None:
    widget.run()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert widget.last_error is None, widget.last_error


def layer(viewer, name: str):
    """The layer itself (iteration gives layers, indexing a docked widget's viewer a proxy)."""
    return next(lay for lay in viewer.layers if lay.name == name)


# ------------------------------------------------------------------------------------------------
# 1. A rerun updates the result layers and keeps what the user set on them


def test_rerun_keeps_the_users_display_settings(make_napari_viewer, qtbot, lesion_case,
                                                tiny_checkpoint):
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    assert type(widget.viewer).__name__ == "PublicOnlyProxy"  # as the Plugins menu docks it
    run_to_end(qtbot, widget)
    first = {name: layer(viewer, name) for name in RESULTS}
    first["flair healthy"].opacity = 0.3
    first["flair healthy"].colormap = "viridis"
    first["flair difference"].visible = True
    first["flair mask"].opacity = 0.25
    widget.guidance.setValue(widget.guidance.value() + 5.0)
    run_to_end(qtbot, widget)
    for name in RESULTS:
        assert layer(viewer, name) is first[name]  # updated, not removed and added again
    assert [lay.name for lay in viewer.layers].count("flair mask") == 1
    assert first["flair healthy"].opacity == pytest.approx(0.3)
    assert first["flair healthy"].colormap.name == "viridis"
    assert first["flair difference"].visible
    assert first["flair mask"].opacity == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------
# 2. File > Save Selected Layers with a .nii.gz name and the dialog's default file type


def _save_selected_with_default_type(viewer, monkeypatch, path: Path) -> None:
    """What File > Save Selected Layers does when the user types ``path`` and keeps the
    dialog's first (default) file type."""
    from qtpy.QtWidgets import QFileDialog

    def answer(*args, **kwargs):
        return str(path), kwargs["filter"].split(";;")[0]

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(answer))
    viewer.window._qt_viewer._save_layers_dialog(selected=True)


def test_save_selected_layers_as_nifti_with_the_default_file_type(
    make_napari_viewer, monkeypatch, lesion_case, tiny_checkpoint, tmp_path
):
    viewer, _ = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    seg = layer(viewer, "seg")
    seg.data[seg.data.shape[0] // 2, 5:8, 5:8] = 3  # something to find in the file
    viewer.layers.selection = {seg}
    out = tmp_path / "saved_mask.nii.gz"
    _save_selected_with_default_type(viewer, monkeypatch, out)
    source = nib.load(seg.metadata["source_path"])
    saved = nib.load(out)
    np.testing.assert_allclose(saved.affine, source.affine)  # on the source grid
    assert saved.shape == source.shape
    assert int(np.count_nonzero(np.asarray(saved.dataobj) == 3)) == 9

    # A labels layer of another origin, typed with .tif: napari's own writer still gets it.
    other = viewer.add_labels(np.zeros((4, 5, 6), np.uint8), name="cells")
    viewer.layers.selection = {other}
    tif = tmp_path / "cells.tif"
    _save_selected_with_default_type(viewer, monkeypatch, tif)
    assert tif.exists() and not tif.with_name("cells.tif.nii.gz").exists()


# ------------------------------------------------------------------------------------------------
# 3. Closing the viewer during a run stops the worker


def test_closing_the_viewer_stops_a_run(make_napari_viewer, qtbot, lesion_case, tiny_checkpoint,
                                        monkeypatch):
    steps_done = []
    original = pipeline.iter_localize

    def slow(*args, **kwargs):
        gen = original(*args, **kwargs)
        try:
            while True:
                item = next(gen)
                time.sleep(0.3)
                steps_done.append(item)
                yield item
        except StopIteration as stop:
            return stop.value

    monkeypatch.setattr(pipeline, "iter_localize", slow)
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    widget.steps.setValue(40)
    widget.run()
    worker = widget._worker
    qtbot.waitUntil(lambda: len(steps_done) >= 2, timeout=TIMEOUT_MS)
    viewer.close()
    assert not worker.is_running  # stopped and waited for, not left running
    assert len(steps_done) < 20  # it did not run to its end
    assert "flair mask" not in [lay.name for lay in viewer.layers]
