"""Help › About: name, version, what Slimscope is, the versions it runs on, and its license.

``python -m gui.about`` shows the dialog alone. Versions come from package metadata, so opening
it never imports torch; the frozen app carries the dist-info it needs (packaging/slimscope.spec).
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from importlib.util import find_spec

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from engine import __version__

from gui.icons import app_icon

APP_NAME = "Slimscope"
DESCRIPTION = "Inspect and compress neural networks."
#: (label, distribution name, import name) of what the About box lists, in order.
COMPONENTS = (
    ("PyTorch", "torch", "torch"),
    ("ONNX", "onnx", "onnx"),
    ("ONNX Runtime", "onnxruntime", "onnxruntime"),
    ("PySide6", "PySide6-Essentials", "PySide6"),
    ("NumPy", "numpy", "numpy"),
)
FALLBACK_LICENSE = "Apache-2.0"


def _dist_version(dist: str, module: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    loaded = sys.modules.get(module)  # already imported: ask it; never import it just for this
    if loaded is not None and getattr(loaded, "__version__", None):
        return str(loaded.__version__)
    return "installed" if find_spec(module) is not None else "not installed"


def component_versions() -> list[tuple[str, str]]:
    """(label, version) for Slimscope, Python and every component, for the dialog and bug reports."""
    rows = [(APP_NAME, __version__), ("Python", platform.python_version())]
    for label, dist, module in COMPONENTS:
        version = _dist_version(dist, module)
        if module == "PySide6":
            from PySide6.QtCore import qVersion

            version = f"{version} (Qt {qVersion()})"
        rows.append((label, version))
    rows.append(("Running as", "bundled app" if getattr(sys, "frozen", False) else "Python package"))
    rows.append(("System", f"{platform.system()} {platform.release()} {platform.machine()}"))
    return rows


def license_name() -> str:
    try:
        meta = metadata.metadata("slimscope")
    except metadata.PackageNotFoundError:
        return FALLBACK_LICENSE
    return meta.get("License-Expression") or meta.get("License") or FALLBACK_LICENSE


def details_text() -> str:
    """The versions as plain text, one per line: what "Copy details" puts on the clipboard."""
    return "\n".join(f"{label}: {version}" for label, version in component_versions())


class AboutDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"About {APP_NAME}")
        self.setWindowIcon(app_icon())

        logo = QLabel()
        logo.setPixmap(app_icon().pixmap(96, 96))
        logo.setAlignment(Qt.AlignmentFlag.AlignTop)

        self.title = QLabel(f"<h2 style='margin:0'>{APP_NAME}</h2>version {__version__}")
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        description = QLabel(DESCRIPTION)
        description.setWordWrap(True)

        versions = QFormLayout()
        versions.setLabelAlignment(Qt.AlignmentFlag.AlignRight)
        self.version_labels: dict[str, QLabel] = {}
        for label, version in component_versions()[1:]:
            value = QLabel(version)
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.version_labels[label] = value
            versions.addRow(f"{label}:", value)

        self.license = QLabel(f"Licensed under {license_name()}.")

        text = QVBoxLayout()
        text.addWidget(self.title)
        text.addWidget(description)
        text.addSpacing(8)
        text.addLayout(versions)
        text.addSpacing(8)
        text.addWidget(self.license)

        top = QHBoxLayout()
        top.addWidget(logo)
        top.addSpacing(12)
        top.addLayout(text, 1)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.copy_button = QPushButton("Copy details")
        self.copy_button.setToolTip("Copy these versions, e.g. for a bug report")
        buttons.addButton(self.copy_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.copy_button.clicked.connect(self.copy_details)
        buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(buttons)

    def copy_details(self) -> None:
        QGuiApplication.clipboard().setText(details_text())


if __name__ == "__main__":
    from gui.preview import ensure_app

    app = ensure_app()
    AboutDialog().exec()
