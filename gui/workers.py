"""Run plain engine jobs off the GUI thread and hear about them through Qt signals.

Engine work is a plain function taking a progress callback and a cancel token (see
:mod:`engine.jobs`); it knows nothing of threads. :class:`Job` wraps such a function; connect to its
signals, then :meth:`Job.start` runs it on a :class:`QThreadPool`. Signals arrive on the thread
that created the job (the GUI thread), so slots may touch widgets. Failures arrive as one line
for the user plus optional details.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal

from engine.errors import SlimscopeError
from engine.jobs import Cancelled, CancelToken, Progress

#: A job body: ``fn(progress, cancel) -> result``.
JobFunction = Callable[[Progress, CancelToken], Any]

# Jobs whose runnable is still queued or running. Holding them here keeps the Python objects
# (and their signals) alive even when the caller drops its reference.
_LIVE: set["Job"] = set()


def one_line(exc: BaseException) -> str:
    """The message a user sees: ours as written, anyone else's prefixed with its type."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, SlimscopeError) and first:
        return first
    if isinstance(exc, MemoryError):
        return "not enough memory for this operation"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def error_details(exc: BaseException) -> str:
    """A traceback for the 'details' box; empty for our own errors, which say all there is."""
    if isinstance(exc, SlimscopeError) and exc.__cause__ is None:
        return ""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


class Job(QObject):
    """One run of a job function; signals are delivered on the thread that created the job.

    Exactly one of ``succeeded``, ``failed`` or ``cancelled`` fires, then ``done``. Connect
    them to methods of a QObject, not to lambdas: Qt drops a connection when its receiving
    object is destroyed, so a job finishing after its window closed calls nothing.
    """

    progress = Signal(float, str)
    succeeded = Signal(object)
    #: one-line message, details (may be empty), the exception itself
    failed = Signal(str, str, object)
    cancelled = Signal()
    done = Signal()

    def __init__(self, fn: JobFunction, name: str = "", context: Any = None) -> None:
        super().__init__()
        self.fn = fn
        self.name = name
        #: Whatever the starter needs to interpret the result; read back via ``sender()``.
        self.context = context
        self.token = CancelToken()
        self.finished = False
        self.done.connect(self._forget)

    def start(self, pool: QThreadPool | None = None, priority: int = 0) -> "Job":
        """Queue the body on `pool` (the global one by default).

        Connect every slot before calling this: a signal emitted on the worker before a
        connection exists is lost.
        """
        _LIVE.add(self)
        (pool or QThreadPool.globalInstance()).start(_Runnable(self), priority)
        return self

    def cancel(self) -> None:
        """Ask the job to stop at its next check; a queued job will not start its body."""
        self.token.cancel()

    @property
    def is_cancelled(self) -> bool:
        return self.token.cancelled

    def _report(self, fraction: float, message: str = "") -> None:
        self._emit(self.progress, float(fraction), message)

    def run_here(self) -> None:
        """Run the body on the calling thread, emitting the same signals a worker would."""
        try:
            self.token.check()
            result = self.fn(self._report, self.token)
        except Cancelled:
            self._emit(self.cancelled)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message, never a crash
            self._emit(self.failed, one_line(exc), error_details(exc), exc)
        else:
            if self.token.cancelled:
                self._emit(self.cancelled)
            else:
                self._emit(self.succeeded, result)
        finally:
            self._emit(self.done)

    @staticmethod
    def _emit(signal: Any, *args: Any) -> None:
        try:
            signal.emit(*args)
        except RuntimeError:  # the Qt side is gone (app shutting down): nobody is listening
            pass

    def _forget(self) -> None:
        self.finished = True
        _LIVE.discard(self)


class _Runnable(QRunnable):
    def __init__(self, job: Job) -> None:
        super().__init__()
        self.job = job
        self.setAutoDelete(True)

    def run(self) -> None:
        self.job.run_here()


def live_jobs() -> list[Job]:
    """Jobs not yet done, for shutting down cleanly."""
    return list(_LIVE)


def cancel_all() -> None:
    for job in list(_LIVE):
        job.cancel()
