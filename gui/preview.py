"""Run one panel alone over a model file: quick to look at, quick to screenshot.

``python -m gui.panels.histogram MODEL [--layer NAME] [--screenshot PNG]`` and its siblings
end up here. The
model is loaded on the GUI thread before the window shows: fine for a developer's preview,
never done by the app itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PySide6.QtCore import QEventLoop
from PySide6.QtWidgets import QApplication, QComboBox, QVBoxLayout, QWidget

from engine.errors import SlimscopeError, UntrustedPickleError
from engine.formats import LoadOptions, load_model
from engine.model import Model

from gui.session import Session

if TYPE_CHECKING:
    from gui.workers import Job


def demo_model_path() -> Path | None:
    """The bundled demo model, or None while it is not built or not shipped."""
    try:
        from engine.demo import DEMO_MODEL
    except ImportError:
        return None
    return DEMO_MODEL if Path(DEMO_MODEL).is_file() else None


def ensure_app() -> QApplication:
    app = QApplication.instance()
    if app is None:
        app = QApplication([sys.argv[0] if sys.argv else "slimscope"])
        app.setApplicationName("Slimscope")
        app.setOrganizationName("Slimscope")
    assert isinstance(app, QApplication)
    return app


def load_with_prompt(path: Path, parent: QWidget | None = None) -> Model:
    """Load `path`, asking before a pickle runs; raises SlimscopeError when it can't or may not."""
    from gui.dialogs import confirm_trust

    try:
        return load_model(path, LoadOptions())
    except UntrustedPickleError as exc:
        if not confirm_trust(parent, path, str(exc)):
            raise SlimscopeError(f"{path.name}: not opened, as it was not trusted") from None
        return load_model(path, LoadOptions(trust=True))


def open_preview_model(text: str | None) -> Model | None:
    """The model a preview names (the demo when `text` is empty), loaded on this thread after
    ensure_app(); None, with one line on stderr, when there is none or it cannot be opened."""
    path = Path(text) if text else demo_model_path()
    if path is None:
        print("no model given and the demo model is not available", file=sys.stderr)
        return None
    try:
        return load_with_prompt(path)
    except SlimscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def preview(
    factory: Callable[[Session], QWidget],
    argv: list[str],
    *,
    title: str,
    layer_picker: bool = False,
) -> int:
    """Show `factory(session)` over the model named in `argv` (the demo by default)."""
    parser = argparse.ArgumentParser(description=f"Preview the {title.lower()} panel")
    parser.add_argument("model", nargs="?", help="model file (default: the bundled demo)")
    parser.add_argument("--layer", help="layer to select (default: the first)")
    parser.add_argument("--screenshot", type=Path, metavar="PNG", help="save the panel to PNG and exit")
    args = parser.parse_args(argv)
    app = ensure_app()
    model = open_preview_model(args.model)
    if model is None:
        return 2
    session = Session()
    window = QWidget()
    window.setWindowTitle(f"{title} — {model.path.name}")
    layout = QVBoxLayout(window)
    if layer_picker:
        picker = QComboBox()
        picker.addItems(model.layer_names())
        picker.currentTextChanged.connect(session.select_layer)
        session.layer_selected.connect(lambda name: name and picker.setCurrentText(name))
        layout.addWidget(picker)
    layout.addWidget(factory(session))
    session.set_model(model)
    session.select_layer(args.layer or model.layers[0].name)
    window.resize(900, 600)
    window.show()
    if args.screenshot is not None:
        code = _save_when_settled(app, session, window, args.screenshot)
        window.close()
        window.deleteLater()
    else:
        code = app.exec()
    session.shutdown()
    return code


def run_job_and_show(app: QApplication, job: "Job", widget: QWidget, screenshot: Path | None,
                     before_grab: Callable[[], None] | None = None) -> int:
    """Start `job` with `widget` showing it; with `screenshot`, wait for the job, save, exit."""
    job.failed.connect(lambda message, *_: print(f"error: {message}", file=sys.stderr))
    job.start()
    if screenshot is None:
        return app.exec()
    while not job.finished:
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
    app.processEvents()
    if before_grab is not None:
        before_grab()
    return 0 if widget.grab().save(str(screenshot)) else 2


def _save_when_settled(app: QApplication, session: Session, window: QWidget, out: Path) -> int:
    """Wait for background statistics, then write the window to `out`."""
    deadline = time.monotonic() + 60
    while session.busy and time.monotonic() < deadline:
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)  # lets the stats thread have the GIL
    app.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not window.grab().save(str(out)):
        print(f"error: could not write {out}", file=sys.stderr)
        return 2
    print(out)
    return 0
