"""Histogram and statistics of the selected layer's weights.

The plot items are built once and fed new data with ``setData`` on every selection, so
switching layers never rebuilds the scene. Numbers come from the session's stats cache; big
layers are computed on the stats thread and the panel shows "computing…" until they land.

Run alone: ``python -m gui.panels.histogram MODEL [--layer NAME] [--screenshot PNG]``.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import (
    QCheckBox,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from engine.model import Model
from engine.stats import OUTLIER_SIGMAS, Histogram, LayerStats

from gui.session import Session
from gui.text import grouped, percent, shape_text, short_float

#: How long a layer may take before the plot says "computing…".
COMPUTING_HINT_DELAY_MS = 150

#: (key, label, tooltip) in reading order: two columns, filled row by row.
STAT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("count", "Count", "Number of weights"),
    ("sparsity", "Sparsity", "Fraction exactly zero"),
    ("min", "Min", "Smallest finite weight"),
    ("max", "Max", "Largest finite weight"),
    ("mean", "Mean", "Mean of finite weights"),
    ("std", "Std", "Standard deviation of finite weights"),
    ("abs_mean", "Abs mean", "Mean magnitude: a scale for pruning thresholds"),
    ("kurtosis", "Kurtosis", "Excess kurtosis: 0 for a Gaussian; large values mean heavy tails, "
     "which hurt uniform quantization"),
    ("outlier_fraction", f"Outliers > {OUTLIER_SIGMAS:g}σ",
     f"Fraction of weights further than {OUTLIER_SIGMAS:g} standard deviations from the mean"),
    ("non_finite", "Non-finite", "NaN or Inf values; any at all mean the file is damaged"),
)


def stat_text(stats: LayerStats, key: str) -> str:
    value = getattr(stats, key)
    if key in ("count", "non_finite"):
        return grouped(int(value))
    if key in ("sparsity", "outlier_fraction"):
        return percent(value)
    if key == "kurtosis":
        return "—" if math.isnan(value) else f"{value:.2f}"
    return short_float(value)


class HistogramPanel(QWidget):
    """Observes the session's selected layer; see the module docstring."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.layer_name = ""
        #: What the plot shows now, for tests and export; None when empty.
        self.histogram: Histogram | None = None
        self.stats: LayerStats | None = None

        self.title = QLabel()
        title_font = QFont(self.title.font())
        title_font.setBold(True)
        self.title.setFont(title_font)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.subtitle = QLabel()
        self.subtitle.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.log_toggle = QCheckBox("Log scale")
        self.log_toggle.setToolTip("Logarithmic count axis: shows the tails that hold outliers")
        self.log_toggle.toggled.connect(self._set_log)

        header = QHBoxLayout()
        header.addWidget(self.title)
        header.addWidget(self.subtitle, 1)
        header.addWidget(self.log_toggle)

        self.plot_widget = pg.PlotWidget()
        self.plot_widget.setMinimumHeight(180)
        self.plot_widget.setFrameShape(QFrame.Shape.StyledPanel)  # framed like the table beside it
        self.plot = self.plot_widget.getPlotItem()
        self._style_plot()
        accent = self.palette().color(QPalette.ColorRole.Highlight)
        fill = QColor(accent)
        fill.setAlpha(150)
        # Built once; selection changes call setData (habit 8).
        self.bars = pg.PlotDataItem(
            stepMode="center", fillLevel=0, fillOutline=True, brush=fill, pen=pg.mkPen(accent, width=1)
        )
        self.plot.addItem(self.bars)
        self.zero_line = pg.InfiniteLine(
            pos=0, angle=90, movable=False,
            pen=pg.mkPen(self.palette().color(QPalette.ColorRole.Mid), width=1, style=Qt.PenStyle.DashLine),
        )
        self.plot.addItem(self.zero_line)
        self.message = pg.TextItem(anchor=(0.5, 0.5), color=self.palette().color(QPalette.ColorRole.PlaceholderText))
        self.message.setParentItem(self.plot.getViewBox())

        # A child timer dies with the panel, so it never fires into a deleted plot.
        self._hint_timer = QTimer(self, singleShot=True, interval=COMPUTING_HINT_DELAY_MS)
        self._hint_timer.timeout.connect(self._hint_computing)

        self.stat_values: dict[str, QLabel] = {}
        stats_frame = QFrame()
        stats_frame.setFrameShape(QFrame.Shape.StyledPanel)
        grid = QGridLayout(stats_frame)
        grid.setContentsMargins(10, 6, 10, 6)
        grid.setHorizontalSpacing(12)
        grid.setVerticalSpacing(3)
        value_font = QFont(self.font())
        value_font.setStyleHint(QFont.StyleHint.Monospace)
        value_font.setFamilies(["DejaVu Sans Mono", "Menlo", "Consolas", "monospace"])
        for i, (key, label, tip) in enumerate(STAT_FIELDS):
            row, pair = divmod(i, 2)
            name_label = QLabel(label)
            name_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
            name_label.setToolTip(tip)
            value_label = QLabel("—")
            value_label.setFont(value_font)
            value_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            value_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            value_label.setToolTip(tip)
            grid.addWidget(name_label, row, pair * 3)
            grid.addWidget(value_label, row, pair * 3 + 1)
            self.stat_values[key] = value_label
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(4, 1)
        grid.setColumnMinimumWidth(2, 24)
        stats_frame.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(6)
        layout.addLayout(header)
        layout.addWidget(self.plot_widget, 1)
        layout.addWidget(stats_frame)

        session.model_changed.connect(self._on_model_changed)
        session.layer_selected.connect(self.show_layer)
        session.layer_histogram_ready.connect(self._on_histogram_ready)
        session.layer_failed.connect(self._on_failed)
        self.plot.getViewBox().sigResized.connect(self._place_message)
        self.show_layer(session.selected_layer)

    def _style_plot(self) -> None:
        """Colors from the widget palette, so the plot sits in the window instead of on it."""
        palette = self.palette()
        text = palette.color(QPalette.ColorRole.WindowText)
        self.plot_widget.setBackground(palette.color(QPalette.ColorRole.Base))
        for name in ("left", "bottom"):
            axis = self.plot.getAxis(name)
            axis.setPen(pg.mkPen(palette.color(QPalette.ColorRole.Mid)))
            axis.setTextPen(pg.mkPen(text))
            axis.enableAutoSIPrefix(False)  # weights read as 0.02, not as 20 with a "(x0.001)"
        self.plot.setLabel("bottom", "weight value")
        self.plot.setLabel("left", "count")
        self.plot.showGrid(x=False, y=True, alpha=0.15)
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.plot.getViewBox().setMouseEnabled(x=True, y=False)

    # -- session events ------------------------------------------------------------------------
    def _on_model_changed(self, _model: Model | None) -> None:
        self.show_layer("")

    def show_layer(self, name: str) -> None:
        """Show `name`'s histogram, asking the session to compute it if needed."""
        self.layer_name = name
        model = self.session.model
        if not name or model is None:
            self.title.setText("No layer selected")
            self.subtitle.setText("")
            self._clear("Select a layer to see its weights")
            return
        layer = model.layer(name)
        self.title.setText(name)
        self.subtitle.setText(f"{layer.kind} · {shape_text(layer.shape)} · {layer.dtype}")
        if not self._render_cached():
            self._clear("")
            # Most layers arrive within a frame or two; say "computing" only for those that don't.
            self._hint_timer.start()
            self.session.request_histogram(name)

    def _hint_computing(self) -> None:
        if self.layer_name and self.histogram is None and not self.message.toPlainText():
            self.message.setText("computing…")
            self._place_message()

    def _on_histogram_ready(self, name: str) -> None:
        if name == self.layer_name:
            self._render_cached()

    def _on_failed(self, name: str, message: str) -> None:
        if name == self.layer_name:
            self._clear(message)

    # -- drawing ---------------------------------------------------------------------------------
    def _render_cached(self) -> bool:
        histogram = self.session.cached_histogram(self.layer_name)
        stats = self.session.cached_stats(self.layer_name)
        if histogram is None or stats is None:
            return False
        self._render(histogram, stats)
        return True

    def _render(self, histogram: Histogram, stats: LayerStats) -> None:
        self.histogram, self.stats = histogram, stats
        self.message.setText("")
        self.bars.setData(histogram.edges, self._heights(histogram.counts))
        self.zero_line.setVisible(bool(histogram.edges[0] <= 0 <= histogram.edges[-1]))
        self.plot.enableAutoRange()
        for key, label in self.stat_values.items():
            label.setText(stat_text(stats, key))
        bad = self.stat_values["non_finite"]
        bad.setStyleSheet("color: #c62828; font-weight: bold;" if stats.non_finite else "")

    def _heights(self, counts: np.ndarray) -> np.ndarray:
        """Counts as drawn: on a log axis empty bins sit at 0.5 so the fill never meets log(0)."""
        heights = counts.astype(np.float64)
        if self.log_toggle.isChecked():
            heights = np.log10(np.maximum(heights, 0.5))
        return heights

    def _clear(self, message: str) -> None:
        self.histogram, self.stats = None, None
        self.bars.setData([], [])
        self.zero_line.setVisible(False)
        self.message.setText(message)
        self._place_message()
        for label in self.stat_values.values():
            label.setText("—")
            label.setStyleSheet("")

    def _place_message(self) -> None:
        rect = self.plot.getViewBox().boundingRect()
        self.message.setPos(rect.center())

    def _set_log(self, on: bool) -> None:
        # The axis labels powers of ten; the data we hand it is already log10 (see _heights).
        self.plot.getAxis("left").setLogMode(False, on)
        self.bars.setFillLevel(math.log10(0.5) if on else 0)
        self.plot.setLabel("left", "count (log)" if on else "count")
        if self.histogram is not None:
            self.bars.setData(self.histogram.edges, self._heights(self.histogram.counts))
            self.plot.enableAutoRange()

    def plotted_counts(self) -> np.ndarray:
        """The bin counts the plot shows now (raw, whatever the axis scale)."""
        return np.zeros(0, np.int64) if self.histogram is None else self.histogram.counts

    def stat_text(self, key: str) -> str:
        return self.stat_values[key].text()


def _main(argv: list[str]) -> int:
    from gui.preview import preview

    return preview(lambda session: HistogramPanel(session), argv, title="Weight histogram", layer_picker=True)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
