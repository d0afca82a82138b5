"""A global target that fills the plan, and the Pareto front it is chosen from.

The target is a size (a fraction of the model such as ``0.25`` or ``1/8``, or bytes such as
``180KiB``, read by :func:`engine.allocate.parse_size`) or a largest drop of the metric.
*Allocate* runs :func:`engine.workflows.allocate_plan` (what ``slimscope plan`` runs) on a
worker and hands the plan to :meth:`PlanDocument.replace`, so the whole allocation is one undo
step. With *Check by
measuring*, candidate plans are compressed and evaluated on the data the sensitivity was
measured on (:mod:`engine.plan_check`): a largest drop is searched until the measured drop fits,
and the plan's measured metric is drawn beside its prediction. The plot shows the
predicted Pareto front (size against metric, size on a log axis), the uncompressed model, and the
current plan as a star that moves whenever the plan changes, whoever changed it.

All predictions assume that per-layer drops add up; the panel says so where numbers appear.

Run alone: ``python -m gui.panels.pareto [MODEL] [--results JSON] [--screenshot PNG]``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from engine.allocate import (
    Allocation,
    CurvePrediction,
    FrontPoint,
    pareto_front,
    parse_size,
    predict_plan,
)
from engine.backends.base import RUN
from engine.errors import PlanError, SlimscopeError
from engine.jobs import CancelToken, Progress
from engine.model import Model
from engine.data import DataSpec
from engine.plan_check import MEASURABLE
from engine.sensitivity import Sensitivity
from engine.workflows import PlanOutcome, Target, allocate_plan

from gui.analysis import AnalysisState, cap_worker_threads
from gui.panels.sensitivity import delta_text, in_points, metric_text
from gui.plan_document import PlanDocument
from gui.text import human_bytes, percent
from gui.theme import style_plot, theme_signals
from gui.job_service import ALLOCATE, FRONT
from gui.workers import Job

SIZE, DROP = "size", "drop"
TARGET_MODES = ((SIZE, "Size at most"), (DROP, "Metric drop at most"))
DEFAULT_SIZE_TEXT = "0.25"
ADDITIVE_NOTE = ("Predicted from the sensitivity curves, assuming the layers' drops add up; "
                 "compress and evaluate to know for sure.")
STAR_COLOR = "#e0663d"
#: The plot's least height: the dock shares 800 pixels with eight layer-table rows.
PLOT_MIN_HEIGHT = 100
#: Plot labels closer than this (pixels, across and up-down) to each other are stacked.
LABEL_NEAR_PX = (140, 30)


class LineWhenSet(QLabel):
    """A label that takes no room while it has nothing to say (the allocation's outcome)."""

    def setText(self, text: str) -> None:  # type: ignore[override]
        super().setText(text)
        self.setVisible(bool(text))


class ParetoPanel(QWidget):
    """Observes the analysis state and the plan document; see the module docstring."""

    #: The current plan's CurvePrediction (None without results or for a plan that does not
    #: resolve), after every plan, model or results change: for a "predicted metric" elsewhere.
    prediction_changed = Signal(object)

    def __init__(self, state: AnalysisState, document: PlanDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.session = state.session
        self.document = document
        self.sensitivity: Sensitivity | None = None
        self.front: list[FrontPoint] = []
        self.prediction: CurvePrediction | None = None
        self.last_allocation: Allocation | None = None
        #: The last allocation with what checking it measured (the report `slimscope plan` writes).
        self.last_outcome: PlanOutcome | None = None
        #: The session's job service: the front and the allocation run in its FRONT and
        #: ALLOCATE slots, one of each at a time.
        self.jobs = self.session.jobs

        # -- target row --
        self.mode_combo = QComboBox()
        for key, label in TARGET_MODES:
            self.mode_combo.addItem(label, key)
        self.size_edit = QLineEdit(DEFAULT_SIZE_TEXT)
        self.size_edit.setToolTip("A fraction of the uncompressed model (0.25, 1/8) or a size (180KiB, 1.5MB)")
        self.size_edit.setPlaceholderText("0.25, 1/8 or 180KiB")
        self.drop_spin = QDoubleSpinBox(decimals=3, minimum=0.0, maximum=1e6, value=1.0, singleStep=0.1)
        self.value_stack = QStackedWidget()
        self.value_stack.addWidget(self.size_edit)
        self.value_stack.addWidget(self.drop_spin)
        self.value_stack.setMaximumWidth(160)
        self.allocate_button = QPushButton("Allocate")
        self.allocate_button.setToolTip("Fill the plan with the per-layer levels predicted best for this target "
                                        "(one undo step)")
        self.allocate_button.clicked.connect(self.allocate)
        self.check_box = QCheckBox("Check by measuring")
        self.mode_combo.currentIndexChanged.connect(self._on_mode)
        self.size_edit.returnPressed.connect(self.allocate)
        target_row = QHBoxLayout()
        target_row.addWidget(QLabel("Target:"))
        target_row.addWidget(self.mode_combo)
        target_row.addWidget(self.value_stack)
        target_row.addWidget(self.allocate_button)
        target_row.addWidget(self.check_box)
        target_row.addStretch(1)

        self.allocation_label = LineWhenSet()
        self.allocation_label.setWordWrap(True)
        self.plan_label = QLabel()
        self.plan_label.setTextFormat(Qt.TextFormat.RichText)
        self.plan_label.setWordWrap(True)
        self.plan_label.setToolTip(ADDITIVE_NOTE)
        self.hover_label = QLabel(" ")
        self.hover_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)

        # -- plot, built once --
        self.plot_widget = pg.PlotWidget()
        self.plot_widget.setMinimumHeight(PLOT_MIN_HEIGHT)
        self.plot = self.plot_widget.getPlotItem()
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.plot.showGrid(x=True, y=True, alpha=0.15)
        self.plot.setLogMode(x=True, y=False)
        self.plot.setLabel("bottom", "predicted size, % of the uncompressed model")
        # PlotDataItems, not bare scatter items: they follow the plot's log x axis.
        self.front_curve = pg.PlotDataItem(symbol="o", symbolSize=6, connect="finite")
        self.front_tail = pg.PlotDataItem()
        self.original_point = pg.PlotDataItem(pen=None, symbol="s", symbolSize=9)
        self.plan_point = pg.PlotDataItem(pen=None, symbol="star", symbolSize=20,
                                          symbolBrush=pg.mkBrush(STAR_COLOR))
        self.measured_point = pg.PlotDataItem(pen=None, symbol="o", symbolSize=15, symbolBrush=None)
        # Placed by _place_labels: never over each other ("uncompresscurrent pla" was drawn
        # where the plan is the uncompressed model) and never off the plot.
        self.plan_text = pg.TextItem(anchor=(0.5, -0.3))
        self.original_text = pg.TextItem("uncompressed", anchor=(1.1, 0.0))
        self.target_line = pg.InfiniteLine(angle=90, movable=False)
        for item in (self.front_tail, self.front_curve, self.original_point, self.original_text,
                     self.target_line, self.plan_point, self.plan_text, self.measured_point):
            self.plot.addItem(item)
        self.plan_point.setZValue(20)
        self.measured_point.setZValue(22)
        self.measured_point.setToolTip("the allocated plan, measured")
        self.plan_text.setZValue(21)
        self.target_line.hide()
        self.front_curve.sigPointsClicked.connect(self._on_front_clicked)

        self.empty_label = QLabel()
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setWordWrap(True)
        self.empty_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        plot_page = QWidget()
        plot_layout = QVBoxLayout(plot_page)
        plot_layout.setContentsMargins(0, 0, 0, 0)
        plot_layout.addWidget(self.plot_widget, 1)
        plot_layout.addWidget(self.hover_label)
        self.stack = QStackedWidget()
        self.stack.addWidget(self.empty_label)
        self.stack.addWidget(plot_page)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 4, 6, 4)
        layout.setSpacing(4)
        layout.addLayout(target_row)
        layout.addWidget(self.allocation_label)
        layout.addWidget(self.plan_label)
        layout.addWidget(self.stack, 1)

        self._restyle()
        self.plot_widget.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.plot.vb.sigResized.connect(self._place_labels)  # "near" is measured in pixels
        state.sensitivity_changed.connect(self.show_results)
        document.changed.connect(self.update_plan_point)
        self.session.model_changed.connect(self.update_plan_point)
        theme_signals.changed.connect(self._restyle)
        self._on_mode()
        self.show_results(state.sensitivity)

    # -- look -----------------------------------------------------------------------------------------
    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange:
            self._restyle()

    def _restyle(self, *_args: object) -> None:
        palette = self.palette()
        style_plot(self.plot_widget, palette)
        accent = palette.color(QPalette.ColorRole.Highlight)
        text = palette.color(QPalette.ColorRole.WindowText)
        mid = palette.color(QPalette.ColorRole.Mid)
        self.front_curve.setPen(pg.mkPen(accent, width=2))
        self.front_curve.setSymbolBrush(pg.mkBrush(accent))
        self.front_curve.setSymbolPen(None)
        self.front_tail.setPen(pg.mkPen(accent, width=1.5, style=Qt.PenStyle.DotLine))
        self.original_point.setSymbolBrush(pg.mkBrush(palette.color(QPalette.ColorRole.Base)))
        self.original_point.setSymbolPen(pg.mkPen(text, width=1.5))
        self.plan_point.setSymbolPen(pg.mkPen(palette.color(QPalette.ColorRole.Base), width=1))
        self.plan_text.setColor(text)
        self.measured_point.setSymbolPen(pg.mkPen(text, width=2))
        self.original_text.setColor(palette.color(QPalette.ColorRole.PlaceholderText))
        self.target_line.setPen(pg.mkPen(mid, width=1.5, style=Qt.PenStyle.DashLine))

    # -- target settings (saved in projects) ---------------------------------------------------------
    def target_settings(self) -> dict[str, Any]:
        return {"mode": self.mode(), "size": self.size_edit.text(), "drop": self.drop_spin.value(),
                "check": self.check_box.isChecked()}

    def set_target_settings(self, data: dict[str, Any]) -> None:
        if not data:
            return
        index = self.mode_combo.findData(data.get("mode", SIZE))
        self.mode_combo.setCurrentIndex(max(0, index))
        self.size_edit.setText(str(data.get("size", DEFAULT_SIZE_TEXT)))
        self.drop_spin.setValue(float(data.get("drop", self.drop_spin.value())))
        self.check_box.setChecked(bool(data.get("check", False)))

    def mode(self) -> str:
        return str(self.mode_combo.currentData())

    def _on_mode(self, *_args: object) -> None:
        self.value_stack.setCurrentIndex(0 if self.mode() == SIZE else 1)
        self._update_drop_units()

    def _update_drop_units(self) -> None:
        result = self.sensitivity
        points = result is not None and in_points(result)
        self.drop_spin.setSuffix(" pts" if points else "")
        self.drop_spin.setDecimals(2 if points else 4)
        self.drop_spin.setSingleStep(0.1 if points else 0.001)
        tip = f"Largest predicted {result.metric} drop" if result is not None else "Largest predicted drop"
        self.drop_spin.setToolTip(tip + (", in percentage points" if points else ""))

    def target_kwargs(self) -> dict[str, Any]:
        """The allocate() keyword for the target as typed; raises PlanError for bad text."""
        if self.mode() == SIZE:
            size_bytes, ratio = parse_size(self.size_edit.text())
            return {"target_bytes": size_bytes} if size_bytes is not None else {"target_ratio": ratio}
        scale = 100.0 if self.sensitivity is not None and in_points(self.sensitivity) else 1.0
        return {"max_drop": self.drop_spin.value() / scale}

    # -- results --------------------------------------------------------------------------------------
    def show_results(self, result: Sensitivity | None) -> None:
        self.sensitivity = result
        self.front = []
        self.last_allocation = self.last_outcome = None
        self.allocation_label.setText("")
        self._update_drop_units()
        # Both belong to the previous results: cancelled, and what they still send is dropped.
        self.jobs.cancel(FRONT, forget=True)
        self.jobs.cancel(ALLOCATE, forget=True)
        if result is None:
            for item in (self.front_curve, self.front_tail, self.original_point):
                item.setData([], [])
            self.stack.setCurrentIndex(0)
            self.empty_label.setText("The Pareto front appears once sensitivity results are in "
                                     "(Analyse › Sensitivity…, F5).")
            self._update_enabled()
            self.update_plan_point()
            return
        self.stack.setCurrentIndex(1)
        metric_unit = " (%)" if in_points(result) else ""
        # the metric alone: "predicted accuracy (%)" was cut to "predicted accurac" by a plot as
        # short as a 1280×800 window leaves it (the header line says the values are predicted)
        self.plot.setLabel("left", f"{result.metric}{metric_unit}")
        self.original_point.setData([100.0], [self._display(result.baseline)])
        self.original_text.setPos(2.0, self._display(result.baseline))  # log10(100 %)
        self.jobs.start(FRONT, _front_body(result), "Pareto front", context=result,
                        on_result=self._on_front, on_error=self._on_job_failed)
        self._update_enabled()
        self.update_plan_point()

    def _display(self, value: float) -> float:
        return value * 100 if self.sensitivity is not None and in_points(self.sensitivity) else value

    @property
    def front_job(self) -> Job | None:
        return self.jobs.current(FRONT)

    @property
    def allocate_job(self) -> Job | None:
        return self.jobs.current(ALLOCATE)

    def _on_front(self, front: list[FrontPoint]) -> None:
        self.front = front
        self._draw_front()

    def _visible_range(self) -> tuple[float, float]:
        """The metric range worth showing: from chance (or the worst point) to the baseline."""
        result = self.sensitivity
        assert result is not None
        values = [self._display(p.metric) for p in self.front] + [self._display(result.baseline)]
        top, bottom = max(values), min(values)
        if result.higher_is_better and result.chance is not None:
            bottom = max(bottom, self._display(result.chance))
        elif not result.higher_is_better and len(values) > 10:
            # An error metric (output noise, KL) has no chance level: the collapse of the
            # smallest sizes runs to 1000× the useful values and would flatten the rest onto
            # the axis (seen on a MobileNet). The steep end is left to leave the plot.
            top = min(top, 1.5 * float(np.quantile(values, 0.8)))
        span = max(top - bottom, 1e-9)
        return bottom - 0.04 * span, top + 0.08 * span

    def _draw_front(self) -> None:
        result = self.sensitivity
        if result is None:
            return
        x = np.array([p.ratio * 100 for p in self.front])
        y = np.array([self._display(p.metric) for p in self.front])
        self.front_curve.setData(x, y)
        if len(x):  # beyond the front's largest point, more bytes predict no better metric
            self.front_tail.setData([x[-1], 100.0], [y[-1], y[-1]])
        low, high = self._visible_range()
        self.plot.setYRange(low, high, padding=0)
        smallest = min([p.ratio * 100 for p in self.front] + [100.0])
        low_x, high_x = math.log10(smallest) - 0.08, math.log10(100) + 0.05
        self.plot.setXRange(low_x, high_x, padding=0)
        self.plot.getAxis("bottom").setTicks([percent_ticks(low_x, high_x), []])
        self.update_plan_point()
        self._place_labels()

    def _update_enabled(self) -> None:
        busy = self.jobs.busy(ALLOCATE)
        self.allocate_button.setEnabled(self.sensitivity is not None and not busy)
        self.allocate_button.setText("Allocating…" if busy else "Allocate")
        if self.sensitivity is None:
            self.allocate_button.setToolTip("Run a sensitivity analysis first (F5)")
        why_not = self.why_no_check()
        self.check_box.setEnabled(not why_not and not busy)
        self.check_box.setToolTip(why_not or (
            f"Compress and evaluate candidate plans on {self._check_data_text()}: for a largest "
            "drop, search until the measured drop fits; for a size, show the measured metric. "
            "Slower: each try is a compression and an evaluation."))

    def why_no_check(self) -> str:
        """Why plans cannot be checked by measuring now, or "" when they can."""
        result, model = self.sensitivity, self.session.model
        if result is None:
            return "Run a sensitivity analysis first (F5)"
        if result.metric not in MEASURABLE:
            return f"{result.method} results predict {result.metric}, which evaluation cannot measure"
        data = self.state.results_data
        if data is None or not data.spec:
            return "Checking needs the data of a sensitivity analysis run in this session"
        if model is None:
            return "Open a model first."
        reason = model.why_not(RUN)
        if reason is not None:
            return reason
        return ""

    def _check_data_text(self) -> str:
        data = self.state.results_data
        return "the sensitivity data" if data is None or not data.spec else data.spec

    # -- the current plan ---------------------------------------------------------------------------
    def update_plan_point(self, *_args: object) -> None:
        """Move the star to the current plan's predicted size and metric."""
        result, model = self.sensitivity, self.session.model
        self.prediction = None
        if result is None or model is None:
            self.plan_point.setData([], [])
            self.plan_text.setText("")
            self.plan_label.setText("")
            self.prediction_changed.emit(None)
            return
        try:
            prediction = predict_plan(result, self.document.plan, model.layers)
        except SlimscopeError as exc:
            self.plan_point.setData([], [])
            self.plan_text.setText("")
            self.plan_label.setText(f"Current plan: cannot predict ({exc})")
            self.prediction_changed.emit(None)
            return
        self.prediction = prediction
        self.prediction_changed.emit(prediction)
        x, y = prediction.ratio * 100, self._display(prediction.metric)
        self.plan_point.setData([x], [y])
        self.plan_text.setText("current plan")
        self.plan_text.setPos(math.log10(max(x, 1e-6)), y)  # text items live in view (log) coordinates
        self._place_labels()
        self.plan_label.setText(self.prediction_text(prediction))

    def _place_labels(self, *_args: object) -> None:
        """Each label on the side of its point that faces the middle of the plot (so it stays
        inside), the uncompressed model's left of its square; when the star sits near the square
        its label is stacked one line further out, so the two never overprint."""
        view = self.plot.vb
        (low_x, high_x), (low_y, high_y) = view.viewRange()
        middle_y = (low_y + high_y) / 2
        original = self.original_text.pos()
        up = original.y() < middle_y  # in the lower half: labels go up, into the plot
        self.original_text.setAnchor((1.1, 1.0 if up else 0.0))
        if not self.plan_text.toPlainText():
            return
        plan = self.plan_text.pos()
        across = 1.0 if plan.x() > (low_x + high_x) / 2 else 0.5  # ends at the star near the right edge
        gap = view.mapViewToScene(plan) - view.mapViewToScene(original)
        if abs(gap.x()) < LABEL_NEAR_PX[0] and abs(gap.y()) < LABEL_NEAR_PX[1]:
            self.plan_text.setAnchor((across, 2.1 if up else -1.1))
        else:
            self.plan_text.setAnchor((across, 1.3 if plan.y() < middle_y else -0.3))

    def prediction_text(self, prediction: CurvePrediction) -> str:
        """The current plan's predicted size and metric, as one line."""
        result = self.sensitivity
        assert result is not None
        text = (f"<b>Current plan</b>: {human_bytes(prediction.bytes)} ({percent(prediction.ratio)} of "
                f"{human_bytes(result.model_bytes)}) · predicted {result.metric} "
                f"{metric_text(result, prediction.metric)} "
                f"({delta_text(result, prediction.metric - result.baseline)})")
        if prediction.approximate:
            count = len(prediction.approximate)
            text += (f" · <i>approximate: {count} layer{'s' if count > 1 else ''} use settings "
                     "the curves do not measure</i>")
        return text

    # -- allocation -----------------------------------------------------------------------------------
    def allocate(self) -> Job | None:
        """Allocate for the target on a worker; the plan is replaced when it is done."""
        result = self.sensitivity
        if result is None or self.jobs.busy(ALLOCATE):
            return None
        try:
            target = self.target_kwargs()
        except PlanError as exc:
            self.allocation_label.setText(str(exc))
            return None
        model = self.session.model
        self.measured_point.setData([], [])
        check = None
        if self.check_box.isChecked() and not self.why_no_check() and model is not None:
            data = self.state.results_data
            assert data is not None and data.spec
            check = data.data_spec()  # what the results were measured on
        job = self.jobs.start(ALLOCATE, _allocate_body(result, model, Target(**target), check), "allocate",
                              context=(result, target), on_result=self._on_allocated,
                              on_error=self._on_job_failed, on_done=self._on_allocate_done)
        self._update_enabled()
        self._show_target_line(result, target)
        return job

    def _show_target_line(self, result: Sensitivity, target: dict[str, Any]) -> None:
        if "max_drop" in target:
            self.target_line.setAngle(0)
            self.target_line.setValue(self._display(result.baseline - target["max_drop"] if result.higher_is_better
                                                    else result.baseline + target["max_drop"]))
        else:
            ratio = target.get("target_ratio") or target["target_bytes"] / result.model_bytes
            self.target_line.setAngle(90)
            self.target_line.setValue(math.log10(max(ratio * 100, 1e-6)))
        self.target_line.show()

    def _on_allocated(self, outcome: PlanOutcome) -> None:
        # The job service calls this only for the current allocation, which new results drop.
        job = self.jobs.current(ALLOCATE)
        if job is None:
            return
        context = job.context
        result = self.sensitivity
        checked, allocation = outcome.checked, outcome.allocation
        assert result is not None
        self.last_allocation, self.last_outcome = allocation, outcome
        target = _target_text(context[1], context[0])
        self.document.replace(allocation.plan, f"Allocate for {target}")
        text = (f"Allocated for {target}: {len(allocation.plan.layers)} layers compressed, "
                f"predicted {human_bytes(allocation.bytes)} ({percent(allocation.ratio)}).")
        if checked is not None:
            chosen = checked.chosen
            tries = len(checked.trials)
            text += (f" Measured on {checked.data}: {result.metric} "
                     f"{metric_text(result, chosen.metric)} "
                     f"({delta_text(result, chosen.metric - checked.baseline)}), "
                     f"{human_bytes(chosen.bytes)}" + (f", after {tries} tries" if tries > 1 else "")
                     + ".")
            self.measured_point.setData([chosen.bytes / result.model_bytes * 100],
                                        [self._display(chosen.metric)])
        self.allocation_label.setText(text + " Undo with Ctrl+Z.")

    def _on_allocate_done(self) -> None:
        self._update_enabled()

    def _on_job_failed(self, message: str, _details: str, _exc: object) -> None:
        self.allocation_label.setText(message)

    def _on_front_clicked(self, _item: object, points: list, *_args: object) -> None:
        """Clicking a front point allocates for exactly that size."""
        if not points or self.sensitivity is None:
            return
        index = points[0].index()
        if 0 <= index < len(self.front):
            self.mode_combo.setCurrentIndex(self.mode_combo.findData(SIZE))
            self.size_edit.setText(f"{self.front[index].bytes}B")
            self.allocate()

    def _on_mouse_moved(self, scene_pos: object) -> None:
        if not self.front or self.sensitivity is None:
            return
        view = self.plot.vb
        if not view.sceneBoundingRect().contains(scene_pos):
            return
        point = view.mapSceneToView(scene_pos)
        xs = np.log10([p.ratio * 100 for p in self.front])
        nearest = int(np.argmin(np.abs(xs - point.x())))
        chosen = self.front[nearest]
        result = self.sensitivity
        self.hover_label.setText(
            f"Front point: {human_bytes(chosen.bytes)} ({percent(chosen.ratio)}) · predicted "
            f"{result.metric} {metric_text(result, chosen.metric)} — click to allocate this size"
        )


