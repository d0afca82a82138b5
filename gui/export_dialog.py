"""Export the compressed model: pick a format and a file, write it on a worker, show the proof.

The formats are the export module's registry (ONNX fp32 / int8 / weight-only, state_dict,
pickled module, TorchScript, .pt2, safetensors, the .slim bundle) plus "automatic", which lets
the engine choose from the extension and the plan. The engine writes to a temporary file,
reloads it with its users' runtime, compares it with the compressed model in memory and only
then puts it in place; the dialog shows that verification (size ratio, largest output
difference, agreement, accuracy, latency). The input model is never a valid destination: the
dialog refuses it before any work, and the engine refuses it again.

Run alone: ``python -m gui.export_dialog [MODEL]`` compresses the demo (or MODEL) with a small
plan and opens the dialog.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QEvent, QSettings, Qt, QTimer
from PySide6.QtGui import QFont, QPalette
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from engine.errors import SlimscopeError, one_line
from engine.safe_write import check_outputs, data_input

from gui import capabilities, dialogs
from gui.session import CompressionOutcome
from gui.theme import BAD, GOOD, STATUS_COLORS, status_color
from gui.text import human_bytes
from gui.job_service import EXPORT, JobService
from gui.workers import Job, export_job

AUTOMATIC = ""
FORMAT_LABELS = {
    AUTOMATIC: "Automatic — from the file extension and the plan",
    "onnx": "ONNX, fp32 (pruned and low-rank structure)",
    "onnx-int8": "ONNX, int8 (static QDQ, weight-only or dynamic: the smallest not slower)",
    "onnx-dynamic": "ONNX, dynamic int8 (MatMul/Gemm)",
    "onnx-w4": "ONNX, weight-only 4-bit (MatMulNBits)",
    "onnx-w8": "ONNX, weight-only 8-bit (MatMulNBits)",
    "state-dict": "PyTorch state_dict (.pt)",
    "torch-module": "PyTorch module, pickled (.pt)",
    "torchscript": "TorchScript (.pt)",
    "pt2": "torch.export program (.pt2)",
    "safetensors": "safetensors",
    "slim": "Slimscope bundle (.slim)",
}
SETTINGS_DIR, SETTINGS_FORMAT = "export/dir", "export/format"
#: Meanings (gui.theme) of the verdict colours; the look picks the shade (dark-on-dark before).
PASSED, FAILED = GOOD, BAD


def exporters() -> dict[str, Any]:
    from engine.export import formats

    return formats()


class ExportDialog(QDialog):
    """See the module docstring. ``result`` holds the engine's ExportResult once done."""

    def __init__(self, outcome: CompressionOutcome, parent: QWidget | None = None, *,
                 settings: QSettings | None = None,
                 show_error: dialogs.ErrorReporter = dialogs.show_error,
                 log: Callable[[str, str], None] | None = None,
                 jobs: JobService | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export Compressed Model")
        self.outcome = outcome
        self.settings = settings if settings is not None else QSettings()
        self.show_error = show_error
        self.log = log or (lambda _message, _level="info": None)
        #: Runs the export in its EXPORT slot: the window's, so one export runs at a time.
        self.jobs = jobs if jobs is not None else JobService(parent=self)
        self.result: Any = None
        self._registry = exporters()

        intro = QLabel(f"Write <b>{outcome.model.path.name}</b>, compressed, to a new file. It is reloaded "
                       "and checked against the compressed model before it is kept.")
        intro.setWordWrap(True)
        self.format_combo = QComboBox()
        #: Format -> the engine's one line why this model cannot be written in it.
        self.blocked: dict[str, str] = {}
        for name in [AUTOMATIC, *self._registry]:
            self.format_combo.addItem(FORMAT_LABELS.get(name, name), name)
            if not name:
                continue
            need = capabilities.export_need(name, self._registry[name])
            reason = capabilities.why_not(outcome.model, need)
            if reason is not None:
                self.blocked[name] = reason
                item = self.format_combo.model().item(self.format_combo.count() - 1)  # type: ignore[attr-defined]
                item.setEnabled(False)
                item.setToolTip(reason)
                item.setStatusTip(reason)
        self.description = QLabel()
        self.description.setWordWrap(True)
        self.description.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("where to write the file")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(browse)
        self.plan_label = QLabel()
        self.plan_label.setWordWrap(True)
        format_field = QVBoxLayout()
        format_field.setSpacing(4)
        format_field.addWidget(self.format_combo)
        format_field.addWidget(self.description)
        form = QFormLayout()
        form.addRow("Format", format_field)
        form.addRow("File", path_row)
        form.addRow("Writes", self.plan_label)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.hide()
        self.status = QLabel()
        self.status.setWordWrap(True)

        self.result_frame = QFrame()
        self.result_frame.setFrameShape(QFrame.Shape.StyledPanel)
        self.verdict = QLabel()
        verdict_font = QFont(self.verdict.font())
        verdict_font.setBold(True)
        self.verdict.setFont(verdict_font)
        self.verdict.setWordWrap(True)
        self.facts = QFormLayout()  # unlike a grid, it gives wrapped values the lines they need
        self.facts.setHorizontalSpacing(14)
        self.facts.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop)
        self.facts.setRowWrapPolicy(QFormLayout.RowWrapPolicy.DontWrapRows)
        self.notes = QLabel()
        self.notes.setWordWrap(True)
        self.notes.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.notes.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        result_layout = QVBoxLayout(self.result_frame)
        result_layout.addWidget(self.verdict)
        result_layout.addLayout(self.facts)
        result_layout.addWidget(self.notes)
        self.result_frame.hide()

        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.export_button = self.buttons.addButton("Export", QDialogButtonBox.ButtonRole.ApplyRole)
        self.export_button.setDefault(True)
        self.export_button.clicked.connect(self.start_export)
        self.cancel_button = self.buttons.addButton("Cancel Export", QDialogButtonBox.ButtonRole.ActionRole)
        self.cancel_button.clicked.connect(self.cancel_export)
        self.cancel_button.hide()
        self.buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.result_frame)
        layout.addStretch(1)
        layout.addWidget(self.buttons)

        remembered = str(self.settings.value(SETTINGS_FORMAT, AUTOMATIC) or AUTOMATIC)
        if remembered in self.blocked:
            remembered = AUTOMATIC
        index = self.format_combo.findData(remembered)
        self.format_combo.setCurrentIndex(max(index, 0))
        self.path_edit.setText(str(self._default_path()))
        self.format_combo.currentIndexChanged.connect(self._on_format)
        self.path_edit.textChanged.connect(self._explain)
        self._on_format()
        self.setMinimumWidth(680)
        self.resize(680, 420)

    # -- choosing ---------------------------------------------------------------------------
    def _color(self, meaning: str) -> str:
        """The look's shade of a meaning (GOOD, BAD) for a verdict span."""
        return status_color(meaning, self.palette())

    def changeEvent(self, event: QEvent) -> None:
        """On a new look, the verdict spans already shown take its shades of their meanings."""
        super().changeEvent(event)
        if event.type() != QEvent.Type.PaletteChange or not hasattr(self, "verdict"):
            return
        for label in (self.plan_label, self.status, self.verdict):
            text = label.text()
            for meaning in (PASSED, FAILED):
                for shades in STATUS_COLORS.values():
                    text = text.replace(f"color:{shades[meaning]}'", f"color:{self._color(meaning)}'")
            label.setText(text)

    def format_name(self) -> str | None:
        return self.format_combo.currentData() or None

    def destination(self) -> Path:
        return Path(self.path_edit.text().strip()).expanduser()

    def offered(self) -> list[str]:
        """The formats this model can be written in (its backend's capabilities decide)."""
        return [name for name in self._registry if name not in self.blocked]

    def _suffix(self) -> str:
        name = self.format_name()
        if name:
            return self._registry[name].suffixes[0]
        if ".onnx" in {s for n in self.offered() for s in self._registry[n].suffixes}:
            return ".onnx"
        offered = self.offered()
        return self._registry[offered[0]].suffixes[0] if offered else ".onnx"

    def _default_path(self) -> Path:
        model_path = self.outcome.model.path
        folder = Path(str(self.settings.value(SETTINGS_DIR, "") or model_path.parent))
        return folder / f"{model_path.stem}-compressed{self._suffix()}"

    def _on_format(self) -> None:
        name = self.format_name()
        self.description.setText(self._registry[name].description if name else
                                 "ONNX follows the plan (int8, weight-only or fp32); .pt is a state_dict "
                                 "when the architecture is unchanged, else TorchScript.")
        text = self.path_edit.text().strip()
        if name and text and Path(text).suffix.lower() not in self._registry[name].suffixes:
            self.path_edit.setText(str(Path(text).with_suffix(self._suffix())))
        self._explain()

    def _explain(self) -> None:
        """Say which format the engine will write for this name, and why (or what is wrong)."""
        from engine.export import resolve_format

        self._refusal = None
        if not self.path_edit.text().strip():
            self.plan_label.setText("")
            self._gate_export()
            return
        try:
            exporter, reason = resolve_format(self.destination(), self.format_name(),
                                              self.outcome.compressed, self.outcome.model)
        except Exception as exc:  # noqa: BLE001 - whatever the engine says, the dialog stays up
            self._refusal = one_line(exc) if isinstance(exc, SlimscopeError) else (
                f"cannot export this model: {type(exc).__name__}: {one_line(exc)}")
            self.plan_label.setText(f"<span style='color:{self._color(FAILED)}'>{html.escape(str(exc))}</span>")
            self._gate_export()
            return
        if exporter.name in self.blocked:  # e.g. "automatic" picked a format this model lacks
            self._refusal = f"{exporter.name}: {self.blocked[exporter.name]}"
            self.plan_label.setText(f"<span style='color:{self._color(FAILED)}'>{html.escape(self._refusal)}</span>")
        else:
            self.plan_label.setText(f"<b>{exporter.name}</b> — {html.escape(reason)}")
        self._gate_export()

    def _gate_export(self) -> None:
        """Export is offered only for a format the engine accepts for this model and file."""
        if self.job is None:
            capabilities.gate(self.export_button, self._refusal, "Write the file, reload it and verify it")

    def _browse(self) -> None:
        suffixes = sorted({s for e in self._registry.values() for s in e.suffixes})
        name = self.format_name()
        wanted = self._registry[name].suffixes if name else suffixes
        file_filter = f"Model files ({' '.join('*' + s for s in wanted)});;All files (*)"
        path, _ = QFileDialog.getSaveFileName(self, "Export to", self.path_edit.text(), file_filter)
        if path:
            self.path_edit.setText(path)

    # -- exporting ---------------------------------------------------------------------------
    def check(self) -> str | None:
        """The one-line reason this destination cannot be written, or None."""
        from engine.export import check_destination

        if not self.path_edit.text().strip():
            return "choose a file to export to"
        if getattr(self, "_refusal", None):
            return self._refusal
        destination = self.destination()
        try:
            check_destination(destination, self.format_name())
            data = self.outcome.data
            check_outputs([destination], [self.outcome.model.path,
                                          data_input("data", data.evaluation),
                                          data_input("calibration data", data.calibration),
                                          data_input("training data", data.train)])
        except SlimscopeError as exc:
            return str(exc)
        if not destination.parent.is_dir():
            return f"{destination.parent} is not a folder"
        return None

    def start_export(self) -> Job | None:
        problem = self.check()
        if problem is not None:
            self.show_error(self, problem, "")
            return None
        destination = self.destination()
        self.settings.setValue(SETTINGS_DIR, str(destination.parent))
        self.settings.setValue(SETTINGS_FORMAT, self.format_name() or AUTOMATIC)
        job = self.jobs.start(EXPORT, export_job(self.outcome, destination, self.format_name()),
                              on_progress=self._on_progress, on_result=self._on_done,
                              on_error=self._on_failed, on_cancelled=self._on_cancelled,
                              on_done=self._on_finished)
        self.result = None
        self.result_frame.hide()
        self.progress.setValue(0)
        self.progress.show()
        self.status.setText(f"Exporting to {destination.name}…")
        self.export_button.setEnabled(False)
        self.cancel_button.show()
        self.log(f"export: writing {destination}", "info")
        return job

    @property
    def job(self) -> Job | None:
        """The export running now, if any."""
        return self.jobs.current(EXPORT)

    def cancel_export(self) -> None:
        if self.jobs.cancel(EXPORT):
            self.status.setText("Cancelling…")

    def _on_progress(self, fraction: float, message: str) -> None:
        self.progress.setValue(int(fraction * 1000))
        if message:
            self.status.setText(message)

    def _on_done(self, result: Any) -> None:
        self.result = result
        self.show_result(result)
        verdict = "written and verified" if result.kept else "discarded: verification failed"
        self.log(f"export: {Path(result.path or self.destination()).name} {verdict} — "
                 f"{result.verification.summary()}", "ok" if result.kept else "error")

    def _on_failed(self, message: str, details: str, _exc: object) -> None:
        self.status.setText(f"<span style='color:{self._color(FAILED)}'>Export failed: {message}</span>")
        self.log(f"export failed: {message}", "error")
        self.show_error(self, message, details)

    def _on_cancelled(self) -> None:
        self.status.setText("Export cancelled; nothing was written.")
        self.log("export cancelled; nothing was written", "warning")

    def _on_finished(self) -> None:
        self.progress.hide()
        self.cancel_button.hide()
        self._explain()

    def show_result(self, result: Any) -> None:
        """The verdict and the figures of an engine ExportResult."""
        verification = result.verification
        metrics = verification.metrics or {}
        if result.kept:
            # The engine's headline: the size against the file the user opened, not only a tick.
            headline = result.headline
            if result.size_note and result.size_note in result.notes:  # said once, in the notes
                headline = headline.removesuffix(f"; {result.size_note}")
            self.verdict.setText(f"<span style='color:{self._color(PASSED)}'>✓ Verified</span> — {html.escape(headline)}")
            self.status.setText(f"Wrote {Path(result.path).name} ({result.format}).")
        else:
            self.verdict.setText(f"<span style='color:{self._color(FAILED)}'>✗ Verification failed — the file was "
                                 "discarded</span>")
            self.status.setText("Nothing was written.")
        self.verdict.setTextFormat(Qt.TextFormat.RichText)
        rows: list[tuple[str, str]] = [
            ("Format", f"{result.format} — {result.reason}"),
            *([("Written to", str(result.path))] if result.kept else []),
            ("File size", f"{human_bytes(result.bytes)} = {result.size_ratio:.3f}× {result.baseline} "
                          f"({human_bytes(result.baseline_bytes)})"),
            ("Checked", f"reloaded with {verification.runtime} on {verification.data}"),
            ("Needs", verification.criterion),
        ]
        if verification.error:
            rows.append(("Error", verification.error))
        if metrics.get("max_abs_diff") is not None:
            rows.append(("Max |diff|", f"{metrics['max_abs_diff']:.3g} (largest output "
                                       f"{verification.output_scale or 0:.3g})"))
        if metrics.get("agreement") is not None:
            rows.append(("Agreement", f"{100 * metrics['agreement']:.2f} % same top-1 as in memory"))
        accuracy = metrics.get("accuracy")
        if accuracy is not None:
            before = (result.baseline_metrics or {}).get("accuracy")
            rows.append(("Accuracy", f"{100 * accuracy:.2f} %" +
                         (f" (original {100 * before:.2f} %)" if before is not None else "")))
        if result.latency_ms is not None and result.baseline_latency_ms:
            rows.append(("Latency", f"{result.latency_ms:.2f} ms vs {result.baseline_latency_ms:.2f} ms "
                                    f"original ({result.latency_ms / result.baseline_latency_ms:.2f}×; "
                                    f"{result.latency_method})"))
        while self.facts.rowCount():
            self.facts.removeRow(0)
        for key, value in rows:
            key_label = QLabel(key)
            key_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
            key_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop)
            value_label = QLabel(value)
            value_label.setWordWrap(True)
            value_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.facts.addRow(key_label, value_label)
        self.notes.setText("\n".join(f"• {note}" for note in result.notes))
        self.notes.setVisible(bool(result.notes))
        self.result_frame.show()
        QTimer.singleShot(0, self._fit_height)

    def _fit_height(self) -> None:
        """Grow to show every wrapped line at the current width (adjustSize would narrow it)."""
        self.resize(self.width(), max(self.height(), self.layout().totalHeightForWidth(self.width())))

    def result_text(self) -> str:
        """Everything the result box says, as plain text (tests, accessibility)."""
        parts = [self.verdict.text()]
        for row in range(self.facts.rowCount()):
            for role in (QFormLayout.ItemRole.LabelRole, QFormLayout.ItemRole.FieldRole):
                item = self.facts.itemAt(row, role)
                if item is not None and isinstance(item.widget(), QLabel):
                    parts.append(item.widget().text())
        parts.append(self.notes.text())
        return "\n".join(parts)

    def reject(self) -> None:
        """Closing while exporting cancels the export (the engine leaves no partial file)."""
        self.cancel_export()
        super().reject()


def _main(argv: list[str]) -> int:
    from PySide6.QtCore import QEventLoop

    from gui.preview import ensure_app, open_preview_model
    from gui.session import Session
    from gui.workers import compression_job

    app = ensure_app()
    model = open_preview_model(argv[0] if argv else None)
    if model is None:
        return 2
    session = Session()
    session.set_model(model, sweep=False)
    session.plan_document.set_defaults({"quantization": {"bits": 8}})
    outcomes: list[CompressionOutcome] = []
    job = compression_job(session.model, session.plan_document.to_dict(), session.effective_data())
    job.succeeded.connect(outcomes.append)
    job.failed.connect(lambda message, *_: print(f"error: {message}", file=sys.stderr))
    job.start()
    while not job.finished:
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
    if not outcomes:
        return 2
    dialog = ExportDialog(outcomes[0])
    return dialog.exec()


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
