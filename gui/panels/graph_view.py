"""The model's graph, drawn by Netron inside the window.

The ``netron`` package serves the model file on 127.0.0.1 (a random free port, browsing off)
and a ``QWebEngineView`` shows its page. QtWebEngine is an optional extra
(``pip install slimscope[graph]``, about 180 MB of wheels); without it the panel says so and offers
to open the same page in the system browser. The server starts the first time the panel is
shown for a model, and stops when the model changes, the panel is shut down or the app quits.
Opening the browser shows the page's address in the panel (to copy, should no browser come up)
and says what happened in one log line (:attr:`GraphView.log_line`).

Both looks reach Netron, in its own dark style: its style sheets keep that style in
``@media (prefers-color-scheme: dark)`` rules, which Chromium decides once per process (a Chromium
flag, :func:`_prefer_color_scheme`, sets it for the first page). So that a theme switched later
reaches the page too, :data:`COLOR_SCHEME_SCRIPT` turns those rules on or off in the loaded page,
after each load and on every switch. The page's background before Netron paints, and the
placeholder without QtWebEngine, take the palette's colours.

Netron asks for cookie consent on first use; offline it cannot find out that no consent is
needed, so the page would sit behind that screen. The view's own profile gets the ``consent``
cookie Netron itself sets after "Accept", before the page loads.

Selecting a layer elsewhere selects its node in the graph and scrolls it into view. Netron has
no public API for that; the page keeps its view as ``window.__view__`` and the graph's elements
in ``_target._table`` (Netron 7 to 9), so a short script finds the node whose weight is named
``<layer>.weight`` (or whose exported name has ``<layer>`` as a path part) and calls the same
``select``/``scrollTo`` the Find sidebar uses. Should a Netron release rename these, the script
answers "unsupported" and only the selection sync is lost.

Run alone: ``python -m gui.panels.graph_view [MODEL] [--layer NAME] [--screenshot PNG]``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QDateTime, QEvent, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QPalette
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QStackedWidget, QVBoxLayout, QWidget

from engine.model import Model

from gui.session import Session
from gui.theme import theme_signals

#: Netron's own formats that draw no graph: for these a same-named .onnx beside the file is shown.
WEIGHTS_ONLY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SELECT_RETRY_MS = 300
SELECT_GIVE_UP_MS = 30_000

#: Finds the layer's node and selects it the way Netron's Find sidebar does; see module docstring.
SELECT_SCRIPT = """
(function (layer) {
  const view = window.__view__;
  const target = view && view._target;
  if (!view) { return 'loading'; }
  if (!target) { return 'loading'; }
  if (!target._table || typeof target.select !== 'function' || typeof target.scrollTo !== 'function') {
    return 'unsupported';
  }
  let byWeight = null;
  let byName = null;
  for (const node of target._table.keys()) {
    if (!node || !Array.isArray(node.inputs) || node.type === undefined) { continue; }
    for (const argument of node.inputs) {
      const values = Array.isArray(argument.value) ? argument.value : [];
      if (values.some((v) => v && (v.name === layer + '.weight' || v.name === layer))) { byWeight = node; }
    }
    if (byWeight) { break; }
    const name = String(node.name || '');
    if (!byName && (name === layer || name.split(/[\\/:]/).includes(layer))) { byName = node; }
  }
  const node = byWeight || byName;
  if (!node) { return 'missing'; }
  target.scrollTo(target.select([node], 'sidebar'));
  return 'selected';
})(%s)
"""


#: Forces Netron's dark (true) or light (false) style, or gives the choice back to Chromium (null),
#: by rewriting the media text of its ``prefers-color-scheme`` rules; answers how many it found.
COLOR_SCHEME_SCRIPT = """
(function (dark) {
  let found = 0;
  for (const sheet of document.styleSheets) {
    let rules;
    try { rules = sheet.cssRules; } catch (error) { continue; }
    for (const rule of rules) {
      if (!rule.media) { continue; }
      if (rule.__slimscopeScheme === undefined) {
        const match = /prefers-color-scheme:\\s*(dark|light)/.exec(rule.media.mediaText);
        if (!match) { continue; }
        rule.__slimscopeScheme = match[1];
      }
      found += 1;
      const scheme = rule.__slimscopeScheme;
      rule.media.mediaText = dark === null ? '(prefers-color-scheme: ' + scheme + ')'
        : ((scheme === 'dark') === dark ? 'all' : 'not all');
    }
  }
  return found;
})(%s)
"""


def webengine_available() -> bool:
    """Whether QtWebEngine can be imported (the optional ``graph`` extra is installed)."""
    try:
        import PySide6.QtWebEngineWidgets  # noqa: F401
    except ImportError:
        return False
    return True


def graph_file(model: Model) -> Path:
    """The file Netron should draw: the model, or its ONNX twin when the model file holds weights
    only (Netron then shows a list of tensors, not a graph)."""
    path = Path(model.path)
    twin = path.with_suffix(".onnx")
    if path.suffix.lower() in WEIGHTS_ONLY_SUFFIXES and twin.is_file():
        return twin
    return path


def _prefer_color_scheme() -> None:
    """Let Netron's own dark style follow the app's dark look.

    Netron switches on ``prefers-color-scheme``, which QtWebEngine takes from the platform, not
    from the app's palette. A Chromium flag sets it instead; Chromium reads its flags once, when
    the first page is made, so a theme switched later reaches Netron at the next start.
    """
    import os

    from gui.theme import DARK, LIGHT, current_theme

    scheme = {DARK: 0, LIGHT: 1}.get(current_theme())  # Blink's PreferredColorScheme: 0 dark, 1 light
    flags = os.environ.get("QTWEBENGINE_CHROMIUM_FLAGS", "")
    if scheme is not None and "preferredColorScheme" not in flags:
        os.environ["QTWEBENGINE_CHROMIUM_FLAGS"] = f"{flags} --blink-settings=preferredColorScheme={scheme}".strip()


class NetronServer:
    """One Netron server for one file, on 127.0.0.1 only."""

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None
        self.path: Path | None = None

    @property
    def url(self) -> str:
        assert self.address is not None
        return f"http://{self.address[0]}:{self.address[1]}/"

    @property
    def running(self) -> bool:
        import netron

        return self.address is not None and netron.status(self.address)

    def start(self, path: Path) -> str:
        """Serve `path` (stopping any file served before) and return the page's URL."""
        import netron

        self.stop()
        root = logging.getLogger()
        guard = logging.NullHandler()
        root.addHandler(guard)  # netron.serve calls logging.basicConfig on a bare root logger
        logging.getLogger("netron").setLevel(logging.WARNING)
        try:
            self.address = tuple(netron.serve(str(path), None, address=("127.0.0.1", 0), browse=False))  # type: ignore[assignment]
        finally:
            root.removeHandler(guard)
        self.path = path
        return self.url

    def stop(self) -> None:
        import netron

        if self.address is not None:
            netron.stop(self.address)
        self.address = None
        self.path = None


