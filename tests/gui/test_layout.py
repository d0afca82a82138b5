"""The layout holds at 1280×800: measured rows, widths, scroll positions, ranges and colours.

Each test checks a number a person would see: how many table rows fit, whether a combo box's
longest item fits its field, where a log's scroll bar is, how much of the y axis a 0.2-point dip
takes, whether two plot labels overlap, and what colours the dark look gives.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from PySide6.QtCore import QThreadPool
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QCheckBox, QComboBox, QStyle, QStyleOptionComboBox

from engine.demo import DEMO_MODEL
from engine.sensitivity import Curve, Sensitivity
from gui.analysis import AnalysisState
from gui.icons import arrow_icon
from gui.panels.layer_table import MIN_VISIBLE_ROWS
from gui.panels.log_panel import LogPanel
from gui.panels.pareto import ParetoPanel
from gui.panels.sensitivity import MIN_SPAN_DECADES, MIN_SPAN_POINTS, SensitivityPanel, curve_y_range, log_ticks
from gui.plan_document import PlanDocument
from gui.project import DataChoice
from gui.session import Session
from gui.theme import BAD, DARK, GOOD, LIGHT, NEUTRAL, SYSTEM, apply_theme, change_meaning, is_dark, status_color

from analysis_helpers import WAIT_MS, datafree_results, runnable_model, wait_for_job

SMALL_SCREEN = (1280, 800)


@pytest.fixture
def restore_theme(qapp):
    yield
    apply_theme(SYSTEM, qapp)


@pytest.fixture
def demo_window(qtbot, settings, errors):
    """The real main window at 1280×800 with the bundled demo open."""
    from gui.main_window import MainWindow

    window = MainWindow(settings, show_error=lambda _parent, message, details: errors.append((message, details)))
    qtbot.addWidget(window)
    window.resize(*SMALL_SCREEN)
    window.show()
    job = window.open_model(DEMO_MODEL)
    wait_for_job(qtbot, job)
    assert window.session.model is not None, errors
    yield window
    window.close()
    QThreadPool.globalInstance().waitForDone(5000)


def open_sensitivity(qtbot, window) -> None:
    """Measure (data-free: milliseconds on the demo) through the real worker; the dock opens."""
    analysis = window.analysis
    job = analysis.run(DataChoice(spec=None, method="datafree"))
    wait_for_job(qtbot, job)
    assert analysis.state.sensitivity is not None
    qtbot.wait(600)  # the dock's first fit waits for the panels above to re-arrange


# -- the window at 1280×800 ---------------------------------------------------------------------------
def test_the_layer_table_keeps_eight_rows_when_the_sensitivity_dock_opens(qtbot, demo_window):
    table = demo_window.layer_table
    open_sensitivity(qtbot, demo_window)
    dock = demo_window.analysis.sensitivity_dock
    assert dock.isVisible() and not dock.isFloating()
    assert table.visible_rows() >= MIN_VISIBLE_ROWS, f"{table.visible_rows():.1f} rows show"
    assert (demo_window.width(), demo_window.height()) == SMALL_SCREEN, "the window grew past the screen"
    # the dock was given the room the central area does not need, not left at its minimum
    assert dock.height() > dock.minimumSizeHint().height()


@pytest.mark.parametrize("show", ["show_sensitivity", "show_pareto", "show_graph"])
def test_every_analysis_dock_fits_a_1280x800_window(qtbot, demo_window, show):
    open_sensitivity(qtbot, demo_window)
    getattr(demo_window.analysis, show)()
    qtbot.wait(400)
    hint = demo_window.minimumSizeHint()
    assert hint.width() <= SMALL_SCREEN[0] and hint.height() <= SMALL_SCREEN[1], hint
    assert demo_window.layer_table.visible_rows() >= MIN_VISIBLE_ROWS


def test_plan_editor_combo_boxes_show_their_longest_item_whole(qtbot, demo_window):
    editor = demo_window.plan_editor
    checked = 0
    for index in range(editor.tabs.count()):
        editor.tabs.setCurrentIndex(index)
        qtbot.wait(50)
        for combo in editor.tabs.currentWidget().findChildren(QComboBox):
            if not combo.isVisible() or combo.count() == 0:
                continue
            metrics = combo.fontMetrics()
            longest = max(range(combo.count()), key=lambda i: metrics.horizontalAdvance(combo.itemText(i)))
            option = QStyleOptionComboBox()
            combo.initStyleOption(option)
            field = combo.style().subControlRect(QStyle.ComplexControl.CC_ComboBox, option,
                                                  QStyle.SubControl.SC_ComboBoxEditField, combo)
            text = combo.itemText(longest)
            assert field.width() >= metrics.horizontalAdvance(text), f"{text!r} is cut in a {field.width()} px field"
            checked += 1
        for box in editor.tabs.currentWidget().findChildren(QCheckBox):
            if box.isVisible():
                assert box.width() >= box.sizeHint().width(), f"{box.text()!r} is cut"
    assert checked >= 6, "the method, bits, granularity, range and rank combos were measured"


# -- logs follow their tail ----------------------------------------------------------------------------
def test_the_sensitivity_log_follows_its_newest_line(qtbot, tmp_path):
    session = Session()
    state = AnalysisState(session)
    panel = SensitivityPanel(state)
    qtbot.addWidget(panel)
    panel.resize(700, 400)
    panel.show()
    for i in range(60):
        state.log_line.emit(f"line {i}")
    bar = panel.log_view.verticalScrollBar()
    assert bar.maximum() > 0
    bar.setValue(0)  # the user scrolled up; the next line brings the view back to the end
    state.log_line.emit("the newest line")
    assert bar.value() == bar.maximum()
    state.shutdown()
    session.shutdown()


def test_the_window_log_follows_its_newest_line_even_while_hidden(qtbot):
    panel = LogPanel()
    qtbot.addWidget(panel)
    panel.resize(500, 120)
    for i in range(40):
        panel.add(f"line {i}")
    panel.show()
    bar = panel.view.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0, timeout=WAIT_MS)
    bar.setValue(0)
    panel.add("done", "ok")
    assert bar.value() == bar.maximum()


# -- curves keep small changes small -------------------------------------------------------------------
def with_curves(result: Sensitivity, metric: str, higher_is_better: bool, baseline: float,
                values: list[float]) -> Sensitivity:
    """`result` re-labelled as `metric`, every layer's every curve holding `values` (baseline first)."""
    layers = []
    for layer in result.layers:
        curves = {}
        for axis, curve in layer.curves.items():
            count = len(curve.levels)
            metric_values = (values * count)[:count]
            curves[axis] = Curve(curve.levels, metric_values, [v - baseline for v in metric_values],
                                 curve.bytes, curve.nonzero, curve.status)
        layers.append(dataclasses.replace(layer, curves=curves))
    return dataclasses.replace(result, metric=metric, higher_is_better=higher_is_better, baseline=baseline,
                               layers=layers)


