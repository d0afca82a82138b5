"""The whole desktop flow in one window: open, sensitivity, a size target, compress, export, reload.

Every step runs on the real workers with the real engine and the bundled demo; sensitivity uses
the fast (Fisher) method on a few hundred samples to keep this under a few seconds.
"""

from __future__ import annotations

import pytest

from engine.demo import DEMO_MODEL
from engine.formats import load_model

WAIT_MS = 60_000


def wait(qtbot, job) -> None:
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)


def test_open_analyse_target_compress_export_reload(qtbot, window, errors, tmp_path):
    analysis = getattr(window, "analysis", None)
    if analysis is None:
        pytest.skip("the analysis tools (gui.analysis) are not installed")
    from gui.project import DataChoice

    wait(qtbot, window.open_model(DEMO_MODEL))
    assert window.session.model is not None

    wait(qtbot, analysis.run(DataChoice(spec="demo:calibration", method="fast", limit=128)))
    assert analysis.state.sensitivity is not None and errors == []
    metric = window.session.plan_state.metric  # the curves now predict the plan's metric
    assert metric is not None and "Predicted" in window.plan_editor.forecast_label.text()

    document = window.session.plan_document
    steps = document.undo_stack.count()
    analysis.pareto_panel.size_edit.setText("0.3")
    wait(qtbot, analysis.pareto_panel.allocate())
    assert document.undo_stack.count() == steps + 1  # the allocation is one undoable edit
    predicted = window.session.plan_state.prediction
    assert window.session.plan_state.error is None and predicted is not None and predicted.ratio < 0.45

    wait(qtbot, window.run_compression())
    outcome = window.session.result
    assert errors == [] and outcome is not None
    assert outcome.report.size_ratio <= 0.3 + 0.02  # the allocator's target, as compress() counts
    assert outcome.report.metrics_after["accuracy"] > 0.9

    window.export()
    dialog = window.export_dialog
    qtbot.addWidget(dialog)
    destination = tmp_path / "digits-target.onnx"
    dialog.path_edit.setText(str(destination))
    wait(qtbot, dialog.start_export())
    assert errors == [] and dialog.result is not None and dialog.result.kept
    reloaded = load_model(destination)
    assert reloaded.format == "onnx" and reloaded.runnable
    dialog.close()
