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


# ------------------------------------------------------------------------------------------------
# Lesion table and histogram, on their own in a viewer


def _two_lesion_labels(viewer):
    data = np.zeros((20, 30, 40), np.uint8)
    data[2:6, 10:14, 10:15] = 1  # 80 voxels
    data[12, 20:22, 30] = 1  # 2 voxels
    difference = np.where(data > 0, 0.5, 0.0).astype(np.float32)
    layer = viewer.add_labels(data, name="m", scale=(2.0, 1.0, 1.0), translate=(-10.0, 0, 0))
    return layer, difference


def test_lesion_table_follows_the_mask_and_jumps_to_a_lesion(make_napari_viewer, qtbot,
                                                             tmp_path):
    from napari_whatishealthy._lesion_table import LesionTable, lesion_csv_path

    viewer = make_napari_viewer()
    layer, difference = _two_lesion_labels(viewer)
    table = LesionTable(viewer)
    viewer.window.add_dock_widget(table)
    table.bind(layer, difference)
    assert table.table.rowCount() == 2
    assert table.table.item(0, 1).text() == f"{80 * 2 / 1000:.2f}"  # mL with the 2 mm slices
    assert table.table.isColumnHidden(4)  # no uncertainty map: no column for it
    assert list(layer.features["voxels"]) == [80, 2]  # other plugins read it from the layer
    assert list(layer.features["index"]) == [-1, -2]  # rows are lesions, not label values
    assert layer.get_status((3, 11, 12)).get("coordinates", "").count("voxels") == 0

    table.table.cellClicked.emit(1, 0)  # the small lesion, on slice 12
    assert viewer.dims.point[0] == pytest.approx(layer.data_to_world((12, 0, 0))[0])
    np.testing.assert_allclose(viewer.camera.center[-2:], (20.5, 30.0))

    # A brush stroke (the paint event) adds a lesion; the table follows after the debounce.
    layer.paint((18, 2, 2), 1)
    qtbot.waitUntil(lambda: table.table.rowCount() == 3, timeout=5000)
    # A new array (what a threshold move does) too.
    layer.data = np.zeros_like(layer.data)
    qtbot.waitUntil(lambda: table.table.rowCount() == 0, timeout=5000)
    assert "No lesion" in table.summary.text()

    path = table.write_csv(lesion_csv_path(tmp_path / "case_mask.nii.gz"))
    assert path.name == "case_mask_lesions.csv"
    assert path.read_text().splitlines()[0].startswith("lesion,voxels,volume_ml")


def test_histogram_marks_thresholds_and_picks_one(make_napari_viewer, qtbot):
    from qtpy.QtCore import QPoint, Qt

    from napari_whatishealthy._histogram import CURRENT, OTSU, RECOMMENDED, DifferenceHistogramView
    from napari_whatishealthy.core.lesions import difference_histogram

    rng = np.random.default_rng(0)
    difference = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.7, 0.05, 300)])
    hist = difference_histogram(difference.reshape(-1, 1, 1), None, recommended=0.4, top=1.0)
    view = DifferenceHistogramView()
    qtbot.addWidget(view)
    view.resize(400, 80)
    view.set_histogram(hist)
    view.set_current(0.55)
    view.show()
    qtbot.waitExposed(view)
    image = view.grab().toImage()

    def column_has(colour, value) -> bool:
        x = int(round(view.x_of(value)))
        return any(
            abs(image.pixelColor(xx, y).red() - colour.red()) < 30
            and abs(image.pixelColor(xx, y).green() - colour.green()) < 30
            and abs(image.pixelColor(xx, y).blue() - colour.blue()) < 30
            for xx in (x - 1, x, x + 1) for y in range(8, 70)
        )

    assert column_has(CURRENT, 0.55)
    assert column_has(RECOMMENDED, 0.4)
    assert column_has(OTSU, view.markers()["otsu"])
    with qtbot.waitSignal(view.threshold_picked) as picked:
        qtbot.mouseClick(view, Qt.MouseButton.LeftButton, pos=QPoint(int(view.x_of(0.25)), 40))
    assert picked.args[0] == pytest.approx(0.25, abs=0.01)


# ------------------------------------------------------------------------------------------------
# The lesion table, histogram and uncertainty layer in the docked widget


