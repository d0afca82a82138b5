"""The results dashboard: what the last compression did, before against after.

Four cards (size, accuracy or fidelity, latency, recovery), the per-layer bytes before and after
as horizontal bars (built once, updated with ``setOpts``), the recovery curves when the plan
fine-tuned, and the per-layer report as a table. Everything shown comes from the engine's
:class:`~engine.compress.CompressionReport`; nothing is recomputed here. When the plan has
changed since, a line says so: the numbers describe the plan that was run, not the one on screen.

While a compression fine-tunes, the panel is live: the loss, learning-rate and metric curves
grow with every :class:`engine.workflows.RecoveryStep` the job publishes, under a headline with
the step, loss, rate and latest metric (:meth:`ResultsPanel.follow` connects a job).

Run alone: ``python -m gui.panels.results [MODEL] [--screenshot PNG]`` compresses the model
(default: the demo) with a small plan and shows the outcome.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTabWidget,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.errors import SlimscopeError
from engine.plan import LayerPlan, Plan

from gui.panels.recovery_plot import RecoveryPlot
from gui.panels.row_labels import RowLabels
from gui.plan_view import method_text
from gui.session import CompressionOutcome, PlanState, Session
from gui.theme import WARNING, change_meaning, status_color
from gui.workers import Job
from gui.text import grouped, human_bytes, human_count, percent

#: Bars drawn at most; the largest layers by original size (a chart of 500 bars reads as noise).
MAX_BARS = 40
BEFORE_COLOR = "#9aa4b0"
TABLE_HEADERS = ("Layer", "Kind", "Method", "Before", "After", "Ratio", "Sparsity", "Bits",
                 "Rank / channels")
#: Columns of figures, right-aligned.
NUMBER_COLUMNS = range(3, 8)
#: Accuracy points a result may lose and still not be drawn red (it is never green: a loss).
ACCURACY_TOLERANCE = 0.5
#: Agreement points below 100 % a result may lose before it is drawn red.
AGREEMENT_TOLERANCE = 1.0


def resolved_methods(outcome: CompressionOutcome) -> dict[str, LayerPlan]:
    """Each layer's settings in the plan that made `outcome`, or {} if it no longer resolves."""
    try:
        return Plan.from_dict(outcome.plan).resolve(outcome.model.layers)
    except SlimscopeError:
        return {}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f} %"


def packed_only(report: Any) -> bool:
    """Whether the size counts savings that many export formats write at full size: codes under
    8 bits or pruned zeros (engine.export.honesty says which format stores what)."""
    return any(0 < layer.bits < 8 or layer.sparsity > 0.01 for layer in report.layers
               if layer.bytes_after != layer.bytes_before)


