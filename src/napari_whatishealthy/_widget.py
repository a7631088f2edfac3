"""The lesion-localization widget: pick a model and the input layers, run, tune, paint, save.

The widget only wires: the diffusion runs in ``core.pipeline`` inside a napari generator thread
worker (:func:`._widget_state.localize_job`, one yield per network step, so Cancel stops at the
next step); the mask, the painted corrections and the metrics come from a
:class:`._widget_state.ResultSession` on the main thread; files go through the plugin's writer.
Layers are touched only on the main thread, only when a run has finished: a cancelled or failed
run leaves every layer exactly as it was.
"""

from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from ._histogram import DifferenceHistogramView
from ._layers import default_mask_path, from_napari, source_metadata
from ._lesion_table import LesionTable, lesion_csv_path
from ._widget_state import (
    AUTO,
    InputCache,
    JobFailed,
    JobRequest,
    LayerInfo,
    MaskParams,
    ResultSession,
    StatusMessage,
    auto_model_input,
    format_metric,
    is_result_layer,
    localize_job,
    mask_provenance,
    match_modalities,
    pick_ground_truth,
)
from ._writer import prefer_this_writer, save_layer
from .core.errors import WhatIsHealthyError
from .core.volume import MODALITIES

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

NONE = "(none)"
SCOPE_VOLUME = "Whole volume"
SCOPE_SLICE = "Current slice (quick preview)"

# viewer.camera.orientation2d for the (A, R) axes of the (S, A, R) layers this plugin makes.
ORIENTATIONS = {
    "radiological (anterior up, R on the left)": ("up", "left"),
    "neurological (anterior up, R on the right)": ("up", "right"),
    "napari default (anterior down)": ("down", "right"),
}
DEFAULT_ORIENTATION = "radiological (anterior up, R on the left)"  # how scans are read clinically

TIPS = {
    "model": "The diffusion model. Automatic picks the bundled model that the open images "
    "fit (four BraTS modalities: the four-channel model; a lone FLAIR: the FLAIR model); or "
    "choose a bundled one, or a checkpoint folder (spec.json + model.safetensors, as "
    "`whatishealthy train` writes) with Browse.",
    "modality": "The modality of the open image, whose name does not say it: the automatic "
    "model choice needs it and never guesses.",
    "guidance": "Classifier-free guidance scale w: how strongly decoding is pushed toward "
    "'healthy'. Higher removes more of a lesion but may also change healthy tissue; "
    "0 decodes without the label (a plain reconstruction). Not used while a classifier is "
    "chosen (classifier guidance replaces it).",
    "classifier": "Optional: a noisy-image classifier checkpoint folder (what `whatishealthy "
    "train-classifier --out DIR` writes: DIR or DIR/checkpoint) for classifier guidance "
    "(Diff-SCM / Wolleb et al.): decoding follows the classifier's gradient toward 'healthy' "
    "instead of classifier-free guidance, and Guidance is not used. Empty (the default): "
    "classifier-free guidance, the paper's method.",
    "classifier_scale": "Classifier guidance scale s: how strongly the classifier's gradient "
    "toward 'healthy' pushes each decoding step. Higher removes more of a lesion but may also "
    "change healthy tissue; 0 decodes without guidance. Set to the classifier's recommended "
    "value when a classifier is chosen; the best value depends on the image size, the steps "
    "and the classifier, so try a few.",
    "noise": "Noise level L (0-1): how far each slice is inverted into the diffusion process "
    "before it is decoded as healthy. Higher lets the model change more (large lesions) at the "
    "cost of fine detail; lower keeps the anatomy closer to the input.",
    "steps": "DDIM steps for the inversion and for the decoding. More steps follow the model "
    "more faithfully; the run time grows in proportion.",
    "device": "Where the network runs: auto picks a CUDA GPU, then Apple MPS, then the CPU. "
    "Only the devices available on this machine are listed.",
    "scope": "Current slice: only the axial slice under the viewer's cursor, a quick preview of "
    "the settings. Whole volume: every axial slice that holds brain.",
    "threshold": "Voxels whose difference (input vs healthy, in normalised intensity units: 0.1 "
    "is 5% of the brain's 99th percentile) is above this are marked. Moving it recomputes the "
    "mask from the cached difference map: the model is not run again.",
    "min_size": "Connected components of the mask smaller than this many voxels are dropped.",
    "brain_only": "Keep the mask inside the brain (voxels that are non-zero in an input).",
    "ground_truth": "A Labels layer with the true lesion: Dice (of the mask) and AUPRC (of the "
    "difference map) are shown live, on the brain voxels of the slices that were processed.",
    "edits": "Voxels you painted or erased in the mask layer win over the threshold result and "
    "are kept when the threshold moves or the model runs again. Discard them here.",
    "save": "Write the mask as NIfTI (uint8) on the voxel grid of its source file, next to the "
    "source by default. The source file itself is never overwritten.",
}


def _layer_type_name(layer: Any) -> str:
    # ``__class__``, not ``type()``: the manifest-docked widget gets napari's PublicOnlyProxy of
    # a layer from ``viewer.layers[name]``, whose type() is the proxy's.
    return layer.__class__.__name__


def _layer_named(viewer: Any, name: str) -> Any:
    """The layer itself (not a proxy) called ``name``, or None."""
    return next((layer for layer in viewer.layers if layer.name == name), None)


