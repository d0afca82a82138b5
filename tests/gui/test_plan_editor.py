"""Plan edits from the editor and the table reach PlanDocument, the table and the forecast; undo works.

Everything runs on the real demo model with the real engine: resolution errors are the engine's
own one-line PlanErrors (predicted sizes are checked against compress() in
tests/test_size_prediction.py).
"""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtTest import QTest

from engine.demo import DEMO_MODEL
from engine.plan import Plan
from gui.panels.layer_table import Column

WAIT_MS = 20_000


@pytest.fixture
def demo(qtbot, window):
    """The main window with the demo model loaded through the real loader."""
    job = window.open_model(DEMO_MODEL)
    qtbot.waitUntil(lambda: job.finished and window.session.model is not None, timeout=WAIT_MS)
    return window


def cell(window, name: str, column: Column) -> str:
    source = window.layer_table.source
    return source.index(source.row_of(name), column).data()


def test_bulk_edit_reaches_document_table_and_forecast_and_undoes(qtbot, demo):
    window, editor = demo, demo.plan_editor
    before_size = cell(window, "features.3", Column.PREDICTED)
    before_summary = window.summary.plan_label.text()
    assert cell(window, "features.3", Column.ACTION) == "keep"

    window.session.select_layers(["features.3", "features.7"])
    editor.layer_form.prune_box.setChecked(True)  # one edit: prune at the form's 50 %
    editor.layer_form.amount_spin.setValue(60.0)  # a second: 60 %
    document = window.session.plan_document
    for name in ("features.3", "features.7"):
        assert document.layer_sections(name) == {"pruning": {"method": "magnitude", "amount": 0.6}}
        assert cell(window, name, Column.ACTION) == "prune 60%"
    assert cell(window, "features.3", Column.PREDICTED) != before_size
    assert window.summary.plan_label.text() != before_summary
    assert "Predicted size" in editor.forecast_label.text()
    assert window.undo_action.text() == "&Undo Set pruning of 2 layers"
    assert not editor.error_label.isVisible()

    QTest.keyClick(window, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert document.layer_sections("features.3")["pruning"]["amount"] == 0.5
    window.undo_action.trigger()
    assert document.layer_sections("features.3") is None
    assert cell(window, "features.3", Column.ACTION) == "keep"
    assert cell(window, "features.3", Column.PREDICTED) == before_size
    assert not editor.layer_form.prune_box.isChecked()  # the form follows undo, too
    QTest.keyClick(window, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    QTest.keyClick(window, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert cell(window, "features.7", Column.ACTION) == "prune 60%"
    assert editor.layer_form.amount_spin.value() == 60.0


def test_refused_value_shows_the_engine_error_inline_and_changes_nothing(qtbot, demo, errors):
    window, editor = demo, demo.plan_editor
    window.session.select_layers(["classifier.1"])
    form = editor.layer_form
    form.quant_box.setChecked(True)
    form.granularity_combo.setCurrentText("group")  # group size 32 divides 1024: accepted
    document = window.session.plan_document
    accepted = document.to_dict()
    steps = document.undo_stack.count()
    form.group_spin.setValue(48)  # 1024 % 48 != 0
    message = editor.error_label.text()
    assert editor.error_label.isVisible() and "\n" not in message
    assert "group_size" in message and "1024" in message and "classifier.1" in message
    assert document.to_dict() == accepted and document.undo_stack.count() == steps
    assert errors == []  # inline, not a dialog
    form.group_spin.setValue(64)
    assert not editor.error_label.isVisible()
    assert cell(window, "classifier.1", Column.ACTION) == "int8 g64"


def test_table_cell_applies_a_preset_to_the_whole_selection_in_one_step(qtbot, demo):
    window = demo
    window.session.select_layers(["classifier.1", "classifier.4", "features.1"])  # a BatchNorm too
    document = window.session.plan_document
    source = window.layer_table.source
    index = source.index(source.row_of("classifier.4"), Column.ACTION)
    assert source.flags(index) & Qt.ItemFlag.ItemIsEditable
    assert source.setData(index, "int4 g32")
    assert document.undo_stack.count() == 1
    assert cell(window, "classifier.1", Column.ACTION) == "int4 g32 mse"
    assert cell(window, "classifier.4", Column.ACTION) == "int4 g32 mse"
    assert cell(window, "features.1", Column.ACTION) == "keep"  # a BatchNorm cannot take it
    assert document.layer_sections("features.1") is None
    window.layer_table.filter_edit.setText("int4")  # the filter finds layers by their planned action
    assert window.layer_table.visible_names() == ["classifier.1", "classifier.4"]
    window.layer_table.filter_edit.clear()
    window.session.select_layers(["classifier.1"])
    assert source.setData(index, "follow defaults")  # a row outside the selection: that row only
    assert document.layer_sections("classifier.4") is None
    assert document.layer_sections("classifier.1") is not None


def test_defaults_and_recovery_forms_write_the_plan(qtbot, demo):
    window, editor = demo, demo.plan_editor
    document = window.session.plan_document
    editor.defaults_form.quant_box.setChecked(True)
    assert document.to_dict()["defaults"]["quantization"]["bits"] == 8
    assert cell(window, "features.0", Column.ACTION) == "int8/ch"
    assert cell(window, "features.1", Column.ACTION) == "keep"

    recovery = editor.recovery_form
    recovery.setChecked(True)
    recovery.steps_spin.setValue(40)
    recovery.optimizer_combo.setCurrentText("sgd")
    data = document.plan.recovery
    assert data["steps"] == 40 and data["optimizer"] == "sgd"
    recovery.gradual_box.setChecked(True)  # ends at step 400 of 40: still a valid config here
    recovery.start_spin.setValue(500)  # start after end: RecoveryConfig refuses it
    assert "recovery.gradual.end_step" in editor.error_label.text()
    assert document.plan.recovery["gradual"]["start_step"] == 0
    recovery.setChecked(False)
    assert document.plan.recovery is None


def test_plan_files_load_and_a_bad_one_is_one_line(qtbot, demo, errors, tmp_path):
    window = demo
    document = window.session.plan_document
    path = tmp_path / "plan.yaml"
    path.write_text("defaults:\n  pruning: {method: magnitude, amount: 0.3}\n")
    assert window.load_plan(path)
    assert cell(window, "features.0", Column.ACTION) == "prune 30%"
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": {"no.such.layer": "keep"}}')
    before = document.to_dict()
    assert not window.load_plan(bad)
    assert len(errors) == 1 and "no.such.layer" in errors[0][0] and "\n" not in errors[0][0]
    assert document.to_dict() == before
    saved = window.save_plan_to(tmp_path / "again")  # no extension: YAML
    assert saved == tmp_path / "again.yaml" and Plan.load(saved).to_dict() == before
    assert not window.isWindowModified()


def test_action_cell_editor_offers_the_presets_and_one_pick_commits(qtbot, demo):
    from PySide6.QtWidgets import QComboBox

    table = demo.layer_table
    demo.session.select_layers(["classifier.4"])
    source_index = table.source.index(table.source.row_of("classifier.4"), Column.ACTION)
    index = table.proxy.mapFromSource(source_index)
    table.view.edit(index)
    combo = table.view.viewport().findChild(QComboBox)
    assert combo is not None and combo.findText("fp16") >= 0 and combo.findText("follow defaults") >= 0
    combo.hidePopup()
    combo.setCurrentIndex(combo.findText("fp16"))
    combo.activated.emit(combo.currentIndex())
    assert demo.session.plan_document.layer_sections("classifier.4")["quantization"] == {"bits": "fp16"}
    assert cell(demo, "classifier.4", Column.ACTION) == "fp16"
    # a BatchNorm row offers only what it can take
    table.view.edit(table.proxy.mapFromSource(table.source.index(table.source.row_of("features.1"), Column.ACTION)))
    combos = [c for c in table.view.viewport().findChildren(QComboBox) if c.isVisible()]
    assert combos and [combos[-1].itemText(i) for i in range(combos[-1].count())] == ["follow defaults"]
    combos[-1].hidePopup()


def test_editor_runs_alone(qapp, tmp_path):
    from gui.panels.plan_editor import _main

    out = tmp_path / "editor.png"
    assert _main([str(DEMO_MODEL), "--layer", "classifier.1", "--screenshot", str(out)]) == 0
    assert out.stat().st_size > 5000
