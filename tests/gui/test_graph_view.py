"""The graph view: Netron served on 127.0.0.1, embedded when QtWebEngine is there, else a browser button."""

from __future__ import annotations

import shutil
import urllib.request

import netron
import pytest
from PySide6.QtCore import QUrl

from engine.demo import DEMO_MODEL, DEMO_ONNX
from engine.formats import load_model
from gui.panels.graph_view import GraphView, graph_file, webengine_available
from gui.session import Session

import factories
from analysis_helpers import WAIT_MS


@pytest.fixture
def session(qtbot):
    value = Session()
    yield value
    value.shutdown()


@pytest.fixture
def onnx_model(tmp_path):
    return load_model(factories.write_onnx(tmp_path))


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # 127.0.0.1 only: our own server
        return response.read().decode("utf-8", "replace")


def test_fallback_opens_netron_in_the_browser_and_stops_with_the_model(qtbot, session, onnx_model, tmp_path):
    opened: list[QUrl] = []
    view = GraphView(session, embed=False, open_url=lambda url: opened.append(url) or True)
    qtbot.addWidget(view)
    assert not view.browser_button.isEnabled()
    session.set_model(onnx_model, sweep=False)
    view.show()
    assert "QtWebEngine" in view.message.text() and "pip install" in view.message.text()
    assert view.server.address is None, "no server until the user asks for the graph"
    view.browser_button.click()
    assert len(opened) == 1 and opened[0].host() == "127.0.0.1"
    address = view.server.address
    assert netron.status(address)
    page = fetch(opened[0].toString())
    assert "netron" in page.lower() and f"/data/{onnx_model.path.name}" in page
    assert fetch(opened[0].toString() + f"data/{onnx_model.path.name}") != ""

    session.set_model(load_model(factories.write_onnx(tmp_path, "second.onnx")), sweep=False)
    qtbot.waitUntil(lambda: not netron.status(address), timeout=WAIT_MS)  # the old model's server stops
    view.open_in_browser()
    second = view.server.address
    view.shutdown()
    qtbot.waitUntil(lambda: not netron.status(second), timeout=WAIT_MS)


@pytest.mark.parametrize("browser_opens", [True, False])
def test_the_browser_fallback_shows_the_address_and_logs_what_it_did(qtbot, session, onnx_model, browser_opens):
    lines: list[tuple[str, str]] = []
    view = GraphView(session, embed=False, open_url=lambda _url: browser_opens)
    view.log_line.connect(lambda line, level: lines.append((line, level)))
    qtbot.addWidget(view)
    session.set_model(onnx_model, sweep=False)
    view.show()
    assert not view.url_label.isVisible()
    view.browser_button.click()
    url = view.server.url
    assert url.startswith("http://127.0.0.1:")
    assert view.url_label.isVisible() and url in view.url_label.text()
    assert url in view.message.text(), "the panel says where the graph is"
    assert len(lines) == 1 and url in lines[0][0] and onnx_model.path.name in lines[0][0]
    if browser_opens:
        assert lines[0][1] == "info" and "opened" in lines[0][0]
    else:
        assert lines[0][1] == "warning" and "yourself" in lines[0][0] and "yourself" in view.message.text()
    session.set_model(None)
    assert not view.url_label.isVisible(), "the old model's address is gone with it"
    view.shutdown()


def test_the_window_logs_the_graph_panels_lines(qtbot, window, make_model):
    graph = window.analysis.graph_view
    graph.log_line.emit("graph: opened http://127.0.0.1:1/ in the system browser", "info")
    assert window.log.lines[-1].endswith("graph: opened http://127.0.0.1:1/ in the system browser")


def test_the_placeholder_panel_follows_the_look(qtbot, session, onnx_model):
    from PySide6.QtWidgets import QApplication

    from gui.theme import DARK, SYSTEM, apply_theme

    view = GraphView(session, embed=False)
    qtbot.addWidget(view)
    session.set_model(onnx_model, sweep=False)
    view.show()
    try:
        apply_theme(DARK)
        base = QApplication.instance().palette().color(view.stack.backgroundRole())
        assert view.stack.autoFillBackground() and base.lightness() < 80
        assert view.stack.palette().color(view.stack.backgroundRole()) == base
    finally:
        apply_theme(SYSTEM)


def test_weights_only_files_are_drawn_from_their_onnx_twin(tmp_path):
    weights = tmp_path / "net.safetensors"
    shutil.copy(DEMO_MODEL, weights)

    class Stub:
        path = weights

    assert graph_file(Stub()) == weights  # type: ignore[arg-type]
    shutil.copy(DEMO_ONNX, tmp_path / "net.onnx")
    assert graph_file(Stub()) == tmp_path / "net.onnx"  # type: ignore[arg-type]


@pytest.mark.skipif(not webengine_available(), reason="QtWebEngine (pip install pyside6-webengine) is not installed")
def test_embedded_netron_selects_the_layer_chosen_elsewhere(qtbot, session):
    view = GraphView(session)
    qtbot.addWidget(view)
    view.resize(800, 600)
    session.set_model(load_model(DEMO_MODEL), sweep=False)
    answers: list[tuple[str, str]] = []
    view.node_selected.connect(lambda name, answer: answers.append((name, answer)))
    session.select_layer("features.7")
    view.show()
    assert view.embedded and view.web is not None
    assert view.server.path == DEMO_ONNX
    qtbot.waitUntil(lambda: bool(answers), timeout=WAIT_MS)
    assert answers == [("features.7", "selected")]
    session.select_layer("classifier.4")
    qtbot.waitUntil(lambda: len(answers) == 2, timeout=WAIT_MS)
    assert answers[-1] == ("classifier.4", "selected")
    address = view.server.address
    view.close()
    assert view.web is None
    qtbot.waitUntil(lambda: not netron.status(address), timeout=WAIT_MS)


@pytest.mark.skipif(not webengine_available(), reason="QtWebEngine (pip install pyside6-webengine) is not installed")
def test_embedded_netron_follows_a_theme_switched_while_it_shows(qtbot, session):
    from gui.theme import DARK, LIGHT, SYSTEM, apply_theme

    view = GraphView(session)
    qtbot.addWidget(view)
    view.resize(800, 600)
    session.set_model(load_model(DEMO_MODEL), sweep=False)
    view.show()
    qtbot.waitUntil(lambda: view.page_ready, timeout=WAIT_MS)
    answers: list[object] = []

    def scheme() -> str:
        answers.clear()
        view.web.page().runJavaScript("getComputedStyle(document.documentElement).colorScheme", 0, answers.append)
        qtbot.waitUntil(lambda: bool(answers), timeout=WAIT_MS)
        return str(answers[0])

    try:
        for look, expected in ((DARK, "dark"), (LIGHT, "normal"), (DARK, "dark")):
            view.scheme_rules = None
            apply_theme(look)
            qtbot.waitUntil(lambda: view.scheme_rules is not None, timeout=WAIT_MS)
            assert view.scheme_rules and float(view.scheme_rules) > 0, "Netron's dark rules were found"
            assert scheme() == expected
    finally:
        apply_theme(SYSTEM)
        view.close()
