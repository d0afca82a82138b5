"""Recovery fine-tuning, live: loss, metric and learning rate against the step.

Three stacked plots share the step axis. Their items are built once; step reports are buffered
and drawn at most :data:`REDRAW_MS` apart, so a fast run never floods the event loop. The
planned learning-rate curve is drawn before training starts (schedules are pure functions of
the step, see :mod:`engine.schedules`), and the rates actually used follow it as steps arrive.

Run alone: ``python -m gui.panels.recovery_plot [MODEL] [--steps N] [--screenshot PNG]``
compresses the model (default: the demo) with a 70 % magnitude plan and plots its recovery.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Mapping

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from engine.errors import PlanError
from engine.finetune import RecoveryConfig
from engine.workflows import RecoveryStep

#: Shortest time between two redraws while steps stream in.
REDRAW_MS = 100
#: Smoothing of the loss curve (exponential moving average weight of the newest step).
LOSS_SMOOTHING = 0.1  # default weight; short runs use more (see start)
LOSS_COLOR, SMOOTH_COLOR, METRIC_COLOR, LR_COLOR = "#9db8e8", "#2f6fdb", "#2e9d57", "#e8710a"


def planned_rates(config: RecoveryConfig | None, total_steps: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, lr) of the schedule over the whole run; empty when it depends on the run itself."""
    if config is None or not total_steps or config.schedule.get("name") == "plateau":
        return np.zeros(0), np.zeros(0)
    from engine.schedules import build_schedule

    try:
        schedule = build_schedule(config.schedule, config.lr, total_steps)
    except PlanError:
        return np.zeros(0), np.zeros(0)
    # sorted(set()), not np.unique: that imports numpy.ma on first use, 90 ms on the GUI thread
    steps = np.array(sorted(set(np.linspace(0, total_steps - 1, min(total_steps, 400))
                                .astype(int).tolist())))
    return steps + 1, np.array([schedule.lr(int(step)) for step in steps])