class GraphView(QWidget):
    """Netron in a web view, or a button opening it in the browser; see the module docstring."""

    #: The page answered a selection request: layer name, "selected" / "missing" / "unsupported".
    node_selected = Signal(str, str)
    #: One line for the window's log and its level ("info", "warning"): what the panel did.
    log_line = Signal(str, str)

    def __init__(self, session: Session, parent: QWidget | None = None, *, embed: bool | None = None,
                 open_url: Callable[[QUrl], bool] = QDesktopServices.openUrl) -> None:
        super().__init__(parent)
        self.session = session
        self.server = NetronServer()
        self.open_url = open_url
        self.embedded = webengine_available() if embed is None else embed
        self.model: Model | None = None
        self.page_ready = False
        #: Colour-scheme rules found in Netron's page at the last theme sync (None before one).
        self.scheme_rules: object = None
        self._pending_layer = ""
        self._pending_since = 0.0
        self._retry = QTimer(self, singleShot=True, interval=SELECT_RETRY_MS)
        self._retry.timeout.connect(self._select_pending)

        self.title = QLabel()
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.browser_button = QPushButton("Open graph in the system browser")
        self.browser_button.clicked.connect(self.open_in_browser)
        header = QHBoxLayout()
        header.addWidget(self.title, 1)
        header.addWidget(self.browser_button)
        #: The address Netron serves the graph at, once it is served: selectable, to copy.
        self.url_label = QLabel()
        self.url_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse
                                               | Qt.TextInteractionFlag.LinksAccessibleByMouse)
        self.url_label.setOpenExternalLinks(False)
        self.url_label.linkActivated.connect(lambda _link: self.open_in_browser())
        self.url_label.hide()

        self.message = QLabel()
        self.message.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.message.setWordWrap(True)
        self.message.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.stack = QStackedWidget()
        self.stack.addWidget(self.message)
        #: Made on first show: creating it starts QtWebEngine's browser processes.
        self.web: QWidget | None = None

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(header)
        layout.addWidget(self.url_label)
        layout.addWidget(self.stack, 1)
        self.stack.setAutoFillBackground(True)  # the placeholder sits on the look's base colour
        self.stack.setBackgroundRole(QPalette.ColorRole.Base)
        theme_signals.changed.connect(self._on_theme)

        session.model_changed.connect(self.set_model)
        session.layer_selected.connect(self.select_layer)
        self.set_model(session.model)

    # -- the web view ----------------------------------------------------------------------------
    def _make_web_view(self) -> QWidget | None:
        _prefer_color_scheme()
        try:
            from PySide6.QtWebEngineCore import QWebEnginePage, QWebEngineProfile
            from PySide6.QtWebEngineWidgets import QWebEngineView
        except ImportError:
            self.embedded = False
            return None
        view = QWebEngineView(self)
        # An off-the-record profile of our own: the consent cookie and Netron's storage stay out
        # of any other web view's profile and vanish when the app quits. The page owns it, so the
        # profile is deleted after its page, as QtWebEngine requires.
        self.profile = QWebEngineProfile()
        page = QWebEnginePage(self.profile, view)
        self.profile.setParent(page)
        view.setPage(page)
        view.loadFinished.connect(self._on_load_finished)
        view.setContextMenuPolicy(Qt.ContextMenuPolicy.NoContextMenu)
        page.setBackgroundColor(self.palette().color(QPalette.ColorRole.Base))  # no white flash in the dark
        return view

    def _allow_without_consent_screen(self, url: str) -> None:
        from PySide6.QtNetwork import QNetworkCookie

        cookie = QNetworkCookie(b"consent", str(int(time.time() * 1000)).encode())
        cookie.setPath("/")
        cookie.setExpirationDate(QDateTime.currentDateTime().addDays(30))
        self.profile.cookieStore().setCookie(cookie, QUrl(url))

    # -- model ---------------------------------------------------------------------------------------
    def set_model(self, model: Model | None) -> None:
        """Forget the old model's server; the new one starts when the panel is shown."""
        self.server.stop()
        self.url_label.hide()
        self.model = model
        self.page_ready = False
        self._pending_layer = ""
        if self.web is not None:
            self.web.setUrl(QUrl("about:blank"))
        if model is None:
            self.title.setText("No model")
            self._show_message("Open a model to see its graph.")
            self.browser_button.setEnabled(False)
            return
        file = graph_file(model)
        twin = f" (drawn from {file.name} beside it)" if file != Path(model.path) else ""
        self.title.setText(f"<b>{Path(model.path).name}</b>{twin}")
        self.browser_button.setEnabled(True)
        if not self.embedded:
            self._show_message(
                "The embedded graph needs QtWebEngine, which is not installed.\n"
                "Install it with:  pip install pyside6-webengine   (or slimscope[graph])\n\n"
                "Meanwhile, Netron can draw the graph in your web browser."
            )
        else:
            self._show_message("Loading the graph…")
        if self.isVisible():
            self.ensure_started()

    def ensure_started(self) -> str | None:
        """Start serving the current model (if not yet) and load it in the view; the URL."""
        if self.model is None:
            return None
        if self.embedded and self.web is None:
            self.web = self._make_web_view()
            if self.web is not None:
                self.stack.addWidget(self.web)
        if self.server.address is None:
            url = self.server.start(graph_file(self.model))
            if self.web is not None:
                self._allow_without_consent_screen(url)
                self.page_ready = False
                self.web.setUrl(QUrl(url))
                self.stack.setCurrentWidget(self.web)
        return self.server.url

    def open_in_browser(self) -> bool:
        """Serve the graph and ask the system to open it; the address shows in the panel and the
        outcome goes to the log, so the click is never silent. True if a browser was asked."""
        if self.model is None:
            return False
        try:
            url = self.ensure_started()
        except Exception as exc:  # noqa: BLE001 - netron failing to serve must be a line, not a crash
            self.log_line.emit(f"graph: Netron could not serve {Path(self.model.path).name}: {exc}", "error")
            return False
        if not url:
            return False
        self.url_label.setText(f"Netron serves the graph at <a href=\"{url}\">{url}</a>")
        self.url_label.show()
        name = self.server.path.name if self.server.path is not None else Path(self.model.path).name
        opened = bool(self.open_url(QUrl(url)))
        if opened:
            self.log_line.emit(f"graph: opened {url} in the system browser (Netron drawing {name})", "info")
            if not self.embedded:
                self._show_message(f"The graph of {name} is open in your web browser at\n{url}\n\n"
                                   "The embedded graph needs QtWebEngine: pip install pyside6-webengine")
        else:
            self.log_line.emit(f"graph: no browser could be opened; open {url} yourself "
                               f"(Netron drawing {name})", "warning")
            if not self.embedded:
                self._show_message(f"No web browser could be opened. Open this address yourself:\n{url}")
        return opened

    def _on_theme(self, *_args: object) -> None:
        """Netron's page in the new look, without reloading it (see the module docstring)."""
        _prefer_color_scheme()
        if self.web is not None:
            self.web.page().setBackgroundColor(self.palette().color(QPalette.ColorRole.Base))
            self._apply_color_scheme()

    def _apply_color_scheme(self) -> None:
        from gui.theme import DARK, LIGHT, current_theme

        if self.web is None or not self.page_ready:
            return
        dark = {DARK: "true", LIGHT: "false"}.get(current_theme(), "null")
        self.web.page().runJavaScript(COLOR_SCHEME_SCRIPT % dark, 0, self._on_scheme_applied)

    def _on_scheme_applied(self, found: object) -> None:
        """Netron's answer: how many colour-scheme rules it has (for tests; 0 means a Netron
        release that styles itself otherwise, and only the look's sync is lost)."""
        self.scheme_rules = found

    def showEvent(self, event: QEvent) -> None:  # type: ignore[override]
        super().showEvent(event)
        if self.embedded:
            self.ensure_started()
            if self.session.selected_layer:
                self.select_layer(self.session.selected_layer)

    def _show_message(self, text: str) -> None:
        self.message.setText(text)
        self.stack.setCurrentWidget(self.message)

    def _on_load_finished(self, ok: bool) -> None:
        if self.web is None or self.web.url().scheme() != "http":
            return
        self.page_ready = ok
        if not ok:
            self._show_message("Netron's page did not load.")
            return
        self._apply_color_scheme()
        if self._pending_layer:
            self._select_pending()

    # -- selection ------------------------------------------------------------------------------------
    def select_layer(self, name: str) -> None:
        """Select `name`'s node in the graph once the page can; later calls replace earlier ones."""
        if not name or self.web is None or self.server.address is None:
            self._pending_layer = name
            return
        self._pending_layer = name
        self._pending_since = time.monotonic()
        self._select_pending()

    def _select_pending(self) -> None:
        name = self._pending_layer
        if not name or self.web is None or not self.page_ready:
            return
        script = SELECT_SCRIPT % json.dumps(name)
        self.web.page().runJavaScript(script, 0, lambda answer, name=name: self._on_selected(name, answer))

    def _on_selected(self, name: str, answer: object) -> None:
        if name != self._pending_layer:
            return
        if answer == "loading" and time.monotonic() - self._pending_since < SELECT_GIVE_UP_MS / 1000:
            self._retry.start()  # the model is still being parsed and laid out
            return
        self._pending_layer = ""
        self.node_selected.emit(name, str(answer))

    # -- shutdown -------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the server and release the web view (a later show makes a new one).

        The page must go before QtWebEngine's profiles are torn down at exit, so it is deleted
        here rather than left to the garbage collector's order.
        """
        self._retry.stop()
        self.server.stop()
        self.page_ready = False
        if self.web is not None:
            web, self.web = self.web, None
            self.stack.removeWidget(web)
            web.deleteLater()
            if self.model is not None:
                self._show_message("The graph was closed; show this panel again to reload it.")

    def closeEvent(self, event: QEvent) -> None:  # type: ignore[override]
        self.shutdown()
        super().closeEvent(event)  # type: ignore[arg-type]


def _main(argv: list[str]) -> int:
    from gui.preview import preview

    return preview(lambda session: GraphView(session), argv, title="Graph")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