def percent_ticks(low: float, high: float) -> list[tuple[float, str]]:
    """Ticks for a log axis of percentages between 10**low and 10**high: 1-2-5 steps, denser
    when the range is short, labelled '4 %', '10 %' rather than in powers of ten."""
    ticks = []
    for steps in ((1, 2, 5), (1, 2, 3, 4, 5, 6, 8)):
        ticks = [(math.log10(step * 10.0**decade), f"{step * 10.0**decade:g} %")
                 for decade in range(math.floor(low), math.ceil(high) + 1) for step in steps
                 if low <= math.log10(step * 10.0**decade) <= high]
        if len(ticks) >= 5:
            break
    return ticks


def _front_body(result: Sensitivity):  # type: ignore[no-untyped-def]
    def body(progress: Progress, cancel: CancelToken) -> list[FrontPoint]:
        return pareto_front(result)

    return body


def _allocate_body(result: Sensitivity, model: Model | None, target: Target,
                   check: DataSpec | None):  # type: ignore[no-untyped-def]
    """engine.workflows.allocate_plan, as `slimscope plan` runs it; with `check`, the data is
    opened on the worker (it can be big)."""
    def body(progress: Progress, cancel: CancelToken) -> PlanOutcome:
        if check is not None:
            cap_worker_threads()
        return allocate_plan(result, model, target, check=check, progress=progress, cancel=cancel)

    return body


def _target_text(target: dict[str, Any], result: Sensitivity) -> str:
    if "target_ratio" in target:
        return f"size ≤ {percent(target['target_ratio'])}"
    if "target_bytes" in target:
        return f"size ≤ {human_bytes(target['target_bytes'])}"
    drop = target["max_drop"]
    return f"{result.metric} drop ≤ " + (f"{drop * 100:.2f} pts" if in_points(result) else f"{drop:.4g}")


def _main(argv: list[str]) -> int:
    from gui.analysis import preview_with_results

    return preview_with_results(
        lambda state: ParetoPanel(state, PlanDocument(state)), argv, title="Target and Pareto front"
    )


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