@pytest.fixture
def analysis_state(qtbot, tmp_path):
    model = runnable_model(tmp_path)
    session = Session()
    session.set_model(model, sweep=False)
    state = AnalysisState(session)
    yield state, model
    state.shutdown()
    session.shutdown()


def test_a_dip_of_a_fifth_of_a_point_is_not_drawn_as_a_cliff(qtbot, analysis_state):
    state, model = analysis_state
    panel = SensitivityPanel(state)
    qtbot.addWidget(panel)
    panel.resize(900, 560)
    panel.show()
    state.set_sensitivity(with_curves(datafree_results(model), "accuracy", True, 0.99, [0.99, 0.99, 0.988]))
    low, high = panel.shown_y_range()
    assert high - low >= MIN_SPAN_POINTS, f"the y axis spans {high - low:.2f} points"
    assert low <= 98.8 <= 99.0 <= high
    dip = (99.0 - 98.8) / (high - low)
    assert dip <= 0.05, f"a 0.2-point dip takes {dip:.0%} of the plot's height"


def test_an_estimated_loss_curve_has_numbers_and_stays_inside_its_plot(qtbot, analysis_state):
    state, model = analysis_state
    panel = SensitivityPanel(state)
    qtbot.addWidget(panel)
    panel.resize(900, 560)
    panel.show()
    values = [0.0113, 0.0115, 0.02, 0.3, 1.1]  # the fast estimate's loss: baseline 0.0113
    state.set_sensitivity(with_curves(datafree_results(model), "loss", False, 0.0113, values))
    low, high = panel.shown_y_range()
    assert all(low <= math.log10(v) <= high for v in values), "a point lies outside the plot"
    ticks = log_ticks(low, high)
    assert len(ticks) >= 3 and all(label for _pos, label in ticks)


