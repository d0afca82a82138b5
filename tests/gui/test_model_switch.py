"""Opening another model in the same window resets everything that belonged to the last one:
the filter, the selection, sensitivity results, the data choice, the compression result; a plan
that does not fit the new model is not silently kept, the user answers Keep or Discard. An int8
ONNX file shows its layers under their source names, with float weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.plan import Plan
from gui.project import DataChoice
from tests.factories_qdq import SOURCE_NAMES, write_quantized

from analysis_helpers import WAIT_MS


def wait(qtbot, job) -> None:  # type: ignore[no-untyped-def]
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)


def _visible_rows(window) -> int:  # type: ignore[no-untyped-def]
    return window.layer_table.proxy.rowCount()


@pytest.fixture
def demo_with_state(qtbot, window, errors):  # type: ignore[no-untyped-def]
    """The demo open with a filter typed, a layer selected, data-free sensitivity measured, a
    synthetic data choice and a plan naming one of the demo's layers."""
    analysis = window.analysis
    wait(qtbot, window.open_demo())
    model = window.session.model
    assert errors == [] and model is not None
    window.layer_table.filter_edit.setText("classifier")
    assert 0 < _visible_rows(window) < len(model.layers)
    window.session.select_layer(model.layers[-1].name)
    wait(qtbot, analysis.run(DataChoice(spec=None, method="datafree")))
    assert analysis.state.sensitivity is not None
    analysis.state.choice = DataChoice(spec="synthetic:32", method="exact")
    name = next(layer.name for layer in model.layers if layer.quantizable)
    window.session.plan_document.replace(
        {"layers": {name: {"quantization": {"bits": 4, "granularity": "per-channel"}}}}, "demo plan")
    assert window.session.plan_state.error is None
    return window


@pytest.mark.parametrize("answer", ["discard", "keep"])
def test_opening_an_int8_onnx_after_the_demo_leaves_nothing_behind(qtbot, demo_with_state, errors,
                                                                   tmp_path: Path, answer: str) -> None:
    window = demo_with_state
    analysis, session, editor = window.analysis, window.session, window.plan_editor
    demo_plan = session.plan_document.to_dict()

    wait(qtbot, window.open_model(write_quantized(tmp_path)))
    model = session.model
    assert errors == [] and model is not None and model.format == "onnx"
    # per-model state is gone: the whole new table shows, nothing of the demo's is kept
    assert window.layer_table.filter_edit.text() == ""
    assert _visible_rows(window) == len(model.layers) == len(SOURCE_NAMES)
    assert session.selected_layer == model.layers[0].name
    assert analysis.state.sensitivity is None and not analysis.save_sensitivity_action.isEnabled()
    assert analysis.state.results_data is None
    assert analysis.state.choice == DataChoice()  # the next dialog starts from these inputs
    assert session.result is None and session.plan_state.metric is None
    # the quantized layers: source names, float weights (codes x scale), the codes still there
    assert tuple(model.layer_names()) == SOURCE_NAMES
    weight = model.weight(model.layers[0])
    assert weight.dtype == np.float32 and np.abs(weight).max() < 20
    assert model.tensors.stored(model.layers[0].weight_key).dtype == np.int8
    # the demo's plan names a layer this model lacks: the user is asked, not surprised
    assert session.plan_state.error is not None
    assert not editor.mismatch_bar.isHidden() and model.path.name in editor.mismatch_label.text()
    assert not window.run_action.isEnabled()
    assert session.plan_state.error in window.run_action.toolTip()
    assert window.run_compression() is None and errors.pop()[0] == session.plan_state.error
    if answer == "discard":
        editor.discard_plan_button.click()
        assert session.plan_document.to_dict() == Plan().to_dict()
        assert session.plan_state.error is None and window.run_action.isEnabled()
    else:
        editor.keep_plan_button.click()
        assert session.plan_document.to_dict() == demo_plan and session.plan_state.error
    assert editor.mismatch_bar.isHidden()
    # and back to the demo: the kept plan fits again and nothing is asked; a discarded one is empty
    wait(qtbot, window.open_demo())
    assert editor.mismatch_bar.isHidden() and session.plan_state.error is None
    assert window.layer_table.filter_edit.text() == "" and analysis.state.sensitivity is None


def test_a_plan_that_fits_the_next_model_is_kept_without_asking(qtbot, demo_with_state,
                                                                tmp_path: Path) -> None:
    window = demo_with_state
    window.session.plan_document.replace({"defaults": {"quantization": {"bits": 8}}}, "defaults only")
    plan = window.session.plan_document.to_dict()
    wait(qtbot, window.open_model(write_quantized(tmp_path)))
    assert window.plan_editor.mismatch_bar.isHidden()
    assert window.session.plan_document.to_dict() == plan and window.session.plan_state.error is None
