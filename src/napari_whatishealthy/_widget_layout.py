"""The widget's layout: every control, its tooltip and which handler it calls. The handlers
are in ``_widget_model``, ``_widget_run`` and ``_widget_result``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
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
from ._lesion_table import LesionTable
from .core.volume import MODALITIES

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
    "'whatishealthy train' writes) with Browse.",
    "modality": "The modality of the open image, whose name does not say it: the automatic "
    "model choice needs it and never guesses.",
    "guidance": "Classifier-free guidance scale w: how strongly decoding is pushed toward "
    "'healthy'. Higher removes more of a lesion but may also change healthy tissue; "
    "0 decodes without the label (a plain reconstruction). Not used while a classifier is "
    "chosen (classifier guidance replaces it).",
    "classifier": "Optional: a noisy-image classifier checkpoint folder (what 'whatishealthy "
    "train-classifier --out DIR' writes: DIR or DIR/checkpoint) for classifier guidance "
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
    "lesion_contrast": "Checked: in each modality only the change a lesion makes there counts "
    "(brighter than the healthy version on FLAIR and T2, darker on T1, either way on T1ce); the "
    "bundled models are calibrated this way. Unchecked: |input - healthy| everywhere, the "
    "paper's score (use it for lesions that are dark on FLAIR, such as cysts).",
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



def build_layout(w: Any) -> None:
    """Make the controls of widget ``w`` (as its attributes) and connect them to its handlers."""
    # Everything scrolls: the controls are taller than a 1366 x 768 screen's dock.
    outer = QVBoxLayout(w)
    outer.setContentsMargins(0, 0, 0, 0)
    w.scroll_area = QScrollArea()
    w.scroll_area.setWidgetResizable(True)
    w.scroll_area.setFrameShape(QFrame.Shape.NoFrame)
    w.scroll_area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    content = QWidget()
    w.scroll_area.setWidget(content)
    outer.addWidget(w.scroll_area)
    root = QVBoxLayout(content)
    root.setContentsMargins(6, 6, 6, 6)
    _model_box(w, root)
    _inputs_box(w, root)
    _settings_box(w, root)
    _run_controls(w, root)
    _mask_box(w, root)
    # Only vertical scrolling: the dock must not squeeze the controls narrower than they fit,
    # however wide they grow (model rows, messages).
    w._width_keeper = _KeepWidth(w.scroll_area, content)


class _KeepWidth(QObject):
    """Keeps a scroll area at least as wide as its content's minimum width."""

    def __init__(self, area: QScrollArea, content: QWidget) -> None:
        super().__init__(area)
        self._area, self._content = area, content
        content.installEventFilter(self)
        self._update()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() in (QEvent.Type.LayoutRequest, QEvent.Type.Show):
            self._update()
        return False

    def _update(self) -> None:
        bar = self._area.verticalScrollBar().sizeHint().width()
        self._area.setMinimumWidth(self._content.minimumSizeHint().width() + bar)


def _model_box(w: Any, root: QVBoxLayout) -> None:
    box = QGroupBox("Model")
    form = QFormLayout(box)
    row = QHBoxLayout()
    w.model_combo = QComboBox()
    w.model_combo.setToolTip(TIPS["model"])
    w.model_combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    w.model_combo.currentIndexChanged.connect(w._on_model_changed)
    w.browse_button = QPushButton("Browse…")
    w.browse_button.setToolTip("Choose a checkpoint folder from disk")
    w.browse_button.clicked.connect(w._browse_model)
    row.addWidget(w.model_combo)
    row.addWidget(w.browse_button)
    form.addRow("Model", row)
    w.model_info = QLabel("")
    w.model_info.setWordWrap(True)
    form.addRow(w.model_info)
    root.addWidget(box)


def _inputs_box(w: Any, root: QVBoxLayout) -> None:
    w.inputs_box = QGroupBox("Inputs")
    w.inputs_form = QFormLayout(w.inputs_box)
    w.ground_truth_combo = QComboBox()
    w.ground_truth_combo.setToolTip(TIPS["ground_truth"])
    w.ground_truth_combo.currentIndexChanged.connect(w._update_metrics)
    w.inputs_form.addRow("Ground truth", w.ground_truth_combo)
    w.modality_combo = QComboBox()  # asked only for an image whose name has no modality
    w.modality_combo.addItems(["", *MODALITIES])
    w.modality_combo.setToolTip(TIPS["modality"])
    w.modality_combo.currentIndexChanged.connect(w._on_modality_answered)
    w.modality_label = QLabel("Modality")
    w.inputs_form.addRow(w.modality_label, w.modality_combo)
    w._set_modality_question(None)
    root.addWidget(w.inputs_box)


