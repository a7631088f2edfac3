"""The per-lesion table under the mask: one row per connected component, click a row to go there.

Bound to a mask layer (:meth:`LesionTable.bind`), it follows the layer: a threshold move or a
brush stroke changes the layer's data, and the table is recomputed (by ``core.lesions``) once the
changes stop for a moment. The table is also stored as the mask layer's ``features`` (one row per
lesion; napari's features table, which other plugins read) and can be written as CSV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .core.lesions import Lesion, lesion_features, lesion_table, write_lesion_csv

AXES = ("S", "A", "R")  # napari order of this plugin's layers: world is RAS millimetres
DEBOUNCE_MS = 150
COLUMNS = ("#", "mL", "max diff", "mean diff", "uncert.", "slices")
TIP = ("Connected components of the mask (faces touching), largest first: volume, the "
       "difference inside (max and mean), the mean uncertainty when the run made one, and the "
       "axial slices they span. Click a row to go to the lesion. Painting and the threshold "
       "update the table; it is saved as CSV next to the mask, and other plugins read it as "
       "the mask layer's features.")


def data_to_world_matrix(layer: Any) -> np.ndarray:
    """The 4 x 4 matrix from a 3D layer's array indices to world coordinates."""
    from napari.utils.transforms import Affine

    data2physical = Affine(scale=np.asarray(layer.scale, float),
                           translate=np.asarray(layer.translate, float),
                           rotate=np.asarray(layer.rotate, float),
                           shear=np.asarray(layer.shear, float), ndim=3).affine_matrix
    return np.asarray(layer.affine.affine_matrix, float) @ data2physical


class LesionTable(QWidget):
    """Table of the lesions of a mask layer. ``lesion_activated`` is emitted with the Lesion of
    a clicked row, after the viewer has moved to it."""

    lesion_activated = Signal(object)
    updated = Signal()

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.lesions: list[Lesion] = []
        self._layer: Any = None
        self._difference: np.ndarray | None = None
        self._uncertainty: np.ndarray | None = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.recompute)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setToolTip(TIP)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setMinimumHeight(110)
        self.table.setMaximumHeight(200)
        self.table.cellClicked.connect(self._on_clicked)
        layout.addWidget(self.table)

    # Binding ------------------------------------------------------------------------------------
    def bind(self, layer: Any, difference: np.ndarray, uncertainty: np.ndarray | None = None
             ) -> None:
        """Follow ``layer`` (a 3D Labels layer); ``difference`` (and ``uncertainty``) are arrays
        on its grid, in its axis order. Recomputes at once."""
        if self._layer is not layer:
            self._disconnect()
            self._layer = layer
            layer.events.data.connect(self.schedule)
            layer.events.paint.connect(self.schedule)
        self._difference = difference
        self._uncertainty = uncertainty
        self.recompute()

    def unbind(self) -> None:
        self._disconnect()
        self._layer = None
        self._difference = self._uncertainty = None
        self.lesions = []
        self._fill()

    def _disconnect(self) -> None:
        if self._layer is None:
            return
        for emitter in (self._layer.events.data, self._layer.events.paint):
            try:
                emitter.disconnect(self.schedule)
            except (RuntimeError, TypeError, ValueError):
                pass

    def schedule(self, *_: Any) -> None:
        """Recompute once the mask has stopped changing for DEBOUNCE_MS."""
        try:
            self._timer.start()
        except RuntimeError:  # the widget is gone
            pass

    # Table --------------------------------------------------------------------------------------
    def recompute(self) -> list[Lesion]:
        layer = self._layer
        if layer is None or self._difference is None or layer not in self.viewer.layers:
            self.lesions = []
        else:
            data = np.asarray(layer.data)
            voxel_mm3 = float(np.prod(np.abs(np.asarray(layer.scale, float))))
            self.lesions = lesion_table(data, self._difference, voxel_mm3,
                                        uncertainty=self._uncertainty,
                                        affine=data_to_world_matrix(layer), slice_axis=0)
            features = lesion_features(self.lesions)
            # Rows are lesions (connected pieces), not label values: napari maps a label to
            # the row whose "index" is that label, and no label is negative, so hovering over
            # a voxel of label 1 does not show the first lesion's row for every lesion.
            features["index"] = -features["lesion"]
            layer.features = features
        self._fill()
        self.updated.emit()
        return self.lesions

    def _fill(self) -> None:
        has_uncertainty = self._uncertainty is not None
        self.table.setColumnHidden(4, not has_uncertainty)
        self.table.setRowCount(len(self.lesions))
        for row, lesion in enumerate(self.lesions):
            slices = (str(lesion.first_slice) if lesion.first_slice == lesion.last_slice
                      else f"{lesion.first_slice}–{lesion.last_slice}")
            cells = (str(lesion.label), f"{lesion.volume_ml:.2f}", f"{lesion.max_difference:.3f}",
                     f"{lesion.mean_difference:.3f}", _number(lesion.mean_uncertainty), slices)
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, column, item)
        total = sum(lesion.volume_ml for lesion in self.lesions)
        if self._layer is None:
            self.summary.setText("")
        elif not self.lesions:
            self.summary.setText("No lesion in the mask")
        else:
            n = len(self.lesions)
            self.summary.setText(f"{n} lesion{'s' if n != 1 else ''}, {total:.2f} mL in all "
                                 "(click a row to go there)")

    def _on_clicked(self, row: int, _column: int = 0) -> None:
        if 0 <= row < len(self.lesions):
            self.go_to(self.lesions[row])

    def go_to(self, lesion: Lesion) -> None:
        """Move the viewer's slice and camera to the lesion's centroid."""
        layer = self._layer
        if layer is None:
            return
        world = np.asarray(layer.data_to_world(lesion.centroid), float)
        point = list(self.viewer.dims.point)
        displayed = list(self.viewer.dims.displayed)
        for axis in range(len(point)):
            offset = len(point) - world.size
            if axis >= offset and axis not in displayed:
                point[axis] = float(world[axis - offset])
        self.viewer.dims.point = point
        centre = [float(world[a - (len(point) - world.size)]) for a in displayed]
        self.viewer.camera.center = centre
        self.table.selectRow(self.lesions.index(lesion))
        self.lesion_activated.emit(lesion)

    def write_csv(self, path: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
        """The table as CSV (recomputed from the layer's current data first), never over one of
        ``inputs``."""
        self.recompute()
        return write_lesion_csv(self.lesions, path, axis_names=AXES, inputs=inputs)


def _number(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.3f}"


def lesion_csv_path(mask_path: str | Path) -> Path:
    """``<mask stem>_lesions.csv`` next to a saved mask."""
    path = Path(mask_path)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}_lesions.csv")
