"""How long the GUI thread can be kept from its event loop while a sensitivity sweep runs.

Why: the sweep runs on a worker thread, but Python threads share one interpreter lock and torch
shares the cores, so "in the background" does not by itself mean "the window stays responsive".
This builds a ResNet-18 (CIFAR layout, 11.2 M weights, 3x32x32 inputs) in torch, opens it as a
runnable Model, and runs the real path the app uses — AnalysisState.run, a gui.workers.Job on
a QThreadPool — while a 5 ms QTimer on the GUI thread records the gaps between its ticks. The
largest gap beyond the 5 ms interval is the longest stall a user could feel. It also times how
long Cancel takes to end the job. Target: largest stall <= 100 ms.

    xvfb-run -a .venv/bin/python tests/benchmarks/gui_stall.py [--seconds 20] [--threads N]

``--threads`` sets the worker's torch threads (default: the app's choice, all cores but one);
``--methods`` picks which jobs run (datafree, fast, exact sweeps: exact stops after --seconds;
recovery: the demo's 300-step recovery fine-tuning, run from the main window with live curves).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PySide6.QtCore import QElapsedTimer, QEventLoop, Qt, QTimer  # noqa: E402

import gui.analysis as analysis  # noqa: E402
from engine import zoo  # noqa: E402
from engine.formats._torch_common import module_model  # noqa: E402
from gui.analysis import AnalysisState  # noqa: E402
from gui.preview import ensure_app  # noqa: E402
from gui.project import DataChoice  # noqa: E402
from gui.session import Session  # noqa: E402
from gui.workers import live_jobs  # noqa: E402

TICK_MS = 5
TARGET_MS = 100.0


class GapRecorder:
    """A precise 5 ms timer on the GUI thread; remembers every interval between its ticks."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.clock = QElapsedTimer()
        self.timer = QTimer(interval=TICK_MS, timerType=Qt.TimerType.PreciseTimer)
        self.timer.timeout.connect(self._tick)
        self._last = 0.0

    def _tick(self) -> None:
        now = self.clock.nsecsElapsed() / 1e6
        self.gaps.append(now - self._last)
        self._last = now

    def start(self) -> None:
        self.gaps.clear()
        self.clock.start()
        self._last = 0.0
        self.timer.start()

    def stop(self) -> dict[str, float]:
        self.timer.stop()
        stalls = [gap - TICK_MS for gap in self.gaps] or [0.0]
        ordered = sorted(stalls)
        return {"ticks": len(self.gaps), "max_ms": max(stalls),
                "p99_ms": ordered[int(0.99 * (len(ordered) - 1))], "median_ms": statistics.median(stalls)}


def spin(app, seconds: float, until=lambda: False) -> None:  # type: ignore[no-untyped-def]
    """Run the event loop for `seconds` or until `until()` (gui.qt_fixes keeps this safe).

    It sleeps between events, as QApplication.exec() does: a loop that polls without waiting
    keeps the GUI thread busy and competes with the worker for the GIL, which made stalls look
    longer than the app's. A 20 ms wake-up re-checks `until` when nothing else happens.
    """
    loop = QEventLoop()
    wake = QTimer(interval=20)
    wake.start()
    deadline = time.monotonic() + seconds
    flags = QEventLoop.ProcessEventsFlag.AllEvents | QEventLoop.ProcessEventsFlag.WaitForMoreEvents
    while time.monotonic() < deadline and not until():
        loop.processEvents(flags)
    wake.stop()


