"""One label per row on a plot axis, thinned to every k-th row when the rows are shorter than a line.

pyqtgraph draws every tick it is given, so 50 layer names on a 250-pixel axis print on top of each
other (seen on a MobileNet with 54 measured layers). Here the labels are re-picked whenever the
view is resized or scrolled: every row while there is room, else every second, third… row, so
what shows stays readable and the hover/selection still names the rest.
"""

from __future__ import annotations

import math

import pyqtgraph as pg
from PySide6.QtGui import QFont, QFontMetrics


class RowLabels:
    """Keeps `axis` showing as many of `labels` (position, text) as fit without overlapping."""

    def __init__(self, axis: pg.AxisItem) -> None:
        self.axis = axis
        self.labels: list[tuple[float, str]] = []
        #: A row whose label always shows (the selected layer); its neighbours make room.
        self.pinned: int | None = None
        view = axis.linkedView()
        if view is not None:
            view.sigResized.connect(self.refit)
            view.sigYRangeChanged.connect(self.refit)

    def show(self, labels: list[tuple[float, str]]) -> None:
        self.labels = list(labels)
        self.refit()

    def pin(self, index: int | None) -> None:
        self.pinned = index if index is not None and 0 <= index < len(self.labels) else None
        self.refit()

    def _indices(self, step: int) -> list[int]:
        chosen = [index for index in range(len(self.labels)) if index % step == 0]
        if self.pinned is None or step == 1 or self.pinned >= len(self.labels):
            return chosen
        near = [index for index in chosen if abs(index - self.pinned) < step]
        return sorted({index for index in chosen if index not in near} | {self.pinned})

    def step(self) -> int:
        """Show every step-th label: the rows' pixel height against one line of tick text."""
        view = self.axis.linkedView()
        if view is None or len(self.labels) < 2:
            return 1
        low, high = view.viewRange()[1]
        pixels_per_unit = view.height() / max(high - low, 1e-9)
        if pixels_per_unit <= 0:
            return 1
        positions = sorted(position for position, _text in self.labels)
        spacing = min((b - a for a, b in zip(positions, positions[1:]) if b > a), default=1.0)
        font = self.axis.style.get("tickFont") or QFont()
        line = QFontMetrics(font).height()
        return max(1, math.ceil(line / (spacing * pixels_per_unit)))

    def refit(self, *_args: object) -> None:
        self.axis.setTicks([[self.labels[index] for index in self._indices(self.step())], []])

    def shown(self) -> list[str]:
        """The texts on the axis now (tests)."""
        return [self.labels[index][1] for index in self._indices(self.step())]