def _settings_box(w: Any, root: QVBoxLayout) -> None:
    box = QGroupBox("Counterfactual")
    form = QFormLayout(box)
    w.guidance = QDoubleSpinBox()
    w.guidance.setRange(0.0, 50.0)
    w.guidance.setSingleStep(0.5)
    w.guidance.setDecimals(2)
    w.guidance.setToolTip(TIPS["guidance"])
    form.addRow("Guidance", w.guidance)
    w.classifier_toggle = QCheckBox("Classifier guidance (a trained classifier)")
    w.classifier_toggle.setToolTip(TIPS["classifier"])
    w.classifier_toggle.toggled.connect(w._show_classifier_rows)
    form.addRow(w.classifier_toggle)
    w._guidance_form = form
    row = QHBoxLayout()
    w.classifier_edit = QLineEdit()
    w.classifier_edit.setPlaceholderText("none: classifier-free guidance")
    w.classifier_edit.setClearButtonEnabled(True)
    w.classifier_edit.setToolTip(TIPS["classifier"])
    w.classifier_edit.editingFinished.connect(w._on_classifier_edited)
    w.classifier_edit.textChanged.connect(w._on_classifier_text_changed)
    w.classifier_browse_button = QPushButton("Browse…")
    w.classifier_browse_button.setToolTip("Choose a classifier checkpoint folder")
    w.classifier_browse_button.clicked.connect(w._browse_classifier)
    row.addWidget(w.classifier_edit)
    row.addWidget(w.classifier_browse_button)
    form.addRow("Classifier", row)
    w._classifier_row = row
    w.classifier_scale = QDoubleSpinBox()
    w.classifier_scale.setRange(0.0, 1000.0)
    w.classifier_scale.setSingleStep(1.0)
    w.classifier_scale.setDecimals(2)
    w.classifier_scale.setToolTip(TIPS["classifier_scale"])
    w.classifier_scale.setEnabled(False)
    form.addRow("Classifier scale", w.classifier_scale)
    w.classifier_info = QLabel("")
    w.classifier_info.setWordWrap(True)
    w.classifier_info.setVisible(False)
    form.addRow(w.classifier_info)
    w.noise_level = QDoubleSpinBox()
    w.noise_level.setRange(0.01, 1.0)
    w.noise_level.setSingleStep(0.05)
    w.noise_level.setDecimals(2)
    w.noise_level.setToolTip(TIPS["noise"])
    form.addRow("Noise level", w.noise_level)
    w.steps = QSpinBox()
    w.steps.setRange(1, 1000)
    w.steps.setToolTip(TIPS["steps"])
    form.addRow("Steps", w.steps)
    w.lesion_contrast = QCheckBox("Lesion contrast (FLAIR, T2 brighter; T1 darker)")
    w.lesion_contrast.setToolTip(TIPS["lesion_contrast"])
    w.lesion_contrast.toggled.connect(w._mark_stale)
    form.addRow(w.lesion_contrast)
    w.device_combo = QComboBox()
    w.device_combo.setToolTip(TIPS["device"])
    from .core.device import available_devices

    w.device_combo.addItems(available_devices())
    form.addRow("Device", w.device_combo)
    w.scope_combo = QComboBox()
    w.scope_combo.addItems([SCOPE_VOLUME, SCOPE_SLICE])
    w.scope_combo.setToolTip(TIPS["scope"])
    form.addRow("Scope", w.scope_combo)
    w.defaults_button = QPushButton("Model defaults")
    w.defaults_button.setToolTip("Set guidance, noise level, steps and the lesion contrast "
                                    "to the model's recommended values (and the classifier "
                                    "scale to the classifier's)")
    w.defaults_button.clicked.connect(w.reset_defaults)
    form.addRow(w.defaults_button)
    for spin in (w.guidance, w.classifier_scale, w.noise_level, w.steps):
        spin.valueChanged.connect(w._mark_stale)
    w._show_classifier_rows(False)
    root.addWidget(box)


