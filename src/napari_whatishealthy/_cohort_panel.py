"""Cohort review: open a folder of cases (or a ``localize`` output folder), step through the
cases with their results, run the ones not done yet in the background, and keep painted masks.

The cohort itself (cases, outputs, runs) is :mod:`.core.cohort`; this panel shows one case at a
time: its input layers (through the plugin's reader), its outputs (``<case> healthy``,
``<case> difference``, ``<case> mask``) and a lesion table. A painted mask is saved a moment
after the last stroke as ``<case>_mask-edited.nii.gz`` beside the outputs, through the plugin's
writer (on the source grid; inputs and the model's own mask are never written over).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import _settings as settings
from ._lesion_table import LesionTable
from ._widget_run import StopOnWindowClose
from .core.errors import WhatIsHealthyError

if TYPE_CHECKING:
    import napari

PLUGIN = "napari-whatishealthy"
AUTOSAVE_MS = 800
MARKS = {"done": "✓", "edited": "✎", "not run": "·", "inputs missing": "?"}


class CohortPanel(StopOnWindowClose, QWidget):
    """Dock widget: step through a cohort's cases and their results."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.cohort: Any = None
        self.index = -1
        self.mask_layer: Any = None
        self.last_error: str | None = None
        self.last_autosave: Path | None = None
        self._layers: list[Any] = []  # the layers this panel added for the shown case
        self._worker: Any = None
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(AUTOSAVE_MS)
        self._autosave.timeout.connect(self.autosave)
        self._build_ui()

    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        row = QHBoxLayout()
        self.open_button = QPushButton("Open cohort folder…")
        self.open_button.setToolTip(
            "A folder of cases (BraTS-layout folders or <case>_<modality>.nii.gz files): "
            "results go to a folder beside it, <folder>-whatishealthy. Or a folder that "
            "`whatishealthy localize` wrote: its cases are found from each provenance file.")
        self.open_button.clicked.connect(self._browse)
        row.addWidget(self.open_button)
        root.addLayout(row)
        self.folder_label = QLabel("No cohort open")
        self.folder_label.setWordWrap(True)
        root.addWidget(self.folder_label)
        self.case_list = QListWidget()
        self.case_list.setToolTip("✓ done, ✎ done and painted, · not run yet, ? inputs missing")
        self.case_list.setMaximumHeight(160)
        self.case_list.currentRowChanged.connect(self._on_row)
        root.addWidget(self.case_list)
        row = QHBoxLayout()
        self.previous_button = QPushButton("◀ Previous")
        self.previous_button.clicked.connect(lambda: self.show_case(self.index - 1))
        self.next_button = QPushButton("Next ▶")
        self.next_button.clicked.connect(lambda: self.show_case(self.index + 1))
        row.addWidget(self.previous_button)
        row.addWidget(self.next_button)
        root.addLayout(row)
        row = QHBoxLayout()
        self.run_button = QPushButton("Run cases not done")
        self.run_button.setToolTip(
            "Localize, in the background, every case without results, with the saved default "
            "model and device (Preferences); results are written as `whatishealthy localize` "
            "writes them")
        self.run_button.clicked.connect(self.run_todo)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        root.addLayout(row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        self.lesion_table = LesionTable(self.viewer)
        root.addWidget(self.lesion_table)
        root.addStretch(1)
        self._update_buttons()

    # Opening ------------------------------------------------------------------------------------
    def _browse(self) -> None:
        start = settings.get("folders", "cohort")
        folder = QFileDialog.getExistingDirectory(self, "Open a cohort folder", start)
        if folder:
            self.open_folder(folder)

    def open_folder(self, folder: str | Path) -> bool:
        """Open a cohort and show its first case; a bad folder is a notification."""
        from .core.cohort import open_cohort

        try:
            cohort = open_cohort(folder)
        except WhatIsHealthyError as exc:
            self._notify_error(str(exc))
            return False
        settings.put("folders", "cohort", str(Path(folder).resolve().parent))
        self.cohort = cohort
        self.folder_label.setText(f"{Path(folder).name}: {len(cohort.cases)} cases; results in "
                                  f"{cohort.out_dir}")
        self._fill_list()
        self.show_case(0)
        return True

    def _fill_list(self) -> None:
        self.case_list.blockSignals(True)
        self.case_list.clear()
        for entry in self.cohort.cases if self.cohort else []:
            status = entry.status()
            self.case_list.addItem(f"{MARKS.get(status, '')} {entry.name} ({status})")
        if 0 <= self.index < self.case_list.count():
            self.case_list.setCurrentRow(self.index)
        self.case_list.blockSignals(False)
        self._update_buttons()

    def _update_buttons(self) -> None:
        n = len(self.cohort.cases) if self.cohort else 0
        self.previous_button.setEnabled(self.index > 0)
        self.next_button.setEnabled(0 <= self.index < n - 1)
        todo = len(self.cohort.todo()) if self.cohort else 0
        running = self._worker is not None
        self.run_button.setText(f"Run {todo} case{'s' if todo != 1 else ''} not done"
                                if todo else "All cases done")
        self.run_button.setEnabled(bool(todo) and not running)
        self.cancel_button.setEnabled(running)

    def _on_row(self, row: int) -> None:
        if row != self.index:
            self.show_case(row)

    # Showing a case -----------------------------------------------------------------------------
    @property
    def current(self) -> Any:
        if self.cohort is None or not 0 <= self.index < len(self.cohort.cases):
            return None
        return self.cohort.cases[self.index]

    def show_case(self, index: int) -> None:
        """Replace the shown case's layers by those of case ``index`` (painted edits of the
        case left are saved first)."""
        if self.cohort is None or not 0 <= index < len(self.cohort.cases):
            return
        if self._autosave.isActive():
            self._autosave.stop()
            self.autosave()
        self._clear_case()
        self.index = index
        entry = self.cohort.cases[index]
        try:
            self._open_inputs(entry)
            self._open_outputs(entry)
        except (WhatIsHealthyError, OSError, ValueError) as exc:
            self._notify_error(f"{entry.name}: {exc}")
        self.case_list.blockSignals(True)
        self.case_list.setCurrentRow(index)
        self.case_list.blockSignals(False)
        self.status.setText(f"Case {index + 1} of {len(self.cohort.cases)}: {entry.name} "
                            f"({entry.status()})")
        self._update_buttons()

    def _clear_case(self) -> None:
        self.lesion_table.unbind()
        if self.mask_layer is not None:
            try:
                self.mask_layer.events.paint.disconnect(self._on_painted)
            except (RuntimeError, TypeError, ValueError):
                pass
        self.mask_layer = None
        for layer in self._layers:
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self._layers = []

    def _add(self, layer_data: tuple[np.ndarray, dict[str, Any], str]) -> Any:
        data, kwargs, kind = layer_data
        adder = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        layer = adder(data, **kwargs)
        self._layers.append(layer)
        return layer

    def _open_inputs(self, entry: Any) -> None:
        from ._layers import read_case_folder, read_paths

        if entry.case is None:
            return
        found = (read_case_folder(entry.case.folder) if entry.case.folder is not None
                 else read_paths(entry.case.paths))
        for layer_data in found:
            self._add(layer_data)

    def _open_outputs(self, entry: Any) -> None:
        from ._layers import read_nifti_file

        if not entry.done:
            return
        images = {}
        for role in ("healthy", "difference"):
            ((data, kwargs, _),) = read_nifti_file(entry.outputs[role])
            kwargs.update(name=f"{entry.name} {role}", visible=False)
            kwargs["metadata"] = {**kwargs["metadata"], "role": role}
            if role == "difference":
                kwargs.update(colormap="inferno", blending="additive")
            images[role] = self._add((data, kwargs, "image"))
        edited = entry.edited_mask.exists()
        path = entry.edited_mask if edited else entry.outputs["mask"]
        ((data, kwargs, _),) = read_nifti_file(path)
        kwargs.pop("colormap", None)
        kwargs.pop("contrast_limits", None)
        metadata = dict(kwargs["metadata"])
        metadata.update(role="mask", edited=edited)
        # Saved onto the grid of the model's mask (the source's grid); the writer never writes
        # over the model's mask or the inputs, and may replace the edited mask.
        metadata["source_path"] = str(entry.outputs["mask"])
        metadata["source_paths"] = [str(entry.outputs["mask"]), *map(str, entry.input_paths)]
        kwargs.update(name=f"{entry.name} mask", metadata=metadata, opacity=0.6, visible=True)
        self.mask_layer = self._add((np.rint(data).astype(np.uint8), kwargs, "labels"))
        self.mask_layer.events.paint.connect(self._on_painted)
        uncertainty = None
        spread = entry.outputs["mask"].with_name(f"{entry.name}_uncertainty.nii.gz")
        if spread.exists():  # a run over several noise levels wrote one
            ((data, kwargs, _),) = read_nifti_file(spread)
            kwargs.update(name=f"{entry.name} uncertainty", visible=False, colormap="viridis",
                          blending="additive")
            kwargs["metadata"] = {**kwargs["metadata"], "role": "uncertainty"}
            uncertainty = np.asarray(self._add((data, kwargs, "image")).data)
        self.lesion_table.bind(self.mask_layer, np.asarray(images["difference"].data),
                               uncertainty)

    # Autosave -----------------------------------------------------------------------------------
    def _on_painted(self, *_: Any) -> None:
        try:
            self._autosave.start()
        except RuntimeError:  # the panel is gone
            pass

    def autosave(self) -> Path | None:
        """Write the shown mask as ``<case>_mask-edited.nii.gz`` beside the outputs."""
        from ._writer import layer_meta, write_labels

        entry, layer = self.current, self.mask_layer
        if entry is None or layer is None or layer not in self.viewer.layers:
            return None
        try:
            (written,) = write_labels(str(entry.edited_mask), layer.data, layer_meta(layer))
        except (WhatIsHealthyError, OSError) as exc:
            self._notify_error(f"could not save the painted mask of {entry.name}: {exc}")
            return None
        self.last_autosave = Path(written)
        self.status.setText(f"Saved the painted mask: {Path(written).name}")
        self._fill_list()
        return self.last_autosave

    # Running the cases not done -----------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def run_todo(self) -> None:
        """Run every case without results in a background thread (one at a time)."""
        if self.cohort is None or self.is_running:
            return
        from napari.qt.threading import create_worker

        todo = self.cohort.todo()
        if not todo:
            return
        model = settings.get("run", "model") or "auto"
        device = settings.get("run", "device") or "auto"
        batch = int(settings.get("run", "batch_size") or 0) or None
        worker = create_worker(_run_cases, self.cohort, todo, model, device, batch,
                               _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(lambda: self.status.setText("Cancelled: finished cases are kept"))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._started = time.monotonic()
        self._watch_window_close()
        self._update_buttons()
        worker.start()

    def _on_progress(self, item: Any) -> None:
        kind = item[0]
        if kind == "case":
            _, position, total, name = item
            self._case_label = f"case {position} of {total} ({name})"
            self.status.setText(f"Running {self._case_label}…")
        elif kind == "step":
            _, step, total = item
            percent = 100 * step // max(total, 1)
            self.status.setText(f"Running {getattr(self, '_case_label', '')}: {percent}%")
        elif kind == "finished":
            self._fill_list()

    def _on_done(self, count: Any) -> None:
        self.status.setText(f"Ran {count} case(s) in {time.monotonic() - self._started:.0f} s")
        if self.current is not None and self.mask_layer is None and self.current.done:
            self.show_case(self.index)  # the shown case has results now

    def _on_errored(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.status.setText(f"Failed: {self.last_error}")

    def _on_finished(self) -> None:
        self._worker = None
        self._fill_list()

    def cancel(self) -> None:
        if self._worker is not None:
            self.status.setText("Cancelling at the next step…")
            self._worker.quit()

    def stop_worker(self, timeout_s: float = 60.0) -> bool:
        """Quit the background runs and wait for the thread (the viewer is closing)."""
        from ._widget_run import stop_and_wait

        return True if self._worker is None else stop_and_wait(self._worker, timeout_s)

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.last_error = message
        show_error(f"What is Healthy?: {message}")


def _run_cases(cohort: Any, todo: list[Any], model: str, device: str, batch: int | None):
    """The background job: each case in turn, yielding ("case", i, n, name), ("step", s, n)
    and ("finished", name); returns how many cases ran."""
    from .core.cohort import run_case

    count = 0
    for position, entry in enumerate(todo, start=1):
        yield ("case", position, len(todo), entry.name)
        gen = run_case(cohort, entry, model=model, device=device, batch_size=batch)
        while True:
            try:
                item = next(gen)
            except StopIteration:
                break
            if hasattr(item, "step"):
                yield ("step", int(item.step), int(item.total))
            else:
                yield ("status", str(item))
        count += 1
        yield ("finished", entry.name)
    return count