class LocalizeWidget(QWidget):
    """Dock widget: healthy counterfactual, difference map and lesion mask for an MRI volume."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._spec = None
        self._model_ref: str | None = None
        self._classifier_text = ""  # the classifier field's text as last checked
        self._classifier_ref: str | None = None  # its checkpoint folder, when usable
        self._classifier_spec = None
        self._classifier_error: str | None = None
        self._session: ResultSession | None = None
        self._worker = None
        self._job_context: dict[str, Any] | None = None
        self._cancel_requested = False
        self._started = 0.0
        self._stale = False
        self._mask_layer = None
        self._modality_combos: dict[str, QComboBox] = {}
        self._input_cache = InputCache()  # the stacked, prepared inputs of the last run
        self.run_count = 0
        self.last_error: str | None = None
        self._build_ui()
        self._show_generic_defaults()
        self._timer = QTimer(self)
        self._timer.setInterval(250)
        self._timer.timeout.connect(self._tick)

        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        # A removed input layer must not stay alive in the cache (a BraTS volume is 144 MB).
        self.viewer.layers.events.removed.connect(self._input_cache.clear)
        self.viewer.layers.events.moved.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        self._populate_models()
        self._refresh_layer_choices()
        prefer_this_writer()  # File > Save Selected Layers defaults to NIfTI (see _writer)
        self.set_orientation(self.orientation_combo.currentText())
        try:  # S/A/R arrows on the canvas, so that the orientation can be read off the view
            self.viewer.axes.visible = True
            self.viewer.axes.labels = True
        except AttributeError as exc:
            log.debug("no axes overlay: %s", exc)

    # --------------------------------------------------------------------------------------------
    # Layout

    def _build_ui(self) -> None:
        # Everything scrolls: the controls are taller than a 1366 x 768 screen's dock.
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll_area = QScrollArea()
        self.scroll_area.setWidgetResizable(True)
        self.scroll_area.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll_area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        content = QWidget()
        self.scroll_area.setWidget(content)
        outer.addWidget(self.scroll_area)
        root = QVBoxLayout(content)
        root.setContentsMargins(6, 6, 6, 6)

        # Model ----------------------------------------------------------------------------------
        box = QGroupBox("Model")
        form = QFormLayout(box)
        row = QHBoxLayout()
        self.model_combo = QComboBox()
        self.model_combo.setToolTip(TIPS["model"])
        self.model_combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self.browse_button = QPushButton("Browse…")
        self.browse_button.setToolTip("Choose a checkpoint folder from disk")
        self.browse_button.clicked.connect(self._browse_model)
        row.addWidget(self.model_combo)
        row.addWidget(self.browse_button)
        form.addRow("Model", row)
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        form.addRow(self.model_info)
        root.addWidget(box)

        # Inputs ---------------------------------------------------------------------------------
        self.inputs_box = QGroupBox("Inputs")
        self.inputs_form = QFormLayout(self.inputs_box)
        self.ground_truth_combo = QComboBox()
        self.ground_truth_combo.setToolTip(TIPS["ground_truth"])
        self.ground_truth_combo.currentIndexChanged.connect(self._update_metrics)
        self.inputs_form.addRow("Ground truth", self.ground_truth_combo)
        self.modality_combo = QComboBox()  # asked only for an image whose name has no modality
        self.modality_combo.addItems(["", *MODALITIES])
        self.modality_combo.setToolTip(TIPS["modality"])
        self.modality_combo.currentIndexChanged.connect(self._on_modality_answered)
        self.modality_label = QLabel("Modality")
        self.inputs_form.addRow(self.modality_label, self.modality_combo)
        self._set_modality_question(None)
        root.addWidget(self.inputs_box)

        # Settings -------------------------------------------------------------------------------
        box = QGroupBox("Counterfactual")
        form = QFormLayout(box)
        self.guidance = QDoubleSpinBox()
        self.guidance.setRange(0.0, 50.0)
        self.guidance.setSingleStep(0.5)
        self.guidance.setDecimals(2)
        self.guidance.setToolTip(TIPS["guidance"])
        form.addRow("Guidance", self.guidance)
        row = QHBoxLayout()
        self.classifier_edit = QLineEdit()
        self.classifier_edit.setPlaceholderText("none: classifier-free guidance")
        self.classifier_edit.setClearButtonEnabled(True)
        self.classifier_edit.setToolTip(TIPS["classifier"])
        self.classifier_edit.editingFinished.connect(self._on_classifier_edited)
        self.classifier_edit.textChanged.connect(self._on_classifier_text_changed)
        self.classifier_browse_button = QPushButton("Browse…")
        self.classifier_browse_button.setToolTip("Choose a classifier checkpoint folder")
        self.classifier_browse_button.clicked.connect(self._browse_classifier)
        row.addWidget(self.classifier_edit)
        row.addWidget(self.classifier_browse_button)
        form.addRow("Classifier", row)
        self.classifier_scale = QDoubleSpinBox()
        self.classifier_scale.setRange(0.0, 1000.0)
        self.classifier_scale.setSingleStep(1.0)
        self.classifier_scale.setDecimals(2)
        self.classifier_scale.setToolTip(TIPS["classifier_scale"])
        self.classifier_scale.setEnabled(False)
        form.addRow("Classifier scale", self.classifier_scale)
        self.classifier_info = QLabel("")
        self.classifier_info.setWordWrap(True)
        self.classifier_info.setVisible(False)
        form.addRow(self.classifier_info)
        self.noise_level = QDoubleSpinBox()
        self.noise_level.setRange(0.01, 1.0)
        self.noise_level.setSingleStep(0.05)
        self.noise_level.setDecimals(2)
        self.noise_level.setToolTip(TIPS["noise"])
        form.addRow("Noise level", self.noise_level)
        self.steps = QSpinBox()
        self.steps.setRange(1, 1000)
        self.steps.setToolTip(TIPS["steps"])
        form.addRow("Steps", self.steps)
        self.device_combo = QComboBox()
        self.device_combo.setToolTip(TIPS["device"])
        from .core.device import available_devices

        self.device_combo.addItems(available_devices())
        form.addRow("Device", self.device_combo)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems([SCOPE_VOLUME, SCOPE_SLICE])
        self.scope_combo.setToolTip(TIPS["scope"])
        form.addRow("Scope", self.scope_combo)
        self.defaults_button = QPushButton("Model defaults")
        self.defaults_button.setToolTip("Set guidance, noise level and steps to the model's "
                                        "recommended values (and the classifier scale to the "
                                        "classifier's)")
        self.defaults_button.clicked.connect(self.reset_defaults)
        form.addRow(self.defaults_button)
        for spin in (self.guidance, self.classifier_scale, self.noise_level, self.steps):
            spin.valueChanged.connect(self._mark_stale)
        root.addWidget(box)

        # Run ------------------------------------------------------------------------------------
        row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Make the healthy counterfactual, the difference map and the "
                                   "mask (in a background thread)")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop at the next diffusion step; the layers stay as they "
                                      "were before this run")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        root.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("step %v / %m")
        root.addWidget(self.progress)
        self.status = QLabel("Ready")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        self.stale_label = QLabel("Settings changed since this result: Run to update it.")
        self.stale_label.setStyleSheet("color: #e0a030;")
        self.stale_label.setWordWrap(True)
        self.stale_label.setVisible(False)
        root.addWidget(self.stale_label)

        # Result ---------------------------------------------------------------------------------
        self.result_box = QGroupBox("Mask")
        form = QFormLayout(self.result_box)
        self.threshold = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.threshold.setDecimals(4)
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setToolTip(TIPS["threshold"])
        self.threshold.valueChanged.connect(self._on_mask_params_changed)
        form.addRow("Threshold", self.threshold)
        self.histogram = DifferenceHistogramView()
        self.histogram.threshold_picked.connect(self.threshold.setValue)
        form.addRow(self.histogram)
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 10_000_000)
        self.min_size.setToolTip(TIPS["min_size"])
        self.min_size.valueChanged.connect(self._on_mask_params_changed)
        form.addRow("Min component (voxels)", self.min_size)
        self.brain_only = QCheckBox("Restrict to the brain")
        self.brain_only.setChecked(True)
        self.brain_only.setToolTip(TIPS["brain_only"])
        self.brain_only.toggled.connect(self._on_mask_params_changed)
        form.addRow(self.brain_only)
        row = QHBoxLayout()
        self.edits_label = QLabel("No painted edits")
        self.edits_label.setToolTip(TIPS["edits"])
        self.discard_button = QPushButton("Discard edits")
        self.discard_button.setToolTip(TIPS["edits"])
        self.discard_button.setEnabled(False)
        self.discard_button.clicked.connect(self.discard_edits)
        row.addWidget(self.edits_label)
        row.addWidget(self.discard_button)
        form.addRow(row)
        self.mask_size_label = QLabel("")
        form.addRow(self.mask_size_label)
        self.metrics_label = QLabel("")
        self.metrics_label.setToolTip(TIPS["ground_truth"])
        form.addRow(self.metrics_label)
        self.lesion_table = LesionTable(self.viewer)
        form.addRow(self.lesion_table)
        self.save_button = QPushButton("Save mask…")
        self.save_button.setToolTip(TIPS["save"])
        self.save_button.clicked.connect(lambda: self.save_mask())
        form.addRow(self.save_button)
        self.result_box.setEnabled(False)
        root.addWidget(self.result_box)

        row = QHBoxLayout()
        row.addWidget(QLabel("Axial view"))
        self.orientation_combo = QComboBox()
        self.orientation_combo.addItems(list(ORIENTATIONS))
        self.orientation_combo.setToolTip(
            "How the viewer shows axial slices of volumes opened by this plugin (world "
            "coordinates are RAS mm): napari's default puts anterior at the bottom"
        )
        self.orientation_combo.currentTextChanged.connect(self.set_orientation)
        row.addWidget(self.orientation_combo)
        root.insertLayout(0, row)  # first: it is how every slice is read
        root.addStretch(1)

    # --------------------------------------------------------------------------------------------
    # Model

    def _populate_models(self) -> None:
        from .core.registry import bundled_models

        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        bundled = bundled_models()
        if bundled:
            self.model_combo.addItem("Automatic (by the open images)", AUTO)
        for name, path in bundled.items():
            self.model_combo.addItem(f"{name} (bundled)", str(path))
        self.model_combo.blockSignals(False)
        if self.model_combo.count():
            self.model_combo.setCurrentIndex(0)
            self._on_model_changed()
        else:
            self.model_info.setText("No model is bundled in this installation: choose a "
                                    "checkpoint folder with Browse…")
            self._update_run_enabled()

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a checkpoint folder")
        if folder:
            self.set_model(folder)

    def set_model(self, path: str | Path) -> None:
        """Select a checkpoint folder (added to the list if new), a bundled model's folder, or
        ``"auto"``."""
        text = str(path) if str(path) == AUTO else str(Path(path).expanduser())
        index = self.model_combo.findData(text)
        if index < 0:
            self.model_combo.addItem(text, text)
            index = self.model_combo.count() - 1
        if index == self.model_combo.currentIndex():
            self._on_model_changed()
        else:
            self.model_combo.setCurrentIndex(index)

    @property
    def is_auto_model(self) -> bool:
        return self.model_combo.currentData() == AUTO

    def _on_model_changed(self, *_: Any) -> None:
        ref = self.model_combo.currentData()
        if ref == AUTO:
            self._choose_auto_model(force=True)
        else:
            self._set_modality_question(None)
            self._use_model(ref, None)
        self._update_run_enabled()

    def _use_model(self, ref: str | None, reason: str | None) -> None:
        """Load the spec of checkpoint ``ref`` (None: no model) and rebuild what depends on it."""
        from .core.model import load_spec
        from .core.registry import resolve_model

        self._spec = None
        self._model_ref = None
        if ref:
            try:
                folder = resolve_model(ref)
                spec = load_spec(folder)
            except WhatIsHealthyError as exc:
                self.model_info.setText(f"<span style='color:#e05050'>{exc}</span>")
            else:
                self._spec = spec
                self._model_ref = str(folder)
                self.model_info.setText(self._model_info_with(reason))
                self.reset_defaults()
        self._rebuild_modality_rows()
        self._update_classifier_info()
        self._mark_stale()

    def _choose_auto_model(self, force: bool = False) -> None:
        """Automatic model: the bundled model the open images fit (see core.model_choice)."""
        from .core.errors import InputError
        from .core.model_choice import choose_model
        from .core.registry import DEFAULT_MODEL, resolve_model

        infos = [LayerInfo(layer.name, dict(layer.metadata), tuple(layer.data.shape))
                 for layer in self._image_layers()]
        wanted = auto_model_input(infos, self.modality_combo.currentText() or None)
        self._set_modality_question(wanted.ask_about or self._modality_asked_for(infos))
        reason: str | None
        if wanted.ask_about is not None:
            folder, reason = None, (
                f"<span style='color:#e0a030'>The image '{wanted.ask_about}' has no modality in "
                "its name: choose its Modality under Inputs to pick a model.</span>")
        elif not wanted.available:
            folder = str(resolve_model(DEFAULT_MODEL))
            reason = "Automatic: the default model until images are opened."
        else:
            try:
                choice = choose_model(wanted.available)
            except InputError as exc:
                folder, reason = None, f"<span style='color:#e05050'>{exc}</span>"
            else:
                folder, reason = str(choice.folder), f"Model {choice.reason}."
        if folder is None:
            if force or self._spec is not None:
                self._use_model(None, None)
            self.model_info.setText(reason)
            return
        if force or folder != self._model_ref:
            self._use_model(folder, reason)
        else:
            self.model_info.setText(self._model_info_with(reason))

    def _model_info_with(self, reason: str | None) -> str:
        spec = self._spec
        if spec is None:
            return reason or ""
        return ((f"{reason}<br>" if reason else "")
                + f"{spec.name}: {spec.image_size}×{spec.image_size} slices, "
                f"channels {', '.join(spec.modalities)}"
                + (f"<br><i>{spec.description}</i>" if spec.description else ""))

    def _modality_asked_for(self, infos: list[LayerInfo]) -> str | None:
        """Keep the Modality question showing once answered, while its image is still the only
        kind of input (so that the answer can be changed)."""
        if self.modality_combo.currentText() and infos and not any(
            auto_model_input([info], None).available for info in infos
        ):
            return infos[0].name
        return None

    def _set_modality_question(self, layer_name: str | None) -> None:
        visible = layer_name is not None
        self.modality_label.setVisible(visible)
        self.modality_combo.setVisible(visible)
        if visible:
            self.modality_label.setText(f"Modality of '{layer_name}'")
        elif self.modality_combo.currentText():
            self.modality_combo.blockSignals(True)
            self.modality_combo.setCurrentIndex(0)
            self.modality_combo.blockSignals(False)

    def _on_modality_answered(self, *_: Any) -> None:
        if self.is_auto_model:
            self._choose_auto_model()
            self._update_run_enabled()

    def _show_generic_defaults(self) -> None:
        """Settings before any model is chosen: the spec defaults every model starts from, not
        the spin boxes' minimums (which would read as a choice)."""
        from .core.settings import LocalizeSettings

        self._show_settings(LocalizeSettings(), min_size=True)

    def reset_defaults(self) -> None:
        """Guidance, noise level, steps (and min component size) from the model's spec; the
        classifier scale from the classifier's spec."""
        if self._classifier_spec is not None:
            self.classifier_scale.setValue(float(self._classifier_spec.inference.scale))
        if self._spec is not None:
            self._show_settings(self._spec.inference, min_size=self._session is None)

    def _show_settings(self, settings: Any, min_size: bool) -> None:
        self.guidance.setValue(float(settings.guidance))
        self.noise_level.setValue(float(settings.noise_level))
        self.steps.setValue(int(settings.steps))
        if min_size:
            self.min_size.blockSignals(True)
            self.min_size.setValue(int(settings.min_component_voxels))
            self.min_size.blockSignals(False)

    # --------------------------------------------------------------------------------------------
    # Classifier guidance (optional)

    def _browse_classifier(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a classifier checkpoint folder")
        if folder:
            self.set_classifier(folder)

    def set_classifier(self, path: str | Path | None) -> bool:
        """Choose a classifier checkpoint for classifier guidance (None or "": none, i.e.
        classifier-free guidance). Returns whether it is usable; if not, says why in a
        notification and runs are refused until it is fixed or cleared."""
        text = "" if path is None else str(path)
        self.classifier_edit.blockSignals(True)
        self.classifier_edit.setText(text)
        self.classifier_edit.blockSignals(False)
        return self._apply_classifier(text)

    @property
    def classifier_path(self) -> str | None:
        """The chosen classifier's checkpoint folder (None: classifier-free guidance)."""
        return self._classifier_ref

    def _on_classifier_text_changed(self, text: str) -> None:
        if not text.strip() and self._classifier_text:  # cleared: back to no classifier at once
            self._apply_classifier("")

    def _on_classifier_edited(self) -> None:
        text = self.classifier_edit.text().strip()
        if text != self._classifier_text:
            self._apply_classifier(text)

    def _apply_classifier(self, text: str, notify: bool = True) -> bool:
        from .core.classifier import load_classifier_spec, resolve_classifier

        text = text.strip()
        self._classifier_text = text
        self._classifier_ref = None
        self._classifier_spec = None
        self._classifier_error = None
        if text:
            try:
                folder = resolve_classifier(text)
                spec = load_classifier_spec(folder)
            except WhatIsHealthyError as exc:
                self._classifier_error = str(exc)
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                # a spec.json of the right format whose contents are malformed
                self._classifier_error = f"{text}: unreadable classifier spec ({exc})"
            else:
                self._classifier_ref = str(folder)
                self._classifier_spec = spec
                self.classifier_scale.setValue(float(spec.inference.scale))
            if self._classifier_error is not None and notify:
                self._notify_error(f"classifier not usable: {self._classifier_error}")
        using = self._classifier_ref is not None
        self.guidance.setEnabled(not using)
        self.classifier_scale.setEnabled(using)
        self._update_classifier_info()
        self._mark_stale()
        return using

    def _update_classifier_info(self) -> None:
        """The line under the classifier: what it is, why it is not usable, or a mismatch."""
        from .core.classifier import check_compatible

        cspec = self._classifier_spec
        if self._classifier_error is not None:
            text = f"<span style='color:#e05050'>{self._classifier_error}</span>"
        elif cspec is not None:
            text = (f"{cspec.name}: classifier guidance ({cspec.image_size}×{cspec.image_size}, "
                    f"channels {', '.join(cspec.modalities)}); Guidance is not used")
            try:
                check_compatible(cspec, self._spec)
            except WhatIsHealthyError as exc:
                text += f"<br><span style='color:#e0a030'>{exc}</span>"
        else:
            text = ""
        self.classifier_info.setText(text)
        self.classifier_info.setVisible(bool(text))

    # --------------------------------------------------------------------------------------------
    # Layer choices

    def _rebuild_modality_rows(self) -> None:
        for combo in self._modality_combos.values():
            self.inputs_form.removeRow(combo)
        self._modality_combos = {}
        modalities = tuple(self._spec.modalities) if self._spec is not None else ()
        for i, modality in enumerate(modalities):
            combo = QComboBox()
            combo.setToolTip(f"The image layer holding the model's '{modality}' channel "
                             "(matched by name; change it if the match is wrong)")
            combo.currentIndexChanged.connect(self._on_inputs_changed)
            self.inputs_form.insertRow(i, modality, combo)
            self._modality_combos[modality] = combo
        self._refresh_layer_choices(rematch=True)

    def _image_layers(self) -> list[Any]:
        return [
            layer for layer in self.viewer.layers
            if _layer_type_name(layer) == "Image" and layer.ndim == 3 and not layer.rgb
            and not is_result_layer(layer.metadata)
        ]

    def _labels_layers(self) -> list[Any]:
        return [
            layer for layer in self.viewer.layers
            if _layer_type_name(layer) == "Labels" and layer.ndim == 3
            and not is_result_layer(layer.metadata)
        ]

    def _on_layers_changed(self, event: Any = None) -> None:
        try:
            if event is not None and getattr(event, "type", "") == "inserted":
                event.value.events.name.connect(self._on_layers_changed)
            if self.is_auto_model:  # the open images decide the model: it may change
                self._choose_auto_model()
            self._refresh_layer_choices()
        except RuntimeError:  # the widget was deleted while the viewer lives on
            pass

    def _refresh_layer_choices(self, rematch: bool = False) -> None:
        images = self._image_layers()
        names = [layer.name for layer in images]
        infos = [LayerInfo(layer.name, dict(layer.metadata), tuple(layer.data.shape))
                 for layer in images]
        auto = match_modalities(tuple(self._modality_combos), infos)
        for modality, combo in self._modality_combos.items():
            current = combo.currentText()
            keep = current if (current in names and not rematch) else (auto.get(modality) or "")
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(["", *names])
            combo.setCurrentText(keep)
            combo.blockSignals(False)

        labels = self._labels_layers()
        current = self.ground_truth_combo.currentText()
        label_names = [layer.name for layer in labels]
        if current not in label_names:
            shape = self._input_shape()
            current = pick_ground_truth(
                [LayerInfo(layer.name, dict(layer.metadata), tuple(layer.data.shape))
                 for layer in labels],
                shape,
            ) or NONE
        self.ground_truth_combo.blockSignals(True)
        self.ground_truth_combo.clear()
        self.ground_truth_combo.addItems([NONE, *label_names])
        self.ground_truth_combo.setCurrentText(current)
        self.ground_truth_combo.blockSignals(False)
        self._update_run_enabled()
        self._update_metrics()

    def _input_shape(self) -> tuple[int, ...] | None:
        for combo in self._modality_combos.values():
            name = combo.currentText()
            if name and name in self.viewer.layers:
                return tuple(self.viewer.layers[name].data.shape)
        return None

    def _on_inputs_changed(self, *_: Any) -> None:
        self._mark_stale()
        self._update_run_enabled()

    def input_layers(self) -> dict[str, Any]:
        """Modality -> the chosen image layer (only modalities with a choice)."""
        chosen = {}
        for modality, combo in self._modality_combos.items():
            name = combo.currentText()
            if name and name in self.viewer.layers:
                chosen[modality] = self.viewer.layers[name]
        return chosen

    def set_input(self, modality: str, layer_name: str) -> None:
        self._modality_combos[modality].setCurrentText(layer_name)

    def set_ground_truth(self, layer_name: str | None) -> None:
        self.ground_truth_combo.setCurrentText(layer_name or NONE)

    # --------------------------------------------------------------------------------------------
    # Running

    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def _update_run_enabled(self) -> None:
        ready = (
            self._spec is not None
            and bool(self._modality_combos)
            and all(c.currentText() for c in self._modality_combos.values())
        )
        self.run_button.setEnabled(ready and not self.is_running)
        self.cancel_button.setEnabled(self.is_running)

    def _build_request(self) -> tuple[JobRequest, dict[str, Any]]:
        if self._spec is None or self._model_ref is None:
            raise WhatIsHealthyError("choose a model first (a bundled one or a checkpoint folder)")
        text = self.classifier_edit.text().strip()
        if text != self._classifier_text:  # typed but not confirmed yet
            self._apply_classifier(text, notify=False)
        if text and self._classifier_ref is None:
            raise WhatIsHealthyError(
                f"the classifier is not usable: {self._classifier_error} (fix it, or clear the "
                "Classifier field for classifier-free guidance)"
            )
        layers = self.input_layers()
        missing = [m for m in self._spec.modalities if m not in layers]
        if missing:
            raise WhatIsHealthyError(
                f"no image layer chosen for {', '.join(missing)}: the model needs "
                f"{', '.join(self._spec.modalities)}; open them or pick them under Inputs"
            )
        reference = layers[self._spec.modalities[0]]
        shapes = {m: tuple(layer.data.shape) for m, layer in layers.items()}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{m} {s}" for m, s in shapes.items())
            raise WhatIsHealthyError(
                f"the input layers differ in shape ({listed}): the modalities must be "
                "co-registered on one grid"
            )
        for m, layer in layers.items():
            if not np.allclose(layer.scale, reference.scale) or not np.allclose(
                layer.translate, reference.translate
            ):
                raise WhatIsHealthyError(
                    f"layer '{layer.name}' ({m}) is not on the grid of '{reference.name}' "
                    "(different scale or position): the modalities must be co-registered"
                )
        data = self._input_cache.data(
            [layers[m].data for m in self._spec.modalities],
            lambda: np.stack(
                [from_napari(layers[m].data).astype(np.float32) for m in self._spec.modalities]
            ),
        )
        z_slices = None
        if self.scope_combo.currentText() == SCOPE_SLICE:
            z = self._current_axial_index(reference)
            z_slices = [z]
        threshold = self.threshold.value() if self._session is not None else None
        overrides = {
            "guidance": float(self.guidance.value()),
            "noise_level": float(self.noise_level.value()),
            "steps": int(self.steps.value()),
            "min_component_voxels": int(self.min_size.value()),
            "brain_only": bool(self.brain_only.isChecked()),
            "threshold": threshold,
        }
        if self._classifier_ref is not None:
            overrides["method"] = "classifier"
            overrides["classifier_scale"] = float(self.classifier_scale.value())
        inputs = tuple(
            str(layers[m].metadata["source_path"])
            for m in self._spec.modalities if layers[m].metadata.get("source_path")
        )
        request = JobRequest(
            model=self._model_ref, device=self.device_combo.currentText(), data=data,
            overrides=overrides, z_slices=z_slices, inputs=inputs,
            classifier=self._classifier_ref, cache=self._input_cache,
        )
        context = {
            "source_name": reference.name,
            "geometry": {
                "scale": tuple(reference.scale),
                "translate": tuple(reference.translate),
                "rotate": np.array(reference.rotate),
                "shear": np.array(reference.shear),
                "affine": np.array(reference.affine.affine_matrix),
                "units": tuple(str(u) for u in reference.units),
                "axis_labels": tuple(reference.axis_labels),
            },
            "metadata": source_metadata(reference.metadata),
            "contrast_limits": tuple(reference.contrast_limits),
            "input_layers": {m: layer.name for m, layer in layers.items()},
            "z_slices": z_slices,
        }
        return request, context

    def _current_axial_index(self, layer: Any) -> int:
        coords = layer.world_to_data(self.viewer.dims.point)
        z = int(round(float(np.asarray(coords)[0])))
        return int(np.clip(z, 0, layer.data.shape[0] - 1))

    def run(self) -> None:
        """Start a run in a background thread (does nothing while one is going)."""
        if self.is_running:
            return
        from napari.qt.threading import create_worker

        try:
            request, context = self._build_request()
        except WhatIsHealthyError as exc:
            self._notify_error(str(exc))
            return
        self._job_context = context
        self._cancel_requested = False
        self.last_error = None
        worker = create_worker(localize_job, request, _start_thread=False)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.aborted.connect(self._on_aborted)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.run_count += 1
        self._started = time.monotonic()
        self.progress.setRange(0, 0)  # busy until the first step
        self.status.setText("Starting…")
        self._update_run_enabled()
        self._timer.start()
        self._watch_window_close()
        worker.start()

    def _watch_window_close(self) -> None:
        """Stop a run when the viewer's window closes (see :meth:`stop_worker`)."""
        window = self.window()
        watched = getattr(self, "_watched_window", None)
        if window is not self and (watched is None or watched() is not window):
            window.installEventFilter(self)
            self._watched_window = weakref.ref(window)  # a strong one would keep the viewer

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Close and self._worker is not None:
            ref = getattr(self, "_watched_window", None)
            if ref is not None and watched is ref():
                self.stop_worker()
        return super().eventFilter(watched, event)

    def stop_worker(self, timeout_s: float = 60.0) -> bool:
        """Quit a running job and wait (up to ``timeout_s``) until its thread has ended, so that
        nothing emits into a closed window. The result of a run stopped so is dropped. Returns
        whether no job is left running."""
        worker = self._worker
        if worker is None:
            return True
        self._cancel_requested = True
        for signal in (worker.yielded, worker.returned, worker.aborted, worker.errored):
            try:
                signal.disconnect()
            except (RuntimeError, TypeError):
                pass
        worker.quit()
        deadline = time.monotonic() + timeout_s
        from qtpy.QtWidgets import QApplication

        while worker.is_running and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.01)
        self._timer.stop()
        return not worker.is_running

    def cancel(self) -> None:
        """Stop the run at its next step; the layers are left as they were."""
        if self._worker is None:
            return
        self._cancel_requested = True
        self.status.setText("Cancelling at the next step…")
        self._worker.quit()

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._started:.1f} s"

    def _tick(self) -> None:
        if self.is_running:
            text = self.status.text().split(" · ")[0]
            self.status.setText(f"{text} · {self._elapsed()}")

    def _on_yielded(self, item: Any) -> None:
        if isinstance(item, StatusMessage):
            self.status.setText(f"{item.text[:1].upper()}{item.text[1:]}… · {self._elapsed()}")
            return
        step, total = int(getattr(item, "step", 0)), int(getattr(item, "total", 0))
        phase = getattr(item, "phase", "")
        if total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(step)
        verb = {"invert": "Inverting", "decode": "Decoding to healthy"}.get(phase, phase)
        self.status.setText(f"{verb}: step {step} of {total} · {self._elapsed()}")

    def _on_returned(self, value: Any) -> None:
        if self._cancel_requested:  # cancelled after the last step: keep the layers as they were
            self.status.setText(f"Cancelled after {self._elapsed()}: the layers are unchanged")
            return
        if isinstance(value, JobFailed):
            self._notify_error(value.message)
            self.status.setText(f"Failed: {value.message}")
            return
        if value is None:
            return
        try:
            self._apply_result(value, self._job_context or {})
        except WhatIsHealthyError as exc:
            self._notify_error(str(exc))
            return
        seconds = time.monotonic() - self._started
        z_slices = (self._job_context or {}).get("z_slices")
        scope = f"axial slice {z_slices[0]}" if z_slices else "whole volume"
        self.status.setText(f"Done in {seconds:.1f} s ({scope})")
        for warning in getattr(value, "warnings", []) or []:
            from napari.utils.notifications import show_warning

            show_warning(f"What is Healthy?: {warning}")

    def _on_aborted(self) -> None:
        self.status.setText(f"Cancelled after {self._elapsed()}: the layers are unchanged")

    def _on_errored(self, exc: BaseException) -> None:
        # napari's worker already shows the exception as a notification (with its traceback).
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.status.setText(f"Failed: {self.last_error}")

    def _on_finished(self) -> None:
        self._timer.stop()
        self._worker = None
        self._job_context = None
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
        self._update_run_enabled()

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.last_error = message
        show_error(f"What is Healthy?: {message}")

    # --------------------------------------------------------------------------------------------
    # Results -> layers

    def _result_name(self, source: str, role: str) -> str:
        return f"{source} {role}"

    def _apply_result(self, result: Any, context: dict[str, Any]) -> None:
        source = context.get("source_name", "image")
        reference_channel = 0
        session = ResultSession(result, source, reference_channel)
        previous = self._session
        same_source = previous is not None and previous.source_name == source
        kept = session.adopt_edits(previous) if same_source else False
        self._session = session

        low, high = session.difference_range()
        self.threshold.blockSignals(True)
        self.threshold.setRange(low, high)
        self.threshold.setValue(float(result.threshold_used))
        self.threshold.blockSignals(False)
        self.min_size.blockSignals(True)
        self.min_size.setValue(int(result.settings.min_component_voxels))
        self.min_size.blockSignals(False)
        self.brain_only.blockSignals(True)
        self.brain_only.setChecked(bool(result.settings.brain_only))
        self.brain_only.blockSignals(False)

        params = self.mask_params()
        provenance = dict(result.provenance)
        provenance["source_layer"] = source
        provenance["input_layers"] = context.get("input_layers", {})
        base = context.get("metadata", {})
        geometry = context.get("geometry", {})

        self._upsert_layer(
            "image", self._result_name(source, "healthy"), session.healthy(), geometry,
            {**base, "role": "healthy", "provenance": provenance},
            new={"colormap": "gray", "contrast_limits": context.get("contrast_limits"),
                 "visible": False, "above": source},
            update={},
        )
        limits = session.display_limits()
        self._upsert_layer(
            "image", self._result_name(source, "difference"), session.difference(), geometry,
            {**base, "role": "difference", "provenance": provenance},
            new={"colormap": "inferno", "contrast_limits": limits, "blending": "additive",
                 "visible": False, "above": source},
            update={"contrast_limits": limits},
        )
        mask = session.mask(params)
        mask_meta = {**base, "role": "mask", "provenance": provenance,
                     "mask": mask_provenance(session, params)}
        layer = self._upsert_layer(
            "labels", self._result_name(source, "mask"), mask, geometry, mask_meta,
            new={"opacity": 0.6}, update={},
        )
        self._watch_mask_layer(layer)
        uncertainty = self._show_uncertainty(result, source, geometry, base, provenance)
        self.histogram.set_histogram(session.histogram())
        self.histogram.set_current(params.threshold)
        self.lesion_table.bind(layer, session.difference(), uncertainty)
        self._stale = False
        self.stale_label.setVisible(False)
        self.result_box.setEnabled(True)
        self._update_edits_label()
        self._update_metrics()
        if kept:
            from napari.utils.notifications import show_info

            show_info(f"What is Healthy?: kept your {session.n_edits} painted voxel(s) on the "
                      "new mask (Discard edits to drop them)")

    def _show_uncertainty(self, result: Any, source: str, geometry: dict[str, Any],
                          base: dict[str, Any], provenance: dict[str, Any]) -> Any:
        """The ``<image> uncertainty`` layer when the run made an uncertainty map (hidden at
        first); returns the map in napari order, or None."""
        uncertainty = getattr(result, "uncertainty", None)
        if uncertainty is None:
            return None
        data = np.ascontiguousarray(np.asarray(uncertainty, np.float32).transpose(2, 1, 0))
        positive = data[data > 0]
        top = float(np.percentile(positive, 99.5)) if positive.size else 1.0
        self._upsert_layer(
            "image", self._result_name(source, "uncertainty"), data, geometry,
            {**base, "role": "uncertainty", "provenance": provenance},
            new={"colormap": "viridis", "contrast_limits": (0.0, top or 1.0),
                 "blending": "additive", "visible": False, "above": source},
            update={},
        )
        return data

    def _upsert_layer(
        self,
        kind: str,
        name: str,
        data: np.ndarray,
        geometry: dict[str, Any],
        metadata: dict[str, Any],
        new: dict[str, Any],
        update: dict[str, Any],
    ) -> Any:
        """Update the layer called ``name`` in place, or add it with the source's geometry."""
        existing = _layer_named(self.viewer, name)
        wanted = "Image" if kind == "image" else "Labels"
        if existing is not None and (
            _layer_type_name(existing) != wanted or tuple(existing.data.shape) != data.shape
        ):
            index = self.viewer.layers.index(existing)
            self.viewer.layers.remove(existing)
            existing = None
        else:
            index = None
        if existing is not None:
            existing.data = data
            existing.metadata = metadata
            for key, value in update.items():
                setattr(existing, key, value)
            existing.refresh()
            return existing
        kwargs = {k: v for k, v in {**geometry, **new}.items() if v is not None}
        above = kwargs.pop("above", None)  # new image results sit just above their source,
        # under the ground truth and the mask, so that the mask is drawn over the scan
        kwargs["name"] = name
        kwargs["metadata"] = metadata
        if kind == "image":
            layer = self.viewer.add_image(data, **kwargs)
        else:
            layer = self.viewer.add_labels(data, **kwargs)
        if index is not None:
            self.viewer.layers.move(self.viewer.layers.index(layer), index)
        elif above is not None and _layer_named(self.viewer, above) is not None:
            target = self.viewer.layers.index(_layer_named(self.viewer, above)) + 1
            self.viewer.layers.move(self.viewer.layers.index(layer), target)
        return layer

    def _watch_mask_layer(self, layer: Any) -> None:
        if self._mask_layer is layer:
            return
        if self._mask_layer is not None:
            try:
                self._mask_layer.events.paint.disconnect(self._on_mask_painted)
            except (RuntimeError, TypeError, ValueError):
                pass
        self._mask_layer = layer
        layer.events.paint.connect(self._on_mask_painted)

    def mask_layer(self) -> Any:
        """The current mask layer (None if there is none or the user removed it)."""
        layer = self._mask_layer
        if layer is None or layer not in self.viewer.layers:
            return None
        return layer

    # --------------------------------------------------------------------------------------------
    # Threshold, edits, metrics

    def mask_params(self) -> MaskParams:
        return MaskParams(
            threshold=float(self.threshold.value()),
            min_component_voxels=int(self.min_size.value()),
            brain_only=bool(self.brain_only.isChecked()),
        )

    def _on_mask_params_changed(self, *_: Any) -> None:
        self.recompute_mask()

    def recompute_mask(self) -> None:
        """The mask from the cached difference map and the current threshold, plus the edits."""
        session, layer = self._session, self.mask_layer()
        if session is None or layer is None:
            return
        session.record_edits(layer.data)  # never lose a stroke the paint event did not report
        params = self.mask_params()
        layer.data = session.mask(params)
        metadata = dict(layer.metadata)
        metadata["mask"] = mask_provenance(session, params)
        layer.metadata = metadata
        self.histogram.set_current(params.threshold)
        self._update_edits_label()
        self._update_metrics()

    def _on_mask_painted(self, event: Any = None) -> None:
        # napari emits `paint` before it writes a single (non-stroke) edit into the array: look
        # at the data once the current event is done.
        try:
            QTimer.singleShot(0, self._record_painted)
        except RuntimeError:  # the widget is gone
            pass

    def _record_painted(self) -> None:
        session, layer = self._session, self.mask_layer()
        if session is None or layer is None:
            return
        if session.record_edits(layer.data):
            self._update_edits_label()
            self._update_metrics()

    def discard_edits(self) -> None:
        """Drop the painted corrections and show the threshold result again."""
        if self._session is None:
            return
        layer = self.mask_layer()
        if layer is not None:
            self._session.record_edits(layer.data)
        self._session.discard_edits()
        self.recompute_mask()

    def _update_edits_label(self) -> None:
        n = self._session.n_edits if self._session is not None else 0
        if n:
            self.edits_label.setText(f"{n} painted voxel(s) kept over the threshold")
        else:
            self.edits_label.setText("No painted edits")
        self.discard_button.setEnabled(n > 0)

    def _ground_truth_layer(self) -> Any:
        name = self.ground_truth_combo.currentText()
        if not name or name == NONE or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def current_metrics(self) -> dict[str, float] | None:
        """Dice of the mask and AUPRC of the difference map against the ground truth."""
        session, layer, truth = self._session, self.mask_layer(), self._ground_truth_layer()
        if session is None or layer is None or truth is None:
            return None
        truth_data = np.asarray(truth.data)
        if truth_data.shape != tuple(layer.data.shape):
            raise WhatIsHealthyError(
                f"the ground truth '{truth.name}' {truth_data.shape} is not on the mask's grid "
                f"{tuple(layer.data.shape)}"
            )
        key = (id(session), truth.name, id(truth.data))
        return {
            "dice": session.dice(layer.data, truth_data),
            "auprc": session.auprc(truth_data, key=key),
        }

    def _update_mask_size(self) -> None:
        layer = self.mask_layer()
        if layer is None:
            self.mask_size_label.setText("")
            return
        count = int(np.count_nonzero(layer.data))
        voxel_ml = float(np.prod(np.abs(layer.scale))) / 1000.0  # scale in mm
        self.mask_size_label.setText(f"Mask: {count:,} voxels ({count * voxel_ml:.1f} mL)")

    def _update_metrics(self, *_: Any) -> None:
        self._update_mask_size()
        try:
            values = self.current_metrics()
        except WhatIsHealthyError as exc:
            self.metrics_label.setText(f"<span style='color:#e0a030'>{exc}</span>")
            return
        if values is None:
            self.metrics_label.setText("Choose a ground truth under Inputs for Dice and AUPRC"
                                       if self._session is not None else "")
            return
        where = " (previewed slice)" if self._job_scope_is_slice() else ""
        self.metrics_label.setText(
            f"<b>Dice {format_metric(values['dice'])}</b> · "
            f"AUPRC {format_metric(values['auprc'])}{where}"
        )

    def _job_scope_is_slice(self) -> bool:
        if self._session is None:
            return False
        result = self._session.result
        return 0 < len(result.processed_slices) <= 1 and result.provenance.get("z_slices")

    def _mark_stale(self, *_: Any) -> None:
        if self._session is not None:
            self._stale = True
            self.stale_label.setVisible(True)

    def set_orientation(self, name: str) -> None:
        """Orient the 2D view (a choice of ORIENTATIONS); the data are not flipped."""
        orientation = ORIENTATIONS.get(name)
        if orientation is None:
            return
        try:
            self.viewer.camera.orientation2d = orientation
        except (AttributeError, ValueError) as exc:  # older napari
            log.debug("cannot set the camera orientation: %s", exc)

    # --------------------------------------------------------------------------------------------
    # Saving

    def save_mask(self, path: str | Path | None = None) -> Path | None:
        """Save the mask layer through the plugin's writer; without ``path``, ask with a dialog
        that proposes ``<source>_mask.nii.gz`` next to the source."""
        layer = self.mask_layer()
        if layer is None:
            self._notify_error("no mask to save yet: run the model first")
            return None
        if self._session is not None:
            self._session.record_edits(layer.data)
        if path is None:
            default = default_mask_path(layer.metadata, layer.name)
            chosen, _ = QFileDialog.getSaveFileName(
                self, "Save mask", str(default), "NIfTI (*.nii.gz *.nii)"
            )
            if not chosen:
                return None
            path = chosen
        try:
            written = Path(save_layer(layer, str(path))[0])
        except (WhatIsHealthyError, OSError) as exc:
            self._notify_error(f"could not save the mask: {exc}")
            return None
        from napari.utils.notifications import show_info

        try:  # the lesion table beside it
            table = self.lesion_table.write_csv(lesion_csv_path(written))
        except OSError as exc:
            self._notify_error(f"saved the mask, but not its lesion table: {exc}")
            table = None
        show_info(f"What is Healthy?: saved the mask to {written}"
                  + (f" and its lesion table to {table.name}" if table else ""))
        self.status.setText(f"Saved {written}")
        return written
