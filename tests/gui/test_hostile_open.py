"""The hostile corpus through the app: File > Open's loader and Open Project's loader.

Every model file of ``tests/hostile`` is opened the way File > Open does it
(``MainWindow.open_model`` on the worker, the real ``load_model``), and malformed project files
through ``Analysis.open_project``. Each must end, within the time limit, in one of the app's
designed answers: a one-line error (recorded at ``show_error``, the window's dialog boundary),
the trust question for a pickle (answered "no"), or, for the files that are fine, the model.
Nothing from the file may run, and afterwards the app must still open the demo and list its
layers. Modal boxes are never shown: the window takes its dialogs as arguments, and any plain
QMessageBox a new code path might use is replaced by a recorder answering "No".
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import shutil
import unicodedata
from pathlib import Path

import pytest
from PySide6.QtCore import QThreadPool
from PySide6.QtWidgets import QMessageBox

from hostile.corpus import REFUSED, Case, build_corpus, demo_copy

#: A file that takes longer than this to be refused or opened counts as a hang.
LOAD_LIMIT_MS = 30_000
#: The pytest process may not grow past this (soft RLIMIT_AS): a bomb fails instead of
#: taking the machine.
ADDRESS_SPACE_LIMIT = 6 << 30
#: Cases whose input is a plan, an output path or a sensitivity file, not a model to open.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return build_corpus(tmp_path_factory.mktemp("hostile_gui"))


@pytest.fixture(scope="module", autouse=True)
def bounded_process():
    """Cap the address space and widen the thread pool for this module only.

    The pool is widened so a worker stuck on one bad file (the bug being tested) cannot starve
    the loads of the cases after it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, hard))
    pool = QThreadPool.globalInstance()
    threads = pool.maxThreadCount()
    pool.setMaxThreadCount(max(threads, 16))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    pool.setMaxThreadCount(threads)