@pytest.mark.parametrize(("values", "log", "points", "least"), [
    ([99.0, 98.8], False, True, MIN_SPAN_POINTS),
    ([0.0113, 0.0120], True, False, MIN_SPAN_DECADES),
])
def test_curve_ranges_have_a_least_span_and_grow_towards_worse(values, log, points, least):
    low, high = curve_y_range(values, log=log, points=points)
    assert high - low >= least
    best = math.log10(min(values)) if log else max(values)
    # the good end stays near its edge (top for accuracy, bottom for a loss on a log axis)
    edge = low if log else high
    assert abs(edge - best) <= 0.1 * (high - low)
    assert log_ticks(0.0, 0.5), "ticks inside a single decade"


# -- Pareto labels -------------------------------------------------------------------------------------
def test_pareto_labels_do_not_overlap_and_stay_inside_the_plot(qtbot, analysis_state):
    state, model = analysis_state
    panel = ParetoPanel(state, PlanDocument(state))
    qtbot.addWidget(panel)
    panel.resize(700, 360)
    panel.show()
    state.set_sensitivity(datafree_results(model))
    qtbot.waitUntil(lambda: bool(panel.front), timeout=WAIT_MS)
    qtbot.wait(100)
    plan = panel.plan_text.sceneBoundingRect()
    original = panel.original_text.sceneBoundingRect()
    assert panel.plan_text.toPlainText() == "current plan" and panel.prediction.ratio > 0.95  # the empty plan: where the uncompressed model is
    assert not plan.intersects(original), "the plan is the uncompressed model: its label overprinted"
    view = panel.plot.vb.sceneBoundingRect()
    for label in (plan, original):
        assert view.contains(label), f"a label {label} leaves the plot {view}"


# -- the dark look reaches everything -------------------------------------------------------------------
def lightest_pixel(icon) -> int:  # type: ignore[no-untyped-def]
    image = icon.pixmap(24, 24).toImage()
    return max(QColor(image.pixel(x, y)).lightness() for x in range(image.width()) for y in range(image.height())
               if QColor.fromRgba(image.pixel(x, y)).alpha() > 128)


def test_undo_and_redo_arrows_are_drawn_in_the_looks_text_colour(qtbot, demo_window, restore_theme):
    apply_theme(DARK)
    window_colour = demo_window.palette().color(QPalette.ColorRole.Window).lightness()
    for action in (demo_window.undo_action, demo_window.redo_action):
        assert lightest_pixel(action.icon()) - window_colour > 100, "the arrow is lost on a dark toolbar"
    apply_theme(LIGHT)
    assert lightest_pixel(demo_window.undo_action.icon()) < 100
    assert lightest_pixel(arrow_icon("forward", QColor("white"))) > 200


def test_the_dark_look_reaches_the_graph_panel_badges_and_log(qtbot, demo_window, restore_theme):
    from gui.theme import STATUS_COLORS

    demo_window.analysis.show_graph()
    apply_theme(DARK)
    qtbot.wait(50)
    graph = demo_window.analysis.graph_view
    if not graph.embedded:  # the placeholder panel sits on the dark base colour
        assert graph.stack.autoFillBackground()
        assert is_dark(graph.stack.palette())
        assert graph.stack.palette().color(graph.stack.backgroundRole()).lightness() < 80
    badge = demo_window.summary.capability_badge.styleSheet()
    assert "#dcedc8" not in badge, "the light green badge stayed in the dark look"
    demo_window.log.add("compressed", "ok")
    assert STATUS_COLORS[DARK][GOOD] in demo_window.log.view.document().toHtml().lower()


def test_a_loss_of_accuracy_is_never_coloured_as_good_news():
    assert change_meaning(-0.3) != GOOD  # points of accuracy lost
    assert change_meaning(-0.3, tolerance=0.5) == NEUTRAL
    assert change_meaning(-2.0, tolerance=0.5) == BAD
    assert change_meaning(+0.1) == GOOD
    assert change_meaning(+0.1, higher_is_better=False) == BAD
    light, dark = QPalette(QColor("#f3f4f6")), QPalette(QColor("#2b2d31"))
    for meaning in (GOOD, BAD):  # readable on each look's base colour
        assert QColor(status_color(meaning, dark)).lightness() > 120
        assert QColor(status_color(meaning, light)).lightness() < 120
    assert np.isfinite(QApplication.instance().palette().color(QPalette.ColorRole.Base).lightness())
