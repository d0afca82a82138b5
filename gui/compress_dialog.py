"""Choose the data compression uses: evaluation, calibration and training (for recovery).

Each field takes what ``slimscope compress --data/--calibration/--train-data`` takes (``demo``,
``demo:train``, ``synthetic:256``, an image folder, a .npy/.npz file); an empty field keeps the
CLI's default, shown as the placeholder. Specs are opened on the worker when compression runs,
so a wrong one comes back as the engine's one-line error, not a frozen window.

Run alone: ``python -m gui.compress_dialog`` prints the choice.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from engine.data import DataSpec
from engine.model import Model

from gui import capabilities

FIELDS = (
    ("evaluation", "Evaluation",
     "Measures accuracy (with labels) or agreement with the original, and latency"),
    ("calibration", "Calibration",
     "Feeds gradient pruning, structured tracing, int8 calibration and the choice of the best "
     "recovery step; never the evaluation data itself"),
    ("train", "Training", "What recovery fine-tuning learns from"),
)
#: What the model's backend must do for a field's data to be used.
FIELD_NEEDS = {"evaluation": capabilities.RUN, "calibration": capabilities.RUN,
               "train": capabilities.RECOVERY_NEED}


class CompressionDataDialog(QDialog):
    def __init__(self, current: DataSpec, model_is_demo: bool, parent: QWidget | None = None,
                 model: Model | None = None) -> None:
        super().__init__(parent)
        self.current = current
        self.setWindowTitle("Compression Data")
        defaults = DataSpec().effective(model_is_demo)
        intro = QLabel("Where compression finds its samples. Leave a field empty for the default; "
                       "the CLI takes the same values (--data, --calibration, --train-data).")
        intro.setWordWrap(True)
        form = QFormLayout()
        self.edits: dict[str, QLineEdit] = {}
        for key, label, tip in FIELDS:
            edit = QLineEdit(getattr(current, key) or "")
            default = getattr(defaults, key)
            edit.setPlaceholderText(f"default: {default}" if default else
                                    ("default: the first evaluation samples" if key == "calibration"
                                     else "none"))
            edit.setToolTip(tip)
            browse = QPushButton("Browse…")
            browse.clicked.connect(lambda _checked=False, edit=edit: self._browse(edit))
            reason = capabilities.why_not(model, FIELD_NEEDS[key]) if model is not None else None
            if reason is not None:  # data this model cannot use is not asked for
                edit.clear()
                capabilities.gate_all((edit, browse), reason, tip)
            row = QHBoxLayout()
            row.addWidget(edit, 1)
            row.addWidget(browse)
            form.addRow(label, row)
            self.edits[key] = edit
        hint = QLabel("demo · demo:train · demo:calibration · synthetic:256 · a folder of images · a .npy/.npz file")
        hint.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        hint.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(hint)
        layout.addWidget(buttons)
        self.resize(600, self.sizeHint().height())

    def _browse(self, edit: QLineEdit) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Data file", edit.text(), "Arrays (*.npy *.npz);;All files (*)")
        if path:
            edit.setText(path)

    def data(self) -> DataSpec:
        values = {key: (edit.text().strip() or None) for key, edit in self.edits.items()}
        return replace(self.current, **values)  # sample limit and input sizes stay as they were


def ask_compression_data(parent: QWidget | None, current: DataSpec, model_is_demo: bool,
                         model: Model | None = None) -> DataSpec | None:
    dialog = CompressionDataDialog(current, model_is_demo, parent, model)
    return dialog.data() if dialog.exec() == QDialog.DialogCode.Accepted else None


def _main(argv: list[str]) -> int:
    from gui.preview import ensure_app

    ensure_app()
    print(ask_compression_data(None, DataSpec(), "--demo" in argv))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
