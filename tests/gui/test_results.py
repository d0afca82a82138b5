"""The results dashboard, the compressed-layer overlay, layer comparison and the recovery plot.

Outcomes come from real compress() calls on the demo (no worker: these tests are about what the
panels show, the worker flow is in test_compress_flow.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.compress import compress
from engine.data import open_data
from engine.demo import DEMO_MODEL
from engine.finetune import StepReport
from engine.formats import load_model
from engine.plan import Plan
from gui.panels.histogram import HistogramPanel, compressed_weight
from gui.panels.log_panel import LogPanel
from gui.panels.recovery_plot import RecoveryPlot
from gui.panels.results import ResultsPanel
from gui.session import CompressionData, CompressionOutcome, Session

WAIT_MS = 20_000
PLAN = {"defaults": {"quantization": {"bits": 4, "granularity": "per-tensor"}},
        "layers": {"classifier.1": {"pruning": {"method": "magnitude", "amount": 0.75}}}}


@pytest.fixture(scope="module")
def demo_model():
    return load_model(DEMO_MODEL)


@pytest.fixture
def session(qtbot, demo_model):
    session = Session()
    session.set_model(demo_model, sweep=False)
    yield session
    session.shutdown()


def outcome_for(session: Session, plan: dict, data: bool = True) -> CompressionOutcome:
    model = session.model
    evaluation = open_data("demo", model.inputs) if data else None
    compressed, report = compress(model, Plan.from_dict(plan), evaluation)
    choice = CompressionData("demo") if data else CompressionData()
    return CompressionOutcome(model, plan, choice, compressed, report)


def test_dashboard_shows_sizes_accuracy_latency_and_per_layer_bytes(qtbot, session):
    panel = ResultsPanel(session)
    qtbot.addWidget(panel)
    assert panel.title.text() == "No compression yet" and not panel.export_button.isEnabled()
    session.plan_document.replace(PLAN)
    outcome = outcome_for(session, PLAN)
    session.set_result(outcome)
    report = outcome.report
    cards = panel.card_texts()
    assert cards["SIZE"].startswith(f"737.2 KiB → ") and f"{report.size_ratio:.3f}×" in cards["SIZE"]
    before, after = report.metrics_before["accuracy"], report.metrics_after["accuracy"]
    assert cards["ACCURACY"].startswith(f"{100 * before:.2f} % → {100 * after:.2f} %")
    assert f"{report.latency_before_ms:.2f} → {report.latency_after_ms:.2f} ms" in cards["LATENCY"]
    assert cards["RECOVERY"].startswith("not used") and not panel.recovery_box.isVisibleTo(panel)
    widths = panel.chart.after.opts["width"]
    assert panel.chart.names == [layer.name for layer in report.layers]
    assert np.allclose(widths, [layer.bytes_after / 1024 for layer in report.layers])
    assert panel.table.rowCount() == len(report.layers)
    assert not panel.stale_label.isVisibleTo(panel)
    session.plan_document.set_layers(["classifier.4"], "keep")  # the result now describes an older plan
    assert panel.stale_label.isVisibleTo(panel)
    session.set_result(None)
    assert panel.title.text() == "No compression yet"


def test_without_data_the_dashboard_says_what_is_missing(qtbot, session):
    panel = ResultsPanel(session)
    qtbot.addWidget(panel)
    session.set_result(outcome_for(session, PLAN, data=False))
    cards = panel.card_texts()
    assert cards["ACCURACY"].startswith("not measured") and cards["LATENCY"].startswith("not measured")
    assert cards["SIZE"].startswith("737.2 KiB")


def test_overlay_shows_the_compressed_layer_levels_and_zeros(qtbot, session):
    panel = HistogramPanel(session)
    qtbot.addWidget(panel)
    session.select_layer("classifier.1")
    qtbot.waitUntil(lambda: panel.histogram is not None, timeout=WAIT_MS)
    assert panel.after is None and not panel.after_line.isVisible()
    outcome = outcome_for(session, PLAN, data=False)
    session.set_result(outcome)
    weight = compressed_weight(outcome, "classifier.1")
    zeros = int(weight.size - np.count_nonzero(weight))
    after = panel.after
    assert after is not None and after.zeros == zeros and zeros >= 0.75 * weight.size
    assert after.distinct <= 16  # 4-bit per-tensor codes: at most 15 levels plus zero
    assert len(after.levels) == after.distinct - 1  # one tick per non-zero level
    assert panel.zero_bar.isVisible() and panel.after_line.isVisible()
    assert f"{zeros:,} exact zeros" in panel.after_label.text()
    assert int(after.counts.sum()) == weight.size - zeros
    panel.log_toggle.setChecked(True)  # log scale keeps the overlay
    assert panel.after is not None and panel.after_line.isVisible()


def test_several_selected_layers_are_overlaid_normalized_with_a_legend(qtbot, session):
    panel = HistogramPanel(session)
    qtbot.addWidget(panel)
    names = ["features.3", "features.7", "classifier.1"]
    session.select_layers(names)
    qtbot.waitUntil(lambda: all(line.isVisible() for line in panel.compare_lines[:3]), timeout=WAIT_MS)
    assert panel.compared == names and not panel.bars.isVisible()
    assert [label.text for _item, label in panel.legend.items] == names
    for line in panel.compare_lines[:3]:
        x, y = line.getData()
        assert abs(float(np.sum(y * np.diff(x))) - 1.0) < 1e-6  # each has unit area
    session.select_layers(["features.3"])
    assert panel.compared == [] and panel.bars.isVisible()


def test_recovery_plot_draws_steps_and_the_planned_rate(qtbot):
    plot = RecoveryPlot()
    qtbot.addWidget(plot)
    plot.start({"steps": 50, "lr": 0.01, "schedule": {"name": "cosine"}}, "accuracy")
    x, y = plot.planned_curve.getData()
    assert len(x) == 50 and y[0] == pytest.approx(0.01) and y[-1] < y[0]
    for step in range(1, 21):
        plot.add_step(StepReport(step, 1.0 / step, 0.01, metric=0.9 if step % 10 == 0 else None))
    qtbot.waitUntil(lambda: plot.loss_curve.getData()[0] is not None and len(plot.loss_curve.getData()[0]) == 20,
                    timeout=WAIT_MS)
    assert len(plot.metric_curve.getData()[0]) == 2 and "20 / 50 steps" in plot.header.text()
    plot.clear()
    assert plot.step_count == 0


def test_log_keeps_stage_changes_not_every_progress_call(qtbot):
    log = LogPanel()
    qtbot.addWidget(log)
    for step in range(1, 200):
        log.progress(step / 200, f"recovery step {step}/200, loss 0.1")
    log.progress(1.0, "timing the original")
    log.add("export failed: disk full", "error")
    assert len(log.lines) == 3 and "recovery step 1/200" in log.lines[0]
    assert "timing the original" in log.lines[1] and log.lines[2].endswith("export failed: disk full")
