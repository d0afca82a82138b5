"""Sensitivity, targets, the graph, themes and projects, added to the main window in one call.

:class:`AnalysisState` is the observable state the analysis panels share: the sensitivity results
of the current model (cached until the model changes), the data choice they were measured with,
and the running sweep. The sweep itself is the engine's plain function
(:func:`engine.sensitivity.sweep`) run by a :class:`~gui.workers.Job`; this module only opens the
data the user chose and turns progress into signals.

:func:`install_analysis` adds the docks, menus, actions and shortcuts to a
:class:`~gui.main_window.MainWindow`. It needs ``window.session``, ``window.settings``,
``window.show_error``, ``window.open_model`` and a ``statusBar()``; plan edits go to
``window.session.plan_document`` (or ``window.plan_document``; one is made if neither exists).
Call it before the window restores its saved layout, so the docks get their saved places.

Responsiveness, measured (``tests/benchmarks/gui_stall.py``, ResNet-18, 2 cores): with the sweep's
torch using both cores the GUI thread stalled up to 420 ms; with one core left to it, at most
63 ms. Hence :func:`worker_threads`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from PySide6.QtCore import QEvent, QObject, QSettings, Qt, Signal
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import QDockWidget, QFileDialog, QMainWindow, QMenu, QWidget

from engine import threads as thread_policy
from engine import workflows
from engine.errors import SlimscopeError
from engine.jobs import CancelToken, Progress
from engine.model import Model
from engine.sensitivity import DEFAULT_RANKS, Sensitivity, SweepSettings

from gui import capabilities
from gui.job_service import SENSITIVITY
from gui.plan_document import PlanDocument
from gui.project import PROJECT_FILTER, PROJECT_SUFFIX, DataChoice, Project
from gui.session import Session
from gui.workers import Job

if TYPE_CHECKING:
    from gui.panels.graph_view import GraphView
    from gui.panels.pareto import ParetoPanel
    from gui.panels.sensitivity import SensitivityPanel

SENSITIVITY_FILTER = "Sensitivity results (*.json);;All files (*)"


def worker_threads() -> int:
    """Intra-op threads for background torch work: the process's thread policy (set when the
    app starts, one core kept for the GUI thread; engine/threads.py), else that policy now."""
    return thread_policy.applied() or thread_policy.choose(reserve=1)


class AnalysisState(QObject):
    """Sensitivity results and the sweep that makes them; see the module docstring.

    The results themselves live in the application state (``session.state.sensitivity``, reset
    with the model there); the sweep runs in the session's job service, slot SENSITIVITY."""

    #: New results (None when cleared, e.g. because the model changed).
    sensitivity_changed = Signal(object)
    #: A sweep started (True) or ended, however it ended (False).
    running_changed = Signal(bool)
    #: fraction 0..1 and the engine's message, while a sweep runs.
    progress = Signal(float, str)
    #: One line for the log: what started, what the engine reports, how it ended.
    log_line = Signal(str)
    #: A sweep failed: one-line message, details.
    failed = Signal(str, str)

    def __init__(self, session: Session, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.jobs = session.jobs
        self.choice = DataChoice()
        #: The data the current results were measured on in this session (None for results
        #: loaded from a file, whose data the app cannot reopen): what plans are checked on.
        self.results_data: DataChoice | None = None
        self._started = 0.0
        self._last_message = ""
        session.bridge.sensitivity_changed.connect(self._on_sensitivity_changed)
        session.model_changed.connect(self._on_model_changed)

    # -- results --------------------------------------------------------------------------------
    @property
    def sensitivity(self) -> Sensitivity | None:
        return self.session.state.sensitivity

    def set_sensitivity(self, result: Sensitivity | None, data: DataChoice | None = None) -> None:
        self.results_data = data if result is not None else None
        self.session.state.set("sensitivity", result, force=True)

    def _on_sensitivity_changed(self, result: Sensitivity | None) -> None:
        if result is None:
            self.results_data = None  # e.g. cleared with the model
        self.sensitivity_changed.emit(result)

    def save_sensitivity(self, path: str | Path) -> Path:
        if self.sensitivity is None:
            raise SlimscopeError("there are no sensitivity results to save; run an analysis first")
        self.sensitivity.save(path)
        return Path(path)

    def load_sensitivity(self, path: str | Path) -> Sensitivity:
        """Read results saved by the app or by ``slimscope sensitivity``; they must fit the model."""
        result = Sensitivity.load(path)
        self.check_fits(result)
        self.set_sensitivity(result)
        self.log_line.emit(f"Loaded {Path(path).name}: {result.method} sensitivity of "
                           f"{len(result.layers)} layers")
        return result

    def check_fits(self, result: Sensitivity) -> None:
        """Refuse results for another model: every swept layer must exist in the loaded one."""
        model = self.session.model
        if model is None:
            raise SlimscopeError("open the model these results belong to first")
        workflows.check_fits(result, model)

    # -- running ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.jobs.busy(SENSITIVITY)

    @property
    def job(self) -> Job | None:
        """The sweep running now, if any."""
        return self.jobs.current(SENSITIVITY)

    def can_run(self, choice: DataChoice | None = None) -> str:
        """Why a sweep (with `choice`'s method; without one, any method) cannot start now, or
        "" when it can. The data-free method reads weights only, so every model has one."""
        model = self.session.model
        if model is None:
            return capabilities.NO_MODEL
        if self.running:
            return "A sensitivity analysis is already running."
        if choice is not None:
            return capabilities.sensitivity_why_not(model, choice.method, choice.ranks) or ""
        return ""

    def run(self, choice: DataChoice) -> Job:
        """Sweep the current model in the background with `choice`; results replace the cache."""
        problem = self.can_run(choice)
        if problem:
            raise SlimscopeError(problem)
        model = self.session.model
        assert model is not None
        self.choice = choice
        self._started = time.perf_counter()
        self._last_message = ""
        source = "no data" if choice.spec is None else choice.spec
        self.log_line.emit(f"Started {choice.method} sensitivity of {model.path.name} on {source}")
        job = self.jobs.start(SENSITIVITY, sensitivity_job(model, choice), f"sensitivity of {model.path.name}",
                              context=model, on_progress=self._on_progress, on_result=self._on_succeeded,
                              on_error=self._on_failed, on_cancelled=self._on_cancelled,
                              on_done=self._on_done)
        self.running_changed.emit(True)
        return job

    def cancel(self) -> None:
        if self.jobs.cancel(SENSITIVITY):
            self.log_line.emit("Cancelling…")

    # The job service calls these only for the current sweep; one of another model is dropped
    # when the model changes (cancel_and_forget).
    def _on_progress(self, fraction: float, message: str) -> None:
        self.progress.emit(fraction, message)
        if message and message != self._last_message:
            self._last_message = message
            self.log_line.emit(f"{fraction * 100:5.1f} %  {message}")

    def _on_succeeded(self, result: Sensitivity) -> None:
        self.set_sensitivity(result, self.choice)
        self.log_line.emit(f"Done in {time.perf_counter() - self._started:.1f} s: "
                           f"{len(result.layers)} layers, baseline {result.metric} "
                           f"{result.baseline:.4g}")

    def _on_failed(self, message: str, details: str, _exc: object) -> None:
        self.log_line.emit(f"Failed: {message}")
        self.failed.emit(message, details)

    def _on_cancelled(self) -> None:
        self.log_line.emit("Cancelled; the previous results are kept")

    def _on_done(self) -> None:
        self.running_changed.emit(False)

    def _on_model_changed(self, _model: Model | None) -> None:
        """Everything here belongs to one model: results, the sweep, and the data choice (data
        chosen for one model rarely fits the next; the dialog then starts from the new one's
        inputs). A project being opened sets its own choice after this."""
        self.cancel_and_forget()
        self.choice = DataChoice()
        if self.sensitivity is not None:  # the application state already cleared it, normally
            self.set_sensitivity(None)

    def cancel_and_forget(self) -> None:
        """Cancel a running sweep and stop listening to it (its model is gone)."""
        if self.jobs.cancel(SENSITIVITY, forget=True):
            self.running_changed.emit(False)

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        job = self.job
        self.cancel_and_forget()
        return job is None or job.body_ended.wait(timeout_ms / 1000)


def cap_worker_threads() -> None:
    """Torch's intra-op threads are per calling thread: this caps the calling job, not the app."""
    import torch

    torch.set_num_threads(worker_threads())


def sensitivity_job(model: Model, choice: DataChoice) -> Callable[[Progress, CancelToken], Sensitivity]:
    """The job body: open the chosen data on the worker, then sweep."""

    def body(progress: Progress, cancel: CancelToken) -> Sensitivity:
        cap_worker_threads()
        settings = SweepSettings(ranks=DEFAULT_RANKS if choice.ranks else ())
        return workflows.sweep(model, choice.data_spec(), choice.method, settings,
                               progress=progress, cancel=cancel)

    return body


def preview_with_results(factory: Callable[[AnalysisState], QWidget], argv: list[str], *, title: str) -> int:
    """Run an analysis panel alone (habit 10): the model is measured, or results loaded, as soon as
    it is open. Adds ``--results JSON``, ``--method`` and ``--data`` to :func:`gui.preview.preview`'s
    arguments; measuring happens on the GUI thread, as loading does there: fine for a preview."""
    import argparse

    from engine.jobs import NEVER_CANCELLED, no_progress
    from engine.sensitivity import METHODS

    from gui.preview import preview

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--results", help="sensitivity JSON to show instead of measuring")
    parser.add_argument("--method", default="datafree", choices=METHODS)
    parser.add_argument("--data", default="demo", help="data spec for the exact and fast methods")
    own, rest = parser.parse_known_args(argv)

    def build(session: Session) -> QWidget:
        state = AnalysisState(session)

        def measure(model: Model | None) -> None:
            if model is None:
                return
            if own.results:
                state.load_sensitivity(own.results)
                return
            choice = DataChoice(spec=None if own.method == "datafree" else own.data, method=own.method)
            state.set_sensitivity(sensitivity_job(model, choice)(no_progress, NEVER_CANCELLED), choice)

        session.model_changed.connect(measure)
        widget = factory(state)
        widget.setProperty("slimscope_preview", True)
        widget._preview_state = state  # type: ignore[attr-defined]  # keeps the state alive
        return widget

    return preview(build, rest, title=title)


# -- the window hook ------------------------------------------------------------------------------
class Analysis(QObject):
    """What install_analysis added to a window, kept as ``window.analysis``."""

    def __init__(self, window: QMainWindow) -> None:
        super().__init__(window)
        from gui.panels.graph_view import GraphView
        from gui.panels.pareto import ParetoPanel
        from gui.panels.sensitivity import SensitivityPanel

        self.window = window
        self.session: Session = window.session  # type: ignore[attr-defined]
        self.settings: QSettings = getattr(window, "settings", None) or QSettings()
        self.plan_document: PlanDocument = _plan_document_of(window)
        self.state = AnalysisState(self.session, self)
        self.project_path: Path | None = None
        self._pending_project: Project | None = None

        self.sensitivity_panel: SensitivityPanel = SensitivityPanel(self.state)
        self.pareto_panel: ParetoPanel = ParetoPanel(self.state, self.plan_document)
        self.graph_view: GraphView = GraphView(self.session)
        self.sensitivity_panel.run_requested.connect(self.ask_and_run)
        self.sensitivity_panel.save_requested.connect(self.save_sensitivity)
        self.sensitivity_panel.load_requested.connect(self.load_sensitivity)
        self.state.failed.connect(self._on_failed)
        self.state.running_changed.connect(self._update_actions)
        self.session.model_changed.connect(self._on_model_changed)

        neighbour = self._bottom_dock()
        self.sensitivity_dock = self._dock("Sensitivity", "dock-sensitivity", self.sensitivity_panel)
        self.pareto_dock = self._dock("Target and Pareto Front", "dock-pareto", self.pareto_panel)
        self.graph_dock = self._dock("Graph", "dock-graph", self.graph_view)
        # One tab group along the bottom (with the window's log, if it has one): the heat maps
        # need the window's full width, not a share of it.
        previous = neighbour
        for dock in (self.sensitivity_dock, self.pareto_dock, self.graph_dock):
            if previous is not None:
                window.tabifyDockWidget(previous, dock)
            previous = dock
        self.sensitivity_dock.raise_()
        for dock in (self.sensitivity_dock, self.pareto_dock, self.graph_dock):
            dock.hide()  # shown on first use; restore_state below brings back a saved layout
        self._build_menus()
        self._update_actions()

    # -- construction -------------------------------------------------------------------------
    def _dock(self, title: str, name: str, widget: QWidget) -> QDockWidget:
        dock = QDockWidget(title, self.window)
        dock.setObjectName(name)
        dock.setWidget(widget)
        dock.setAllowedAreas(Qt.DockWidgetArea.AllDockWidgetAreas)
        self.window.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, dock)
        return dock

    def _bottom_dock(self) -> QDockWidget | None:
        """A dock the window already has along its bottom edge, to share a tab group with."""
        for dock in self.window.findChildren(QDockWidget):
            if self.window.dockWidgetArea(dock) == Qt.DockWidgetArea.BottomDockWidgetArea and not dock.isFloating():
                return dock
        return None

    def _menu(self, title: str, before: str | None = None) -> QMenu:
        """The window's menu called `title` (ignoring '&'), created before `before` if missing."""
        bar = self.window.menuBar()
        plain = title.replace("&", "")
        for action in bar.actions():
            if action.menu() is not None and action.text().replace("&", "") == plain:
                return action.menu()  # type: ignore[return-value]
        menu = QMenu(title, self.window)
        anchor = next((a for a in bar.actions() if before and a.text().replace("&", "") == before), None)
        if anchor is not None:
            bar.insertMenu(anchor, menu)
        else:
            bar.addMenu(menu)
        return menu

    def _action(self, text: str, slot: Callable[[], Any], shortcut: QKeySequence | str | None = None,
                tip: str = "") -> QAction:
        action = QAction(text, self.window)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip)
        action.triggered.connect(lambda _checked=False: slot())
        return action

    def _build_menus(self) -> None:
        file_menu = self._menu("&File")
        self.open_project_action = self._action("Open &Project…", self.open_project_dialog, "Ctrl+Alt+O",
                                                "Open a project: model, data choice, plan and sensitivity")
        self.save_project_action = self._action("Sa&ve Project", self.save_project, "Ctrl+Alt+S",
                                                "Save the model path, data choice, plan and sensitivity")
        self.save_project_as_action = self._action("Save Project &As…", self.save_project_as)
        quit_action = next((a for a in file_menu.actions() if a.menuRole() == QAction.MenuRole.QuitRole), None)
        anchor = quit_action
        separators = [a for a in file_menu.actions() if a.isSeparator()]
        if quit_action is not None and separators:
            anchor = separators[-1]
        for action in (self.open_project_action, self.save_project_action, self.save_project_as_action):
            file_menu.insertAction(anchor, action) if anchor else file_menu.addAction(action)
        if anchor is not None:
            file_menu.insertSeparator(anchor)

        analyse = self._menu("&Analyse", before="Help")
        self.sensitivity_action = self._action("&Sensitivity…", self.ask_and_run, "F5",
                                               "Measure how much each layer suffers when compressed")
        self.cancel_action = self._action("&Cancel Sensitivity", self.state.cancel, "Shift+F5")
        self.load_sensitivity_action = self._action("&Load Sensitivity Results…", self.load_sensitivity)
        self.save_sensitivity_action = self._action("Sa&ve Sensitivity Results…", self.save_sensitivity)
        self.target_action = self._action("&Target and Pareto Front", self.show_pareto, "Ctrl+T",
                                          "Fill the plan automatically from a size or accuracy target")
        self.graph_action = self._action("Model &Graph", self.show_graph, "Ctrl+G",
                                         "The model's graph in Netron")
        analyse.addActions([self.sensitivity_action, self.cancel_action])
        analyse.addSeparator()
        analyse.addActions([self.load_sensitivity_action, self.save_sensitivity_action])
        analyse.addSeparator()
        analyse.addActions([self.target_action, self.graph_action])

        view = self._menu("&View", before="Analyse")
        view.addSeparator()
        for dock in (self.sensitivity_dock, self.pareto_dock, self.graph_dock):
            view.addAction(dock.toggleViewAction())
        theme_menu = view.addMenu("&Theme")
        self.theme_group = QActionGroup(self.window)
        from gui.theme import THEME_LABELS, THEMES, current_theme

        self.theme_actions: dict[str, QAction] = {}
        for name in THEMES:
            action = QAction(THEME_LABELS[name], self.window, checkable=True)
            action.setChecked(name == current_theme())
            action.triggered.connect(lambda _checked=False, name=name: self.set_theme(name))
            self.theme_group.addAction(action)
            theme_menu.addAction(action)
            self.theme_actions[name] = action

    def _update_actions(self, *_args: object) -> None:
        problem = self.state.can_run()
        self.sensitivity_action.setEnabled(not problem)
        self.sensitivity_action.setStatusTip(problem or "Measure how much each layer suffers when compressed")
        self.cancel_action.setEnabled(self.state.running)
        self.save_sensitivity_action.setEnabled(self.state.sensitivity is not None)
        self.load_sensitivity_action.setEnabled(self.session.model is not None)
        self.save_project_action.setEnabled(self.session.model is not None)
        self.save_project_as_action.setEnabled(self.session.model is not None)

    # -- sensitivity ------------------------------------------------------------------------------
    def ask_and_run(self) -> Job | None:
        from gui.data_dialog import ask_data_choice

        problem = self.state.can_run()
        if problem:
            self.window.statusBar().showMessage(problem, 6000)
            return None
        model = self.session.model
        assert model is not None
        choice = ask_data_choice(self.window, self.state.choice, model.path.name, model)
        if choice is None:
            return None
        return self.run(choice)

    def run(self, choice: DataChoice) -> Job:
        self.show_sensitivity()
        return self.state.run(choice)

    def show_sensitivity(self) -> None:
        self.sensitivity_dock.show()
        self.sensitivity_dock.raise_()

    def show_pareto(self) -> None:
        self.pareto_dock.show()
        self.pareto_dock.raise_()

    def show_graph(self) -> None:
        self.graph_dock.show()
        self.graph_dock.raise_()

    def save_sensitivity(self) -> None:
        if self.state.sensitivity is None:
            return
        model = self.session.model
        start = str(model.path.with_suffix(".sensitivity.json")) if model else ""
        path, _ = QFileDialog.getSaveFileName(self.window, "Save sensitivity results", start, SENSITIVITY_FILTER)
        if path:
            self._guard(lambda: self.state.save_sensitivity(path), f"Saved {Path(path).name}")

    def load_sensitivity(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.window, "Load sensitivity results", "", SENSITIVITY_FILTER)
        if path:
            if self._guard(lambda: self.state.load_sensitivity(path), f"Loaded {Path(path).name}"):
                self.show_sensitivity()

    def _guard(self, work: Callable[[], object], done: str) -> bool:
        """Run quick file work on the GUI thread; a failure is the usual one-line error dialog."""
        try:
            work()
        except (SlimscopeError, OSError) as exc:
            self.window.show_error(self.window, str(exc).splitlines()[0], "")  # type: ignore[attr-defined]
            return False
        self.window.statusBar().showMessage(done, 6000)
        self._update_actions()
        return True

    def _on_failed(self, message: str, details: str) -> None:
        self.window.show_error(self.window, f"Sensitivity analysis failed: {message}", details)  # type: ignore[attr-defined]

    # -- theme ------------------------------------------------------------------------------------
    def set_theme(self, name: str) -> None:
        from gui.theme import set_theme

        applied = set_theme(name, self.settings)
        self.theme_actions[applied].setChecked(True)

    # -- projects ---------------------------------------------------------------------------------
    def current_project(self) -> Project:
        model = self.session.model
        return Project(
            model_path=model.path if model is not None else None,
            data=self.state.choice,
            plan=self.plan_document.to_dict(),
            sensitivity=self.state.sensitivity,
            target=self.pareto_panel.target_settings(),
        )

    def save_project(self) -> Path | None:
        if self.project_path is None:
            return self.save_project_as()
        return self.write_project(self.project_path)

    def save_project_as(self) -> Path | None:
        model = self.session.model
        start = str(self.project_path or (model.path.with_suffix(PROJECT_SUFFIX) if model else ""))
        path, _ = QFileDialog.getSaveFileName(self.window, "Save project", start, PROJECT_FILTER)
        if not path:
            return None
        if not Path(path).suffix:
            path += PROJECT_SUFFIX
        return self.write_project(Path(path))

    def write_project(self, path: Path) -> Path | None:
        try:
            self.current_project().save(path)
        except (SlimscopeError, OSError) as exc:
            self.window.show_error(self.window, f"Could not save the project: {exc}", "")  # type: ignore[attr-defined]
            return None
        self.project_path = path
        self.window.statusBar().showMessage(f"Saved project {path.name}", 6000)
        return path

    def open_project_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.window, "Open project", "", PROJECT_FILTER)
        if path:
            self.open_project(Path(path))

    def open_project(self, path: Path) -> Job | None:
        """Load the project's model on the worker; plan and results follow once it is in."""
        # one line for every failure; files outside the project's folder only if the user agrees
        project = self.window.read_project(path)  # type: ignore[attr-defined]
        if project is None:
            return None
        if project.model_path is None or not project.model_path.exists():
            where = project.model_path or "(none)"
            self.window.show_error(self.window, f"{path.name}: its model {where} is missing", "")  # type: ignore[attr-defined]
            return None
        self.project_path = path
        self._pending_project = project
        return self.window.open_model(project.model_path)  # type: ignore[attr-defined]

    def _on_model_changed(self, model: Model | None) -> None:
        self._update_actions()
        project, self._pending_project = self._pending_project, None
        if project is None or model is None:
            if model is not None:
                self.project_path = None  # a model opened by hand is not the project's
            return
        if project.model_path is not None and Path(model.path).resolve() != project.model_path.resolve():
            return
        self.state.choice = project.data
        self.plan_document.replace(project.plan, f"Open project {self.project_path.name if self.project_path else ''}".strip())
        self.pareto_panel.set_target_settings(project.target)
        if project.sensitivity is not None:
            try:
                self.state.check_fits(project.sensitivity)
            except SlimscopeError as exc:
                self.window.show_error(self.window, str(exc), "")  # type: ignore[attr-defined]
            else:
                same_run = project.data.method == project.sensitivity.method
                self.state.set_sensitivity(project.sensitivity, project.data if same_run else None)
                self.show_sensitivity()
        self._update_actions()

    def shutdown(self) -> None:
        """Cancel the sweep and stop the Netron server; safe to call more than once."""
        self.state.shutdown()
        self.graph_view.shutdown()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.window and event.type() == QEvent.Type.Close:
            self.shutdown()  # the window may still refuse to close; nothing here is lost by that
        return False


