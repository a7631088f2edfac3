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
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QWidget

from ._widget_layout import ORIENTATIONS, SCOPE_SLICE, SCOPE_VOLUME, build_layout
from ._widget_model import ModelChoice
from ._widget_result import ResultHandlers
from ._widget_run import RunHandlers
from ._widget_settings import SettingsHandlers
from ._widget_state import InputCache, ResultSession
from ._writer import prefer_this_writer
from .core.runtime import prefer_bounded_omp_spin

if TYPE_CHECKING:
    import napari

__all__ = ["LocalizeWidget", "SCOPE_SLICE", "SCOPE_VOLUME"]

log = logging.getLogger(__name__)


class LocalizeWidget(ModelChoice, RunHandlers, ResultHandlers, SettingsHandlers, QWidget):
    """Dock widget: healthy counterfactual, difference map and lesion mask for an MRI volume.

    Split by concern: the controls are made in :mod:`._widget_layout`; the handlers are mixed in
    from :mod:`._widget_model` (model, classifier, input layers), :mod:`._widget_run` (the
    background run) and :mod:`._widget_result` (layers, threshold, edits, metrics, saving); what
    needs no Qt is in :mod:`._widget_state` and :mod:`._layer_choice`.
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        # Before anything loads torch: how its threads wait in napari's process (core.runtime).
        prefer_bounded_omp_spin()
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
        self._applying: object | None = None  # a returned result whose layers are being added
        self._job_context: dict[str, Any] | None = None
        self._cancel_requested = False
        self._started = 0.0
        self._mask_layer = None
        self._modality_combos: dict[str, QComboBox] = {}
        self._input_cache = InputCache()  # the stacked, prepared inputs of the last run
        self.run_count = 0
        self.last_error: str | None = None
        build_layout(self)
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
        self._restore_settings()
        self.set_orientation(self.orientation_combo.currentText())
        try:  # S/A/R arrows on the canvas, so that the orientation can be read off the view
            self.viewer.axes.visible = True
            self.viewer.axes.labels = True
        except AttributeError as exc:
            log.debug("no axes overlay: %s", exc)

    def set_orientation(self, name: str) -> None:
        """Orient the 2D view (a choice of ORIENTATIONS); the data are not flipped."""
        orientation = ORIENTATIONS.get(name)
        if orientation is None:
            return
        try:
            self.viewer.camera.orientation2d = orientation
        except (AttributeError, ValueError) as exc:  # older napari
            log.debug("cannot set the camera orientation: %s", exc)
