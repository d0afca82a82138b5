"""Project files from anyone: a wrong type in any field is one line and the window carries on;
files named outside the project's folder open only after the user says yes; a FIFO never
leaves the window waiting."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtWidgets import QMessageBox

from engine.errors import SlimscopeError
from gui.project import Project

from analysis_helpers import WAIT_MS, runnable_model, wait_for_job

#: A stat and a raise; a FIFO that is opened blocks forever.
QUICK_MS = 2000


@pytest.fixture
def analysis(window):  # type: ignore[no-untyped-def]
    from gui.analysis import install_analysis

    install_analysis(window)
    return window.analysis


class Answers:
    """Replies for QMessageBox.question, in order ("Yes"/"No"; "No" when none is left), and
    the text of every question asked."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self.asked: list[str] = []

    def question(self, _parent: object, _title: str, text: str, *_args: object) -> QMessageBox.StandardButton:
        self.asked.append(text)
        reply = self.replies.pop(0) if self.replies else "No"
        return QMessageBox.StandardButton.Yes if reply == "Yes" else QMessageBox.StandardButton.No


@pytest.fixture
def answers(monkeypatch) -> Answers:  # type: ignore[no-untyped-def]
    recorder = Answers()
    monkeypatch.setattr(QMessageBox, "question", staticmethod(recorder.question))
    return recorder


def write_project(folder: Path, data: dict[str, Any] | str, name: str = "work.slimproj") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def log_text(window) -> str:  # type: ignore[no-untyped-def]
    return window.log.view.toPlainText()


def assert_one_line(errors: list[tuple[str, str]], *fragments: str) -> str:
    assert len(errors) == 1, errors
    message = errors[0][0]
    assert "\n" not in message and message == message.strip() and message
    assert all(char.isprintable() for char in message), repr(message)
    for fragment in fragments:
        assert fragment in message, message
    return message


def window_still_opens_a_model(qtbot, window, tmp_path: Path, name: str = "after.pt") -> None:  # type: ignore[no-untyped-def]
    model = runnable_model(tmp_path, name)
    window.fake_loader.add(model)
    wait_for_job(qtbot, window.open_model(model.path))
    assert window.session.model is model


# -- every field's type -----------------------------------------------------------------------------
BAD_FIELDS = [
    ({"version": "1"}, "version"),
    ({"version": True}, "version"),
    ({"version": 1, "model": 42}, "field model"),
    ({"version": 1, "model": ["tiny.pt"]}, "field model"),
    ({"version": 1, "model": {"path": 5}}, "field model"),
    ({"version": 1, "model": {"relative": "tiny.pt"}}, "field model"),
    ({"version": 1, "model": {"path": "tiny.pt", "relative": []}}, "field model"),
    ({"version": 1, "model": "tiny\u0000.pt"}, "field model"),
    ({"version": 1, "data": "demo"}, "field data"),
    ({"version": 1, "data": {"spec": 3}}, "field data.spec"),
    ({"version": 1, "data": {"method": "magic"}}, "field data.method"),
    ({"version": 1, "data": {"method": ["exact"]}}, "field data.method"),
    ({"version": 1, "data": {"limit": "12"}}, "field data.limit"),
    ({"version": 1, "data": {"limit": -1}}, "field data.limit"),
    ({"version": 1, "data": {"limit": 1.5}}, "field data.limit"),
    ({"version": 1, "data": {"ranks": "yes"}}, "field data.ranks"),
    ({"version": 1, "plan": []}, "field plan"),
    ({"version": 1, "plan": {"layers": 5}}, "plan is invalid"),
    ({"version": 1, "plan": {"defaults": {"pruning": []}}}, "plan is invalid"),
    ({"version": 1, "sensitivity": "fast"}, "field sensitivity"),
    ({"version": 1, "sensitivity": {"method": 1}}, "sensitivity results are invalid"),
    ({"version": 1, "sensitivity": {"method": "exact", "metric": "accuracy", "higher_is_better": True,
                                     "baseline": 1.0, "layers": "abc", "model_bytes": 1,
                                     "fixed_bytes": 0}}, "sensitivity results are invalid"),
    ({"version": 1, "target": [1, 2]}, "field target"),
    ([1, 2, 3], "not a Slimscope project"),
]


@pytest.mark.parametrize("data, fragment", BAD_FIELDS, ids=[f"{i}-{f.split()[-1]}" for i, (_, f) in
                                                           enumerate(BAD_FIELDS)])
def test_a_wrong_type_in_any_field_is_one_line(tmp_path: Path, data: Any, fragment: str) -> None:
    path = write_project(tmp_path, data)
    with pytest.raises(SlimscopeError) as raised:
        Project.load(path)
    message = str(raised.value)
    assert fragment in message and "\n" not in message


def test_the_bad_value_is_quoted_short_and_escaped(tmp_path: Path) -> None:
    path = write_project(tmp_path, {"version": 1, "data": {"method": "x\n\x1b[31m" + "y" * 500}})
    with pytest.raises(SlimscopeError) as raised:
        Project.load(path)
    message = str(raised.value)
    assert "\\x1b[31m" in message and "\x1b" not in message and "\n" not in message
    assert len(message) < 200