def _plan_document_of(window: QMainWindow) -> PlanDocument:
    """The window's one PlanDocument (the session's, or the window's own); made if it has none."""
    for owner, name in ((getattr(window, "session", None), "plan_document"), (window, "plan_document"),
                        (window, "document")):
        document = getattr(owner, name, None)
        if isinstance(document, PlanDocument):
            return document
    document = PlanDocument(window)
    window.plan_document = document  # type: ignore[attr-defined]
    return document


def install_analysis(window: QMainWindow) -> None:
    """Add sensitivity, target/Pareto and graph docks, their menus and shortcuts, View › Theme
    and File › Open/Save Project to `window`; kept as ``window.analysis``.

    Call it at the end of ``MainWindow.__init__``. The sweep is cancelled and the Netron server
    stopped when the window gets its close event (an event filter), so the window's own
    closeEvent needs no change; ``window.analysis.shutdown()`` may also be called, twice is fine.
    """
    if getattr(window, "analysis", None) is not None:
        return
    from gui.theme import apply_theme, current_theme, saved_theme

    settings = getattr(window, "settings", None) or QSettings()
    if saved_theme(settings) != current_theme():
        apply_theme(saved_theme(settings))
    analysis = Analysis(window)
    window.analysis = analysis  # type: ignore[attr-defined]
    window.installEventFilter(analysis)