class StatCard(QFrame):
    """A titled figure with one line of detail: the dashboard's unit."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setObjectName("stat-card")
        self.title = QLabel(title.upper())
        small = QFont(self.title.font())
        small.setPointSizeF(small.pointSizeF() * 0.85)
        small.setBold(True)
        small.setLetterSpacing(QFont.SpacingType.PercentageSpacing, 108)
        self.title.setFont(small)
        self.title.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.value = QLabel("—")
        big = QFont(self.value.font())
        big.setPointSizeF(big.pointSizeF() * 1.35)
        big.setBold(True)
        self.value.setFont(big)
        self.value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.detail = QLabel()
        self.detail.setWordWrap(True)
        self.detail.setTextFormat(Qt.TextFormat.RichText)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 8, 12, 10)
        layout.setSpacing(2)
        layout.addWidget(self.title)
        layout.addWidget(self.value)
        layout.addWidget(self.detail)
        layout.addStretch(1)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Maximum)

    def show_figure(self, value: str, detail: str = "", meaning: str | None = None) -> None:
        """`meaning` (gui.theme GOOD, BAD, NEUTRAL, WARNING) colours the detail in the look's
        colour for it, again whenever the look changes."""
        self.value.setText(value)
        self._detail, self.meaning = detail, meaning
        self._paint_detail()

    def _paint_detail(self) -> None:
        detail, meaning = getattr(self, "_detail", ""), getattr(self, "meaning", None)
        if meaning is None:
            self.detail.setText(detail)
            return
        self.detail.setText(f"<span style='color:{status_color(meaning, self.palette())}'>{detail}</span>")

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange:
            self._paint_detail()

    def text(self) -> str:
        return f"{self.title.text()}: {self.value.text()} | {self.detail.text()}"


class LayerBytesChart(pg.PlotWidget):
    """Per-layer bytes before (grey) and after (accent), one pair of bars per layer."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(180)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        plot = self.getPlotItem()
        plot.setMenuEnabled(False)
        plot.hideButtons()
        plot.showGrid(x=True, y=False, alpha=0.15)
        plot.setLabel("bottom", "KiB")
        plot.getAxis("bottom").enableAutoSIPrefix(False)
        plot.getViewBox().setMouseEnabled(x=False, y=False)
        plot.getViewBox().invertY(True)  # first layer on top, as in the layer table
        accent = self.palette().color(QPalette.ColorRole.Highlight)
        # Built once; show_layers only calls setOpts (habit 8).
        self.before = pg.BarGraphItem(x0=[], y=[], height=0.38, width=[], brush=QColor(BEFORE_COLOR), pen=None)
        self.after = pg.BarGraphItem(x0=[], y=[], height=0.38, width=[], brush=accent, pen=None)
        plot.addItem(self.before)
        plot.addItem(self.after)
        self.legend = plot.addLegend(offset=(-10, -30), labelTextColor=self.palette().color(QPalette.ColorRole.WindowText))
        self.legend.addItem(self.before, "before")
        self.legend.addItem(self.after, "after")
        self.names: list[str] = []
        self.row_labels = RowLabels(plot.getAxis("left"))  # thinned when the bars are thin
        try:
            from gui.theme import style_plot

            style_plot(self, self.palette())
        except ImportError:
            pass

    def show_layers(self, rows: list[tuple[str, int, int]]) -> None:
        """`rows`: (name, bytes before, bytes after), drawn in the given order."""
        rows = rows[:MAX_BARS]
        self.names = [name for name, _, _ in rows]
        positions = np.arange(len(rows), dtype=float)
        before = np.array([b for _, b, _ in rows], dtype=float) / 1024
        after = np.array([a for _, _, a in rows], dtype=float) / 1024
        self.before.setOpts(x0=np.zeros(len(rows)), y=positions - 0.2, width=before, height=0.38)
        self.after.setOpts(x0=np.zeros(len(rows)), y=positions + 0.2, width=after, height=0.38)
        self.row_labels.show([(i, name) for i, name in enumerate(self.names)])
        self.getPlotItem().setYRange(-0.7, max(len(rows) - 0.3, 0.3), padding=0)
        self.getPlotItem().setXRange(0, float(before.max()) * 1.05 if len(rows) else 1.0, padding=0)


