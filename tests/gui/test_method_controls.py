"""The error-compensating methods in the app (issue 15, item 4) and honest result colours.

The plan editor offers GPTQ (with act-order and damping), OBS pruning (by amount or N:M) and
bias correction, each edit one undo step; the results report and the histogram overlay name the
method that made each layer; a small accuracy loss is never drawn green; a quantized ONNX
weight's stored integer codes are one toggle away. Everything runs the real engine on the demo
and on a file quantized by ONNX Runtime itself (tests/factories_qdq.py).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtWidgets import QListView

from engine import workflows
from engine.data import DataSpec
from engine.demo import DEMO_MODEL
from engine.formats import load_model
from engine.plan import Plan
from gui.panels.histogram import HistogramPanel, compressed_weight
from gui.panels.plan_editor import METHOD_NOTES, PlanEditor, UNSTRUCTURED
from gui.panels.results import ResultsPanel
from gui.session import Session
from gui.theme import BAD, DARK, GOOD, LIGHT, LOOKS, NEUTRAL, STATUS_COLORS, make_palette

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from factories_qdq import write_quantized  # noqa: E402

WAIT_MS = 20_000
#: A small plan with both new methods: a second on the demo with 100 samples.
METHOD_PLAN = {"version": 1, "layers": {
    "classifier.1": {"quantization": {"bits": 2, "method": "gptq"}, "bias_correction": True},
    "features.3": {"pruning": {"method": "obs", "amount": 0.7}},
}}


@pytest.fixture(scope="module")
def demo_model():
    return load_model(DEMO_MODEL)


@pytest.fixture(scope="module")
def outcome(demo_model):
    """One real compression with GPTQ, OBS and bias correction, measured on demo digits."""
    return workflows.compress(demo_model, METHOD_PLAN, DataSpec("demo", limit=100))


@pytest.fixture
def session(qtbot, demo_model):
    session = Session()
    session.set_model(demo_model, sweep=False)
    yield session
    session.shutdown()


@pytest.fixture
def editor(qtbot, session):
    editor = PlanEditor(session)
    qtbot.addWidget(editor)
    editor.show()
    session.select_layers(["features.3"])
    return editor


def own(session: Session, name: str = "features.3"):
    return session.plan_document.layer_sections(name)


def test_gptq_shows_act_order_and_damping_and_writes_the_method(session, editor):
    form = editor.layer_form
    form.quant_box.setChecked(True)
    assert not form.act_order_check.isVisibleTo(editor) and not form.damping_spin.isVisibleTo(editor)
    assert own(session)["quantization"].get("method", "rtn") == "rtn"

    form.quant_method_combo.setCurrentIndex(form.quant_method_combo.findData("gptq"))
    assert form.act_order_check.isVisibleTo(editor) and form.damping_spin.isVisibleTo(editor)
    assert form.quant_method_note.text() == ("GPTQ: quantize column by column, compensating the "
                                             "error from calibration data")
    quant = own(session)["quantization"]
    assert (quant["method"], quant["act_order"], quant["damping"]) == ("gptq", False, 0.01)
    form.act_order_check.setChecked(True)
    form.damping_spin.setValue(5.0)  # percent of the Hessian's mean diagonal
    quant = own(session)["quantization"]
    assert (quant["act_order"], quant["damping"]) == (True, 0.05)
    resolved = session.plan_state.layers["features.3"].quantization
    assert resolved.method == "gptq" and resolved.act_order and resolved.damping == 0.05

    undo = session.plan_document.undo_stack
    assert undo.undoText() == "Set quantization of features.3"
    undo.undo()
    undo.undo()
    assert own(session)["quantization"]["act_order"] is False and not form.act_order_check.isChecked()
    undo.undo()
    assert "method" not in own(session)["quantization"]
    assert form.quant_method_combo.currentData() == "rtn" and not form.act_order_check.isVisibleTo(editor)

    form.bits_combo.setCurrentIndex(form.bits_combo.findData("fp16"))  # a cast has no method
    assert own(session)["quantization"] == {"bits": "fp16"}
    assert not form.quant_method_combo.isEnabled()


def test_obs_offers_an_amount_or_the_nm_pattern_row(session, editor):
    form = editor.layer_form
    form.prune_box.setChecked(True)
    form.method_combo.setCurrentIndex(form.method_combo.findData("obs"))
    assert form.method_note.text() == METHOD_NOTES["obs"] == (
        "OBS: prune and compensate the remaining weights from calibration data")
    assert form.pattern_combo.isVisibleTo(editor) and form.amount_spin.isVisibleTo(editor)
    assert form.pattern_combo.currentText() == UNSTRUCTURED
    assert own(session)["pruning"] == {"method": "obs", "amount": 0.5}

    form.pattern_combo.setCurrentText("2:4")
    assert own(session)["pruning"] == {"method": "obs", "pattern": "2:4"}
    assert not form.amount_spin.isVisibleTo(editor)
    assert session.plan_state.layers["features.3"].pruning.is_nm

    form.method_combo.setCurrentIndex(form.method_combo.findData("nm"))  # plain N:M: no "unstructured"
    view = form.pattern_combo.view()
    assert isinstance(view, QListView) and view.isRowHidden(0)
    assert own(session)["pruning"] == {"method": "nm", "pattern": "2:4"}

    session.plan_document.undo_stack.undo()  # back to OBS 2:4, and the form follows
    assert form.method_combo.currentData() == "obs" and form.pattern_combo.currentText() == "2:4"
    session.plan_document.undo_stack.undo()
    assert own(session)["pruning"] == {"method": "obs", "amount": 0.5}
    assert form.amount_spin.isVisibleTo(editor) and form.pattern_combo.currentText() == UNSTRUCTURED


def test_every_method_has_a_one_line_explanation(editor):
    form = editor.layer_form
    for index in range(form.method_combo.count()):
        form.method_combo.setCurrentIndex(index)
        assert form.method_note.text() and "\n" not in form.method_note.text()
    assert form.quant_method_combo.count() == 3  # round to nearest, GPTQ, AWQ


def test_bias_correction_checkbox_writes_the_plan_and_undoes(session, editor):
    form = editor.layer_form
    form.quant_box.setChecked(True)
    form.bias_check.setChecked(True)
    assert own(session)["bias_correction"] is True
    assert session.plan_state.layers["features.3"].bias_correction
    assert "bias corr." in editor.target_note.text()
    assert session.plan_document.undo_stack.undoText() == "Turn on bias correction for features.3"
    form.bias_check.setChecked(False)  # nothing else switches it on: the key goes, not "false"
    assert "bias_correction" not in own(session)
    session.plan_document.undo_stack.undo()
    assert own(session)["bias_correction"] is True and form.bias_check.isChecked()

    defaults = editor.defaults_form
    defaults.bias_check.setChecked(True)
    assert session.plan_document.to_dict()["defaults"] == {"bias_correction": True}
    assert session.plan_state.layers["classifier.4"].bias_correction
    form.bias_check.setChecked(False)  # the defaults would switch it on: an explicit false
    assert own(session)["bias_correction"] is False
    assert not session.plan_state.layers["features.3"].bias_correction
    session.plan_document.undo_stack.undo()
    session.plan_document.undo_stack.undo()
    assert "defaults" not in session.plan_document.to_dict()
    Plan.from_dict(session.plan_document.to_dict())  # every step left a valid plan


def test_result_report_and_overlay_name_the_method(qtbot, session, outcome):
    session.plan_document.replace(METHOD_PLAN)
    panel = ResultsPanel(session)
    qtbot.addWidget(panel)
    session.set_result(outcome)
    rows = {panel.table.item(row, 0).text(): panel.table.item(row, 2).text()
            for row in range(panel.table.rowCount())}
    assert panel.table.horizontalHeaderItem(2).text() == "Method"
    assert rows["classifier.1"] == "GPTQ 2-bit per-channel + bias correction"
    assert rows["features.3"] == "OBS 70%"
    assert rows["classifier.4"] == "kept"

    histogram = HistogramPanel(session)
    qtbot.addWidget(histogram)
    session.select_layer("classifier.1")
    qtbot.waitUntil(lambda: histogram.after is not None, timeout=WAIT_MS)
    assert "(GPTQ 2-bit per-channel + bias correction)" in histogram.after_label.text()
    weight = compressed_weight(outcome, "classifier.1")  # 2-bit: four levels per output row
    assert max(np.unique(row).size for row in weight) <= 4


def detail_color(card) -> str:
    match = re.search(r"color:(#[0-9a-fA-F]{6})", card.detail.text())
    return match.group(1).lower() if match else ""


@pytest.mark.parametrize("points, meaning", [(-0.3, NEUTRAL), (-0.6, BAD), (0.2, GOOD), (0.0, NEUTRAL)])
def test_accuracy_colour_is_green_only_for_a_gain(qtbot, session, outcome, points, meaning):
    panel = ResultsPanel(session)
    qtbot.addWidget(panel)
    before = outcome.report.metrics_before["accuracy"]
    outcome.report.metrics_after = {**outcome.report.metrics_after, "accuracy": before + points / 100}
    try:
        panel.show_outcome(outcome)
        assert detail_color(panel.metric_card) == STATUS_COLORS[LIGHT][meaning]
        assert f"{points:+.2f} points" in panel.metric_card.detail.text()
        panel.setPalette(make_palette(LOOKS[DARK]))  # recoloured with the dark look's shade
        assert detail_color(panel.metric_card) == STATUS_COLORS[DARK][meaning]
        assert detail_color(panel.size_card) == STATUS_COLORS[DARK][GOOD]  # it did shrink
        assert STATUS_COLORS[DARK]["warning"] in panel.stale_label.styleSheet()
    finally:
        outcome.report.metrics_after = {**outcome.report.metrics_after, "accuracy": before}


def test_stored_codes_toggle_plots_the_integer_codes_of_a_quantized_onnx(qtbot, tmp_path, demo_model):
    model = load_model(write_quantized(tmp_path))
    session = Session()
    session.set_model(model, sweep=False)
    panel = HistogramPanel(session)
    qtbot.addWidget(panel)
    panel.show()
    layer = model.layer("features.conv")
    session.select_layer(layer.name)
    qtbot.waitUntil(lambda: panel.histogram is not None, timeout=WAIT_MS)
    assert panel.codes_toggle.isVisible() and panel.codes is None
    assert "codes × scale" in panel.codes_toggle.toolTip()
    floats = model.tensors.get(layer.weight_key)
    assert not np.allclose(floats, np.round(floats))  # the histogram shows decoded floats

    panel.codes_toggle.setChecked(True)
    codes = np.asarray(model.tensors.stored(layer.weight_key)).astype(np.int64).ravel()
    assert panel.codes is not None and panel.plot.getAxis("bottom").labelText == "stored code"
    edges = panel.codes.edges
    assert np.allclose(edges - np.floor(edges), 0.5)  # bins centred on the codes
    assert edges[0] == codes.min() - 0.5 and edges[-1] == codes.max() + 0.5
    assert np.array_equal(panel.plotted_counts(), np.bincount(codes - codes.min()))
    panel.codes_toggle.setChecked(False)
    assert panel.codes is None and panel.plot.getAxis("bottom").labelText == "weight value"
    session.shutdown()

    demo = Session()  # a float model has no codes to show
    demo.set_model(demo_model, sweep=False)
    other = HistogramPanel(demo)
    qtbot.addWidget(other)
    other.show()
    demo.select_layer("features.3")
    assert not other.codes_toggle.isVisible()
    demo.shutdown()


def test_export_refusal_takes_the_looks_red(qtbot, tmp_path, outcome):
    from PySide6.QtCore import QSettings

    from gui.export_dialog import ExportDialog

    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    dialog = ExportDialog(outcome, settings=settings, show_error=lambda *_args: None)
    qtbot.addWidget(dialog)
    dialog.path_edit.setText(str(tmp_path / "model.unknown-format"))
    assert STATUS_COLORS[LIGHT][BAD] in dialog.plan_label.text()
    dialog.setPalette(make_palette(LOOKS[DARK]))  # the light red on a dark window was unreadable
    assert STATUS_COLORS[DARK][BAD] in dialog.plan_label.text()
    assert STATUS_COLORS[LIGHT][BAD] not in dialog.plan_label.text()
