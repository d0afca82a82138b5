"""Light and dark looks reach widgets and plots and are remembered; project files round-trip."""

from __future__ import annotations

import json
import shutil

import pyqtgraph as pg
import pytest
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QApplication

from engine.errors import SlimscopeError
from engine.plan import Plan
from gui.project import DataChoice, Project
from gui.theme import DARK, LIGHT, SYSTEM, THEME_KEY, apply_theme, is_dark, saved_theme, set_theme

from analysis_helpers import WAIT_MS, datafree_results, runnable_model, wait_for_job


@pytest.fixture
def restore_theme(qapp):
    yield
    apply_theme(SYSTEM, qapp)


@pytest.mark.parametrize("name", [LIGHT, DARK])
def test_a_look_reaches_palette_style_and_existing_plots(qtbot, restore_theme, settings, name):
    plot = pg.PlotWidget()
    qtbot.addWidget(plot)
    plot.show()
    assert set_theme(name, settings) == name
    app = QApplication.instance()
    assert is_dark(app.palette()) == (name == DARK)
    assert "QToolTip" in app.styleSheet()  # with a style sheet, style().name() is the proxy's ""
    base = app.palette().color(QPalette.ColorRole.Base)
    assert plot.backgroundBrush().color() == base
    axis_text = plot.getPlotItem().getAxis("left").textPen().color()
    assert axis_text == app.palette().color(QPalette.ColorRole.WindowText)
    assert saved_theme(settings) == name


def test_unknown_or_missing_theme_falls_back_to_system(restore_theme, settings):
    assert saved_theme(settings) == SYSTEM
    settings.setValue(THEME_KEY, "neon")
    assert saved_theme(settings) == SYSTEM
    assert apply_theme("neon") == SYSTEM


def test_view_theme_menu_switches_and_remembers(qtbot, window, restore_theme, settings):
    from gui.analysis import install_analysis

    install_analysis(window)
    actions = window.analysis.theme_actions
    assert set(actions) == {SYSTEM, LIGHT, DARK} and actions[SYSTEM].isChecked()
    actions[DARK].trigger()
    assert is_dark(QApplication.instance().palette()) and actions[DARK].isChecked()
    assert settings.value(THEME_KEY) == DARK


# -- projects -------------------------------------------------------------------------------------
@pytest.fixture
def project(tmp_path):
    model = runnable_model(tmp_path)
    plan = Plan.from_dict({"layers": {"fc": {"quantization": {"bits": 4}}}}).to_dict()
    return Project(model.path, DataChoice("synthetic:16", "fast", 8), plan, datafree_results(model),
                   {"mode": "size", "size": "1/8", "drop": 0.5})


def test_project_round_trips_through_json(project, tmp_path):
    path = project.save(tmp_path / "work.slimproj")
    again = Project.load(path)
    assert again.to_dict() == project.to_dict()
    data = json.loads(path.read_text())
    assert data["model"]["relative"] == "tiny.pt"
    assert data["sensitivity"]["method"] == "datafree" and data["plan"] == project.plan


def test_a_moved_project_folder_still_finds_its_model_and_data(project, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    project.data = DataChoice(str(folder), "exact", 0)
    project.save(tmp_path / "work.slimproj")
    moved = shutil.copytree(tmp_path, tmp_path.parent / "moved")
    again = Project.load(moved / "work.slimproj")
    assert again.model_path == (moved / "tiny.pt").resolve()
    assert again.data.spec == str((moved / "data").resolve())


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"plan": {}}', "no version"),
    ('{"version": 99}', "version 99"),
    ('{"version": 1, "plan": {"defaults": {"pruning": {"method": "nope"}}}}', "plan is invalid"),
])
def test_broken_project_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.slimproj"
    path.write_text(content)
    with pytest.raises(SlimscopeError, match=message):
        Project.load(path)


def test_window_saves_and_reopens_a_project(qtbot, window, fake_loader, tmp_path, project):
    from gui.analysis import install_analysis

    install_analysis(window)
    analysis = window.analysis
    model = runnable_model(tmp_path, "proj.pt")
    fake_loader.add(model)
    wait_for_job(qtbot, window.open_model(model.path))
    window.session.plan_document.replace(project.plan)
    analysis.state.set_sensitivity(datafree_results(model))
    analysis.state.choice = DataChoice("synthetic:16", "exact", 0)
    analysis.pareto_panel.set_target_settings({"mode": "drop", "size": "0.2", "drop": 1.5, "check": True})
    path = analysis.write_project(tmp_path / "saved.slimproj")
    assert path is not None and analysis.project_path == path

    window.session.set_model(None)
    window.session.plan_document.replace(Plan())
    assert analysis.state.sensitivity is None
    job = analysis.open_project(path)
    wait_for_job(qtbot, job)
    qtbot.waitUntil(lambda: analysis.state.sensitivity is not None, timeout=WAIT_MS)
    assert window.session.model is model
    assert window.session.plan_document.to_dict() == project.plan
    assert analysis.state.choice == DataChoice("synthetic:16", "exact", 0)
    assert analysis.pareto_panel.target_settings() == {"mode": "drop", "size": "0.2", "drop": 1.5, "check": True}
    assert analysis.state.sensitivity.to_dict() == datafree_results(model).to_dict() | {
        "seconds": analysis.state.sensitivity.seconds}


def test_a_project_whose_model_is_gone_is_refused(qtbot, window, errors, project, tmp_path):
    from gui.analysis import install_analysis

    install_analysis(window)
    path = project.save(tmp_path / "work.slimproj")
    project.model_path.unlink()
    assert window.analysis.open_project(path) is None
    assert errors and "missing" in errors[0][0]
