"""Choose how to measure sensitivity: the method, and the data it runs on.

The dialog only builds a :class:`~gui.project.DataChoice` (a data spec string as
:func:`engine.data.open_data` reads it, a method, a sample limit); opening the data happens on the
worker, so a big folder never freezes the window, and a spec that does not fit the model comes
back as one line in the log. Paths are checked here, at once, because a typo is the common case.

Run alone: ``python -m gui.data_dialog`` prints the choice.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from engine.data import DEFAULT_SYNTHETIC_COUNT
from engine.model import Model

from gui import capabilities
from gui.project import DataChoice

METHODS: tuple[tuple[str, str, str], ...] = (
    ("exact", "&Exact",
     "Measures the metric with each layer compressed alone, at every level. The reference; "
     "minutes on big models."),
    ("fast", "&Fast",
     "Estimates the loss change from one forward and backward pass (diagonal Fisher). "
     "Seconds; needs data."),
    ("datafree", "&Data-free",
     "Weight noise-to-signal ratio only. Needs no data; a first look in seconds."),
)
#: What "fast" does where the runtime has no gradients (ONNX Runtime): engine.sensitivity_backends.
FAST_WITHOUT_GRADIENTS = (
    "Predicts each layer's output error from its input statistics (XᵀX), collected in one "
    "forward pass; no gradients needed. Seconds; needs data; the metric is the output's "
    "noise ratio, not accuracy.")
DEMO, FOLDER, ARRAYS, SYNTHETIC = "demo", "folder", "arrays", "synthetic"
ARRAY_FILTER = "NumPy arrays (*.npy *.npz);;All files (*)"
MAX_SAMPLES = 1_000_000


def source_kind(spec: str | None) -> str:
    """Which radio button a spec belongs to."""
    if spec is None or spec.partition(":")[0] == DEMO:
        return DEMO
    if spec.partition(":")[0] == SYNTHETIC:
        return SYNTHETIC
    return ARRAYS if Path(spec).suffix.lower() in (".npy", ".npz") else FOLDER


class DataDialog(QDialog):
    """See the module docstring; `choice()` holds the answer once accepted."""

    def __init__(self, parent: QWidget | None = None, initial: DataChoice | None = None,
                 model_name: str = "", model: Model | None = None) -> None:
        super().__init__(parent)
        #: Method (or "ranks") -> the engine's one line why this model cannot do it.
        self.blocked: dict[str, str] = {}
        if model is not None:
            for key, _label, _help in METHODS:
                reason = capabilities.sensitivity_why_not(model, key)
                if reason is not None:
                    self.blocked[key] = reason
            reason = capabilities.why_not(model, capabilities.RANKS_NEED)
            if reason is not None:
                self.blocked["ranks"] = reason
        self.setWindowTitle("Sensitivity analysis")
        initial = initial or DataChoice()

        intro = QLabel(
            "Each layer is compressed alone, at every pruning and bit-width level, and the "
            "change of the model's metric is recorded" + (f" for <b>{model_name}</b>." if model_name else ".")
        )
        intro.setWordWrap(True)

        # -- method --
        self.method_group = QButtonGroup(self)
        method_box = QGroupBox("Method")
        method_grid = QGridLayout(method_box)
        method_grid.setColumnStretch(1, 1)
        self.method_buttons: dict[str, QRadioButton] = {}
        self.method_notes: dict[str, QLabel] = {}
        no_gradients = model is not None and capabilities.why_not(model, capabilities.GRADIENTS) is not None
        for row, (key, label, help_text) in enumerate(METHODS):
            if key == "fast" and no_gradients and "fast" not in self.blocked:
                help_text = FAST_WITHOUT_GRADIENTS
            button = QRadioButton(label)
            note = QLabel(help_text)
            note.setWordWrap(True)
            note.setForegroundRole(QPalette.ColorRole.PlaceholderText)
            note.setBuddy(button)
            self.method_group.addButton(button)
            self.method_buttons[key] = button
            self.method_notes[key] = note
            method_grid.addWidget(button, row, 0, Qt.AlignmentFlag.AlignTop)
            method_grid.addWidget(note, row, 1)
            if key in self.blocked:
                capabilities.gate_all((button, note), self.blocked[key], help_text)
        self.ranks_box = QCheckBox("Also measure SVD ranks, so allocation may factorize layers")
        self.ranks_box.setToolTip("Adds ranks from 75% down to 6.25% of full rank for Linear and "
                                  "Conv2d layers; each level is one SVD, so the sweep takes longer")
        self.ranks_box.setChecked(initial.ranks and "ranks" not in self.blocked)
        if "ranks" in self.blocked:
            capabilities.gate(self.ranks_box, self.blocked["ranks"], "")
        method_grid.addWidget(self.ranks_box, len(METHODS), 0, 1, 2)

        # -- data --
        self.source_group = QButtonGroup(self)
        self.data_box = QGroupBox("Data")
        data_grid = QGridLayout(self.data_box)
        data_grid.setColumnStretch(1, 1)
        self.source_buttons = {
            DEMO: QRadioButton("Bundled demo data (8×8 digits, labelled test split)"),
            FOLDER: QRadioButton("Image folder"),
            ARRAYS: QRadioButton("Arrays file (.npy / .npz)"),
            SYNTHETIC: QRadioButton("Synthetic inputs"),
        }
        for button in self.source_buttons.values():
            self.source_group.addButton(button)
        self.folder_edit = QLineEdit(placeholderText="folder of images")
        self.arrays_edit = QLineEdit(placeholderText="inputs (and labels) as .npy or .npz")
        folder_browse = QPushButton("Browse…")
        folder_browse.clicked.connect(self._browse_folder)
        arrays_browse = QPushButton("Browse…")
        arrays_browse.clicked.connect(self._browse_arrays)
        self.synthetic_count = QSpinBox(minimum=1, maximum=MAX_SAMPLES, value=DEFAULT_SYNTHETIC_COUNT,
                                        suffix=" samples")
        synthetic_note = QLabel("random inputs, no labels: the metric is agreement with the original")
        synthetic_note.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        data_grid.addWidget(self.source_buttons[DEMO], 0, 0, 1, 3)
        data_grid.addWidget(self.source_buttons[FOLDER], 1, 0)
        data_grid.addWidget(self.folder_edit, 1, 1)
        data_grid.addWidget(folder_browse, 1, 2)
        data_grid.addWidget(self.source_buttons[ARRAYS], 2, 0)
        data_grid.addWidget(self.arrays_edit, 2, 1)
        data_grid.addWidget(arrays_browse, 2, 2)
        data_grid.addWidget(self.source_buttons[SYNTHETIC], 3, 0)
        synthetic_row = QHBoxLayout()
        synthetic_row.addWidget(self.synthetic_count)
        synthetic_row.addWidget(synthetic_note, 1)
        data_grid.addLayout(synthetic_row, 3, 1, 1, 2)

        self.limit_spin = QSpinBox(minimum=0, maximum=MAX_SAMPLES, value=initial.limit,
                                   specialValueText="all", suffix=" samples")
        self.limit_spin.setToolTip("Fewer samples are faster; accuracy steps get coarser (1/N)")
        limit_form = QFormLayout()
        limit_form.addRow("Use at most", self.limit_spin)
        data_grid.addLayout(limit_form, 4, 0, 1, 3)

        self.problem_label = QLabel()
        self.problem_label.setForegroundRole(QPalette.ColorRole.BrightText)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.run_button = self.buttons.addButton("Run", QDialogButtonBox.ButtonRole.AcceptRole)
        self.run_button.setDefault(True)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(method_box)
        layout.addWidget(self.data_box)
        layout.addWidget(self.problem_label)
        layout.addWidget(self.buttons)

        self._set_initial(initial)
        for signal in (self.method_group.buttonToggled, self.source_group.buttonToggled):
            signal.connect(self._update)
        for edit in (self.folder_edit, self.arrays_edit):
            edit.textChanged.connect(self._update)
        self._update()
        self.resize(620, self.sizeHint().height())

    def _set_initial(self, initial: DataChoice) -> None:
        method = initial.method if initial.method in self.method_buttons else "exact"
        if method in self.blocked:  # the first method this model can do; data-free always can
            method = next(key for key, _label, _help in METHODS if key not in self.blocked)
        self.method_buttons[method].setChecked(True)
        kind = source_kind(initial.spec)
        self.source_buttons[kind].setChecked(True)
        spec = initial.spec or DEMO
        if kind == FOLDER:
            self.folder_edit.setText(spec)
        elif kind == ARRAYS:
            self.arrays_edit.setText(spec)
        elif kind == SYNTHETIC and spec.partition(":")[2].isdigit():
            self.synthetic_count.setValue(int(spec.partition(":")[2]))

    # -- reading the answer -------------------------------------------------------------------
    def method(self) -> str:
        return next(key for key, button in self.method_buttons.items() if button.isChecked())

    def source(self) -> str:
        return next(key for key, button in self.source_buttons.items() if button.isChecked())

    def spec(self) -> str | None:
        """The data spec for engine.data.open_data; None for the data-free method."""
        if self.method() == "datafree":
            return None
        kind = self.source()
        if kind == FOLDER:
            return self.folder_edit.text().strip()
        if kind == ARRAYS:
            return self.arrays_edit.text().strip()
        if kind == SYNTHETIC:
            return f"{SYNTHETIC}:{self.synthetic_count.value()}"
        return DEMO

    def choice(self) -> DataChoice:
        return DataChoice(spec=self.spec(), method=self.method(), limit=self.limit_spin.value(),
                          ranks=self.ranks_box.isChecked())

    def problem(self) -> str:
        """Why Run is disabled, or "" when the choice can be tried."""
        spec = self.spec()
        if spec is None:
            return ""
        kind = self.source()
        if kind in (FOLDER, ARRAYS) and not spec:
            return "Choose a folder of images." if kind == FOLDER else "Choose a .npy or .npz file."
        path = Path(spec).expanduser()
        if kind == FOLDER and not path.is_dir():
            return f"No folder {path}."
        if kind == ARRAYS and not path.is_file():
            return f"No file {path}."
        return ""

    # -- reacting -----------------------------------------------------------------------------
    def _update(self, *_args: object) -> None:
        needs_data = self.method() != "datafree"
        self.data_box.setEnabled(needs_data)
        self.folder_edit.setEnabled(self.source() == FOLDER)
        self.arrays_edit.setEnabled(self.source() == ARRAYS)
        self.synthetic_count.setEnabled(self.source() == SYNTHETIC)
        problem = self.problem()
        self.problem_label.setText(problem)
        self.problem_label.setVisible(bool(problem))
        self.run_button.setEnabled(not problem)

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of images", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)
            self.source_buttons[FOLDER].setChecked(True)

    def _browse_arrays(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Arrays file", self.arrays_edit.text(), ARRAY_FILTER)
        if path:
            self.arrays_edit.setText(path)
            self.source_buttons[ARRAYS].setChecked(True)


def ask_data_choice(parent: QWidget | None, initial: DataChoice | None = None,
                    model_name: str = "", model: Model | None = None) -> DataChoice | None:
    """Show the dialog modally; the choice, or None when cancelled. Methods `model` cannot run
    are disabled, with the engine's reason as their tooltip."""
    dialog = DataDialog(parent, initial, model_name, model)
    return dialog.choice() if dialog.exec() == QDialog.DialogCode.Accepted else None


def _main(argv: list[str]) -> int:
    from gui.preview import ensure_app

    ensure_app()
    choice = ask_data_choice(None, DataChoice(), argv[0] if argv else "")
    print(choice)
    return 0 if choice is not None else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
