"""Without a display the app says so in one line (Qt alone aborts with exit 134)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gui.app import display_problem

ROOT = Path(__file__).resolve().parents[2]


def test_no_display_is_named_before_qt_can_abort() -> None:
    assert "needs a display" in (display_problem({}) or "")
    assert display_problem({"QT_QPA_PLATFORM": "offscreen"}) is None
    assert display_problem({"WAYLAND_DISPLAY": "wayland-0"}) is None


def test_an_unreachable_x_display_is_named() -> None:
    assert "cannot reach the display ':987'" in (display_problem({"DISPLAY": ":987"}) or "")


def test_the_cli_exits_2_with_one_line_without_a_display() -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "engine.cli"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.splitlines()) == 1 and "needs a display" in run.stderr
