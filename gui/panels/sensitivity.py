"""Per-layer sensitivity: heat maps of layers x levels and the curves of chosen layers.

Two heat maps, pruning sparsity and weight bits, share one colour scale: the change of the
model's metric when that one layer alone is compressed to that level, drawn as a *drop* (worse
is always warmer, whichever way the metric points) on a log scale, because the small drops
that decide a plan would vanish next to a collapsed layer on a linear one. Hovering a cell
gives the exact numbers; clicking a row selects the layer everywhere and pins its curves below.

Every plot item is built once; new results and selections call ``setData``/``setImage`` (habit
8). The panel observes :class:`~gui.analysis.AnalysisState` and asks the window (signals) to
run, save or load, so it holds no file dialogs and no engine calls of its own.

Run alone: ``python -m gui.panels.sensitivity [MODEL] [--results JSON | --method M]
[--screenshot PNG]`` (the bundled demo, measured with the data-free method, by default).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, QObject, QPointF, Qt, Signal
from PySide6.QtGui import QColor, QFontMetrics, QPainter, QPaintEvent, QPalette
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from engine.sensitivity import BASELINE_LEVEL, Sensitivity

from gui.analysis import AnalysisState
from gui.panels.row_labels import RowLabels
from gui.text import human_bytes, short_float
from gui.theme import is_dark, style_plot, theme_signals

#: The axes drawn, with their titles; the rank axis shows only when the results have one.
AXES: tuple[tuple[str, str], ...] = (("sparsity", "Pruning · sparsity"), ("bits", "Quantization · weight bits"),
                                     ("rank", "Low rank · % of full rank"))
QWIDGETSIZE_MAX = 16_777_215  # Qt's "no maximum"
#: What each axis' curve plot has along the bottom.
AXIS_LABELS = {"sparsity": "sparsity, % of weights pruned", "bits": "weight bits",
               "rank": "% of full rank kept"}
#: Curves shown at once: the selected layer plus the most recently pinned ones.
MAX_CURVES = 6
#: Decades of drop the colour scale spans below the largest drop, for estimated metrics.
COLOR_DECADES = 4
#: Smallest accuracy/agreement drop told apart by colour, in percentage points.
POINTS_FLOOR = 0.1
#: Heat map height beyond its rows (title, level axis), and the most it asks for.
HEAT_CHROME, MAX_HEAT_HEIGHT = 64, 340
CURVES_MIN_HEIGHT = 130
#: The plots scroll inside the dock below this height, so the dock never squeezes the layer
#: table above it (the plots' own minimum, heat maps plus curves, is taller).
PLOTS_SCROLL_MIN_HEIGHT = 80
#: The least a curve plot's y axis spans, in points of an accuracy-like metric: auto-zoom drew
#: a 0.2-point dip as a cliff; on 5 points it is a 4 % dip of the plot's height.
MIN_SPAN_POINTS = 5.0
#: The same for metrics on a log axis (loss, noise/signal), in decades.
MIN_SPAN_DECADES = 1.0
#: Room left above and below the curves, as a share of the span.
CURVE_PADDING = 0.06
CURVE_COLORS = ("#3d7ae0", "#e0663d", "#2ca25f", "#a05ad2", "#d4a017", "#17a2b8")
HEAT_STOPS_LIGHT = ("#fbfcfd", "#fff3c4", "#fdc46c", "#f4763e", "#d7301f", "#7f0000")
HEAT_STOPS_DARK = ("#1c2a3a", "#264d6b", "#6a6a8a", "#c8594a", "#f3904f", "#fde4a5")


# -- how numbers read ------------------------------------------------------------------------------
def in_points(sens: Sensitivity) -> bool:
    """Fractions of correct answers read as percentages, their changes as points."""
    return sens.metric in ("accuracy", "agreement")


def metric_text(sens: Sensitivity, value: float) -> str:
    if in_points(sens):
        return f"{value * 100:.2f} %"
    if sens.metric == "weight_nsr":
        sqnr = f" ({-10 * math.log10(value):.1f} dB SQNR)" if value > 0 else ""
        return f"{short_float(value)}{sqnr}"
    return short_float(value)


def delta_text(sens: Sensitivity, delta: float) -> str:
    if in_points(sens):
        return f"{delta * 100:+.2f} pts"
    return f"{delta:+.3g}"


def level_text(axis: str, level: float) -> str:
    if axis == "sparsity":
        return f"{level * 100:.0f} % pruned"
    if axis == "bits":
        return "float" if level == BASELINE_LEVEL["bits"] else f"{int(level)} bits"
    return f"{level * 100:.0f} % rank"


def tick_text(axis: str, level: float) -> str:
    if axis == "sparsity":
        return f"{level * 100:.0f}"
    if axis == "bits":
        return "fp" if level == BASELINE_LEVEL["bits"] else str(int(level))
    return f"{level * 100:g}"


def drop_label(sens: Sensitivity) -> str:
    if in_points(sens):
        return f"{sens.metric} drop (pts)"
    return {"loss": "loss increase", "weight_nsr": "weight noise / signal"}.get(sens.metric, f"{sens.metric} change")


def drops_matrix(sens: Sensitivity, axis: str) -> tuple[list[str], list[float], np.ndarray]:
    """(layers, levels, drops) for one axis: positive = worse, in display units (points)."""
    names, levels, delta = sens.heatmap(axis, "delta")
    drops = -delta if sens.higher_is_better else delta
    return names, levels, drops * (100.0 if in_points(sens) else 1.0)


@dataclass(frozen=True)
class ColorScale:
    """log10 of the drop, clipped to [low, high]: what the heat maps and the colour bar show."""

    low: float
    high: float

    @classmethod
    def for_drops(cls, sens: Sensitivity, matrices: list[np.ndarray]) -> ColorScale:
        finite = np.concatenate([m[np.isfinite(m)] for m in matrices]) if matrices else np.zeros(0)
        largest = float(finite.max()) if finite.size else 0.0
        if in_points(sens):
            floor = POINTS_FLOOR
            largest = max(largest, 10 * floor)
        else:
            largest = largest if largest > 0 else 1.0
            floor = largest * 10.0 ** -COLOR_DECADES
        return cls(math.log10(floor), math.log10(largest))

    def values(self, drops: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            logged = np.log10(np.clip(drops, 10.0 ** self.low, None))
        return np.where(np.isfinite(drops), logged, np.nan)

    def ticks(self) -> list[tuple[float, str]]:
        """Decade ticks (1, 10, 100; or 0.001, 0.01 ...) plus 2 and 5 when few decades show."""
        ticks = []
        decades = range(math.floor(self.low), math.ceil(self.high) + 1)
        steps = (1, 2, 5) if self.high - self.low <= 2.5 else (1,)
        for decade in decades:
            for step in steps:
                value = math.log10(step) + decade
                if self.low - 1e-9 <= value <= self.high + 1e-9:
                    ticks.append((value, _tick_number(step * 10.0 ** decade)))
        return ticks


def _tick_number(value: float) -> str:
    if 1e-3 <= value < 1e4:
        return f"{value:g}"
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")


def curve_y_range(values: list[float], *, log: bool, points: bool) -> tuple[float, float]:
    """The y range (axis coordinates: log10 on a log axis) that shows every finite value,
    spanning at least MIN_SPAN_POINTS or MIN_SPAN_DECADES so that tiny changes look tiny.

    The good end stays put and the range grows towards worse: down for accuracy-like metrics
    (higher is better), up for the losses and noise drawn on a log axis."""
    finite = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not finite:
        return (0.0, 1.0)
    low, high = min(finite), max(finite)
    if log:
        low, high = math.log10(low), math.log10(high)
        high = max(high, low + MIN_SPAN_DECADES)
    elif points:
        low = min(low, high - MIN_SPAN_POINTS)
    else:
        span = max(high - low, abs(high) * 1e-3, 1e-9)
        low = min(low, high - span)
    pad = CURVE_PADDING * (high - low)
    return (low - pad, high + pad)


def log_ticks(low: float, high: float) -> list[tuple[float, str]]:
    """Labelled ticks for a log axis between 10**low and 10**high: decades, plus 2 and 5 when
    fewer than three decades show (pyqtgraph labels none inside a single decade)."""
    steps = (1, 2, 5) if high - low < 3 else (1,)
    ticks = []
    for decade in range(math.floor(low), math.ceil(high) + 1):
        for step in steps:
            value = step * 10.0 ** decade
            if low <= math.log10(value) <= high:
                ticks.append((math.log10(value), _tick_number(value)))
    return ticks


class ElidedLabel(QLabel):
    """A one-line label that ends in "…" when narrow instead of holding its dock wide; the
    whole text stays in ``text()`` and the tooltip."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(text, parent)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)

    def setText(self, text: str) -> None:  # type: ignore[override]
        super().setText(text)
        self.setToolTip(text)

    def paintEvent(self, _event: QPaintEvent) -> None:
        painter = QPainter(self)
        rect = self.contentsRect()
        elided = self.fontMetrics().elidedText(self.text(), Qt.TextElideMode.ElideRight, rect.width())
        painter.setPen(self.palette().color(self.foregroundRole()))
        painter.drawText(rect, int(Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft), elided)


