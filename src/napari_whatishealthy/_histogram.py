"""The histogram of the brain's difference values, drawn under the threshold slider.

Bars are log-scaled counts (lesion voxels are a tiny tail next to the healthy peak); vertical
lines mark the current threshold (white), the model's recommended one (orange, dashed) and Otsu's
(cyan, dotted). A click on the plot asks for that threshold (``threshold_picked``). The numbers
come from ``core.lesions.difference_histogram``; this module only paints them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from .core.lesions import DifferenceHistogram

CURRENT = QColor(255, 255, 255)
RECOMMENDED = QColor(240, 160, 40)
OTSU = QColor(80, 200, 230)
BARS = QColor(120, 130, 150)
ABOVE = QColor(200, 80, 80)  # bars above the current threshold: what the mask takes


class DifferenceHistogramView(QWidget):
    """Paints a :class:`DifferenceHistogram`; ``threshold_picked(float)`` on a click."""

    threshold_picked = Signal(float)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.histogram: DifferenceHistogram | None = None
        self.current: float | None = None
        self.setMinimumHeight(64)
        self.setMaximumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip(
            "Difference values inside the brain (log counts). White: the current threshold "
            "(red bars are above it: the mask); orange dashed: the model's recommended "
            "threshold; cyan dotted: Otsu's threshold of this volume. Click to set the threshold."
        )

    def set_histogram(self, histogram: DifferenceHistogram | None) -> None:
        self.histogram = histogram
        self.update()

    def set_current(self, value: float | None) -> None:
        self.current = None if value is None else float(value)
        self.update()

    def markers(self) -> dict[str, float]:
        """The thresholds drawn, by name (for tests and tooltips)."""
        hist = self.histogram
        found: dict[str, float] = {}
        if hist is None:
            return found
        if self.current is not None:
            found["current"] = self.current
        found["recommended"] = hist.recommended
        if hist.otsu is not None:
            found["otsu"] = hist.otsu
        return found

    # Geometry -----------------------------------------------------------------------------------
    def _plot_rect(self) -> QRectF:
        return QRectF(4.0, 4.0, max(self.width() - 8.0, 1.0), max(self.height() - 8.0, 1.0))

    def x_of(self, value: float) -> float:
        hist, rect = self.histogram, self._plot_rect()
        if hist is None:
            return rect.left()
        low, high = float(hist.edges[0]), float(hist.edges[-1])
        fraction = (float(value) - low) / (high - low) if high > low else 0.0
        return rect.left() + min(max(fraction, 0.0), 1.0) * rect.width()

    def value_at(self, x: float) -> float:
        hist, rect = self.histogram, self._plot_rect()
        if hist is None:
            return 0.0
        low, high = float(hist.edges[0]), float(hist.edges[-1])
        fraction = min(max((x - rect.left()) / rect.width(), 0.0), 1.0)
        return low + fraction * (high - low)

    # Qt -----------------------------------------------------------------------------------------
    def mousePressEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        if self.histogram is not None and event.button() == Qt.MouseButton.LeftButton:
            self.threshold_picked.emit(self.value_at(event.position().x()))

    def paintEvent(self, _event: Any) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        rect = self._plot_rect()
        painter.fillRect(self.rect(), QColor(30, 33, 40))
        hist = self.histogram
        if hist is None or hist.counts.sum() == 0:
            painter.setPen(QColor(150, 150, 150))
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, "histogram after a run")
            painter.end()
            return
        heights = np.log1p(hist.counts.astype(float))
        top = float(heights.max()) or 1.0
        n = len(hist.counts)
        width = rect.width() / n
        for i, h in enumerate(heights):
            if h <= 0:
                continue
            bar_h = rect.height() * h / top
            above = self.current is not None and hist.edges[i] >= self.current
            painter.fillRect(QRectF(rect.left() + i * width, rect.bottom() - bar_h,
                                    max(width - 0.5, 0.5), bar_h), ABOVE if above else BARS)
        styles = {"recommended": (RECOMMENDED, Qt.PenStyle.DashLine),
                  "otsu": (OTSU, Qt.PenStyle.DotLine), "current": (CURRENT, Qt.PenStyle.SolidLine)}
        for name, value in self.markers().items():
            colour, style = styles[name]
            pen = QPen(colour)
            pen.setStyle(style)
            pen.setWidthF(2.0)
            painter.setPen(pen)
            x = self.x_of(value)
            painter.drawLine(QPointF(x, rect.top()), QPointF(x, rect.bottom()))
        painter.end()