class ResultsPanel(QWidget):
    """See the module docstring. `export_requested` and `run_requested` ask the window to act."""

    export_requested = Signal()
    run_requested = Signal()

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.outcome: CompressionOutcome | None = None
        #: Layer name -> the method that made it ("GPTQ 2-bit per-channel + bias correction").
        self.methods: dict[str, str] = {}

        self.title = QLabel("No compression yet")
        title_font = QFont(self.title.font())
        title_font.setPointSizeF(title_font.pointSizeF() * 1.2)
        title_font.setBold(True)
        self.title.setFont(title_font)
        self.subtitle = QLabel("Edit the plan, then run it with Compression › Run (Ctrl+R).")
        self.subtitle.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.subtitle.setWordWrap(True)
        self.stale_label = QLabel("The plan has changed since this result: run it again to see the new one.")
        self.stale_label.setObjectName("stale-result")
        self.stale_label.hide()
        self.run_button = QPushButton("Run Again")
        self.run_button.clicked.connect(self.run_requested)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("Write the compressed model to a file and verify it (Ctrl+E)")
        self.export_button.clicked.connect(self.export_requested)
        titles = QVBoxLayout()
        titles.setSpacing(2)
        titles.addWidget(self.title)
        titles.addWidget(self.subtitle)
        titles.addWidget(self.stale_label)
        header = QHBoxLayout()
        header.addLayout(titles, 1)
        header.addWidget(self.run_button, 0, Qt.AlignmentFlag.AlignTop)
        header.addWidget(self.export_button, 0, Qt.AlignmentFlag.AlignTop)

        self.size_card = StatCard("Size")
        self.metric_card = StatCard("Accuracy")
        self.latency_card = StatCard("Latency")
        self.recovery_card = StatCard("Recovery")
        self.cards = QWidget()
        cards = QHBoxLayout(self.cards)
        cards.setContentsMargins(0, 0, 0, 0)
        cards.setSpacing(8)
        for card in (self.size_card, self.metric_card, self.latency_card, self.recovery_card):
            cards.addWidget(card, 1)

        self.chart = LayerBytesChart()
        self.recovery_plot = RecoveryPlot()
        self.table = QTableWidget(0, len(TABLE_HEADERS))
        self.table.setHorizontalHeaderLabels(TABLE_HEADERS)
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setAlternatingRowColors(True)
        self.table.setShowGrid(False)
        self.table.horizontalHeader().setSortIndicatorClearable(True)
        self.table.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.table.setSortingEnabled(True)  # no indicator yet: rows stay in file order
        self.table.verticalHeader().setDefaultSectionSize(self.table.fontMetrics().height() + 6)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.layer_tabs = QTabWidget()
        self.layer_tabs.setDocumentMode(True)
        self.layer_tabs.addTab(self.chart, "Bytes per layer")
        self.layer_tabs.addTab(self.table, "Per-layer report")
        self.charts = QSplitter(Qt.Orientation.Horizontal)
        self.charts.setChildrenCollapsible(False)
        self.charts.addWidget(self.layer_tabs)
        self.recovery_box = self._titled("Recovery fine-tuning", self.recovery_plot)
        self.charts.addWidget(self.recovery_box)
        self.charts.setSizes([520, 420])
        self.notes_label = QLabel()
        self.notes_label.setWordWrap(True)
        self.notes_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.notes_label.hide()
        body = self.charts

        self.content = QWidget()
        content_layout = QVBoxLayout(self.content)
        content_layout.setContentsMargins(0, 0, 0, 0)
        content_layout.addWidget(self.cards)
        content_layout.addWidget(body, 1)
        content_layout.addWidget(self.notes_label)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 6, 4, 4)
        layout.addLayout(header)
        layout.addWidget(self.content, 1)

        self._restyle()
        session.result_changed.connect(self.show_outcome)
        session.plan_state_changed.connect(self._on_plan_state)
        self.recovery_plot.live_updated.connect(self._show_live)
        self.live_job: Job | None = None
        self.show_outcome(session.result)

    def _restyle(self) -> None:
        """The stale line in the look's amber (a dark look needs a lighter one)."""
        self.stale_label.setStyleSheet(f"color: {status_color(WARNING, self.palette())};")

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and hasattr(self, "stale_label"):
            self._restyle()

    @staticmethod
    def _titled(title: str, widget: QWidget) -> QWidget:
        box = QWidget()
        label = QLabel(title)
        bold = QFont(label.font())
        bold.setBold(True)
        label.setFont(bold)
        layout = QVBoxLayout(box)
        layout.setContentsMargins(0, 4, 0, 0)
        layout.setSpacing(4)
        layout.addWidget(label)
        layout.addWidget(widget, 1)
        return box

    # -- following a running compression -------------------------------------------------------
    def follow(self, job: Job, plan: dict[str, Any], metric_name: str = "metric") -> None:
        """Show `job`'s recovery live: its RecoveryStep events feed the curves from the first
        step; however it ends, the panel then shows the session's result again.

        Connect before ``job.start()``."""
        self.live_job = job
        self.recovery_plot.start(plan.get("recovery"), metric_name)
        job.partial.connect(self.recovery_plot.add_step)
        job.failed.connect(self._on_followed_end)
        job.cancelled.connect(self._on_followed_end)

    def _on_followed_end(self, *_args: object) -> None:
        if self.sender() is self.live_job:
            self.live_job = None
            self.recovery_plot.clear()
            self.show_outcome(self.session.result)

    def _show_live(self) -> None:
        """The headline and the curves of the recovery running now (the plot redraws at most
        every REDRAW_MS, and calls this after each redraw)."""
        plot = self.recovery_plot
        if not plot.step_count:
            return
        if not self.is_live:
            self.content.show()
            self.cards.hide()  # the figures describe the last result, not this run
            self.layer_tabs.hide()
            self.notes_label.hide()
            self.stale_label.hide()
            self.recovery_box.show()
            self.export_button.setEnabled(False)
            self.run_button.hide()
        step, loss, rate, metric = plot.latest()
        model = self.session.model
        name = f"{model.path.name}: " if model is not None else ""
        total = f"{plot.total_steps:,}" if plot.total_steps else "?"
        self.title.setText(f"{name}recovery fine-tuning, step {step:,} of {total}")
        parts = [f"loss {loss:.4f}"]
        if rate is not None:
            parts.append(f"learning rate {rate:.3g}")
        if metric is not None:
            parts.append(f"{plot.metric_name} {metric[1]:.4f} at step {metric[0]:,}")
        self.subtitle.setText(" · ".join(parts) + " · results when it ends")

    @property
    def is_live(self) -> bool:
        """Whether the panel shows a recovery in progress rather than a result."""
        return not self.content.isHidden() and self.cards.isHidden()

    # -- showing ------------------------------------------------------------------------------
    def show_outcome(self, outcome: CompressionOutcome | None) -> None:
        self.outcome = outcome
        self.recovery_plot.live = False
        self.cards.show()
        self.layer_tabs.show()
        has = outcome is not None
        self.content.setVisible(has)
        self.export_button.setEnabled(has)
        self.run_button.setVisible(has)
        self._on_plan_state(self.session.plan_state)
        if outcome is None:
            self.title.setText("No compression yet")
            self.subtitle.setText("Edit the plan, then run it with Compression › Run (Ctrl+R).")
            return
        report = outcome.report
        changed = sum(1 for layer in report.layers if layer.bytes_after != layer.bytes_before)
        self.title.setText(f"{outcome.model.path.name}: {report.size_ratio:.3f}× the size")
        self.subtitle.setText(f"{changed} of {len(report.layers)} layers changed · "
                              f"measured on {report.data or 'no data (sizes only)'}")
        self._show_size(report)
        self._show_metric(report)
        self._show_latency(report)
        self._show_recovery(outcome)
        rows = [(layer.name, layer.bytes_before, layer.bytes_after) for layer in report.layers]
        if len(rows) > MAX_BARS:
            rows = sorted(rows, key=lambda row: -row[1])
        self.chart.show_layers(rows)
        self.methods = {name: method_text(layer_plan)
                        for name, layer_plan in resolved_methods(outcome).items()}
        self._fill_table(report)
        notes = list(report.notes)
        if len(report.layers) > MAX_BARS:
            notes.insert(0, f"the chart shows the {MAX_BARS} largest of {len(report.layers)} layers")
        self.notes_label.setText("\n".join(f"• {note}" for note in notes))
        self.notes_label.setVisible(bool(notes))

    def _on_plan_state(self, _state: PlanState) -> None:
        outcome = self.outcome
        stale = outcome is not None and Plan.from_dict(outcome.plan).to_dict() != self.session.plan_document.to_dict()
        self.stale_label.setVisible(stale)

    def _show_size(self, report: Any) -> None:
        saving = 1 - report.size_ratio
        detail = (f"{report.size_ratio:.3f}× · {percent(saving)} smaller · "
                  f"{human_count(report.params_after)} params")
        if packed_only(report):  # e.g. 6-bit codes: ONNX int8 stores them in 8 bits
            detail += "<br>counted packed; Export says what each format stores"
        self.size_card.show_figure(
            f"{human_bytes(report.bytes_before)} → {human_bytes(report.bytes_after)}",
            detail, change_meaning(saving))

    def _show_metric(self, report: Any) -> None:
        before, after = report.metrics_before or {}, report.metrics_after or {}
        if not after:
            self.metric_card.title.setText("ACCURACY")
            self.metric_card.show_figure("not measured", "no evaluation data: choose some with "
                                         "Compression › Data…")
            return
        if after.get("accuracy") is not None:
            self.metric_card.title.setText("ACCURACY")
            change = 100 * (after["accuracy"] - (before.get("accuracy") or 0.0))
            detail = f"{change:+.2f} points"
            one_shot = (report.metrics_one_shot or {}).get("accuracy")
            if one_shot is not None:
                detail += f" · {_pct(one_shot)} before recovery"
            self.metric_card.show_figure(f"{_pct(before.get('accuracy'))} → {_pct(after['accuracy'])}",
                                         detail, change_meaning(change, tolerance=ACCURACY_TOLERANCE))
            return
        self.metric_card.title.setText("FIDELITY")
        detail = []
        if after.get("kl_divergence") is not None:
            detail.append(f"KL {after['kl_divergence']:.4f}")
        if after.get("cosine_similarity") is not None:
            detail.append(f"cosine {after['cosine_similarity']:.4f}")
        agreement = after.get("agreement")
        self.metric_card.show_figure(f"{_pct(agreement)} agree", " · ".join(detail) or "top-1 agreement with the original",
                                     change_meaning(100 * ((agreement or 0.0) - 1.0),
                                                    tolerance=AGREEMENT_TOLERANCE))

    def _show_latency(self, report: Any) -> None:
        before, after = report.latency_before_ms, report.latency_after_ms
        if before is None or after is None:
            self.latency_card.show_figure("not measured", "needs evaluation data")
            return
        ratio = after / before if before else 1.0
        self.latency_card.show_figure(f"{before:.2f} → {after:.2f} ms",
                                      f"{ratio:.2f}× · CPU, one thread, median of a batch")

    def _show_recovery(self, outcome: CompressionOutcome) -> None:
        report = outcome.report
        recovery = report.recovery
        self.recovery_box.setVisible(recovery is not None)
        if recovery is None:
            self.recovery_card.show_figure("not used", "add fine-tuning in the plan's Recovery tab")
            return
        kept = recovery.get("kept_metric")
        detail = f"kept step {recovery.get('kept_step', 0):,}"
        if kept is not None:
            detail += f" ({_pct(kept)} on calibration data)"
        self.recovery_card.show_figure(f"{recovery['steps']:,} steps · {recovery['seconds']:.1f} s", detail)
        metric = "accuracy" if (report.metrics_after or {}).get("accuracy") is not None else "metric"
        self.recovery_plot.show_history(outcome.history, outcome.plan.get("recovery"),
                                        (int(recovery.get("kept_step") or 0), kept), metric)

    def _fill_table(self, report: Any) -> None:
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(report.layers))
        for row, layer in enumerate(report.layers):
            ratio = layer.bytes_after / layer.bytes_before if layer.bytes_before else 1.0
            shape = (f"rank {layer.rank}" if layer.rank else
                     f"{layer.channels[0]} → {layer.channels[1]} ch" if layer.channels else "")
            method = self.methods.get(layer.name, "")
            cells = (
                (layer.name, layer.name), (layer.kind, layer.kind), (method, method),
                (human_bytes(layer.bytes_before), layer.bytes_before),
                (human_bytes(layer.bytes_after), layer.bytes_after),
                (f"{ratio:.3f}×", ratio), (percent(layer.sparsity), layer.sparsity),
                (str(layer.bits), layer.bits), (shape, shape),
            )
            for column, (text, key) in enumerate(cells):
                item = _SortItem(text, key)
                if column in NUMBER_COLUMNS:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if column == 0:
                    item.setToolTip(f"{grouped(layer.params_before)} → {grouped(layer.params_after)} params")
                self.table.setItem(row, column, item)
        self.table.setSortingEnabled(True)

    def card_texts(self) -> dict[str, str]:
        """What the cards say, for tests and accessibility."""
        return {card.title.text(): f"{card.value.text()} | {card.detail.text()}"
                for card in (self.size_card, self.metric_card, self.latency_card, self.recovery_card)}


