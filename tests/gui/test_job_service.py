"""The job service: one current job per slot, a progress throttle, one-line errors, cancel_all."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from PySide6.QtCore import QThreadPool

from engine.app_state import AppState
from engine.errors import SlimscopeError
from engine.jobs import CancelToken, Progress

from gui.job_service import PROGRESS_INTERVAL_MS, JobService

WAIT_MS = 10_000


class Heard:
    """What the service delivered for one job, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.times: list[float] = []

    def progress(self, fraction: float, message: str) -> None:
        self.events.append(("progress", (fraction, message)))
        self.times.append(time.monotonic())

    def result(self, value: Any) -> None:
        self.events.append(("result", value))

    def error(self, message: str, details: str, exc: Any) -> None:
        self.events.append(("error", (message, details, exc)))

    def cancelled(self) -> None:
        self.events.append(("cancelled", None))

    def done(self) -> None:
        self.events.append(("done", None))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def handlers(self) -> dict[str, Any]:
        return {"on_progress": self.progress, "on_result": self.result, "on_error": self.error,
                "on_cancelled": self.cancelled, "on_done": self.done}


@pytest.fixture
def service(qtbot: Any) -> JobService:
    pool = QThreadPool()
    pool.setMaxThreadCount(4)
    jobs = JobService(AppState(), pool=pool)
    yield jobs
    jobs.cancel_all()
    assert jobs.wait(WAIT_MS)
    pool.waitForDone(WAIT_MS)


def until_cancelled(started: threading.Event, release: threading.Event | None = None):
    """A body that runs until cancelled; with `release`, it then reports once more before ending
    (a job late to notice it was replaced)."""
    def body(progress: Progress, cancel: CancelToken) -> str:
        started.set()
        while not cancel.cancelled:
            time.sleep(0.005)
        if release is not None:
            release.wait(5)
            progress(0.99, "late report")
        return "late result"

    return body


def test_a_second_job_in_a_busy_slot_cancels_the_first_and_drops_what_it_still_sends(
        qtbot: Any, service: JobService) -> None:
    first, second = Heard(), Heard()
    started, release = threading.Event(), threading.Event()
    old = service.start("load", until_cancelled(started, release), "load a", **first.handlers())
    assert started.wait(5) and service.current("load") is old and service.state.jobs == {"load": "load a"}

    new = service.start("load", lambda progress, cancel: (progress(0.5, "half"), "b")[1], "load b",
                        **second.handlers())
    assert old.is_cancelled and service.current("load") is new
    qtbot.waitUntil(lambda: "done" in second.kinds(), timeout=WAIT_MS)
    release.set()
    qtbot.waitUntil(lambda: old.finished, timeout=WAIT_MS)
    old.succeeded.emit("a result that arrives after its job was replaced")
    qtbot.wait(50)

    assert first.events == []  # nothing of the replaced job reached its handlers
    assert second.events == [("progress", (0.5, "half")), ("result", "b"), ("done", None)]
    assert not service.busy("load") and service.state.jobs == {}


def test_progress_is_throttled_and_the_last_report_always_arrives(qtbot: Any, service: JobService) -> None:
    heard = Heard()
    reports = 600

    def chatty(progress: Progress, cancel: CancelToken) -> str:
        for step in range(reports):
            progress(step / reports, f"step {step}")
            time.sleep(0.001)
        progress(1.0, "finished")
        return "ok"

    began = time.monotonic()
    service.start("compress", chatty, "compress", **heard.handlers())
    qtbot.waitUntil(lambda: "done" in heard.kinds(), timeout=WAIT_MS)
    seconds = time.monotonic() - began

    progress = [value for kind, value in heard.events if kind == "progress"]
    assert progress[-1] == (1.0, "finished")  # the last report, before the result
    assert heard.kinds()[-2:] == ["result", "done"]
    assert len(progress) <= seconds * 1000 / PROGRESS_INTERVAL_MS + 2, (len(progress), seconds)
    # the last report comes with the outcome, however soon after the one before
    gaps = [later - earlier for earlier, later in zip(heard.times, heard.times[1:-1])]
    assert len(gaps) >= 3 and min(gaps) >= PROGRESS_INTERVAL_MS / 1000 * 0.9, gaps