def test_widget_shows_lesions_histogram_and_uncertainty(make_napari_viewer, qtbot, lesion_case,
                                                        tiny_checkpoint, monkeypatch, tmp_path):
    """A run whose result carries an uncertainty map (synthetic here: the score work adds the
    real one): the widget adds a hidden ``<image> uncertainty`` layer, fills the lesion table
    (with the uncertainty column), marks the thresholds on the histogram, and keeps both in step
    with the threshold; Save writes the table next to the mask."""
    original = pipeline.iter_localize

    def with_uncertainty(*args, **kwargs):
        result = yield from original(*args, **kwargs)
        result.uncertainty = np.where(result.brain, 0.25, 0.0).astype(np.float32)
        return result

    monkeypatch.setattr(pipeline, "iter_localize", with_uncertainty)
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    run_to_end(qtbot, widget)
    uncertainty = layer(viewer, "flair uncertainty")
    assert not uncertainty.visible and uncertainty.metadata["role"] == "uncertainty"
    assert uncertainty.data.shape == layer(viewer, "flair mask").data.shape
    assert "flair uncertainty" not in [c for c in
                                       [widget.ground_truth_combo.itemText(i)
                                        for i in range(widget.ground_truth_combo.count())]]

    widget.min_size.setValue(0)
    low, high = widget.threshold.minimum(), widget.threshold.maximum()
    with qtbot.waitSignal(widget.lesion_table.updated, timeout=5000):
        widget.threshold.setValue(low + 0.02 * (high - low))  # a low threshold: many voxels
    mask = layer(viewer, "flair mask")
    lesions = widget.lesion_table.lesions
    assert sum(lesion.voxels for lesion in lesions) == int(np.count_nonzero(mask.data))
    assert not widget.lesion_table.table.isColumnHidden(4)
    assert all(lesion.mean_uncertainty == pytest.approx(0.25) for lesion in lesions)
    assert widget.histogram.markers()["current"] == pytest.approx(widget.threshold.value())
    assert widget.histogram.histogram.counts.sum() > 0

    with qtbot.waitSignal(widget.lesion_table.updated, timeout=5000):
        widget.threshold.setValue(high)  # nothing above the top of the range
    assert widget.lesion_table.table.rowCount() == 0
    assert widget.histogram.markers()["current"] == pytest.approx(high)

    with qtbot.waitSignal(widget.lesion_table.updated, timeout=5000):
        widget.threshold.setValue(low + 0.02 * (high - low))
    assert widget.lesion_table.table.rowCount() > 0
    saved = widget.save_mask(tmp_path / "case_mask.nii.gz")
    table = tmp_path / "case_mask_lesions.csv"
    assert saved is not None and table.exists()
    assert len(table.read_text().splitlines()) == 1 + len(widget.lesion_table.lesions)


# ------------------------------------------------------------------------------------------------
# 4. Usable at 1366 x 768; 5. radiological view, S/A/R labels, the mask over the scan


def test_widget_fits_a_1366_by_768_screen(make_napari_viewer, qtbot, lesion_case, tiny_checkpoint):
    from qtpy.QtWidgets import QApplication

    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint, show=True)
    run_to_end(qtbot, widget)  # the result box (table, histogram) is filled and enabled
    window = widget.window()
    window.resize(1366, 768)
    for _ in range(5):
        QApplication.processEvents()
    assert window.height() <= 768 and window.width() <= 1366
    assert widget.minimumSizeHint().height() < 400  # it scrolls instead of growing the window
    assert widget.scroll_area.verticalScrollBar().maximum() > 0  # the rest is a scroll away


def test_radiological_view_and_the_mask_over_the_scan(make_napari_viewer, qtbot, lesion_case,
                                                      tiny_checkpoint):
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    assert tuple(viewer.camera.orientation2d) == ("up", "left")  # anterior up, R on the left
    assert widget.orientation_combo.currentText().startswith("radiological")
    assert viewer.axes.visible and viewer.axes.labels
    run_to_end(qtbot, widget)
    names = [lay.name for lay in viewer.layers]
    assert names[-1] == "flair mask"  # drawn over everything
    source = names.index("flair")
    assert set(names[source + 1:source + 3]) == {"flair healthy", "flair difference"}
    assert names.index("flair healthy") < names.index("seg")  # the truth is not hidden under it
    assert not layer(viewer, "flair healthy").visible  # the scan stays in view; toggle to compare


# ------------------------------------------------------------------------------------------------
# Saved settings (napari plugin configurations)


