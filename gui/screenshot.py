"""Render the main window to a PNG, the same way every time, for the README and reviews.

    xvfb-run -a python -m gui.screenshot                       # demo -> docs/screenshots/main_window.png
    python -m gui.screenshot MODEL --layer NAME --out shot.png --size 1280x800

Determinism: Fusion style, a fixed font and window size, fresh settings in a temporary folder,
and the picture is taken only after the model, the histogram and every layer's statistics
are in. Works under Xvfb and under ``QT_QPA_PLATFORM=offscreen`` alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QEventLoop, QSettings
from PySide6.QtGui import QFont, QFontDatabase
from PySide6.QtWidgets import QApplication

from engine.formats import load_model

from gui.app import create_app
from gui.preview import demo_model_path

DEFAULT_OUT = Path("docs/screenshots/main_window.png")
FONT_FAMILIES = ("DejaVu Sans", "Noto Sans", "Liberation Sans")


def wait_for(app: QApplication, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f} s")
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)


def _fix_look(app: QApplication) -> None:
    app.setStyle("Fusion")
    available = set(QFontDatabase.families())
    family = next((name for name in FONT_FAMILIES if name in available), None)
    if family:
        app.setFont(QFont(family, 10))


def take_screenshot(
    model_path: Path,
    out: Path,
    *,
    layer: str | None = None,
    size: tuple[int, int] = (1280, 800),
    log_scale: bool = False,
    loader: Callable = load_model,
    timeout_s: float = 120.0,
) -> Path:
    """Open `model_path`, select `layer` (default: the biggest), and save the window to `out`."""
    app = create_app()
    _fix_look(app)
    from gui.main_window import MainWindow

    with tempfile.TemporaryDirectory() as scratch:
        settings = QSettings(str(Path(scratch) / "settings.ini"), QSettings.Format.IniFormat)
        errors: list[str] = []
        window = MainWindow(settings, loader=loader, show_error=lambda _p, message, _d: errors.append(message))
        window.resize(*size)
        window.show()
        job = window.open_model(model_path)
        wait_for(app, lambda: job.finished, timeout_s, "the model to load")
        model = window.session.model
        if model is None:
            raise RuntimeError(errors[0] if errors else f"{model_path} did not load")
        name = layer or max(model.layers, key=lambda item: item.params).name
        window.session.select_layer(name)
        window.histogram.log_toggle.setChecked(log_scale)
        wait_for(app, lambda: window.histogram.histogram is not None, timeout_s, "the histogram")
        wait_for(app, lambda: not window.session.busy, timeout_s, "layer statistics")
        window.statusBar().clearMessage()
        for _ in range(5):  # let layouts and the plot settle
            app.processEvents()
            time.sleep(0.02)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not window.grab().save(str(out)):
            raise OSError(f"could not write {out}")
        window.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save a screenshot of the main window")
    parser.add_argument("model", nargs="?", help="model file (default: the bundled demo)")
    parser.add_argument("--layer", help="layer to select (default: the one with most parameters)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default: {DEFAULT_OUT})")
    parser.add_argument("--size", default="1280x800", help="window size WIDTHxHEIGHT (default: 1280x800)")
    parser.add_argument("--log", action="store_true", help="log-scale histogram")
    args = parser.parse_args(argv)
    path = Path(args.model) if args.model else demo_model_path()
    if path is None:
        print("no model given and the demo model is not available", file=sys.stderr)
        return 2
    width, height = (int(part) for part in args.size.lower().split("x"))
    out = take_screenshot(path, args.out, layer=args.layer, size=(width, height), log_scale=args.log)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
