"""Screenshots of the main window's layout at common screen sizes, in both looks, for review.

    xvfb-run -a -s "-screen 0 1920x1080x24" python -m gui.screenshot_layout
        # -> docs/screenshots/layout_{1280,1920}_{light,dark}.png
    python -m gui.screenshot_layout --sizes 1280x800 --themes dark --out-dir /tmp/shots --extras

Each picture is a fresh window with fresh settings, sized as a user's first start on that
screen would be, with the bundled demo open, its exact sensitivity measured through the real
worker and the Sensitivity dock open: the state in which the layer table used to shrink to two
rows. ``--extras`` also saves the Plan panel, the Pareto panel and the Graph panel in each look,
the other places where clipping, overlaps and an unthemed panel were found. Fusion style and a
fixed font keep the pictures comparable between runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings

from gui.screenshot_analysis import DEFAULT_DIR, save, settle

SIZES = ((1280, 800), (1920, 1080))
THEMES = ("light", "dark")


def take_layout(out_dir: Path, sizes: tuple[tuple[int, int], ...] = SIZES, themes: tuple[str, ...] = THEMES,
                *, extras: bool = False) -> list[Path]:
    """One picture per size and look (plus the panels with ``extras``); returns the PNGs."""
    from engine.demo import DEMO_MODEL

    from gui.analysis import install_analysis
    from gui.app import create_app
    from gui.main_window import MainWindow
    from gui.project import DataChoice
    from gui.screenshot import _fix_look
    from gui.theme import THEME_KEY

    app = create_app()
    _fix_look(app)
    taken: list[Path] = []
    for theme in themes:
        for width, height in sizes:
            with tempfile.TemporaryDirectory() as scratch:
                settings = QSettings(str(Path(scratch) / "settings.ini"), QSettings.Format.IniFormat)
                settings.setValue(THEME_KEY, theme)  # the window applies the saved look, as on a start
                errors: list[str] = []
                window = MainWindow(settings, show_error=lambda _p, message, _d: errors.append(message),
                                    ask_save_changes=lambda _parent, _what: "discard")
                install_analysis(window)  # a no-op once MainWindow installs it itself
                analysis = window.analysis  # type: ignore[attr-defined]
                window.resize(width, height)
                window.show()
                job = window.open_model(DEMO_MODEL)
                settle(120, lambda: job.finished, "the demo model to load")
                if window.session.model is None:
                    raise RuntimeError(errors[0] if errors else "the demo model did not load")
                window.session.select_layer("features.3")
                run = analysis.run(DataChoice(spec="demo", method="exact", limit=0, ranks=True))
                settle(300, lambda: run.finished, "the sensitivity analysis")
                if analysis.state.sensitivity is None:
                    raise RuntimeError(errors[0] if errors else "the sensitivity analysis failed")
                settle(30, lambda: not window.session.busy, "layer statistics")
                settle(30, lambda: window.session.plan_state.metric is not None, "the predicted metric")
                window.statusBar().clearMessage()
                stem = f"layout_{width}_{theme}"
                taken.append(save(window, out_dir / f"{stem}.png"))
                if extras:
                    taken.append(save(window.plan_editor, out_dir / f"{stem}_plan.png"))
                    analysis.show_pareto()
                    settle(60, lambda: bool(analysis.pareto_panel.front), "the Pareto front")
                    taken.append(save(window, out_dir / f"{stem}_pareto.png"))
                    analysis.show_graph()
                    settle(1.0)
                    taken.append(save(window, out_dir / f"{stem}_graph.png"))
                window.close()
                settle(0.2)
    return taken


def _size(text: str) -> tuple[int, int]:
    width, height = (int(part) for part in text.lower().split("x"))
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save screenshots of the layout at common sizes")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIR, help=f"folder for the PNGs (default: {DEFAULT_DIR})")
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES), help="WIDTHxHEIGHT,…")
    parser.add_argument("--themes", default=",".join(THEMES), help="light, dark or both")
    parser.add_argument("--extras", action="store_true", help="also the Plan, Pareto and Graph panels")
    args = parser.parse_args(argv)
    sizes = tuple(_size(part) for part in args.sizes.split(",") if part.strip())
    themes = tuple(part.strip() for part in args.themes.split(",") if part.strip())
    if set(themes) - set(THEMES):
        parser.error(f"unknown theme {sorted(set(themes) - set(THEMES))[0]!r}")
    take_layout(args.out_dir, sizes, themes, extras=args.extras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
