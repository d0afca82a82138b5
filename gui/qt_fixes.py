"""Work around a PySide6 defect that aborts a long-running app on Python 3.11.

PySide6 6.12 returns the singletons ``None``, ``True`` and ``False`` without taking the
reference it later gives back: every call of a wrapped method returning ``void`` drops one
reference to ``None`` (``setText``, ``processEvents``, ``update``, ``QModelIndex.data()`` of an
empty cell…) and every signal ``emit`` drops one to ``True``. Python 3.12 made these objects
immortal, so nothing happens there; on 3.11 their counts drain and after a few thousand calls
the process dies with "Fatal Python error: none_dealloc" (or "bool_dealloc"). Found here: any
loop around ``processEvents()`` aborts within seconds, and a test session at exit.

The cure is what Python 3.12 does: make the three effectively immortal by giving their
reference counts a reserve no run can use up. It is applied only when a probe shows the leak, so
a fixed PySide6 leaves the interpreter untouched. Imported by ``gui/__init__.py`` and by
``gui/workers.py`` (which every window and panel imports, also under pytest, where the
``tests/gui`` folder shadows the package and ``gui/__init__.py`` does not run).
"""

from __future__ import annotations

import ctypes
import sys

#: References added to each singleton: 2**40 leaked calls would take decades.
RESERVE = 1 << 40
_PROBE_CALLS = 64


def none_leak_per_call() -> float:
    """References to None lost per call of a void PySide method (0 on a sound build)."""
    from PySide6.QtCore import QObject

    probe = QObject()
    before = sys.getrefcount(None)
    for _ in range(_PROBE_CALLS):
        probe.setObjectName("probe")
    return (before - sys.getrefcount(None)) / _PROBE_CALLS


def make_singletons_immortal() -> bool:
    """Give None, True and False a reserve of references when this PySide6 leaks them."""
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return False  # immortal already
    if none_leak_per_call() < 0.5:
        return False
    for singleton in (None, True, False):
        ctypes.c_ssize_t.from_address(id(singleton)).value += RESERVE  # ob_refcnt comes first
    return True


PROTECTED = make_singletons_immortal()
