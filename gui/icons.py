"""Slimscope's own icon, read from the ``resources`` package wherever it is installed, and the
few icons drawn in code so that they follow the look (see :func:`arrow_icon`).

The PNGs are rendered from ``resources/icons/slimscope.svg`` by ``packaging/render_icons.py``;
loading them needs no SVG plugin, so the icon looks the same from source, a wheel and the
frozen app (importlib.resources finds ``resources/icons`` in all three).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from PySide6.QtCore import QPointF, QSize, Qt
from PySide6.QtGui import QColor, QIcon, QPainter, QPainterPath, QPen, QPixmap, QPolygonF

#: The sizes rendered next to the SVG, smallest first.
ICON_SIZES = (16, 32, 48, 64, 128, 256, 512)


def icons_dir() -> Path:
    return Path(str(files("resources") / "icons"))


def icon_path(size: int) -> Path:
    """The PNG of the app icon at `size` pixels, one of ICON_SIZES."""
    if size not in ICON_SIZES:
        raise ValueError(f"no {size}px icon; sizes are {ICON_SIZES}")
    return icons_dir() / f"slimscope-{size}.png"


def app_icon() -> QIcon:
    """The window and application icon, with every rendered size so Qt never scales far.

    Empty (``isNull()``) only when the icon files are missing, which the packaging tests catch.
    """
    icon = QIcon()
    for size in ICON_SIZES:
        path = icon_path(size)
        if path.is_file():
            icon.addFile(str(path), QSize(size, size))
    return icon


#: Sizes drawn for toolbar and menu icons drawn in code.
DRAWN_SIZES = (16, 24, 32, 48)


def arrow_icon(direction: str, color: QColor) -> QIcon:
    """A curved undo ("back") or redo ("forward") arrow in `color`, at every DRAWN_SIZES size.

    The style's own arrows are dark pixmaps whatever the palette, nearly invisible in the dark
    look; these are drawn in the palette's text colour, so each look gets readable ones.
    """
    if direction not in ("back", "forward"):
        raise ValueError(f"direction must be 'back' or 'forward', not {direction!r}")
    icon = QIcon()
    for size in DRAWN_SIZES:
        pixmap = QPixmap(size, size)
        pixmap.fill(Qt.GlobalColor.transparent)
        painter = QPainter(pixmap)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        if direction == "forward":  # the mirror image of "back"
            painter.translate(size, 0)
            painter.scale(-1, 1)
        unit = size / 16
        pen = QPen(color, max(1.5, 1.6 * unit), Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap,
                   Qt.PenJoinStyle.RoundJoin)
        painter.setPen(pen)
        path = QPainterPath(QPointF(4 * unit, 6 * unit))  # a hook: from the arrow head round to the right
        path.cubicTo(QPointF(11 * unit, 6 * unit), QPointF(14 * unit, 8 * unit), QPointF(13 * unit, 11 * unit))
        path.cubicTo(QPointF(12.5 * unit, 13 * unit), QPointF(10 * unit, 13.5 * unit), QPointF(8 * unit, 13.5 * unit))
        painter.drawPath(path)
        painter.setBrush(color)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.drawPolygon(QPolygonF([QPointF(1.5 * unit, 6 * unit), QPointF(6 * unit, 2 * unit),
                                       QPointF(6 * unit, 10 * unit)]))
        painter.end()
        icon.addPixmap(pixmap)
    return icon
