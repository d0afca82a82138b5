"""Slimscope desktop app: a Qt face over the engine; holds no compression logic."""

from gui import qt_fixes as _qt_fixes  # noqa: F401 - must run before any window exists
