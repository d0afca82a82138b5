"""The app's dialogs: errors as one clear line (details on request), the trust question, and
"save the plan?" on close.

All are plain functions the main window receives as arguments, so tests can swap them for
recorders and never block on a modal dialog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox, QPushButton, QWidget

#: ``show_error(parent, message, details)``: tell the user, return at once.
ErrorReporter = Callable[[QWidget | None, str, str], None]
#: ``confirm_trust(parent, path, reason) -> bool``: True only on an explicit yes.
TrustPrompt = Callable[[QWidget | None, Path, str], bool]
#: ``ask_save_changes(parent, what) -> "save" | "discard" | "cancel"``.
SavePrompt = Callable[[QWidget | None, str], str]

ERROR_DIALOG_NAME = "slimscope-error-dialog"

TRUST_WARNING = (
    "This file can run code on your computer when opened; open only if you trust its source."
)


class ErrorDialog(QMessageBox):
    """A warning box with the one-line message on top and the traceback folded away."""

    def __init__(self, parent: QWidget | None, message: str, details: str = "", title: str = "") -> None:
        super().__init__(parent)
        self.setObjectName(ERROR_DIALOG_NAME)
        self.setIcon(QMessageBox.Icon.Warning)
        self.setWindowTitle(title or "Slimscope")
        self.setText(message)
        self.setTextFormat(Qt.TextFormat.PlainText)
        if details:
            self.setDetailedText(details)
        self.setStandardButtons(QMessageBox.StandardButton.Ok)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)

    @property
    def message(self) -> str:
        return self.text()


def show_error(parent: QWidget | None, message: str, details: str = "") -> None:
    """Show an error without blocking the caller: window-modal over `parent`, closed by OK."""
    dialog = ErrorDialog(parent, message, details)
    dialog.open()


def trust_box(parent: QWidget | None, path: Path, reason: str = "") -> tuple[QMessageBox, QPushButton]:
    """The trust question and its 'open' button; Cancel is the default and the Escape answer."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Warning)
    box.setWindowTitle("Open a pickled model?")
    box.setTextFormat(Qt.TextFormat.PlainText)
    box.setText(f"{path.name} is a pickled Python object.\n\n{TRUST_WARNING}")
    box.setInformativeText(
        "Opening unpickles it with your user's full access to files and network. If you only "
        "need its weights, a safetensors or ONNX copy of the model opens without this risk."
    )
    if reason:
        box.setDetailedText(reason)
    open_button = box.addButton("Open and run its code", QMessageBox.ButtonRole.AcceptRole)
    cancel_button = box.addButton(QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(cancel_button)
    box.setEscapeButton(cancel_button)
    return box, open_button


def confirm_trust(parent: QWidget | None, path: Path, reason: str = "") -> bool:
    """Ask before unpickling `path`; True only when the user clicked the open button.

    `reason` is the loader's account of what the pickle references, shown under Details.
    """
    box, open_button = trust_box(parent, path, reason)
    box.exec()
    return box.clickedButton() is open_button


def save_changes_box(parent: QWidget | None, what: str) -> QMessageBox:
    """Save / Discard / Cancel for unsaved changes to `what`; Save is the default, Escape
    cancels."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("Unsaved changes")
    box.setTextFormat(Qt.TextFormat.PlainText)
    box.setText(f"Save the changes to {what} before closing?")
    box.setInformativeText("Without saving, the edits since the last save are lost.")
    box.setStandardButtons(QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard
                           | QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(QMessageBox.StandardButton.Save)
    box.setEscapeButton(QMessageBox.StandardButton.Cancel)
    return box


def ask_save_changes(parent: QWidget | None, what: str) -> str:
    """"save", "discard" or "cancel", as the user answers :func:`save_changes_box`."""
    answer = save_changes_box(parent, what).exec()
    return {QMessageBox.StandardButton.Save: "save",
            QMessageBox.StandardButton.Discard: "discard"}.get(
        QMessageBox.StandardButton(answer), "cancel")
