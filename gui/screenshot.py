"""Render the main window to a PNG, the same way every time, for the README and reviews.

    xvfb-run -a python -m gui.screenshot                       # demo -> docs/screenshots/main_window.png
    python -m gui.screenshot MODEL --layer NAME --out shot.png --size 1280x800
    xvfb-run -a python -m gui.screenshot --show plan           # -> docs/screenshots/plan_editor.png
    xvfb-run -a python -m gui.screenshot --show results        # -> docs/screenshots/results.png
    xvfb-run -a python -m gui.screenshot --show export         # -> docs/screenshots/export_dialog.png

``plan`` makes a few edits the way a user would (defaults, a bulk edit of two layers, a table
preset, recovery settings); ``results`` then runs that plan through the real worker;
``export`` also exports the result to a temporary .onnx file and shows the dialog's verdict.

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
from typing import TYPE_CHECKING, Callable

from PySide6.QtCore import QEventLoop, QSettings
from PySide6.QtGui import QFont, QFontDatabase
from PySide6.QtWidgets import QApplication

from engine.formats import load_model

from gui.app import create_app
from gui.preview import demo_model_path

if TYPE_CHECKING:
    from gui.main_window import MainWindow

DEFAULT_OUT = Path("docs/screenshots/main_window.png")
SHOWS = ("window", "plan", "results", "export")
SHOW_OUT = {"window": DEFAULT_OUT, "plan": Path("docs/screenshots/plan_editor.png"),
            "results": Path("docs/screenshots/results.png"),
            "export": Path("docs/screenshots/export_dialog.png")}
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
    timeout_s: float = 600.0,
    show: str = "window",
) -> Path:
    """Open `model_path`, select `layer` (default: the biggest), and save the window to `out`.

    `show` picks what is on screen (see the module docstring)."""
    app = create_app()
    _fix_look(app)
    from gui.main_window import MainWindow

    with tempfile.TemporaryDirectory() as scratch:
        settings = QSettings(str(Path(scratch) / "settings.ini"), QSettings.Format.IniFormat)
        errors: list[str] = []
        window = MainWindow(settings, loader=loader, show_error=lambda _p, message, _d: errors.append(message),
                            ask_save_changes=lambda _parent, _what: "discard")
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
        target = window
        if show != "window":
            make_demo_edits(window)
        if show in ("results", "export"):
            job = window.run_compression()
            if job is None:
                raise RuntimeError(errors[0] if errors else "compression did not start")
            wait_for(app, lambda: job.finished, timeout_s, "the compression")
            if window.session.result is None:
                raise RuntimeError(errors[0] if errors else "compression failed")
            window.session.select_layer("classifier.1")
            window.tabs.setCurrentIndex(1)
        if show == "export":
            window.export()
            dialog = window.export_dialog
            dialog.path_edit.setText(str(Path(scratch) / "digits_cnn-compressed.onnx"))
            export = dialog.start_export()
            if export is None:
                raise RuntimeError(errors[0] if errors else "export did not start")
            wait_for(app, lambda: export.finished, timeout_s, "the export")
            target = dialog
        window.statusBar().clearMessage()
        for _ in range(10):  # let layouts and the plots settle
            app.processEvents()
            time.sleep(0.03)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not target.grab().save(str(out)):
            raise OSError(f"could not write {out}")
        if target is not window:
            target.close()
        window.close()
    return out


def make_demo_edits(window: "MainWindow") -> None:
    """A plan for the demo, made through the same controls a user clicks (each one undoable)."""
    editor = window.plan_editor
    editor.tabs.setCurrentIndex(1)  # defaults: int8 per channel everywhere it applies
    editor.defaults_form.quant_box.setChecked(True)
    window.session.select_layers(["features.3", "features.7"])  # a bulk edit of two layers
    editor.layer_form.prune_box.setChecked(True)
    editor.layer_form.amount_spin.setValue(60.0)
    window.session.select_layers(["classifier.1"])  # a preset from the table's action cell
    from gui.panels.plan_editor import apply_preset

    apply_preset(window.session, "2:4 · int8/ch", ["classifier.1"])
    recovery = editor.recovery_form  # a short fine-tuning run
    recovery.steps_spin.setValue(80)
    recovery.eval_spin.setValue(20)
    recovery.setChecked(True)
    editor.tabs.setCurrentIndex(0)
    window.session.select_layers(["classifier.1"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save a screenshot of the main window")
    parser.add_argument("model", nargs="?", help="model file (default: the bundled demo)")
    parser.add_argument("--layer", help="layer to select (default: the one with most parameters)")
    parser.add_argument("--out", type=Path, help=f"PNG to write (default: {DEFAULT_OUT}, or per --show)")
    parser.add_argument("--show", choices=SHOWS, default="window",
                        help="plan: edits in the plan editor; results: after compressing; export: the dialog")
    parser.add_argument("--size", default="1280x800", help="window size WIDTHxHEIGHT (default: 1280x800)")
    parser.add_argument("--log", action="store_true", help="log-scale histogram")
    args = parser.parse_args(argv)
    path = Path(args.model) if args.model else demo_model_path()
    if path is None:
        print("no model given and the demo model is not available", file=sys.stderr)
        return 2
    width, height = (int(part) for part in args.size.lower().split("x"))
    out = take_screenshot(path, args.out or SHOW_OUT[args.show], layer=args.layer, size=(width, height),
                          log_scale=args.log, show=args.show)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
