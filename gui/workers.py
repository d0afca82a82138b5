"""Run plain engine jobs off the GUI thread and hear about them through Qt signals.

Engine work is a plain function taking a progress callback and a cancel token (see
:mod:`engine.jobs`); it knows nothing of threads. :class:`Job` wraps such a function; connect to its
signals, then :meth:`Job.start` runs it on a :class:`QThreadPool`. Signals arrive on the thread
that created the job (the GUI thread), so slots may touch widgets. Failures arrive as one line
for the user plus optional details.

:func:`compression_job` and :func:`export_job` run the app's two long jobs, which are the
engine's use cases (:mod:`engine.workflows`), the very functions the CLI calls.
"""

from __future__ import annotations

import copy
import gc
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal

from engine.errors import SlimscopeError
from engine.jobs import Cancelled, CancelToken, Progress

import gui.qt_fixes  # noqa: F401 - also here: under pytest, tests/gui shadows gui/__init__.py

if TYPE_CHECKING:
    from engine.data import DataSpec
    from engine.model import Model
    from engine.workflows import CompressionOutcome

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
    #: Intermediate results the body hands to :meth:`publish` (e.g. recovery step reports).
    partial = Signal(object)
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
        #: Set on the worker once the body returned and every signal was sent: unlike
        #: ``finished`` it needs no event loop, so a caller can wait for it (JobService.wait).
        self.body_ended = threading.Event()
        self.done.connect(self._forget)

    def start(self, pool: QThreadPool | None = None, priority: int = 0) -> "Job":
        """Queue the body on `pool` (the global one by default).

        Connect every slot before calling this: a signal emitted on the worker before a
        connection exists is lost.
        """
        if not _LIVE:
            _pause_collection()
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

    def publish(self, value: Any) -> None:
        """Send `value` to the GUI thread as ``partial`` while the body runs (thread-safe)."""
        self._emit(self.partial, value)

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
            self.body_ended.set()

    @staticmethod
    def _emit(signal: Any, *args: Any) -> None:
        try:
            signal.emit(*args)
        except RuntimeError:  # the Qt side is gone (app shutting down): nobody is listening
            pass

    def _forget(self) -> None:
        self.finished = True
        _LIVE.discard(self)
        if not _LIVE:
            _resume_collection()


class _Runnable(QRunnable):
    def __init__(self, job: Job) -> None:
        super().__init__()
        self.job = job
        self.setAutoDelete(True)

    def run(self) -> None:
        self.job.run_here()


#: Whether automatic garbage collection was on when the first of the live jobs started.
_COLLECTION_PAUSED = False


def _pause_collection() -> None:
    """No automatic garbage collection while a worker runs.

    Seen here: in about one full GUI test run in three, the process died with a segmentation
    fault while the GUI thread was garbage collecting and a loader worker was walking an ONNX
    graph (PySide6 6.12 on Python 3.11, see gui.qt_fixes). Reference counting still frees
    almost everything; cycles wait until the last job ends, when :func:`_resume_collection`
    turns collection back on (and the next allocation may collect them, on the GUI thread).
    """
    global _COLLECTION_PAUSED
    if gc.isenabled():
        gc.disable()
        _COLLECTION_PAUSED = True


def _resume_collection() -> None:
    """Turn automatic collection back on, with what exists now frozen (gc.freeze): the first
    full collection after a job otherwise walks every object torch, Qt and the model made, on
    the GUI thread, and froze the window for 250 ms at the end of each compression
    (tests/benchmarks/gui_stall.py). Frozen objects are still freed by reference counting;
    only cycles among them wait, and a job leaves few (10 objects were collected then)."""
    global _COLLECTION_PAUSED
    if _COLLECTION_PAUSED:
        _COLLECTION_PAUSED = False
        gc.freeze()
        gc.enable()


def live_jobs() -> list[Job]:
    """Jobs not yet done, for shutting down cleanly."""
    return list(_LIVE)


def cancel_all() -> None:
    for job in list(_LIVE):
        job.cancel()


# -- the app's long jobs ------------------------------------------------------------------------
def import_first(*modules: str) -> None:
    """Import what a job needs before its work starts, on the job's worker thread.

    Once these ran on the GUI thread: in about one full GUI test run in four the process
    aborted while a worker imported ``onnxruntime.quantization`` for the first time and the GUI
    thread was garbage collecting. Automatic collection is now paused while any worker runs
    (:func:`_pause_collection`), so the first import moved to the worker: on the GUI thread it
    froze the window for 1.1 s at the start of a compression (sklearn, tests/benchmarks/gui_stall.py).
    """
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the job itself reports a missing optional package in its own words


#: What compression and export import first: sklearn alone takes 1.4 s, and its extension
#: modules hold the interpreter lock for up to 120 ms at a time, which the GUI thread feels.
WARM_UP_MODULES = ("engine.compress", "engine.export", "sklearn.datasets",
                   "sklearn.model_selection", "onnxruntime.quantization")
_warmed_up = False


def warm_up_imports() -> Job | None:
    """Import :data:`WARM_UP_MODULES` on a worker once per session, right after the first model
    opens (while the user is still reading it), so no later job pays them while being watched."""
    global _warmed_up
    if _warmed_up:
        return None
    _warmed_up = True
    job = Job(lambda _progress, _cancel: import_first(*WARM_UP_MODULES), "warm up imports")
    job.start()
    return job


def compression_job(model: "Model", plan_data: dict[str, Any], data: "DataSpec") -> Job:
    """:func:`engine.workflows.compress` on a worker, with a snapshot of the plan; succeeds with
    a CompressionOutcome.

    Recovery steps arrive on ``partial`` as :class:`engine.workflows.RecoveryStep` events. The
    loaded model is never modified (the engine works on a copy), so a cancel or a failure
    leaves the session exactly as it was. Torch uses the process's thread count (the thread
    policy, engine.threads, as in the CLI: ``--threads N`` on both sides replays a plan bit for
    bit, since float sums split over other thread counts round differently).
    """
    import torch

    plan_data = copy.deepcopy(plan_data)
    threads = torch.get_num_threads()  # the GUI thread's: the process's policy
    specs = [spec or "" for spec in (data.evaluation, data.calibration, data.train)]
    first_imports = ("engine.compress", *(["sklearn.datasets", "sklearn.model_selection"]
                                          if any(spec.startswith("demo") for spec in specs)
                                          else []))

    def body(progress: Progress, cancel: CancelToken) -> "CompressionOutcome":
        import_first(*first_imports)
        from engine import workflows

        torch.set_num_threads(threads)  # per thread: a pooled thread may carry another job's cap
        outcome = workflows.compress(model, plan_data, data, progress=progress, cancel=cancel,
                                     on_event=job.publish)
        outcome.opened = None  # the session keeps the result: let the sources go, export reopens
        return outcome

    job = Job(body, f"compress {model.path.name}")
    return job


def export_job(outcome: "CompressionOutcome", destination: Path, format_name: str | None,
               inputs: Sequence[Path] = ()) -> Job:
    """:func:`engine.workflows.export` on a worker; succeeds with an ExportResult."""
    def body(progress: Progress, cancel: CancelToken) -> Any:
        import_first("engine.export", "onnxruntime", "onnxruntime.quantization")
        from engine import workflows

        return workflows.export(outcome, destination, format=format_name, inputs=list(inputs),
                                progress=progress, cancel=cancel)

    return Job(body, f"export {destination.name}", destination)
