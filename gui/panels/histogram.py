"""Histogram and statistics of the selected layer's weights, before and after compression.

The plot items are built once and fed new data with ``setData`` on every selection, so
switching layers never rebuilds the scene. Numbers come from the session's stats cache; big
layers are computed on the stats thread and the panel shows "computing…" until they land.

Once a compression result exists, the same layer after compression is drawn over it: the
non-zero weights as an outline on the same bins (quantization shows as a comb of levels), the
exact zeros as their own bar at 0 with their count, and the distinct code values as ticks when
there are few enough to tell apart. Selecting several layers instead overlays their histograms,
each normalized to unit area, with a legend. The overlay's legend names the method that made
the layer ("GPTQ 2-bit per-channel + bias correction", "OBS 70%").

A quantized ONNX weight is shown as the float weight it decodes to (codes × scale); the
"Stored codes" toggle shows the integer codes the file holds instead, one bin per code.

Run alone: ``python -m gui.panels.histogram MODEL [--layer NAME] [--screenshot PNG]``.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QFont, QPalette, QResizeEvent
from PySide6.QtWidgets import (
    QBoxLayout,
    QCheckBox,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from engine.errors import SlimscopeError
from engine.model import Model
from engine.stats import OUTLIER_SIGMAS, Histogram, LayerStats, compute_histogram

from gui.plan_view import method_text
from gui.theme import BAD, status_color
from gui.session import CompressionOutcome, Session
from gui.text import grouped, percent, shape_text, short_float

#: How long a layer may take before the plot says "computing…".
COMPUTING_HINT_DELAY_MS = 150
#: From this width on, the statistics sit beside the plot instead of under it.
SIDE_BY_SIDE_WIDTH = 620
#: From this width the statistics take three pairs a row (four rows, not six): the panel's
#: minimum height is theirs, and at 1280×800 it is shared with eight table rows and the docks.
THREE_PAIRS_WIDTH = 880
#: Layers compared at once; more would be an unreadable tangle.
MAX_COMPARED = 8
#: Distinct values up to which the compressed layer's code levels are drawn as ticks.
MAX_LEVEL_TICKS = 256
#: Above this many weights the compressed layer's histogram is drawn from an even subsample.
MAX_OVERLAY_SAMPLES = 2_000_000
#: Most distinct integer codes drawn one bin each (16-bit codes); wider spans get plain bins.
MAX_CODE_BINS = 1 << 16
AFTER_COLOR = "#e8710a"
ZERO_COLOR = "#c62828"
COMPARE_COLORS = ("#2f6fdb", "#e8710a", "#2e9d57", "#c62828", "#8e44ad", "#00897b", "#b8860b", "#6d4c41")

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


def compressed_weight(outcome: CompressionOutcome, name: str) -> np.ndarray | None:
    """The layer's weight as the compressed model runs it; a low-rank pair is multiplied back.

    None when the layer has no weight there (e.g. removed)."""
    import torch

    compressed = outcome.compressed
    if compressed.module is None:  # ONNX or weights only: the compressed copy is a backend
        backend = getattr(compressed, "backend", None)
        if backend is None:
            return None
        try:
            return np.asarray(backend.read(outcome.model.layer(name).weight_key), dtype=np.float32)
        except (KeyError, SlimscopeError):
            return None  # e.g. replaced by a low-rank pair the backend names differently
    params = dict(compressed.module.named_parameters())
    if f"{name}.weight" in params:
        return params[f"{name}.weight"].detach().float().cpu().numpy()
    first, second = params.get(f"{name}.0.weight"), params.get(f"{name}.1.weight")
    if first is None or second is None:
        return None
    with torch.no_grad():
        product = second.detach().float().reshape(second.shape[0], -1) @ first.detach().float().reshape(first.shape[0], -1)
    return product.cpu().numpy()


def has_stored_codes(model: Model, key: str) -> bool:
    """Whether `model` decodes `key` from integer codes (a quantized ONNX weight), so the
    codes themselves can be shown (engine.formats.onnx_format.OnnxTensorStore)."""
    return key in getattr(model.tensors, "decoders", {}) and hasattr(model.tensors, "stored")


def codes_histogram(codes: np.ndarray) -> Histogram:
    """Counts of each integer code from the smallest to the largest, bins centred on them."""
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size == 0:
        return Histogram(np.zeros(0, np.int64), np.zeros(1, np.float64))
    low, high = int(flat.min()), int(flat.max())
    if high - low >= MAX_CODE_BINS:  # e.g. int32 codes: one bin each would not fit in memory
        return compute_histogram(flat.astype(np.float64), MAX_CODE_BINS // 256)
    counts = np.bincount(flat - low).astype(np.int64)
    edges = np.arange(low, low + counts.size + 1, dtype=np.float64) - 0.5
    return Histogram(counts, edges)


class AfterView:
    """The compressed layer summarized for drawing: histogram of non-zeros, zeros, levels."""

    def __init__(self, weight: np.ndarray, edges: np.ndarray) -> None:
        flat = weight.reshape(-1)
        self.count = int(flat.size)
        self.zeros = int(flat.size - np.count_nonzero(flat))
        step = max(1, flat.size // MAX_OVERLAY_SAMPLES)
        sample = flat[::step]
        nonzero = sample[sample != 0]
        low, high = float(edges[0]), float(edges[-1])
        # a code level may round a hair past the original extremes: count it in the end bin
        histogram = compute_histogram(np.clip(nonzero, low, high), len(edges) - 1, value_range=(low, high))
        self.counts = histogram.counts * step
        levels = np.unique(nonzero)
        self.distinct = int(levels.size) + (1 if self.zeros else 0)
        self.levels = levels if levels.size <= MAX_LEVEL_TICKS else np.zeros(0, np.float32)


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
        self.codes_toggle = QCheckBox("Stored codes")
        self.codes_toggle.setToolTip("the integer codes the file stores, instead of the float "
                                     "weights they decode to (codes × scale)")
        self.codes_toggle.toggled.connect(self._set_codes)
        self.codes_toggle.hide()
        #: The stored codes' histogram while the toggle shows them, one bin per code; else None.
        self.codes: Histogram | None = None

        header = QHBoxLayout()
        header.addWidget(self.title)
        header.addWidget(self.subtitle, 1)
        header.addWidget(self.codes_toggle)
        header.addWidget(self.log_toggle)
        self.after_label = QLabel()
        self.after_label.setObjectName("after-compression")
        self.after_label.setWordWrap(True)
        self.after_label.hide()
        #: What the overlay shows now, for tests; None without a compression result.
        self.after: AfterView | None = None
        #: Layers overlaid for comparison (two or more), else empty.
        self.compared: list[str] = []

        self.plot_widget = pg.PlotWidget()
        self.plot_widget.setMinimumHeight(80)
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
        self.after_line = pg.PlotDataItem(stepMode="center", pen=pg.mkPen(AFTER_COLOR, width=2))
        zero_fill = QColor(ZERO_COLOR)
        zero_fill.setAlpha(170)
        self.zero_bar = pg.BarGraphItem(x=[0.0], height=[0.0], width=1.0, brush=zero_fill, pen=pg.mkPen(ZERO_COLOR))
        self.zero_text = pg.TextItem(anchor=(0.0, 0.0), color=ZERO_COLOR)
        self.level_ticks = pg.ScatterPlotItem(symbol="|", size=9, pen=pg.mkPen(AFTER_COLOR, width=1.5), brush=None)
        self.compare_lines = [pg.PlotDataItem(stepMode="center", pen=pg.mkPen(color, width=2))
                              for color in COMPARE_COLORS[:MAX_COMPARED]]
        for item in (self.after_line, self.zero_bar, self.zero_text, self.level_ticks, *self.compare_lines):
            item.setVisible(False)
            self.plot.addItem(item)
        self.legend = pg.LegendItem(offset=(-10, 10), labelTextColor=self.palette().color(QPalette.ColorRole.WindowText))
        self.legend.setParentItem(self.plot.getViewBox())
        self.message = pg.TextItem(anchor=(0.5, 0.5), color=self.palette().color(QPalette.ColorRole.PlaceholderText))
        self.message.setParentItem(self.plot.getViewBox())

        # A child timer dies with the panel, so it never fires into a deleted plot.
        self._hint_timer = QTimer(self, singleShot=True, interval=COMPUTING_HINT_DELAY_MS)
        self._hint_timer.timeout.connect(self._hint_computing)

        self.stat_values: dict[str, QLabel] = {}
        self._stat_names: list[QLabel] = []
        self.stats_frame = QFrame()
        self.stats_frame.setFrameShape(QFrame.Shape.StyledPanel)
        self.stats_grid = QGridLayout(self.stats_frame)
        # tight rows: this grid sets the panel's minimum height, which the layer table above and
        # the docks below share at 800 pixels
        self.stats_grid.setContentsMargins(10, 4, 10, 4)
        self.stats_grid.setHorizontalSpacing(12)
        self.stats_grid.setVerticalSpacing(1)
        value_font = QFont(self.font())
        value_font.setStyleHint(QFont.StyleHint.Monospace)
        value_font.setFamilies(["DejaVu Sans Mono", "Menlo", "Consolas", "monospace"])
        for key, label, tip in STAT_FIELDS:
            name_label = QLabel(label)
            name_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
            name_label.setToolTip(tip)
            value_label = QLabel("—")
            value_label.setFont(value_font)
            value_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            value_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            value_label.setToolTip(tip)
            self._stat_names.append(name_label)
            self.stat_values[key] = value_label
        self._stat_columns = 0
        self._arrange_stats(2)

        # Plot and statistics side by side when the panel is wide (under the layer table, its
        # place in the window), stacked when it is narrow.
        self.body = QBoxLayout(QBoxLayout.Direction.LeftToRight)
        self.body.setSpacing(6)
        self.body.addWidget(self.plot_widget, 1)
        self.body.addWidget(self.stats_frame)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(6)
        layout.addLayout(header)
        layout.addWidget(self.after_label)
        layout.addLayout(self.body, 1)

        session.model_changed.connect(self._on_model_changed)
        session.layer_selected.connect(self.show_layer)
        session.layers_selected.connect(self._on_layers_selected)
        session.result_changed.connect(self._on_result)
        session.layer_histogram_ready.connect(self._on_histogram_ready)
        session.layer_failed.connect(self._on_failed)
        self.plot.getViewBox().sigResized.connect(self._place_message)
        self.show_layer(session.selected_layer)

    def _arrange_stats(self, columns: int) -> None:
        """Lay the statistics out in `columns` label/value pairs per row."""
        if columns == self._stat_columns:
            return
        self._stat_columns = columns
        grid = self.stats_grid
        for widget in (*self._stat_names, *self.stat_values.values()):
            grid.removeWidget(widget)
        for i, (key, _label, _tip) in enumerate(STAT_FIELDS):
            row, pair = divmod(i, columns)
            grid.addWidget(self._stat_names[i], row, pair * 3)
            grid.addWidget(self.stat_values[key], row, pair * 3 + 1)
        for column in range(9):
            grid.setColumnStretch(column, 1 if column % 3 == 1 and column // 3 < columns else 0)
            grid.setColumnMinimumWidth(column, 24 if column % 3 == 2 and column // 3 < columns - 1 else 0)
        self.stats_frame.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)

    def resizeEvent(self, event: QResizeEvent) -> None:
        wide = event.size().width() >= SIDE_BY_SIDE_WIDTH
        self._arrange_stats(3 if event.size().width() >= THREE_PAIRS_WIDTH else 2)
        self.body.setDirection(QBoxLayout.Direction.LeftToRight if wide else QBoxLayout.Direction.TopToBottom)
        self.body.setAlignment(self.stats_frame, Qt.AlignmentFlag.AlignTop if wide else Qt.AlignmentFlag(0))
        super().resizeEvent(event)

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

    def _on_layers_selected(self, names: list[str]) -> None:
        compared = names[:MAX_COMPARED] if len(names) > 1 else []
        if compared == self.compared:
            return
        self.compared = compared
        self.show_layer(self.session.selected_layer)

    def _on_result(self, _outcome: object) -> None:
        if self.histogram is not None:
            self._render(self.histogram, self.stats)  # type: ignore[arg-type]

    def show_layer(self, name: str) -> None:
        """Show `name`'s histogram, asking the session to compute it if needed."""
        self.layer_name = name
        if self.compared and name not in self.compared:
            self.compared = []
        model = self.session.model
        if not name or model is None:
            self.codes_toggle.hide()
            self.title.setText("No layer selected")
            self.subtitle.setText("")
            self._clear("Select a layer to see its weights")
            return
        layer = model.layer(name)
        self.codes_toggle.setVisible(not self.compared and has_stored_codes(model, layer.weight_key))
        if self.compared:
            self.title.setText(f"{len(self.compared)} layers")
            self.subtitle.setText("each normalized to unit area; statistics of " + name)
        else:
            self.title.setText(name)
            self.subtitle.setText(f"{layer.kind} · {shape_text(layer.shape)} · {layer.dtype}")
        for other in self.compared:
            if self.session.cached_histogram(other) is None:
                self.session.request_histogram(other)
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
        if name == self.layer_name or name in self.compared:
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
        self.zero_line.setVisible(bool(histogram.edges[0] <= 0 <= histogram.edges[-1]))
        self.legend.clear()
        self.codes = None
        self.plot.setLabel("bottom", "weight value")
        if self.compared:
            self._render_comparison()
        else:
            for line in self.compare_lines:
                line.setVisible(False)
            codes = self._stored_codes() if self.codes_toggle.isChecked() else None
            self.bars.setVisible(True)
            if codes is not None:
                self._render_codes(codes)
            else:
                self.bars.setData(histogram.edges, self._heights(histogram.counts))
                self._render_after(histogram)
        for key, label in self.stat_values.items():
            label.setText(stat_text(stats, key))
        bad = self.stat_values["non_finite"]
        bad.setStyleSheet(f"color: {status_color(BAD, self.palette())}; font-weight: bold;"
                          if stats.non_finite else "")

    def _stored_codes(self) -> np.ndarray | None:
        """The selected layer's weight as the file stores it, when that is integer codes."""
        model = self.session.model
        if model is None or not self.layer_name or not self.codes_toggle.isVisible():
            return None
        key = model.layer(self.layer_name).weight_key
        if not has_stored_codes(model, key):
            return None
        try:
            return np.asarray(model.tensors.stored(key))
        except (KeyError, SlimscopeError):
            return None

    def _render_codes(self, codes: np.ndarray) -> None:
        """One bin per integer code, edges on the half-integers between them."""
        self.codes = codes_histogram(codes)
        self._hide_after()
        self.zero_line.setVisible(bool(self.codes.edges[0] <= 0 <= self.codes.edges[-1]))
        self.bars.setData(self.codes.edges, self._heights(self.codes.counts))
        self.plot.setLabel("bottom", "stored code")
        self.plot.setLabel("left", "count (log)" if self.log_toggle.isChecked() else "count")
        self.plot.enableAutoRange()

    def _set_codes(self, _on: bool) -> None:
        if self.histogram is not None:
            self._render(self.histogram, self.stats)  # type: ignore[arg-type]

    def _render_comparison(self) -> None:
        self.bars.setVisible(False)
        self._hide_after()
        for line, name in zip(self.compare_lines, self.compared + [""] * MAX_COMPARED):
            histogram = self.session.cached_histogram(name) if name else None
            if histogram is None:
                line.setVisible(False)
                continue
            widths = np.diff(histogram.edges)
            density = histogram.counts / max(int(histogram.counts.sum()), 1) / np.where(widths > 0, widths, 1)
            line.setData(histogram.edges, np.log10(np.maximum(density, 1e-6)) if self.log_toggle.isChecked() else density)
            line.setVisible(True)
            self.legend.addItem(line, name)
        self.plot.setLabel("left", "density (log)" if self.log_toggle.isChecked() else "density")
        self.plot.enableAutoRange()

    def _render_after(self, histogram: Histogram) -> None:
        """Draw the selected layer as compressed over its original histogram, if a result exists."""
        outcome = self.session.result
        weight = compressed_weight(outcome, self.layer_name) if outcome is not None else None
        self.plot.setLabel("left", "count (log)" if self.log_toggle.isChecked() else "count")
        if weight is None:
            self._hide_after()
            self.plot.enableAutoRange()
            return
        after = self.after = AfterView(weight, histogram.edges)
        log = self.log_toggle.isChecked()
        self.after_line.setData(histogram.edges, self._heights(after.counts))
        width = float(histogram.edges[1] - histogram.edges[0])
        floor = math.log10(0.5) if log else 0.0
        zero_height = (math.log10(after.zeros) if after.zeros else floor) if log else after.zeros
        self.zero_bar.setOpts(x=[0.0], y0=[floor], height=[zero_height - floor], width=width)
        self.level_ticks.setData(after.levels, np.full(after.levels.size, floor))
        top = max(float(self._heights(histogram.counts).max()), float(self._heights(after.counts).max()), 1.0)
        for item in (self.after_line, self.level_ticks):
            item.setVisible(True)
        self.zero_bar.setVisible(after.zeros > 0)
        self.zero_text.setVisible(after.zeros > 0)
        self.zero_text.setText(f"{after.zeros:,} zeros")
        self.zero_text.setColor(status_color(BAD, self.palette()))  # readable on a dark plot too
        # A pruned layer's zero bar can dwarf everything: on a linear axis, cap the view and say
        # how tall it is, beside the bar's top; a log axis has room for all of it.
        if log:
            ceiling = max(top, zero_height) + 0.25
        else:
            ceiling = top * 1.12 if zero_height <= top * 1.12 else top * 1.25
        self.zero_text.setPos(0.6 * width, min(zero_height, ceiling))
        self.plot.enableAutoRange(x=True)
        self.plot.setYRange(floor, ceiling, padding=0)
        planned = next((layer for layer in outcome.report.layers if layer.name == self.layer_name), None)
        what = self._applied_text(outcome)
        share = after.zeros / after.count if after.count else 0.0
        levels = f"{after.distinct:,} distinct values" if after.distinct < 65536 else "float values"
        detail = f"{after.zeros:,} exact zeros ({percent(share)}) · {levels}"
        if planned is not None and planned.bytes_before:
            detail += f" · {planned.bytes_after / planned.bytes_before:.3f}× the bytes"
        accent = self.palette().color(QPalette.ColorRole.Highlight).name()
        self.after_label.setText(
            f"<span style='color:{accent}'>■</span> original &nbsp; "
            f"<span style='color:{AFTER_COLOR}'>■</span> after compression ({what}), non-zero &nbsp; "
            f"<span style='color:{ZERO_COLOR}'>■</span> {detail}")
        self.after_label.show()

    def _applied_text(self, outcome: CompressionOutcome) -> str:
        from engine.plan import Plan

        try:
            resolved = Plan.from_dict(outcome.plan).resolve(outcome.model.layers)
        except Exception:  # noqa: BLE001 - a label is not worth an error dialog
            return "as compressed"
        return method_text(resolved.get(self.layer_name))

    def _hide_after(self) -> None:
        self.after = None
        for item in (self.after_line, self.zero_bar, self.zero_text, self.level_ticks):
            item.setVisible(False)
        self.after_label.hide()

    def _heights(self, counts: np.ndarray) -> np.ndarray:
        """Counts as drawn: on a log axis empty bins sit at 0.5 so the fill never meets log(0)."""
        heights = counts.astype(np.float64)
        if self.log_toggle.isChecked():
            heights = np.log10(np.maximum(heights, 0.5))
        return heights

    def _clear(self, message: str) -> None:
        self.histogram, self.stats, self.codes = None, None, None
        self.bars.setData([], [])
        self._hide_after()
        self.legend.clear()
        for line in self.compare_lines:
            line.setVisible(False)
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
            self._render(self.histogram, self.stats)  # type: ignore[arg-type]

    def plotted_counts(self) -> np.ndarray:
        """The bin counts the plot shows now (raw, whatever the axis scale)."""
        if self.codes is not None:
            return self.codes.counts
        return np.zeros(0, np.int64) if self.histogram is None else self.histogram.counts

    def stat_text(self, key: str) -> str:
        return self.stat_values[key].text()


def _main(argv: list[str]) -> int:
    from gui.preview import preview

    return preview(lambda session: HistogramPanel(session), argv, title="Weight histogram", layer_picker=True)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