class RecoveryPlot(QWidget):
    """See the module docstring. Feed it with :meth:`start`, :meth:`add_step`, :meth:`show_history`."""

    #: The curves of a run in progress were redrawn (at most every REDRAW_MS): for a live headline.
    live_updated = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        #: True while steps of a running job stream in (from start() until show_history/clear).
        self.live = False
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.rates: list[tuple[int, float]] = []
        self.metrics: list[tuple[int, float]] = []
        self.total_steps: int | None = None
        self.metric_name = "metric"
        self._ema = 0.0
        self._alpha = LOSS_SMOOTHING

        self.header = QLabel("No recovery run yet.")
        self.header.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setMinimumHeight(240)
        self.loss_plot = self.graphics.addPlot(row=0, col=0)
        self.metric_plot = self.graphics.addPlot(row=1, col=0)
        self.lr_plot = self.graphics.addPlot(row=2, col=0)
        for plot, label in ((self.loss_plot, "loss"), (self.metric_plot, "metric"), (self.lr_plot, "lr")):
            plot.setLabel("left", label)
            plot.showGrid(x=True, y=True, alpha=0.12)
            plot.setMenuEnabled(False)
            plot.hideButtons()
            plot.getAxis("left").setWidth(58)
            if plot is not self.loss_plot:
                plot.setXLink(self.loss_plot)
        self.lr_plot.setLabel("bottom", "step")
        for plot in (self.loss_plot, self.metric_plot, self.lr_plot):
            plot.getAxis("left").enableAutoSIPrefix(False)
        for plot in (self.loss_plot, self.metric_plot):  # the step axis is read off the bottom plot
            plot.getAxis("bottom").setStyle(showValues=False)
            plot.getAxis("bottom").setHeight(6)
        layout = self.graphics.ci.layout
        layout.setRowStretchFactor(0, 3)
        layout.setRowStretchFactor(1, 2)
        layout.setRowStretchFactor(2, 2)
        # Built once (habit 8); every update is setData.
        self.loss_curve = self.loss_plot.plot(pen=pg.mkPen(LOSS_COLOR, width=1))
        self.smooth_curve = self.loss_plot.plot(pen=pg.mkPen(SMOOTH_COLOR, width=2))
        self.metric_curve = self.metric_plot.plot(pen=pg.mkPen(METRIC_COLOR, width=2), symbol="o", symbolSize=5,
                                                  symbolBrush=METRIC_COLOR, symbolPen=None)
        self.kept_marker = pg.InfiniteLine(angle=90, movable=False,
                                           pen=pg.mkPen(METRIC_COLOR, width=1, style=Qt.PenStyle.DashLine))
        self.kept_marker.setVisible(False)
        self.metric_plot.addItem(self.kept_marker)
        self.planned_curve = self.lr_plot.plot(pen=pg.mkPen(LR_COLOR, width=1, style=Qt.PenStyle.DashLine))
        self.lr_curve = self.lr_plot.plot(pen=pg.mkPen(LR_COLOR, width=2))
        self._style()

        self._redraw_timer = QTimer(self, singleShot=True, interval=REDRAW_MS)
        self._redraw_timer.timeout.connect(self._redraw)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        layout.addWidget(self.header)
        layout.addWidget(self.graphics, 1)

    def _style(self) -> None:
        try:
            from gui.theme import style_plot
        except ImportError:  # the look module is optional: plots keep pyqtgraph's defaults
            return
        style_plot(self.graphics, self.palette())

    # -- feeding -------------------------------------------------------------------------------
    def start(self, recovery: Mapping[str, Any] | None, metric_name: str = "metric") -> None:
        """Forget the last run and draw the planned learning rate of the next one."""
        self.clear()
        self.metric_name = metric_name
        self.metric_plot.setLabel("left", metric_name)
        try:
            config = RecoveryConfig.from_dict(dict(recovery)) if recovery else None
        except PlanError:
            config = None
        self.total_steps = config.steps if config is not None else None
        # short runs move fast: smooth over about a twentieth of the run
        self._alpha = min(max(20 / self.total_steps, LOSS_SMOOTHING / 5), 0.3) if self.total_steps else LOSS_SMOOTHING
        steps, rates = planned_rates(config, self.total_steps)
        self.planned_curve.setData(steps, rates)
        if self.total_steps:
            self.loss_plot.setXRange(0, self.total_steps, padding=0.02)
        self.header.setText(f"Recovery: 0 / {self.total_steps or '?'} steps")
        self.live = True

    def add_step(self, report: Any) -> None:
        """Take one :class:`engine.workflows.RecoveryStep` (or engine.finetune.StepReport); the
        plots catch up within :data:`REDRAW_MS`. Other events a job publishes are ignored."""
        if not isinstance(report, RecoveryStep) and not hasattr(report, "loss"):
            return
        total = getattr(report, "total", 0)
        if total and total != self.total_steps:  # e.g. epochs: only the run knows its steps
            self.total_steps = total
            self.loss_plot.setXRange(0, total, padding=0.02)
        self.steps.append(report.step)
        self.losses.append(report.loss)
        # bias-corrected moving average, so the first steps are not dragged towards zero
        self._ema = (1 - self._alpha) * self._ema + self._alpha * report.loss
        self.smoothed.append(self._ema / (1 - (1 - self._alpha) ** len(self.losses)))
        if not math.isnan(report.lr):
            self.rates.append((report.step, report.lr))
        if report.metric is not None:
            self.metrics.append((report.step, report.metric))
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def show_history(self, history: Iterable[RecoveryStep], recovery: Mapping[str, Any] | None,
                     kept: tuple[int, float | None] | None = None, metric_name: str = "metric") -> None:
        """Draw a finished run at once; `kept` is (step, metric) of the state that was kept."""
        self.start(recovery, metric_name)
        self.live = False
        for report in history:
            self.add_step(report)
        if kept is not None:
            step, metric = kept
            if metric is not None and all(seen != step for seen, _ in self.metrics):
                self.metrics.append((step, metric))  # without per-step metrics, at least this one
            self.kept_marker.setPos(step)
            self.kept_marker.setVisible(True)
        self._redraw()

    def clear(self) -> None:
        self.live = False
        self._redraw_timer.stop()
        self.steps, self.losses, self.smoothed, self.rates, self.metrics = [], [], [], [], []
        self._ema = 0.0
        self.total_steps = None
        for curve in (self.loss_curve, self.smooth_curve, self.metric_curve, self.planned_curve, self.lr_curve):
            curve.setData([], [])
        self.kept_marker.setVisible(False)
        self._show_metric_row(False)
        self.header.setText("No recovery run yet.")

    def _redraw(self) -> None:
        steps = np.asarray(self.steps)
        self.loss_curve.setData(steps, np.asarray(self.losses))
        self.smooth_curve.setData(steps, np.asarray(self.smoothed))
        self._show_metric_row(len(self.metrics) > 1)
        if self.metrics:
            metric_steps, values = zip(*sorted(self.metrics))
            self.metric_curve.setData(np.asarray(metric_steps), np.asarray(values))
            low, high = min(values), max(values)
            margin = max((high - low) * 0.15, 0.005)
            top = high + margin
            if self.metric_name in ("accuracy", "agreement"):  # fractions: no ticks above 1
                top = min(top, 1.0 + margin / 5)
            self.metric_plot.setYRange(low - margin, top, padding=0)
        if self.rates:
            rate_steps, rates = zip(*self.rates)
            self.lr_curve.setData(np.asarray(rate_steps), np.asarray(rates))
        if self.steps:
            text = f"Recovery: {self.steps[-1]:,} / {self.total_steps or '?'} steps · loss {self.smoothed[-1]:.4f}"
            if self.metrics:
                # the latest of equal scores, as recovery keeps it
                best_step, best = max(self.metrics, key=lambda item: (item[1], item[0]))
                text += f" · best {self.metric_name} {best:.4f} at step {best_step:,}"
            self.header.setText(text)
        if self.live:
            self.live_updated.emit()

    def latest(self) -> tuple[int, float, float | None, tuple[int, float] | None]:
        """(step, smoothed loss, learning rate, (step, metric) of the newest evaluation) of the
        run so far; call only once a step arrived."""
        rate = self.rates[-1][1] if self.rates else None
        return self.steps[-1], self.smoothed[-1], rate, (self.metrics[-1] if self.metrics else None)

    def _show_metric_row(self, on: bool) -> None:
        """One point is no curve: the metric row joins once evaluations arrive during training.

        Taken out of the layout rather than hidden, which would keep its space empty."""
        shown = self.metric_plot.scene() is not None and self.metric_plot.isVisible()
        if on == shown:
            return
        layout = self.graphics.ci
        if on:
            layout.addItem(self.metric_plot, row=1, col=0)
        else:
            layout.removeItem(self.metric_plot)
        layout.layout.setRowStretchFactor(1, 2 if on else 0)
        layout.layout.setRowMaximumHeight(1, 10_000 if on else 0)
        self.metric_plot.setVisible(on)

    @property
    def step_count(self) -> int:
        return len(self.steps)


def _main(argv: list[str]) -> int:
    import argparse
    from pathlib import Path


    from engine.data import DataSpec
    from engine.workflows import is_demo

    from gui.preview import ensure_app, open_preview_model, run_job_and_show
    from gui.workers import compression_job

    parser = argparse.ArgumentParser(description="Plot a recovery run of the demo (or MODEL)")
    parser.add_argument("model", nargs="?")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--screenshot", type=Path, metavar="PNG")
    args = parser.parse_args(argv)
    app = ensure_app()
    model = open_preview_model(args.model)
    if model is None:
        return 2
    plan = {"defaults": {"pruning": {"method": "magnitude", "amount": 0.7}},
            "recovery": {"steps": args.steps, "eval_every": max(args.steps // 10, 1)}}
    plot = RecoveryPlot()
    plot.setWindowTitle(f"Recovery — {model.path.name}")
    plot.resize(800, 560)
    plot.show()
    plot.start(plan["recovery"], "accuracy")
    job = compression_job(model, plan, DataSpec().effective(is_demo(model)))
    job.partial.connect(plot.add_step)
    return run_job_and_show(app, job, plot, args.screenshot, before_grab=plot._redraw)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
