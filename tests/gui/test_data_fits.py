"""The data dialog starts from the model's own inputs: it asks for the sizes the file leaves
open, offers the demo digits and image folders only where they fit, and says why data does not
fit, in one line, before Run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engine.data import SYNTHETIC_ID_RANGE, open_data
from engine.formats import load_model
from gui.analysis import AnalysisState
from gui.data_dialog import ARRAYS, DEMO, FOLDER, SYNTHETIC, DataDialog
from gui.project import DataChoice
from gui.session import Session
from tests.factories import tiny_cnn_onnx
from tests.factories_inputs import write_stateful_onnx, write_text_onnx

from analysis_helpers import wait_for_job


@pytest.fixture
def text_model(tmp_path: Path):
    """features [batch, 4] float, input_ids and attention_mask [batch, sequence] int64."""
    return load_model(write_text_onnx(tmp_path))


def _dialog(qtbot, model, choice: DataChoice | None = None) -> DataDialog:
    dialog = DataDialog(None, choice or DataChoice(), model.path.name, model)
    qtbot.addWidget(dialog)
    return dialog


def _problem(dialog: DataDialog) -> str:
    text = dialog.problem_label.text()
    assert "\n" not in text and text == dialog.problem()
    assert dialog.run_button.isEnabled() == (text == "")
    return text


def test_dialog_starts_from_a_multi_input_models_specs(qtbot, text_model) -> None:
    dialog = _dialog(qtbot, text_model)  # the app's default choice names the demo digits
    table = dialog.inputs_table
    rows = {table.item(row, 0).text(): [table.item(row, c).text() for c in range(1, 4)]
            for row in range(table.rowCount())}
    assert list(rows) == ["features", "input_ids", "attention_mask"]
    assert rows["input_ids"][:2] == ["int64", "(batch, sequence)"]
    assert "integers" in rows["input_ids"][2] and "ones" in rows["attention_mask"][2]
    assert "normal" in rows["features"][2]
    # the digits and image folders cannot feed three inputs: off, saying why; synthetic instead
    for kind in (DEMO, FOLDER):
        button = dialog.source_buttons[kind]
        assert not button.isEnabled() and "takes 3" in button.toolTip()
    assert dialog.source() == SYNTHETIC
    # the open sequence length is asked once for both inputs that share it
    assert list(dialog.size_edits) == ["sequence"]
    assert "'sequence'" in _problem(dialog) and not dialog.run_button.isEnabled()
    dialog.size_edits["sequence"].setValue(16)
    dialog.synthetic_count.setValue(8)
    assert _problem(dialog) == ""
    spec = dialog.choice().spec
    assert spec == "synthetic:8;input_ids=1,16;attention_mask=1,16"
    data = open_data(spec, text_model.inputs)  # what the worker will open
    inputs, labels = next(data.batches(8))
    assert labels is None and inputs["features"].dtype == np.float32
    ids = inputs["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (8, 16) and 0 <= ids.min() <= ids.max() < SYNTHETIC_ID_RANGE
    assert (inputs["attention_mask"] == 1).all()
    # a later dialog (the choice kept for this model) shows the sizes again
    again = _dialog(qtbot, text_model, dialog.choice())
    assert again.size_edits["sequence"].value() == 16 and again.choice() == dialog.choice()


def test_a_mismatch_is_reported_before_run(qtbot, text_model, tmp_path: Path) -> None:
    dialog = _dialog(qtbot, text_model)
    dialog.source_buttons[ARRAYS].setChecked(True)
    cases = {
        "missing.npz": (dict(features=np.zeros((3, 4), np.float32),
                             input_ids=np.zeros((3, 7), np.int64)), "'attention_mask'"),
        "float_ids.npz": (dict(features=np.zeros((3, 4), np.float32),
                               input_ids=np.zeros((3, 7), np.float32),
                               attention_mask=np.ones((3, 7), np.int64)), "float32"),
        "wide.npz": (dict(features=np.zeros((3, 5), np.float32),
                          input_ids=np.zeros((3, 7), np.int64),
                          attention_mask=np.ones((3, 7), np.int64)), "(5)"),
    }
    for name, (arrays, expected) in cases.items():
        np.savez(tmp_path / name, **arrays)
        dialog.arrays_edit.setText(str(tmp_path / name))
        problem = _problem(dialog)
        assert expected in problem and name in problem, problem
    np.savez(tmp_path / "good.npz", features=np.zeros((3, 4), np.float32),
             input_ids=np.zeros((3, 7), np.int64), attention_mask=np.ones((3, 7), np.int64))
    dialog.arrays_edit.setText(str(tmp_path / "good.npz"))
    assert _problem(dialog) == "" and dialog.spec() == str(tmp_path / "good.npz")


def test_a_scalar_input_asks_for_its_value(qtbot, tmp_path: Path) -> None:
    model = load_model(write_stateful_onnx(tmp_path))  # x, state [2, batch, 4], sr: a scalar
    dialog = _dialog(qtbot, model)
    assert list(dialog.size_edits) == ["sr:value"]
    assert "'sr'" in _problem(dialog)
    dialog.size_edits["sr:value"].setText("16000")
    assert _problem(dialog) == ""
    data = open_data(dialog.spec(), model.inputs)
    inputs, _ = next(data.batches(4))
    assert int(inputs["sr"]) == 16000 and inputs["state"].shape == (2, 4, 4)


def test_digits_are_offered_where_they_fit(qtbot, tmp_path: Path) -> None:
    from engine.demo import DEMO_MODEL

    for path in (DEMO_MODEL, tmp_path / "tiny.onnx"):
        if path.suffix == ".onnx":  # not the demo, but it takes 1x8x8 images too
            onnx.save(tiny_cnn_onnx(), str(path))
        dialog = _dialog(qtbot, load_model(path))
        assert dialog.source_buttons[DEMO].isEnabled() and dialog.source() == DEMO
        assert _problem(dialog) == ""
        assert dialog.source_buttons[FOLDER].isEnabled()


def test_sizes_reach_the_sweep(qtbot, text_model) -> None:
    """The choice the dialog makes runs: exact sensitivity of the text model on synthetic data."""
    state = AnalysisState(Session())
    state.session.set_model(text_model, sweep=False)
    dialog = _dialog(qtbot, text_model)
    dialog.size_edits["sequence"].setValue(6)
    dialog.synthetic_count.setValue(16)
    dialog.method_buttons["exact"].setChecked(True)
    job = state.run(dialog.choice())
    wait_for_job(qtbot, job)
    assert state.sensitivity is not None and state.sensitivity.layers
