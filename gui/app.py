"""Start the desktop app: ``slimscope``, ``slimscope gui [MODEL]`` or ``python -m gui.app [MODEL]``."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Callable

from PySide6.QtCore import QThreadPool
from PySide6.QtWidgets import QApplication, QWidget

from gui.preview import demo_model_path

APP_NAME = "Slimscope"
#: How long quitting waits for work still running on a worker (the window is already gone).
SHUTDOWN_WAIT_MS = 15_000


def create_app() -> QApplication:
    """The QApplication, named so that QSettings lands in Slimscope's own place."""
    app = QApplication.instance()
    if app is None:
        app = QApplication([sys.argv[0] if sys.argv else "slimscope"])
    assert isinstance(app, QApplication)
    app.setApplicationName(APP_NAME)
    app.setOrganizationName(APP_NAME)
    from gui.icons import app_icon

    app.setWindowIcon(app_icon())
    app.setDesktopFileName("slimscope")  # ties windows to resources/slimscope.desktop
    import pyqtgraph as pg

    pg.setConfigOptions(antialias=True)
    return app


def _install_error_hook(window: QWidget) -> Callable[[], None]:
    """An exception escaping a slot becomes an error dialog, not a silent log line or a crash.

    Returns a function that puts the previous hook back.
    """
    from gui.dialogs import show_error
    from gui.workers import error_details, one_line

    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        previous(kind, exc, tb)
        if isinstance(exc, KeyboardInterrupt):
            return
        try:
            show_error(window, one_line(exc), error_details(exc.with_traceback(tb)))
        except Exception:  # noqa: BLE001 - the hook itself must never raise
            traceback.print_exc()

    sys.excepthook = hook

    def restore() -> None:
        sys.excepthook = previous

    return restore


def main(argv: list[str]) -> int:
    """Open the model in `argv` (or the bundled demo) and run until the window closes."""
    args = [arg for arg in argv if not arg.startswith("-")]
    app = create_app()
    from gui.main_window import MainWindow

    window = MainWindow()
    window.show()
    restore_hook = _install_error_hook(window)
    path = Path(args[0]) if args else demo_model_path()
    if path is not None:
        window.open_model(path)
    else:
        window.statusBar().showMessage("Open a model with File › Open (Ctrl+O)")
    try:
        code = int(app.exec())
    finally:
        restore_hook()
    if not QThreadPool.globalInstance().waitForDone(SHUTDOWN_WAIT_MS):
        # A load that cannot be interrupted is still running. Tearing Python down under it
        # crashes inside torch or Qt, so leave at once: settings were saved on close.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