def test_model_and_device_are_saved_and_restored(make_napari_viewer, lesion_case, tiny_checkpoint,
                                                 plugin_settings_in_tmp, monkeypatch):
    from napari.settings import get_plugin_settings
    from qtpy.QtWidgets import QFileDialog

    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    saved = get_plugin_settings(PLUGIN)
    assert saved.run.model == "auto"  # set by code (a script, this test): not a user's choice
    monkeypatch.setattr(QFileDialog, "getExistingDirectory",
                        staticmethod(lambda *args, **kwargs: str(tiny_checkpoint)))
    widget.browse_button.click()  # the user chooses the checkpoint with Browse
    widget.device_combo.setCurrentText("cpu")
    widget.device_combo.activated.emit(widget.device_combo.currentIndex())  # ... and the CPU
    assert saved.run.model == str(tiny_checkpoint) and saved.run.device == "cpu"
    assert saved.folders.checkpoint == str(tiny_checkpoint.parent)
    assert "device: cpu" in plugin_settings_in_tmp.read_text()  # written by napari
    # A new widget (a new session) starts from them.
    from napari_whatishealthy._widget import LocalizeWidget

    again = LocalizeWidget(widget.viewer)
    assert again is not widget
    assert again.model_combo.currentData() == str(tiny_checkpoint)
    assert again.device_combo.currentText() == "cpu"
    # A bundled model is saved by name; a folder that is gone falls back to Automatic.
    again.model_combo.setCurrentIndex(1)  # the user picks the first bundled model
    again.model_combo.activated.emit(1)
    assert saved.run.model in ("default", "flair")
    saved.run.model = str(tiny_checkpoint / "missing")
    assert LocalizeWidget(widget.viewer).is_auto_model


# ------------------------------------------------------------------------------------------------
# Cohort review


def test_cohort_review_runs_steps_and_autosaves(make_napari_viewer, qtbot, cases_copy,
                                                tiny_checkpoint):
    from napari.settings import get_plugin_settings

    from napari_whatishealthy._cohort_panel import CohortPanel

    get_plugin_settings(PLUGIN).run.model = str(tiny_checkpoint)  # the saved default model
    get_plugin_settings(PLUGIN).run.device = "cpu"
    viewer = make_napari_viewer()
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Cohort review")
    assert isinstance(panel, CohortPanel)
    inputs = {p: p.read_bytes() for p in cases_copy.rglob("*.nii.gz")}
    assert panel.open_folder(cases_copy)
    n = len(panel.cohort.cases)
    assert panel.case_list.count() == n and "not run" in panel.case_list.item(0).text()
    assert "flair" in [lay.name for lay in viewer.layers]  # the first case's inputs are shown
    assert panel.mask_layer is None  # no results yet

    panel.run_todo()
    qtbot.waitUntil(lambda: not panel.is_running, timeout=TIMEOUT_MS)
    assert panel.last_error is None, panel.last_error
    assert all(entry.done for entry in panel.cohort.cases)
    assert "done" in panel.case_list.item(0).text()
    first = panel.cohort.cases[0]
    mask = panel.mask_layer  # the shown case was reloaded with its results
    assert mask is not None and mask.name == f"{first.name} mask"
    model_mask = first.outputs["mask"].read_bytes()

    # Paint: saved beside the outputs a moment later, on the source grid.
    z = mask.data.shape[0] // 2
    mask.paint((z, 5, 5), 7, refresh=True)
    qtbot.waitUntil(lambda: panel.last_autosave is not None, timeout=5000)
    edited = nib.load(first.edited_mask)
    assert edited.shape == nib.load(first.outputs["mask"]).shape
    assert int(np.count_nonzero(np.asarray(edited.dataobj) == 7)) >= 1
    assert first.outputs["mask"].read_bytes() == model_mask  # the model's mask is kept
    assert {p: p.read_bytes() for p in cases_copy.rglob("*.nii.gz")} == inputs  # inputs too

    # Next case: its layers replace the first's; back again: the painted mask comes back.
    panel.next_button.click()
    names = [lay.name for lay in viewer.layers]
    assert f"{first.name} mask" not in names and f"{panel.current.name} mask" in names
    panel.previous_button.click()
    assert panel.current is first and "edited" in panel.case_list.item(0).text()
    assert int(np.count_nonzero(panel.mask_layer.data == 7)) >= 1
    assert panel.lesion_table.table.rowCount() >= 1

    # The output folder opens as the same cohort, from its provenance files.
    assert panel.open_folder(first.outputs["mask"].parent)
    assert len(panel.cohort.cases) == n and panel.cohort.cases[0].status() == "edited"


