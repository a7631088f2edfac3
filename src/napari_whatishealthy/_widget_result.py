"""The widget's result: layers from a finished run, the threshold, painted edits, metrics and
saving.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog

from ._layer_choice import (
    layer_named,
    layer_type_name,
)
from ._layers import default_mask_path, protected_paths, to_napari
from ._lesion_table import lesion_csv_path
from ._widget_layout import NONE
from ._widget_state import (
    MaskParams,
    NapariResult,
    ResultSession,
    format_metric,
    mask_provenance,
)
from ._writer import save_layer
from .core.errors import WhatIsHealthyError

log = logging.getLogger(__name__)


class ResultHandlers:
    """Mixed into :class:`._widget.LocalizeWidget`: what a finished run shows and how it is tuned."""

    def _result_name(self, source: str, role: str) -> str:
        return f"{source} {role}"

    def _result_steps(self, view: NapariResult, context: dict[str, Any]) -> list[Any]:
        """Showing a result, as steps to run one per event-loop turn: napari creating a layer
        (its vispy visual and first draw) costs ~100 ms on a 1 mm volume, so adding the three
        layers in one turn froze the UI for 300 ms (issue 15). The healthy and the difference
        images come first, each on its own; the mask step does everything else (the session,
        the controls, the mask, the table), so nothing sees a half-shown result. Run in order,
        the steps leave exactly what one call did."""
        source = context.get("source_name", "image")
        reference_channel = 0
        session = ResultSession(view, source, reference_channel)
        result = view.result
        provenance = dict(result.provenance)
        provenance["source_layer"] = source
        provenance["input_layers"] = context.get("input_layers", {})
        base = context.get("metadata", {})
        geometry = context.get("geometry", {})

        def healthy() -> None:
            self._upsert_layer(
                "image", self._result_name(source, "healthy"), session.healthy(), geometry,
                {**base, "role": "healthy", "provenance": provenance},
                new={"colormap": "gray", "contrast_limits": context.get("contrast_limits"),
                     "visible": False, "above": source},
                update={},
            )

        def difference() -> None:
            limits = session.display_limits()
            self._upsert_layer(
                "image", self._result_name(source, "difference"), session.difference(),
                geometry, {**base, "role": "difference", "provenance": provenance},
                new={"colormap": "inferno", "contrast_limits": limits, "blending": "additive",
                     "visible": False, "above": source},
                update={"contrast_limits": limits},
            )

        shown: dict[str, Any] = {}

        def uncertainty() -> None:
            shown["uncertainty"] = self._show_uncertainty(result, source, geometry, base,
                                                          provenance)

        def mask() -> None:
            shown["mask"] = self._show_mask(session, result, source, geometry, base, provenance)

        def rest() -> None:
            self._show_rest(session, *shown["mask"], shown.get("uncertainty"))

        steps = [healthy, difference, mask, rest]
        if getattr(result, "uncertainty", None) is not None:
            steps.insert(2, uncertainty)  # just above the source, as the other images
        return steps

    def _show_mask(self, session: Any, result: Any, source: str, geometry: dict[str, Any],
                   base: dict[str, Any], provenance: dict[str, Any]) -> tuple[Any, Any, bool]:
        """The session, the controls and the mask layer of a result; returns the layer, the
        mask's parameters and whether painted edits were kept."""
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
        mask = session.mask(params)
        mask_meta = {**base, "role": "mask", "provenance": provenance,
                     "mask": mask_provenance(session, params)}
        layer = self._upsert_layer(
            "labels", self._result_name(source, "mask"), mask, geometry, mask_meta,
            new={"opacity": 0.6}, update={},
        )
        self._watch_mask_layer(layer)
        return layer, params, kept

    def _show_rest(self, session: Any, layer: Any, params: Any, kept: bool,
                   uncertainty: Any) -> None:
        """The histogram, the lesion table, the labels and buttons of a shown result."""
        self.histogram.set_histogram(session.histogram())
        self.histogram.set_current(params.threshold)
        self.lesion_table.bind(layer, session.difference(), uncertainty)
        self._result_snapshot = self._run_snapshot()
        self.stale_label.setVisible(False)
        self.result_box.setEnabled(True)
        self.result_box.setVisible(True)
        self.save_button.setEnabled(True)
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
        data = to_napari(np.asarray(uncertainty, np.float32))
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
        existing = layer_named(self.viewer, name)
        wanted = "Image" if kind == "image" else "Labels"
        if existing is not None and (
            layer_type_name(existing) != wanted or tuple(existing.data.shape) != data.shape
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
        elif above is not None and layer_named(self.viewer, above) is not None:
            target = self.viewer.layers.index(layer_named(self.viewer, above)) + 1
            self.viewer.layers.move(self.viewer.layers.index(layer), target)
        return layer

    def _watch_mask_layer(self, layer: Any) -> None:
        if self._mask_layer is layer:
            return
        if self._mask_layer is not None:
            for emitter in (self._mask_layer.events.paint, self._mask_layer.events.set_data):
                try:
                    emitter.disconnect(self._on_mask_painted)
                except (RuntimeError, TypeError, ValueError):
                    pass
        self._mask_layer = layer
        layer.events.paint.connect(self._on_mask_painted)
        # Undo and redo (Ctrl+Z) change the data without a paint event; they refresh the layer.
        layer.events.set_data.connect(self._on_mask_painted)

    def mask_layer(self) -> Any:
        """The current mask layer (None if there is none or the user removed it)."""
        layer = self._mask_layer
        if layer is None or layer not in self.viewer.layers:
            return None
        return layer

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

    def _run_snapshot(self) -> tuple[Any, ...]:
        """What a run depends on, as the controls say now (to tell whether a result is stale)."""
        classifier = self._classifier_ref
        return (self._model_ref, classifier, round(float(self.guidance.value()), 6),
                round(float(self.classifier_scale.value()), 6) if classifier else None,
                round(float(self.noise_level.value()), 6), int(self.steps.value()),
                self.lesion_contrast.isChecked(),
                tuple(combo.currentText() for combo in self._modality_combos.values()))

    def _mark_stale(self, *_: Any) -> None:
        """Say that the result is out of date while a setting differs from its run's (and stop
        saying so when the setting is put back)."""
        if self._session is not None:
            self.stale_label.setVisible(
                self._run_snapshot() != getattr(self, "_result_snapshot", None))

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
            if not layer.metadata.get("source_path") and self._last_folder("save"):
                default = Path(self._last_folder("save")) / default.name
            chosen, _ = QFileDialog.getSaveFileName(
                self, "Save mask", str(default), "NIfTI (*.nii.gz *.nii)"
            )
            if not chosen:
                return None
            path = chosen
        try:
            written = Path(save_layer(layer, str(path))[0])
            self._remember_folder("save", written.parent)
        except (WhatIsHealthyError, OSError) as exc:
            self._notify_error(f"could not save the mask: {exc}")
            return None
        from napari.utils.notifications import show_info

        try:  # the lesion table beside it
            table = self.lesion_table.write_csv(lesion_csv_path(written),
                                                inputs=protected_paths(layer.metadata))
        except (WhatIsHealthyError, OSError) as exc:
            self._notify_error(f"saved the mask, but not its lesion table: {exc}")
            table = None
        show_info(f"What is Healthy?: saved the mask to {written}"
                  + (f" and its lesion table to {table.name}" if table else ""))
        self.status.setText(f"Saved {written}")
        return written

