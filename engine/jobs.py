"""Long work as plain functions: a progress callback and a cancel token, no threads.

The GUI wraps these in workers; the CLI calls them directly. Stages of a job map onto
sub-ranges of one progress bar with :func:`sub_progress`.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol


class Cancelled(Exception):
    """Raised inside a job when its cancel token was set; the job's inputs are untouched."""


class Progress(Protocol):
    def __call__(self, fraction: float, message: str = "") -> None: ...


def no_progress(fraction: float, message: str = "") -> None:
    """A progress callback that ignores everything, for callers that don't watch."""


class CancelToken:
    """Thread-safe flag a job polls; `check()` raises :class:`Cancelled` once set."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


NEVER_CANCELLED = CancelToken()


def sub_progress(progress: Progress, start: float, stop: float) -> Progress:
    """Map a stage's own 0..1 progress onto [start, stop] of its parent's bar."""
    span = stop - start

    def report(fraction: float, message: str = "") -> None:
        progress(start + span * min(max(fraction, 0.0), 1.0), message)

    return report


ProgressCallback = Callable[[float, str], None]
