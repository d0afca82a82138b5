"""`gui.app.main` end to end: it opens what it is given, reports failures, and returns on quit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication

from gui import app as gui_app
from gui.dialogs import ERROR_DIALOG_NAME


@pytest.fixture
def private_settings(tmp_path: Path):
    """Keep main()'s default QSettings() out of the real user's config folder."""
    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, str(tmp_path / "config"))
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "config"))
    yield tmp_path / "config"


def run_main_until(argv: list[str], done, timeout_ms: int = 60_000) -> tuple[int, list[str]]:
    """Run main(argv); once done(window) holds, record visible error dialogs and quit."""
    seen: list[str] = []
    elapsed = {"ms": 0}

    def poll() -> None:
        windows = [w for w in QApplication.topLevelWidgets() if type(w).__name__ == "MainWindow" and w.isVisible()]
        elapsed["ms"] += 50
        if windows and (done(windows[0]) or elapsed["ms"] > timeout_ms):
            seen.extend(
                w.text() for w in QApplication.topLevelWidgets() if w.objectName() == ERROR_DIALOG_NAME and w.isVisible()
            )
            # Dialogs first, the main window last: closing the last window ends exec(). A second,
            # explicit quit() would leave a Quit event behind that ends the next test's waits.
            for widget in QApplication.topLevelWidgets():
                if widget is not windows[0]:
                    widget.close()
            windows[0].close()
            if not QApplication.quitOnLastWindowClosed():
                QApplication.quit()
            return
        QTimer.singleShot(50, poll)

    QTimer.singleShot(50, poll)
    hook = sys.excepthook
    code = gui_app.main(argv)
    assert sys.excepthook is hook, "main() must put the previous excepthook back"
    return code, seen


def test_missing_file_is_a_dialog_not_a_crash(qapp, private_settings, tmp_path):
    missing = tmp_path / "nope.onnx"
    code, errors = run_main_until([str(missing)], lambda w: not w.loading and w.load_job is None)
    assert code == 0
    assert len(errors) == 1 and "nope.onnx" in errors[0]
    assert QApplication.applicationName() == "Slimscope"


def test_no_argument_opens_the_demo(qapp, private_settings):
    from gui.preview import demo_model_path

    demo = demo_model_path()
    if demo is None:
        pytest.skip("demo model not built yet")
    code, errors = run_main_until([], lambda w: w.session.model is not None and w.histogram.histogram is not None)
    assert code == 0 and errors == []
    recent = QSettings().value("recent_files")
    assert recent and Path(recent if isinstance(recent, str) else recent[0]) == demo.resolve()