class Recorder:
    """What the window told the user: errors (one line each), trust questions, and any other
    message box (a confirmation question may span lines; it is answered "No")."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.trust_asked: list[Path] = []
        self.boxes: list[str] = []

    def show_error(self, _parent: object, message: str, _details: str) -> None:
        self.errors.append(message)

    def confirm_trust(self, _parent: object, path: Path, _reason: str) -> bool:
        self.trust_asked.append(path)
        return False

    def box(self, _parent: object = None, _title: str = "", text: str = "", *_args: object,
            **_kwargs: object) -> QMessageBox.StandardButton:
        self.boxes.append(str(text))
        return QMessageBox.StandardButton.No


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    recorder = Recorder()
    for name in ("critical", "warning", "information", "question"):
        monkeypatch.setattr(QMessageBox, name, staticmethod(recorder.box))
    monkeypatch.setattr(QMessageBox, "exec", lambda self: recorder.box(None, "", self.text()))
    return recorder


@pytest.fixture
def app_window(qtbot, settings, recorder):
    from gui.analysis import install_analysis
    from gui.main_window import MainWindow

    window = MainWindow(settings, show_error=recorder.show_error,
                        confirm_trust=recorder.confirm_trust)
    install_analysis(window)
    qtbot.addWidget(window)
    window.resize(1000, 650)
    window.show()
    yield window
    window.close()


def _unblock(fifos: list[Path]) -> None:
    """Give any reader stuck on a FIFO its end of file."""
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def _one_line_problems(message: str) -> list[str]:
    problems = []
    if not message.strip():
        problems.append("an empty error message")
    if "\n" in message.strip() or "\r" in message:
        problems.append(f"a message of several lines: {message[:300]!r}")
    controls = {repr(char) for char in message if unicodedata.category(char) == "Cc"
                and char != "\n"}
    if controls:
        problems.append(f"raw control characters {sorted(controls)} in {message[:200]!r}")
    if "Traceback" in message:
        problems.append("a traceback in the message")
    return problems


def _wait_for_load(qtbot, window, job, fifos: list[Path]) -> str | None:
    """Wait until the load job ends; a problem description if it does not, in time."""
    if job is None:
        return None
    try:
        qtbot.waitUntil(lambda: job.finished, timeout=LOAD_LIMIT_MS)
    except AssertionError:
        job.cancel()
        return f"the load did not end within {LOAD_LIMIT_MS // 1000} s"
    finally:
        _unblock(fifos)
    qtbot.waitUntil(lambda: not window.loading, timeout=5_000)
    return None


def _assert_still_usable(qtbot, window, folder: Path) -> None:
    """The app opens the demo (a fresh copy) and lists its layers after the bad file."""
    path = demo_copy(folder, "usable_demo.safetensors") if not (
        folder / "usable_demo.safetensors").exists() else folder / "usable_demo.safetensors"
    job = window.open_model(path)
    qtbot.waitUntil(lambda: job.finished, timeout=LOAD_LIMIT_MS)
    qtbot.waitUntil(lambda: window.session.model is not None
                    and window.session.model.path == path, timeout=LOAD_LIMIT_MS)
    model = window.session.model
    assert len(model.layers) > 0
    qtbot.waitUntil(lambda: window.layer_table.proxy.rowCount() == len(model.layers),
                    timeout=LOAD_LIMIT_MS)


def _model_cases() -> list[str]:
    """Cases with a model file to open, known without building (each builder sets `model`)."""
    from hostile.corpus import case_names

    plan_or_output = ("plan_", "compress_", "sensitivity_", "data_")
    return [name for name in case_names() if not name.startswith(plan_or_output)]


# -- every model file of the corpus, through File > Open's loader ---------------------------
@pytest.mark.parametrize("name", _model_cases())
def test_hostile_model_file_through_the_app(qtbot, app_window, recorder, corpus, name,
                                            tmp_path):
    case = corpus[name]
    assert case.build_error is None, case.build_error
    if case.model is None:
        pytest.skip(f"{name} has no model file to open")
    problems: list[str] = []
    try:
        hang = _wait_for_load(qtbot, app_window, app_window.open_model(case.model), case.fifos)
    finally:
        _unblock(case.fifos)
    if hang:
        problems.append(hang)
    loaded = app_window.session.model
    if case.marker.exists():
        problems.append("code from the file ran (the marker file was written)")
    answers = len(recorder.errors) + len(recorder.trust_asked)
    if not hang:
        if loaded is not None and REFUSED in case.expect_exit and 0 not in case.expect_exit:
            problems.append(f"the hostile file was opened as a model ({len(loaded.layers)} layers)")
        if loaded is None and answers != 1:
            problems.append(f"{len(recorder.errors)} error dialogs and {len(recorder.trust_asked)} "
                            "trust questions, expected exactly one answer")
        if loaded is None and 0 in case.expect_exit and REFUSED not in case.expect_exit:
            problems.append(f"a file that must open was refused: {recorder.errors[:1]}")
    for message in recorder.errors:
        problems.extend(_one_line_problems(message))
    assert not problems, f"{name}: " + "; ".join(problems)
    _assert_still_usable(qtbot, app_window, tmp_path)
    assert not case.marker.exists()


# -- malformed project files, through Open Project ------------------------------------------
def _deep_json(depth: int = 50_000) -> str:
    return '{"version": 1, "plan": ' + "[" * depth + "]" * depth + "}"


#: (case id, project text); `{model}` is replaced by the JSON of a valid model entry.
PROJECT_TEXTS: list[tuple[str, str]] = [
    ("top_level_list", "[1, 2, 3]"),
    ("top_level_string", '"project"'),
    ("version_string", '{"version": "1"}'),
    ("version_null", '{"version": null}'),
    ("model_number", '{"version": 1, "model": 42}'),
    ("model_list", '{"version": 1, "model": ["a.onnx"]}'),
    ("model_path_number", '{"version": 1, "model": {"path": 5}}'),
    ("model_relative_number", '{"version": 1, "model": {"relative": 7, "path": "x.onnx"}}'),
    ("model_entry_without_path", '{"version": 1, "model": {"relative": "gone.onnx"}}'),
    ("data_string", '{"version": 1, "model": {model}, "data": "demo"}'),
    ("data_limit_text", '{"version": 1, "model": {model}, "data": {"limit": "many"}}'),
    ("data_limit_list", '{"version": 1, "model": {model}, "data": {"limit": [1]}}'),
    ("data_spec_number", '{"version": 1, "model": {model}, "data": {"spec": 5}}'),
    ("data_method_list", '{"version": 1, "model": {model}, "data": {"method": ["exact"]}}'),
    ("plan_string", '{"version": 1, "model": {model}, "plan": "keep"}'),
    ("plan_list", '{"version": 1, "model": {model}, "plan": [1, 2]}'),
    ("plan_defaults_number", '{"version": 1, "model": {model}, "plan": {"defaults": 3}}'),
    ("sensitivity_string", '{"version": 1, "model": {model}, "sensitivity": "fast"}'),
    ("sensitivity_empty_fields", '{"version": 1, "model": {model}, "sensitivity": {"method": 1}}'),
    ("sensitivity_layers_number",
     '{"version": 1, "model": {model}, "sensitivity": {"method": "datafree", "layers": 5}}'),
    ("target_number", '{"version": 1, "model": {model}, "target": 5}'),
    ("target_pairs", '{"version": 1, "model": {model}, "target": [[1, 2, 3]]}'),
    ("target_size_list", '{"version": 1, "model": {model}, "target": {"size": [1], "drop": "x"}}'),
    ("not_json", "{version: 1"),
    ("deep_nesting", "DEEP"),
]


def _project_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "project"
    folder.mkdir()
    return folder, demo_copy(folder)


def _open_project(qtbot, window, path: Path, fifos: list[Path] = ()) -> str | None:
    job = window.analysis.open_project(path)
    return _wait_for_load(qtbot, window, job, list(fifos))


@pytest.mark.parametrize("case_id, text", PROJECT_TEXTS, ids=[c for c, _ in PROJECT_TEXTS])
def test_malformed_project_is_one_line(qtbot, app_window, recorder, tmp_path, case_id, text):
    folder, model = _project_folder(tmp_path)
    entry = json.dumps({"relative": model.name, "path": str(model)})
    project = folder / "work.slimproj"
    project.write_text(_deep_json() if text == "DEEP" else text.replace("{model}", entry))
    hang = _open_project(qtbot, app_window, project)
    assert hang is None, hang
    # Either refused with one line, or (a field the loader may default) opened with the model.
    problems = [problem for message in recorder.errors
                for problem in _one_line_problems(message)]
    assert not problems, problems
    if app_window.session.model is None:
        assert len(recorder.errors) == 1, recorder.errors
    _assert_still_usable(qtbot, app_window, tmp_path)


@pytest.mark.parametrize("relative", ["../outside/model.safetensors",
                                      "../../escape/outside/model.safetensors"])
def test_project_model_outside_its_folder_is_not_opened(qtbot, app_window, recorder, tmp_path,
                                                        relative):
    """A project names a model outside its folder: not opened without the user's yes."""
    base = tmp_path / "escape"
    folder = base / "project"
    (base / "outside").mkdir(parents=True)
    folder.mkdir()
    outside_model = demo_copy(base / "outside", "model.safetensors")
    project = folder / "work.slimproj"
    project.write_text(json.dumps({"version": 1, "model": {"relative": relative,
                                                           "path": relative}}))
    assert (folder / relative).resolve() == outside_model.resolve()
    hang = _open_project(qtbot, app_window, project)
    assert hang is None, hang
    qtbot.wait(200)
    loaded = app_window.session.model
    assert loaded is None or Path(loaded.path).resolve() != outside_model.resolve(), (
        "the project's model outside the project folder was opened without asking")
    # A refusal (one line) or the app's question (answered "no" here), but not silence.
    assert recorder.errors or recorder.boxes, "the user was not told"
    for message in recorder.errors:
        assert not _one_line_problems(message), message
    _assert_still_usable(qtbot, app_window, tmp_path)


