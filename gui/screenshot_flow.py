"""Screenshots of the whole flow on any model file with its data: sensitivity, plan, results, export.

    xvfb-run -a python -m gui.screenshot_flow MODEL.onnx --data DATA.npz --limit 64 --prefix onnx
        # -> docs/screenshots/onnx_{sensitivity,plan,results,export}.png

Drives the real main window the way a user does: opens the file, measures sensitivity with the
chosen method on the data (through the real worker), allocates for a size target in the Pareto
panel, compresses with the same data for evaluation, and exports through the export dialog. It
stops with the first error the window reports, so a picture is never taken of a half-done step.
Fusion style, a fixed font and window size, and fresh settings keep the pictures comparable.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import QDockWidget

from gui.screenshot_analysis import DEFAULT_DIR, DOCK_HEIGHT, SIZE, _vertical, save, settle

STEPS = ("sensitivity", "plan", "results", "export")
PLAN_WIDTH = 330
WINDOW_SIZE = (1480, SIZE[1])


def take_flow(model_path: Path, data: str | None, out_dir: Path, *, prefix: str, method: str = "exact",
              limit: int = 64, target: float = 0.3, export_format: str = "onnx-int8",
              export_to: Path | None = None) -> list[Path]:
    """One screenshot per step of the flow; returns the PNGs written."""
    from gui.analysis import install_analysis
    from gui.app import create_app
    from gui.main_window import MainWindow
    from gui.project import DataChoice
    from gui.screenshot import _fix_look
    from gui.session import CompressionData

    app = create_app()
    _fix_look(app)
    taken: list[Path] = []
    with tempfile.TemporaryDirectory() as scratch:
        settings = QSettings(str(Path(scratch) / "settings.ini"), QSettings.Format.IniFormat)
        errors: list[str] = []
        window = MainWindow(settings, show_error=lambda _parent, message, _details: errors.append(message),
                            ask_save_changes=lambda _parent, _what: "discard")
        install_analysis(window)
        analysis = window.analysis  # type: ignore[attr-defined]
        window.resize(*WINDOW_SIZE)
        window.show()
        # The plan editor's form needs its width to be read; the layer table needs rows to show.
        window.resizeDocks([window.plan_dock], [PLAN_WIDTH], Qt.Orientation.Horizontal)

        def check(what: str) -> None:
            if errors:
                raise RuntimeError(f"{what}: {errors[0]}")

        job = window.open_model(model_path)
        settle(300, lambda: job.finished, "the model to load")
        check("open")
        model = window.session.model
        assert model is not None
        biggest = max(model.layers, key=lambda layer: layer.params).name
        window.session.select_layer(biggest)

        def show(dock: object) -> None:
            dock.show()  # type: ignore[attr-defined]
            dock.raise_()  # type: ignore[attr-defined]
            window.resizeDocks([dock], [DOCK_HEIGHT], _vertical())
            window.resizeDocks([window.plan_dock], [PLAN_WIDTH], Qt.Orientation.Horizontal)

        run = analysis.run(DataChoice(spec=data if method != "datafree" else None, method=method, limit=limit))
        show(analysis.sensitivity_dock)
        settle(600, lambda: run.finished, "the sensitivity analysis")
        check("sensitivity")
        settle(60, lambda: not window.session.busy, "layer statistics")
        window.statusBar().clearMessage()
        taken.append(save(window, out_dir / f"{prefix}_sensitivity.png"))

        if data and method != "datafree":
            window.session.set_data(CompressionData(evaluation=data))
        pareto = analysis.pareto_panel
        show(analysis.pareto_dock)
        settle(120, lambda: bool(pareto.front), "the Pareto front")
        pareto.size_edit.setText(f"{target:g}")
        allocation = pareto.allocate()
        if allocation is not None:
            settle(300, lambda: allocation.finished, "the allocation")
        check("allocate")
        window.statusBar().clearMessage()
        taken.append(save(window, out_dir / f"{prefix}_plan.png"))

        job = window.run_compression()
        check("compress")
        assert job is not None
        settle(600, lambda: job.finished, "the compression")
        check("compress")
        window.statusBar().clearMessage()
        for dock in window.findChildren(QDockWidget):  # the results tab gets the whole height
            if window.dockWidgetArea(dock) == Qt.DockWidgetArea.BottomDockWidgetArea:
                dock.hide()
        taken.append(save(window, out_dir / f"{prefix}_results.png"))

        window.export()
        dialog = window.export_dialog
        index = dialog.format_combo.findData(export_format)
        if index < 0:
            raise RuntimeError(f"{export_format} is not offered for {model_path.name}")
        dialog.format_combo.setCurrentIndex(index)
        destination = export_to or Path(scratch) / f"{model_path.stem}-{export_format}{model_path.suffix}"
        dialog.path_edit.setText(str(destination))
        export = dialog.start_export()
        check("export")
        assert export is not None
        settle(600, lambda: export.finished, "the export")
        check("export")
        settle(0.5)
        taken.append(save(dialog, out_dir / f"{prefix}_export.png"))
        dialog.close()
        window.close()
    return taken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save screenshots of the whole flow on a model")
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", help="data spec for sensitivity and evaluation (e.g. a .npz)")
    parser.add_argument("--method", default="exact", choices=("exact", "fast", "datafree"))
    parser.add_argument("--limit", type=int, default=64, help="samples used (0: all)")
    parser.add_argument("--target", type=float, default=0.3, help="size target for the allocation")
    parser.add_argument("--format", default="onnx-int8", help="export format")
    parser.add_argument("--export-to", type=Path, help="keep the exported file here")
    parser.add_argument("--prefix", default="flow", help="file name prefix of the PNGs")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    take_flow(args.model, args.data, args.out_dir, prefix=args.prefix, method=args.method, limit=args.limit,
              target=args.target, export_format=args.format, export_to=args.export_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