# ------------------------------------------------------------------------------------------------
# 6. Progress; 7. small things


def test_progress_reads_in_percent_and_resets_after_a_cancel(make_napari_viewer, qtbot,
                                                            lesion_case, tiny_checkpoint):
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    assert widget.progress.text() == "" and widget.progress.format() == ""  # nothing before a run
    assert widget.result_box.isHidden()  # no threshold to show before a result
    seen = []
    on_yielded = widget._on_yielded

    def watch(item):  # hooked in before the worker starts, so no early step is missed
        on_yielded(item)
        seen.append((widget.progress.text(), widget.status.text()))

    widget._on_yielded = watch
    widget.steps.setValue(6)
    widget.run()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    texts = [text for text, _ in seen if text]
    assert texts and all(t.endswith("%") for t in texts)
    assert texts[-1] == "100%"
    assert any("left" in status for _, status in seen[2:])  # a time estimate once paced
    assert widget.progress.format() == "done" and not widget.result_box.isHidden()

    def cancel_at_first_step(item):
        on_yielded(item)
        if hasattr(item, "step"):
            widget.cancel()

    widget._on_yielded = cancel_at_first_step
    widget.steps.setValue(12)
    widget.run()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert "Cancelled" in widget.status.text()
    assert widget.progress.value() == 0 and widget.progress.text() == ""  # not "4 / 60"


def test_stale_note_goes_when_a_setting_is_put_back(make_napari_viewer, qtbot, lesion_case,
                                                    tiny_checkpoint):
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    run_to_end(qtbot, widget)
    guidance = widget.guidance.value()
    widget.guidance.setValue(guidance + 1.0)
    assert not widget.stale_label.isHidden()
    widget.guidance.setValue(guidance)
    assert widget.stale_label.isHidden()


def test_save_is_disabled_once_the_mask_layer_is_deleted(make_napari_viewer, qtbot, lesion_case,
                                                         tiny_checkpoint):
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    run_to_end(qtbot, widget)
    assert widget.save_button.isEnabled()
    viewer.layers.remove("flair mask")
    assert not widget.save_button.isEnabled()


def test_undo_takes_a_painted_voxel_off_the_count(make_napari_viewer, qtbot, lesion_case,
                                                  tiny_checkpoint):
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    run_to_end(qtbot, widget)
    mask = layer(viewer, "flair mask")
    z = mask.data.shape[0] // 2
    value = 0 if mask.data[z, 3, 3] else 1
    mask.paint((z, 3, 3), value, refresh=True)
    qtbot.waitUntil(lambda: widget._session.n_edits > 0, timeout=5000)
    assert "painted voxel" in widget.edits_label.text()
    mask.undo()
    qtbot.waitUntil(lambda: widget._session.n_edits == 0, timeout=5000)
    assert widget.edits_label.text() == "No painted edits"


def test_a_preview_of_a_slice_without_brain_adds_nothing(make_napari_viewer, qtbot, lesion_case,
                                                         tiny_checkpoint):
    from napari_whatishealthy._widget import SCOPE_SLICE

    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    flair = layer(viewer, "flair")
    for name in ("flair", "t1", "t1ce", "t2"):  # the first slice: no brain in any input
        layer(viewer, name).data[0] = 0
    viewer.dims.set_point(0, flair.data_to_world((0, 0, 0))[0])
    widget.scope_combo.setCurrentText(SCOPE_SLICE)
    names = [lay.name for lay in viewer.layers]
    run_to_end(qtbot, widget)
    assert [lay.name for lay in viewer.layers] == names
    assert "no brain" in widget.status.text().lower()


def test_classifier_rows_are_shown_on_demand(make_napari_viewer, lesion_case, tiny_checkpoint):
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    assert widget.classifier_edit.isHidden() and widget.classifier_scale.isHidden()
    widget.classifier_toggle.setChecked(True)
    assert not widget.classifier_edit.isHidden()


def test_help_link_opens_the_user_guide(make_napari_viewer, lesion_case, tiny_checkpoint):
    viewer, widget = docked(make_napari_viewer, lesion_case, tiny_checkpoint)
    link = widget.help_label.text()
    target = link.split('href="')[1].split('"')[0]
    assert target.startswith("file://") and target.endswith("docs/user-guide.md")
    assert Path(target[len("file://"):]).is_file() and widget.help_label.openExternalLinks()