class _SortItem(QTableWidgetItem):
    """Sorts by a raw key (bytes, ratios) instead of its display text."""

    def __init__(self, text: str, key: Any) -> None:
        super().__init__(text)
        self.key = key

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if isinstance(other, _SortItem):
            try:
                return self.key < other.key
            except TypeError:
                return str(self.key) < str(other.key)
        return super().__lt__(other)


def _main(argv: list[str]) -> int:
    import argparse
    from pathlib import Path


    from gui.preview import ensure_app, open_preview_model, run_job_and_show
    from gui.workers import compression_job

    parser = argparse.ArgumentParser(description="Compress a model and show the results dashboard")
    parser.add_argument("model", nargs="?")
    parser.add_argument("--screenshot", type=Path, metavar="PNG")
    args = parser.parse_args(argv)
    app = ensure_app()
    model = open_preview_model(args.model)
    if model is None:
        return 2
    session = Session()
    session.set_model(model, sweep=False)
    session.plan_document.set_defaults({"pruning": {"method": "magnitude", "amount": 0.5},
                                        "quantization": {"bits": 8}})
    panel = ResultsPanel(session)
    panel.resize(1000, 680)
    panel.show()
    job = compression_job(session.model, session.plan_document.to_dict(), session.effective_data())
    job.succeeded.connect(session.set_result)
    return run_job_and_show(app, job, panel, args.screenshot)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