def heat_colormap(dark: bool) -> pg.ColorMap:
    stops = HEAT_STOPS_DARK if dark else HEAT_STOPS_LIGHT
    return pg.ColorMap(np.linspace(0.0, 1.0, len(stops)), [QColor(c) for c in stops])


# -- the panel ---------------------------------------------------------------------------------------
class SensitivityPanel(QWidget):
    """Observes an :class:`AnalysisState`; see the module docstring."""

    run_requested = Signal()
    save_requested = Signal()
    load_requested = Signal()

    def __init__(self, state: AnalysisState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.session = state.session
        self.sensitivity: Sensitivity | None = None
        #: Layers whose curves show, most recent last.
        self.curve_layers: list[str] = []
        self._rows: dict[str, list[str]] = {}
        self._levels: dict[str, list[float]] = {}
        self._drops: dict[str, np.ndarray] = {}
        self.scale = ColorScale(-1.0, 1.0)

        # -- tool row --
        self.run_button = QPushButton("Run…")
        self.run_button.setToolTip("Measure sensitivity (F5): choose the method and the data")
        self.run_button.clicked.connect(self.run_requested)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(state.cancel)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setMaximumWidth(240)
        self.progress_label = ElidedLabel()
        self.progress_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.summary_label = ElidedLabel()
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the results as the engine's sensitivity JSON")
        self.save_button.clicked.connect(self.save_requested)
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Load results saved by the app or by `slimscope sensitivity`")
        self.load_button.clicked.connect(self.load_requested)
        tools = QHBoxLayout()
        tools.addWidget(self.run_button)
        tools.addWidget(self.cancel_button)
        tools.addWidget(self.progress_bar)
        # What the pointer is over replaces the summary while it is over a cell or a column:
        # the tool row's room, not a row of its own, which a short dock cannot spare.
        self.hover_label = QLabel()
        self.hover_label.setTextFormat(Qt.TextFormat.RichText)
        # a long hover line must not widen the dock: it is cut at the panel's edge
        self.hover_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.hover_label.hide()
        tools.addWidget(self.progress_label, 1)
        tools.addWidget(self.summary_label, 1)
        tools.addWidget(self.hover_label, 1)
        tools.addWidget(self.load_button)
        tools.addWidget(self.save_button)

        # -- plots, built once --
        self.plots = pg.GraphicsLayoutWidget()
        self.heat_plots: dict[str, pg.PlotItem] = {}
        self.row_labels: dict[str, RowLabels] = {}
        self.images: dict[str, pg.ImageItem] = {}
        self.curve_plots: dict[str, pg.PlotItem] = {}
        self.curves: dict[str, list[pg.PlotDataItem]] = {}
        self.baselines: dict[str, pg.InfiniteLine] = {}
        self.row_marks: dict[str, pg.LinearRegionItem] = {}
        for col, (axis, title) in enumerate(AXES):
            heat = self.plots.addPlot(row=0, col=col, title=title)
            image = pg.ImageItem(axisOrder="row-major")
            heat.addItem(image)
            heat.invertY(True)
            heat.setMouseEnabled(x=False, y=False)
            heat.setMenuEnabled(False)
            heat.hideButtons()
            mark = pg.LinearRegionItem(orientation="horizontal", movable=False,
                                       brush=pg.mkBrush(0, 0, 0, 0), pen=pg.mkPen(width=2))
            mark.setZValue(10)
            heat.addItem(mark)
            curve_plot = self.plots.addPlot(row=1, col=col)
            curve_plot.setMinimumHeight(CURVES_MIN_HEIGHT)
            curve_plot.setMenuEnabled(False)
            curve_plot.hideButtons()
            curve_plot.setMouseEnabled(x=False, y=False)
            curve_plot.showGrid(x=True, y=True, alpha=0.15)
            curve_plot.setLabel("bottom", AXIS_LABELS[axis])
            curve_plot.getAxis("left").enableAutoSIPrefix(False)  # "loss (x0.001)" read badly
            baseline = pg.InfiniteLine(angle=0, movable=False)
            curve_plot.addItem(baseline)
            self.curves[axis] = []
            for color in CURVE_COLORS[:MAX_CURVES]:
                item = pg.PlotDataItem(pen=pg.mkPen(color, width=2), symbol="o", symbolSize=5,
                                       symbolBrush=pg.mkBrush(color), symbolPen=None, connect="finite")
                curve_plot.addItem(item)
                self.curves[axis].append(item)
            self.heat_plots[axis], self.images[axis] = heat, image
            self.row_labels[axis] = RowLabels(heat.getAxis("left"))
            self.curve_plots[axis], self.baselines[axis], self.row_marks[axis] = curve_plot, baseline, mark
        first = AXES[0][0]
        for other, _title in AXES[1:]:
            self.heat_plots[other].setYLink(self.heat_plots[first])
            self.heat_plots[other].getAxis("left").setStyle(showValues=False)
            self.curve_plots[other].setYLink(self.curve_plots[first])
            self.curve_plots[other].getAxis("left").setStyle(showValues=False)
        self.color_bar = pg.ColorBarItem(values=(0, 1), width=14, interactive=False, colorMapMenu=False)
        self.color_bar.setImageItem(list(self.images.values()))
        self.plots.addItem(self.color_bar, row=0, col=len(AXES))
        self.legend = pg.LegendItem(offset=None, labelTextSize="9pt")
        self.plots.addItem(self.legend, row=1, col=len(AXES))
        grid = self.plots.ci.layout
        grid.setColumnStretchFactor(0, 5)
        grid.setColumnStretchFactor(1, 3)
        grid.setColumnStretchFactor(2, 3)
        self._show_axis("rank", False)
        grid.setRowStretchFactor(0, 3)
        grid.setRowStretchFactor(1, 2)

        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(2000)
        self.log_view.setPlaceholderText("The analysis log appears here.")
        self.log_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.log_view.setMinimumHeight(self.log_view.fontMetrics().lineSpacing() + 12)  # one line

        # The plots keep their readable minimum and scroll when the dock is shorter than that.
        self.plots_scroll = QScrollArea()
        self.plots_scroll.setWidgetResizable(True)
        self.plots_scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.plots_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.plots_scroll.setMinimumHeight(PLOTS_SCROLL_MIN_HEIGHT)
        self.plots_scroll.setWidget(self.plots)
        self.plots.installEventFilter(self)  # leaving the plots gives the summary back
        self.empty_label = QLabel()
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setWordWrap(True)
        self.empty_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.stack = QStackedWidget()
        self.stack.addWidget(self.empty_label)
        self.stack.addWidget(self.plots_scroll)
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.addWidget(self.stack)
        self.splitter.addWidget(self.log_view)
        self.splitter.setStretchFactor(0, 5)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([440, 60])

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(tools)
        layout.addWidget(self.splitter, 1)

        self._restyle()
        self.plots.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.plots.scene().sigMouseClicked.connect(self._on_mouse_clicked)
        state.sensitivity_changed.connect(self.show_results)
        state.running_changed.connect(self._on_running)
        state.progress.connect(self._on_progress)
        state.log_line.connect(self.append_log)
        self.session.layer_selected.connect(self._on_layer_selected)
        self.session.model_changed.connect(self._update_buttons)
        theme_signals.changed.connect(self._restyle)
        self._on_running(state.running)
        self.show_results(state.sensitivity)

    # -- look -----------------------------------------------------------------------------------
    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange:
            self._restyle()

    def _restyle(self, *_args: object) -> None:
        palette = self.palette()
        style_plot(self.plots, palette)
        text = palette.color(QPalette.ColorRole.WindowText)
        mid = palette.color(QPalette.ColorRole.Mid)
        for axis, _title in AXES:
            self.heat_plots[axis].setTitle(dict(AXES)[axis], color=text.name(), size="10pt", bold=True)
            self.baselines[axis].setPen(pg.mkPen(mid, width=1, style=Qt.PenStyle.DashLine))
            for line in self.row_marks[axis].lines:
                line.setPen(pg.mkPen(palette.color(QPalette.ColorRole.Highlight), width=2))
        self.legend.setLabelTextColor(text)
        self.color_bar.setColorMap(heat_colormap(is_dark(palette)))
        if self.sensitivity is not None:
            self.color_bar.getAxis("left").setLabel(drop_label(self.sensitivity), color=text.name())

    # -- state events ------------------------------------------------------------------------------
    def append_log(self, line: str) -> None:
        """Add a line and show it: the log follows its newest line (Qt follows only a view that
        is scrolled to the end and on screen, so a hidden or freshly sized log stayed behind)."""
        self.log_view.appendPlainText(line)
        bar = self.log_view.verticalScrollBar()
        bar.setValue(bar.maximum())

    def _update_buttons(self, *_args: object) -> None:
        problem = self.state.can_run()
        self.run_button.setEnabled(not problem)
        self.run_button.setToolTip(problem or "Measure sensitivity (F5): choose the method and the data")
        self.save_button.setEnabled(self.sensitivity is not None)
        self.load_button.setEnabled(self.session.model is not None)
        if self.sensitivity is None:
            self.empty_label.setText(
                "No sensitivity results yet.\n\nAnalyse › Sensitivity… (F5) measures how much each "
                "layer suffers when it alone is pruned or quantized." if not problem or self.state.running
                else f"No sensitivity results yet.\n\n{problem}"
            )

    def _on_running(self, running: bool) -> None:
        self.cancel_button.setEnabled(running)
        self.progress_bar.setVisible(running)
        self.progress_label.setVisible(running)
        self.summary_label.setVisible(not running)
        if running:
            self.progress_bar.setValue(0)
            self.progress_label.setText("Starting…")
        self._update_buttons()

    def _on_progress(self, fraction: float, message: str) -> None:
        self.progress_bar.setValue(int(fraction * 1000))
        if message:
            self.progress_label.setText(message)

    def _on_layer_selected(self, name: str) -> None:
        if name and self.sensitivity is not None and name in self._row_names():
            self._pin(name)
        self._show_curves()
        self._mark_row(name)

    # -- results -----------------------------------------------------------------------------------
    def show_results(self, result: Sensitivity | None) -> None:
        """Draw `result` (None clears); the plot items stay, only their data changes."""
        self.sensitivity = result
        self._update_buttons()
        if result is None:
            self.stack.setCurrentIndex(0)
            self.summary_label.setText("")
            for image in self.images.values():
                image.clear()
            self.curve_layers = []
            self._show_curves()
            return
        matrices = []
        for axis, _title in AXES:
            names, levels, drops = drops_matrix(result, axis)
            self._rows[axis], self._levels[axis], self._drops[axis] = names, levels, drops
            matrices.append(drops)
        self.scale = ColorScale.for_drops(result, matrices)
        for axis, _title in AXES:
            self._draw_heat(axis)
        self._show_axis("rank", bool(self._rows["rank"]))
        self._size_rows()
        self.color_bar.setLevels((self.scale.low, self.scale.high))
        self.color_bar.axis.setTicks([self.scale.ticks()])
        self._restyle()
        self.summary_label.setText(self._summary(result))
        keep = [n for n in self.curve_layers if n in self._row_names()]
        selected = self.session.selected_layer
        self.curve_layers = keep
        if selected in self._row_names():
            self._pin(selected)
        elif not keep and self._row_names():
            self.curve_layers = [self._most_sensitive()]
        self._show_curves()
        self._mark_row(selected)
        self.stack.setCurrentIndex(1)

    def _show_axis(self, axis: str, visible: bool) -> None:
        """Show or hide one axis' column (its heat map and curves), giving its width back."""
        column = [a for a, _title in AXES].index(axis)
        self.heat_plots[axis].setVisible(visible)
        self.curve_plots[axis].setVisible(visible)
        for item in (self.heat_plots[axis], self.curve_plots[axis]):
            item.setMaximumWidth(QWIDGETSIZE_MAX if visible else 0)
        self.plots.ci.layout.setColumnStretchFactor(column, 3 if visible else 0)

    def _summary(self, result: Sensitivity) -> str:
        method = {"datafree": "data-free"}.get(result.method, result.method)
        source = f" on {result.data}" if result.data else ""
        return (f"{method} · {result.metric} {metric_text(result, result.baseline)} before compression"
                f"{source} · {len(result.layers)} layers · {result.seconds:.1f} s")

    def _row_names(self) -> list[str]:
        return self._rows.get(AXES[0][0]) or self._rows.get(AXES[1][0]) or []

    def _most_sensitive(self) -> str:
        """The layer with the largest total drop: the one worth looking at first."""
        names = self._row_names()
        totals = np.zeros(len(names))
        for axis, _title in AXES:
            drops = self._drops.get(axis)
            if drops is not None and drops.shape[0] == len(names):
                totals += np.nan_to_num(np.clip(drops, 0, None)).sum(axis=1)
        return names[int(np.argmax(totals))]

    def _draw_heat(self, axis: str) -> None:
        plot, image = self.heat_plots[axis], self.images[axis]
        names, levels, drops = self._rows[axis], self._levels[axis], self._drops[axis]
        if not names:
            image.clear()
            return
        image.setImage(self.scale.values(drops), levels=(self.scale.low, self.scale.high), autoLevels=False)
        image.setRect(0, 0, len(levels), len(names))
        plot.setLimits(xMin=0, xMax=len(levels), yMin=0, yMax=len(names))
        plot.setRange(xRange=(0, len(levels)), yRange=(0, len(names)), padding=0)
        step = max(1, math.ceil(len(levels) / 12))
        bottom = [(i + 0.5, tick_text(axis, level)) for i, level in enumerate(levels) if i % step == 0]
        plot.getAxis("bottom").setTicks([bottom, []])
        plot.getAxis("top").setTicks([bottom, []])
        self.row_labels[axis].show([(i + 0.5, name) for i, name in enumerate(names)])
        self._size_axes()
        curve_plot = self.curve_plots[axis]
        curve_plot.getAxis("bottom").setTicks([bottom, []])
        curve_plot.setLimits(xMin=0, xMax=len(levels))
        curve_plot.setXRange(0, len(levels), padding=0)  # columns line up with the heat map's

    def _size_rows(self) -> None:
        """Heat maps tall enough for one readable label per layer (up to a point: long models
        scroll their labels into every other row rather than pushing the curves away)."""
        rows = len(self._row_names())
        line = QFontMetrics(self.font()).height()
        height = min(MAX_HEAT_HEIGHT, rows * (line + 2) + HEAT_CHROME)
        for axis, _title in AXES:
            self.heat_plots[axis].setMinimumHeight(height)
        # The view does not take its scene layout's minimum, so it is given the sum (plus margins).
        self.plots.setMinimumHeight(height + CURVES_MIN_HEIGHT + 24)

    def _size_axes(self) -> None:
        """Wide enough for the longest layer name; curve plots match so columns line up."""
        metrics = QFontMetrics(self.font())
        longest = max((metrics.horizontalAdvance(name) for name in self._row_names()), default=40)
        width = min(260, longest + 14)
        first = AXES[0][0]
        self.heat_plots[first].getAxis("left").setWidth(width)
        self.curve_plots[first].getAxis("left").setWidth(width)
        for axis, _title in AXES[1:]:
            self.heat_plots[axis].getAxis("left").setWidth(4)
            self.curve_plots[axis].getAxis("left").setWidth(4)

    def _mark_row(self, name: str) -> None:
        for axis, _title in AXES:
            mark = self.row_marks[axis]
            rows = self._rows.get(axis, [])
            if name in rows:
                row = rows.index(name)
                mark.setRegion((row, row + 1))
                mark.show()
            else:
                mark.hide()
            self.row_labels[axis].pin(rows.index(name) if name in rows else None)

    # -- curves -------------------------------------------------------------------------------------
    def _pin(self, name: str) -> None:
        if name in self.curve_layers:
            self.curve_layers.remove(name)
        self.curve_layers.append(name)
        del self.curve_layers[:-MAX_CURVES]

    def toggle_pin(self, name: str) -> None:
        """Show `name`'s curves, or hide them when they already show."""
        if name in self.curve_layers and len(self.curve_layers) > 1:
            self.curve_layers.remove(name)
        else:
            self._pin(name)
        self._show_curves()

    def _show_curves(self) -> None:
        result = self.sensitivity
        self.legend.clear()
        log_y = result is not None and not in_points(result)
        for axis, _title in AXES:
            plot = self.curve_plots[axis]
            plot.setLogMode(x=False, y=log_y)
            items = self.curves[axis]
            layers = self.curve_layers if result is not None else []
            for slot, item in enumerate(items):
                if slot < len(layers) and axis in result.layer(layers[slot]).curves:  # type: ignore[union-attr]
                    x, y = self.curve_data(axis, layers[slot])
                    item.setData(x, y)
                    item.show()
                    if axis == AXES[0][0]:
                        self.legend.addItem(item, layers[slot])
                else:
                    item.setData([], [])
                    item.hide()
            baseline = self.baselines[axis]
            if result is not None and not (log_y and result.baseline <= 0):
                value = self._display_metric(result.baseline)
                baseline.setValue(math.log10(value) if log_y else value)
                baseline.show()
            else:
                baseline.hide()
        if result is not None:
            unit = " (%)" if in_points(result) else ""
            self.curve_plots[AXES[0][0]].setLabel("left", f"{result.metric}{unit}")
            self._fit_curves(log_y)

    def _fit_curves(self, log_y: bool) -> None:
        """One metric range for all curve plots (their Y axes are linked), baseline included,
        from the curves' own values (a log axis' items hold log10 values, which were once mixed
        with plain ones here and sent the fast estimate's curve off the plot)."""
        result = self.sensitivity
        assert result is not None
        values = [self._display_metric(result.baseline)]
        for axis, _title in AXES:
            for name in self.curve_layers:
                if axis in result.layer(name).curves:
                    values.extend(float(v) for v in self.curve_data(axis, name)[1])
        low, high = curve_y_range(values, log=log_y, points=in_points(result))
        first = self.curve_plots[AXES[0][0]]
        first.setYRange(low, high, padding=0)
        # pyqtgraph labels no tick inside a single decade: the log axis gets its own numbers
        first.getAxis("left").setTicks([log_ticks(low, high), []] if log_y else None)

    def shown_y_range(self) -> tuple[float, float]:
        """The curve plots' y range as shown (axis coordinates), for tests and reviews."""
        low, high = self.curve_plots[AXES[0][0]].vb.viewRange()[1]
        return float(low), float(high)

    def _display_metric(self, value: float) -> float:
        assert self.sensitivity is not None
        return value * 100 if in_points(self.sensitivity) else value

    def curve_data(self, axis: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A layer's curve as plotted: column positions and metric in display units (NaN where
        a log scale cannot show a value)."""
        assert self.sensitivity is not None
        curve = self.sensitivity.layer(name).curves[axis]
        columns = self._levels[axis]
        x = np.array([columns.index(level) + 0.5 for level in curve.levels], dtype=float)
        y = np.array([self._display_metric(v) for v in curve.metric], dtype=float)
        if not in_points(self.sensitivity):
            y[y <= 0] = np.nan
        return x, y

    # -- hover and click ------------------------------------------------------------------------------
    def cell_at(self, scene_pos: QPointF) -> tuple[str, int, int] | None:
        """(axis, row, column) of the heat map cell under a scene position, if any."""
        for axis, _title in AXES:
            plot = self.heat_plots[axis]
            if not plot.vb.sceneBoundingRect().contains(scene_pos):
                continue
            point = plot.vb.mapSceneToView(scene_pos)
            row, col = int(math.floor(point.y())), int(math.floor(point.x()))
            if 0 <= row < len(self._rows.get(axis, [])) and 0 <= col < len(self._levels.get(axis, [])):
                return axis, row, col
        return None

    def cell_text(self, axis: str, row: int, col: int) -> str:
        """Everything known about one cell, as the hover line shows it."""
        result = self.sensitivity
        assert result is not None
        name, level = self._rows[axis][row], self._levels[axis][col]
        curve = result.layer(name).curves[axis]
        if level not in curve.levels:
            return f"<b>{name}</b> · {level_text(axis, level)}: not measured"
        i = curve.levels.index(level)
        status = curve.status[i]
        return (f"<b>{name}</b> · {level_text(axis, level)} — {result.metric} "
                f"{metric_text(result, curve.metric[i])} ({delta_text(result, curve.delta[i])}) · "
                f"weight {human_bytes(curve.bytes[i])} · {status}")

    def _on_mouse_moved(self, scene_pos: QPointF) -> None:
        if self.sensitivity is None:
            return
        cell = self.cell_at(scene_pos)
        if cell is not None:
            self.show_hover(self.cell_text(*cell))
            self.plots.setToolTip(self.cell_text(*cell))
            return
        self.plots.setToolTip("")
        for axis, _title in AXES:
            plot = self.curve_plots[axis]
            if plot.vb.sceneBoundingRect().contains(scene_pos) and self.curve_layers:
                col = int(math.floor(plot.vb.mapSceneToView(scene_pos).x()))
                if 0 <= col < len(self._levels.get(axis, [])):
                    self.show_hover(self._column_text(axis, col))
                    return
        self.show_hover("")

    def show_hover(self, text: str) -> None:
        """Show `text` in the tool row in place of the summary; "" gives the summary back."""
        if text:
            self.hover_label.setText(text)
        self.hover_label.setVisible(bool(text))
        self.summary_label.setVisible(not text and not self.state.running)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.plots and event.type() == QEvent.Type.Leave:
            self.show_hover("")
        return super().eventFilter(watched, event)

    def _column_text(self, axis: str, col: int) -> str:
        result = self.sensitivity
        assert result is not None
        level = self._levels[axis][col]
        parts = []
        for name in self.curve_layers:
            curve = result.layer(name).curves.get(axis)
            if curve is not None and level in curve.levels:
                i = curve.levels.index(level)
                parts.append(f"{name} {metric_text(result, curve.metric[i])}")
        return f"<b>{level_text(axis, level)}</b> — " + " · ".join(parts)

    def _on_mouse_clicked(self, event: object) -> None:
        if self.sensitivity is None:
            return
        cell = self.cell_at(event.scenePos())  # type: ignore[attr-defined]
        if cell is None:
            return
        name = self._rows[cell[0]][cell[1]]
        self.toggle_pin(name)
        try:
            self.session.select_layer(name)
        except KeyError:  # results for layers this model names otherwise: curves still show
            pass


def _main(argv: list[str]) -> int:
    from gui.analysis import preview_with_results

    return preview_with_results(SensitivityPanel, argv, title="Sensitivity")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
