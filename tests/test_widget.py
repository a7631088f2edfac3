"""The widget in a real napari viewer (run under Xvfb), with a tiny random-init model.

A random model localizes nothing in particular; these tests check the wiring: runs in a thread,
layers created with the source geometry and updated in place, live threshold and metrics
without a rerun, painted edits kept, Cancel leaving the layers alone, Save onto the source grid.
The case is conftest's 40 x 40 x 26 synthetic case (6 mm), so a run takes a fraction of a second.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_whatishealthy._widget import SCOPE_SLICE, SCOPE_VOLUME, LocalizeWidget
from napari_whatishealthy.core import pipeline

pytestmark = pytest.mark.gui

PLUGIN = "napari-whatishealthy"
RESULTS = ("flair healthy", "flair difference", "flair mask")
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random model whose output is not zero (MONAI zero-initialises the last layer, so
    a fresh model predicts no noise at all and guidance would have no effect)."""
    import torch

    from napari_whatishealthy.core.model import (
        ModelSpec,
        NetworkSpec,
        build_model,
        save_checkpoint,
    )

    spec = ModelSpec(
        image_size=16, name="tiny-widget-test",
        network=NetworkSpec(channels=(8, 16), attention_levels=(False, True), norm_num_groups=8,
                            num_head_channels=8, label_embedding_dim=8),
    )
    spec.inference.steps = 2
    spec.inference.noise_level = 0.2
    spec.inference.min_component_voxels = 2
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return save_checkpoint(model, tmp_path_factory.mktemp("widget-ckpt") / "tiny")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A tiny random noisy-image classifier for the tiny model, saved as `whatishealthy
    train-classifier --out RUN` saves it (RUN/checkpoint), with a recommended scale of 4.5."""
    import torch

    from napari_whatishealthy.core.classifier import (
        ClassifierNetworkSpec,
        ClassifierSpec,
        build_classifier,
        save_classifier,
    )

    spec = ClassifierSpec(
        image_size=16, name="tiny-widget-classifier",
        network=ClassifierNetworkSpec(channels=(8, 16), attention_levels=(False, True),
                                      norm_num_groups=8, num_head_channels=8),
    )
    spec.inference.scale = 4.5
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("widget-clf") / "run"
    save_classifier(build_classifier(spec).eval(), run / "checkpoint")
    return run


@pytest.fixture
def errors_shown(monkeypatch) -> list[str]:
    """The messages of the napari error notifications shown (they are still shown)."""
    from napari.utils import notifications

    shown: list[str] = []
    original = notifications.show_error

    def recording(message: str) -> None:
        shown.append(message)
        original(message)

    monkeypatch.setattr(notifications, "show_error", recording)
    return shown


def _setup(make_napari_viewer, case: Path, checkpoint: Path, show: bool = False):
    viewer = make_napari_viewer(show=show)
    viewer.open(str(case), plugin=PLUGIN)
    widget = LocalizeWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Lesion localization", area="right")
    widget.set_model(checkpoint)
    return viewer, widget


def _run(qtbot, widget) -> None:
    widget.run()
    assert widget.is_running
    assert not widget.run_button.isEnabled()  # Run is disabled while a run is going
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert widget.last_error is None, widget.last_error


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def count_runs(monkeypatch):
    """Counts calls of the pipeline (the expensive part) made by the widget's job."""
    calls = []
    original = pipeline.iter_localize

    def counting(*args, **kwargs):
        calls.append(kwargs.get("z_slices", args[4] if len(args) > 4 else None))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "iter_localize", counting)
    return calls


