"""The main window: open a model, see its summary, its layers and the selected layer's weights.

Loading runs on a worker; until it succeeds the previous model stays on screen, and a failure
is a dialog with one clear line. Pickles are opened only after the user says they trust them.
The loader and both dialogs are constructor arguments, so tests run the real flow without a
person at the keyboard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QByteArray, QSettings, Qt, QUrl
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence, QPalette
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from engine import __version__
from engine.errors import UntrustedPickleError
from engine.formats import LoadOptions, load_model
from engine.jobs import CancelToken, Progress
from engine.model import Model

from gui import dialogs
from gui.panels.histogram import HistogramPanel
from gui.panels.layer_table import LayerTable
from gui.panels.summary import ModelSummary
from gui.preview import demo_model_path
from gui.session import Session
from gui.workers import Job

Loader = Callable[[Path, LoadOptions], Model]

MAX_RECENT = 10
RECENT_KEY = "recent_files"
MODEL_FILTER = (
    "Model files (*.safetensors *.onnx *.pt *.pth *.bin *.ckpt *.pt2 *.ts *.jit *.torchscript);;"
    "All files (*)"
)


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


class MainWindow(QMainWindow):
    """See the module docstring."""

    def __init__(
        self,
        settings: QSettings | None = None,
        *,
        loader: Loader = load_model,
        show_error: dialogs.ErrorReporter = dialogs.show_error,
        confirm_trust: dialogs.TrustPrompt = dialogs.confirm_trust,
    ) -> None:
        super().__init__()
        self.settings = settings if settings is not None else QSettings()
        self.loader = loader
        self.show_error = show_error
        self.confirm_trust = confirm_trust
        self.session = Session(self)
        self.load_job: Job | None = None

        self.summary = ModelSummary(self.session)
        self.layer_table = LayerTable(self.session)
        self.histogram = HistogramPanel(self.session)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.addWidget(self.layer_table)
        self.splitter.addWidget(self.histogram)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)

        content = QWidget()
        content_layout = QVBoxLayout(content)
        content_layout.setContentsMargins(10, 8, 10, 4)
        content_layout.addWidget(self.summary)
        content_layout.addWidget(self.splitter, 1)
        self.stack = QStackedWidget()
        self.stack.addWidget(self._build_welcome())
        self.stack.addWidget(content)
        self.setCentralWidget(self.stack)

        self._build_menus()
        self._build_status_bar()
        self.session.model_changed.connect(self._on_model_changed)
        self.setAcceptDrops(True)
        self.setWindowTitle("Slimscope")
        self._restore_layout()

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

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self.open_action = QAction("&Open…", self, shortcut=QKeySequence.StandardKey.Open)
        self.open_action.triggered.connect(self.choose_file)
        self.demo_action = QAction("Open &Demo", self)
        self.demo_action.triggered.connect(self.open_demo)
        self.recent_menu = file_menu.addMenu("Open &Recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        quit_action = QAction("&Quit", self, shortcut=QKeySequence.StandardKey.Quit)
        quit_action.setMenuRole(QAction.MenuRole.QuitRole)
        quit_action.triggered.connect(self.close)
        file_menu.insertAction(self.recent_menu.menuAction(), self.open_action)
        file_menu.insertAction(self.recent_menu.menuAction(), self.demo_action)
        file_menu.addSeparator()
        file_menu.addAction(quit_action)

        view_menu = self.menuBar().addMenu("&View")
        filter_action = QAction("&Filter Layers", self, shortcut=QKeySequence.StandardKey.Find)
        filter_action.triggered.connect(self._focus_filter)
        log_action = QAction("&Log-Scale Histogram", self, shortcut=QKeySequence("Ctrl+L"), checkable=True)
        log_action.toggled.connect(self.histogram.log_toggle.setChecked)
        self.histogram.log_toggle.toggled.connect(log_action.setChecked)
        file_order_action = QAction("Layers in &File Order", self)
        file_order_action.triggered.connect(self.layer_table.unsort)
        view_menu.addActions([filter_action, log_action, file_order_action])

        help_menu = self.menuBar().addMenu("&Help")
        about_action = QAction("&About Slimscope", self)
        about_action.setMenuRole(QAction.MenuRole.AboutRole)
        about_action.triggered.connect(self._about)
        help_menu.addAction(about_action)

    def _build_status_bar(self) -> None:
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setMaximumWidth(220)
        self.progress_bar.setTextVisible(False)
        self.progress_bar.hide()
        self.statusBar().addPermanentWidget(self.progress_bar)

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
        if self.load_job is not None:
            self.load_job.cancel()  # its result, if it still arrives, is dropped
        loader = self.loader

        def body(progress: Progress, cancel: CancelToken) -> Model:
            return loader(path, LoadOptions(trust=trust, progress=progress))

        job = Job(body, f"load {path.name}", _LoadRequest(path, trust, time.perf_counter()))
        self.load_job = job
        job.progress.connect(self._on_load_progress)
        job.succeeded.connect(self._on_loaded)
        job.failed.connect(self._on_load_failed)
        job.done.connect(self._on_load_done)
        job.start()
        self.progress_bar.setValue(0)
        self.progress_bar.show()
        self.statusBar().showMessage(f"Opening {path.name}…")
        return job

    def _current_load(self) -> "_LoadRequest | None":
        """The request of the job that sent this signal, if it is still the one we wait for."""
        job = self.sender()
        if job is None or job is not self.load_job or job.is_cancelled:
            return None
        return job.context

    def _on_load_progress(self, fraction: float, message: str) -> None:
        if self._current_load() is not None:
            self.progress_bar.setValue(int(fraction * 1000))
            if message:
                self.statusBar().showMessage(message)

    def _on_loaded(self, model: Model) -> None:
        request = self._current_load()
        if request is None:
            return
        self.session.set_model(model)
        if model.layers:
            self.session.select_layer(model.layers[0].name)
        self._add_recent(request.path)
        seconds = time.perf_counter() - request.started
        self.statusBar().showMessage(
            f"Opened {request.path.name}: {len(model.layers)} layers in {seconds:.1f} s", 8000
        )

    def _on_load_failed(self, message: str, details: str, exc: BaseException) -> None:
        request = self._current_load()
        if request is None:
            return
        self.load_job = None  # the retry below must not be taken for this job
        path = request.path
        if isinstance(exc, UntrustedPickleError) and not request.trust:
            self._hide_progress()
            if self.confirm_trust(self, path, message):
                self.open_model(path, trust=True)
            else:
                self.statusBar().showMessage(f"{path.name} was not opened: it was not trusted", 8000)
            return
        self.statusBar().showMessage(f"Could not open {path.name}", 8000)
        self.show_error(self, message, details)

    def _on_load_done(self) -> None:
        if self.sender() is self.load_job:
            self.load_job = None
        if self.load_job is None:
            self._hide_progress()

    def _hide_progress(self) -> None:
        self.progress_bar.hide()

    @property
    def loading(self) -> bool:
        return self.load_job is not None

    def _on_model_changed(self, model: Model | None) -> None:
        self.stack.setCurrentIndex(0 if model is None else 1)
        self.setWindowTitle(f"{model.path.name} — Slimscope" if model is not None else "Slimscope")
        self.setWindowFilePath(str(model.path) if model is not None else "")

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
        self.layer_table.filter_edit.setFocus()
        self.layer_table.filter_edit.selectAll()

    def _about(self) -> None:
        QMessageBox.about(
            self,
            "About Slimscope",
            f"<b>Slimscope</b> {__version__}<p>Inspect and compress neural networks.</p>",
        )

    # -- persistence ---------------------------------------------------------------------------------
    def _restore_layout(self) -> None:
        geometry = self.settings.value("main_window/geometry")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:
            self.resize(1280, 780)
        state = self.settings.value("main_window/state")
        if isinstance(state, QByteArray):
            self.restoreState(state)
        splitter = self.settings.value("main_window/splitter")
        if isinstance(splitter, QByteArray) and not splitter.isEmpty():
            self.splitter.restoreState(splitter)
        else:
            self.splitter.setSizes([760, 500])

    def save_layout(self) -> None:
        self.settings.setValue("main_window/geometry", self.saveGeometry())
        self.settings.setValue("main_window/state", self.saveState())
        self.settings.setValue("main_window/splitter", self.splitter.saveState())
        self.settings.sync()

    def closeEvent(self, event: QCloseEvent) -> None:
        self.save_layout()
        if self.load_job is not None:
            self.load_job.cancel()
        self.session.shutdown()
        super().closeEvent(event)
