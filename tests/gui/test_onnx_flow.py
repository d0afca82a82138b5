"""The whole desktop flow on an ONNX file: open, data, exact sensitivity, a size target, compress,
export to onnx-int8, reload and run.

The model is a small Conv + Gemm + MatMul digits classifier trained at test time
(tests/factories_onnx_flow.py) and its labelled held-out digits as an .npz, so every figure is a
real one: ONNX Runtime measures the sensitivity, the compression and the export's check.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from engine.formats import load_model
from tests.factories_onnx_flow import write_digits_npz, write_digits_onnx

WAIT_MS = 60_000


def wait(qtbot, job) -> None:
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)


def test_onnx_open_sensitivity_target_compress_export_reload(qtbot, window, errors, tmp_path):
    analysis = getattr(window, "analysis", None)
    if analysis is None:
        pytest.skip("the analysis tools (gui.analysis) are not installed")
    from gui.compress_dialog import CompressionDataDialog
    from gui.data_dialog import ARRAYS, DataDialog

    model_path = write_digits_onnx(tmp_path)
    data_path = write_digits_npz(tmp_path)

    wait(qtbot, window.open_model(model_path))
    model = window.session.model
    assert errors == [] and model is not None and model.format == "onnx"

    # The data dialog, driven as a user would: exact method, the .npz, all its samples.
    dialog = DataDialog(window, analysis.state.choice, model.path.name, model)
    qtbot.addWidget(dialog)
    assert "exact" not in dialog.blocked  # ONNX Runtime measures it
    assert "no gradients" in dialog.method_notes["fast"].text()  # not "a backward pass" here
    dialog.method_buttons["exact"].setChecked(True)
    dialog.source_buttons[ARRAYS].setChecked(True)
    dialog.arrays_edit.setText(str(data_path))
    dialog.limit_spin.setValue(0)  # "all", as compression evaluates on
    assert dialog.run_button.isEnabled(), dialog.problem()
    choice = dialog.choice()
    assert choice.spec == str(data_path) and choice.method == "exact"

    wait(qtbot, analysis.run(choice))
    sensitivity = analysis.state.sensitivity
    assert errors == [] and sensitivity is not None
    assert sensitivity.baseline > 0.8  # the trained classifier, scored by ONNX Runtime on labels
    assert "Predicted" in window.plan_editor.forecast_label.text()

    # Compression evaluates on the same labelled data (the compression-data dialog's API).
    data_dialog = CompressionDataDialog(window.session.data, False, window, model)
    qtbot.addWidget(data_dialog)
    data_dialog.edits["evaluation"].setText(str(data_path))
    window.session.set_data(data_dialog.data())

    document = window.session.plan_document
    steps = document.undo_stack.count()
    analysis.pareto_panel.size_edit.setText("0.3")
    wait(qtbot, analysis.pareto_panel.allocate())
    assert document.undo_stack.count() == steps + 1
    predicted = window.session.plan_state.prediction
    assert window.session.plan_state.error is None and predicted is not None and predicted.ratio < 0.4

    wait(qtbot, window.run_compression())
    outcome = window.session.result
    assert errors == [] and outcome is not None
    report = outcome.report
    assert report.size_ratio <= 0.3 + 0.02
    before, after = report.metrics_before["accuracy"], report.metrics_after["accuracy"]
    assert before == pytest.approx(sensitivity.baseline, abs=1e-6) and after > before - 0.1

    # The results panel shows the honest ratio and the metric before and after.
    cards = window.results.card_texts()
    shown = " ".join(cards.values())
    assert f"{report.size_ratio:.3f}×" in shown, cards
    assert f"{100 * before:.1f}" in cards["ACCURACY"] and f"{100 * after:.1f}" in cards["ACCURACY"], cards
    assert "not measured" not in cards.get("LATENCY", ""), cards

    window.export()
    export = window.export_dialog
    qtbot.addWidget(export)
    index = export.format_combo.findData("onnx-int8")
    assert index >= 0, "onnx-int8 is offered for an ONNX model"
    export.format_combo.setCurrentIndex(index)
    destination = tmp_path / "digits-int8.onnx"
    export.path_edit.setText(str(destination))
    wait(qtbot, export.start_export())
    result = export.result
    assert errors == [] and result is not None and result.kept, result and result.verification.summary()
    assert f"{result.file_ratio:.3f}x the original file" in export.verdict.text()  # not a bare "Verified"
    assert destination.stat().st_size < model_path.stat().st_size

    reloaded = load_model(destination)
    assert reloaded.format == "onnx" and reloaded.runnable
    x, y = np.load(data_path)["x"], np.load(data_path)["y"]
    session = ort.InferenceSession(str(destination), providers=["CPUExecutionProvider"])
    accuracy = float((session.run(None, {"input": x})[0].argmax(axis=1) == y).mean())
    assert accuracy > before - 0.1
    export.close()


def test_row_labels_thin_out_instead_of_overlapping(qtbot):
    """54 layer names on a short heat map printed on top of each other on a real MobileNet."""
    import pyqtgraph as pg
    from PySide6.QtGui import QFont, QFontMetrics

    from gui.panels.row_labels import RowLabels

    plot = pg.PlotWidget()
    qtbot.addWidget(plot)
    plot.setYRange(0, 60, padding=0)
    labels = RowLabels(plot.getPlotItem().getAxis("left"))
    labels.show([(i + 0.5, f"layer{i}") for i in range(60)])
    line = QFontMetrics(labels.axis.style.get("tickFont") or QFont()).height()

    plot.resize(300, 240)
    plot.show()
    qtbot.waitExposed(plot)
    view_height = plot.getPlotItem().getViewBox().height()
    shown = labels.shown()
    assert 1 < len(shown) < 60 and len(shown) * line <= view_height + line, (len(shown), view_height)
    assert shown[0] == "layer0" and "layer31" not in shown
    labels.pin(31)  # the selected layer is always named, its neighbours make room
    assert "layer31" in labels.shown() and len(labels.shown()) <= len(shown) + 1

    plot.resize(300, 60 * (line + 4) + 80)
    qtbot.waitUntil(lambda: len(labels.shown()) == 60, timeout=5000)  # room for every row again
