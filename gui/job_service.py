"""Every background job of the app, under one set of rules.

The app runs its work in named *slots* ("load", "sensitivity", "front", "allocate", "compress",
"export"). :class:`JobService` owns the rules that each place used to restate with its own
"is this still the current job?" check:

- one thread pool for all of them (the global one unless given another, so the app's shutdown
  wait covers every job);
- one current job per slot: starting a job in a busy slot cancels the old one, and whatever
  the old one still sends (progress, result, failure, end) is dropped;
- one progress throttle: at most one progress report per :data:`PROGRESS_INTERVAL_MS` per slot
  reaches the GUI, and the last one always does, before the job's outcome;
- one place that turns an engine error into a one-line message plus details
  (:func:`describe_failure`, built on gui.workers.one_line / error_details).

Handlers are plain callables run on the GUI thread, only for the slot's current job. Like Qt
connections they are skipped once their QObject is destroyed, so a job that ends after its
dialog closed calls nothing. The running slots are mirrored into the application state
(``AppState.jobs``) when one is given, which is how views learn what runs.

It wraps :class:`gui.workers.Job` (its signals, cancel token and garbage-collection pause).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import shiboken6
from PySide6.QtCore import QObject, QThreadPool, QTimer, Signal

from engine.app_state import AppState

from gui.workers import Job, JobFunction, error_details, one_line

#: Shortest time between two progress reports of one slot that reach the GUI. Recovery reports
#: every step, hundreds a second: repainting for each would keep the GUI thread (and the
#: interpreter lock the worker needs) busy and slow the job itself down.
PROGRESS_INTERVAL_MS = 100

LOAD, SENSITIVITY, FRONT, ALLOCATE, COMPRESS, EXPORT = (
    "load", "sensitivity", "front", "allocate", "compress", "export")


@dataclass(frozen=True)
class Failure:
    """What the user is told about a failed job: one line, optional details, the exception."""

    message: str
    details: str
    exception: BaseException | None


def describe_failure(exc: BaseException) -> Failure:
    """The one place an engine error becomes a one-line message (never a newline in it)."""
    message = " ".join(one_line(exc).split()) or type(exc).__name__
    return Failure(message, error_details(exc), exc)


@dataclass
class Handlers:
    """What to call, on the GUI thread, as the slot's current job goes along."""

    progress: Callable[[float, str], Any] | None = None
    partial: Callable[[Any], Any] | None = None
    result: Callable[[Any], Any] | None = None
    #: ``error(message, details, exception)``
    error: Callable[[str, str, Any], Any] | None = None
    cancelled: Callable[[], Any] | None = None
    #: After the outcome, however it ended; the slot is already free then.
    done: Callable[[], Any] | None = None


@dataclass(eq=False)
class _Running:
    slot: str
    job: Job
    handlers: Handlers
    last_progress: float = float("-inf")
    pending: tuple[float, str] | None = None
    timer: QTimer | None = field(default=None, repr=False)


