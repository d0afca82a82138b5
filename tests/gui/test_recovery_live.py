"""While recovery fine-tunes, Results shows it live: loss, learning-rate and metric curves from
the engine's RecoveryStep events (no log text parsed), and the progress runs to 100 %.

The demo model, its data and recovery are real; a short run keeps the file to seconds.
"""

from __future__ import annotations

import re

import pytest

from engine import workflows
from engine.demo import DEMO_MODEL
from engine.formats import load_model

from gui.panels.results import ResultsPanel
from gui.session import Session
from gui.workers import compression_job

WAIT_MS = 60_000
STEPS, EVAL_EVERY = 60, 10
PLAN = {"defaults": {"pruning": {"method": "magnitude", "amount": 0.6}},
        "recovery": {"steps": STEPS, "eval_every": EVAL_EVERY, "lr": 0.01}}


def curve_points(curve) -> int:
    xs, _ys = curve.getData()
    return 0 if xs is None else len(xs)


def test_recovery_is_live_in_results_and_the_progress_reaches_the_end(qtbot, window, errors):
    job = window.open_model(DEMO_MODEL)
    qtbot.waitUntil(lambda: job.finished and window.session.model is not None, timeout=WAIT_MS)
    window.session.plan_document.replace(PLAN, "Recovery plan")
    results, plot = window.results, window.results.recovery_plot
    assert results.title.text() == "No compression yet"

    job = window.run_compression()
    assert job is not None
    reports: list[tuple[float, str]] = []
    steps: list[workflows.RecoveryStep] = []
    job.progress.connect(lambda fraction, message: reports.append((fraction, message)))
    job.partial.connect(steps.append)
    window.tabs.setCurrentWidget(results)
    live: dict[str, object] = {}

    def seen_live() -> bool:  # sampled while the job runs, before the result replaces it
        if results.is_live and curve_points(plot.loss_curve) >= 2 and plot.metrics:
            live.update(title=results.title.text(), subtitle=results.subtitle.text(),
                        loss=curve_points(plot.loss_curve), lr=curve_points(plot.lr_curve),
                        metric=len(plot.metrics), running=not job.finished)
            return True
        return False

    qtbot.waitUntil(seen_live, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: job.finished and not window.busy, timeout=WAIT_MS)

    assert errors == []
    assert live["running"] and "recovery fine-tuning, step" in str(live["title"])
    assert f"of {STEPS}" in str(live["title"])
    assert re.match(r"loss \d\.\d{4} · learning rate 0\.0\d+", str(live["subtitle"]))
    assert int(live["loss"]) >= 2 and int(live["lr"]) >= 2 and int(live["metric"]) >= 1
    # every step arrived as a typed event, with the rate and, every EVAL_EVERY steps, the metric
    assert [step.step for step in steps] == list(range(1, STEPS + 1))
    assert all(isinstance(step, workflows.RecoveryStep) and step.total == STEPS for step in steps)
    assert [s.step for s in steps if s.metric is not None] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    # the progress follows the steps and ends at 100 %, not near half at the last step
    fractions = [fraction for fraction, _message in reports]
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert next(f for f, m in reports if m.startswith(f"recovery step {STEPS}/{STEPS}")) >= 0.9
    # then the result, with the whole run drawn
    assert not results.is_live and results.cards.isVisibleTo(results)
    assert results.card_texts()["RECOVERY"].startswith(f"{STEPS} steps")
    assert plot.step_count == STEPS and curve_points(plot.lr_curve) == STEPS
    assert len(plot.metrics) == STEPS // EVAL_EVERY


def test_a_followed_run_that_ends_early_gives_the_panel_back(qtbot):
    session = Session()
    session.set_model(load_model(DEMO_MODEL), sweep=False)
    panel = ResultsPanel(session)
    qtbot.addWidget(panel)
    panel.show()
    plan = {**PLAN, "recovery": {"steps": 100_000, "eval_every": 0}}
    job = compression_job(session.model, plan, session.effective_data())
    panel.follow(job, plan, "accuracy")
    job.start()
    try:
        qtbot.waitUntil(lambda: panel.is_live and panel.recovery_plot.step_count > 0, timeout=WAIT_MS)
        assert "of 100,000" in panel.title.text() and not panel.export_button.isEnabled()
    finally:
        job.cancel()
        qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)
        session.shutdown()
    assert not panel.is_live and panel.title.text() == "No compression yet"
    assert panel.recovery_plot.step_count == 0


@pytest.mark.parametrize("event", [workflows.Note("a note"), "text", 3])
def test_the_plot_takes_only_recovery_steps(qtbot, event):
    from gui.panels.recovery_plot import RecoveryPlot

    plot = RecoveryPlot()
    qtbot.addWidget(plot)
    plot.start({"steps": 10})
    plot.add_step(event)
    plot.add_step(workflows.RecoveryStep(1, 10, 0.5, 0.01))
    assert plot.step_count == 1 and plot.total_steps == 10
