"""One window opens a model of every kind the engine reads, one after another, and stays honest.

For each file, in the same window: every gated action (Run, data, the sensitivity methods, the
plan editor's methods and sections, the export formats) is enabled exactly when the engine says
the loaded model can do it (``Model.can`` / ``Model.why_not``, never a list written here, plus a
few hard facts: weights alone never run); nothing of the previous model is left (filter, rows,
sensitivity, data choice, result; its plan is answered Discard when it does not fit); and a
compression is either an error naming the layer or a result whose report shows every planned
change stored.

The planned-but-unapplied case is real, not faked: an int8 ONNX file (QDQ and QOperator, as
ONNX Runtime's quantizer writes them) keeps each weight as int8 codes with fixed scales, so new
codes planned for it cannot be stored; ``engine.compress.check_planned_changes`` catches that,
and the app must show the error and no result. Every other kind compresses for real, and its
report is checked against the plan layer by layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from PySide6.QtCore import QThreadPool

import factories
from engine.backends.base import GRADIENTS, GRAPH_SURGERY, LOW_RANK, ONNX_EXPORT, RUN, TORCH_MODULE, TRAIN
from engine.compress import compress
from engine.errors import PlanError
from engine.export import export
from engine.formats import LoadOptions, load_model
from engine.model import Model
from engine.plan import Plan
from engine.sensitivity import sweep
from analysis_helpers import combo_item
from factories_gui import write_bare_safetensors
from gui.preview import demo_model_path
from gui.project import DataChoice
from gui.session import CompressionData
from tests.factories_qdq import write_quantized

WAIT_MS = 60_000
INT8 = {"defaults": {"quantization": {"bits": 8}}}
#: Half the weights and int8 codes on every layer that takes them: one plan for every kind.
HALF_INT8 = {"defaults": {"pruning": {"method": "magnitude", "amount": 0.5},
                          "quantization": {"bits": 8}}}
#: Export format families, stated independently of gui.capabilities: what each is made from.
ONNX_FORMATS = ("onnx", "onnx-int8", "onnx-dynamic", "onnx-w4", "onnx-w8")
TORCH_FORMATS = ("state-dict", "torch-module", "torchscript", "pt2")
#: Kinds whose weights are int8 codes with fixed scales: new codes cannot be stored in them.
FIXED_CODES = ("onnx int8 (QDQ)", "onnx int8 (QOperator)")


# -- the files ------------------------------------------------------------------------------
def _slim_bundle(folder: Path) -> Path:
    """The demo compressed to int8 and exported as a .slim bundle (codes + architecture)."""
    demo = load_model(demo_model_path(), LoadOptions())
    compressed, _ = compress(demo, Plan.from_dict(INT8), measure=False)
    destination = folder / "demo_int8.slim"
    export(compressed, demo, destination, measure=False)
    return destination


def _if_onnx(folder: Path) -> Path:
    """An ONNX graph whose weights sit in If branches (as Constant nodes and initializers)."""
    import onnx

    from factories_onnx import if_model

    path = folder / "if_branches.onnx"
    onnx.save(if_model(), str(path))
    return path


def _hf_folder(folder: Path) -> Path:
    from factories_hf import tiny_bert_folder

    return tiny_bert_folder(folder / "tiny_bert")


def files_of_every_kind(folder: Path) -> dict[str, tuple[Path, bool]]:
    """kind -> (file, needs trust), in the order the window opens them. Kinds follow each other
    so that every model differs in its layer names from the one before."""
    folder.mkdir(parents=True, exist_ok=True)
    demo = demo_model_path()
    assert demo is not None, "the demo model is not built"
    makers: dict[str, tuple[Callable[[Path], Path], bool]] = {
        "demo (safetensors, known architecture)": (lambda _f: demo, False),
        "onnx int8 (QDQ)": (lambda f: write_quantized(f, qdq=True), False),
        "torch module (trusted pickle)": (factories.write_pickled_module, True),
        "onnx (Constant nodes)": (factories.write_onnx_constant_weights, False),
        "torchscript": (factories.write_torchscript, False),
        "onnx int8 (QOperator)": (lambda f: write_quantized(f, qdq=False), False),
        "torch.export (static batch)": (factories.write_torch_export, False),
        "onnx (If subgraphs)": (_if_onnx, False),
        "weights only (unknown architecture)": (write_bare_safetensors, False),
        "hugging face folder": (_hf_folder, False),
        "slim bundle": (_slim_bundle, False),
    }
    kinds: dict[str, tuple[Path, bool]] = {}
    for kind, (make, trust) in makers.items():
        if kind == "hugging face folder" and _missing("transformers"):
            continue
        kinds[kind] = (make(folder), trust)
    return kinds


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


# -- the window -----------------------------------------------------------------------------
@pytest.fixture
def trusting_window(qtbot, settings, errors):
    """A main window on the real loader that records every trust question and answers yes."""
    from gui.main_window import MainWindow

    asked: list[Path] = []

    def confirm(_parent: object, path: Path, reason: str) -> bool:
        assert reason and "\n" not in reason
        asked.append(path)
        return True

    win = MainWindow(settings, show_error=lambda _p, message, details: errors.append((message, details)),
                     confirm_trust=confirm)
    win.trust_asked = asked  # type: ignore[attr-defined]
    qtbot.addWidget(win)
    win.resize(1100, 700)
    win.show()
    yield win
    win.close()
    QThreadPool.globalInstance().waitForDone(5000)


def _open(qtbot, window, path: Path, errors: list) -> Model:
    """Open `path` as a user would (a pickle asks for trust first) and wait for it."""
    window.open_model(path)

    def opened() -> bool:
        model = window.session.model
        return bool(errors) or (model is not None and model.path == path and not window.loading)

    qtbot.waitUntil(opened, timeout=WAIT_MS)
    assert errors == [], (path.name, errors)
    return window.session.model


def _wait(qtbot, job) -> None:
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)


# -- 1. enabled actions against the engine's answers -----------------------------------------

def _expect(where: str, enabled: bool, tip: str, model: Model, capability: str) -> None:
    """Enabled exactly when the engine says the model can; otherwise its one line as the tip."""
    assert enabled == model.can(capability), (model.path.name, where, capability)
    if not enabled:
        assert tip == model.why_not(capability) and tip and "\n" not in tip, (where, tip)


def check_actions(window, model: Model, kind: str) -> None:
    from gui.data_dialog import DataDialog

    assert window.summary.capability_badge.text().startswith(model.backend.name)
    assert window.run_action.isEnabled()  # an empty plan: weights compress on every backend
    _expect("data action", window.data_action.isEnabled(), window.data_action.toolTip(), model, RUN)
    analysis = window.analysis
    assert analysis.sensitivity_action.isEnabled()  # data-free sensitivity reads weights only
    assert analysis.state.can_run(DataChoice(spec=None, method="datafree")) == ""
    assert analysis.state.can_run(DataChoice(method="exact")) == (model.why_not(RUN) or "")
    dialog = DataDialog(window, DataChoice(), model.path.name, model)
    for method in ("exact", "fast"):
        button = dialog.method_buttons[method]
        _expect(f"{method} sensitivity", button.isEnabled(), button.toolTip(), model, RUN)
    assert dialog.method_buttons["datafree"].isEnabled()
    assert dialog.method_buttons[dialog.method()].isEnabled()
    _expect("SVD ranks", dialog.ranks_box.isEnabled(), dialog.ranks_box.toolTip(), model, LOW_RANK)
    dialog.deleteLater()
    editor = window.plan_editor
    for form in (editor.defaults_form, editor.layer_form):
        _expect("gradient pruning", *combo_item(form.method_combo, "gradient"), model, GRADIENTS)
        _expect("taylor pruning", *combo_item(form.method_combo, "taylor"), model, GRADIENTS)
        _expect("structured pruning", *combo_item(form.method_combo, "structured"), model, GRAPH_SURGERY)
        assert combo_item(form.method_combo, "magnitude")[0]
    rank_box = editor.defaults_form.rank_box
    _expect("low rank", rank_box.isEnabled(), rank_box.toolTip(), model, LOW_RANK)
    _expect("recovery", editor.recovery_form.isEnabled(), editor.recovery_form.toolTip(), model, TRAIN)
    # hard facts, whatever the backend's tables say
    if kind.startswith("weights only"):
        assert not model.can(RUN) and not window.data_action.isEnabled()
        assert not model.can(TRAIN) and not editor.recovery_form.isEnabled()
    if kind in ("demo (safetensors, known architecture)", "torch module (trusted pickle)"):
        assert all(model.can(c) for c in (RUN, GRADIENTS, TRAIN, TORCH_MODULE))


def check_export_formats(qtbot, window, model: Model, errors: list) -> None:
    """With a result, the export dialog offers each family exactly when the engine can make it."""
    window.export()
    dialog = window.export_dialog
    qtbot.addWidget(dialog)
    for name in dialog._registry:
        enabled, tip = combo_item(dialog.format_combo, name)
        if name in ONNX_FORMATS:
            _expect(f"export {name}", enabled, tip, model, ONNX_EXPORT)
        elif name in TORCH_FORMATS:
            _expect(f"export {name}", enabled, tip, model, TORCH_MODULE)
    assert dialog.format_name() is None or dialog.format_name() in dialog.offered()
    if not dialog.export_button.isEnabled():  # the default file name is refused: one line why
        tip = dialog.export_button.toolTip()
        assert tip and "\n" not in tip and dialog.start_export() is None
        errors.clear()
    dialog.close()


# -- 2. nothing leaked from the previous model -----------------------------------------------
def leave_state_behind(window, model: Model, sensitivity) -> None:
    """A filter, a selected layer, sensitivity results, a data choice and a plan naming a layer
    of this model (the compression result is left by step 3)."""
    last = model.layers[-1].name
    window.layer_table.filter_edit.setText(last)
    window.session.select_layer(last)
    window.analysis.state.set_sensitivity(sensitivity)
    window.analysis.state.choice = DataChoice(spec="synthetic:32", method="exact")
    window.session.set_data(CompressionData(evaluation="synthetic:16"))
    name = next(layer.name for layer in model.layers if layer.quantizable)
    window.session.plan_document.replace(
        {"layers": {name: {"quantization": {"bits": 4, "granularity": "per-channel"}}}}, "previous model's plan")
    assert window.session.plan_state.error is None


def check_nothing_leaked(window, model: Model, previous_plan: dict | None) -> None:
    session, analysis, editor = window.session, window.analysis, window.plan_editor
    assert window.layer_table.filter_edit.text() == ""
    assert window.layer_table.proxy.rowCount() == len(model.layers)
    assert session.selected_layer == model.layers[0].name
    assert analysis.state.sensitivity is None and analysis.state.results_data is None
    assert not analysis.save_sensitivity_action.isEnabled()
    assert analysis.state.choice == DataChoice()
    assert session.data == CompressionData()
    assert session.result is None and window.results.outcome is None
    assert window.results.title.text() == "No compression yet"
    assert session.plan_state.metric is None
    if previous_plan is None:
        assert editor.mismatch_bar.isHidden()
        return
    try:
        Plan.from_dict(previous_plan).resolve(model.layers)
        fits = True
    except PlanError:
        fits = False
    assert editor.mismatch_bar.isHidden() == fits
    if fits:  # kept without asking: it names layers this model has too
        assert session.plan_document.to_dict() == previous_plan
    else:
        assert model.path.name in editor.mismatch_label.text()
        assert not window.run_action.isEnabled()
        editor.discard_plan_button.click()
        assert editor.mismatch_bar.isHidden()
    window.new_plan()
    assert session.plan_document.to_dict() == Plan().to_dict() and session.plan_state.error is None


# -- 3. a planned change that does not happen is an error, never a success -------------------
def check_fixed_codes_refused(qtbot, window, model: Model, errors: list) -> None:
    """New codes planned for an int8 file are refused before any work: an error naming the
    layer, no result (they once ran and failed the planned-change check)."""
    session = window.session
    session.plan_document.replace(INT8, "int8 on an int8 file")
    assert session.plan_state.error is None and window.run_action.isEnabled()
    lines_before = len(window.log.lines)
    _wait(qtbot, window.run_compression())
    qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
    assert len(errors) == 1, errors
    message = errors.pop()[0]
    layers = set(model.layer_names())
    assert "\n" not in message and "already stores it as integer codes" in message, message
    assert any(f"layer '{name}'" in message for name in layers), message
    assert session.result is None and window.results.outcome is None
    assert window.results.title.text() == "No compression yet"
    new_lines = window.log.lines[lines_before:]
    new_levels = window.log.levels[lines_before:]
    assert any(message in line for line, level in zip(new_lines, new_levels) if level == "error")
    assert not any(level == "ok" for level in new_levels), new_lines  # no "compressed …" success
    window.export()  # and nothing to export
    assert errors.pop()[0].startswith("nothing to export yet")


def check_every_planned_change_stored(qtbot, window, model: Model, errors: list) -> None:
    """A plan that can be carried out: the result's report shows each planned layer changed."""
    session = window.session
    session.plan_document.replace(HALF_INT8, "half and int8")
    assert session.plan_state.error is None
    _wait(qtbot, window.run_compression())
    qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
    assert errors == [], errors
    outcome = session.result
    assert outcome is not None and outcome.model is model
    planned = Plan.from_dict(HALF_INT8).resolve(model.layers)
    report = {layer.name: layer for layer in outcome.report.layers}
    changed = 0
    for layer in model.layers:
        layer_plan, stored = planned[layer.name], report[layer.name]
        if layer_plan.keep:
            continue
        changed += 1
        if layer_plan.quantization is not None:
            assert stored.bits == 8, (layer.name, stored.bits)
        if layer_plan.pruning is not None:  # within one element per output row, as the engine checks
            rows = layer.shape[0] if layer.shape else 1
            assert stored.sparsity * layer.params >= 0.5 * layer.params - rows - 1, (layer.name, stored.sparsity)
        assert stored.bytes_after < stored.bytes_before, layer.name
    assert changed > 0
    assert outcome.report.size_ratio < 1.0
    assert window.results.title.text().startswith(f"{model.path.name}: ")