class JobService(QObject):
    """See the module docstring."""

    #: A job started in a slot: slot, job.
    started = Signal(str, object)
    #: The slot's current job ended (not emitted for a dropped one): slot.
    finished = Signal(str)

    def __init__(self, state: AppState | None = None, parent: QObject | None = None, *,
                 pool: QThreadPool | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.pool = pool or QThreadPool.globalInstance()
        self._running: dict[str, _Running] = {}
        #: Every job started here whose body may still run (current or dropped), for wait().
        self._started: set[Job] = set()

    # -- starting and stopping ---------------------------------------------------------------------
    def start(self, slot: str, work: Job | JobFunction, name: str = "", *, context: Any = None,
              priority: int = 0, on_progress: Callable[[float, str], Any] | None = None,
              on_partial: Callable[[Any], Any] | None = None,
              on_result: Callable[[Any], Any] | None = None,
              on_error: Callable[[str, str, Any], Any] | None = None,
              on_cancelled: Callable[[], Any] | None = None,
              on_done: Callable[[], Any] | None = None) -> Job:
        """Run `work` (a Job or a job function) as `slot`'s current job.

        A job already running there is cancelled and dropped first. Anything else connected to
        the job before this call (e.g. a live plot on ``partial``) still hears it."""
        job = work if isinstance(work, Job) else Job(work, name or slot, context)
        self._drop(slot)
        record = _Running(slot, job, Handlers(on_progress, on_partial, on_result, on_error,
                                              on_cancelled, on_done))
        self._running[slot] = record
        self._started.add(job)
        job.progress.connect(self._on_progress)
        job.partial.connect(self._on_partial)
        job.succeeded.connect(self._on_succeeded)
        job.failed.connect(self._on_failed)
        job.cancelled.connect(self._on_cancelled)
        job.done.connect(self._on_done)
        if self.state is not None:
            self.state.set_job(slot, job.name)
        self.started.emit(slot, job)
        job.start(self.pool, priority)
        return job

    def current(self, slot: str) -> Job | None:
        record = self._running.get(slot)
        return record.job if record is not None else None

    def busy(self, slot: str) -> bool:
        return slot in self._running

    def running_slots(self) -> list[str]:
        return list(self._running)

    def cancel(self, slot: str, *, forget: bool = False) -> bool:
        """Ask `slot`'s job to stop; its ``cancelled`` and ``done`` handlers still run, unless
        `forget`, which drops it at once (e.g. its model is gone). Returns whether one ran."""
        record = self._running.get(slot)
        if record is None:
            return False
        if forget:
            self._drop(slot)
        else:
            record.job.cancel()
        return True

    def cancel_all(self, *, forget: bool = False) -> None:
        for slot in list(self._running):
            self.cancel(slot, forget=forget)

    def wait(self, timeout_ms: int = 5000) -> bool:
        """Block until every job started here (dropped ones too) has left its worker; True when
        all did within `timeout_ms`. Needs no event loop; signals they sent arrive later."""
        deadline = time.monotonic() + timeout_ms / 1000
        for job in list(self._started):
            if not job.body_ended.wait(max(0.0, deadline - time.monotonic())):
                return False
            self._started.discard(job)
        return True

    def _drop(self, slot: str) -> None:
        record = self._running.pop(slot, None)
        if record is None:
            return
        record.job.cancel()
        if record.timer is not None:
            record.timer.stop()
        if self.state is not None:
            self.state.set_job(slot, None)

    # -- the current job's signals ----------------------------------------------------------------
    def _record(self) -> _Running | None:
        """The record of the job that sent this signal, if it is still its slot's current job."""
        job = self.sender()
        for record in self._running.values():
            if record.job is job:
                return record
        return None

    def _on_progress(self, fraction: float, message: str) -> None:
        record = self._record()
        if record is None:
            return
        record.pending = (fraction, message)
        wait_ms = PROGRESS_INTERVAL_MS - (time.monotonic() - record.last_progress) * 1000
        if wait_ms <= 0:
            self._flush(record)
            return
        if record.timer is None:
            record.timer = QTimer(self, singleShot=True)
            record.timer.timeout.connect(lambda record=record: self._flush(record))
        if not record.timer.isActive():
            record.timer.start(int(wait_ms) + 1)

    def _flush(self, record: _Running) -> None:
        """Deliver the latest progress report held back by the throttle, if any."""
        if record.timer is not None:
            record.timer.stop()
        pending, record.pending = record.pending, None
        if pending is None or self._running.get(record.slot) is not record:
            return
        record.last_progress = time.monotonic()
        _call(record.handlers.progress, *pending)

    def _on_partial(self, value: Any) -> None:
        record = self._record()
        if record is not None:
            _call(record.handlers.partial, value)

    def _on_succeeded(self, result: Any) -> None:
        record = self._record()
        if record is not None:
            self._flush(record)
            _call(record.handlers.result, result)

    def _on_failed(self, _message: str, _details: str, exc: object) -> None:
        record = self._record()
        if record is not None:
            self._flush(record)
            failure = (describe_failure(exc) if isinstance(exc, BaseException)
                       else Failure(_message, _details, None))
            _call(record.handlers.error, failure.message, failure.details, failure.exception)

    def _on_cancelled(self) -> None:
        record = self._record()
        if record is not None:
            self._flush(record)
            _call(record.handlers.cancelled)

    def _on_done(self) -> None:
        job = self.sender()
        if isinstance(job, Job) and job.body_ended.is_set():
            self._started.discard(job)
        record = self._record()
        if record is None:
            return
        self._flush(record)
        del self._running[record.slot]
        if self.state is not None:
            self.state.set_job(record.slot, None)
        _call(record.handlers.done)
        self.finished.emit(record.slot)


def _call(handler: Callable[..., Any] | None, *args: Any) -> None:
    """Call `handler` unless it is a method of a QObject Qt already destroyed."""
    if handler is None:
        return
    owner = getattr(handler, "__self__", None)
    if isinstance(owner, QObject) and not shiboken6.isValid(owner):
        return
    handler(*args)
