"""Render resources/icons/slimscope.svg to the PNG sizes the desktop, the window and the bundle use.

    .venv/bin/python packaging/render_icons.py          # writes resources/icons/slimscope-<N>.png
    .venv/bin/python packaging/render_icons.py --check  # exit 1 if a PNG is missing or stale

Uses QtSvg offscreen, so it needs no display and no other tool. Run it after editing the SVG and
commit the PNGs: the app and the tests read the PNGs, never render at run time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ICONS = ROOT / "resources" / "icons"
SVG = ICONS / "slimscope.svg"
#: The hicolor sizes a Linux desktop looks for, plus 512 for AppStream and high-DPI docks.
SIZES = (16, 32, 48, 64, 128, 256, 512)


def png_path(size: int) -> Path:
    return ICONS / f"slimscope-{size}.png"


def render(svg: Path, size: int):
    """The SVG drawn into a transparent `size`×`size` ARGB image."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise ValueError(f"{svg} is not an SVG Qt can draw")
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
    renderer.render(painter)
    painter.end()
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that every PNG exists and matches the SVG")
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication, QImage

    app = QGuiApplication.instance() or QGuiApplication([sys.argv[0]])  # noqa: F841 - fonts, plugins
    stale = []
    for size in SIZES:
        image = render(SVG, size)
        target = png_path(size)
        if args.check:
            current = QImage(str(target))
            if current.isNull() or current.convertToFormat(image.format()) != image:
                stale.append(target.name)
            continue
        if not image.save(str(target), "PNG"):
            raise OSError(f"could not write {target}")
        print(f"{target.relative_to(ROOT)}  {size}x{size}")
    if stale:
        print("stale or missing: " + ", ".join(stale) + " (run packaging/render_icons.py)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