def measure(app, state: AnalysisState, choice: DataChoice, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    recorder = GapRecorder()
    recorder.start()
    started = time.perf_counter()
    job = state.run(choice)
    spin(app, seconds, lambda: job.finished)
    ran = time.perf_counter() - started
    cancel_ms = 0.0
    if not job.finished:
        asked = time.perf_counter()
        state.cancel()
        spin(app, 60, lambda: job.finished)
        cancel_ms = (time.perf_counter() - asked) * 1000
    result = recorder.stop()
    result.update(seconds=ran, completed=float(state.sensitivity is not None and not cancel_ms),
                  cancel_ms=cancel_ms)
    return result


def measure_recovery(app, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The app's own path for recovery fine-tuning: the main window on the demo, the bundled
    90% + 4-bit plan with its 300-step recovery, Run; the Results panel draws the live curves."""
    from gui.main_window import MainWindow

    window = MainWindow()
    window.resize(1280, 800)
    window.show()
    opening = window.open_demo()
    spin(app, 60, lambda: window.session.model is not None and (opening is None or opening.finished))
    # A user reads the opened model before pressing Run: the app's first-use imports
    # (gui.workers.warm_up_imports) finish meanwhile.
    spin(app, 60, lambda: not live_jobs())
    if not window.load_plan(ROOT / "resources" / "demo" / "plan_90_4bit_recovery.yaml"):
        raise SystemExit("the demo's recovery plan did not load")
    recorder = GapRecorder()
    recorder.start()
    started = time.perf_counter()
    job = window.run_compression()
    if job is None:
        raise SystemExit("compression did not start")
    spin(app, seconds, lambda: job.finished)
    ran = time.perf_counter() - started
    steps = window.results.recovery_plot.step_count
    completed = job.finished and window.session.result is not None
    if not job.finished:
        window.cancel_task()
        spin(app, 60, lambda: job.finished)
    result = recorder.stop()
    result.update(seconds=ran, completed=float(completed), steps=float(steps))
    window.hide()  # close() would ask about the unsaved plan
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="longest time per sweep before Cancel")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the worker")
    parser.add_argument("--methods", default="datafree,fast,exact,recovery")
    parser.add_argument("--samples", type=int, default=32, help="synthetic samples for fast/exact")
    args = parser.parse_args(argv)
    if args.threads is not None:
        analysis.worker_threads = lambda: args.threads  # type: ignore[assignment]

    app = ensure_app()
    # As `slimscope` does when it opens the app: the process's threads keep a core for the GUI.
    from engine import threads as thread_policy

    thread_policy.apply(thread_policy.choose(args.threads, reserve=1))
    recovery_worst = 0.0
    # First: the sweeps below shut their session's pool down when they end.
    if "recovery" in args.methods.split(","):
        result = measure_recovery(app, max(args.seconds, 120.0))
        recovery_worst = result["max_ms"]
        ending = (f"completed, {int(result['steps'])} steps in {result['seconds']:.1f} s"
                  if result["completed"] else f"stopped after {result['seconds']:.1f} s")
        print(f"{'recovery':9s} {ending:45s} ticks {int(result['ticks']):5d}  largest stall "
              f"{result['max_ms']:6.1f} ms  p99 {result['p99_ms']:5.1f} ms  median {result['median_ms']:4.1f} ms")
    torch.manual_seed(0)
    module = zoo.ResNet18().eval()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "resnet18.pt"
        path.write_bytes(b"benchmark stand-in")
        model = module_model(path, "benchmark", module, input_shape=(1, 3, 32, 32))
        session = Session()
        session.set_model(model, sweep=False)
        state = AnalysisState(session)
        idle = GapRecorder()
        idle.start()
        spin(app, 1.0)
        print(f"ResNet-18: {sum(p.numel() for p in module.parameters()) / 1e6:.1f} M params, "
              f"{os.cpu_count()} cores, worker torch threads {analysis.worker_threads()}, "
              f"GUI torch threads {torch.get_num_threads()}")
        print(f"idle event loop: largest stall {idle.stop()['max_ms']:.1f} ms")
        worst = recovery_worst
        for method in [m for m in args.methods.split(",") if m != "recovery"]:
            choice = DataChoice(spec=None if method == "datafree" else f"synthetic:{args.samples}",
                                method=method, limit=0)
            result = measure(app, state, choice, args.seconds)
            worst = max(worst, result["max_ms"])
            ending = "completed" if result["completed"] else f"cancelled after {result['seconds']:.1f} s, " \
                                                           f"Cancel took {result['cancel_ms']:.0f} ms"
            print(f"{method:9s} {ending:45s} ticks {int(result['ticks']):5d}  largest stall "
                  f"{result['max_ms']:6.1f} ms  p99 {result['p99_ms']:5.1f} ms  median {result['median_ms']:4.1f} ms")
        state.shutdown()
        session.shutdown()
    verdict = "PASS" if worst <= TARGET_MS else "FAIL"
    print(f"{verdict}: largest stall {worst:.1f} ms (target <= {TARGET_MS:.0f} ms)")
    return 0 if worst <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
