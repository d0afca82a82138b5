"""Light and dark looks: one QPalette each, plots restyled to match, the choice kept in QSettings.

Widgets take their colours from the palette, so swapping the application palette recolours
every panel that reads its colours at paint time. pyqtgraph plots do not: their background and
axis pens are set once, so :func:`style_plot` is the one place that derives them from a palette,
used by panels when they are built and by :func:`apply_theme` on every plot already on screen.
"System" keeps the platform's own style and palette; light and dark use Fusion, the style that
honours a palette everywhere.

Run alone to compare the looks: ``python -m gui.theme [light|dark] [--screenshot PNG]``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pyqtgraph as pg
from PySide6.QtCore import QObject, QSettings, Qt, Signal
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QWidget

THEME_KEY = "appearance/theme"
SYSTEM, LIGHT, DARK = "system", "light", "dark"
THEMES = (SYSTEM, LIGHT, DARK)
THEME_LABELS = {SYSTEM: "&System", LIGHT: "&Light", DARK: "&Dark"}

Role = QPalette.ColorRole
Group = QPalette.ColorGroup


@dataclass(frozen=True)
class Colors:
    """The few colours a look is made of; everything else in the palette derives from them."""

    window: str
    text: str
    base: str
    alternate: str
    button: str
    highlight: str
    highlighted_text: str
    placeholder: str
    mid: str
    dark: str
    light: str
    disabled_text: str
    link: str
    tooltip: str
    bright_text: str


LOOKS: dict[str, Colors] = {
    LIGHT: Colors(
        window="#f3f4f6", text="#1f2328", base="#ffffff", alternate="#f6f8fa",
        button="#eceef1", highlight="#2f6fdb", highlighted_text="#ffffff",
        placeholder="#6a737d", mid="#c3c8ce", dark="#9099a2", light="#ffffff",
        disabled_text="#a0a6ad", link="#0b62d6", tooltip="#fdfdfd", bright_text="#c62828",
    ),
    DARK: Colors(
        window="#2b2d31", text="#dfe1e5", base="#1f2023", alternate="#26282c",
        button="#393b40", highlight="#3d7ae0", highlighted_text="#ffffff",
        placeholder="#8b9098", mid="#4d5057", dark="#18191b", light="#4a4d54",
        disabled_text="#6c7078", link="#6aa6ff", tooltip="#393b40", bright_text="#ff7b72",
    ),
}


#: Colours that carry a meaning, each readable on its look's base colour: ``good`` only for a
#: change for the better, ``bad`` for worse, ``warning`` for "look at this", ``neutral`` for a
#: change that is neither (a small loss of accuracy is not good news, so it is never green).
GOOD, BAD, WARNING, NEUTRAL = "good", "bad", "warning", "neutral"
STATUS_COLORS: dict[str, dict[str, str]] = {
    LIGHT: {GOOD: "#2e7d32", BAD: "#c62828", WARNING: "#a15c00", NEUTRAL: "#57606a"},
    DARK: {GOOD: "#7bd88f", BAD: "#ff7b72", WARNING: "#f0b35a", NEUTRAL: "#a8afb8"},
}
#: Badge text and background per meaning, for light and dark windows.
BADGE_COLORS: dict[str, dict[str, tuple[str, str]]] = {
    LIGHT: {GOOD: ("#1b5e20", "#dcedc8"), WARNING: ("#7a4f01", "#ffe9b3")},
    DARK: {GOOD: ("#c8f0cf", "#24452b"), WARNING: ("#ffe2ad", "#55401a")},
}


def look_of(palette: QPalette | None = None) -> str:
    """LIGHT or DARK: which set of meaning colours suits `palette` (default: the app's)."""
    if palette is None:
        app = QApplication.instance()
        palette = app.palette() if isinstance(app, QApplication) else QPalette()
    return DARK if is_dark(palette) else LIGHT


def status_color(meaning: str, palette: QPalette | None = None) -> str:
    """The colour of GOOD, BAD, WARNING or NEUTRAL on `palette` (default: the app's), as #rrggbb."""
    return STATUS_COLORS[look_of(palette)][meaning]


def change_meaning(change: float, higher_is_better: bool = True, tolerance: float = 0.0) -> str:
    """GOOD for a change for the better, BAD for one for the worse beyond `tolerance`, NEUTRAL
    otherwise: what colour a before/after difference deserves."""
    better = change if higher_is_better else -change
    if better > 0:
        return GOOD
    return BAD if -better > tolerance else NEUTRAL


def make_palette(colors: Colors) -> QPalette:
    """A complete palette (all groups and the roles Fusion reads) from a look's colours."""
    palette = QPalette()
    window, base = QColor(colors.window), QColor(colors.base)
    roles = {
        Role.Window: window,
        Role.WindowText: QColor(colors.text),
        Role.Base: base,
        Role.AlternateBase: QColor(colors.alternate),
        Role.ToolTipBase: QColor(colors.tooltip),
        Role.ToolTipText: QColor(colors.text),
        Role.PlaceholderText: QColor(colors.placeholder),
        Role.Text: QColor(colors.text),
        Role.Button: QColor(colors.button),
        Role.ButtonText: QColor(colors.text),
        Role.BrightText: QColor(colors.bright_text),
        Role.Light: QColor(colors.light),
        Role.Midlight: QColor(colors.button).lighter(110),
        Role.Mid: QColor(colors.mid),
        Role.Dark: QColor(colors.dark),
        Role.Shadow: QColor(colors.dark).darker(150),
        Role.Highlight: QColor(colors.highlight),
        Role.HighlightedText: QColor(colors.highlighted_text),
        Role.Link: QColor(colors.link),
        Role.LinkVisited: QColor(colors.link).darker(120),
    }
    for role, color in roles.items():
        palette.setColor(role, color)
    for role in (Role.WindowText, Role.Text, Role.ButtonText, Role.PlaceholderText):
        palette.setColor(Group.Disabled, role, QColor(colors.disabled_text))
    palette.setColor(Group.Disabled, Role.Highlight, QColor(colors.mid))
    palette.setColor(Group.Inactive, Role.Highlight, QColor(colors.highlight))
    return palette


def _stylesheet(colors: Colors) -> str:
    """The touches a palette cannot express: tooltips, dock titles, group box titles."""
    return f"""
QToolTip {{ color: {colors.text}; background: {colors.tooltip};
           border: 1px solid {colors.mid}; padding: 4px 6px; }}
QDockWidget::title {{ padding: 5px 8px; background: {colors.button};
                     border-bottom: 1px solid {colors.mid}; }}
QGroupBox {{ font-weight: bold; }}
"""


def is_dark(palette: QPalette) -> bool:
    """Whether a palette draws light text on a dark window (true of any dark look, ours or not)."""
    return palette.color(Role.Window).lightness() < palette.color(Role.WindowText).lightness()


def style_plot(widget: pg.GraphicsView, palette: QPalette) -> None:
    """Background, axes and titles of one pyqtgraph widget in the palette's colours."""
    text = palette.color(Role.WindowText)
    widget.setBackground(palette.color(Role.Base))
    for item in widget.scene().items():
        if isinstance(item, pg.AxisItem):
            item.setPen(pg.mkPen(palette.color(Role.Mid)))
            item.setTextPen(pg.mkPen(text))
        elif isinstance(item, pg.LabelItem):
            item.setText(item.text, color=text)


class ThemeSignals(QObject):
    """`changed(name)` after a look was applied, for panels with colours of their own."""

    changed = Signal(str)


#: Emits after :func:`apply_theme`; panels connect to restyle what the palette does not reach.
theme_signals = ThemeSignals()
_system: dict[str, object] = {}


def apply_theme(name: str, app: QApplication | None = None) -> str:
    """Make `name` the look of the whole application and every plot on screen; returns it."""
    if name not in THEMES:
        name = SYSTEM
    app = app or QApplication.instance()  # type: ignore[assignment]
    assert isinstance(app, QApplication)
    if not _system:  # remember the platform's look once, to go back to it
        _system.update(style=app.style().name() or "fusion", palette=QPalette(app.palette()))
        if name == SYSTEM:  # nothing was changed yet: re-styling every widget would be wasted
            app.setProperty("slimscope_theme", name)
            return name
    # Style, then palette, then style sheet: a style sheet set before the palette keeps the
    # palette widgets had when it polished them (tables and menus stayed light).
    if name == SYSTEM:
        app.setStyleSheet("")
        app.setStyle(str(_system["style"]))
        palette = QPalette(_system["palette"])  # type: ignore[arg-type]
        app.setPalette(palette)
    else:
        app.setStyleSheet("")
        app.setStyle("Fusion")
        palette = make_palette(LOOKS[name])
        app.setPalette(palette)
        app.setStyleSheet(_stylesheet(LOOKS[name]))
    # Web pages (Netron) read prefers-color-scheme from here, not from the palette.
    scheme = {LIGHT: Qt.ColorScheme.Light, DARK: Qt.ColorScheme.Dark}.get(name, Qt.ColorScheme.Unknown)
    app.styleHints().setColorScheme(scheme)
    pg.setConfigOptions(background=palette.color(Role.Base), foreground=palette.color(Role.WindowText))
    # Only plots of windows on screen: closed windows may be half torn down (deleteLater pending),
    # and touching their scenes crashes; a window shown later builds its plots in the new look.
    for window in app.topLevelWidgets():
        if window.isVisible():
            plots = window.findChildren(pg.GraphicsView)
            for plot in [window, *plots] if isinstance(window, pg.GraphicsView) else plots:
                style_plot(plot, palette)
    app.setProperty("slimscope_theme", name)
    theme_signals.changed.emit(name)
    return name


def current_theme(app: QApplication | None = None) -> str:
    app = app or QApplication.instance()  # type: ignore[assignment]
    value = app.property("slimscope_theme") if app is not None else None
    return value if value in THEMES else SYSTEM


def saved_theme(settings: QSettings) -> str:
    value = settings.value(THEME_KEY, SYSTEM)
    return value if value in THEMES else SYSTEM


def set_theme(name: str, settings: QSettings) -> str:
    """Apply `name` and remember it for the next start."""
    applied = apply_theme(name)
    settings.setValue(THEME_KEY, applied)
    return applied


def _main(argv: list[str]) -> int:
    """Show a sampler of common widgets and a plot in one look."""
    import argparse

    from PySide6.QtWidgets import (QCheckBox, QComboBox, QLineEdit, QPushButton, QVBoxLayout)

    from gui.preview import ensure_app

    parser = argparse.ArgumentParser(description="Preview a theme")
    parser.add_argument("theme", nargs="?", default=DARK, choices=THEMES)
    parser.add_argument("--screenshot", help="save the sampler to PNG and exit")
    args = parser.parse_args(argv)
    app = ensure_app()
    apply_theme(args.theme, app)
    window = QWidget()
    layout = QVBoxLayout(window)
    layout.addWidget(QLineEdit("text field"))
    combo = QComboBox()
    combo.addItems(["exact", "fast", "data-free"])
    layout.addWidget(combo)
    layout.addWidget(QCheckBox("a check box"))
    layout.addWidget(QPushButton("A button"))
    plot = pg.PlotWidget(title="a plot")
    plot.plot([0, 1, 2, 3], [1, 3, 2, 4], pen=pg.mkPen(app.palette().color(Role.Highlight), width=2))
    style_plot(plot, app.palette())
    layout.addWidget(plot)
    window.resize(420, 460)
    window.show()
    if args.screenshot:
        app.processEvents()
        return 0 if window.grab().save(args.screenshot) else 2
    return app.exec()


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
