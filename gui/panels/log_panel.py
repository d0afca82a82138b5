"""The log: timestamped lines from background work, so what happened stays readable afterwards.

Progress callbacks can fire hundreds of times a second; :meth:`LogPanel.progress` keeps a line
only when the stage changes (the message up to its first digit) or when a few seconds have
passed, so the log reads like a story, not a flood. Errors are kept whole and in red (the red, green
and amber of the current look: switching the theme recolours the lines already there). The view
follows its newest line.

Run alone: ``python -m gui.panels.log_panel`` shows a sample.
"""

from __future__ import annotations

import html
import re
import sys
import time
from datetime import datetime

from PySide6.QtCore import QEvent
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QPlainTextEdit, QVBoxLayout, QWidget

from gui.theme import BAD, GOOD, WARNING, status_color

#: A progress line is repeated at most this often while its stage stays the same.
PROGRESS_EVERY_S = 3.0
MAX_LINES = 5000
#: Each level's meaning in gui.theme (its colour depends on the look); info is plain text.
LEVEL_MEANINGS = {"info": None, "ok": GOOD, "warning": WARNING, "error": BAD}


def _stage(message: str) -> str:
    """'recovery step 12/500, loss 0.3' -> 'recovery step': what a line is about."""
    return re.split(r"\d", message, maxsplit=1)[0].strip(" :,")


class LogPanel(QWidget):
    """A read-only, monospace, timestamped log."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.view = QPlainTextEdit()
        self.view.setReadOnly(True)
        self.view.setMaximumBlockCount(MAX_LINES)
        self.view.setUndoRedoEnabled(False)
        self.view.setMinimumHeight(40)  # a small window keeps a line or two of log
        font = QFont(self.font())
        font.setStyleHint(QFont.StyleHint.Monospace)
        font.setFamilies(["DejaVu Sans Mono", "Menlo", "Consolas", "monospace"])
        self.view.setFont(font)
        self.view.setPlaceholderText("Background work reports here: loading, compression, export.")
        self._last_stage = ""
        self._last_time = 0.0
        #: Plain text of every line, for tests and copying.
        self.lines: list[str] = []
        #: Each line's level, to recolour the log when the look changes.
        self.levels: list[str] = []
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.view)

    def add(self, message: str, level: str = "info") -> None:
        """Append one line (several for a multi-line message), stamped with the time."""
        stamp = datetime.now().strftime("%H:%M:%S")
        for i, part in enumerate(message.splitlines() or [""]):
            text = f"{stamp}  {part}" if i == 0 else f"{' ' * len(stamp)}  {part}"
            self.lines.append(text)
            self.levels.append(level)
            self.view.appendHtml(self._html(text, level))
        if len(self.lines) > MAX_LINES:
            del self.lines[:-MAX_LINES], self.levels[:-MAX_LINES]
        self.follow_tail()
        self._last_stage = ""

    def _html(self, text: str, level: str) -> str:
        meaning = LEVEL_MEANINGS.get(level)
        escaped = html.escape(text).replace(" ", "&nbsp;")
        return f"<span style='color:{status_color(meaning, self.palette())}'>{escaped}</span>" if meaning else escaped

    def follow_tail(self) -> None:
        """Scroll to the newest line (Qt follows the tail only while the view is on screen and
        already at its end)."""
        bar = self.view.verticalScrollBar()
        bar.setValue(bar.maximum())

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and self.lines:
            self.view.clear()
            for text, level in zip(self.lines, self.levels):
                self.view.appendHtml(self._html(text, level))
            self.follow_tail()

    def progress(self, fraction: float, message: str) -> None:
        """A progress report: logged when its stage is new, or every few seconds."""
        if not message:
            return
        stage, now = _stage(message), time.monotonic()
        if stage == self._last_stage and now - self._last_time < PROGRESS_EVERY_S:
            return
        self.add(f"[{fraction:4.0%}] {message}")
        self._last_stage, self._last_time = stage, now

    def clear(self) -> None:
        self.view.clear()
        self.lines.clear()
        self.levels.clear()


def _main(argv: list[str]) -> int:
    from gui.preview import ensure_app

    app = ensure_app()
    panel = LogPanel()
    panel.add("Opened digits_cnn.safetensors: 8 layers in 0.1 s")
    for step in range(0, 101, 10):
        panel.progress(step / 100, f"recovery step {step}/100, loss {1 / (step + 1):.4f}")
    panel.add("Compressed: 737.2 KiB → 118.9 KiB (0.161×)", "ok")
    panel.add("export failed: could not write out.onnx", "error")
    panel.resize(640, 240)
    panel.show()
    return app.exec() if "--no-exec" not in argv else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
