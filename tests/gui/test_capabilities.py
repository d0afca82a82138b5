"""Every action of the app is enabled exactly when the model's backend can do it.

One window opens, one after another, a file of each kind the engine reads (the demo's torch
module, TorchScript, a static-batch torch.export program, ONNX, bare safetensors). For each, the
expected state of every gated action is computed from the engine (``Model.can`` /
``Model.why_not``), never written down here, and a disabled action must show the engine's line
as its tooltip (and in the status bar when hovered). Between models the test leaves state behind
(a filter, a plan, sensitivity results, a selected layer) and checks that none of it leaks into
the next model: a plan that does not fit asks Keep / Discard.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import QPointF
from PySide6.QtGui import QEnterEvent
from PySide6.QtWidgets import QApplication

from engine.backends.base import GRADIENTS, GRAPH_SURGERY, LOW_RANK, ONNX_EXPORT, RUN, TORCH_MODULE, TRAIN
from engine.errors import PlanError
from engine.model import Model
from engine.plan import Plan
from engine.sensitivity import sweep

from analysis_helpers import combo_item
from factories_gui import model_of_each_kind

WAIT_MS = 60_000
#: Export formats by what they are made from (the dialog's rule, stated again independently).
ONNX_FORMATS = ("onnx", "onnx-int8", "onnx-dynamic", "onnx-w4", "onnx-w8")
TORCH_FORMATS = ("state-dict", "torch-module", "torchscript", "pt2")
INT8 = {"defaults": {"quantization": {"bits": 8}}}


def _wait(qtbot, job) -> None:
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)



def _expect_gate(enabled: bool, tip: str, model: Model, capability: str) -> None:
    """Enabled exactly when the backend can; otherwise the tooltip is the engine's line."""
    assert enabled == model.can(capability), (model.backend.name, capability)
    if not enabled:
        assert tip == model.why_not(capability) and "\n" not in tip


def _hover_status(window, action) -> str:
    """What the status bar says while the pointer is on the action's toolbar button."""
    button = window.toolbar.widgetForAction(action)
    window.statusBar().clearMessage()
    QApplication.sendEvent(button, QEnterEvent(QPointF(2, 2), QPointF(2, 2), QPointF(2, 2)))
    return window.statusBar().currentMessage()


def _check_plan_gates(window, model: Model, errors: list) -> None:
    """Plans needing a capability: Run is enabled exactly when the backend has it, and the plan
    editor flags the part with the engine's line."""
    cases = [
        ({"recovery": {"steps": 5}}, TRAIN),
        ({"defaults": {"pruning": {"method": "gradient", "amount": 0.5}}}, GRADIENTS),
        ({"defaults": {"pruning": {"method": "structured", "amount": 0.25}}}, GRAPH_SURGERY),
        ({"defaults": {"low_rank": {"rank": 2}}}, LOW_RANK),
    ]
    document = window.session.plan_document
    for plan, capability in cases:
        try:
            layers = Plan.from_dict(plan).resolve(model.layers)
        except PlanError:
            continue
        if all(layer_plan.keep for layer_plan in layers.values()):
            continue  # no layer of this model takes the section: nothing to gate
        document.replace(plan, "capability case")
        assert window.session.plan_state.error is None
        action = window.run_action
        assert action.isEnabled() == model.can(capability), (model.backend.name, capability)
        flags = window.plan_editor.capability_label
        if model.can(capability):
            assert flags.isHidden()
        else:  # "<what the plan asks>: <the engine's line>", in one line
            reason = model.why_not(capability)
            assert action.toolTip().endswith(f": {reason}") and "\n" not in action.toolTip()
            assert reason in flags.text() and not flags.isHidden()
            assert action.statusTip() == action.toolTip()
            assert _hover_status(window, action) == action.toolTip()
            assert window.run_compression() is None  # refused at once, never in the worker
            assert errors.pop() == (action.toolTip(), "")
    document.replace(Plan(), "clean")
    assert window.run_action.isEnabled()  # weights compress on every backend


def _check_static_gates(window, model: Model) -> None:
    from gui.data_dialog import DataDialog
    from gui.project import DataChoice

    analysis = window.analysis
    badge = window.summary.capability_badge.text()
    assert badge.startswith(model.backend.name)
    assert "runnable" not in badge
    _expect_gate(window.data_action.isEnabled(), window.data_action.toolTip(), model, RUN)
    assert analysis.sensitivity_action.isEnabled()  # data-free sensitivity reads weights only
    assert analysis.state.can_run(DataChoice(spec=None, method="datafree")) == ""
    assert analysis.state.can_run(DataChoice(method="exact")) == (model.why_not(RUN) or "")

    dialog = DataDialog(window, DataChoice(), model.path.name, model)
    for method in ("exact", "fast"):
        button = dialog.method_buttons[method]
        _expect_gate(button.isEnabled(), button.toolTip(), model, RUN)
    assert dialog.method_buttons["datafree"].isEnabled()
    assert dialog.method_buttons[dialog.method()].isEnabled()  # the preselected one can run
    _expect_gate(dialog.ranks_box.isEnabled(), dialog.ranks_box.toolTip(), model, LOW_RANK)
    dialog.deleteLater()

    for form in (window.plan_editor.defaults_form, window.plan_editor.layer_form):
        _expect_gate(*combo_item(form.method_combo, "gradient"), model, GRADIENTS)
        _expect_gate(*combo_item(form.method_combo, "taylor"), model, GRADIENTS)
        _expect_gate(*combo_item(form.method_combo, "structured"), model, GRAPH_SURGERY)
        assert combo_item(form.method_combo, "magnitude")[0] and combo_item(form.method_combo, "nm")[0]
    rank_box = window.plan_editor.defaults_form.rank_box
    _expect_gate(rank_box.isEnabled(), rank_box.toolTip(), model, LOW_RANK)
    recovery = window.plan_editor.recovery_form
    _expect_gate(recovery.isEnabled(), recovery.toolTip(), model, TRAIN)


