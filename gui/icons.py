"""Slimscope's own icon, read from the ``resources`` package wherever it is installed.

The PNGs are rendered from ``resources/icons/slimscope.svg`` by ``packaging/render_icons.py``;
loading them needs no SVG plugin, so the icon looks the same from source, a wheel and the
frozen app (importlib.resources finds ``resources/icons`` in all three).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from PySide6.QtCore import QSize
from PySide6.QtGui import QIcon

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
