"""The main window: open a model, inspect its layers, plan, compress, look at results, export.

Loading runs on a worker; until it succeeds the previous model stays on screen, and a failure
is a dialog with one clear line. Pickles are opened only after the user says they trust them.
Only ordinary files reach a loader (a FIFO would block the worker for good), and a project's
files outside its own folder are opened only after the user says yes (:meth:`read_project`).
The loader and both dialogs are constructor arguments, so tests run the real flow without a
person at the keyboard.

Loading, compression and export run through the session's job service (gui.job_service), one
current job per slot, which also drops a replaced job's late results and throttles progress.
Compression and export are *tasks*: one at a time, on a worker, with the progress bar, a status
line, a Cancel button and the log dock. A task works on snapshots (the plan as plain data, the
loaded model, which compress() never modifies), so cancelling or failing leaves the window as it
was. Plan edits all go through the session's PlanDocument, whose undo stack backs Edit › Undo.
Analysis tools (sensitivity, Pareto, graph) plug in through ``gui.analysis.install_analysis``
when that module is present.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import sys
import traceback

from PySide6.QtCore import QByteArray, QEvent, QSettings, Qt, QTimer, QUrl
from PySide6.QtGui import (
    QAction,
    QCloseEvent,
    QDragEnterEvent,
    QDropEvent,
    QKeySequence,
    QPalette,
)
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QStyle,
    QTabBar,
    QTabWidget,
    QToolBar,
    QUndoView,
    QVBoxLayout,
    QWidget,
)

from engine.errors import SlimscopeError, UntrustedPickleError, one_line
from engine.formats import LoadOptions, check_model_path, load_model
from engine.formats.guard import quote
from engine.jobs import CancelToken, Progress
from engine.model import Model
from engine.plan import Plan

from gui import capabilities, dialogs
from gui.icons import arrow_icon
from gui.job_service import COMPRESS, LOAD
from gui.panels.histogram import HistogramPanel
from gui.panels.layer_table import MIN_VISIBLE_ROWS, Column, LayerTable
from gui.panels.log_panel import LogPanel
from gui.panels.plan_editor import PlanEditor
from gui.panels.results import ResultsPanel
from gui.panels.summary import ModelSummary
from gui.preview import demo_model_path
from gui.session import CompressionOutcome, MetricPrediction, PlanState, Session
from gui.theme import theme_signals
from gui.workers import Job, compression_job, warm_up_imports

if TYPE_CHECKING:
    from gui.project import Project

Loader = Callable[[Path, LoadOptions], Model]
#: ``confirm_outside(parent, project_file, paths) -> bool``: True only on an explicit yes.
OutsidePrompt = Callable[[QWidget | None, Path, list[Path]], bool]

MAX_RECENT = 10
RECENT_KEY = "recent_files"
PLAN_DIR_KEY = "plan/dir"
PLAN_FILTER = "Plan files (*.yaml *.yml *.json);;All files (*)"
LAYERS_TAB, RESULTS_TAB = 0, 1
RUN_TIP = "Compress the model with the current plan (Ctrl+R)"
DATA_TIP = "Evaluation, calibration and training data for compression"
#: How long a newly shown dock waits before it is fitted: the panels above re-arrange (the
#: histogram's statistics, and so its minimum height) only after their own resize.
DOCK_FIT_DELAY_MS = 200
#: Widest the layer filter starts beside the tabs.
FILTER_MAX_WIDTH = 320
#: Share of the window's height an analysis dock asks for when it first opens along the bottom.
BOTTOM_DOCK_SHARE = 0.45
MODEL_FILTER = (
    "Model files (*.safetensors *.onnx *.pt *.pth *.bin *.ckpt *.pt2 *.ts *.jit *.torchscript);;"
    "All files (*)"
)


def confirm_outside_paths(parent: QWidget | None, project_file: Path, paths: list[Path]) -> bool:
    """Ask before opening files a project names outside its own folder; No is the default.

    The first line names no file: Qt would render a first line that looks like HTML as rich
    text, and file names come from the project file.
    """
    listed = "\n".join(f"  {quote(str(path), 200)}" for path in paths[:5])
    more = f"\n  … and {len(paths) - 5} more" if len(paths) > 5 else ""
    text = (f"This project names files outside its own folder.\n\nProject: {quote(str(project_file), 200)}"
            f"\nOutside its folder:\n{listed}{more}\n\nOpen them anyway? Answer Yes only if you "
            "trust where the project file came from.")
    answer = QMessageBox.question(parent, "Open files outside the project?", text,
                                  QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes


def _to_str_list(value: object) -> list[str]:
    """QSettings hands back a str, a list or None depending on backend and count."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(item) for item in value]  # type: ignore[union-attr]


@dataclass(frozen=True)
class _LoadRequest:
    path: Path
    trust: bool
    started: float


def torch_threads() -> int:
    """The thread count compression jobs inherit from the GUI thread (gui.workers)."""
    import torch

    return torch.get_num_threads()


