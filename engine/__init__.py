"""Slimscope's engine: the Qt-free brain behind both the desktop app and the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slimscope")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
