"""Choose how to measure sensitivity: the method, and data that fits the model.

The dialog starts from the model's own input specs: it lists each input (name, type, shape, what
synthetic data would put there), asks for the sizes the file leaves open (a sequence length, a
scalar setting such as a sample rate), and offers only sources that can feed the model: the demo
digits where the model takes 1×8×8 images, an image folder where it takes one image input, an
``.npz`` with one array per input name, or synthetic inputs. Every choice is checked against the
inputs by the engine (:func:`engine.data.check_data_fits`: names, dtypes, shapes, from array
headers only) before Run is enabled; the reason it is not is one line under the form.

The dialog only builds a :class:`~gui.project.DataChoice` (a data spec string as
:func:`engine.data.open_data` reads it, sizes included, a method, a sample limit); opening the
data happens on the worker, so a big folder never freezes the window.

Run alone: ``python -m gui.data_dialog [MODEL]`` prints the choice.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QDoubleValidator, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.data import (
    DEFAULT_SYNTHETIC_COUNT,
    check_data_fits,
    digits_fit,
    image_folder_fit,
    missing_sizes,
    parse_synthetic_spec,
    shape_text,
    spec_sample_axis,
    synthetic_spec,
    synthetic_values_text,
)
from engine.errors import SlimscopeError
from engine.model import Model, TensorSpec

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
#: Largest size the dialog offers for an open axis (a sequence length, an image side).
MAX_SIZE = 1_000_000
#: Why Run is off: a red that reads on both the light and the dark theme.
PROBLEM_COLOR = "#e53935"


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
        #: The model's inputs; empty when there is no model or the file records none.
        self.inputs: list[TensorSpec] = list(model.inputs) if model is not None else []
        self.model = model
        self.source_group = QButtonGroup(self)
        self.data_box = QGroupBox("Data")
        data_layout = QVBoxLayout(self.data_box)
        self.inputs_table = self._inputs_table()
        self.size_edits: dict[str, QWidget] = {}
        #: size key -> [(input name, axis)] it fills; axis -1 for a scalar input's value.
        self._size_targets: dict[str, list[tuple[str, int]]] = {}
        sizes_form = self._sizes_form()
        if self.inputs:
            data_layout.addWidget(self.inputs_table)
        if sizes_form is not None:
            data_layout.addLayout(sizes_form)
        data_grid = QGridLayout()
        data_grid.setColumnStretch(1, 1)
        data_layout.addLayout(data_grid)
        several = len(self.inputs) > 1
        self.source_buttons = {
            DEMO: QRadioButton("Bundled demo data (8×8 digits, labelled test split)"),
            FOLDER: QRadioButton("Image folder"),
            ARRAYS: QRadioButton("Arrays file (.npz)" if several else "Arrays file (.npy / .npz)"),
            SYNTHETIC: QRadioButton("Synthetic inputs"),
        }
        #: Source -> the engine's one line why it cannot feed this model (the button is off).
        self.source_blocked: dict[str, str] = {}
        if model is not None:
            for kind, reason in ((DEMO, digits_fit(self.inputs)),
                                 (FOLDER, image_folder_fit(self.inputs) if self.inputs else None)):
                if reason is not None:
                    self.source_blocked[kind] = reason
        for kind, button in self.source_buttons.items():
            self.source_group.addButton(button)
            if kind in self.source_blocked:
                capabilities.gate(button, self.source_blocked[kind], "")
        self.folder_edit = QLineEdit(placeholderText="folder of images")
        self.arrays_edit = QLineEdit(placeholderText=(
            "one array per input name (" + ", ".join(spec.name for spec in self.inputs) + ")"
            if several else "inputs (and labels) as .npy or .npz"))
        self.arrays_edit.setToolTip("An .npz holds one array per input name, labels (if any) as "
                                    "'y'; a model with one input also takes 'x' or a .npy")
        self.folder_browse = QPushButton("Browse…")
        self.folder_browse.clicked.connect(self._browse_folder)
        self.folder_browse.setEnabled(FOLDER not in self.source_blocked)
        arrays_browse = QPushButton("Browse…")
        arrays_browse.clicked.connect(self._browse_arrays)
        self.synthetic_count = QSpinBox(minimum=1, maximum=MAX_SAMPLES, value=DEFAULT_SYNTHETIC_COUNT,
                                        suffix=" samples")
        synthetic_note = QLabel("random inputs, no labels: the metric is agreement with the original")
        synthetic_note.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        data_grid.addWidget(self.source_buttons[DEMO], 0, 0, 1, 3)
        data_grid.addWidget(self.source_buttons[FOLDER], 1, 0)
        data_grid.addWidget(self.folder_edit, 1, 1)
        data_grid.addWidget(self.folder_browse, 1, 2)
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
        self.problem_label.setObjectName("data-problem")
        self.problem_label.setWordWrap(True)  # one line of text; wrapped only on screen
        self.problem_label.setStyleSheet(f"color: {PROBLEM_COLOR};")  # read on light and dark
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
        self.synthetic_count.valueChanged.connect(self._update)
        for widget in self.size_edits.values():
            signal = widget.valueChanged if isinstance(widget, QSpinBox) else widget.textChanged  # type: ignore[attr-defined]
            signal.connect(self._update)
        self._update()
        self.resize(620, self.sizeHint().height())

    def _inputs_table(self) -> QTableWidget:
        """One read-only row per model input: name, type, shape, what synthetic data holds."""
        table = QTableWidget(len(self.inputs), 4)
        table.setObjectName("model-inputs")
        table.setHorizontalHeaderLabels(["Input", "Type", "Shape", "Synthetic values"])
        table.verticalHeader().hide()
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        table.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        for row, spec in enumerate(self.inputs):
            for column, text in enumerate((spec.name, spec.dtype, shape_text(spec.shape),
                                           synthetic_values_text(spec))):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                table.setItem(row, column, item)
        header = table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        rows = min(len(self.inputs), 5)
        table.setFixedHeight(header.sizeHint().height() + rows * table.verticalHeader().defaultSectionSize()
                             + 2 * table.frameWidth())
        return table

    def _sizes_form(self) -> QFormLayout | None:
        """A field for every size the file leaves open (named sizes shared by several inputs
        are asked once), and for every scalar input's value; None when nothing is open."""
        for name, axis, size_name in missing_sizes(self.inputs):
            key = f"{name}:value" if axis < 0 else (size_name or f"{name}[{axis}]")
            self._size_targets.setdefault(key, []).append((name, axis))
        if not self._size_targets:
            return None
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.FieldsStayAtSizeHint)
        note = QLabel("Sizes this model leaves open, for synthetic inputs:")
        note.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        form.addRow(note)
        dtypes = {spec.name: spec.dtype for spec in self.inputs}
        for key, targets in self._size_targets.items():
            users = ", ".join(dict.fromkeys(name for name, _ in targets))
            if targets[0][1] < 0:  # a scalar input: its value
                name = targets[0][0]
                edit = QLineEdit(placeholderText=f"value ({dtypes[name]})")
                edit.setValidator(QDoubleValidator(edit))
                edit.setToolTip(f"Input {name!r} is a single {dtypes[name]} value (a setting such "
                                "as a sample rate); synthetic data cannot guess it")
                self.size_edits[key] = edit
                form.addRow(f"{name}:", edit)
                continue
            spin = QSpinBox(minimum=0, maximum=MAX_SIZE, specialValueText="?")
            spin.setMinimumWidth(120)
            spin.setToolTip(f"The size of {key!r} in {users}; the file leaves it open")
            self.size_edits[key] = spin
            form.addRow(f"{key} ({users}):", spin)
        return form

    def _set_initial(self, initial: DataChoice) -> None:
        method = initial.method if initial.method in self.method_buttons else "exact"
        if method in self.blocked:  # the first method this model can do; data-free always can
            method = next(key for key, _label, _help in METHODS if key not in self.blocked)
        self.method_buttons[method].setChecked(True)
        kind = source_kind(initial.spec)
        spec = initial.spec or DEMO
        if kind in self.source_blocked:  # e.g. the digits offered to a text model: synthetic
            kind, spec = SYNTHETIC, SYNTHETIC
        self.source_buttons[kind].setChecked(True)
        if kind == FOLDER:
            self.folder_edit.setText(spec)
        elif kind == ARRAYS:
            self.arrays_edit.setText(spec)
        elif kind == SYNTHETIC:
            try:
                count, shapes = parse_synthetic_spec(spec)
            except SlimscopeError:
                return
            self.synthetic_count.setValue(count)
            self._show_sizes(shapes)

    def _show_sizes(self, shapes: dict[str, tuple[int | float, ...]]) -> None:
        """Fill the size fields from a synthetic spec's sizes (a project's, a previous run's)."""
        for key, targets in self._size_targets.items():
            for name, axis in targets:
                given = shapes.get(name)
                if not given:
                    continue
                widget = self.size_edits[key]
                if axis < 0 and isinstance(widget, QLineEdit):
                    widget.setText(f"{given[0]:g}")
                elif isinstance(widget, QSpinBox) and axis < len(given) and int(given[axis]) > 0:
                    widget.setValue(int(given[axis]))
                break

    def sizes(self) -> dict[str, list[int | float]]:
        """Input name -> whole shape (the sample axis 1) for every input with an open size the
        user gave, or [value] for a scalar input; what synthetic data needs to be made."""
        batch_axes = {spec.name: spec_sample_axis(spec) for spec in self.inputs}
        specs = {spec.name: spec for spec in self.inputs}
        shapes: dict[str, list[int | float]] = {}
        for key, targets in self._size_targets.items():
            widget = self.size_edits[key]
            for name, axis in targets:
                if axis < 0:
                    text = widget.text().strip() if isinstance(widget, QLineEdit) else ""
                    if text:
                        value = float(text.replace(",", "."))
                        shapes[name] = [int(value) if value.is_integer() else value]
                    continue
                size = widget.value() if isinstance(widget, QSpinBox) else 0
                if not size:
                    continue
                shape = shapes.setdefault(name, [
                    1 if index == batch_axes[name] else (dim if isinstance(dim, int) and dim > 0 else 0)
                    for index, dim in enumerate(specs[name].shape)])
                shape[axis] = size
        scalars = {name for targets in self._size_targets.values() for name, axis in targets if axis < 0}
        return {name: shape for name, shape in shapes.items() if name in scalars or all(shape)}

    def missing_size(self) -> str | None:
        """The first open size synthetic data still needs, as a prompt; None when all are given."""
        given = self.sizes()
        for key, targets in self._size_targets.items():
            names = [name for name, _ in targets if name not in given]
            if names:
                if targets[0][1] < 0:
                    return f"Give the value of the scalar input {names[0]!r} for synthetic inputs."
                return (f"Give the size {key!r} of {', '.join(repr(n) for n in names)} "
                        "for synthetic inputs.")
        return None

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
            shapes = self.sizes()
            if not shapes:
                return f"{SYNTHETIC}:{self.synthetic_count.value()}"
            try:
                return synthetic_spec(self.synthetic_count.value(), shapes)
            except SlimscopeError:  # a name the spec cannot carry; problem() says so
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
        if kind == ARRAYS and not path.exists():  # a FIFO or device: the engine's guard says so
            return f"No file {path}."
        if kind in self.source_blocked:
            return _sentence(self.source_blocked[kind])
        if kind == SYNTHETIC and self.missing_size() is not None:
            return self.missing_size() or ""
        if self.model is None:
            return ""
        if kind == SYNTHETIC:
            try:
                synthetic_spec(self.synthetic_count.value(), self.sizes())
            except SlimscopeError as exc:
                return _sentence(str(exc))
        reason = check_data_fits(self.inputs, spec)  # names, dtypes, shapes; headers only
        return _sentence(reason) if reason else ""

    # -- reacting -----------------------------------------------------------------------------
    def _update(self, *_args: object) -> None:
        needs_data = self.method() != "datafree"
        self.data_box.setEnabled(needs_data)
        self.folder_edit.setEnabled(self.source() == FOLDER)
        self.arrays_edit.setEnabled(self.source() == ARRAYS)
        self.synthetic_count.setEnabled(self.source() == SYNTHETIC)
        for widget in self.size_edits.values():
            widget.setEnabled(self.source() == SYNTHETIC)
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


def _sentence(reason: str) -> str:
    """The engine's one line as the dialog shows it, with a full stop (not capitalised: it
    often starts with a file name)."""
    reason = " ".join(reason.split())
    if not reason:
        return reason
    return reason if reason.endswith((".", "?", "!", ")")) else reason + "."


def ask_data_choice(parent: QWidget | None, initial: DataChoice | None = None,
                    model_name: str = "", model: Model | None = None) -> DataChoice | None:
    """Show the dialog modally; the choice, or None when cancelled. Methods `model` cannot run
    are disabled, with the engine's reason as their tooltip."""
    dialog = DataDialog(parent, initial, model_name, model)
    return dialog.choice() if dialog.exec() == QDialog.DialogCode.Accepted else None


def _main(argv: list[str]) -> int:
    from gui.preview import ensure_app

    ensure_app()
    model = None
    if argv:
        from engine.formats import load_model

        model = load_model(Path(argv[0]))
    choice = ask_data_choice(None, DataChoice(), model.path.name if model else "", model)
    print(choice)
    return 0 if choice is not None else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