def test_the_widget_bounds_openmp_spinning_before_torch_loads():
    """napari's process keeps OpenMP's default policy unless the widget sets one when it is
    made, before anything imports torch (libgomp reads it once); a user's choice is kept."""
    import os
    import subprocess
    import sys

    code = ("import os, sys, napari; viewer = napari.Viewer(show=False); "
            "from napari_whatishealthy._widget import LocalizeWidget; "
            "before = 'torch' in sys.modules; widget = LocalizeWidget(viewer); "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'), before); "
            "viewer.close()")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for extra, expected in (({}, "10000 None False"),
                            ({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE False")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**clean, **extra}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == expected


def test_inputs_are_matched_by_name(make_napari_viewer, lesion_case, tiny_checkpoint):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    chosen = {m: c.currentText() for m, c in widget._modality_combos.items()}
    assert chosen == {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"}
    assert widget.ground_truth_combo.currentText() == "seg"
    assert widget.guidance.value() == pytest.approx(3.0)  # the model's recommended defaults
    assert widget.steps.value() == 2
    assert widget.noise_level.value() == pytest.approx(0.2)
    assert widget.run_button.isEnabled()
    assert widget.device_combo.itemText(0) == "auto"
    assert widget.guidance.toolTip() and widget.noise_level.toolTip() and widget.steps.toolTip()


def test_end_to_end_threshold_and_metrics(make_napari_viewer, qtbot, lesion_case,
                                          tiny_checkpoint, count_runs):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    source = viewer.layers["flair"]
    _run(qtbot, widget)
    assert len(count_runs) == 1
    for name in RESULTS:
        layer = viewer.layers[name]
        assert layer.data.shape == source.data.shape
        np.testing.assert_allclose(layer.scale, source.scale)
        np.testing.assert_allclose(layer.translate, source.translate)
        assert layer.metadata["source_path"] == source.metadata["source_path"]
        prov = layer.metadata["provenance"]
        assert len(prov["model"]["sha256"]) == 64
        assert prov["settings"]["steps"] == 2 and "versions" in prov and prov["device"]
        assert prov["settings"]["method"] == "implicit" and "classifier" not in prov
    mask = viewer.layers["flair mask"]
    assert type(mask).__name__ == "Labels" and mask.data.dtype == np.uint8
    assert "Dice" in widget.metrics_label.text() and "AUPRC" in widget.metrics_label.text()

    # Moving the threshold changes the mask at once, without running the model again.
    difference = viewer.layers["flair difference"].data
    inside = difference[difference > 0]
    widget.min_size.setValue(0)
    sums = []
    for q in (10, 50, 90):
        widget.threshold.setValue(float(np.percentile(inside, q)))
        sums.append(int(np.count_nonzero(mask.data)))
        metrics = widget.current_metrics()
        assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["auprc"] <= 1.0
    assert sums[0] > sums[1] > sums[2]
    assert len(count_runs) == 1 and widget.run_count == 1
    assert viewer.layers["flair mask"] is mask
    assert mask.metadata["mask"]["threshold"] == pytest.approx(widget.threshold.value())
    # brain restriction and component size go through the same path
    widget.threshold.setValue(0.0)
    with_brain = int(np.count_nonzero(mask.data))
    widget.min_size.setValue(10_000_000)
    assert np.count_nonzero(mask.data) == 0
    widget.min_size.setValue(0)
    assert np.count_nonzero(mask.data) == with_brain
    assert len(count_runs) == 1


def test_painted_edits_survive_threshold_moves(make_napari_viewer, qtbot, lesion_case,
                                               tiny_checkpoint):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    _run(qtbot, widget)
    mask = viewer.layers["flair mask"]
    widget.min_size.setValue(0)
    top = widget.threshold.maximum()
    widget.threshold.setValue(top)  # nothing above the top: an empty mask
    assert np.count_nonzero(mask.data) == 0
    # Paint a small block (as the brush does: through the layer, which emits `paint`).
    z = mask.data.shape[0] // 2
    mask.selected_label = 1
    mask.paint((z, 10, 10), 1)
    painted = np.count_nonzero(mask.data)
    assert painted > 0
    qtbot.waitUntil(lambda: widget._session.n_edits == painted, timeout=5000)
    assert widget.discard_button.isEnabled()
    # Threshold moves keep the painted voxels; erase some and they stay erased.
    widget.threshold.setValue(0.0)
    full = mask.data.copy()
    assert np.all(full[z, 10, 10] == 1)
    mask.paint((z, 30, 30), 0)
    erased = mask.data == 0
    qtbot.waitUntil(lambda: widget._session.n_edits > painted, timeout=5000)
    widget.threshold.setValue(top / 2)
    widget.threshold.setValue(0.0)
    assert np.array_equal(mask.data == 0, erased)
    # A second run keeps the edits too, and says so; Discard drops them.
    _run(qtbot, widget)
    assert mask.data[z, 10, 10] == 1 and widget._session.n_edits > 0
    widget.threshold.setValue(top)
    assert np.count_nonzero(mask.data) == painted
    widget.discard_edits()
    assert np.count_nonzero(mask.data) == 0 and not widget.discard_button.isEnabled()


@pytest.fixture
def gate(monkeypatch):
    """Holds the job before its second diffusion step until the test releases it, so that a
    Cancel pressed on the first step lands mid-run however fast the machine is."""
    release = threading.Event()
    release.connected = threading.Event()  # the test has connected to the worker's signals
    original = pipeline.iter_localize

    def gated(*args, **kwargs):
        gen = original(*args, **kwargs)

        def steps():
            count = 0
            while True:
                try:
                    item = next(gen)
                except StopIteration as stop:
                    return stop.value
                count += 1
                if count == 1:
                    release.connected.wait(30)
                else:
                    release.wait(30)
                yield item

        return steps()

    monkeypatch.setattr(pipeline, "iter_localize", gated)
    return release


def test_cancel_leaves_layers_unchanged(make_napari_viewer, qtbot, lesion_case, tiny_checkpoint,
                                        gate):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    widget.steps.setValue(10)
    widget.noise_level.setValue(0.9)
    steps_seen = []

    def cancel_on_first_step(item):
        if hasattr(item, "step"):
            steps_seen.append(item.step)
            widget.cancel()
            gate.set()

    # 1. cancelled before any result: no result layer appears.
    names = [layer.name for layer in viewer.layers]
    widget.run()
    widget._worker.yielded.connect(cancel_on_first_step)
    gate.connected.set()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == names
    assert "Cancelled" in widget.status.text()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()

    # 2. after a finished run, a cancelled run leaves every layer exactly as it was.
    assert steps_seen and max(steps_seen) <= 2  # stopped at the next step, of 20
    widget.steps.setValue(2)
    _run(qtbot, widget)
    gate.clear()
    gate.connected.clear()
    before = {layer.name: (layer, np.array(layer.data, copy=True), dict(layer.metadata))
              for layer in viewer.layers}
    widget.guidance.setValue(7.0)
    widget.steps.setValue(10)
    widget.run()
    widget._worker.yielded.connect(cancel_on_first_step)
    gate.connected.set()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == list(before)
    for layer in viewer.layers:
        same, data, metadata = before[layer.name]
        assert layer is same
        np.testing.assert_array_equal(layer.data, data)
        for key in ("provenance", "mask", "role", "source_path"):
            assert layer.metadata.get(key) == metadata.get(key)


def test_second_run_updates_layers_in_place(make_napari_viewer, qtbot, lesion_case,
                                            tiny_checkpoint):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    _run(qtbot, widget)
    first = {name: viewer.layers[name] for name in RESULTS}
    healthy = first["flair healthy"].data.copy()
    assert widget.stale_label.isHidden()
    widget.guidance.setValue(20.0)
    assert not widget.stale_label.isHidden()  # the result is marked stale
    _run(qtbot, widget)
    names = [layer.name for layer in viewer.layers]
    for name in RESULTS:
        assert names.count(name) == 1
        assert viewer.layers[name] is first[name]
    assert not np.array_equal(first["flair healthy"].data, healthy)
    assert first["flair healthy"].metadata["provenance"]["settings"]["guidance"] == 20.0
    assert widget.stale_label.isHidden()


def test_lesion_contrast_box_follows_the_model_and_reaches_the_run(make_napari_viewer, qtbot,
                                                                   lesion_case, tiny_checkpoint):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    assert not widget.lesion_contrast.isChecked()  # the tiny model's spec: "any"
    _run(qtbot, widget)
    plain = viewer.layers["flair difference"].data.copy()
    assert viewer.layers["flair mask"].metadata["provenance"]["settings"]["lesion_contrast"] == "any"
    widget.lesion_contrast.setChecked(True)
    assert not widget.stale_label.isHidden()  # a setting of the run changed
    _run(qtbot, widget)
    prov = viewer.layers["flair mask"].metadata["provenance"]
    assert prov["settings"]["lesion_contrast"] == "expected"
    shown = viewer.layers["flair difference"].data
    assert shown.sum() < plain.sum()  # one direction of the change per modality, not |d|
    widget.reset_defaults()  # back to the model's setting
    assert not widget.lesion_contrast.isChecked()
    from napari_whatishealthy.core.registry import bundled_models

    widget.set_model(bundled_models()["default"])  # a bundled spec says "expected"
    assert widget.lesion_contrast.isChecked()


def test_later_runs_reuse_the_prepared_inputs(make_napari_viewer, qtbot, lesion_case,
                                              tiny_checkpoint, monkeypatch):
    calls = []
    original = pipeline.prepare_input

    def counting(data, spec):
        calls.append(data.shape)
        return original(data, spec)

    monkeypatch.setattr(pipeline, "prepare_input", counting)
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    _run(qtbot, widget)
    widget.guidance.setValue(6.0)
    widget.scope_combo.setCurrentText(SCOPE_SLICE)
    _run(qtbot, widget)
    assert len(calls) == 1  # stacked and prepared once for both runs
    # New data in an input layer is a new volume: prepared again.
    viewer.layers["t2"].data = viewer.layers["t2"].data * 2.0
    _run(qtbot, widget)
    assert len(calls) == 2
    # Removing a layer drops the cache (a BraTS volume is 144 MB).
    viewer.layers.remove("seg")
    assert widget._input_cache._data is None
    widget.scope_combo.setCurrentText(SCOPE_VOLUME)


@pytest.fixture
def bundled_pair(tmp_path_factory, tiny_checkpoint, monkeypatch):
    """Bundled models replaced by the tiny four-channel model as 'default' and a tiny
    one-channel FLAIR model as 'flair'."""
    import shutil

    from napari_whatishealthy.core import registry
    from napari_whatishealthy.core.model import ModelSpec, NetworkSpec, build_model, save_checkpoint

    root = tmp_path_factory.mktemp("bundled") / "models"
    shutil.copytree(tiny_checkpoint, root / "default")
    spec = ModelSpec(
        image_size=16, name="tiny-flair", modalities=("flair",),
        network=NetworkSpec(channels=(8, 16), attention_levels=(False, True), norm_num_groups=8,
                            num_head_channels=8, label_embedding_dim=8),
    )
    spec.inference.steps = 2
    save_checkpoint(build_model(spec), root / "flair")
    monkeypatch.setattr(registry, "MODELS_DIR", root)
    registry.clear_model_cache()
    yield root
    registry.clear_model_cache()


def test_automatic_model_follows_the_open_images(make_napari_viewer, qtbot, lesion_case,
                                                 bundled_pair):
    import nibabel as nib_

    viewer = make_napari_viewer()
    widget = LocalizeWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Lesion localization", area="right")
    assert widget.is_auto_model and widget._spec.name == "tiny-widget-test"  # default, no images
    # One image whose name says nothing: the widget asks, and picks no model until answered.
    flair = nib_.load(next(lesion_case.glob("*_flair.nii.gz")))
    viewer.add_image(np.asarray(flair.dataobj, dtype=np.float32).T, name="scan")
    assert widget.modality_combo.isVisibleTo(widget)
    assert "scan" in widget.modality_label.text()
    assert widget._spec is None and not widget.run_button.isEnabled()
    assert "no modality in its name" in widget.model_info.text()
    widget.modality_combo.setCurrentText("flair")
    assert widget._spec.name == "tiny-flair" and "automatic" in widget.model_info.text()
    assert list(widget._modality_combos) == ["flair"]
    assert widget._modality_combos["flair"].currentText() == "scan"
    assert widget.run_button.isEnabled()
    _run(qtbot, widget)
    assert viewer.layers["scan mask"].data.shape == viewer.layers["scan"].data.shape
    # Opening a whole BraTS case: the four-channel model takes over, the question goes away.
    viewer.open(str(lesion_case), plugin=PLUGIN)
    assert widget._spec.name == "tiny-widget-test"
    assert not widget.modality_combo.isVisibleTo(widget)
    assert {m: c.currentText() for m, c in widget._modality_combos.items()} == {
        "flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"}
    # The user can still override: choosing a model by name is not automatic.
    widget.set_model(str(bundled_pair / "flair"))
    assert not widget.is_auto_model and widget._spec.name == "tiny-flair"


def test_automatic_model_input_without_qt():
    from napari_whatishealthy._layer_choice import LayerInfo, auto_model_input
    from napari_whatishealthy._widget_state import AUTO
    from napari_whatishealthy.core.model_choice import AUTO as CORE_AUTO

    assert AUTO == CORE_AUTO
    named = [LayerInfo("case_t2", {}, (4, 4, 4)), LayerInfo("x", {"modality": "flair"}, (4, 4, 4)),
             LayerInfo("x mask", {"role": "mask"}, (4, 4, 4))]
    assert auto_model_input(named, None).available == ("t2", "flair")
    assert auto_model_input(named, "t1").available == ("t2", "flair")  # names win over answers
    unnamed = [LayerInfo("scan", {}, (4, 4, 4))]
    assert auto_model_input(unnamed, None).ask_about == "scan"
    assert auto_model_input(unnamed, None).available == ()
    assert auto_model_input(unnamed, "t2").available == ("t2",)
    assert auto_model_input([], None) == auto_model_input([], "flair")  # nothing open: nothing


def test_napari_result_thresholds_its_own_copies_without_qt():
    """The napari layer keeps the result's [Z, Y, X] copies (made once, so a slider move never
    transposes) and its mask is the core's mask, transposed."""
    from napari_whatishealthy._widget_state import (
        MaskParams,
        NapariResult,
        ResultSession,
        prepare_for_display,
    )
    from napari_whatishealthy.core.pipeline import LocalizeResult, LocalizeSettings, remask

    rng = np.random.default_rng(0)
    shape = (12, 10, 8)
    brain = np.zeros(shape, bool)
    brain[2:10, 1:9, 1:7] = True
    difference = np.where(brain, rng.uniform(0, 1, shape), 0).astype(np.float32)
    difference[..., 1] = 0  # an unprocessed slice
    result = LocalizeResult(
        healthy=rng.uniform(0, 1, (2, *shape)).astype(np.float32), difference=difference,
        difference_per_channel=np.stack([difference] * 2), mask=(difference > 0.5).astype(np.uint8),
        brain=brain, threshold_used=0.5, provenance={},
        settings=LocalizeSettings(threshold=0.5, min_component_voxels=3, brain_only=True),
        processed_slices=np.arange(2, 7))
    view = NapariResult(result)
    copy = view.zyx("difference")
    assert copy.flags.c_contiguous and np.array_equal(copy, difference.transpose(2, 1, 0))
    assert view.zyx("difference") is copy  # made once
    assert np.array_equal(view.healthy(1), result.healthy[1].transpose(2, 1, 0))
    with pytest.raises(ValueError, match="healthy"):
        view.zyx("healthy")
    for threshold, min_size, brain_only in [(0.3, 0, True), (0.6, 3, True), (0.8, 1, False)]:
        napari_mask = view.remask(MaskParams(threshold, min_size, brain_only))
        core_mask = remask(result, threshold, min_size, brain_only)
        assert core_mask.sum() > 0
        assert np.array_equal(napari_mask, core_mask.transpose(2, 1, 0))

    # The worker's first mask is the mask of the run's own settings, used once.
    shown = prepare_for_display(result)
    session = ResultSession(shown, "flair")
    made = shown.first_mask[1]
    first = session.auto_mask(MaskParams(0.5, 3, True))
    assert first is made and shown.first_mask is None
    assert np.array_equal(first, remask(result).transpose(2, 1, 0))
    again = session.auto_mask(MaskParams(0.5, 3, True))
    assert again is not first and np.array_equal(again, first)


def test_current_slice_scope(make_napari_viewer, qtbot, lesion_case, tiny_checkpoint,
                             count_runs):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    source = viewer.layers["flair"]
    z = source.data.shape[0] // 2
    viewer.dims.set_point(0, source.data_to_world((z, 0, 0))[0])
    widget.scope_combo.setCurrentText(SCOPE_SLICE)
    _run(qtbot, widget)
    assert count_runs == [[z]]
    difference = viewer.layers["flair difference"].data
    nonzero_slices = np.flatnonzero(difference.reshape(difference.shape[0], -1).any(axis=1))
    assert set(nonzero_slices) <= {z}
    healthy = viewer.layers["flair healthy"].data
    others = np.ones(healthy.shape[0], bool)
    others[z] = False
    np.testing.assert_allclose(healthy[others], source.data[others])
    widget.scope_combo.setCurrentText(SCOPE_VOLUME)


def test_save_writes_on_the_source_grid(make_napari_viewer, qtbot, cases_copy, tiny_checkpoint,
                                        tmp_path):
    case = sorted(p for p in cases_copy.iterdir() if p.is_dir())[0]
    viewer, widget = _setup(make_napari_viewer, case, tiny_checkpoint)
    _run(qtbot, widget)
    widget.min_size.setValue(0)
    widget.threshold.setValue(0.0)
    before = _digest(case)
    out = widget.save_mask(tmp_path / "saved_mask.nii.gz")
    assert out is not None and out.exists()
    flair = nib.load(str(next(case.glob("*_flair.nii.gz"))))
    saved = nib.load(str(out))
    np.testing.assert_allclose(saved.affine, flair.affine)
    assert saved.shape == flair.shape and saved.get_data_dtype() == np.uint8
    # voxel for voxel: the saved mask, read back by the plugin, equals the layer
    (layer,) = viewer.open(str(out), plugin=PLUGIN)
    np.testing.assert_array_equal(layer.data, viewer.layers["flair mask"].data)
    # the default is next to the source with a suffix, and never the source
    from napari_whatishealthy._layers import default_mask_path

    default = default_mask_path(viewer.layers["flair mask"].metadata, "flair mask")
    assert default.parent.resolve() == case.resolve() and default.name.endswith("_mask.nii.gz")
    # saving over a source file is refused with a notification; the viewer keeps working
    assert widget.save_mask(next(case.glob("*_flair.nii.gz"))) is None
    assert "overwrite" in widget.last_error
    assert _digest(case) == before


def test_errors_are_notifications(make_napari_viewer, qtbot, lesion_case, tiny_checkpoint,
                                  tmp_path):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    # a modality whose layer is gone
    viewer.layers.remove("t2")
    assert widget._modality_combos["t2"].currentText() == ""
    assert not widget.run_button.isEnabled()
    widget.run()
    assert not widget.is_running and "t2" in widget.last_error
    # inputs on different grids
    flair = viewer.layers["flair"]
    viewer.add_image(np.ones((5, 6, 7), np.float32), name="t2")
    widget.set_input("t2", "t2")
    widget.run()
    assert not widget.is_running and "differ in shape" in widget.last_error
    # a folder that is not a checkpoint
    widget.set_model(tmp_path)
    assert not widget.run_button.isEnabled()
    assert "checkpoint" in widget.model_info.text()
    assert flair in viewer.layers and not any(name in viewer.layers for name in RESULTS)


def test_classifier_guidance_end_to_end(make_napari_viewer, qtbot, lesion_case, tiny_checkpoint,
                                        tiny_classifier, count_runs):
    from napari_whatishealthy.core.model import checkpoint_hash

    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    # No classifier by default: classifier-free guidance, and the request is as it always was.
    assert widget.classifier_edit.text() == "" and widget.classifier_path is None
    assert widget.guidance.isEnabled() and not widget.classifier_scale.isEnabled()
    request, _ = widget._build_request()
    assert request.classifier is None
    assert "method" not in request.overrides and "classifier_scale" not in request.overrides
    assert widget.classifier_edit.toolTip() and widget.classifier_scale.toolTip()
    assert (widget.classifier_scale.minimum(), widget.classifier_scale.maximum()) == (0, 1000)

    # The train-classifier output folder resolves to its checkpoint; the scale is its spec's.
    folder = (tiny_classifier / "checkpoint").resolve()
    assert widget.set_classifier(tiny_classifier)
    assert widget.classifier_path == str(folder)
    assert widget.classifier_scale.value() == pytest.approx(4.5)
    assert not widget.guidance.isEnabled() and widget.classifier_scale.isEnabled()
    assert "tiny-widget-classifier" in widget.classifier_info.text()
    widget.classifier_scale.setValue(7.0)
    _run(qtbot, widget)
    assert len(count_runs) == 1
    assert not widget.guidance.isEnabled()
    for name in RESULTS:
        prov = viewer.layers[name].metadata["provenance"]
        assert prov["settings"]["method"] == "classifier"
        assert prov["settings"]["classifier_scale"] == 7.0
        entry = prov["classifier"]
        assert entry["name"] == "tiny-widget-classifier" and entry["scale"] == 7.0
        assert Path(entry["path"]) == folder
        assert entry["sha256"] == checkpoint_hash(folder)
    # "Model defaults" puts the classifier's recommended scale back.
    widget.reset_defaults()
    assert widget.classifier_scale.value() == pytest.approx(4.5)

    # Clearing the field (its clear button) goes back to classifier-free guidance.
    widget.classifier_edit.clear()
    assert widget.classifier_path is None
    assert widget.guidance.isEnabled() and not widget.classifier_scale.isEnabled()
    request, _ = widget._build_request()
    assert request.classifier is None and "method" not in request.overrides


def test_broken_classifier_is_a_notification(make_napari_viewer, qtbot, lesion_case,
                                             tiny_checkpoint, tiny_classifier, errors_shown,
                                             tmp_path):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    names = [layer.name for layer in viewer.layers]

    # 1. A folder whose spec is not JSON: refused when chosen, and Run refuses it too.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "spec.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"junk")
    assert not widget.set_classifier(broken)
    assert len(errors_shown) == 1 and "not valid JSON" in errors_shown[0]
    assert widget.classifier_path is None and widget.guidance.isEnabled()
    assert "not valid JSON" in widget.classifier_info.text()
    widget.run()
    assert not widget.is_running and len(errors_shown) == 2
    assert "classifier is not usable" in widget.last_error
    # 2. A diffusion model checkpoint given as the classifier.
    assert not widget.set_classifier(tiny_checkpoint)
    assert "diffusion model checkpoint" in errors_shown[-1]

    # 3. A good spec with corrupt weights: the run fails with a notification, layers unchanged.
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "spec.json").write_text((tiny_classifier / "checkpoint" / "spec.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not safetensors at all")
    assert widget.set_classifier(corrupt)
    assert not widget.guidance.isEnabled()
    widget.run()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert "not a readable safetensors" in widget.last_error
    assert "not a readable safetensors" in errors_shown[-1]
    assert [layer.name for layer in viewer.layers] == names
    assert widget.run_button.isEnabled()

    # The widget keeps working: without the classifier it runs as before.
    widget.set_classifier(None)
    assert widget.guidance.isEnabled()
    _run(qtbot, widget)
    assert "classifier" not in viewer.layers["flair mask"].metadata["provenance"]


def test_screenshot_shows_the_widget_and_the_mask(make_napari_viewer, qtbot, lesion_case,
                                                  tiny_checkpoint, tmp_path):
    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint, show=True)
    _run(qtbot, widget)
    widget.min_size.setValue(0)
    widget.threshold.setValue(0.0)  # the whole brain: a mask that cannot be missed
    mask = viewer.layers["flair mask"]
    z = int(np.argmax(np.count_nonzero(mask.data.reshape(mask.data.shape[0], -1), axis=1)))
    viewer.dims.set_point(0, mask.data_to_world((z, 0, 0))[0])
    viewer.layers["flair healthy"].visible = False
    full = viewer.screenshot(canvas_only=False, flash=False)
    assert full.ndim == 3 and full.shape[0] > 100 and full.shape[1] > 300
    assert full[..., :3].std() > 10  # not a blank window
    with_mask = viewer.screenshot(canvas_only=True, flash=False)
    mask.visible = False
    without_mask = viewer.screenshot(canvas_only=True, flash=False)
    mask.visible = True
    changed = np.any(with_mask[..., :3] != without_mask[..., :3], axis=-1)
    assert changed.mean() > 0.01  # the mask is visible on the canvas
    assert without_mask[..., :3].std() > 5  # the brain itself is drawn too


def test_widget_docks_from_the_manifest(make_napari_viewer):
    """The widget contribution (Plugins menu) builds the widget with the viewer injected."""
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Lesion localization")
    assert isinstance(widget, LocalizeWidget)
    assert not widget.run_button.isEnabled()  # no model or inputs yet


def test_modality_matching_without_qt():
    from napari_whatishealthy._layer_choice import LayerInfo, match_modalities

    layers = [
        LayerInfo("BraTS_001_t1ce", {}, (4, 4, 4)),
        LayerInfo("BraTS_001_t1", {}, (4, 4, 4)),
        LayerInfo("T2", {}, (4, 4, 4)),
        LayerInfo("my scan", {"modality": "flair"}, (4, 4, 4)),
        LayerInfo("flair healthy", {"modality": "flair", "role": "healthy"}, (4, 4, 4)),
    ]
    chosen = match_modalities(("flair", "t1", "t1ce", "t2"), layers)
    assert chosen == {"flair": "my scan", "t1": "BraTS_001_t1", "t1ce": "BraTS_001_t1ce",
                      "t2": "T2"}
    assert match_modalities(("flair",), [LayerInfo("brain", {}, (4, 4, 4))]) == {"flair": "brain"}
    assert match_modalities(("flair", "t1"), [LayerInfo("brain", {}, (4, 4, 4))]) == {
        "flair": None, "t1": None}


def test_out_of_memory_is_a_clear_notification(make_napari_viewer, qtbot, lesion_case,
                                               tiny_checkpoint, monkeypatch):
    import torch

    viewer, widget = _setup(make_napari_viewer, lesion_case, tiny_checkpoint)
    names = [layer.name for layer in viewer.layers]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "iter_localize", out_of_memory)
    widget.run()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert widget.last_error.startswith("out of memory")
    assert "current-slice" in widget.last_error
    assert [layer.name for layer in viewer.layers] == names
    assert widget.run_button.isEnabled()
