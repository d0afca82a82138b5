"""Start the desktop app: ``slimscope``, ``slimscope gui [MODEL]`` or ``python -m gui.app [MODEL]``."""

from __future__ import annotations

import ctypes.util
import os
import re
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Callable, Mapping

from PySide6.QtCore import QThreadPool
from PySide6.QtWidgets import QApplication, QWidget

from gui.preview import demo_model_path

APP_NAME = "Slimscope"
#: How long quitting waits for work still running on a worker (the window is already gone).
SHUTDOWN_WAIT_MS = 15_000


def display_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why Qt could not open a window here, or None; Qt itself aborts the process (exit 134)
    with a page of plugin advice when it has no platform, so we ask first and say it in a line.
    """
    if environ.get("QT_QPA_PLATFORM") or not sys.platform.startswith("linux"):
        return None  # the user chose a platform (offscreen, vnc...) or the OS provides one
    if environ.get("WAYLAND_DISPLAY"):
        return None
    if not environ.get("DISPLAY"):
        return ("the desktop app needs a display and none is set (no DISPLAY or WAYLAND_DISPLAY): "
                "run it in a desktop session or under `xvfb-run -a slimscope`, or use the "
                "commands (slimscope inspect | sensitivity | plan | compress)")
    local = re.fullmatch(r"(?:unix)?:(\d+)(?:\.\d+)?", environ["DISPLAY"])
    if local and not Path(f"/tmp/.X11-unix/X{local.group(1)}").exists():
        return (f"cannot reach the display {environ['DISPLAY']!r} (no X server listens there): "
                "run it in a desktop session or under `xvfb-run -a slimscope`")
    if ctypes.util.find_library("xcb-cursor") is None:
        return ("Qt's X11 platform needs libxcb-cursor0, which is not installed "
                "(apt-get install libxcb-cursor0)")
    return None


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
    problem = display_problem()
    if problem is not None:
        from engine.errors import SlimscopeError

        raise SlimscopeError(problem)
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
