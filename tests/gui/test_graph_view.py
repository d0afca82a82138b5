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