@pytest.mark.parametrize("content", [
    '{"version": 1, "plan": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"version": 1, "target": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}",
], ids=["deep-list", "deep-object"])
def test_deep_nesting_is_one_line(tmp_path: Path, content: str) -> None:
    path = write_project(tmp_path, content)
    with pytest.raises(SlimscopeError) as raised:
        Project.load(path)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("data, fragment", [
    ({"version": 1, "data": {"limit": "12"}}, "data.limit"),
    ({"version": 1, "model": {"path": 5}}, "field model"),
    ({"version": 1, "sensitivity": {"layers": None}}, "sensitivity"),
    ({"version": 1, "plan": {"kinds": {"Linear": "nope"}}}, "plan"),
    ("not json at all", "JSON"),
], ids=["limit", "model", "sensitivity", "plan", "json"])
def test_the_window_shows_one_line_and_keeps_working(qtbot, window, analysis, errors, tmp_path,
                                                     data, fragment) -> None:  # type: ignore[no-untyped-def]
    path = write_project(tmp_path / "project", data)
    assert analysis.open_project(path) is None
    assert_one_line(errors, fragment)
    assert window.session.model is None and window.fake_loader.calls == []
    window_still_opens_a_model(qtbot, window, tmp_path)


# -- paths outside the project's folder -----------------------------------------------------------
@pytest.fixture
def outside_model(tmp_path: Path):  # type: ignore[no-untyped-def]
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return runnable_model(folder, "outside.pt")


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_a_model_outside_the_folder_opens_only_after_yes(qtbot, window, analysis, errors, answers,
                                                         tmp_path, outside_model, how) -> None:  # type: ignore[no-untyped-def]
    window.fake_loader.add(outside_model)
    project_folder = tmp_path / "project"
    project_folder.mkdir()
    entry: Any = {"relative": "../elsewhere/outside.pt", "path": "/nonexistent/outside.pt"}
    if how == "absolute":
        entry = str(outside_model.path)
    elif how == "symlink":
        (project_folder / "inside.pt").symlink_to(outside_model.path)
        entry = {"relative": "inside.pt", "path": str(project_folder / "inside.pt")}
    path = write_project(project_folder, {"version": 1, "model": entry})
    assert Project.load(path).outside_paths == [outside_model.path.resolve()]

    answers.replies.append("No")
    assert analysis.open_project(path) is None
    assert len(answers.asked) == 1 and "outside.pt" in answers.asked[0]
    assert window.fake_loader.calls == [] and window.session.model is None and errors == []
    assert "did not open project 'work.slimproj'" in log_text(window)

    answers.replies.append("Yes")
    job = analysis.open_project(path)
    assert job is not None
    wait_for_job(qtbot, job)
    qtbot.waitUntil(lambda: window.session.model is outside_model, timeout=WAIT_MS)
    assert len(answers.asked) == 2 and errors == []


def test_outside_data_is_asked_about_too(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    runnable_model(tmp_path / "project", "tiny.pt")
    data_folder = tmp_path / "images"
    data_folder.mkdir()
    path = write_project(tmp_path / "project", {
        "version": 1, "model": "tiny.pt", "data": {"spec": {"path": str(data_folder)}}})
    project = Project.load(path)
    assert project.model_path == (tmp_path / "project" / "tiny.pt").resolve()
    assert project.outside_paths == [data_folder]


def test_a_project_inside_its_folder_asks_nothing(qtbot, window, analysis, errors, answers,
                                                  tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "data").mkdir()
    model = runnable_model(folder, "tiny.pt")
    window.fake_loader.add(model)
    path = write_project(folder, {"version": 1, "model": "tiny.pt", "data": {"spec": "data"}})
    assert Project.load(path).outside_paths == []
    job = analysis.open_project(path)
    assert job is not None
    wait_for_job(qtbot, job)
    assert window.session.model is model and answers.asked == [] and errors == []


# -- FIFOs never leave the window waiting ---------------------------------------------------------
def test_a_project_whose_model_is_a_fifo_is_one_line_at_once(qtbot, window, analysis, errors,
                                                             tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "project"
    folder.mkdir()
    os.mkfifo(folder / "model.pt")
    path = write_project(folder, {"version": 1, "model": {"relative": "model.pt",
                                                          "path": str(folder / "model.pt")}})
    started = time.perf_counter()
    analysis.open_project(path)
    qtbot.waitUntil(lambda: bool(errors), timeout=QUICK_MS)
    assert time.perf_counter() - started < QUICK_MS / 1000
    assert_one_line(errors, "named pipe")
    qtbot.waitUntil(lambda: not window.loading, timeout=QUICK_MS)
    window_still_opens_a_model(qtbot, window, tmp_path)


def test_a_project_file_that_is_a_fifo_is_one_line_at_once(qtbot, window, analysis, errors,
                                                           tmp_path) -> None:  # type: ignore[no-untyped-def]
    os.mkfifo(tmp_path / "work.slimproj")
    started = time.perf_counter()
    assert analysis.open_project(tmp_path / "work.slimproj") is None
    assert time.perf_counter() - started < QUICK_MS / 1000
    assert_one_line(errors, "named pipe")
    window_still_opens_a_model(qtbot, window, tmp_path)


def test_a_fifo_opened_as_a_model_fails_in_the_worker_at_once(qtbot, window, errors, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The window's own loader checks the file before any loader reads it, even a custom one."""
    os.mkfifo(tmp_path / "pipe.onnx")
    job = window.open_model(tmp_path / "pipe.onnx")
    qtbot.waitUntil(lambda: job.finished, timeout=QUICK_MS)
    assert_one_line(errors, "named pipe", "'pipe.onnx'")
    assert window.fake_loader.calls == []  # refused before the loader was asked