def _check_export_formats(qtbot, window, model: Model, errors: list) -> None:
    """Compress (int8 weights, no data) and check the formats the export dialog offers."""
    window.session.plan_document.replace(INT8, "int8")
    _wait(qtbot, window.run_compression())
    assert window.session.result is not None
    window.export()
    dialog = window.export_dialog
    qtbot.addWidget(dialog)
    for name in dialog._registry:
        enabled, tip = combo_item(dialog.format_combo, name)
        if name in ONNX_FORMATS:
            _expect_gate(enabled, tip, model, ONNX_EXPORT)
        elif name in TORCH_FORMATS:
            _expect_gate(enabled, tip, model, TORCH_MODULE)
    # the format chosen by default is one this model can be written in; where the engine still
    # refuses the file name, Export is disabled and says why in one line
    assert dialog.format_name() is None or dialog.format_name() in dialog.offered()
    if not dialog.export_button.isEnabled():
        tip = dialog.export_button.toolTip()
        assert tip and "\n" not in tip and dialog.start_export() is None
        errors.clear()
    dialog.close()
    window.session.plan_document.replace(Plan(), "clean")


def _leave_state_behind(window, model: Model, sensitivity) -> dict:
    """A filter, a selected layer, sensitivity results and a plan naming one of its layers."""
    window.layer_table.filter_edit.setText(model.layers[-1].name[:3])
    window.session.select_layer(model.layers[-1].name)
    window.analysis.state.set_sensitivity(sensitivity)
    name = next(layer.name for layer in model.layers if layer.quantizable)
    plan = {"layers": {name: {"quantization": {"bits": 4, "granularity": "per-channel"}}}}
    window.session.plan_document.replace(plan, "plan for the previous model")
    assert window.session.plan_state.error is None
    return window.session.plan_document.to_dict()


def _check_nothing_leaked(window, model: Model, previous_plan: dict | None, answer: str) -> str:
    """Checks the per-model state was reset; says what happened to the previous plan."""
    assert window.layer_table.filter_edit.text() == ""
    assert window.analysis.state.sensitivity is None
    assert window.session.result is None
    assert window.session.selected_layer == model.layers[0].name
    editor = window.plan_editor
    if previous_plan is None:
        assert editor.mismatch_bar.isHidden()
        return "none"
    try:
        Plan.from_dict(previous_plan).resolve(model.layers)
        fits = True
    except PlanError:
        fits = False
    assert editor.mismatch_bar.isHidden() == fits
    if fits:
        assert window.session.plan_document.to_dict() == previous_plan
        return "kept, it fits"
    assert model.path.name in editor.mismatch_label.text()
    if answer == "keep":
        editor.keep_plan_button.click()
        assert window.session.plan_document.to_dict() == previous_plan
        assert window.session.plan_state.error is not None
        window.new_plan()
    else:
        editor.discard_plan_button.click()
    assert editor.mismatch_bar.isHidden()
    assert window.session.plan_document.to_dict() == Plan().to_dict()
    assert window.session.plan_state.error is None
    return answer


def test_one_window_opens_each_backend_and_offers_exactly_what_it_can(qtbot, window, errors, tmp_path: Path):
    if getattr(window, "analysis", None) is None:
        pytest.skip("the analysis tools (gui.analysis) are not installed")
    files = model_of_each_kind(tmp_path / "models")
    seen: list[str] = []
    asked: list[str] = []
    previous_plan: dict | None = None
    sensitivity = None
    for index, (kind, path) in enumerate(files.items()):
        job = window.open_model(path)
        _wait(qtbot, job)
        model = window.session.model
        assert errors == [], errors
        assert model is not None and model.path == path, kind
        seen.append(model.backend.name)
        asked.append(_check_nothing_leaked(window, model, previous_plan, "keep" if index % 2 else "discard"))
        _check_static_gates(window, model)
        _check_plan_gates(window, model, errors)
        _check_export_formats(qtbot, window, model, errors)
        assert errors == [], errors
        if sensitivity is None:
            sensitivity = sweep(model, None, "datafree")
        previous_plan = _leave_state_behind(window, model, sensitivity)
    assert {"keep", "discard"} <= set(asked), asked  # both answers to a plan that does not fit
    assert len(set(seen)) == len(files)  # one backend each: torch, TorchScript, torch.export, ONNX, weights