def test_project_model_that_is_a_fifo_is_refused(qtbot, app_window, recorder, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    fifo = folder / "model.onnx"
    os.mkfifo(fifo)
    project = folder / "work.slimproj"
    project.write_text(json.dumps({"version": 1, "model": {"relative": "model.onnx",
                                                           "path": str(fifo)}}))
    try:
        hang = _open_project(qtbot, app_window, project, [fifo])
    finally:
        _unblock([fifo])
    assert hang is None, hang
    assert app_window.session.model is None
    assert len(recorder.errors) == 1, recorder.errors
    assert not _one_line_problems(recorder.errors[0]), recorder.errors[0]
    _assert_still_usable(qtbot, app_window, tmp_path)


def test_project_plan_regex_against_long_layer_names(qtbot, app_window, recorder, corpus,
                                                     tmp_path):
    """`re:(a+)+b` in a project's plan, on a model with 5,000-character layer names: the GUI
    thread must not freeze. A watchdog ends the whole run if it does (nothing else can
    interrupt a regex on the GUI thread); it runs last in this file for that reason."""
    source = corpus["plan_regex_long_layer_names"]
    assert source.build_error is None, source.build_error
    folder = tmp_path / "project"
    folder.mkdir()
    model = folder / "long_names.pt2"
    shutil.copyfile(source.model_dir / "long_names.pt2", model)
    project = folder / "work.slimproj"
    project.write_text(json.dumps({
        "version": 1, "model": {"relative": model.name, "path": str(model)},
        "plan": {"patterns": {"re:(a+)+b": {"quantization": {"bits": 8}}}}}))
    faulthandler.dump_traceback_later(3 * LOAD_LIMIT_MS // 1000, exit=True)
    try:
        hang = _open_project(qtbot, app_window, project)
        qtbot.wait(500)  # the plan is applied once the model is in
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert hang is None, hang
    for message in recorder.errors:
        assert not _one_line_problems(message), message
    _assert_still_usable(qtbot, app_window, tmp_path)


# -- every data file of the corpus, chosen in the data dialog -------------------------------
def _data_file_cases() -> list[str]:
    from hostile.corpus import case_names

    return [name for name in case_names() if name.startswith("data_")]


@pytest.mark.parametrize("name", _data_file_cases())
def test_hostile_data_in_the_data_dialog(qtbot, corpus, name):
    """The dialog checks a chosen file on every keystroke through the engine's guard (headers
    only): each hostile array file is one line and Run stays off; an image folder's images are
    decoded only when the job runs, where the CLI corpus refuses them through the same code."""
    from engine.formats import load_model
    from gui.data_dialog import ARRAYS, FOLDER, DataDialog
    from gui.project import DataChoice

    case = corpus[name]
    assert case.build_error is None, case.build_error
    data = Path(case.argv[case.argv.index("--data") + 1])
    model = load_model(Path(case.argv[1]))
    dialog = DataDialog(None, DataChoice(), model.path.name, model)
    qtbot.addWidget(dialog)
    kind = FOLDER if data.is_dir() else ARRAYS
    (dialog.folder_edit if kind == FOLDER else dialog.arrays_edit).setText(str(data))
    dialog.source_buttons[kind].setChecked(True)
    _unblock(case.fifos)
    problem = dialog.problem_label.text()
    assert not case.marker.exists()
    if kind == FOLDER:
        assert problem == "" and dialog.run_button.isEnabled()
        return
    assert problem and "\n" not in problem and not dialog.run_button.isEnabled(), problem
    assert data.name in problem, problem