# -- the test ---------------------------------------------------------------------------------
def test_every_kind_opens_in_one_window_and_tells_the_truth(qtbot, trusting_window, errors,
                                                           tmp_path: Path) -> None:
    window = trusting_window
    if getattr(window, "analysis", None) is None:
        pytest.skip("the analysis tools (gui.analysis) are not installed")
    kinds = files_of_every_kind(tmp_path / "models")
    previous_plan: dict | None = None
    sensitivity = None
    seen: dict[str, str] = {}
    refused: list[str] = []
    for kind, (path, trust) in kinds.items():
        asked = len(window.trust_asked)
        model = _open(qtbot, window, path, errors)
        assert errors == [], (kind, errors)
        assert len(window.trust_asked) == asked + trust, kind  # only a pickle asks for trust
        seen[kind] = f"{model.format}/{model.backend.name}"
        check_nothing_leaked(window, model, previous_plan)
        check_actions(window, model, kind)
        if kind in FIXED_CODES:
            check_fixed_codes_refused(qtbot, window, model, errors)
            refused.append(kind)
        else:
            check_every_planned_change_stored(qtbot, window, model, errors)
            check_export_formats(qtbot, window, model, errors)
        assert errors == [], (kind, errors)
        if sensitivity is None:
            sensitivity = sweep(model, None, "datafree")
        leave_state_behind(window, model, sensitivity)
        previous_plan = window.session.plan_document.to_dict()
    assert len(refused) == 2
    backends = {value.split("/")[1] for value in seen.values()}
    assert {"torch", "torchscript", "torch.export", "onnx", "weights only"} <= backends, seen
