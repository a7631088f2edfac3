"""The widget's run: the request from the controls, the background job, its progress and end.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, QTimer

from ._layers import from_napari, source_metadata
from ._widget_layout import SCOPE_SLICE
from ._widget_state import (
    JobFailed,
    JobRequest,
    NapariResult,
    StatusMessage,
    localize_job,
)
from .core.errors import WhatIsHealthyError

log = logging.getLogger(__name__)

APPLY_PAUSE_MS = 10  # between the steps of adding a result's layers



def stop_and_wait(worker: Any, timeout_s: float) -> bool:
    """Disconnect a napari thread worker's result signals, ask it to quit and wait (up to
    ``timeout_s``, keeping the event loop running) until its thread has ended, so that nothing
    emits into a closed window. Returns whether it has ended."""
    from qtpy.QtWidgets import QApplication

    for signal in (worker.yielded, worker.returned, worker.aborted, worker.errored):
        try:
            signal.disconnect()
        except (RuntimeError, TypeError):
            pass
    worker.quit()
    deadline = time.monotonic() + timeout_s
    while worker.is_running and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    return not worker.is_running


class StopOnWindowClose:
    """Mixed into a QWidget with a napari thread worker (``_worker``) and ``stop_worker``:
    closing the viewer's window stops the run first, so that nothing emits into a closed
    window."""

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

class RunHandlers(StopOnWindowClose):
    """Mixed into :class:`._widget.LocalizeWidget`: starting, following and stopping a run."""

    @property
    def is_running(self) -> bool:
        # Also while a returned result's layers are still being added (one per event-loop turn).
        return self._worker is not None or getattr(self, "_applying", None) is not None

    def _update_run_enabled(self) -> None:
        ready = (
            self._spec is not None
            and bool(self._modality_combos)
            and all(c.currentText() for c in self._modality_combos.values())
        )
        self.run_button.setEnabled(ready and not self.is_running)
        self.cancel_button.setEnabled(self._worker is not None)  # not while layers are added

    def _build_request(self) -> tuple[JobRequest, dict[str, Any]]:
        """The job of a run from the controls, and what showing its result needs."""
        if self._spec is None or self._model_ref is None:
            raise WhatIsHealthyError("choose a model first (a bundled one or a checkpoint folder)")
        self._check_classifier_choice()
        modalities = self._spec.modalities
        layers = self._checked_input_layers()
        reference = layers[modalities[0]]
        data = self._input_cache.data(
            [layers[m].data for m in modalities],
            lambda: np.stack([from_napari(layers[m].data).astype(np.float32) for m in modalities]),
        )
        z_slices = None
        if self.scope_combo.currentText() == SCOPE_SLICE:
            z_slices = [self._current_axial_index(reference)]
        inputs = tuple(
            str(layers[m].metadata["source_path"])
            for m in modalities if layers[m].metadata.get("source_path")
        )
        request = JobRequest(
            model=self._model_ref, device=self.device_combo.currentText(), data=data,
            overrides=self._setting_overrides(), z_slices=z_slices, inputs=inputs,
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

    def _check_classifier_choice(self) -> None:
        text = self.classifier_edit.text().strip()
        if text != self._classifier_text:  # typed but not confirmed yet
            self._apply_classifier(text, notify=False)
        if text and self._classifier_ref is None:
            raise WhatIsHealthyError(
                f"the classifier is not usable: {self._classifier_error} (fix it, or clear the "
                "Classifier field for classifier-free guidance)"
            )

    def _checked_input_layers(self) -> dict[str, Any]:
        """The chosen layer of every model channel, all on one grid."""
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
        return layers

    def _setting_overrides(self) -> dict[str, Any]:
        """The settings the controls set (LocalizeSettings fields)."""
        overrides = {
            "guidance": float(self.guidance.value()),
            "noise_level": float(self.noise_level.value()),
            "steps": int(self.steps.value()),
            "lesion_contrast": "expected" if self.lesion_contrast.isChecked() else "any",
            "batch_size": self._saved_batch_size(),
            "min_component_voxels": int(self.min_size.value()),
            "brain_only": bool(self.brain_only.isChecked()),
            "threshold": self.threshold.value() if self._session is not None else None,
        }
        if self._classifier_ref is not None:
            overrides["method"] = "classifier"
            overrides["classifier_scale"] = float(self.classifier_scale.value())
        return overrides

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
        self._first_step = None
        self._phase_text = "Starting…"
        self.status.setText("Starting…")
        self._update_run_enabled()
        self._timer.start()
        self._watch_window_close()
        worker.start()

    def stop_worker(self, timeout_s: float = 60.0) -> bool:
        """Quit a running job and wait (up to ``timeout_s``) until its thread has ended, so that
        nothing emits into a closed window. The result of a run stopped so is dropped. Returns
        whether no job is left running."""
        if getattr(self, "_applying", None) is not None:
            self._applying = None  # a result still being shown is dropped
            self._timer.stop()
        worker = self._worker
        if worker is None:
            return True
        self._cancel_requested = True
        stopped = stop_and_wait(worker, timeout_s)
        self._timer.stop()
        return stopped

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
            self.status.setText(f"{getattr(self, '_phase_text', 'Running')} · {self._elapsed()}")

    def _on_yielded(self, item: Any) -> None:
        if isinstance(item, StatusMessage):
            self._phase_text = f"{item.text[:1].upper()}{item.text[1:]}…"
            self._tick()
            return
        step, total = int(getattr(item, "step", 0)), int(getattr(item, "total", 0))
        phase = getattr(item, "phase", "")
        verb = {"invert": "Inverting", "decode": "Decoding to healthy"}.get(phase, phase)
        if total > 0:
            # The steps of every chunk of slices and both phases, as one bar in percent.
            self.progress.setRange(0, total)
            self.progress.setValue(step)
            self.progress.setFormat("%p%")
            verb = f"{verb} · {100 * step // total}%{self._time_left(step, total)}"
        self._phase_text = verb
        self._tick()

    def _time_left(self, step: int, total: int) -> str:
        """", about N s left", from the pace since the first network step."""
        now = time.monotonic()
        first = getattr(self, "_first_step", None)
        if first is None or step <= first[1]:
            self._first_step = (now, step)
            return ""
        seconds = (now - first[0]) / (step - first[1]) * (total - step)
        return f", about {seconds:.0f} s left" if seconds >= 1 else ", under 1 s left"

    def _on_returned(self, value: NapariResult | JobFailed | None) -> None:
        if self._cancel_requested:  # cancelled after the last step: keep the layers as they were
            self.status.setText(f"Cancelled after {self._elapsed()}: the layers are unchanged")
            return
        if isinstance(value, JobFailed):
            self._notify_error(value.message)
            self.status.setText(f"Failed: {value.message}")
            return
        if value is None:
            return
        z_slices = (self._job_context or {}).get("z_slices")
        if z_slices and len(value.result.processed_slices) == 0:
            from napari.utils.notifications import show_warning

            message = (f"no brain on axial slice {z_slices[0]}: nothing to preview; move to a "
                       "slice through the brain (the layers are unchanged)")
            self.status.setText(message[:1].upper() + message[1:])
            show_warning(f"What is Healthy?: {message}")
            return
        try:
            steps = self._result_steps(value, self._job_context or {})
        except WhatIsHealthyError as exc:
            self._notify_error(str(exc))
            return
        z_slices = (self._job_context or {}).get("z_slices")
        scope = f"axial slice {z_slices[0]}" if z_slices else "whole volume"
        self.status.setText("Adding the result layers…")
        # One step per event-loop turn, so that the UI never waits on all the layers at once;
        # the run counts as running (Run disabled) until the last step.
        self._applying = token = object()
        self._apply_next(token, iter(steps), value, scope)

    def _apply_next(self, token: object, steps: Any, value: NapariResult, scope: str) -> None:
        if getattr(self, "_applying", None) is not token:  # dropped (window closed, new run)
            return
        step = next(steps, None)
        if step is not None:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - a timer callback: report, end the run
                if not isinstance(exc, WhatIsHealthyError):
                    log.exception("showing the result failed")
                self._applying = None
                self._notify_error(str(exc))
                self.status.setText(f"Failed: {exc}")
                self._on_finished()
                return
            # A short pause, not 0: the canvas draws the new layer before the next one is added.
            QTimer.singleShot(APPLY_PAUSE_MS, lambda: self._apply_next(token, steps, value, scope))
            return
        self._applying = None
        seconds = time.monotonic() - self._started
        self.status.setText(f"Done in {seconds:.1f} s ({scope})")
        for warning in value.result.warnings:
            from napari.utils.notifications import show_warning

            show_warning(f"What is Healthy?: {warning}")
        self._on_finished()

    def _on_aborted(self) -> None:
        self.status.setText(f"Cancelled after {self._elapsed()}: the layers are unchanged")

    def _on_errored(self, exc: BaseException) -> None:
        # napari's worker already shows the exception as a notification (with its traceback).
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.status.setText(f"Failed: {self.last_error}")

    def _on_finished(self) -> None:
        self._worker = None
        if getattr(self, "_applying", None) is not None:
            self._update_run_enabled()  # Cancel off: the run itself is over
            return  # the last step of adding the layers finishes the run
        self._timer.stop()
        self._job_context = None
        self._first_step = None
        self._phase_text = "Running"
        # Full after a finished run; empty (not "4 / 60") after a cancel or a failure.
        done = self.status.text().startswith("Done")
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if done else 0)
        self.progress.setFormat("done" if done else "")
        self._update_run_enabled()

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.last_error = message
        show_error(f"What is Healthy?: {message}")

