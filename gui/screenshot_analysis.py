"""Screenshots of the analysis views, taken the same way every time, for the README and reviews.

    xvfb-run -a python -m gui.screenshot_analysis            # -> docs/screenshots/{sensitivity,pareto,graph,dark}.png
    python -m gui.screenshot_analysis --out-dir shots --only sensitivity,pareto

Opens the bundled demo in the real main window, measures exact sensitivity on the demo digits
through the real worker, allocates for a size target, shows the graph (Netron, when QtWebEngine
is installed; under Xvfb, since offscreen Qt has no GL for it) and finally switches to the dark
look. Fusion style, a fixed font and window size, and fresh settings in a temporary folder keep
the pictures comparable between runs. The main window's own screenshot is gui/screenshot.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QEventLoop, QSettings
from PySide6.QtWidgets import QApplication, QDockWidget, QWidget

os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")  # Chromium refuses to run as root otherwise

SHOTS = ("sensitivity", "pareto", "graph", "dark")
DEFAULT_DIR = Path("docs/screenshots")
SIZE = (1280, 1000)
DOCK_HEIGHT = 480


def settle(seconds: float, until: Callable[[], bool] = lambda: False, what: str = "") -> None:
    """Run the event loop until `until()` or for `seconds`; raise if `what` was awaited in vain."""
    loop = QEventLoop()
    deadline = time.monotonic() + seconds
    while not until():
        if time.monotonic() > deadline:
            if what:
                raise TimeoutError(f"gave up waiting for {what} after {seconds:.0f} s")
            return
        loop.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.005)  # lets the worker have the interpreter lock


def save(widget: QWidget, path: Path) -> Path:
    settle(0.4)  # layouts and plots settle
    path.parent.mkdir(parents=True, exist_ok=True)
    if not widget.grab().save(str(path)):
        raise OSError(f"could not write {path}")
    print(path)
    return path


def take(out_dir: Path, only: tuple[str, ...] = SHOTS) -> list[Path]:
    from engine.demo import DEMO_MODEL

    from gui.analysis import install_analysis
    from gui.app import create_app
    from gui.main_window import MainWindow
    from gui.project import DataChoice
    from gui.screenshot import _fix_look

    app = create_app()
    _fix_look(app)
    taken: list[Path] = []
    with tempfile.TemporaryDirectory() as scratch:
        settings = QSettings(str(Path(scratch) / "settings.ini"), QSettings.Format.IniFormat)
        errors: list[str] = []
        window = MainWindow(settings, show_error=lambda _parent, message, _details: errors.append(message),
                            ask_save_changes=lambda _parent, _what: "discard")
        install_analysis(window)  # a no-op once MainWindow installs it itself
        analysis = window.analysis  # type: ignore[attr-defined]
        window.resize(*SIZE)
        window.show()
        job = window.open_model(DEMO_MODEL)
        settle(120, lambda: job.finished, "the demo model to load")
        if window.session.model is None:
            raise RuntimeError(errors[0] if errors else "the demo model did not load")
        window.session.select_layer("features.3")

        def show(dock: QDockWidget) -> None:
            dock.show()
            dock.raise_()
            window.resizeDocks([dock], [DOCK_HEIGHT], _vertical())

        run = analysis.run(DataChoice(spec="demo", method="exact", limit=0, ranks=True))
        show(analysis.sensitivity_dock)
        settle(300, lambda: run.finished, "the sensitivity analysis")
        if analysis.state.sensitivity is None:
            raise RuntimeError(errors[0] if errors else "the sensitivity analysis failed")
        window.session.select_layer("classifier.1")
        settle(30, lambda: not window.session.busy, "layer statistics")
        window.statusBar().clearMessage()
        if "sensitivity" in only:
            taken.append(save(window, out_dir / "sensitivity.png"))

        pareto = analysis.pareto_panel
        show(analysis.pareto_dock)
        settle(60, lambda: bool(pareto.front), "the Pareto front")
        pareto.mode_combo.setCurrentIndex(pareto.mode_combo.findData("drop"))
        pareto.drop_spin.setValue(2.0)  # points: the additive prediction alone measures ~5
        pareto.check_box.setChecked(True)
        allocation = pareto.allocate()
        if allocation is not None:
            settle(60, lambda: allocation.finished, "the allocation")
        window.statusBar().clearMessage()
        if "pareto" in only:
            taken.append(save(window, out_dir / "pareto.png"))

        if "graph" in only:
            graph = analysis.graph_view
            answers: list[str] = []
            graph.node_selected.connect(lambda _name, answer: answers.append(answer))
            show(analysis.graph_dock)
            window.session.select_layer("features.7")
            if graph.embedded:
                settle(30, lambda: bool(answers), "Netron to select the layer")
                settle(1.5)  # the scroll animation
            taken.append(save(window, out_dir / "graph.png"))

        if "dark" in only:
            analysis.set_theme("dark")
            show(analysis.sensitivity_dock)
            window.session.select_layer("features.3")
            settle(2)
            taken.append(save(window, out_dir / "dark.png"))
        window.close()
    return taken


def _vertical():  # type: ignore[no-untyped-def]
    from PySide6.QtCore import Qt

    return Qt.Orientation.Vertical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save screenshots of the analysis views")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIR, help=f"folder for the PNGs (default: {DEFAULT_DIR})")
    parser.add_argument("--only", default=",".join(SHOTS), help=f"comma-separated subset of {', '.join(SHOTS)}")
    args = parser.parse_args(argv)
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = set(only) - set(SHOTS)
    if unknown:
        parser.error(f"unknown screenshot {sorted(unknown)[0]!r}")
    take(args.out_dir, only)
    QApplication.instance()
    return 0


if __name__ == "__main__":
    sys.exit(main())