def _run_controls(w: Any, root: QVBoxLayout) -> None:
    row = QHBoxLayout()
    w.run_button = QPushButton("Run")
    w.run_button.setToolTip("Make the healthy counterfactual, the difference map and the "
                               "mask (in a background thread)")
    w.run_button.clicked.connect(w.run)
    w.cancel_button = QPushButton("Cancel")
    w.cancel_button.setToolTip("Stop at the next diffusion step; the layers stay as they "
                                  "were before this run")
    w.cancel_button.setEnabled(False)
    w.cancel_button.clicked.connect(w.cancel)
    row.addWidget(w.run_button)
    row.addWidget(w.cancel_button)
    root.addLayout(row)
    w.progress = QProgressBar()
    w.progress.setRange(0, 1)
    w.progress.setValue(0)
    w.progress.setFormat("")  # empty until a run reports its first step
    root.addWidget(w.progress)
    w.status = QLabel("Ready")
    w.status.setWordWrap(True)
    root.addWidget(w.status)
    w.stale_label = QLabel("Settings changed since this result: Run to update it.")
    w.stale_label.setStyleSheet("color: #e0a030;")
    w.stale_label.setWordWrap(True)
    w.stale_label.setVisible(False)
    root.addWidget(w.stale_label)


def _mask_box(w: Any, root: QVBoxLayout) -> None:
    w.result_box = QGroupBox("Mask")
    form = QFormLayout(w.result_box)
    w.threshold = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
    w.threshold.setDecimals(4)
    w.threshold.setRange(0.0, 1.0)
    w.threshold.setToolTip(TIPS["threshold"])
    w.threshold.valueChanged.connect(w._on_mask_params_changed)
    form.addRow("Threshold", w.threshold)
    w.histogram = DifferenceHistogramView()
    w.histogram.threshold_picked.connect(w.threshold.setValue)
    form.addRow(w.histogram)
    w.min_size = QSpinBox()
    w.min_size.setRange(0, 10_000_000)
    w.min_size.setToolTip(TIPS["min_size"])
    w.min_size.valueChanged.connect(w._on_mask_params_changed)
    form.addRow("Min component (voxels)", w.min_size)
    w.brain_only = QCheckBox("Restrict to the brain")
    w.brain_only.setChecked(True)
    w.brain_only.setToolTip(TIPS["brain_only"])
    w.brain_only.toggled.connect(w._on_mask_params_changed)
    form.addRow(w.brain_only)
    row = QHBoxLayout()
    w.edits_label = QLabel("No painted edits")
    w.edits_label.setToolTip(TIPS["edits"])
    w.discard_button = QPushButton("Discard edits")
    w.discard_button.setToolTip(TIPS["edits"])
    w.discard_button.setEnabled(False)
    w.discard_button.clicked.connect(w.discard_edits)
    row.addWidget(w.edits_label)
    row.addWidget(w.discard_button)
    form.addRow(row)
    w.mask_size_label = QLabel("")
    form.addRow(w.mask_size_label)
    w.metrics_label = QLabel("")
    w.metrics_label.setToolTip(TIPS["ground_truth"])
    form.addRow(w.metrics_label)
    w.lesion_table = LesionTable(w.viewer)
    form.addRow(w.lesion_table)
    w.save_button = QPushButton("Save mask…")
    w.save_button.setToolTip(TIPS["save"])
    w.save_button.clicked.connect(lambda: w.save_mask())
    form.addRow(w.save_button)
    w.result_box.setEnabled(False)
    w.result_box.setVisible(False)  # shown with the first result (no threshold of 0 before)
    root.addWidget(w.result_box)

    row = QHBoxLayout()
    row.addWidget(QLabel("Axial view"))
    w.orientation_combo = QComboBox()
    w.orientation_combo.addItems(list(ORIENTATIONS))
    w.orientation_combo.setToolTip(
        "How the viewer shows axial slices of volumes opened by this plugin (world "
        "coordinates are RAS mm): napari's default puts anterior at the bottom"
    )
    w.orientation_combo.currentTextChanged.connect(w.set_orientation)
    row.addWidget(w.orientation_combo)
    guide = user_guide()
    if guide is not None:  # a source checkout; an installed wheel has no docs folder
        w.help_label = QLabel(f'<a style="color:#8ab4ff" href="{guide.as_uri()}">Help</a>')
        w.help_label.setToolTip(f"The user guide: {guide}")
        w.help_label.setOpenExternalLinks(True)
        row.addWidget(w.help_label)
    root.insertLayout(0, row)  # first: it is how every slice is read
    root.addStretch(1)


def user_guide() -> Path | None:
    """docs/user-guide.md of the source tree this package runs from, if there is one."""
    guide = Path(__file__).resolve().parents[2] / "docs" / "user-guide.md"
    return guide if guide.is_file() else None

