"""The widget's model, classifier and input-layer choices (handlers; the layout is in
:mod:`._widget_layout`, the logic without Qt in :mod:`._widget_state`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QComboBox, QFileDialog

from ._layer_choice import (
    LayerInfo,
    auto_model_input,
    is_result_layer,
    layer_type_name,
    match_modalities,
    pick_ground_truth,
)
from ._widget_layout import NONE
from ._widget_state import (
    AUTO,
)
from .core.errors import WhatIsHealthyError

log = logging.getLogger(__name__)


class ModelChoice:
    """Mixed into :class:`._widget.LocalizeWidget`: which model, classifier and layers a run uses."""

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
        start = self._last_folder("checkpoint")
        folder = QFileDialog.getExistingDirectory(self, "Choose a checkpoint folder", start)
        if folder:
            self._remember_folder("checkpoint", Path(folder).parent)
            self.set_model(folder)
            self._remember_model()

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
        """Guidance, noise level, steps, lesion contrast (and min component size) from the
        model's spec; the classifier scale from the classifier's spec."""
        if self._classifier_spec is not None:
            self.classifier_scale.setValue(float(self._classifier_spec.inference.scale))
        if self._spec is not None:
            self._show_settings(self._spec.inference, min_size=self._session is None)

    def _show_settings(self, settings: Any, min_size: bool) -> None:
        self.guidance.setValue(float(settings.guidance))
        self.noise_level.setValue(float(settings.noise_level))
        self.steps.setValue(int(settings.steps))
        self.lesion_contrast.setChecked(settings.lesion_contrast == "expected")
        if min_size:
            self.min_size.blockSignals(True)
            self.min_size.setValue(int(settings.min_component_voxels))
            self.min_size.blockSignals(False)

    def _browse_classifier(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a classifier checkpoint folder")
        if folder:
            self.set_classifier(folder)

    def set_classifier(self, path: str | Path | None) -> bool:
        """Choose a classifier checkpoint for classifier guidance (None or "": none, i.e.
        classifier-free guidance). Returns whether it is usable; if not, says why in a
        notification and runs are refused until it is fixed or cleared."""
        text = "" if path is None else str(path)
        if text:
            self.classifier_toggle.setChecked(True)
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
            if layer_type_name(layer) == "Image" and layer.ndim == 3 and not layer.rgb
            and not is_result_layer(layer.metadata)
        ]

    def _labels_layers(self) -> list[Any]:
        return [
            layer for layer in self.viewer.layers
            if layer_type_name(layer) == "Labels" and layer.ndim == 3
            and not is_result_layer(layer.metadata)
        ]

    def _show_classifier_rows(self, shown: bool) -> None:
        """Classifier guidance's rows, shown on demand (most runs use classifier-free
        guidance); unticking clears the classifier."""
        for field in (self._classifier_row, self.classifier_scale):
            self._guidance_form.setRowVisible(field, shown)
        self.classifier_info.setVisible(shown and bool(self.classifier_info.text()))
        if not shown and self.classifier_edit.text():
            self.set_classifier(None)

    def _on_layers_changed(self, event: Any = None) -> None:
        try:
            if event is not None and getattr(event, "type", "") == "inserted":
                event.value.events.name.connect(self._on_layers_changed)
            if self.is_auto_model:  # the open images decide the model: it may change
                self._choose_auto_model()
            self._refresh_layer_choices()
            self.save_button.setEnabled(self.mask_layer() is not None)
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