def test_an_engine_error_becomes_one_line_with_details_for_others(qtbot: Any, service: JobService) -> None:
    ours, theirs = Heard(), Heard()

    def refuse(_progress: Progress, _cancel: CancelToken) -> None:
        raise SlimscopeError("model.onnx: holds only weights\nsecond line the user need not see")

    def crash(_progress: Progress, _cancel: CancelToken) -> None:
        raise ValueError("shapes (3,4) and (5,6)\nnot aligned")

    service.start("sensitivity", refuse, **ours.handlers())
    service.start("export", crash, **theirs.handlers())
    qtbot.waitUntil(lambda: "done" in ours.kinds() and "done" in theirs.kinds(), timeout=WAIT_MS)

    (message, details, exc), = [value for kind, value in ours.events if kind == "error"]
    assert message == "model.onnx: holds only weights" and details == "" and isinstance(exc, SlimscopeError)
    (message, details, exc), = [value for kind, value in theirs.events if kind == "error"]
    assert message == "ValueError: shapes (3,4) and (5,6)" and "\n" not in message
    assert "Traceback" in details and "crash" in details and isinstance(exc, ValueError)


def test_cancel_all_stops_every_slot_and_each_hears_it_once(qtbot: Any, service: JobService) -> None:
    heard = {slot: Heard() for slot in ("load", "sensitivity", "allocate")}
    started = {slot: threading.Event() for slot in heard}
    for slot, record in heard.items():
        service.start(slot, until_cancelled(started[slot]), slot, **record.handlers())
    assert all(event.wait(5) for event in started.values())
    assert sorted(service.running_slots()) == sorted(heard) and len(service.state.jobs) == 3

    service.cancel_all()
    assert service.wait(WAIT_MS)
    qtbot.waitUntil(lambda: not service.running_slots(), timeout=WAIT_MS)
    for record in heard.values():
        assert record.kinds() == ["cancelled", "done"]
    assert service.state.jobs == {}


def test_cancel_with_forget_drops_the_job_at_once(qtbot: Any, service: JobService) -> None:
    heard, started = Heard(), threading.Event()
    job = service.start("sensitivity", until_cancelled(started), **heard.handlers())
    assert started.wait(5)
    assert service.cancel("sensitivity", forget=True) and not service.busy("sensitivity")
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)
    qtbot.wait(20)
    assert heard.events == [] and not service.cancel("sensitivity")


def test_the_bridge_brings_a_worker_threads_change_to_the_gui_thread(qtbot: Any) -> None:
    from PySide6.QtCore import QThread

    from gui.state_bridge import StateBridge

    state = AppState()
    bridge = StateBridge(state)
    heard: list[tuple[str, bool]] = []
    bridge.selected_layer_changed.connect(
        lambda name: heard.append((name, QThread.currentThread() is bridge.thread())))
    state.set("selected_layer", "conv1")  # on the GUI thread: delivered at once
    assert heard == [("conv1", True)]
    worker = threading.Thread(target=lambda: state.set("selected_layer", "fc"))
    worker.start()
    worker.join()
    qtbot.waitUntil(lambda: len(heard) == 2, timeout=WAIT_MS)
    assert heard[1] == ("fc", True)


def test_opening_another_model_resets_the_sessions_per_model_state(qtbot: Any, tmp_path: Any) -> None:
    from tests.gui.conftest import build_model, small_arrays

    from gui.session import CompressionData, Session

    session = Session()
    first = build_model(tmp_path / "a.bin", small_arrays(0))
    second = build_model(tmp_path / "b.bin", small_arrays(1))
    session.set_model(first, sweep=False)
    session.select_layers([layer.name for layer in first.layers[:2]])
    session.set_data(CompressionData(evaluation="digits.npz"))
    session.state.set("sensitivity", object())
    with qtbot.waitSignals([session.model_changed, session.layers_selected, session.data_changed],
                           timeout=WAIT_MS):
        session.set_model(second, sweep=False)
    assert session.model is second and session.selected_layers == [] and session.selected_layer == ""
    assert session.data == CompressionData() and session.state.sensitivity is None
