"""Sensitivity runs on the real worker, draws heat maps and curves, and the target fills the plan."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from PySide6.QtCore import QPointF
from PySide6.QtWidgets import QDialog

from engine.allocate import allocate, predict_plan
from engine.errors import SlimscopeError
from engine.jobs import NEVER_CANCELLED, no_progress
from engine.plan import Plan
from engine.sensitivity import Sensitivity, SweepSettings, sweep_module
from gui.analysis import AnalysisState, sensitivity_job
from gui.data_dialog import ARRAYS, FOLDER, SYNTHETIC, DataDialog
from gui.panels.pareto import ParetoPanel, percent_ticks
from gui.panels.sensitivity import ColorScale, SensitivityPanel, drops_matrix
from gui.plan_document import PlanDocument
from gui.project import DataChoice
from gui.session import Session

from analysis_helpers import WAIT_MS, datafree_results, runnable_model, wait_for_job


@pytest.fixture
def model(tmp_path):
    return runnable_model(tmp_path)


@pytest.fixture
def state(qtbot, model):
    session = Session()
    session.set_model(model, sweep=False)
    analysis = AnalysisState(session)
    yield analysis
    analysis.shutdown()
    session.shutdown()


@pytest.fixture
def panel(qtbot, state):
    widget = SensitivityPanel(state)
    qtbot.addWidget(widget)
    widget.resize(900, 560)
    widget.show()
    return widget


def test_a_run_on_the_worker_fills_heat_maps_curves_and_log(qtbot, state, panel):
    job = state.run(DataChoice(spec="synthetic:24", method="exact", limit=16))
    assert panel.progress_bar.isVisible() and panel.cancel_button.isEnabled()
    wait_for_job(qtbot, job)
    result = state.sensitivity
    assert isinstance(result, Sensitivity) and result.method == "exact" and result.samples == 16
    assert [layer.name for layer in result.layers] == ["conv", "fc"]
    assert not panel.progress_bar.isVisible() and not panel.cancel_button.isEnabled()
    for axis in ("sparsity", "bits"):
        names, levels, drops = drops_matrix(result, axis)
        image = panel.images[axis].image
        assert image.shape == (len(names), len(levels)) == drops.shape
        np.testing.assert_allclose(image, panel.scale.values(drops))
    log = panel.log_view.toPlainText()
    assert "Started exact sensitivity" in log and "Done in" in log
    assert panel.curve_layers, "the most sensitive layer's curves show at once"
    assert "exact" in panel.summary_label.text() and "agreement" in panel.summary_label.text()


def test_hover_tells_exact_numbers_and_click_selects_and_pins(qtbot, state, panel, model):
    state.set_sensitivity(datafree_results(model))
    qtbot.waitUntil(lambda: panel.stack.currentIndex() == 1, timeout=WAIT_MS)
    plot = panel.heat_plots["bits"]
    levels = panel._levels["bits"]
    column = levels.index(4)
    scene = plot.vb.mapViewToScene(QPointF(column + 0.5, 1.5))  # row 1: fc
    assert panel.cell_at(scene) == ("bits", 1, column)
    curve = state.sensitivity.layer("fc").curves["bits"]
    text = panel.cell_text("bits", 1, column)
    nsr = curve.metric[curve.levels.index(4)]
    assert "fc" in text and "4 bits" in text and f"{nsr:.4g}" in text and "dB SQNR" in text

    panel._on_mouse_moved(scene)
    assert "fc" in panel.hover_label.text()
    panel.toggle_pin("conv")
    panel.session.select_layer("fc")
    assert panel.curve_layers[-1] == "fc" and "conv" in panel.curve_layers
    x, y = panel.curve_data("bits", "fc")
    item = panel.curves["bits"][panel.curve_layers.index("fc")]
    shown_x, shown_y = item.xData, item.yData  # as given; getData() is log-transformed here
    np.testing.assert_allclose(shown_x, x)
    np.testing.assert_allclose(shown_y, y, equal_nan=True)
    assert panel.row_marks["bits"].getRegion() == (1, 2)


def test_the_rank_column_shows_only_for_results_with_ranks(qtbot, state, panel, model):
    state.set_sensitivity(datafree_results(model))
    assert not panel.heat_plots["rank"].isVisible() and not panel.curve_plots["rank"].isVisible()
    ranked = sweep_module(model.module, None, "datafree", SweepSettings(ranks=(0.5, 0.25)))
    state.set_sensitivity(ranked)
    assert panel.heat_plots["rank"].isVisible() and panel.curve_plots["rank"].isVisible()
    names, levels, drops = drops_matrix(ranked, "rank")
    assert panel.images["rank"].image.shape == drops.shape == (2, 3)
    scene = panel.heat_plots["rank"].vb.mapViewToScene(QPointF(1.5, 1.5))  # fc at 50 % rank
    assert panel.cell_at(scene) == ("rank", 1, 1)
    assert "fc" in panel.cell_text("rank", 1, 1) and "50 % rank" in panel.cell_text("rank", 1, 1)
    state.set_sensitivity(datafree_results(model))
    assert not panel.heat_plots["rank"].isVisible()


def test_items_are_built_once_and_cleared_with_the_model(qtbot, state, panel, model, tmp_path):
    images = dict(panel.images)
    state.set_sensitivity(datafree_results(model))
    state.set_sensitivity(datafree_results(model))
    assert panel.images == images and all(len(items) == 6 for items in panel.curves.values())
    state.session.set_model(runnable_model(tmp_path, "other.pt"), sweep=False)
    assert state.sensitivity is None and panel.stack.currentIndex() == 0


def test_cancel_keeps_the_previous_results(qtbot, state, panel, model, monkeypatch):
    def sweep_until_cancelled(*_args, progress, cancel, **_kwargs):  # a sweep that never ends by itself
        progress(0.5, "halfway")
        while not cancel.cancelled:
            time.sleep(0.01)
        cancel.check()

    monkeypatch.setattr("engine.sensitivity.sweep", sweep_until_cancelled)
    previous = datafree_results(model)
    state.set_sensitivity(previous)
    job = state.run(DataChoice(spec="synthetic:8", method="exact", limit=0))
    qtbot.waitUntil(lambda: panel.progress_bar.value() == 500, timeout=WAIT_MS)
    assert "halfway" in panel.progress_label.text()
    state.cancel()
    wait_for_job(qtbot, job)
    assert state.sensitivity is previous and not state.running
    assert "Cancel" in panel.log_view.toPlainText()


def test_bad_data_fails_as_one_line(qtbot, state, panel, tmp_path):
    failures = []
    state.failed.connect(lambda message, details: failures.append(message))
    job = state.run(DataChoice(spec=str(tmp_path / "nothing.npz"), method="fast"))
    wait_for_job(qtbot, job)
    assert len(failures) == 1 and "nothing.npz" in failures[0] and "\n" not in failures[0]
    assert "Failed" in panel.log_view.toPlainText()


def test_results_round_trip_as_engine_json_and_must_fit_the_model(qtbot, state, model, tmp_path):
    state.set_sensitivity(datafree_results(model))
    path = state.save_sensitivity(tmp_path / "sens.json")
    loaded = Sensitivity.load(path)
    assert loaded.to_dict() == state.sensitivity.to_dict()
    state.set_sensitivity(None)
    state.load_sensitivity(path)
    assert state.sensitivity.to_dict() == loaded.to_dict()
    loaded.layers[0].name = "not.a.layer"
    loaded.save(tmp_path / "other.json")
    with pytest.raises(SlimscopeError, match="another model"):
        state.load_sensitivity(tmp_path / "other.json")


def test_weights_only_models_cannot_run(qtbot, make_model):
    session = Session()
    session.set_model(make_model(), sweep=False)
    state = AnalysisState(session)
    assert "weights only" in state.can_run(DataChoice())
    with pytest.raises(SlimscopeError):
        state.run(DataChoice())


def test_color_scale_is_logarithmic_with_readable_ticks(model):
    result = datafree_results(model)
    scale = ColorScale.for_drops(result, [drops_matrix(result, "bits")[2]])
    assert scale.high - scale.low == pytest.approx(4)
    values = scale.values(np.array([0.0, 10.0 ** scale.high, np.nan]))
    assert values[0] == pytest.approx(scale.low) and values[1] == pytest.approx(scale.high)
    assert math.isnan(values[2])
    assert all(label and "e" in label or float(label) > 0 for _, label in scale.ticks())


# -- the data dialog ----------------------------------------------------------------------------------
def test_data_dialog_builds_specs_and_checks_paths(qtbot, tmp_path):
    dialog = DataDialog(None, DataChoice(spec="synthetic:32", method="fast", limit=100))
    qtbot.addWidget(dialog)
    assert dialog.choice() == DataChoice(spec="synthetic:32", method="fast", limit=100)
    dialog.source_buttons[FOLDER].setChecked(True)
    assert not dialog.run_button.isEnabled() and "folder" in dialog.problem_label.text()
    dialog.folder_edit.setText(str(tmp_path))
    assert dialog.run_button.isEnabled() and dialog.spec() == str(tmp_path)
    dialog.source_buttons[ARRAYS].setChecked(True)
    dialog.arrays_edit.setText(str(tmp_path / "missing.npz"))
    assert not dialog.run_button.isEnabled()
    dialog.method_buttons["datafree"].setChecked(True)
    assert dialog.run_button.isEnabled() and dialog.spec() is None and not dialog.data_box.isEnabled()
    dialog.method_buttons["exact"].setChecked(True)
    dialog.source_buttons[SYNTHETIC].setChecked(True)
    dialog.synthetic_count.setValue(7)
    dialog.limit_spin.setValue(0)
    assert dialog.choice() == DataChoice(spec="synthetic:7", method="exact", limit=0)
    dialog.ranks_box.setChecked(True)
    assert dialog.choice().ranks and DataChoice.from_dict(dialog.choice().to_dict()).ranks
    assert dialog.limit_spin.text() == "all"


# -- target and Pareto ----------------------------------------------------------------------------------
@pytest.fixture
def pareto(qtbot, state, model):
    document = PlanDocument()
    widget = ParetoPanel(state, document)
    qtbot.addWidget(widget)
    widget.resize(800, 480)
    widget.show()
    state.set_sensitivity(datafree_results(model))
    qtbot.waitUntil(lambda: bool(widget.front), timeout=WAIT_MS)
    return widget


def test_allocation_replaces_the_plan_as_one_undo_step(qtbot, pareto):
    document = pareto.document
    predictions = []
    pareto.prediction_changed.connect(predictions.append)
    document.set_defaults({"quantization": {"bits": 4}})
    assert predictions[-1].ratio < 0.2  # 4-bit codes: about an eighth of float32, plus scales
    steps = document.undo_stack.count()
    pareto.size_edit.setText("0.3")
    job = pareto.allocate()
    wait_for_job(qtbot, job)
    assert document.undo_stack.count() == steps + 1
    expected = allocate(pareto.sensitivity, target_ratio=0.3)
    assert document.to_dict() == expected.plan.to_dict()
    assert pareto.prediction is not None and pareto.prediction.ratio <= 0.3 + 1e-9
    star_x = pareto.plan_point.xData
    assert star_x[0] == pytest.approx(pareto.prediction.ratio * 100)
    document.undo_stack.undo()
    assert document.to_dict()["defaults"]["quantization"]["bits"] == 4
    assert pareto.plan_point.xData[0] != pytest.approx(star_x[0])


def test_checked_allocation_measures_on_the_sensitivity_data(qtbot, pareto, state, model):
    assert not pareto.check_box.isEnabled()  # data-free results: nothing to measure
    assert "cannot measure" in pareto.check_box.toolTip()
    choice = DataChoice(spec="synthetic:48", method="exact", limit=0, ranks=True)
    state.set_sensitivity(sensitivity_job(model, choice)(no_progress, NEVER_CANCELLED), choice)
    assert all("rank" in layer.curves for layer in state.sensitivity.layers)
    assert pareto.check_box.isEnabled() and "synthetic:48" in pareto.check_box.toolTip()
    pareto.check_box.setChecked(True)
    pareto.mode_combo.setCurrentIndex(pareto.mode_combo.findData("drop"))
    pareto.drop_spin.setValue(2.0)  # agreement points
    job = pareto.allocate()
    wait_for_job(qtbot, job)
    text = pareto.allocation_label.text()
    assert "Measured on synthetic" in text, text
    measured_y = pareto.measured_point.yData
    assert measured_y is not None and measured_y[0] >= 100 - 2.0 - 1e-9
    assert pareto.document.to_dict() == pareto.last_allocation.plan.to_dict()
    assert pareto.target_settings()["check"] is True

    state.set_sensitivity(state.sensitivity)  # the same results, data unknown (as from a file)
    assert not pareto.check_box.isEnabled()
    assert "run in this session" in pareto.check_box.toolTip()


def test_a_bad_target_says_why_and_changes_nothing(qtbot, pareto):
    pareto.size_edit.setText("a lot")
    assert pareto.allocate() is None
    assert "not a size" in pareto.allocation_label.text()
    assert pareto.document.undo_stack.count() == 0


def test_plan_prediction_lands_on_the_front(qtbot, pareto, model):
    result = pareto.sensitivity
    allocation = allocate(result, target_ratio=0.4, secondary=False)
    prediction = predict_plan(result, allocation.plan, model.layers)
    assert prediction.bytes == allocation.bytes and prediction.drop == pytest.approx(allocation.drop)
    assert prediction.approximate == []
    uncompressed = predict_plan(result, Plan(), model.layers)
    assert uncompressed.ratio == pytest.approx(1.0, abs=0.01) and uncompressed.drop == 0
    fp16 = Plan.from_dict({"defaults": {"quantization": {"bits": "fp16"}}})
    assert predict_plan(result, fp16, model.layers).approximate == ["conv", "fc"]
    pareto.document.replace(fp16)
    assert "approximate" in pareto.plan_label.text()


def test_percent_ticks_read_as_percentages():
    labels = [label for _, label in percent_ticks(math.log10(3), 2)]
    assert labels[-1] == "100 %" and "10 %" in labels and len(labels) >= 5


def test_install_adds_menus_docks_and_runs_from_f5(qtbot, window, tmp_path, monkeypatch):
    from gui.analysis import install_analysis

    install_analysis(window)
    analysis = window.analysis
    titles = [a.text().replace("&", "") for a in window.menuBar().actions()]
    assert "Analyse" in titles and titles.index("Analyse") < titles.index("Help")
    assert analysis.sensitivity_action.shortcut().toString() == "F5"
    assert not analysis.sensitivity_action.isEnabled()
    model = runnable_model(tmp_path)
    window.fake_loader.add(model)
    wait_for_job(qtbot, window.open_model(model.path))
    assert analysis.sensitivity_action.isEnabled()
    monkeypatch.setattr("gui.data_dialog.ask_data_choice",
                        lambda *_args: DataChoice(spec=None, method="datafree"))
    analysis.sensitivity_action.trigger()
    qtbot.waitUntil(lambda: analysis.state.sensitivity is not None, timeout=WAIT_MS)
    assert analysis.sensitivity_dock.isVisible()
    assert analysis.plan_document is window.session.plan_document
    monkeypatch.setattr("gui.data_dialog.ask_data_choice", lambda *_args: None)
    assert analysis.ask_and_run() is None


def test_dialog_cancel_runs_nothing(qtbot, monkeypatch, tmp_path):
    from gui.data_dialog import ask_data_choice

    monkeypatch.setattr(DataDialog, "exec", lambda self: QDialog.DialogCode.Rejected)
    assert ask_data_choice(None) is None


@pytest.mark.parametrize("module", ["gui.panels.sensitivity", "gui.panels.pareto"])
def test_panel_runs_alone(qapp, tmp_path, module):
    import importlib

    from engine.demo import DEMO_MODEL

    out = tmp_path / "panel.png"
    main = importlib.import_module(module)._main
    assert main([str(DEMO_MODEL), "--method", "datafree", "--screenshot", str(out)]) == 0
    assert out.stat().st_size > 5000