class MainWindow(QMainWindow):
    """See the module docstring."""

    def __init__(
        self,
        settings: QSettings | None = None,
        *,
        loader: Loader = load_model,
        show_error: dialogs.ErrorReporter = dialogs.show_error,
        confirm_trust: dialogs.TrustPrompt = dialogs.confirm_trust,
        ask_save_changes: dialogs.SavePrompt | None = None,
        confirm_outside: OutsidePrompt | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings if settings is not None else QSettings()
        self.loader = loader
        self.show_error = show_error
        self.confirm_trust = confirm_trust
        #: Asked before a project's files outside its folder are opened (see read_project).
        self.confirm_outside = confirm_outside or confirm_outside_paths
        # looked up now, not at definition: tests replace dialogs.ask_save_changes for all windows
        self.ask_save_changes = ask_save_changes or dialogs.ask_save_changes
        self.session = Session(self)
        self.document = self.session.plan_document
        #: Docks already given their first height (see _on_dock_shown), and whether a saved
        #: layout placed them instead.
        self._docks_sized: set[QDockWidget] = set()
        self._layout_restored = False
        #: Every background job of the window; slots LOAD and COMPRESS are the window's own.
        self.jobs = self.session.jobs

        self.summary = ModelSummary(self.session)
        self.layer_table = LayerTable(self.session)
        self.histogram = HistogramPanel(self.session)
        # Table above histogram: the table's plan columns need the width more than the plot does.
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.addWidget(self.layer_table)
        self.splitter.addWidget(self.histogram)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 1)
        self.results = ResultsPanel(self.session)
        self.results.export_requested.connect(self.export)
        self.results.run_requested.connect(self.run_compression)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.splitter, "Layers")
        self.tabs.addTab(self.results, "Results")
        self._filter_in_tab_bar()

        content = QWidget()
        content_layout = QVBoxLayout(content)
        content_layout.setContentsMargins(10, 6, 10, 2)
        content_layout.addWidget(self.summary)
        content_layout.addWidget(self.tabs, 1)
        self.stack = QStackedWidget()
        self.stack.addWidget(self._build_welcome())
        self.stack.addWidget(content)
        self.setCentralWidget(self.stack)

        self.plan_editor = PlanEditor(self.session)
        self.log = LogPanel()
        self.history = QUndoView(self.document.undo_stack)
        self.history.setEmptyLabel("Opened plan")
        self.setCorner(Qt.Corner.BottomRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)  # plan: full height
        self.plan_dock = self._dock("Plan", "plan", self.plan_editor, Qt.DockWidgetArea.RightDockWidgetArea)
        self.log_dock = self._dock("Log", "log", self.log, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.history_dock = self._dock("History", "history", self.history, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.tabifyDockWidget(self.log_dock, self.history_dock)
        self.log_dock.raise_()

        self._build_actions()
        self._build_menus()
        self._build_toolbar()
        self._build_status_bar()
        self.session.model_changed.connect(self._on_model_changed)
        self.session.plan_state_changed.connect(self._on_plan_state)
        self.session.plan_rejected.connect(self._on_plan_rejected)
        self.session.result_changed.connect(self._update_actions)
        self.document.undo_stack.cleanChanged.connect(self._update_title)
        self.setAcceptDrops(True)
        self.setWindowTitle("Slimscope")
        self._install_analysis()
        self._restore_layout()
        self.log_dock.raise_()
        self._update_actions()

    # -- construction ------------------------------------------------------------------------
    def _build_welcome(self) -> QWidget:
        page = QWidget()
        title = QLabel("Open a model to inspect it")
        font = title.font()
        font.setPointSizeF(font.pointSizeF() * 1.6)
        title.setFont(font)
        hint = QLabel("PyTorch, TorchScript, torch.export, ONNX or safetensors; or drop a file here.")
        hint.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        open_button = QPushButton("Open…")
        open_button.clicked.connect(self.choose_file)
        demo_button = QPushButton("Open demo")
        demo_button.clicked.connect(self.open_demo)
        demo_button.setEnabled(demo_model_path() is not None)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(open_button)
        buttons.addWidget(demo_button)
        buttons.addStretch(1)
        layout = QVBoxLayout(page)
        layout.addStretch(1)
        layout.addWidget(title, 0, Qt.AlignmentFlag.AlignHCenter)
        layout.addWidget(hint, 0, Qt.AlignmentFlag.AlignHCenter)
        layout.addSpacing(12)
        layout.addLayout(buttons)
        layout.addStretch(2)
        return page

    def _filter_in_tab_bar(self) -> None:
        """The layer filter sits beside the Layers and Results tabs rather than on a row of its
        own: at 1280×800 those pixels are what lets eight table rows and a docked analysis panel
        share the window. It shows with the Layers tab, the one it filters."""
        edit = self.layer_table.filter_edit
        metrics = edit.fontMetrics()
        edit.setMinimumWidth(min(FILTER_MAX_WIDTH, metrics.horizontalAdvance(edit.placeholderText()) * 2))
        # In a layout of its own: the tab widget sizes a corner widget by its size hint alone
        # (some 17 characters, which cut the hint text), a layout honours the minimum width.
        corner = QWidget()
        corner_layout = QHBoxLayout(corner)
        corner_layout.setContentsMargins(0, 0, 0, 2)
        corner_layout.addWidget(edit)
        self.tabs.setCornerWidget(corner, Qt.Corner.TopRightCorner)
        self.tabs.currentChanged.connect(lambda index: corner.setVisible(index == LAYERS_TAB))

    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"{name}-dock")  # saveState needs names
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(area, dock)
        return dock

    def _action(self, text: str, slot: object, shortcut: QKeySequence | str | None = None,
                icon: QStyle.StandardPixmap | None = None, tip: str = "") -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if icon is not None:
            action.setIcon(self.style().standardIcon(icon))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip)
        action.triggered.connect(slot)
        return action

    def _build_actions(self) -> None:
        pixmap = QStyle.StandardPixmap
        self.open_action = self._action("&Open…", self.choose_file, QKeySequence.StandardKey.Open,
                                        pixmap.SP_DialogOpenButton, "Open a model file (Ctrl+O)")
        self.demo_action = self._action("Open &Demo", self.open_demo)
        self.new_plan_action = self._action("&New Plan", self.new_plan, tip="Start from an empty plan (undoable)")
        self.load_plan_action = self._action("&Load Plan…", self.choose_plan, "Ctrl+Shift+O",
                                             tip="Read a plan file (YAML or JSON)")
        self.save_plan_action = self._action("&Save Plan", self.save_plan, QKeySequence.StandardKey.Save,
                                             pixmap.SP_DialogSaveButton,
                                             "Save the plan; `slimscope compress MODEL --plan FILE` replays it")
        self.save_plan_as_action = self._action("Save Plan &As…", self.save_plan_as, "Ctrl+Shift+S")
        self.export_action = self._action("&Export…", self.export, "Ctrl+E", pixmap.SP_DriveHDIcon,
                                          "Write the compressed model to a file and verify it (Ctrl+E)")
        self.run_action = self._action("&Run Compression", self.run_compression, "Ctrl+R", pixmap.SP_MediaPlay,
                                       RUN_TIP)
        self.cancel_action = self._action("&Cancel", self.cancel_task, None, pixmap.SP_BrowserStop,
                                          "Stop the running compression or export; nothing changes")
        self.data_action = self._action("&Data…", self.choose_data, tip=DATA_TIP)
        stack = self.document.undo_stack
        self.undo_action = stack.createUndoAction(self, "&Undo")
        self.undo_action.setShortcut(QKeySequence.StandardKey.Undo)
        self.redo_action = stack.createRedoAction(self, "&Redo")
        self.redo_action.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence.StandardKey.Redo])
        self._restyle_icons()
        theme_signals.changed.connect(self._restyle_icons)

    def _restyle_icons(self, *_args: object) -> None:
        """Undo and redo arrows in the look's text colour (the style's own stayed dark on dark)."""
        color = self.palette().color(QPalette.ColorRole.ButtonText)
        self.undo_action.setIcon(arrow_icon("back", color))
        self.redo_action.setIcon(arrow_icon("forward", color))

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and hasattr(self, "redo_action"):
            self._restyle_icons()

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        file_menu.addAction(self.open_action)
        file_menu.addAction(self.demo_action)
        self.recent_menu = file_menu.addMenu("Open &Recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        file_menu.addSeparator()
        file_menu.addActions([self.new_plan_action, self.load_plan_action, self.save_plan_action,
                              self.save_plan_as_action])
        file_menu.addSeparator()
        file_menu.addAction(self.export_action)
        file_menu.addSeparator()
        quit_action = QAction("&Quit", self, shortcut=QKeySequence.StandardKey.Quit)
        quit_action.setMenuRole(QAction.MenuRole.QuitRole)
        quit_action.triggered.connect(self.close)
        file_menu.addAction(quit_action)

        edit_menu = self.menuBar().addMenu("&Edit")
        edit_menu.addActions([self.undo_action, self.redo_action])
        self.edit_menu = edit_menu

        view_menu = self.menuBar().addMenu("&View")
        filter_action = QAction("&Filter Layers", self, shortcut=QKeySequence.StandardKey.Find)
        filter_action.triggered.connect(self._focus_filter)
        log_action = QAction("&Log-Scale Histogram", self, shortcut=QKeySequence("Ctrl+L"), checkable=True)
        log_action.toggled.connect(self.histogram.log_toggle.setChecked)
        self.histogram.log_toggle.toggled.connect(log_action.setChecked)
        file_order_action = QAction("Layers in &File Order", self)
        file_order_action.triggered.connect(self.layer_table.unsort)
        view_menu.addActions([filter_action, log_action, file_order_action])
        view_menu.addSeparator()
        for dock in (self.plan_dock, self.log_dock, self.history_dock):
            view_menu.addAction(dock.toggleViewAction())
        self.view_menu = view_menu

        compress_menu = self.menuBar().addMenu("&Compression")
        compress_menu.addActions([self.run_action, self.cancel_action])
        compress_menu.addSeparator()
        compress_menu.addAction(self.data_action)
        compress_menu.addAction(self.export_action)
        self.compress_menu = compress_menu

        help_menu = self.menuBar().addMenu("&Help")
        about_action = QAction("&About Slimscope", self)
        about_action.setMenuRole(QAction.MenuRole.AboutRole)
        about_action.triggered.connect(self._about)
        help_menu.addAction(about_action)
        self.help_menu = help_menu
        for action in self.menuBar().actions():
            if action.menu() is not None:
                action.menu().hovered.connect(self._show_why_disabled)

    def _show_why_disabled(self, action: QAction) -> None:
        """A disabled menu item's status tip (the engine's why-not line) on hover, as Qt shows
        an enabled one's."""
        if not action.isEnabled() and action.statusTip():
            self.statusBar().showMessage(action.statusTip())

    def _build_toolbar(self) -> None:
        toolbar = QToolBar("Main")
        toolbar.setObjectName("main-toolbar")
        toolbar.setMovable(False)
        toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        toolbar.addActions([self.open_action, self.save_plan_action])
        toolbar.addSeparator()
        toolbar.addActions([self.undo_action, self.redo_action])
        for action in (self.undo_action, self.redo_action):  # their text changes with every edit
            toolbar.widgetForAction(action).setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonIconOnly)
        toolbar.addSeparator()
        toolbar.addActions([self.run_action, self.cancel_action, self.export_action])
        self.addToolBar(toolbar)
        self.toolbar = toolbar

    def _build_status_bar(self) -> None:
        self.plan_status = QLabel()
        self.plan_status.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.statusBar().addPermanentWidget(self.plan_status)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setMaximumWidth(220)
        self.progress_bar.setTextVisible(False)
        self.progress_bar.hide()
        self.statusBar().addPermanentWidget(self.progress_bar)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the running task; the model and the plan stay as they are")
        self.cancel_button.clicked.connect(self.cancel_task)
        self.cancel_button.hide()
        self.statusBar().addPermanentWidget(self.cancel_button)
        #: The task's last progress message, kept while later reports come without one.
        self._progress_message = ""

    def _install_analysis(self) -> None:
        """Let the analysis tools (sensitivity, Pareto, graph) add their docks and menus.

        The window works without them; a failure inside them is logged, never fatal.
        """
        try:
            from gui.analysis import install_analysis
        except ModuleNotFoundError as exc:
            if exc.name != "gui.analysis":
                self._report_analysis_failure(exc)
            return
        except Exception as exc:  # noqa: BLE001 - a broken add-on must not stop the app
            self._report_analysis_failure(exc)
            return
        try:
            install_analysis(self)
        except Exception as exc:  # noqa: BLE001
            self._report_analysis_failure(exc)
            return
        state = getattr(getattr(self, "analysis", None), "state", None)
        if state is not None and hasattr(state, "sensitivity_changed"):
            state.sensitivity_changed.connect(self._on_sensitivity)
        graph = getattr(getattr(self, "analysis", None), "graph_view", None)
        if graph is not None and hasattr(graph, "log_line"):  # "opened … in the browser" goes to the log
            graph.log_line.connect(self.log.add)
        for dock in self.findChildren(QDockWidget):
            if dock not in (self.plan_dock, self.log_dock, self.history_dock):
                dock.visibilityChanged.connect(lambda visible, dock=dock: self._on_dock_shown(dock, visible))

    def _on_sensitivity(self, result: object) -> None:
        """Sensitivity results predict the plan's metric as it is edited (engine.allocate's
        predict_plan)."""
        if result is None:
            self.session.set_metric_predictor(None)
            return
        from engine.allocate import predict_plan  # here: it imports torch, the window need not

        def predictor(plan: Plan, model: Model) -> MetricPrediction:
            predicted = predict_plan(result, plan, model.layers)
            return MetricPrediction(str(result.metric), float(predicted.metric),  # type: ignore[attr-defined]
                                    float(result.baseline), bool(predicted.approximate))  # type: ignore[attr-defined]

        self.session.set_metric_predictor(predictor)

    def _report_analysis_failure(self, exc: BaseException) -> None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        self.log.add(f"analysis tools unavailable: {type(exc).__name__}: {exc}", "error")

    # -- opening -------------------------------------------------------------------------------
    def choose_file(self) -> None:
        start = self._recent_files()[0] if self._recent_files() else ""
        path, _ = QFileDialog.getOpenFileName(self, "Open model", str(Path(start).parent) if start else "", MODEL_FILTER)
        if path:
            self.open_model(Path(path))

    def open_demo(self) -> Job | None:
        path = demo_model_path()
        if path is None:
            self.show_error(self, "The demo model is not available in this installation.", "")
            return None
        return self.open_model(path)

    def open_model(self, path: str | Path, *, trust: bool = False) -> Job:
        """Load `path` on a worker; the current model stays until the new one is ready."""
        path = Path(path).expanduser()
        loader = self.loader

        def body(progress: Progress, cancel: CancelToken) -> Model:
            # Refused before any loader reads: a FIFO or device would block this worker forever.
            # A path that is not there is left to the loader, which says what it expected.
            if os.path.exists(path):
                check_model_path(path)
            return loader(path, LoadOptions(trust=trust, progress=progress))

        # A load already running is cancelled, and its result, if it still arrives, dropped.
        job = self.jobs.start(LOAD, body, f"load {path.name}",
                              context=_LoadRequest(path, trust, time.perf_counter()),
                              on_progress=self._on_load_progress, on_result=self._on_loaded,
                              on_error=self._on_load_failed, on_done=self._on_load_done)
        self.progress_bar.setValue(0)
        self.progress_bar.show()
        self.statusBar().showMessage(f"Opening {path.name}…")
        return job

    def _current_load(self) -> "_LoadRequest":
        """What the current load was asked for (the job service calls only for the current one)."""
        job = self.jobs.current(LOAD)
        assert job is not None
        return job.context

    def _on_load_progress(self, fraction: float, message: str) -> None:
        self.progress_bar.setValue(int(fraction * 1000))
        if message:
            self.statusBar().showMessage(message)

    def _on_loaded(self, model: Model) -> None:
        request = self._current_load()
        had_plan = self.document.to_dict() != Plan().to_dict()
        self.session.set_model(model)
        warm_up_imports()
        if model.layers:
            self.session.select_layer(model.layers[0].name)
        if had_plan:
            self.plan_editor.ask_keep_or_discard()  # Keep / Discard when it does not fit
        self._add_recent(request.path)
        seconds = time.perf_counter() - request.started
        message = f"Opened {request.path.name}: {len(model.layers)} layers in {seconds:.1f} s"
        self.statusBar().showMessage(message, 8000)
        self.log.add(message)

    def _on_load_failed(self, message: str, details: str, exc: BaseException) -> None:
        request = self._current_load()
        path = request.path
        if isinstance(exc, UntrustedPickleError) and not request.trust:
            self._hide_progress()
            if self.confirm_trust(self, path, message):
                self.open_model(path, trust=True)
            else:
                self.statusBar().showMessage(f"{path.name} was not opened: it was not trusted", 8000)
            return
        self.statusBar().showMessage(f"Could not open {quote(path.name)}", 8000)
        self.log.add(f"could not open {quote(path.name)}: {message}", "error")
        self.show_error(self, message, details)

    def read_project(self, path: Path) -> "Project | None":
        """The project at `path`, or None after telling the user, in one line, why not.

        Every failure of reading or validating it is one line (never an exception reaching Qt);
        its model must be an ordinary file; files it names outside its folder are opened only
        when the user says yes.
        """
        from gui.project import Project  # here: it imports torch, the window need not

        path = Path(path)
        try:
            project = Project.load(path)
        except SlimscopeError as exc:
            return self._refuse_project(path, one_line(exc))
        except Exception as exc:  # noqa: BLE001 - a bad project file must never crash the window
            return self._refuse_project(path, f"cannot open project: {type(exc).__name__}: {one_line(exc)}")
        model = project.model_path
        if model is not None:
            try:
                check_model_path(model)
            except SlimscopeError as exc:
                missing = not os.path.lexists(model)
                reason = (f"its model {quote(str(model))} is missing" if missing
                          else f"its model cannot be opened: {one_line(exc)}")
                return self._refuse_project(path, f"{quote(path.name)}: {reason}")
        if project.outside_paths and not self.confirm_outside(self, path, project.outside_paths):
            self.log.add(f"did not open project {quote(path.name)}: it names files outside its folder "
                         f"({', '.join(quote(str(p)) for p in project.outside_paths)})", "warning")
            self.statusBar().showMessage(f"{quote(path.name)} was not opened", 8000)
            return None
        return project

    def _refuse_project(self, path: Path, message: str) -> None:
        self.log.add(f"could not open project {quote(path.name)}: {message}", "error")
        self.show_error(self, message, "")
        return None

    def _on_load_done(self) -> None:
        if not self.jobs.busy(LOAD) and not self.jobs.busy(COMPRESS):
            self._hide_progress()

    def _hide_progress(self) -> None:
        self.progress_bar.hide()

    @property
    def loading(self) -> bool:
        return self.jobs.busy(LOAD)

    @property
    def load_job(self) -> Job | None:
        """The model load running now, if any."""
        return self.jobs.current(LOAD)

    @property
    def task(self) -> Job | None:
        """The running compression, if any: one at a time."""
        return self.jobs.current(COMPRESS)

    def _on_model_changed(self, model: Model | None) -> None:
        self.stack.setCurrentIndex(0 if model is None else 1)
        self.tabs.setCurrentIndex(LAYERS_TAB)
        self.setWindowFilePath(str(model.path) if model is not None else "")
        self._update_title()
        self._update_actions()

    def _update_title(self, *_args: object) -> None:
        model = self.session.model
        plan = f" · {self.document.path.name}" if self.document.path is not None else ""
        name = f"{model.path.name}{plan}[*] — Slimscope" if model is not None else "Slimscope[*]"
        self.setWindowTitle(name)
        self.setWindowModified(not self.document.undo_stack.isClean())

    def _on_plan_state(self, state: PlanState) -> None:
        if state.error:
            self.plan_status.setText("plan does not fit this model")
        elif state.prediction is not None:
            self.plan_status.setText(f"plan: {state.prediction.ratio:.3f}× predicted")
        else:
            self.plan_status.setText("")
        self._update_actions()

    def _on_plan_rejected(self, message: str) -> None:
        self.plan_editor.show_error(message)
        self.statusBar().showMessage(message, 8000)

    def _plan_problem(self) -> str | None:
        """Why the plan cannot be run on the loaded model now, in one line, or None."""
        if self.session.model is None:
            return "open a model first"
        if self.session.plan_state.error:
            return self.session.plan_state.error
        problems = self.plan_editor.plan_problems()
        return problems[0] if problems else None

    def _update_actions(self, *_args: object) -> None:
        """Every action enabled exactly when the model's backend can do it; a disabled one says
        why (the engine's line) as its tooltip and status tip."""
        model = self.session.model
        busy = self.jobs.busy(COMPRESS)
        capabilities.gate(self.run_action, capabilities.NO_MODEL if model is None else
                          self._plan_problem(), RUN_TIP)
        if busy:
            self.run_action.setEnabled(False)
        self.cancel_action.setEnabled(busy)
        self.export_action.setEnabled(self.session.result is not None and not busy)
        capabilities.gate(self.data_action, capabilities.why_not(model, capabilities.RUN), DATA_TIP)

    # -- plans ------------------------------------------------------------------------------------
    def _plan_dir(self) -> str:
        return str(self.settings.value(PLAN_DIR_KEY, "") or "")

    def new_plan(self) -> None:
        self.document.replace(Plan(), "New plan")

    def choose_plan(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load plan", self._plan_dir(), PLAN_FILTER)
        if path:
            self.load_plan(Path(path))

    def load_plan(self, path: str | Path) -> bool:
        """Read a plan file (one undo step); a bad or unfitting file is a one-line error."""
        path = Path(path)
        try:
            self.document.load(path)
        except SlimscopeError as exc:
            self.show_error(self, str(exc), "")
            return False
        self.settings.setValue(PLAN_DIR_KEY, str(path.parent))
        self.log.add(f"loaded plan {path}")
        self._update_title()
        return True

    def save_plan(self) -> Path | None:
        if self.document.path is None:
            return self.save_plan_as()
        return self.save_plan_to(self.document.path)

    def save_plan_as(self) -> Path | None:
        start = self.document.path or Path(self._plan_dir() or ".") / "plan.yaml"
        path, _ = QFileDialog.getSaveFileName(self, "Save plan", str(start), PLAN_FILTER)
        return self.save_plan_to(Path(path)) if path else None

    def save_plan_to(self, path: Path) -> Path | None:
        """Write the plan; ``slimscope compress MODEL --plan PATH`` then replays it exactly."""
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            path = path.with_suffix(".yaml")
        try:
            saved = self.document.save(path)
        except SlimscopeError as exc:
            self.show_error(self, str(exc), "")
            return None
        self.settings.setValue(PLAN_DIR_KEY, str(saved.parent))
        self.statusBar().showMessage(f"Saved {saved.name}", 5000)
        self.log.add(f"saved plan {saved}")
        self._update_title()
        return saved

    # -- compression and export -------------------------------------------------------------------
    def choose_data(self) -> None:
        from gui.compress_dialog import ask_compression_data

        choice = ask_compression_data(self, self.session.data, self.session.model_is_demo(),
                                      self.session.model)
        if choice is not None:
            self.session.set_data(choice)
            effective = self.session.effective_data()
            self.log.add(f"compression data: evaluation {effective.evaluation or 'none'}, calibration "
                         f"{effective.calibration or 'from evaluation'}, training {effective.train or 'none'}")

    def run_compression(self) -> Job | None:
        """Compress the loaded model with a snapshot of the plan, on a worker."""
        model = self.session.model
        problem = self._busy_reason() or self._plan_problem()
        if problem is not None or model is None:
            self.show_error(self, problem or "nothing to compress", "")
            return None
        data = self.session.effective_data()
        plan = self.document.to_dict()
        job = compression_job(model, plan, data)
        job.succeeded.connect(self._on_compressed)
        self.results.follow(job, plan, "accuracy" if data.evaluation else "metric")
        self.log.add(f"compressing {model.path.name}: "
                     f"{sum(1 for lp in self.session.plan_state.layers.values() if not lp.keep)} layers change; "
                     f"data: {data.evaluation or 'none (sizes only)'}; "
                     f"{torch_threads()} threads (replay with slimscope compress --threads)")
        return self._start_task(job, f"Compressing {model.path.name}")

    def _on_compressed(self, outcome: CompressionOutcome) -> None:
        report = outcome.report
        summary = f"compressed {outcome.model.path.name}: {report.size_ratio:.3f}× the size"
        after = (report.metrics_after or {}).get("accuracy")
        if after is not None:
            summary += f", accuracy {100 * (report.metrics_before or {}).get('accuracy', 0):.2f} % → {100 * after:.2f} %"
        self.log.add(summary, "ok")
        for note in report.notes:
            self.log.add(f"note: {note}", "warning")
        self.session.set_result(outcome)
        self.tabs.setCurrentIndex(RESULTS_TAB)

    def export(self) -> None:
        """Open the export dialog for the current result."""
        from gui.export_dialog import ExportDialog

        outcome = self.session.result
        if outcome is None:
            self.show_error(self, "nothing to export yet: run the compression first (Ctrl+R)", "")
            return
        self.export_dialog = ExportDialog(outcome, self, settings=self.settings, show_error=self.show_error,
                                          log=self.log.add, jobs=self.jobs)
        self.export_dialog.open()

    def _busy_reason(self) -> str | None:
        if self.task is not None:
            return f"{self.task.name} is still running; wait for it or cancel it first"
        return None

    def _start_task(self, job: Job, title: str) -> Job:
        # Its signals queue on the GUI thread, so none arrives before the window is set up below.
        self.jobs.start(COMPRESS, job, on_progress=self._show_progress, on_result=self._on_compressed,
                        on_error=self._on_task_failed, on_cancelled=self._on_task_cancelled,
                        on_done=self._on_task_done)
        self._progress_message = ""
        self.progress_bar.setValue(0)
        self.progress_bar.show()
        self.cancel_button.show()
        self.cancel_button.setEnabled(True)
        self.statusBar().showMessage(f"{title}…")
        self._update_actions()
        return job

    def cancel_task(self) -> None:
        if self.jobs.cancel(COMPRESS):
            self.cancel_button.setEnabled(False)
            self.statusBar().showMessage("Cancelling…")

    def _show_progress(self, fraction: float, message: str) -> None:
        """The task's progress, as the job service's throttle lets it through (the last report
        always arrives, before the result)."""
        message = message or self._progress_message
        self._progress_message = message
        self.progress_bar.setValue(int(fraction * 1000))
        if message:
            self.statusBar().showMessage(message)
        self.log.progress(fraction, message)

    def _on_task_failed(self, message: str, details: str, _exc: object) -> None:
        self.log.add(f"{self._task_name()} failed: {message}", "error")
        self.statusBar().showMessage(f"Failed: {message}", 10000)
        self.show_error(self, message, details)

    def _on_task_cancelled(self) -> None:
        self.log.add(f"{self._task_name()} cancelled; the model and the plan are unchanged", "warning")
        self.statusBar().showMessage("Cancelled; nothing changed", 8000)

    def _task_name(self) -> str:
        """The running task's name (the job service calls task handlers only while it runs)."""
        task = self.task
        return task.name if task is not None else "the task"

    def _on_task_done(self) -> None:
        self._progress_message = ""
        self.cancel_button.hide()
        if not self.jobs.busy(LOAD):
            self._hide_progress()
        self._update_actions()

    @property
    def busy(self) -> bool:
        """True while a compression runs."""
        return self.jobs.busy(COMPRESS)

    # -- recent files -----------------------------------------------------------------------------
    def _recent_files(self) -> list[str]:
        return _to_str_list(self.settings.value(RECENT_KEY))

    def _add_recent(self, path: Path) -> None:
        text = str(path.resolve())
        recent = [text] + [item for item in self._recent_files() if item != text]
        self.settings.setValue(RECENT_KEY, recent[:MAX_RECENT])

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self._recent_files()
        for item in recent:
            action = self.recent_menu.addAction(Path(item).name)
            action.setToolTip(item)
            action.setStatusTip(item)
            action.setEnabled(Path(item).exists())
            action.triggered.connect(lambda _checked=False, item=item: self.open_model(Path(item)))
        if not recent:
            self.recent_menu.addAction("No recent files").setEnabled(False)
            return
        self.recent_menu.addSeparator()
        self.recent_menu.addAction("Clear Menu", lambda: self.settings.setValue(RECENT_KEY, []))

    # -- drag and drop ------------------------------------------------------------------------------
    @staticmethod
    def _dropped_file(event: QDragEnterEvent | QDropEvent) -> Path | None:
        urls: list[QUrl] = event.mimeData().urls() if event.mimeData().hasUrls() else []
        local = [url.toLocalFile() for url in urls if url.isLocalFile()]
        return Path(local[0]) if local else None

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if self._dropped_file(event) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:
        path = self._dropped_file(event)
        if path is None:
            event.ignore()
            return
        event.acceptProposedAction()
        self.open_model(path)

    # -- misc -------------------------------------------------------------------------------------------
    def _focus_filter(self) -> None:
        self.tabs.setCurrentIndex(LAYERS_TAB)  # the filter shows with the tab it filters
        self.layer_table.filter_edit.setFocus()
        self.layer_table.filter_edit.selectAll()

    def _about(self) -> None:
        from gui.about import AboutDialog

        AboutDialog(self).exec()

    # -- layout --------------------------------------------------------------------------------------
    def _on_dock_shown(self, dock: QDockWidget, visible: bool) -> None:
        """The first time an analysis dock opens along the bottom (and no saved layout placed
        it), give it the height its plots ask for, as far as the central area's minimum allows.

        Later shows keep whatever height the user gave the dock area."""
        if not visible or dock in self._docks_sized or dock.isFloating():
            return
        self._docks_sized.add(dock)

        def fit() -> None:  # once the dock is laid out; restoreState shows docks before it returns
            if not self._layout_restored and self.dockWidgetArea(dock) == Qt.DockWidgetArea.BottomDockWidgetArea:
                self.fit_bottom_dock(dock)

        QTimer.singleShot(DOCK_FIT_DELAY_MS, fit)

    def fit_bottom_dock(self, dock: QDockWidget) -> int:
        """Give the bottom dock area holding `dock` up to BOTTOM_DOCK_SHARE of the window's
        height, as far as the central area keeps MIN_VISIBLE_ROWS table rows (and the summary
        and histogram their minimum); the dock's own minimum wins over both. Returns the dock's
        new height as asked for."""
        central, table = self.centralWidget(), self.layer_table
        rows_wanted = max(0, table.rows_height(MIN_VISIBLE_ROWS) - table.view.minimumHeight())
        central_least = central.minimumSizeHint().height() + rows_wanted
        tab_bar = self._dock_tab_bar_height(dock)
        room = dock.height() + central.height() - central_least
        height = max(dock.minimumSizeHint().height(), min(room, int(BOTTOM_DOCK_SHARE * self.height()) - tab_bar))
        # A tab group takes its size from whichever of its docks Qt holds as the group's item,
        # so all of them are asked (asking only `dock` was ignored when it was not that one);
        # the size asked for is the group's, tab bar included.
        group = [dock, *self.tabifiedDockWidgets(dock)]
        self.resizeDocks(group, [height + tab_bar] * len(group), Qt.Orientation.Vertical)
        QTimer.singleShot(0, self._keep_table_rows)
        return height

    def _dock_tab_bar_height(self, dock: QDockWidget) -> int:
        """Height of the tab bar under `dock`'s tab group (0 when it is not tabbed)."""
        for bar in self.findChildren(QTabBar):
            if bar.parent() is self and bar.isVisible() and any(
                    bar.tabText(i) == dock.windowTitle() for i in range(bar.count())):
                return bar.height()
        return 0

    def _keep_table_rows(self) -> None:
        """Within the central area, the table's MIN_VISIBLE_ROWS rows come before the
        histogram's height above its minimum (a shrinking splitter takes from both)."""
        table, histogram = self.layer_table, self.histogram
        sizes = self.splitter.sizes()
        wanted = table.rows_height(MIN_VISIBLE_ROWS) + table.height() - table.view.height()
        if len(sizes) != 2 or sizes[0] >= wanted:
            return
        total = sum(sizes)
        rest = max(histogram.minimumSizeHint().height(), total - wanted)
        self.splitter.setSizes([total - rest, rest])

    # -- persistence ---------------------------------------------------------------------------------
    def _restore_layout(self) -> None:
        geometry = self.settings.value("main_window/geometry")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:
            self.resize(1280, 780)
        state = self.settings.value("main_window/state")
        self._layout_restored = isinstance(state, QByteArray) and self.restoreState(state)
        if not self._layout_restored:
            self.resizeDocks([self.plan_dock], [self.plan_editor.preferred_width()], Qt.Orientation.Horizontal)
            self.resizeDocks([self.log_dock], [130], Qt.Orientation.Vertical)
        hidden = self.settings.value("main_window/hidden_columns")
        if hidden is not None:
            self.layer_table.set_hidden_columns([Column(int(c)) for c in _to_str_list(hidden) if c.isdigit()
                                                 and int(c) in Column._value2member_map_])
        splitter = self.settings.value("main_window/splitter")
        if isinstance(splitter, QByteArray) and not splitter.isEmpty():
            self.splitter.restoreState(splitter)
        else:
            self.splitter.setSizes([340, 260])

    def save_layout(self) -> None:
        self.settings.setValue("main_window/geometry", self.saveGeometry())
        self.settings.setValue("main_window/state", self.saveState())
        self.settings.setValue("main_window/splitter", self.splitter.saveState())
        self.settings.setValue("main_window/hidden_columns",
                               [str(int(column)) for column in self.layer_table.hidden_columns()] or "")
        self.settings.sync()

    def plan_may_close(self) -> bool:
        """True when the plan has no unsaved edits, or the user saved or discarded them."""
        if self.document.undo_stack.isClean():
            return True
        name = self.document.path.name if self.document.path is not None else "the plan"
        answer = self.ask_save_changes(self, name)
        if answer == "save":
            return self.save_plan() is not None  # a cancelled file dialog keeps the window
        return answer == "discard"

    def closeEvent(self, event: QCloseEvent) -> None:
        if not self.plan_may_close():
            event.ignore()
            return
        self.save_layout()
        self.jobs.cancel_all()
        self.session.shutdown()
        super().closeEvent(event)
